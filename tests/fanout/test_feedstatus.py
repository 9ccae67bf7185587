"""The bridge's feed_down / feed_up decisions (polyfan.fanout.feedstatus): no sockets."""

from __future__ import annotations

from polyfan.fanout.feedstatus import OUTAGE, SILENT, FeedStatus
from polyfan.fanout.protocol import Channel

TSLA = Channel(100, "TSLA")
AAPL = Channel(100, "AAPL")
MSFT = Channel(100, "MSFT")


def served_by(table: dict[Channel, list[str]]):  # type: ignore[no-untyped-def]
    return lambda channel: table.get(channel, [])


def test_a_client_hears_feed_down_once_and_feed_up_once_with_the_window() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    serving = served_by({TSLA: ["agg1"]})
    clients = [("c1", {TSLA})]
    assert feed.statuses(clients, serving) == []
    assert feed.agg_down("agg1", OUTAGE, 5_000, "the proxy restarted")
    assert not feed.agg_down("agg1", OUTAGE, 6_000, "again")  # already down: no news
    ((client, down),) = feed.statuses(clients, serving)
    assert client == "c1"
    assert (down["ev"], down["status"], down["s"]) == ("status", "feed_down", 5_000)
    assert "100Ms.TSLA" in down["message"] and "the proxy restarted" in down["message"]
    assert feed.statuses(clients, serving) == []  # told once
    assert feed.agg_up("agg1", OUTAGE, 7_500, "outage over")
    ((_, up),) = feed.statuses(clients, serving)
    assert (up["status"], up["s"], up["e"]) == ("feed_up", 5_000, 7_500)
    assert feed.statuses(clients, serving) == []


def test_a_replica_that_carries_on_keeps_the_feed_up() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    serving = served_by({TSLA: ["agg1", "agg2"]})
    clients = [("c1", {TSLA})]
    feed.agg_down("agg1", SILENT, 9_000, "aggregator agg1 not heard")
    assert feed.statuses(clients, serving) == []
    feed.agg_down("agg2", OUTAGE, 9_500, "nothing heard from the proxy")
    ((_, down),) = feed.statuses(clients, serving)
    assert down["s"] == 9_000
    feed.agg_up("agg2", OUTAGE, 10_000, "outage over")
    ((_, up),) = feed.statuses(clients, serving)
    assert (up["status"], up["s"], up["e"]) == ("feed_up", 9_000, 10_000)


def test_only_the_clients_of_a_down_shard_are_told() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    serving = served_by({TSLA: ["shard1"], AAPL: ["shard2"], MSFT: ["shard2"]})
    clients = [("tsla", {TSLA}), ("apple", {AAPL}), ("both", {TSLA, MSFT})]
    feed.agg_down("shard2", SILENT, 1_000, "aggregator shard2 not heard")
    told = dict(feed.statuses(clients, serving))
    assert sorted(told) == ["apple", "both"]
    assert "100Ms.MSFT" in told["both"]["message"]


def test_an_agg_down_for_two_reasons_is_back_when_both_cleared() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    serving = served_by({TSLA: ["agg1"]})
    clients = [("c1", {TSLA})]
    feed.agg_down("agg1", OUTAGE, 3_000, "upstream")
    feed.agg_down("agg1", SILENT, 4_000, "not heard")
    assert [e["s"] for _, e in feed.statuses(clients, serving)] == [3_000]
    feed.agg_up("agg1", SILENT, 8_000, "heard again")
    assert feed.statuses(clients, serving) == []
    assert feed.down_since("agg1") == 3_000
    feed.agg_up("agg1", OUTAGE, 9_000, "outage over")
    assert [(e["status"], e["s"], e["e"]) for _, e in feed.statuses(clients, serving)] == [
        ("feed_up", 3_000, 9_000)
    ]
    assert not feed.agg_up("agg1", OUTAGE, 9_000, "again")


def test_a_client_that_left_is_forgotten_and_one_unserved_is_never_down() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    serving = served_by({TSLA: ["agg1"]})
    feed.agg_down("agg1", SILENT, 1, "not heard")
    assert len(feed.statuses([("c1", {TSLA}), ("c2", {AAPL})], serving)) == 1
    feed.forget_client("c1")
    feed.agg_up("agg1", SILENT, 2, "back")
    assert feed.statuses([("c1", {TSLA})], serving) == []


def test_a_star_channel_of_shards_is_down_when_a_down_shard_serves_symbols_no_other_does() -> None:
    feed: FeedStatus[str, str] = FeedStatus()
    star = Channel(100, None)
    shards = {"shard1": frozenset({"TSLA"}), "shard2": frozenset({"AAPL", "MSFT"})}
    serving = served_by({star: ["shard1", "shard2"], AAPL: ["shard2"]})
    clients = [("all", {star}), ("apple", {AAPL})]
    feed.agg_down("shard1", SILENT, 4_000, "aggregator shard1 not heard")
    ((client, down),) = feed.statuses(clients, serving, shards.get)
    assert (client, down["status"], down["s"]) == ("all", "feed_down", 4_000)
    assert "100Ms.*" in down["message"]
    # replicas serving every symbol: one down leaves the star channel whole
    replicas: FeedStatus[str, str] = FeedStatus()
    replicas.agg_down("r1", SILENT, 1, "not heard")
    everything = {"r1": None, "r2": None}
    assert (
        replicas.statuses([("all", {star})], served_by({star: ["r1", "r2"]}), everything.get) == []
    )
    # a down shard whose symbols another still serves: whole too
    overlap: FeedStatus[str, str] = FeedStatus()
    overlap.agg_down("a", SILENT, 1, "not heard")
    serves = {"a": frozenset({"TSLA"}), "b": frozenset({"TSLA", "AAPL"})}
    assert overlap.statuses([("all", {star})], served_by({star: ["a", "b"]}), serves.get) == []
