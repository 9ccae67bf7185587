"""The agg's per-peer allowances (polyfan.wire.peers) and the core's answers to peers: values in,
values out, no sockets."""

from __future__ import annotations

import logging

import pytest

from polyfan.bars.aggregator import Aggregator
from polyfan.config import AggConfig
from polyfan.wire import codec
from polyfan.wire.peers import Bans, PeerLimits, PeerTable, Verdict, subscription_problem

ROUTE = "0123456789abcdef" * 2
INTERVALS = (100, 1_000)


@pytest.mark.parametrize(
    ("topic", "verdict"),
    [
        (b"_ctl\x00", Verdict.ACCEPTED),
        (b"_c", Verdict.ACCEPTED),
        (b"_rep." + ROUTE.encode() + b"\x00", Verdict.ACCEPTED),
        (b"_rep." + b"ab" * 8 + b"\x00", Verdict.ACCEPTED),  # a bridge from before 128 bits
        (b"1", Verdict.ACCEPTED),
        (b"100Ms.", Verdict.ACCEPTED),
        (b"1000Ms.AA", Verdict.ACCEPTED),
        (b"100Ms.BRK.A\x00", Verdict.ACCEPTED),
        (b"", Verdict.DISCONNECT),  # everything, replies included
        (b"_", Verdict.DISCONNECT),
        (b"_rep", Verdict.DISCONNECT),
        (b"_rep.", Verdict.DISCONNECT),
        (b"_rep." + ROUTE[:8].encode(), Verdict.DISCONNECT),  # a prefix of someone's route
        (b"_rep." + ROUTE.encode(), Verdict.DISCONNECT),  # no terminator: a prefix again
        (b"_rep." + ROUTE.upper().encode() + b"\x00", Verdict.DISCONNECT),
        (b"T.", Verdict.REFUSED),
        (b"500Ms.AAPL\x00", Verdict.REFUSED),  # an interval it does not serve
        (b"100Ms.A B\x00", Verdict.REFUSED),
        (b"3", Verdict.REFUSED),
    ],
)
def test_subscriptions_are_judged_by_what_they_can_match(topic: bytes, verdict: Verdict) -> None:
    assert subscription_problem(topic, INTERVALS)[0] is verdict


def test_a_peer_past_its_subscription_allowance_is_disconnected() -> None:
    table = PeerTable(INTERVALS, PeerLimits(max_subscriptions=3))
    assert table.connected(7)
    for symbol in (b"A", b"B", b"C"):
        assert table.subscription(7, b"100Ms." + symbol + b"\x00", True).verdict is Verdict.ACCEPTED
    assert table.subscription(7, b"100Ms.A\x00", False).verdict is Verdict.ACCEPTED
    assert table.subscription(7, b"100Ms.D\x00", True).verdict is Verdict.ACCEPTED
    decision = table.subscription(7, b"100Ms.E\x00", True)
    assert (decision.verdict, decision.disconnect) == (Verdict.DISCONNECT, 7)
    table.leave(7)
    assert table.subscription(7, b"100Ms.F\x00", True).verdict is Verdict.REFUSED
    table.disconnected(7)
    assert (table.peers, table.total) == ({}, 0)


def test_past_the_total_the_peer_holding_most_is_disconnected() -> None:
    table = PeerTable(INTERVALS, PeerLimits(max_subscriptions=10, max_total=5))
    for fd, count in ((3, 4), (4, 1)):
        table.connected(fd)
        for i in range(count):
            table.subscription(fd, b"100Ms.S%d\x00" % i, True)
    decision = table.subscription(4, b"100Ms.X\x00", True)
    assert (decision.verdict, decision.disconnect) == (Verdict.DISCONNECT, 3)


def test_one_peer_too_many_is_refused_and_a_reused_descriptor_starts_over() -> None:
    table = PeerTable(INTERVALS, PeerLimits(max_peers=2))
    assert table.connected(3) and table.connected(4)
    assert not table.connected(5)
    table.subscription(3, b"100Ms.A\x00", True)
    table.disconnected(3)
    assert table.connected(3)
    assert (table.peers[3].subscriptions, table.total) == (0, 0)


