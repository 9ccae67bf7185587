"""``polyfan.client`` over real sockets: ``bars()`` against a bridge that restarts under it,
``history()`` paging ``/api/bars``, ``trade_batches()`` against a real ``polyfan proxy`` fed by
``polyfan sim --record`` (exact trades sent), and the losses sequence numbers show."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import zmq
import zmq.auth

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan import client
from polyfan.backoff import Backoff
from polyfan.bridge import Bridge
from polyfan.config import BridgeConfig
from polyfan.errors import AuthenticationError, BridgeError
from polyfan.wire import codec
from procs import Proc, endpoint, free_port
from test_bridge_protocol import start_bridge
from test_proxy_process import expected_records, sent_trades, start_proxy
from wsclient import eventually

T0 = 1_781_622_376_000 // 1000 * 1000
TOKEN = "secret"
FAST = {"initial": 0.05, "cap": 0.4, "healthy_after": 3600.0}


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


@pytest.fixture
async def bridge(agg: FakeAgg) -> AsyncIterator[Bridge]:
    bridge = await start_bridge(agg, (TOKEN,))
    yield bridge
    await bridge.stop()


def url(bridge: Bridge) -> str:
    return f"ws://127.0.0.1:{bridge.port}/stocks"


def expected(symbol: str, interval: int, rows: np.ndarray) -> list[dict[str, Any]]:
    return [expected_event(symbol, interval, row) for row in rows]


class Consumer:
    """Runs ``async for event in stream`` on a task, keeping every event."""

    def __init__(self, stream: client.BarStream) -> None:
        self.stream = stream
        self.events: list[dict[str, Any]] = []
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        async for event in self.stream:
            self.events.append(event)

    @property
    def bars(self) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == "MB"]

    def statuses(self, kind: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e["ev"] == "status" and e["status"] == kind]

    async def close(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        await self.stream.aclose()


# --- bars(): reconnects ------------------------------------------------------------------------


def start_bridge_process(agg: FakeAgg, port: int) -> Proc:
    proc = Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", "--token", TOKEN)
    proc.wait_for("ready:")
    return proc


async def test_bars_go_on_across_bridge_restarts_with_no_bar_missing_or_repeated(
    agg: FakeAgg,
) -> None:
    """The bridge, a real ``polyfan bridge`` process, is stopped with Ctrl-C and killed with
    SIGKILL under a running consumer of two channels while bars keep being published."""
    channels = {"100Ms.TSLA": (100, "TSLA"), "250Ms.AAPL": (250, "AAPL")}
    published: dict[str, list[np.ndarray]] = {name: [] for name in channels}

    def publish_one() -> None:
        for name, (interval, symbol) in channels.items():
            k = len(published[name])
            rows = bar_rows(interval, T0 + k * interval, 1, price=100 + k * 0.5)
            agg.publish(interval, symbol, rows)
            published[name].append(rows)

    for _ in range(30):  # history from before the consumer started
        publish_one()
    port = free_port()
    bridge = await asyncio.to_thread(start_bridge_process, agg, port)
    stream = client.bars(
        f"ws://127.0.0.1:{port}/stocks",
        list(channels),
        since=T0,
        token=TOKEN,
        statuses=True,
        backoff=Backoff(**FAST),
    )
    consumer = Consumer(stream)
    publishing = True

    async def produce() -> None:
        while publishing:
            publish_one()
            await asyncio.sleep(0.005)  # the stream's pace, about 400 bars/s

    producer = asyncio.create_task(produce())
    try:
        await eventually(lambda: len(consumer.bars) >= 200, timeout=30, what="first bars")
        for restart, how in enumerate(("ctrl-c", "sigkill"), start=1):
            before = len(consumer.bars)
            if how == "ctrl-c":
                assert await asyncio.to_thread(bridge.stop) == 0
            else:
                bridge.popen.kill()
                await asyncio.to_thread(bridge.wait)
            bridge = await asyncio.to_thread(start_bridge_process, agg, port)
            await eventually(
                lambda: stream.reconnects >= restart and len(consumer.bars) > before + 200,  # noqa: B023
                timeout=30,
                what=f"bars after restart {restart}",
            )
        publishing = False
        await producer
        total = sum(len(rows) for rows in published.values())
        with contextlib.suppress(AssertionError):  # compared below, where a miss shows
            await eventually(lambda: len(consumer.bars) >= total, timeout=20, what="every bar")
    finally:
        publishing = False
        await asyncio.gather(producer, return_exceptions=True)
        await consumer.close()
        await asyncio.to_thread(bridge.stop)

    for name, (interval, symbol) in channels.items():
        got = [b for b in consumer.bars if b["sym"] == symbol]
        assert got == expected(symbol, interval, np.concatenate(published[name])), name
    assert len(consumer.bars) == total
    assert stream.reconnects >= 2
    assert len(consumer.statuses("reconnecting")) == stream.reconnects
    assert stream.gaps == []
    assert consumer.statuses("gap") == []
    assert stream.dropped == 0  # the bridge sent nothing twice either: each since was exact


async def test_a_wrong_token_raises_at_once_and_is_not_retried(bridge: Bridge) -> None:
    stream = client.bars(url(bridge), "100Ms.TSLA", token="wrong", backoff=Backoff(**FAST))
    started = time.monotonic()
    with pytest.raises(AuthenticationError, match="the bridge refused the token"):
        async for _ in stream:
            pass
    assert time.monotonic() - started < 5
    assert stream.reconnects == 0
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        await asyncio.to_thread(client.history, url(bridge), "100Ms.TSLA", T0, T0 + 1000)


async def test_a_refused_channel_is_retried_until_the_bridge_serves_it() -> None:
    """A channel the bridge cannot serve yet (no aggregator heard) is asked again after a
    reconnect, resuming with since: the bars stored meanwhile are not skipped."""
    address = f"tcp://127.0.0.1:{free_port()}"
    bridge = Bridge(BridgeConfig(sub=(address,), listen=("127.0.0.1", 0), tokens=(TOKEN,)))
    await bridge.start()
    stream = client.bars(
        url(bridge), "100Ms.TSLA", since=T0, token=TOKEN, statuses=True, backoff=Backoff(**FAST)
    )
    consumer = Consumer(stream)
    try:
        await eventually(lambda: consumer.statuses("reconnecting"), timeout=10)
        refusal = consumer.statuses("error")[0]["message"]
        assert refusal == "100Ms.TSLA: no aggregator is connected yet; try again shortly"
        with FakeAgg(address) as agg:  # the aggregator comes up only now
            rows = bar_rows(100, T0, 20)
            agg.publish(100, "TSLA", rows)
            await eventually(lambda: len(consumer.bars) >= 20, timeout=15)
            await asyncio.to_thread(agg.wait_subscribed, b"100Ms.TSLA\x00")
            more = bar_rows(100, T0 + 2000, 5)
            agg.publish(100, "TSLA", more)
            await eventually(lambda: len(consumer.bars) >= 25, timeout=10)
            await consumer.close()
    finally:
        await consumer.close()
        await bridge.stop()
    assert consumer.bars == expected("TSLA", 100, np.concatenate([rows, more]))
    assert stream.gaps == []


async def test_a_since_past_the_bridges_bound_is_filled_from_the_http_api(agg: FakeAgg) -> None:
    bridge = await start_bridge(agg, (TOKEN,), since_max_bars=40)
    try:
        rows = bar_rows(100, T0, 250)
        agg.publish(100, "TSLA", rows)
        agg.flush()
        stream = client.bars(url(bridge), "100Ms.TSLA", since=T0 + 1000, token=TOKEN, statuses=True)
        consumer = Consumer(stream)
        try:
            await eventually(lambda: len(consumer.bars) >= 240, timeout=15)
            live = bar_rows(100, T0 + 25_000, 5)
            agg.publish(100, "TSLA", live)
            await eventually(lambda: len(consumer.bars) >= 245, timeout=10)
        finally:
            await consumer.close()
        assert consumer.bars == expected("TSLA", 100, np.concatenate([rows[10:], live]))
        cut = consumer.statuses("error")
        assert len(cut) == 1
        assert "since reaches past the 40 most recent bars" in cut[0]["message"]
        assert stream.gaps == [] and stream.reconnects == 0
    finally:
        await bridge.stop()


async def test_without_backfill_the_cut_is_reported_as_a_gap(agg: FakeAgg) -> None:
    bridge = await start_bridge(agg, (TOKEN,), since_max_bars=40)
    try:
        rows = bar_rows(100, T0, 250)
        agg.publish(100, "TSLA", rows)
        agg.flush()
        stream = client.bars(
            url(bridge), "100Ms.TSLA", since=T0, token=TOKEN, statuses=True, backfill=False
        )
        consumer = Consumer(stream)
        try:
            await eventually(lambda: len(consumer.bars) >= 40, timeout=15)
        finally:
            await consumer.close()
        assert consumer.bars == expected("TSLA", 100, rows[-40:])
        first = T0 + 210 * 100
        assert [(g.channel, g.start, g.end) for g in stream.gaps] == [("100Ms.TSLA", T0, first)]
        (gap,) = consumer.statuses("gap")
        assert (gap["channel"], gap["s"], gap["e"]) == ("100Ms.TSLA", T0, first)
        # the gap is said before the first bar after it
        assert consumer.events.index(gap) < consumer.events.index(consumer.bars[0])
    finally:
        await bridge.stop()


async def test_feed_statuses_are_yielded_in_order_with_the_bars(
    bridge: Bridge, agg: FakeAgg
) -> None:
    stream = client.bars(url(bridge), "100Ms.TSLA", token=TOKEN, statuses=True)
    consumer = Consumer(stream)
    try:
        await asyncio.to_thread(agg.wait_subscribed, b"100Ms.TSLA\x00")
        rows = bar_rows(100, T0, 3)
        agg.publish(100, "TSLA", rows)
        await eventually(lambda: len(consumer.bars) == 3)
    finally:
        await consumer.close()
    assert [e.get("status") for e in consumer.events if e["ev"] == "status"] == [
        "connected",
        "auth_success",
        "success",
    ]
    assert consumer.bars == expected("TSLA", 100, rows)


def test_bad_arguments_are_refused_naming_them() -> None:
    with pytest.raises(ValueError, match="TSLA: not a channel"):
        client.bars("ws://127.0.0.1:1", "TSLA")
    with pytest.raises(ValueError, match="since: \\* channels take no since"):
        client.bars("ws://127.0.0.1:1", "100Ms.*", since=T0)
    with pytest.raises(ValueError, match="url: 'ftp://x' is not"):
        client.bars("ftp://x", "100Ms.TSLA")
    with pytest.raises(ValueError, match="history is per symbol"):
        client.history("http://127.0.0.1:1", "100Ms.*", T0, T0 + 1)
    with pytest.raises(ValueError, match=r"start: .* is not before end"):
        client.history("http://127.0.0.1:1", "100Ms.TSLA", T0, T0)
    with pytest.raises(ValueError, match="timezone-aware"):
        client.history("http://127.0.0.1:1", "100Ms.TSLA", pd.Timestamp(0).to_pydatetime(), T0)
    with pytest.raises(ValueError, match="symbols: 'T\\$LA' is not a symbol"):
        client.trade_batches("tcp://127.0.0.1:1", "T$LA")
    with pytest.raises(ValueError, match="give both"):
        client.trade_batches("tcp://127.0.0.1:1", "TSLA", curve_secret="x")
    with pytest.raises(ValueError, match=r"endpoint: cannot connect to 127\.0\.0\.1:8767"):
        client.trade_batches("127.0.0.1:8767", "TSLA")


# --- history(): a DataFrame ------------------------------------------------------------------


def frame_of_rows(symbol: str, interval: int, rows: np.ndarray) -> pd.DataFrame:
    """The DataFrame history() must return, straight from the agg's records (not via JSON)."""
    count = len(rows)
    return pd.DataFrame(
        {
            "sym": pd.array([symbol] * count, dtype="string"),
            "interval": np.full(count, interval, dtype=np.int64),
            "o": rows["o"],
            "h": rows["h"],
            "l": rows["l"],
            "c": rows["c"],
            "v": rows["v"],
            "vw": rows["vw"],
            "n": rows["n"].astype(np.int64),
            "s": rows["s"],
            "e": rows["s"] + interval,
            "outage": (rows["flags"] & codec.BAR_FLAG_OUTAGE).astype(bool),
            "r": np.zeros(count, dtype=np.int64),
        }
    )


