"""Bridge fan-out benchmark: bars/s delivered, delay percentiles, bridge CPU per 1,000 clients.

    .venv/bin/python bench/bench_bridge.py                      # 1,000 and 5,000 clients
    .venv/bin/python bench/bench_bridge.py --clients 5000 --seconds 20 --workers 2

A scripted aggregator (a real ZeroMQ XPUB in this process, speaking the agg protocol with
polyfan.wire.codec) publishes one bar on each of 5 channels of ``500Ms`` every ``--period`` seconds
(0.5 s: the real cadence). Each bar's ``vw`` field carries its publish time
(``time.perf_counter()``: CLOCK_MONOTONIC, the same clock in every process on Linux). The
bridge is a real ``polyfan bridge`` subprocess; the clients are spread over ``--procs``
processes, each subscribed to all 5 channels.

Two delays, both from the aggregator publishing a round of bars:

- **client**: until a client has the whole WebSocket frame carrying a bar (the time of the
  ``recv`` that completed it). The clients are as cheap as that measurement allows: plain
  non-blocking sockets and one ``select.epoll`` loop per process, one ``recv`` per readable
  socket, stamped with ``perf_counter`` and kept as bytes; frames are parsed only while the
  loop has been idle for 50 ms (between rounds, to answer the bridge's pings) and at the end.
  After each batch of reads a client process sleeps ``--nap`` (1 ms): on loopback the
  bridge's ``send()`` wakes the reading process when it sleeps in ``epoll_wait``, and a client
  process that drained its sockets at once and slept again made every send pay a wakeup
  (a pass to 5,000 clients took ~80 ms instead of ~49 ms). The nap can only add to a
  measured delay (up to 1 ms, data waiting is stamped when read), never hide any. On a
  2-core machine the clients' own CPU still shares the cores with the bridge.
- **bridge**: until the bridge's fan-out pass handed its last frame to the kernel (from the
  bridge's pass log, ``POLYFAN_BRIDGE_PASS_LOG``: one line per pass with its first read and
  last write). This is the bridge's own part, whatever the clients cost.

After the run every client is checked: it got every bar of its 5 channels, exactly once, in
order. The bridge's CPU (and the clients') comes from /proc/<pid>/stat over the measured
window; ``others`` is the CPU, in cores, that everything else on the machine used meanwhile
(/proc/stat; other people's runs on a shared machine; it may include softirq time the kernel
charged to no process).
"""

from __future__ import annotations

import argparse
import base64
import multiprocessing as mp
import os
import resource
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import zmq

from polyfan.wire import codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import free_port

CHANNELS = [f"500Ms.B{i}" for i in range(5)]
SYMBOLS = [channel.split(".", 1)[1] for channel in CHANNELS]
INTERVAL = 500
IDLE = 0.05  # seconds without data before a client process parses what it received


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


def machine_busy_seconds() -> float:
    """CPU time every process on the machine has used (all cores), from /proc/stat."""
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def load_average() -> str:
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


# -- the scripted aggregator -------------------------------------------------------------------


class Agg(threading.Thread):
    def __init__(self, endpoint: str, period: float) -> None:
        super().__init__(daemon=True)
        self.period = period
        self.session = secrets.randbits(63)
        self.seq = codec.Sequencer(self.session)
        self.context = zmq.Context()
        self.socket = self.context.socket(zmq.XPUB)
        self.socket.setsockopt(zmq.SNDHWM, 0)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(endpoint)
        self.publishing = threading.Event()
        self.stopping = threading.Event()
        self.rounds: list[tuple[int, float]] = []  # (bar start s, perf_counter at publish)

    def announce(self) -> None:
        body = {
            "session": self.session,
            "intervals": [INTERVAL],
            "symbols": None,
            "grace": 250,
            "history": 3_600_000,
        }
        self.socket.send(
            codec.encode_json(
                codec.CONTROL_TOPIC,
                codec.Kind.ANNOUNCE,
                self.session,
                self.seq.next(codec.CONTROL_TOPIC),
                body,
            )
        )

    def run(self) -> None:
        next_announce = 0.0
        next_bar = time.monotonic()
        s = int(time.time() * 1000) // INTERVAL * INTERVAL
        row = np.zeros(1, dtype=codec.BAR_DTYPE)
        row["o"], row["h"], row["l"], row["c"], row["v"], row["n"] = 10.0, 10.5, 9.5, 10.25, 100, 3
        topics = [codec.bar_topic(INTERVAL, symbol) for symbol in SYMBOLS]
        while not self.stopping.is_set():
            now = time.monotonic()
            if now >= next_announce:
                self.announce()
                next_announce = now + 1.0
            while self.socket.poll(0):
                message = self.socket.recv()
                if message == b"\x01" + codec.CONTROL_TOPIC:
                    self.announce()
            if self.publishing.is_set() and now >= next_bar:
                next_bar += self.period
                s += INTERVAL
                row["s"] = s
                published = time.perf_counter()
                row["vw"] = published  # publish time, read by the clients
                payload = row.tobytes()
                messages = [
                    codec.encode(
                        topic, codec.Kind.BARS, self.session, self.seq.next(topic), 1, payload
                    )
                    for topic in topics
                ]
                for message in messages:  # back to back, as the agg sends a batch's bars
                    self.socket.send(message)
                self.rounds.append((s, published))
            time.sleep(0.001)
        self.socket.close(0)
        self.context.term()