def test_reply_bytes_in_flight_are_bounded_until_the_socket_queue_drains() -> None:
    table = PeerTable(INTERVALS, PeerLimits(reply_bytes_in_flight=1_000, drained_below=100))
    assert table.may_reply(3, 2_000)  # one reply always goes, however large
    assert not table.may_reply(3, 10)
    assert table.awaiting_replies() == [3]
    table.queue_seen(3, 5_000)  # the peer is not reading
    assert not table.may_reply(3, 10)
    table.queue_seen(3, 50)
    assert table.may_reply(3, 600) and table.may_reply(3, 400) and not table.may_reply(3, 1)


@pytest.fixture
def core() -> Aggregator:
    config = AggConfig(intervals_ms=INTERVALS, grace_ms=0, symbols=("AAPL",))
    return Aggregator(config, session=42, jit=False, peer_limits=PeerLimits(max_subscriptions=5))


def subscribe(topic: bytes) -> bytes:
    return b"\x01" + topic


def test_a_reply_goes_only_to_the_peer_that_subscribes_its_route(core: Aggregator) -> None:
    request = codec.encode_request({"id": 5, "reply": ROUTE, "channel": "100Ms.AAPL"})
    core.peer_connected(3)
    core.peer_connected(4)
    assert core.peer_message(3, subscribe(codec.reply_topic(ROUTE))).disconnect is None
    forged = core.peer_message(4, request)  # peer 4 names peer 3's route
    assert (forged.reply, core.refused_requests_total.value) == (None, 1)
    answer = core.peer_message(3, request).reply
    assert answer is not None
    message = codec.decode(answer)
    assert message.topic == f"_rep.{ROUTE}"
    assert codec.history_channel_check(message) == codec.channel_check("100Ms.AAPL")


def test_a_peer_reading_replies_by_prefix_is_disconnected_and_then_ignored(
    core: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    core.peer_connected(3)
    assert core.peer_message(3, subscribe(b"_rep.")).disconnect == 3
    assert core.peer_message(3, subscribe(b"_ctl\x00")).reply is None  # leaving: ignored
    assert core.peers_disconnected_total.value == 1
    core.peer_gone(3)
    assert core.peers.peers == {}
    assert "1 ZeroMQ peers disconnected" in caplog.text


def test_bad_requests_are_counted_and_logged_once_per_interval(
    core: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    core.peer_connected(3)
    for _ in range(5_000):
        core.peer_message(3, b"\x02not json")
    assert core.bad_requests_total.value == 5_000
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1


def test_a_banned_address_is_refused_until_its_time_is_up_and_ipc_is_never_banned() -> None:
    bans = Bans(seconds=60.0)
    assert bans.ban("127.0.0.2", now=100.0)
    assert not bans.ban("127.0.0.2", now=110.0)  # already banned: extended, not new
    assert bans.is_banned("127.0.0.2", now=169.9)
    assert not bans.is_banned("127.0.0.2", now=170.0)
    assert not bans.is_banned("127.0.0.3", now=110.0)
    assert not bans.ban("", now=100.0)  # ipc: a local process has no address to ban
    assert not bans.is_banned("", now=100.0)
    assert bans.ban("10.0.0.9", now=500.0)
    assert list(bans.until) == ["10.0.0.9"]  # expired entries are dropped on the next ban


def test_disconnecting_a_peer_for_its_subscriptions_asks_for_a_ban() -> None:
    table = PeerTable((100,), PeerLimits(max_subscriptions=2, max_total=10))
    table.connected(7)
    assert table.subscription(7, b"100Ms.A\x00", True).verdict is Verdict.ACCEPTED
    assert table.subscription(7, b"100Ms.B\x00", True).verdict is Verdict.ACCEPTED
    decision = table.subscription(7, b"100Ms.C\x00", True)
    assert (decision.verdict, decision.disconnect, decision.ban) == (Verdict.DISCONNECT, 7, True)
    table.connected(8)
    spy = table.subscription(8, b"_rep.", True)
    assert (spy.verdict, spy.disconnect, spy.ban) == (Verdict.DISCONNECT, 8, False)
