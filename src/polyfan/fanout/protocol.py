"""The bridge's client protocol: WebSocket frames in, replies and commands out.

Pure: no asyncio, websockets or zmq. :class:`ClientSession` holds one connection's state (authenticated
or not, its channels, its request-rate bucket); :meth:`ClientSession.receive` takes one client frame and
returns an :class:`Outcome` — status events to send as one frame, the subscriptions to open or
close, and maybe a close code — which the shell (``bridge.py``) carries out. The shell decides
nothing about content.

The protocol is CONTRACT §4, compatible with Polygon's stocks WebSocket::

    <- [{"ev":"status","status":"connected","message":"Connected Successfully"}]
    -> {"action":"auth","params":"TOKEN"}
    <- [{"ev":"status","status":"auth_success","message":"authenticated"}]
    -> {"action":"subscribe","params":"500Ms.TSLA,1000Ms.AAPL","since":1781622376000}
    <- [{"ev":"status","status":"success","message":"subscribed to: 500Ms.TSLA"}, ...]

Bars go out as ``MB`` events (:func:`encode_bar`), encoded once per bar and shared by every
client that receives it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import orjson

from polyfan.config import SYMBOL_RE

CLOSE_POLICY_VIOLATION = 1008  # auth_failed
CLOSE_TOO_BIG = 1009  # a frame over Limits.max_frame_bytes (websockets' max_size)
CLOSE_TRY_AGAIN_LATER = 1013  # backlog over Limits.backlog_bytes: a slow client
MAX_MS = 2**63 - 1  # the largest time the wire carries (bar starts are int64 Unix ms)

A = TypeVar("A", bound=Hashable)

_CHANNEL_RE = re.compile(r"([1-9][0-9]{0,8})Ms\.(.*)")


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound a client meets, in one place (documented in docs/bridge.md)."""

    max_frame_bytes: int = 64 * 1024  # larger client frames: close 1009
    max_subscriptions: int = 1000  # channels per connection
    rate_per_second: float = 50.0  # client frames per second, sustained ...
    rate_burst: float = 100.0  # ... with this burst (token bucket)
    backlog_bytes: int = 8 * 1024 * 1024  # unsent bytes per client before close 1013
    backlog_seconds: float = 15.0  # ... or this long with bars unsent (a stalled client)
    since_max_bars: int = 20_000  # bars sent for one `since` request (the most recent)
    auth_timeout: float = 10.0  # seconds from connect to a successful auth, else close 1008
    api_max_limit: int = 10_000  # /api/bars?limit=
    api_default_limit: int = 600
    # New connections, per process (with --workers N, per worker; docs/limits.md):
    max_handshakes: int = 500  # connections accepted, not yet upgraded or answered
    max_handshakes_per_address: int = 256  # ... from one client address (0: no cap)
    max_connections_per_address: int = 10_000  # handshakes and clients of one address (0: no cap)
    open_files_headroom: int = 256  # refuse new connections this close to RLIMIT_NOFILE
    request_timeout: float = 5.0  # seconds from accept to a complete HTTP request, else closed
    # Failed token checks per client address (WebSocket auth, HTTP without the token): this
    # many, then one more every auth_refill_seconds; past that, refused unchecked (per process).
    auth_failures: int = 10
    auth_refill_seconds: float = 6.0


@dataclass(frozen=True, slots=True, order=True)
class Channel:
    """``<N>Ms.<SYMBOL>``, or ``<N>Ms.*`` (``symbol is None``) for every symbol."""

    interval: int
    symbol: str | None

    @property
    def name(self) -> str:
        return f"{self.interval}Ms.{'*' if self.symbol is None else self.symbol}"

    @property
    def topic(self) -> bytes:
        """The ZeroMQ subscription: one exact topic, or the interval's prefix for ``*``."""
        if self.symbol is None:
            return f"{self.interval}Ms.".encode()
        return f"{self.interval}Ms.{self.symbol}\x00".encode()

    def __str__(self) -> str:
        return self.name


class ChannelError(ValueError):
    """A channel string that is not ``<N>Ms.<SYMBOL>``; the message names it."""


