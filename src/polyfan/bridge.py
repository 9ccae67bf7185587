"""``polyfan bridge``: bars from the aggregators to WebSocket clients, plus HTTP on the same port.

The shell around :mod:`polyfan.fanout.protocol` (what clients say), :mod:`polyfan.fanout.subscriptions` (who gets
what) and :mod:`polyfan.fanout.replicas` (which aggregator's copy of a bar goes out when several
serve a channel). It moves bytes and decides nothing about content:

- one ZeroMQ XSUB socket per ``--sub`` aggregator, subscribed to ``_ctl`` (the aggregator's
  ANNOUNCE says which intervals and symbols it serves) and to this bridge's reply topic; bar
  topics are subscribed when a channel gets its first client and unsubscribed when it loses its
  last. History requests go up the same socket (docs/architecture.md, "Requests to an agg").
- one reader task per aggregator drains the waiting messages, encodes each bar once and, per
  group of clients with the same channels, builds one JSON frame and serializes it once as a
  WebSocket frame. A client that keeps up gets it written straight to its socket; otherwise it
  goes into the client's bounded :class:`~polyfan.fanout.subscriptions.Backlog`, drained by the client's
  writer task. No client is ever awaited by the loop that serves the others; a client whose
  backlog passes its bound is closed with 1013.
- HTTP is :mod:`polyfan.web`'s (:mod:`~polyfan.web.server` in front of websockets, h11
  parsing, :mod:`~polyfan.web.routes` answering); this shell gives it the handlers that read
  the live state (``/api/bars``, ``/api/symbols``, ``/api/info``, ``/healthz``, ``/metrics``).
  Any WebSocket upgrade on any path is the client protocol.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import resource
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import zmq
import zmq.asyncio
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from polyfan import curve
from polyfan.bars.outages import describe
from polyfan.config import BridgeConfig
from polyfan.errors import ConfigError, WireError
from polyfan.fanout.feedstatus import OUTAGE, SILENT, FeedStatus
from polyfan.fanout.protocol import (
    AUTH_TIMEOUT,
    CLOSE_POLICY_VIOLATION,
    CLOSE_TOO_BIG,
    CLOSE_TRY_AGAIN_LATER,
    CONNECTED,
    AggServes,
    BarsQuery,
    Catalog,
    Channel,
    ClientSession,
    Limits,
    Subscribe,
    Unsubscribe,
    encode_bars,
    encode_events,
    error,
    join_events,
    parse_bar_topic,
    parse_bars_query,
)
from polyfan.fanout.replicas import STAND_IN_WAIT, Replica, Replicas
from polyfan.fanout.subscriptions import Arrival, Backlog, Fanout, Seam, chunked
from polyfan.lifecycle import serve_until_stopped
from polyfan.metrics import CONTENT_TYPE, Registry, listen
from polyfan.web.gate import LISTEN_BACKLOG, Gate, GateCounters, connection_budget
from polyfan.web.http import Origins, Response, json_response
from polyfan.web.routes import Handler, Router
from polyfan.web.server import HttpServer
from polyfan.wire import codec
from polyfan.workers import Worker, run_workers

log = logging.getLogger("polyfan.bridge")
# websockets logs every connection and HTTP request at INFO: per-message detail for a server
# with thousands of clients, so it is shown only when debugging.
_ws_log = logging.getLogger("polyfan.bridge.ws")
_DATA_OPCODES = (Opcode.TEXT, Opcode.BINARY, Opcode.CONT)


def _without_client_data(record: logging.LogRecord) -> bool:
    """Debugging, websockets logs each frame it receives: a client's auth token with it. Keep
    its lines about control frames and the connection; drop those that carry client data."""
    args = record.args
    return not (
        record.msg == "< %s"
        and isinstance(args, tuple)
        and bool(args)
        and isinstance(args[0], Frame)
        and args[0].opcode in _DATA_OPCODES
    )


_ws_log.addFilter(_without_client_data)

WARN_EVERY_S = 5.0  # a continuing problem is one WARNING per this many seconds, with its count
REQUEST_TIMEOUT = 5.0  # seconds to wait for an aggregator's history or symbols reply
HEARD_WITHIN = 5.0  # an aggregator heard from this recently counts as up (announce: every 1 s)
SILENT_AFTER = 2.0  # not heard for this long (it relays the clock 10 times a second, announces
# every second): its channels' feed is down unless a replica carries them (feed_down)
WATCH_EVERY = 0.25  # seconds between checks of who is heard
RESTARTED = "the aggregator restarted: the bars and history it held went with it"
READ_POLL_MS = 100  # the reader re-checks its socket at least this often (see Bridge._read)
DRAIN_MAX_BARS = 2000  # bars handled per pass before clients get their frames
COALESCE_MS = 1  # a pass takes the bars that follow its first with gaps under this ...
COALESCE_MAX_S = 0.005  # ... for at most this long
# polyfan_bridge_delivery_seconds's bucket bounds
DELIVERY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
)  # fmt: skip
HISTORY_FRAME_BARS = 1000  # bars per frame when sending history
STATS_EVERY = 10.0  # seconds between throughput log lines
DIRECT_WRITE_BELOW = 64 * 1024  # write straight to a client's socket below this many buffered bytes
CLOSE_TIMEOUT = 1.0  # websockets' closing handshake; keeps shutdown under 2 s
OPEN_TIMEOUT = 10.0  # the whole opening handshake, an HTTP answer included (over REQUEST_TIMEOUT)
TLS_HANDSHAKE_TIMEOUT = (
    10.0  # a TLS handshake not done by then is dropped (asyncio's default: 60 s)
)
PING_INTERVAL = 20.0  # keepalive: a ping this often ...
PING_TIMEOUT = 20.0  # ... and a client that has not answered it this long after is closed (1011)
CLOSE_INTERNAL_ERROR = 1011  # websockets' close code for a keepalive timeout
PASS_LOG_ENV = "POLYFAN_BRIDGE_PASS_LOG"  # a file to log every fan-out pass to (benchmarks)


class Counters:
    """The bridge's Prometheus counters (CONTRACT §6 plus what it receives and loses)."""

    def __init__(self, registry: Registry) -> None:
        self.clients = registry.gauge("polyfan_bridge_clients", "Connected WebSocket clients.")
        self.bars_sent = registry.counter(
            "polyfan_bridge_bars_sent_total", "Bars written to WebSocket clients (per client)."
        )
        self.slow_disconnects = registry.counter(
            "polyfan_bridge_slow_disconnects_total",
            "Clients closed with 1013 because their backlog passed its bound.",
        )
        self.bad_requests = registry.counter(
            "polyfan_bridge_bad_requests_total",
            "Client frames and HTTP requests answered with an error (or a 1008/1009 close).",
        )
        self.http_unauthorized = registry.counter(
            "polyfan_bridge_http_unauthorized_total",
            "HTTP requests refused with 401: --token is set and none of them came with it.",
        )
        self.bars_received = registry.counter(
            "polyfan_bridge_bars_received_total", "Bars received from aggregators."
        )
        self.frames_sent = registry.counter(
            "polyfan_bridge_frames_sent_total", "WebSocket frames written to clients."
        )
        self.bars_redundant = registry.counter(
            "polyfan_bridge_bars_redundant_total",
            "Bars received and not forwarded because clients had them already (another "
            "aggregator serving the channel sent them first) or will get them whole from "
            "another aggregator (this one started later and may have missed trades).",
        )
        self.keepalive_timeouts = registry.counter(
            "polyfan_bridge_keepalive_timeouts_total",
            "Clients closed (1011) because they did not answer a ping in time.",
        )
        self.bars_unwanted = registry.counter(
            "polyfan_bridge_bars_unwanted_total",
            "Bars received for a channel no client is on any more (sent before the aggregator "
            "saw the unsubscribe).",
        )
        self.bars_stood_in = registry.counter(
            "polyfan_bridge_bars_stood_in_total",
            "Bars forwarded from an aggregator that started listening after they began, "
            "because the whole copy another aggregator should have sent did not come first.",
        )
        self.bars_dropped = registry.counter(
            "polyfan_bridge_bars_dropped_total",
            "Bars for a client that were never written: it was cut off, left or was closing.",
        )
        self.gaps = registry.counter(
            "polyfan_bridge_gaps_total",
            "Bar messages lost between aggregator and bridge (from sequence numbers).",
        )
        self.wire_errors = registry.counter(
            "polyfan_bridge_wire_errors_total", "ZeroMQ messages that did not decode."
        )
        self.history_requests = registry.counter(
            "polyfan_bridge_history_requests_total", "Requests sent to aggregators."
        )
        self.request_timeouts = registry.counter(
            "polyfan_bridge_request_timeouts_total", "Aggregator requests that got no reply."
        )
        self.bad_replies = registry.counter(
            "polyfan_bridge_bad_replies_total",
            "Replies on this bridge's reply route that answer no request it has waiting, or "
            "come from another aggregator, or are of another kind or for another channel than "
            "it asked: ignored.",
        )
        self.connections = registry.counter(
            "polyfan_bridge_connections_total", "WebSocket connections accepted."
        )
        self.passes = registry.counter(
            "polyfan_bridge_delivery_passes_total", "Fan-out passes that delivered bars."
        )
        self.pass_seconds = registry.counter(
            "polyfan_bridge_delivery_seconds_total",
            "Wall time spent in fan-out passes (from the first bar read to the last write).",
        )
        self.http_requests = registry.counter(
            "polyfan_bridge_http_requests_total", "HTTP requests answered."
        )
        self.outages = registry.counter(
            "polyfan_bridge_outages_total",
            "Aggregators gone down: reporting an outage of the feed behind them, not heard for "
            f"{SILENT_AFTER:g} s, or restarted (their history lost with them).",
        )
        self.feed_statuses = registry.counter(
            "polyfan_bridge_feed_statuses_total",
            "feed_down and feed_up statuses sent to clients.",
        )
        self.delivery = registry.histogram(
            "polyfan_bridge_delivery_seconds",
            "Per live bar written to a client: from its arrival at the bridge (the oldest bar "
            "of its fan-out pass) to its write to the client's socket (the pass's write, or "
            "from its client's backlog: from its queuing to its write).",
            DELIVERY_BUCKETS,
        )
        self.gate = GateCounters(registry)


