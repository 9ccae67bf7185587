"""The bridge's port: one asyncio protocol per accepted socket that speaks HTTP/1.1 and hands
WebSocket upgrades to websockets.

websockets' ``process_request`` sees one request per connection and cannot answer pipelined
requests, ``HEAD`` or other methods as RFC 9112 has them, so :class:`HttpFront` stands in
front of websockets' :class:`~websockets.asyncio.server.ServerConnection`
(``serve(..., create_connection=HttpServer.create_connection)``): it asks the
:class:`~polyfan.web.gate.Gate` on accept, parses with :class:`~polyfan.web.http.HttpConnection`
(h11), answers each request in order through the :class:`~polyfan.web.routes.Router`, and on a
WebSocket upgrade whose ``Origin`` is allowed switches the socket to the websockets connection
(``transport.set_protocol``) and feeds it the request's bytes: from then on websockets alone
reads and writes that socket, so the fan-out's hot path is as before. A malformed request gets
400, oversized headers 431, then the connection closes; a DEBUG line and
``polyfan_bridge_bad_requests_total``, never a traceback. An idle keep-alive connection is
closed after ``Limits.request_timeout``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from websockets.asyncio.server import ServerConnection

from polyfan.web.gate import Gate, reset
from polyfan.web.http import (
    Closed,
    HttpConnection,
    Malformed,
    Request,
    error_bytes,
    finish,
    json_response,
)
from polyfan.web.routes import Router

log = logging.getLogger("polyfan.bridge")

MAX_BUFFERED = 64 * 1024  # unparsed bytes held per connection before it stops being read
LINGER_S = 2.0  # after answering a malformed request, wait this long at most for the client's EOF


class HttpServer:
    """The HTTP side of one bridge process: its router, counters' hooks and open fronts."""

    def __init__(
        self,
        gate: Gate,
        router: Router,
        *,
        on_request: Callable[[], None] = lambda: None,
        on_bad_request: Callable[[], None] = lambda: None,
    ) -> None:
        self.gate = gate
        self.router = router
        self.on_request = on_request
        self.on_bad_request = on_bad_request
        self.fronts: set[HttpFront] = set()

    def create_connection(self, protocol: Any, server: Any, **kwargs: Any) -> HttpFront:
        """websockets' ``create_connection``: the asyncio protocol for one accepted socket."""
        return HttpFront(self, UpgradedConnection(protocol, server, **kwargs))

    def close(self) -> None:
        """Close every connection still speaking HTTP (websockets closes the upgraded ones)."""
        for front in list(self.fronts):
            front.close()


class UpgradedConnection(ServerConnection):
    """websockets' connection, started by an :class:`HttpFront` once a request upgrades."""

    front: HttpFront | None = None

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            if self.front is not None:
                self.front.handshake_over()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.front is not None:
            self.front.release()
        super().connection_lost(exc)


