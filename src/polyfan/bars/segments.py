"""The agg's bar store as bytes: write-ahead frames and sealed segments (docs/store.md).

Pure: arrays in, bytes out, and back. The files, the writer thread and the flushing are
:mod:`polyfan.store`'s.

A **write-ahead frame** holds every bar closed since the previous flush; frames are appended to
one log file at a time. Little-endian::

    magic   4 bytes  b"PFW1"
    length  u32      payload bytes
    crc     u32      CRC-32 of the clock's 8 bytes and the payload
    clock   i64      the feed clock at the flush: every bar closed by then is in this frame or
                     an earlier one (unless counted as dropped)
    payload u32 names new to this log file, each as u8 length + ASCII
            u32 bars, then per bar (u32 name number in the file, u32 interval ms), then the
            bars as BAR records (64 bytes each, docs/wire.md)

Names are numbered per log file in the order they first appear. A frame that is cut short
(the process died while writing it) or whose checksum fails ends what is read: everything
before it is whole.

A **segment** is a sealed log file: the same bars grouped by series (symbol, interval), each
series' bars oldest first in records of up to ``RECORD_BARS`` bars of the lossless codec the
agg keeps older bars in memory with (:mod:`polyfan.bars.barcodec`), chained newest to oldest
through each record's ``back`` field, so a lookup walks one series' records from its newest
(:func:`barcodec.log_walk`) and decodes only those it needs::

    b"PFS1" u32 version (1)
    records
    names   the symbols, joined by "\\n"
    hashes  i64 per series, ascending: a 63-bit hash of the symbol (``symbol_hash``)
    index   per series, SEGMENT_INDEX: interval, name number, position of its newest record,
            bar count
    footer  SEGMENT_FOOTER: magic b"PFSE", version, series, bars, where names and index
            start, the oldest and newest bar start, the feed clock of its last frame, CRC-32
            of names, hashes and index
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from numba import njit

from polyfan.bars import barcodec
from polyfan.wire import codec

FRAME_MAGIC = b"PFW1"
FRAME_HEAD = struct.Struct("<4sII")
FRAME_CLOCK = struct.Struct("<q")
KEY_DTYPE = np.dtype([("name", "<u4"), ("interval", "<u4")])
SEGMENT_MAGIC = b"PFS1"
SEGMENT_END = b"PFSE"
SEGMENT_VERSION = 1
SEGMENT_HEAD = struct.Struct("<4sI")
SEGMENT_FOOTER = struct.Struct("<4sIQQQQQqqqI")
SEGMENT_INDEX = np.dtype([("interval", "<u4"), ("name", "<u4"), ("last", "<i8"), ("count", "<i8")])
RECORD_BARS = 64  # bars per record at most: a lookup decodes whole records
BAR_WORDS = codec.BAR_DTYPE.itemsize // 8
_BAR = codec.BAR_DTYPE.itemsize
_EMPTY = np.zeros(0, dtype=codec.BAR_DTYPE)


def symbol_hash(name: str) -> int:
    """A 63-bit hash of a symbol (the segment index's sort key; names are compared too)."""
    digest = hashlib.blake2b(name.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


# --- write-ahead frames -------------------------------------------------------------------


def encode_frame(
    clock: int, new_names: list[str], name: np.ndarray, interval: np.ndarray, bars: np.ndarray
) -> bytes:
    """One flush: the names new to the log file, then each bar's key and the bars."""
    parts = [struct.pack("<I", len(new_names))]
    for symbol in new_names:
        raw = symbol.encode()
        parts.append(bytes([len(raw)]) + raw)
    keys = np.empty(len(bars), dtype=KEY_DTYPE)
    keys["name"] = name
    keys["interval"] = interval
    parts += [
        struct.pack("<I", len(bars)),
        keys.tobytes(),
        np.ascontiguousarray(bars, dtype=codec.BAR_DTYPE).tobytes(),
    ]
    payload = b"".join(parts)
    clock_bytes = FRAME_CLOCK.pack(clock)
    crc = zlib.crc32(payload, zlib.crc32(clock_bytes))
    return FRAME_HEAD.pack(FRAME_MAGIC, len(payload), crc) + clock_bytes + payload


@dataclass
class LogContents:
    """What a write-ahead log holds that is whole: names, per-bar keys, bars, the last clock;
    ``whole`` bytes of it, and why the rest (if any) was cut."""

    names: list[str]
    name: np.ndarray
    interval: np.ndarray
    bars: np.ndarray
    clock: int | None
    frames: int
    whole: int
    problem: str | None


def decode_log(data: bytes) -> LogContents:
    """Every whole frame of a write-ahead log, up to the first that is cut short or damaged."""
    names: list[str] = []
    keys: list[np.ndarray] = []
    bars: list[np.ndarray] = []
    clock: int | None = None
    pos = frames = 0
    problem: str | None = None
    head = FRAME_HEAD.size + FRAME_CLOCK.size
    view = memoryview(data)
    while pos < len(data):
        if len(data) - pos < head:
            problem = f"a frame head cut short ({len(data) - pos} bytes)"
            break
        magic, length, crc = FRAME_HEAD.unpack_from(data, pos)
        if magic != FRAME_MAGIC:
            problem = f"no frame at byte {pos} (magic {bytes(magic)!r})"
            break
        end = pos + head + length
        if end > len(data):
            problem = f"a frame cut short ({len(data) - pos} of {head + length} bytes)"
            break
        body = view[pos + FRAME_HEAD.size : end]
        if zlib.crc32(body) != crc:
            problem = f"a frame at byte {pos} fails its checksum"
            break
        try:
            frame_names, frame_keys, frame_bars = _frame_payload(bytes(body[FRAME_CLOCK.size :]))
        except (ValueError, UnicodeDecodeError, IndexError, struct.error) as exc:
            problem = f"a frame at byte {pos} does not decode: {exc}"
            break
        names += frame_names
        keys.append(frame_keys)
        bars.append(frame_bars)
        clock = FRAME_CLOCK.unpack_from(body)[0]
        frames += 1
        pos = end
    key = np.concatenate(keys) if keys else np.zeros(0, dtype=KEY_DTYPE)
    if len(key) and int(key["name"].max()) >= len(names):
        raise ValueError("a bar names a symbol the log never introduced")
    return LogContents(
        names=names,
        name=key["name"].astype(np.int64),
        interval=key["interval"].astype(np.int64),
        bars=np.concatenate(bars) if bars else _EMPTY,
        clock=clock,
        frames=frames,
        whole=pos,
        problem=problem,
    )


def _frame_payload(payload: bytes) -> tuple[list[str], np.ndarray, np.ndarray]:
    (count,) = struct.unpack_from("<I", payload, 0)
    pos = 4
    names = []
    for _ in range(count):
        size = payload[pos]
        names.append(payload[pos + 1 : pos + 1 + size].decode("ascii"))
        pos += 1 + size
    (bars,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    if len(payload) != pos + bars * (KEY_DTYPE.itemsize + _BAR):
        raise ValueError(f"{bars} bars do not fill {len(payload) - pos} bytes")
    keys = np.frombuffer(payload, KEY_DTYPE, bars, pos)
    pos += bars * KEY_DTYPE.itemsize
    return names, keys, np.frombuffer(payload, codec.BAR_DTYPE, bars, pos)


# --- segments -----------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def pack_series(
    words: np.ndarray,
    floats: np.ndarray,
    run_lo: np.ndarray,
    run_hi: np.ndarray,
    per_record: int,
    out: np.ndarray,
    pos: int,
    last: np.ndarray,
    sf: np.ndarray,
    si: np.ndarray,
) -> int:
    """Encode each run of BAR rows ``[run_lo[r], run_hi[r])`` (one series, oldest first) as
    records of up to ``per_record`` bars at ``out[pos:]``, each record's ``back`` the distance
    to the run's previous record; ``last[r]``: the position of the run's newest record. Returns
    the end. (No GIL: the store's writer thread packs while the agg's loop runs.)"""
    for r in range(run_lo.shape[0]):
        prev = -1
        lo = run_lo[r]
        while lo < run_hi[r]:
            hi = min(lo + per_record, run_hi[r])
            back = 0 if prev < 0 else pos - prev
            prev = pos
            pos = barcodec.encode_record(words, floats, lo, hi, back, out, pos, sf, si)
            lo = hi
        last[r] = prev
    return pos


def encode_segment(
    names: list[str],
    name: np.ndarray,
    interval: np.ndarray,
    bars: np.ndarray,
    clock: int,
    *,
    per_record: int = RECORD_BARS,
    jit: bool = True,
) -> bytes:
    """A segment of the bars whose keys are ``names[name[i]]`` and ``interval[i]``, in the
    order they were closed. A series' bars are sorted by start; a start repeated keeps its
    first copy (only a restarted agg can make one again, from a stray trade)."""
    hashes = np.array([symbol_hash(n) for n in names], dtype=np.int64)
    bars = np.ascontiguousarray(bars, dtype=codec.BAR_DTYPE)
    order = np.lexsort((bars["s"], interval, name, hashes[name] if len(name) else name))
    bars, name, interval = bars[order], name[order], interval[order]
    key_h = hashes[name] if len(name) else name
    same = (key_h[1:] == key_h[:-1]) & (name[1:] == name[:-1]) & (interval[1:] == interval[:-1])
    keep = np.ones(len(bars), dtype=bool)
    keep[1:] = ~(same & (bars["s"][1:] == bars["s"][:-1]))
    if not keep.all():
        bars, name, interval, key_h = bars[keep], name[keep], interval[keep], key_h[keep]
        same = (key_h[1:] == key_h[:-1]) & (name[1:] == name[:-1]) & (interval[1:] == interval[:-1])
    starts = np.flatnonzero(np.concatenate([[True], ~same])) if len(bars) else np.zeros(0, int)
    ends = np.append(starts[1:], len(bars)).astype(np.int64)
    starts = starts.astype(np.int64)
    runs = len(starts)
    n_records = int(((ends - starts + per_record - 1) // per_record).sum())
    room = SEGMENT_HEAD.size + n_records * barcodec.HEADER_MAX + len(bars) * barcodec.BAR_MAX
    out = np.empty(room, dtype=np.uint8)
    out[: SEGMENT_HEAD.size] = np.frombuffer(
        SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEGMENT_VERSION), np.uint8
    )
    last = np.zeros(runs, dtype=np.int64)
    words = bars.view(np.int64).reshape(len(bars), BAR_WORDS)
    scratch = np.zeros(1, dtype=np.float64)
    pack = pack_series if jit else pack_series.py_func
    end = pack(
        words,
        words.view(np.float64),
        starts,
        ends,
        per_record,
        out,
        SEGMENT_HEAD.size,
        last,
        scratch,
        scratch.view(np.int64),
    )
    names_raw = "\n".join(names).encode()
    index = np.zeros(runs, dtype=SEGMENT_INDEX)
    index["interval"] = interval[starts] if runs else 0
    index["name"] = name[starts] if runs else 0
    index["last"] = last
    index["count"] = ends - starts
    names_off = _aligned(end)
    tables = names_raw + b"\0" * (_aligned(len(names_raw)) - len(names_raw))
    tables += key_h[starts].astype("<i8").tobytes() if runs else b""
    tables += index.tobytes()
    index_off = names_off + _aligned(len(names_raw))
    footer = SEGMENT_FOOTER.pack(
        SEGMENT_END,
        SEGMENT_VERSION,
        runs,
        len(bars),
        names_off,
        len(names_raw),
        index_off,
        int(bars["s"].min()) if len(bars) else 0,
        int(bars["s"].max()) if len(bars) else -1,
        clock,
        zlib.crc32(tables),
    )
    return b"".join([out[:end].tobytes(), b"\0" * (names_off - end), tables, footer])


def _aligned(n: int) -> int:
    return (n + 7) // 8 * 8


class SegmentError(ValueError):
    """A segment that is not whole (its footer or tables do not check)."""


class Segment:
    """A sealed segment read in place (``data``: its bytes, a memory map in the store)."""

    def __init__(self, data: np.ndarray, *, jit: bool = True) -> None:
        if len(data) < SEGMENT_HEAD.size + SEGMENT_FOOTER.size:
            raise SegmentError(f"{len(data)} bytes: too short for a segment")
        head = bytes(data[: SEGMENT_HEAD.size])
        footer = SEGMENT_FOOTER.unpack(bytes(data[len(data) - SEGMENT_FOOTER.size :]))
        magic, version, runs, bars, names_off, names_len, index_off, lo, hi, clock, crc = footer
        if head != SEGMENT_HEAD.pack(SEGMENT_MAGIC, SEGMENT_VERSION) or magic != SEGMENT_END:
            raise SegmentError("not a segment (magic)")
        if version != SEGMENT_VERSION:
            raise SegmentError(f"segment version {version} is not {SEGMENT_VERSION}")
        tables_end = index_off + runs * (8 + SEGMENT_INDEX.itemsize)
        if not names_off <= index_off <= tables_end == len(data) - SEGMENT_FOOTER.size:
            raise SegmentError("the footer's offsets do not fit the file")
        if zlib.crc32(data[names_off:tables_end].tobytes()) != crc:
            raise SegmentError("names and index fail their checksum")
        self.data = data
        self.series = int(runs)
        self.bars = int(bars)
        self.oldest = int(lo)
        self.newest = int(hi)
        self.clock = int(clock)
        self.names = bytes(data[names_off : names_off + names_len]).decode("ascii").split("\n")
        self.hashes = data[index_off : index_off + 8 * runs].view("<i8")
        self.index = data[index_off + 8 * runs : tables_end].view(SEGMENT_INDEX)
        self._walk = barcodec.log_walk if jit else barcodec.log_walk.py_func
        self._decode = barcodec.log_decode if jit else barcodec.log_decode.py_func
        state = np.zeros(barcodec.N_LOG, dtype=np.int64)
        state[barcodec.L_SEG_BYTES] = max(1, len(data))
        zero = np.zeros(1, dtype=np.int64)
        self._log_state = (zero, zero, zero, zero, state)

    def find(self, name: str, interval: int, key: int | None = None) -> int:
        """The index row of a series, or -1."""
        key = symbol_hash(name) if key is None else key
        lo = int(np.searchsorted(self.hashes, key, "left"))
        hi = int(np.searchsorted(self.hashes, key, "right"))
        for row in range(lo, hi):
            entry = self.index[row]
            if int(entry["interval"]) == interval and self.names[int(entry["name"])] == name:
                return row
        return -1

    def select(
        self,
        name: str,
        interval: int,
        since: int | None = None,
        before: int | None = None,
        limit: int | None = None,
        key: int | None = None,
    ) -> np.ndarray:
        """The series' bars with ``since <= s < before``, the newest ``limit``, oldest first."""
        row = self.find(name, interval, key)
        if row < 0:
            return _EMPTY
        low = barcodec.INT64_MIN if since is None else since
        high = 2**63 - 1 if before is None else before
        records = np.empty(64, dtype=np.int64)
        while True:
            found, count = self._walk(
                int(self.index[row]["last"]),
                low,
                high,
                -1 if limit is None else limit,
                self.data,
                self._log_state,
                records,
            )
            if found >= 0:
                break
            records = np.empty(2 * len(records), dtype=np.int64)
        if found == 0:
            return _EMPTY
        out = np.empty((count, BAR_WORDS), dtype=np.int64)
        scratch = np.zeros(1, dtype=np.float64)
        self._decode(records, found, self.data, out, scratch, scratch.view(np.int64))
        bars = out.view(codec.BAR_DTYPE).reshape(count)
        bars = bars[(bars["s"] >= low) & (bars["s"] < high)]
        return bars if limit is None else bars[max(0, len(bars) - limit) :]

    def all_bars(self) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        """Every bar: ``(names, name number per bar, interval per bar, bars)`` (tests, bench)."""
        names, intervals, bars = [], [], []
        for entry in self.index:
            symbol = self.names[int(entry["name"])]
            got = self.select(symbol, int(entry["interval"]))
            names.append(np.full(len(got), int(entry["name"]), dtype=np.int64))
            intervals.append(np.full(len(got), int(entry["interval"]), dtype=np.int64))
            bars.append(got)
        if not bars:
            return self.names, np.zeros(0, np.int64), np.zeros(0, np.int64), _EMPTY
        return self.names, np.concatenate(names), np.concatenate(intervals), np.concatenate(bars)


def warm_up() -> None:
    """Load the segment kernels (pack, and walk and decode over read-only bytes, as a memory
    map gives them) so that no flush or request waits for numba."""
    bars = np.zeros(3, dtype=codec.BAR_DTYPE)
    bars["s"] = [0, 100, 200]
    bars["o"] = bars["h"] = bars["l"] = bars["c"] = bars["vw"] = 1.0
    bars["v"] = bars["n"] = 1
    data = encode_segment(
        ["WARM"], np.zeros(3, np.int64), np.full(3, 100, np.int64), bars, 300, per_record=2
    )
    segment = Segment(np.frombuffer(data, dtype=np.uint8))
    segment.select("WARM", 100, since=0, limit=2)
