"""Counters and gauges in Prometheus text format, and the small server behind ``--metrics``.

Every component counts what it receives, sends, rejects and drops. A counter is a plain
attribute bump on the hot path (``counter.value += n``); rendering happens only on scrape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


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
    """``GET /metrics`` (and ``/``) on a background thread, for the proxy and the agg."""

    def __init__(self, registry: Registry, host: str, port: int) -> None:
        registry_ref = registry

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] not in ("/", "/metrics"):
                    self.send_error(404)
                    return
                body = registry_ref.render().encode()
                self.send_response(200)
                self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self._server = ThreadingHTTPServer((host, port), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
