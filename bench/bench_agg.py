"""Figures for ``polyfan agg``: run ``.venv/bin/python bench/bench_agg.py [part ...]``.

Parts (all by default):

- ``kernel``: trades/s through the bar kernels alone (5,000 symbols, 6 intervals), and through
  the compiled frame decoder, and through the whole core (frames in, bar messages out).
- ``zmq``: receive-and-aggregate trades/s of a real ``polyfan agg`` process fed pre-encoded
  wire messages from a PUB as fast as this script can send them (ipc; the sender is the agg's
  own compiled send loop, so it costs ~0.3 µs a message rather than pyzmq's ~0.7); wall clock
  from the first message sent to the agg's trade counter reaching the total (polled every
  50 ms), and trades per CPU-second of the agg (all its threads). ``zmq-hot`` the same over
  500 symbols.
- ``delay``: from the feed clock passing ``e + grace`` (the CLOCK message that passes it leaves
  this script) to the bar arriving back here, p50/p99/max, at a market-like rate; a receiving
  thread drains the agg's messages with the compiled receive loop (GIL released) and stamps
  each drain once it ends, so a bar's arrival is the end of the drain that brought it;
  ``delay-burst`` at 30,000 trades/s; ``delay-single`` with one open bar at a time;
  ``delay-core`` the core's own work per closing batch, in-process.
- ``zmq-curve``: the ``zmq`` part at 16 trades a message over tcp loopback, plain and with CURVE
  on the proxy -> agg link, alternating in one run: what CURVE costs the agg.
- ``memory``: resident memory of the agg core after an hour of feed time at ~3,000 trades/s over
  10,000 skewed symbols, with the default 6 intervals and 1 h of history (bench_memory.py).
- ``startup``: ``polyfan agg`` start to its ``ready:`` line, numba cache warm.
- ``zmqio``: the message paths alone, per message, in-process over ipc: 1,000,000 trade-sized
  messages sent to an XPUB with one subscriber (SNDHWM 0), then received from the queue the
  SUB holds, through libzmq from numba and through pyzmq (join and slicing included).

``--pin`` puts the agg's loop (its main thread) alone on CPU 0 and everything else, its
ZeroMQ I/O thread and this script included, on CPU 1: the agg with a core of its own.
``--agg-pyzmq`` runs the agg on its pyzmq fallback (``POLYFAN_LIBZMQ=off``) with this script's
side unchanged, to compare the two message paths. ``--agg-store`` runs it with ``--store`` on
a fresh directory (its writer thread flushing every second), to compare the loop's delay.

The machine is shared and has 2 cores: figures are noisy; run each part alone to compare.
"""

from __future__ import annotations

import bisect
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import zmq
import zmq.auth

from polyfan.bars import conditions
from polyfan.bars.aggregator import Aggregator
from polyfan.bars.state import Bars
from polyfan.config import AggConfig
from polyfan.wire import codec, zmqio
from polyfan.wire.ingest import FrameDecoder, join_frames, split_frames

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import free_port

INTERVALS = (100, 250, 500, 1_000, 5_000, 60_000)
GRACE = 250
POLYFAN = [sys.executable, "-m", "polyfan"]
AGG_ENV: dict[str, str] = {}  # extra environment of the agg processes (``--agg-pyzmq``)
PIN: list[bool] = [False]  # ``--pin``: the agg's loop alone on CPU 0, everything else on CPU 1
T0 = 1_781_622_000_000


