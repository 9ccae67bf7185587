"""CONTRACT §4 and §5 over real sockets: an in-process bridge, a scripted agg on a real XPUB,
real WebSocket and HTTP clients."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan import bridge as bridge_module
from polyfan.bridge import PASS_LOG_ENV, Bridge
from polyfan.config import BridgeConfig
from polyfan.fanout.protocol import Limits, parse_channel
from polyfan.wire import codec
from procs import free_port
from wsclient import Client, eventually

T0 = 1_781_622_376_000 // 1000 * 1000


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


async def start_bridge(
    agg: FakeAgg, tokens: tuple[str, ...] = ("secret",), **limits: Any
) -> Bridge:
    bridge = Bridge(
        BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0), tokens=tokens),
        Limits(**limits),
    )
    await bridge.start()
    await eventually(lambda: bridge.catalog.intervals, what="the agg's announce")
    return bridge


@pytest.fixture
async def bridge(agg: FakeAgg) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(agg)
    yield bridge
    await bridge.stop()


def url(bridge: Bridge, path: str = "/") -> str:
    return f"ws://127.0.0.1:{bridge.port}{path}"


def http_get(bridge: Bridge, path: str) -> tuple[int, str, bytes]:
    """GET with the bridge's first token, if it has any (CONTRACT §8)."""
    request = urllib.request.Request(f"http://127.0.0.1:{bridge.port}{path}")
    if bridge.config.tokens:
        request.add_header("Authorization", f"Bearer {bridge.config.tokens[0]}")
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, r.headers["Content-Type"], r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def get(bridge: Bridge, path: str) -> tuple[int, str, bytes]:
    return await asyncio.to_thread(http_get, bridge, path)


def counter(bridge: Bridge, name: str) -> float:
    return bridge.registry.values()[name]


async def subscribed(client: Client, agg: FakeAgg, *channels: str) -> None:
    await client.send({"action": "subscribe", "params": ",".join(channels)})
    assert await client.statuses(len(channels)) == [
        {"ev": "status", "status": "success", "message": f"subscribed to: {c}"} for c in channels
    ]
    for channel in channels:
        topic = channel.encode() if channel.endswith("*") else channel.encode() + b"\x00"
        await asyncio.to_thread(agg.wait_subscribed, topic.replace(b"*", b""))


# -- the connection and auth -----------------------------------------------------------------


async def test_any_path_gets_connected_status_then_auth_success(bridge: Bridge) -> None:
    for path in ("/", "/stocks", "/any/path?x=1"):
        client = await Client.open(url(bridge, path))
        await client.close()


async def test_auth_and_subscribe_back_to_back_are_processed_in_order(
    bridge: Bridge, agg: FakeAgg
) -> None:
    client = await Client.open(url(bridge), token=None)
    await client.send({"action": "auth", "params": "secret"})
    await client.send({"action": "subscribe", "params": "500Ms.TSLA,1000Ms.AAPL"})
    assert await client.statuses(3) == [
        {"ev": "status", "status": "auth_success", "message": "authenticated"},
        {"ev": "status", "status": "success", "message": "subscribed to: 500Ms.TSLA"},
        {"ev": "status", "status": "success", "message": "subscribed to: 1000Ms.AAPL"},
    ]
    await asyncio.to_thread(agg.wait_subscribed, b"1000Ms.AAPL\x00")
    rows = bar_rows(1000, T0, 3)
    agg.publish(1000, "AAPL", rows)
    assert await client.bars(3) == [expected_event("AAPL", 1000, r) for r in rows]
    await client.close()


async def test_wrong_token_gets_auth_failed_and_close_1008(bridge: Bridge) -> None:
    client = await Client.open(url(bridge), token=None)
    await client.send({"action": "auth", "params": "wrong"})
    assert await client.next_event() == {
        "ev": "status",
        "status": "auth_failed",
        "message": "authentication failed",
    }
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), 5)
    assert client.ws.close_code == 1008
    assert counter(bridge, "polyfan_bridge_bad_requests_total") == 1


async def test_anything_but_auth_before_auth_gets_an_error_and_stays_open(bridge: Bridge) -> None:
    client = await Client.open(url(bridge), token=None)
    await client.send({"action": "subscribe", "params": "500Ms.TSLA"})
    event = await client.next_event()
    assert event["status"] == "error"
    assert "not authenticated" in event["message"]
    await client.send({"action": "auth", "params": "secret"})
    assert (await client.next_event())["status"] == "auth_success"
    await client.close()


async def test_without_tokens_any_auth_is_accepted(agg: FakeAgg) -> None:
    bridge = await start_bridge(agg, tokens=())
    try:
        client = await Client.open(url(bridge), token="anything at all")
        await client.close()
    finally:
        await bridge.stop()


# -- bad requests, each answered, none fatal -----------------------------------------------------


BAD_FRAMES = [
    ("{not json", "malformed JSON"),
    ("[1, 2]", "not a JSON object"),
    ('{"action": "dance"}', "unknown action"),
    ('{"action": "subscribe", "params": "TSLA"}', "TSLA: not a channel"),
    ('{"action": "subscribe", "params": "500Ms.TS LA"}', "500Ms.TS LA: bad symbol"),
    ('{"action": "subscribe", "params": "500Ms.T$LA"}', "500Ms.T$LA: bad symbol"),
    ('{"action": "subscribe", "params": "700Ms.TSLA"}', "700Ms.TSLA: interval 700ms is not served"),
    ('{"action": "subscribe", "params": 5}', "params must be a comma-separated string"),
    ('{"action": "subscribe", "params": "500Ms.TSLA", "since": "yesterday"}', "since must be"),
]


@pytest.mark.parametrize(("frame", "message"), BAD_FRAMES)
async def test_a_bad_request_gets_an_error_status_naming_it(
    bridge: Bridge, frame: str, message: str
) -> None:
    client = await Client.open(url(bridge))
    await client.ws.send(frame)
    event = await client.next_event()
    assert event["ev"] == "status"
    assert event["status"] == "error"
    assert message in event["message"]
    assert counter(bridge, "polyfan_bridge_bad_requests_total") == 1
    # Still open and serving:
    await client.send({"action": "subscribe", "params": "500Ms.OK"})
    assert (await client.next_event())["message"] == "subscribed to: 500Ms.OK"
    await client.close()