async def test_history_is_the_stored_bars_across_the_apis_page_size(
    bridge: Bridge, agg: FakeAgg
) -> None:
    rows = bar_rows(100, T0, 25_000)
    rows["flags"][::97] = codec.BAR_FLAG_OUTAGE
    rows["v"][5], rows["vw"][5] = 0.0, np.nan  # a volume-only bar's vw is null
    rows["v"][7] = 12.5  # fractional shares
    agg.publish(100, "TSLA", rows)
    agg.flush()
    start, end = T0 + 123 * 100, T0 + 24_000 * 100
    frame = await asyncio.to_thread(
        client.history, url(bridge), "100Ms.TSLA", start, end, token=TOKEN
    )
    want = rows[(rows["s"] >= start) & (rows["s"] < end)]
    assert len(want) == 23_877  # three pages of the API's 10,000
    pd.testing.assert_frame_equal(frame, frame_of_rows("TSLA", 100, want))
    asked = [r for r in agg.requests if r.get("channel") == "100Ms.TSLA"]
    assert [(r["since"], r["before"], r["limit"]) for r in asked] == [
        (start, end, 10_000),
        (start, int(want["s"][-10_000]), 10_000),
        (start, int(want["s"][-20_000]), 10_000),
    ]
    # datetimes for the bounds, a small page size, and a range with nothing stored
    frame = await asyncio.to_thread(
        client.history,
        f"http://127.0.0.1:{bridge.port}",
        "100Ms.TSLA",
        pd.Timestamp(T0, unit="ms", tz="UTC"),
        pd.Timestamp(T0 + 1000, unit="ms", tz="UTC").to_pydatetime(),
        token=TOKEN,
        page_size=3,
    )
    pd.testing.assert_frame_equal(frame, frame_of_rows("TSLA", 100, rows[:10]))
    empty = await asyncio.to_thread(
        client.history, url(bridge), "100Ms.TSLA", T0 - 10_000, T0, token=TOKEN
    )
    pd.testing.assert_frame_equal(empty, frame_of_rows("TSLA", 100, rows[:0]))


