"""The Polygon stocks WebSocket server that ``polyfan sim`` and ``polyfan replay`` share.

It carries out :mod:`polyfan.feed.serving`'s protocol over websockets: ``connected`` on open,
then every client frame answered in order; a refused key closes the connection (1008); a newer
connection with the same key gets the older one ``max_connections`` and a close (1008). What
the two commands stream is theirs: they hand :meth:`StocksServer.publish` frames of events
(``T``, ``Q``, ``A``, ``AM``, ``LULD``), and each client gets the events of the channels it
subscribed (event type and symbol), in the same frames.

Every client has a backlog of frames and a writer task. ``max_backlog`` says what happens to a
client that reads too slowly: cut off with ``slow_consumer`` past that many frames, as the real
server does (the sim), or never (``None``: the replay, which waits with
:meth:`StocksServer.wait_for_room` instead, so a slow reader slows the replay down and loses
nothing).

``record`` (tests) writes every frame sent after a subscription as a JSON line
``{"client": N, "frame": "<the frame text>"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from polyfan.feed.flatfile import EventTexts
from polyfan.feed.serving import (
    MAX_CONNECTIONS_MESSAGE,
    ClientState,
    client_frame_received,
    status,
)

MAX_CLIENT_FRAME = 65_536


class StreamClient:
    """One connection: its protocol state, the frames waiting to be written, and their writer."""

    __slots__ = ("backlog", "id", "room", "state", "wake", "ws")

    def __init__(self, client_id: int, ws: ServerConnection) -> None:
        self.id = client_id
        self.ws = ws
        self.state = ClientState()
        self.backlog: deque[str | tuple[int, str]] = deque()  # a tuple: close(code, reason)
        self.wake = asyncio.Event()  # frames to write
        self.room = asyncio.Event()  # the writer took a frame (or the client left)

    def is_subscribed(self) -> bool:
        return self.state.is_subscribed()

    def queue(self, frame: str | tuple[int, str]) -> None:
        self.backlog.append(frame)
        self.wake.set()


class StocksServer:
    """``await start()``, then it serves until ``await close()``; :meth:`publish` streams."""

    def __init__(
        self,
        listen: tuple[str, int],
        *,
        api_key: str | None,
        log: logging.Logger,
        max_backlog: int | None,
        record: Path | None = None,
        on_subscribed: Callable[[StreamClient], None] | None = None,
    ) -> None:
        self.listen = listen
        self.api_key = api_key
        self.log = log
        self.max_backlog = max_backlog
        self.record_path = record
        self.on_subscribed = on_subscribed
        self.events_sent = 0
        self.subscribed = asyncio.Event()  # set while at least one client is subscribed
        self._clients: dict[int, StreamClient] = {}
        self._ids = itertools.count(1)
        self._record: IO[bytes] | None = None
        self._server: Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(next(iter(self._server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        return f"ws://{self.listen[0]}:{self.port}/stocks"

    async def start(self) -> None:
        if self.record_path is not None:
            self._record = self.record_path.open("wb")
        host, port = self.listen
        ws_log = logging.getLogger(f"{self.log.name}.websockets")
        ws_log.setLevel(max(logging.WARNING, ws_log.getEffectiveLevel()))
        self._server = await serve(
            self._handle, host, port, compression=None, max_size=MAX_CLIENT_FRAME, logger=ws_log
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close(close_connections=True)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.5)
        if self._record is not None:
            self._record.close()
            self._record = None

    def flush_record(self) -> None:
        if self._record is not None:
            self._record.flush()

    def drop_clients(self) -> int:
        """Abort every client's TCP connection without a close frame; return how many."""
        clients = list(self._clients.values())
        for client in clients:
            client.ws.transport.abort()
        return len(clients)

    def streaming(self) -> list[StreamClient]:
        """The clients subscribed to something."""
        return [c for c in self._clients.values() if c.is_subscribed()]

    # --- streaming ----------------------------------------------------------------------------

    def publish(
        self,
        frames: list[list[dict[str, Any]]],
        clients: list[StreamClient],
        kinds: frozenset[str] = frozenset({"T"}),
    ) -> None:
        """Queue each frame of events to ``clients``, each client's channels only (event type
        ``ev`` and symbol: ``sym``, or ``T`` for ``LULD``); ``kinds`` holds every ``ev`` in
        ``frames``. A client past ``max_backlog`` frames is cut off as a slow consumer."""
        for client in clients:
            if self.max_backlog is not None and len(client.backlog) > self.max_backlog:
                self.log.warning("client %d is a slow consumer: disconnecting it", client.id)
                client.backlog.clear()
                client.queue(status("slow_consumer", "slow consumer"))
                client.queue((1008, "slow consumer"))
                continue
            state = client.state
            everything = kinds <= state.everything
            wants = state.wants
            for events in frames:
                if not everything:
                    events = [e for e in events if wants(e.get("sym") or e["T"], e["ev"])]
                    if not events:
                        continue
                client.queue(orjson.dumps(events).decode())
                self.events_sent += len(events)

    def publish_texts(
        self, events: EventTexts, symbols: list[str], per_frame: int, clients: list[StreamClient]
    ) -> None:
        """Queue trade events already in JSON text (with each one's symbol) to ``clients`` in
        frames of at most ``per_frame``, each client's symbols only; never cuts a client off
        (the caller waits with :meth:`wait_for_room`)."""
        everything: list[str] | None = None
        count = len(events)
        for client in clients:
            state = client.state
            if state.all_symbols:
                if everything is None:
                    everything = [
                        events.frame(i, min(i + per_frame, count))
                        for i in range(0, count, per_frame)
                    ]
                for frame in everything:
                    client.queue(frame)
                self.events_sent += count
                continue
            chosen = [events.event(i) for i, s in enumerate(symbols) if s in state.symbols]
            for i in range(0, len(chosen), per_frame):
                client.queue("[" + b",".join(chosen[i : i + per_frame]).decode() + "]")
            self.events_sent += len(chosen)

    async def wait_for_room(self, frames: int) -> None:
        """Wait until no subscribed client has more than ``frames`` frames waiting."""
        while True:
            full = [c for c in self.streaming() if len(c.backlog) > frames]
            if not full:
                return
            client = full[0]
            client.room.clear()
            if len(client.backlog) > frames and client.id in self._clients:
                await client.room.wait()

    # --- one connection -----------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection) -> None:
        client = StreamClient(next(self._ids), ws)
        self._clients[client.id] = client
        self.log.info(
            "client %d connected from %s (%d clients)",
            client.id,
            ws.remote_address,
            len(self._clients),
        )
        writer = asyncio.create_task(self._write(client))
        try:
            await ws.send(status("connected", "Connected Successfully"))
            async for message in ws:
                reply = client_frame_received(client.state, message, self.api_key)
                if reply.evict_key is not None:
                    self._evict(client, reply.evict_key)
                for frame in reply.frames:
                    await ws.send(frame)
                if client.state.refused:
                    await ws.close(1008, "authentication failed")
                    break
                self._subscriptions_changed()
                if reply.subscribed_now and self.on_subscribed is not None:
                    self.on_subscribed(client)
        except ConnectionClosed:
            pass
        finally:
            del self._clients[client.id]
            self.log.info("client %d left (%d clients)", client.id, len(self._clients))
            client.room.set()
            self._subscriptions_changed()
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    def _subscriptions_changed(self) -> None:
        if any(c.is_subscribed() for c in self._clients.values()):
            self.subscribed.set()
        else:
            self.subscribed.clear()

    def _evict(self, newer: StreamClient, key: str) -> None:
        """One connection per key, like the real server: the older ones are told and closed."""
        for other in self._clients.values():
            if other is not newer and other.state.key == key:
                self.log.info("client %d: a newer connection uses its key", other.id)
                other.state.key = None
                other.queue(status("max_connections", MAX_CONNECTIONS_MESSAGE))
                other.queue((1008, "max connections"))

    async def _write(self, client: StreamClient) -> None:
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
                client.room.set()
                record = self._record
                if record is not None:
                    record.write(orjson.dumps({"client": client.id, "frame": frame}) + b"\n")
