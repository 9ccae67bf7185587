"""The numba kernels behind the agg, one call per batch each, never one per trade.

- ``decode_frames`` / ``unknown_topics``: a batch of received wire frames to trade columns,
  sequence gaps and the feed clock (the state is :class:`polyfan.wire.ingest.FrameDecoder`'s).
- ``apply_trades`` / ``close_bars``: open bars of every series, closed on the feed clock
  (:class:`polyfan.bars.state.Bars`).
- ``encode_bars``: closed bars to one BARS message per topic (:class:`polyfan.bars.aggregator.Aggregator`).
- ``history_append`` / ``history_trim``: bars kept per series (:class:`polyfan.bars.history.History`).

Module-level ``@njit(cache=True)`` functions over NumPy arrays and scalars only: no Python
objects, no logging; this module only knows array layouts, described next to each group. Every
kernel is also correct as plain Python (``chosen(kernel, jit=False)``; the tests run both).

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

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from polyfan.wire.topics import TopicArrays, find_topic


def chosen(kernel: Any, jit: bool) -> Callable[..., Any]:
    """The compiled kernel, or its plain-Python body (``py_func``; the function itself when
    numba is disabled with NUMBA_DISABLE_JIT=1)."""
    function: Callable[..., Any] = kernel if jit else getattr(kernel, "py_func", kernel)
    return function


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
    t: np.ndarray,
    p: np.ndarray,
    size: np.ndarray,
    nc: np.ndarray,
    codes: np.ndarray,
    sym: np.ndarray,
    arrival_clock: np.ndarray,
    start: int,
    intervals: np.ndarray,
    grace: int,
    rules: np.ndarray,
    head: np.ndarray,
    pool_i: np.ndarray,
    pool_f: np.ndarray,
    free: np.ndarray,
    slot_close: np.ndarray,
    meta: np.ndarray,
    counters: np.ndarray,
) -> int:
    """Apply trades to every interval's open bars, from position ``start`` = trade * k + interval.

    A trade whose bar has closed (``s + I + grace <= clock at its arrival``) is counted late
    for that interval and not applied. Returns -1 when done, or the position at which the
    free list ran out: grow the pool and call again from there.
    """
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
    grace: int,
    head: np.ndarray,
    prev_close: np.ndarray,
    has_prev: np.ndarray,
    pool_i: np.ndarray,
    pool_f: np.ndarray,
    free: np.ndarray,
    slot_close: np.ndarray,
    meta: np.ndarray,
    outage_lo: np.ndarray,
    outage_hi: np.ndarray,
    out_series: np.ndarray,
    out_s: np.ndarray,
    out_o: np.ndarray,
    out_h: np.ndarray,
    out_l: np.ndarray,
    out_c: np.ndarray,
    out_v: np.ndarray,
    out_vw: np.ndarray,
    out_n: np.ndarray,
    out_flags: np.ndarray,
) -> int:
    """Close every open bar with ``s + I + grace <= clock``; write them sorted by interval,
    symbol, then s (so each series' bars are adjacent and oldest first).

    The outputs need room for ``meta[M_OPEN]`` bars. Returns how many were written. A bar
    whose [s, s + I) overlaps an outage window [lo, hi] (``s <= hi and s + I > lo``) gets
    FLAG_OUTAGE; a volume-only bar takes the previous close of its series (FLAG_CARRIED).
    """
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


# --- frames ------------------------------------------------------------------------------

HEADER_SIZE = 24
TRADE_SIZE = 56
BAR_SIZE = 64
CLOCK_SIZE = 16
UPSTREAM_SIZE = 24
WIRE_VERSION = 1
KIND_TRADES = 1
KIND_BARS = 2
KIND_CLOCK = 3
KIND_UPSTREAM = 4
MAX_KIND = 8

TOPIC_CONTROL = -1  # topic_sym value for the control topic
TOPIC_IGNORED = -2  # a topic we do not use (counted, skipped)
TOPIC_WIDTH = 128  # longest topic the table stores; longer ones are bad messages
# A trade record as float64 words: p and s are words 1 and 2 (wire.TRADE_DTYPE).
TRADE_WORDS = 7
TRADE_P_WORD = 1
TRADE_S_WORD = 2
MAX_PRICE = 1e9  # wire.MAX_PRICE: a trade outside the bounds is dropped at decode, counted
MAX_SIZE = 1e12  # wire.MAX_SIZE

# decoder state entries
D_CLOCK = 0  # the largest feed clock seen (monotonic)
D_CLOCK_WALL = 1  # wall time of the last CLOCK record received
D_HAS_CLOCK = 2
D_TRADES = 3  # trades written to the outputs
D_SPECIALS = 4  # frames handed back to Python (UPSTREAM, ANNOUNCE ... on the control topic)
D_GAPS = 5
D_BAD = 6
D_IGNORED = 7
D_REJECTED = 8  # trades outside MAX_PRICE / MAX_SIZE (also counted in D_BAD, one each)
D_CLOSE_PAST = 9  # a CLOCK that takes the clock past this value is noted in D_CLOSED_AT ...
D_CLOSED_AT = 10  # ... (the clock it made; int64 min: none yet), and disarms D_CLOSE_PAST
D_STOP_AT_SPECIALS = 11  # 1: return after each special frame, so the caller handles it in order
D_SPECIAL_CLOCK = 12  # the clock before that frame (int64 min: none yet)
N_DECODER = 13


@njit(cache=True, inline="always")
def _u64(buf: np.ndarray, at: int) -> np.uint64:
    value = np.uint64(0)
    for j in range(8):
        value |= np.uint64(buf[at + j]) << np.uint64(8 * j)
    return value


@njit(cache=True, inline="always")
def _u32(buf: np.ndarray, at: int) -> int:
    return (
        int(buf[at]) | (int(buf[at + 1]) << 8) | (int(buf[at + 2]) << 16) | (int(buf[at + 3]) << 24)
    )


@njit(cache=True, inline="always")
def _i64(buf: np.ndarray, at: int) -> int:
    value = 0
    for j in range(7):
        value |= int(buf[at + j]) << (8 * j)
    top = int(buf[at + 7])
    if top >= 128:
        top -= 256
    return value | (top << 56)


@njit(cache=True)
def unknown_topics(
    buf: np.ndarray,
    offsets: np.ndarray,
    start: int,
    topics: TopicArrays,
    found: np.ndarray,
) -> int:
    """Frames from ``start`` whose topic is not in the table (indices into ``found``), so the
    caller can register a batch's new topics at once. Returns how many were found."""
    count = 0
    for f in range(start, offsets.shape[0] - 1):
        begin = offsets[f]
        end = min(offsets[f + 1], begin + TOPIC_WIDTH + 1)
        for j in range(begin, end):
            if buf[j] == 0:
                if find_topic(buf, begin, j - begin, topics) < 0:
                    found[count] = f
                    count += 1
                break
    return count


@njit(cache=True)
def decode_frames(
    buf: np.ndarray,
    offsets: np.ndarray,
    start: int,
    topics: TopicArrays,
    topic_sym: np.ndarray,
    last_session: np.ndarray,
    last_seq: np.ndarray,
    seen: np.ndarray,
    symbol_trades: np.ndarray,
    state: np.ndarray,
    out_trades: np.ndarray,
    out_words: np.ndarray,
    out_sym: np.ndarray,
    out_clock: np.ndarray,
    specials: np.ndarray,
) -> int:
    """Decode frames ``start..`` of a batch (frame f is ``buf[offsets[f]:offsets[f + 1]]``).

    Trades are copied to ``out_trades`` (raw TRADE records) with their symbol id and the feed
    clock at their arrival (the largest CLOCK seen before their frame); ``out_words`` is
    ``out_trades`` viewed as float64. A trade outside ``MAX_PRICE`` / ``MAX_SIZE`` (a peer can
    publish anything) is dropped and counted in D_REJECTED and D_BAD. CLOCK records move the
    clock. Other control frames are listed in ``specials`` for the caller, and so is a control
    frame from a publisher session other than the previous control frame's (a CLOCK is applied
    as well); with ``D_STOP_AT_SPECIALS`` set, decoding stops after each of them. A CLOCK that
    takes the clock past ``D_CLOSE_PAST`` notes the clock in ``D_CLOSED_AT`` (an outage
    waiting for it ends there), unless it is itself special (the caller judges it first). Sequence gaps are counted per topic exactly as
    ``wire.GapCounter`` does. Malformed frames are counted and skipped. Returns -1 when done,
    the index of a frame whose topic is not in the table (register it and call again from
    there), or ``-(f + 2)`` after special frame ``f`` when stopping at specials (handle it
    and call again from ``f + 1``).
    """
    n = offsets.shape[0] - 1
    for f in range(start, n):
        begin = offsets[f]
        end = offsets[f + 1]
        nul = -1
        for j in range(begin, min(end, begin + TOPIC_WIDTH + 1)):
            if buf[j] == 0:
                nul = j
                break
        if nul < 0 or end - nul - 1 < HEADER_SIZE:
            state[D_BAD] += 1
            continue
        head = nul + 1
        kind = int(buf[head + 1])
        count = _u32(buf, head + 4)
        if buf[head] != WIRE_VERSION or kind < 1 or kind > MAX_KIND:
            state[D_BAD] += 1
            continue
        payload = head + HEADER_SIZE
        size = end - payload
        if (
            (kind == KIND_TRADES and size != count * TRADE_SIZE)
            or (kind == KIND_BARS and size != count * BAR_SIZE)
            or (kind == KIND_CLOCK and size != count * CLOCK_SIZE)
            or (kind == KIND_UPSTREAM and size != count * UPSTREAM_SIZE)
        ):
            state[D_BAD] += 1
            continue
        tid = find_topic(buf, begin, nul - begin, topics)
        if tid < 0:
            return f
        session = _u64(buf, head + 8)
        seq = _u64(buf, head + 16)
        sym = topic_sym[tid]
        new_session = seen[tid] and last_session[tid] != session
        if seen[tid] and last_session[tid] == session and seq > last_seq[tid]:
            state[D_GAPS] += np.int64(seq - last_seq[tid] - np.uint64(1))
        special = new_session and sym == TOPIC_CONTROL  # another publisher: the caller decides
        clock_before = state[D_CLOCK] if state[D_HAS_CLOCK] else INT64_MIN
        seen[tid] = 1
        last_session[tid] = session
        last_seq[tid] = seq
        if sym >= 0 and kind == KIND_TRADES:
            at = state[D_TRADES]
            out_trades[at * TRADE_SIZE : (at + count) * TRADE_SIZE] = buf[payload:end]
            kept = at
            for r in range(at, at + count):
                p = out_words[r * TRADE_WORDS + TRADE_P_WORD]
                s = out_words[r * TRADE_WORDS + TRADE_S_WORD]
                if 0.0 < p <= MAX_PRICE and 0.0 <= s <= MAX_SIZE:  # NaN fails
                    if kept != r:
                        out_trades[kept * TRADE_SIZE : (kept + 1) * TRADE_SIZE] = out_trades[
                            r * TRADE_SIZE : (r + 1) * TRADE_SIZE
                        ]
                    kept += 1
            rejected = at + count - kept
            if rejected:
                state[D_REJECTED] += rejected
                state[D_BAD] += rejected
            out_sym[at:kept] = sym
            out_clock[at:kept] = state[D_CLOCK]
            state[D_TRADES] = kept
            symbol_trades[sym] += kept - at
        elif sym == TOPIC_CONTROL and kind == KIND_CLOCK:
            for r in range(count):
                clock = _i64(buf, payload + r * CLOCK_SIZE)
                if clock > state[D_CLOCK] or not state[D_HAS_CLOCK]:
                    state[D_CLOCK] = clock
                state[D_CLOCK_WALL] = _i64(buf, payload + r * CLOCK_SIZE + 8)
                state[D_HAS_CLOCK] = 1
                if state[D_CLOCK] > state[D_CLOSE_PAST] and not special:
                    state[D_CLOSED_AT] = state[D_CLOCK]
                    state[D_CLOSE_PAST] = INT64_MAX
        elif sym == TOPIC_CONTROL:
            special = True
        else:
            state[D_IGNORED] += 1
        if special:
            specials[state[D_SPECIALS]] = f
            state[D_SPECIALS] += 1
            if state[D_STOP_AT_SPECIALS]:
                state[D_SPECIAL_CLOCK] = clock_before
                return -(f + 2)
    return -1


# --- bar messages --------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _put_u64(out: np.ndarray, at: int, value: np.uint64) -> None:
    for j in range(8):
        out[at + j] = np.uint8((value >> np.uint64(8 * j)) & np.uint64(255))


@njit(cache=True)
def encode_bars(
    series: np.ndarray,
    raw: np.ndarray,
    topic_bytes: np.ndarray,
    topic_len: np.ndarray,
    seqs: np.ndarray,
    session: np.uint64,
    out: np.ndarray,
    offsets: np.ndarray,
) -> int:
    """One BARS message per run of equal ``series`` (each series' bars adjacent, oldest first).

    ``raw`` is the bars' bytes (BAR_DTYPE records back to back); message i is
    ``out[offsets[i]:offsets[i + 1]]``. ``seqs[series]`` is the topic's last sequence number.
    ``out`` needs ``runs * (TOPIC_WIDTH + 1 + HEADER_SIZE) + len(raw)`` bytes. Returns the
    number of messages.
    """
    m = series.shape[0]
    pos = 0
    messages = 0
    j = 0
    while j < m:
        key = series[j]
        k = j + 1
        while k < m and series[k] == key:
            k += 1
        offsets[messages] = pos
        length = topic_len[key]
        out[pos : pos + length] = topic_bytes[key, :length]
        pos += length
        out[pos] = 0
        out[pos + 1] = WIRE_VERSION
        out[pos + 2] = KIND_BARS
        out[pos + 3] = 0
        out[pos + 4] = 0
        count = k - j
        for b in range(4):
            out[pos + 5 + b] = (count >> (8 * b)) & 255
        _put_u64(out, pos + 9, session)
        seqs[key] += 1
        _put_u64(out, pos + 17, np.uint64(seqs[key]))
        pos += 1 + HEADER_SIZE
        out[pos : pos + count * BAR_SIZE] = raw[j * BAR_SIZE : k * BAR_SIZE]
        pos += count * BAR_SIZE
        messages += 1
        j = k
    offsets[messages] = pos
    return messages


# --- history -------------------------------------------------------------------------------
#
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
