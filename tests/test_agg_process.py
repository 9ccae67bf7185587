"""``polyfan agg`` as a user runs it: real processes from the CLI, real ZeroMQ sockets.

Two feeds: the whole sim -> proxy -> agg path (the test taps the proxy with its own SUB, which
receives exactly the message sequence the agg receives, and computes the reference from it), and
a publisher in the test that speaks the wire exactly as the proxy does, for the cases the test
must steer (sequence gaps, session changes, outages, an agg restart at a chosen moment).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import zmq

from polyfan.wire import codec
from procs import Context, Proc, endpoint, free_port, scrape
from reference import Bar, Clock, Trade, Trades, bar_from_record, reference_bars

INTERVALS = (100, 250, 1_000)
GRACE = 250
SYMBOLS = (
    "A", "AA", "AAPL", "AAP", "BRK.A", "BRK.B", "BRK", "T", "TSLA", "TSL", "MSFT", "MS",
    "NVDA", "NV", "GOOG", "GOOGL", "F", "FB", "META", "AMD", "AMDX", "SPY", "QQQ", "IBM",
)  # fmt: skip
TRANSPORTS = ["ipc", "tcp"]


class Subscriber:
    """A SUB socket whose every receive is bounded by a deadline."""

    def __init__(self, ctx: Context, address: str, *prefixes: bytes) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        for prefix in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sock.connect(address)

    def receive(self, timeout: float) -> codec.Message | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return codec.decode(self.sock.recv())


class AggOutput:
    """Everything an agg publishes, collected from a SUB subscribed to all of it."""

    def __init__(self, ctx: Context, address: str) -> None:
        self.sub = Subscriber(ctx, address, *codec.EVERYTHING_BUT_REPLIES)
        self.bars: dict[tuple[str, int], list[Bar]] = {}
        self.by_session: dict[int, dict[tuple[str, int], list[Bar]]] = {}
        self.seqs: dict[str, list[tuple[int, int]]] = {}
        self.clock: int | None = None
        self.clock_walls: set[int] = set()
        self.announces: list[dict[str, object]] = []
        self.upstream: list[tuple[int, int, int]] = []

    def pump(self, timeout: float = 0.05) -> bool:
        message = self.sub.receive(timeout)
        if message is None:
            return False
        self.seqs.setdefault(message.topic, []).append((message.session, message.seq))
        if message.kind is codec.Kind.BARS:
            interval_text, symbol = message.topic.split(".", 1)
            key = (symbol, int(interval_text.removesuffix("Ms")))
            bars = [bar_from_record(r) for r in codec.records(message)]
            self.bars.setdefault(key, []).extend(bars)
            self.by_session.setdefault(message.session, {}).setdefault(key, []).extend(bars)
        elif message.kind is codec.Kind.CLOCK:
            for clock, wall in codec.records(message).tolist():
                self.clock = clock
                self.clock_walls.add(wall)
        elif message.kind is codec.Kind.ANNOUNCE:
            self.announces.append(codec.decode_json(message))
        elif message.kind is codec.Kind.UPSTREAM:
            self.upstream.extend(tuple(r) for r in codec.records(message).tolist())
        return True

    def pump_until(
        self, condition: Callable[[], object], timeout: float = 20.0, what: str = ""
    ) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what or condition}"
            self.pump()


def assert_exact(
    published: dict[tuple[str, int], list[Bar]], expected: dict[tuple[str, int], list[Bar]]
) -> None:
    """Same bars, each once. v and vw to 1e-12 relative: the agg sums in arrival order, the
    reference with fsum in time order. Everything else exactly."""
    assert sorted(published) == sorted(expected)
    for key, bars in expected.items():
        got = published[key]
        assert [b.s for b in got] == [b.s for b in bars], key
        for mine, ref in zip(got, bars, strict=True):
            assert (mine.o, mine.h, mine.l, mine.c, mine.n, mine.flags) == (
                ref.o, ref.h, ref.l, ref.c, ref.n, ref.flags,
            ), (key, mine, ref)  # fmt: skip
            assert mine.v == pytest.approx(ref.v, rel=1e-12), key
            assert (mine.vw is None) == (ref.vw is None), key
            if ref.vw is not None:
                assert mine.vw == pytest.approx(ref.vw, rel=1e-12), key


def assert_contiguous_sequences(seqs: dict[str, list[tuple[int, int]]]) -> None:
    for topic, numbers in seqs.items():
        if topic.endswith(tuple(f".{s}" for s in SYMBOLS)):
            assert len({session for session, _ in numbers}) == 1, topic
            assert [seq for _, seq in numbers] == list(range(1, len(numbers) + 1)), topic


class Requester:
    """History and symbols requests from an XSUB, as a bridge sends them (docs/architecture.md)."""

    def __init__(self, ctx: Context, address: str, reply: str = "9f3a" * 8) -> None:
        self.reply = reply
        self.xsub = ctx.socket(zmq.XSUB)
        self.xsub.connect(address)
        self.xsub.send(b"\x01" + codec.reply_topic(reply))
        self.xsub.send(b"\x01" + codec.CONTROL_TOPIC)
        assert self.xsub.poll(5_000), "no announce on the XSUB"

    def ask(self, request: dict[str, object]) -> codec.Message:
        self.xsub.send(codec.encode_request({"reply": self.reply, **request}))
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if self.xsub.poll(100):
                message = codec.decode(self.xsub.recv())
                if message.topic == f"_rep.{self.reply}":
                    return message
        raise AssertionError(f"no reply to {request}")


def agg_args(sub: str, pub: str, metrics_port: int, *extra: str) -> list[str]:
    args = ["agg", "--sub", sub, "--pub", pub, "--grace", f"{GRACE}ms"]
    for interval in INTERVALS:
        args += ["--interval", f"{interval}ms"]
    return [*args, "--metrics", f"127.0.0.1:{metrics_port}", *extra]


def agg_endpoints(transport: str, tmp_path: Path) -> tuple[str, str, int]:
    """Fresh addresses for one test: the proxy's PUB, the agg's PUB, the agg's metrics port."""
    return endpoint(transport, tmp_path, "p"), endpoint(transport, tmp_path, "a"), free_port()


