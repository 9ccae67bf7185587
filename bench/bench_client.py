"""CPU of ``polyfan.client.trade_batches`` consumers on issue 15's stream, against same-run peers.

    .venv/bin/python bench/bench_client.py [--rates 20000 100000] [--seconds 10]

The stream (issue 15): trades of a synthetic market over 5,000 symbols (Zipf-skewed activity,
``polyfan.market``), 16 trades to an upstream frame, paced at each rate by a local server of
the Polygon protocol (a child process) into a real ``polyfan proxy`` (a subprocess, ipc PUB).
The same frames go, at the same moments, to the earlier design's consumer, a WebSocket client
of the server standing in for a relay that re-broadcasts the raw JSON.

Consumers, each a process of its own, all on one stream at once:

- ``trade_batches``: ``polyfan.client.trade_batches`` of 10 random symbols, and of the 10
  busiest, and of the 10 busiest with ``coalesce_ms=1`` (at most one wake-up a millisecond);
- ``naive pyzmq``: a SUB on the same 10 busiest topics doing per message what a Python
  program would write first: ``recv``, ``codec.decode``, ``codec.records``, gap counting;
- ``earlier design``: ``websockets`` client, ``orjson.loads`` of every frame, keeps the 10
  busiest symbols' trades.

First, what one wake-up costs: a consumer woken from sleep by every message (250 a second),
trade_batches against a plain pyzmq loop, CPU of the consuming thread per message.

Then each consumer measures its own CPU (user + system of every thread: ZeroMQ's I/O thread
included) from the moment it is subscribed to the moment it has every trade it was to get,
and reports trades received, CPU and its reads (``reads``: wake-ups that found messages for
``trade_batches``, messages for the naive SUB, frames for the earlier design). Printed: CPU per trade received, CPU per million trades
of the stream, and each one's CPU as a fraction of the earlier design's consumer in the same
run (issue 15's target: 1/20 or less). The machine has 2 cores shared by the server, the proxy
and every consumer: figures are CPU time, steadier than wall time, but a busy core still
slows everything (cache misses, more wake-ups with fewer messages each).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import orjson

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1] / "tests"))

FRAME_TRADES = 16
STREAM_TRADES = 300_000  # frames are cycled when a run needs more
SYMBOLS = 5_000
CONSUMER_SYMBOLS = 10


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def cpu_of(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the server (a child process) --------------------------------------------------------------


async def serve(port: int, frames_path: Path, rate: float, count: int) -> None:
    """Polygon's handshake for the proxy, raw frames for relay readers; paced on "go"."""
    from websockets.asyncio.server import ServerConnection, broadcast, serve

    from polyfan.sim import status

    frames = frames_path.read_text().split("\n")
    readers: set[ServerConnection] = set()
    finished = asyncio.Event()

    async def handle(ws: ServerConnection) -> None:
        if ws.request is not None and ws.request.path == "/relay":
            readers.add(ws)
        else:
            await ws.send(status("connected", "Connected Successfully"))
            await ws.recv()
            await ws.send(status("auth_success", "authenticated"))
            await ws.recv()
            await ws.send(status("success", "subscribed to: T.*"))
            readers.add(ws)
            print("proxy", flush=True)
        await ws.wait_closed()
        readers.discard(ws)

    async with serve(handle, "127.0.0.1", port, compression=None, max_size=None):
        print("serving", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        per_second = rate / FRAME_TRADES
        start = time.perf_counter()
        sent = 0
        while sent < count:
            due = min(count, int((time.perf_counter() - start) * per_second) + 1)
            while sent < due:
                broadcast(readers, frames[sent % len(frames)])
                sent += 1
            await asyncio.sleep(0.0005)
        elapsed = time.perf_counter() - start
        print(json.dumps({"frames": sent, "seconds": elapsed}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        finished.set()


# --- the consumers (child processes) -----------------------------------------------------------


def consume_trade_batches(
    endpoint: str, symbols: list[str], expect: int, coalesce_ms: float = 0.0
) -> dict[str, Any]:
    from polyfan import client

    feed = client.trade_batches(endpoint, symbols, coalesce_ms=coalesce_ms)
    assert feed.wait_joined(60), "the proxy's control topic was not heard"
    print("joined", flush=True)
    threading.Thread(target=lambda: (sys.stdin.readline(), feed.close()), daemon=True).start()
    started = cpu_self()
    items = 0
    for _symbol, _batch in feed:
        items += 1
        if feed.trades >= expect:
            break
    cpu = cpu_self() - started
    feed.close()
    return {
        "trades": feed.trades,
        "items": items,
        "wakeups": feed.wakeups,
        "cpu": cpu,
        "lost": feed.lost,
    }


def consume_naive(endpoint: str, symbols: list[str], expect: int) -> dict[str, Any]:
    import zmq

    from polyfan.wire import codec

    context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    sub = context.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.connect(endpoint)
    for symbol in symbols:
        sub.setsockopt(zmq.SUBSCRIBE, codec.trade_topic(symbol))
    sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
    while codec.decode(sub.recv()).kind is codec.Kind.TRADES:
        pass
    sub.setsockopt(zmq.UNSUBSCRIBE, codec.CONTROL_TOPIC)
    print("joined", flush=True)
    stopping = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.readline(), stopping.set()), daemon=True).start()
    gaps = codec.GapCounter()
    started = cpu_self()
    trades = messages = 0
    while trades < expect and not stopping.is_set():
        if not sub.poll(100):
            continue
        message = codec.decode(sub.recv())
        if message.kind is not codec.Kind.TRADES:
            continue
        records = codec.records(message)
        gaps.observe(message.topic, message.session, message.seq)
        trades += len(records)
        messages += 1
    cpu = cpu_self() - started
    sub.close(0)
    context.term()
    return {"trades": trades, "wakeups": messages, "cpu": cpu, "lost": gaps.lost}


def consume_earlier(url: str, symbols: list[str], expect: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect

    wanted = frozenset(symbols)

    async def run() -> dict[str, Any]:
        async with connect(url, compression=None, max_size=None) as ws:
            print("joined", flush=True)
            loop = asyncio.get_running_loop()
            stop = loop.run_in_executor(None, sys.stdin.readline)
            stop.add_done_callback(lambda _: loop.create_task(ws.close()))
            started = cpu_self()
            seen = kept = frames = 0
            async for frame in ws:
                frames += 1
                events = orjson.loads(frame)
                seen += len(events)
                kept += sum(1 for e in events if e["sym"] in wanted)
                if seen >= expect:
                    break
            return {"trades": kept, "wakeups": frames, "cpu": cpu_self() - started, "lost": 0}

    return asyncio.run(run())


CONSUMERS = {
    "trade_batches": consume_trade_batches,
    "trade_batches_1ms": lambda *a: consume_trade_batches(*a, coalesce_ms=1.0),
    "naive": consume_naive,
    "earlier": consume_earlier,
}


# --- the run -----------------------------------------------------------------------------------


def make_stream(symbols: int, trades: int) -> tuple[list[str], list[list[str]]]:
    """The frames (JSON text) and, per frame, the symbols of its trades."""
    from polyfan.market import Market

    market = Market(symbols, seed=1)
    events = market.trades(trades, int(time.time() * 1000))
    frames, syms = [], []
    for i in range(0, len(events), FRAME_TRADES):
        chunk = events[i : i + FRAME_TRADES]
        frames.append(orjson.dumps(chunk).decode())
        syms.append([e["sym"] for e in chunk])
    return frames, syms


def expected_trades(frame_symbols: list[list[str]], count: int, chosen: set[str]) -> int:
    per_frame = [sum(1 for s in syms if s in chosen) for syms in frame_symbols]
    full, rest = divmod(count, len(per_frame))
    return full * sum(per_frame) + sum(per_frame[:rest])


class Child:
    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, str(HERE), *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def line(self) -> str:
        assert self.popen.stdout is not None
        return self.popen.stdout.readline().strip()

    def tell(self, text: str) -> None:
        assert self.popen.stdin is not None
        try:
            self.popen.stdin.write(text + "\n")
            self.popen.stdin.flush()
        except BrokenPipeError:
            pass

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()


def one_run(rate: int, seconds: float, frames: list[str], frame_symbols: list[list[str]]) -> None:
    from procs import free_port

    count = int(rate * seconds / FRAME_TRADES)
    counts = collections.Counter(s for syms in frame_symbols for s in syms)
    busiest = [s for s, _ in counts.most_common(CONSUMER_SYMBOLS)]
    randoms = random.Random(7).sample(sorted(counts), CONSUMER_SYMBOLS)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames"
        path.write_text("\n".join(frames))
        port = free_port()
        server = Child("--serve", str(port), str(path), str(rate), str(count))
        assert server.line() == "serving"
        pub = f"ipc://{tmp}/proxy"
        env = dict(os.environ, MASSIVE_API_KEY="bench", POLYFAN_LOG="error")
        proxy = subprocess.Popen(
            [sys.executable, "-m", "polyfan", "proxy", "--upstream", f"ws://127.0.0.1:{port}",
             "--pub", pub],
            env=env,
        )  # fmt: skip
        assert server.line() == "proxy", "the proxy did not subscribe"
        plan = [
            ("earlier design, 10 busiest", "earlier", f"ws://127.0.0.1:{port}/relay", busiest),
            ("trade_batches, 10 random", "trade_batches", pub, randoms),
            ("trade_batches, 10 busiest", "trade_batches", pub, busiest),
            ("  coalesce_ms=1, 10 busiest", "trade_batches_1ms", pub, busiest),
            ("naive pyzmq, 10 busiest", "naive", pub, busiest),
        ]
        children: list[tuple[str, Child, int]] = []
        try:
            for name, kind, where, symbols in plan:
                expect = (
                    count * FRAME_TRADES
                    if kind == "earlier"
                    else expected_trades(frame_symbols, count, set(symbols))
                )
                child = Child("--consume", kind, where, ",".join(symbols), str(expect))
                assert child.line() == "joined", name
                children.append((name, child, expect))
            proxy_cpu = cpu_of(proxy.pid)
            server.tell("go")
            stream = json.loads(server.line())
            results = {}
            deadline = time.monotonic() + seconds + 60
            for name, child, _ in children:
                timer = threading.Timer(max(0.0, deadline - time.monotonic()), child.tell, ["stop"])
                timer.start()
                results[name] = json.loads(child.line())
                timer.cancel()
            proxy_cpu = cpu_of(proxy.pid) - proxy_cpu
        finally:
            server.tell("stop")
            for _, child, _ in children:
                child.tell("stop")
                child.stop()
            proxy.send_signal(signal.SIGINT)
            proxy.wait()
            server.stop()
    total = stream["frames"] * FRAME_TRADES
    print(
        f"\n{rate:,} trades/s asked: {total:,} trades in {stream['frames']:,} frames of "
        f"{FRAME_TRADES}, sent in {stream['seconds']:.2f} s "
        f"({total / stream['seconds']:,.0f}/s); proxy CPU {proxy_cpu:.2f} s"
    )
    earlier = results["earlier design, 10 busiest"]["cpu"]
    print(
        f"  {'consumer':28s} {'trades':>9s} {'reads':>10s} {'CPU s':>7s} "
        f"{'µs/trade':>9s} {'CPU s/M stream':>15s} {'vs earlier':>10s} {'lost':>5s}"
    )
    for name, _, expect in children:
        r = results[name]
        pieces = r["wakeups"]
        per_trade = r["cpu"] / r["trades"] * 1e6 if r["trades"] else float("nan")
        short = "" if r["trades"] >= expect or name.startswith("earlier") else " SHORT"
        ratio = f"1/{earlier / r['cpu']:.1f}" if r["cpu"] > 0 else "n/a"
        print(
            f"  {name:28s} {r['trades']:>9,} {pieces:>10,} {r['cpu']:>7.2f} {per_trade:>9.2f} "
            f"{r['cpu'] / total * 1e6:>15.3f} {ratio:>10s} {r['lost']:>5}{short}"
        )


def _publish_sparsely(
    pub: Any, message: bytes, rate: float, seconds: float, done: threading.Event, feed: Any
) -> None:
    """Send ``message`` every 1/rate s for ``seconds`` (its sequence number does not move: the
    consumers here do not count losses), then say so."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pub.send(message)
        time.sleep(1 / rate)
    done.set()
    if feed is not None:
        feed.close()


def own_part(count: int = 50_000) -> None:
    """trade_batches' own CPU per wake-up, without ZeroMQ: a stand-in receiver hands it the
    same buffer of one trade message each time (decode, copy, item, iteration)."""
    import numpy as np

    from polyfan import client
    from polyfan.wire import codec
    from polyfan.wire.ingest import join_frames

    rows = np.zeros(2, codec.TRADE_DTYPE)
    rows["p"], rows["s"] = 10.0, 100.0
    frame = codec.encode(codec.trade_topic("A"), codec.Kind.TRADES, 1, 1, 2, rows.tobytes())
    joined = join_frames([frame])

    class StandIn:
        def receive(self, wait: bool = False) -> Any:
            return joined

        def close(self) -> None:
            pass

    with tempfile.TemporaryDirectory() as tmp:
        feed = client.trade_batches(f"ipc://{tmp}/none", "A")
        real, feed._receiver = feed._receiver, StandIn()  # type: ignore[assignment]
        started = time.perf_counter()
        for _ in range(count):
            next(feed)
        took = time.perf_counter() - started
        feed._receiver = real
        started = time.perf_counter()
        for _ in range(count):
            real.receive()
        empty = time.perf_counter() - started
        feed.close()
    print(
        f"\ntrade_batches' own part per wake-up of one message: {took / count * 1e6:.1f} µs, "
        f"plus the compiled receive call ({empty / count * 1e6:.1f} µs on an empty socket)"
    )


def wake_cost(rate: float = 250.0, seconds: float = 3.0) -> None:
    """CPU of the consuming thread per message when every message wakes it from sleep: a PUB
    thread in this process sends one message every 1/rate s; trade_batches against a plain
    pyzmq ``poll`` + ``recv`` + ``codec.decode`` loop (``time.thread_time``: that thread only,
    not ZeroMQ's I/O thread)."""
    import numpy as np
    import zmq

    from polyfan import client
    from polyfan.wire import codec

    rows = np.zeros(2, codec.TRADE_DTYPE)
    rows["p"], rows["s"] = 10.0, 100.0
    print(f"\none message every {1000 / rate:g} ms for {seconds:g} s, consuming thread's CPU:")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("trade_batches", "pyzmq poll+recv"):
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            pub = context.socket(zmq.PUB)
            pub.setsockopt(zmq.LINGER, 0)
            pub.bind(f"ipc://{tmp}/wake")
            sequencer = codec.Sequencer(1)
            clock = np.zeros(1, codec.CLOCK_DTYPE).tobytes()
            feed = (
                client.trade_batches(f"ipc://{tmp}/wake", "A") if kind == "trade_batches" else None
            )
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.connect(f"ipc://{tmp}/wake")
            sub.setsockopt(zmq.SUBSCRIBE, b"T.A\x00")
            sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
            while not sub.poll(20) or (feed is not None and not feed.wait_joined(0.02)):
                pub.send(sequencer.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, clock))
            sub.setsockopt(zmq.UNSUBSCRIBE, codec.CONTROL_TOPIC)
            while sub.poll(50):
                sub.recv()
            done = threading.Event()
            message = sequencer.encode(codec.trade_topic("A"), codec.Kind.TRADES, 2, rows.tobytes())
            threading.Thread(
                target=_publish_sparsely,
                args=(pub, message, rate, seconds, done, feed),
                daemon=True,
            ).start()
            started = time.thread_time()
            messages = 0
            if feed is not None:
                for _ in feed:
                    messages += 1
            else:
                gaps = codec.GapCounter()
                while not done.is_set():
                    if sub.poll(100):
                        message = codec.decode(sub.recv())
                        codec.records(message)
                        gaps.observe(message.topic, message.session, message.seq)
                        messages += 1
            used = time.thread_time() - started
            print(f"  {kind:18s} {messages:6,} messages, {used / messages * 1e6:6.1f} µs each")
            sub.close(0)
            pub.close(0)
            context.term()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        port, path, rate, count = sys.argv[2:6]
        asyncio.run(serve(int(port), Path(path), float(rate), int(count)))
        return
    if len(sys.argv) > 1 and sys.argv[1] == "--consume":
        kind, where, symbols, expect = sys.argv[2:6]
        result = CONSUMERS[kind](where, symbols.split(","), int(expect))
        print(json.dumps(result), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=int, nargs="+", default=[20_000, 100_000])
    parser.add_argument("--seconds", type=float, default=10.0, help="stream length per rate")
    parser.add_argument("--symbols", type=int, default=SYMBOLS)
    parser.add_argument("--skip-wake", action="store_true", help="skip the wake-up cost part")
    args = parser.parse_args()
    if not args.skip_wake:
        own_part()
        wake_cost()
    frames, frame_symbols = make_stream(args.symbols, STREAM_TRADES)
    print(
        f"machine: {os.cpu_count()} cores, Python {sys.version.split()[0]}; stream: "
        f"{STREAM_TRADES:,} trades over {args.symbols:,} symbols (cycled), "
        f"{FRAME_TRADES} trades a frame"
    )
    for rate in args.rates:
        one_run(rate, args.seconds, frames, frame_symbols)


if __name__ == "__main__":
    main()
