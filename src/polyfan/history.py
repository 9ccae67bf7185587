"""Bars kept per series (one symbol at one interval) for late joiners and history requests.

Memory follows the bars actually made, in two tiers (docs/architecture.md, "Bars"):

- Recent bars: one arena of BAR records shared by all series. A series has no storage until
  its first bar, then a region of 4, 6, 9, 13 ... rows that moves to the next size when full
  (the old region goes on a free list for reuse) or is compacted in place once its head has
  been packed or trimmed. The arena reserves address space up front (``np.empty``: pages
  count as resident only once written). Appending a batch of closed bars is one kernel call
  (:mod:`polyfan.kernels`); lookups are binary searches over the region.
- Older bars: packed 16 at a time into losslessly compressed blocks (``_ColdSeries``), found
  by bisecting the blocks' first/last bar starts; only the blocks a lookup needs are
  decompressed.

``trim`` (every 100 ms in the agg) sweeps a bounded number of series: drops what is older
than the retention (measured on the feed clock) and packs whole blocks of recent bars, a
bounded number per call and only while nothing else is waiting. Nothing is ever compacted
globally, so no call copies more than one series' bars.
"""

from __future__ import annotations

import bisect
import zlib
from array import array
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from polyfan import kernels, wire

_INT64_MIN = int(np.iinfo(np.int64).min)
_WORDS = wire.BAR_DTYPE.itemsize // 8
_EMPTY = np.zeros(0, dtype=wire.BAR_DTYPE)
RESERVE_ROWS = 1 << 25  # 2 GiB of address space; resident only as regions are written
BLOCK = 16  # bars per compressed block
_BLOCK_OVERHEAD = 3 * 8  # three array entries per block
_PRICE_COLUMNS = ("o", "h", "l", "c")  # words 1 to 4 of a BAR record
_TICKS = 10_000.0  # prices that are whole 1e-4 ticks are stored as integer tick deltas


class _ColdSeries:
    """A series' older bars: blocks of ``BLOCK`` bars, each compressed losslessly: bar starts
    as deltas; when every price of the block is a whole number of 1e-4 ticks (a flag byte
    says so), o as tick deltas from bar to bar and h/l/c as tick offsets from the bar's o;
    ``vw`` dropped where it equals ``c`` bit for bit (a bitmap says where); the records'
    bytes transposed so equal bytes of neighbouring bars sit together; zlib.

    Blocks are concatenated in one bytearray with integer arrays beside it, so a series is a
    handful of objects the garbage collector never has to walk, however many blocks it has.
    """

    __slots__ = ("count", "data", "ends", "first", "last")

    def __init__(self, count: int) -> None:
        self.count = count  # bars per block
        self.data = bytearray()
        self.ends = array("q")  # end offset of each block in data
        self.first = array("q")  # bar start of each block's first bar
        self.last = array("q")  # ... and last bar

    def __len__(self) -> int:
        return len(self.ends)

    def append(self, bars: np.ndarray) -> int:
        words = bars.copy().view(np.int64).reshape(len(bars), _WORDS)
        words[1:, 0] = np.diff(words[:, 0])  # bar starts as deltas
        scaled = [np.round(bars[column] * _TICKS) for column in _PRICE_COLUMNS]
        exact = all(
            (np.abs(x) < 2**53).all() and (x / _TICKS == bars[c]).all()
            for x, c in zip(scaled, _PRICE_COLUMNS, strict=True)
        )
        if exact:
            # Whole 1e-4 ticks: o as deltas from the previous bar's o, h/l/c as offsets
            # from the bar's own o (all zero for a one-price bar).
            o = scaled[0].astype(np.int64)
            words[:, 1] = o
            words[1:, 1] = np.diff(o)
            for k in (1, 2, 3):
                words[:, 1 + k] = scaled[k].astype(np.int64) - o
        same = bars["vw"].view(np.int64) == bars["c"].view(np.int64)
        words[same, 6] = 0  # vw equal to c (bit for bit): kept as one bit
        flags = bytes((1 if exact else 0,)) + np.packbits(same).tobytes()
        shuffled = words.view(np.uint8).reshape(len(bars), -1).T.tobytes()
        blob = flags + zlib.compress(shuffled, 1)
        self.data += blob
        self.ends.append(len(self.data))
        self.first.append(int(bars["s"][0]))
        self.last.append(int(bars["s"][-1]))
        return len(blob)

    def block(self, b: int) -> np.ndarray:
        begin = self.ends[b - 1] if b else 0
        exact = self.data[begin]
        same_bytes = (self.count + 7) // 8
        same = np.unpackbits(
            np.frombuffer(self.data, np.uint8, same_bytes, begin + 1), count=self.count
        ).astype(bool)
        packed = self.data[begin + 1 + same_bytes : self.ends[b]]
        raw = np.frombuffer(zlib.decompress(packed), np.uint8)
        words = raw.reshape(wire.BAR_DTYPE.itemsize, -1).T.copy().view(np.int64)
        words[:, 0] = np.cumsum(words[:, 0])
        bars = words.view(wire.BAR_DTYPE).reshape(len(words))
        if exact:
            o = np.cumsum(words[:, 1])
            offsets = words[:, 2:5].copy()
            bars["o"] = o / _TICKS
            for k, column in enumerate(_PRICE_COLUMNS[1:]):
                bars[column] = (o + offsets[:, k]) / _TICKS
        bars["vw"][same] = bars["c"][same]
        return bars

    def newest_first(self, since: int | None, before: int | None) -> Iterator[np.ndarray]:
        """The bars of the blocks that can hold ``since <= s < before``, newest block first."""
        lo = 0 if since is None else bisect.bisect_left(self.last, since)
        hi = len(self.first) if before is None else bisect.bisect_left(self.first, before)
        for b in range(hi - 1, lo - 1, -1):
            bars = self.block(b)
            if since is not None and bars["s"][0] < since:
                bars = bars[bars["s"] >= since]
            if before is not None and bars["s"][-1] >= before:
                bars = bars[bars["s"] < before]
            yield bars

    def trim(self, cutoff: int) -> int:
        """Drop the blocks whose bars all start before ``cutoff``; return the bytes freed."""
        drop = bisect.bisect_left(self.last, cutoff)
        if drop == 0:
            return 0
        freed = self.ends[drop - 1]
        del self.data[:freed]
        self.ends = array("q", [end - freed for end in self.ends[drop:]])
        del self.first[:drop], self.last[:drop]
        return freed


