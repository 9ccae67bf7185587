"""The metrics of every role, and the small server behind ``--metrics``.

This module owns how polyfan declares and exports metrics. A role declares its counters,
gauges, labelled counters and histograms on a :class:`Registry`; on the hot path a counter is
a plain attribute bump (``counter.value += n``) and a histogram a bucket-count bump per batch
(:meth:`Histogram.observe`), with no ``prometheus_client`` object in sight. At scrape time
:class:`RegistryCollector` reads those values into ``prometheus_client`` metric families, next
to ``prometheus_client``'s own ``process_*``, ``python_info`` and ``python_gc_*`` collectors,
and :meth:`Registry.render` writes them in the Prometheus text format as ``prometheus_client``
writes it (label values escaped).

Label sets are bounded: a labelled counter keeps at most ``MAX_LABEL_VALUES`` values (later
ones are counted under ``other``) of at most ``MAX_LABEL_CHARS`` characters each.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from http import HTTPStatus
from typing import TypeVar

import numpy as np
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.core import (
    Metric as Family,
)
from prometheus_client.registry import Collector

from polyfan.errors import ConfigError
from polyfan.web.admission import RefusalLog

log = logging.getLogger("polyfan.metrics")

MAX_LABEL_VALUES = 32  # distinct values a labelled counter keeps; later ones count as "other"
MAX_LABEL_CHARS = 64  # a longer label value is cut to this many characters
OTHER = "other"
_M = TypeVar("_M", "Metric", "Labeled", "Histogram")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metric:
    """A counter or gauge: ``value`` is bumped or set by its owner, read at scrape time."""

    __slots__ = ("help", "kind", "name", "value")

    def __init__(self, name: str, help: str, kind: str) -> None:
        self.name = name
        self.help = help
        self.kind = kind
        self.value: float = 0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class Labeled:
    """A counter by one label (``reason``, ``status`` ...): ``values`` maps label values to
    counts. Set :attr:`values` whole (a fresh dict) or :meth:`inc`; at most
    ``MAX_LABEL_VALUES`` label values are kept, the rest count as ``other``."""

    __slots__ = ("help", "label", "name", "values")

    def __init__(self, name: str, help: str, label: str) -> None:
        self.name = name
        self.help = help
        self.label = label
        self.values: dict[str, float] = {}

    def inc(self, value: str, amount: float = 1) -> None:
        values = self.values
        if value not in values and len(values) >= MAX_LABEL_VALUES - (OTHER not in values):
            value = OTHER
        values[value] = values.get(value, 0) + amount

    def samples(self) -> list[tuple[str, float]]:
        """The values to expose: bounded in number and length (merged where that collides)."""
        out: dict[str, float] = {}
        for key, count in list(self.values.items()):
            key = str(key)[:MAX_LABEL_CHARS]
            if key not in out and len(out) >= MAX_LABEL_VALUES - 1:
                key = OTHER
            out[key] = out.get(key, 0) + count
        return list(out.items())


class Histogram:
    """A Prometheus histogram with fixed upper bounds (seconds), cheap to observe in bulk:
    ``counts[i]`` counts observations in bucket i (not cumulative; the last is ``+Inf``)."""

    __slots__ = ("bounds", "count", "counts", "help", "name", "sum")

    def __init__(self, name: str, help: str, bounds: Sequence[float]) -> None:
        if list(bounds) != sorted(set(bounds)) or not bounds:
            raise ValueError(f"{name}: bucket bounds must be distinct and increasing")
        self.name = name
        self.help = help
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` ``times`` times (once per bar of a batch, for instance)."""
        self.counts[bisect.bisect_left(self.bounds, value)] += times
        self.sum += value * times
        self.count += times

    def observe_many(self, values: np.ndarray) -> None:
        """Record every value of ``values`` (one numpy pass)."""
        if len(values) == 0:
            return
        buckets = np.searchsorted(np.asarray(self.bounds), values, side="left")
        for index, times in zip(*np.unique(buckets, return_counts=True), strict=True):
            self.counts[int(index)] += int(times)
        self.sum += float(values.sum())
        self.count += len(values)

    def cumulative(self) -> list[tuple[str, float]]:
        """``(le, cumulative count)`` per bucket, ``+Inf`` last."""
        out = []
        total = 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            total += count
            out.append((_le(bound), float(total)))
        return out

    def sample_values(self) -> dict[str, float]:
        """Flat samples (as a scrape names them), for summing over processes."""
        values = {f'{self.name}_bucket{{le="{le}"}}': v for le, v in self.cumulative()}
        values[f"{self.name}_sum"] = self.sum
        values[f"{self.name}_count"] = float(self.count)
        return values


def _le(bound: float) -> str:
    if bound == float("inf"):
        return "+Inf"
    return repr(bound)