def parse_channel(text: str) -> Channel:
    """``500Ms.TSLA`` → ``Channel(500, "TSLA")``; ``500Ms.*`` → ``Channel(500, None)``."""
    match = _CHANNEL_RE.fullmatch(text)
    if match is None:
        raise ChannelError(f"{text}: not a channel; write <N>Ms.<SYMBOL> like 500Ms.TSLA")
    symbol = match.group(2)
    if symbol == "*":
        return Channel(int(match.group(1)), None)
    if SYMBOL_RE.fullmatch(symbol) is None:
        raise ChannelError(
            f"{text}: bad symbol {symbol!r}; use 1 to 32 of A-Z a-z 0-9 . : / _ - or *"
        )
    return Channel(int(match.group(1)), symbol)


def parse_bar_topic(topic: str) -> tuple[int, str] | None:
    """A bar message's topic ``500Ms.TSLA`` → ``(500, "TSLA")``; None if it is not one."""
    interval, sep, symbol = topic.partition("Ms.")
    if not sep or not (interval.isascii() and interval.isdigit()) or not symbol:
        return None
    return int(interval), symbol


@dataclass(frozen=True, slots=True)
class AggServes:
    """What one aggregator announced it serves."""

    intervals: frozenset[int]
    symbols: frozenset[str] | None  # None: every symbol

    def serves(self, channel: Channel) -> bool:
        if channel.interval not in self.intervals:
            return False
        return channel.symbol is None or self.symbols is None or channel.symbol in self.symbols


class Catalog(Generic[A]):
    """What each aggregator serves (keyed by the shell's aggregator object), and who serves a
    channel."""

    def __init__(self) -> None:
        self._aggs: dict[A, AggServes] = {}

    def update(self, agg: A, serves: AggServes) -> None:
        self._aggs[agg] = serves

    @property
    def intervals(self) -> list[int]:
        return sorted({i for serves in self._aggs.values() for i in serves.intervals})

    def symbols_of(self, agg: A) -> frozenset[str] | None:
        """The symbols ``agg`` announced (None: every symbol, or not announced)."""
        serves = self._aggs.get(agg)
        return None if serves is None else serves.symbols

    def aggs_for(self, channel: Channel) -> list[A]:
        """Every aggregator that serves the channel, in the order they were first heard."""
        return [agg for agg, serves in self._aggs.items() if serves.serves(channel)]

    def why_not_served(self, channel: Channel) -> str | None:
        """None when some agg serves the channel, else the error message naming it."""
        if not self._aggs:
            return f"{channel.name}: no aggregator is connected yet; try again shortly"
        if any(serves.serves(channel) for serves in self._aggs.values()):
            return None
        if channel.interval not in self.intervals:
            served = ", ".join(f"{i}Ms" for i in self.intervals)
            return f"{channel.name}: interval {channel.interval}ms is not served; served: {served}"
        return f"{channel.name}: symbol {channel.symbol} is not served by any aggregator"


def status(kind: str, message: str) -> dict[str, str]:
    return {"ev": "status", "status": kind, "message": message}


def error(message: str) -> dict[str, str]:
    return status("error", message)


CONNECTED = status("connected", "Connected Successfully")
AUTH_SUCCESS = status("auth_success", "authenticated")
AUTH_FAILED = status("auth_failed", "authentication failed")
AUTH_TIMEOUT = status("auth_timeout", "no successful auth in time; closing")


def auth_throttled(retry_in: float) -> dict[str, str]:
    """The answer to an auth from an address that failed too often (not checked)."""
    return status(
        "auth_failed",
        f"too many failed auth attempts from this address; retry in {math.ceil(retry_in)} s",
    )


def encode_events(events: Sequence[dict[str, Any]]) -> bytes:
    """One server frame: a JSON array."""
    return orjson.dumps(list(events))


def encode_bar(
    interval: int,
    symbol: str,
    s: int,
    o: float,
    h: float,
    low: float,
    c: float,
    v: float,
    vw: float,
    n: int,
    flags: int,
) -> bytes:
    """One ``MB`` event (no brackets), encoded once and shared by every receiving client.

    ``v`` is an integer when whole; ``vw`` is null when NaN; ``"outage": true`` only when the
    bar spans an upstream outage (``wire.BAR_FLAG_OUTAGE``).
    """
    event: dict[str, Any] = {
        "ev": "MB",
        "sym": symbol,
        "interval": interval,
        "o": o,
        "h": h,
        "l": low,
        "c": c,
        "v": int(v) if float(v).is_integer() else v,
        "vw": None if math.isnan(vw) else vw,
        "n": n,
        "s": s,
        "e": s + interval,
    }
    if flags & 1:  # wire.BAR_FLAG_OUTAGE; wire is not imported to keep this module numpy-free
        event["outage"] = True
    return orjson.dumps(event)


