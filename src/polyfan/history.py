"""Bars kept per series (one symbol at one interval) for late joiners and history requests.

Memory follows the bars actually made. All series share one arena of BAR records; a series
has no storage until its first bar, then a region of 4, 6, 9, 13 ... bars that moves to the next
size when full (the old region goes on a free list for reuse) or is compacted in place once its
head has been trimmed. So a symbol that trades twice an hour holds a region of 4 bars, not an
hour of slots. The arena reserves address space up front (``np.empty``: pages count as
resident only once a region is written), so it rarely has to grow; nothing is ever compacted
globally, so no call copies more than one series' bars.

Bars older than the retention (measured on the feed clock) are trimmed when their series is
appended to, and a sweep visits a bounded number of series per ``trim`` so quiet symbols are
trimmed too. Lookups by bar start are binary searches over a series' contiguous region:
O(log n). Appending a batch of closed bars is one kernel call (:mod:`polyfan.kernels`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from polyfan import kernels, wire

_INT64_MIN = int(np.iinfo(np.int64).min)
_WORDS = wire.BAR_DTYPE.itemsize // 8
_EMPTY = np.zeros(0, dtype=wire.BAR_DTYPE)
RESERVE_ROWS = 1 << 25  # 2 GiB of address space; resident only as regions are written


class History:
    """The last ``keep_ms`` of bars (by bar start, against the feed clock) of every series."""

    def __init__(
        self, keep_ms: int, *, sweep: int = 512, rows: int | None = None, jit: bool = True
    ) -> None:
        self.keep_ms = keep_ms
        self._sweep = sweep
        self._next_sweep = 0
        self._cutoff = _INT64_MIN
        self._append: Callable[..., Any] = kernels.chosen(kernels.history_append, jit)
        self._trim: Callable[..., Any] = kernels.chosen(kernels.history_trim, jit)
        self._off = np.full(0, -1, dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)
        self._end = np.zeros(0, dtype=np.int64)
        self._cap = np.zeros(0, dtype=np.int64)
        self._free = np.full(kernels.N_CLASSES, -1, dtype=np.int64)
        self._arena = _reserve(RESERVE_ROWS if rows is None else rows)
        self._state = np.zeros(kernels.N_HISTORY, dtype=np.int64)

    def _ensure_series(self, count: int) -> None:
        have = len(self._off)
        if count <= have:
            return
        size = max(count, 2 * have, 64)
        self._off = np.concatenate([self._off, np.full(size - have, -1, dtype=np.int64)])
        for name in ("_start", "_end", "_cap"):
            array = getattr(self, name)
            setattr(self, name, np.concatenate([array, np.zeros(size - have, dtype=np.int64)]))

    def _make_room(self, rows: int) -> None:
        """At least ``rows`` more rows above the top: a bigger arena, the used rows copied."""
        top = int(self._state[kernels.H_TOP])
        size = len(self._arena)
        grown = _reserve(max(size + size // 2, top + rows))
        grown[:top] = self._arena[:top]
        self._arena = grown

    # --- in -----------------------------------------------------------------------------

    def add_closed(self, series: np.ndarray, bars: np.ndarray) -> None:
        """Append a batch of closed bars, sorted by series then start (as ``Bars`` returns them)."""
        if len(series) == 0:
            return
        self._ensure_series(int(series.max()) + 1)
        words = np.ascontiguousarray(bars, dtype=wire.BAR_DTYPE).view(np.int64)
        words = words.reshape(len(bars), _WORDS)
        row = 0
        while True:
            row = self._append(
                series,
                words,
                row,
                self._cutoff,
                self._off,
                self._start,
                self._end,
                self._cap,
                self._free,
                self._arena,
                self._state,
            )
            if row < 0:
                return
            self._make_room(4 * (len(series) - row) + 2 * int(self._cap.max()))

    def add(self, series: int, bars: np.ndarray) -> None:
        """Append one series' newly closed bars (oldest first, after what it holds)."""
        self.add_closed(np.full(len(bars), series, dtype=np.int64), bars)

    def trim(self, clock: int) -> None:
        """Set the retention cutoff from the feed clock and sweep a few series."""
        self._cutoff = clock - self.keep_ms
        if len(self._off) and self._sweep:
            self._next_sweep = self._trim(
                self._cutoff,
                self._next_sweep,
                self._sweep,
                self._off,
                self._start,
                self._end,
                self._cap,
                self._free,
                self._arena,
                self._state,
            )

    # --- out ----------------------------------------------------------------------------

    def select(
        self,
        series: int,
        since: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Held bars with ``s >= since`` and ``s < before``; the newest ``limit`` of them, oldest first."""
        if series >= len(self._off) or self._off[series] < 0:
            return _EMPTY
        off = int(self._off[series])
        lo, hi = off + int(self._start[series]), off + int(self._end[series])
        if since is not None:
            lo = kernels.lower_bound(self._arena, lo, hi, since)
        if before is not None:
            hi = kernels.lower_bound(self._arena, lo, hi, before)
        if limit is not None:
            lo = max(lo, hi - limit)
        if hi <= lo:
            return _EMPTY
        return self._arena[lo:hi].copy().view(wire.BAR_DTYPE).reshape(hi - lo)

    @property
    def bar_count(self) -> int:
        held = self._off >= 0
        return int((self._end[held] - self._start[held]).sum())

    @property
    def nbytes(self) -> int:
        """Bytes in use: arena rows below the top (regions and free lists) and the index."""
        return int(self._state[kernels.H_TOP]) * wire.BAR_DTYPE.itemsize + 4 * self._off.nbytes

    @property
    def rows(self) -> tuple[int, int, int]:
        """Arena rows: allocated, below the top (in regions or free lists), on free lists."""
        return len(self._arena), int(self._state[kernels.H_TOP]), self.free_rows

    @property
    def free_rows(self) -> int:
        """Arena rows on the free lists, waiting for reuse."""
        return int(self._state[kernels.H_FREE_ROWS])

    def __len__(self) -> int:
        """Series with bars."""
        return int((self._off >= 0).sum())


def _reserve(rows: int) -> np.ndarray:
    """An arena of ``rows`` rows, uninitialised (untouched pages take no memory)."""
    try:
        return np.empty((rows, _WORDS), dtype=np.int64)
    except MemoryError:
        if rows <= 4096:
            raise
        return np.empty((4096, _WORDS), dtype=np.int64)
