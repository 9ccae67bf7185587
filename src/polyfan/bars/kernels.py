"""The bar kernels: trades applied to the open bars of every series, bars closed on the feed clock.

- ``apply_trades``: a batch of trades (arrival order) into the open bars;
- ``close_bars``: every bar whose ``s + I + grace`` the clock has passed, out as columns.

The state is :class:`polyfan.bars.state.Bars`'s, passed as grouped arrays: ``trades = (t, p,
size, nc, codes, sym, arrival_clock)``, ``pool = (head, pool_i, pool_f, free, slot_close, meta,
counters)``, ``closes = (prev_close, has_prev)``, ``outages = (lo, hi)`` and ``out = (series, s,
o, h, l, c, v, vw, n, flags)``. A tuple of arrays costs numba nothing inside the kernel (it is
unpacked at compile time) and about 0.05 µs per array per call to box. The frame kernels are
:mod:`polyfan.wire.decode` and :mod:`polyfan.wire.encode`, the history's :mod:`polyfan.bars.arena`.

Module-level ``@njit(cache=True)`` functions over NumPy arrays and scalars only: no Python
objects, no logging. Every kernel is also correct as plain Python (``chosen(kernel,
jit=False)``; the tests run both).

Open bars live in a slot pool shared by every series (series = symbol id * intervals + k):
``pool_i[slot, I_*]`` holds the integer fields and ``pool_f[slot, F_*]`` the floats (two views
of one array: a slot is one row). A series keeps its open bars on a singly linked list
(``head[series]``, ``pool_i[slot, I_NEXT]``), newest first, so it can have any number open at
once (a trade stamped minutes ahead of the clock after an upstream reconnect simply opens one
more). When the free list is empty the trade kernel returns where it stopped; the caller grows
the pool and calls again from there, so an open bar is never overwritten. ``meta`` holds the
free-list top, the earliest pending close time (so closing costs nothing until the clock
reaches it), the pool's high-water mark and the number of open bars. ``slot_close[slot]`` is
an open slot's close time (``s + I + grace``; INT64_MAX when free): closing scans that one
contiguous array rather than a word of every 192-byte row.

Trades are applied in arrival order, so "first by (t, arrival)" is "strictly smaller t" and
"last by (t, arrival)" is "t greater or equal".
"""

from __future__ import annotations

import numpy as np
from numba import njit

# Condition bits (same values as polyfan.bars.conditions).
HL = 1
OC = 2
VOL = 4
UNKNOWN = 8

FLAG_OUTAGE = 1  # wire.BAR_FLAG_OUTAGE
FLAG_CARRIED = 2  # wire.BAR_FLAG_CARRIED

INT64_MAX = np.iinfo(np.int64).max
INT64_MIN = np.iinfo(np.int64).min

# Slot columns. ``pool_i`` and ``pool_f`` are int64 and float64 views of ONE array, so a slot is
# one 192-byte row: the fields every trade touches first, the fallbacks after them.
I_S = 0  # bar start; slot is free when I_SERIES < 0
I_SERIES = 1
I_NEXT = 2  # next open slot of the same series, -1 at the end
I_N = 3  # trades that qualify for anything
I_NHL = 4
I_NOC = 5
I_OCF_T = 6  # t of the first O/C trade
I_OCL_T = 7
F_OCF = 8  # price of the first O/C trade
F_OCL = 9
F_HI = 10
F_LO = 11
F_V = 12
F_PV = 13  # sum of price * size over volume trades
# Fallbacks, kept only from the trades that can matter for them: first/last H/L price from
# H/L trades that are not O/C (used when the bar has no O/C trade), first/last/max/min from
# trades that are not H/L (used when the bar has no H/L trade and no previous close).
I_HLF_T = 14
I_HLL_T = 15
I_ANF_T = 16
I_ANL_T = 17
F_HLF = 18
F_HLL = 19
F_ANF = 20
F_ANL = 21
F_ANHI = 22
F_ANLO = 23
SLOT_WORDS = 24

