"""Bars kept per series: append, trim by age, since/before/limit lookups, memory."""

from __future__ import annotations

import mmap
from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.bars import barcodec
from polyfan.bars.history import PACK_DEFERRALS, History
from polyfan.wire import codec

JIT = [pytest.param(True, id="jit"), pytest.param(False, id="py_func")]


def price(starts: np.ndarray) -> np.ndarray:
    return np.round(100 + starts * 0.0137, 2)


def varied(starts: np.ndarray) -> np.ndarray:
    """Bars whose fields are a function of their start, mixing what the block codec treats
    differently: cent prices (ticks) and prices that need all 64 bits, one-price bars, ``vw``
    equal to ``c``, NaN, or neither."""
    records = np.zeros(len(starts), dtype=codec.BAR_DTYPE)
    step = starts // 10
    records["s"] = starts
    records["c"] = price(starts)
    records["o"] = np.where(step % 7 == 0, starts / 7, price(starts + 30))
    records["h"] = np.maximum(records["o"], records["c"]) + np.where(step % 4 == 0, 0, 0.01)
    records["l"] = np.minimum(records["o"], records["c"])
    records["v"] = starts * 0.5
    records["vw"] = np.where(step % 2 == 0, records["c"], records["c"] + 1 / 3)
    records["vw"][step % 5 == 1] = np.nan
    records["n"] = starts % 5
    records["flags"] = 2
    return records


def bars(starts: list[int] | np.ndarray) -> np.ndarray:
    records = np.zeros(len(starts), dtype=codec.BAR_DTYPE)
    records["s"] = starts
    records["c"] = np.arange(len(starts), dtype=np.float64)
    return records


def feed(
    history: History,
    steps: list[tuple[int, int, int]],
    records: Callable[[np.ndarray], np.ndarray] = bars,
) -> tuple[dict[int, list[int]], int]:
    """For each ``(series, count, advance)``: append the series' next ``count`` bars (starts
    10 apart), move the clock on by ``advance`` and trim. Returns the starts appended per
    series and the final clock."""
    made: dict[int, list[int]] = {}
    clock = 0
    for series, count, advance in steps:
        done = made.setdefault(series, [])
        starts = list(range(10 * len(done), 10 * (len(done) + count), 10))
        history.add(series, records(np.array(starts, dtype=np.int64)))
        done.extend(starts)
        clock += advance
        history.trim(clock)
    return made, clock


@pytest.mark.parametrize("jit", JIT)
@settings(deadline=None)
@given(
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    since=st.none() | st.integers(-50, 3_000),
    before=st.none() | st.integers(-50, 3_000),
    limit=st.none() | st.integers(0, 50),
)
def test_select_matches_a_plain_filter(
    jit: bool, chunks: list[int], since: int | None, before: int | None, limit: int | None
) -> None:
    history = History(keep_ms=10**9, rows=8, jit=jit)
    starts: list[int] = []
    for size in chunks:
        new = list(range(len(starts) * 10, (len(starts) + size) * 10, 10))
        history.add(7, bars(new))
        starts += new
    expected = [
        s for s in starts if (since is None or s >= since) and (before is None or s < before)
    ]
    if limit is not None:
        expected = expected[max(0, len(expected) - limit) :]
    assert history.select(7, since, before, limit)["s"].tolist() == expected


def test_unknown_series_has_no_bars() -> None:
    assert len(History(1_000).select(3)) == 0


def test_trim_drops_bars_older_than_the_retention_on_append_and_by_sweep() -> None:
    history = History(keep_ms=1_000, sweep=10)
    history.add(1, bars([0, 100, 200]))
    history.add(2, bars([0, 500, 1_500]))
    history.trim(clock=1_600)  # cutoff 600
    assert history.select(1)["s"].tolist() == []
    assert history.select(2)["s"].tolist() == [1_500]
    assert len(history) == 1  # the emptied series released its storage
    history.add(2, bars([2_000]))
    history.trim(clock=2_600)  # cutoff 1_600
    history.add(2, bars([2_100]))
    assert history.select(2)["s"].tolist() == [2_000, 2_100]


def test_memory_follows_the_bars_made_not_the_retention() -> None:
    history = History(keep_ms=3_600_000)
    for series in range(1_000):
        history.add(series, bars([series]))  # one bar each: a quiet symbol
    assert history.bar_count == 1_000
    # a region of 4 bars each, the arena at most twice that, 32 bytes of index per series
    assert history.nbytes <= 2 * 1_000 * 4 * codec.BAR_DTYPE.itemsize + 1_000 * 32
    busy = History(keep_ms=3_600_000)
    for s in range(10_000):
        busy.add(0, bars([s]))
    assert busy.bar_count == 10_000
    assert busy.nbytes <= 4 * 10_000 * codec.BAR_DTYPE.itemsize


