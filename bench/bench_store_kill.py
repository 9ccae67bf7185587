"""What a ``kill -9`` of ``polyfan agg --store`` loses, in feed-clock milliseconds, against
``--flush``.

``.venv/bin/python bench/bench_store_kill.py [--kills 10] [--flush 1s] [--symbols 1000]
[--rate 2000]``

This script publishes trades on the proxy's wire (ipc), paced in real time: the feed clock is
the wall clock (Unix ms, relayed 10 times a second), so feed-clock milliseconds compare with
``--flush`` directly. A real ``polyfan agg --store DIR --flush F`` runs on it; ``--kills``
times, at a random moment 2 to 4 s after it is ready and hears the feed, it is killed with
SIGKILL and restarted on the same store. Per kill:

- ``durable``: ``polyfan_agg_store_durable_until`` scraped just before the kill, minus the
  last clock the agg relayed before it died (how far the durable clock trailed the agg's own);
- ``lost``: the last clock the agg relayed, minus the clock the restarted agg says it kept
  (its announce's ``stored.to``): the feed-clock span whose closed bars were lost. At most
  ``--flush`` plus the time one flush takes (write and fdatasync), plus the loop's lag.

Printed per kill and summarised (median, max). Not run by CI.
"""

from __future__ import annotations

import argparse
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import zmq

from polyfan.config import parse_duration_ms
from polyfan.wire import codec

POLYFAN = [sys.executable, "-m", "polyfan"]


class Feed:
    """Trades and clocks on a PUB, from a thread, in real time."""

    def __init__(self, address: str, symbols: int, rate: float) -> None:
        self.context = zmq.Context()
        self.pub = self.context.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        self.pub.bind(address)
        self.names = [f"S{i}" for i in range(symbols)]
        self.rate = rate
        self.sequencer = codec.Sequencer(12345)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _send(self, topic: bytes, kind: codec.Kind, records: np.ndarray) -> None:
        seq = self.sequencer.next(topic)
        self.pub.send(codec.encode(topic, kind, 12345, seq, len(records), records.tobytes()))

    def _run(self) -> None:
        rng = np.random.default_rng(1)
        step = 0.01  # a tick of trades every 10 ms, a clock every 100 ms
        tick = 0
        while not self._stop.is_set():
            now = int(time.time() * 1000)
            count = rng.poisson(self.rate * step)
            for symbol in rng.integers(0, len(self.names), count).tolist():
                records = np.zeros(1, dtype=codec.TRADE_DTYPE)
                records["t"], records["p"], records["s"] = now, 10 + rng.random(), 100
                self._send(codec.trade_topic(self.names[symbol]), codec.Kind.TRADES, records)
            if tick % 10 == 0:
                clock = np.array([(now, now)], dtype=codec.CLOCK_DTYPE)
                self._send(codec.CONTROL_TOPIC, codec.Kind.CLOCK, clock)
            tick += 1
            self._stop.wait(step)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.pub.close(0)
        self.context.term()


class Watch:
    """The agg's clock relays and announces, from a SUB on its PUB."""

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], address: str) -> None:
        self.sub = context.socket(zmq.SUB)
        self.sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
        self.sub.connect(address)
        self.clock: int | None = None
        self.announce: dict[str, object] | None = None

    def drain(self, timeout: float) -> None:
        if not self.sub.poll(int(timeout * 1000)):
            return
        while True:
            try:
                message = codec.decode(self.sub.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            if message.kind is codec.Kind.CLOCK and message.count:
                self.clock = int(codec.records(message)["clock"].max())
            elif message.kind is codec.Kind.ANNOUNCE:
                self.announce = codec.decode_json(message)


def durable_until(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith("polyfan_agg_store_durable_until "):
                return int(float(line.split()[1]))
    raise AssertionError("no polyfan_agg_store_durable_until")


def start_agg(args: list[str], log: Path) -> subprocess.Popen[bytes]:
    """``polyfan agg`` (output to ``log``), once its ``ready:`` line is there."""
    start = log.stat().st_size if log.exists() else 0
    with open(log, "ab") as out:
        agg = subprocess.Popen([*POLYFAN, *args], stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while b"ready:" not in log.read_bytes()[start:]:
        assert agg.poll() is None, f"agg exited {agg.returncode} before ready (see {log})"
        assert time.monotonic() < deadline, "agg not ready in 60 s"
        time.sleep(0.05)
    return agg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--flush", default="1s")
    parser.add_argument("--symbols", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=2000.0, help="trades/s")
    options = parser.parse_args()
    flush_ms = parse_duration_ms(options.flush)
    rng = random.Random()
    with tempfile.TemporaryDirectory() as tmp:
        proxy, pub = f"ipc://{tmp}/p.sock", f"ipc://{tmp}/a.sock"
        port = 19_000 + rng.randrange(1000)
        args = ["agg", "--sub", proxy, "--pub", pub, "--metrics", f"127.0.0.1:{port}"]
        args += ["--store", str(Path(tmp) / "store"), "--flush", options.flush]
        feed = Feed(proxy, options.symbols, options.rate)
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        lost: list[int] = []
        trailed: list[int] = []
        log = Path(tmp) / "agg.log"
        agg = start_agg(args, log)
        try:
            for kill in range(options.kills):
                watch = Watch(context, pub)
                deadline = time.monotonic() + 30
                while watch.clock is None:  # it hears the feed
                    assert time.monotonic() < deadline, "the agg relays no clock"
                    watch.drain(0.05)
                end = time.monotonic() + rng.uniform(2, 4)
                while time.monotonic() < end:
                    watch.drain(0.01)
                durable = durable_until(port)
                agg.kill()
                agg.wait()
                watch.drain(0.2)
                last = watch.clock
                watch.sub.close(0)
                agg = start_agg(args, log)
                watch = Watch(context, pub)
                deadline = time.monotonic() + 30
                while watch.announce is None:
                    assert time.monotonic() < deadline, "no announce from the restarted agg"
                    watch.drain(0.05)
                stored = watch.announce["stored"]
                assert isinstance(stored, dict) and last is not None
                kept = int(stored["to"])
                lost.append(last - kept)
                trailed.append(last - durable)
                print(
                    f"kill {kill + 1}: last clock relayed {last}, durable_until read "
                    f"{durable} ({last - durable} ms behind), kept to {kept}: "
                    f"{last - kept} ms of feed clock lost (--flush {flush_ms} ms)"
                )
                watch.sub.close(0)
        finally:
            agg.kill()
            agg.wait()
            feed.close()
            context.term()
    print(
        f"{options.kills} kills, --flush {flush_ms} ms, {options.rate:g} trades/s over "
        f"{options.symbols} symbols: feed clock lost median {statistics.median(lost):.0f} ms, "
        f"max {max(lost)} ms; durable_until behind the agg's clock median "
        f"{statistics.median(trailed):.0f} ms, max {max(trailed)} ms"
    )


if __name__ == "__main__":
    main()