async def test_history_of_a_channel_no_agg_serves_is_a_bridge_error(bridge: Bridge) -> None:
    with pytest.raises(BridgeError, match=r"HTTP 404: 700Ms\.TSLA: interval 700ms") as caught:
        await asyncio.to_thread(
            client.history, url(bridge), "700Ms.TSLA", T0, T0 + 1000, token=TOKEN
        )
    assert caught.value.status == 404
    with pytest.raises(BridgeError, match="no answer"):
        client.history(f"http://127.0.0.1:{free_port()}", "100Ms.TSLA", T0, T0 + 1, timeout=2)


def test_history_without_pandas_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match=r"pip install 'polyfan\[pandas\]'"):
        client.history("http://127.0.0.1:1", "100Ms.TSLA", T0, T0 + 1)


# --- trade_batches(): the proxy's ZeroMQ feed ----------------------------------------------------


class Collector(threading.Thread):
    """Iterates a TradeBatches on its own thread, keeping copies of what it yields."""

    def __init__(self, feed: client.TradeBatches) -> None:
        super().__init__(daemon=True)
        self.feed = feed
        self.items: list[tuple[str, np.ndarray]] = []
        self.start()

    def run(self) -> None:
        for symbol, batch in self.feed:
            self.items.append((symbol, batch.copy()))

    def count(self) -> int:
        return sum(len(batch) for _, batch in list(self.items))

    def of(self, symbol: str) -> np.ndarray:
        return np.concatenate(
            [b for s, b in self.items if s == symbol] or [np.zeros(0, codec.TRADE_DTYPE)]
        )

    def wait(self, done: Any, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not done():
            assert time.monotonic() < deadline, f"timed out with {self.count()} trades"
            time.sleep(0.01)

    def stop(self) -> None:
        self.feed.close()
        self.join(2)
        assert not self.is_alive(), "close() did not end the iteration"


def run_sim(port: int, record: Path, until: Any) -> None:
    with Proc(
        "sim", "--listen", f"127.0.0.1:{port}", "--symbols", "A,AA,AAPL,BRK.A,TSLA,MSFT",
        "--rate", "4000", "--seed", "11", "--record", str(record),
    ) as sim:  # fmt: skip
        sim.wait_for("ready:")
        until()
        assert sim.stop() == 0


def test_trade_batches_are_exactly_the_trades_the_sim_sent_for_those_symbols(
    tmp_path: Path,
) -> None:
    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    record = tmp_path / "sent.jsonl"
    chosen = ["A", "BRK.A", "TSLA"]
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        feed = client.trade_batches(pub, chosen)
        assert feed.wait_joined(15), "the proxy's control topic was not heard"
        collector = Collector(feed)
        try:
            run_sim(port, record, lambda: collector.wait(lambda: collector.count() >= 1000))
            sent = sent_trades(record)
            total = sum(len(sent[s]) for s in chosen)
            collector.wait(lambda: collector.count() >= total)
        finally:
            collector.stop()
        assert proxy.stop() == 0
    assert {s for s, _ in collector.items} == set(chosen)  # T.A never brings T.AA nor T.AAPL
    for symbol in chosen:
        got = collector.of(symbol)
        assert got.dtype == codec.TRADE_DTYPE
        assert got.tobytes() == expected_records(sent[symbol]).tobytes(), symbol
    assert collector.count() == total == feed.trades
    assert feed.lost == 0


def test_trade_batches_over_curve_with_the_proxys_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    keys, allow, other = tmp_path / "keys", tmp_path / "allow", tmp_path / "other"
    for name, where in (("proxy", keys), ("reader", keys), ("stranger", other)):
        with Proc("keys", name, "--dir", str(where)) as keys_proc:
            assert keys_proc.wait() == 0
    allow.mkdir()
    (allow / "reader.key").write_bytes((keys / "reader.key").read_bytes())
    port, metrics = free_port(), free_port()
    pub = endpoint("tcp", tmp_path, "proxy")
    record = tmp_path / "sent.jsonl"
    curve = ("--curve-secret", str(keys / "proxy.key_secret"), "--curve-allow", str(allow))
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics, *curve) as proxy:
        refused = client.trade_batches(
            pub,
            "TSLA",
            curve_secret=other / "stranger.key_secret",
            curve_server=keys / "proxy.key",
        )
        feed = client.trade_batches(
            pub, "TSLA", curve_secret=keys / "reader.key_secret", curve_server=keys / "proxy.key"
        )
        assert feed.wait_joined(15)
        collector = Collector(feed)
        try:
            run_sim(port, record, lambda: collector.wait(lambda: collector.count() >= 100))
            sent = sent_trades(record)
            collector.wait(lambda: collector.count() >= len(sent["TSLA"]))
            assert not refused.wait_joined(0.5)
            deadline = time.monotonic() + 10
            while "handshake with" not in caplog.text:
                assert time.monotonic() < deadline, "no ERROR about the refused handshake"
                time.sleep(0.05)
        finally:
            collector.stop()
            refused.close()
        assert proxy.stop() == 0
    assert collector.of("TSLA").tobytes() == expected_records(sent["TSLA"]).tobytes()
    assert refused.trades == 0
    assert any(
        r.levelno == logging.ERROR and "refused by the server" in r.getMessage()
        for r in caplog.records
    )
    for secret in (keys / "reader.key_secret", other / "stranger.key_secret"):
        assert zmq.auth.load_certificate(str(secret))[1].decode() not in caplog.text