def test_a_trimmed_series_reuses_its_storage_instead_of_growing() -> None:
    history = History(keep_ms=100, sweep=0, rows=64)
    for s in range(0, 100_000, 10):
        history.add(0, bars([s]))
        history.trim(clock=s)
    allocated, top, _ = history.rows
    # one region sized by the ~11 bars the retention keeps, not the 10,000 appended
    assert allocated == 64
    assert top <= 2 * 11
    held = history.select(0)["s"].tolist()
    # at least the last 100 ms (cutoff 99_890); trimming on append may lag one bar behind
    assert held[-11:] == list(range(99_890, 100_000, 10))
    assert len(held) <= 12


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 5), st.integers(0, 6), st.integers(0, 40)), min_size=1, max_size=80
    ),
    keep=st.sampled_from([50, 200, 10**9]),
)
def test_many_series_with_trimming_match_a_plain_model(
    jit: bool, steps: list[tuple[int, int, int]], keep: int
) -> None:
    """Appends to several series, clock moves and sweeps, against lists filtered by age."""
    history = History(keep_ms=keep, sweep=2, rows=8, jit=jit)
    model, clock = feed(history, steps)
    for series in range(6):
        held = history.select(series)["s"].tolist()
        everything = model.get(series, [])
        # at least the last keep_ms (no trimming ahead of the clock), never a bar made up
        assert held == everything[len(everything) - len(held) :]
        assert [s for s in everything if s >= clock - keep] == [
            s for s in held if s >= clock - keep
        ]


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=100, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 9), st.integers(0, 60)), min_size=1, max_size=60
    ),
    keep=st.sampled_from([100, 400, 10**9]),
    queries=st.lists(
        st.tuples(
            st.integers(0, 3),
            st.none() | st.integers(-10, 3_000),
            st.none() | st.integers(-10, 3_000),
            st.none() | st.integers(0, 30),
        ),
        max_size=8,
    ),
)
def test_compressed_blocks_and_hot_bars_answer_like_one_list(
    jit: bool,
    steps: list[tuple[int, int, int]],
    keep: int,
    queries: list[tuple[int, int | None, int | None, int | None]],
) -> None:
    """Blocks of 3 bars, swept every step: most bars end up compressed, through every path of
    the block codec; every answer still equals a plain filter of what is held, every field
    bit for bit."""
    history = History(keep_ms=keep, sweep=64, rows=8, block=3, jit=jit)
    made, clock = feed(history, steps, varied)
    if keep == 10**9 and max(map(len, made.values()), default=0) >= 3:
        assert history.cold_bytes > 0  # nothing trimmed: a series with a whole block was packed
    for series in range(4):
        held = history.select(series)
        everything = made.get(series, [])
        assert held["s"].tolist() == everything[len(everything) - len(held) :]
        assert [s for s in everything if s >= clock - keep] == [
            s for s in held["s"].tolist() if s >= clock - keep
        ]
        # every field bit for bit (NaN included)
        assert held.view(np.int64).tolist() == varied(held["s"]).view(np.int64).tolist()
    for series, since, before, limit in queries:
        held = history.select(series)["s"].tolist()
        expected = [
            s for s in held if (since is None or s >= since) and (before is None or s < before)
        ]
        if limit is not None:
            expected = expected[max(0, len(expected) - limit) :]
        assert history.select(series, since, before, limit)["s"].tolist() == expected


def test_packing_yields_to_waiting_work_and_is_bounded_per_call() -> None:
    history = History(keep_ms=10**9, sweep=64, block=4, pack_budget=3)
    history.add(0, bars(list(range(0, 400, 10))))  # 40 bars: 10 blocks to pack
    for _ in range(PACK_DEFERRALS):
        history.trim(clock=0, busy=lambda: True)
    assert history.cold_bytes == 0  # something was waiting: nothing packed
    history.trim(clock=0)
    packed = history.cold_bytes
    assert packed > 0
    assert history.bar_count == 40
    for _ in range(5):
        history.trim(clock=0)
    assert history.cold_bytes > packed  # the rest, a budget's worth per call
    assert history.select(0)["s"].tolist() == list(range(0, 400, 10))


# --- the packed-record codec and its log ----------------------------------------------------


