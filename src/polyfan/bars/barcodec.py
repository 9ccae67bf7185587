"""Older bars, packed: a lossless field-aware codec for runs of one series' bars, and the log of
fixed-size segments that :class:`polyfan.bars.history.History` keeps them in.

A **record** holds ``count`` consecutive bars of one series, oldest first. Integers are LEB128
varints; "zigzag" marks a signed one (0, -1, 1, -2 ... as 0, 1, 2, 3 ...)::

    back    varint   bytes back from this record to the series' previous record (0: none)
    count   varint
    unit    varint   the common step of the bar starts (the interval, in practice; 0: raw)
    tick    varint   the common step of the prices, in 1e-4 (100 when all are whole cents)
    first   zigzag   the first bar's start (8 raw bytes when unit is 0)
    then per bar:
    mask    1 byte   the M_* bits below
    step    zigzag   (s - previous s) / unit          (not for the first bar, nor with M_NEXT)
    prices  when o, h, l, c are each a whole number of 1e-4, bit for bit, in ``tick`` units:
            zigzag o - previous c (0 before the first), and unless M_ONE_PRICE
            zigzag h - o, o - l, c - l;  else (M_RAW_PRICES) o, h, l, c as 8 bytes each
    v       varint shares, or 8 bytes (M_V_RAW: not a whole number, or -0.0)
    n       varint                                               (none with M_N_ONE)
    vw      by the two M_VW bits: VW_IS_C (equal to c bit for bit), VW_ONE_TRADE (equal to
            ``c * v / v``, what the kernels compute for one trade) or VW_RAW (8 bytes); else
            NaN when v is 0, or derived from the prices: zigzag q - v * l and zigzag r, where
            q = round(vw * v / tick) is the bar's price * size sum in ticks and
            vw = from_bits(bits((q * tick / 1e4) / v) + r)
    flags   varint                                               (only with M_FLAGS)

Bar starts may come in any order. If one is 2**60 or more from 0 (no timestamp the proxy
passes is), ``unit`` is written as 0, ``first`` and every later start as 8 raw bytes, and
there is no step. A one-trade bar (most bars of a quiet symbol) takes 4 to 6 bytes instead of 64. Every choice
is checked bit for bit when encoding, so decoding always gives back the exact records (NaN
payloads and -0.0 included: anything the compact forms cannot express goes raw).

The **log** is a sequence of segments of ``seg_bytes`` (logical positions grow for ever:
segment ``position // seg_bytes``), each held in one physical slot of a reserved byte array;
a record never straddles two segments. A series' records form a chain through ``back``,
newest first (``newest[series]`` is its newest record's position). Segments are freed oldest
first once every bar in them is older than the retention cutoff; their slots go on a free
stack and are reused, so the memory touched follows the bars held, never the bars ever made.
Positions below the oldest live segment are dead: a chain walk stops there.

Kernel state (int64 arrays, one tuple ``log_state = (seg_slot, seg_max, seg_bars,
free_slots, state)``, all indexed by ``seq % len(seg_slot)`` where seq is a segment number):
``seg_slot`` the physical slot of a live segment, ``seg_max`` the newest bar start written to
it, ``seg_bars`` its bar count; ``free_slots[:state[L_FREE]]`` the free stack; ``state`` the
L_* values below.
"""

from __future__ import annotations

import numpy as np
from numba import njit

# The small helpers are inlined by numba (``inline="always"``): they run per field of every
# bar, where a call with array arguments (and its reference counting) would cost more than
# the work.

M_RAW_PRICES = 1
M_ONE_PRICE = 2
M_VW = 4 | 8  # the vw mode, one of:
VW_DERIVED = 0
VW_IS_C = 4
VW_ONE_TRADE = 8
VW_RAW = 12
M_V_RAW = 16
M_N_ONE = 32
M_FLAGS = 64
M_NEXT = 128  # the bar starts one unit after the previous one

TICKS = 10_000.0
PRICE_LIMIT = 1e11  # ticks stay below 2**50, exact in a float64
START_LIMIT = 2**60  # bar starts within it are written as steps (zigzag cannot overflow)
NAN_BITS = 0x7FF8000000000000  # np.nan, the only NaN the kernels write
HEADER_MAX = 5 * 10  # five varints (or four and 8 raw bytes)
BAR_MAX = 1 + 10 + 4 * 8 + 8 + 10 + 10 + 10 + 10  # every field at its widest (a raw start: 8)
INT64_MIN = -(2**63)