async def test_a_frame_over_64_kib_is_closed_with_1009(bridge: Bridge) -> None:
    client = await Client.open(url(bridge))
    await client.ws.send('{"action":"subscribe","params":"' + "x" * 70_000 + '"}')
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(client.ws.recv(), 5)
    assert client.ws.close_code == 1009
    await eventually(lambda: counter(bridge, "polyfan_bridge_bad_requests_total") == 1)


async def test_a_well_behaved_client_is_unaffected_by_all_the_bad_ones(
    bridge: Bridge, agg: FakeAgg
) -> None:
    good = await Client.open(url(bridge))
    await subscribed(good, agg, "250Ms.GOOD")
    rows = bar_rows(250, T0, 400)
    for i in range(0, 400, 40):
        agg.publish(250, "GOOD", rows[i : i + 40])
        bad = await Client.open(url(bridge), token=None)
        for frame, _ in BAD_FRAMES:
            await bad.ws.send(frame)
        await bad.ws.send("x" * 70_000)
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(bad.ws.recv(), 5)
        wrong = await Client.open(url(bridge), token=None)
        await wrong.send({"action": "auth", "params": "nope"})
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(wrong.ws.recv(), 5)
    assert await good.bars(400) == [expected_event("GOOD", 250, r) for r in rows]
    assert good.pending() == []
    await good.close()


async def test_unsubscribed_channel_gets_an_error_while_others_subscribe(
    bridge: Bridge, agg: FakeAgg
) -> None:
    client = await Client.open(url(bridge))
    await client.send({"action": "subscribe", "params": "500Ms.TSLA,9000Ms.TSLA,bad"})
    events = await client.statuses(3)
    assert events[0]["message"] == "subscribed to: 500Ms.TSLA"
    assert [e["status"] for e in events[1:]] == ["error", "error"]
    assert {e["message"].split(":")[0] for e in events[1:]} == {"9000Ms.TSLA", "bad"}
    await client.close()


async def test_rate_limit_answers_excess_frames_with_an_error(agg: FakeAgg) -> None:
    bridge = await start_bridge(agg, rate_per_second=0.001, rate_burst=3.0)  # ~no refill
    try:
        client = await Client.open(url(bridge))  # the auth frame took one token
        for _ in range(3):
            await client.send({"action": "subscribe", "params": "500Ms.A"})
        events = await client.statuses(3)
        assert [e["status"] for e in events] == ["success", "success", "error"]
        assert "rate limit" in events[2]["message"]
        await client.close()
    finally:
        await bridge.stop()


async def test_subscription_limit_per_connection_is_enforced(agg: FakeAgg) -> None:
    bridge = await start_bridge(agg, max_subscriptions=2)
    try:
        client = await Client.open(url(bridge))
        await client.send({"action": "subscribe", "params": "500Ms.A,500Ms.B,500Ms.C"})
        events = await client.statuses(3)
        assert [e["status"] for e in events] == ["success", "success", "error"]
        assert events[2]["message"].startswith("500Ms.C: subscription limit of 2")
        await client.close()
    finally:
        await bridge.stop()


# -- bars ----------------------------------------------------------------------------------------


async def test_bars_arrive_as_mb_events_exactly(bridge: Bridge, agg: FakeAgg) -> None:
    client = await Client.open(url(bridge))
    await subscribed(client, agg, "100Ms.TSLA")
    rows = bar_rows(100, T0, 5)
    rows["v"][1] = 12.5  # fractional shares stay fractional
    rows["v"][2] = 0
    rows["vw"][2] = np.nan  # no volume: vw null
    rows["flags"][3] = codec.BAR_FLAG_OUTAGE
    rows["flags"][4] = codec.BAR_FLAG_CARRIED
    agg.publish(100, "TSLA", rows)
    events = await client.bars(5)
    assert events == [expected_event("TSLA", 100, r) for r in rows]
    assert events[0]["v"] == 100 and isinstance(events[0]["v"], int)
    assert events[1]["v"] == 12.5
    assert events[2]["vw"] is None
    assert events[3]["outage"] is True
    assert "outage" not in events[4]
    await client.close()