@contextlib.contextmanager
def serving_agg(
    ctx: Context,
    sub: str,
    pub: str,
    metrics_port: int,
    *extra: str,
    env: dict[str, str] | None = None,
) -> Iterator[tuple[Proc, AggOutput]]:
    """``polyfan agg`` ready and announcing, and a subscriber collecting all it publishes."""
    with Proc(*agg_args(sub, pub, metrics_port, *extra), env=env) as agg:
        agg.wait_for("ready:")
        output = AggOutput(ctx, pub)
        output.pump_until(lambda: output.announces, what="announce")
        yield agg, output


# --- the whole path: sim -> proxy -> agg ---------------------------------------------------


def script_frames(rng: random.Random, count: int, base: int) -> tuple[list[str], int]:
    """Polygon frames of ``count`` trades over SYMBOLS, skewed, with disorder, late prints,
    odd lots, fractional ``ds`` sizes and condition combinations (unknown codes included)."""
    weights = [1 / (rank + 1) for rank in range(len(SYMBOLS))]
    prices = {symbol: 10 + 5 * i for i, symbol in enumerate(SYMBOLS)}
    codes_menu: list[list[int]] = [
        [],
        [],
        [],
        [],
        [37],
        [12],
        [14],
        [12, 37],
        [14, 41],
        [99],
        [15],
        [32],
        [2],
    ]
    frames, sent, step = [], 0, 0
    while sent < count:
        size = min(rng.randint(1, 40), count - sent)
        events = []
        for _ in range(size):
            symbol = rng.choices(SYMBOLS, weights)[0]
            prices[symbol] = round(max(1.0, prices[symbol] + rng.choice([-0.01, 0, 0.01, 0.02])), 2)
            t = base + step * 6 - rng.randint(0, 200)
            if rng.random() < 0.02:
                t -= rng.randint(500, 3_000)  # a late print
            event: dict[str, object] = {
                "ev": "T",
                "sym": symbol,
                "p": prices[symbol],
                "t": t,
                "x": 4,
                "q": sent,
                "z": 3,
                "i": str(sent),
            }
            if rng.random() < 0.1:
                event["s"] = 0
                event["ds"] = rng.choice(["0.5", "1.25", "0.001"])
            else:
                event["s"] = rng.choice([1, 7, 50, 100, 100, 200, 1_000])
            codes = rng.choice(codes_menu)
            if codes:
                event["c"] = codes
            events.append(event)
            sent += 1
        frames.append(json.dumps(events))
        step += 1
    return frames, base + step * 6


