"""The bridge under load: a client that never reads, and 1,000 concurrent clients."""

from __future__ import annotations

import asyncio
import resource
import socket
import time
from collections.abc import Iterator

import orjson
import pytest
from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.uri import parse_uri

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan.bridge import Bridge
from polyfan.config import BridgeConfig
from polyfan.fanout.protocol import Limits
from procs import Proc, free_port, scrape
from wsclient import Client, eventually

T0 = 1_781_622_376_000


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


class RawClient:
    """A WebSocket client on a raw socket with a tiny receive buffer that reads only on demand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(10)
        self.sock.connect(("127.0.0.1", port))
        self.protocol = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/"), max_size=None)
        self.protocol.send_request(self.protocol.connect())
        self._flush()
        self.frames: list[Frame] = []
        while not any(isinstance(e, Response) for e in self._events()):
            self.protocol.receive_data(self.sock.recv(65536))

    def _flush(self) -> None:
        for data in self.protocol.data_to_send():
            if data:
                self.sock.sendall(data)

    def _events(self) -> list[object]:
        events = self.protocol.events_received()
        self.frames.extend(e for e in events if isinstance(e, Frame))
        return events

    def send_text(self, text: str) -> None:
        self.protocol.send_text(text.encode())
        self._flush()

    def read_to_end(self) -> int | None:
        """Read everything until the server closes; return the close code it sent."""
        try:
            while data := self.sock.recv(1 << 20):
                self.protocol.receive_data(data)
                self._events()
                self._flush()
        except (ConnectionResetError, BrokenPipeError, TimeoutError):
            pass
        close = self.protocol.close_rcvd
        return None if close is None else close.code


async def started_bridge(agg: FakeAgg, limits: Limits | None = None) -> Bridge:
    bridge = Bridge(BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0)), limits)
    await bridge.start()
    await eventually(lambda: bridge.catalog.intervals)
    return bridge


async def raw_subscriber(bridge: Bridge, channel: str) -> RawClient:
    """A client that authenticates and subscribes, then reads nothing until told to."""
    client = await asyncio.to_thread(RawClient, bridge.port)
    client.send_text('{"action":"auth","params":"x"}')
    client.send_text(f'{{"action":"subscribe","params":"{channel}"}}')
    return client


async def test_a_client_that_never_reads_is_cut_off_with_1013_while_another_gets_every_bar(
    agg: FakeAgg, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polyfan.web import clients as module

    # The slow client, which never answers the close, stays in the table until the test has
    # checked that every bar addressed to it was either sent or counted as dropped.
    monkeypatch.setattr(module, "CLOSE_TIMEOUT", 60.0)
    bridge = await started_bridge(agg, Limits(backlog_bytes=1 << 20))
    try:
        slow = await raw_subscriber(bridge, "100Ms.FLOOD")
        good = await Client.open(f"ws://127.0.0.1:{bridge.port}/")
        await good.send({"action": "subscribe", "params": "100Ms.FLOOD"})
        assert (await good.next_event())["message"] == "subscribed to: 100Ms.FLOOD"
        await eventually(
            lambda: len(bridge.fanout.channels_of(bridge.clients[1])) == 1, what="slow subscribed"
        )
        await asyncio.to_thread(agg.wait_subscribed, b"100Ms.FLOOD\x00")

        rows = bar_rows(100, T0, 60_000)
        started = time.monotonic()
        for i in range(0, len(rows), 500):
            agg.publish(100, "FLOOD", rows[i : i + 500])
        got = await good.bars(len(rows), timeout=60)
        elapsed = time.monotonic() - started
        await eventually(
            lambda: bridge.registry.values()["polyfan_bridge_slow_disconnects_total"] == 1,
            what="the slow client cut off",
        )
        # Every bar the good client got was addressed to the slow one too: it is still there.
        assert 1 in bridge.clients, "the slow client left before all bars were addressed to it"
        code = await asyncio.to_thread(slow.read_to_end)
        slow.sock.close()
        assert code == 1013
        assert got == [expected_event("FLOOD", 100, r) for r in rows]
        assert elapsed < 30, f"the good client took {elapsed:.1f}s"
        await eventually(lambda: bridge.registry.values()["polyfan_bridge_clients"] == 1)
        assert bridge.registry.values()["polyfan_bridge_bars_dropped_total"] > 0

        def sent_or_dropped() -> float:
            values = bridge.registry.values()
            return (
                values["polyfan_bridge_bars_sent_total"]
                + values["polyfan_bridge_bars_dropped_total"]
            )

        # Nothing is dropped silently: each bar went to both clients, and every bar of the slow
        # one that was not written is counted, those addressed to it after the cut-off included.
        await eventually(lambda: sent_or_dropped() == 2 * len(rows), what="sent + dropped")
        # What the slow client did get is a prefix of the bars, in order, nothing repeated.
        seen = [
            e["s"]
            for f in slow.frames
            if f.opcode is Opcode.TEXT
            for e in orjson.loads(f.data)
            if e["ev"] == "MB"
        ]
        assert seen == [int(s) for s in rows["s"][: len(seen)]]
        await good.close()
    finally:
        await bridge.stop()


async def test_a_client_stalled_past_the_time_bound_is_cut_off_with_1013_before_the_bytes_bound(
    agg: FakeAgg, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose oldest unsent bar has waited ``backlog_seconds`` is closed with 1013 and
    counted, though its backlog is far under ``backlog_bytes`` (a stalled client at a normal
    bar rate would otherwise only meet the keepalive's 1011)."""
    from polyfan.web import clients as module

    monkeypatch.setattr(module, "CLOSE_TIMEOUT", 60.0)  # it reads only once cut off
    bridge = await started_bridge(agg, Limits(backlog_bytes=1 << 30, backlog_seconds=0.5))
    try:
        stalled = await raw_subscriber(bridge, "100Ms.STALL")
        await asyncio.to_thread(agg.wait_subscribed, b"100Ms.STALL\x00")
        rows = bar_rows(100, T0, 70_000)
        for i in range(0, 60_000, 10_000):  # ~9 MB: fills the kernel's buffers, then queues
            agg.publish(100, "STALL", rows[i : i + 10_000])
        cut_off = "polyfan_bridge_slow_disconnects_total"
        for i in range(60_000, len(rows)):
            if bridge.registry.values()[cut_off] == 1:
                break
            agg.publish(100, "STALL", rows[i : i + 1])  # one bar per 10 ms: a normal rate
            await asyncio.sleep(0.01)
        assert bridge.registry.values()[cut_off] == 1
        assert bridge.clients[1].backlog.bytes == 0  # cleared, and counted as dropped
        assert bridge.registry.values()["polyfan_bridge_bars_dropped_total"] > 0
        code = await asyncio.to_thread(stalled.read_to_end)
        stalled.sock.close()
        assert code == 1013
    finally:
        await bridge.stop()