@dataclass(eq=False)
class Agg:
    """One aggregator: its XSUB socket and what it announced."""

    endpoint: str
    socket: zmq.asyncio.Socket
    sync: zmq.Socket[bytes]  # the same socket, sync: only the reader drains with it
    gaps: codec.GapCounter = field(default_factory=codec.GapCounter)
    announce: dict[str, Any] | None = None
    replica: Replica = field(default_factory=Replica)  # what the replica rules know of it
    upstream_up: bool | None = None
    was_heard: bool | None = None  # as last reported by the watcher (None: not yet)
    topics: set[bytes] = field(default_factory=set)  # subscribed ZeroMQ prefixes
    seen: set[str] = field(default_factory=set)  # bar topics received (for gap counting)
    clock: int | None = None  # the feed clock it last relayed
    silent_session: int | None = None  # its session when it fell silent (None: it is heard)
    silent: bool = False

    @property
    def heard_at(self) -> float | None:
        """Monotonic time of its last message."""
        return self.replica.heard_at

    @property
    def whole_after(self) -> float:
        """Its bars with ``s`` at or before this may be partial (announce "from")."""
        return self.replica.whole_after

    def session(self) -> int | None:
        value = (self.announce or {}).get("session")
        return value if isinstance(value, int) else None

    def is_heard(self) -> bool:
        return self.replica.is_heard(time.monotonic(), HEARD_WITHIN)

    def send(self, frame: bytes) -> None:
        """Subscriptions and requests upstream (the XSUB's send queue is unbounded: see
        ``start``).

        Through the asyncio socket, not the sync one: ZeroMQ's FD is edge-triggered and a send
        processes pending commands, which can consume the edge the reader's ``poll`` waits
        for; pyzmq's asyncio ``send`` re-checks the socket for its waiting pollers.
        """
        sent = cast("asyncio.Future[Any]", self.socket.send(frame, zmq.NOBLOCK))
        if sent.done() and sent.exception() is not None:
            log.warning("upstream message to %s not sent: %s", self.endpoint, sent.exception())

    def subscribe(self, topic: bytes) -> None:
        if topic not in self.topics:
            self.topics.add(topic)
            self.send(b"\x01" + topic)

    def unsubscribe(self, topic: bytes) -> None:
        if topic in self.topics:
            self.topics.discard(topic)
            self.send(b"\x00" + topic)

    def status(self) -> dict[str, Any]:
        announce = self.announce or {}
        symbols = announce.get("symbols")
        return {
            "endpoint": self.endpoint,
            "heard": self.is_heard(),
            "seconds_since_heard": (
                None if self.heard_at is None else round(time.monotonic() - self.heard_at, 3)
            ),
            "session": announce.get("session"),
            "intervals": announce.get("intervals"),
            "symbols": symbols,
            "grace": announce.get("grace"),
            "history": announce.get("history"),
            "upstream_up": self.upstream_up,
            "gaps": self.gaps.lost,
        }