class History:
    """The last ``keep_ms`` of bars (by bar start, against the feed clock) of every series."""

    def __init__(
        self,
        keep_ms: int,
        *,
        sweep: int = 512,
        rows: int | None = None,
        block: int = BLOCK,
        pack_budget: int = 96,
        jit: bool = True,
    ) -> None:
        self.keep_ms = keep_ms
        self.block = block
        self._pack_budget = pack_budget  # blocks compressed per trim call at most
        self._pending: deque[int] = deque()  # series with whole blocks to pack, oldest first
        self._pending_set: set[int] = set()
        self._cold: dict[int, _ColdSeries] = {}
        self._cold_bytes = 0
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

    def _regions(self) -> tuple[np.ndarray, ...]:
        """The arrays the history kernels work on besides the arena (kernels.py, "history")."""
        return self._off, self._start, self._end, self._cap, self._free, self._state

    def _make_room(self, rows: int) -> None:
        """At least ``rows`` more rows above the top: a bigger arena, the used rows copied."""
        top = int(self._state[kernels.H_TOP])
        size = len(self._arena)
        grown = _reserve(max(size + size // 2, top + rows))
        grown[:top] = self._arena[:top]
        self._arena = grown

    # --- in -----------------------------------------------------------------------------

    def add_closed(self, series: np.ndarray, bars: np.ndarray) -> None:
        """Append a batch of closed bars, each series' adjacent and oldest first (as ``Bars``
        returns them)."""
        if len(series) == 0:
            return
        self._ensure_series(int(series.max()) + 1)
        words = np.ascontiguousarray(bars, dtype=wire.BAR_DTYPE).view(np.int64)
        words = words.reshape(len(bars), _WORDS)
        row = 0
        while True:
            row = self._append(series, words, row, self._cutoff, self._regions(), self._arena)
            if row < 0:
                return
            self._make_room(4 * (len(series) - row) + 2 * int(self._cap.max()))

    def add(self, series: int, bars: np.ndarray) -> None:
        """Append one series' newly closed bars (oldest first, after what it holds)."""
        self.add_closed(np.full(len(bars), series, dtype=np.int64), bars)

    def trim(self, clock: int, busy: Callable[[], bool] | None = None) -> None:
        """Set the retention cutoff from the feed clock and sweep a few series: trim them, and
        pack their bars into compressed blocks, all but the newest ``len % block``.

        Packing does at most ``pack_budget`` blocks, and stops early as soon as ``busy()`` says
        there is other work waiting (the agg passes "a message is waiting on the SUB").
        """
        self._cutoff = clock - self.keep_ms
        if not len(self._off) or not self._sweep:
            return
        first = self._next_sweep
        self._next_sweep = self._trim(
            self._cutoff, first, self._sweep, self._regions(), self._arena
        )
        swept = (first + np.arange(min(self._sweep, len(self._off)))) % len(self._off)
        held = self._end[swept] - self._start[swept]
        for key in swept[(self._off[swept] >= 0) & (held >= self.block)].tolist():
            if key not in self._pending_set:
                self._pending_set.add(key)
                self._pending.append(key)
        budget = self._pack_budget  # bounded work per call: the rest waits in the queue
        while budget > 0 and self._pending and not (busy is not None and busy()):
            key = self._pending[0]
            if self._off[key] >= 0 and self._end[key] - self._start[key] >= self.block:
                budget -= self._freeze(key, min(budget, 4))  # then ask busy() again
                continue
            self._pending.popleft()
            self._pending_set.discard(key)
        if self._cold:
            for key in swept.tolist():
                cold = self._cold.get(key)
                if cold is not None:
                    self._cold_bytes -= cold.trim(self._cutoff)
                    if not len(cold):
                        del self._cold[key]

    def _freeze(self, key: int, budget: int) -> int:
        """Move the series' oldest hot bars, up to ``budget`` whole blocks of them, into
        compressed blocks; return how many blocks."""
        off, start, end = int(self._off[key]), int(self._start[key]), int(self._end[key])
        blocks = min(budget, (end - start) // self.block)
        rows = self._arena[off + start : off + start + blocks * self.block]
        bars = rows.copy().view(wire.BAR_DTYPE).reshape(len(rows))
        cold = self._cold.get(key)
        if cold is None:
            cold = self._cold[key] = _ColdSeries(self.block)
        for b in range(blocks):
            self._cold_bytes += cold.append(bars[b * self.block : (b + 1) * self.block])
        self._start[key] = start + blocks * self.block
        return blocks

    # --- out ----------------------------------------------------------------------------

    def select(
        self,
        series: int,
        since: int | None = None,
        before: int | None = None,
        limit: int | None = None,
    ) -> np.ndarray:
        """Held bars with ``s >= since`` and ``s < before``; the newest ``limit`` of them, oldest first.

        Bars older than the retention cutoff are never returned, trimmed yet or not, so what
        comes back is always a gap-free run of a series' bars.
        """
        if self._cutoff != _INT64_MIN:
            since = self._cutoff if since is None else max(since, self._cutoff)
        hot = self._select_hot(series, since, before)
        cold = self._cold.get(series)
        if cold is None or (limit is not None and len(hot) >= limit):
            return hot if limit is None else hot[max(0, len(hot) - limit) :]
        parts = [hot]
        wanted = None if limit is None else limit - len(hot)
        for bars in cold.newest_first(since, before):
            parts.append(bars)
            if wanted is not None:
                wanted -= len(bars)
                if wanted <= 0:
                    break
        found = np.concatenate(parts[::-1]) if len(parts) > 1 else hot
        return found if limit is None else found[max(0, len(found) - limit) :]

    def _select_hot(self, series: int, since: int | None, before: int | None) -> np.ndarray:
        if series >= len(self._off) or self._off[series] < 0:
            return _EMPTY
        off = int(self._off[series])
        lo, hi = off + int(self._start[series]), off + int(self._end[series])
        if since is not None:
            lo = kernels.lower_bound(self._arena, lo, hi, since)
        if before is not None:
            hi = kernels.lower_bound(self._arena, lo, hi, before)
        if hi <= lo:
            return _EMPTY
        return self._arena[lo:hi].copy().view(wire.BAR_DTYPE).reshape(hi - lo)

    @property
    def bar_count(self) -> int:
        held = self._off >= 0
        hot = int((self._end[held] - self._start[held]).sum())
        return hot + self.block * sum(len(cold) for cold in self._cold.values())

    @property
    def nbytes(self) -> int:
        """Bytes in use: arena rows below the top (regions and free lists), the index, and the
        compressed blocks (with an estimate of their Python object overhead)."""
        hot = int(self._state[kernels.H_TOP]) * wire.BAR_DTYPE.itemsize + 4 * self._off.nbytes
        blocks = sum(len(cold) for cold in self._cold.values())
        return hot + self._cold_bytes + blocks * _BLOCK_OVERHEAD + len(self._cold) * 400

    @property
    def cold_bytes(self) -> int:
        """Bytes of compressed blocks."""
        return self._cold_bytes

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
        hot = set(np.flatnonzero(self._off >= 0).tolist())
        return len(hot | set(self._cold))


def _reserve(rows: int) -> np.ndarray:
    """An arena of ``rows`` rows, uninitialised (untouched pages take no memory)."""
    try:
        return np.empty((rows, _WORDS), dtype=np.int64)
    except MemoryError:
        if rows <= 4096:
            raise
        return np.empty((4096, _WORDS), dtype=np.int64)