def encode_bars(interval: int, symbol: str, rows: Iterable[tuple[Any, ...]]) -> list[bytes]:
    """Encode ``wire.BAR_DTYPE`` rows (``records.tolist()``): ``(s,o,h,l,c,v,vw,n,flags)``."""
    return [encode_bar(interval, symbol, *row) for row in rows]


def join_events(parts: Sequence[bytes]) -> bytes:
    """A frame from pre-encoded events: ``[a,b,c]``."""
    return b"[" + b",".join(parts) + b"]"


# ---------------------------------------------------------------------------------------------
# Commands the session asks the shell to carry out.


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: Channel
    since: int | None  # send stored bars with s >= since first


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: Channel


@dataclass(slots=True)
class Outcome:
    """What one client frame produced, in order: ``events`` (one frame, may be empty) first,
    then ``commands``; ``close`` ends the connection after the events are sent."""

    events: list[dict[str, Any]] = field(default_factory=list)
    commands: list[Subscribe | Unsubscribe] = field(default_factory=list)
    close: tuple[int, str] | None = None
    bad_requests: int = 0

    def reject(self, message: str) -> None:
        self.events.append(error(message))
        self.bad_requests += 1


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; times are seconds from any monotonic clock."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = burst
        self.updated = now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False


class ClientSession:
    """One client connection's protocol state: frames in, :class:`Outcome` out."""

    def __init__(self, tokens: Collection[str], limits: Limits, now: float) -> None:
        self.tokens = frozenset(tokens)
        self.limits = limits
        self.authenticated = False
        self.channels: set[Channel] = set()
        self._bucket = TokenBucket(limits.rate_per_second, limits.rate_burst, now)

    def receive(self, frame: str | bytes, now: float, catalog: Catalog[Any]) -> Outcome:
        """Process one client frame (text or binary, JSON object expected)."""
        out = Outcome()
        if not self._bucket.take(now):
            out.reject(
                f"rate limit: at most {self.limits.rate_per_second:g} frames per second "
                f"(burst {self.limits.rate_burst:g}); frame ignored"
            )
            return out
        try:
            request = orjson.loads(frame)
        except orjson.JSONDecodeError:
            out.reject("malformed JSON: send one JSON object per frame")
            return out
        if not isinstance(request, dict):
            out.reject('not a JSON object: send {"action": ..., "params": ...}')
            return out
        action = request.get("action")
        if action == "auth":
            self._auth(request, out)
        elif not self.authenticated:
            out.reject(f"{_describe(action)}: not authenticated; send auth first")
        elif action == "subscribe":
            self._subscribe(request, catalog, out)
        elif action == "unsubscribe":
            self._unsubscribe(request, out)
        else:
            out.reject(f"{_describe(action)}: unknown action; use auth, subscribe or unsubscribe")
        return out

    def _auth(self, request: dict[str, Any], out: Outcome) -> None:
        if self.authenticated:
            out.events.append(AUTH_SUCCESS)
            return
        params = request.get("params")
        if self.tokens and (not isinstance(params, str) or params not in self.tokens):
            out.events.append(AUTH_FAILED)
            out.bad_requests += 1
            out.close = (CLOSE_POLICY_VIOLATION, "authentication failed")
            return
        self.authenticated = True
        out.events.append(AUTH_SUCCESS)

    def _channels(self, request: dict[str, Any], out: Outcome) -> list[Channel | ChannelError]:
        """The channels of ``params`` in order; a malformed one as its error, to answer in turn."""
        params = request.get("params")
        if not isinstance(params, str):
            out.reject(
                f"{request['action']}: params must be a comma-separated string of channels "
                "like 500Ms.TSLA,1000Ms.AAPL"
            )
            return []
        channels: list[Channel | ChannelError] = []
        for text in params.split(","):
            text = text.strip()
            if not text:
                continue
            try:
                channels.append(parse_channel(text))
            except ChannelError as exc:
                channels.append(exc)
        if not channels:
            out.reject(
                f"{request['action']}: params must be a comma-separated string of channels "
                "like 500Ms.TSLA,1000Ms.AAPL"
            )
        return channels

    def _subscribe(self, request: dict[str, Any], catalog: Catalog[Any], out: Outcome) -> None:
        since = request.get("since")
        if since is not None and (type(since) is not int or not 0 <= since <= MAX_MS):
            out.reject("subscribe: since must be an integer of Unix milliseconds")
            return
        for channel in self._channels(request, out):
            if isinstance(channel, ChannelError):
                out.reject(str(channel))
                continue
            problem = catalog.why_not_served(channel)
            if problem is not None:
                out.reject(problem)
                continue
            if since is not None and channel.symbol is None:
                out.reject(f"{channel.name}: since needs one symbol; history is per symbol")
                continue
            is_new = channel not in self.channels
            if is_new and len(self.channels) >= self.limits.max_subscriptions:
                out.reject(
                    f"{channel.name}: subscription limit of "
                    f"{self.limits.max_subscriptions} channels per connection reached"
                )
                continue
            self.channels.add(channel)
            out.events.append(status("success", f"subscribed to: {channel.name}"))
            if is_new or since is not None:
                out.commands.append(Subscribe(channel, since))

    def _unsubscribe(self, request: dict[str, Any], out: Outcome) -> None:
        for channel in self._channels(request, out):
            if isinstance(channel, ChannelError):
                out.reject(str(channel))
                continue
            out.events.append(status("success", f"unsubscribed to: {channel.name}"))
            if channel in self.channels:
                self.channels.discard(channel)
                out.commands.append(Unsubscribe(channel))