@dataclass(eq=False)
class Pending:
    """A request sent to an agg, waiting for its reply."""

    future: asyncio.Future[codec.Message]
    agg: Agg
    kind: codec.Kind
    channel: str
    check: int  # codec.channel_check of the channel asked


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


class Bridge:
    """The running bridge; ``await start()``, then ``await stop()``."""

    def __init__(
        self, config: BridgeConfig, limits: Limits | None = None, worker: Worker | None = None
    ) -> None:
        self.config = config
        self.worker = worker
        self.limits = limits or Limits(
            max_handshakes=config.max_handshakes,
            max_handshakes_per_address=config.max_handshakes_per_address,
            max_connections_per_address=config.max_connections_per_address,
        )
        self.registry = Registry()
        self.counters = Counters(self.registry)
        self.catalog: Catalog[Agg] = Catalog()
        self.feed: FeedStatus[Agg, Client] = FeedStatus()
        self.fanout: Fanout[Client] = Fanout()
        self.clients: dict[int, Client] = {}
        self.aggs: list[Agg] = []
        self._watches: list[curve.HandshakeWatch] = []  # CURVE handshakes, per --sub
        # 128 random bits: the agg answers only the peer that subscribes the route itself, and
        # nobody can subscribe a shorter prefix of it (docs/limits.md).
        self.reply_id = secrets.token_hex(codec.REPLY_ROUTE_HEX // 2)
        self.reply_topic = codec.reply_topic(self.reply_id)
        self._requests: dict[int, Pending] = {}
        self._bad_replies_warned: tuple[float, float] = (-math.inf, 0.0)
        self._ids = itertools.count(1)
        self._context = zmq.asyncio.Context()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Server | None = None
        self._gate: Gate | None = None
        self._http: HttpServer | None = None
        self._channel_aggs: dict[Channel, list[Agg]] = {}
        self.replicas = Replicas(self._replicas_serving)  # the replica rules' state
        self._arrivals: list[Arrival] = []  # bars forwarded, not yet delivered (_forward)
        self._arrived_at = 0.0  # time.monotonic() when the oldest of them arrived
        self.debug = log.isEnabledFor(logging.DEBUG)
        # bench/bench_bridge.py's hook: one line per fan-out pass (pid, perf_counter of its
        # first read and of its last write, frames written, bars), appended to this file.
        pass_log = os.environ.get(PASS_LOG_ENV)
        self._pass_log = None if not pass_log else open(pass_log, "a", buffering=1)  # noqa: SIM115
        self._pid = os.getpid()
        if not self.debug and _ws_log.level == logging.NOTSET:
            _ws_log.setLevel(logging.WARNING)
        self.registry.on_collect(self._collect)

    # -- life cycle ----------------------------------------------------------------------------

    def _tls_context(self) -> ssl.SSLContext | None:
        """``--tls-cert/--tls-key``: a server context (TLS 1.2 or later), or None."""
        cert, key = self.config.tls_cert, self.config.tls_key
        if cert is None or key is None:
            return None
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"--tls-cert/--tls-key: cannot load {cert} with {key}: {exc}"
            ) from exc
        return context

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self) -> None:
        try:
            tls = self._tls_context()  # first: a bad certificate is a usage error
        except ConfigError:
            await self.stop()
            raise
        client = curve.Client(self.config.curve, "bridge", list(self.config.sub))
        for index, endpoint in enumerate(self.config.sub):
            socket = self._context.socket(zmq.XSUB)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.RCVHWM, 100_000)
            # Unbounded: on a reconnect ZeroMQ replays every subscription at once and drops
            # those beyond the send high-water mark, which would leave channels silently dead
            # after an agg restart. What queues here is bounded by the channels subscribed and
            # the clients' request rate limits.
            socket.setsockopt(zmq.SNDHWM, 0)
            watch = client.watch(socket)
            if watch is not None:
                self._watches.append(watch)
            try:
                client.connect(socket, index, endpoint)
            except zmq.ZMQError as exc:
                socket.close()
                raise ConfigError(f"--sub: cannot connect to {endpoint}: {exc}") from exc
            agg = Agg(endpoint, socket, zmq.Socket.shadow(socket.underlying))
            agg.subscribe(codec.CONTROL_TOPIC)
            agg.subscribe(self.reply_topic)
            self.aggs.append(agg)
            self._spawn(self._read(agg))
        host, port = self.config.listen
        # Every new connection is admitted or refused before it costs more than its socket
        # (polyfan.web.gate; caps per process, docs/limits.md).
        gate = Gate(self.limits, self.counters.gate, connection_budget(self.limits))
        self.registry.on_collect(gate.collect)
        self._gate = gate
        # HTTP/1.1 in front of websockets (polyfan.web.server): requests are answered there,
        # an upgrade is handed to websockets' connection.
        router = Router(
            self._http_handlers(),
            Origins(self.config.allow_origins, scheme="http" if tls is None else "https"),
            on_bad_request=self.counters.bad_requests.inc,
            tokens=self.config.tokens,
            on_unauthorized=self.counters.http_unauthorized.inc,
        )
        self._http = HttpServer(
            gate,
            router,
            on_request=self.counters.http_requests.inc,
            on_bad_request=self.counters.bad_requests.inc,
        )
        try:
            self._server = await serve(
                self._serve_client,
                host,
                port,
                create_connection=cast(Any, self._http.create_connection),
                open_timeout=OPEN_TIMEOUT,
                compression=None,
                max_size=self.limits.max_frame_bytes,
                write_limit=64 * 1024,
                close_timeout=CLOSE_TIMEOUT,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                backlog=LISTEN_BACKLOG,
                logger=_ws_log,
                reuse_port=self.worker is not None,
                ssl=tls,
                ssl_handshake_timeout=None if tls is None else TLS_HANDSHAKE_TIMEOUT,
            )
        except OSError as exc:
            await self.stop()
            raise ConfigError(f"--listen: cannot listen on {host}:{port}: {exc.strerror}") from exc
        self._spawn(self._report())
        self._spawn(self._watch_aggs())
        if self.worker is not None:
            self._spawn(self._share_counters(self.worker))
            log.info("worker %d of %d serving", self.worker.index + 1, self.worker.count)
            return  # the supervisor logs ready: once every worker serves
        if not self.config.tokens:
            log.warning("no --token configured: any client auth is accepted")
        ws, web = ("wss", "https") if tls is not None else ("ws", "http")
        log.info(
            "ready: serving %s://%s:%d/ and %s://%s:%d/ from %d aggregator(s): %s",
            ws,
            host,
            self.port,
            web,
            host,
            self.port,
            len(self.aggs),
            ", ".join(self.config.sub),
        )

    async def stop(self) -> None:
        if self._http is not None:
            self._http.close()
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT + 0.3):
                    await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for agg in self.aggs:
            agg.socket.close(linger=0)
        for watch in self._watches:
            watch.close()
        self._context.term()
        if self._gate is not None:
            self._gate.close()
        if self._pass_log is not None:
            self._pass_log.close()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("unexpected error in %s", task.get_coro(), exc_info=task.exception())

    async def _report(self) -> None:
        last = self.registry.values()
        while True:
            await asyncio.sleep(STATS_EVERY)
            now = self.registry.values()
            delta = {k: int(now[k] - last[k]) for k in now}
            last = now
            log.info(
                "clients=%d aggs_heard=%d/%d; last %gs: bars in=%d out=%d frames=%d gaps=%d "
                "slow=%d bad=%d",
                len(self.clients),
                sum(agg.is_heard() for agg in self.aggs),
                len(self.aggs),
                STATS_EVERY,
                delta["polyfan_bridge_bars_received_total"],
                delta["polyfan_bridge_bars_sent_total"],
                delta["polyfan_bridge_frames_sent_total"],
                delta["polyfan_bridge_gaps_total"],
                delta["polyfan_bridge_slow_disconnects_total"],
                delta["polyfan_bridge_bad_requests_total"],
            )

    async def _watch_aggs(self) -> None:
        """Say when an aggregator is not heard from, goes silent, or comes back; flush the
        stand-ins that waited in vain."""
        started = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_EVERY)
            if self.replicas.has_stand_ins():
                try:
                    self._flush_stand_ins()
                except Exception:  # a bug must not stop the watcher
                    log.exception("unexpected error sending stand-in bars")
            for agg in self.aggs:
                try:
                    self._watch_silence(agg)
                except Exception:  # a bug must not stop the watcher
                    log.exception("unexpected error watching %s", agg.endpoint)
                heard = agg.is_heard()
                if heard == agg.was_heard:
                    continue
                if heard:
                    if agg.was_heard is not None:
                        log.info("aggregator %s heard again", agg.endpoint)
                elif agg.was_heard:
                    log.warning("aggregator %s silent for %gs", agg.endpoint, HEARD_WITHIN)
                elif time.monotonic() - started < HEARD_WITHIN:
                    continue  # still starting
                else:
                    log.warning(
                        "nothing heard from aggregator %s in %gs: is it running there?",
                        agg.endpoint,
                        HEARD_WITHIN,
                    )
                agg.was_heard = heard

    def _watch_silence(self, agg: Agg) -> None:
        """An agg heard before and silent for SILENT_AFTER is down (its clients' feed too,
        unless a replica carries their channels) until it announces itself again."""
        if agg.heard_at is None:
            return
        if time.monotonic() - agg.heard_at >= SILENT_AFTER and not agg.silent:
            self._gone_silent(
                agg,
                "an aggregator of this feed is not heard",
                f"not heard for {SILENT_AFTER:g}s: its clients' feed is down unless a replica "
                "carries their channels",
            )

    def _gone_silent(self, agg: Agg, why: str, note: str) -> None:
        """``agg`` is down from the last clock it relayed (``why`` for its clients, ``note``
        for the log) until it announces itself again (:meth:`_heard_again`)."""
        agg.silent = True
        agg.silent_session = agg.session()
        s = agg.clock if agg.clock is not None else 0
        if self.feed.agg_down(agg, SILENT, s, why):
            self.counters.outages.inc()
            log.warning("aggregator %s %s", agg.endpoint, note)
            self._feed_changed()

    def _heard_again(self, agg: Agg, announce: dict[str, Any]) -> None:
        """A silent agg announces itself again (it announces every second): it is back,
        restarted if its session changed, once a restarted one has heard the proxy (its
        bars start then: "from")."""
        restarted = announce.get("session") != agg.silent_session
        if restarted and not isinstance(announce.get("from"), int):
            return  # not yet: a later announce says from when
        agg.silent = False
        e, why = self._back_from(agg, restarted)
        if self.feed.agg_up(agg, SILENT, e, why):
            log.info("aggregator %s heard again: %s", agg.endpoint, why)
            self._feed_changed()

    def _back_from(self, agg: Agg, restarted: bool) -> tuple[int, str]:
        """Where a silent or restarted agg's bars start again, and what was lost."""
        clock = agg.clock if agg.clock is not None else 0
        if not restarted:
            # An outage that began and ended while this bridge was cut off from the agg
            # (partitioned, not restarted) reached it only in the announce: the window told
            # to clients covers it.
            last = (agg.announce or {}).get("last_outage") or {}
            since = self.feed.down_since(agg)
            if isinstance(last.get("e"), int) and since is not None and last["e"] > since:
                clock = max(clock, int(last["e"]))
            return clock, "the aggregator is heard again"
        start = (agg.announce or {}).get("from")
        e = int(start) if isinstance(start, int) else clock
        return e, f"{RESTARTED}; it serves bars again from {e}"

    def _feed_changed(self, only: Client | None = None) -> None:
        """Send each client (or ``only`` that one) the feed_down / feed_up it is due."""
        clients = [only] if only is not None else list(self.clients.values())
        channels = self.fanout.channels_of
        for client, event in self.feed.statuses(
            ((client, channels(client)) for client in clients),
            self.catalog.aggs_for,
            self.catalog.symbols_of,
        ):
            self.counters.feed_statuses.inc()
            self._push(client, encode_events([event]), 0)

    async def _share_counters(self, worker: Worker) -> None:
        while True:
            worker.table.publish(worker.index, self.registry.values())
            await asyncio.sleep(0.25)

    def totals(self) -> dict[str, float]:
        """Counter values for the whole bridge: this process, or the sum over its workers."""
        values = self.registry.values()
        if self.worker is None:
            return values
        self.worker.table.publish(self.worker.index, values)
        return self.worker.table.totals()

    def _collect(self) -> None:
        self.counters.clients.value = len(self.clients)
        self.counters.gaps.value = sum(agg.gaps.lost for agg in self.aggs)

    # -- aggregators ---------------------------------------------------------------------------

    async def _read(self, agg: Agg) -> None:
        """Drain what is waiting (up to DRAIN_MAX_BARS bars), deliver one frame per client,
        yield so the writers run, repeat."""
        while True:
            # With a timeout, as a backstop: the ZeroMQ FD is edge-triggered, and a sync send on
            # the same socket could consume the edge a waiting poll needs, which left replies
            # and bars unread until the next edge (history 504s under the chart page's browser
            # tests). Agg.send now goes through the asyncio socket, which re-checks for its
            # pollers (test_requests_sent_while_the_reader_waits_never_leave_replies_unread).
            await agg.socket.poll(timeout=READ_POLL_MS)
            started = time.perf_counter()
            bars = 0
            while bars < DRAIN_MAX_BARS:
                try:
                    frame = agg.sync.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    # An aggregator sends a clock tick's bars back to back, one message per
                    # channel, but they reach this socket a few at a time: while they keep
                    # coming (a gap under COALESCE_MS, for at most COALESCE_MAX_S), take them
                    # into this pass, so that they go out in one pass, not one pass each. The
                    # wait is the asyncio socket's: other aggs, clients and HTTP run meanwhile.
                    if (
                        self._arrivals
                        and time.perf_counter() - started < COALESCE_MAX_S
                        and await agg.socket.poll(timeout=COALESCE_MS)
                    ):
                        continue
                    break
                try:
                    bars += self._received(agg, frame)
                except Exception:  # a bug must not stop the feed for every client
                    self.counters.wire_errors.inc()
                    log.exception("unexpected error handling a message from %s", agg.endpoint)
            if self._arrivals:  # this pass's bars, and any another reader queued meanwhile
                frames = self._deliver_queued()
                ended = time.perf_counter()
                self.counters.passes.inc()
                self.counters.pass_seconds.inc(ended - started)
                if self._pass_log is not None:
                    self._pass_log.write(f"{self._pid} {started!r} {ended!r} {frames} {bars}\n")
            await asyncio.sleep(0)

    def _received(self, agg: Agg, frame: bytes) -> int:
        """Handle one message; return how many bars it carried."""
        try:
            message = codec.decode(frame)
        except WireError as exc:
            self.counters.wire_errors.inc()
            if self.debug:
                log.debug("from %s: %s", agg.endpoint, exc)
            return 0
        agg.replica.heard(time.monotonic())
        kind = message.kind
        if kind is codec.Kind.BARS:
            self._bars_received(agg, message)
            return message.count
        if kind is codec.Kind.CLOCK:
            if message.count:
                clock = int(codec.records(message)["clock"].max())
                agg.clock = clock if agg.clock is None else max(agg.clock, clock)
        elif kind is codec.Kind.OUTAGE:
            self._outage_reported(agg, message)
        elif kind is codec.Kind.ANNOUNCE:
            self._announced(agg, message)
        elif kind is codec.Kind.HISTORY or kind is codec.Kind.SYMBOLS:
            self._replied(agg, message)
        elif kind is codec.Kind.UPSTREAM:
            state = int(codec.records(message)["state"][-1]) if message.count else None
            agg.upstream_up = state == codec.UPSTREAM_UP
        return 0

    def _bars_received(self, agg: Agg, message: codec.Message) -> None:
        parsed = parse_bar_topic(message.topic)
        if parsed is None:
            self.counters.wire_errors.inc()
            return
        interval, symbol = parsed
        records = codec.records(message)
        self.counters.bars_received.inc(len(records))
        topics = agg.topics
        if (message.topic + "\0").encode() not in topics and (
            b"%dMs." % interval not in topics
        ):  # in flight when its channel's last client left: not asked for, and no loss either
            self.counters.bars_unwanted.inc(len(records))
            return
        agg.seen.add(message.topic)
        lost = agg.gaps.observe(message.topic, message.session, message.seq)
        if lost:
            log.warning("lost %d bar message(s) on %s from %s", lost, message.topic, agg.endpoint)
        if len(records) == 0:
            return
        topic = message.topic
        decision = self.replicas.bars_received(
            agg.replica, message.session, topic, records, time.monotonic(), HEARD_WITHIN
        )
        if decision.redundant:
            self.counters.bars_redundant.inc(decision.redundant)
        if decision.stood_in:
            self.counters.bars_stood_in.inc(decision.stood_in)
            log.warning(
                "%s: %d bar(s) held for a whole copy from another aggregator go out as they are "
                "(they may lack trades): %s has no copy of them",
                topic,
                decision.stood_in,
                agg.endpoint,
            )
        if len(decision.forward):
            self._forward(interval, symbol, decision.forward)

    def _forward(self, interval: int, symbol: str, records: np.ndarray) -> None:
        """Queue bars for clients. Whoever delivers next (any agg's reader at the end of its
        pass, or the stand-in flush) delivers everything queued, in the order it was queued:
        a topic's bars reach clients in ``s`` order whichever agg and pass they came through.
        """
        if not self._arrivals:
            self._arrived_at = time.monotonic()  # the pass's oldest bar (delivery histogram)
        rows = records.tolist()
        parts = encode_bars(interval, symbol, rows)
        self._arrivals.append(
            (interval, symbol, [(row[0], part) for row, part in zip(rows, parts, strict=True)])
        )

    def _deliver_queued(self) -> int:
        """Deliver every bar queued by :meth:`_forward`; return how many frames were written."""
        if not self._arrivals:
            return 0
        arrivals, self._arrivals = self._arrivals, []
        return self._deliver(arrivals, self._arrived_at)

    def _replicas_serving(self, topic: str) -> list[Replica]:
        """The replica rules' view of the aggs that serve a bar topic's channel."""
        parsed = parse_bar_topic(topic)
        if parsed is None:
            return []
        return [agg.replica for agg in self.catalog.aggs_for(Channel(*parsed))]

    def _flush_stand_ins(self) -> None:
        """Send the stand-ins that waited ``STAND_IN_WAIT`` for a whole copy in vain."""
        for release in self.replicas.stand_ins_due(time.monotonic(), STAND_IN_WAIT):
            self.counters.bars_redundant.inc(release.redundant)
            parsed = parse_bar_topic(release.topic)
            if not len(release.forward) or parsed is None:
                continue
            self.counters.bars_stood_in.inc(len(release.forward))
            log.warning(
                "%s: no whole copy of %d bar(s) came from another aggregator within %gs; "
                "sending them as they are (they may lack trades)",
                release.topic,
                len(release.forward),
                STAND_IN_WAIT,
            )
            self._forward(*parsed, release.forward)
        self._deliver_queued()

    def _announced(self, agg: Agg, message: codec.Message) -> None:
        try:
            announce = codec.decode_json(message)
            intervals = frozenset(int(i) for i in announce["intervals"])
            symbols = announce.get("symbols")
            serves = AggServes(intervals, None if symbols is None else frozenset(symbols))
        except (WireError, KeyError, TypeError, ValueError) as exc:
            self.counters.wire_errors.inc()
            log.warning("bad ANNOUNCE from %s: %s", agg.endpoint, exc)
            return
        first = agg.announce is None
        restarted = (
            not first
            and agg.announce is not None
            and agg.announce.get("session") != announce.get("session")
        )
        if restarted and not agg.silent:  # too quick to be seen silent: its history is lost
            self._restarted_unseen(agg)
        agg.announce = announce
        # its outage first: one still open keeps the feed down past the silence's end
        self._outage_announced(agg, announce.get("outage"))
        if agg.silent:
            self._heard_again(agg, announce)
        agg.replica.announced(announce)
        self.catalog.update(agg, serves)
        if first or restarted:
            log.info(
                "aggregator %s %s: intervals %s, symbols %s",
                agg.endpoint,
                "restarted" if restarted else "heard",
                ",".join(str(i) for i in sorted(intervals)),
                "*" if symbols is None else len(symbols),
            )
            for channel in self.fanout.channels():
                self._route_channel(channel)

    def _restarted_unseen(self, agg: Agg) -> None:
        """An agg restarted too quickly to be seen silent: down as a silent one (its old
        session recorded: the new announce is not stored yet), back as one comes back
        (:meth:`_heard_again`, called next)."""
        self._gone_silent(agg, RESTARTED, RESTARTED.removeprefix("the aggregator "))

    def _outage_reported(self, agg: Agg, message: codec.Message) -> None:
        """An OUTAGE message: the feed behind ``agg`` lost trades, or is whole again."""
        try:
            self._outage_announced(agg, codec.decode_json(message), reported=True)
        except (WireError, KeyError, TypeError, ValueError) as exc:
            self.counters.wire_errors.inc()
            log.warning("bad OUTAGE from %s: %s", agg.endpoint, exc)

    def _outage_announced(self, agg: Agg, outage: Any, *, reported: bool = False) -> None:
        """An agg's outage state, from an OUTAGE message or (as a backstop for a message
        missed while subscribing) its announce: ``{"state", "s", "e", "causes"}`` or None."""
        if outage is None:
            if (
                not reported
                and agg.clock is not None
                and self.feed.agg_up(agg, OUTAGE, agg.clock, "the feed is whole again")
            ):
                self._feed_changed()
            return
        causes = tuple(str(cause) for cause in outage.get("causes") or ())
        why = describe(causes) or "outage"
        if outage["state"] == "down":
            if self.feed.agg_down(agg, OUTAGE, int(outage["s"]), why):
                self.counters.outages.inc()
                log.warning(
                    "aggregator %s reports an outage from feed clock %d: %s",
                    agg.endpoint,
                    int(outage["s"]),
                    why,
                )
                self._feed_changed()
        elif self.feed.agg_up(agg, OUTAGE, int(outage["e"]), f"outage over ({why})"):
            log.info(
                "aggregator %s: outage over, feed clock %d to %d",
                agg.endpoint,
                int(outage["s"]),
                int(outage["e"]),
            )
            self._feed_changed()

    def _replied(self, agg: Agg, message: codec.Message) -> None:
        """A reply on this bridge's route: taken only as the answer to a request it has
        waiting, from the agg it asked, of the kind and for the channel it asked."""
        check = None
        try:
            if message.kind is codec.Kind.HISTORY:
                request_id = codec.records_from_history(message)[0]
                check = codec.history_channel_check(message)
            else:
                request_id = int(codec.decode_json(message)["id"])
        except (WireError, KeyError, TypeError, ValueError):
            self.counters.wire_errors.inc()
            return
        pending = self._requests.get(request_id)
        problem = None
        if pending is None:
            problem = f"reply {request_id} answers no request waiting"
        elif pending.agg is not agg:
            problem = f"reply {request_id} came from {agg.endpoint}, not the aggregator asked"
        elif pending.kind is not message.kind:
            problem = f"reply {request_id} is {message.kind.name}, not {pending.kind.name}"
        elif check is not None and check != pending.check:
            problem = f"reply {request_id} answers another channel than {pending.channel}"
        if problem is not None:
            self._bad_reply(problem)
            return
        assert pending is not None
        del self._requests[request_id]
        if not pending.future.done():
            pending.future.set_result(message)

    def _bad_reply(self, problem: str) -> None:
        """Counted; one WARNING per WARN_EVERY_S at most, with the count since the last."""
        self.counters.bad_replies.inc()
        total = self.counters.bad_replies.value
        warned_at, warned_total = self._bad_replies_warned
        now = time.monotonic()
        if now - warned_at >= WARN_EVERY_S:
            log.warning("%d replies ignored (the latest: %s)", total - warned_total, problem)
            self._bad_replies_warned = (now, total)

    async def _request(self, agg: Agg, body: dict[str, Any]) -> codec.Message:
        request_id = secrets.randbits(64)  # unguessable: nobody can answer it ahead of the agg
        while request_id in self._requests:
            request_id = secrets.randbits(64)
        future: asyncio.Future[codec.Message] = asyncio.get_running_loop().create_future()
        op = body.get("op", "bars")
        channel = body.get("channel")
        self._requests[request_id] = Pending(
            future,
            agg,
            codec.Kind.SYMBOLS if op == "symbols" else codec.Kind.HISTORY,
            str(channel),
            codec.channel_check(channel),
        )
        self.counters.history_requests.inc()
        agg.send(codec.encode_request({"id": request_id, "reply": self.reply_id, **body}))
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await future
        except TimeoutError:
            self.counters.request_timeouts.inc()
            log.warning("no reply from %s to %s within %gs", agg.endpoint, body, REQUEST_TIMEOUT)
            raise
        finally:
            self._requests.pop(request_id, None)

    def _answering_aggs(self, channel: Channel) -> list[Agg]:
        """The aggs to ask for a channel's history: those that serve it and are heard (a
        request to a silent agg would only wait in ZeroMQ's queue for its return), the one
        that has listened longest first."""
        aggs = self._channel_aggs.get(channel) or self._serving_aggs(channel)
        return sorted((agg for agg in aggs if agg.is_heard()), key=lambda agg: agg.whole_after)

    def _serving_aggs(self, channel: Channel) -> list[Agg]:
        """Every agg that serves the channel, in ``--sub`` order: shards by symbol, or
        replicas whose bars are deduplicated by start (:mod:`polyfan.fanout.replicas`)."""
        served = self.catalog.aggs_for(channel)
        return [agg for agg in self.aggs if agg in served]

    def _route_channel(self, channel: Channel) -> None:
        """Subscribe the channel's topic on the aggs that serve it (idempotent)."""
        aggs = self._channel_aggs.setdefault(channel, [])
        for agg in self._serving_aggs(channel):
            if agg not in aggs:
                aggs.append(agg)
                agg.subscribe(channel.topic)

    def _unroute_channel(self, channel: Channel) -> None:
        for agg in self._channel_aggs.pop(channel, []):
            agg.unsubscribe(channel.topic)
            # Topics no longer received from this agg start afresh if subscribed again:
            # messages published meanwhile were not lost, just not asked for.
            for topic in [t for t in agg.seen if (t + "\0").encode().startswith(channel.topic)]:
                if not any((topic + "\0").encode().startswith(other) for other in agg.topics):
                    agg.gaps.forget(topic)
                    agg.seen.discard(topic)

    # -- clients -------------------------------------------------------------------------------

    def _deliver(self, arrivals: list[Arrival], arrived_at: float | None = None) -> int:
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

    def _push(self, client: Client, frame: bytes, bars: int) -> None:
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

    async def _serve_client(self, ws: ServerConnection) -> None:
        loop = asyncio.get_running_loop()
        assert not ws.protocol.extensions, "frames are serialized once: no extension may apply"
        client = Client(
            next(self._ids),
            ws,
            ClientSession(self.config.tokens, self.limits, loop.time()),
            Backlog(self.limits.backlog_bytes),
        )
        self.clients[client.id] = client
        self.counters.connections.inc()
        log.info("client %d joined from %s (%d clients)", client.id, _peer(ws), len(self.clients))
        self._push(client, encode_events([CONNECTED]), 0)
        writer = self._spawn(self._write(client))
        auth_timer = loop.call_later(self.limits.auth_timeout, self._auth_timed_out, client)
        try:
            async for frame in ws:
                outcome = client.session.receive(frame, loop.time(), self.catalog)
                self.counters.bad_requests.inc(outcome.bad_requests)
                if outcome.events:
                    self._push(client, encode_events(outcome.events), 0)
                for command in outcome.commands:
                    if isinstance(command, Subscribe):
                        self._open(client, command)
                    elif isinstance(command, Unsubscribe):
                        if self.fanout.unsubscribe(client, command.channel):
                            self._unroute_channel(command.channel)
                        self._feed_changed(only=client)  # its feed may be whole without it
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
            self.feed.forget_client(client)
            for channel in self.fanout.remove_client(client):
                self._unroute_channel(channel)
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
        self._push(client, encode_events([AUTH_TIMEOUT]), 0)
        client.close_after = (CLOSE_POLICY_VIOLATION, "auth timeout")
        client.wake.set()

    def _open(self, client: Client, command: Subscribe) -> None:
        channel = command.channel
        if self.fanout.subscribe(client, channel):
            self._route_channel(channel)
        self._feed_changed(only=client)  # joining while its feed is down: feed_down now
        if command.since is not None:
            seam = self.fanout.hold(client, channel)
            self._spawn(self._send_history(client, channel, seam, command.since))

    async def _send_history(self, client: Client, channel: Channel, seam: Seam, since: int) -> None:
        aggs = self._answering_aggs(channel)
        limit = self.limits.since_max_bars
        history: list[tuple[int, bytes]] = []
        problem = None
        if not aggs:
            problem = f"{channel.name}: no aggregator serves it now; live bars follow"
        else:
            try:
                reply = await self._request(
                    aggs[0],
                    {
                        "op": "bars",
                        "channel": channel.name,
                        "since": since,
                        "before": None,
                        "limit": limit,
                    },
                )
                _, reply_status, bars = codec.records_from_history(reply)
                if reply_status is not codec.HistoryStatus.OK:
                    problem = f"{channel.name}: history unavailable ({reply_status.name}); live bars follow"
                else:
                    rows = bars.tolist()
                    parts = encode_bars(channel.interval, channel.symbol or "", rows)
                    history = [(row[0], part) for row, part in zip(rows, parts, strict=True)]
                    if len(rows) >= limit:
                        problem = (
                            f"{channel.name}: since reaches past the {limit} most recent bars; "
                            "only those are sent"
                        )
            except TimeoutError:
                problem = f"{channel.name}: history request timed out; live bars follow"
        if problem is not None and client.id in self.clients:
            self._push(client, encode_events([error(problem)]), 0)
        parts = self.fanout.complete_history(client, channel, seam, history)
        if client.id not in self.clients:
            return
        for frame, count in chunked(parts, HISTORY_FRAME_BARS):
            self._push(client, frame, count)

    # -- HTTP (polyfan.web: the router answers, these handlers read the live state) ------------

    def _http_handlers(self) -> dict[str, Handler]:
        return {
            "/api/bars": self._api_bars,
            "/api/symbols": self._api_symbols,
            "/api/info": self._api_info,
            "/healthz": self._healthz,
            "/metrics": self._metrics,
        }

    async def _api_bars(self, query: dict[str, list[str]]) -> Response:
        bars_query: BarsQuery = parse_bars_query(query, self.limits)
        channel = bars_query.channel
        problem = self.catalog.why_not_served(channel)
        if problem is not None:
            self.counters.bad_requests.inc()
            return json_response(
                404 if self.aggs and self.catalog.intervals else 503, {"error": problem}
            )
        aggs = self._answering_aggs(channel)
        if not aggs:
            return json_response(
                503, {"error": f"{channel.name}: no aggregator serving it is heard"}
            )
        try:
            reply = await self._request(
                aggs[0],
                {
                    "op": "bars",
                    "channel": channel.name,
                    "since": bars_query.since,
                    "before": bars_query.before,
                    "limit": bars_query.limit,
                },
            )
        except TimeoutError:
            return json_response(504, {"error": f"{channel.name}: the aggregator did not answer"})
        _, reply_status, bars = codec.records_from_history(reply)
        if reply_status is not codec.HistoryStatus.OK:
            return json_response(404, {"error": f"{channel.name}: {reply_status.name}"})
        parts = encode_bars(channel.interval, channel.symbol or "", bars.tolist())
        return Response(
            200, join_events(parts), "application/json", [("Cache-Control", "no-store")]
        )

    async def _api_symbols(self, query: dict[str, list[str]]) -> Response:
        heard = [agg for agg in self.aggs if agg.is_heard()]  # a silent one would cost 5 s
        replies = await asyncio.gather(
            *(self._request(agg, {"op": "symbols"}) for agg in heard), return_exceptions=True
        )
        counts: dict[str, int] = {}
        for reply in replies:
            if isinstance(reply, BaseException):
                continue
            try:
                for symbol, trades in codec.decode_json(reply)["symbols"]:
                    counts[symbol] = max(counts.get(symbol, 0), int(trades))
            except (WireError, KeyError, TypeError, ValueError):
                self.counters.wire_errors.inc()
        ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
        return json_response(200, [{"sym": symbol, "trades": trades} for symbol, trades in ranked])

    async def _api_info(self, query: dict[str, list[str]]) -> Response:
        return json_response(
            200,
            {
                "intervals": self.catalog.intervals,
                "aggs": [agg.status() for agg in self.aggs],
                "clients": int(self.totals()["polyfan_bridge_clients"]),
                "workers": 1 if self.worker is None else self.worker.count,
                "limits": asdict(self.limits),
            },
        )

    async def _healthz(self, query: dict[str, list[str]]) -> Response:
        heard = sum(agg.is_heard() for agg in self.aggs)
        body = {
            "status": "ok" if heard else "waiting for an aggregator",
            "clients": int(self.totals()["polyfan_bridge_clients"]),
            "aggs": len(self.aggs),
            "aggs_heard": heard,
            "intervals": self.catalog.intervals,
        }
        return json_response(200 if heard else 503, body)

    async def _metrics(self, query: dict[str, list[str]]) -> Response:
        return Response(200, self.render_metrics(), CONTENT_TYPE, [("Cache-Control", "no-store")])

    def render_metrics(self) -> bytes:
        """``/metrics``: the whole bridge's (every worker's) metrics, Prometheus text."""
        return self.registry.render(self.totals())


