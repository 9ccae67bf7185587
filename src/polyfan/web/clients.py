"""The bridge's WebSocket clients: each connection's session, and every frame written to it.

:class:`Clients` serves a connection websockets hands over (the client protocol's
:class:`~polyfan.fanout.protocol.ClientSession` decides; this carries out), and delivers: a
fan-out pass's bars become one JSON frame per group of clients with the same channels
(:class:`~polyfan.fanout.subscriptions.Fanout`), serialized once as a WebSocket frame. A client
that keeps up gets it written straight to its socket; otherwise it goes into the client's
bounded :class:`~polyfan.fanout.subscriptions.Backlog`, drained by the client's writer task.
No client is ever awaited by the loop that serves the others; a client whose backlog passes
its bound is closed with 1013. A subscription with ``since`` gets its history from an
aggregator (``ask``) and is held at the seam until it is sent, so no bar is sent twice or
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from polyfan.fanout.counters import BridgeCounters
from polyfan.fanout.links import Links
from polyfan.fanout.protocol import (
    AUTH_FAILED,
    AUTH_TIMEOUT,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CONNECTED,
    Channel,
    ClientSession,
    Limits,
    Subscribe,
    Unsubscribe,
    auth_throttled,
    encode_bars,
    encode_events,
    error,
    join_events,
)
from polyfan.fanout.subscriptions import Arrival, Backlog, Fanout, Seam, chunked
from polyfan.web.admission import AuthThrottle
from polyfan.web.history import Ask, gather_bars
from polyfan.wire import codec

log = logging.getLogger("polyfan.bridge")

HISTORY_FRAME_BARS = 1000  # bars per frame when sending history
DIRECT_WRITE_BELOW = 64 * 1024  # write straight to a client's socket below this many buffered bytes
CLOSE_TIMEOUT = 1.0  # websockets' closing handshake; keeps shutdown under 2 s
CLOSE_INTERNAL_ERROR = 1011  # websockets' close code for a keepalive timeout


@dataclass(eq=False)
class Client:
    """One WebSocket connection: protocol session, backlog and writer."""

    id: int
    ws: ServerConnection
    session: ClientSession
    backlog: Backlog
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    close_after: tuple[int, str] | None = None  # close once the backlog is written
    cut_off: bool = False

    def __post_init__(self) -> None:
        self.protocol = self.ws.protocol  # fixed for the connection's life; read per frame
        self.transport = self.ws.transport

    def keeps_up(self) -> bool:
        """True when a frame may be written straight to the socket.

        Only while nothing is queued (so frames stay in order), the connection is open and
        its write buffer holds under ``DIRECT_WRITE_BELOW`` (so a slow client's bytes pile up
        in its bounded backlog, not in the transport). The write itself is what websockets'
        ``broadcast`` does, with the frame serialized once for every client: the server
        never masks and no extension is negotiated (compression is off).
        """
        return (
            not self.backlog.bytes
            and self.close_after is None
            and not self.cut_off
            and self.protocol.state is State.OPEN
            and self.transport.get_write_buffer_size() < DIRECT_WRITE_BELOW
        )


class Clients:
    """Every WebSocket client of this process, and the fan-out to them."""

    def __init__(
        self,
        links: Links,
        counters: BridgeCounters,
        limits: Limits,
        tokens: frozenset[str] | tuple[str, ...],
        ask: Ask,
        spawn: Callable[[Awaitable[Any]], asyncio.Task[Any]],
        throttle: AuthThrottle,
    ) -> None:
        self.links = links
        self.counters = counters
        self.limits = limits
        self.tokens = tokens
        self.fanout: Fanout[Client] = Fanout()
        self.clients: dict[int, Client] = {}
        self._ask = ask
        self._spawn = spawn
        self._ids = itertools.count(1)
        self.throttle = throttle
        links.wanted = self.fanout.channels

    def __len__(self) -> int:
        return len(self.clients)

    def deliver(self, arrivals: list[Arrival], arrived_at: float | None = None) -> int:
        """One pass: each group's bars become one JSON frame, framed once for the wire, and
        written to every client of the group that keeps up (queued for the others). Returns
        how many frames were written. ``arrived_at`` (``time.monotonic()``): when the oldest
        of these bars arrived, for the delivery histogram."""
        frames = bars_sent = 0
        for parts, receivers in self.fanout.deliveries(arrivals):
            frame = join_events(parts)
            wire_frame = _text_frame(frame)
            bars = len(parts)
            for client in receivers:
                if client.keeps_up():
                    client.transport.write(wire_frame)
                    frames += 1
                    bars_sent += bars
                else:
                    self._queue(client, frame, bars)
        self.counters.frames_sent.inc(frames)
        self.counters.bars_sent.inc(bars_sent)
        if arrived_at is not None and bars_sent:
            self.counters.delivery.observe(time.monotonic() - arrived_at, bars_sent)
        return frames

    def push(self, client: Client, frame: bytes, bars: int) -> None:
        """Send ``frame`` now if the client keeps up, else queue it."""
        if client.keeps_up():
            client.transport.write(_text_frame(frame))
            self.counters.frames_sent.inc()
            self.counters.bars_sent.inc(bars)
        else:
            self._queue(client, frame, bars)

    def _queue(self, client: Client, frame: bytes, bars: int) -> None:
        """Queue ``frame`` in the client's bounded backlog, or cut the client off (1013)."""
        if client.cut_off:  # closing: what would have been queued is dropped, and counted
            self.counters.bars_dropped.inc(bars)
            return
        now = time.monotonic()
        oldest = client.backlog.oldest()
        behind = 0.0 if oldest is None else now - oldest
        if behind <= self.limits.backlog_seconds and client.backlog.push(frame, bars, now):
            client.wake.set()
            return
        client.cut_off = True
        self.counters.slow_disconnects.inc()
        log.warning(
            "client %d from %s is too slow: %d bytes unsent for %.1fs (bounds %d bytes, %gs); "
            "closing with 1013",
            client.id,
            _peer(client.ws),
            client.backlog.bytes + len(frame),
            behind,
            self.limits.backlog_bytes,
            self.limits.backlog_seconds,
        )
        self.counters.bars_dropped.inc(client.backlog.clear() + bars)
        self._spawn(client.ws.close(CLOSE_TRY_AGAIN_LATER, "backlog bound passed: read faster"))

    async def _write(self, client: Client) -> None:
        ws = client.ws
        try:
            while True:
                await client.wake.wait()
                client.wake.clear()
                while (queued_at := client.backlog.oldest()) is not None:
                    item = client.backlog.pop()
                    assert item is not None
                    frame, bars = item
                    try:
                        await ws.send(frame, text=True)
                    except (ConnectionClosed, asyncio.CancelledError):
                        self.counters.bars_dropped.inc(bars)  # out of the backlog, not sent
                        raise
                    self.counters.frames_sent.inc()
                    self.counters.bars_sent.inc(bars)
                    if bars:
                        self.counters.delivery.observe(time.monotonic() - queued_at, bars)
                if client.close_after is not None:
                    await ws.close(*client.close_after)
                    return
        except ConnectionClosed:
            pass

    async def serve(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        assert not ws.protocol.extensions, "frames are serialized once: no extension may apply"
        client = Client(
            next(self._ids),
            ws,
            ClientSession(self.tokens, self.limits, loop.time()),
            Backlog(self.limits.backlog_bytes),
        )
        self.clients[client.id] = client
        self.counters.connections.inc()
        log.info("client %d joined from %s (%d clients)", client.id, _peer(ws), len(self.clients))
        self.push(client, encode_events([CONNECTED]), 0)
        writer = self._spawn(self._write(client))
        address = ws.remote_address[0] if ws.remote_address else ""
        auth_timer = loop.call_later(self.limits.auth_timeout, self._auth_timed_out, client)
        try:
            async for frame in ws:
                if self.tokens and not client.session.authenticated:
                    retry_in = self.throttle.retry_in(address, loop.time())
                    if retry_in:  # too many failures from its address: refused unchecked
                        self.counters.auth_throttled.inc()
                        self.push(client, encode_events([auth_throttled(retry_in)]), 0)
                        client.close_after = (CLOSE_POLICY_VIOLATION, "authentication failed")
                        client.wake.set()
                        break
                outcome = client.session.receive(frame, loop.time(), self.links.catalog)
                if AUTH_FAILED in outcome.events:
                    self.counters.auth_failures.inc()
                    self.throttle.failed(address, loop.time())
                self.counters.bad_requests.inc(outcome.bad_requests)
                if outcome.events:
                    self.push(client, encode_events(outcome.events), 0)
                for command in outcome.commands:
                    if isinstance(command, Subscribe):
                        self._open(client, command)
                    elif isinstance(command, Unsubscribe):
                        if self.fanout.unsubscribe(client, command.channel):
                            self.links.unroute(command.channel)
                        self.feed_changed(only=client)  # its feed may be whole without it
                if outcome.close is not None:
                    client.close_after = outcome.close
                    client.wake.set()
                    break
        except ConnectionClosed:
            pass
        finally:
            auth_timer.cancel()
            close_sent = ws.protocol.close_sent
            if close_sent is not None and close_sent.code == CLOSE_TOO_BIG:
                self.counters.bad_requests.inc()
            elif close_sent is not None and close_sent.code == CLOSE_INTERNAL_ERROR:
                self.counters.keepalive_timeouts.inc()
                log.warning(
                    "client %d from %s stopped answering pings: closed (%s, %d bytes unsent)",
                    client.id,
                    _peer(ws),
                    close_sent.reason,
                    client.backlog.bytes,
                )
            if client.close_after is not None:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOSE_TIMEOUT + 0.5):
                        await asyncio.shield(writer)
            writer.cancel()
            del self.clients[client.id]
            self.links.feed.forget_client(client)
            for channel in self.fanout.remove_client(client):
                self.links.unroute(channel)
            self.counters.bars_dropped.inc(client.backlog.clear())
            log.info(
                "client %d left (code %s; %d clients)",
                client.id,
                ws.close_code,
                len(self.clients),
            )

    def _auth_timed_out(self, client: Client) -> None:
        if client.session.authenticated or client.close_after is not None:
            return
        self.counters.bad_requests.inc()
        self.push(client, encode_events([AUTH_TIMEOUT]), 0)
        client.close_after = (CLOSE_POLICY_VIOLATION, "auth timeout")
        client.wake.set()

    def _open(self, client: Client, command: Subscribe) -> None:
        channel = command.channel
        if self.fanout.subscribe(client, channel):
            self.links.route(channel)
        self.feed_changed(only=client)  # joining while its feed is down: feed_down now
        if command.since is not None:
            seam = self.fanout.hold(client, channel)
            self._spawn(self._send_history(client, channel, seam, command.since))

    async def _send_history(self, client: Client, channel: Channel, seam: Seam, since: int) -> None:
        aggs = self.links.answering(channel)
        limit = self.limits.since_max_bars
        stored: list[tuple[int, bytes]] = []
        problem = None
        if not aggs:
            problem = f"{channel.name}: no aggregator serves it now; live bars follow"
        else:
            try:
                gathered = await gather_bars(aggs, self._ask, channel.name, since, None, limit)
                if gathered.status is not codec.HistoryStatus.OK:
                    problem = f"{channel.name}: history unavailable ({gathered.status.name}); live bars follow"
                else:
                    rows = gathered.bars.tolist()
                    parts = encode_bars(channel.interval, channel.symbol or "", rows)
                    stored = [(row[0], part) for row, part in zip(rows, parts, strict=True)]
                    if len(rows) >= limit:
                        problem = (
                            f"{channel.name}: since reaches past the {limit} most recent bars; "
                            "only those are sent"
                        )
                    elif gathered.incomplete is not None:
                        problem = (
                            f"{channel.name}: bars older than {rows[0][0] if rows else 'now'} "
                            "may be missing: another aggregator did not answer"
                        )
            except TimeoutError:
                problem = f"{channel.name}: history request timed out; live bars follow"
        if problem is not None and client.id in self.clients:
            self.push(client, encode_events([error(problem)]), 0)
        parts = self.fanout.complete_history(client, channel, seam, stored)
        if client.id not in self.clients:
            return
        for frame, count in chunked(parts, HISTORY_FRAME_BARS):
            self.push(client, frame, count)

    def feed_changed(self, only: Client | None = None) -> None:
        """Send each client (or ``only`` that one) the feed_down / feed_up it is due."""
        clients = [only] if only is not None else list(self.clients.values())
        channels = self.fanout.channels_of
        catalog = self.links.catalog
        for client, event in self.links.feed.statuses(
            ((client, channels(client)) for client in clients),
            catalog.aggs_for,
            catalog.symbols_of,
        ):
            self.counters.feed_statuses.inc()
            self.push(client, encode_events([event]), 0)


def _text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame, as a server sends it with no extensions."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"
