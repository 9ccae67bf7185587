"""The agg's frame decoder kernels: a batch of received wire frames to trade columns, in one call.

:func:`decode_frames` copies each TRADES message's records out with their symbol id and the
feed clock at their arrival, counts sequence gaps per topic, moves the feed clock on CLOCK
records and hands other control frames back; :func:`unknown_topics` lists a batch's topics not
yet in the table, so the caller registers them at once. The state is
:class:`polyfan.wire.ingest.FrameDecoder`'s, passed as grouped arrays:

- ``topics``: the topic table's arrays (:mod:`polyfan.wire.topics`);
- ``per_topic = (topic_sym, last_session, last_seq, seen)``, indexed by topic id;
- ``state``: the D_* words below; ``symbol_trades``: trades per symbol id;
- ``out = (out_trades, out_words, out_sym, out_clock, specials)``: the batch's outputs.

The layout constants are the wire's (:mod:`polyfan.wire.codec`), copied for numba; the tests
check the copies.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from polyfan.wire.topics import TopicArrays, find_topic

INT64_MIN = np.iinfo(np.int64).min
INT64_MAX = np.iinfo(np.int64).max

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
KIND_QUOTES = 9
KIND_AGGREGATES = 10
KIND_LULD = 11
MAX_KIND = 12  # RAW: the proxy's unparsed events (the agg subscribes none of 9-12)
QUOTE_SIZE = 64
AGG_SIZE = 104
LULD_SIZE = 48

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
    per_topic: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
    symbol_trades: np.ndarray,
    state: np.ndarray,
    out: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray],
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
    topic_sym, last_session, last_seq, seen = per_topic
    out_trades, out_words, out_sym, out_clock, specials = out
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
            or (kind == KIND_QUOTES and size != count * QUOTE_SIZE)
            or (kind == KIND_AGGREGATES and size != count * AGG_SIZE)
            or (kind == KIND_LULD and size != count * LULD_SIZE)
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


@njit(cache=True)
def group_by_symbol(
    records: np.ndarray,
    symbols: np.ndarray,
    count: int,
    out: np.ndarray,
    work: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray],
) -> int:
    """Trades ``0..count`` (raw TRADE records in ``records``, their symbol ids in ``symbols``)
    copied to ``out`` grouped by symbol, each group in arrival order, the groups in the order
    of their first trade. ``work = (slot, ids, bounds, fill)``: ``slot`` has an entry per
    symbol id, all -1 (left so); ``ids[g]`` is group g's symbol id and its trades are
    ``out`` records ``bounds[g]`` to ``bounds[g + 1]``. Returns the number of groups."""
    slot, ids, bounds, fill = work
    groups = 0
    for i in range(count):
        symbol = symbols[i]
        g = slot[symbol]
        if g < 0:
            g = groups
            slot[symbol] = g
            ids[g] = symbol
            fill[g] = 0
            groups += 1
        fill[g] += 1
    bounds[0] = 0
    for g in range(groups):
        bounds[g + 1] = bounds[g] + fill[g]
        fill[g] = bounds[g]
    for i in range(count):
        g = slot[symbols[i]]
        at = fill[g]
        fill[g] = at + 1
        out[at * TRADE_SIZE : (at + 1) * TRADE_SIZE] = records[
            i * TRADE_SIZE : (i + 1) * TRADE_SIZE
        ]
    for g in range(groups):
        slot[ids[g]] = -1
    return groups
