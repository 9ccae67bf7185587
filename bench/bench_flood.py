"""Issue 10's connection flood at its full scale against a real bridge, before and after.

    .venv/bin/python bench/bench_flood.py                    # this tree's bridge
    .venv/bin/python bench/bench_flood.py --commit ae1c54f   # the code before the flood work
    .venv/bin/python bench/bench_flood.py --src /tmp/old/src [--bridge-python PATH]

Starts a scripted aggregator (tests/fake_agg.py: a real ZeroMQ XPUB in this process) and a real
``polyfan bridge`` from the CLI, subscribes one WebSocket client to ``100Ms.TSLA``, and has the
aggregator publish one bar of that channel every 100 ms (the channel's live cadence). Then it
runs the issue's attack, ``tests/flood.py PORT 127.0.0.2,127.0.0.3 9990``: 2 × 9,990 half-open
connections from two addresses, every one the bridge closes opened again (at most 2,000 a
second). Throughout, it samples:

- the bridge's open files (``/proc/PID/fd``) and RSS every 0.25 s, its CPU from /proc/PID/stat;
- ``GET /healthz`` on a new connection from 127.0.0.1, one after the other with 0.1 s between:
  latency of each answer, and how many got no answer within 2 s (timed out) or an error;
- the client's bars: each bar's delay from the aggregator's send to the client's receive,
  the longest gap between two bars received (expected: 100 ms), and bars never received;
- the flood's counts (connections opened, closed by the bridge, held open).

Phases: ``quiet`` (``--quiet`` s before the flood), ``ramp`` (from the flood's start until it
has opened 19,980 connections: ~10 s at its 2,000 a second), ``held`` (``--seconds`` s more
of flood), ``after`` (``--after`` s once the flood process has closed its connections: do
files and memory come back?). A bar counts in the phase it was sent in, a gap in the phase
its second bar arrived in. Prints one table; figures are not checked (a benchmark, not a test).

``--commit SHA`` runs the bridge from ``git worktree add --detach /tmp/polyfan-flood-SHA SHA``
(kept for the next run) with ``PYTHONPATH`` at its ``src``; the aggregator, client and flood are
this tree's (the wire format of announces and bars is the same). The commit before the flood
work is ae1c54f, the parent of eb30634 (the first commit of src/polyfan/admission.py, now
src/polyfan/web/admission.py). The bridge raises its open-files soft limit to the hard one at
start (both trees); the flood process needs 19,980 files of its own, so the hard limit must
be above that (20,000 here). Every process this starts is stopped at the end, also on Ctrl-C;
the bridge dies with this process (PR_SET_PDEATHSIG) and the flood stops when its stdin closes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import itertools
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import polyfan
from fake_agg import FakeAgg, bar_rows
from procs import free_port
from test_bridge_flood import Flood, open_files, rss_bytes
from wsclient import Client

ROOT = Path(__file__).resolve().parents[1]
T0 = 1_781_622_376_000
INTERVAL_MS = 100
CHANNEL = f"{INTERVAL_MS}Ms.TSLA"
HEALTHZ_TIMEOUT = 2.0
SAMPLE_EVERY = 0.25
PHASES = ("quiet", "ramp", "held", "after")
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


class TimedAgg(FakeAgg):
    """The scripted aggregator, noting when each bar (by its start ``s``) went to the socket."""

    def __init__(self, endpoint: str) -> None:
        self.sent_at: dict[int, float] = {}
        super().__init__(endpoint)

    def _publish_bars(self, interval: int, symbol: str, rows: np.ndarray) -> None:
        self.sent_at[int(rows["s"][0])] = time.monotonic()
        super()._publish_bars(interval, symbol, rows)


@dataclass
class Clock:
    """When each phase began (monotonic); a time's phase is the last one begun before it."""

    starts: list[tuple[float, str]] = field(default_factory=list)

    def begin(self, phase: str) -> None:
        self.starts.append((time.monotonic(), phase))

    def phase(self, at: float) -> str:
        name = self.starts[0][1]
        for start, phase in self.starts:
            if at >= start:
                name = phase
        return name

    def start(self, phase: str) -> float:
        return next(t for t, p in self.starts if p == phase)


