"""Bars kept per series (one symbol at one interval) for late joiners and history requests.

Memory follows the bars actually made: a series has no storage until its first bar, then one
BAR_DTYPE array grown by doubling (and compacted in place when its head has been trimmed), so
a symbol that trades twice an hour holds two bars, not an hour of slots. Bars older than the
retention (measured on the feed clock) are trimmed when a series is appended to, and a sweep
visits a bounded number of idle series per call so quiet symbols are trimmed too. Lookups by
bar start are binary searches: O(log n).
"""

from __future__ import annotations

import bisect

import numpy as np

from polyfan import wire

_FIRST_CAPACITY = 4


class _Series:
    __slots__ = ("bars", "end", "start")

    def __init__(self) -> None:
        self.bars = np.empty(_FIRST_CAPACITY, dtype=wire.BAR_DTYPE)
        self.start = 0
        self.end = 0

    def append(self, bars: np.ndarray) -> None:
        count = len(bars)
        if self.end + count > len(self.bars):
            held = self.end - self.start
            capacity = len(self.bars)
            if held + count > capacity * 3 // 4:
                grown = np.empty(max(2 * capacity, held + count), dtype=wire.BAR_DTYPE)
                grown[:held] = self.bars[self.start : self.end]
                self.bars = grown
            else:
                self.bars[:held] = self.bars[self.start : self.end]
            self.start, self.end = 0, held
        self.bars[self.end : self.end + count] = bars
        self.end += count

    def trim(self, cutoff: int) -> None:
        """Drop bars with ``s < cutoff``."""
        if self.start < self.end and self.bars[self.start]["s"] < cutoff:
            self.start = self._index(cutoff)
            if self.start == self.end:
                self.start = self.end = 0

    def _index(self, s: int) -> int:
        """Index of the first held bar with start >= ``s``."""
        return bisect.bisect_left(self.bars["s"], s, self.start, self.end)

    def select(self, since: int | None, before: int | None, limit: int | None) -> np.ndarray:
        lo = self.start if since is None else self._index(since)
        hi = self.end if before is None else self._index(before)
        if limit is not None:
            lo = max(lo, hi - limit)
        return self.bars[lo:hi].copy() if hi > lo else _EMPTY

    def __len__(self) -> int:
        return self.end - self.start


_EMPTY = np.zeros(0, dtype=wire.BAR_DTYPE)


class History:
    """The last ``keep_ms`` of bars (by bar start, against the feed clock) of every series."""

    def __init__(self, keep_ms: int, *, sweep: int = 256) -> None:
        self.keep_ms = keep_ms
        self._series: dict[int, _Series] = {}
        self._sweep = sweep
        self._sweep_keys: list[int] = []
        self._cutoff: int | None = None

    def add(self, series: int, bars: np.ndarray) -> None:
        """Append one series' newly closed bars (oldest first, after what it holds)."""
        store = self._series.get(series)
        if store is None:
            store = self._series[series] = _Series()
        if self._cutoff is not None:
            store.trim(self._cutoff)
        store.append(bars)

    def select(
        self,
        series: int,
        since: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Held bars with ``s >= since`` and ``s < before``; the newest ``limit`` of them, oldest first."""
        store = self._series.get(series)
        if store is None:
            return _EMPTY
        return store.select(since, before, limit)

    def trim(self, clock: int) -> None:
        """Set the retention cutoff from the feed clock and sweep a few series."""
        self._cutoff = clock - self.keep_ms
        if not self._sweep_keys:
            self._sweep_keys = list(self._series)
        for _ in range(min(self._sweep, len(self._sweep_keys))):
            key = self._sweep_keys.pop()
            store = self._series.get(key)
            if store is not None:
                store.trim(self._cutoff)
                if len(store) == 0:
                    del self._series[key]

    @property
    def bar_count(self) -> int:
        return sum(len(store) for store in self._series.values())

    @property
    def nbytes(self) -> int:
        return sum(store.bars.nbytes for store in self._series.values())

    def __len__(self) -> int:
        """Series with bars."""
        return len(self._series)
