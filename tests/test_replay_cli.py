"""``polyfan replay`` from the command line, read by a plain WebSocket client: what it selects,
what it skips and says, how it paces, what a record directory left by a killed compaction
replays, and that it keeps serving after the last trade."""

from __future__ import annotations

import asyncio
import csv
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pytest
from websockets.asyncio.client import connect

from polyfan.feed import flatfile, recording
from polyfan.record import write_parquet
from polyfan.wire import codec
from procs import POLYFAN, Proc, free_port

BASE_MS = 1_710_513_000_000  # 2024-03-15T14:30:00Z
HEADER = list(flatfile.COLUMNS)


def write_csv(path: Path, rows: list[dict[str, Any]], header: list[str] = HEADER) -> None:
    with path.open("w", newline="") as file:
        writer = csv.DictWriter(file, header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def trade_row(symbol: str, ms: int, price: float, **extra: Any) -> dict[str, Any]:
    return {
        "ticker": symbol,
        "conditions": "",
        "correction": 0,
        "exchange": 11,
        "id": f"{symbol}{ms}",
        "participant_timestamp": ms * 1_000_000 - 5,
        "price": price,
        "sequence_number": ms - BASE_MS,
        "sip_timestamp": ms * 1_000_000,
        "size": 100,
        "tape": 3,
        "trf_id": "",
        "trf_timestamp": "",
        **extra,
    }


async def receive_trades(
    url: str, count: int, subscribe: str = "T.*", timeout: float = 20.0
) -> list[tuple[float, dict[str, Any]]]:
    """Log in, subscribe, and collect ``count`` trade events with their arrival times."""
    got: list[tuple[float, dict[str, Any]]] = []
    async with connect(url, max_size=None) as ws:
        await ws.send('{"action":"auth","params":"any"}')
        await ws.send(orjson.dumps({"action": "subscribe", "params": subscribe}).decode())
        async with asyncio.timeout(timeout):
            while len(got) < count:
                for event in orjson.loads(await ws.recv()):
                    if event["ev"] == "T":
                        got.append((time.monotonic(), event))
    return got


def serve(path: Path, *args: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc("replay", str(path), "--listen", f"127.0.0.1:{port}", *args)
    proc.wait_for("ready:", 60)
    return proc, f"ws://127.0.0.1:{port}/stocks"


def test_from_to_and_symbols_select_what_is_sent_in_sip_order(tmp_path: Path) -> None:
    path = tmp_path / "day.csv"
    rows = [
        trade_row("A", BASE_MS + 5_000, 10.0),
        trade_row("B", BASE_MS + 1_000, 20.0),  # the file is by ticker, then time
        trade_row("B", BASE_MS + 2_000, 20.5, conditions="12,37", exchange=4, trf_id=202,
                  trf_timestamp=(BASE_MS + 2_001) * 1_000_000 + 7, size=0.5),
        trade_row("B", BASE_MS + 9_000, 21.0),
        trade_row("C", BASE_MS + 3_000, 30.0),
    ]  # fmt: skip
    write_csv(path, rows)
    proc, url = serve(
        path, "--speed", "max", "--from", "2024-03-15T14:30:01Z",
        "--to", str(BASE_MS + 9_000), "--symbols", "A,B",
    )  # fmt: skip
    with proc:
        got = asyncio.run(receive_trades(url, 3))
        proc.wait_for("replay finished: 3 trades sent")
        assert proc.stop() == 0
    assert [e for _, e in got] == [
        {"ev": "T", "sym": "B", "x": 11, "i": f"B{BASE_MS + 1_000}", "z": 3, "p": 20.0,
         "s": 100, "t": BASE_MS + 1_000, "q": 1_000, "pt": BASE_MS + 999},
        {"ev": "T", "sym": "B", "x": 4, "i": f"B{BASE_MS + 2_000}", "z": 3, "p": 20.5, "s": 0,
         "ds": "0.5", "c": [12, 37], "t": BASE_MS + 2_000, "q": 2_000, "trfi": 202,
         "trft": BASE_MS + 2_001, "pt": BASE_MS + 1_999},
        {"ev": "T", "sym": "A", "x": 11, "i": f"A{BASE_MS + 5_000}", "z": 3, "p": 10.0,
         "s": 100, "t": BASE_MS + 5_000, "q": 5_000, "pt": BASE_MS + 4_999},
    ]  # fmt: skip


def test_speed_paces_trades_by_sip_time_and_never_sends_early(tmp_path: Path) -> None:
    path = tmp_path / "day.csv"
    write_csv(path, [trade_row("A", BASE_MS + i * 500, 10.0) for i in range(9)])  # 4 s of SIP
    proc, url = serve(path, "--speed", "8")
    with proc:
        got = asyncio.run(receive_trades(url, 9))
        assert proc.stop() == 0
    first = got[0][0]
    for i, (at, event) in enumerate(got):
        assert event["t"] == BASE_MS + i * 500
        assert at - first >= i * 0.5 / 8 - 0.01, i  # due (t - t0) / speed after the first


def test_bad_rows_are_skipped_and_said_and_a_missing_column_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "day.csv"
    write_csv(path, [trade_row("A", BASE_MS, 10.0), trade_row("A", BASE_MS + 1, 11.0)])
    with path.open("a") as file:
        file.write("A,,0,11\n")  # too few fields
        file.write(",,0,11,x,,12.0,1,1710513000002000000,100,3,,\n")  # no ticker
    proc, url = serve(path, "--speed", "max")
    with proc:
        got = asyncio.run(receive_trades(url, 2))
        proc.wait_for("replay finished: 2 trades sent")
        assert proc.stop() == 0
    assert [e["p"] for _, e in got] == [10.0, 11.0]
    assert (
        "skipped 1 rows with the wrong number of fields (first: 'A,,0,11': 4 fields" in proc.output
    )
    assert "skipped 1 rows without a ticker, price, size or SIP timestamp" in proc.output

    no_price = tmp_path / "no-price.csv"
    header = [c for c in HEADER if c != "price"]
    write_csv(no_price, [trade_row("A", BASE_MS, 10.0)], header)
    with Proc("replay", str(no_price), "--listen", f"127.0.0.1:{free_port()}") as failed:
        assert failed.wait() == 1
    lines = failed.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("polyfan: "), failed.output
    assert "no column price" in lines[0]


def write_recording_day(
    out: Path, run: str, parts: list[list[tuple[str, int]]], compact: bool
) -> int:
    """Parts of (symbol, ms) trades as ``record`` writes them; with ``compact``, also the
    compacted file of all of them, the parts left behind as a killed compaction leaves them."""
    directory = out / "trades" / "date=2024-03-15"
    tables, infos, names = [], [], []
    for seq, trades in enumerate(parts, start=1):
        records = np.zeros(len(trades), codec.TRADE_DTYPE)
        records["t"] = [ms for _, ms in trades]
        records["p"] = 10.0
        records["s"] = 100
        records["q"] = [ms for _, ms in trades]
        symbols = sorted({s for s, _ in trades})
        rows = np.array([symbols.index(s) for s, _ in trades])
        table = flatfile.table_from_records(records, symbols, rows)
        info = recording.PartInfo(1, True, {}, seq, int(records["t"].max()), len(trades))
        name = recording.part_name(run, seq)
        write_parquet(table.replace_schema_metadata(info.to_metadata()), directory, name)
        tables.append(table)
        infos.append(info)
        names.append(name)
    if compact:
        merged = recording.merged(infos, names)
        table = pa.concat_tables(tables).replace_schema_metadata(merged.to_metadata())
        write_parquet(table, directory, recording.compacted_name(run, 1, len(parts)))
    return sum(len(p) for p in parts)


def test_a_recording_cut_short_mid_compaction_replays_each_trade_once(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    run = "20240315T143000000000Z"
    later = "20240315T150000000000Z"
    count = write_recording_day(
        out, run, [[("A", BASE_MS + 2), ("B", BASE_MS)], [("A", BASE_MS + 1)]], compact=True
    )
    count += write_recording_day(out, later, [[("B", BASE_MS + 3)]], compact=False)
    proc, url = serve(out, "--speed", "max")
    with proc:
        got = asyncio.run(receive_trades(url, count))
        proc.wait_for(f"replay finished: {count} trades sent")
        assert proc.stop() == 0
    assert [(e["sym"], e["t"] - BASE_MS) for _, e in got] == [
        ("B", 0), ("A", 1), ("A", 2), ("B", 3),
    ]  # fmt: skip


def test_it_keeps_serving_after_the_last_trade_and_a_new_client_gets_nothing_more(
    tmp_path: Path,
) -> None:
    path = tmp_path / "day.csv.gz"
    import gzip

    with gzip.open(path, "wt", newline="") as file:
        writer = csv.DictWriter(file, HEADER)
        writer.writeheader()
        writer.writerows([trade_row("A", BASE_MS + i, 10.0) for i in range(50)])
    proc, url = serve(path, "--speed", "max")
    with proc:
        assert len(asyncio.run(receive_trades(url, 50))) == 50
        proc.wait_for("replay finished: 50 trades sent; still serving")
        with pytest.raises(TimeoutError):
            asyncio.run(receive_trades(url, 1, timeout=0.5))
        assert proc.popen.poll() is None
        assert proc.stop() == 0


def test_print_config_reads_back(tmp_path: Path) -> None:
    import subprocess

    path = tmp_path / "day.csv"
    write_csv(path, [trade_row("A", BASE_MS, 10.0)])
    printed = subprocess.run(
        [*POLYFAN, "replay", str(path), "--speed", "max", "--from", "2024-03-15",
         "--print-config"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert 'speed = "max"' in printed
    assert 'from = "2024-03-15"' in printed


def test_from_and_to_pick_the_recordings_days_they_reach(tmp_path: Path) -> None:
    out = tmp_path / "rec"
    for day in ("2024-03-14", "2024-03-15", "2024-03-16"):
        (out / "trades" / f"date={day}").mkdir(parents=True)
    from polyfan import replay

    def days(**selection: int) -> list[str]:
        chosen = replay.sources(out, flatfile.Selection(**selection))  # type: ignore[arg-type]
        return [Path(source.label).name for source in chosen]

    assert days() == ["date=2024-03-14", "date=2024-03-15", "date=2024-03-16"]
    assert days(from_ms=BASE_MS) == ["date=2024-03-15", "date=2024-03-16"]
    midnight = 1_710_547_200_000  # 2024-03-16T00:00:00Z
    assert days(to_ms=midnight) == ["date=2024-03-14", "date=2024-03-15"]
    assert days(from_ms=BASE_MS, to_ms=midnight + 1) == ["date=2024-03-15", "date=2024-03-16"]
