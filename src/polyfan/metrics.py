"""Counters and gauges in Prometheus text format, and the small server behind ``--metrics``.

Every component counts what it receives, sends, rejects and drops. A counter is a plain
attribute bump on the hot path (``counter.value += n``); rendering happens only on scrape.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from http import HTTPStatus

from polyfan.web.admission import RefusalLog

log = logging.getLogger("polyfan.metrics")


class Metric:
    __slots__ = ("help", "kind", "labels", "name", "value")

    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.value: float = 0
        self.labels: dict[str, float] = {}

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Registry:
    """An ordered set of metrics with a Prometheus text rendering."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric] = {}
        self._collectors: list[Callable[[], None]] = []

    def counter(self, name: str, help: str) -> Metric:
        return self._add(name, help, "counter")

    def gauge(self, name: str, help: str) -> Metric:
        return self._add(name, help, "gauge")

    def on_collect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before each rendering, to refresh gauges computed on demand."""
        self._collectors.append(callback)

    def _add(self, name: str, help: str, kind: str) -> Metric:
        if name in self._metrics:
            raise ValueError(f"metric {name} registered twice")
        metric = Metric(name, help, kind)
        self._metrics[name] = metric
        return metric

    def get(self, name: str) -> Metric:
        return self._metrics[name]

    def values(self) -> dict[str, float]:
        for collect in self._collectors:
            collect()
        return {name: metric.value for name, metric in self._metrics.items()}

    def render(self, values: Mapping[str, float] | None = None) -> str:
        """Prometheus text; ``values`` (by name) stand in for the metrics' own, as the bridge's
        workers report the sum over all of them."""
        for collect in self._collectors:
            collect()
        lines: list[str] = []
        for metric in self._metrics.values():
            lines.append(f"# HELP {metric.name} {metric.help}")
            lines.append(f"# TYPE {metric.name} {metric.kind}")
            if metric.labels:
                for label, value in metric.labels.items():
                    lines.append(f"{metric.name}{{{label}}} {_number(value)}")
            else:
                value = metric.value if values is None else values.get(metric.name, metric.value)
                lines.append(f"{metric.name} {_number(value)}")
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class MetricsServer:
    """``GET /metrics`` (and ``/``) for the proxy and the agg: an asyncio server on one
    background thread, whatever the number of connections (docs/limits.md, "Metrics servers").

    At most ``MAX_CONNECTIONS`` at once. Past that a new connection takes the place of the
    oldest one still waiting for its request (closed, counted in ``evicted``), so idle
    connections cannot lock a scraper out; if every one is being answered, the new one is
    closed at once (``refused``). Either is logged, one WARNING per 5 s at most. A connection
    must send its request head (at most 8 KiB) within ``READ_TIMEOUT`` and take the answer
    within ``WRITE_TIMEOUT``, else it is closed. Each answer closes its connection
    (``Connection: close``).
    """

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        self._registry = registry
        self._socket = socket.create_server((host, port), backlog=128)
        self._socket.setblocking(False)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="polyfan-metrics", daemon=True)
        self.open = 0  # connections being served now
        self.refused = 0  # connections closed at once: MAX_CONNECTIONS were being answered
        self.evicted = 0  # connections waiting for their request, closed to make room
        self.timeouts = 0  # connections closed for a request or answer past its timeout
        self._refusals = RefusalLog(5.0)
        self._waiting: dict[asyncio.StreamWriter, None] = {}  # no request yet, oldest first
        self._evicted: set[asyncio.StreamWriter] = set()

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()
        self._started.wait(5)

    def close(self) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(2)
        self._socket.close()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._answer, sock=self._socket, limit=MAX_HEAD)
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            server.close()
            tasks = asyncio.all_tasks() - {asyncio.current_task()}
            for task in tasks:
                task.cancel()
            # Let them end (each closes its transport) before the loop closes: a writer
            # collected after that warns "loop is closed".
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            line = self._refusals.refused("connections", _peer(writer), time.monotonic())
            if line is not None:
                log.warning("metrics: %s (cap %d open)", line, MAX_CONNECTIONS)
            if not self._waiting:
                self.refused += 1
                writer.transport.abort()
                return
            self.evicted += 1
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            self._evicted.add(oldest)
            self.open -= 1  # counted out now; its task ends on its own
            oldest.transport.abort()
        self.open += 1
        self._waiting[writer] = None
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
            self._waiting.pop(writer, None)
            status, body = self._respond(head)
            writer.write(_http_response(status, body, head.startswith(b"HEAD ")))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            writer.close()
        except TimeoutError:
            self.timeouts += 1
            writer.transport.abort()
        except (OSError, EOFError, asyncio.LimitOverrunError):  # IncompleteReadError is EOFError
            writer.transport.abort()
        finally:
            if not writer.transport.is_closing():  # cancelled at close
                writer.transport.abort()
            self._waiting.pop(writer, None)
            if writer in self._evicted:
                self._evicted.discard(writer)
            else:
                self.open -= 1

    def _respond(self, head: bytes) -> tuple[int, bytes]:
        method, _, rest = head.partition(b" ")
        target = rest.partition(b" ")[0]
        if method not in (b"GET", b"HEAD"):
            return 405, b"only GET and HEAD\n"
        if target.split(b"?")[0] not in (b"/", b"/metrics"):
            return 404, b"not found; try /metrics\n"
        return 200, self._registry.render().encode()


MAX_CONNECTIONS = 32  # connections a metrics server serves at once; more are closed at once
READ_TIMEOUT = 5.0  # seconds for a request head to arrive
WRITE_TIMEOUT = 5.0  # seconds for the answer to be taken
MAX_HEAD = 8 * 1024  # bytes of request line and headers


def _http_response(status: int, body: bytes, head_only: bool) -> bytes:
    content_type = "text/plain; version=0.0.4; charset=utf-8"
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head_only else body)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"
