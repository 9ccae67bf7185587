"""The compiled frame decoder agrees with ``codec.decode`` and ``codec.GapCounter`` frame for frame."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.bars import conditions, kernels
from polyfan.errors import WireError
from polyfan.wire import codec, decode, encode
from polyfan.wire.ingest import FrameDecoder, TradeColumns, join_frames, split_frames

JIT = [pytest.param(True, id="jit"), pytest.param(False, id="py_func")]
# Prices and sizes: mostly valid, with the edges and what would overflow a bar's sums.
PRICES = [190.01, 1e-4, 1e9, 1e9 * (1 + 2**-52), 1e308, float("inf"), float("nan"), 0.0, -1.0]
SIZES = [100.0, 0.0, 0.5, 1e12, 1e12 * (1 + 2**-52), 1e300, float("inf"), float("nan"), -1.0]
TOPICS = ["T.A", "T.AA", "T.AAPL", "T.BRK.A", "T.TSLA", "_ctl", "100Ms.A", "_rep.x"]
RECORD = {
    codec.Kind.TRADES: codec.TRADE_DTYPE,
    codec.Kind.BARS: codec.BAR_DTYPE,
    codec.Kind.CLOCK: codec.CLOCK_DTYPE,
    codec.Kind.UPSTREAM: codec.UPSTREAM_DTYPE,
}


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    topic = draw(st.sampled_from(TOPICS)).encode() + codec.TERMINATOR
    kind = draw(st.sampled_from(list(codec.Kind)))
    count = draw(st.integers(0, 3))
    dtype = RECORD.get(kind)
    if dtype is None:
        payload = b'{"x": 1}'
    else:
        records = np.zeros(count, dtype=dtype)
        first = dtype.names[0] if dtype.names else None
        if first is not None:
            records[first] = draw(st.lists(st.integers(-5, 10**13), min_size=count, max_size=count))
        if kind is codec.Kind.TRADES:
            weights = st.sampled_from(PRICES[:1] * 12 + PRICES)
            records["p"] = draw(st.lists(weights, min_size=count, max_size=count))
            weights = st.sampled_from(SIZES[:1] * 12 + SIZES)
            records["s"] = draw(st.lists(weights, min_size=count, max_size=count))
        payload = records.tobytes()
    frame = codec.encode(
        topic, kind, draw(st.sampled_from([1, 2**64 - 1])), draw(st.integers(0, 6)), count, payload
    )
    damage = draw(st.sampled_from(["none"] * 6 + ["cut", "version", "kind", "no-topic"]))
    if damage == "cut":
        frame = frame[: draw(st.integers(0, len(frame) - 1))]
    elif damage == "version":
        frame = frame.replace(codec.TERMINATOR + b"\x01", codec.TERMINATOR + b"\x07", 1)
    elif damage == "kind":
        at = frame.index(codec.TERMINATOR) + 2
        frame = frame[:at] + b"\x63" + frame[at + 1 :]
    elif damage == "no-topic":
        frame = frame[: frame.index(codec.TERMINATOR)]
    return frame


def expected_from_wire(batches: list[list[bytes]], accept: set[str] | None) -> dict[str, object]:
    gaps = codec.GapCounter()
    bad = ignored = 0
    clock: int | None = None
    control_session: int | None = None  # a control frame from another session is handed back
    trades: list[tuple[int, str, int | None]] = []
    specials: list[bytes] = []
    for batch in batches:
        for frame in batch:
            try:
                message = codec.decode(frame)
            except WireError:
                bad += 1
                continue
            gaps.observe(message.topic, message.session, message.seq)
            symbol = message.topic.removeprefix("T.")
            if message.topic == codec.CONTROL:
                new_session = control_session not in (None, message.session)
                control_session = message.session
                if message.kind is codec.Kind.CLOCK:
                    for value, _ in codec.records(message).tolist():
                        clock = value if clock is None else max(clock, value)
                if message.kind is not codec.Kind.CLOCK or new_session:
                    specials.append(frame)
            elif (
                message.topic.startswith("T.")
                and message.kind is codec.Kind.TRADES
                and (accept is None or symbol in accept)
            ):
                records = codec.records(message)
                kept = [
                    i
                    for i, (p, s) in enumerate(
                        zip(records["p"].tolist(), records["s"].tolist(), strict=True)
                    )
                    if 0 < p <= 1e9 and 0 <= s <= 1e12  # the bounds, written out independently
                ]
                bad += len(records) - len(kept)
                trades.extend((int(records["t"][i]), symbol, clock) for i in kept)
            else:
                ignored += 1
    return {
        "gaps": gaps.lost,
        "bad": bad,
        "ignored": ignored,
        "clock": clock,
        "trades": trades,
        "specials": specials,
    }


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=200, deadline=None)
@given(
    batches=st.lists(st.lists(frames(), max_size=12), min_size=1, max_size=5),
    accept=st.none() | st.just({"A", "BRK.A"}),
)
def test_decoder_agrees_with_the_wire_codec(
    jit: bool, batches: list[list[bytes]], accept: set[str] | None
) -> None:
    decoder = FrameDecoder(None if accept is None else sorted(accept), jit=jit)
    trades: list[tuple[int, str, int | None]] = []
    specials: list[bytes] = []
    for frames_ in batches:
        batch = decoder.decode(frames_)
        clocks = [None if c == np.iinfo(np.int64).min else c for c in batch.clocks.tolist()]
        names = [decoder.symbol_names[i] for i in batch.symbols.tolist()]
        trades.extend(zip(batch.trades["t"].tolist(), names, clocks, strict=True))
        specials.extend(batch.specials)
    got = {
        "gaps": decoder.gaps,
        "bad": decoder.bad_messages,
        "ignored": decoder.ignored_messages,
        "clock": decoder.clock,
        "trades": trades,
        "specials": specials,
    }
    assert got == expected_from_wire(batches, accept)


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=100, deadline=None)
@given(batch=st.lists(frames(), max_size=12), slack=st.integers(0, 100))
def test_decoding_a_reused_buffer_gives_what_decoding_the_frames_gives(
    jit: bool, batch: list[bytes], slack: int
) -> None:
    """``decode_buffer`` over a larger, reused buffer (as the agg's receiver fills it) decodes
    the same as ``decode(frames)``, and the batch keeps nothing of the buffer."""
    by_frames = FrameDecoder(jit=jit).decode(batch)
    joined, offsets, count = join_frames(batch)
    buffer = np.full(len(joined) + slack, 0xAB, dtype=np.uint8)
    buffer[: len(joined)] = joined
    spare = np.full(count + 1 + slack, -1, dtype=np.int64)
    spare[: count + 1] = offsets
    by_buffer = FrameDecoder(jit=jit).decode_buffer(buffer, spare, count)
    buffer[:] = 0  # the receiver reuses it for the next batch
    assert by_buffer.trades.tobytes() == by_frames.trades.tobytes()
    assert by_buffer.symbols.tolist() == by_frames.symbols.tolist()
    assert by_buffer.clocks.tolist() == by_frames.clocks.tolist()
    assert by_buffer.specials == by_frames.specials
    assert buffer.flags.writeable  # only the decoder's view of it is read-only


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=100, deadline=None)
@given(batches=st.lists(st.lists(frames(), max_size=12), min_size=1, max_size=4))
def test_decoding_into_reused_columns_and_grouping_by_symbol_keep_every_trade_in_order(
    jit: bool, batches: list[list[bytes]]
) -> None:
    """``decode_into`` (trade_batches' path: one buffer and one set of columns for every
    batch) decodes what ``decode`` does, and ``grouped`` is that batch grouped by symbol in
    the order of each symbol's first trade, each symbol's trades in arrival order."""
    by_frames, into = FrameDecoder(jit=jit), FrameDecoder(jit=jit)
    columns = TradeColumns(room=2, frames=2, jit=jit)
    buffer = np.zeros(16, dtype=np.uint8)
    for batch in batches:
        want = by_frames.decode(batch)
        joined, offsets, count = join_frames(batch)
        if len(joined) > len(buffer):
            buffer = np.zeros(2 * len(joined), dtype=np.uint8)
        buffer[: len(joined)] = joined
        n = into.decode_into(buffer, offsets, count, columns)
        assert columns.trades(n).tobytes() == want.trades.tobytes()
        assert columns.symbols[:n].tolist() == want.symbols.tolist()
        assert columns.clocks[:n].tolist() == want.clocks.tolist()
        records, ids, bounds = columns.grouped(n, len(into.symbol_names))
        order = list(dict.fromkeys(want.symbols.tolist()))
        assert ids == order
        for symbol, a, b in zip(ids, bounds, bounds[1:], strict=False):
            mine = want.trades[want.symbols == symbol]
            assert records[a:b].tobytes() == mine.tobytes()
        assert bounds[-1] == n
        buffer[:] = 0
    assert (into.gaps, into.clock) == (by_frames.gaps, by_frames.clock)


def test_frames_joined_and_split_round_trip() -> None:
    frames_ = [b"", b"a", b"bc", b"", b"\x00" * 300]
    buffer, offsets, count = join_frames(frames_)
    assert (offsets.tolist(), count) == ([0, 0, 1, 3, 3, 303], 5)
    assert split_frames(buffer, offsets, count) == frames_
    assert split_frames(*join_frames([])) == []


def test_many_topics_grow_the_table_and_stay_distinct() -> None:
    decoder = FrameDecoder()
    names = [f"S{i}" for i in range(3_000)] + ["A", "AA", "AAPL", "BRK.A", "BRK"]
    trade = np.zeros(1, dtype=codec.TRADE_DTYPE)
    trade["p"], trade["s"] = 1.0, 1.0  # within the input bounds
    batch = decoder.decode(
        [
            codec.encode(codec.trade_topic(name), codec.Kind.TRADES, 1, 1, 1, trade.tobytes())
            for name in names
        ]
    )
    assert [decoder.symbol_names[i] for i in batch.symbols.tolist()] == names
    assert decoder.symbol_trades[: len(names)].tolist() == [1] * len(names)
    assert decoder.known_symbol_id("AAPL") == names.index("AAPL")
    assert decoder.known_symbol_id("NOPE") is None


def test_clock_never_moves_back_and_trades_carry_the_clock_at_their_arrival() -> None:
    decoder = FrameDecoder()
    trade = np.zeros(1, dtype=codec.TRADE_DTYPE)
    trade["p"], trade["s"] = 1.0, 1.0  # within the input bounds

    def clock(value: int, seq: int) -> bytes:
        record = np.array([(value, seq)], dtype=codec.CLOCK_DTYPE)
        return codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 9, seq, 1, record.tobytes())

    def trades(seq: int) -> bytes:
        return codec.encode(codec.trade_topic("T"), codec.Kind.TRADES, 9, seq, 1, trade.tobytes())

    batch = decoder.decode([trades(1), clock(500, 1), trades(2), clock(100, 2), trades(3)])
    assert batch.clocks.tolist() == [np.iinfo(np.int64).min, 500, 500]
    assert (decoder.clock, decoder.clock_wall) == (500, 2)


@pytest.mark.parametrize("jit", JIT)
def test_a_trade_topic_that_is_no_symbol_is_ignored_and_counted(jit: bool) -> None:
    decoder = FrameDecoder(jit=jit)
    trade = np.zeros(1, dtype=codec.TRADE_DTYPE)
    trade["p"], trade["s"] = 1.0, 1.0  # within the input bounds
    topics = [b"T.\xff\x00", b"T.\x00", b"T." + b"X" * 40 + b"\x00", codec.trade_topic("OK")]
    batch = decoder.decode(
        [codec.encode(topic, codec.Kind.TRADES, 1, 1, 1, trade.tobytes()) for topic in topics]
    )
    assert [decoder.symbol_names[i] for i in batch.symbols.tolist()] == ["OK"]
    assert decoder.ignored_messages == 3


def test_the_kernels_copies_of_the_wire_constants_agree_with_wire() -> None:
    # numba's cache keys on each kernel's own file, so the kernels keep literal copies: check them.
    assert (codec.HEADER.size, codec.VERSION) == (decode.HEADER_SIZE, decode.WIRE_VERSION)
    assert (codec.HEADER.size, codec.BAR_DTYPE.itemsize) == (encode.HEADER_SIZE, encode.BAR_SIZE)
    assert (encode.WIRE_VERSION, encode.KIND_BARS) == (codec.VERSION, codec.Kind.BARS)
    assert (
        codec.TRADE_DTYPE.itemsize,
        codec.BAR_DTYPE.itemsize,
        codec.CLOCK_DTYPE.itemsize,
        codec.UPSTREAM_DTYPE.itemsize,
    ) == (decode.TRADE_SIZE, decode.BAR_SIZE, decode.CLOCK_SIZE, decode.UPSTREAM_SIZE)
    kinds = (decode.KIND_TRADES, decode.KIND_BARS, decode.KIND_CLOCK, decode.KIND_UPSTREAM)
    assert kinds == (codec.Kind.TRADES, codec.Kind.BARS, codec.Kind.CLOCK, codec.Kind.UPSTREAM)
    assert max(codec.Kind) == decode.MAX_KIND
    assert (decode.KIND_QUOTES, decode.KIND_AGGREGATES, decode.KIND_LULD) == (
        codec.Kind.QUOTES,
        codec.Kind.AGGREGATES,
        codec.Kind.LULD,
    )
    assert (
        codec.QUOTE_DTYPE.itemsize,
        codec.AGG_DTYPE.itemsize,
        codec.LULD_DTYPE.itemsize,
    ) == (decode.QUOTE_SIZE, decode.AGG_SIZE, decode.LULD_SIZE)
    assert (kernels.FLAG_OUTAGE, kernels.FLAG_CARRIED) == (
        codec.BAR_FLAG_OUTAGE,
        codec.BAR_FLAG_CARRIED,
    )
    assert (kernels.HL, kernels.OC, kernels.VOL, kernels.UNKNOWN) == (
        conditions.HL,
        conditions.OC,
        conditions.VOL,
        conditions.UNKNOWN,
    )


def test_the_kernels_copies_of_the_input_bounds_agree_with_wire() -> None:
    assert (decode.MAX_PRICE, decode.MAX_SIZE) == (codec.MAX_PRICE, codec.MAX_SIZE)
    words = np.zeros(1, codec.TRADE_DTYPE).view(np.float64)
    assert len(words) == decode.TRADE_WORDS
    probe = np.zeros(1, codec.TRADE_DTYPE)
    probe["p"], probe["s"] = 1.5, 2.5
    assert probe.view(np.float64)[[decode.TRADE_P_WORD, decode.TRADE_S_WORD]].tolist() == [
        1.5,
        2.5,
    ]


@pytest.mark.parametrize("jit", JIT)
def test_trades_that_would_overflow_a_bars_sums_are_dropped_and_counted(jit: bool) -> None:
    """A peer on the proxy's port can publish anything: out-of-bounds trades never leave decode."""
    decoder = FrameDecoder(jit=jit)
    records = np.zeros(7, codec.TRADE_DTYPE)
    records["t"] = np.arange(1, 8)
    records["p"] = [10.0, 1e308, 20.0, float("inf"), 1e9, float("nan"), 30.0]
    records["s"] = [1.0, 1.0, 1e13, 5.0, 1e12, 5.0, 0.0]
    frame = codec.encode(b"T.A\x00", codec.Kind.TRADES, 7, 1, len(records), records.tobytes())
    batch = decoder.decode([frame])
    # kept: 10 x 1, 1e9 x 1e12 (both bounds inclusive), 30 x 0; in arrival order
    assert batch.trades["t"].tolist() == [1, 5, 7]
    assert batch.trades["p"].tolist() == [10.0, 1e9, 30.0]
    assert batch.trades["s"].tolist() == [1.0, 1e12, 0.0]
    assert batch.symbols.tolist() == [decoder.symbol_id("A")] * 3
    assert (decoder.rejected_trades, decoder.bad_messages) == (4, 4)
    assert int(decoder.symbol_trades[decoder.symbol_id("A")]) == 3
    # the next message starts cleanly after the compaction
    good = np.zeros(1, codec.TRADE_DTYPE)
    good["t"], good["p"], good["s"] = 9, 11.0, 2.0
    again = decoder.decode([codec.encode(b"T.A\x00", codec.Kind.TRADES, 7, 2, 1, good.tobytes())])
    assert again.trades.tobytes() == good.tobytes()
    assert decoder.rejected_trades == 4
