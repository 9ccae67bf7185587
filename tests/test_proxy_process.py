"""The proxy as a user runs it: ``polyfan sim`` and ``polyfan proxy`` subprocesses, a SUB here."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import zmq

from polyfan.sim import read_record
from polyfan.wire import codec
from procs import Proc, endpoint, free_port, scrape

KEY = "test-key-0123456789-WXYZ"
TIMEOUT = 15.0


class Subscriber:
    """A SUB socket that collects what it receives, every receive bounded by a deadline."""

    def __init__(self, context: zmq.Context[Any], address: str, *prefixes: str) -> None:
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RCVHWM, 1_000_000)
        self.socket.connect(address)
        for prefix in prefixes:
            self.socket.setsockopt(zmq.SUBSCRIBE, codec.subscription_prefix(prefix))
        self.messages: list[codec.Message] = []

    def receive_until(self, done: Callable[[Subscriber], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not done(self):
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"timed out; received {len(self.messages)} messages"
            if self.socket.poll(int(min(remaining, 0.2) * 1000)):
                self.messages.append(codec.decode(self.socket.recv()))

    def of_kind(self, kind: codec.Kind) -> list[codec.Message]:
        return [m for m in self.messages if m.kind is kind]

    def trade_count(self) -> int:
        return sum(m.count for m in self.of_kind(codec.Kind.TRADES))

    def close(self) -> None:
        self.socket.close(0)


Subscribe = Callable[..., Subscriber]


@pytest.fixture
def subscriber() -> Iterator[Subscribe]:
    """Make SUB sockets (``subscriber(address, *prefixes)``), all closed at teardown."""
    context: zmq.Context[Any] = zmq.Context()
    made: list[Subscriber] = []

    def make(address: str, *prefixes: str) -> Subscriber:
        made.append(Subscriber(context, address, *prefixes))
        return made[-1]

    yield make
    for sub in made:
        sub.close()
    context.term()


def expected_records(events: list[dict[str, Any]]) -> np.ndarray:
    """What the proxy must publish for valid events, built independently of feed.py."""
    records = np.zeros(len(events), codec.TRADE_DTYPE)
    for i, e in enumerate(events):
        codes = e.get("c") or []
        size = float(e["ds"]) if "ds" in e else float(e["s"])
        records[i] = (
            e["t"], e["p"], size, e.get("q", 0), e.get("trft", 0), e.get("trfi", 0),
            e.get("x", 0), e.get("z", 0), len(codes), [*codes, *[0] * (8 - len(codes))], [0, 0],
        )  # fmt: skip
    return records


def sent_trades(record: Path) -> dict[str, list[dict[str, Any]]]:
    """Every ``T`` event the sim sent, per symbol, in order (from ``--record``)."""
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for _, frame in read_record(record):
        try:
            events = orjson.loads(frame)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(events, list):
            continue
        for event in events:
            if isinstance(event, dict) and event.get("ev") == "T":
                by_symbol.setdefault(event["sym"], []).append(event)
    return by_symbol


def received_trades(sub: Subscriber) -> dict[str, list[codec.Message]]:
    by_topic: dict[str, list[codec.Message]] = {}
    for message in sub.of_kind(codec.Kind.TRADES):
        by_topic.setdefault(message.topic, []).append(message)
    return by_topic


def start_proxy(upstream: str, pub: str, metrics: int, *extra: str, key: str = KEY) -> Proc:
    proc = Proc(
        "proxy", "--upstream", upstream, "--pub", pub, "--metrics", f"127.0.0.1:{metrics}",
        *extra, env={"MASSIVE_API_KEY": key},
    )  # fmt: skip
    proc.wait_for("ready:")
    return proc


def joined(sub: Subscriber) -> bool:
    """The SUB's subscriptions are live once the proxy's clock (published 10x/s) arrives."""
    return bool(sub.of_kind(codec.Kind.CLOCK))


def stop(proc: Proc) -> None:
    started = time.monotonic()
    assert proc.stop() == 0, proc.output
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_subscribers_receive_exactly_the_trades_the_sim_sent(
    transport: str, tmp_path: Path, subscriber: Subscribe
) -> None:
    port, metrics = free_port(), free_port()
    pub = endpoint(transport, tmp_path, "proxy")
    record = tmp_path / "sent.jsonl"
    # The proxy starts first (retrying the sim's port) so both SUBs have joined before any trade.
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        everything = subscriber(pub, "T.", "_ctl")
        only_a = subscriber(pub, "T.A", "_ctl")
        everything.receive_until(joined)
        only_a.receive_until(joined)
        with Proc(
            "sim", "--listen", f"127.0.0.1:{port}", "--symbols", "A,AA,AAPL,BRK.A,TSLA,MSFT",
            "--rate", "4000", "--seed", "11", "--record", str(record),
        ) as sim:  # fmt: skip
            sim.wait_for("ready:")
            everything.receive_until(lambda s: s.trade_count() >= 4000)
            stop(sim)
        sent = sent_trades(record)
        total = sum(len(events) for events in sent.values())
        everything.receive_until(lambda s: s.trade_count() >= total)
        everything.receive_until(lambda s: s.messages[-1].kind is codec.Kind.CLOCK)
        only_a.receive_until(lambda s: s.trade_count() >= len(sent["A"]))
        assert scrape(metrics)["polyfan_proxy_trades_total"] == total
        stop(proxy)

    received = received_trades(everything)
    assert set(received) == {f"T.{symbol}" for symbol in sent}
    sessions = {m.session for m in everything.messages}
    assert len(sessions) == 1
    for symbol, events in sent.items():
        messages = received[f"T.{symbol}"]
        assert [m.seq for m in messages] == list(range(1, len(messages) + 1))
        got = np.concatenate([codec.records(m) for m in messages])
        assert got.tobytes() == expected_records(events).tobytes(), symbol
    # T.A never receives T.AAPL (nor T.AA): filtered at the publisher by the terminated topic.
    assert {m.topic for m in only_a.of_kind(codec.Kind.TRADES)} == {"T.A"}
    a_records = np.concatenate([codec.records(m) for m in only_a.of_kind(codec.Kind.TRADES)])
    assert a_records.tobytes() == expected_records(sent["A"]).tobytes()
    # every trade message is followed by a clock at least as late as its trades
    pending = 0
    for message in everything.messages:
        if message.kind is codec.Kind.TRADES:
            pending = max(pending, int(codec.records(message)["t"].max()))
        elif message.kind is codec.Kind.CLOCK and pending:
            assert codec.records(message)["clock"][0] >= pending
            pending = 0
    assert pending == 0


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_proxy_reconnects_resubscribes_and_carries_on_after_the_sim_drops_it(
    transport: str, tmp_path: Path, subscriber: Subscribe
) -> None:
    port, metrics = free_port(), free_port()
    pub = endpoint(transport, tmp_path, "proxy")
    with Proc(
        "sim", "--listen", f"127.0.0.1:{port}", "--symbols", "20", "--rate", "2000", "--seed", "3"
    ) as sim:  # fmt: skip
        sim.wait_for("ready:")
        with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
            sub = subscriber(pub, "")
            sub.receive_until(lambda s: s.trade_count() >= 500)
            assert scrape(metrics)["polyfan_proxy_reconnects_total"] == 0
            sim.popen.send_signal(signal.SIGUSR1)

            def upstream(state: int) -> Callable[[Subscriber], bool]:
                return lambda s: any(
                    codec.records(m)["state"][0] == state for m in s.of_kind(codec.Kind.UPSTREAM)
                )

            sub.receive_until(upstream(codec.UPSTREAM_DOWN))
            sub.receive_until(upstream(codec.UPSTREAM_UP))
            before = sub.trade_count()
            sub.receive_until(lambda s: s.trade_count() >= before + 500)
            values = scrape(metrics)
            assert values["polyfan_proxy_reconnects_total"] == 1
            assert values['polyfan_proxy_statuses_total{status="auth_success"}'] == 2
            assert values['polyfan_proxy_statuses_total{status="success"}'] == 2
            assert values["polyfan_proxy_upstream_connected"] == 1
            proxy.wait_for("reconnecting in")
            stop(proxy)
        stop(sim)
    # one session throughout: per-topic sequence numbers stay contiguous across the reconnect
    assert len({m.session for m in sub.messages}) == 1
    for messages in received_trades(sub).values():
        seqs = [m.seq for m in messages]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    # down is published after the last trade of the lost connection, up before the first new
    # one: trades before the down, none between it and the up, trades after the up
    states = [
        (index, int(codec.records(m)["state"][0]))
        for index, m in enumerate(sub.messages)
        if m.kind is codec.Kind.UPSTREAM
    ]
    down = next(index for index, state in states if state == codec.UPSTREAM_DOWN)
    up = next(index for index, state in states if index > down and state == codec.UPSTREAM_UP)
    kinds = [m.kind for m in sub.messages]
    assert codec.Kind.TRADES in kinds[:down]
    assert codec.Kind.TRADES not in kinds[down:up]
    assert codec.Kind.TRADES in kinds[up:]


def test_a_wrong_key_exits_2_after_one_attempt_without_printing_the_key(tmp_path: Path) -> None:
    port = free_port()
    with Proc("sim", "--listen", f"127.0.0.1:{port}", "--api-key", "the-right-one") as sim:
        sim.wait_for("ready:")
        with Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{port}/stocks",
            "--pub", endpoint("ipc", tmp_path, "proxy"),
            env={"MASSIVE_API_KEY": KEY, "POLYFAN_LOG": "debug"},
        ) as proxy:  # fmt: skip
            assert proxy.wait(TIMEOUT) == 2
        stop(sim)
    assert KEY not in proxy.output
    assert KEY[-4:] in proxy.output  # masked: ****WXYZ
    assert "refused the API key" in proxy.output
    assert proxy.output.count("connected to ws://") == 1
    assert "reconnecting" not in proxy.output


def test_garbage_frames_are_counted_and_every_valid_trade_still_arrives(
    tmp_path: Path, subscriber: Subscribe
) -> None:
    now = int(time.time() * 1000)
    valid = [
        {"ev": "T", "sym": "AAPL", "p": 190.01, "s": 100, "t": now, "q": 1},
        {"ev": "T", "sym": "A", "p": 9.5, "ds": "0.5", "t": now + 1, "c": [37], "q": 2},
        {"ev": "T", "sym": "BRK.A", "p": 600000.0, "s": 1, "t": now + 2, "c": [14], "q": 3},
        {"ev": "T", "sym": "AAPL", "p": 190.02, "s": 300, "t": now + 3, "q": 4, "x": 4},
    ]
    script = [
        orjson.dumps(valid[:1]).decode(),
        "this is not json",
        '{"ev": "T"}',
        "[1, 2, 3]",
        orjson.dumps(
            [{"ev": "T", "sym": "AAPL", "p": -1, "s": 1, "t": now}, valid[1], {"ev": "NOI"}]
        ).decode(),
        orjson.dumps([{"ev": "T", "sym": "BAD SYM", "p": 1, "s": 1, "t": now}]).decode(),
        orjson.dumps([{"ev": "T", "sym": "AAPL", "p": 1, "s": 1, "t": now + 600_000}]).decode(),
        orjson.dumps(valid[2:]).decode(),
    ]
    path = tmp_path / "script.txt"
    path.write_text("\n".join(script) + "\n")
    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        sub = subscriber(pub, "T.", "_ctl")
        sub.receive_until(joined)
        with Proc("sim", "--listen", f"127.0.0.1:{port}", "--script", str(path)) as sim:
            sim.wait_for("ready:")
            sub.receive_until(lambda s: s.trade_count() >= len(valid))
            values = scrape(metrics)
            stop(sim)
        proxy.wait_for("skipped malformed upstream input")
        stop(proxy)
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for event in valid:
        by_symbol.setdefault(event["sym"], []).append(event)
    received = received_trades(sub)
    assert set(received) == {f"T.{symbol}" for symbol in by_symbol}
    for symbol, events in by_symbol.items():
        got = np.concatenate([codec.records(m) for m in received[f"T.{symbol}"]])
        assert got.tobytes() == expected_records(events).tobytes()
    # not JSON, not an array, elements not objects (x3), bad price, bad symbol, future
    assert values["polyfan_proxy_bad_messages_total"] == 8
    assert values['polyfan_proxy_rejected_trades_total{reason="price"}'] == 1
    assert values['polyfan_proxy_rejected_trades_total{reason="symbol"}'] == 1
    assert values["polyfan_proxy_future_trades_total"] == 1
    assert values["polyfan_proxy_unknown_events_total"] == 1
    assert values["polyfan_proxy_trades_total"] == len(valid)


def test_max_connections_cools_down_a_minute_and_ctrl_c_still_stops_at_once(
    tmp_path: Path, subscriber: Subscribe
) -> None:
    now = int(time.time() * 1000)
    script = tmp_path / "script.txt"
    script.write_text(
        orjson.dumps([{"ev": "T", "sym": "AAPL", "p": 1.5, "s": 100, "t": now}]).decode()
        + "\n"
        + orjson.dumps(
            [{"ev": "status", "status": "max_connections", "message": "Maximum number of "
              "websocket connections exceeded."}]
        ).decode()
        + "\n"
    )  # fmt: skip
    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        sub = subscriber(pub, "_ctl")
        sub.receive_until(joined)
        with Proc("sim", "--listen", f"127.0.0.1:{port}", "--script", str(script)) as sim:
            sim.wait_for("ready:")
            sub.receive_until(
                lambda s: any(
                    codec.records(m)["state"][0] == codec.UPSTREAM_DOWN
                    for m in s.of_kind(codec.Kind.UPSTREAM)
                )
            )
            match = proxy.wait_for(r"cooling down (\d+) s before reconnecting")
            assert int(match.group(1)) >= 60
            assert "ANOTHER PROCESS IS USING THIS API KEY" in proxy.output
            assert scrape(metrics)['polyfan_proxy_statuses_total{status="max_connections"}'] == 1
            stop(proxy)  # within 2 s, in the middle of the cool-down
            stop(sim)
    assert proxy.output.count("connected to ws://") == 1


def test_feed_clock_follows_wall_time_when_quiet_and_freezes_while_disconnected(
    tmp_path: Path, subscriber: Subscribe
) -> None:
    t = int(time.time() * 1000)
    script = tmp_path / "script.txt"
    script.write_text(
        orjson.dumps([{"ev": "T", "sym": "A", "p": 1.5, "s": 100, "t": t}]).decode() + "\n"
    )
    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        sub = subscriber(pub, "_ctl")
        sub.receive_until(joined)

        def clocks() -> list[tuple[int, int]]:
            return [
                tuple(codec.records(m)[0].tolist())  # type: ignore[misc]
                for m in sub.of_kind(codec.Kind.CLOCK)
            ]

        with Proc("sim", "--listen", f"127.0.0.1:{port}", "--script", str(script)) as sim:
            sim.wait_for("ready:")
            sub.receive_until(lambda s: any(clock == t for clock, _ in clocks()))
            # quiet for more than a second: the clock follows the wall clock, 1 s behind
            sub.receive_until(lambda s: any(clock > t + 300 for clock, _ in clocks()))
            advancing = [(clock, wall) for clock, wall in clocks() if clock > t]
            assert all(clock <= wall - 1_000 for clock, wall in advancing)
            first_clock, first_wall = advancing[0]
            assert all(c - first_clock == w - first_wall for c, w in advancing)
            stop(sim)
        sub.receive_until(lambda s: bool(s.of_kind(codec.Kind.UPSTREAM)[1:]))  # up, then down
        down = sub.of_kind(codec.Kind.UPSTREAM)[-1]
        state, frozen, _ = codec.records(down)[0].tolist()
        assert state == codec.UPSTREAM_DOWN
        seen = len(sub.messages)
        sub.receive_until(
            lambda s: len([m for m in s.messages[seen:] if m.kind is codec.Kind.CLOCK]) >= 5
        )
        after = [
            codec.records(m)["clock"][0] for m in sub.messages[seen:] if m.kind is codec.Kind.CLOCK
        ]
        assert after == [frozen] * len(after)
        stop(proxy)


def test_two_proxies_on_one_key_do_not_evict_each_other_forever(
    tmp_path: Path, subscriber: Subscribe
) -> None:
    port = free_port()
    upstream = f"ws://127.0.0.1:{port}/stocks"
    with Proc("sim", "--listen", f"127.0.0.1:{port}", "--symbols", "10", "--rate", "1000") as sim:
        sim.wait_for("ready:")
        first_pub, second_pub = (endpoint("ipc", tmp_path, n) for n in ("first", "second"))
        with start_proxy(upstream, first_pub, free_port()) as first:
            first.wait_for("subscribed to: T.")
            with start_proxy(upstream, second_pub, free_port()) as second:
                sub = subscriber(second_pub, "T.")
                match = first.wait_for(r"cooling down (\d+) s before reconnecting")
                assert int(match.group(1)) >= 60
                sub.receive_until(lambda s: s.trade_count() >= 200)  # the newer one streams on
                assert "cooling down" not in second.output
                stop(second)
            stop(first)
        stop(sim)


def test_credentials_in_the_upstream_url_never_reach_the_output(
    tmp_path: Path, subscriber: Subscribe
) -> None:
    """At debug level, through a refused port, a live connection and a dropped one."""
    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    url = f"ws://user:secretpass@127.0.0.1:{port}/stocks?apiKey=SECRETKEY&x=1"
    masked = f"ws://user:****@127.0.0.1:{port}/stocks?apiKey=****&x=1"
    with Proc(
        "proxy", "--upstream", url, "--pub", pub, "--metrics", f"127.0.0.1:{metrics}",
        env={"MASSIVE_API_KEY": KEY, "POLYFAN_LOG": "debug"},
    ) as proxy:  # fmt: skip
        proxy.wait_for("ready:")
        proxy.wait_for("cannot connect to ")  # nothing listens on the port yet
        sub = subscriber(pub, "T.", "_ctl")
        sub.receive_until(joined)
        with Proc("sim", "--listen", f"127.0.0.1:{port}", "--rate", "500", "--seed", "3") as sim:
            sim.wait_for("ready:")
            sub.receive_until(lambda s: s.trade_count() >= 50)  # the right URL still connects
            lines = len(proxy.lines)
            sim.popen.send_signal(signal.SIGUSR1)  # drop it: the lost-connection path
            proxy.wait_for("upstream connection lost", start=lines)
            proxy.wait_for("connected to ", start=lines)
            assert scrape(metrics)["polyfan_proxy_reconnects_total"] >= 1
            stop(sim)
        stop(proxy)
    output = proxy.output
    assert "secretpass" not in output and "SECRETKEY" not in output
    assert f"cannot connect to {masked}" in output
    assert f"connected to {masked}" in output
    assert f"connecting to {masked}, subscribing T.*" in output  # the ready: line, intact
    assert "DEBUG" in output  # debug logging was on


def test_credentials_in_an_invalid_upstream_url_never_reach_the_error(tmp_path: Path) -> None:
    """The refusal (and the debug traceback with the library's own exception) stays masked."""
    with Proc(
        "proxy", "--upstream", "http://user:secretpass@127.0.0.1:1/stocks?apiKey=SECRETKEY",
        "--pub", endpoint("ipc", tmp_path, "proxy"),
        env={"MASSIVE_API_KEY": KEY, "POLYFAN_LOG": "debug"},
    ) as proxy:  # fmt: skip
        status = proxy.wait(TIMEOUT)
    output = proxy.output
    assert status != 0
    assert "Traceback" in output  # the debug traceback, with the chained exception, was shown
    assert "secretpass" not in output and "SECRETKEY" not in output
    assert "http://user:****@127.0.0.1:1/stocks?apiKey=****" in output