async def test_the_pass_log_has_a_line_per_fan_out_pass_with_its_writes_and_bars(
    agg: FakeAgg, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_path = tmp_path / "passes"
    monkeypatch.setenv(PASS_LOG_ENV, str(log_path))
    bridge = await start_bridge(agg)
    clients = [await Client.open(url(bridge)) for _ in range(2)]
    for client in clients:
        await subscribed(client, agg, "100Ms.TSLA")
    rows = bar_rows(100, T0, 3)
    agg.publish(100, "TSLA", rows[:1])
    agg.publish(100, "TSLA", rows[1:])
    for client in clients:
        assert await client.bars(3) == [expected_event("TSLA", 100, r) for r in rows]
        await client.close()
    await bridge.stop()
    lines = [line.split() for line in log_path.read_text().splitlines()]
    assert lines and all(len(line) == 5 for line in lines)
    assert {int(line[0]) for line in lines} == {os.getpid()}
    assert all(float(line[1]) <= float(line[2]) <= time.perf_counter() for line in lines)
    assert all(int(line[3]) == 2 for line in lines)  # each pass wrote one frame to each client
    assert sum(int(line[4]) for line in lines) == 3


async def test_every_bar_written_to_a_client_is_one_delivery_observation(
    bridge: Bridge, agg: FakeAgg
) -> None:
    clients = [await Client.open(url(bridge)) for _ in range(2)]
    for client in clients:
        await subscribed(client, agg, "100Ms.TSLA")
    rows = bar_rows(100, T0, 4)
    started = time.monotonic()
    agg.publish(100, "TSLA", rows[:1])
    agg.publish(100, "TSLA", rows[1:])
    for client in clients:
        assert await client.bars(4) == [expected_event("TSLA", 100, r) for r in rows]
    waited = time.monotonic() - started
    delivery, counters = bridge.counters.delivery, bridge.counters
    assert delivery.count == counters.bars_sent.value == 8
    assert 0 < delivery.sum <= 8 * waited  # each from its arrival to its write, in the wait
    assert sum(delivery.counts) == 8
    text = bridge.render_metrics().decode()
    assert "\npolyfan_bridge_delivery_seconds_count 8.0\n" in text
    assert '\npolyfan_bridge_delivery_seconds_bucket{le="+Inf"} 8.0\n' in text
    for client in clients:
        await client.close()


async def test_star_channel_gets_every_symbol_once_even_with_an_exact_channel(
    bridge: Bridge, agg: FakeAgg
) -> None:
    client = await Client.open(url(bridge))
    await subscribed(client, agg, "500Ms.*", "500Ms.TSLA")
    tsla, aapl = bar_rows(500, T0, 2), bar_rows(500, T0, 2, price=50)
    agg.publish(500, "TSLA", tsla)
    agg.publish(500, "AAPL", aapl)
    agg.publish(1000, "AAPL", bar_rows(1000, T0, 1))  # another interval: not subscribed
    events = await client.bars(4)
    assert sorted(events, key=lambda e: (e["sym"], e["s"])) == [
        expected_event("AAPL", 500, r) for r in aapl
    ] + [expected_event("TSLA", 500, r) for r in tsla]
    agg.flush()
    await asyncio.sleep(0)  # nothing more may arrive: a later subscribed bar proves it
    await subscribed(client, agg, "1000Ms.MARK")
    mark = bar_rows(1000, T0, 1)
    agg.publish(1000, "MARK", mark)
    assert await client.bars(1) == [expected_event("MARK", 1000, mark[0])]
    await client.close()


async def test_topic_is_subscribed_on_first_client_and_unsubscribed_after_last(
    bridge: Bridge, agg: FakeAgg
) -> None:
    topic = b"500Ms.NVDA\x00"
    one, two = await Client.open(url(bridge)), await Client.open(url(bridge))
    await subscribed(one, agg, "500Ms.NVDA")
    await subscribed(two, agg, "500Ms.NVDA")
    assert agg.subscribe_count(topic) == 1
    await one.send({"action": "unsubscribe", "params": "500Ms.NVDA"})
    assert (await one.next_event())["message"] == "unsubscribed to: 500Ms.NVDA"
    rows = bar_rows(500, T0, 2)
    agg.publish(500, "NVDA", rows)
    assert await two.bars(2) == [expected_event("NVDA", 500, r) for r in rows]
    assert agg.is_subscribed(topic)
    await two.close()  # the last client leaves: the topic is unsubscribed
    await asyncio.to_thread(agg.wait_unsubscribed, topic)
    await one.close()


async def test_since_sends_stored_bars_then_live_with_no_gap_or_repeat(
    bridge: Bridge, agg: FakeAgg
) -> None:
    rows = bar_rows(100, T0, 300)
    agg.publish(100, "SEAM", rows[:100])
    agg.flush()
    watcher = await Client.open(url(bridge))
    await subscribed(watcher, agg, "100Ms.SEAM")

    async def keep_publishing() -> None:
        for i in range(100, 300, 5):
            agg.publish(100, "SEAM", rows[i : i + 5])
            await asyncio.sleep(0.002)

    publisher = asyncio.create_task(keep_publishing())
    flowing = await watcher.bars(10)  # live bars are flowing when the since-client subscribes
    client = await Client.open(url(bridge))
    since = int(rows["s"][10])
    await client.send({"action": "subscribe", "params": "100Ms.SEAM", "since": since})
    assert (await client.next_event())["message"] == "subscribed to: 100Ms.SEAM"
    await publisher
    assert await client.bars(290) == [expected_event("SEAM", 100, r) for r in rows[10:]]
    assert flowing + await watcher.bars(190) == [expected_event("SEAM", 100, r) for r in rows[100:]]
    agg.flush()
    assert client.pending() == []
    await client.close()
    await watcher.close()


async def test_since_on_a_star_channel_is_an_error(bridge: Bridge) -> None:
    client = await Client.open(url(bridge))
    await client.send({"action": "subscribe", "params": "500Ms.*", "since": 0})
    event = await client.next_event()
    assert event["status"] == "error"
    assert event["message"].startswith("500Ms.*: since needs one symbol")
    await client.close()


async def test_sharded_aggs_each_serve_their_own_symbols() -> None:
    with (
        FakeAgg("tcp://127.0.0.1:*", intervals=(500,), symbols=["AAPL"]) as a,
        FakeAgg("tcp://127.0.0.1:*", intervals=(500, 1000), symbols=["TSLA"]) as b,
    ):
        bridge = Bridge(BridgeConfig(sub=(a.endpoint, b.endpoint), listen=("127.0.0.1", 0)))
        await bridge.start()
        try:
            # both aggs announced (two intervals alone come from b's announce)
            served = [parse_channel(name) for name in ("500Ms.AAPL", "500Ms.TSLA")]
            await eventually(lambda: all(bridge.catalog.aggs_for(c) for c in served))
            client = await Client.open(url(bridge), token="x")
            await client.send(
                {"action": "subscribe", "params": "500Ms.AAPL,500Ms.TSLA,1000Ms.AAPL,500Ms.MSFT"}
            )
            events = await client.statuses(4)
            assert [e["status"] for e in events] == ["success", "success", "error", "error"]
            assert "not served" in events[3]["message"]
            await asyncio.to_thread(a.wait_subscribed, b"500Ms.AAPL\x00")
            await asyncio.to_thread(b.wait_subscribed, b"500Ms.TSLA\x00")
            assert not a.is_subscribed(b"500Ms.TSLA\x00")
            assert not b.is_subscribed(b"500Ms.AAPL\x00")
            ra, rb = bar_rows(500, T0, 2), bar_rows(500, T0, 2, price=7)
            a.publish(500, "AAPL", ra)
            b.publish(500, "TSLA", rb)
            got = await client.bars(4)
            assert sorted(got, key=lambda e: (e["sym"], e["s"])) == [
                expected_event("AAPL", 500, r) for r in ra
            ] + [expected_event("TSLA", 500, r) for r in rb]
            status, _, body = await get(bridge, "/api/bars?channel=500Ms.TSLA")
            assert status == 200
            assert orjson.loads(body) == [expected_event("TSLA", 500, r) for r in rb]
            await client.close()
        finally:
            await bridge.stop()


@contextlib.asynccontextmanager
async def replicas(*froms: int) -> AsyncIterator[tuple[list[FakeAgg], Bridge]]:
    """Aggs serving 500 ms bars of every symbol, the first listening since long before T0 and
    the others from ``froms``, and a bridge on all that has heard every announce."""
    with contextlib.ExitStack() as stack:
        aggs = [
            stack.enter_context(
                FakeAgg("tcp://127.0.0.1:*", intervals=(500,), listening_from=listening_from)
            )
            for listening_from in (T0 - 60_000, *froms)
        ]
        config = BridgeConfig(sub=tuple(agg.endpoint for agg in aggs), listen=("127.0.0.1", 0))
        bridge = Bridge(config)
        await bridge.start()
        try:
            await eventually(
                lambda: all(agg.whole_after < T0 + 10_000 for agg in bridge.aggs),
                what="every announce",
            )
            yield aggs, bridge
        finally:
            await bridge.stop()


async def subscribed_on_both(client: Client, a: FakeAgg, b: FakeAgg, *channels: str) -> None:
    await subscribed(client, a, *channels)
    for channel in channels:
        topic = channel.encode() if channel.endswith("*") else channel.encode() + b"\x00"
        await asyncio.to_thread(b.wait_subscribed, topic.replace(b"*", b""))


async def test_replica_aggs_give_each_bar_once_and_the_channel_outlives_either(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two aggs serving the same channels: each bar reaches a client once, whichever agg sent
    it first; when one stops, the other's bars carry on, and history is asked of it."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "HEARD_WITHIN", 2.0)
    async with replicas(T0 - 50_000) as ((a, b), bridge):
        exact, star = await Client.open(url(bridge)), await Client.open(url(bridge))
        await subscribed_on_both(exact, a, b, "500Ms.TSLA")
        await subscribed_on_both(star, a, b, "500Ms.*")
        rows = bar_rows(500, T0, 7)
        a.publish(500, "TSLA", rows[:3])
        b.publish(500, "TSLA", rows[:4])  # ahead of a
        a.publish(500, "TSLA", rows[3:4])
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 8)
        assert counter(bridge, "polyfan_bridge_bars_redundant_total") == 4
        a.close()  # the first agg in --sub order stops
        b.publish(500, "TSLA", rows[4:7])
        wanted = [expected_event("TSLA", 500, r) for r in rows]
        for client in (exact, star):
            assert await client.bars(7) == wanted  # once each, in order, nothing more:
            assert client.pending() == []
        await eventually(lambda: not bridge.aggs[0].is_heard(time.monotonic()), timeout=5)
        status, _, body = await get(bridge, "/api/bars?channel=500Ms.TSLA")
        assert status == 200
        assert orjson.loads(body) == wanted  # from b, the one left
        assert [r["channel"] for r in b.requests] == ["500Ms.TSLA"]
        await exact.close()
        await star.close()


async def test_a_later_replica_s_maybe_partial_bars_give_way_to_the_whole_ones(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """b started listening at T0 + 1000: its bars up to T0 + 2000 (the margin) may lack trades,
    so a's, whole, are sent instead, even when b's arrive first; later bars from either."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "STAND_IN_WAIT", 60.0)  # a's copies are never too late here
    async with replicas(T0 + 1_000) as ((a, b), bridge):
        client = await Client.open(url(bridge))
        await subscribed_on_both(client, a, b, "500Ms.TSLA")
        whole = bar_rows(500, T0, 6)
        partial = bar_rows(500, T0, 5, price=7.0)  # T0 .. T0 + 2000
        b.publish(500, "TSLA", partial)
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 5)
        a.publish(500, "TSLA", whole[:5])
        assert await client.bars(5) == [expected_event("TSLA", 500, r) for r in whole[:5]]
        b.publish(500, "TSLA", whole[5:])  # past the margin: b's own bars count
        assert await client.bars(1) == [expected_event("TSLA", 500, whole[5])]
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 11)
        assert counter(bridge, "polyfan_bridge_bars_redundant_total") == 5
        assert counter(bridge, "polyfan_bridge_bars_stood_in_total") == 0
        a.publish(500, "TSLA", whole[5:])  # a's copy of the last one: not sent again
        sentinel = bar_rows(500, T0 + 3_000, 1)
        b.publish(500, "TSLA", sentinel)
        assert await client.bars(1) == [expected_event("TSLA", 500, sentinel[0])]
        await client.close()


async def test_maybe_partial_bars_and_those_after_them_wait_for_whole_copies_then_go_out(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """While b's maybe-partial bars wait for a's whole copies, b's later bars on the topic wait
    with them (sending one would pass the copies still to come); if a sends nothing for
    STAND_IN_WAIT, they all go out, in order, counted: no hole."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "STAND_IN_WAIT", 0.05)
    async with replicas(T0 + 1_000) as ((a, b), bridge):
        client = await Client.open(url(bridge))
        await subscribed_on_both(client, a, b, "500Ms.TSLA")
        partial = bar_rows(500, T0, 5, price=7.0)
        whole = bar_rows(500, T0, 6)
        b.publish(500, "TSLA", partial)
        b.publish(500, "TSLA", whole[5:])  # newer and whole, before any copy from a: waits
        assert await client.bars(6) == [
            expected_event("TSLA", 500, r) for r in [*partial, whole[5]]
        ]
        a.publish(500, "TSLA", whole)  # too late: every one already sent
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 12)
        assert counter(bridge, "polyfan_bridge_bars_stood_in_total") == 6
        assert counter(bridge, "polyfan_bridge_bars_redundant_total") == 6
        assert client.pending() == []
        await client.close()


@pytest.mark.parametrize("c_first", [False, True])
async def test_bars_waiting_for_whole_copies_go_out_with_them_in_order(c_first: bool) -> None:
    """b's maybe-partial bars and c's (in either order: they come over different sockets)
    wait; a's message settles them: the copies it has replace theirs, one it lacks goes out
    in its place, in s order."""
    async with replicas(T0 + 1_000, T0 + 2_000) as ((a, b, c), bridge):
        client = await Client.open(url(bridge))
        await subscribed_on_both(client, a, b, "500Ms.TSLA")
        await asyncio.to_thread(c.wait_subscribed, b"500Ms.TSLA\x00")
        whole = bar_rows(500, T0 + 1_500, 4)  # 1500, 2000, 2500, 3000
        only_b = bar_rows(500, T0 + 1_750, 1, price=9.0)  # a start a has no copy of
        from_b = np.concatenate([bar_rows(500, T0 + 1_500, 1, price=7.0), only_b])
        from_c = bar_rows(500, T0 + 3_000, 1, price=8.0)  # c too may lack trades for it
        received = 0
        for agg, rows in [(c, from_c), (b, from_b)] if c_first else [(b, from_b), (c, from_c)]:
            agg.publish(500, "TSLA", rows)
            received += len(rows)
            await eventually(
                lambda n=received: counter(bridge, "polyfan_bridge_bars_received_total") == n
            )
        a.publish(500, "TSLA", whole)
        got = await client.bars(5)
        assert got == [expected_event("TSLA", 500, r) for r in [whole[0], only_b[0], *whole[1:]]]
        assert counter(bridge, "polyfan_bridge_bars_stood_in_total") == 1
        assert counter(bridge, "polyfan_bridge_bars_redundant_total") == 2
        assert client.pending() == []
        await client.close()


async def test_whole_copies_settle_stand_ins_whichever_whole_agg_sends_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With two whole aggs (a, c) and a late starter (b), a's copies replace b's stand-ins at
    once: a is whole for them, so c being whole too is no reason for a's bars to wait."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "STAND_IN_WAIT", 60.0)
    async with replicas(T0 + 1_000, T0 - 50_000) as ((a, b, c), bridge):
        client = await Client.open(url(bridge))
        await subscribed_on_both(client, a, b, "500Ms.TSLA")
        await asyncio.to_thread(c.wait_subscribed, b"500Ms.TSLA\x00")
        b.publish(500, "TSLA", bar_rows(500, T0, 5, price=7.0))
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 5)
        whole = bar_rows(500, T0, 5)
        a.publish(500, "TSLA", whole)
        assert await client.bars(5) == [expected_event("TSLA", 500, r) for r in whole]
        assert counter(bridge, "polyfan_bridge_bars_redundant_total") == 5
        assert counter(bridge, "polyfan_bridge_bars_stood_in_total") == 0
        await client.close()


