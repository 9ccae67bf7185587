"""``polyfan bridge``: bars from the aggregators to WebSocket clients, plus HTTP on the same port.

The shell: it opens the sockets, runs the tasks and carries out what its parts decide.

- :mod:`polyfan.fanout.links` (pure) knows the aggregators and decides what each of their
  messages means: bars to forward (deduplicated across replicas), feed down/up, replies.
- :mod:`polyfan.web.clients` serves each WebSocket client and writes the fan-out's frames.
- :mod:`polyfan.web.api` answers ``/api/*``, ``/healthz`` and ``/metrics``;
  :mod:`polyfan.web.server` is HTTP/1.1 on the port, in front of websockets.

What is left here is I/O: one ZeroMQ XSUB socket per ``--sub`` aggregator, subscribed to
``_ctl`` (the aggregator's ANNOUNCE says which intervals and symbols it serves) and to this
bridge's reply topic, with bar topics subscribed as channels get their first client and
unsubscribed as they lose their last; one reader task per aggregator that drains what is
waiting and ends each pass by delivering it; requests with their timeouts; the watcher that
finds silent aggregators; start, stop, ``--workers``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

import zmq
import zmq.asyncio
from websockets.asyncio.server import Server, serve
from websockets.frames import Frame, Opcode

from polyfan import curve
from polyfan.config import BridgeConfig
from polyfan.errors import ConfigError
from polyfan.fanout.counters import BridgeCounters
from polyfan.fanout.links import Link, Links, Pending
from polyfan.fanout.protocol import Catalog, Limits
from polyfan.fanout.subscriptions import Fanout
from polyfan.lifecycle import serve_until_stopped
from polyfan.metrics import Registry, listen
from polyfan.web.admission import AuthThrottle
from polyfan.web.api import Api
from polyfan.web.clients import CLOSE_TIMEOUT, Client, Clients
from polyfan.web.gate import LISTEN_BACKLOG, Gate, GateCounters, connection_budget
from polyfan.web.http import Origins
from polyfan.web.routes import Router
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

REQUEST_TIMEOUT = 5.0  # seconds to wait for an aggregator's history or symbols reply
WATCH_EVERY = 0.25  # seconds between checks of who is heard
READ_POLL_MS = 100  # the reader re-checks its socket at least this often (see Bridge._read)
DRAIN_MAX_BARS = 2000  # bars handled per pass before clients get their frames
COALESCE_MS = 1  # a pass takes the bars that follow its first with gaps under this ...
COALESCE_MAX_S = 0.005  # ... for at most this long
STATS_EVERY = 10.0  # seconds between throughput log lines
OPEN_TIMEOUT = 10.0  # the whole opening handshake, an HTTP answer included (over REQUEST_TIMEOUT)
TLS_HANDSHAKE_TIMEOUT = 10.0  # a TLS handshake not done by then is dropped (asyncio's: 60 s)
PING_INTERVAL = 20.0  # keepalive: a ping this often ...
PING_TIMEOUT = 20.0  # ... and a client that has not answered it this long after is closed (1011)
PASS_LOG_ENV = "POLYFAN_BRIDGE_PASS_LOG"  # a file to log every fan-out pass to (benchmarks)


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
            auth_failures=config.auth_failures,
        )
        self.registry = Registry()
        self.counters, self._gate_counters = declare(self.registry)
        # 128 random bits: the agg answers only the peer that subscribes the route itself, and
        # nobody can subscribe a shorter prefix of it (docs/limits.md).
        self.reply_id = secrets.token_hex(codec.REPLY_ROUTE_HEX // 2)
        self.reply_topic = codec.reply_topic(self.reply_id)
        self.links = Links(config.sub, self.counters, self._send, self._feed_changed, self._replied)
        # Failed token checks per client address, shared by WebSocket auth and HTTP
        self.throttle = AuthThrottle(self.limits.auth_failures, self.limits.auth_refill_seconds)
        self.hub = Clients(
            self.links,
            self.counters,
            self.limits,
            config.tokens,
            self._request,
            self._spawn,
            self.throttle,
        )
        self._sockets: list[zmq.asyncio.Socket] = []  # per link (Link.index)
        self._syncs: list[zmq.Socket[bytes]] = []  # the same sockets, sync: readers drain them
        self._watches: list[curve.HandshakeWatch] = []  # CURVE handshakes, per --sub
        self._context = zmq.asyncio.Context()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: Server | None = None
        self._gate: Gate | None = None
        self._http: HttpServer | None = None
        # bench/bench_bridge.py's hook: one line per fan-out pass (pid, perf_counter of its
        # first read and of its last write, frames written, bars), appended to this file.
        pass_log = os.environ.get(PASS_LOG_ENV)
        self._pass_log = None if not pass_log else open(pass_log, "a", buffering=1)  # noqa: SIM115
        self._pid = os.getpid()
        if not log.isEnabledFor(logging.DEBUG) and _ws_log.level == logging.NOTSET:
            _ws_log.setLevel(logging.WARNING)
        self.registry.on_collect(self._collect)

    @property
    def aggs(self) -> list[Link]:
        return self.links.links

    @property
    def catalog(self) -> Catalog[Link]:
        return self.links.catalog

    @property
    def clients(self) -> dict[int, Client]:
        return self.hub.clients

    @property
    def fanout(self) -> Fanout[Client]:
        return self.hub.fanout

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
            self._sockets.append(socket)
            self._syncs.append(zmq.Socket.shadow(socket.underlying))
            link = self.links.links[index]
            self.links.subscribe(link, codec.CONTROL_TOPIC)
            self.links.subscribe(link, self.reply_topic)
            self._spawn(self._read(link))
        host, port = self.config.listen
        # Every new connection is admitted or refused before it costs more than its socket
        # (polyfan.web.gate; caps per process, docs/limits.md).
        gate = Gate(self.limits, self._gate_counters, connection_budget(self.limits))
        self.registry.on_collect(gate.collect)
        self._gate = gate
        # HTTP/1.1 in front of websockets (polyfan.web.server): requests are answered there,
        # an upgrade is handed to websockets' connection.
        router = Router(
            self._api().handlers(),
            Origins(self.config.allow_origins, scheme="http" if tls is None else "https"),
            on_bad_request=self.counters.bad_requests.inc,
            tokens=self.config.tokens,
            on_unauthorized=self._http_unauthorized,
            throttle=self.throttle,
            on_throttled=self.counters.auth_throttled.inc,
        )
        self._http = HttpServer(
            gate,
            router,
            on_request=self.counters.http_requests.inc,
            on_bad_request=self.counters.bad_requests.inc,
        )
        try:
            self._server = await serve(
                self.hub.serve,
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
        for socket in self._sockets:
            socket.close(linger=0)
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
                len(self.links.heard()),
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
            if self.links.replicas.has_stand_ins():
                try:
                    self.links.flush_stand_ins()
                    self._deliver_queued()
                except Exception:  # a bug must not stop the watcher
                    log.exception("unexpected error sending stand-in bars")
            for agg in self.aggs:
                try:
                    self.links.watch(agg, started)
                except Exception:  # a bug must not stop the watcher
                    log.exception("unexpected error watching %s", agg.endpoint)

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

    async def _read(self, agg: Link) -> None:
        """Drain what is waiting (up to DRAIN_MAX_BARS bars), deliver one frame per client,
        yield so the writers run, repeat."""
        socket, sync = self._sockets[agg.index], self._syncs[agg.index]
        while True:
            # With a timeout, as a backstop: the ZeroMQ FD is edge-triggered, and a sync send on
            # the same socket could consume the edge a waiting poll needs, which left replies
            # and bars unread until the next edge (history 504s under the chart page's browser
            # tests). Agg.send now goes through the asyncio socket, which re-checks for its
            # pollers (test_requests_sent_while_the_reader_waits_never_leave_replies_unread).
            await socket.poll(timeout=READ_POLL_MS)
            started = time.perf_counter()
            bars = 0
            while bars < DRAIN_MAX_BARS:
                try:
                    frame = sync.recv(zmq.NOBLOCK, copy=True)
                except zmq.Again:
                    # An aggregator sends a clock tick's bars back to back, one message per
                    # channel, but they reach this socket a few at a time: while they keep
                    # coming (a gap under COALESCE_MS, for at most COALESCE_MAX_S), take them
                    # into this pass, so that they go out in one pass, not one pass each. The
                    # wait is the asyncio socket's: other aggs, clients and HTTP run meanwhile.
                    if (
                        self.links.arrivals
                        and time.perf_counter() - started < COALESCE_MAX_S
                        and await socket.poll(timeout=COALESCE_MS)
                    ):
                        continue
                    break
                try:
                    bars += self.links.received(agg, frame)
                except Exception:  # a bug must not stop the feed for every client
                    self.counters.wire_errors.inc()
                    log.exception("unexpected error handling a message from %s", agg.endpoint)
            if self.links.arrivals:  # this pass's bars, and any another reader queued meanwhile
                frames = self._deliver_queued()
                ended = time.perf_counter()
                self.counters.passes.inc()
                self.counters.pass_seconds.inc(ended - started)
                if self._pass_log is not None:
                    self._pass_log.write(f"{self._pid} {started!r} {ended!r} {frames} {bars}\n")
            await asyncio.sleep(0)

    async def _request(self, agg: Link, body: dict[str, Any]) -> codec.Message:
        """Ask ``agg`` (``body``: op, channel …) and wait for its reply, REQUEST_TIMEOUT at
        most (TimeoutError)."""
        request_id = secrets.randbits(64)  # unguessable: nobody can answer it ahead of the agg
        while request_id in self.links.requests:
            request_id = secrets.randbits(64)
        future: asyncio.Future[codec.Message] = asyncio.get_running_loop().create_future()
        self.links.request(agg, request_id, {"reply": self.reply_id, **body}, future)
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                return await future
        except TimeoutError:
            self.counters.request_timeouts.inc()
            log.warning("no reply from %s to %s within %gs", agg.endpoint, body, REQUEST_TIMEOUT)
            raise
        finally:
            self.links.requests.pop(request_id, None)

    def _replied(self, pending: Pending, message: codec.Message) -> None:
        future = cast("asyncio.Future[codec.Message]", pending.waiter)
        if not future.done():
            future.set_result(message)

    def _send(self, agg: Link, frame: bytes) -> None:
        """Subscriptions and requests upstream (the XSUB's send queue is unbounded: see
        ``start``).

        Through the asyncio socket, not the sync one: ZeroMQ's FD is edge-triggered and a send
        processes pending commands, which can consume the edge the reader's ``poll`` waits
        for; pyzmq's asyncio ``send`` re-checks the socket for its waiting pollers.
        """
        sent = cast("asyncio.Future[Any]", self._sockets[agg.index].send(frame, zmq.NOBLOCK))
        if sent.done() and sent.exception() is not None:
            log.warning("upstream message to %s not sent: %s", agg.endpoint, sent.exception())

    def _deliver_queued(self) -> int:
        """Deliver every bar the links queued; return how many frames were written."""
        if not self.links.arrivals:
            return 0
        arrivals, arrived_at = self.links.take_arrivals()
        return self.hub.deliver(arrivals, arrived_at)

    def _http_unauthorized(self) -> None:
        self.counters.http_unauthorized.inc()
        self.counters.auth_failures.inc()

    def _feed_changed(self) -> None:
        self.hub.feed_changed()

    def _api(self) -> Api:
        return Api(
            self.links,
            self.counters,
            self.limits,
            self._request,
            self.totals,
            self.render_metrics,
            1 if self.worker is None else self.worker.count,
        )

    def render_metrics(self) -> bytes:
        """``/metrics``: the whole bridge's (every worker's) metrics, Prometheus text."""
        return self.registry.render(self.totals())


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


def declare(registry: Registry) -> tuple[BridgeCounters, GateCounters]:
    """The bridge's metrics in ``registry``, always in this order (workers share columns)."""
    return BridgeCounters(registry), GateCounters(registry)


def counters() -> Registry:
    """A registry with the bridge's metrics declared: the columns its workers share (every
    sample, histogram buckets included), and what the parent renders their sums through."""
    registry = Registry()
    declare(registry)
    return registry
