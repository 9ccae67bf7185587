"""The bridge's door: carries out :mod:`polyfan.web.admission`'s decision for every new connection.

A shell around websockets' asyncio server (``serve(..., create_connection=...)``): its
:class:`~websockets.asyncio.server.ServerConnection` subclass asks the :class:`Gate` in
``connection_made``, before websockets starts its handler task or reads a byte. A refused
connection is reset at once (``SO_LINGER`` 0, then ``abort()``: no FIN_WAIT, no TIME_WAIT),
counted and logged, rate-limited; it never holds a task or a buffer. An admitted one is closed
if its HTTP request is not complete within ``Limits.request_timeout``, and websockets'
``open_timeout`` bounds the whole handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import socket
import struct
from typing import TYPE_CHECKING, Any

from websockets.asyncio.connection import Connection
from websockets.asyncio.server import ServerConnection

from polyfan.web.admission import Admission, Admit, Refusal, RefusalLog

if TYPE_CHECKING:
    from polyfan.fanout.protocol import Limits
    from polyfan.metrics import Metric, Registry

log = logging.getLogger("polyfan.bridge")

LISTEN_BACKLOG = 4096  # listen() backlog, and the most sockets asyncio accepts in one go
REFUSAL_LOG_EVERY = 5.0  # seconds between WARNING lines about refused connections
_LINGER_RESET = struct.pack("ii", 1, 0)


class GateCounters:
    """Counters of the door; registered with the bridge's (so ``--workers`` sums them)."""

    def __init__(self, registry: Registry) -> None:
        self.refused = registry.counter(
            "polyfan_bridge_refused_connections_total",
            "New connections closed at once, for any of the reasons counted below.",
        )
        self.by_reason: dict[Refusal, Metric] = {
            Refusal.ADDRESS_HANDSHAKES: registry.counter(
                "polyfan_bridge_refused_address_handshakes_total",
                "New connections refused: their address had max_handshakes_per_address "
                "connections in the handshake.",
            ),
            Refusal.ADDRESS_CONNECTIONS: registry.counter(
                "polyfan_bridge_refused_address_connections_total",
                "New connections refused: their address had max_connections_per_address "
                "connections.",
            ),
            Refusal.HANDSHAKES: registry.counter(
                "polyfan_bridge_refused_handshakes_total",
                "New connections refused: max_handshakes connections were in the handshake.",
            ),
            Refusal.FILES: registry.counter(
                "polyfan_bridge_refused_open_files_total",
                "New connections refused: open files were within the headroom of RLIMIT_NOFILE.",
            ),
        }
        self.evicted = registry.counter(
            "polyfan_bridge_handshakes_evicted_total",
            "Connections in the handshake closed to make room for one from an address "
            "holding fewer handshakes.",
        )
        self.request_timeouts = registry.counter(
            "polyfan_bridge_handshake_timeouts_total",
            "Connections closed because their HTTP request was not complete within "
            "request_timeout.",
        )
        self.handshakes = registry.gauge(
            "polyfan_bridge_handshakes", "Connections accepted and not yet upgraded or answered."
        )
        self.connections = registry.gauge(
            "polyfan_bridge_open_connections",
            "TCP connections held: in the handshake or WebSocket clients.",
        )