class Registry:
    """Every metric of one role, in declaration order: the one way polyfan registers them."""

    def __init__(self) -> None:
        self._metrics: dict[str, Metric | Labeled | Histogram] = {}
        self._aliases: dict[str, tuple[Histogram, str]] = {}
        self._collectors: list[Callable[[], None]] = []
        self._exporter: CollectorRegistry | None = None

    def counter(self, name: str, help: str) -> Metric:
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        return self._add(Metric(name, help, "counter"))

    def gauge(self, name: str, help: str) -> Metric:
        return self._add(Metric(name, help, "gauge"))

    def labeled(self, name: str, help: str, label: str) -> Labeled:
        """A counter by one label, its values bounded (see :class:`Labeled`)."""
        if not name.endswith("_total"):
            raise ValueError(f"counter {name} must end in _total")
        return self._add(Labeled(name, help, label))

    def histogram(self, name: str, help: str, bounds: Sequence[float]) -> Histogram:
        return self._add(Histogram(name, help, bounds))

    def alias(self, name: str, help: str, histogram: Histogram) -> None:
        """Expose ``histogram`` under a second name too (an older name kept for its users)."""
        self._check(name)
        self._aliases[name] = (histogram, help)

    def on_collect(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` before each reading, to refresh gauges computed on demand."""
        self._collectors.append(callback)

    def _check(self, name: str) -> None:
        if name in self._metrics or name in self._aliases:
            raise ValueError(f"metric {name} registered twice")

    def _add(self, metric: _M) -> _M:
        self._check(metric.name)
        self._metrics[metric.name] = metric
        return metric

    def get(self, name: str) -> Metric | Labeled | Histogram:
        return self._metrics[name]

    def refresh(self) -> None:
        for collect in self._collectors:
            collect()

    def values(self) -> dict[str, float]:
        """Every unlabelled sample by name (histograms' ``_bucket{le=...}``, ``_sum`` and
        ``_count`` included): what the bridge's workers add up."""
        self.refresh()
        out: dict[str, float] = {}
        for metric in self._metrics.values():
            if isinstance(metric, Metric):
                out[metric.name] = metric.value
            elif isinstance(metric, Histogram):
                out.update(metric.sample_values())
        return out

    def families(self, values: Mapping[str, float] | None = None) -> Iterator[Family]:
        """The metrics as ``prometheus_client`` families; ``values`` (samples by name, as
        :meth:`values` gives them) stand in for this process's own, as the bridge's workers
        report the sum over all of them."""
        self.refresh()
        for metric in self._metrics.values():
            if isinstance(metric, Histogram):
                yield _histogram(metric.name, metric.help, metric, values)
            elif isinstance(metric, Labeled):
                family = CounterMetricFamily(metric.name, metric.help, labels=[metric.label])
                for label, count in metric.samples():
                    family.add_metric([label], count)
                yield family
            else:
                value = metric.value if values is None else values.get(metric.name, metric.value)
                if metric.kind == "counter":
                    yield CounterMetricFamily(metric.name, metric.help, value=value)
                else:
                    yield GaugeMetricFamily(metric.name, metric.help, value=value)
        for name, (histogram, help) in self._aliases.items():
            yield _histogram(name, help, histogram, values)

    def render(self, values: Mapping[str, float] | None = None) -> bytes:
        """The Prometheus text format: these metrics, then ``process_*``, ``python_info`` and
        ``python_gc_*``."""
        exporter = CollectorRegistry(auto_describe=False)
        exporter.register(RegistryCollector(self, values))
        for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
            exporter.register(_Borrowed(collector))
        return generate_latest(exporter)


def _histogram(
    name: str, help: str, histogram: Histogram, values: Mapping[str, float] | None
) -> HistogramMetricFamily:
    buckets = histogram.cumulative()
    total = histogram.sum
    if values is not None:
        prefix = histogram.name
        buckets = [
            (le, values.get(f'{prefix}_bucket{{le="{le}"}}', count)) for le, count in buckets
        ]
        total = values.get(f"{prefix}_sum", total)
    return HistogramMetricFamily(name, help, buckets=buckets, sum_value=total)


class RegistryCollector(Collector):
    """A ``prometheus_client`` collector reading a :class:`Registry` at scrape time."""

    def __init__(self, registry: Registry, values: Mapping[str, float] | None = None) -> None:
        self.registry = registry
        self.values = values

    def collect(self) -> Iterator[Family]:
        return self.registry.families(self.values)


class _Borrowed(Collector):
    """One of ``prometheus_client``'s default collectors, in a registry of our own."""

    def __init__(self, collector: Collector) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Family]:
        return iter(self.collector.collect())


class MetricsServer:
    """``GET /metrics`` (and ``/``) behind ``--metrics``: an asyncio server on one
    background thread, whatever the number of connections (docs/limits.md, "Metrics servers").

    At most ``MAX_CONNECTIONS`` at once. Past that a new connection takes the place of the
    oldest one still waiting for its request (closed, counted in ``evicted``), so idle
    connections cannot lock a scraper out; if every one is being answered, the new one is
    closed at once (``refused``). Either is logged, one WARNING per 5 s at most. A connection
    must send its request head (at most 8 KiB) within ``READ_TIMEOUT`` and take the answer
    within ``WRITE_TIMEOUT``, else it is closed. Each answer closes its connection
    (``Connection: close``).
    """

    def __init__(self, source: Registry | Callable[[], bytes], host: str, port: int) -> None:
        self._render = source.render if isinstance(source, Registry) else source
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
        return 200, self._render()


def listen(address: tuple[str, int], source: Registry | Callable[[], bytes]) -> MetricsServer:
    """The ``--metrics`` server on ``address`` (bound, not started), or a ConfigError naming
    the flag."""
    host, port = address
    try:
        return MetricsServer(source, host, port)
    except OSError as exc:
        raise ConfigError(f"--metrics: cannot listen on {host}:{port}: {exc}") from exc


MAX_CONNECTIONS = 32  # connections a metrics server serves at once; more are closed at once
READ_TIMEOUT = 5.0  # seconds for a request head to arrive
WRITE_TIMEOUT = 5.0  # seconds for the answer to be taken
MAX_HEAD = 8 * 1024  # bytes of request line and headers


def _http_response(status: int, body: bytes, head_only: bool) -> bytes:
    lines = [
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
        f"Content-Type: {CONTENT_TYPE}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        "",
        "",
    ]
    return "\r\n".join(lines).encode() + (b"" if head_only else body)


def _peer(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else "?"
