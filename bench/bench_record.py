"""``polyfan record`` flat out, and what a trade costs on disk against a gzip CSV flat file.

    .venv/bin/python bench/bench_record.py [--trades 2000000 --rounds 5] [--symbols 500]
        [--per-message 51] [--rate TRADES_PER_S]

1. In this process: the writer's own work on the same trades (wire records -> flat-file
   columns -> one zstd Parquet file), trades/s, the ceiling of one writer thread.
2. End to end: a PUB here publishes the trades ``--rounds`` times as the proxy does
   (``T.<SYM>`` messages of ``--per-message`` trades on average, one symbol each, per-topic
   sequence numbers, the clock on ``_ctl``), as fast as ZeroMQ takes them or paced at
   ``--rate``, into a real ``polyfan record`` subprocess (``--flush 1s``). Prints trades/s
   received and written (from the first message sent to the counter reaching the total), how
   long after the last send the last trade was on disk, and the messages lost (sequence gaps;
   must be 0). Flat out, the sender outruns the recorder and the figure is the recorder's
   sustained rate; paced, a recorder that keeps up has the last trade on disk within about a
   flush of the last send.
3. Bytes per trade: the 1 s parts as written, the same trades in one file as compaction
   writes it (zstd; and snappy for comparison), and a gzip
   CSV flat file of the same trades with the same columns (pandas ``to_csv``, gzip level 6 as
   Python's ``gzip`` writes by default... see ``--gzip-level``), conditions as ``"12,37"``.

The trades come from the simulator's market (``polyfan.market``): Zipf-active symbols, odd lots,
conditions, off-exchange prints with TRF fields. The wire carries no trade id and no
participant timestamp, so both formats hold those columns empty; Polygon's own flat files carry
them (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import zmq

from polyfan import record
from polyfan.feed import flatfile
from polyfan.market import Market
from polyfan.wire import codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import POLYFAN, free_port


def market_trades(count: int, symbols: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    """``count`` trades as wire records, the symbol names and each record's symbol index."""
    market = Market(symbols, seed=7)
    names = list(market.symbols)
    index = {name: i for i, name in enumerate(names)}
    records = np.zeros(count, codec.TRADE_DTYPE)
    rows = np.zeros(count, np.int32)
    now = 1_710_513_000_000
    done = 0
    while done < count:
        batch = market.trades(min(50_000, count - done), now)
        for i, e in enumerate(batch, start=done):
            codes = e.get("c", ())
            records[i] = (
                e["t"], e["p"], float(e["ds"]), e["q"], e.get("trft", 0), e.get("trfi", 0),
                e["x"], e["z"], len(codes), [*codes, *[0] * (8 - len(codes))], (0, 0),
            )  # fmt: skip
            rows[i] = index[e["sym"]]
        done += len(batch)
        now += 1_000
    return records, names, rows


def wire_messages(
    records: np.ndarray,
    names: list[str],
    rows: np.ndarray,
    per_message: int,
    sequencer: codec.Sequencer,
) -> list[bytes]:
    """The proxy's messages: a drain's trades grouped by symbol, in arrival order, with drains
    just large enough for ``per_message`` trades a message on average."""
    drain = 64
    sample = rows[:200_000]
    while drain < len(sample):
        starts = range(0, len(sample), drain)
        messages_in = sum(len(np.unique(sample[i : i + drain])) for i in starts)
        if len(sample) / messages_in >= per_message:
            break
        drain *= 2
    messages = []
    for start in range(0, len(records), drain):
        chunk, chunk_rows = records[start : start + drain], rows[start : start + drain]
        order = np.argsort(chunk_rows, kind="stable")
        grouped, symbols = chunk[order], chunk_rows[order]
        bounds = np.flatnonzero(np.diff(symbols)) + 1
        for part, idx in zip(np.split(grouped, bounds), np.split(symbols, bounds), strict=True):
            topic = codec.trade_topic(names[int(idx[0])])
            messages.append(sequencer.encode(topic, codec.Kind.TRADES, len(part), part.tobytes()))
    return messages


def clock_message(sequencer: codec.Sequencer, clock: int) -> bytes:
    record = np.array([(clock, int(time.time() * 1000))], codec.CLOCK_DTYPE)
    return sequencer.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, record.tobytes())


def rate(per_s: float) -> str:
    return f"{per_s / 1e6:.2f} M/s" if per_s >= 1e5 else f"{per_s / 1e3:.1f} k/s"


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {
        line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line and not line.startswith("#")
    }


def in_process(records: np.ndarray, names: list[str], rows: np.ndarray, out: Path) -> None:
    start = time.perf_counter()
    table = flatfile.table_from_records(records, names, rows)
    built = time.perf_counter()
    pq.write_table(table, out / "one.parquet", compression="zstd")
    written = time.perf_counter()
    n = len(records)
    print(
        f"in process: columns {n / (built - start) / 1e6:.2f} M trades/s, "
        f"zstd Parquet {n / (written - built) / 1e6:.2f} M trades/s, "
        f"both {n / (written - start) / 1e6:.2f} M trades/s"
    )