# -- client processes ----------------------------------------------------------------------------


def masked_text(payload: bytes) -> bytes:
    """A client's text frame (clients must mask; payloads here are under 126 bytes)."""
    return _masked(0x81, payload)


def _masked(first: int, payload: bytes) -> bytes:
    assert len(payload) < 126
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes((first, 0x80 | len(payload))) + mask + masked


UPGRADE = (
    "GET / HTTP/1.1\r\nHost: bench\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
AUTH = masked_text(b'{"action":"auth","params":"bench"}')
SUBSCRIBE = masked_text(orjson.dumps({"action": "subscribe", "params": ",".join(CHANNELS)}))


class Conn:
    """One client connection's parse state: bytes not yet framed, frames with arrival times."""

    __slots__ = ("buffer", "closed", "frames", "sock", "statuses", "upgraded")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = bytearray()
        self.upgraded = False
        self.statuses = 0  # auth_success + one "subscribed to" per channel
        self.frames: list[tuple[float, bytes]] = []  # (arrival of its last byte, payload)
        self.closed = False

    def received(self, arrival: float, data: bytes) -> None:
        """Take one ``recv``'s bytes; frame what is complete; answer pings."""
        if not data:
            self.closed = True
            return
        buffer = self.buffer
        buffer += data
        if not self.upgraded:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            assert buffer.startswith(b"HTTP/1.1 101"), bytes(buffer[:200])
            del buffer[: end + 4]
            self.upgraded = True
            self.sock.sendall(AUTH + SUBSCRIBE)
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
            if opcode == 0x9:  # ping
                self.sock.sendall(_masked(0x8A, payload))
            elif opcode == 0x8:  # close
                self.closed = True
            elif opcode == 0x1:
                if self.statuses <= len(CHANNELS):
                    self.statuses += payload.count(b"auth_success") + payload.count(
                        b"subscribed to"
                    )
                else:
                    self.frames.append((arrival, payload))

    def is_subscribed(self) -> bool:
        return self.statuses > len(CHANNELS)


def connect_all(port: int, count: int, poller: select.epoll, source: str) -> dict[int, Conn]:
    """Open ``count`` connections from loopback address ``source`` in waves (under the listen
    backlog and the bridge's 256 handshakes per address); return once every one is
    authenticated and subscribed to all channels."""
    conns: dict[int, Conn] = {}
    for start in range(0, count, 200):
        wave = []
        for _ in range(min(200, count - start)):
            sock = socket.create_connection(("127.0.0.1", port), source_address=(source, 0))
            sock.setblocking(False)
            key = base64.b64encode(os.urandom(16)).decode()
            sock.sendall(UPGRADE.format(key=key).encode())
            conn = Conn(sock)
            conns[sock.fileno()] = conn
            poller.register(sock.fileno(), select.EPOLLIN)
            wave.append(conn)
        deadline = time.monotonic() + 60
        while not all(conn.is_subscribed() for conn in wave):
            assert time.monotonic() < deadline, "clients did not get subscribed"
            for fd, _ in poller.poll(1.0):
                conn = conns[fd]
                conn.received(0.0, conn.sock.recv(65536))
                assert not conn.closed, "the bridge closed a client while subscribing"
    return conns


def client_process(
    port: int, count: int, pipe: Connection, cpus: set[int] | None, nap: float, source: str
) -> None:
    """Connect ``count`` clients, tell the parent, receive until it says stop, then check and
    measure what arrived and send it back."""
    raise_fd_limit()
    if cpus:
        os.sched_setaffinity(0, cpus)
    poller = select.epoll()
    conns = connect_all(port, count, poller, source)
    for conn in conns.values():
        conn.frames.clear()
    stop_fd = pipe.fileno()
    poller.register(stop_fd, select.EPOLLIN)
    recvs = {fd: conn.sock.recv for fd, conn in conns.items()}
    pipe.send(count)
    perf_counter, sleep = time.perf_counter, time.sleep
    poll = poller.poll
    chunks: list[tuple[float, int, bytes]] = []
    append = chunks.append
    running = True
    while running:
        events = poll(IDLE)
        if not events:  # idle: frame what came (pings must be answered within 20 s)
            for arrival, fd, data in chunks:
                conns[fd].received(arrival, data)
            chunks.clear()
            continue
        for fd, _ in events:
            if fd == stop_fd:
                running = False
                break
            try:
                data = recvs[fd](65536)
            except BlockingIOError:
                continue
            except OSError:
                data = b""
            append((perf_counter(), fd, data))
            if not data:  # closed by the bridge: counted as such in the check
                poller.unregister(fd)
        if nap:
            sleep(nap)
    for arrival, fd, data in chunks:
        conns[fd].received(arrival, data)
    window, expected = pipe.recv()
    pipe.send(summarize(list(conns.values()), window, expected))
    for conn in conns.values():
        conn.sock.close()


def summarize(
    conns: list[Conn], window: tuple[float, float], expected: list[int]
) -> dict[str, Any]:
    """Delays of the bars that arrived in the window; every client checked against the bars
    published (``expected``: each channel's bar starts, in order)."""
    w0, w1 = window
    delays: list[float] = []
    bad: list[str] = []
    closed = 0
    for index, conn in enumerate(conns):
        closed += conn.closed
        got: dict[str, list[int]] = {symbol: [] for symbol in SYMBOLS}
        for arrival, payload in conn.frames:
            for event in orjson.loads(payload):
                if event["ev"] != "MB":
                    continue
                got[event["sym"]].append(event["s"])
                if w0 <= arrival < w1:
                    delays.append(arrival - event["vw"])
        wrong = [symbol for symbol, starts in got.items() if starts != expected]
        if wrong and len(bad) < 3:
            starts = got[wrong[0]]
            bad.append(
                f"client {index}: {wrong[0]} got {len(starts)} bars, expected {len(expected)}"
                f" (first differences: {sorted(set(starts) ^ set(expected))[:5]})"
            )
        elif wrong:
            bad.append("")
    return {
        "delays": np.array(delays, dtype=np.float64),
        "clients": len(conns),
        "bad_clients": len(bad),
        "bad_examples": [line for line in bad if line][:3],
        "closed": closed,
    }


# -- one run -----------------------------------------------------------------------------------


def read_pass_log(path: str) -> np.ndarray:
    """Rows of (first read, last write, frames) per pass, from every bridge process."""
    rows = [
        tuple(float(x) for x in line.split()[1:4])
        for line in Path(path).read_text().splitlines()
        if line
    ]
    return np.array(rows, dtype=np.float64).reshape(-1, 3)


def bridge_delays(passes: np.ndarray, rounds: list[tuple[int, float]], window: Any) -> np.ndarray:
    """Per round published in the window: publish -> the last write of the passes that started
    after it and before the next round (the bridge's part of every client's delay)."""
    out = []
    for (_, published), (_, following) in zip(
        rounds, [*rounds[1:], (0, float("inf"))], strict=True
    ):
        if not window[0] <= published < window[1]:
            continue
        mine = passes[(passes[:, 0] >= published) & (passes[:, 0] < following)]
        if len(mine):
            out.append(mine[:, 1].max() - published)
    return np.array(out, dtype=np.float64)


def measure(
    clients: int,
    seconds: float,
    period: float,
    procs: int,
    pin: bool,
    workers: int = 1,
    nap: float = 0.001,
) -> dict[str, Any]:
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
    fd, pass_log = tempfile.mkstemp(prefix="bench-bridge-passes-")
    os.close(fd)
    env = {**os.environ, "POLYFAN_LOG": "warning", "POLYFAN_BRIDGE_PASS_LOG": pass_log}
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
        shares = [clients // procs + (1 if i < clients % procs else 0) for i in range(procs)]
        pipes, processes = [], []
        for i, n in enumerate(shares):
            if n:
                ours, theirs = ctx.Pipe()
                source = f"127.0.0.{2 + i}"  # one address per process (per-address caps)
                process = ctx.Process(
                    target=client_process, args=(port, n, theirs, client_cpus, nap, source)
                )
                process.start()
                pipes.append(ours)
                processes.append(process)
        connected = 0
        for pipe in pipes:
            assert pipe.poll(300), "client process did not connect its clients"
            connected += pipe.recv()
        assert connected == clients
        agg.publishing.set()
        time.sleep(1.0)  # warm up
        load = load_average()
        metrics0 = metrics(port)
        cpu0 = tree_cpu_seconds(bridge.pid)
        client_cpu0 = sum(cpu_seconds(p.pid or 0) for p in processes)
        busy0, own0 = machine_busy_seconds(), cpu_seconds(os.getpid())
        wall0, perf0 = time.time(), time.perf_counter()
        time.sleep(seconds)
        wall1, perf1 = time.time(), time.perf_counter()
        busy1, own1 = machine_busy_seconds(), cpu_seconds(os.getpid())
        cpu1 = tree_cpu_seconds(bridge.pid)
        client_cpu1 = sum(cpu_seconds(p.pid or 0) for p in processes)
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
        time.sleep(1.0)  # the last round reaches every client
        expected = [s for s, _ in agg.rounds]
        for pipe in pipes:  # stop receiving, check, report
            pipe.send(((perf0, perf1), expected))
        results = []
        for pipe in pipes:
            assert pipe.poll(300), "client process did not report"
            results.append(pipe.recv())
        for process in processes:
            process.join(30)
        delays_ms = np.concatenate([r["delays"] for r in results]) * 1000
        bridge_ms = bridge_delays(read_pass_log(pass_log), agg.rounds, (perf0, perf1)) * 1000
        bad = sum(r["bad_clients"] for r in results)
        cpu = (cpu1 - cpu0) / (wall1 - wall0)
        client_cpu = (client_cpu1 - client_cpu0) / (wall1 - wall0)
        # everything else on the machine meanwhile (other people's work), in cores
        others = (busy1 - busy0 - (own1 - own0)) / (wall1 - wall0) - cpu - client_cpu
        return {
            "clients": clients,
            "load": load,
            "bars_per_s": len(delays_ms) / (perf1 - perf0),
            "p50_ms": float(np.percentile(delays_ms, 50)),
            "p99_ms": float(np.percentile(delays_ms, 99)),
            "max_ms": float(delays_ms.max()),
            "bridge_p50_ms": float(np.percentile(bridge_ms, 50)),
            "bridge_p99_ms": float(np.percentile(bridge_ms, 99)),
            "bridge_max_ms": float(bridge_ms.max()),
            "bridge_cpu": cpu,
            "cpu_per_1000": cpu / (clients / 1000),
            "client_cpu": client_cpu,
            "others_cpu": max(others, 0.0),
            "pass_ms": 1000 * pass_seconds / max(passes, 1),
            "checked": f"{clients - bad}/{clients} ok"
            + "".join(f"; {line}" for r in results for line in r["bad_examples"]),
        }
    finally:
        bridge.send_signal(2)
        bridge.wait(10)
        agg.stopping.set()
        agg.join(5)
        if "BENCH_KEEP_PASSES" in os.environ:
            print(f"pass log kept: {pass_log}", file=sys.stderr)
        else:
            os.unlink(pass_log)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clients", type=int, action="append", help="repeatable (default 1000, 5000)"
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window")
    parser.add_argument("--period", type=float, default=0.5, help="seconds between bar rounds")
    parser.add_argument("--procs", type=int, default=2, help="client processes")
    parser.add_argument("--workers", type=int, default=1, help="bridge worker processes")
    parser.add_argument(
        "--nap",
        type=float,
        default=0.001,
        help="seconds a client process sleeps after each batch of reads (0: none)",
    )
    parser.add_argument(
        "--pin", action="store_true", help="pin the bridge to CPU 0 and the clients to the others"
    )
    args = parser.parse_args()
    raise_fd_limit()
    print(
        f"bridge fan-out: 5 channels of 500Ms, one bar each every {args.period:g}s, "
        f"{args.seconds:g}s measured, {os.cpu_count()} cores, {args.procs} client processes, "
        f"bridge --workers {args.workers}, "
        + ("bridge pinned to one, clients to the others" if args.pin else "unpinned")
    )
    print(
        f"{'':>17}{'--- client delay ms ---':>25} {'--- bridge delay ms ---':>24}\n"
        f"{'clients':>8} {'bars/s':>8} {'p50':>7} {'p99':>7} {'max':>7}   "
        f"{'p50':>7} {'p99':>7} {'max':>7} {'pass ms':>8} {'bridge CPU':>10} "
        f"{'CPU/1000':>8} {'client CPU':>10} {'others':>6}  load avg, check"
    )
    for clients in args.clients or [1000, 5000]:
        r = measure(
            clients, args.seconds, args.period, args.procs, args.pin, args.workers, args.nap
        )
        print(
            f"{r['clients']:>8} {r['bars_per_s']:>8.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
            f"{r['max_ms']:>7.1f}   {r['bridge_p50_ms']:>7.1f} {r['bridge_p99_ms']:>7.1f} "
            f"{r['bridge_max_ms']:>7.1f} {r['pass_ms']:>8.1f} {r['bridge_cpu']:>10.1%} "
            f"{r['cpu_per_1000']:>8.1%} {r['client_cpu']:>10.1%} {r['others_cpu']:>6.2f}  "
            f"{r['load']}, {r['checked']}",
            flush=True,
        )


if __name__ == "__main__":
    main()