async def test_a_client_that_stops_answering_pings_is_closed_1011_and_counted(
    agg: FakeAgg, monkeypatch: pytest.MonkeyPatch
) -> None:
    from polyfan import bridge as module

    monkeypatch.setattr(module, "PING_INTERVAL", 0.1)
    monkeypatch.setattr(module, "PING_TIMEOUT", 0.1)
    bridge = Bridge(BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0)))
    await bridge.start()
    try:
        mute = await asyncio.to_thread(RawClient, bridge.port)  # never reads: never pongs
        mute.send_text('{"action":"auth","params":"x"}')
        await eventually(
            lambda: bridge.registry.values()["polyfan_bridge_keepalive_timeouts_total"] == 1,
            what="the keepalive timeout",
        )
        assert await asyncio.to_thread(mute.read_to_end) == 1011
        mute.sock.close()
        assert bridge.registry.values()["polyfan_bridge_slow_disconnects_total"] == 0
    finally:
        await bridge.stop()


async def test_a_thousand_clients_each_get_exactly_the_bars_of_their_channels(
    agg: FakeAgg,
) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 8192), hard))
    port = free_port()
    symbols = [f"S{i}" for i in range(10)]
    channels = [(interval, sym) for interval in (250, 500) for sym in symbols]  # 20 channels
    clients_n = 1000
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}") as bridge:
        bridge.wait_for("ready:")
        url = f"ws://127.0.0.1:{port}/"

        async def open_client(k: int) -> tuple[Client, list[tuple[int, str]]]:
            mine = [channels[(k * 7 + j * 3) % len(channels)] for j in range(3)]
            client = await Client.open(url, token="any")
            params = ",".join(f"{i}Ms.{s}" for i, s in mine)
            await client.send({"action": "subscribe", "params": params})
            assert [e["status"] for e in await client.statuses(3, timeout=30)] == ["success"] * 3
            return client, mine

        opened = []
        for start in range(0, clients_n, 100):  # connect in waves to stay under the backlog
            opened += await asyncio.gather(*(open_client(k) for k in range(start, start + 100)))
        for interval, sym in channels:
            await asyncio.to_thread(agg.wait_subscribed, f"{interval}Ms.{sym}\x00".encode())

        published: dict[tuple[int, str], list[dict[str, object]]] = {}
        for n, (interval, sym) in enumerate(channels):
            rows = bar_rows(interval, T0 - T0 % interval, 12, price=10 + n)
            published[(interval, sym)] = [expected_event(sym, interval, r) for r in rows]
            for i in range(0, 12, 4):
                agg.publish(interval, sym, rows[i : i + 4])

        async def check(client: Client, mine: list[tuple[int, str]]) -> None:
            got = await client.bars(36, timeout=60)
            for channel in mine:
                assert [e for e in got if (e["interval"], e["sym"]) == channel] == published[
                    channel
                ]

        await asyncio.gather(*(check(c, mine) for c, mine in opened))
        metrics = await asyncio.to_thread(scrape, port)
        assert metrics["polyfan_bridge_clients"] == clients_n
        assert metrics["polyfan_bridge_bars_received_total"] == 12 * len(channels)
        assert metrics["polyfan_bridge_bars_sent_total"] == 36 * clients_n
        assert metrics["polyfan_bridge_slow_disconnects_total"] == 0
        await asyncio.gather(*(c.close() for c, _ in opened))
        assert bridge.stop() == 0