L_HEAD = 0  # logical position of the next record
L_OPEN = 1  # the segment that has a slot for writing (-1: none yet)
L_TAIL = 2  # the oldest live segment
L_FREE = 3  # slots on the free stack
L_SEG_BYTES = 4
L_BARS = 5  # bars in live segments
N_LOG = 6


def record_max(count: int) -> int:
    """The most bytes a record of ``count`` bars can take."""
    return HEADER_MAX + count * BAR_MAX


# --- bytes ----------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _put(out: np.ndarray, pos: int, x: int) -> int:
    """Write ``x >= 0`` as a varint at ``pos``; return the position after it."""
    while x >= 128:
        out[pos] = (x & 127) | 128
        x >>= 7
        pos += 1
    out[pos] = x
    return pos + 1


@njit(cache=True, inline="always")
def _get(data: np.ndarray, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it."""
    x = 0
    shift = 0
    while True:
        b = int(np.int64(data[pos]))
        pos += 1
        x |= (b & 127) << shift
        if b < 128:
            return x, pos
        shift += 7


@njit(cache=True, inline="always")
def _zz(x: int) -> int:
    return x << 1 if x >= 0 else ((-x) << 1) - 1


@njit(cache=True, inline="always")
def _unzz(z: int) -> int:
    return z >> 1 if z & 1 == 0 else -((z + 1) >> 1)


@njit(cache=True, inline="always")
def _put_raw(out: np.ndarray, pos: int, x: int) -> int:
    for b in range(8):
        out[pos + b] = (x >> (8 * b)) & 255
    return pos + 8


@njit(cache=True, inline="always")
def _get_raw(data: np.ndarray, pos: int) -> int:
    x = 0
    for b in range(7):
        x |= int(np.int64(data[pos + b])) << (8 * b)
    top = int(np.int64(data[pos + 7]))
    return x + ((top - 256) << 56 if top >= 128 else top << 56)


@njit(cache=True, inline="always")
def _bits(x: float, sf: np.ndarray, si: np.ndarray) -> int:
    """The bits of a float64 (``sf`` and ``si`` are one-element views of the same 8 bytes)."""
    sf[0] = x
    return int(np.int64(si[0]))


@njit(cache=True, inline="always")
def _ticks(x: float, bits: int, sf: np.ndarray, si: np.ndarray) -> tuple[bool, int]:
    """``x`` as a whole number of 1e-4 ticks, if ``ticks / 1e4`` gives back its exact bits."""
    if not abs(x) < PRICE_LIMIT:  # NaN too
        return False, 0
    t = np.floor(x * TICKS + 0.5)
    if _bits(t / TICKS, sf, si) != bits:
        return False, 0
    return True, int(t)


@njit(cache=True, inline="always")
def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


# --- records --------------------------------------------------------------------------------


@njit(cache=True, inline="always")
def _price_tick(
    words: np.ndarray, floats: np.ndarray, lo: int, hi: int, sf: np.ndarray, si: np.ndarray
) -> int:
    """The largest step (in 1e-4) that every whole-tick price of rows ``[lo, hi)`` is a
    multiple of (1 when none is)."""
    tick = 0
    for i in range(lo, hi):
        for w in range(1, 5):
            ok, t = _ticks(floats[i, w], words[i, w], sf, si)
            if ok:
                tick = _gcd(tick, abs(t))
    return tick if tick > 0 else 1


@njit(cache=True)
def encode_record(
    words: np.ndarray,
    floats: np.ndarray,
    lo: int,
    hi: int,
    back: int,
    out: np.ndarray,
    pos: int,
    sf: np.ndarray,
    si: np.ndarray,
) -> int:
    """Encode BAR rows ``[lo, hi)`` (``words`` int64 and ``floats`` float64 views of the same
    rows) at ``out[pos:]``, at most ``record_max(hi - lo)`` bytes; return the end."""
    unit = 1  # 0: some start is too far from 0 for steps: every start raw
    for i in range(lo, hi):
        if not -START_LIMIT < words[i, 0] < START_LIMIT:
            unit = 0
    if unit:
        unit = 0
        for i in range(lo + 1, hi):
            unit = _gcd(unit, abs(words[i, 0] - words[i - 1, 0]))
        if unit == 0:
            unit = 1
    tick = _price_tick(words, floats, lo, hi, sf, si)
    pos = _put(out, pos, back)
    pos = _put(out, pos, hi - lo)
    pos = _put(out, pos, unit)
    pos = _put(out, pos, tick)
    pos = _put(out, pos, _zz(words[lo, 0])) if unit else _put_raw(out, pos, words[lo, 0])
    prev_c = 0
    for i in range(lo, hi):
        at = pos
        pos += 1
        mask = 0
        if i > lo and unit == 0:
            pos = _put_raw(out, pos, words[i, 0])
        elif i > lo:
            step = (words[i, 0] - words[i - 1, 0]) // unit
            if step == 1:
                mask |= M_NEXT
            else:
                pos = _put(out, pos, _zz(step))
        ok_o, o = _ticks(floats[i, 1], words[i, 1], sf, si)
        ok_h, h = _ticks(floats[i, 2], words[i, 2], sf, si)
        ok_l, lw = _ticks(floats[i, 3], words[i, 3], sf, si)
        ok_c, c = _ticks(floats[i, 4], words[i, 4], sf, si)
        exact = ok_o and ok_h and ok_l and ok_c
        if exact:
            o //= tick
            h //= tick
            lw //= tick
            c //= tick
            pos = _put(out, pos, _zz(o - prev_c))
            if h == o and lw == o and c == o:
                mask |= M_ONE_PRICE
            else:
                pos = _put(out, pos, _zz(h - o))
                pos = _put(out, pos, _zz(o - lw))
                pos = _put(out, pos, _zz(c - lw))
            prev_c = c
        else:
            mask |= M_RAW_PRICES
            for w in range(1, 5):
                pos = _put_raw(out, pos, words[i, w])
        v = floats[i, 5]
        v_int = 0
        if v >= 0.0 and v < 2.0**53 and _bits(float(int(v)), sf, si) == words[i, 5]:
            v_int = int(v)
            pos = _put(out, pos, v_int)
        else:
            mask |= M_V_RAW
            pos = _put_raw(out, pos, words[i, 5])
        n = words[i, 7] & 0xFFFFFFFF
        if n == 1:
            mask |= M_N_ONE
        else:
            pos = _put(out, pos, n)
        vw_bits = words[i, 6]
        exact_v = not mask & M_V_RAW
        if vw_bits == words[i, 4]:
            mask |= VW_IS_C
        elif (  # never for a NaN: which operand's payload propagates is the compiler's choice
            v != 0.0
            and floats[i, 6] == floats[i, 6]
            and _bits(floats[i, 4] * v / v, sf, si) == vw_bits
        ):
            mask |= VW_ONE_TRADE
        elif exact and exact_v and v_int == 0 and vw_bits == NAN_BITS:
            pass  # VW_DERIVED with v == 0: NaN
        else:
            derived = False
            if exact and exact_v and 0 < v_int < 2**31 and abs(lw) < 2**31:
                pv = floats[i, 6] * v * (TICKS / tick)
                if abs(pv) < 2.0**53:
                    q = int(np.floor(pv + 0.5))
                    r = vw_bits - _bits((q * tick / TICKS) / v, sf, si)
                    if abs(r) < 2**20 and abs(q - v_int * lw) < 2**61:
                        pos = _put(out, pos, _zz(q - v_int * lw))
                        pos = _put(out, pos, _zz(r))
                        derived = True
            if not derived:
                mask |= VW_RAW
                pos = _put_raw(out, pos, vw_bits)
        flags = (words[i, 7] >> 32) & 0xFFFFFFFF
        if flags:
            mask |= M_FLAGS
            pos = _put(out, pos, flags)
        out[at] = mask
    return pos


@njit(cache=True, inline="always")
def record_header(data: np.ndarray, pos: int) -> tuple[int, int, int]:
    """``(back, count, first bar start)`` of the record at ``pos``."""
    back, pos = _get(data, pos)
    count, pos = _get(data, pos)
    unit, pos = _get(data, pos)
    _, pos = _get(data, pos)
    if unit == 0:
        return back, count, _get_raw(data, pos)
    first, pos = _get(data, pos)
    return back, count, _unzz(first)


@njit(cache=True)
def decode_record(
    data: np.ndarray, pos: int, out: np.ndarray, at: int, sf: np.ndarray, si: np.ndarray
) -> int:
    """Decode the record at ``data[pos:]`` into int64 rows ``out[at:]``; return its bar count."""
    _, pos = _get(data, pos)
    count, pos = _get(data, pos)
    unit, pos = _get(data, pos)
    tick, pos = _get(data, pos)
    if unit == 0:
        s = _get_raw(data, pos)
        pos += 8
    else:
        z, pos = _get(data, pos)
        s = _unzz(z)
    prev_c = 0
    for i in range(at, at + count):
        mask = int(np.int64(data[pos]))
        pos += 1
        if i > at and unit == 0:
            s = _get_raw(data, pos)
            pos += 8
        elif i > at:
            if mask & M_NEXT:
                s += unit
            else:
                z, pos = _get(data, pos)
                s += _unzz(z) * unit
        out[i, 0] = s
        lw = 0
        if mask & M_RAW_PRICES:
            for w in range(1, 5):
                out[i, w] = _get_raw(data, pos)
                pos += 8
        else:
            z, pos = _get(data, pos)
            o = prev_c + _unzz(z)
            h = o
            lw = o
            c = o
            if not mask & M_ONE_PRICE:
                z, pos = _get(data, pos)
                h = o + _unzz(z)
                z, pos = _get(data, pos)
                lw = o - _unzz(z)
                z, pos = _get(data, pos)
                c = lw + _unzz(z)
            prev_c = c
            out[i, 1] = _bits(o * tick / TICKS, sf, si)
            out[i, 2] = _bits(h * tick / TICKS, sf, si)
            out[i, 3] = _bits(lw * tick / TICKS, sf, si)
            out[i, 4] = _bits(c * tick / TICKS, sf, si)
        v_int = 0
        if mask & M_V_RAW:
            out[i, 5] = _get_raw(data, pos)
            pos += 8
        else:
            v_int, pos = _get(data, pos)
            out[i, 5] = _bits(float(v_int), sf, si)
        n = 1
        if not mask & M_N_ONE:
            n, pos = _get(data, pos)
        mode = mask & M_VW
        if mode == VW_IS_C:
            out[i, 6] = out[i, 4]
        elif mode == VW_ONE_TRADE:
            sf[0] = 0.0
            si[0] = out[i, 4]
            c_float = sf[0]
            si[0] = out[i, 5]
            out[i, 6] = _bits(c_float * sf[0] / sf[0], sf, si)
        elif mode == VW_RAW:
            out[i, 6] = _get_raw(data, pos)
            pos += 8
        elif v_int == 0:
            out[i, 6] = NAN_BITS
        else:
            z, pos = _get(data, pos)
            q = _unzz(z) + v_int * lw
            z, pos = _get(data, pos)
            out[i, 6] = _bits((q * tick / TICKS) / float(v_int), sf, si) + _unzz(z)
        flags = 0
        if mask & M_FLAGS:
            flags, pos = _get(data, pos)
        out[i, 7] = ((flags - (1 << 32) if flags >= 1 << 31 else flags) << 32) | n
    return count


# --- the log --------------------------------------------------------------------------------


@njit(cache=True)
def log_pack(
    keys: np.ndarray,
    counts: np.ndarray,
    h_off: np.ndarray,
    h_start: np.ndarray,
    arena: np.ndarray,
    floats: np.ndarray,
    newest: np.ndarray,
    log: np.ndarray,
    log_state: tuple[np.ndarray, ...],
    sf: np.ndarray,
    si: np.ndarray,
) -> int:
    """Pack the oldest ``counts[j]`` held rows of each series ``keys[j]`` (its arena region
    from ``h_off + h_start``) as one record, and move ``h_start`` past them.

    Returns -1 when done, or the ``j`` at which no slot was free: grow the log and call again
    from there.
    """
    seg_slot, seg_max, seg_bars, free_slots, state = log_state
    table = seg_slot.shape[0]
    seg_bytes = state[L_SEG_BYTES]
    for j in range(keys.shape[0]):
        key = keys[j]
        count = counts[j]
        need = HEADER_MAX + count * BAR_MAX
        head = state[L_HEAD]
        if head % seg_bytes + need > seg_bytes:
            head = (head // seg_bytes + 1) * seg_bytes  # the rest of the segment stays unused
        seq = head // seg_bytes
        if seq != state[L_OPEN]:
            if state[L_FREE] == 0:
                return j
            state[L_FREE] -= 1
            seg_slot[seq % table] = free_slots[state[L_FREE]]
            seg_max[seq % table] = INT64_MIN
            seg_bars[seq % table] = 0
            state[L_OPEN] = seq
        state[L_HEAD] = head
        back = 0
        if newest[key] >= state[L_TAIL] * seg_bytes:
            back = head - newest[key]
        lo = h_off[key] + h_start[key]
        base = seg_slot[seq % table] * seg_bytes
        end = encode_record(
            arena, floats, lo, lo + count, back, log, base + head % seg_bytes, sf, si
        )
        newest[key] = head
        state[L_HEAD] = head + end - (base + head % seg_bytes)
        seg_max[seq % table] = max(seg_max[seq % table], arena[lo + count - 1, 0])
        seg_bars[seq % table] += count
        state[L_BARS] += count
        h_start[key] += count
    return -1


@njit(cache=True)
def log_free(cutoff: int, log_state: tuple[np.ndarray, ...]) -> int:
    """Free the oldest segments whose bars all start before ``cutoff`` (never the one being
    written); return how many."""
    seg_slot, seg_max, seg_bars, free_slots, state = log_state
    table = seg_slot.shape[0]
    freed = 0
    while state[L_TAIL] < state[L_OPEN] and seg_max[state[L_TAIL] % table] < cutoff:
        at = state[L_TAIL] % table
        free_slots[state[L_FREE]] = seg_slot[at]
        state[L_FREE] += 1
        state[L_BARS] -= seg_bars[at]
        state[L_TAIL] += 1
        freed += 1
    return freed


@njit(cache=True, inline="always")
def _physical(position: int, seg_slot: np.ndarray, seg_bytes: int) -> int:
    slot = int(np.int64(seg_slot[(position // seg_bytes) % seg_slot.shape[0]]))
    return slot * seg_bytes + position % seg_bytes


@njit(cache=True)
def log_walk(
    position: int,
    since: int,
    before: int,
    limit: int,
    log: np.ndarray,
    log_state: tuple[np.ndarray, ...],
    records: np.ndarray,
) -> tuple[int, int]:
    """Follow a series' chain from its newest record at ``position``; collect the physical
    positions of the records that can hold bars with ``since <= s < before``, newest first,
    until they hold ``limit`` such bars (``limit < 0``: no limit).

    Returns ``(records collected, bars in them)``, or ``(-1, 0)`` when ``records`` is too small.
    """
    seg_slot, _, _, _, state = log_state
    seg_bytes = state[L_SEG_BYTES]
    oldest = state[L_TAIL] * seg_bytes
    found = 0
    bars = 0
    newest_count = 0
    while position >= oldest:
        at = _physical(position, seg_slot, seg_bytes)
        back, count, first = record_header(log, at)
        if first < before:
            if found == records.shape[0]:
                return -1, 0
            records[found] = at
            found += 1
            bars += count
            if found == 1:
                newest_count = count  # the only record that may hold bars at or after before
            if first < since or (limit >= 0 and bars - newest_count >= limit):
                break
        if back == 0:
            break
        position -= back
    return found, bars


@njit(cache=True)
def log_decode(
    records: np.ndarray,
    found: int,
    log: np.ndarray,
    out: np.ndarray,
    sf: np.ndarray,
    si: np.ndarray,
) -> None:
    """Decode the collected records (newest first in ``records``) into ``out``, oldest first."""
    at = 0
    for r in range(found - 1, -1, -1):
        at += decode_record(log, records[r], out, at, sf, si)
