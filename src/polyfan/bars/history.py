"""Bars kept per series (one symbol at one interval) for late joiners and history requests.

Memory follows the bars actually made, in two tiers (docs/architecture.md, "Bars"):

- Recent bars: one arena of BAR records shared by all series. A series has no storage until
  its first bar, then a region of 4, 6, 9, 13 ... rows that moves to the next size when full
  (the old region goes on a free list for reuse) or is compacted in place once its head has
  been packed or trimmed. The arena reserves address space up front (``np.empty``: pages
  count as resident only once written). Appending a batch of closed bars is one kernel call
  (:mod:`polyfan.bars.arena`); lookups are binary searches over the region.
- Older bars: packed ``block`` at a time into records of a lossless field-aware codec, written
  to a log of fixed-size segments that are freed whole once every bar in them is past the
  retention (:mod:`polyfan.bars.barcodec`). A one-trade bar takes 4 to 6 bytes there instead of 64.
  A lookup follows the series' chain of records newest first and decodes only the records it
  needs.

``trim`` (every 100 ms in the agg) sweeps a bounded number of series: drops what is older
than the retention (measured on the feed clock), frees the log segments past it, and packs
whole blocks of recent bars, a bounded number per call, leaving it to a later call while
something else is waiting (9 calls in a row at most). Nothing is ever compacted globally, so
no call copies more than one series' bars.
"""

from __future__ import annotations

import mmap
from collections.abc import Callable
from typing import Any

import numpy as np

from polyfan.bars import arena, barcodec
from polyfan.jit import chosen
from polyfan.wire import codec

_INT64_MIN = int(np.iinfo(np.int64).min)
_INT64_MAX = int(np.iinfo(np.int64).max)
_WORDS = codec.BAR_DTYPE.itemsize // 8
_EMPTY = np.zeros(0, dtype=codec.BAR_DTYPE)
RESERVE_ROWS = 1 << 25  # 2 GiB of address space; resident only as regions are written
BLOCK = 8  # bars per packed record
SEGMENT_BYTES = 1 << 20  # the log's unit of allocation and of freeing
RESERVE_SEGMENTS = 2048  # 2 GiB of address space for the log; slots are touched as used
PACK_DEFERRALS = 9  # busy trim calls in a row that may skip packing (the agg: 0.9 s)


