"""``polyfan agg --store DIR``: closed bars on disk, read back at start (docs/store.md).

The files, the writer thread and the reads; the byte layouts are :mod:`polyfan.bars.segments`'.

- The agg's loop hands every published batch of closed bars to :meth:`BarStore.put`, which only
  queues them (bounded: past ``MAX_QUEUED_BARS`` a batch is dropped, counted and logged).
- The writer thread wakes every ``--flush``, appends one checksummed frame with everything
  queued to the open write-ahead log ``DIR/wal/<clock>.log`` and ``fdatasync``\\ s it: a
  ``kill -9`` loses at most the bars closed since the last flush.
- Every ``seal_ms`` of feed clock it rolls to a new log and seals the old one into a segment
  ``DIR/seg/<oldest s>-<clock>.bars`` (written to a temporary name, ``fsync``\\ ed, renamed,
  the directory ``fsync``\\ ed), then deletes the log. Segments past ``--retain`` (their newest
  bar older than the feed clock minus it) are deleted whole.
- Segments past the retention are also looked for on a timer (every ``retain_every_s``), so a
  store that closes no bar still deletes its old segments.
- At start, :meth:`BarStore.open` seals what logs a previous process left (their whole frames;
  a cut or damaged tail is logged with its size and skipped), maps every segment and deletes
  those past the retention.

Reads (:meth:`BarStore.select`, from the agg's loop) see the sealed segments only. The bars
queued or in the open log are still in the agg's memory: :meth:`BarStore.unsealed_from` is the
oldest start among them, and the agg's history keeps every bar from there on
(:meth:`polyfan.bars.history.History.trim`), whatever ``--history`` says, until they are
sealed. ``polyfan_agg_store_durable_until`` is the feed clock of the last frame synced: every
bar the agg closed by then survives a ``kill -9``.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polyfan.bars import segments
from polyfan.metrics import Registry
from polyfan.wire import codec

log = logging.getLogger("polyfan.agg.store")

SEAL_MS = 60_000  # a log is sealed into a segment every minute of feed clock at most
MAX_QUEUED_BARS = 2_000_000  # bars waiting for the writer (~150 MB); past it, dropped
RETAIN_EVERY_S = 60.0  # the retention is applied at least this often, bars or none
WARN_EVERY_S = 5.0
_NONE = 2**63 - 1  # no bar waiting to be sealed
_EMPTY = np.zeros(0, dtype=codec.BAR_DTYPE)


@dataclass(frozen=True)
class Loaded:
    """What :meth:`BarStore.open` found."""

    segments: int
    bars: int
    sealed_logs: int
    cut_bytes: int
    removed: int
    stored_to: int | None  # the feed clock of the last flush found (None: an empty store)
    oldest: int | None  # the oldest bar start on disk
    seconds: float


class BarStore:
    """Closed bars on disk for one agg: write-ahead logs, sealed segments, reads."""

    def __init__(
        self,
        directory: Path,
        intervals: Sequence[int],
        *,
        retain_ms: int,
        flush_ms: int,
        seal_ms: int = SEAL_MS,
        registry: Registry | None = None,
        max_queued_bars: int = MAX_QUEUED_BARS,
    ) -> None:
        self.directory = Path(directory)
        self.intervals = np.asarray(intervals, dtype=np.int64)
        self.retain_ms = retain_ms
        self.flush_s = flush_ms / 1000
        self.seal_ms = seal_ms
        # short retentions (tests) are looked at more often; never more than once a flush
        self.retain_every_s = max(self.flush_s, min(RETAIN_EVERY_S, retain_ms / 10_000))
        self.max_queued_bars = max_queued_bars
        self._wal_dir = self.directory / "wal"
        self._seg_dir = self.directory / "seg"
        self._segments: tuple[tuple[Path, segments.Segment], ...] = ()  # oldest first
        self._queue: deque[tuple[np.ndarray, np.ndarray, int]] = deque()
        self._queued = 0
        # the oldest bar start queued, taken by the writer, and in the open log (or being
        # sealed): memory keeps every bar from the oldest of them until it is in a segment
        # (unsealed_from)
        self._queued_oldest = _NONE
        self._taken_oldest = _NONE
        self._log_oldest = _NONE
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._names: Sequence[str] = ()
        self._wal: _OpenLog | None = None
        self._clock: int | None = None  # the clock of the last frame written
        self._latest_clock: int | None = None  # the loop's latest (a plain int: no lock)
        self.stored_to: int | None = None
        self.oldest: int | None = None
        self._warned: dict[str, float] = {}
        self._oldest_of: tuple[object, int | None] = (None, None)
        registry = registry or Registry()
        self.written_total = registry.counter(
            "polyfan_agg_store_bars_written_total", "Closed bars written to --store (flushed)."
        )
        self.dropped_total = registry.counter(
            "polyfan_agg_store_dropped_bars_total",
            "Closed bars not written to --store: the writer's queue was full, or a write failed.",
        )
        self.errors_total = registry.counter(
            "polyfan_agg_store_write_errors_total", "Writes to --store that failed (logged)."
        )
        self.flush_seconds = registry.counter(
            "polyfan_agg_store_flush_seconds_total",
            "Time the store's writer thread spent appending and syncing flushes.",
        )
        self.seal_seconds = registry.counter(
            "polyfan_agg_store_seal_seconds_total",
            "Time the store's writer thread spent sealing logs into segments.",
        )
        self.segments_gauge = registry.gauge("polyfan_agg_store_segments", "Segments on disk.")
        self.bytes_gauge = registry.gauge(
            "polyfan_agg_store_bytes", "Bytes of segments on disk (open logs not included)."
        )
        self.queued_gauge = registry.gauge(
            "polyfan_agg_store_queued_bars", "Closed bars waiting for the store's writer."
        )
        self.durable_gauge = registry.gauge(
            "polyfan_agg_store_durable_until",
            "Feed clock (Unix ms) of the last flush synced to --store: every bar the agg closed "
            "by then survives a kill -9 (0: none yet).",
        )
        registry.on_collect(self._collect)

    def _collect(self) -> None:
        held = self._segments
        self.segments_gauge.value = len(held)
        self.bytes_gauge.value = sum(len(segment.data) for _, segment in held)
        self.queued_gauge.value = self._queued

    # --- start ----------------------------------------------------------------------------

    def open(self) -> Loaded:
        """Seal what logs a previous process left, map every segment, apply the retention."""
        started = time.perf_counter()
        self._wal_dir.mkdir(parents=True, exist_ok=True)
        self._seg_dir.mkdir(parents=True, exist_ok=True)
        for stale in self._seg_dir.glob("*.tmp"):
            stale.unlink()
        sealed = cut = 0
        for path in sorted(self._wal_dir.glob("*.log"), key=_log_order):
            cut += self._seal_file(path, loading=True)
            sealed += 1
        held = []
        for path in sorted(self._seg_dir.glob("*.bars"), key=_segment_order):
            try:
                held.append((path, _map_segment(path)))
            except (OSError, segments.SegmentError) as exc:
                log.warning("store: %s skipped: %s", path, exc)
        self._segments = tuple(held)
        clocks = [segment.clock for _, segment in held]
        self.stored_to = max(clocks) if clocks else None
        removed = self._retain(self.stored_to) if self.stored_to is not None else 0
        held = list(self._segments)
        oldest = [segment.oldest for _, segment in held if segment.bars]
        self.oldest = min(oldest) if oldest else None
        self.durable_gauge.value = self.stored_to or 0
        return Loaded(
            segments=len(held),
            bars=sum(segment.bars for _, segment in held),
            sealed_logs=sealed,
            cut_bytes=cut,
            removed=removed,
            stored_to=self.stored_to,
            oldest=self.oldest,
            seconds=time.perf_counter() - started,
        )

    def start(self, names: Sequence[str]) -> None:
        """Start the writer thread; ``names`` is the agg's symbol list (series ``i`` is symbol
        ``names[i // len(intervals)]`` at interval ``intervals[i % len(intervals)]``), only
        ever appended to."""
        self._names = names
        self._thread = threading.Thread(target=self._run, name="polyfan-store", daemon=True)
        self._thread.start()

    # --- the loop's side ------------------------------------------------------------------

    def put(self, series: np.ndarray, bars: np.ndarray, clock: int | None) -> None:
        """Queue a published batch of closed bars (never blocks)."""
        if clock is None:
            return
        oldest = int(bars["s"].min()) if len(bars) else _NONE
        with self._lock:
            if self._queued + len(series) > self.max_queued_bars:
                dropped = True
            else:
                dropped = False
                self._queue.append((series, bars, clock))
                self._queued += len(series)
                self._queued_oldest = min(self._queued_oldest, oldest)
        if dropped:
            self.dropped_total.value += len(series)
            self._warn(
                "queue",
                "store: %d closed bars dropped so far: the writer is %d bars behind",
                int(self.dropped_total.value),
                self._queued,
            )

    def clocked(self, clock: int | None) -> None:
        """The feed clock now (every batch): the next flush records it even with no bar."""
        if clock is not None:
            self._latest_clock = clock

    def unsealed_from(self) -> int | None:
        """The oldest start of a bar queued or in the open log (None: every bar handed in is
        sealed, or dropped): until a segment holds them, only memory can serve them."""
        with self._lock:
            oldest = min(self._queued_oldest, self._taken_oldest, self._log_oldest)
        return None if oldest == _NONE else oldest

    def select(
        self,
        name: str,
        interval: int,
        since: int | None,
        before: int | None,
        limit: int | None,
    ) -> np.ndarray:
        """Stored bars of one series with ``since <= s < before``, the newest ``limit``,
        oldest first, each start once, from the sealed segments."""
        found: list[np.ndarray] = []
        have = 0
        key = segments.symbol_hash(name)
        newest_first = before
        for _, segment in reversed(self._segments):
            if not segment.bars or (since is not None and segment.newest < since):
                continue
            if newest_first is not None and segment.oldest >= newest_first:
                continue
            want = None if limit is None else limit - have
            bars = segment.select(name, interval, since, newest_first, want, key)
            if len(bars):
                found.append(bars)
                have += len(bars)
                newest_first = int(bars["s"][0])  # older segments: only what is older still
            if limit is not None and have >= limit:
                break
        if not found:
            return _EMPTY
        bars = np.concatenate(found[::-1]) if len(found) > 1 else found[0]
        return bars if limit is None else bars[max(0, len(bars) - limit) :]

    # --- the writer thread ----------------------------------------------------------------

    def _run(self) -> None:
        next_retain = time.monotonic() + self.retain_every_s
        while True:
            self._wake.wait(self.flush_s)
            self._wake.clear()
            stopping = self._stopping
            try:
                self._flush()
                if time.monotonic() >= next_retain:
                    # a quiet store seals nothing: its old segments go on this timer
                    next_retain = time.monotonic() + self.retain_every_s
                    self._retain(
                        self._latest_clock if self._latest_clock is not None else self._clock
                    )
            except Exception:  # the writer must outlive a bad moment; what it lost is counted
                with self._lock:
                    self._taken_oldest = _NONE  # lost with the flush: memory keeps to --history
                self.errors_total.value += 1
                log.exception("store: a flush failed")
            if stopping:
                return

    def _take(self) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], int]:
        with self._lock:
            batches = list(self._queue)
            self._queue.clear()
            count, self._queued = self._queued, 0
            self._taken_oldest = self._queued_oldest
            self._queued_oldest = _NONE
        return batches, count

    def _flush(self) -> None:
        latest = self._latest_clock
        batches, count = self._take()
        clocks = [b[2] for b in batches] + ([] if latest is None else [latest])
        if not clocks:
            return
        if not batches and latest is not None and self._clock is not None and latest <= self._clock:
            return  # nothing new
        started = time.perf_counter()
        clock = max(clocks)
        series = np.concatenate([b[0] for b in batches]) if count else np.zeros(0, np.int64)
        bars = np.concatenate([b[1] for b in batches]) if count else _EMPTY
        if self._wal is None:
            self._wal = _OpenLog(self._wal_dir / f"{clock:020d}.log", clock)
        wal = self._wal
        per = len(self.intervals)
        symbol = series // per
        interval = self.intervals[series % per]
        table = wal.numbers
        if len(symbol) and int(symbol.max()) >= len(table):
            grown = np.full(max(2 * len(table), int(symbol.max()) + 1), -1, dtype=np.int64)
            grown[: len(table)] = table
            table = grown
        fresh = np.unique(symbol[table[symbol] < 0]) if len(symbol) else symbol
        table = table.copy() if len(fresh) else table  # kept only once the frame is written
        table[fresh] = wal.named + np.arange(len(fresh))
        new_names = [self._names[sym] for sym in fresh.tolist()]
        numbers = table[symbol]
        frame = segments.encode_frame(clock, new_names, numbers, interval, bars)
        try:
            wal.append(frame)
        except OSError as exc:
            with self._lock:
                self._taken_oldest = _NONE  # never to be sealed: memory keeps to --history
            self.errors_total.value += 1
            self.dropped_total.value += count
            log.error("store: cannot write %s: %s (%d closed bars lost)", wal.path, exc, count)
            return
        wal.numbers = table
        wal.named += len(fresh)
        wal.bars += count
        with self._lock:
            self._log_oldest = min(self._log_oldest, self._taken_oldest)
            self._taken_oldest = _NONE
        self._clock = clock
        self.durable_gauge.value = clock
        self.written_total.value += count
        self.flush_seconds.value += time.perf_counter() - started
        if clock >= wal.started + self.seal_ms and wal.bars:
            self._roll(clock)  # this frame's bars sealed with the rest: the open log starts empty

    def _roll(self, clock: int) -> None:
        """Close the open log and seal it (the next flush opens a new one)."""
        old = self._wal
        self._wal = None
        if old is not None:
            old.close()
            started = time.perf_counter()
            try:
                self._seal_file(old.path, loading=False)
            finally:
                # sealed, and served from disk; or not (logged): its bars are read at the next
                # start, and memory need not hold them past --history meanwhile
                with self._lock:
                    self._log_oldest = _NONE
            self.seal_seconds.value += time.perf_counter() - started
            self._retain(clock)

    def _seal_file(self, path: Path, *, loading: bool) -> int:
        """Seal one log into a segment and delete it; return the bytes cut from its tail."""
        data = path.read_bytes()
        try:
            contents = segments.decode_log(data)
        except ValueError as exc:
            log.warning("store: %s cannot be read (%s): skipped, kept for inspection", path, exc)
            path.rename(path.with_suffix(".bad"))
            return len(data)
        cut = len(data) - contents.whole
        if contents.problem is not None:
            log.warning(
                "store: %s: %d whole flushes read, %d bytes after them cut (%s)",
                path,
                contents.frames,
                cut,
                contents.problem,
            )
        elif loading:
            log.info("store: %s: %d flushes sealed", path, contents.frames)
        if contents.clock is not None and len(contents.bars):
            body = segments.encode_segment(
                contents.names, contents.name, contents.interval, contents.bars, contents.clock
            )
            oldest = int(contents.bars["s"].min())
            final = self._seg_dir / f"{oldest:020d}-{contents.clock:020d}.bars"
            _write_durably(final, body)
            segment = _map_segment(final)
            with self._lock:
                self._segments = tuple(
                    sorted((*self._segments, (final, segment)), key=lambda p: _segment_order(p[0]))
                )
        elif contents.clock is not None:
            # no bars, only the clock: a segment with none keeps it for the next start
            final = self._seg_dir / f"{contents.clock:020d}-{contents.clock:020d}.bars"
            empty = np.zeros(0, np.int64)
            _write_durably(final, segments.encode_segment([], empty, empty, _EMPTY, contents.clock))
            with self._lock:
                self._segments = (*self._segments, (final, _map_segment(final)))
        path.unlink()
        _sync_dir(self._wal_dir)
        return cut

    def _retain(self, clock: int | None) -> int:
        """Delete the segments whose every bar is older than ``clock - retain``; keep the
        newest one (it carries the last clock for the next start)."""
        if clock is None:
            return 0
        cutoff = clock - self.retain_ms
        held = self._segments
        doomed = [
            (path, segment)
            for path, segment in held[:-1]
            if segment.newest < cutoff and segment.clock < clock
        ]
        if not doomed:
            return 0
        with self._lock:
            self._segments = tuple(p for p in self._segments if p not in doomed)
        for path, _ in doomed:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        _sync_dir(self._seg_dir)
        log.info(
            "store: %d segments older than the retention deleted (bars before %d)",
            len(doomed),
            cutoff,
        )
        return len(doomed)

    def close(self) -> None:
        """Flush what is queued and stop the writer; the open log stays for the next start."""
        thread = self._thread
        if thread is not None:
            self._stopping = True
            self._wake.set()
            thread.join(timeout=1.5)
            if thread.is_alive():
                log.warning("store: the last flush did not finish in 1.5 s")
        if self._wal is not None and (thread is None or not thread.is_alive()):
            self._wal.close()

    def flush_now(self) -> None:
        """Wake the writer for a flush now (tests)."""
        self._wake.set()

    def oldest_stored(self) -> int | None:
        """The oldest bar start on disk now (None: no bar)."""
        held = self._segments
        if held is not self._oldest_of[0]:
            oldest = [segment.oldest for _, segment in held if segment.bars]
            self._oldest_of = (held, min(oldest) if oldest else None)
        return self._oldest_of[1]

    def _warn(self, what: str, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._warned.get(what, -WARN_EVERY_S) >= WARN_EVERY_S:
            log.warning(message, *args)
            self._warned[what] = now


class _OpenLog:
    """The write-ahead log being appended to."""

    def __init__(self, path: Path, started: int) -> None:
        self.path = path
        self.started = started
        self.numbers = np.full(1024, -1, dtype=np.int64)  # symbol id -> its number here
        self.named = 0  # symbols numbered in this file
        self.bars = 0
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        self._size = os.fstat(self._fd).st_size
        _sync_dir(path.parent)

    def append(self, frame: bytes) -> None:
        """Append one frame and sync it; on failure the file is cut back to whole frames."""
        view = memoryview(frame)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
            os.fdatasync(self._fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._size)
            raise
        self._size += len(frame)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)


def _log_order(path: Path) -> int:
    try:
        return int(path.stem)
    except ValueError:
        return 0


def _segment_order(path: Path) -> tuple[int, int]:
    try:
        oldest, clock = path.stem.split("-")
        return int(clock), int(oldest)
    except ValueError:
        return (0, 0)


def _map_segment(path: Path) -> segments.Segment:
    with open(path, "rb") as file:
        size = os.fstat(file.fileno()).st_size
        if size == 0:
            raise segments.SegmentError("empty file")
        mapped = mmap.mmap(file.fileno(), size, access=mmap.ACCESS_READ)
    return segments.Segment(np.frombuffer(mapped, dtype=np.uint8))


def _write_durably(path: Path, body: bytes) -> None:
    """``path`` appears whole or not at all: a temporary file, fsync, rename, directory fsync."""
    temporary = path.with_suffix(".tmp")
    with open(temporary, "wb") as file:
        file.write(body)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)
    _sync_dir(path.parent)


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
