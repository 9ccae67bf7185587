"""Bars kept per series: append, trim by age, since/before/limit lookups, memory."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from polyfan import wire
from polyfan.history import History


def bars(starts: list[int]) -> np.ndarray:
    records = np.zeros(len(starts), dtype=wire.BAR_DTYPE)
    records["s"] = starts
    records["c"] = np.arange(len(starts), dtype=np.float64)
    return records


@given(
    chunks=st.lists(st.integers(1, 20), min_size=1, max_size=30),
    since=st.none() | st.integers(-50, 3_000),
    before=st.none() | st.integers(-50, 3_000),
    limit=st.none() | st.integers(0, 50),
)
def test_select_matches_a_plain_filter(
    chunks: list[int], since: int | None, before: int | None, limit: int | None
) -> None:
    history = History(keep_ms=10**9)
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
    assert history.nbytes <= 1_000 * 4 * wire.BAR_DTYPE.itemsize
    busy = History(keep_ms=3_600_000)
    for s in range(10_000):
        busy.add(0, bars([s]))
    assert busy.nbytes <= 2 * 10_000 * wire.BAR_DTYPE.itemsize


def test_a_trimmed_series_reuses_its_storage_instead_of_growing() -> None:
    history = History(keep_ms=100, sweep=0)
    for s in range(0, 100_000, 10):
        history.add(0, bars([s]))
        history.trim(clock=s)
    assert history.nbytes <= 64 * wire.BAR_DTYPE.itemsize
    held = history.select(0)["s"].tolist()
    # at least the last 100 ms (cutoff 99_890); trimming on append may lag one bar behind
    assert held[-11:] == list(range(99_890, 100_000, 10))
    assert len(held) <= 12