@dataclass
class Samples:
    procs: list[tuple[float, int, int, float]] = field(default_factory=list)  # t, files, rss, cpu
    healthz: list[tuple[float, float | None, str]] = field(default_factory=list)  # t, s, outcome
    arrivals: list[tuple[float, int]] = field(default_factory=list)  # t, bar s
    flood: list[tuple[float, dict[str, int]]] = field(default_factory=list)
    machine: list[tuple[float, float]] = field(default_factory=list)  # t, busy CPU-seconds
    client_closed: str = ""


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_busy_seconds() -> float:
    with open("/proc/stat") as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / CLOCK_TICK


def load_average() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def die_with_parent() -> None:
    """In the child before exec: SIGKILL it when this process dies (PR_SET_PDEATHSIG)."""
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def source_for(args: argparse.Namespace) -> Path:
    if args.commit:
        tree = Path(f"/tmp/polyfan-flood-{args.commit}")
        if not tree.exists():
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.commit],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        return tree / "src"
    if args.src:
        return Path(args.src).resolve()
    return Path(polyfan.__file__).resolve().parents[1]


def start_bridge(
    python: str, src: Path, endpoint: str, port: int, log: Any
) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(src), "POLYFAN_LOG": "info"}
    return subprocess.Popen(
        [python, "-m", "polyfan", "bridge", "--sub", endpoint, "--listen", f"127.0.0.1:{port}"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=die_with_parent,
    )


def stop_bridge(bridge: subprocess.Popen[bytes]) -> str:
    """SIGINT, then SIGKILL after 5 s; how it ended."""
    if bridge.poll() is not None:
        return f"had exited ({bridge.returncode})"
    started = time.monotonic()
    bridge.send_signal(signal.SIGINT)
    try:
        bridge.wait(5)
    except subprocess.TimeoutExpired:
        bridge.kill()
        bridge.wait()
        return "killed: no exit within 5 s of SIGINT"
    return f"exit {bridge.returncode} {time.monotonic() - started:.2f} s after SIGINT"


def healthz_once(port: int) -> tuple[float | None, str]:
    """One /healthz on a new connection: (latency, "ok") or (None, why not)."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/healthz", timeout=HEALTHZ_TIMEOUT
        ) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except TimeoutError:
        return None, "timeout"
    except urllib.error.URLError as error:
        reason = error.reason
        return None, "timeout" if isinstance(reason, TimeoutError) else type(reason).__name__
    except OSError as error:
        return None, type(error).__name__
    elapsed = time.monotonic() - start
    if elapsed >= HEALTHZ_TIMEOUT:
        return None, "timeout"
    return elapsed, "ok" if status == 200 else f"http {status}"


async def wait_healthy(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with (
            contextlib.suppress(OSError, ValueError, KeyError),
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r,
        ):
            if orjson.loads(r.read())["aggs_heard"]:
                return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"bridge not healthy within {timeout} s")


class Workers:
    """The threads that publish bars, ask /healthz and sample /proc until ``stop``."""

    def __init__(self, agg: TimedAgg, pid: int, port: int, samples: Samples) -> None:
        self.agg, self.pid, self.port, self.samples = agg, pid, port, samples
        self.flood: Flood | None = None
        self.stop = threading.Event()
        self.rows = bar_rows(INTERVAL_MS, T0, 100_000)
        self.threads = [
            threading.Thread(target=self._publish, daemon=True),
            threading.Thread(target=self._healthz, daemon=True),
            threading.Thread(target=self._sample, daemon=True),
        ]
        for thread in self.threads:
            thread.start()

    def _publish(self) -> None:
        start = time.monotonic()
        for k in range(len(self.rows)):
            if self.stop.wait(max(0.0, start + k * INTERVAL_MS / 1000 - time.monotonic())):
                return
            self.agg.publish(INTERVAL_MS, "TSLA", self.rows[k : k + 1])

    def _healthz(self) -> None:
        while not self.stop.is_set():
            at = time.monotonic()
            latency, outcome = healthz_once(self.port)
            self.samples.healthz.append((at, latency, outcome))
            self.stop.wait(0.1)

    def _sample(self) -> None:
        while not self.stop.is_set():
            now = time.monotonic()
            with contextlib.suppress(OSError):
                files = open_files(self.pid)
                rss = rss_bytes(self.pid)
                self.samples.procs.append((now, files, rss, cpu_seconds(self.pid)))
            self.samples.machine.append((now, machine_busy_seconds()))
            if self.flood is not None and self.flood.counts:
                self.samples.flood.append((now, dict(self.flood.counts)))
            self.stop.wait(SAMPLE_EVERY)

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(HEALTHZ_TIMEOUT + 3)


async def receive(client: Client, samples: Samples) -> None:
    """Stamp every bar the client gets until its connection ends."""
    try:
        while True:
            frame = await client.ws.recv()
            now = time.monotonic()
            for event in orjson.loads(frame):
                if event.get("ev") == "MB":
                    samples.arrivals.append((now, int(event["s"])))
    except Exception as error:  # the end of the run closes it; anything else is reported
        samples.client_closed = f"{type(error).__name__}: {error}"


async def wait_phase(condition: Any, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not condition():
        await asyncio.sleep(0.05)


async def run(args: argparse.Namespace) -> None:
    src = source_for(args)
    print(f"bridge: {args.bridge_python} -m polyfan bridge, PYTHONPATH={src}")
    print(f"load average at start: {load_average()}")
    samples = Samples()
    clock = Clock()
    port = free_port()
    flood: Flood | None = None
    stopped = "not started"
    counters: dict[str, float] = {}
    addresses = args.addresses.split(",")
    total = len(addresses) * args.per_address
    with tempfile.TemporaryFile() as log, TimedAgg("tcp://127.0.0.1:*") as agg:
        bridge = start_bridge(args.bridge_python, src, agg.endpoint, port, log)
        workers: Workers | None = None
        reader: asyncio.Task[None] | None = None
        try:
            await wait_healthy(port)
            client = await Client.open(f"ws://127.0.0.1:{port}/", token="any")
            await client.send({"action": "subscribe", "params": CHANNEL})
            assert (await client.next_event())["status"] == "success"
            await asyncio.to_thread(agg.wait_subscribed, CHANNEL.encode() + b"\x00", 10)
            reader = asyncio.create_task(receive(client, samples))
            clock.begin("quiet")
            workers = Workers(agg, bridge.pid, port, samples)
            await asyncio.sleep(args.quiet)
            clock.begin("ramp")
            flood = Flood(port, addresses, args.per_address)
            workers.flood = flood
            await wait_phase(lambda: flood.counts.get("connects", 0) >= total, 60)
            clock.begin("held")
            await asyncio.sleep(args.seconds)
            samples.flood.append((time.monotonic(), dict(flood.counts)))
            flood.stop()
            flood = None
            clock.begin("after")
            await asyncio.sleep(args.after)
            clock.begin("end")
            workers.join()
            with (
                contextlib.suppress(OSError, ValueError),
                urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r,
            ):
                for line in r.read().decode().splitlines():
                    if line.startswith("polyfan_bridge_"):
                        name, value = line.rsplit(" ", 1)
                        counters[name] = float(value)
            await client.close()
        finally:
            if workers is not None:
                workers.join()
            if flood is not None:
                flood.stop()
            if reader is not None:
                reader.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await reader
            stopped = stop_bridge(bridge)
        log.seek(0)
        text = log.read()
        if args.log:
            Path(args.log).write_bytes(text)
        lines = text.decode(errors="replace").splitlines()
        print(f"load average at end: {load_average()}")
        print(table(samples, clock, agg.sent_at, total))
    print(f"bridge stopped: {stopped}")
    refusals = {k: v for k, v in counters.items() if "refused" in k or "evicted" in k}
    refusals |= {k: v for k, v in counters.items() if "timeouts" in k}
    print(f"bridge counters: {refusals or '(none of refusals: older bridge or no /metrics)'}")
    if samples.client_closed and "ConnectionClosedOK" not in samples.client_closed:
        print(f"client connection: {samples.client_closed}")
    warnings = [line for line in lines if " WARNING " in line or " ERROR " in line]
    print(f"bridge log: {len(lines)} lines, {len(warnings)} WARNING/ERROR")
    for line in warnings[:3] + (["...", *warnings[-2:]] if len(warnings) > 5 else warnings[3:]):
        print(f"  {line[:200]}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def ms(value: float) -> str:
    return f"{value * 1000:.0f}"


def table(samples: Samples, clock: Clock, sent_at: dict[int, float], total: int) -> str:
    rows: dict[str, dict[str, str]] = {}

    def put(name: str, phase: str, text: str) -> None:
        rows.setdefault(name, {})[phase] = text

    arrived: dict[int, float] = {}
    for at, s in samples.arrivals:
        arrived.setdefault(s, at)
    durations = {}
    for phase in PHASES:
        start = clock.start(phase)
        stop = min(t for t, p in clock.starts if t > start)
        durations[phase] = stop - start
        put("seconds", phase, f"{stop - start:.1f}")
        procs = [p for p in samples.procs if start <= p[0] < stop]
        if procs:
            put("bridge open files: max", phase, f"{max(p[1] for p in procs):,}")
            put("bridge open files: at phase end", phase, f"{procs[-1][1]:,}")
            put("bridge RSS MiB: max", phase, f"{max(p[2] for p in procs) / 2**20:.0f}")
            put("bridge RSS MiB: at phase end", phase, f"{procs[-1][2] / 2**20:.0f}")
            cpu = (procs[-1][3] - procs[0][3]) / max(1e-9, procs[-1][0] - procs[0][0])
            put("bridge CPU, cores", phase, f"{cpu:.2f}")
        machine = [m for m in samples.machine if start <= m[0] < stop]
        if len(machine) > 1:
            busy = (machine[-1][1] - machine[0][1]) / (machine[-1][0] - machine[0][0])
            put("machine CPU busy, cores (all processes)", phase, f"{busy:.2f}")
        asked = [h for h in samples.healthz if start <= h[0] < stop]
        answered = [h[1] for h in asked if h[1] is not None and h[2] == "ok"]
        put("/healthz asked", phase, str(len(asked)))
        put("/healthz timed out (2 s)", phase, str(sum(1 for h in asked if h[2] == "timeout")))
        others = [h[2] for h in asked if h[2] not in ("ok", "timeout")]
        put("/healthz other failures", phase, ", ".join(sorted(set(others))) or "0")
        if answered:
            put(
                "/healthz ms p50 / p99 / max (answered)",
                phase,
                f"{ms(pct(answered, 0.5))} / {ms(pct(answered, 0.99))} / {ms(max(answered))}",
            )
        sent = {s: t for s, t in sent_at.items() if start <= t < stop}
        delays = [arrived[s] - t for s, t in sent.items() if s in arrived]
        put("bars sent", phase, str(len(sent)))
        put("bars never received", phase, str(sum(1 for s in sent if s not in arrived)))
        if delays:
            put(
                "bar delay ms p50 / p99 / max",
                phase,
                f"{ms(pct(delays, 0.5))} / {ms(pct(delays, 0.99))} / {ms(max(delays))}",
            )
        times = sorted(arrived.values())
        gaps = [b - a for a, b in itertools.pairwise(times) if start <= b < stop]
        if gaps:
            put("longest gap between bars ms (cadence 100)", phase, ms(max(gaps)))
        flood = [f for f in samples.flood if start <= f[0] <= stop]
        if flood and phase in ("ramp", "held"):
            before = [f for f in samples.flood if f[0] < start]
            first = before[-1][1] if before else {}
            last = flood[-1][1]
            for key, name in (
                ("connects", "flood: connections opened"),
                ("closed_by_server", "flood: closed by the bridge (resets)"),
                ("errors", "flood: connect errors"),
            ):
                put(name, phase, f"{last.get(key, 0) - first.get(key, 0):,}")
            put("flood: held open, max", phase, f"{max(f[1].get('open', 0) for f in flood):,}")
    width = max(len(name) for name in rows) + 2
    cols = 20
    header = "".ljust(width) + "".join(p.rjust(cols) for p in PHASES)
    lines = [f"flood: {total:,} half-open connections", header]
    for name, values in rows.items():
        lines.append(name.ljust(width) + "".join(values.get(p, "-").rjust(cols) for p in PHASES))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--commit", help="run the bridge of this commit (a worktree under /tmp)")
    which.add_argument("--src", help="run the bridge from this src directory (PYTHONPATH)")
    parser.add_argument("--bridge-python", default=sys.executable, help="the bridge's python")
    parser.add_argument("--addresses", default="127.0.0.2,127.0.0.3")
    parser.add_argument("--per-address", type=int, default=9990)
    parser.add_argument("--quiet", type=float, default=3.0, help="seconds before the flood")
    parser.add_argument("--seconds", type=float, default=20.0, help="seconds of full flood")
    parser.add_argument("--log", help="also keep the bridge's log in this file")
    parser.add_argument("--after", type=float, default=10.0, help="seconds after the flood")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
    asyncio.run(run(args))


if __name__ == "__main__":
    main()
