"""``polyfan replay PATH``: serve recorded trades over the Polygon stocks WebSocket protocol.

PATH is a ``polyfan record`` directory (``DIR`` or ``DIR/trades``), a Parquet file or a
directory of them, or a Polygon flat file (``.csv`` / ``.csv.gz``, columns found by header
name). Trades go out in SIP-timestamp order (a stable sort: equal timestamps keep the file's
order), paced by SIP time over ``--speed`` (:class:`polyfan.feed.playback.Pacer`) or, with
``--speed max``, as fast as the clients read; ``--from``/``--to``/``--symbols`` select what is
sent. The server is the one ``polyfan sim`` uses (:mod:`polyfan.stockserver`): auth,
subscribe/unsubscribe with a status per channel, frames of up to ``FRAME_EVENTS`` events.

The playback is one cursor shared by every subscribed client, like a live feed: it starts when
the first client subscribes and pauses while none is, so a proxy that reconnects carries on
where it left off. It never cuts a slow client off: it waits for it (``max_backlog=None``), and
logs when it falls behind ``--speed``. When the last trade has been sent the server stays up
(logged), so that a proxy does not go into a reconnect loop; stop it with Ctrl-C.

Memory: one UTC day (a recording's date directory, or one file) is loaded at a time, after
``--from/--to/--symbols``, while the next is read on a thread.
"""

from __future__ import annotations

import asyncio
import csv
import functools
import gzip
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from polyfan.config import ReplayConfig
from polyfan.errors import RecordingError
from polyfan.feed import flatfile, recording
from polyfan.feed.playback import Pacer
from polyfan.feed.recording import TRADES_DIR, iso_ms
from polyfan.lifecycle import serve_until_stopped
from polyfan.stockserver import StocksServer

log = logging.getLogger("polyfan.replay")

FRAME_EVENTS = 100  # events per WebSocket frame, at most (the sim's frames are 1 to 100)
CHUNK = 4096  # trades turned into events per step
ROOM_FRAMES = 64  # a client's backlog the replay waits to fall under before the next step
TICK_S = 0.01
PROGRESS_EVERY_S = 5.0
BEHIND_WARN_S = 1.0


@dataclass(frozen=True)
class Source:
    """One unit the replay loads whole: a recording's day, a Parquet file, a flat file."""

    label: str
    load: Callable[[], tuple[pa.Table, int]]  # (table in SCHEMA, rows skipped)