def _describe(action: object) -> str:
    if isinstance(action, str):
        return f"action {action[:40]!r}"
    return "action missing" if action is None else "action is not a string"


# ---------------------------------------------------------------------------------------------
# HTTP API parameters


class ParamError(ValueError):
    """A bad HTTP query parameter; the message names it."""


@dataclass(frozen=True, slots=True)
class BarsQuery:
    channel: Channel
    limit: int
    before: int | None  # bars with s < before (``to`` or ``before``)
    since: int | None = None  # bars with s >= since (``from``)


def parse_bars_query(query: dict[str, list[str]], limits: Limits) -> BarsQuery:
    """``/api/bars?channel=500Ms.TSLA&limit=600&before=MS`` or ``&from=MS&to=MS`` (bars with
    ``from <= s < to``; ``before`` is another name for ``to``), from ``urllib.parse.parse_qs``."""

    def one(name: str) -> str | None:
        values = query.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise ParamError(f"{name}: given more than once")
        return values[0]

    text = one("channel")
    if text is None:
        raise ParamError("channel: required, like channel=500Ms.TSLA")
    try:
        channel = parse_channel(text)
    except ChannelError as exc:
        raise ParamError(f"channel: {exc}") from None
    if channel.symbol is None:
        raise ParamError(f"channel: {text}: history is per symbol; * is not allowed here")
    limit = limits.api_default_limit
    limit_text = one("limit")
    if limit_text is not None:
        value = _milliseconds(limit_text)
        if value is None or not 1 <= value <= limits.api_max_limit:
            raise ParamError(
                f"limit: {limit_text!r} is not an integer from 1 to {limits.api_max_limit}"
            )
        limit = value
    if "before" in query and "to" in query:
        raise ParamError("to: give to or before, not both (they mean the same)")
    bounds: dict[str, int | None] = {}
    for name in ("from", "to", "before"):
        text = one(name)
        bounds[name] = None if text is None else _milliseconds(text)
        if text is not None and bounds[name] is None:
            raise ParamError(f"{name}: {text!r} is not Unix milliseconds")
    since = bounds["from"]
    before = bounds["to"] if bounds["to"] is not None else bounds["before"]
    if since is not None and before is not None and since >= before:
        raise ParamError(f"from: {since} is not before to {before}")
    unknown = sorted(set(query) - {"channel", "limit", "before", "from", "to"})
    if unknown:
        raise ParamError(
            f"{unknown[0]}: unknown parameter; use channel, limit, from, to and before"
        )
    return BarsQuery(channel, limit, before, since)


def _milliseconds(text: str) -> int | None:
    """ASCII digits whose value fits the wire's int64 times, else None (``str.isdigit`` alone
    takes ``"²"``, which ``int`` refuses, and a value past int64 cannot go to an agg)."""
    if not (text.isascii() and text.isdigit() and len(text) <= 19):
        return None
    value = int(text)
    return value if value <= MAX_MS else None
