"""The agg's bar encoder kernel: closed bars to one BARS wire message per topic, in one call.

:func:`encode_bars` writes the messages :class:`polyfan.bars.aggregator.Aggregator` publishes,
with the header layout of :mod:`polyfan.wire.codec`. numba's cache keys on this file alone, so
the layout constants are literal copies here (the tests check them against the codec's).
"""

from __future__ import annotations

import numpy as np
from numba import njit

HEADER_SIZE = 24
BAR_SIZE = 64
WIRE_VERSION = 1
KIND_BARS = 2


@njit(cache=True, inline="always")
def _put_u64(out: np.ndarray, at: int, value: np.uint64) -> None:
    for j in range(8):
        out[at + j] = np.uint8((value >> np.uint64(8 * j)) & np.uint64(255))


@njit(cache=True)
def encode_bars(
    series: np.ndarray,
    raw: np.ndarray,
    topics: tuple[np.ndarray, np.ndarray],
    seqs: np.ndarray,
    session: np.uint64,
    out: np.ndarray,
    offsets: np.ndarray,
) -> int:
    """One BARS message per run of equal ``series`` (each series' bars adjacent, oldest first).

    ``topics = (topic_bytes, topic_len)`` are the bar topics by series; ``raw`` is the bars'
    bytes (BAR_DTYPE records back to back); message i is ``out[offsets[i]:offsets[i + 1]]``. ``seqs[series]`` is the topic's last sequence number.
    ``out`` needs ``runs * (TOPIC_WIDTH + 1 + HEADER_SIZE) + len(raw)`` bytes. Returns the
    number of messages.
    """
    topic_bytes, topic_len = topics
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