class HttpFront(asyncio.Protocol):
    """One accepted socket until it upgrades or closes (a :class:`~polyfan.web.gate.Door`)."""

    def __init__(self, server: HttpServer, ws: UpgradedConnection) -> None:
        self.server = server
        self.ws = ws
        self.http: HttpConnection | None = None  # from admission until the upgrade
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.address = ""
        self.request: Request | None = None  # the first request, once complete
        self.admitted = False
        self.released = False
        self.in_handshake = False
        self.upgraded = False
        self.draining = False  # a malformed request was answered: dropping input until EOF
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._drained: asyncio.Future[None] | None = None
        self._writing_paused = False
        self._reading_paused = False

    # -- asyncio's side ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer: Any = transport.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) and peer else str(peer)
        gate = self.server.gate
        if not gate.admit(self, self.address):
            reset(transport)
            return
        self.admitted = True
        self.in_handshake = True
        self.http = HttpConnection()  # not before: a refused flood costs as little as it can
        self.server.fronts.add(self)
        self._timer = self.loop.call_later(gate.limits.request_timeout, self._timed_out)
        self._task = self.loop.create_task(self._serve())

    def data_received(self, data: bytes) -> None:
        http = self.http
        if not self.admitted or self.released or self.draining or http is None:
            return
        http.receive_data(data)
        if http.buffered > MAX_BUFFERED and self.transport is not None:
            self._reading_paused = True
            self.transport.pause_reading()
        self._wake.set()

    def eof_received(self) -> bool:
        if self.draining:
            return False  # the answer is written: close
        if self.admitted and not self.released and self.http is not None:
            self.http.receive_data(b"")
            self._wake.set()
        return True  # answer what was asked, then close

    def pause_writing(self) -> None:
        self._writing_paused = True

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._drained is not None and not self._drained.done():
            self._drained.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.fronts.discard(self)
        self._cancel_timer()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
        self.resume_writing()
        self.release()

    # -- the gate's side -----------------------------------------------------------------------

    def handshake_over(self) -> None:
        """Upgraded, or its first request answered."""
        if self.in_handshake:
            self.in_handshake = False
            if not self.released:
                self.server.gate.handshake_over(self)

    def release(self) -> None:
        """The socket closed: count it out (once)."""
        if self.admitted and not self.released:
            self.released = True
            in_handshake = self.in_handshake
            self.in_handshake = False
            self.server.gate.closed(self, in_handshake=in_handshake)

    def close(self) -> None:
        if self.transport is not None and not self.upgraded:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        if self.transport is None or self.released:
            return
        if self.request is None:  # its first request did not come whole in time
            self.server.gate.counters.request_timeouts.inc()
            reset(self.transport)
        else:  # an idle keep-alive connection
            self.transport.close()

    # -- HTTP ----------------------------------------------------------------------------------

    async def _serve(self) -> None:
        transport = self.transport
        http = self.http
        assert transport is not None and http is not None
        try:
            while not transport.is_closing():
                event = http.next_event()
                if event is None:
                    if self._reading_paused:
                        self._reading_paused = False
                        transport.resume_reading()
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                if isinstance(event, Malformed):
                    self.server.on_bad_request()
                    log.debug("HTTP from %s: %d %s", self.address, event.status, event.reason)
                    self._refuse(transport, error_bytes(event.status, event.reason))
                    return
                if isinstance(event, Closed):
                    transport.close()
                    return
                self._cancel_timer()
                if self.request is None:
                    self.request = event
                if event.is_upgrade and self.server.router.origins.allows(event):
                    self._upgrade(transport, http.hand_over())
                    return
                if not await self._answer(transport, http, event):
                    return
                self._timer = self.loop.call_later(
                    self.server.gate.limits.request_timeout, self._timed_out
                )
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must not leave the socket open
            log.exception("unexpected error answering HTTP from %s", self.address)
            transport.abort()

    async def _answer(
        self, transport: asyncio.Transport, http: HttpConnection, request: Request
    ) -> bool:
        """Answer one request; False when the connection is to close."""
        self.server.on_request()
        try:
            response = await self.server.router.answer(request, self.address)
        except Exception:
            log.exception("unexpected error answering %s %s", request.method, request.target)
            response = json_response(500, {"error": "internal error"})
            response.headers.append(("Connection", "close"))
            response = finish(request, response)
        if transport.is_closing():
            return False
        transport.write(http.send(response))
        self.handshake_over()
        if http.must_close():
            transport.close()
            return False
        if self._writing_paused:
            self._drained = self.loop.create_future()
            await self._drained
        return not transport.is_closing()

    def _refuse(self, transport: asyncio.Transport, answer: bytes) -> None:
        """Answer a malformed request and close: our side first, then theirs once the client
        has read (what it still sends is dropped: closing with unread input would send an RST
        that can destroy the answer before the client reads it), at most LINGER_S later."""
        self.draining = True
        transport.write(answer)
        if transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the client has gone already (ENOTCONN): nothing is left to say
                transport.abort()
                return
        self._cancel_timer()
        self._timer = self.loop.call_later(LINGER_S, transport.abort)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()

    def _upgrade(self, transport: asyncio.Transport, data: bytes) -> None:
        """Give the socket, and the bytes of the upgrade request onwards, to websockets.

        The front stays as the gate's record of the connection (websockets' connection tells
        it when the handshake is over and when the socket closes); what it needed for HTTP is
        let go, so 5,000 clients hold no parser, task or event for the collector to walk."""
        self.upgraded = True
        self.server.fronts.discard(self)
        self.http = None
        self._task = None
        ws = self.ws
        del self.ws
        ws.front = self
        transport.set_protocol(ws)
        ws.connection_made(transport)
        if self._reading_paused:
            self._reading_paused = False
            transport.resume_reading()
        ws.data_received(data)