def market_bars(draw: st.DrawFn, count: int) -> np.ndarray:
    """Bars made the way the kernels make them: cent or 1e-4 prices, whole-share sizes, vw as
    the float sum of price * size over the volume; some one-trade, some carried (v == 0)."""
    records = np.zeros(count, dtype=codec.BAR_DTYPE)
    s = draw(st.integers(0, 2**41))
    unit = draw(st.sampled_from([100, 250, 1_000, 60_000]))
    close = draw(st.integers(1, 50_000_000)) * 100  # in 1e-4 ticks: whole cents
    for i in range(count):
        s += unit * draw(st.integers(1, 5_000))
        trades = draw(st.integers(0, 6))
        if trades == 0:
            records[i] = (s, *[close / 10_000] * 4, 0.0, np.nan, 0, 2)
            continue
        # prices as the feed's JSON gives them: the double nearest a decimal
        ticks = [
            max(1, close + draw(st.integers(-300, 300)) * draw(st.sampled_from([1, 100])))
            for _ in range(trades)
        ]
        prices = [t / 10_000 for t in ticks]
        sizes = [float(draw(st.integers(1, 100_000))) for _ in range(trades)]
        pv = 0.0
        for p, size in zip(prices, sizes, strict=True):
            pv += p * size
        v = sum(sizes)
        close = ticks[-1]
        flags = draw(st.sampled_from([0, 0, 1]))
        records[i] = (s, prices[0], max(prices), min(prices), prices[-1], v, pv / v, trades, flags)
    return records


@st.composite
def bar_runs(draw: st.DrawFn) -> np.ndarray:
    count = draw(st.integers(1, 40))
    if draw(st.booleans()):
        return market_bars(draw, count)
    # anything at all: every word random bits (NaN payloads, -0.0, infinities, huge flags),
    # bar starts in any order, near 0 (steps) or anywhere in int64 (raw)
    words = draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=8 * count, max_size=8 * count))
    records = np.array(words, dtype=np.int64).view(codec.BAR_DTYPE)
    if draw(st.booleans()):
        records["s"] = draw(st.lists(st.integers(-(2**60), 2**60), min_size=count, max_size=count))
    return records


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=300, deadline=None)
@given(records=bar_runs())
def test_a_record_decodes_to_the_exact_bars_it_encoded(jit: bool, records: np.ndarray) -> None:
    encode = barcodec.encode_record if jit else barcodec.encode_record.py_func
    decode = barcodec.decode_record if jit else barcodec.decode_record.py_func
    words = records.view(np.int64).reshape(len(records), 8)
    sf = np.zeros(1)
    si = sf.view(np.int64)
    out = np.zeros(barcodec.record_max(len(records)) + 5, dtype=np.uint8)
    decoded = np.zeros((len(records), 8), dtype=np.int64)
    with np.errstate(all="ignore"):  # NumPy scalars warn on NaN/inf arithmetic; numba does not
        end = encode(words, words.view(np.float64), 0, len(records), 777, out, 5, sf, si)
        assert decode(out, 5, decoded, 0, sf, si) == len(records)
    assert 5 < end <= len(out)
    assert barcodec.record_header(out, 5) == (777, len(records), int(records["s"][0]))
    assert decoded.tolist() == words.tolist()


@settings(max_examples=200, deadline=None)
@given(data=st.data(), count=st.integers(1, 40))
def test_bars_made_like_the_kernels_make_them_never_need_the_raw_forms(
    data: st.DataObject, count: int
) -> None:
    """Tick prices, whole volumes and the kernels' own vw arithmetic: every field takes its
    compact form, so a bar is at most ~24 bytes (the raw forms alone would be 48)."""
    records = market_bars(data.draw, count)
    words = records.view(np.int64).reshape(count, 8)
    out = np.zeros(barcodec.record_max(count), dtype=np.uint8)
    sf = np.zeros(1)
    si = sf.view(np.int64)
    end = barcodec.encode_record(words, words.view(np.float64), 0, count, 0, out, 0, sf, si)
    assert end <= barcodec.HEADER_MAX + 24 * count
    decoded = np.zeros((count, 8), dtype=np.int64)
    barcodec.decode_record(out, 0, decoded, 0, sf, si)
    assert decoded.tolist() == words.tolist()


def test_a_negative_low_and_a_huge_volume_do_not_overflow_the_derived_vw() -> None:
    """q - v * l must fit the zigzag: here it would not, so vw goes raw, and comes back exact."""
    records = np.zeros(1, dtype=codec.BAR_DTYPE)
    records[0] = (1_000, 1.0, 1.0, -214_748.3647, 1.0, 2**31 - 1, 1.0000001, 3, 0)
    words = records.view(np.int64).reshape(1, 8)
    out = np.zeros(barcodec.record_max(1), dtype=np.uint8)
    sf = np.zeros(1)
    si = sf.view(np.int64)
    barcodec.encode_record(words, words.view(np.float64), 0, 1, 0, out, 0, sf, si)
    decoded = np.zeros((1, 8), dtype=np.int64)
    barcodec.decode_record(out, 0, decoded, 0, sf, si)
    assert decoded.tolist() == words.tolist()