def market(count: int, symbols: int, rate: float, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """``count`` trades over ``symbols`` (Zipf-skewed) at ``rate`` trades/s of feed time."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, symbols + 1)
    sym = rng.choice(symbols, size=count, p=weights / weights.sum()).astype(np.int64)
    trades = np.zeros(count, dtype=codec.TRADE_DTYPE)
    trades["t"] = T0 + (np.arange(count) * (1_000.0 / rate)).astype(np.int64)
    trades["t"] -= rng.integers(0, 50, count)  # disorder within the grace
    trades["p"] = np.round(10 + (sym % 500) + rng.normal(0, 0.05, count), 2)
    trades["s"] = rng.choice([1, 10, 100, 100, 200, 500], count)
    odd = rng.random(count) < 0.15
    trades["nc"][odd] = 1
    trades["c"][odd, 0] = 37
    form_t = rng.random(count) < 0.05
    trades["nc"][form_t] = 1
    trades["c"][form_t, 0] = 12
    return trades, sym


def frames_for(
    trades: np.ndarray, sym: np.ndarray, per_message: int, names: list[str]
) -> list[bytes]:
    """Wire messages as the proxy sends them: runs of one symbol's trades, CLOCK after them."""
    frames: list[bytes] = []
    seqs: dict[int, int] = {}
    clock_seq = 0
    clock = 0
    i = 0
    n = len(trades)
    while i < n:
        s = int(sym[i])
        j = i + 1
        while j < n and j - i < per_message and sym[j] == s:
            j += 1
        seqs[s] = seqs.get(s, 0) + 1
        chunk = trades[i:j]
        topic = codec.trade_topic(names[s])
        frames.append(
            codec.encode(topic, codec.Kind.TRADES, 1, seqs[s], len(chunk), chunk.tobytes())
        )
        top = int(chunk["t"].max())
        if top > clock + 10:
            clock = top
            clock_seq += 1
            record = np.array([(clock, 0)], dtype=codec.CLOCK_DTYPE)
            frames.append(
                codec.encode(
                    codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, clock_seq, 1, record.tobytes()
                )
            )
        i = j
    return frames


def grouped(trades: np.ndarray, sym: np.ndarray, run: int) -> tuple[np.ndarray, np.ndarray]:
    """Reorder so each symbol's trades come in runs of up to ``run`` (as a proxy batch would)."""
    order = np.lexsort((np.arange(len(sym)), sym, np.arange(len(sym)) // (run * 64)))
    return trades[order], sym[order]


# --- kernel -------------------------------------------------------------------------------


def bench_kernel() -> None:
    count, symbols = 4_000_000, 5_000
    trades, sym = market(count, symbols, rate=50_000)
    bars = Bars(INTERVALS, GRACE, conditions.polygon_rules(), pool_size=1 << 16, symbols=symbols)
    batch = 10_000
    # warm up (compile or load the cache)
    warm = Bars(INTERVALS, GRACE, conditions.polygon_rules())
    warm.add_trades(trades[:10], sym[:10], np.zeros(10, np.int64))
    warm.closed_bars(T0 + 10**6)
    started = time.perf_counter()
    closed = 0
    clock = np.int64(T0)
    for lo in range(0, count, batch):
        chunk = trades[lo : lo + batch]
        clocks = np.full(len(chunk), clock, dtype=np.int64)
        bars.add_trades(chunk, sym[lo : lo + batch], clocks)
        clock = np.int64(chunk["t"].max())
        closed += len(bars.closed_bars(int(clock))[0])
    elapsed = time.perf_counter() - started
    print(
        f"kernel: {count / elapsed:,.0f} trades/s (apply + close, {symbols:,} symbols, "
        f"{len(INTERVALS)} intervals, batches of {batch:,}; {closed:,} bars closed, "
        f"{bars.late_trades} late)"
    )

    names = [f"S{i}" for i in range(symbols)]
    for per_message in (1, 4, 16):
        g_trades, g_sym = grouped(trades[:1_000_000], sym[:1_000_000], per_message)
        frames = frames_for(g_trades, g_sym, per_message, names)
        decoder = FrameDecoder()
        decoder.decode(frames[:100])
        started = time.perf_counter()
        received = 0
        for lo in range(100, len(frames), 4096):
            received += len(decoder.decode(frames[lo : lo + 4096]).trades)
        elapsed = time.perf_counter() - started
        print(
            f"decoder: {received / elapsed:,.0f} trades/s, {(len(frames) - 100) / elapsed:,.0f} "
            f"messages/s ({per_message} trades per message at most, batches of 4,096 frames)"
        )
        core = Aggregator(AggConfig(intervals_ms=INTERVALS, grace_ms=GRACE))
        core.frames_received(frames[:100])
        started = time.perf_counter()
        sent = 0
        for lo in range(100, len(frames), 4096):
            sent += len(core.frames_received(frames[lo : lo + 4096]))
        elapsed = time.perf_counter() - started
        print(
            f"core: {core.trades_total.value / elapsed:,.0f} trades/s frames in -> bar messages out "
            f"({sent:,} messages, {core.bars_total.value:,.0f} bars; {per_message} per message)"
        )


def quantile(buckets: list[tuple[float, float]], q: float) -> float:
    """The upper bound of the bucket holding quantile ``q`` (cumulative buckets)."""
    total = buckets[-1][1]
    for bound, count in buckets:
        if count >= q * total:
            return bound
    return math.inf


# --- processes ----------------------------------------------------------------------------


class Agg:
    def __init__(self, sub: str, pub: str, metrics_port: int, *extra: str) -> None:
        args = ["agg", "--sub", sub, "--pub", pub, "--metrics", f"127.0.0.1:{metrics_port}"]
        for interval in INTERVALS:
            args += ["--interval", f"{interval}ms"]
        self.port = metrics_port
        self.message_path = "?"  # "libzmq" or "pyzmq", from the agg's log
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(
            [*POLYFAN, *args, *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env={**os.environ, "POLYFAN_LOG": "info", **AGG_ENV},
        )
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if "messages go through" in line:
                self.message_path = line.split("messages go through ", 1)[1].split()[0]
            if "ready:" in line:
                self.ready_after = time.perf_counter() - self.started
                break
        else:
            raise SystemExit(f"agg did not start: exit {self.proc.wait()}")
        if PIN[0]:  # its main thread (the loop) alone on CPU 0; its other threads with us
            for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
                tid = int(task.name)
                os.sched_setaffinity(tid, {0} if tid == self.proc.pid else {1})

    def metric(self, name: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        match = re.search(rf"^{name} (\S+)$", text, re.M)
        assert match is not None, name
        return float(match.group(1))

    def histogram(self, name: str) -> list[tuple[float, float]]:
        """``(upper bound, cumulative count)`` of a histogram the agg exposes."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            text = r.read().decode()
        found = re.findall(rf'^{name}_bucket{{le="([^"]+)"}} (\S+)$', text, re.M)
        return [(float(bound), float(count)) for bound, count in found]

    def cpu_seconds(self) -> float:
        """User + system CPU time of the agg process so far (all its threads)."""
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.send_signal(2)
        self.proc.wait(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()


def connected_pub(
    ctx: zmq.Context[zmq.Socket[bytes]], address: str, agg_pub: str
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A PUB the agg subscribes to, and a SUB on the agg, both past the slow joiner."""
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, 0)
    pub.bind(address)
    return pub, subscribed(ctx, pub, agg_pub)


def subscribed(
    ctx: zmq.Context[zmq.Socket[bytes]], pub: zmq.Socket[bytes], agg_pub: str
) -> zmq.Socket[bytes]:
    """A SUB on an agg that ``pub`` feeds, once a CLOCK probe has come through both."""
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 0)
    for prefix in codec.EVERYTHING_BUT_REPLIES:  # "" would read replies: the agg refuses it
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
    sub.connect(agg_pub)
    wall = 10**15 + 10**6 * len(agg_pub)  # probes of different aggs differ
    deadline = time.monotonic() + 20
    while True:
        assert time.monotonic() < deadline, "agg never relayed the probe"
        wall += 1
        record = np.array([(0, wall)], dtype=codec.CLOCK_DTYPE)
        pub.send(codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 7, wall, 1, record.tobytes()))
        while sub.poll(20):
            message = codec.decode(sub.recv())
            if message.kind is codec.Kind.CLOCK and codec.records(message)["wall"][0] == wall:
                return sub


def bulk_sender(
    pub: zmq.Socket[bytes],
) -> tuple[Callable[[np.ndarray, np.ndarray, int], None], str]:
    """The fastest way this machine has to send a buffer of messages, and its name."""
    try:
        return zmqio.Sender(pub, zmqio.open_libzmq()).send, "libzmq from numba"
    except zmqio.LibzmqUnavailableError:
        return zmqio.PyzmqSender(pub).send, "pyzmq"


def introduce(pub: zmq.Socket[bytes], names: list[str], t: int, session: int = 2) -> None:
    """One trade per symbol at ``t`` (sequence 1): the agg's topic tables grown, as minutes
    into a session, before anything is measured."""
    warm = np.zeros(1, dtype=codec.TRADE_DTYPE)
    warm["t"], warm["p"], warm["s"] = t, 1.0, 1.0
    for name in names:
        pub.send(
            codec.encode(codec.trade_topic(name), codec.Kind.TRADES, session, 1, 1, warm.tobytes())
        )


def bench_zmq(symbols: int = 5_000, sizes: tuple[int, ...] = (4, 16, 64)) -> None:
    count = 3_000_000
    trades, sym = market(count, symbols, rate=200_000, seed=2)
    names = [f"S{i}" for i in range(symbols)]
    with tempfile.TemporaryDirectory() as tmp:
        for per_message in sizes:
            g_trades, g_sym = grouped(trades, sym, per_message)
            frames = frames_for(g_trades, g_sym, per_message, names)
            proxy, agg_pub = f"ipc://{tmp}/p{per_message}", f"ipc://{tmp}/a{per_message}"
            agg = Agg(proxy, agg_pub, free_port())
            ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            pub, sub = connected_pub(ctx, proxy, agg_pub)
            sub.close(0)
            publish, how = bulk_sender(pub)
            buffer, offsets, n_frames = join_frames(frames)
            buffer = buffer.copy()
            introduce(pub, names, T0 - 600_000)
            while agg.metric("polyfan_agg_trades_total") < symbols:
                time.sleep(0.05)
            cpu = agg.cpu_seconds()
            started = time.perf_counter()
            publish(buffer, offsets, n_frames)
            sent_after = time.perf_counter() - started
            while agg.metric("polyfan_agg_trades_total") < count + symbols:
                time.sleep(0.05)
            elapsed = time.perf_counter() - started
            cpu = agg.cpu_seconds() - cpu
            gaps = agg.metric("polyfan_agg_gaps_total")
            bars = agg.metric("polyfan_agg_bars_total")
            print(
                f"zmq: {count / elapsed:,.0f} trades/s received and aggregated by polyfan agg "
                f"(messages through {agg.message_path}), "
                f"wall clock; {count / cpu:,.0f} trades per CPU-second of the agg "
                f"({symbols:,} symbols, {per_message} trades/message at most, {len(frames):,} messages, "
                f"{bars / count:.2f} bars per trade; sender ({how}) alone {count / sent_after:,.0f} "
                f"trades/s; gaps {gaps:.0f})"
            )
            pub.close(0)
            ctx.term()
            agg.stop()


def bench_zmq_curve(symbols: int = 5_000, per_message: int = 16, rounds: int = 2) -> None:
    """``zmq-curve``: the ``zmq`` part at 16 trades a message over tcp loopback, plain and with
    CURVE on the proxy -> agg link (this script's PUB a CURVE server, the agg its client),
    alternating in one run."""
    count = 1_000_000
    trades, sym = market(count, symbols, rate=200_000, seed=2)
    names = [f"S{i}" for i in range(symbols)]
    g_trades, g_sym = grouped(trades, sym, per_message)
    frames = frames_for(g_trades, g_sym, per_message, names)
    buffer, offsets, n_frames = join_frames(frames)
    buffer = buffer.copy()
    with tempfile.TemporaryDirectory() as tmp:
        server_public, server_secret = zmq.auth.load_certificate(
            zmq.auth.create_certificates(tmp, "proxy")[1]
        )
        agg_secret = zmq.auth.create_certificates(tmp, "agg")[1]
        for _ in range(rounds):
            for curve in (False, True):
                proxy, agg_pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
                extra = []
                if curve:
                    extra = ["--curve-secret", agg_secret, "--curve-server", f"{tmp}/proxy.key"]
                agg = Agg(proxy, agg_pub, free_port(), *extra)
                ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
                pub = ctx.socket(zmq.PUB)
                pub.setsockopt(zmq.SNDHWM, 0)
                pub.setsockopt(zmq.LINGER, 0)
                if curve:
                    pub.curve_secretkey, pub.curve_publickey = server_secret, server_public
                    pub.curve_server = True
                pub.bind(proxy)
                subscribed(ctx, pub, agg_pub).close(0)
                publish, _ = bulk_sender(pub)
                introduce(pub, names, T0 - 600_000)
                while agg.metric("polyfan_agg_trades_total") < symbols:
                    time.sleep(0.05)
                cpu = agg.cpu_seconds()
                started = time.perf_counter()
                publish(buffer, offsets, n_frames)
                while agg.metric("polyfan_agg_trades_total") < count + symbols:
                    time.sleep(0.05)
                elapsed = time.perf_counter() - started
                cpu = agg.cpu_seconds() - cpu
                print(
                    f"zmq-curve: {'CURVE' if curve else 'plain'}: {count / elapsed:,.0f} trades/s "
                    f"received and aggregated over tcp, {count / cpu:,.0f} trades per CPU-second "
                    f"of the agg ({per_message} trades/message, {len(frames):,} messages)"
                )
                pub.close(0)
                ctx.term()
                agg.stop()


def bench_zmq_shards(shards: int = 2, symbols: int = 5_000, per_message: int = 16) -> None:
    """The same bar-heavy stream through ``shards`` agg processes, each subscribed to its share
    of the symbols (``--symbols``: filtered at the publisher), as a deployment scales out."""
    count = 3_000_000
    trades, sym = market(count, symbols, rate=200_000, seed=2)
    names = [f"S{i}" for i in range(symbols)]
    g_trades, g_sym = grouped(trades, sym, per_message)
    frames = frames_for(g_trades, g_sym, per_message, names)
    with tempfile.TemporaryDirectory() as tmp:
        proxy = f"ipc://{tmp}/p"
        aggs = [
            Agg(proxy, f"ipc://{tmp}/a{k}", free_port(), "--symbols", ",".join(names[k::shards]))
            for k in range(shards)
        ]
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub, sub = connected_pub(ctx, proxy, f"ipc://{tmp}/a0")
        sub.close(0)
        for k in range(1, shards):  # every agg past the slow joiner before the clock starts
            subscribed(ctx, pub, f"ipc://{tmp}/a{k}").close(0)
        publish, how = bulk_sender(pub)
        buffer, offsets, n_frames = join_frames(frames)
        buffer = buffer.copy()
        introduce(pub, names, T0 - 600_000)

        def received() -> float:
            return sum(agg.metric("polyfan_agg_trades_total") for agg in aggs)

        while received() < symbols:
            time.sleep(0.05)
        cpu = [agg.cpu_seconds() for agg in aggs]
        started = time.perf_counter()
        publish(buffer, offsets, n_frames)
        while received() < count + symbols:
            time.sleep(0.05)
        elapsed = time.perf_counter() - started
        cpu = [agg.cpu_seconds() - before for agg, before in zip(aggs, cpu, strict=True)]
        gaps = sum(agg.metric("polyfan_agg_gaps_total") for agg in aggs)
        print(
            f"zmq-shards: {count / elapsed:,.0f} trades/s received and aggregated by {shards} "
            f"polyfan agg processes ({symbols // shards:,} symbols each, {per_message} trades/"
            f"message at most, messages through {aggs[0].message_path}), wall clock; CPU-seconds "
            f"per agg {', '.join(f'{c:.2f}' for c in cpu)}; sender ({how}); gaps {gaps:.0f}"
        )
        pub.close(0)
        ctx.term()
        for agg in aggs:
            agg.stop()


# --- delay --------------------------------------------------------------------------------


def bulk_receiver(
    sub: zmq.Socket[bytes],
) -> tuple[Callable[[], tuple[np.ndarray, np.ndarray, int]], str]:
    """The fastest way this machine has to drain a socket, and its name."""
    try:
        return zmqio.Receiver(sub, zmqio.open_libzmq(), 1 << 16).receive, "libzmq from numba"
    except zmqio.LibzmqUnavailableError:
        return zmqio.PyzmqReceiver(sub, 1 << 16).receive, "pyzmq"


def bench_delay(rate: float = 3_000, symbols: int = 5_000, seconds: float = 10.0) -> None:
    """Feed time runs with wall time: trades at ``rate``, a CLOCK every ~5 ms (the proxy sends
    one after the trades that moved it and 10 a second). A bar's delay is its arrival here
    (a receiving thread stamps it) minus the send time of the first CLOCK with
    ``clock >= e + grace``."""
    count = int(rate * seconds)
    trades, sym = market(count, symbols, rate=rate, seed=3)
    names = [f"S{i}" for i in range(symbols)]
    with tempfile.TemporaryDirectory() as tmp:
        proxy, agg_pub = f"ipc://{tmp}/p", f"ipc://{tmp}/a"
        agg = Agg(proxy, agg_pub, free_port())
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub, sub = connected_pub(ctx, proxy, agg_pub)
        drains: list[tuple[float, np.ndarray, np.ndarray, int]] = []
        stop = threading.Event()
        drain_messages, how = bulk_receiver(sub)
        feed_start = int(trades["t"].min())
        # Steady state, as an agg is minutes into a session: every symbol seen once (topic
        # tables grown, which the first sight of thousands of symbols costs once) and its
        # bars closed, before the clock starts; those bars are drained and not measured.
        introduce(pub, names, feed_start - 120_000, session=7)
        record = np.array([(feed_start - 1, 0)], dtype=codec.CLOCK_DTYPE)
        pub.send(codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 7, 10**9, 1, record.tobytes()))
        while agg.metric("polyfan_agg_bars_total") < symbols * len(INTERVALS):
            time.sleep(0.05)
        while drain_messages()[2]:
            pass
        warmed = agg.histogram("polyfan_agg_bar_delay_seconds")

        def receive() -> None:
            while not stop.is_set():
                if sub.poll(50):
                    while True:
                        buffer, offsets, n = drain_messages()
                        if n == 0:
                            break
                        at = time.perf_counter()
                        drains.append((at, buffer[: offsets[n]].copy(), offsets[: n + 1].copy(), n))

        receiver = threading.Thread(target=receive)
        receiver.start()
        clock_values: list[int] = []
        clock_times: list[float] = []
        seqs: dict[int, int] = dict.fromkeys(range(symbols), 1)
        clock_seq = 0
        end = feed_start + int(seconds * 1000) + GRACE + 1_000
        start_wall = time.perf_counter()
        i = 0
        while True:
            feed_now = feed_start + int((time.perf_counter() - start_wall) * 1000)
            j = int(np.searchsorted(trades["t"], feed_now, side="right"))
            for k in range(i, max(i, j)):
                s = int(sym[k])
                seqs[s] = seqs.get(s, 0) + 1
                topic = codec.trade_topic(names[s])
                pub.send(
                    codec.encode(
                        topic, codec.Kind.TRADES, 7, seqs[s], 1, trades[k : k + 1].tobytes()
                    )
                )
            i = max(i, j)
            clock_seq += 1
            record = np.array([(feed_now, 0)], dtype=codec.CLOCK_DTYPE)
            clock_values.append(feed_now)
            clock_times.append(time.perf_counter())
            pub.send(
                codec.encode(
                    codec.CONTROL_TOPIC, codec.Kind.CLOCK, 7, 10**9 + clock_seq, 1, record.tobytes()
                )
            )
            if feed_now >= end:
                break
            time.sleep(0.005)
        time.sleep(0.3)
        stop.set()
        receiver.join()
        received = [
            (at, frame)
            for at, buffer, offsets, n in drains
            for frame in split_frames(buffer, offsets, n)
        ]
        delays = []
        shortest = []
        for at, frame in received:
            message = codec.decode(frame)
            if message.kind is not codec.Kind.BARS:
                continue
            interval = int(message.topic.split("Ms.", 1)[0])
            due = int(codec.records(message)["s"][-1]) + interval + GRACE
            k = bisect.bisect_left(clock_values, due)
            if k < len(clock_values):
                delays.append((at - clock_times[k]) * 1000)
                if interval == INTERVALS[0]:
                    shortest.append(delays[-1])
        ms = sorted(delays)
        first = sorted(shortest)
        inside = [
            (bound, count - before)
            for (bound, count), (_, before) in zip(
                agg.histogram("polyfan_agg_bar_delay_seconds"), warmed, strict=True
            )
        ]
        print(
            f"delay: clock past e+grace -> bar received here (agg messages through "
            f"{agg.message_path}), p50 {statistics.median(ms):.2f} ms, "
            f"p99 {ms[int(len(ms) * 0.99)]:.2f} ms, max {ms[-1]:.2f} ms over {len(ms):,} bar "
            f"messages ({rate:,.0f} trades/s over {symbols:,} symbols, {len(INTERVALS)} "
            f"intervals, CLOCK every ~5 ms, ipc, received by {how} in {len(drains):,} drains); "
            f"{INTERVALS[0]} ms bars alone p50 "
            f"{statistics.median(first):.2f} ms, p99 {first[int(len(first) * 0.99)]:.2f} ms; "
            f"inside the agg, per bar (its batch in -> the batch's last bar sent, the agg's "
            f"histogram): p50 <= {quantile(inside, 0.5) * 1000:g} ms, p99 <= "
            f"{quantile(inside, 0.99) * 1000:g} ms over {inside[-1][1]:,.0f} bars"
        )
        pub.close(0)
        sub.close(0)
        ctx.term()
        agg.stop()


def bench_delay_single(rounds: int = 300) -> None:
    """The path alone: one trade, then a CLOCK past its bar's close; time until the bar is here."""
    with tempfile.TemporaryDirectory() as tmp:
        agg = Agg(f"ipc://{tmp}/p", f"ipc://{tmp}/a", free_port())
        ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        pub, sub = connected_pub(ctx, f"ipc://{tmp}/p", f"ipc://{tmp}/a")
        trade = np.zeros(1, dtype=codec.TRADE_DTYPE)
        trade["p"], trade["s"] = 1.0, 1.0
        delays = []
        clock = T0
        for i in range(rounds):
            trade["t"] = clock + 10
            pub.send(
                codec.encode(
                    codec.trade_topic("X"), codec.Kind.TRADES, 9, i + 1, 1, trade.tobytes()
                )
            )
            clock += 100_000
            record = np.array([(clock, 0)], dtype=codec.CLOCK_DTYPE)
            started = time.perf_counter()
            pub.send(
                codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 9, i + 1, 1, record.tobytes())
            )
            while True:
                assert sub.poll(5_000), "no bar"
                if codec.decode(sub.recv()).kind is codec.Kind.BARS:
                    delays.append((time.perf_counter() - started) * 1000)
                    break
            while sub.poll(2):
                sub.recv()
        ms = sorted(delays)
        print(
            f"delay-single: CLOCK past e+grace sent -> first bar received (agg messages "
            f"through {agg.message_path}), p50 "
            f"{statistics.median(ms):.2f} ms, p99 {ms[int(len(ms) * 0.99)]:.2f} ms, max "
            f"{ms[-1]:.2f} ms over {rounds} rounds (one open bar per round, ipc)"
        )
        pub.close(0)
        sub.close(0)
        ctx.term()
        agg.stop()