class Publisher:
    """A bare PUB speaking the wire, for losses and restarts a real proxy would not show."""

    def __init__(self, address: str) -> None:
        self.context: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.socket = self.context.socket(zmq.PUB)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.bind(address)
        self.sequencer = codec.Sequencer(1)

    def clock(self) -> None:
        record = np.zeros(1, codec.CLOCK_DTYPE)
        self.socket.send(
            self.sequencer.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, record.tobytes())
        )

    def trades(self, symbol: str, t: int, count: int, skip: int = 0) -> np.ndarray:
        rows = np.zeros(count, codec.TRADE_DTYPE)
        rows["t"] = t + np.arange(count)
        rows["p"] = 10.25 + np.arange(count)
        rows["s"] = 100.0
        topic = codec.trade_topic(symbol)
        self.sequencer._last[topic] = self.sequencer._last.get(topic, 0) + skip
        self.socket.send(self.sequencer.encode(topic, codec.Kind.TRADES, count, rows.tobytes()))
        return rows

    def restart(self) -> None:
        self.sequencer = codec.Sequencer(2)

    def close(self) -> None:
        self.socket.close(0)
        self.context.term()


def joined(feed: client.TradeBatches, publisher: Publisher) -> None:
    deadline = time.monotonic() + 10
    while not feed.wait_joined(0.02):
        assert time.monotonic() < deadline, "never joined"
        publisher.clock()


