"""The history kernels: every series' bars in one shared arena of BAR rows, searched and trimmed
in place (:class:`polyfan.bars.history.History` owns the arrays).
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Every series' bars live in one region of a shared arena (``arena[row, 8 words]``, one row per
# BAR record): ``h_off[series]`` is the region's first row (-1: no bars), ``h_start``/``h_end``
# the held bars within it, ``h_cap`` its size (4, 6, 9, 13 ... rows: each size class 1.5 times
# the one before). A full region is compacted in place when most of it has been
# trimmed, else its bars move to a region of the next class. Freed regions go on a free list per
# class, linked through their first word (``h_free[c]`` is the head), and are reused before the
# arena's top moves: nothing is ever compacted globally, so no call copies more than one
# series' bars. ``h_state`` holds the top and the rows on free lists. The kernels take these
# int64 arrays as one tuple, ``regions = (h_off, h_start, h_end, h_cap, h_free, h_state)``.

H_TOP = 0
H_FREE_ROWS = 1
N_HISTORY = 2
FIRST_REGION = 4
N_CLASSES = 64  # 4 * 1.5**63 rows: far beyond any arena


@njit(cache=True, inline="always")
def lower_bound(arena: np.ndarray, lo: int, hi: int, s: int) -> int:
    """First row in ``[lo, hi)`` whose bar start is ``>= s`` (binary search)."""
    while lo < hi:
        mid = (lo + hi) >> 1
        if arena[mid, 0] < s:
            lo = mid + 1
        else:
            hi = mid
    return lo


@njit(cache=True, inline="always")
def _copy_rows(arena: np.ndarray, dst: int, src: int, rows: int) -> None:
    """Copy ``rows`` rows from ``src`` to ``dst`` word by word, forward (safe for dst < src)."""
    words = arena.shape[1]
    for r in range(rows):
        for w in range(words):
            arena[dst + r, w] = arena[src + r, w]


@njit(cache=True)
def _size_class(rows: int) -> int:
    """The smallest class whose regions hold ``rows``: sizes 4, 6, 9, 13, 19 ... (x1.5)."""
    c = 0
    size = FIRST_REGION
    while size < rows:
        size += size >> 1
        c += 1
    return c


@njit(cache=True)
def _class_size(c: int) -> int:
    size = FIRST_REGION
    for _ in range(c):
        size += size >> 1
    return size


@njit(cache=True, inline="always")
def _free_region(
    arena: np.ndarray, off: int, cap: int, h_free: np.ndarray, h_state: np.ndarray
) -> None:
    c = _size_class(cap)
    arena[off, 0] = h_free[c]
    h_free[c] = off
    h_state[H_FREE_ROWS] += cap


@njit(cache=True)
def history_append(
    series: np.ndarray,
    words: np.ndarray,
    start: int,
    cutoff: int,
    regions: tuple[np.ndarray, ...],
    arena: np.ndarray,
) -> int:
    """Append bars (each series' adjacent, oldest first) from row ``start``, trimming
    ``s < cutoff``.

    Returns -1 when done, or the row at which the arena ran out of room: grow it and call
    again from there.
    """
    h_off, h_start, h_end, h_cap, h_free, h_state = regions
    m = series.shape[0]
    j = start
    while j < m:
        key = series[j]
        k = j + 1
        while k < m and series[k] == key:
            k += 1
        count = k - j
        off = h_off[key]
        if off >= 0 and h_start[key] < h_end[key] and arena[off + h_start[key], 0] < cutoff:
            h_start[key] = lower_bound(arena, off + h_start[key], off + h_end[key], cutoff) - off
        live = h_end[key] - h_start[key] if off >= 0 else 0
        if off < 0 or h_end[key] + count > h_cap[key]:
            cap = h_cap[key] if off >= 0 else 0
            if off >= 0 and live + count <= (cap * 3) // 4:
                _copy_rows(arena, off, off + h_start[key], live)
            else:
                c = _size_class(max(cap + (cap >> 1), live + count))
                size = _class_size(c)
                new = h_free[c]
                if off >= 0 and off + cap == h_state[H_TOP] and off + size <= arena.shape[0]:
                    # The region is the arena's last: extend it where it is.
                    h_state[H_TOP] = off + size
                    h_cap[key] = size
                    _copy_rows(arena, off, off + h_start[key], live)
                elif new >= 0:
                    h_free[c] = arena[new, 0]
                    h_state[H_FREE_ROWS] -= size
                else:
                    new = h_state[H_TOP]
                    if new + size > arena.shape[0]:
                        return j
                    h_state[H_TOP] = new + size
                if h_cap[key] != size:
                    if off >= 0:
                        _copy_rows(arena, new, off + h_start[key], live)
                        _free_region(arena, off, cap, h_free, h_state)
                    h_off[key] = new
                    h_cap[key] = size
            h_start[key] = 0
            h_end[key] = live
        at = h_off[key] + h_end[key]
        for r in range(count):
            for w in range(words.shape[1]):
                arena[at + r, w] = words[j + r, w]
        h_end[key] += count
        j = k
    return -1


@njit(cache=True)
def history_trim(
    cutoff: int,
    first: int,
    count: int,
    regions: tuple[np.ndarray, ...],
    arena: np.ndarray,
) -> int:
    """Trim ``count`` series from ``first`` (wrapping); free emptied regions. Returns the next."""
    h_off, h_start, h_end, h_cap, h_free, h_state = regions
    n = h_off.shape[0]
    key = first
    for _ in range(min(count, n)):
        if key >= n:
            key = 0
        off = h_off[key]
        if off >= 0:
            h_start[key] = lower_bound(arena, off + h_start[key], off + h_end[key], cutoff) - off
            if h_start[key] == h_end[key]:
                _free_region(arena, off, h_cap[key], h_free, h_state)
                h_off[key] = -1
                h_start[key] = 0
                h_end[key] = 0
                h_cap[key] = 0
        key += 1
    return key