def bench_delay_core(rate: float = 3_000, symbols: int = 5_000, seconds: int = 60) -> None:
    """The agg's own work per batch, in-process (no sockets, no scheduler noise): frames of 5 ms
    of market with a CLOCK at the end, through ``Aggregator.batch_received``; the time of the
    batches that closed bars is the clock-to-bars-encoded delay minus transport (storing the
    bars in the history comes after they are sent, so it is not in it)."""
    trades, sym = market(int(rate * seconds), symbols, rate=rate, seed=3)
    names = [f"S{i}" for i in range(symbols)]
    core = Aggregator(AggConfig(intervals_ms=INTERVALS, grace_ms=GRACE))
    warm = np.zeros(1, dtype=codec.TRADE_DTYPE)
    warm["t"], warm["p"], warm["s"] = T0 - 600_000, 1.0, 1.0  # within the input bounds
    start = int(trades["t"].min())
    closing = np.array([(start - 1, 0)], dtype=codec.CLOCK_DTYPE)  # the warm-up bars close here
    core.frames_received(
        [
            codec.encode(codec.trade_topic(n), codec.Kind.TRADES, 2, 1, 1, warm.tobytes())
            for n in names
        ]
        + [codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 2, 1, 1, closing.tobytes())]
    )
    seqs: dict[int, int] = {}
    i = 0
    times: list[float] = []
    sizes: list[int] = []
    for step, now in enumerate(range(start, start + seconds * 1000, 5)):
        j = int(np.searchsorted(trades["t"], now, side="right"))
        frames = []
        for k in range(i, j):
            s = int(sym[k])
            seqs[s] = seqs.get(s, 0) + 1
            topic = codec.trade_topic(names[s])
            frames.append(
                codec.encode(topic, codec.Kind.TRADES, 7, seqs[s], 1, trades[k : k + 1].tobytes())
            )
        i = j
        record = np.array([(now, 0)], dtype=codec.CLOCK_DTYPE)
        frames.append(
            codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 7, step + 1, 1, record.tobytes())
        )
        batch = join_frames(frames)
        started = time.perf_counter()
        out = core.batch_received(*batch)
        if out.count:
            times.append((time.perf_counter() - started) * 1000)
            sizes.append(out.count)
        core.batch_sent(out)  # the history, after the bars are out (as the agg does)
        if step % 20 == 0:
            core.tick()
    ms = sorted(times)
    print(
        f"delay-core: batch with the closing CLOCK -> its bar messages built, p50 "
        f"{statistics.median(ms):.3f} ms, p99 {ms[int(len(ms) * 0.99)]:.3f} ms, max {ms[-1]:.3f} "
        f"ms over {len(ms):,} batches (largest {max(sizes):,} messages; {rate:,.0f} trades/s "
        f"over {symbols:,} symbols, {len(INTERVALS)} intervals, in-process, no send)"
    )