def tap_events(message: codec.Message) -> list[Clock | Trades]:
    if message.kind is codec.Kind.CLOCK:
        return [Clock(clock) for clock, _ in codec.records(message).tolist()]
    if message.kind is codec.Kind.TRADES:
        records = codec.records(message)
        trades = tuple(
            Trade(
                int(r["t"]), float(r["p"]), float(r["s"]), tuple(int(c) for c in r["c"][: r["nc"]])
            )
            for r in records
        )
        return [Trades(message.topic.removeprefix("T."), trades)]
    return []


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_sim_proxy_agg_bars_match_the_reference_exactly_once(
    transport: str, tmp_path: Path, context: Context
) -> None:
    rng = random.Random(20261127)
    count = 10_500
    frames, last_t = script_frames(rng, count, int(time.time() * 1000))
    script = tmp_path / "script.txt"
    script.write_text("\n".join(frames) + "\n")
    sim_port = free_port()
    proxy_pub = endpoint(transport, tmp_path, "proxy")
    agg_pub = endpoint(transport, tmp_path, "agg")
    agg_metrics = free_port()
    env = {"MASSIVE_API_KEY": "test-key-123456"}
    # The proxy starts first and retries the sim's port, so the agg and the tap are both
    # subscribed before the first trade is published.
    with (
        Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub", proxy_pub, env=env
        ) as proxy,
        Proc(*agg_args(proxy_pub, agg_pub, agg_metrics)) as agg,
    ):
        proxy.wait_for("ready:")
        agg.wait_for("ready:")
        tap = Subscriber(context, proxy_pub, b"T.", codec.CONTROL_TOPIC)
        output = AggOutput(context, agg_pub)
        output.pump_until(
            lambda: output.announces and output.clock is not None,
            what="agg relaying the proxy clock",
        )
        events: list[Clock | Trades] = []
        while not any(isinstance(e, Clock) for e in events):
            message = tap.receive(5)
            assert message is not None, "the tap sees no clock from the proxy"
            events.extend(tap_events(message))
        with Proc("sim", "--listen", f"127.0.0.1:{sim_port}", "--script", str(script)) as sim:
            sim.wait_for("ready:")
            done_at = last_t + max(INTERVALS) + GRACE
            tap_clock = 0
            deadline = time.monotonic() + 60
            while tap_clock < done_at:
                assert time.monotonic() < deadline, "the proxy clock never ran past the script"
                message = tap.receive(5)
                assert message is not None
                new = tap_events(message)
                events.extend(new)
                tap_clock = max([tap_clock] + [e.clock for e in new if isinstance(e, Clock)])
                while output.pump(0):
                    pass
            output.pump_until(
                lambda: (output.clock or 0) >= done_at, what="agg clock past the script"
            )
            assert sim.stop() == 0
        received = sum(len(e.trades) for e in events if isinstance(e, Trades))
        assert received == count
        expected = reference_bars(events, INTERVALS, GRACE)
        assert expected.late > 0 and expected.unknown > 0  # the stream exercises both
        try:
            assert_exact(output.bars, expected.bars)
        except AssertionError as exc:  # what the agg logged (an outage?) says why
            raise AssertionError(f"{exc}\nagg output:\n{agg.output}") from exc
        assert_contiguous_sequences(output.seqs)
        # The last bars closed with no further trades: only the proxy's clock running on
        # (wall time while the feed is quiet) took it past their e + grace.
        last_t = max(t.t for e in events if isinstance(e, Trades) for t in e.trades)
        after_last_trade = [
            b for (_, i), bars in output.bars.items() for b in bars if b.s + i + GRACE > last_t
        ]
        assert after_last_trade
        assert sum(len(b) for b in output.bars.values()) > 1_000
        values = scrape(agg_metrics)
        assert values["polyfan_agg_trades_total"] == count
        assert values["polyfan_agg_late_trades_total"] == expected.late
        assert values["polyfan_agg_unknown_conditions_total"] == expected.unknown
        assert values["polyfan_agg_gaps_total"] == 0
        assert values["polyfan_agg_bars_total"] == sum(len(b) for b in expected.bars.values())
        # one observation per bar published (publish_delay: the same histogram's older name)
        for name in ("polyfan_agg_bar_delay_seconds", "polyfan_agg_publish_delay_seconds"):
            assert values[f"{name}_count"] == values["polyfan_agg_bars_total"]
            assert values[f'{name}_bucket{{le="+Inf"}}'] == values[f"{name}_count"]
            assert values[f'{name}_bucket{{le="1.0"}}'] <= values[f"{name}_count"]
        # The history answers with the very bars published, older ones from packed
        # blocks (every series with 16 bars or more is packed within a tick or two).
        assert scrape(agg_metrics)["polyfan_agg_history_packed_bytes"] > 0
        ask = Requester(context, agg_pub).ask
        busiest = sorted(output.bars, key=lambda k: -len(output.bars[k]))[:6]
        for number, (symbol, interval) in enumerate(busiest):
            reply = ask({"id": number, "channel": f"{interval}Ms.{symbol}"})
            request_id, status, bars = codec.records_from_history(reply)
            assert (request_id, status) == (number, codec.HistoryStatus.OK)
            assert [bar_from_record(b) for b in bars] == output.bars[(symbol, interval)]
        # killing and restarting the proxy is a new session, not a loss
        assert proxy.stop() == 0
        before = output.clock
        with Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub", proxy_pub, env=env
        ) as again:
            again.wait_for("ready:")
            walls = len(output.clock_walls)
            output.pump_until(
                lambda: len(output.clock_walls) > walls + 3, what="clock from the new proxy"
            )
            assert (output.clock or 0) >= (before or 0)  # the new proxy's clock is 0
            assert scrape(agg_metrics)["polyfan_agg_gaps_total"] == 0
            assert again.stop() == 0
        assert agg.stop() == 0


