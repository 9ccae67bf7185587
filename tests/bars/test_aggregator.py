"""The agg's core without sockets: frames in, messages out; requests in, replies out."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest

from polyfan.bars.aggregator import MAX_REPLY_BARS, Aggregator
from polyfan.bars.outages import GAP, UPSTREAM, Change, Outages
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


def outage_messages(messages: list[bytes]) -> list[object]:
    decoded = map(codec.decode, messages)
    return [codec.decode_json(m) for m in decoded if m.kind is codec.Kind.OUTAGE]


def test_one_silent_cut_is_one_outage_though_each_topic_shows_its_gap_later() -> None:
    # A cut between proxy and agg: nothing heard for 2 s, then the link returns. The first
    # clock after it ends the silence, but each topic shows its own sequence gap only when its
    # first message since arrives, in later batches (tests/test_multihost.py saw 5 to 7, each
    # counted, logged and told to clients as an outage of its own). They are the cut's losses:
    # one outage, whose window covers the bars they could be in.
    config = AggConfig(intervals_ms=(100,), grace_ms=250, symbols=("A", "B", "C"))
    core = Aggregator(config, session=42)
    core.frames_received(
        [trades_frame(s, 1, 10_000) for s in "ABC"] + [clock_frame(1, 10_000)], now_ms=0
    )
    assert outage_messages(core.silence_checked(now_ms=2_000)) == [
        {"state": "down", "s": 10_000, "e": None, "causes": ["silence"]}
    ]
    batches = [  # the link is back: the proxy's messages resume, each topic's seq jumped
        [clock_frame(50, 20_000), trades_frame("A", 90, 20_001)],
        [trades_frame("B", 70, 20_005), clock_frame(51, 20_010)],
        [clock_frame(52, 20_050)],
        [trades_frame("C", 40, 20_060), clock_frame(53, 20_100)],
        [clock_frame(54, 20_200)],  # the first clock after C's gap: the window's end
        [clock_frame(55, 20_400)],  # not yet a grace (250 ms) past it
        [clock_frame(56, 20_500)],
    ]
    published = []
    for at, frames in enumerate(batches):
        published += outage_messages(core.frames_received(frames, now_ms=12_000 + 10 * at))
    assert published == [{"state": "up", "s": 10_000, "e": 20_200, "causes": ["silence", "gap"]}]
    assert core.outages_total.value == 1
    assert core.gaps_total.value == 48 + 88 + 68 + 38
    # the bars the lost trades could be in carry outage: open at 10_000 or starting by 20_200
    a = core.bars.series_id(core.decoder.known_symbol_id("A") or 0, 100)
    flags = dict(core.history.select(a)[["s", "flags"]].tolist())
    assert flags == {10_000: codec.BAR_FLAG_OUTAGE, 20_000: codec.BAR_FLAG_OUTAGE}


def test_messages_lost_before_an_upstream_down_in_the_same_batch_start_the_window() -> None:
    # The gap (A's trades 2 to 4 lost) comes before the UPSTREAM down in the batch: the window
    # starts at the clock before the batch, not at the later clock the down reports, or the
    # bar the lost trades may be in (10_000, open until 10_350) would close unmarked.
    config = AggConfig(intervals_ms=(100,), grace_ms=250, symbols=("A",))
    core = Aggregator(config, session=42)
    core.frames_received([trades_frame("A", 1, 10_000), clock_frame(1, 10_000)], now_ms=0)
    down = np.array([(codec.UPSTREAM_DOWN, 11_000, 5_000)], dtype=codec.UPSTREAM_DTYPE)
    out = core.frames_received(
        [
            trades_frame("A", 5, 10_990),
            codec.encode(codec.CONTROL_TOPIC, codec.Kind.UPSTREAM, 1, 2, 1, down.tobytes()),
            clock_frame(3, 11_000),
        ],
        now_ms=10,
    )
    assert outage_messages(out) == [{"state": "down", "s": 10_000, "e": None, "causes": ["gap"]}]
    assert core.outages.current() == Change(10_000, None, (GAP, UPSTREAM))
    a = core.bars.series_id(core.decoder.known_symbol_id("A") or 0, 100)
    assert core.history.select(a)[["s", "flags"]].tolist() == [(10_000, codec.BAR_FLAG_OUTAGE)]


def published_bars(messages: list[bytes]) -> dict[tuple[str, int], tuple[object, ...]]:
    """(topic, bar start) -> the bar's fields, of every BARS message."""
    bars = {}
    for message in map(codec.decode, messages):
        if message.kind is codec.Kind.BARS:
            for bar in codec.records(message).tolist():
                bars[message.topic, bar[0]] = bar
    return bars