# --- memory -------------------------------------------------------------------------------


def bench_memory() -> None:
    """bench/bench_memory.py, in its own processes: the figure is the agg core's alone."""
    subprocess.run([sys.executable, str(Path(__file__).with_name("bench_memory.py"))], check=True)


# --- start-up -----------------------------------------------------------------------------


def bench_startup(runs: int = 5) -> None:
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in range(runs + 1):
            agg = Agg(f"ipc://{tmp}/p", f"ipc://{tmp}/a{run}", free_port())
            agg.stop()
            if run:  # the first run may fill the numba cache
                times.append(agg.ready_after)
    print(
        f"startup: polyfan agg to ready: median {statistics.median(times) * 1000:.0f} ms, "
        f"max {max(times) * 1000:.0f} ms over {runs} runs (numba cache warm; includes the "
        f"Python interpreter start)"
    )


# --- the message paths alone ----------------------------------------------------------------


def bench_zmqio(count: int = 1_000_000) -> None:
    messages = [b"T.S%d\0" % (i % 5_000) + bytes(codec.HEADER.size + 2 * 56) for i in range(count)]
    buffer, offsets, n = join_frames(messages)
    buffer = buffer.copy()
    paths: list[tuple[str, Callable[..., Any], Callable[..., Any]]] = [
        ("pyzmq", zmqio.PyzmqSender, lambda sub: zmqio.PyzmqReceiver(sub, 4_096))
    ]
    try:
        lib = zmqio.open_libzmq()
        paths.append(
            (
                "libzmq from numba",
                lambda pub: zmqio.Sender(pub, lib),
                lambda sub: zmqio.Receiver(sub, lib, 4_096),
            )
        )
    except zmqio.LibzmqUnavailableError as exc:
        print(f"zmqio: libzmq from numba unavailable: {exc}")
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    with tempfile.TemporaryDirectory() as tmp:
        for name, make_sender, make_receiver in paths:
            pub = ctx.socket(zmq.XPUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.bind(f"ipc://{tmp}/x")
            sub = ctx.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"")  # a plain XPUB of this script's, not an agg
            sub.connect(f"ipc://{tmp}/x")
            pub.recv()  # the subscription: the SUB is connected
            sender, receiver = make_sender(pub), make_receiver(sub)
            receiver.warm_up()
            sender.warm_up()
            started = time.perf_counter()
            sender.send(buffer, offsets, n)
            sent = time.perf_counter() - started
            while not sub.poll(100):
                pass
            time.sleep(1.0)  # let the I/O threads move the rest into the SUB's queue
            got = 0
            started = time.perf_counter()
            while got < n:
                got += receiver.receive()[2]
            taken = time.perf_counter() - started
            print(
                f"zmqio: {name}: send {sent / n * 1e9:.0f} ns a message, receive from the queue "
                f"{taken / n * 1e9:.0f} ns a message ({n:,} messages of {len(messages[0])} bytes, ipc)"
            )
            pub.close(0)
            sub.close(0)
    ctx.term()


