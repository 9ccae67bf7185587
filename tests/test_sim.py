from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from polyfan.config import SimConfig
from polyfan.sim import SimServer, read_record

TIMEOUT = 5.0


async def server(config: SimConfig) -> SimServer:
    sim = SimServer(config)
    await sim.start()
    return sim


@pytest.fixture
async def sim() -> AsyncIterator[SimServer]:
    sim = await server(SimConfig(listen=("127.0.0.1", 0), symbols=8, rate=4000, seed=1))
    yield sim
    await sim.close()


async def receive(ws: ClientConnection) -> list[dict[str, Any]]:
    frame = await asyncio.wait_for(ws.recv(), TIMEOUT)
    value = orjson.loads(frame)
    assert isinstance(value, list)
    return value


async def statuses(ws: ClientConnection, count: int) -> list[tuple[str, str]]:
    seen = []
    while len(seen) < count:
        seen += [(e["status"], e["message"]) for e in await receive(ws) if e["ev"] == "status"]
    return seen


async def login(ws: ClientConnection, key: str = "any key") -> None:
    assert await statuses(ws, 1) == [("connected", "Connected Successfully")]
    await ws.send(orjson.dumps({"action": "auth", "params": key}).decode())
    assert await statuses(ws, 1) == [("auth_success", "authenticated")]


async def trades(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    seen: list[dict[str, Any]] = []
    while len(seen) < count:
        seen += [e for e in await receive(ws) if e["ev"] == "T"]
    return seen


async def test_protocol_flow_with_one_success_per_channel_and_only_those_symbols(
    sim: SimServer,
) -> None:
    async with connect(sim.url) as ws:
        await login(ws)
        await ws.send('{"action":"subscribe","params":"T.A,T.AAPL, T.BRK.A"}')
        assert await statuses(ws, 3) == [
            ("success", "subscribed to: T.A"),
            ("success", "subscribed to: T.AAPL"),
            ("success", "subscribed to: T.BRK.A"),
        ]
        received = await trades(ws, 200)
        assert {t["sym"] for t in received} <= {"A", "AAPL", "BRK.A"}
        assert {t["sym"] for t in received} == {"A", "AAPL", "BRK.A"}


async def test_star_subscribes_every_symbol_and_unsubscribe_stops_one(sim: SimServer) -> None:
    async with connect(sim.url) as ws:
        await login(ws)
        await ws.send('{"action":"subscribe","params":"T.*"}')
        assert await statuses(ws, 1) == [("success", "subscribed to: T.*")]
        assert {t["sym"] for t in await trades(ws, 2000)} == set(sim.market.symbols)
        await ws.send('{"action":"unsubscribe","params":"T.*"}')
        await ws.send('{"action":"subscribe","params":"T.AA"}')
        seen: list[tuple[str, str]] = []
        while ("success", "subscribed to: T.AA") not in seen:
            seen += [(e["status"], e["message"]) for e in await receive(ws) if e["ev"] == "status"]
        assert ("success", "unsubscribed to: T.*") in seen
        assert {t["sym"] for t in await trades(ws, 20)} == {"AA"}


async def test_a_wrong_key_gets_auth_failed_then_the_connection_closes() -> None:
    sim = await server(SimConfig(listen=("127.0.0.1", 0), api_key="right"))
    try:
        async with connect(sim.url) as ws:
            assert await statuses(ws, 1) == [("connected", "Connected Successfully")]
            await ws.send('{"action":"auth","params":"wrong"}')
            assert await statuses(ws, 1) == [("auth_failed", "authentication failed")]
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), TIMEOUT)
            assert ws.close_code == 1008
        async with connect(sim.url) as ws:
            await login(ws, "right")
    finally:
        await sim.close()


