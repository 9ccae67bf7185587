"""agg --store's bytes: write-ahead frames and sealed segments, values in and out."""

from __future__ import annotations

import numpy as np
import pytest

from polyfan.bars import segments
from polyfan.wire import codec


def some_bars(count: int, seed: int = 1) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    names = ["A", "AAPL", "BRK.A", "T"]
    name = rng.integers(0, len(names), count)
    interval = rng.choice([100, 1000], count)
    bars = np.zeros(count, dtype=codec.BAR_DTYPE)
    bars["s"] = np.arange(count) * 100 + 1_700_000_000_000
    bars["o"] = np.round(rng.uniform(10, 11, count), 2)
    bars["h"], bars["l"], bars["c"] = bars["o"] + 0.01, bars["o"] - 0.02, bars["o"]
    bars["v"] = rng.choice([1.0, 100.0, 0.5], count)
    bars["vw"] = bars["o"] + rng.normal(0, 1e-3, count)
    bars["n"] = rng.integers(1, 5, count)
    bars["flags"] = rng.integers(0, 2, count)
    bars["vw"][::7] = np.nan
    return names, name, interval, bars


@pytest.mark.parametrize("jit", [True, False])
def test_a_segment_gives_back_every_series_bit_for_bit_with_bounds_and_limits(jit: bool) -> None:
    names, name, interval, bars = some_bars(3_000)
    data = segments.encode_segment(names, name, interval, bars, 99, per_record=16, jit=jit)
    segment = segments.Segment(np.frombuffer(data, dtype=np.uint8), jit=jit)
    assert (segment.bars, segment.clock) == (3_000, 99)
    for k, symbol in enumerate(names):
        for step in (100, 1000):
            want = bars[(name == k) & (interval == step)]
            assert segment.select(symbol, step).tobytes() == want.tobytes()
            lo, hi = int(want["s"][20]), int(want["s"][200])
            got = segment.select(symbol, step, since=lo, before=hi, limit=37)
            assert got.tobytes() == want[163:200].tobytes()
    assert len(segment.select("AAP", 100)) == 0
    assert len(segment.select("AAPL", 250)) == 0


def test_a_start_held_twice_keeps_its_first_copy() -> None:
    names, name, interval, bars = some_bars(10)
    twice = np.concatenate([bars, bars[:3]])
    twice["o"][10:] = 99.0
    data = segments.encode_segment(
        names, np.concatenate([name, name[:3]]), np.concatenate([interval, interval[:3]]), twice, 1
    )
    segment = segments.Segment(np.frombuffer(data, dtype=np.uint8))
    assert segment.bars == 10
    assert not (segment.all_bars()[3]["o"] == 99.0).any()


def test_a_log_is_read_up_to_its_first_cut_or_damaged_frame() -> None:
    names, name, interval, bars = some_bars(30)
    one = segments.encode_frame(5, names, name[:10], interval[:10], bars[:10])
    two = segments.encode_frame(6, [], name[10:], interval[10:], bars[10:])
    whole = segments.decode_log(one + two)
    assert (whole.frames, whole.clock, whole.problem) == (2, 6, None)
    assert whole.bars.tobytes() == bars.tobytes()
    assert whole.names == names
    cut = segments.decode_log(one + two[:-5])
    assert (cut.frames, cut.clock, cut.whole) == (1, 5, len(one))
    assert cut.problem is not None and "cut short" in cut.problem
    damaged = bytearray(one + two)
    damaged[len(one) + 40] ^= 0xFF
    bad = segments.decode_log(bytes(damaged))
    assert (bad.frames, bad.whole) == (1, len(one))
    assert bad.problem is not None and "checksum" in bad.problem


def test_a_segment_whose_tables_fail_their_checksum_is_refused() -> None:
    names, name, interval, bars = some_bars(50)
    data = bytearray(segments.encode_segment(names, name, interval, bars, 1))
    data[-segments.SEGMENT_FOOTER.size - 3] ^= 1
    with pytest.raises(segments.SegmentError, match="checksum"):
        segments.Segment(np.frombuffer(bytes(data), dtype=np.uint8))
