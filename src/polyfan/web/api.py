"""The bridge's HTTP API: the handlers :class:`~polyfan.web.routes.Router` calls for
``/api/bars``, ``/api/symbols``, ``/api/info``, ``/healthz`` and ``/metrics``, reading the live
state (CONTRACT §5, §9; described for programs in ``openapi.json``).

History and symbols are asked of the aggregators (``ask``); what clients and aggregators the
bridge has comes from :class:`~polyfan.fanout.links.Links` and ``totals`` (every worker's
counters summed).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import asdict

from polyfan.errors import WireError
from polyfan.fanout.counters import BridgeCounters
from polyfan.fanout.links import Links
from polyfan.fanout.protocol import BarsQuery, Limits, encode_bars, join_events, parse_bars_query
from polyfan.metrics import CONTENT_TYPE
from polyfan.web.history import Ask, gather_bars
from polyfan.web.http import Response, json_response
from polyfan.web.routes import Handler
from polyfan.wire import codec


class Api:
    """The API's handlers over one bridge process's state."""

    def __init__(
        self,
        links: Links,
        counters: BridgeCounters,
        limits: Limits,
        ask: Ask,
        totals: Callable[[], dict[str, float]],
        render_metrics: Callable[[], bytes],
        workers: int,
    ) -> None:
        self.links = links
        self.counters = counters
        self.limits = limits
        self._ask = ask
        self._totals = totals
        self._render_metrics = render_metrics
        self._workers = workers

    def handlers(self) -> dict[str, Handler]:
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
        problem = self.links.catalog.why_not_served(channel)
        if problem is not None:
            self.counters.bad_requests.inc()
            return json_response(
                404 if self.links.links and self.links.catalog.intervals else 503,
                {"error": problem},
            )
        aggs = self.links.answering(channel)
        if not aggs:
            return json_response(
                503, {"error": f"{channel.name}: no aggregator serving it is heard"}
            )
        try:
            gathered = await gather_bars(
                aggs,
                self._ask,
                channel.name,
                bars_query.since,
                bars_query.before,
                bars_query.limit,
            )
        except TimeoutError:
            return json_response(504, {"error": f"{channel.name}: the aggregator did not answer"})
        if gathered.status is not codec.HistoryStatus.OK:
            return json_response(404, {"error": f"{channel.name}: {gathered.status.name}"})
        parts = encode_bars(channel.interval, channel.symbol or "", gathered.bars.tolist())
        return Response(
            200, join_events(parts), "application/json", [("Cache-Control", "no-store")]
        )

    async def _api_symbols(self, query: dict[str, list[str]]) -> Response:
        heard = self.links.heard()  # a silent one would cost 5 s
        replies = await asyncio.gather(
            *(self._ask(link, {"op": "symbols"}) for link in heard), return_exceptions=True
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
        now = time.monotonic()
        return json_response(
            200,
            {
                "intervals": self.links.catalog.intervals,
                "aggs": [link.status(now) for link in self.links.links],
                "clients": int(self._totals()["polyfan_bridge_clients"]),
                "workers": self._workers,
                "limits": asdict(self.limits),
            },
        )

    async def _healthz(self, query: dict[str, list[str]]) -> Response:
        heard = len(self.links.heard())
        body = {
            "status": "ok" if heard else "waiting for an aggregator",
            "clients": int(self._totals()["polyfan_bridge_clients"]),
            "aggs": len(self.links.links),
            "aggs_heard": heard,
            "intervals": self.links.catalog.intervals,
        }
        return json_response(200 if heard else 503, body)

    async def _metrics(self, query: dict[str, list[str]]) -> Response:
        return Response(200, self._render_metrics(), CONTENT_TYPE, [("Cache-Control", "no-store")])
