"""Proxy throughput: pre-encoded Polygon frames through a real ``polyfan proxy`` to a SUB.

    .venv/bin/python bench/bench_proxy.py [--trades 3000000] [--symbols 500]
    .venv/bin/python bench/bench_proxy.py --quotes-per-trade 10 [--trades 300000]
    .venv/bin/python bench/bench_proxy.py --sim 4000 [--quotes-per-trade 10] [--seconds 20]

With ``--quotes-per-trade R`` the frames are the simulator's whole stream (``Market.stream``:
trades, R quotes per trade, LULD bands, A/AM aggregates, re-cut into frames of 100 events) and
``--trades`` counts trades; every event published is counted. ``--sim RATE`` instead runs the
real ``polyfan sim --rate RATE --quotes-per-trade R`` into ``polyfan proxy --subscribe
T.*,Q.*`` for ``--seconds`` and reports what the proxy keeps up with at that offered rate:
events and messages per second received by the SUB and the proxy's CPU per message.

1. Parse-only ceilings of the same frames, in this process: ``orjson.loads``, msgspec's typed
   decode, and the proxy's whole decode (``upstream.EventDecoder``: parse, validate, records,
   group by symbol).
2. ZeroMQ single frame vs multipart for trade-sized messages (PUB -> SUB over ipc).
3. End to end: a local WebSocket server (a child process) sends the frames as fast as the proxy
   reads them; ``polyfan proxy`` runs as a real subprocess; a SUB here counts the trades
   published. Prints trades/s from the first trade received to the last.

The machine has 2 cores shared by the server, the proxy and the SUB: figures are a floor.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import msgspec
import orjson
import zmq
import zmq.auth

from polyfan.feed import events, scan, upstream
from polyfan.market import Market
from polyfan.sim import status
from polyfan.wire import codec

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import free_port

FRAME_EVENTS = 100


def make_frames(count: int, symbols: int, quotes_per_trade: float = 0.0) -> list[bytes]:
    """``count`` frames of ``FRAME_EVENTS`` events: trades only, or the sim's whole stream."""
    market = Market(symbols, seed=1)
    now = int(time.time() * 1000)
    if not quotes_per_trade:
        trades = market.trades(count * FRAME_EVENTS, now)
        return [
            orjson.dumps(trades[i : i + FRAME_EVENTS]) for i in range(0, len(trades), FRAME_EVENTS)
        ]
    per_tick = max(1, round(count * FRAME_EVENTS / (1 + quotes_per_trade) / 1200))
    stream: list[dict[str, object]] = []
    tick = 0
    while len(stream) < count * FRAME_EVENTS:  # two minutes of market time, ending now
        moment = now - 120_000 + 100 * tick
        frames = market.stream(per_tick, moment, quotes_per_trade=quotes_per_trade)
        stream += [e for f in frames for e in f]
        tick += 1
    stream = stream[: count * FRAME_EVENTS]
    return [orjson.dumps(stream[i : i + FRAME_EVENTS]) for i in range(0, len(stream), FRAME_EVENTS)]


