"""Bridge fan-out benchmark: bars/s delivered, delay percentiles, bridge CPU per 1,000 clients.

    .venv/bin/python bench/bench_bridge.py                      # 1,000 and 5,000 clients
    .venv/bin/python bench/bench_bridge.py --clients 5000 --seconds 20

A scripted aggregator (a real ZeroMQ XPUB in this process, speaking the agg protocol with
polyfan.wire) publishes one bar on each of 5 channels of ``500Ms`` every ``--period`` seconds
(0.5 s: the real cadence). Each bar's ``vw`` field carries its publish wall time, so a client
computes the delay from the agg publishing a bar to the client having parsed it. The bridge is
a real ``polyfan bridge`` subprocess; the clients are asyncio websockets clients spread over
``--procs`` processes, each subscribed to all 5 channels. The bridge's CPU comes from
/proc/<pid>/stat over the measured window.

The clients are lean (a hand-written frame parser on asyncio's Protocol), but on a 2-core
machine they still share the CPU with the bridge, so the delays include some client-side
queueing: they are an upper bound on the bridge's own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import multiprocessing as mp
import os
import resource
import secrets
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from multiprocessing.synchronize import Event as EventType
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zmq
from websockets.frames import Frame, Opcode

from polyfan import wire

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import free_port

CHANNELS = [f"500Ms.B{i}" for i in range(5)]
INTERVAL = 500


def raise_fd_limit() -> None:
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        lines = response.read().decode().splitlines()
    return {line.split()[0]: float(line.split()[1]) for line in lines if line and line[0] != "#"}


def tree_cpu_seconds(pid: int) -> float:
    """CPU of a process and its children (the bridge's workers)."""
    with open(f"/proc/{pid}/task/{pid}/children") as children:
        pids = [pid, *(int(p) for p in children.read().split())]
    return sum(cpu_seconds(p) for p in pids)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# -- the scripted aggregator -------------------------------------------------------------------


class Agg(threading.Thread):
    def __init__(self, endpoint: str, period: float) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.session = secrets.randbits(63)
        self.seq = wire.Sequencer(self.session)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.publishing = threading.Event()
        self.stopping = threading.Event()
        self.published = 0

    def announce(self) -> None:
        body = {
            "session": self.session,
            "intervals": [INTERVAL],
            "symbols": None,
            "grace": 250,
            "history": 3_600_000,
        }
        self.socket.send(
            wire.encode_json(
                wire.CONTROL_TOPIC,
                wire.Kind.ANNOUNCE,
                self.session,
                self.seq.next(wire.CONTROL_TOPIC),
                body,
            )
        )

    def run(self) -> None:
        next_announce = 0.0
        next_bar = time.monotonic()
        s = int(time.time() * 1000) // INTERVAL * INTERVAL
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_announce:
                self.announce()
                next_announce = now + 1.0
            while self.socket.poll(0):
                message = self.socket.recv()
                if message == b"\x01" + wire.CONTROL_TOPIC:
                    self.announce()
            if self.publishing.is_set() and now >= next_bar:
                next_bar += self.period
                s += INTERVAL
                for channel in CHANNELS:
                    symbol = channel.split(".", 1)[1]
                    row = np.zeros(1, dtype=wire.BAR_DTYPE)
                    row["s"], row["o"], row["h"], row["l"], row["c"] = s, 10.0, 10.5, 9.5, 10.25
                    row["v"], row["n"] = 100, 3
                    row["vw"] = time.time()  # publish wall time, read by the clients
                    topic = wire.bar_topic(INTERVAL, symbol)
                    self.socket.send(
                        wire.encode(
                            topic,
                            wire.Kind.BARS,
                            self.session,
                            self.seq.next(topic),
                            1,
                            row.tobytes(),
                        )
                    )
                    self.published += 1
            time.sleep(0.001)
        self.socket.close(0)
        self.context.term()


# -- client processes ----------------------------------------------------------------------------


class LeanClient(asyncio.Protocol):
    """A minimal WebSocket client on asyncio's Protocol, so that the clients cost little CPU.

    It does the upgrade by hand, sends masked frames built by websockets' ``Frame``, answers
    pings, and splits server frames (unmasked) itself, keeping each with its arrival time; the
    JSON is parsed after the run. That is a few microseconds per frame where a full client
    library costs tens, which on a 2-core machine would be measured as delay.
    """

    def __init__(self, received: list[tuple[float, bytes]], subscribed: list[int]) -> None:
        self.received = received
        self.subscribed = subscribed
        self.buffer = bytearray()
        self.upgraded = False
        self.statuses = 0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(
            (
                "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
            ).encode()
        )

    def send(self, opcode: Opcode, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(Frame(opcode, data).serialize(mask=True, extensions=[]))

    def data_received(self, data: bytes) -> None:
        now = time.time()
        self.buffer += data
        if not self.upgraded:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            assert self.buffer.startswith(b"HTTP/1.1 101"), bytes(self.buffer[:200])
            del self.buffer[: end + 4]
            self.upgraded = True
            self.send(Opcode.TEXT, b'{"action":"auth","params":"bench"}')
            subscribe = {"action": "subscribe", "params": ",".join(CHANNELS)}
            self.send(Opcode.TEXT, orjson.dumps(subscribe))
        buffer = self.buffer
        while len(buffer) >= 2:
            opcode, length, start = buffer[0] & 0x0F, buffer[1] & 0x7F, 2
            if length == 126:
                if len(buffer) < 4:
                    return
                length, start = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                if len(buffer) < 10:
                    return
                length, start = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < start + length:
                return
            payload = bytes(buffer[start : start + length])
            del buffer[: start + length]
            if opcode == Opcode.PING:
                self.send(Opcode.PONG, payload)
            elif opcode == Opcode.TEXT:
                if self.statuses < len(CHANNELS):
                    self.statuses += payload.count(b"subscribed to")
                    if self.statuses == len(CHANNELS):
                        self.subscribed.append(1)
                else:  # parsed after the run: here only the arrival time is taken
                    self.received.append((now, payload))


def client_process(
    port: int, count: int, ready: Any, done: EventType, out: Any, cpus: set[int] | None
) -> None:
    raise_fd_limit()
    if cpus:
        os.sched_setaffinity(0, cpus)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        received: list[tuple[float, bytes]] = []  # (arrival, frame)
        subscribed: list[int] = []
        transports = []
        for start in range(0, count, 100):  # in waves, to stay under the listen backlog
            wave = min(100, count - start)
            opened = await asyncio.gather(
                *(
                    loop.create_connection(
                        lambda: LeanClient(received, subscribed), "127.0.0.1", port
                    )
                    for _ in range(wave)
                )
            )
            transports += [transport for transport, _ in opened]
            while len(subscribed) < len(transports):
                await asyncio.sleep(0.01)
        ready.put(count)
        while not done.is_set():
            await asyncio.sleep(0.05)
        delays = [
            (arrival, arrival - event["vw"])
            for arrival, frame in received
            for event in orjson.loads(frame)
            if event["ev"] == "MB"
        ]
        out.put(np.array(delays, dtype=np.float64).reshape(-1, 2))
        for transport in transports:
            transport.close()

    asyncio.run(main())


def measure(
    clients: int, seconds: float, period: float, procs: int, pin: bool, workers: int = 1
) -> dict[str, float]:
    """One run. With ``pin``, the bridge gets CPU 0 and the clients the other CPUs, so that
    they do not take turns on the bridge's core."""
    cpus = sorted(os.sched_getaffinity(0))
    bridge_cpus = {cpus[0]} if pin and len(cpus) > 1 else None
    client_cpus = set(cpus[1:]) if bridge_cpus else None

    def start_bridge() -> None:
        raise_fd_limit()
        if bridge_cpus:
            os.sched_setaffinity(0, bridge_cpus)

    ctx = mp.get_context("spawn")
    port = free_port()
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    agg = Agg(endpoint, period)
    agg.start()
    env = {**os.environ, "POLYFAN_LOG": "warning"}
    # BENCH_PROFILE=/tmp/bridge.prof runs the bridge under cProfile (for finding hot spots).
    profile = (
        ["-m", "cProfile", "-o", os.environ["BENCH_PROFILE"]]
        if "BENCH_PROFILE" in os.environ
        else []
    )
    bridge = subprocess.Popen(
        [
            sys.executable,
            *profile,
            "-m",
            "polyfan",
            "bridge",
            "--sub",
            endpoint,
            "--listen",
            f"127.0.0.1:{port}",
            "--workers",
            str(workers),
        ],
        env=env,
        preexec_fn=start_bridge,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "bridge did not start"
                time.sleep(0.05)
        time.sleep(1.0)  # let the bridge hear the announce
        ready, out = ctx.Queue(), ctx.Queue()
        done = ctx.Event()
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        workers = [
            ctx.Process(target=client_process, args=(port, n, ready, done, out, client_cpus))
            for n in shares
            if n
        ]
        for worker in workers:
            worker.start()
        connected = sum(ready.get(timeout=300) for _ in workers)
        assert connected == clients
        agg.publishing.set()
        time.sleep(1.0)  # warm up
        metrics0 = metrics(port)
        cpu0, wall0 = tree_cpu_seconds(bridge.pid), time.time()
        time.sleep(seconds)
        cpu1, wall1 = tree_cpu_seconds(bridge.pid), time.time()
        metrics1 = metrics(port)
        passes = (
            metrics1["polyfan_bridge_delivery_passes_total"]
            - metrics0["polyfan_bridge_delivery_passes_total"]
        )
        pass_seconds = (
            metrics1["polyfan_bridge_delivery_seconds_total"]
            - metrics0["polyfan_bridge_delivery_seconds_total"]
        )
        time.sleep(1.0)
        agg.publishing.clear()
        time.sleep(0.5)
        done.set()
        results = [out.get(timeout=120) for _ in workers]
        for worker in workers:
            worker.join(30)
        data = np.concatenate(results)
        in_window = data[(data[:, 0] >= wall0) & (data[:, 0] < wall1)]
        delays_ms = in_window[:, 1] * 1000
        cpu = (cpu1 - cpu0) / (wall1 - wall0)
        return {
            "clients": clients,
            "bars_per_s": len(in_window) / (wall1 - wall0),
            "p50_ms": float(np.percentile(delays_ms, 50)),
            "p99_ms": float(np.percentile(delays_ms, 99)),
            "max_ms": float(delays_ms.max()),
            "bridge_cpu": cpu,
            "cpu_per_1000": cpu / (clients / 1000),
            "pass_ms": 1000 * pass_seconds / max(passes, 1),
        }
    finally:
        bridge.send_signal(2)
        bridge.wait(10)
        agg.stopping.set()
        agg.join(5)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clients", type=int, action="append", help="repeatable (default 1000, 5000)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--period", type=float, default=0.5, help="seconds between bar rounds")
    parser.add_argument("--procs", type=int, default=4, help="client processes")
    parser.add_argument("--workers", type=int, default=1, help="bridge worker processes")
    parser.add_argument(
        "--pin", action="store_true", help="pin the bridge to CPU 0 and the clients to the others"
    )
    args = parser.parse_args()
    raise_fd_limit()
    print(
        f"bridge fan-out: 5 channels of 500Ms, one bar each every {args.period:g}s, "
        f"{args.seconds:g}s measured, {os.cpu_count()} cores, "
        + ("bridge pinned to one, clients to the others" if args.pin else "unpinned")
    )
    print(
        f"{'clients':>8} {'bars/s':>10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8} "
        f"{'bridge CPU':>10} {'CPU/1000 cl':>11} {'pass ms':>8}"
    )
    for clients in args.clients or [1000, 5000]:
        r = measure(clients, args.seconds, args.period, args.procs, args.pin, args.workers)
        print(
            f"{r['clients']:>8} {r['bars_per_s']:>10.0f} {r['p50_ms']:>8.1f} {r['p99_ms']:>8.1f} "
            f"{r['max_ms']:>8.1f} {r['bridge_cpu']:>9.1%} {r['cpu_per_1000']:>10.1%} "
            f"{r['pass_ms']:>8.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
