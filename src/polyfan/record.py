"""``polyfan record --sub ENDPOINT --out DIR [PREFIX...]``: a proxy's trades into Parquet.

Three threads. The main one subscribes (the prefixes, ``T.`` by default, and ``_ctl``),
decodes every message, keeps the sequence numbers (:class:`polyfan.feed.recording.Ledger`)
and buffers the trades; every ``--flush`` it hands the buffer to the **writer**, which turns it
into flat-file columns (:func:`polyfan.feed.flatfile.table_from_records`) and writes one part
per UTC date: a temporary hidden file, ``fsync``, an atomic rename into
``DIR/trades/date=YYYY-MM-DD/``, ``fsync`` of the directory. A reader sees whole files only,
each within ``--flush`` of its trades' arrival; a ``kill -9`` loses what had arrived since the
last flush. The **compactor** merges this run's parts every ``--compact`` (and at stop, within
the stop's time budget) into one file per date directory; parts left over by a killed run are
merged in the background at the next start. docs/recording.md has the layout and what a crash
loses.

At start the recorder reads the newest files' metadata: when the proxy is still the session
the files end with, the first message of every topic shows what is missing (logged at WARNING
by topic with counts, counted in ``polyfan_record_gaps_total``); a new session says the proxy
restarted, and which feed-clock window may lack trades. The same numbers count losses while
running. Nothing is dropped silently: a part that cannot be written is retried every flush
(``polyfan_record_write_errors_total``), and what is still unwritten at stop is logged at ERROR
and counted (``polyfan_record_dropped_trades_total``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import FrameType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zmq

from polyfan import curve
from polyfan.config import SYMBOL_RE, RecordConfig
from polyfan.errors import ConfigError, RecordingError, WireError
from polyfan.feed import flatfile, recording
from polyfan.feed.recording import (
    Ledger,
    Lost,
    PartInfo,
    PartName,
    PublisherRestarted,
    Resumed,
    iso_ms,
)
from polyfan.metrics import MetricsServer, Registry, listen
from polyfan.redact import mask_url
from polyfan.wire import codec

log = logging.getLogger("polyfan.record")

_HEADER = codec.HEADER
_HEAD = 1 + codec.HEADER.size  # the topic's terminator and the header
_TRADE = codec.TRADE_DTYPE.itemsize
_T = codec.TRADE_DTYPE
RCVHWM = 10_000_000  # messages a stalled recorder may hold before the proxy drops (gaps)
DRAIN = 20_000  # messages taken per wake-up before the flush timer is looked at
POLL_MS = 100
THROUGHPUT_EVERY_S = 5.0
LOSS_LOG_EVERY_S = 5.0
WRITE_QUEUE = 4  # flushes waiting for the writer; past it the receiving loop waits
RETRY_S = 1.0
STOP_BUDGET_S = 1.0  # of the 2 s a stop may take: the last flush and what compaction fits
COMPRESSION = "zstd"


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet(table: pa.Table, directory: Path, name: str) -> int:
    """Write ``table`` as ``directory/name`` durably and atomically; return its size."""
    directory.mkdir(parents=True, exist_ok=True)
    temp = directory / recording.temp_name(name)
    try:
        with temp.open("wb") as file:
            pq.write_table(table, file, compression=COMPRESSION)
            file.flush()
            os.fsync(file.fileno())
        size = temp.stat().st_size
        temp.rename(directory / name)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    fsync_directory(directory)
    return size


def recorded_files(trades_dir: Path) -> Iterator[tuple[Path, PartName]]:
    """Every part and compacted file under ``DIR/trades``, in no particular order."""
    if not trades_dir.is_dir():
        return
    for day_dir in trades_dir.iterdir():
        if not day_dir.is_dir() or not day_dir.name.startswith("date="):
            continue
        for path in day_dir.iterdir():
            name = recording.parse_name(path.name)
            if name is not None:
                yield path, name


def file_info(path: Path) -> PartInfo | None:
    try:
        return recording.read_metadata(pq.read_metadata(path).metadata)
    except (OSError, pa.ArrowException):
        return None


@dataclass
class _Flush:
    """One flush's trades, for the writer: the records and each one's symbol."""

    seq: int
    records: np.ndarray
    rows: np.ndarray
    symbols: list[str]
    info: PartInfo


@dataclass
class _Written:
    directory: Path
    name: PartName


_COMPACT = "compact"  # a writer job: hand what was written so far to the compactor


class Recorder:
    def __init__(self, config: RecordConfig) -> None:
        self.config = config
        self.out = config.out
        self.trades_dir = config.out / recording.TRADES_DIR
        self.run = recording.run_stamp(time.time_ns())
        self.stopping = False
        self.ledger = Ledger()
        self._symbols: dict[bytes, int] = {}  # topic bytes after "T." -> index
        self._symbol_names: list[str] = []
        self._buffer: list[memoryview] = []  # payloads of TRADE records
        self._buffer_rows: list[int] = []  # each payload's symbol
        self._buffer_counts: list[int] = []  # and its number of trades
        self._last_bad_log = -float("inf")
        self._buffered = 0
        self._seq = 0
        self._jobs: queue.Queue[_Flush | str | None] = queue.Queue(WRITE_QUEUE)
        self._compactions: queue.Queue[list[_Written] | None] = queue.Queue()
        self._written: list[_Written] = []  # the writer's parts not yet handed to compaction
        self._stop_deadline = float("inf")
        self._failed = 0  # trades in the job the writer is retrying
        self._last_write_error_log = -float("inf")
        self._lost_by_topic: dict[tuple[str, bool], int] = {}
        self._last_loss_log = -float("inf")
        self.registry = Registry()
        self._init_metrics()

    def _init_metrics(self) -> None:
        r = self.registry
        self.m_messages = r.counter(
            "polyfan_record_messages_total", "ZeroMQ messages received (all topics)."
        )
        self.m_received = r.counter("polyfan_record_trades_received_total", "Trades received.")
        self.m_written = r.counter(
            "polyfan_record_trades_written_total", "Trades in parts renamed into place."
        )
        self.m_gaps = r.counter(
            "polyfan_record_gaps_total",
            "Trade messages missing by sequence numbers: lost while running, or sent while "
            "the recorder was down (or received but not flushed when it was killed).",
        )
        self.m_restarts = r.counter(
            "polyfan_record_publisher_restarts_total", "New proxy sessions after the first."
        )
        self.m_write_errors = r.counter(
            "polyfan_record_write_errors_total", "Failed attempts to write a part (retried)."
        )
        self.m_compact_errors = r.counter(
            "polyfan_record_compaction_errors_total", "Compactions that failed (parts kept)."
        )
        self.m_dropped = r.counter(
            "polyfan_record_dropped_trades_total",
            "Trades still unwritten when the recorder stopped.",
        )
        self.m_bad = r.counter(
            "polyfan_record_bad_messages_total", "Messages that do not decode (skipped)."
        )
        self.m_ignored = r.counter(
            "polyfan_record_ignored_messages_total", "Messages of a kind the recorder does not use."
        )
        self.m_files = r.counter("polyfan_record_files_written_total", "Parts written.")
        self.m_bytes = r.counter("polyfan_record_bytes_written_total", "Bytes of parts written.")
        self.m_compactions = r.counter(
            "polyfan_record_compactions_total", "Compacted files written."
        )
        self.m_buffered = r.gauge(
            "polyfan_record_buffered_trades", "Trades received and not yet handed to the writer."
        )
        r.on_collect(self._collect)

    def _collect(self) -> None:
        self.m_buffered.value = self._buffered
        self.m_gaps.value = self.ledger.lost
        self.m_restarts.value = self.ledger.restarts

    # --- start: what the files say ------------------------------------------------------------

    def prepare(self) -> None:
        """Tidy what a killed run left, read where the recording ends, queue old parts for
        compaction."""
        try:
            self.trades_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"--out: cannot create {self.trades_dir}: {exc.strerror}") from exc
        files = list(recorded_files(self.trades_dir))
        for day_dir in self.trades_dir.glob("date=*"):
            for temp in day_dir.glob(".part-*.tmp"):
                log.info("removing %s: a write that never finished (the run was killed)", temp)
                temp.unlink()
        infos: dict[Path, PartInfo | None] = {}
        replaced: set[Path] = set()
        for path, name in files:
            if name.compacted:
                info = infos[path] = file_info(path)
                for part in info.replaces if info is not None else ():
                    replaced.add(path.parent / part)
        for path in sorted(p for p in replaced if p.exists()):
            log.info("removing %s: already in a compacted file (the run was killed)", path)
            path.unlink()
        files = [(path, name) for path, name in files if path not in replaced]
        files.sort(key=lambda item: (item[1].run, item[1].last, item[1].first), reverse=True)

        def newest_first() -> Iterator[PartInfo]:
            for path, _ in files:
                info = infos[path] if path in infos else file_info(path)
                if info is None:
                    log.warning("%s has no readable polyfan.record metadata: skipped", path)
                    continue
                yield info

        state = recording.resume_state(newest_first())
        self.ledger = Ledger(state)
        if state is not None:
            log.info(
                "the recording in %s ends at feed clock %s (proxy session %016x, %d topics); "
                "what the proxy sends now shows what is missing",
                self.out,
                iso_ms(state.clock),
                state.session,
                len(state.topics),
            )
        leftovers: dict[tuple[Path, str], list[_Written]] = {}
        for path, name in files:
            if not name.compacted:
                leftovers.setdefault((path.parent, name.run), []).append(
                    _Written(path.parent, name)
                )
        for group in leftovers.values():
            if len(group) > 1 and self.config.compact_ms > 0:
                self._compactions.put(sorted(group, key=lambda w: w.name))

    # --- the receiving loop -------------------------------------------------------------------

    def serve(self) -> None:
        config = self.config
        client = curve.Client(config.curve, "record", [config.sub])
        context: zmq.Context[Any] = zmq.Context()
        sub = context.socket(zmq.SUB)
        watch = client.watch(sub)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        sub.setsockopt(zmq.SNDHWM, 0)  # subscriptions beyond it would be dropped silently
        metrics: MetricsServer | None = None
        writer = threading.Thread(target=self._write_forever, name="record-writer", daemon=True)
        compactor = threading.Thread(
            target=self._compact_forever, name="record-compactor", daemon=True
        )
        try:
            try:
                client.connect(sub, 0, config.sub)
            except zmq.ZMQError as exc:
                raise ConfigError(
                    f"--sub: cannot connect to {mask_url(config.sub)}: {exc}"
                ) from exc
            for prefix in config.prefixes:
                for topic in codec.subscription_prefixes(prefix):
                    sub.setsockopt(zmq.SUBSCRIBE, topic)
            sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
            if config.metrics is not None:
                metrics = listen(config.metrics, self.registry)
                metrics.start()
            flatfile.warm_up()
            writer.start()
            compactor.start()
            log.info(
                "ready: recording %s (%s) into %s, run %s, flush every %s%s",
                mask_url(config.sub),
                ", ".join(config.prefixes),
                self.trades_dir,
                self.run,
                f"{config.flush_ms} ms",
                f", metrics on {config.metrics[0]}:{metrics.port}"
                if metrics is not None and config.metrics is not None
                else "",
            )
            self._loop(sub)
        finally:
            self._stop_deadline = min(self._stop_deadline, time.monotonic() + STOP_BUDGET_S)
            sub.close(0)
            if watch is not None:
                watch.close()
            context.term()
            if writer.is_alive():
                self._flush()
                if self.config.compact_ms > 0:
                    self._put(_COMPACT)
                self._put(None)
                writer.join(max(0.0, self._stop_deadline - time.monotonic()))
            self._compactions.put(None)
            if compactor.is_alive():
                compactor.join(max(0.1, self._stop_deadline + 0.2 - time.monotonic()))
            self._log_losses(force=True)
            unwritten = self._unwritten()
            if unwritten:
                self.m_dropped.value += unwritten
                log.error("%d trades could not be written before stopping: lost", unwritten)
            if metrics is not None:
                metrics.close()
            log.info(
                "stopped: %d trades received, %d written, %d messages missing by sequence "
                "numbers, %d write errors",
                self.m_received.value,
                self.m_written.value,
                self.ledger.lost,
                self.m_write_errors.value,
            )

    def _loop(self, sub: zmq.Socket[Any]) -> None:
        flush_s = self.config.flush_ms / 1000
        compact_s = self.config.compact_ms / 1000
        now = time.monotonic()
        next_flush = now + flush_s
        next_compact = now + compact_s if compact_s > 0 else float("inf")
        last_report, reported = now, 0
        while not self.stopping:
            timeout = max(0.0, min(next_flush - time.monotonic(), POLL_MS / 1000))
            if sub.poll(int(timeout * 1000) + 1):
                for _ in range(DRAIN):
                    try:
                        frame = sub.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._received(frame)
            now = time.monotonic()
            if now >= next_flush:
                self._flush()
                next_flush = max(next_flush + flush_s, now)
                self._log_losses()
            if now >= next_compact:
                self._put(_COMPACT)
                next_compact = now + compact_s
            if now - last_report >= THROUGHPUT_EVERY_S:
                received = int(self.m_received.value)
                log.info(
                    "received %d trades in %.0f s (%.0f/s); %d written; %d messages missing",
                    received - reported,
                    now - last_report,
                    (received - reported) / (now - last_report),
                    self.m_written.value,
                    self.ledger.lost,
                )
                last_report, reported = now, received

    def _received(self, frame: bytes) -> None:
        """One message. Trades take a lean path (header read in place, payload kept as a view,
        joined per flush); everything else goes through :func:`codec.decode`."""
        self.m_messages.value += 1
        end = frame.find(b"\x00")
        if end > 2 and frame.startswith(b"T.") and len(frame) >= end + _HEAD:
            version, kind, _, count, session, seq = _HEADER.unpack_from(frame, end + 1)
            if version == codec.VERSION and kind == codec.Kind.TRADES:
                if len(frame) != end + _HEAD + count * _TRADE:
                    self._bad(f"message on {frame[:end]!r}: payload is not {count} trades")
                    return
                index = self._symbols.get(frame[2:end])
                if index is None:
                    index = self._new_symbol(frame[2:end])
                    if index is None:
                        return
                if not count:
                    return
                max_t = 0
                if session != self.ledger.session:
                    self._flush()
                    max_t = int(np.frombuffer(frame, _T, count, end + _HEAD)["t"].max())
                events = self.ledger.trades_received(self._symbol_names[index], session, seq, max_t)
                self._buffer.append(memoryview(frame)[end + _HEAD :])
                self._buffer_rows.append(index)
                self._buffer_counts.append(count)
                self._buffered += count
                self.m_received.value += count
                for event in events:
                    self._event(event)
                return
        try:
            message = codec.decode(frame)
        except WireError as exc:
            self._bad(str(exc))
            return
        if message.kind in (codec.Kind.CLOCK, codec.Kind.UPSTREAM) and (
            message.topic == codec.CONTROL
        ):
            if self.ledger.is_new_session(message.session):
                self._flush()
            clock = recording.control_clock(message)
            for event in self.ledger.control_received(message.session, message.seq, clock):
                self._event(event)
            if message.kind is codec.Kind.UPSTREAM:
                self._upstream(message)
        else:
            self.m_ignored.value += 1

    def _new_symbol(self, raw: bytes) -> int | None:
        try:
            symbol = raw.decode()
        except UnicodeDecodeError:
            symbol = ""
        if SYMBOL_RE.fullmatch(symbol) is None:
            self._bad(f"topic T.{raw!r} does not name a symbol")
            return None
        index = self._symbols[raw] = len(self._symbol_names)
        self._symbol_names.append(symbol)
        return index

    def _bad(self, what: str) -> None:
        self.m_bad.value += 1
        now = time.monotonic()
        if now - self._last_bad_log >= LOSS_LOG_EVERY_S:
            self._last_bad_log = now
            log.warning(
                "undecodable message skipped (%d so far, counted): %s", self.m_bad.value, what
            )

    def _upstream(self, message: codec.Message) -> None:
        for state, clock, _ in codec.records(message).tolist():
            if state == codec.UPSTREAM_DOWN:
                log.warning(
                    "the proxy's upstream went down at feed clock %s: trades are missing "
                    "upstream until it is back",
                    iso_ms(clock),
                )
            else:
                log.info(
                    "the proxy's upstream is up (feed clock %s)",
                    iso_ms(clock) if clock else "not started",
                )

    def _event(self, event: recording.Event) -> None:
        if isinstance(event, Lost):
            key = (event.symbol, event.while_down)
            self._lost_by_topic[key] = self._lost_by_topic.get(key, 0) + event.count
            self._log_losses()
        elif isinstance(event, Resumed):
            log.warning(
                "the recorder was down: the files end at feed clock %s and the proxy "
                "(session %016x) is now at %s; the trades it published in between are missing%s; "
                "counts by topic follow as each topic's next message arrives",
                iso_ms(event.from_clock),
                event.session,
                iso_ms(event.to_clock) if event.to_clock else "an unknown time",
                f" ({event.ctl_lost} control messages missed, about {event.ctl_lost / 10:.1f} s)"
                if event.ctl_lost
                else "",
            )
        elif isinstance(event, PublisherRestarted):
            log.warning(
                "the proxy restarted (session %016x -> %016x): trades between feed clock %s "
                "and %s may be missing",
                event.old,
                event.new,
                iso_ms(event.from_clock),
                iso_ms(event.to_clock),
            )

    def _log_losses(self, force: bool = False) -> None:
        now = time.monotonic()
        if not self._lost_by_topic or (not force and now - self._last_loss_log < LOSS_LOG_EVERY_S):
            return
        self._last_loss_log = now
        for while_down in (True, False):
            items = sorted(
                (symbol, count)
                for (symbol, down), count in self._lost_by_topic.items()
                if down is while_down
            )
            if not items:
                continue
            shown = ", ".join(f"T.{symbol} {count}" for symbol, count in items[:50])
            more = f" and {len(items) - 50} more topics" if len(items) > 50 else ""
            log.warning(
                "%s: %s%s (%d topics, %d messages)",
                "missing from the recording, sent while the recorder was down or received but "
                "not flushed before it stopped"
                if while_down
                else "messages lost between the proxy and the recorder",
                shown,
                more,
                len(items),
                sum(count for _, count in items),
            )
        self._lost_by_topic.clear()

    # --- flushing and writing -----------------------------------------------------------------

    def _flush(self) -> None:
        """Hand the buffered trades to the writer as the next part."""
        if not self._buffer:
            return
        records = np.frombuffer(b"".join(self._buffer), codec.TRADE_DTYPE)
        rows = np.repeat(
            np.asarray(self._buffer_rows, np.int32), np.asarray(self._buffer_counts, np.int64)
        )
        self._seq += 1
        info = self.ledger.part_written(len(records), int(records["t"].max()))
        job = _Flush(self._seq, records, rows, self._symbol_names[:], info)
        self._buffer, self._buffer_rows, self._buffer_counts, self._buffered = [], [], [], 0
        self._put(job)

    def _put(self, job: _Flush | str | None) -> None:
        """Hand ``job`` to the writer, waiting while it is behind (the SUB buffers meanwhile);
        once stopping, only until the stop's time budget is spent."""
        while True:
            try:
                self._jobs.put(job, timeout=0.1)
                return
            except queue.Full:
                if self.stopping and self._stop_deadline == float("inf"):
                    self._stop_deadline = time.monotonic() + STOP_BUDGET_S
                if time.monotonic() > self._stop_deadline:
                    if isinstance(job, _Flush):
                        self.m_dropped.value += len(job.records)
                        log.error(
                            "%d trades could not be handed to the writer before stopping: lost",
                            len(job.records),
                        )
                    return

    def _unwritten(self) -> int:
        count = 0
        with contextlib.suppress(queue.Empty):
            while True:
                job = self._jobs.get_nowait()
                if isinstance(job, _Flush):
                    count += len(job.records)
        return count + self._buffered + self._failed

    def _write_forever(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            if job == _COMPACT:
                if self._written:
                    self._compactions.put(self._written)
                    self._written = []
                continue
            assert isinstance(job, _Flush)
            while True:
                try:
                    self._write(job)
                    self._failed = 0
                    break
                except (OSError, pa.ArrowException, RecordingError) as exc:
                    self.m_write_errors.value += 1
                    self._failed = len(job.records)
                    now = time.monotonic()
                    if now - self._last_write_error_log >= LOSS_LOG_EVERY_S:
                        self._last_write_error_log = now
                        log.error(
                            "cannot write part %d (%d trades): %s; retrying every %.0f s "
                            "(%d failed attempts so far, logged at most every %.0f s)",
                            job.seq,
                            len(job.records),
                            exc,
                            RETRY_S,
                            self.m_write_errors.value,
                            LOSS_LOG_EVERY_S,
                        )
                    if time.monotonic() + RETRY_S > self._stop_deadline:
                        return
                    time.sleep(RETRY_S)

    def _write(self, job: _Flush) -> None:
        table = flatfile.table_from_records(job.records, job.symbols, job.rows)
        days = flatfile.days_of(job.records["t"] * flatfile.NS_PER_MS)
        name = PartName(self.run, job.seq, job.seq, False)
        written, sizes = [], []
        for day in np.unique(days):
            part = table if days[0] == days[-1] == day else table.filter(pa.array(days == day))
            info = replace(job.info, trades=part.num_rows)
            directory = self.trades_dir / f"date={flatfile.day_name(int(day))}"
            metadata = info.to_metadata()
            sizes.append(
                write_parquet(part.replace_schema_metadata(metadata), directory, name.name)
            )
            written.append(_Written(directory, name))
        # counted once every date's file is in place (a retry rewrites them all)
        if self.config.compact_ms > 0:
            self._written += written
        self.m_files.value += len(written)
        self.m_bytes.value += sum(sizes)
        self.m_written.value += len(job.records)

    # --- compaction ---------------------------------------------------------------------------

    def _compact_forever(self) -> None:
        while True:
            parts = self._compactions.get()
            if parts is None:
                return
            by_directory: dict[tuple[Path, str], list[PartName]] = {}
            for written in parts:
                by_directory.setdefault((written.directory, written.name.run), []).append(
                    written.name
                )
            for (directory, _), names in by_directory.items():
                if len(names) < 2:
                    continue
                try:
                    self._compact(directory, sorted(names))
                except (OSError, pa.ArrowException) as exc:
                    self.m_compact_errors.value += 1
                    log.error("cannot compact %d parts in %s: %s", len(names), directory, exc)

    def _compact(self, directory: Path, names: list[PartName]) -> None:
        """Merge consecutive parts of one run into one file, then remove them."""
        tables, infos = [], []
        for name in names:
            if time.monotonic() > self._stop_deadline:
                log.info("stopping: %d parts in %s left for the next start", len(names), directory)
                return
            table = pq.read_table(directory / name.name, schema=flatfile.SCHEMA)
            info = recording.read_metadata(pq.read_metadata(directory / name.name).metadata)
            if info is None:
                raise RecordingError(f"{directory / name.name} has no polyfan.record metadata")
            tables.append(table)
            infos.append(info)
        merged = recording.merged(infos, [name.name for name in names])
        target = PartName(names[0].run, names[0].first, names[-1].last, True)
        table = pa.concat_tables(tables).replace_schema_metadata(merged.to_metadata())
        write_parquet(table, directory, target.name)
        for name in names:
            (directory / name.name).unlink()
        fsync_directory(directory)
        self.m_compactions.value += 1
        log.info("compacted %d parts (%d trades) into %s", len(names), table.num_rows, target.name)


def run(config: RecordConfig) -> int:
    recorder = Recorder(config)

    def stop(signum: int, frame: FrameType | None) -> None:
        recorder.stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        recorder.prepare()
        recorder.serve()
    finally:
        for sig, handler in previous.items():  # last: a second signal must not cut this short
            signal.signal(sig, handler)
    return 0
