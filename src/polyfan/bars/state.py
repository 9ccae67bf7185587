"""The bar state around the kernels: trades in (``add_trades``), closed bars out (``closed_bars``).

A *series* is one symbol at one interval: ``series = symbol_id * len(intervals) + k``. Symbol
ids are small integers the caller assigns (0, 1, 2 ... in order of first sight); the state grows
as they appear, so a symbol that never trades costs nothing.

Semantics are CONTRACT.md section 3. Choices the contract leaves open:

- The feed clock the caller passes for each trade is the clock at the trade's arrival; the
  caller keeps it monotonic (the largest CLOCK seen), so a bar published once can never reopen.
- A late trade is counted once per interval it is late for (a trade late for the 100 ms and
  250 ms bars but on time for the 1 min bar counts 2). Trades that qualify for nothing (e.g.
  code 15 alone) are never applied and never counted late.
- ``unknown_conditions`` counts trades that carry at least one unknown code, once per trade
  (whether or not another code stops the trade from qualifying for anything).
- Outage windows ``[lo, hi]`` on the feed clock come from :mod:`polyfan.bars.outages`; a bar open
  when one began (``e + grace > lo``) or starting inside it (``s <= hi``) gets
  ``BAR_FLAG_OUTAGE``. An open window is open-ended.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from polyfan.bars import kernels
from polyfan.jit import chosen
from polyfan.wire import codec

_INT64_MAX = int(np.iinfo(np.int64).max)


class Bars:
    """Open bars of every series, and the closing of them on the feed clock."""

    def __init__(
        self,
        intervals_ms: tuple[int, ...],
        grace_ms: int,
        rules: np.ndarray,
        *,
        jit: bool = True,
        pool_size: int = 1024,
        symbols: int = 64,
    ) -> None:
        if not intervals_ms or min(intervals_ms) <= 0:
            raise ValueError("intervals must be positive")
        self.intervals = np.asarray(intervals_ms, dtype=np.int64)
        self.grace = int(grace_ms)
        self.rules = np.ascontiguousarray(rules, dtype=np.uint8)
        self._apply: Callable[..., Any] = chosen(kernels.apply_trades, jit)
        self._close: Callable[..., Any] = chosen(kernels.close_bars, jit)
        n_series = max(1, symbols) * len(self.intervals)
        self.head = np.full(n_series, -1, dtype=np.int64)
        self.prev_close = np.zeros(n_series, dtype=np.float64)
        self.has_prev = np.zeros(n_series, dtype=np.uint8)
        self.pool_i = np.full((pool_size, kernels.SLOT_WORDS), -1, dtype=np.int64)
        self.pool_f = self.pool_i.view(np.float64)  # the same rows, read as floats
        self.free = np.arange(pool_size - 1, -1, -1, dtype=np.int64)
        self.slot_close = np.full(pool_size, _INT64_MAX, dtype=np.int64)
        self.meta = np.zeros(kernels.N_META, dtype=np.int64)
        self.meta[kernels.M_FREE_TOP] = pool_size
        self.meta[kernels.M_MIN_CLOSE] = _INT64_MAX
        self.counters = np.zeros(kernels.N_COUNTERS, dtype=np.int64)
        self._outage_lo = np.zeros(0, dtype=np.int64)
        self._outage_hi = np.zeros(0, dtype=np.int64)

    @property
    def pool(self) -> tuple[np.ndarray, ...]:
        """The open-bar pool as the kernels take it: ``(head, pool_i, pool_f, free,
        slot_close, meta, counters)`` (a new tuple each time: the pool grows)."""
        return (
            self.head, self.pool_i, self.pool_f, self.free, self.slot_close, self.meta,
            self.counters,
        )  # fmt: skip

    # --- sizes and counters -------------------------------------------------------------

    @property
    def late_trades(self) -> int:
        return int(self.counters[kernels.C_LATE])

    @property
    def unknown_conditions(self) -> int:
        return int(self.counters[kernels.C_UNKNOWN])

    @property
    def open_bars(self) -> int:
        return int(self.meta[kernels.M_OPEN])

    @property
    def next_close(self) -> int:
        """The feed clock at which the earliest open bar closes (int64 max when none is open)."""
        return int(self.meta[kernels.M_MIN_CLOSE])

    def keep_room(self) -> bool:
        """Grow the slot pool now if under a quarter of it is free, so that a batch (at a busy
        boundary, say) rarely has to stop and copy it; True if it grew."""
        if int(self.meta[kernels.M_FREE_TOP]) >= len(self.pool_i) // 4:
            return False
        self._grow_pool()
        return True

    def ensure_symbols(self, count: int) -> None:
        """Make room for symbol ids ``0 .. count - 1``."""
        need = count * len(self.intervals)
        have = len(self.head)
        if need <= have:
            return
        size = max(need, 2 * have)
        self.head = _grown(self.head, size, -1)
        self.prev_close = _grown(self.prev_close, size, 0.0)
        self.has_prev = _grown(self.has_prev, size, 0)

    def _grow_pool(self) -> None:
        size = len(self.pool_i)
        self.pool_i = np.concatenate([self.pool_i, np.full_like(self.pool_i, -1)])
        self.pool_f = self.pool_i.view(np.float64)
        self.slot_close = np.concatenate(
            [self.slot_close, np.full(size, _INT64_MAX, dtype=np.int64)]
        )
        top = int(self.meta[kernels.M_FREE_TOP])
        self.free = np.concatenate(
            [np.arange(2 * size - 1, size - 1, -1, dtype=np.int64), self.free[:top]]
        )
        self.free = np.concatenate([self.free, np.zeros(2 * size - len(self.free), np.int64)])
        self.meta[kernels.M_FREE_TOP] = top + size

    # --- feed in ------------------------------------------------------------------------

    def add_trades(self, trades: np.ndarray, symbols: np.ndarray, clocks: np.ndarray) -> None:
        """Apply a batch of TRADE records in arrival order.

        ``symbols[i]`` is trade i's symbol id and ``clocks[i]`` the feed clock at its arrival.
        """
        if len(trades) == 0:
            return
        self.ensure_symbols(int(symbols.max()) + 1)
        columns = (
            trades["t"],
            trades["p"],
            trades["s"],
            trades["nc"],
            trades["c"],
            symbols,
            clocks,
        )
        position = 0
        while True:
            position = self._apply(
                columns, position, self.intervals, self.grace, self.rules, self.pool
            )
            if position < 0:
                return
            self._grow_pool()

    # --- outages ------------------------------------------------------------------------

    def set_outages(self, windows: list[tuple[int, int | None]]) -> None:
        """The outage windows ``[lo, hi]`` on the feed clock (``hi`` None while open). A bar
        still open at ``lo`` (``e + grace > lo``: a trade arriving then could still be
        applied to it) or starting by ``hi`` is marked."""
        self._outage_lo = np.array([lo - self.grace for lo, _ in windows], dtype=np.int64)
        self._outage_hi = np.array(
            [_INT64_MAX if hi is None else max(hi, lo) for lo, hi in windows], dtype=np.int64
        )

    def outages_needed_after(self, clock: int) -> int:
        """Windows ending before this clock can no longer touch a bar still to close: every
        such bar has ``s > clock - grace - the longest interval``."""
        return clock - self.grace - int(self.intervals.max())

    # --- bars out -----------------------------------------------------------------------

    def closed_bars(self, clock: int) -> tuple[np.ndarray, np.ndarray]:
        """Close every bar with ``e + grace <= clock``: ``(series ids, BAR records)``.

        Sorted by interval, symbol, then bar start: each topic's bars are adjacent and oldest
        first, and the shortest interval's bars come first.
        """
        if clock < self.meta[kernels.M_MIN_CLOSE]:
            return _NO_SERIES, _NO_BARS
        room = self.open_bars
        series = np.empty(room, dtype=np.int64)
        bars = np.empty(room, dtype=codec.BAR_DTYPE)
        count = self._close(
            np.int64(clock),
            self.intervals,
            self.pool,
            (self.prev_close, self.has_prev),
            (self._outage_lo, self._outage_hi),
            (series, bars["s"], bars["o"], bars["h"], bars["l"], bars["c"], bars["v"],
             bars["vw"], bars["n"], bars["flags"]),
        )  # fmt: skip
        return series[:count], bars[:count]

    def series_id(self, symbol_id: int, interval_ms: int) -> int:
        k = int(np.flatnonzero(self.intervals == interval_ms)[0])
        return symbol_id * len(self.intervals) + k


_NO_SERIES = np.zeros(0, dtype=np.int64)
_NO_BARS = np.zeros(0, dtype=codec.BAR_DTYPE)


def _grown(array: np.ndarray, size: int, fill: Any) -> np.ndarray:
    grown = np.full(size, fill, dtype=array.dtype)
    grown[: len(array)] = array
    return grown
