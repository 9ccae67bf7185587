"""``polyfan sim``: a local stand-in for the Polygon stocks WebSocket, fed by ``market.py``.

It speaks the protocol of shared/polygon/protocol.md: ``connected`` on open; ``auth`` with the
``--api-key`` (any key when none is set) gets ``auth_success``, a wrong key ``auth_failed`` and a
close; anything else before auth gets ``auth_required``; ``subscribe`` / ``unsubscribe`` take
``T.*`` or a comma list of ``T.<SYM>`` and answer one ``success`` status per channel. Only
trades of subscribed symbols are sent, in frames of 1 to 100 events, at ``--rate`` trades per
second over all symbols. Like the real server, it allows one connection per key: a second
connection authenticating with the same key gets the older one ``max_connections`` and a close
(1008); and a client that falls more than ``MAX_BACKLOG_FRAMES`` frames behind gets
``slow_consumer`` and is closed.

For tests:

- ``--script PATH`` sends the file's lines verbatim, one text frame each (garbage allowed),
  once the client has subscribed, instead of the market stream; the connection stays open.
- ``--record PATH`` writes every frame sent after subscribe as a JSON line
  ``{"client": N, "frame": "<the frame text>"}``: the reference of exactly what was sent.
- SIGUSR1 drops every client connection abruptly (no close frame), as the real server can.

:class:`SimServer` runs in-process as well (tests use it with their own event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import signal
import time
from collections import deque
from pathlib import Path
from typing import IO, Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from polyfan.config import SimConfig
from polyfan.lifecycle import serve_until_stopped
from polyfan.market import Market

log = logging.getLogger("polyfan.sim")

TICK_S = 0.01
THROUGHPUT_EVERY_S = 5.0
MAX_BACKLOG_FRAMES = 20_000


def status(status: str, message: str) -> str:
    return orjson.dumps([{"ev": "status", "status": status, "message": message}]).decode()


class _Client:
    __slots__ = (
        "all_symbols",
        "authenticated",
        "backlog",
        "id",
        "key",
        "refused",
        "symbols",
        "wake",
        "ws",
    )

    def __init__(self, client_id: int, ws: ServerConnection) -> None:
        self.id = client_id
        self.ws = ws
        self.authenticated = False
        self.refused = False
        self.key: str | None = None
        self.all_symbols = False
        self.symbols: set[str] = set()
        self.backlog: deque[str | tuple[int, str]] = deque()  # a tuple: close(code, reason)
        self.wake = asyncio.Event()

    def is_subscribed(self) -> bool:
        return self.all_symbols or bool(self.symbols)

    def queue(self, frame: str | tuple[int, str]) -> None:
        self.backlog.append(frame)
        self.wake.set()


class SimServer:
    """The simulator: ``await start()``, then it serves until ``await close()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.market = Market(config.symbols, config.seed, late_fraction=config.late_fraction)
        self.script = config.script.read_text().splitlines() if config.script else None
        self.trades_sent = 0
        self._clients: dict[int, _Client] = {}
        self._ids = itertools.count(1)
        self._record: IO[bytes] | None = None
        self._server: Server | None = None
        self._producer: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://{self.config.listen[0]}:{self.port}/stocks"

    async def start(self) -> None:
        if self.config.record is not None:
            self._record = self.config.record.open("wb")
        host, port = self.config.listen
        ws_log = logging.getLogger("polyfan.sim.websockets")
        ws_log.setLevel(max(logging.WARNING, ws_log.getEffectiveLevel()))
        self._server = await serve(
            self._handle, host, port, compression=None, max_size=65_536, logger=ws_log
        )
        if self.script is None:
            self._producer = asyncio.create_task(self._produce())

    async def close(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.5)
        if self._record is not None:
            self._record.close()
            self._record = None

    def drop_clients(self) -> int:
        """Abort every client's TCP connection without a close frame; return how many."""
        clients = list(self._clients.values())
        for client in clients:
            client.ws.transport.abort()
        return len(clients)

    # --- one connection ---------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        client = _Client(next(self._ids), ws)
        self._clients[client.id] = client
        log.info(
            "client %d connected from %s (%d clients)",
            client.id,
            ws.remote_address,
            len(self._clients),
        )
        writer = asyncio.create_task(self._write(client))
        try:
            await ws.send(status("connected", "Connected Successfully"))
            async for message in ws:
                for reply in self._receive(client, message):
                    await ws.send(reply)
                if client.refused:
                    await ws.close(1008, "authentication failed")
                    break
        except ConnectionClosed:
            pass
        finally:
            del self._clients[client.id]
            log.info("client %d left (%d clients)", client.id, len(self._clients))
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _receive(self, client: _Client, message: str | bytes) -> list[str]:
        """Replies to one client frame (state changes applied to ``client``)."""
        try:
            request = orjson.loads(message)
        except orjson.JSONDecodeError:
            return [status("error", "invalid message: not JSON")]
        if not isinstance(request, dict) or not isinstance(request.get("params", ""), str):
            return [status("error", "invalid message: expected {action, params}")]
        action, params = request.get("action"), request.get("params", "")
        if action == "auth":
            if self.config.api_key is not None and params != self.config.api_key:
                client.refused = True
                return [status("auth_failed", "authentication failed")]
            client.authenticated = True
            client.key = params
            for other in self._clients.values():  # one connection per key, like the real one
                if other is not client and other.key == params:
                    log.info("client %d: a newer connection uses its key", other.id)
                    other.key = None
                    other.queue(
                        status(
                            "max_connections", "Maximum number of websocket connections exceeded."
                        )
                    )
                    other.queue((1008, "max connections"))
            return [status("auth_success", "authenticated")]
        if not client.authenticated:
            return [status("auth_required", "authentication required")]
        if action not in ("subscribe", "unsubscribe"):
            return [status("error", f"unknown action: {action}")]
        replies = []
        was_subscribed = client.is_subscribed()
        for channel in (c.strip() for c in params.split(",")):
            prefix, dot, symbol = channel.partition(".")
            if not dot or not prefix or not symbol:
                replies.append(status("error", f"invalid channel: {channel}"))
                continue
            if prefix == "T":
                chosen = client.symbols
                if action == "subscribe":
                    if symbol == "*":
                        client.all_symbols = True
                    else:
                        chosen.add(symbol)
                elif symbol == "*":
                    client.all_symbols = False
                else:
                    chosen.discard(symbol)
            verb = "subscribed to" if action == "subscribe" else "unsubscribed to"
            replies.append(status("success", f"{verb}: {channel}"))
        if self.script is not None and not was_subscribed and client.is_subscribed():
            for line in self.script:
                client.queue(line)
        return replies

    async def _write(self, client: _Client) -> None:
        record = self._record
        backlog = client.backlog
        while True:
            await client.wake.wait()
            client.wake.clear()
            while backlog:
                frame = backlog.popleft()
                if isinstance(frame, tuple):
                    await client.ws.close(*frame)
                    return
                await client.ws.send(frame)
                if record is not None:
                    record.write(orjson.dumps({"client": client.id, "frame": frame}) + b"\n")

    # --- the market stream ------------------------------------------------------------------

    async def _produce(self) -> None:
        rate = self.config.rate
        due = 0.0
        last = time.monotonic()
        last_report, reported = last, 0
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            due += rate * (now - last)
            last = now
            count = int(due)
            due -= count
            streaming = [c for c in self._clients.values() if c.is_subscribed()]
            if count and streaming:
                self._publish(self.market.frames(count, int(time.time() * 1000)), streaming)
            if now - last_report >= THROUGHPUT_EVERY_S:
                log.info(
                    "sent %d trades in %.0f s (%.0f/s) to %d clients",
                    self.trades_sent - reported,
                    now - last_report,
                    (self.trades_sent - reported) / (now - last_report),
                    len(streaming),
                )
                if self._record is not None:
                    self._record.flush()
                last_report, reported = now, self.trades_sent

    def _publish(self, frames: list[list[dict[str, Any]]], clients: list[_Client]) -> None:
        for client in clients:
            if len(client.backlog) > MAX_BACKLOG_FRAMES:
                log.warning("client %d is a slow consumer: disconnecting it", client.id)
                client.backlog.clear()
                client.queue(status("slow_consumer", "slow consumer"))
                client.queue((1008, "slow consumer"))
                continue
            for events in frames:
                if not client.all_symbols:
                    events = [e for e in events if e["sym"] in client.symbols]
                    if not events:
                        continue
                client.queue(orjson.dumps(events).decode())
                self.trades_sent += len(events)


async def serve_sim(config: SimConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; SIGUSR1 drops every client connection."""
    sim = SimServer(config)
    await sim.start()
    loop = asyncio.get_running_loop()

    def drop() -> None:
        log.info("SIGUSR1: dropping %d client connections", sim.drop_clients())

    loop.add_signal_handler(signal.SIGUSR1, drop)
    symbols = sim.market.symbols
    log.info(
        "ready: sim listening on %s (%d symbols, %s)",
        sim.url,
        len(symbols),
        f"script {config.script}" if sim.script is not None else f"{config.rate:g} trades/s",
    )
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        log.info("stopping; sent %d trades", sim.trades_sent)
        await sim.close()


def run(config: SimConfig) -> int:
    asyncio.run(serve_until_stopped(lambda stop: serve_sim(config, stop)))
    return 0


def read_record(path: Path) -> list[tuple[int, str]]:
    """``(client, frame text)`` for every line of a ``--record`` file."""
    rows = []
    for line in path.read_bytes().splitlines():
        value = orjson.loads(line)
        rows.append((int(value["client"]), str(value["frame"])))
    return rows