def kinds_in(frames: list[bytes]) -> str:
    counts: dict[str, int] = {}
    for frame in frames:
        for event in orjson.loads(frame):
            counts[event["ev"]] = counts.get(event["ev"], 0) + 1
    return ", ".join(f"{ev} {n:,}" for ev, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def best_rate(run: object, trades: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        run()  # type: ignore[operator]
        best = min(best, time.perf_counter() - start)
    return trades / best


def parse_ceilings(frames: list[bytes]) -> None:
    trades = len(frames) * FRAME_EVENTS  # events, whatever their kind
    typed = msgspec.json.Decoder(
        list[
            upstream.Trade
            | events.Quote
            | events.SecondAggregate
            | events.MinuteAggregate
            | events.Luld
            | upstream.Status
        ]
    )
    now = int(time.time() * 1000)

    def with_orjson() -> None:
        for f in frames:
            orjson.loads(f)

    def with_msgspec() -> None:
        for f in frames:
            typed.decode(f)

    def with_scanner() -> None:
        table = scan.SymbolTable()
        columns = scan.Columns(trades + 1)
        row = 0
        for f in frames:
            row = columns.scan(f, row, table)

    def proxy_decode_per_frame() -> None:
        decoder = upstream.EventDecoder()
        for f in frames:
            decoder.decode([f], now)

    def proxy_decode_batched() -> None:
        decoder = upstream.EventDecoder()
        for i in range(0, len(frames), 64):
            decoder.decode(frames[i : i + 64], now)

    scan.warm_up()
    print(f"parse only, {len(frames)} frames of {FRAME_EVENTS} events ({trades:,} events):")
    for name, run in (
        ("orjson.loads", with_orjson),
        ("msgspec typed decode list[Trade|Quote|...]", with_msgspec),
        ("feedscan numba scanner alone", with_scanner),
        ("upstream.EventDecoder, one frame per call", proxy_decode_per_frame),
        ("upstream.EventDecoder, 64 frames per call", proxy_decode_batched),
    ):
        print(f"  {name:45s} {best_rate(run, trades) / 1e6:6.2f} M events/s")


def zmq_frames(count: int = 300_000) -> None:
    """Single frame ``topic\\0 header payload`` vs multipart ``[topic\\0, header payload]``."""
    records = bytes(codec.TRADE_DTYPE.itemsize * 3)  # a typical message: 3 trades
    topic = codec.trade_topic("AAPL")
    header = codec.HEADER.pack(codec.VERSION, codec.Kind.TRADES, 0, 3, 1, 1)
    print(
        f"ZeroMQ PUB->SUB over ipc, {count:,} messages of {len(topic) + 24 + len(records)} bytes:"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for multipart in (False, True):
            context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
            pub = context.socket(zmq.PUB)
            pub.setsockopt(zmq.SNDHWM, 0)
            pub.setsockopt(zmq.LINGER, 0)
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.RCVHWM, 0)
            sub.setsockopt(zmq.LINGER, 0)
            address = f"ipc://{tmp}/z{int(multipart)}"
            pub.bind(address)
            sub.connect(address)
            sub.setsockopt(zmq.SUBSCRIBE, b"T.")
            while True:  # no slow-joiner sleep: probe until seen
                pub.send(topic + header)
                if sub.poll(10):
                    sub.recv_multipart()
                    break
            while sub.poll(50):
                sub.recv_multipart()

            def receive(sub: zmq.Socket[bytes] = sub) -> None:
                for _ in range(count):
                    sub.recv_multipart(copy=True)

            thread = threading.Thread(target=receive)
            thread.start()
            start = time.perf_counter()
            if multipart:
                for _ in range(count):
                    pub.send(topic, zmq.SNDMORE)
                    pub.send(header + records)
            else:
                for _ in range(count):
                    pub.send(b"".join((topic, header, records)))
            sent = time.perf_counter() - start
            thread.join()
            total = time.perf_counter() - start
            name = "multipart [topic, header+payload]" if multipart else "single frame"
            print(
                f"  {name:35s} send {count / sent / 1e3:7.0f} k msg/s, "
                f"end to end {count / total / 1e3:7.0f} k msg/s"
            )
            sub.close(0)
            pub.close(0)
            context.term()


async def serve_frames(port: int, path: Path, repeat: int) -> None:
    """The child process: a minimal Polygon server that sends the frames as fast as read."""
    from websockets.asyncio.server import ServerConnection, serve

    frames = path.read_bytes().split(b"\n")
    done = asyncio.Event()

    async def handle(ws: ServerConnection) -> None:
        await ws.send(status("connected", "Connected Successfully"))
        await ws.recv()
        await ws.send(status("auth_success", "authenticated"))
        await ws.recv()
        await ws.send(status("success", "subscribed to: T.*"))
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        for _ in range(repeat):
            for frame in frames:
                await ws.send(frame, text=True)
        await ws.wait_closed()
        done.set()

    async with serve(handle, "127.0.0.1", port, compression=None, max_size=None):
        print("serving", flush=True)
        await done.wait()


def end_to_end(
    frames: list[bytes], repeat: int, profile: Path | None = None, curve: bool | None = None
) -> None:
    """``curve``: None, the proxy's PUB on ipc; False, on tcp loopback; True, on tcp with CURVE
    (an allow directory holding this script's key)."""
    total = len(frames) * FRAME_EVENTS * repeat
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "frames"
        path.write_bytes(b"\n".join(frames))
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(port), str(path), str(repeat)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert server.stdin is not None
        assert server.stdout is not None
        server.stdout.readline()
        address = f"ipc://{tmp}/proxy" if curve is None else f"tcp://127.0.0.1:{free_port()}"
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.LINGER, 0)
        curve_args: list[str] = []
        if curve:
            allow = Path(tmp) / "allow"
            allow.mkdir()
            proxy_secret = zmq.auth.create_certificates(tmp, "proxy")[1]
            bench_secret_file = zmq.auth.create_certificates(str(allow), "bench")[1]
            public, secret = zmq.auth.load_certificate(bench_secret_file)
            sub.curve_publickey, sub.curve_secretkey = public, secret
            sub.curve_serverkey = zmq.auth.load_certificate(f"{tmp}/proxy.key")[0]
            Path(bench_secret_file).unlink()  # only public keys in the allow directory
            curve_args = ["--curve-secret", proxy_secret, "--curve-allow", str(allow)]
        sub.connect(address)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        env = dict(os.environ, MASSIVE_API_KEY="bench", POLYFAN_LOG="warning")
        args = ["proxy", "--upstream", f"ws://127.0.0.1:{port}", "--pub", address, *curve_args]
        command = [sys.executable, "-m", "polyfan", *args]
        if profile is not None:  # cProfile.run dumps the stats when the CLI exits
            code = (
                "import cProfile; from polyfan.cli import main; "
                f"cProfile.run({f'main({args!r})'!r}, {str(profile)!r})"
            )
            command = [sys.executable, "-c", code]
        proxy = subprocess.Popen(command, env=env)
        while not sub.poll(100) or codec.decode(sub.recv()).kind is not codec.Kind.CLOCK:
            pass  # the SUB has joined once the proxy's clock arrives: then the frames may flow
        server.stdin.write("go\n")
        server.stdin.flush()
        count_at = struct.Struct("<I").unpack_from
        data_kinds = {
            codec.Kind.TRADES, codec.Kind.QUOTES, codec.Kind.AGGREGATES, codec.Kind.LULD,
            codec.Kind.RAW,
        }  # fmt: skip
        received = 0
        cpu_first = cpu_last = 0.0
        first = last = 0.0
        messages = 0
        lost = codec.GapCounter()
        try:
            while received < total:
                if not sub.poll(20_000):
                    print(f"  timed out at {received:,} of {total:,} trades")
                    break
                frame = sub.recv()
                end = frame.index(0)
                if frame[end + 2] not in data_kinds:
                    continue
                if not received:
                    first = time.perf_counter()
                    cpu_first = cpu_seconds(proxy.pid)
                received += count_at(frame, end + 5)[0]
                messages += 1
                session, seq = struct.unpack_from("<QQ", frame, end + 9)
                lost.observe(frame[:end].decode(), session, seq)
            last = time.perf_counter()
            cpu_last = cpu_seconds(proxy.pid)
        finally:
            proxy.send_signal(signal.SIGINT)
            proxy.wait()
            server.kill()
            server.wait()
            sub.close(0)
            context.term()
        elapsed = last - first
        print(
            f"end to end through `polyfan proxy` (subprocess, "
            f"{'ipc' if curve is None else 'tcp CURVE' if curve else 'tcp plain'} PUB): "
            f"{received:,} events in "
            f"{messages:,} messages, {elapsed:.2f} s: {received / elapsed / 1e6:.2f} M events/s, "
            f"{messages / elapsed / 1e3:.0f} k messages/s "
            f"({received / messages:.1f} events/message, {lost.lost} messages lost)"
        )
        cpu = cpu_last - cpu_first
        print(
            f"  proxy CPU over the same window: {cpu:.2f} s ({cpu / elapsed:.0%} of a core): "
            f"{received / cpu / 1e6:.2f} M events per CPU-second (steadier than wall time on a "
            f"busy machine), {cpu / messages * 1e6:.2f} us per message, "
            f"{cpu / received * 1e6:.3f} us per event"
        )


def from_the_sim(rate: float, quotes_per_trade: float, symbols: int, seconds: float) -> None:
    """``polyfan sim`` -> ``polyfan proxy --subscribe T.*,Q.*`` -> a SUB here, at an offered
    rate: what gets through, and the proxy's CPU per message."""
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        address = f"ipc://{tmp}/proxy"
        env = dict(os.environ, MASSIVE_API_KEY="bench", POLYFAN_LOG="warning")
        polyfan = [sys.executable, "-m", "polyfan"]
        proxy = subprocess.Popen(
            [*polyfan, "proxy", "--upstream", f"ws://127.0.0.1:{port}/stocks", "--pub", address,
             "--subscribe", "T.*,Q.*"],
            env=env,
        )  # fmt: skip
        context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        sub = context.socket(zmq.SUB)
        sub.setsockopt(zmq.RCVHWM, 0)
        sub.setsockopt(zmq.LINGER, 0)
        sub.connect(address)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        while not sub.poll(100) or codec.decode(sub.recv()).kind is not codec.Kind.CLOCK:
            pass
        sim = subprocess.Popen(
            [*polyfan, "sim", "--listen", f"127.0.0.1:{port}", "--symbols", str(symbols),
             "--rate", str(rate), "--quotes-per-trade", str(quotes_per_trade), "--seed", "1"],
            env=env,
        )  # fmt: skip
        count_at = struct.Struct("<I").unpack_from
        by_kind = {codec.Kind.TRADES: 0, codec.Kind.QUOTES: 0}
        messages = 0
        lost = codec.GapCounter()
        warm = time.monotonic() + 5  # the sim and proxy settle (numba, first connections)
        start = cpu_start = sim_start = 0.0
        try:
            while True:
                if not sub.poll(1000):
                    continue
                frame = sub.recv()
                end = frame.index(0)
                kind = frame[end + 2]
                if kind not in by_kind:
                    continue
                now = time.monotonic()
                if not start:
                    if now < warm:
                        continue
                    start, cpu_start, sim_start = now, cpu_seconds(proxy.pid), cpu_seconds(sim.pid)
                by_kind[codec.Kind(kind)] += count_at(frame, end + 5)[0]
                messages += 1
                session, seq = struct.unpack_from("<QQ", frame, end + 9)
                lost.observe(frame[:end].decode(), session, seq)
                if now - start >= seconds:
                    break
            elapsed = time.monotonic() - start
            cpu = cpu_seconds(proxy.pid) - cpu_start
            sim_cpu = cpu_seconds(sim.pid) - sim_start
        finally:
            for process in (sim, proxy):
                process.send_signal(signal.SIGINT)
                process.wait()
            sub.close(0)
            context.term()
        trades, quotes = by_kind[codec.Kind.TRADES], by_kind[codec.Kind.QUOTES]
        offered = rate * (1 + quotes_per_trade)
        print(
            f"sim --rate {rate:g} --quotes-per-trade {quotes_per_trade:g} ({offered:,.0f} events/s "
            f"offered), {symbols} symbols -> proxy T.*,Q.* -> SUB, {elapsed:.1f} s:\n"
            f"  received {trades / elapsed:,.0f} trades/s + {quotes / elapsed:,.0f} quotes/s = "
            f"{(trades + quotes) / elapsed:,.0f} events/s in {messages / elapsed:,.0f} messages/s "
            f"({(trades + quotes) / messages:.1f} events/message, {lost.lost} messages lost)\n"
            f"  proxy CPU {cpu / elapsed:.0%} of a core: {cpu / messages * 1e6:.1f} us per "
            f"message, {cpu / (trades + quotes) * 1e6:.2f} us per event; sim CPU "
            f"{sim_cpu / elapsed:.0%} of a core"
        )


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--serve":
        asyncio.run(serve_frames(int(sys.argv[2]), Path(sys.argv[3]), int(sys.argv[4])))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trades", type=int, default=3_000_000, help="trades end to end")
    parser.add_argument("--symbols", type=int, default=500)
    parser.add_argument("--skip-zmq", action="store_true", help="skip the single/multipart test")
    parser.add_argument("--profile", type=Path, help="cProfile the proxy; write stats here")
    parser.add_argument(
        "--quotes-per-trade", type=float, default=0.0,
        help="frames of the sim's whole stream, this many quotes per trade (default: trades only)",
    )  # fmt: skip
    parser.add_argument(
        "--sim", type=float, metavar="RATE", default=0.0,
        help="instead: the real sim at RATE trades/s (and --quotes-per-trade, default 10) into "
        "the proxy (T.*,Q.*) for --seconds",
    )  # fmt: skip
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument(
        "--curve", type=int, metavar="ROUNDS", default=0,
        help="instead: end to end over tcp, plain and CURVE alternating, ROUNDS times",
    )  # fmt: skip
    args = parser.parse_args()
    if args.curve:
        frames = make_frames(2_000, args.symbols)
        repeat = max(1, args.trades // (len(frames) * FRAME_EVENTS))
        for _ in range(args.curve):
            for curve in (False, True):
                end_to_end(frames, repeat, curve=curve)
        return
    if args.sim:
        from_the_sim(args.sim, args.quotes_per_trade or 10.0, args.symbols, args.seconds)
        return
    frames = make_frames(2_000, args.symbols, args.quotes_per_trade)
    print(f"machine: {os.cpu_count()} cores; {args.symbols} symbols; Zipf-skewed activity")
    print(f"frames: {len(frames):,} of {FRAME_EVENTS} events: {kinds_in(frames)}")
    parse_ceilings(frames)
    if not args.skip_zmq:
        zmq_frames()
    events_per_trade = 1 + args.quotes_per_trade
    repeat = max(1, round(args.trades * events_per_trade / (len(frames) * FRAME_EVENTS)))
    end_to_end(frames, repeat, args.profile)


if __name__ == "__main__":
    main()
