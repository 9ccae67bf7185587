"""``agg --store``: bytes per bar, write cost, load time and restart time, barcodec vs Parquet.

``.venv/bin/python bench/bench_store.py [--minutes 60] [--rate 3000] [--symbols 10000]``

1. An hour of bench_memory's market (Zipf-skewed symbols, the proxy's wire format) goes through
   an agg core (``Aggregator``) in this process, a minute at a time; every batch's closed bars
   go to a :class:`BarStore` exactly as the agg's loop hands them (``put``), and the store is
   flushed once per second of feed clock (its writer's work, done here in line so it can be
   timed): write-ahead frames, sealed into a segment every minute.
2. The same bars, segment by segment, are written as Parquet (pyarrow, zstd, the columns
   sorted by symbol, interval and start, symbol dictionary-encoded): bytes per bar, and the
   time to open the store and read bars back, in both formats.
3. ``polyfan agg --store DIR`` is started on the barcodec store, sealed and with one minute of
   write-ahead log left unsealed (as a ``kill -9`` leaves it): time to ``ready:``.

Part 2 needs pyarrow, which neither polyfan's store nor its tests use, so the ``test`` extra
does not pin it: ``.venv/bin/pip install 'pyarrow==26.0.1'`` (the version the figures in
docs/benchmarks.md were measured with) before running this script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agg import GRACE, INTERVALS, frames_for, grouped, market
from polyfan.agg import warm_up
from polyfan.bars import segments
from polyfan.bars.aggregator import Aggregator
from polyfan.config import AggConfig
from polyfan.store import BarStore
from polyfan.wire import codec
from polyfan.wire.ingest import join_frames

POLYFAN = [sys.executable, "-m", "polyfan"]


def build(directory: Path, minutes: int, rate: float, symbols: int) -> dict[str, float]:
    config = AggConfig(intervals_ms=INTERVALS, grace_ms=GRACE, history_ms=1_000)
    warm_up(config)
    segments.warm_up()
    core = Aggregator(config)
    store = BarStore(directory, INTERVALS, retain_ms=7 * 86_400_000, flush_ms=1000)
    store.open()
    store._names = core.decoder.symbol_names  # the writer's work is done in line below
    names = [f"S{i}" for i in range(symbols)]
    put_s = 0.0
    bars = 0
    next_flush = None
    started = time.perf_counter()
    for minute in range(minutes):
        trades, sym = market(int(rate * 60), symbols, rate=rate, seed=minute)
        trades["t"] += minute * 60_000
        frames = frames_for(*grouped(trades, sym, 8), 8, names)
        for at in range(0, len(frames), 512):
            out = core.batch_received(*join_frames(frames[at : at + 512]))
            clock = core.decoder.clock
            if out.count:
                t = time.perf_counter()
                store.put(out.series, out.bars, clock)
                put_s += time.perf_counter() - t
                bars += len(out.series)
            if clock is not None:
                store.clocked(clock)
                if next_flush is None:
                    next_flush = clock + 1000
                if clock >= next_flush:
                    store._flush()
                    next_flush = clock + 1000
        core.tick()
    store._flush()
    if store._wal is not None:
        store._roll(store._clock or 0)  # sealed: both formats get the same bars
    elapsed = time.perf_counter() - started
    return {
        "bars": bars,
        "put_ns": put_s / bars * 1e9,
        "flush_ns": store.flush_seconds.value / bars * 1e9,
        "seal_ns": store.seal_seconds.value / bars * 1e9,
        "elapsed": elapsed,
    }


def dir_bytes(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern))


def to_parquet(store_dir: Path, out: Path) -> float:
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for path in sorted((store_dir / "seg").glob("*.bars")):
        segment = segments.Segment(np.fromfile(path, dtype=np.uint8))
        names, name, interval, bars = segment.all_bars()
        symbol = pa.DictionaryArray.from_arrays(
            pa.array(name, pa.int32()), pa.array(names, pa.string())
        )
        table = pa.table(
            {
                "symbol": symbol,
                "interval": pa.array(interval, pa.int32()),
                **{field: bars[field] for field in codec.BAR_DTYPE.names or ()},
            }
        )
        pq.write_table(table, out / (path.stem + ".parquet"), compression="zstd")
    return time.perf_counter() - started


def read_barcodec(store_dir: Path, symbol: str) -> dict[str, float]:
    started = time.perf_counter()
    store = BarStore(store_dir, INTERVALS, retain_ms=7 * 86_400_000, flush_ms=1000)
    loaded = store.open()
    opened = time.perf_counter() - started
    t = time.perf_counter()
    one = sum(len(store.select(symbol, i, None, None, None)) for i in INTERVALS)
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    total = 0
    for _path, segment in store._segments:
        total += len(segment.all_bars()[3])
    all_s = time.perf_counter() - t
    assert total == loaded.bars
    return {"open": opened, "one": one_s, "one_bars": one, "all": all_s, "all_bars": total}


def read_parquet(directory: Path, symbol: str) -> dict[str, float]:
    import pyarrow.compute as pc
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    started = time.perf_counter()
    files = [pq.ParquetFile(p) for p in sorted(directory.glob("*.parquet"))]
    opened = time.perf_counter() - started
    dataset = ds.dataset(directory, format="parquet")
    t = time.perf_counter()
    one = dataset.to_table(filter=pc.field("symbol") == symbol).num_rows
    one_s = time.perf_counter() - t
    t = time.perf_counter()
    total = sum(f.read().num_rows for f in files)
    all_s = time.perf_counter() - t
    return {"open": opened, "one": one_s, "one_bars": one, "all": all_s, "all_bars": total}


def restart_time(store_dir: Path, runs: int) -> list[float]:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs):
            args = ["agg", "--sub", f"ipc://{tmp}/p", "--pub", f"ipc://{tmp}/a{run}"]
            args += ["--store", str(store_dir)]
            started = time.perf_counter()
            proc = subprocess.Popen(
                [*POLYFAN, *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                env={**os.environ, "POLYFAN_LOG": "info"},
            )
            assert proc.stdout is not None
            for line in proc.stdout:
                if "ready:" in line:
                    times.append(time.perf_counter() - started)
                    break
            else:
                raise SystemExit(f"agg did not start: {proc.wait()}")
            proc.send_signal(2)
            proc.wait(10)
            proc.stdout.close()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--rate", type=float, default=3_000)
    parser.add_argument("--symbols", type=int, default=10_000)
    parser.add_argument("--dir", type=Path, help="keep the stores here (default: a temp dir)")
    args = parser.parse_args()
    root = args.dir or Path(tempfile.mkdtemp(prefix="bench-store-"))
    store_dir = root / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    shape = f"{args.minutes} min x {args.symbols:,} symbols x {len(INTERVALS)} intervals"
    made = build(store_dir, args.minutes, args.rate, args.symbols)
    bars = int(made["bars"])
    sealed = dir_bytes(store_dir / "seg", "*.bars")
    wal = dir_bytes(store_dir / "wal", "*.log")
    print(
        f"store: {shape} at {args.rate:,.0f} trades/s: {bars:,} bars made in "
        f"{made['elapsed']:.0f} s; on the agg's loop {made['put_ns']:.0f} ns a bar (put); "
        f"writer thread {made['flush_ns']:.0f} ns a bar appending + fdatasync once a second, "
        f"{made['seal_ns']:.0f} ns a bar sealing"
    )
    segs = len(list((store_dir / "seg").glob("*.bars")))
    print(
        f"barcodec: {sealed / bars:.2f} bytes a bar sealed ({sealed / 2**20:,.0f} MB in "
        f"{segs} segments, indexes included); write-ahead log {wal / 2**20:,.0f} MB open"
    )
    parquet_dir = root / "parquet"
    shutil.rmtree(parquet_dir, ignore_errors=True)
    written = to_parquet(store_dir, parquet_dir)
    pbytes = dir_bytes(parquet_dir, "*.parquet")
    print(
        f"parquet (zstd, per segment): {pbytes / bars:.2f} bytes a bar "
        f"({pbytes / 2**20:,.0f} MB), written in {written:.1f} s"
    )
    symbol = "S0"  # the busiest symbol
    for label, got in (
        ("barcodec", read_barcodec(store_dir, symbol)),
        ("parquet", read_parquet(parquet_dir, symbol)),
    ):
        print(
            f"load {label}: open {got['open'] * 1000:.0f} ms; one symbol's hour (all "
            f"intervals, {got['one_bars']:,.0f} bars) {got['one'] * 1000:.0f} ms; every bar "
            f"({got['all_bars']:,.0f}) {got['all']:.1f} s"
        )
    times = restart_time(store_dir, 3)
    print(
        f"restart: polyfan agg --store to ready: median {statistics.median(times):.2f} s "
        f"over {len(times)} runs ({shape} sealed)"
    )
    # a kill -9 leaves up to a minute of log: write one (the last minute again) and restart
    log_dir = store_dir / "wal"
    newest = max((store_dir / "seg").glob("*.bars"), key=lambda p: p.stem.split("-")[1])
    segment = segments.Segment(np.fromfile(newest, dtype=np.uint8))
    names, name, interval, minute_bars = segment.all_bars()
    frame = segments.encode_frame(segment.clock + 60_000, names, name, interval, minute_bars)
    (log_dir / f"{segment.clock + 1:020d}.log").write_bytes(frame)
    times = restart_time(store_dir, 1)
    print(
        f"restart with {len(minute_bars):,} bars of unsealed log: {times[0]:.2f} s to ready "
        f"(the log sealed first)"
    )
    if args.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