async def test_anything_before_auth_gets_auth_required_and_garbage_an_error(
    sim: SimServer,
) -> None:
    async with connect(sim.url) as ws:
        await statuses(ws, 1)
        await ws.send('{"action":"subscribe","params":"T.*"}')
        assert await statuses(ws, 1) == [("auth_required", "authentication required")]
        await ws.send("not json")
        assert (await statuses(ws, 1))[0][0] == "error"
        await ws.send('{"action":"auth","params":"k"}')
        await ws.send('{"action":"subscribe","params":"nodot"}')
        assert await statuses(ws, 2) == [
            ("auth_success", "authenticated"),
            ("error", "invalid channel: nodot"),
        ]


async def test_script_frames_are_sent_verbatim_after_subscribe_and_recorded(
    tmp_path: Path,
) -> None:
    script = tmp_path / "script.txt"
    lines = ['[{"ev":"T","sym":"A","p":1,"s":1,"t":5}]', "garbage {", "[1,2]"]
    script.write_text("\n".join(lines) + "\n")
    record = tmp_path / "record.jsonl"
    sim = await server(SimConfig(listen=("127.0.0.1", 0), script=script, record=record, symbols=3))
    try:
        async with connect(sim.url) as ws:
            await login(ws)
            await ws.send('{"action":"subscribe","params":"T.*"}')
            await statuses(ws, 1)
            got = [await asyncio.wait_for(ws.recv(), TIMEOUT) for _ in lines]
            assert got == lines
            with pytest.raises(TimeoutError):  # nothing else: the script replaces the market
                await asyncio.wait_for(ws.recv(), 0.3)
    finally:
        await sim.close()
    assert read_record(record) == [(1, line) for line in lines]


async def test_drop_clients_aborts_connections_without_a_close_frame(sim: SimServer) -> None:
    async with connect(sim.url) as ws:
        await login(ws)
        assert sim.drop_clients() == 1
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), TIMEOUT)
        assert closed.value.rcvd is None  # abrupt: no close frame


async def test_a_second_connection_with_the_same_key_evicts_the_first(sim: SimServer) -> None:
    async with connect(sim.url) as first, connect(sim.url) as second:
        await login(first, "shared key")
        await login(second, "shared key")
        assert await statuses(first, 1) == [
            ("max_connections", "Maximum number of websocket connections exceeded.")
        ]
        with pytest.raises(ConnectionClosed):
            while True:
                await asyncio.wait_for(first.recv(), TIMEOUT)
        assert first.close_code == 1008
        await second.send('{"action":"subscribe","params":"T.*"}')
        assert await statuses(second, 1) == [("success", "subscribed to: T.*")]
        async with connect(sim.url) as third:  # another key is another account
            await login(third, "other key")
            await third.send('{"action":"subscribe","params":"T.*"}')
            assert await statuses(third, 1) == [("success", "subscribed to: T.*")]
        assert len(await trades(second, 10)) >= 10


async def test_the_vendors_official_client_works_against_the_sim(sim: SimServer) -> None:
    """`massive` (formerly polygon-api-client) pointed at the sim, as protocol.md says."""
    from massive import WebSocketClient
    from massive.websocket.models import EquityTrade

    client = WebSocketClient(
        api_key="any key",
        feed=f"127.0.0.1:{sim.port}",
        market="stocks",
        secure=False,
        subscriptions=["T.A", "T.BRK.A"],
    )
    received: list[EquityTrade] = []
    enough = asyncio.Event()

    async def collect(messages: list[Any]) -> None:
        received.extend(messages)
        if len(received) >= 50:
            enough.set()

    task = asyncio.create_task(client.connect(collect))
    try:
        await asyncio.wait_for(enough.wait(), TIMEOUT)
    finally:
        await client.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert all(isinstance(m, EquityTrade) for m in received)
    assert {m.symbol for m in received} <= {"A", "BRK.A"}
    assert all(m.price and m.price > 0 and m.timestamp and m.sequence_number for m in received)
    assert any(m.conditions and 37 in m.conditions for m in received)


async def events(ws: ClientConnection, done: Any) -> list[dict[str, Any]]:
    """Events (no statuses) until ``done(events)`` says enough."""
    seen: list[dict[str, Any]] = []
    while not done(seen):
        seen += [e for e in await receive(ws) if e["ev"] != "status"]
    return seen