def test_losses_that_sequence_numbers_show_are_counted_and_a_restart_is_not_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    address = f"ipc://{tmp_path}/pub"
    publisher = Publisher(address)
    feed = client.trade_batches(address, ["A", "AAPL"])
    try:
        joined(feed, publisher)
        sent = [
            ("A", publisher.trades("A", 1000, 3)),
            ("AAPL", publisher.trades("AAPL", 1000, 2)),
            ("AA", publisher.trades("AA", 1000, 4)),  # not asked for
            ("A", publisher.trades("A", 2000, 1, skip=2)),  # two messages of T.A lost
            ("AAPL", publisher.trades("AAPL", 2000, 1, skip=5)),  # five of T.AAPL
        ]
        publisher.restart()  # a new session starts every topic over: not a loss
        sent.append(("A", publisher.trades("A", 3000, 2)))
        collector = Collector(feed)
        collector.wait(lambda: collector.count() >= 9)
        collector.stop()
    finally:
        feed.close()
        publisher.close()
    for symbol in ("A", "AAPL"):
        want = np.concatenate([rows for s, rows in sent if s == symbol])
        assert collector.of(symbol).tobytes() == want.tobytes()
    assert {s for s, _ in collector.items} == {"A", "AAPL"}
    assert feed.lost == 7
    assert "messages lost from" in caplog.text