async def test_a_topic_s_bars_reach_clients_in_order_whichever_agg_s_pass_delivers_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a's reader takes bar 0 and waits for more (coalescing); meanwhile b's reader takes 0
    (a copy) and 100, and its pass ends first: it delivers a's 0 with its 100, in order."""
    from polyfan import bridge as module

    monkeypatch.setattr(module, "DRAIN_MAX_BARS", 2)  # b's pass of 2 bars ends without waiting
    monkeypatch.setattr(module, "COALESCE_MS", 2_000)  # a's pass of 1 bar waits for more
    monkeypatch.setattr(module, "COALESCE_MAX_S", 4.0)
    async with replicas(T0 - 50_000) as ((a, b), bridge):
        client = await Client.open(url(bridge))
        await subscribed_on_both(client, a, b, "500Ms.TSLA")
        rows = bar_rows(500, T0, 2)
        a.publish(500, "TSLA", rows[:1])
        await eventually(lambda: counter(bridge, "polyfan_bridge_bars_received_total") == 1)
        b.publish(500, "TSLA", rows)
        assert await client.bars(2, timeout=1.5) == [expected_event("TSLA", 500, r) for r in rows]
        await client.close()


async def test_lost_bar_messages_are_counted_as_gaps(bridge: Bridge, agg: FakeAgg) -> None:
    client = await Client.open(url(bridge))
    await subscribed(client, agg, "500Ms.GAP")
    topic = codec.bar_topic(500, "GAP")
    rows = bar_rows(500, T0, 3)
    for seq, row in ((1, rows[:1]), (4, rows[1:2]), (5, rows[2:3])):
        agg.publish_raw(codec.encode(topic, codec.Kind.BARS, 42, seq, 1, row.tobytes()))
    assert await client.bars(3) == [expected_event("GAP", 500, r) for r in rows]
    assert counter(bridge, "polyfan_bridge_gaps_total") == 2
    await client.close()


