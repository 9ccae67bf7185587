"""The bridge's aggregator rules without sockets: frames in; subscriptions, requests, bars to
deliver, feed changes and replies out."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from fake_agg import bar_rows
from polyfan.fanout.counters import BridgeCounters
from polyfan.fanout.links import SILENT_AFTER, Link, Links
from polyfan.fanout.protocol import Channel
from polyfan.metrics import Registry
from polyfan.wire import codec

T0 = 1_700_000_000_000


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A ``Links`` over two aggregators, with every output recorded."""

    def __init__(self) -> None:
        self.clock = Clock()
        self.sent: list[tuple[int, bytes]] = []
        self.feed_changes = 0
        self.replies: list[tuple[Any, codec.Message]] = []
        self.counters = BridgeCounters(Registry())
        self.links = Links(
            ("tcp://a:1", "tcp://b:1"),
            self.counters,
            lambda link, frame: self.sent.append((link.index, frame)),
            self._changed,
            lambda pending, message: self.replies.append((pending.waiter, message)),
            self.clock,
        )
        self.sequencers = [codec.Sequencer(11), codec.Sequencer(22)]

    def _changed(self) -> None:
        self.feed_changes += 1

    def link(self, index: int) -> Link:
        return self.links.links[index]

    def announce(self, index: int, **fields: Any) -> None:
        value = {"session": self.sequencers[index].session, "intervals": [500], "symbols": None}
        value.update(fields)
        frame = codec.encode_json(codec.CONTROL_TOPIC, codec.Kind.ANNOUNCE, 0, 0, value)
        assert self.links.received(self.link(index), frame) == 0

    def bars(self, index: int, symbol: str, rows: np.ndarray) -> int:
        topic = codec.bar_topic(500, symbol)
        frame = self.sequencers[index].encode(topic, codec.Kind.BARS, len(rows), rows.tobytes())
        return self.links.received(self.link(index), frame)


def delivered(links: Links) -> list[tuple[str, int]]:
    arrivals, _ = links.take_arrivals()
    return [(symbol, s) for _, symbol, parts in arrivals for s, _ in parts]


def test_a_channel_is_subscribed_on_the_aggs_that_serve_it_and_dropped_when_unrouted() -> None:
    world = World()
    world.announce(0, symbols=["AAPL"])
    world.announce(1, symbols=["MSFT"])
    aapl = Channel(500, "AAPL")
    world.links.route(aapl)
    world.links.route(aapl)  # idempotent
    assert world.sent == [(0, b"\x01" + aapl.topic)]
    world.links.unroute(aapl)
    assert world.sent[1:] == [(0, b"\x00" + aapl.topic)]


def test_bars_of_a_routed_channel_are_queued_once_and_unwanted_ones_are_counted() -> None:
    world = World()
    world.announce(0)
    world.links.route(Channel(500, "AAPL"))
    assert world.bars(0, "AAPL", bar_rows(500, T0, 3)) == 3
    assert world.bars(0, "MSFT", bar_rows(500, T0, 2)) == 2  # in flight, nobody asked
    assert delivered(world.links) == [("AAPL", T0), ("AAPL", T0 + 500), ("AAPL", T0 + 1000)]
    assert world.counters.bars_received.value == 5
    assert world.counters.bars_unwanted.value == 2


def test_a_replica_s_copy_of_bars_already_delivered_is_redundant() -> None:
    world = World()
    world.announce(0)
    world.announce(1)
    world.links.route(Channel(500, "AAPL"))
    world.bars(0, "AAPL", bar_rows(500, T0, 2))
    world.bars(1, "AAPL", bar_rows(500, T0, 3))
    assert delivered(world.links) == [("AAPL", T0), ("AAPL", T0 + 500), ("AAPL", T0 + 1000)]
    assert world.counters.bars_redundant.value == 2


def test_a_lost_bar_message_is_counted_as_a_gap() -> None:
    world = World()
    world.announce(0)
    world.links.route(Channel(500, "AAPL"))
    world.bars(0, "AAPL", bar_rows(500, T0, 1))
    world.sequencers[0].encode(codec.bar_topic(500, "AAPL"), codec.Kind.BARS, 0, b"")  # lost
    world.bars(0, "AAPL", bar_rows(500, T0 + 1000, 1))
    assert world.link(0).gaps.lost == 1


def test_an_agg_silent_for_two_seconds_is_down_until_it_announces_itself_again() -> None:
    world = World()
    world.announce(0)
    world.clock.now += SILENT_AFTER - 0.01
    world.links.watch(world.link(0), started=0.0)
    assert world.feed_changes == 0
    world.clock.now += 0.02
    world.links.watch(world.link(0), started=0.0)
    assert world.feed_changes == 1 and world.link(0).silent
    assert world.counters.outages.value == 1
    world.announce(0)  # the same session: partitioned, not restarted
    assert world.feed_changes == 2 and not world.link(0).silent


@pytest.mark.parametrize(
    ("answer_from", "kind", "channel", "problem"),
    [
        (1, codec.Kind.HISTORY, "500Ms.AAPL", "another aggregator"),
        (0, codec.Kind.SYMBOLS, "500Ms.AAPL", "another kind"),
        (0, codec.Kind.HISTORY, "500Ms.NVDA", "another channel"),
    ],
)
def test_a_reply_is_taken_only_from_the_agg_asked_of_the_kind_and_channel_asked(
    answer_from: int, kind: codec.Kind, channel: str, problem: str
) -> None:
    world = World()
    world.links.request(
        world.link(0), 7, {"reply": "r", "op": "bars", "channel": "500Ms.AAPL"}, "w"
    )
    assert codec.decode_request(world.sent[-1][1]) == {
        "id": 7,
        "reply": "r",
        "op": "bars",
        "channel": "500Ms.AAPL",
    }
    topic = codec.reply_topic("r")
    if kind is codec.Kind.SYMBOLS:
        forged = codec.encode_json(topic, kind, 0, 0, {"id": 7, "symbols": []})
    else:
        forged = codec.encode_history(
            topic,
            0,
            0,
            7,
            codec.HistoryStatus.OK,
            bar_rows(500, T0, 1),
            codec.channel_check(channel),
        )
    world.links.received(world.link(answer_from), forged)
    assert world.replies == [], problem
    assert world.counters.bad_replies.value == 1
    assert 7 in world.links.requests  # still waiting for the real answer
    genuine = codec.encode_history(
        topic,
        0,
        1,
        7,
        codec.HistoryStatus.OK,
        bar_rows(500, T0, 1),
        codec.channel_check("500Ms.AAPL"),
    )
    world.links.received(world.link(0), genuine)
    assert [waiter for waiter, _ in world.replies] == ["w"]
    assert world.links.requests == {}