# meta entries
M_FREE_TOP = 0
M_MIN_CLOSE = 1
M_HIGH_WATER = 2
M_OPEN = 3
N_META = 4

# bar counters
C_LATE = 0
C_UNKNOWN = 1
N_COUNTERS = 2

# --- trades ------------------------------------------------------------------------------


@njit(cache=True, inline="always")  # in the per-trade loop: no call, no refcounts
def trade_flags(nc: int, codes: np.ndarray, i: int, rules: np.ndarray) -> int:
    """The AND of the rule entries of trade ``i``'s codes (regular when it has none)."""
    flags = HL | OC | VOL
    unknown = 0
    for j in range(min(nc, codes.shape[1])):
        entry = rules[codes[i, j]]
        flags &= entry
        unknown |= entry & UNKNOWN
    return (flags & (HL | OC | VOL)) | unknown


@njit(cache=True)
def apply_trades(
    trades: tuple[np.ndarray, ...],
    start: int,
    intervals: np.ndarray,
    grace: int,
    rules: np.ndarray,
    pool: tuple[np.ndarray, ...],
) -> int:
    """Apply trades to every interval's open bars, from position ``start`` = trade * k + interval.

    A trade whose bar has closed (``s + I + grace <= clock at its arrival``) is counted late
    for that interval and not applied. Returns -1 when done, or the position at which the
    free list ran out: grow the pool and call again from there.
    """
    t, p, size, nc, codes, sym, arrival_clock = trades
    head, pool_i, pool_f, free, slot_close, meta, counters = pool
    n_int = intervals.shape[0]
    n = t.shape[0]
    i0 = start // n_int
    k0 = start % n_int
    for i in range(i0, n):
        flags = trade_flags(nc[i], codes, i, rules)
        if flags & (HL | OC | VOL) == 0:
            if flags & UNKNOWN:
                counters[C_UNKNOWN] += 1
            continue
        ti = t[i]
        pi = p[i]
        clock = arrival_clock[i]
        base = sym[i] * n_int
        for k in range(k0 if i == i0 else 0, n_int):
            interval = intervals[k]
            series = base + k
            slot = head[series]
            # Most trades land in their series' newest open bar: no division needed.
            if slot >= 0 and pool_i[slot, I_S] <= ti < pool_i[slot, I_S] + interval:
                s = pool_i[slot, I_S]
            else:
                s = (ti // interval) * interval
                while slot >= 0 and pool_i[slot, I_S] != s:
                    slot = pool_i[slot, I_NEXT]
            close_at = s + interval + grace
            if close_at <= clock:
                counters[C_LATE] += 1
                continue
            if slot < 0:
                top = meta[M_FREE_TOP]
                if top == 0:
                    return int(i * n_int + k)
                top -= 1
                meta[M_FREE_TOP] = top
                slot = free[top]
                meta[M_OPEN] += 1
                if slot + 1 > meta[M_HIGH_WATER]:
                    meta[M_HIGH_WATER] = slot + 1
                if close_at < meta[M_MIN_CLOSE]:
                    meta[M_MIN_CLOSE] = close_at
                _open_slot(pool_i, pool_f, slot, s, series, head[series])
                slot_close[slot] = close_at
                head[series] = slot
            _apply_one(pool_i, pool_f, slot, flags, ti, pi, size[i])
        if flags & UNKNOWN:
            counters[C_UNKNOWN] += 1
    return -1


@njit(cache=True, inline="always")  # in the per-trade loop: no call, no refcounts
def _open_slot(
    pool_i: np.ndarray, pool_f: np.ndarray, slot: int, s: int, series: int, next_slot: int
) -> None:
    pool_i[slot, I_S] = s
    pool_i[slot, I_SERIES] = series
    pool_i[slot, I_NEXT] = next_slot
    pool_i[slot, I_N] = 0
    pool_i[slot, I_NHL] = 0
    pool_i[slot, I_NOC] = 0
    pool_i[slot, I_OCF_T] = INT64_MAX
    pool_i[slot, I_OCL_T] = INT64_MIN
    pool_i[slot, I_HLF_T] = INT64_MAX
    pool_i[slot, I_HLL_T] = INT64_MIN
    pool_i[slot, I_ANF_T] = INT64_MAX
    pool_i[slot, I_ANL_T] = INT64_MIN
    pool_f[slot, F_HI] = -np.inf
    pool_f[slot, F_LO] = np.inf
    pool_f[slot, F_ANHI] = -np.inf
    pool_f[slot, F_ANLO] = np.inf
    pool_f[slot, F_V] = 0.0
    pool_f[slot, F_PV] = 0.0


@njit(cache=True, inline="always")  # in the per-trade loop: no call, no refcounts
def _first_last(
    pool_i: np.ndarray,
    pool_f: np.ndarray,
    slot: int,
    t: int,
    p: float,
    first_t: int,
    last_t: int,
    first_p: int,
    last_p: int,
) -> None:
    """Keep the first and the last price by (t, arrival) in the given columns.

    Written without branches (every store happens, with the old or the new value): trades
    arrive disordered within the grace, so "earlier?" and "later?" are unpredictable, and
    mispredicted branches cost more than the stores (apply ran 2.3x slower with ifs)."""
    first = pool_i[slot, first_t]
    earlier = t < first
    pool_i[slot, first_t] = t if earlier else first
    pool_f[slot, first_p] = p if earlier else pool_f[slot, first_p]
    last = pool_i[slot, last_t]
    later = t >= last
    pool_i[slot, last_t] = t if later else last
    pool_f[slot, last_p] = p if later else pool_f[slot, last_p]


@njit(cache=True, inline="always")  # in the per-trade loop: no call, no refcounts
def _apply_one(
    pool_i: np.ndarray,
    pool_f: np.ndarray,
    slot: int,
    flags: int,
    t: int,
    p: float,
    size: float,
) -> None:
    pool_i[slot, I_N] += 1
    if flags & VOL:
        pool_f[slot, F_V] += size
        pool_f[slot, F_PV] += p * size
    if flags & OC:
        pool_i[slot, I_NOC] += 1
        _first_last(pool_i, pool_f, slot, t, p, I_OCF_T, I_OCL_T, F_OCF, F_OCL)
    if flags & HL:
        pool_i[slot, I_NHL] += 1
        pool_f[slot, F_HI] = max(p, pool_f[slot, F_HI])  # branch-free, as in _first_last
        pool_f[slot, F_LO] = min(p, pool_f[slot, F_LO])
        if not flags & OC:
            _first_last(pool_i, pool_f, slot, t, p, I_HLF_T, I_HLL_T, F_HLF, F_HLL)
    else:
        _first_last(pool_i, pool_f, slot, t, p, I_ANF_T, I_ANL_T, F_ANF, F_ANL)
        pool_f[slot, F_ANHI] = max(p, pool_f[slot, F_ANHI])
        pool_f[slot, F_ANLO] = min(p, pool_f[slot, F_ANLO])


# --- closing -----------------------------------------------------------------------------


@njit(cache=True)
def close_bars(
    clock: int,
    intervals: np.ndarray,
    pool: tuple[np.ndarray, ...],
    closes: tuple[np.ndarray, np.ndarray],
    outages: tuple[np.ndarray, np.ndarray],
    out: tuple[np.ndarray, ...],
) -> int:
    """Close every open bar with ``s + I + grace <= clock``; write them sorted by interval,
    symbol, then s (so each series' bars are adjacent and oldest first).

    The outputs need room for ``meta[M_OPEN]`` bars. Returns how many were written. A bar
    whose [s, s + I) overlaps an outage window [lo, hi] (``s <= hi and s + I > lo``) gets
    FLAG_OUTAGE; a volume-only bar takes the previous close of its series (FLAG_CARRIED).
    """
    head, pool_i, pool_f, free, slot_close, meta, _ = pool
    prev_close, has_prev = closes
    outage_lo, outage_hi = outages
    out_series, out_s, out_o, out_h, out_l, out_c, out_v, out_vw, out_n, out_flags = out
    if clock < meta[M_MIN_CLOSE]:
        return 0
    n_int = intervals.shape[0]
    high_water = meta[M_HIGH_WATER]
    closing = np.empty(meta[M_OPEN], dtype=np.int64)
    m = 0
    next_close = INT64_MAX
    for slot in range(high_water):  # one contiguous array, not a word of every row
        close_at = slot_close[slot]
        if close_at <= clock:
            closing[m] = slot
            m += 1
        elif close_at < next_close:
            next_close = close_at
    meta[M_MIN_CLOSE] = next_close
    if m == 0:
        return 0
    # Order by (interval, symbol, s): the shortest interval's bars go out first (their readers
    # care most about delay), and each series' bars stay together, oldest first. One sort by
    # (k, symbol id); a series rarely closes more than one bar at once, so its run of equal
    # keys is put in s order by insertion.
    key = np.empty(m, dtype=np.int64)
    for j in range(m):
        series = pool_i[closing[j], I_SERIES]
        key[j] = ((series % n_int) << 40) | (series // n_int)
    ordered = closing[:m][np.argsort(key)]
    j = 0
    while j < m:
        series = pool_i[ordered[j], I_SERIES]
        k = j + 1
        while k < m and pool_i[ordered[k], I_SERIES] == series:
            k += 1
        for a in range(j + 1, k):
            slot = ordered[a]
            b = a
            while b > j and pool_i[ordered[b - 1], I_S] > pool_i[slot, I_S]:
                ordered[b] = ordered[b - 1]
                b -= 1
            ordered[b] = slot
        j = k
    top = meta[M_FREE_TOP]
    for j in range(m):
        slot = ordered[j]
        series = pool_i[slot, I_SERIES]
        s = pool_i[slot, I_S]
        interval = intervals[series % n_int]
        flags = 0
        if pool_i[slot, I_NHL] == 0:
            if has_prev[series]:
                o = h = lo = c = prev_close[series]
                flags |= FLAG_CARRIED
            else:
                o = pool_f[slot, F_ANF]
                h = pool_f[slot, F_ANHI]
                lo = pool_f[slot, F_ANLO]
                c = pool_f[slot, F_ANL]
        else:
            h = pool_f[slot, F_HI]
            lo = pool_f[slot, F_LO]
            if pool_i[slot, I_NOC] > 0:
                o = pool_f[slot, F_OCF]
                c = pool_f[slot, F_OCL]
            else:
                o = pool_f[slot, F_HLF]
                c = pool_f[slot, F_HLL]
        for w in range(outage_lo.shape[0]):
            if s <= outage_hi[w] and s + interval > outage_lo[w]:
                flags |= FLAG_OUTAGE
        v = pool_f[slot, F_V]
        out_series[j] = series
        out_s[j] = s
        out_o[j] = o
        out_h[j] = h
        out_l[j] = lo
        out_c[j] = c
        out_v[j] = v
        out_vw[j] = pool_f[slot, F_PV] / v if v > 0.0 else np.nan
        out_n[j] = pool_i[slot, I_N]
        out_flags[j] = flags
        prev_close[series] = c
        has_prev[series] = 1
        # Unlink the slot from its series and free it.
        nxt = pool_i[slot, I_NEXT]
        if head[series] == slot:
            head[series] = nxt
        else:
            cur = head[series]
            while pool_i[cur, I_NEXT] != slot:
                cur = pool_i[cur, I_NEXT]
            pool_i[cur, I_NEXT] = nxt
        pool_i[slot, I_SERIES] = -1
        slot_close[slot] = INT64_MAX
        free[top] = slot
        top += 1
    meta[M_FREE_TOP] = top
    meta[M_OPEN] -= m
    return m