async def test_a_bar_in_flight_after_its_last_client_left_is_no_gap_later(
    bridge: Bridge, agg: FakeAgg
) -> None:
    """Bars the agg publishes while a channel is unsubscribed were not asked for: after a
    resubscription the sequence jump is no loss, even if one message was still in flight
    when the last client left (it is counted as unwanted, not as a fresh start)."""
    client = await Client.open(url(bridge))
    await subscribed(client, agg, "500Ms.LATE")
    topic = codec.bar_topic(500, "LATE")
    rows = bar_rows(500, T0, 3)
    agg.publish_raw(codec.encode(topic, codec.Kind.BARS, 42, 1, 1, rows[:1].tobytes()))
    assert await client.bars(1) == [expected_event("LATE", 500, rows[0])]
    await client.send({"action": "unsubscribe", "params": "500Ms.LATE"})
    assert (await client.next_event())["message"] == "unsubscribed to: 500Ms.LATE"
    await asyncio.to_thread(agg.wait_unsubscribed, b"500Ms.LATE\x00")
    # The message the agg sent just before it saw the unsubscribe, arriving now:
    in_flight = codec.encode(topic, codec.Kind.BARS, 42, 2, 1, rows[1:2].tobytes())
    bridge.links.received(bridge.aggs[0], in_flight)
    assert counter(bridge, "polyfan_bridge_bars_unwanted_total") == 1
    await subscribed(client, agg, "500Ms.LATE")
    agg.publish_raw(codec.encode(topic, codec.Kind.BARS, 42, 7, 1, rows[2:].tobytes()))
    assert await client.bars(1) == [expected_event("LATE", 500, rows[2])]
    assert counter(bridge, "polyfan_bridge_gaps_total") == 0
    await client.close()


# -- HTTP ----------------------------------------------------------------------------------------


async def test_api_bars_returns_stored_bars_oldest_first_with_limit_and_before(
    bridge: Bridge, agg: FakeAgg
) -> None:
    rows = bar_rows(1000, T0, 50)
    agg.publish(1000, "MSFT", rows)
    agg.flush()
    status, ctype, body = await get(bridge, "/api/bars?channel=1000Ms.MSFT&limit=10")
    assert (status, ctype) == (200, "application/json")
    assert orjson.loads(body) == [expected_event("MSFT", 1000, r) for r in rows[-10:]]
    before = int(rows["s"][20])
    _, _, body = await get(bridge, f"/api/bars?channel=1000Ms.MSFT&limit=5&before={before}")
    assert orjson.loads(body) == [expected_event("MSFT", 1000, r) for r in rows[15:20]]
    _, _, body = await get(bridge, "/api/bars?channel=1000Ms.MSFT")
    assert orjson.loads(body) == [expected_event("MSFT", 1000, r) for r in rows]
    _, _, body = await get(bridge, "/api/bars?channel=1000Ms.NONE")
    assert orjson.loads(body) == []