class History:
    """The last ``keep_ms`` of bars (by bar start, against the feed clock) of every series."""

    def __init__(
        self,
        keep_ms: int,
        *,
        sweep: int = 2048,
        rows: int | None = None,
        block: int = BLOCK,
        pack_budget: int = 4096,
        segment_bytes: int = SEGMENT_BYTES,
        segments: int = RESERVE_SEGMENTS,
        jit: bool = True,
    ) -> None:
        if segment_bytes < barcodec.record_max(block):
            raise ValueError(
                f"segment_bytes {segment_bytes} cannot hold a record of {block} bars "
                f"({barcodec.record_max(block)} bytes at most)"
            )
        self.keep_ms = keep_ms
        self.block = block
        self._pack_budget = pack_budget  # records packed per trim call at most
        self._deferred = 0  # trim calls in a row that left packing to later
        self._sweep = sweep
        self._next_sweep = 0
        self._cutoff = _INT64_MIN
        self._append: Callable[..., Any] = chosen(arena.history_append, jit)
        self._trim: Callable[..., Any] = chosen(arena.history_trim, jit)
        self._pack: Callable[..., Any] = chosen(barcodec.log_pack, jit)
        self._free: Callable[..., Any] = chosen(barcodec.log_free, jit)
        self._walk: Callable[..., Any] = chosen(barcodec.log_walk, jit)
        self._decode: Callable[..., Any] = chosen(barcodec.log_decode, jit)
        self._off = np.full(0, -1, dtype=np.int64)
        self._start = np.zeros(0, dtype=np.int64)
        self._end = np.zeros(0, dtype=np.int64)
        self._cap = np.zeros(0, dtype=np.int64)
        self._newest = np.full(0, -1, dtype=np.int64)  # newest packed record (log position)
        self._newest_last = np.full(0, _INT64_MIN, dtype=np.int64)  # its last bar's start
        self._region_free = np.full(arena.N_CLASSES, -1, dtype=np.int64)
        self._arena = _reserve(RESERVE_ROWS if rows is None else rows)
        self._state = np.zeros(arena.N_HISTORY, dtype=np.int64)
        self._log_map = _reserve_bytes(segments * segment_bytes)
        self._log = self._log_map.array
        self._releases = segment_bytes % mmap.PAGESIZE == 0  # whole pages: give them back
        segments = len(self._log) // segment_bytes
        self._log_state: tuple[np.ndarray, ...] = (
            np.zeros(segments, dtype=np.int64),  # seg_slot
            np.zeros(segments, dtype=np.int64),  # seg_max
            np.zeros(segments, dtype=np.int64),  # seg_bars
            np.arange(segments - 1, -1, -1, dtype=np.int64),  # free stack: slot 0 on top
            np.zeros(barcodec.N_LOG, dtype=np.int64),
        )
        log_info = self._log_state[4]
        log_info[barcodec.L_OPEN] = -1
        log_info[barcodec.L_FREE] = segments
        log_info[barcodec.L_SEG_BYTES] = segment_bytes
        self._slots_touched = 0
        self._records = np.empty(1024, dtype=np.int64)
        self._scratch_f = np.zeros(1, dtype=np.float64)
        self._scratch_i = self._scratch_f.view(np.int64)

    def _ensure_series(self, count: int) -> None:
        have = len(self._off)
        if count <= have:
            return
        size = max(count, 2 * have, 64)
        fills = (("_off", -1), ("_start", 0), ("_end", 0), ("_cap", 0), ("_newest", -1))
        for name, fill in (*fills, ("_newest_last", _INT64_MIN)):
            array = getattr(self, name)
            setattr(self, name, np.concatenate([array, np.full(size - have, fill, np.int64)]))

    def _regions(self) -> tuple[np.ndarray, ...]:
        """The arrays the history kernels work on besides the arena (:mod:`polyfan.bars.arena`)."""
        return self._off, self._start, self._end, self._cap, self._region_free, self._state

    def _make_room(self, rows: int) -> None:
        """At least ``rows`` more rows above the top: a bigger arena, the used rows copied."""
        top = int(self._state[arena.H_TOP])
        size = len(self._arena)
        grown = _reserve(max(size + size // 2, top + rows))
        grown[:top] = self._arena[:top]
        self._arena = grown

    def _grow_log(self) -> None:
        """Twice the slots: the used ones copied where they are, the tables re-indexed."""
        seg_slot, seg_max, seg_bars, _, info = self._log_state
        seg_bytes = int(info[barcodec.L_SEG_BYTES])
        old = len(seg_slot)
        size = 2 * old
        mapping = _reserve_bytes(size * seg_bytes, exact=True)
        grown = mapping.array
        grown[: old * seg_bytes] = self._log[: old * seg_bytes]
        tables = [np.zeros(size, dtype=np.int64) for _ in range(3)]
        for seq in range(int(info[barcodec.L_TAIL]), int(info[barcodec.L_OPEN]) + 1):
            for new, table in zip(tables, (seg_slot, seg_max, seg_bars), strict=True):
                new[seq % size] = table[seq % old]
        # every old slot is in use (that is why we grow): the new ones are all free
        free = np.arange(size - 1, old - 1, -1, dtype=np.int64)
        free = np.concatenate([free, np.zeros(old, dtype=np.int64)])
        info[barcodec.L_FREE] = size - old
        self._log_map, self._log = mapping, grown
        self._log_state = (*tables, free, info)

    # --- in -----------------------------------------------------------------------------

    def add_closed(self, series: np.ndarray, bars: np.ndarray) -> None:
        """Append a batch of closed bars, each series' adjacent and oldest first (as ``Bars``
        returns them)."""
        if len(series) == 0:
            return
        self._ensure_series(int(series.max()) + 1)
        words = np.ascontiguousarray(bars, dtype=codec.BAR_DTYPE).view(np.int64)
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

    def trim(
        self, clock: int, busy: Callable[[], bool] | None = None, hold_from: int | None = None
    ) -> None:
        """Set the retention cutoff from the feed clock and sweep a few series: trim them, and
        pack their bars into records, all but the newest ``len % block``; free the log
        segments whose bars are all past the retention. ``hold_from``: keep the bars starting
        at or after it too, older than the retention or not (``agg --store``: bars not on disk
        yet).

        Packing does at most ``pack_budget`` records (a series cut short is packed when the
        sweep comes back to it), and none when ``busy()`` says there is other work waiting
        (the agg passes "a message is waiting on the SUB") unless the last ``PACK_DEFERRALS``
        calls all deferred it: under a feed that never pauses, recent bars would otherwise
        pile up as 64-byte records for ever.
        """
        self._cutoff = clock - self.keep_ms
        if hold_from is not None and hold_from < self._cutoff:
            self._cutoff = hold_from
        freed = self._free(self._cutoff, self._log_state)
        if freed and self._releases:
            _, _, _, free_slots, info = self._log_state
            top = int(info[barcodec.L_FREE])
            seg_bytes = int(info[barcodec.L_SEG_BYTES])
            for slot in free_slots[top - freed : top].tolist():
                self._log_map.release(slot * seg_bytes, seg_bytes)
        if not len(self._off) or not self._sweep:
            return
        first = self._next_sweep
        self._next_sweep = self._trim(
            self._cutoff, first, self._sweep, self._regions(), self._arena
        )
        swept = (first + np.arange(min(self._sweep, len(self._off)))) % len(self._off)
        held = self._end[swept] - self._start[swept]
        full = (self._off[swept] >= 0) & (held >= self.block)
        if not full.any():
            return
        if busy is not None and self._deferred < PACK_DEFERRALS and busy():
            self._deferred += 1
            return
        self._deferred = 0
        keys = np.repeat(swept[full], held[full] // self.block)[: self._pack_budget]
        self._pack_records(keys, np.full(len(keys), self.block, dtype=np.int64))

    def _pack_records(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Pack ``counts[j]`` of the oldest hot bars of each series ``keys[j]`` as one record
        (a series' records adjacent, oldest first)."""
        floats = self._arena.view(np.float64)
        j = 0
        while True:
            stopped = self._pack(
                keys[j:],
                counts[j:],
                self._off,
                self._start,
                self._arena,
                floats,
                self._newest,
                self._log,
                self._log_state,
                self._scratch_f,
                self._scratch_i,
            )
            if stopped < 0:
                break
            self._grow_log()
            j += stopped
        packed = np.unique(keys)  # their newest records end where their hot bars now start
        self._newest_last[packed] = self._arena[self._off[packed] + self._start[packed] - 1, 0]
        info = self._log_state[4]
        self._slots_touched = max(
            self._slots_touched, len(self._log_state[0]) - int(info[barcodec.L_FREE])
        )

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
        if series >= len(self._newest) or (limit is not None and len(hot) >= limit):
            return hot if limit is None else hot[max(0, len(hot) - limit) :]
        low = _INT64_MIN if since is None else since
        high = _INT64_MAX if before is None else before
        wanted = -1 if limit is None else limit - len(hot)
        while True:
            found, count = self._walk(
                int(self._newest[series]),
                low,
                high,
                wanted,
                self._log,
                self._log_state,
                self._records,
            )
            if found >= 0:
                break
            self._records = np.empty(2 * len(self._records), dtype=np.int64)
        if found == 0:
            return hot if limit is None else hot[max(0, len(hot) - limit) :]
        out = np.empty((count, _WORDS), dtype=np.int64)
        self._decode(self._records, found, self._log, out, self._scratch_f, self._scratch_i)
        cold = out.view(codec.BAR_DTYPE).reshape(count)
        cold = cold[(cold["s"] >= low) & (cold["s"] < high)]
        found_bars = np.concatenate([cold, hot]) if len(hot) else cold
        return found_bars if limit is None else found_bars[max(0, len(found_bars) - limit) :]

    def _select_hot(self, series: int, since: int | None, before: int | None) -> np.ndarray:
        if series >= len(self._off) or self._off[series] < 0:
            return _EMPTY
        off = int(self._off[series])
        lo, hi = off + int(self._start[series]), off + int(self._end[series])
        if since is not None:
            lo = arena.lower_bound(self._arena, lo, hi, since)
        if before is not None:
            hi = arena.lower_bound(self._arena, lo, hi, before)
        if hi <= lo:
            return _EMPTY
        return self._arena[lo:hi].copy().view(codec.BAR_DTYPE).reshape(hi - lo)

    def _oldest_live(self) -> int:
        """The log position below which records are freed."""
        info = self._log_state[4]
        return int(info[barcodec.L_TAIL] * info[barcodec.L_SEG_BYTES])

    @property
    def bar_count(self) -> int:
        """Bars held: recent ones, and those in live log segments (which may include a few
        already past the retention, until their segment is freed)."""
        held = self._off >= 0
        hot = int((self._end[held] - self._start[held]).sum())
        return hot + int(self._log_state[4][barcodec.L_BARS])

    @property
    def nbytes(self) -> int:
        """Bytes in use: arena rows below the top (regions and free lists), the per-series
        index, and the log's slots in use (or every slot ever written, when segments are not
        whole pages and so cannot be handed back)."""
        hot = int(self._state[arena.H_TOP]) * codec.BAR_DTYPE.itemsize + 5 * self._off.nbytes
        info = self._log_state[4]
        in_use = len(self._log_state[0]) - int(info[barcodec.L_FREE])
        slots = in_use if self._releases else self._slots_touched
        return (
            hot + slots * int(info[barcodec.L_SEG_BYTES]) + sum(t.nbytes for t in self._log_state)
        )

    @property
    def cold_bytes(self) -> int:
        """Bytes of packed records in live log segments (unused segment tails included)."""
        info = self._log_state[4]
        return int(info[barcodec.L_HEAD]) - self._oldest_live() if info[barcodec.L_OPEN] >= 0 else 0

    @property
    def rows(self) -> tuple[int, int, int]:
        """Arena rows: allocated, below the top (in regions or free lists), on free lists."""
        return len(self._arena), int(self._state[arena.H_TOP]), self.free_rows

    @property
    def free_rows(self) -> int:
        """Arena rows on the free lists, waiting for reuse."""
        return int(self._state[arena.H_FREE_ROWS])

    def __len__(self) -> int:
        """Series with bars."""
        packed = (self._newest >= self._oldest_live()) & (self._newest_last >= self._cutoff)
        return int(((self._off >= 0) | packed).sum())


def _reserve(rows: int) -> np.ndarray:
    """An arena of ``rows`` rows, uninitialised (untouched pages take no memory)."""
    try:
        return np.empty((rows, _WORDS), dtype=np.int64)
    except MemoryError:
        if rows <= 4096:
            raise
        return np.empty((4096, _WORDS), dtype=np.int64)


def warm_up() -> None:
    """Run every history kernel once on a tiny store (append, pack, free, walk, decode), so no
    batch or request waits for numba to load them."""
    history = History(keep_ms=1_000, sweep=8, rows=64, block=2, segments=2)
    bars = np.zeros(4, dtype=codec.BAR_DTYPE)
    bars["s"] = np.arange(4) * 100
    history.add(0, bars)
    history.trim(clock=500)
    history.select(0, since=0, limit=3)
    history.trim(clock=10**6)


class _Mapping:
    """Private anonymous memory for the log: address space reserved up front, pages resident
    only once written, and handed back to the system (``MADV_DONTNEED``) when a segment is
    freed, so the log's resident size follows the bars held, not the day's peak."""

    def __init__(self, size: int) -> None:
        self._map = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.array = np.frombuffer(self._map, dtype=np.uint8)

    def release(self, start: int, length: int) -> None:
        """Drop the pages of ``[start, start + length)`` (page-aligned); they read as zeros."""
        self._map.madvise(mmap.MADV_DONTNEED, start, length)


def _reserve_bytes(size: int, exact: bool = False) -> _Mapping:
    """``size`` bytes of log; a smaller reservation when the address space is short (the log
    then grows by copying)."""
    try:
        return _Mapping(size)
    except OSError:
        if exact or size <= 64 << 20:
            raise
        return _Mapping(64 << 20)
