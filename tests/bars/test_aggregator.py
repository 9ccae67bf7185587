"""The agg's core without sockets: frames in, messages out; requests in, replies out."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from polyfan.bars.aggregator import MAX_REPLY_BARS, Aggregator
from polyfan.config import AggConfig
from polyfan.wire import codec
from polyfan.wire.ingest import join_frames, split_frames


def trades_frame(symbol: str, seq: int, *ts: int, price: float = 1.0) -> bytes:
    records = np.zeros(len(ts), dtype=codec.TRADE_DTYPE)
    records["t"], records["p"], records["s"] = ts, price, 1.0
    return codec.encode(
        codec.trade_topic(symbol), codec.Kind.TRADES, 1, seq, len(ts), records.tobytes()
    )


def clock_frame(seq: int, clock: int) -> bytes:
    record = np.array([(clock, 10_000 + seq)], dtype=codec.CLOCK_DTYPE)
    return codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, seq, 1, record.tobytes())


@pytest.fixture
def core() -> Aggregator:
    config = AggConfig(intervals_ms=(100, 1_000), grace_ms=0, symbols=("A", "AAPL"))
    return Aggregator(config, session=42)


def test_bars_go_out_one_message_per_topic_shortest_interval_first_then_the_clock(
    core: Aggregator,
) -> None:
    messages = [
        codec.decode(m)
        for m in core.frames_received(
            [
                trades_frame("AAPL", 1, 1_050, 1_150, 1_250),
                trades_frame("A", 1, 1_000),
                clock_frame(1, 5_000),
            ]
        )
    ]
    assert [(m.topic, m.kind, m.seq, m.count) for m in messages] == [
        ("100Ms.A", codec.Kind.BARS, 1, 1),  # the shortest interval first
        ("100Ms.AAPL", codec.Kind.BARS, 1, 3),
        ("1000Ms.A", codec.Kind.BARS, 1, 1),
        ("1000Ms.AAPL", codec.Kind.BARS, 1, 1),
        ("_ctl", codec.Kind.CLOCK, 1, 1),
    ]
    assert codec.records(messages[1])["s"].tolist() == [1_000, 1_100, 1_200]
    assert {m.session for m in messages} == {42}
    assert core.bars_total.value == 6
    assert core.history.select(core.bars.series_id(1, 100))["s"].tolist() == [1_000, 1_100, 1_200]


def test_a_batch_in_one_buffer_gives_its_bar_messages_in_one_buffer_then_the_control(
    core: Aggregator,
) -> None:
    frames = [
        trades_frame("AAPL", 1, 1_050, 1_150),
        trades_frame("A", 1, 1_000),
        codec.encode(
            codec.CONTROL_TOPIC,
            codec.Kind.UPSTREAM,
            1,
            2,
            1,
            np.array([(codec.UPSTREAM_DOWN, 1_200, 0)], codec.UPSTREAM_DTYPE).tobytes(),
        ),
        clock_frame(3, 5_000),
    ]
    twin = Aggregator(core.config, session=42)
    expected = twin.frames_received(frames)
    out = core.batch_received(*join_frames(frames))
    bars = split_frames(out.buffer, out.offsets, out.count)
    assert [codec.decode(m).topic for m in bars] == [
        "100Ms.A",
        "100Ms.AAPL",
        "1000Ms.A",
        "1000Ms.AAPL",
    ]
    assert [codec.decode(m).kind for m in out.control] == [
        codec.Kind.UPSTREAM,
        codec.Kind.CLOCK,
        codec.Kind.OUTAGE,
    ]
    assert out.messages() == [*bars, *out.control] == expected
    aapl_100ms = core.bars.series_id(core.decoder.known_symbol_id("AAPL") or 0, 100)
    assert len(core.history.select(aapl_100ms)) == 0  # stored once the batch is sent
    core.batch_sent(out)
    assert core.history.select(aapl_100ms)["s"].tolist() == [1_000, 1_100]
    assert twin.history.select(aapl_100ms)["s"].tolist() == [1_000, 1_100]
    assert core.batch_received(*join_frames([])).messages() == []


def test_a_control_subscription_gets_an_announce(core: Aggregator) -> None:
    for prefix in (b"", b"_", codec.CONTROL_TOPIC):
        reply = core.upstream_received(b"\x01" + prefix)
        assert reply is not None
        message = codec.decode(reply)
        assert message.kind is codec.Kind.ANNOUNCE
        assert codec.decode_json(message) == {
            "session": 42,
            "intervals": [100, 1_000],
            "symbols": ["A", "AAPL"],
            "grace": 0,
            "history": 3_600_000,
            "from": None,  # nothing heard yet
            "outage": None,
            "last_outage": None,
        }
    assert core.upstream_received(b"\x01100Ms.AAPL\x00") is None
    assert core.upstream_received(b"\x00_ctl\x00") is None


def test_the_announce_says_from_which_feed_clock_on_the_bars_are_whole(
    core: Aggregator,
) -> None:
    core.frames_received([trades_frame("AAPL", 1, 1_050), clock_frame(1, 1_060)])
    core.frames_received([clock_frame(2, 5_000)])
    reply = core.upstream_received(b"\x01" + codec.CONTROL_TOPIC)
    assert reply is not None
    assert codec.decode_json(codec.decode(reply))["from"] == 1_060


ROUTE = "9f3a" * 8  # 128 bits, as a bridge makes them


def history(
    core: Aggregator, request: dict[str, object]
) -> tuple[int, codec.HistoryStatus, list[int]]:
    reply = core.upstream_received(codec.encode_request({"reply": ROUTE, **request}))
    assert reply is not None
    message = codec.decode(reply)
    assert message.topic == f"_rep.{ROUTE}"
    assert codec.history_channel_check(message) == codec.channel_check(request.get("channel"))
    request_id, status, bars = codec.records_from_history(message)
    return request_id, status, bars["s"].tolist()


def test_history_requests_filter_and_report_what_is_not_served(core: Aggregator) -> None:
    core.frames_received(
        [trades_frame("AAPL", 1, 1_050, 1_150, 1_250, 1_350), clock_frame(1, 5_000)]
    )
    ok = codec.HistoryStatus.OK
    assert history(core, {"id": 1, "channel": "100Ms.AAPL"}) == (
        1,
        ok,
        [1_000, 1_100, 1_200, 1_300],
    )
    assert history(core, {"id": 2, "channel": "100Ms.AAPL", "since": 1_100, "before": 1_300}) == (
        2, ok, [1_100, 1_200],
    )  # fmt: skip
    assert history(core, {"id": 3, "channel": "100Ms.AAPL", "limit": 2}) == (3, ok, [1_200, 1_300])
    assert history(core, {"id": 4, "channel": "100Ms.A"}) == (4, ok, [])
    assert (
        history(core, {"id": 5, "channel": "250Ms.AAPL"})[1]
        is codec.HistoryStatus.INTERVAL_NOT_SERVED
    )
    assert (
        history(core, {"id": 6, "channel": "100Ms.TSLA"})[1]
        is codec.HistoryStatus.SYMBOL_NOT_SERVED
    )
    for bad in (
        {"id": 7, "channel": "100Ms.*"},
        {"id": 7, "channel": "100ms.AAPL"},
        {"id": 7, "channel": 5},
        {"id": 7, "channel": "100Ms.AAPL", "limit": -1},
        {"id": 7, "channel": "100Ms.AAPL", "limit": MAX_REPLY_BARS + 1},
        {"id": 7, "channel": "100Ms.AAPL", "limit": 10**18},
        {"id": 7, "channel": "100Ms.AAPL", "since": "x"},
        {"id": 7, "op": "drop tables"},
    ):
        assert history(core, bad)[1] is codec.HistoryStatus.BAD_REQUEST, bad
    assert history(core, {"id": 8, "channel": "100Ms.AAPL", "limit": MAX_REPLY_BARS})[1] is ok
    assert core.requests_total.value == 5
    assert core.bad_requests_total.value == 10


def test_no_limit_means_the_most_recent_max_reply_bars(core: Aggregator) -> None:
    times = [1_000 + 100 * i for i in range(MAX_REPLY_BARS + 5)]
    core.frames_received([trades_frame("AAPL", 1, *times), clock_frame(1, times[-1] + 1_000)])
    _, status, starts = history(core, {"id": 1, "channel": "100Ms.AAPL"})
    assert (status, len(starts), starts[-1]) == (codec.HistoryStatus.OK, MAX_REPLY_BARS, times[-1])


def test_symbols_request_lists_traded_symbols_most_active_first(core: Aggregator) -> None:
    core.frames_received([trades_frame("A", 1, 1_000), trades_frame("AAPL", 1, 1_000, 1_001)])
    reply = core.upstream_received(codec.encode_request({"id": 9, "reply": ROUTE, "op": "symbols"}))
    assert reply is not None
    message = codec.decode(reply)
    assert (message.topic, message.kind) == (f"_rep.{ROUTE}", codec.Kind.SYMBOLS)
    assert codec.decode_json(message) == {
        "id": 9,
        "op": "symbols",
        "symbols": [["AAPL", 2], ["A", 1]],
    }


def test_requests_without_a_reply_address_are_counted_and_dropped(core: Aggregator) -> None:
    assert core.upstream_received(codec.encode_request({"id": 1, "channel": "100Ms.A"})) is None
    assert core.upstream_received(codec.encode_request({"reply": "a b", "id": 1})) is None
    assert core.upstream_received(b"\x02not json") is None
    # a route must be 16 to 64 lowercase hex digits: shorter ones are guessable
    assert core.upstream_received(codec.encode_request({"reply": "abc123", "id": 1})) is None
    assert core.bad_requests_total.value == 4


def test_upstream_messages_are_relayed_under_the_agg_session(core: Aggregator) -> None:
    record = np.array([(codec.UPSTREAM_DOWN, 2_000, 9_999)], dtype=codec.UPSTREAM_DTYPE)
    frame = codec.encode(codec.CONTROL_TOPIC, codec.Kind.UPSTREAM, 77, 3, 1, record.tobytes())
    relayed, outage = (codec.decode(m) for m in core.frames_received([frame]))
    assert codec.decode_json(outage) == {
        "state": "down",
        "s": 2_000,
        "e": None,
        "causes": ["upstream"],
    }
    assert (relayed.kind, relayed.session, relayed.seq) == (codec.Kind.UPSTREAM, 42, 1)
    assert codec.records(relayed).tolist() == record.tolist()
    assert core.outages.is_open()


def test_a_continuing_loss_is_one_warning_with_its_count(
    core: Aggregator, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="polyfan.agg"):
        core.frames_received([trades_frame("A", 1, 1_000), trades_frame("A", 4, 1_001)])
        core.frames_received([trades_frame("A", 9, 1_002)])
    assert [r.getMessage() for r in caplog.records] == ["2 messages from the proxy lost in transit"]
    assert core.gaps_total.value == 6


def test_messages_the_agg_does_not_use_are_counted(core: Aggregator) -> None:
    bars = np.zeros(1, dtype=codec.BAR_DTYPE)
    core.frames_received(
        [
            trades_frame("TSLA", 1, 1_000),  # not one of --symbols
            codec.encode(codec.trade_topic("A"), codec.Kind.BARS, 1, 1, 1, bars.tobytes()),
            trades_frame("A", 2, 1_000),
        ]
    )
    assert core.ignored_total.value == 2
    assert core.trades_total.value == 1


def test_a_bound_beyond_int64_is_a_bad_request_not_a_crash(core: Aggregator) -> None:
    core.frames_received([trades_frame("AAPL", 1, 1_050), clock_frame(1, 5_000)])
    for bound in ("since", "before", "limit"):
        for value in (2**63, 2**64 - 1):
            request = {"id": 1, "channel": "100Ms.AAPL", bound: value}
            assert history(core, request)[1] is codec.HistoryStatus.BAD_REQUEST, request
    assert history(core, {"id": 2, "channel": "100Ms.AAPL", "before": 2**63 - 1}) == (
        2,
        codec.HistoryStatus.OK,
        [1_000],
    )


def test_a_channel_outside_the_bridges_grammar_is_a_bad_request_not_a_crash(
    core: Aggregator,
) -> None:
    for channel in ("1" * 5_000 + "Ms.AAPL", "\u0661\u0660\u0660Ms.AAPL", "0100Ms.AAPL"):
        assert history(core, {"id": 1, "channel": channel})[1] is codec.HistoryStatus.BAD_REQUEST