def channel_of(event: dict[str, Any]) -> str:
    return f"{event['ev']}.{event.get('sym') or event['T']}"


async def test_each_channel_carries_its_events_and_only_the_subscribed_ones(
    sim: SimServer,
) -> None:
    async with connect(sim.url) as ws:
        await login(ws)
        await ws.send('{"action":"subscribe","params":"T.AAPL,Q.*,A.AAPL,A.A,LULD.*,AM.A"}')
        assert await statuses(ws, 6) == [
            ("success", f"subscribed to: {channel}")
            for channel in ("T.AAPL", "Q.*", "A.AAPL", "A.A", "LULD.*", "AM.A")
        ]

        def enough(seen: list[dict[str, Any]]) -> bool:
            kinds = {e["ev"] for e in seen}
            return {"T", "Q", "A", "LULD"} <= kinds and len(seen) > 2_000

        received = await asyncio.wait_for(events(ws, enough), 3 * TIMEOUT)
        channels = {channel_of(e) for e in received}
        assert channels - {f"Q.{s}" for s in sim.market.symbols} - {
            f"LULD.{s}" for s in sim.market.symbols
        } <= {"T.AAPL", "A.AAPL", "A.A", "AM.A"}
        assert {f"Q.{s}" for s in sim.market.symbols} <= channels  # Q.* is every symbol
        quotes = sum(e["ev"] == "Q" for e in received)
        trades_of_aapl = sum(e["ev"] == "T" for e in received)
        assert quotes > 5 * trades_of_aapl  # AAPL's trades only, every symbol's quotes
        await ws.send('{"action":"unsubscribe","params":"Q.*"}')
        seen: list[tuple[str, str]] = []
        while ("success", "unsubscribed to: Q.*") not in seen:
            seen += [(e["status"], e["message"]) for e in await receive(ws) if e["ev"] == "status"]

        def quotes_stopped(seen: list[dict[str, Any]]) -> bool:
            """Frames queued before the unsubscribe may still come; then only trades do."""
            kinds = [e["ev"] for e in seen]
            last_quote = max((i for i, ev in enumerate(kinds) if ev == "Q"), default=-1)
            return kinds[last_quote + 1 :].count("T") >= 50

        await asyncio.wait_for(events(ws, quotes_stopped), 3 * TIMEOUT)


async def test_the_official_client_reads_quotes_aggregates_and_bands_from_the_sim(
    sim: SimServer,
) -> None:
    """With ``raw=False`` the vendor's client builds its own models from the sim's events."""
    from massive import WebSocketClient
    from massive.websocket.models import EquityAgg, EquityQuote, LimitUpLimitDown

    client = WebSocketClient(
        api_key="any key",
        feed=f"127.0.0.1:{sim.port}",
        market="stocks",
        secure=False,
        subscriptions=["Q.AAPL", "A.*", "LULD.*"],
    )
    received: list[Any] = []
    enough = asyncio.Event()

    async def collect(messages: list[Any]) -> None:
        received.extend(messages)
        if {type(m) for m in received} >= {EquityQuote, EquityAgg, LimitUpLimitDown}:
            enough.set()

    task = asyncio.create_task(client.connect(collect))
    try:
        await asyncio.wait_for(enough.wait(), 3 * TIMEOUT)
    finally:
        await client.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    quotes = [m for m in received if isinstance(m, EquityQuote)]
    assert {m.symbol for m in quotes} == {"AAPL"}
    assert all(0 < m.bid_price < m.ask_price and m.bid_size and m.ask_size for m in quotes)
    aggs = [m for m in received if isinstance(m, EquityAgg)]
    assert all(m.event_type == "A" and m.end_timestamp == m.start_timestamp + 1000 for m in aggs)
    assert all(m.low <= min(m.open, m.close) and m.high >= max(m.open, m.close) for m in aggs)
    assert all(m.volume and m.accumulated_volume >= m.volume for m in aggs)
    bands = [m for m in received if isinstance(m, LimitUpLimitDown)]
    assert all(m.symbol in sim.market.symbols and m.low_price < m.high_price for m in bands)
