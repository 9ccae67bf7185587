"""Resident memory of the agg's core after an hour of the whole market.

``.venv/bin/python bench/bench_memory.py [--hours 1] [--rate 3000] [--symbols 10000]``

The measured process is set up as ``polyfan agg`` sets itself up (imports, ``warm_up``, one
``Aggregator``) and receives the feed over ZeroMQ (ipc, PULL: flow-controlled, nothing
dropped) from a child process that generates it, so the generator's own arrays never count.
The market is bench_agg's (Zipf-skewed symbols, the proxy's wire format); feed time runs as
fast as the core takes it, and the child interleaves one ``tick`` marker per 100 ms of feed
time, on which the core does its housekeeping (trim, pack) exactly as often per feed second as
the agg's loop does per wall second. At the end a CLOCK two minutes past the last trade closes
every bar; the figures are VmRSS and VmHWM from /proc/self/status, before and after glibc's
``malloc_trim``, and VmRSS again once two more hours of feed clock have passed with no trade.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_agg import GRACE, INTERVALS, T0, frames_for, grouped, market
from polyfan.agg import TRIM_EVERY_S, warm_up
from polyfan.bars.aggregator import Aggregator
from polyfan.config import AggConfig
from polyfan.wire import codec

TICK = b"tick"
END = b"end"
CHUNK_S = 60


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise LookupError(field)


def feed(endpoint: str, hours: float, rate: float, symbols: int) -> None:
    """The child: an hour of market, a minute at a time, with tick markers between frames."""
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100_000)
    push.connect(endpoint)
    names = [f"S{i}" for i in range(symbols)]
    ticks_per_chunk = round(CHUNK_S / TRIM_EVERY_S)
    for minute in range(0, int(hours * 3600), CHUNK_S):
        trades, sym = market(int(rate * CHUNK_S), symbols, rate=rate, seed=minute)
        trades["t"] += minute * 1000
        frames = frames_for(*grouped(trades, sym, 8), 8, names)
        every = max(1, len(frames) // ticks_per_chunk)
        for k, frame in enumerate(frames):
            push.send(frame)
            if k % every == every - 1:
                push.send(TICK)
    push.send(END)
    push.close(linger=-1)
    context.term()


def measure(hours: float, rate: float, symbols: int) -> None:
    config = AggConfig(intervals_ms=INTERVALS, grace_ms=GRACE, history_ms=3_600_000)
    warm_up(config)
    core = Aggregator(config)
    gc.collect()
    gc.freeze()
    started_mb = status_mb("VmRSS")
    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.setsockopt(zmq.RCVHWM, 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        endpoint = f"ipc://{tmp}/feed"
        pull.bind(endpoint)
        child = subprocess.Popen(
            [sys.executable, __file__, "--feed", endpoint, "--hours", str(hours),
             "--rate", str(rate), "--symbols", str(symbols)]
        )  # fmt: skip
        started = time.perf_counter()
        done = False
        while not done:
            frames = [pull.recv()]
            while len(frames) < 4096:
                try:
                    frames.append(pull.recv(zmq.NOBLOCK))
                except zmq.Again:
                    break
            batch: list[bytes] = []
            for frame in frames:
                if frame in (TICK, END):
                    core.frames_received(batch)
                    batch = []
                    core.tick()
                    done = frame == END
                else:
                    batch.append(frame)
            core.frames_received(batch)
        elapsed = time.perf_counter() - started
        if child.wait() != 0:
            raise SystemExit("the feeding process failed")
    end = T0 + int(hours * 3600 * 1000) + 120_000
    record = np.array([(end, 0)], dtype=codec.CLOCK_DTYPE)
    core.frames_received(
        [codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 2, 1, 1, record.tobytes())]
    )
    core.tick()
    held_mb, peak_mb = status_mb("VmRSS"), status_mb("VmHWM")
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    trimmed_mb = status_mb("VmRSS")
    history = core.history
    print(
        f"memory: {held_mb:,.0f} MB resident, {trimmed_mb:,.0f} MB after malloc_trim, peak "
        f"{peak_mb:,.0f} MB ({started_mb:,.0f} MB when ready, before any trade) after "
        f"{hours:g} h of feed at {rate:,.0f} trades/s over {symbols:,} symbols, "
        f"{len(INTERVALS)} intervals; {core.bars_total.value:,.0f} bars made, "
        f"{history.bar_count:,} held in {history.nbytes / 2**20:,.0f} MB of history "
        f"({history.cold_bytes / 2**20:,.0f} MB of packed records, blocks of {history.block}), "
        f"{len(history):,} series; arena rows allocated/top/free "
        f"{'/'.join(f'{r:,}' for r in history.rows)}; fed in {elapsed:.0f} s"
    )
    # The market closes: two hours later every bar is past the retention.
    record = np.array([(end + 7_200_000, 0)], dtype=codec.CLOCK_DTYPE)
    core.frames_received(
        [codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 2, 2, 1, record.tobytes())]
    )
    for _ in range(64):  # sweeps enough to visit every series
        core.tick()
    print(
        f"memory: {status_mb('VmRSS'):,.0f} MB resident two hours after the last trade "
        f"({history.bar_count:,} bars held)"
    )
    pull.close(0)
    context.term()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--rate", type=float, default=3_000)
    parser.add_argument("--symbols", type=int, default=10_000)
    parser.add_argument("--feed", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.feed:
        feed(args.feed, args.hours, args.rate, args.symbols)
    else:
        measure(args.hours, args.rate, args.symbols)


if __name__ == "__main__":
    main()