# --- a publisher in the test, speaking the wire as the proxy does --------------------------


class FakeProxy:
    def __init__(self, ctx: Context, address: str, session: int) -> None:
        self.pub = ctx.socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, 0)
        # A restarted proxy rebinds the address its predecessor just closed; ZeroMQ releases
        # a closed listener asynchronously, so retry until it is free.
        deadline = time.monotonic() + 10
        while True:
            try:
                self.pub.bind(address)
                break
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)
        self.session = session
        self.sequencer = codec.Sequencer(session)
        self.wall = session * 1_000_000  # probe walls never repeat across fake proxies

    def send(self, topic: bytes, kind: codec.Kind, records: np.ndarray, skip: int = 0) -> None:
        seq = self.sequencer.next(topic)
        for _ in range(skip):
            seq = self.sequencer.next(topic)
        self.pub.send(codec.encode(topic, kind, self.session, seq, len(records), records.tobytes()))

    def trades(self, symbol: str, trades: tuple[Trade, ...], skip: int = 0) -> None:
        records = np.zeros(len(trades), dtype=codec.TRADE_DTYPE)
        for i, trade in enumerate(trades):
            records[i]["t"], records[i]["p"], records[i]["s"] = trade.t, trade.p, trade.size
            records[i]["nc"] = len(trade.codes)
            records[i]["c"][: len(trade.codes)] = trade.codes
        self.send(codec.trade_topic(symbol), codec.Kind.TRADES, records, skip)

    def clock(self, clock: int) -> None:
        self.wall += 1
        self.send(
            codec.CONTROL_TOPIC, codec.Kind.CLOCK, np.array([(clock, self.wall)], codec.CLOCK_DTYPE)
        )

    def upstream(self, state: int, clock: int, wall: int) -> None:
        self.send(
            codec.CONTROL_TOPIC,
            codec.Kind.UPSTREAM,
            np.array([(state, clock, wall)], codec.UPSTREAM_DTYPE),
        )

    def publish(self, events: list[Clock | Trades]) -> None:
        for event in events:
            if isinstance(event, Clock):
                self.clock(event.clock)
            else:
                self.trades(event.symbol, event.trades)

    def probe(self, output: AggOutput, clock: int) -> None:
        """Publish CLOCK until the agg relays it: its SUB is connected and subscribed."""
        deadline = time.monotonic() + 20
        self.clock(clock)
        while self.wall not in output.clock_walls:
            assert time.monotonic() < deadline, "the agg never relayed the probe clock"
            self.clock(clock)
            end = time.monotonic() + 0.02
            while time.monotonic() < end:
                output.pump(0.005)

    def close(self) -> None:
        self.pub.close(0)