async def test_a_reply_for_another_channel_is_never_served_as_the_channel_asked(
    bridge: Bridge, agg: FakeAgg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The attack: someone answers the bridge's request for AAL ahead of it (a request on the
    bridge's route, with its id, for NVDA). The reply says which channel it answers, and the
    bridge takes nothing but the channel it asked for."""
    monkeypatch.setattr(bridge_module, "REQUEST_TIMEOUT", 0.5)
    agg.publish(100, "NVDA", bar_rows(100, T0, 6, price=900.0))
    agg.publish(100, "AAL", bar_rows(100, T0, 6, price=12.0))
    agg.flush()
    agg.answer_instead["100Ms.AAL"] = "100Ms.NVDA"
    for _ in range(3):
        status, _, body = await get(bridge, "/api/bars?channel=100Ms.AAL")
        assert status == 504, body  # no NVDA bars labelled AAL, ever
    assert counter(bridge, "polyfan_bridge_bad_replies_total") == 3
    agg.answer_instead.clear()
    status, _, body = await get(bridge, "/api/bars?channel=100Ms.AAL")
    assert (status, [bar["o"] for bar in orjson.loads(body)][:1]) == (200, [12.0])


@pytest.mark.parametrize(
    ("query", "status", "named"),
    [
        ("", 400, "channel"),
        ("channel=TSLA", 400, "channel"),
        ("channel=500Ms.*", 400, "channel"),
        ("channel=500Ms.TSLA&limit=0", 400, "limit"),
        ("channel=500Ms.TSLA&limit=10001", 400, "limit"),
        ("channel=500Ms.TSLA&limit=ten", 400, "limit"),
        ("channel=500Ms.TSLA&limit=%C2%B2", 400, "limit"),
        ("channel=500Ms.TSLA&before=-5", 400, "before"),
        ("channel=500Ms.TSLA&before=99999999999999999999", 400, "before"),
        ("channel=500Ms.TSLA&colour=red", 400, "colour"),
        ("channel=700Ms.TSLA", 404, "700Ms.TSLA"),
    ],
)
async def test_api_bars_bad_parameters_get_json_errors_naming_them(
    bridge: Bridge, query: str, status: int, named: str
) -> None:
    got, ctype, body = await get(bridge, f"/api/bars?{query}")
    assert (got, ctype) == (status, "application/json")
    assert orjson.loads(body)["error"].startswith(named)


async def test_healthz_info_symbols_and_metrics(bridge: Bridge, agg: FakeAgg) -> None:
    agg.set_trades({"AAPL": 10, "TSLA": 30, "MSFT": 20})
    status, _, body = await get(bridge, "/healthz")
    health = orjson.loads(body)
    assert status == 200
    assert (health["status"], health["aggs"], health["aggs_heard"]) == ("ok", 1, 1)
    _, _, body = await get(bridge, "/api/info")
    info = orjson.loads(body)
    assert info["intervals"] == [100, 250, 500, 1000]
    assert info["aggs"][0]["endpoint"] == agg.endpoint
    assert info["aggs"][0]["session"] == agg.session
    _, _, body = await get(bridge, "/api/symbols")
    assert orjson.loads(body) == [
        {"sym": "TSLA", "trades": 30},
        {"sym": "MSFT", "trades": 20},
        {"sym": "AAPL", "trades": 10},
    ]
    status, ctype, body = await get(bridge, "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    text = body.decode()
    for name in (
        "polyfan_bridge_clients",
        "polyfan_bridge_bars_sent_total",
        "polyfan_bridge_slow_disconnects_total",
        "polyfan_bridge_bad_requests_total",
        "polyfan_bridge_bars_received_total",
        "polyfan_bridge_gaps_total",
    ):
        assert f"\n{name} " in text


async def test_healthz_is_503_until_an_agg_is_heard() -> None:
    bridge = Bridge(BridgeConfig(sub=("tcp://127.0.0.1:1",), listen=("127.0.0.1", 0)))
    await bridge.start()
    try:
        status, _, body = await get(bridge, "/healthz")
        assert status == 503
        assert orjson.loads(body)["aggs_heard"] == 0
        client = await Client.open(url(bridge), token="x")
        await client.send({"action": "subscribe", "params": "500Ms.TSLA"})
        event = await client.next_event()
        assert event["status"] == "error" and "no aggregator" in event["message"]
        await client.close()
    finally:
        await bridge.stop()


async def test_index_and_static_files_are_served_without_traversal(bridge: Bridge) -> None:
    status, ctype, body = await get(bridge, "/")
    assert status == 200 and ctype == "text/html; charset=utf-8"
    assert b"<" in body
    for path in ("/static/../bridge.py", "/static/%2e%2e/bridge.py", "/static/nope.js", "/nope"):
        status, _, _ = await get(bridge, path)
        assert status == 404, path


async def test_raw_http_request_without_upgrade_is_answered(bridge: Bridge) -> None:
    def raw() -> bytes:
        with socket.create_connection(("127.0.0.1", bridge.port), timeout=5) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
            return data

    data = await asyncio.to_thread(raw)
    assert data.startswith(b"HTTP/1.1 200 OK\r\n")


async def test_websocket_client_library_connects_on_stocks_path(bridge: Bridge) -> None:
    async with connect(url(bridge, "/stocks")) as ws:
        frame = await asyncio.wait_for(ws.recv(), 5)
        assert orjson.loads(frame)[0]["status"] == "connected"


async def test_an_agg_restart_is_followed_without_a_new_subscription_or_a_false_gap() -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = FakeAgg(endpoint)
    bridge = Bridge(BridgeConfig(sub=(endpoint,), listen=("127.0.0.1", 0)))
    await bridge.start()
    try:
        await eventually(lambda: bridge.catalog.intervals)
        client = await Client.open(url(bridge), token="x")
        await subscribed(client, first, "500Ms.RS")
        rows = bar_rows(500, T0, 6)
        first.publish(500, "RS", rows[:3])
        assert await client.bars(3) == [expected_event("RS", 500, r) for r in rows[:3]]
        first.close()
        # a new session on the same address, that has heard the proxy from T0 on
        with FakeAgg(endpoint, listening_from=T0) as second:
            # ZeroMQ replays the bridge's subscriptions to the new publisher by itself.
            await asyncio.to_thread(second.wait_subscribed, b"500Ms.RS\x00", 10)
            await eventually(
                lambda: bridge.aggs[0].status(time.monotonic())["session"] == second.session
            )
            # The restart took the first agg's bars and history with it: the client is told
            # (quick enough not to be seen silent, or seen silent first: the same two statuses).
            down, up = await client.statuses(2)
            assert (down["status"], down["s"]) == ("feed_down", 0)  # no clock was relayed
            assert (up["status"], up["s"], up["e"]) == ("feed_up", 0, T0)  # its bars from T0
            assert "restarted" in down["message"] + up["message"]
            second.publish(500, "RS", rows[3:])
            assert await client.bars(3) == [expected_event("RS", 500, r) for r in rows[3:]]
            assert counter(bridge, "polyfan_bridge_gaps_total") == 0
            assert counter(bridge, "polyfan_bridge_outages_total") == 1
        await client.close()
    finally:
        await bridge.stop()


async def test_thousands_of_channels_are_all_resubscribed_when_the_agg_restarts() -> None:
    """ZeroMQ replays an XSUB's subscriptions to a new publisher, dropping those beyond the
    socket's send high-water mark: 13,000 channels (13 clients at the 1,000 limit) must all
    reach the restarted agg."""

    def subscribed_topics(agg: FakeAgg) -> set[bytes]:
        with agg._cond:
            return {m[1:] for m in agg.subscriptions if m[:1] == b"\x01"}

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = FakeAgg(endpoint)
    bridge = Bridge(BridgeConfig(sub=(endpoint,), listen=("127.0.0.1", 0)))
    await bridge.start()
    clients = []
    try:
        await eventually(lambda: bridge.catalog.intervals)
        wanted = {f"500Ms.S{k:05d}".encode() + b"\x00" for k in range(13_000)}
        for c in range(13):
            client = await Client.open(url(bridge), token="x")
            channels = ",".join(f"500Ms.S{k:05d}" for k in range(c * 1_000, (c + 1) * 1_000))
            await client.send({"action": "subscribe", "params": channels})
            await client.statuses(1_000)
            clients.append(client)
        await eventually(lambda: wanted <= subscribed_topics(first), timeout=20)
        first.close()
        with FakeAgg(endpoint) as second:
            await eventually(lambda: wanted <= subscribed_topics(second), timeout=20)
    finally:
        for client in clients:
            await client.close()
        await bridge.stop()


async def test_history_is_joined_across_replicas_older_bars_from_the_one_that_reaches_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """a has been whole the longest but holds only recent bars (memory); b started later but
    reaches further back (agg --store). The bars come from a, and those older than a's oldest
    from b, each start once; b is not asked when a fills the limit; if b does not answer, a's
    bars come with a note."""
    import polyfan.bridge

    monkeypatch.setattr(polyfan.bridge, "REQUEST_TIMEOUT", 0.5)
    async with replicas(T0 + 1_000) as ((a, b), bridge):
        older = bar_rows(500, T0 - 100_000, 10)
        recent = bar_rows(500, T0 + 10_000, 5)
        a.publish(500, "TSLA", recent)
        b.publish(500, "TSLA", older)
        b.publish(500, "TSLA", bar_rows(500, T0 + 10_000, 5, price=7.0))  # a's copies win
        a.flush()
        b.flush()
        wanted = [expected_event("TSLA", 500, r) for r in [*older, *recent]]
        status, _, body = await get(bridge, f"/api/bars?channel=500Ms.TSLA&from={T0 - 200_000}")
        assert (status, orjson.loads(body)) == (200, wanted)
        assert [(r["since"], r["before"], r["limit"]) for r in a.requests] == [
            (T0 - 200_000, None, 600)
        ]
        assert [(r["since"], r["before"], r["limit"]) for r in b.requests] == [
            (T0 - 200_000, T0 + 10_000, 595)
        ]
        status, _, body = await get(bridge, "/api/bars?channel=500Ms.TSLA&limit=3")
        assert orjson.loads(body) == wanted[-3:]  # a fills it: b is not asked
        status, _, body = await get(bridge, f"/api/bars?channel=500Ms.TSLA&before={T0}&limit=4")
        assert orjson.loads(body) == wanted[6:10]  # paging back past a's memory reaches b
        assert len(b.requests) == 2

        client = await Client.open(url(bridge))
        await client.send({"action": "subscribe", "params": "500Ms.TSLA", "since": T0 - 100_000})
        assert (await client.statuses(1))[0]["status"] == "success"
        assert await client.bars(15) == wanted
        await client.close()
        b.answer_requests = False  # b stops answering: a's bars, and a note that older may lack
        client = await Client.open(url(bridge))
        await client.send({"action": "subscribe", "params": "500Ms.TSLA", "since": T0 - 100_000})
        assert (await client.statuses(1))[0]["status"] == "success"
        event = await client.next_event()
        assert event["status"] == "error"
        assert event["message"] == (
            f"500Ms.TSLA: bars older than {T0 + 10_000} may be missing: another aggregator "
            "did not answer"
        )
        assert await client.bars(5) == wanted[10:]
        await client.close()


async def test_history_is_not_asked_of_an_agg_that_has_gone_silent(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A stopped agg is not sent requests (they would wait in ZeroMQ's queue and all reach it
    when it returns): /api/bars answers 503 at once, and the returning agg gets none."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "HEARD_WITHIN", 1.0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = FakeAgg(endpoint, announce_every=0.1)
    bridge = Bridge(BridgeConfig(sub=(endpoint,), listen=("127.0.0.1", 0)))
    await bridge.start()
    try:
        await eventually(lambda: bridge.catalog.intervals)
        first.publish(500, "GONE", bar_rows(500, T0, 2))
        first.flush()
        status, _, _ = await get(bridge, "/api/bars?channel=500Ms.GONE")
        assert status == 200
        first.close()
        await eventually(lambda: not bridge.aggs[0].is_heard(time.monotonic()), timeout=5)
        status, _, body = await get(bridge, "/api/bars?channel=500Ms.GONE")
        assert status == 503
        assert b"no aggregator serving it is heard" in body
        with FakeAgg(endpoint) as second:
            await eventually(lambda: bridge.aggs[0].is_heard(time.monotonic()), timeout=10)
            await asyncio.to_thread(second.wait_subscribed, codec.CONTROL_TOPIC, 10)
            assert second.requests == []
    finally:
        await bridge.stop()


async def test_page_assets_are_served_with_their_content_types(bridge: Bridge) -> None:
    from polyfan.web import routes as module

    for name, ctype in (
        ("app.js", "text/javascript; charset=utf-8"),
        ("style.css", "text/css; charset=utf-8"),
    ):
        if not (module.STATIC / name).is_file():
            pytest.skip("page assets not in the tree")
        status, got, body = await get(bridge, f"/static/{name}")
        assert (status, got) == (200, ctype)
        assert body == (module.STATIC / name).read_bytes()


async def test_without_built_assets_the_index_is_a_placeholder_that_says_so(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from polyfan.web import routes as module

    monkeypatch.setattr(module, "STATIC", tmp_path)
    status, ctype, body = await get(bridge, "/")
    assert (status, ctype) == (200, "text/html; charset=utf-8")
    assert b"assets are not built" in body


@pytest.mark.parametrize("channel", ["500Ms.*", "500Ms.QUIET"])
async def test_bars_published_while_nobody_listened_are_not_counted_as_gaps(
    bridge: Bridge, agg: FakeAgg, channel: str
) -> None:
    client = await Client.open(url(bridge))
    rows = bar_rows(500, T0, 3)
    await subscribed(client, agg, channel)
    agg.publish(500, "QUIET", rows[:1])
    assert await client.bars(1) == [expected_event("QUIET", 500, rows[0])]
    await client.send({"action": "unsubscribe", "params": channel})
    assert (await client.next_event())["status"] == "success"
    topic = channel.encode().replace(b"*", b"") + (b"" if channel.endswith("*") else b"\x00")
    await asyncio.to_thread(agg.wait_unsubscribed, topic)
    agg.publish(500, "QUIET", rows[1:2])  # seq 2 goes nowhere
    agg.flush()
    await subscribed(client, agg, channel)
    agg.publish(500, "QUIET", rows[2:])
    assert await client.bars(1) == [expected_event("QUIET", 500, rows[2])]
    assert counter(bridge, "polyfan_bridge_gaps_total") == 0
    await client.close()


async def test_requests_sent_while_the_reader_waits_never_leave_replies_unread(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ZeroMQ FD is edge-triggered: a send on the socket must not eat the edge the reader
    waits for. With no announce and no bars flowing, a lost edge would leave a reply unread
    until the request times out; the reader's periodic re-check is switched off here."""
    from polyfan import bridge as module

    monkeypatch.setattr(module, "READ_POLL_MS", 60_000)
    with FakeAgg("tcp://127.0.0.1:*", announce_every=3600) as quiet:
        rows = bar_rows(1000, T0, 5)
        quiet.publish(1000, "Q", rows)
        quiet.flush()
        bridge = await start_bridge(quiet)
        try:
            for _ in range(40):  # a lost edge shows as a 504 after the 5 s request timeout
                replies = await asyncio.gather(
                    *(get(bridge, "/api/bars?channel=1000Ms.Q&limit=5") for _ in range(16))
                )
                assert [status for status, _, _ in replies] == [200] * 16
                assert all(
                    orjson.loads(body) == [expected_event("Q", 1000, r) for r in rows]
                    for _, _, body in replies
                )
        finally:
            await bridge.stop()


async def test_a_client_that_never_authenticates_is_closed_after_the_auth_timeout(
    agg: FakeAgg,
) -> None:
    bridge = await start_bridge(agg, auth_timeout=1.0)
    try:
        idle = await Client.open(url(bridge), token=None)
        authed = await Client.open(url(bridge))
        assert await idle.next_event(timeout=5) == {
            "ev": "status",
            "status": "auth_timeout",
            "message": "no successful auth in time; closing",
        }
        await idle.ws.wait_closed()
        assert idle.ws.close_code == 1008
        await subscribed(authed, agg, "500Ms.STAY")  # well past the timeout: still served
        rows = bar_rows(500, T0, 1)
        agg.publish(500, "STAY", rows)
        assert await authed.bars(1) == [expected_event("STAY", 500, rows[0])]
        await authed.close()
    finally:
        await bridge.stop()


async def test_a_silent_aggregator_is_reported_and_its_return_too(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "HEARD_WITHIN", 1.0)
    caplog.set_level(logging.INFO, logger="polyfan.bridge")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    first = FakeAgg(endpoint)
    bridge = await start_bridge(first)
    try:
        await eventually(lambda: bridge.aggs[0].was_heard is True, timeout=5)
        first.close()
        await eventually(lambda: "silent for 1s" in caplog.text, timeout=5)
        status, _, _ = await get(bridge, "/healthz")
        assert status == 503
        with FakeAgg(endpoint):
            await eventually(lambda: "heard again" in caplog.text, timeout=5)
            status, _, _ = await get(bridge, "/healthz")
            assert status == 200
    finally:
        await bridge.stop()


async def test_api_symbols_does_not_ask_a_silent_aggregator(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A silent aggregator would hold every /api/symbols (the page's load) for the 5 s
    request timeout; only aggregators heard recently are asked."""
    from polyfan.fanout import links as module

    monkeypatch.setattr(module, "HEARD_WITHIN", 1.0)
    first = FakeAgg(f"tcp://127.0.0.1:{free_port()}")
    first.set_trades({"AAPL": 3})
    bridge = await start_bridge(first)
    try:
        _, _, body = await get(bridge, "/api/symbols")
        assert orjson.loads(body) == [{"sym": "AAPL", "trades": 3}]
        first.close()
        await eventually(
            lambda: not bridge.aggs[0].is_heard(time.monotonic()), what="the agg to go silent"
        )
        asked = counter(bridge, "polyfan_bridge_history_requests_total")
        status, _, body = await get(bridge, "/api/symbols")
        assert (status, orjson.loads(body)) == (200, [])
        assert counter(bridge, "polyfan_bridge_history_requests_total") == asked
        assert counter(bridge, "polyfan_bridge_request_timeouts_total") == 0
    finally:
        await bridge.stop()


async def test_debug_logging_never_shows_a_clients_token(
    agg: FakeAgg, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="polyfan")
    caplog.set_level(logging.DEBUG, logger="polyfan.bridge.ws")  # kept at WARNING otherwise
    bridge = await start_bridge(agg, tokens=("s3cret-token",))
    try:
        client = await Client.open(url(bridge), token="s3cret-token")
        await subscribed(client, agg, "500Ms.LOG")
        wrong = await Client.open(url(bridge), token=None)
        await wrong.send({"action": "auth", "params": "wr0ng-token"})
        assert (await wrong.next_event())["status"] == "auth_failed"
        await client.close()
    finally:
        await bridge.stop()
    bridge_lines = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("polyfan"))
    assert "< CLOSE 1000" in bridge_lines  # websockets' lines about frames are captured
    assert "s3cret-token" not in bridge_lines
    assert "wr0ng-token" not in bridge_lines