@pytest.mark.parametrize("seed", range(100))
def test_settling_marks_no_bar_that_could_hold_a_lost_trade_less(seed: int) -> None:
    """A random feed as the proxy sends it (trades, clocks after every batch that moves the
    clock and between, now and then an UPSTREAM down/up), with messages lost at random and
    cuts (a run of messages lost while nothing is heard for 2 s), through an agg whose
    outages settle for its grace and one whose outages are over at once (before settling):
    they publish the same bars; settling marks a subset, each bar it no longer marks equals
    the whole feed's (no lost trade could be in it), and it counts no more outages."""
    rng = random.Random(seed)
    symbols = ("A", "B", "C", "D")
    grace = rng.choice((50, 100, 250))
    config = AggConfig(intervals_ms=(100, 250), grace_ms=grace, symbols=symbols)
    whole, settling, at_once = (Aggregator(config, session=42) for _ in range(3))
    at_once.outages = Outages(settle_ms=0)
    seqs = dict.fromkeys([*symbols, "_ctl"], 0)
    clock, wall, down = 10_000, 0, False
    sent: list[bytes] = []  # what the proxy sends
    for _ in range(600):
        batch = [rng.randint(-40, 60) + clock for _ in range(rng.randint(0, 3))]
        for t in batch:
            symbol = rng.choice(symbols)
            seqs[symbol] += 1
            sent.append(trades_frame(symbol, seqs[symbol], t))
        wall += rng.randint(1, 30)
        if rng.random() < 0.02:
            down = not down
            state = codec.UPSTREAM_DOWN if down else codec.UPSTREAM_UP
            record = np.array([(state, clock, wall)], dtype=codec.UPSTREAM_DTYPE)
            seqs["_ctl"] += 1
            sent.append(
                codec.encode(
                    codec.CONTROL_TOPIC, codec.Kind.UPSTREAM, 1, seqs["_ctl"], 1, record.tobytes()
                )
            )
        if max(batch, default=clock) > clock or rng.random() < 0.3:
            clock = max(batch, default=clock)
            seqs["_ctl"] += 1
            sent.append(clock_frame(seqs["_ctl"], clock))
    out: dict[int, list[bytes]] = {id(agg): [] for agg in (whole, settling, at_once)}
    now, at = 0, 0
    while at < len(sent):
        take = rng.randint(1, 6)
        frames, at = sent[at : at + take], at + take
        if at > 40 and rng.random() < 0.04:  # lost: some at random, or a cut
            if rng.random() < 0.25:
                at += rng.randint(20, 150)
                now += 2_500
                for agg in (settling, at_once):
                    out[id(agg)] += agg.silence_checked(now)
            else:
                frames = [f for f in frames if rng.random() < 0.5]
        now += rng.randint(1, 20)
        for agg in (settling, at_once):
            out[id(agg)] += agg.frames_received(frames, now_ms=now)
    out[id(whole)] += whole.frames_received(sent, now_ms=0)
    last = clock_frame(seqs["_ctl"] + 1, clock + 10_000)  # closes every bar
    for agg in (whole, settling, at_once):
        out[id(agg)] += agg.frames_received([last], now_ms=now)
    reference, mine, before = (published_bars(out[id(a)]) for a in (whole, settling, at_once))

    def marked(bars: dict[tuple[str, int], tuple[object, ...]]) -> set[tuple[str, int]]:
        return {key for key, bar in bars.items() if int(bar[-1]) & codec.BAR_FLAG_OUTAGE}

    assert mine.keys() == before.keys()
    assert all(mine[key][:-1] == before[key][:-1] for key in mine)  # all but the flags
    assert marked(mine) <= marked(before)
    for key in marked(before) - marked(mine):
        assert mine[key][:-1] == reference[key][:-1], (key, mine[key], reference[key])
    assert settling.outages_total.value <= at_once.outages_total.value
