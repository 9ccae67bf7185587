"""The bridge's door: carries out :mod:`polyfan.web.admission`'s decision for every new connection.

The bridge's HTTP front (:class:`polyfan.web.server.HttpFront`, the asyncio protocol of every
accepted socket) asks the :class:`Gate` in ``connection_made``, before it reads a byte. A refused
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
from typing import TYPE_CHECKING, Protocol

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
    """Admission for one bridge process: counts in, and the connections in the handshake."""

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
        self.handshaking: dict[str, dict[Door, None]] = {}
        self._flush: asyncio.TimerHandle | None = None

    def collect(self) -> None:
        self.counters.handshakes.value = self.admission.handshakes
        self.counters.connections.value = self.admission.connections

    def admit(self, connection: Door, address: str) -> bool:
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
        if victim.transport is not None:
            reset(victim.transport)

    def _forget(self, connection: Door) -> None:
        waiting = self.handshaking[connection.address]
        del waiting[connection]
        if not waiting:
            del self.handshaking[connection.address]

    def handshake_over(self, connection: Door) -> None:
        self._forget(connection)
        self.admission.handshake_over(connection.address)

    def closed(self, connection: Door, *, in_handshake: bool) -> None:
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


class Door(Protocol):
    """A connection as the gate sees it (:class:`polyfan.web.server.HttpFront`)."""

    address: str
    released: bool
    loop: asyncio.AbstractEventLoop

    @property
    def request(self) -> object | None:
        """Its first HTTP request, None until it is complete."""

    @property
    def transport(self) -> asyncio.BaseTransport | None: ...


def reset(transport: asyncio.BaseTransport) -> None:
    """Close at once with a RST: the kernel frees the socket without FIN_WAIT or TIME_WAIT."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    transport.abort()  # type: ignore[attr-defined]