def test_each_symbols_trades_keep_their_arrival_order(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/pub"
    publisher = Publisher(address)
    feed = client.trade_batches(address, "*")
    try:
        joined(feed, publisher)
        a1 = publisher.trades("A", 10, 2)
        b1 = publisher.trades("B", 10, 1)
        a2 = publisher.trades("A", 5, 3)  # an older print arriving later stays later
        collector = Collector(feed)
        collector.wait(lambda: collector.count() >= 6)
        collector.stop()
    finally:
        feed.close()
        publisher.close()
    assert collector.of("A").tobytes() == np.concatenate([a1, a2]).tobytes()
    assert collector.of("B").tobytes() == b1.tobytes()


def test_one_drain_makes_one_batch_per_symbol(tmp_path: Path) -> None:
    """What a wake-up that drained several messages yields: one item per symbol, each symbol's
    trades in arrival order (the split of a decoded drain, checked on its own)."""
    feed = client.trade_batches(f"ipc://{tmp_path}/none", ["A", "B", "C"])
    try:
        columns = feed._columns  # what a drain of 4 messages decoded: B A B C A B
        columns.trades(6)["t"] = [1, 2, 3, 4, 5, 6]
        columns.symbols[:6] = [1, 0, 1, 2, 0, 1]
        feed._take(6, 4)
        columns.trades(6)["t"] = 0  # the next drain reuses the columns: items are copies
        items = [(symbol, batch["t"].tolist()) for symbol, batch in feed._ready]
    finally:
        feed.close()
    assert items == [("B", [1, 3, 6]), ("A", [2, 5]), ("C", [4])]  # by first arrival
    assert feed.trades == 6


def test_close_from_another_thread_ends_a_blocked_iteration(tmp_path: Path) -> None:
    publisher = Publisher(f"ipc://{tmp_path}/pub")
    feed = client.trade_batches(f"ipc://{tmp_path}/pub", "TSLA")
    collector = Collector(feed)
    try:
        started = time.monotonic()
        collector.stop()
        assert time.monotonic() - started < 1.0
        with pytest.raises(StopIteration):
            next(feed)
    finally:
        publisher.close()