def random_events(rng: random.Random, start: int, end: int, trades: int) -> list[Clock | Trades]:
    """Trades with t in [start, end), disorder within the grace, clocks as the proxy sends them."""
    events: list[Clock | Trades] = []
    clock = start
    step = (end - start) / trades
    for i in range(trades):
        t = min(end - 1, max(start, int(start + i * step) - rng.randint(0, GRACE // 2)))
        codes = rng.choice([(), (), (), (37,), (12,), (14,), (99,)])
        size = rng.choice([1.0, 100.0, 0.5])
        events.append(
            Trades(rng.choice(SYMBOLS), (Trade(t, round(rng.uniform(10, 11), 2), size, codes),))
        )
        if t > clock:
            clock = t
            events.append(Clock(clock))
    return events


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gaps_count_losses_but_not_a_new_session(
    transport: str, tmp_path: Path, context: Context
) -> None:
    proxy_pub, agg_pub, port = agg_endpoints(transport, tmp_path)
    fake = FakeProxy(context, proxy_pub, session=1)
    with serving_agg(context, proxy_pub, agg_pub, port) as (agg, output):
        fake.probe(output, 0)
        fake.trades("AAPL", (Trade(1_000, 1.0, 1),))
        fake.trades("AAPL", (Trade(1_010, 1.0, 1),), skip=2)  # two messages lost
        fake.probe(output, 1_010)
        assert scrape(port)["polyfan_agg_gaps_total"] == 2
        fake.close()
        fake = FakeProxy(context, proxy_pub, session=2)  # a proxy restart: seq starts over
        fake.probe(output, 1_020)
        fake.trades("AAPL", (Trade(1_030, 1.0, 1),))
        fake.probe(output, 5_000)
        values = scrape(port)
        assert values["polyfan_agg_gaps_total"] == 2
        assert values["polyfan_agg_trades_total"] == 3
        assert [b.s for b in output.bars[("AAPL", 1_000)]] == [1_000]
        assert agg.stop() == 0
    fake.close()


def test_a_long_symbols_list_loses_no_subscription(tmp_path: Path, context: Context) -> None:
    """ZeroMQ drops subscription messages beyond a SUB's send high-water mark (1,000 by
    default); with 3,000 listed symbols the agg still gets its control topic (last in ZeroMQ's
    order: "_" sorts after "T") and every listed symbol, and nothing else."""
    listed = [f"S{i:04d}" for i in range(3_000)]
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    fake = FakeProxy(context, proxy_pub, session=9)
    symbols = ",".join(listed)
    with serving_agg(context, proxy_pub, agg_pub, port, "--symbols", symbols) as (agg, output):
        fake.probe(output, 0)  # the control topic arrives: CLOCK relayed
        for symbol in ("S0000", "S2999", "NOTLISTED"):
            fake.trades(symbol, (Trade(1_000, 5.0, 100),))
        fake.clock(5_000)
        output.pump_until(lambda: (output.clock or 0) >= 5_000, what="the last clock")
        assert sorted(output.bars) == [(s, i) for s in ("S0000", "S2999") for i in INTERVALS]
        assert scrape(port)["polyfan_agg_trades_total"] == 2  # filtered at the publisher
        assert agg.stop() == 0
    fake.close()


@pytest.mark.parametrize(
    ("libzmq", "says"),
    [
        pytest.param(
            "",
            "messages go through libzmq 4",
            id="libzmq-from-numba",
            marks=pytest.mark.skipif(
                os.environ.get("NUMBA_DISABLE_JIT", "0") not in ("", "0"),
                reason="NUMBA_DISABLE_JIT: the agg can only use pyzmq",
            ),
        ),
        pytest.param("off", "messages go through pyzmq", id="pyzmq-fallback"),
    ],
)
def test_both_message_paths_publish_exactly_the_reference_bars(
    libzmq: str, says: str, tmp_path: Path, context: Context
) -> None:
    """The compiled receive/send path and the pyzmq fallback (``POLYFAN_LIBZMQ=off``, as when
    libzmq cannot be loaded) publish the same bars, each once, with contiguous sequences."""
    rng = random.Random(3)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    fake = FakeProxy(context, proxy_pub, session=5)
    events = random_events(rng, 200_000, 215_000, 6_000)
    env = {"POLYFAN_LIBZMQ": libzmq}
    with serving_agg(context, proxy_pub, agg_pub, port, env=env) as (agg, output):
        agg.wait_for(says, timeout=1)
        assert agg.output.count("messages go through") == 1
        fake.probe(output, 0)
        fake.publish(events)
        fake.clock(230_000)
        output.pump_until(lambda: (output.clock or 0) >= 230_000, what="the last clock")
        values = scrape(port)
        assert agg.stop() == 0
    fake.close()
    assert values["polyfan_agg_trades_total"] == 6_000
    assert values["polyfan_agg_gaps_total"] == 0
    assert_exact(output.bars, reference_bars([*events, Clock(230_000)], INTERVALS, GRACE).bars)
    assert_contiguous_sequences(output.seqs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_restarting_the_agg_mid_stream_recovers(
    transport: str, tmp_path: Path, context: Context
) -> None:
    rng = random.Random(7)
    proxy_pub, agg_pub, port = agg_endpoints(transport, tmp_path)
    fake = FakeProxy(context, proxy_pub, session=11)
    first = random_events(rng, 100_000, 110_000, 2_000)
    second = random_events(rng, 120_000, 130_000, 3_000)
    with serving_agg(context, proxy_pub, agg_pub, port) as (agg, output):
        fake.probe(output, 0)
        fake.publish(first)
        output.pump_until(lambda: (output.clock or 0) >= 110_000 - 2_000, what="first half")
        assert agg.stop() == 0
    first_session = output.announces[-1]["session"]
    announces = len(output.announces)
    with Proc(*agg_args(proxy_pub, agg_pub, port)) as agg:
        agg.wait_for("ready:")
        output.pump_until(
            lambda: output.announces[-1]["session"] != first_session, what="the new agg's announce"
        )
        second_session = output.announces[-1]["session"]
        fake.probe(output, 0)
        fake.publish(second)
        fake.clock(140_000)
        output.pump_until(lambda: (output.clock or 0) >= 140_000, what="second half")
        assert agg.stop() == 0
    fake.close()
    assert output.by_session[first_session]  # the first agg published bars before it stopped
    assert len(output.announces) > announces
    assert isinstance(second_session, int)
    expected = reference_bars([*second, Clock(140_000)], INTERVALS, GRACE)
    assert_exact(output.by_session[second_session], expected.bars)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_outages_mark_bars_and_are_relayed_and_history_is_served(
    transport: str, tmp_path: Path, context: Context
) -> None:
    proxy_pub, agg_pub, port = agg_endpoints(transport, tmp_path)
    fake = FakeProxy(context, proxy_pub, session=5)
    symbols = ("--symbols", "AAPL,A,BRK.A")
    with serving_agg(context, proxy_pub, agg_pub, port, *symbols) as (agg, output):
        assert output.announces[0]["intervals"] == list(INTERVALS)
        assert output.announces[0]["symbols"] == ["AAPL", "A", "BRK.A"]
        fake.probe(output, 0)
        fake.trades("AAPL", (Trade(10_050, 5.0, 10), Trade(10_950, 6.0, 10)))
        fake.trades("AAPLX", (Trade(10_960, 9.0, 10),))  # not subscribed: filtered at the publisher
        fake.clock(10_960)
        fake.upstream(codec.UPSTREAM_DOWN, 10_960, 50_000)
        fake.upstream(codec.UPSTREAM_UP, 10_960, 12_030)
        fake.clock(12_050)  # the first clock past its start after the up ends the outage
        fake.trades("AAPL", (Trade(12_000, 7.0, 10), Trade(12_400, 8.0, 10)))
        fake.trades("A", (Trade(12_000, 1.5, 3, (37,)),))
        fake.probe(output, 20_000)
        assert output.upstream == [
            (codec.UPSTREAM_DOWN, 10_960, 50_000),
            (codec.UPSTREAM_UP, 10_960, 12_030),
        ]
        flags = {
            (k[1], b.s): b.flags for k, bars in output.bars.items() if k[0] == "AAPL" for b in bars
        }
        assert flags == {
            (100, 10_000): 0,
            (100, 10_900): codec.BAR_FLAG_OUTAGE,
            (100, 12_000): codec.BAR_FLAG_OUTAGE,
            (100, 12_400): 0,
            (250, 10_000): 0,
            (250, 10_750): codec.BAR_FLAG_OUTAGE,
            (250, 12_000): codec.BAR_FLAG_OUTAGE,
            (250, 12_250): 0,
            (1_000, 10_000): codec.BAR_FLAG_OUTAGE,
            (1_000, 12_000): codec.BAR_FLAG_OUTAGE,
        }
        assert not any(symbol == "AAPLX" for symbol, _ in output.bars)

        # history and symbols requests, from an XSUB as the bridge sends them
        ask = Requester(context, agg_pub).ask

        reply = ask(
            {
                "id": 1,
                "op": "bars",
                "channel": "100Ms.AAPL",
                "since": 10_900,
                "before": None,
                "limit": 600,
            }
        )
        request_id, status, bars = codec.records_from_history(reply)
        assert (request_id, status) == (1, codec.HistoryStatus.OK)
        assert [bar_from_record(b) for b in bars] == output.bars[("AAPL", 100)][1:]
        request_id, status, bars = codec.records_from_history(
            ask({"id": 2, "channel": "1000Ms.AAPL", "limit": 1})
        )
        assert (request_id, status, bars["s"].tolist()) == (2, codec.HistoryStatus.OK, [12_000])
        statuses = {
            channel: codec.records_from_history(ask({"id": 3, "channel": channel}))[1]
            for channel in ("500Ms.AAPL", "100Ms.TSLA", "100Ms.*", "nonsense", "100Ms.BRK.A")
        }
        assert statuses == {
            "500Ms.AAPL": codec.HistoryStatus.INTERVAL_NOT_SERVED,
            "100Ms.TSLA": codec.HistoryStatus.SYMBOL_NOT_SERVED,
            "100Ms.*": codec.HistoryStatus.BAD_REQUEST,
            "nonsense": codec.HistoryStatus.BAD_REQUEST,
            "100Ms.BRK.A": codec.HistoryStatus.OK,
        }
        symbols = codec.decode_json(ask({"id": 4, "op": "symbols"}))
        assert symbols == {"id": 4, "op": "symbols", "symbols": [["AAPL", 4], ["A", 1]]}
        assert agg.stop() == 0
    fake.close()


def test_agg_stops_on_sigterm_with_status_zero(tmp_path: Path) -> None:
    with Proc(
        *agg_args(endpoint("ipc", tmp_path, "p"), endpoint("ipc", tmp_path, "a"), free_port())
    ) as agg:
        agg.wait_for("ready:")
        started = time.monotonic()
        agg.popen.terminate()
        assert agg.wait(5) == 0
        assert time.monotonic() - started < 2


@pytest.mark.parametrize("role", ["agg", "proxy", "bridge"])
def test_sigterm_during_start_up_exits_0(role: str, tmp_path: Path) -> None:
    """Before a command is ready (imports, numba's cache, binding), SIGTERM still stops it
    with status 0."""
    trades, bars = endpoint("ipc", tmp_path, "p"), endpoint("ipc", tmp_path, "a")
    args = {
        "agg": ("agg", "--sub", trades, "--pub", bars),
        "proxy": ("proxy", "--upstream", "ws://127.0.0.1:9/", "--pub", trades),
        "bridge": ("bridge", "--sub", bars, "--listen", f"127.0.0.1:{free_port()}"),
    }[role]
    with Proc("--log-level", "debug", *args, env={"MASSIVE_API_KEY": "k"}) as proc:
        proc.wait_for(f"polyfan {role} starting")
        proc.popen.terminate()
        assert proc.wait(5) == 0


def test_a_taken_pub_address_is_a_clear_error_with_status_2(
    tmp_path: Path, context: Context
) -> None:
    taken = endpoint("tcp", tmp_path, "taken")
    holder = context.socket(zmq.PUB)
    holder.bind(taken)
    with Proc("agg", "--sub", endpoint("ipc", tmp_path, "p"), "--pub", taken) as agg:
        assert agg.wait(30) == 2
    assert f"--pub: cannot bind {taken}" in agg.output


# --- input bounds: a trade that would overflow a bar's sums ----------------------------------


def test_a_1e308_trade_is_rejected_by_the_proxy_and_the_bars_are_those_of_the_good_trades(
    tmp_path: Path, context: Context
) -> None:
    """sim -> proxy -> agg with trades beyond the bounds among good ones in the same bars: the
    bars are exactly the reference of the good trades alone (before, a 1e308 price gave
    ``vw: null`` and h = 1e308), and the proxy counts the rejected ones by reason."""
    base = int(time.time() * 1000)
    good: list[tuple[str, Trade]] = []
    frames: list[str] = []
    for step in range(40):
        symbol = ("AAPL", "TSLA")[step % 2]
        trade = Trade(base + 7 * step, round(100 + step * 0.01, 2), float(10 + step))
        good.append((symbol, trade))
        events: list[dict[str, object]] = [
            {"ev": "T", "sym": symbol, "p": trade.p, "s": int(trade.size), "t": trade.t}
        ]
        if step == 10:  # in AAPL's bars, between good trades
            events.append({"ev": "T", "sym": "AAPL", "p": 1e308, "s": 100, "t": trade.t})
        if step == 21:
            events.append({"ev": "T", "sym": "TSLA", "p": 100.0, "ds": "1e13", "t": trade.t})
            events.append({"ev": "T", "sym": "TSLA", "p": 2e9, "s": 1, "t": trade.t})
        frames.append(json.dumps(events))
    script = tmp_path / "script.txt"
    script.write_text("\n".join(frames) + "\n")
    last_t = good[-1][1].t
    sim_port, proxy_metrics = free_port(), free_port()
    proxy_pub, agg_pub, agg_metrics = agg_endpoints("ipc", tmp_path)
    with (
        Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub", proxy_pub,
            "--metrics", f"127.0.0.1:{proxy_metrics}", env={"MASSIVE_API_KEY": "test-key-123456"},
        ) as proxy,
        serving_agg(context, proxy_pub, agg_pub, agg_metrics) as (agg, output),
    ):  # fmt: skip
        proxy.wait_for("ready:")
        output.pump_until(lambda: output.clock is not None, what="agg relaying the proxy clock")
        with Proc("sim", "--listen", f"127.0.0.1:{sim_port}", "--script", str(script)) as sim:
            sim.wait_for("ready:")
            done_at = last_t + max(INTERVALS) + GRACE
            output.pump_until(
                lambda: (output.clock or 0) >= done_at, what="agg clock past the script"
            )
            assert sim.stop() == 0
        proxy_values, agg_values = scrape(proxy_metrics), scrape(agg_metrics)
        assert proxy.stop() == 0
        assert agg.stop() == 0
    # the reference: the good trades alone, in arrival order, closed by the last clock
    events: list[Clock | Trades] = [Trades(symbol, (trade,)) for symbol, trade in good]
    expected = reference_bars([*events, Clock(done_at)], INTERVALS, GRACE)
    assert expected.late == 0
    assert_exact(output.bars, expected.bars)
    assert all(b.vw is not None and b.h < 1e9 for bars in output.bars.values() for b in bars)
    assert proxy_values['polyfan_proxy_rejected_trades_total{reason="price"}'] == 2
    assert proxy_values['polyfan_proxy_rejected_trades_total{reason="size"}'] == 1
    assert proxy_values["polyfan_proxy_bad_messages_total"] == 3
    assert proxy_values["polyfan_proxy_trades_total"] == len(good)
    assert agg_values["polyfan_agg_trades_total"] == len(good)
    assert agg_values["polyfan_agg_bad_messages_total"] == 0


def test_the_agg_drops_trades_beyond_the_bounds_whoever_publishes_them(
    tmp_path: Path, context: Context
) -> None:
    """Defence in depth: a peer on the proxy's port publishing a 1e308 price, a huge size or a
    NaN straight onto the wire gets them counted as bad, and the bars hold only the rest."""
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    fake = FakeProxy(context, proxy_pub, session=9)
    kept = (Trade(10_000, 10.0, 100.0), Trade(10_040, 12.0, 300.0), Trade(10_090, 11.0, 1e12))
    sent = (
        kept[0],
        Trade(10_010, 1e308, 100.0),
        Trade(10_020, 10.0, 1e300),
        kept[1],
        Trade(10_050, float("nan"), 1.0),
        Trade(10_060, 10.0, float("inf")),
        kept[2],
    )
    with serving_agg(context, proxy_pub, agg_pub, port) as (agg, output):
        fake.probe(output, 0)
        fake.trades("AAPL", sent)
        fake.probe(output, 20_000)
        values = scrape(port)
        assert agg.stop() == 0
    fake.close()
    expected = reference_bars([Trades("AAPL", kept), Clock(20_000)], INTERVALS, GRACE)
    assert_exact(output.bars, expected.bars)
    assert output.bars[("AAPL", 1_000)][0].vw == pytest.approx(
        (10.0 * 100 + 12.0 * 300 + 11.0 * 1e12) / (100 + 300 + 1e12), rel=1e-12
    )
    assert values["polyfan_agg_trades_total"] == len(kept)
    assert values["polyfan_agg_bad_messages_total"] == len(sent) - len(kept)
