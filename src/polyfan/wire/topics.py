"""The one topic table: byte strings (ZeroMQ topics, symbols) to small ids, numba hash included.

Both ends of the wire intern names the same way: the proxy's frame scanner
(:mod:`polyfan.feed.scan`) turns a trade's symbol into a symbol id, and the agg's frame decoder
(:mod:`polyfan.wire.decode`) turns a message's topic into a topic id. One table, one hash, one
probe, one insert:

- ``arrays = (slots, names, lengths, count)``: ``slots`` is an open-addressing table whose size
  is a power of two (slot -> id, -1 when empty), kept at most half full; ``names[id, :lengths[id]]``
  are the id's bytes; ``count[0]`` is how many ids there are. Ids are given in order, 0, 1, 2 ...
- :func:`topic_hash` (djb2 kept to 32 bits, folded), :func:`find_topic` (linear probing),
  :func:`add_topic` (a new id: its bytes, then its slot) are ``@njit(cache=True)`` kernels that
  take the arrays as one tuple (free in numba: the tuple is unpacked at compile time).
- :class:`TopicTable` owns the arrays: a fixed table for the scanner, which interns inside its
  kernel, or one that grows from Python (:meth:`TopicTable.add`) for the decoder.

numba's cache keys a kernel on its own file only, and these kernels are compiled into their
callers (``scan_frame``, ``decode_frames``): after changing this file, delete the callers'
cached code too (``find src -name '*.nb[ci]' -delete``), or they keep the old hash.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from numba import njit

from polyfan.jit import chosen

TopicArrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]


@njit(cache=True, inline="always")
def topic_hash(buf: np.ndarray, start: int, length: int) -> int:
    """djb2 kept to 32 bits (no overflow compiled or not), its high bits folded into the low."""
    h = 5381
    for j in range(start, start + length):
        h = (h * 33 + int(buf[j])) & 0xFFFFFFFF
    return h ^ (h >> 15)


@njit(cache=True, inline="always")
def _probe(buf: np.ndarray, start: int, length: int, arrays: TopicArrays) -> int:
    """The slot holding ``buf[start:start + length]``, or the empty slot where it would go."""
    slots, names, lengths, _ = arrays
    mask = slots.shape[0] - 1
    at = topic_hash(buf, start, length) & mask
    while True:
        tid = slots[at]
        if tid < 0:
            return int(at)
        if lengths[tid] == length:
            same = True
            for j in range(length):
                if names[tid, j] != buf[start + j]:
                    same = False
                    break
            if same:
                return int(at)
        at = (at + 1) & mask


@njit(cache=True, inline="always")
def find_topic(buf: np.ndarray, start: int, length: int, arrays: TopicArrays) -> int:
    """The id of ``buf[start:start + length]``, or -1 if it is not in the table."""
    return int(arrays[0][_probe(buf, start, length, arrays)])


@njit(cache=True)
def add_topic(buf: np.ndarray, start: int, length: int, arrays: TopicArrays) -> int:
    """A new id for ``buf[start:start + length]`` (not in the table), or -1 when the table is
    full (no name row left, or the slots would be more than half full) or the name too long."""
    slots, names, lengths, count = arrays
    tid = count[0]
    if tid >= names.shape[0] or 2 * (tid + 1) > slots.shape[0] or length > names.shape[1]:
        return -1
    count[0] = tid + 1
    lengths[tid] = length
    for j in range(length):
        names[tid, j] = buf[start + j]
    _insert(tid, arrays)
    return int(tid)


@njit(cache=True, inline="always")
def _insert(tid: int, arrays: TopicArrays) -> None:
    slots, names, lengths, _ = arrays
    slots[_probe(names[tid], 0, lengths[tid], arrays)] = tid


@njit(cache=True)
def insert_topics(arrays: TopicArrays, first: int, stop: int) -> None:
    """Put ids ``first .. stop - 1`` (named, not yet in the slots) into the slots: every id
    once the slots have just been resized."""
    for tid in range(first, stop):
        _insert(tid, arrays)


class TopicTable:
    """Names to ids in arrays the kernels use (``arrays``); ``width`` bytes at most per name.

    A table made with ``grow=True`` doubles its rows and slots as :meth:`add` needs; the
    ``arrays`` tuple is then a new one, so callers read it at each call, never keep it.
    """

    def __init__(
        self, width: int, *, rows: int = 32, slots: int = 64, grow: bool = True, jit: bool = True
    ) -> None:
        if slots & (slots - 1) or slots < 2 * rows:
            raise ValueError(f"slots must be a power of two >= 2 * rows, not {slots}")
        self._grow = grow
        self._add: Callable[..., Any] = chosen(add_topic, jit)
        self._find: Callable[..., Any] = chosen(find_topic, jit)
        self._insert_topics: Callable[..., Any] = chosen(insert_topics, jit)
        self.arrays: TopicArrays = (
            np.full(slots, -1, np.int64),
            np.zeros((rows, width), np.uint8),
            np.zeros(rows, np.int64),
            np.zeros(1, np.int64),
        )
        self._insert_topics(self.arrays, 0, 0)  # loads the kernels now, not in a batch

    def __len__(self) -> int:
        return int(self.arrays[3][0])

    @property
    def rows(self) -> int:
        """Ids the table can hold before it grows (or, fixed, fills)."""
        return len(self.arrays[2])

    def bytes_of(self, tid: int) -> bytes:
        return bytes(self.arrays[1][tid, : self.arrays[2][tid]])

    def find(self, name: bytes) -> int:
        """The id of ``name``, or -1."""
        data = np.frombuffer(name, np.uint8)
        return int(self._find(data, 0, len(data), self.arrays))

    def add(self, name: bytes) -> int:
        """A new id for ``name`` (which must not be in the table); -1 if a fixed table is full
        or the name is longer than the width."""
        slots, names, lengths, count = self.arrays
        tid = int(count[0])
        if self._grow and len(name) <= names.shape[1]:
            if tid >= len(lengths):
                names = np.concatenate([names, np.zeros_like(names)])
                lengths = np.concatenate([lengths, np.zeros_like(lengths)])
            if 2 * (tid + 1) > len(slots):
                slots = np.full(2 * len(slots), -1, np.int64)
                self._insert_topics((slots, names, lengths, count), 0, tid)
            self.arrays = (slots, names, lengths, count)
        data = np.frombuffer(name, np.uint8)
        return int(self._add(data, 0, len(data), self.arrays))