def _day_range(selection: flatfile.Selection) -> tuple[str, str]:
    low = "0000-00-00"
    high = "9999-99-99"
    if selection.from_ms is not None:
        low = flatfile.day_name(selection.from_ms // flatfile.MS_PER_DAY)
    if selection.to_ms is not None:
        high = flatfile.day_name((selection.to_ms - 1) // flatfile.MS_PER_DAY)
    return low, high


def _parquet_filter(selection: flatfile.Selection) -> list[tuple[str, str, object]] | None:
    filters: list[tuple[str, str, object]] = []
    if selection.from_ms is not None:
        filters.append(("sip_timestamp", ">=", selection.from_ms * flatfile.NS_PER_MS))
    if selection.to_ms is not None:
        filters.append(("sip_timestamp", "<", selection.to_ms * flatfile.NS_PER_MS))
    if selection.symbols is not None:
        filters.append(("ticker", "in", list(selection.symbols)))
    return filters or None


def recorded_parts(day_dir: Path) -> list[Path]:
    """A recording day's files in the order their data arrived, without the parts that a
    compacted file already holds (left behind when a compaction was cut short)."""
    named = []
    for path in day_dir.iterdir():
        name = recording.parse_name(path.name)
        if name is not None:
            named.append((name, path))
    replaced: set[str] = set()
    for name, path in named:
        if name.compacted:
            info = recording.read_metadata(pq.read_metadata(path).metadata)
            if info is not None:
                replaced.update(info.replaces)
    return [path for name, path in sorted(named) if path.name not in replaced]


def _read_day(day: Path, selection: flatfile.Selection) -> tuple[pa.Table, int]:
    return _read_parquet(recorded_parts(day), selection)


def _read_parquet(paths: list[Path], selection: flatfile.Selection) -> tuple[pa.Table, int]:
    tables = []
    for path in paths:
        try:
            raw = pq.read_table(path, filters=_parquet_filter(selection))
        except (OSError, pa.ArrowException) as exc:
            raise RecordingError(f"{path}: {exc}") from exc
        tables.append(flatfile.normalize(raw.replace_schema_metadata(None)))
    if not tables:
        return flatfile.SCHEMA.empty_table(), 0
    return _prepared(pa.concat_tables(tables), selection)


def _prepared(table: pa.Table, selection: flatfile.Selection) -> tuple[pa.Table, int]:
    selected, unusable = flatfile.select(table, selection)
    return flatfile.in_time_order(selected), unusable


def _csv_header(path: Path) -> list[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", newline="") as file:
            return next(csv.reader(file), [])
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise RecordingError(f"{path}: cannot read its header: {exc}") from exc


def _read_csv(path: Path, selection: flatfile.Selection) -> tuple[pa.Table, int]:
    """A flat file, streamed: only the known columns, each block selected as it is read, so
    memory follows what ``--from/--to/--symbols`` keep, not the file."""
    header = _csv_header(path)
    missing = flatfile.missing_columns(header)
    if missing:
        raise RecordingError(
            f"{path}: no column {', '.join(missing)} (columns are found by header name; "
            f"this file has {', '.join(header) or 'none'})"
        )
    bad_rows: list[str] = []

    def skip(row: pacsv.InvalidRow) -> str:
        text = row.text if len(row.text) <= 80 else row.text[:77] + "..."
        bad_rows.append(
            f"{text!r}: {row.actual_columns} fields, expected {row.expected_columns}"
            if not bad_rows
            else ""
        )
        return "skip"

    known = [name for name in header if name in flatfile.CSV_TYPES]
    kept, unusable = [], 0
    try:
        reader = pacsv.open_csv(
            path,
            parse_options=pacsv.ParseOptions(invalid_row_handler=skip),
            convert_options=pacsv.ConvertOptions(
                column_types={name: flatfile.CSV_TYPES[name] for name in known},
                include_columns=known,
                strings_can_be_null=True,
            ),
        )
        for batch in reader:
            chosen, skipped = flatfile.select(
                flatfile.normalize(pa.Table.from_batches([batch])), selection
            )
            kept.append(chosen)
            unusable += skipped
    except (OSError, pa.ArrowException, RecordingError) as exc:
        raise RecordingError(f"{path}: {exc}") from exc
    if bad_rows:
        log.warning(
            "%s: skipped %d rows with the wrong number of fields (first: %s)",
            path,
            len(bad_rows),
            bad_rows[0],
        )
    table = pa.concat_tables(kept) if kept else flatfile.SCHEMA.empty_table()
    return flatfile.in_time_order(table), unusable


def sources(path: Path, selection: flatfile.Selection) -> list[Source]:
    """What PATH holds, in the order it is replayed."""
    if not path.exists():
        raise RecordingError(f"PATH: {path} does not exist")
    if path.is_file():
        name = path.name.lower()
        if name.endswith((".csv", ".csv.gz")):
            return [Source(str(path), lambda: _read_csv(path, selection))]
        if name.endswith(".parquet"):
            return [Source(str(path), lambda: _read_parquet([path], selection))]
        raise RecordingError(f"PATH: {path} is not .parquet, .csv or .csv.gz")
    root = path / TRADES_DIR if (path / TRADES_DIR).is_dir() else path
    days = sorted(d for d in root.glob("date=*") if d.is_dir())
    if days:
        low, high = _day_range(selection)
        chosen = [d for d in days if low <= d.name.removeprefix("date=") <= high]
        return [Source(str(day), functools.partial(_read_day, day, selection)) for day in chosen]
    files = sorted(root.rglob("*.parquet"))
    flat = sorted(p for p in root.iterdir() if p.name.lower().endswith((".csv", ".csv.gz")))
    if files:
        return [Source(str(root), lambda: _read_parquet(files, selection))]
    if flat:
        return [Source(str(p), functools.partial(_read_csv, p, selection)) for p in flat]
    raise RecordingError(f"PATH: {path} holds no recording, Parquet or flat file")


class Replayer:
    def __init__(self, config: ReplayConfig) -> None:
        self.config = config
        self.selection = flatfile.Selection(config.from_ms, config.to_ms, config.symbols)
        self.sources = sources(config.path, self.selection)
        self.server = StocksServer(config.listen, api_key=config.api_key, log=log, max_backlog=None)
        self.pacer = Pacer(config.speed)
        self.skipped = 0
        self.finished = False
        self._sent_at_report = 0
        self._last_report = time.monotonic()
        self._last_behind_log = -float("inf")

    async def load(self, index: int) -> pa.Table:
        source = self.sources[index]
        table, skipped = await asyncio.to_thread(source.load)
        self.skipped += skipped
        if skipped:
            log.warning(
                "%s: skipped %d rows without a ticker, price, size or SIP timestamp",
                source.label,
                skipped,
            )
        log.info("%s: %d trades to replay", source.label, table.num_rows)
        return table

    async def play(self, first: pa.Table) -> None:
        loop = asyncio.get_running_loop()
        table: pa.Table | None = first
        for index in range(len(self.sources)):
            following = (
                asyncio.create_task(self.load(index + 1)) if index + 1 < len(self.sources) else None
            )
            assert table is not None
            await self._play_table(table, loop)
            table = await following if following is not None else None
        self.finished = True
        log.info(
            "replay finished: %d trades sent; still serving so that a proxy does not reconnect "
            "in a loop (clients get no more trades); Ctrl-C to stop",
            self.server.events_sent,
        )

    async def _play_table(self, table: pa.Table, loop: asyncio.AbstractEventLoop) -> None:
        sip = table["sip_timestamp"].to_numpy()
        server, pacer = self.server, self.pacer
        i, n = 0, len(sip)
        while i < n:
            if not server.subscribed.is_set():
                pacer.pause()
                await server.subscribed.wait()
            now = loop.time()
            if not pacer.is_started():
                pacer.start(int(sip[i]), now)
            count = min(pacer.due_count(sip, i, now), CHUNK)
            if count == 0:
                await asyncio.sleep(max(0.0, min(pacer.due_at(int(sip[i])) - now, TICK_S)))
                continue
            self._check_pace(int(sip[i]), now)
            chunk = table.slice(i, count)
            server.publish_texts(
                flatfile.event_texts(chunk),
                chunk["ticker"].to_pylist(),
                FRAME_EVENTS,
                server.streaming(),
            )
            i += count
            self._report(int(sip[i - 1]))
            await server.wait_for_room(ROOM_FRAMES)

    def _check_pace(self, sip_ns: int, now: float) -> None:
        behind = now - self.pacer.due_at(sip_ns)
        if self.pacer.speed is None or behind < BEHIND_WARN_S:
            return
        if now - self._last_behind_log >= PROGRESS_EVERY_S:
            self._last_behind_log = now
            log.warning(
                "%.1f s behind --speed %g: the clients read slower than the pace "
                "(nothing is dropped; the replay waits for them)",
                behind,
                self.pacer.speed,
            )

    def _report(self, sip_ns: int) -> None:
        now = time.monotonic()
        if now - self._last_report < PROGRESS_EVERY_S:
            return
        sent = self.server.events_sent
        log.info(
            "sent %d trades in %.0f s (%.0f/s); at SIP time %s",
            sent - self._sent_at_report,
            now - self._last_report,
            (sent - self._sent_at_report) / (now - self._last_report),
            iso_ms(sip_ns // flatfile.NS_PER_MS),
        )
        self._last_report, self._sent_at_report = now, sent


async def serve_replay(config: ReplayConfig, stop: asyncio.Event) -> None:
    replayer = Replayer(config)
    first = await replayer.load(0) if replayer.sources else flatfile.SCHEMA.empty_table()
    flatfile.warm_up()
    await replayer.server.start()
    speed = "max" if config.speed is None else f"{config.speed:g}x"
    log.info(
        "ready: replay listening on %s: %s (%d %s), speed %s; starts when a client subscribes",
        replayer.server.url,
        config.path,
        len(replayer.sources),
        "day or file" if len(replayer.sources) == 1 else "days or files, loaded one by one",
        speed,
    )
    player = asyncio.create_task(replayer.play(first))
    stopper = asyncio.create_task(stop.wait())
    try:
        done, _ = await asyncio.wait({player, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if player in done:
            player.result()  # a load that failed ends the command with its error
            await stop.wait()
    finally:
        for task in (player, stopper):
            task.cancel()
        await asyncio.gather(player, stopper, return_exceptions=True)
        log.info(
            "stopping; sent %d trades%s",
            replayer.server.events_sent,
            "" if replayer.finished else " (not finished)",
        )
        await replayer.server.close()


def run(config: ReplayConfig) -> int:
    asyncio.run(serve_until_stopped(lambda stop: serve_replay(config, stop)))
    return 0