def _text_frame(payload: bytes) -> bytes:
    """A complete, unmasked WebSocket text frame, as a server sends it with no extensions."""
    return Frame(Opcode.TEXT, payload).serialize(mask=False, extensions=[])


def _peer(ws: ServerConnection) -> str:
    address = ws.remote_address
    return f"{address[0]}:{address[1]}" if address else "?"


async def serve_bridge(
    config: BridgeConfig,
    stop: asyncio.Event,
    limits: Limits | None = None,
    *,
    worker: Worker | None = None,
    ready: Any = None,
) -> None:
    """Serve until ``stop`` is set (:func:`polyfan.lifecycle.serve_until_stopped` sets it)."""
    bridge = Bridge(config, limits, worker)
    loop = asyncio.get_running_loop()
    # --metrics (one process; with --workers the parent serves it, polyfan.workers): rendered
    # on the bridge's loop, which owns what the metrics read, for the server's thread.
    metrics = None
    if config.metrics is not None and worker is None:
        metrics = listen(config.metrics, lambda: _on_loop(loop, bridge.render_metrics))
    await bridge.start()
    if metrics is not None and config.metrics is not None:
        metrics.start()
        log.info("metrics on http://%s:%d/metrics", config.metrics[0], metrics.port)
    if ready is not None and worker is not None:
        ready.put(worker.index)
    try:
        await stop.wait()
    finally:
        log.info("stopping: %d clients", len(bridge.clients))
        if metrics is not None:
            metrics.close()
        await bridge.stop()


def _on_loop(loop: asyncio.AbstractEventLoop, call: Callable[[], bytes]) -> bytes:
    """``call()`` run on ``loop`` for another thread, waited for (at most 5 s)."""

    async def run() -> bytes:
        return call()

    return asyncio.run_coroutine_threadsafe(run(), loop).result(5)


def raise_open_files_limit() -> int:
    """Every client is a file descriptor: lift the soft limit to the hard one; return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
        log.info("open files limit raised from %d to %d", soft, hard)
    return max(soft, hard)


def run(config: BridgeConfig) -> int:
    """``polyfan bridge``: serve until SIGINT/SIGTERM; exit status 0."""
    raise_open_files_limit()
    if config.workers > 1:

        async def serve(worker: Worker, ready: Any) -> None:
            await serve_until_stopped(
                lambda stop: serve_bridge(config, stop, worker=worker, ready=ready)
            )

        return run_workers(config, config.workers, serve, counters())
    asyncio.run(serve_until_stopped(lambda stop: serve_bridge(config, stop)))
    return 0


def counters() -> Registry:
    """A registry with the bridge's metrics declared: the columns its workers share (every
    sample, histogram buckets included), and what the parent renders their sums through."""
    registry = Registry()
    Counters(registry)
    return registry