def test_one_trade_bars_of_a_quiet_symbol_take_a_few_bytes() -> None:
    records = np.zeros(16, dtype=codec.BAR_DTYPE)
    records["s"] = 1_700_000_000_000 + 100 * np.cumsum(np.arange(1, 17) * 37)
    records["o"] = records["h"] = records["l"] = records["c"] = records["vw"] = 12.34
    records["v"] = 100.0
    records["n"] = 1
    words = records.view(np.int64).reshape(16, 8)
    out = np.zeros(barcodec.record_max(16), dtype=np.uint8)
    sf = np.zeros(1)
    end = barcodec.encode_record(
        words, words.view(np.float64), 0, 16, 0, out, 0, sf, sf.view(np.int64)
    )
    # header ~10 bytes, then mask + step + price + volume: 4 to 5 bytes a bar (64 raw)
    assert end <= 10 + 16 * 5


def test_the_log_grows_frees_whole_segments_and_reuses_their_slots() -> None:
    """Tiny segments (one record each) and two slots to start with: growth, freeing by the
    retention and slot reuse, against a plain list."""
    block = 4
    history = History(
        keep_ms=2_000,
        sweep=64,
        rows=64,
        block=block,
        segment_bytes=barcodec.record_max(block),
        segments=2,
    )
    made: dict[int, list[int]] = {0: [], 1: []}
    for step in range(400):
        series = step % 2
        s = 10 * step
        history.add(series, varied(np.array([s], dtype=np.int64)))
        made[series].append(s)
        history.trim(clock=s)
        for key in (0, 1):
            held = history.select(key)
            expected = [x for x in made[key] if x >= s - 2_000]
            assert held["s"].tolist() == expected
            assert held.view(np.int64).tolist() == varied(held["s"]).view(np.int64).tolist()
    # ~200 ms of bars per series held (20 records of 4 at most, one per segment): the slots
    # touched follow that, not the 100 records ever packed per series
    assert history.cold_bytes > 0
    assert history.nbytes < 64 * 64 + 64 * barcodec.record_max(block) + 4096
    assert history.select(0, limit=3)["s"].tolist() == made[0][-3:]
    assert history.select(1, since=3_000, before=3_100)["s"].tolist() == [
        3_010,
        3_030,
        3_050,
        3_070,
        3_090,
    ]


def test_a_segment_too_small_for_a_record_is_refused() -> None:
    with pytest.raises(ValueError, match="segment_bytes 100 cannot hold a record of 16 bars"):
        History(1_000, block=16, segment_bytes=100)


def resident_bytes(address: int, size: int) -> int:
    """Bytes of ``[address, address + size)`` in memory: the "present" bit of each page in
    /proc/self/pagemap (readable by the process itself)."""
    page = mmap.PAGESIZE
    with open("/proc/self/pagemap", "rb") as pagemap:
        pagemap.seek(address // page * 8)
        entries = np.frombuffer(pagemap.read(size // page * 8), dtype=np.uint64)
    return int(((entries >> np.uint64(63)) & np.uint64(1)).sum()) * page


def test_freed_log_segments_give_their_memory_back() -> None:
    segment = 1 << 16
    history = History(keep_ms=100_000, segment_bytes=segment, segments=1_024)
    address = history._log.ctypes.data
    starts = np.arange(0, 64_000, 1_000, dtype=np.int64)  # 64 bars a series, 1 s apart
    for series in range(2_000):
        history.add(series, varied(starts + series))
    for _ in range(4):  # sweeps of 2,048 series, 4,096 records each at most
        history.trim(clock=64_000)
    assert history.bar_count == 2_000 * 64
    packed = resident_bytes(address, 1_024 * segment)
    assert packed >= history.cold_bytes > 2_000 * 56 * 4  # at least ~4 bytes a packed bar
    history.trim(clock=10**9)  # an hour later everything is past the retention
    assert history.select(7).size == 0
    assert (
        resident_bytes(address, 1_024 * segment) <= segment
    )  # the segment still open for writing, at most


def test_a_feed_that_never_pauses_still_gets_its_bars_packed() -> None:
    history = History(keep_ms=10**9, sweep=64, block=4)
    history.add(0, bars(list(range(0, 400, 10))))
    for _ in range(PACK_DEFERRALS):
        history.trim(clock=0, busy=lambda: True)
    assert history.cold_bytes == 0
    history.trim(clock=0, busy=lambda: True)  # deferred long enough: packed anyway
    assert history.cold_bytes > 0
    assert history.select(0)["s"].tolist() == list(range(0, 400, 10))


def test_a_series_whose_packed_bars_are_all_past_the_retention_is_not_counted() -> None:
    history = History(keep_ms=1_000, sweep=64, block=4)
    history.add(0, bars([0, 10, 20, 30]))  # one record's worth
    history.add(1, bars([5_000]))
    history.trim(clock=100)  # packs series 0
    assert history.cold_bytes > 0
    assert len(history) == 2
    history.trim(clock=5_500)  # cutoff 4_500: series 0's record is past it, its segment is not
    assert history.select(0).size == 0
    assert len(history) == 1
