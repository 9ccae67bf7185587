"""The bridge's metrics, declared in one place: what it receives, sends, rejects and drops.

The shell, its parts (:mod:`polyfan.fanout.links`, :mod:`polyfan.web.clients`) and
``polyfan bridge --workers N``'s parent (which renders every worker's sum through the same
declarations) all take them from here.
"""

from __future__ import annotations

from polyfan.metrics import Registry

SILENT_AFTER = 2.0  # not heard for this long (it relays the clock 10 times a second, announces
# every second): its channels' feed is down unless a replica carries them (feed_down)
# polyfan_bridge_delivery_seconds's bucket bounds
DELIVERY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0,
)  # fmt: skip


class BridgeCounters:
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
        self.auth_failures = registry.counter(
            "polyfan_bridge_auth_failures_total",
            "Token checks failed: a WebSocket auth with a wrong token, or an HTTP request "
            "without a right one (each counts against its address's allowance).",
        )
        self.auth_throttled = registry.counter(
            "polyfan_bridge_auth_throttled_total",
            "WebSocket auths and HTTP requests refused unchecked (1008 / 429): their address "
            "failed too many token checks.",
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