PARTS = {
    "kernel": bench_kernel,
    "zmq": bench_zmq,
    "zmq-hot": lambda: bench_zmq(symbols=500, sizes=(16,)),
    "zmq-shards": bench_zmq_shards,
    "zmq-curve": bench_zmq_curve,
    "delay": bench_delay,
    "delay-burst": lambda: bench_delay(rate=30_000),
    "delay-single": bench_delay_single,
    "delay-core": bench_delay_core,
    "memory": bench_memory,
    "startup": bench_startup,
    "zmqio": bench_zmqio,
}

if __name__ == "__main__":
    sys.setswitchinterval(0.0002)  # the receiving thread stamps arrivals promptly
    parts = sys.argv[1:]
    if "--agg-pyzmq" in parts:
        parts.remove("--agg-pyzmq")
        AGG_ENV["POLYFAN_LIBZMQ"] = "off"
    if "--agg-store" in parts:  # the aggs write their closed bars to a store (agg --store)
        parts.remove("--agg-store")
        AGG_ENV["POLYFAN_AGG_STORE"] = tempfile.mkdtemp(prefix="bench-agg-store-")
    if "--pin" in parts:
        parts.remove("--pin")
        PIN[0] = True
        os.sched_setaffinity(0, {1})
    for part in parts or list(PARTS):
        PARTS[part]()
