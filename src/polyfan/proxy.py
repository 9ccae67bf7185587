"""``polyfan proxy``: hold the one upstream connection and republish every event on ZeroMQ.

A thin shell around ``feed.py``. Three tasks share one event loop:

- the **reader** only reads: every upstream frame goes into a deque, nothing else, so pongs
  are never stuck behind parsing (protocol.md: a lagging reader looks like a dead server);
- the **drain** takes *all* queued frames at once, feeds them to the session, publishes the
  trades (one ZeroMQ message per symbol per drain, see docs/wire.md) and then the clock, and
  every other event type the same way on its own topics (``Q.TSLA``, ``A.TSLA`` ...; types
  it does not parse on ``raw.<ev>``). Under
  load the deque fills while a drain runs, so the next drain handles more frames per pass:
  batching grows with the rate, which is how one core keeps up;
- the **clock** task publishes the feed clock every 100 ms.

The connection loop reconnects with ``backoff.py``'s schedule, publishing ``UPSTREAM`` down
(after the last trade of the lost connection) and up (when the new subscription is confirmed).
``auth_failed`` raises :class:`~polyfan.errors.AuthenticationError`: exit status 2, no retry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Coroutine
from typing import Any

import numpy as np
import zmq
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from polyfan import curve
from polyfan.backoff import Backoff
from polyfan.config import ProxyConfig
from polyfan.errors import ConfigError
from polyfan.feed import scan
from polyfan.feed.upstream import (
    Action,
    Authenticated,
    EventBatch,
    EventDecoder,
    FeedClock,
    FeedStats,
    Problem,
    StatusReceived,
    Subscribed,
    TradeBatch,
    UpstreamSession,
)
from polyfan.lifecycle import serve_until_stopped
from polyfan.metrics import MetricsServer, Registry, listen
from polyfan.redact import mask_url, mask_urls_in
from polyfan.wire import codec

log = logging.getLogger("polyfan.proxy")

# ZeroMQ's default send high-water mark (1000 messages) drops silently on the first burst: a
# 100 ms stall of one subscriber at the open is already ~1000 messages. A million messages
# (trade messages average well under 1 KiB) bounds a stalled subscriber's queue to a few
# hundred MiB while riding out multi-second stalls; losses beyond it show as sequence gaps.
SNDHWM = 1_000_000
CLOCK_EVERY_S = 0.1
THROUGHPUT_EVERY_S = 5.0
PROBLEM_LOG_EVERY_S = 5.0
GATHER_FRAMES = 256  # a drain takes up to about this many frames (more if already queued)
MAX_QUEUED_FRAMES = 4096  # beyond this the reader waits: TCP backpressure, never silent loss
SUBSCRIBE_TIMEOUT_S = 15.0  # connected but not streaming by then: reconnect
PING_INTERVAL_S = 10.0
PING_TIMEOUT_S = 20.0


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


class _Connection:
    """One upstream WebSocket connection and what the drain decided about it."""

    __slots__ = ("action", "finished", "session", "up", "ws")

    def __init__(self, ws: ClientConnection, session: UpstreamSession) -> None:
        self.ws = ws
        self.session = session
        self.up = False  # subscription confirmed
        self.action = Action.RECONNECT
        self.finished: asyncio.Future[Action] = asyncio.get_running_loop().create_future()


_END = None  # marks the end of a connection's frames in the queue


class Proxy:
    def __init__(self, config: ProxyConfig) -> None:
        self.config = config
        self.upstream_shown = mask_url(config.upstream)  # what logs and errors say
        self.session_id = secrets.randbits(64)
        self.sequencer = codec.Sequencer(self.session_id)
        self.stats = FeedStats()
        self.decoder = EventDecoder(self.stats)
        self.clock = FeedClock()
        self.backoff = Backoff()
        self._queue: deque[tuple[_Connection, bytes | str | None]] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._connection: _Connection | None = None
        self._pub: Any = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._problems_skipped = 0
        self._last_problem_log = 0.0
        self._ws_log = logging.getLogger("polyfan.proxy.websockets")
        # websockets logs frames at debug level, the auth frame (with the key) included.
        self._ws_log.setLevel(logging.INFO)
        self.registry = Registry()
        self._init_metrics()

    # --- metrics ------------------------------------------------------------------------------

    def _init_metrics(self) -> None:
        r = self.registry
        self.m_frames = r.counter("polyfan_proxy_frames_total", "Upstream frames received.")
        self.m_trades = r.counter(
            "polyfan_proxy_trades_total", "Trades accepted and published on ZeroMQ."
        )
        self.m_bad = r.counter(
            "polyfan_proxy_bad_messages_total",
            "Upstream frames, elements and trades skipped as malformed or invalid.",
        )
        self.m_rejected = r.labeled(
            "polyfan_proxy_rejected_trades_total", "Trades rejected, by reason.", "reason"
        )
        self.m_future = r.counter(
            "polyfan_proxy_future_trades_total",
            "Trades stamped more than 5 s ahead of the wall clock (rejected).",
        )
        self.m_unknown = r.counter(
            "polyfan_proxy_unknown_events_total",
            "Upstream events of a type polyfan does not parse (passed on raw).",
        )
        self.m_events = r.labeled(
            "polyfan_proxy_events_total",
            "Events accepted and published, by type (T, Q, A, AM, LULD, raw).",
            "kind",
        )
        self.m_rejected_events = r.labeled(
            "polyfan_proxy_rejected_events_total", "Events rejected, by type.", "kind"
        )
        self.m_raw = r.labeled(
            "polyfan_proxy_raw_events_total", "Events passed on raw, by their ev.", "ev"
        )
        self.m_statuses = r.labeled(
            "polyfan_proxy_statuses_total", "Upstream statuses, by status.", "status"
        )
        self.m_auth_refused = r.counter(
            "polyfan_proxy_auth_refused_total", "ZeroMQ handshakes refused (CURVE, --curve-allow)."
        )
        self.m_reconnects = r.counter(
            "polyfan_proxy_reconnects_total", "Upstream connections made after the first."
        )
        self.m_connect_failures = r.counter(
            "polyfan_proxy_connect_failures_total", "Upstream connection attempts that failed."
        )
        self.m_messages = r.counter(
            "polyfan_proxy_messages_published_total", "ZeroMQ messages published (all topics)."
        )
        self.m_bytes = r.counter(
            "polyfan_proxy_bytes_published_total", "ZeroMQ bytes published (all topics)."
        )
        self.m_connected = r.gauge(
            "polyfan_proxy_upstream_connected", "1 while the upstream subscription is live."
        )
        self.m_clock = r.gauge("polyfan_proxy_feed_clock_ms", "The feed clock, Unix ms.")
        self.m_queued = r.gauge("polyfan_proxy_queued_frames", "Frames read but not yet parsed.")
        r.on_collect(self._collect)

    def _collect(self) -> None:
        stats = self.stats
        self.m_frames.value = stats.frames
        self.m_bad.value = stats.bad_messages
        self.m_future.value = stats.rejected["future"]
        self.m_unknown.value = stats.unknown_events
        # runs on the metrics thread: dict() copies atomically under the GIL, iteration would not
        rejected, statuses = dict(stats.rejected), dict(stats.statuses)
        self.m_rejected.values = {k: float(v) for k, v in rejected.items() if v}
        accepted, rejected_events = dict(stats.accepted), dict(stats.rejected_events)
        raw = dict(stats.raw)
        self.m_events.values = {k: float(v) for k, v in accepted.items() if v}
        if raw:
            self.m_events.values["raw"] = float(sum(raw.values()))
        self.m_rejected_events.values = {k: float(v) for k, v in rejected_events.items() if v}
        self.m_raw.values = {k: float(v) for k, v in raw.items()}
        # any status string upstream sends: bounded and escaped as they are exported
        self.m_statuses.values = {k: float(v) for k, v in statuses.items()}
        connection = self._connection
        self.m_connected.value = int(connection is not None and connection.up)
        self.m_clock.value = self.clock.read(wall_ms())
        self.m_queued.value = len(self._queue)

    # --- publishing ---------------------------------------------------------------------------

    def _send(self, frame: bytes) -> None:
        # counted before sending: a scrape never shows less than a subscriber has received
        self.m_messages.value += 1
        self.m_bytes.value += len(frame)
        self._pub.send(frame, zmq.NOBLOCK, copy=len(frame) < 65_536)

    def publish_trades(self, batch: TradeBatch) -> None:
        self.m_trades.value += batch.count  # before sending, as in _send
        encode, send, trades = self.sequencer.encode, self._send, codec.Kind.TRADES
        for topic, records in zip(batch.topics, batch.records, strict=True):
            send(encode(topic, trades, len(records), records.tobytes()))

    def publish_events(self, batch: EventBatch) -> None:
        """Quotes, aggregates, LULD or raw events: one message per topic."""
        encode, send, kind = self.sequencer.encode, self._send, batch.kind
        for topic, count, payload in zip(batch.topics, batch.counts, batch.payloads, strict=True):
            send(encode(topic, kind, count, payload))

    def publish_clock(self, now_ms: int) -> None:
        record = np.array([(self.clock.read(now_ms), now_ms)], codec.CLOCK_DTYPE)
        self._publish_control(codec.Kind.CLOCK, record)

    def publish_upstream(self, state: int, now_ms: int) -> None:
        record = np.array([(state, self.clock.read(now_ms), now_ms)], codec.UPSTREAM_DTYPE)
        self._publish_control(codec.Kind.UPSTREAM, record)

    def _publish_control(self, kind: codec.Kind, record: np.ndarray) -> None:
        self._send(self.sequencer.encode(codec.CONTROL_TOPIC, kind, 1, record.tobytes()))

    # --- the tasks ----------------------------------------------------------------------------

    async def serve(self, stop: asyncio.Event) -> None:
        context = zmq.Context()
        pub = context.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, SNDHWM)
        pub.setsockopt(zmq.LINGER, 0)
        metrics_server: MetricsServer | None = None
        authenticator = curve.server_side(
            context, pub, self.config.curve, "proxy", self.config.pub, self.m_auth_refused.inc
        )
        try:
            try:
                pub.bind(self.config.pub)
            except zmq.ZMQError as exc:
                raise ConfigError(f"--pub: cannot bind {self.config.pub}: {exc}") from exc
            self._pub = pub
            scan.warm_up()
            if self.config.metrics is not None:
                metrics_server = listen(self.config.metrics, self.registry)
                metrics_server.start()
            log.info(
                "ready: publishing on %s (session %016x), connecting to %s, subscribing %s%s",
                self.config.pub,
                self.session_id,
                self.upstream_shown,
                self.config.subscribe,
                f", metrics on {self.config.metrics[0]}:{metrics_server.port}"
                if metrics_server is not None and self.config.metrics is not None
                else "",
            )
            tasks = [
                asyncio.create_task(self._connect_forever(), name="connect"),
                asyncio.create_task(self._drain_forever(), name="drain"),
                asyncio.create_task(self._tick_forever(), name="clock"),
                asyncio.create_task(stop.wait(), name="stop"),
            ]
            try:
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                await self._close_upstream()
            for task in done:
                task.result()  # re-raise a fatal error (AuthenticationError)
        finally:
            if metrics_server is not None:
                metrics_server.close()
            pub.close(0)
            if authenticator is not None:
                authenticator.stop()
            context.term()
            log.info(
                "stopped: %d trades published, %d bad messages, %d reconnects",
                self.m_trades.value,
                self.stats.bad_messages,
                self.m_reconnects.value,
            )

    async def _close_upstream(self) -> None:
        connection = self._connection
        if connection is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(connection.ws.close(), 0.5)
            connection.ws.transport.abort()

    async def _connect_forever(self) -> None:
        first = True
        while True:
            try:
                ws = await connect(
                    self.config.upstream,
                    compression=None,
                    max_size=None,
                    max_queue=1024,
                    ping_interval=PING_INTERVAL_S,
                    ping_timeout=PING_TIMEOUT_S,
                    close_timeout=1,
                    logger=self._ws_log,
                )
            except InvalidURI as exc:
                raise ConfigError(
                    f"--upstream: {self.upstream_shown!r} is not a ws:// or wss:// URL"
                ) from exc
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                self.m_connect_failures.value += 1
                delay = self.backoff.next_delay()
                log.warning(
                    "cannot connect to %s (%s); retrying in %.1f s",
                    self.upstream_shown,
                    mask_urls_in(str(exc)) or type(exc).__name__,
                    delay,
                )
                await asyncio.sleep(delay)
                continue
            if not first:
                self.m_reconnects.value += 1
            first = False
            log.info("connected to %s", self.upstream_shown)
            self.backoff.connected(time.monotonic())
            connection = _Connection(
                ws, UpstreamSession(self.config.api_key, self.config.subscribe, self.decoder)
            )
            self._connection = connection
            deadline = asyncio.get_running_loop().call_later(
                SUBSCRIBE_TIMEOUT_S, self._check_subscribed, connection
            )
            reason = await self._read(connection)
            deadline.cancel()
            self._queue.append((connection, _END))
            self._wake.set()
            action = await connection.finished
            self.backoff.disconnected(time.monotonic())
            if action is Action.COOL_DOWN:
                delay = self.backoff.cool_down()
                log.warning(
                    "upstream connection closed after max_connections; cooling down %.0f s "
                    "before reconnecting: another process is using this API key",
                    delay,
                )
            else:
                delay = self.backoff.next_delay()
                log.warning(
                    "upstream connection lost (%s); reconnecting in %.1f s",
                    mask_urls_in(reason),
                    delay,
                )
            await asyncio.sleep(delay)

    def _check_subscribed(self, connection: _Connection) -> None:
        if not connection.up:
            log.warning(
                "upstream did not confirm the subscription within %.0f s (state %s); reconnecting",
                SUBSCRIBE_TIMEOUT_S,
                connection.session.state.value,
            )
            self._background(connection.ws.close())

    async def _read(self, connection: _Connection) -> str:
        """Only read: append every frame to the queue until the connection closes."""
        queue, wake, space, recv = self._queue, self._wake, self._space, connection.ws.recv
        try:
            while True:
                frame = await recv(decode=False)
                queue.append((connection, frame))
                wake.set()
                if len(queue) > MAX_QUEUED_FRAMES:
                    space.clear()
                    await space.wait()
        except ConnectionClosed as exc:
            return str(exc)

    async def _drain_forever(self) -> None:
        queue, wake = self._queue, self._wake
        last_report, reported, others = time.monotonic(), 0, 0
        while True:
            await wake.wait()
            wake.clear()
            while queue:
                await self._gather(queue)
                items = list(queue)
                queue.clear()
                self._space.set()
                await self._receive(items)
            now = time.monotonic()
            if now - last_report >= THROUGHPUT_EVERY_S:
                published = int(self.m_trades.value)
                other = sum(self.stats.accepted.values()) - self.stats.trades
                other += self.stats.unknown_events
                log.info(
                    "published %d trades in %.0f s (%.0f/s) and %d other events; clock %d; "
                    "%d bad messages",
                    published - reported,
                    now - last_report,
                    (published - reported) / (now - last_report),
                    other - others,
                    self.clock.read(wall_ms()),
                    self.stats.bad_messages,
                )
                last_report, reported, others = now, published, other

    @staticmethod
    async def _gather(queue: deque[Any]) -> None:
        """Let the reader catch up while frames keep coming (a few loop turns, no sleep).

        Under load every turn of the event loop reads more frames, so the batch grows with
        the rate: fewer, larger messages per symbol. When idle, the first quiet turns end it.
        """
        quiet = 0
        while quiet < 2 and len(queue) < GATHER_FRAMES:
            before = len(queue)
            await asyncio.sleep(0)
            quiet = quiet + 1 if len(queue) == before else 0

    async def _receive(self, items: list[tuple[_Connection, bytes | str | None]]) -> None:
        """Feed runs of frames from one connection to its session, in queue order."""
        current: _Connection | None = None
        frames: list[bytes | str] = []
        for connection, frame in items:
            if connection is not current:
                if current is not None and frames:
                    await self._receive_frames(current, frames)
                current, frames = connection, []
            if frame is _END:
                if frames:
                    await self._receive_frames(connection, frames)
                    frames = []
                self._connection_ended(connection)
            else:
                frames.append(frame)
        if current is not None and frames:
            await self._receive_frames(current, frames)

    async def _receive_frames(self, connection: _Connection, frames: list[bytes | str]) -> None:
        now = wall_ms()
        received = connection.session.receive_frames(frames, now)
        for reply in connection.session.data_to_send():
            with contextlib.suppress(ConnectionClosed):
                await connection.ws.send(reply)
        for event in received.events:
            if type(event) is Problem:
                self._log_problem(event)
            elif type(event) is Subscribed:
                # one line per connection at INFO: a list of thousands of channels gets
                # thousands of statuses
                log.log(
                    logging.INFO if event.first else logging.DEBUG, "upstream: %s", event.message
                )
                if event.first:
                    connection.up = True
                    self.clock.subscribed(now)
                    self.publish_upstream(codec.UPSTREAM_UP, now)
            elif type(event) is Authenticated:
                log.info("authenticated upstream (%s)", event.message)
            elif type(event) is StatusReceived:
                log.warning("%s: %s %r", event.warning, event.status, event.message)
                if event.action is not Action.NONE:
                    connection.action = event.action
                    self._background(connection.ws.close())
        batch = received.trades
        if batch.count:
            self.publish_trades(batch)
            if self.clock.trades_accepted(batch.max_t, now):
                self.publish_clock(now)
        for events in received.batches:
            self.publish_events(events)

    def _background(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _connection_ended(self, connection: _Connection) -> None:
        now = wall_ms()
        if connection.up:
            connection.up = False
            self.clock.disconnected(now)
            self.publish_upstream(codec.UPSTREAM_DOWN, now)
        if not connection.finished.done():
            connection.finished.set_result(connection.action)

    def _log_problem(self, problem: Problem) -> None:
        now = time.monotonic()
        if now - self._last_problem_log < PROBLEM_LOG_EVERY_S:
            self._problems_skipped += 1
            return
        log.warning(
            "skipped malformed upstream input: %s%s",
            problem.what,
            f" (and {self._problems_skipped} more since the last report)"
            if self._problems_skipped
            else "",
        )
        self._last_problem_log = now
        self._problems_skipped = 0

    async def _tick_forever(self) -> None:
        """The clock every 100 ms on a fixed schedule: sleeping 100 ms after each publish would
        stretch every period by the loop's latency, under CONTRACT's 10 times a second."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            self.publish_clock(wall_ms())
            due = max(due + CLOCK_EVERY_S, loop.time())  # late: publish now, no burst after
            await asyncio.sleep(due - loop.time())


def run(config: ProxyConfig) -> int:
    asyncio.run(serve_until_stopped(lambda stop: Proxy(config).serve(stop)))
    return 0
