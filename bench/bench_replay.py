"""``polyfan replay --speed max``: trades/s into a plain WebSocket reader and into a real proxy.

    .venv/bin/python bench/bench_replay.py [--trades 2000000] [--symbols 500]

The trades come from the simulator's market (``polyfan.market``), stored once as a ``record``
directory (zstd Parquet, as ``polyfan record`` writes it) and once as a gzip CSV flat file.

1. In this process: loading each (read, select, sort by SIP time), and turning rows into
   Polygon events and frames (``flatfile.event_texts``, joined per frame), trades/s.
2. ``polyfan replay DIR --speed max`` read by a WebSocket client here that only counts the
   events (no JSON parsing): trades/s from the first frame to the last.
3. ``polyfan replay DIR --speed max`` -> ``polyfan proxy`` -> a SUB here counting the trades
   the proxy publishes: trades/s from the first to the last.

Every process shares the machine's 2 cores with the others: the figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import zmq
from websockets.asyncio.client import connect

from polyfan import replay
from polyfan.feed import flatfile, recording
from polyfan.record import write_parquet
from polyfan.wire import codec

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from bench_record import market_trades
from procs import POLYFAN, free_port


def write_inputs(trades: int, symbols: int, out: Path) -> tuple[Path, Path]:
    records, names, rows = market_trades(trades, symbols)
    table = flatfile.table_from_records(records, names, rows)
    day = flatfile.day_name(int(flatfile.days_of(records["t"][:1] * flatfile.NS_PER_MS)[0]))
    directory = out / "rec"
    info = recording.PartInfo(1, True, {}, 0, int(records["t"].max()), trades)
    write_parquet(
        table.replace_schema_metadata(info.to_metadata()),
        directory / "trades" / f"date={day}",
        recording.part_name("20240315T143000000000Z", 1),
    )
    nullable = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
    frame = table.to_pandas(types_mapper=nullable.get)
    frame["conditions"] = [",".join(map(str, codes)) for codes in frame["conditions"]]
    flat = out / f"{day}.csv.gz"
    frame.to_csv(flat, index=False)
    return directory, flat


def in_process(directory: Path, flat: Path, trades: int) -> None:
    selection = flatfile.Selection()
    for label, source in (("record directory", directory), ("gzip CSV", flat)):
        (only,) = replay.sources(source, selection)
        start = time.perf_counter()
        table, _ = only.load()
        took = time.perf_counter() - start
        print(f"load {label}: {trades / took / 1e6:.2f} M trades/s ({took:.2f} s)")
    start = time.perf_counter()
    for i in range(0, table.num_rows, replay.CHUNK):
        chunk = table.slice(i, replay.CHUNK)
        events = flatfile.event_texts(chunk)
        chunk["ticker"].to_pylist()
        for a in range(0, len(events), replay.FRAME_EVENTS):
            events.frame(a, min(a + replay.FRAME_EVENTS, len(events)))
    took = time.perf_counter() - start
    print(f"rows -> events -> frames: {trades / took / 1e6:.2f} M trades/s")


def start_replay(path: Path, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [*POLYFAN, "replay", str(path), "--speed", "max", "--listen", f"127.0.0.1:{port}"],
        env={**os.environ, "POLYFAN_LOG": "warning"},
    )


async def read_all(url: str, trades: int) -> tuple[float, float]:
    """Count events as they come; the first and last frame's arrival."""
    deadline = time.monotonic() + 120
    while True:
        try:
            ws = await connect(url, max_size=None, compression=None)
            break
        except OSError:
            assert time.monotonic() < deadline, "the replay never listened"
            await asyncio.sleep(0.1)
    seen = 0
    first = 0.0
    async with ws:
        await ws.send('{"action":"auth","params":"bench"}')
        await ws.send('{"action":"subscribe","params":"T.*"}')
        while seen < trades:
            frame = await ws.recv(decode=False)
            count = frame.count(b'"ev":"T"')
            if count and not first:
                first = time.perf_counter()
            seen += count
    return first, time.perf_counter()


def into_reader(directory: Path, trades: int) -> None:
    port = free_port()
    process = start_replay(directory, port)
    try:
        first, last = asyncio.run(read_all(f"ws://127.0.0.1:{port}/stocks", trades))
    finally:
        process.terminate()
        process.wait(10)
    print(f"replay -> WebSocket reader: {trades / (last - first) / 1e6:.2f} M trades/s")


def into_proxy(directory: Path, trades: int, out: Path) -> None:
    port = free_port()
    pub = f"ipc://{out}/proxy.sock"
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"T.")
    sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
    sub.connect(pub)
    proxy = subprocess.Popen(
        [*POLYFAN, "proxy", "--upstream", f"ws://127.0.0.1:{port}/stocks", "--pub", pub],
        env={**os.environ, "POLYFAN_LOG": "warning", "MASSIVE_API_KEY": "bench"},
    )
    replaying: subprocess.Popen[bytes] | None = None
    try:
        assert sub.poll(60_000), "no clock from the proxy"
        sub.recv()
        replaying = start_replay(directory, port)
        seen, first = 0, 0.0
        while seen < trades:
            assert sub.poll(60_000), f"only {seen} trades"
            message = codec.decode(sub.recv())
            if message.kind is codec.Kind.TRADES:
                if not first:
                    first = time.perf_counter()
                seen += message.count
        last = time.perf_counter()
    finally:
        for process in (replaying, proxy):
            if process is not None:
                process.terminate()
                process.wait(10)
        sub.close(0)
        context.term()
    print(f"replay -> proxy -> SUB: {trades / (last - first) / 1e6:.2f} M trades/s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=2_000_000)
    parser.add_argument("--symbols", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        directory, flat = write_inputs(args.trades, args.symbols, out)
        print(
            f"{args.trades:,} trades: record directory "
            f"{sum(p.stat().st_size for p in directory.rglob('*.parquet')) / 1e6:.1f} MB, "
            f"gzip CSV {flat.stat().st_size / 1e6:.1f} MB"
        )
        in_process(directory, flat, args.trades)
        into_reader(directory, args.trades)
        into_proxy(directory, args.trades, out)


if __name__ == "__main__":
    main()