def end_to_end(
    records: np.ndarray,
    names: list[str],
    rows: np.ndarray,
    args: argparse.Namespace,
    out: Path,
) -> tuple[Path, int]:
    """Publish ``--rounds`` copies of the trades (fresh sequence numbers each round) to a real
    ``polyfan record``, flat out or at ``--rate``; return its directory and the total."""
    session = 0x5EED
    sequencer = codec.Sequencer(session)
    address = f"ipc://{out}/pub.sock"
    metrics = free_port()
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pub = context.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(address)
    directory = out / "rec"
    recorder = subprocess.Popen(
        [*POLYFAN, "record", "--sub", address, "--out", str(directory), "--metrics",
         f"127.0.0.1:{metrics}"],
        env={**os.environ, "POLYFAN_LOG": "warning"},
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:  # until the recorder hears the clock: it has joined
            pub.send(clock_message(sequencer, 0))
            try:
                if scrape(metrics)["polyfan_record_messages_total"] > 0:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "the recorder never joined"
            time.sleep(0.05)
        rounds = [
            wire_messages(records, names, rows, args.per_message, sequencer)
            for _ in range(args.rounds)
        ]
        messages = [m for round_ in rounds for m in round_]
        trades = len(records) * args.rounds
        per_message = trades / len(messages)
        max_t = int(records["t"].max())
        start = time.perf_counter()
        last_clock = start
        sent_trades = 0.0
        for i, message in enumerate(messages):
            pub.send(message, copy=False)
            sent_trades += per_message
            if i % 64 == 0:
                now = time.perf_counter()
                if now - last_clock >= 0.1:
                    pub.send(clock_message(sequencer, max_t))
                    last_clock = now
                if args.rate:
                    ahead = sent_trades / args.rate - (now - start)
                    if ahead > 0:
                        time.sleep(ahead)
        sent = time.perf_counter()
        received_at = written_at = None
        most_buffered = 0.0
        while written_at is None:
            values = scrape(metrics)
            now = time.perf_counter()
            most_buffered = max(most_buffered, values["polyfan_record_buffered_trades"])
            if received_at is None and values["polyfan_record_trades_received_total"] >= trades:
                received_at = now
            if values["polyfan_record_trades_written_total"] >= trades:
                written_at = now
            time.sleep(0.02)
        assert received_at is not None
        print(
            f"end to end: {trades:,} trades in {len(messages):,} messages "
            f"({per_message:.1f} a message), sent in {sent - start:.2f} s "
            f"({rate(trades / (sent - start))}{', paced' if args.rate else ''})"
        )
        print(
            f"  trades received {rate(trades / (received_at - start))}, "
            f"written {rate(trades / (written_at - start))}; the last trade "
            f"on disk {written_at - sent:.2f} s after it was sent (--flush 1s); "
            f"gaps {values['polyfan_record_gaps_total']:.0f}, "
            f"write errors {values['polyfan_record_write_errors_total']:.0f}"
        )
        parts = list(directory.glob("trades/date=*/part-*.parquet"))
        part_bytes = sum(p.stat().st_size for p in parts)
        print(f"  parts as flushed: {len(parts)} files, {part_bytes / trades:.2f} bytes/trade")
    finally:
        recorder.send_signal(signal.SIGKILL)  # the parts stay as flushed
        recorder.wait(10)
        pub.close(0)
        context.term()
    return directory, trades


def sizes(directory: Path, trades: int, out: Path, gzip_level: int) -> None:
    files = sorted(directory.glob("trades/date=*/part-*.parquet"))
    table = pa.concat_tables(pq.read_table(p) for p in files).replace_schema_metadata(None)
    assert table.num_rows == trades, (table.num_rows, trades)
    for label, path, compression in (
        ("compacted as record does (zstd)", out / "zstd.parquet", record.COMPRESSION),
        ("same table, snappy", out / "snappy.parquet", "snappy"),
    ):
        pq.write_table(table, path, compression=compression)
        print(f"  {label}: {path.stat().st_size / trades:.2f} bytes/trade")
    nullable = {pa.int64(): pd.Int64Dtype(), pa.int32(): pd.Int32Dtype()}
    frame = table.to_pandas(types_mapper=nullable.get)
    frame["conditions"] = [",".join(map(str, codes)) for codes in frame["conditions"]]
    csv_path = out / "flat.csv.gz"
    start = time.perf_counter()
    frame[list(flatfile.COLUMNS)].to_csv(
        csv_path, index=False, compression={"method": "gzip", "compresslevel": gzip_level}
    )
    took = time.perf_counter() - start
    print(
        f"  gzip CSV (level {gzip_level}): {csv_path.stat().st_size / trades:.2f} bytes/trade "
        f"(written by pandas at {trades / took / 1e6:.2f} M trades/s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trades", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=5, help="publish the trades this often")
    parser.add_argument("--rate", type=float, default=0, help="trades/s to pace at; 0: flat out")
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--per-message", type=int, default=51)
    parser.add_argument("--gzip-level", type=int, default=6)
    args = parser.parse_args()
    records, names, rows = market_trades(args.trades, args.symbols)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        in_process(records, names, rows, out)
        directory, trades = end_to_end(records, names, rows, args, out)
        sizes(directory, trades, out, args.gzip_level)


if __name__ == "__main__":
    main()