def open_files() -> int:
    """Files this process has open now (0 where /proc is missing)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:
        return 0


def connection_budget(limits: Limits, backlog: int = LISTEN_BACKLOG) -> int:
    """How many client connections fit under ``RLIMIT_NOFILE``: the soft limit less the files
    open now (the listening socket, ZeroMQ's, the log ...), the headroom, and the listen
    backlog (asyncio accepts up to that many sockets at once before any can be refused);
    at least a quarter of the limit."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(soft // 4, soft - open_files() - limits.open_files_headroom - backlog)


class Gate:
    """Admission for one bridge process; ``connection_class`` goes to websockets' ``serve``."""

    def __init__(self, limits: Limits, counters: GateCounters, max_connections: int) -> None:
        self.limits = limits
        self.counters = counters
        self.admission = Admission(
            max_connections=max_connections,
            max_handshakes=limits.max_handshakes,
            max_handshakes_per_address=limits.max_handshakes_per_address,
            max_connections_per_address=limits.max_connections_per_address,
        )
        self.refusals = RefusalLog(REFUSAL_LOG_EVERY)
        # address -> its connections in the handshake, oldest first (the eviction order)
        self.handshaking: dict[str, dict[GatedConnection, None]] = {}
        self._flush: asyncio.TimerHandle | None = None
        gate = self

        class BridgeConnection(GatedConnection):
            pass

        BridgeConnection.gate = gate
        self.connection_class: type[ServerConnection] = BridgeConnection

    def collect(self) -> None:
        self.counters.handshakes.value = self.admission.handshakes
        self.counters.connections.value = self.admission.connections

    def admit(self, connection: GatedConnection, address: str) -> bool:
        decision = self.admission.admit(address)
        if isinstance(decision, Refusal):
            self.counters.refused.inc()
            self.counters.by_reason[decision].inc()
            self._note(decision.value, address, connection.loop)
            return False
        self._evict(decision)
        self.handshaking.setdefault(address, {})[connection] = None
        return True

    def _evict(self, decision: Admit) -> None:
        if decision.evict is None:
            return
        waiting = self.handshaking[decision.evict]
        # the oldest that has not sent its request; else the oldest
        victim = next((c for c in waiting if c.request is None), next(iter(waiting)))
        self._forget(victim)
        victim.released = True
        self.counters.evicted.inc()
        self._note("evicted", decision.evict, victim.loop)
        _reset(victim.transport)

    def _forget(self, connection: GatedConnection) -> None:
        waiting = self.handshaking[connection.address]
        del waiting[connection]
        if not waiting:
            del self.handshaking[connection.address]

    def handshake_over(self, connection: GatedConnection) -> None:
        self._forget(connection)
        self.admission.handshake_over(connection.address)

    def closed(self, connection: GatedConnection, *, in_handshake: bool) -> None:
        if in_handshake:
            self._forget(connection)
        self.admission.closed(connection.address, in_handshake=in_handshake)

    def _note(self, reason: str, address: str, loop: asyncio.AbstractEventLoop) -> None:
        line = self.refusals.refused(reason, address, loop.time())
        if line is not None:
            log.warning("%s", line)
        due = self.refusals.due()
        if due is not None and self._flush is None:
            self._flush = loop.call_at(due, self._flush_log, loop)

    def _flush_log(self, loop: asyncio.AbstractEventLoop) -> None:
        self._flush = None
        line = self.refusals.flush(loop.time())
        if line is not None:
            log.warning("%s", line)

    def close(self) -> None:
        if self._flush is not None:
            self._flush.cancel()
            self._flush = None


class GatedConnection(ServerConnection):
    """websockets' server connection, admitted by a :class:`Gate` before it starts."""

    gate: Gate
    address = ""
    admitted = False
    released = False  # counted out already (evicted, or closed)
    in_handshake = False
    _request_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer: Any = transport.get_extra_info("peername")
        self.address = peer[0] if isinstance(peer, tuple) and peer else str(peer)
        if not self.gate.admit(self, self.address):
            # asyncio's side of the connection only: no handler task, nothing read.
            Connection.connection_made(self, transport)
            _reset(transport)
            return
        self.admitted = True
        self.in_handshake = True
        super().connection_made(transport)
        self._request_timer = self.loop.call_later(
            self.gate.limits.request_timeout, self._request_timed_out
        )

    def _request_timed_out(self) -> None:
        self._request_timer = None
        if self.request is None and self.in_handshake and not self.released:
            self.gate.counters.request_timeouts.inc()
            _reset(self.transport)

    async def handshake(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().handshake(*args, **kwargs)
        finally:
            self._handshake_over()

    def _handshake_over(self) -> None:
        if self._request_timer is not None:
            self._request_timer.cancel()
            self._request_timer = None
        if self.in_handshake:
            self.in_handshake = False
            if not self.released:
                self.gate.handshake_over(self)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.admitted and not self.released:
            self.released = True
            in_handshake = self.in_handshake
            self.in_handshake = False
            if self._request_timer is not None:
                self._request_timer.cancel()
                self._request_timer = None
            self.gate.closed(self, in_handshake=in_handshake)
        super().connection_lost(exc)


def _reset(transport: asyncio.BaseTransport) -> None:
    """Close at once with a RST: the kernel frees the socket without FIN_WAIT or TIME_WAIT."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]
