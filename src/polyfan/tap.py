"""``polyfan tap ENDPOINT [PREFIX...]``: print what a polyfan PUB endpoint publishes.

One JSON object per message on stdout, every kind of docs/wire.md decoded::

    {"topic": "T.AAPL", "kind": "trades", "session": "9f3a...", "seq": 7, "sym": "AAPL",
     "trades": [{"t": ..., "p": ..., "s": ..., "c": [14, 37], "x": 4, ...}]}
    {"topic": "500Ms.TSLA", "kind": "bars", ..., "bars": [{"ev": "MB", "sym": "TSLA", ...}]}
    {"topic": "_ctl", "kind": "clock", ..., "clock": ..., "wall": ...}
    {"topic": "Q.AAPL", "kind": "quotes", ..., "sym": "AAPL", "events": [{"ev": "Q", ...}]}

Quotes, aggregates (``A.``/``AM.``) and LULD bands print as the Polygon events they came from
(``wire.polygon``); events the proxy passes on raw (``raw.<ev>``) as received.

``session`` is the publisher's session id in hex (a u64 does not survive JavaScript's
numbers). Prefixes are typed as users think of them (``T.TSLA`` exact, ``T.`` or ``T.*`` every
trade, ``500Ms.TSLA``); with none, everything. Messages lost between the publisher and the tap, as
the sequence numbers reveal them, are logged as WARNING lines on stderr.
"""

from __future__ import annotations

import logging
import math
import os
import signal
import sys
from types import FrameType
from typing import Any

import orjson
import zmq

from polyfan import curve
from polyfan.config import TapConfig
from polyfan.errors import ConfigError, WireError
from polyfan.redact import mask_url
from polyfan.wire import codec, polygon

log = logging.getLogger("polyfan.tap")

POLL_MS = 100


def _bar_channel(topic: str) -> tuple[str, int] | None:
    head, dot, symbol = topic.partition(".")
    if dot and head.endswith("Ms") and head[:-2].isdigit():
        return symbol, int(head[:-2])
    return None


def _bars(records: Any, symbol: str | None, interval: int | None) -> list[dict[str, Any]]:
    bars = []
    for bar in records.tolist():
        s, o, h, low, c, v, vw, n, flags = bar
        item: dict[str, Any] = {"ev": "MB"}
        if symbol is not None:
            item["sym"] = symbol
        if interval is not None:
            item["interval"] = interval
        item.update(
            o=o, h=h, l=low, c=c, v=v, vw=None if math.isnan(vw) else vw, n=n, s=s, flags=flags
        )
        if interval is not None:
            item["e"] = s + interval
        bars.append(item)
    return bars


def _only_record(message: codec.Message) -> Any:
    rows = codec.records(message).tolist()
    if len(rows) != 1:
        raise WireError(f"{message.kind.name} message carries {len(rows)} records, not 1")
    return rows[0]


_EVENT_KINDS = (codec.Kind.QUOTES, codec.Kind.AGGREGATES, codec.Kind.LULD, codec.Kind.RAW)


def describe(message: codec.Message) -> dict[str, Any]:
    """A JSON-ready description of one decoded message."""
    kind = message.kind
    out: dict[str, Any] = {
        "topic": message.topic,
        "kind": kind.name.lower(),
        "session": f"{message.session:016x}",
        "seq": message.seq,
    }
    if kind is codec.Kind.TRADES:
        out["sym"] = message.topic.removeprefix("T.")
        trades = []
        for t, p, s, q, trft, trfi, x, z, nc, c, _ in codec.records(message).tolist():
            trades.append(
                {
                    "t": t,
                    "p": p,
                    "s": s,
                    "c": [int(code) for code in c[:nc]],
                    "x": x,
                    "z": z,
                    "q": q,
                    "trfi": trfi,
                    "trft": trft,
                }
            )
        out["trades"] = trades
    elif kind in _EVENT_KINDS:
        if kind is not codec.Kind.RAW:
            out["sym"] = codec.topic_event(message.topic)[1]
        out["events"] = polygon.encode_events_json(message)
    elif kind is codec.Kind.BARS:
        channel = _bar_channel(message.topic)
        symbol, interval = channel if channel is not None else (None, None)
        out["bars"] = _bars(codec.records(message), symbol, interval)
    elif kind is codec.Kind.CLOCK:
        clock, wall = _only_record(message)
        out.update(clock=clock, wall=wall)
    elif kind is codec.Kind.UPSTREAM:
        state, clock, wall = _only_record(message)
        out.update(state="up" if state == codec.UPSTREAM_UP else "down", clock=clock, wall=wall)
    elif kind is codec.Kind.HISTORY:
        request_id, status, bars = codec.records_from_history(message)
        out.update(id=request_id, status=status.name, bars=_bars(bars, None, None))
    else:  # ANNOUNCE, SYMBOLS: JSON payloads
        out["value"] = codec.decode_json(message)
    return out


def run(config: TapConfig) -> int:
    client = curve.Client(config.curve, "tap", [config.endpoint])
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    watch = client.watch(sub)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1_000_000)
    sub.setsockopt(zmq.SNDHWM, 0)  # subscriptions beyond it would be dropped silently
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    gaps = codec.GapCounter()
    out = sys.stdout.buffer
    seen = 0
    try:
        try:
            client.connect(sub, 0, config.endpoint)
        except zmq.ZMQError as exc:
            raise ConfigError(
                f"ENDPOINT: cannot connect to {mask_url(config.endpoint)}: {exc}"
            ) from exc
        prefixes = config.prefixes or ("",)
        for prefix in prefixes:
            for topic in codec.subscription_prefixes(prefix):
                sub.setsockopt(zmq.SUBSCRIBE, topic)
        log.info(
            "ready: tap connected to %s, subscribed to %s",
            mask_url(config.endpoint),
            ", ".join(repr(p) for p in prefixes),
        )
        while not stopping and (config.count is None or seen < config.count):
            if not sub.poll(POLL_MS):
                continue
            frame = sub.recv()
            seen += 1
            try:
                message = codec.decode(frame)
                described = describe(message)
            except WireError as exc:
                log.warning("undecodable message: %s", exc)
                continue
            lost = gaps.observe(message.topic, message.session, message.seq)
            if lost:
                log.warning(
                    "gap on %s: %d messages lost before seq %d", message.topic, lost, message.seq
                )
            out.write(orjson.dumps(described) + b"\n")
            out.flush()
    except BrokenPipeError:  # the reader went away (``polyfan tap ... | head``)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    finally:
        sub.close(0)
        if watch is not None:
            watch.close()
        context.term()
        for sig, handler in previous.items():  # last: a second signal must not cut this short
            signal.signal(sig, handler)
        if gaps.lost:
            log.warning("%d messages lost in total (from sequence numbers)", gaps.lost)
    return 0
