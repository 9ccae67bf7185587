"""The upstream session as a pure state machine: frames in, events and replies out.

Nothing here touches a socket or a clock: the proxy shell feeds frames and the wall time in and
writes out what comes back. Three pieces:

- :class:`TradeDecoder` parses Polygon frames and validates every ``T`` event into
  ``wire.TRADE_DTYPE`` records grouped by symbol (arrival order kept), counting everything it
  skips in :class:`FeedStats`.
- :class:`Session` follows the protocol of one connection (connected → auth → auth_success →
  subscribe → success) and decides what every status means: a reply to send, a reconnect, a
  cool-down, or :class:`~polyfan.errors.AuthenticationError`.
- :class:`FeedClock` is the feed clock of CONTRACT section 3.

Parsing: a typed msgspec decode of the whole frame as ``list[Trade | Status]`` is the fast path
(about 1.5 times faster than ``orjson.loads``, see bench/bench_proxy.py); a frame it refuses
(an unknown ``ev``, a malformed trade, not JSON at all) is decoded again generically and handled
element by element, so one bad event never costs the good ones around it.
"""

from __future__ import annotations

import enum
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, cast

import msgspec
import numpy as np
import orjson
from msgspec import Meta

from polyfan import wire
from polyfan.config import SYMBOL_RE, mask_secret
from polyfan.errors import AuthenticationError

FUTURE_LIMIT_MS = 5_000  # a trade stamped further ahead of the wall clock is rejected
IDLE_MS = 1_000  # the feed clock follows the wall clock after this long without a trade

_U16 = Annotated[int, Meta(ge=0, le=65_535)]
_U8 = Annotated[int, Meta(ge=0, le=255)]


class Trade(msgspec.Struct, tag_field="ev", tag="T", gc=False, omit_defaults=True):
    """One ``T`` event as it arrives; fields polyfan does not publish (``i``, ``pt``) are skipped."""

    sym: str
    p: Annotated[float, Meta(gt=0)]
    t: Annotated[int, Meta(ge=0)]
    s: Annotated[int, Meta(ge=0)] | None = None
    ds: str | None = None
    c: Annotated[list[_U8], Meta(max_length=wire.MAX_CONDITIONS)] | None = None
    x: _U16 = 0
    z: _U8 = 0
    q: int = 0
    trfi: _U16 = 0
    trft: int = 0


class Status(msgspec.Struct, tag_field="ev", tag="status", gc=False):
    status: str = ""
    message: str = ""


_FRAME = msgspec.json.Decoder(list[Trade | Status])
_ANY = msgspec.json.Decoder()

_NO_CONDITIONS: list[int] = []

# Which trade field a msgspec validation error is about, and the reason it is counted under.
_ERROR_FIELD = re.compile(r"`\$(?:\[\d+\])?\.(\w+)|field `(\w+)`")
_REASONS = {
    "sym": "symbol",
    "p": "price",
    "s": "size",
    "ds": "size",
    "t": "timestamp",
    "c": "conditions",
}


@dataclass
class FeedStats:
    """What the decoder and the session have counted; the proxy exports these as metrics."""

    frames: int = 0
    events: int = 0
    trades: int = 0  # accepted trades
    bad_messages: int = 0  # frames, elements and trades skipped as malformed
    rejected: Counter[str] = field(default_factory=Counter)  # trades rejected, by reason
    unknown_events: int = 0  # elements with an ``ev`` polyfan does not use
    statuses: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class TradeBatch:
    """The accepted trades of some frames, one records array per symbol, in arrival order."""

    topics: list[bytes]
    records: list[np.ndarray]
    count: int
    max_t: int

    @classmethod
    def empty(cls) -> TradeBatch:
        return cls([], [], 0, 0)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something skipped as malformed; the shell logs these, rate-limited."""

    what: str


@dataclass
class Decoded:
    trades: TradeBatch
    statuses: list[Status]
    problems: list[Problem]


class TradeDecoder:
    """Polygon frames in, validated trade records per symbol and the status events out."""

    def __init__(self, stats: FeedStats | None = None) -> None:
        self.stats = stats if stats is not None else FeedStats()
        self._symbol_ids: dict[str, int] = {}
        self._topics: list[bytes] = []

    def decode(self, frames: Sequence[bytes | str], now_ms: int) -> Decoded:
        """Decode frames received in this order; ``now_ms`` is the wall clock (Unix ms)."""
        stats = self.stats
        stats.frames += len(frames)
        problems: list[Problem] = []
        together = self._decode_together(frames)
        if together is not None:
            events, has_status = together
        else:  # some frame is not a clean array of trades and statuses: frame by frame
            events, has_status = [], True
            for frame in frames:
                try:
                    events += _FRAME.decode(frame)
                except msgspec.DecodeError:
                    events += self._decode_slowly(frame, problems)
        stats.events += len(events)
        statuses = [e for e in events if type(e) is Status] if has_status else []
        trades = cast(
            "list[Trade]", [e for e in events if type(e) is Trade] if statuses else events
        )
        return Decoded(self._records(trades, now_ms, problems), statuses, problems)

    @staticmethod
    def _decode_together(
        frames: Sequence[bytes | str],
    ) -> tuple[list[Trade | Status], bool] | None:
        """The fast path: every frame's elements spliced into one array, one typed decode.

        Returns the events and whether any could be a status, or None when some frame is not
        a clean array of trades and statuses (the caller then goes frame by frame).
        """
        parts = []
        has_status = False
        for frame in frames:
            data = (frame.encode() if isinstance(frame, str) else frame).strip()
            if len(data) < 3 or data[0] != 0x5B or data[-1] != 0x5D:  # [ ... ]
                return None
            parts.append(data[1:-1])
            has_status = has_status or b"status" in data
        try:
            return _FRAME.decode(b"[" + b",".join(parts) + b"]"), has_status
        except msgspec.DecodeError:
            return None

    def _decode_slowly(self, frame: bytes | str, problems: list[Problem]) -> list[Trade | Status]:
        """Element by element, after the typed decode refused the frame."""
        stats = self.stats
        try:
            value = _ANY.decode(frame)
        except msgspec.DecodeError:
            stats.bad_messages += 1
            problems.append(Problem(f"a frame is not JSON: {_excerpt(frame)}"))
            return []
        if not isinstance(value, list):
            stats.bad_messages += 1
            problems.append(Problem(f"a frame is not a JSON array: {_excerpt(frame)}"))
            return []
        events: list[Trade | Status] = []
        for element in value:
            if not isinstance(element, dict):
                stats.bad_messages += 1
                problems.append(Problem(f"a frame element is not an object: {_excerpt(element)}"))
                continue
            ev = element.get("ev")
            if ev == "T":
                try:
                    events.append(msgspec.convert(element, Trade))
                except msgspec.ValidationError as exc:
                    reason = _reason(str(exc))
                    self._reject(reason, 1)
                    problems.append(Problem(f"invalid trade ({exc}): {_excerpt(element)}"))
            elif ev == "status":
                try:
                    events.append(msgspec.convert(element, Status))
                except msgspec.ValidationError as exc:
                    stats.bad_messages += 1
                    problems.append(Problem(f"invalid status ({exc}): {_excerpt(element)}"))
            else:
                stats.unknown_events += 1
        return events

    def _reject(self, reason: str, count: int) -> None:
        self.stats.rejected[reason] += count
        self.stats.bad_messages += count

    def _records(self, trades: list[Trade], now_ms: int, problems: list[Problem]) -> TradeBatch:
        n = len(trades)
        if n == 0:
            return TradeBatch.empty()
        records = np.zeros(n, wire.TRADE_DTYPE)
        records["t"] = np.array([t.t for t in trades], np.int64)
        records["p"] = np.array([t.p for t in trades], np.float64)
        records["q"] = np.array([t.q for t in trades], np.int64)
        records["trft"] = np.array([t.trft for t in trades], np.int64)
        records["trfi"] = np.array([t.trfi for t in trades], np.uint16)
        records["x"] = np.array([t.x for t in trades], np.uint16)
        records["z"] = np.array([t.z for t in trades], np.uint8)
        records["s"] = self._sizes(trades)
        conditions = [t.c or _NO_CONDITIONS for t in trades]
        counts = np.fromiter(map(len, conditions), np.int64, n)
        if counts.any():
            records["nc"] = counts
            rows = np.repeat(np.arange(n), counts)
            slots = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            records["c"][rows, slots] = [code for codes in conditions for code in codes]

        ids = self._ids([t.sym for t in trades])
        valid = np.ones(n, dtype=bool)
        checks = (
            ("symbol", ids >= 0),
            ("price", np.isfinite(records["p"])),
            ("size", np.isfinite(records["s"]) & (records["s"] >= 0)),
            ("future", records["t"] <= now_ms + FUTURE_LIMIT_MS),
        )
        for reason, ok in checks:
            if not ok.all():
                bad = ~ok & valid
                self._reject(reason, int(bad.sum()))
                for index in np.flatnonzero(bad)[:3]:
                    problems.append(Problem(f"invalid trade ({reason}): {_excerpt(trades[index])}"))
                valid &= ok
        if not valid.all():
            records = records[valid]
            ids = ids[valid]
        count = len(records)
        self.stats.trades += count
        if count == 0:
            return TradeBatch.empty()
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        grouped = records[order]
        starts = (np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1).tolist()
        topics = self._topics
        return TradeBatch(
            topics=[topics[i] for i in sorted_ids[[0, *starts]].tolist()],
            records=[grouped[a:b] for a, b in zip([0, *starts], [*starts, count], strict=True)],
            count=count,
            max_t=int(records["t"].max()),
        )

    @staticmethod
    def _sizes(trades: list[Trade]) -> np.ndarray:
        """``ds`` when present, else ``s``; NaN (rejected as ``size``) when neither parses."""
        try:
            return np.array([t.s if t.ds is None else float(t.ds) for t in trades], np.float64)
        except (TypeError, ValueError):
            return np.array([_size(t) for t in trades], dtype=np.float64)

    def _ids(self, symbols: list[str]) -> np.ndarray:
        """A small integer per valid symbol (-1 for an invalid one), stable for the process."""
        known = self._symbol_ids
        ids = [known.get(s, -1) for s in symbols]
        if -1 in ids:
            for index, symbol in enumerate(symbols):
                if ids[index] == -1 and SYMBOL_RE.fullmatch(symbol) is not None:
                    ids[index] = known.setdefault(symbol, len(known))
                    if len(self._topics) < len(known):
                        self._topics.append(wire.trade_topic(symbol))
        return np.array(ids, dtype=np.int64)


def _size(trade: Trade) -> float:
    if trade.ds is None:
        return math.nan if trade.s is None else float(trade.s)
    try:
        return float(trade.ds)
    except ValueError:
        return math.nan


def _reason(error: str) -> str:
    match = _ERROR_FIELD.search(error)
    if match is None:
        return "malformed"
    return _REASONS.get(match.group(1) or match.group(2), "field")


def _excerpt(value: object, limit: int = 120) -> str:
    if isinstance(value, bytes | str):
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
    elif isinstance(value, msgspec.Struct):
        text = msgspec.json.encode(value).decode()
    else:
        try:
            text = orjson.dumps(value).decode()
        except TypeError:
            text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --- the session -------------------------------------------------------------------------------


class State(enum.Enum):
    CONNECTING = "connecting"  # waiting for "connected"
    AUTHENTICATING = "authenticating"  # auth sent
    SUBSCRIBING = "subscribing"  # subscribe sent, no "success" yet
    STREAMING = "streaming"


class Action(enum.Enum):
    """What a status asks of the shell."""

    NONE = "none"
    RECONNECT = "reconnect"  # close this connection and connect again (with backoff)
    COOL_DOWN = "cool_down"  # another connection uses the key: wait at least a minute


@dataclass(frozen=True, slots=True)
class Authenticated:
    message: str


@dataclass(frozen=True, slots=True)
class Subscribed:
    """A ``success`` status; ``first`` is the one that confirmed this connection's subscription."""

    message: str
    first: bool


@dataclass(frozen=True, slots=True)
class StatusReceived:
    """Any other status, with what the shell should do about it and how loudly."""

    status: str
    message: str
    action: Action
    warning: str


Event = Authenticated | Subscribed | StatusReceived | Problem

_STATUS_ACTIONS = {
    "auth_timeout": (Action.RECONNECT, "upstream says the authentication timed out"),
    "auth_required": (Action.RECONNECT, "upstream says authentication is required"),
    "error": (Action.NONE, "upstream reports an error"),
    "force_disconnect": (Action.RECONNECT, "upstream forced a disconnect"),
    "slow_consumer": (
        Action.RECONNECT,
        "upstream cut this connection off as a slow consumer: the proxy did not read fast enough",
    ),
    "max_connections": (
        Action.COOL_DOWN,
        "upstream says the key has too many connections: ANOTHER PROCESS IS USING THIS API KEY. "
        "Polygon allows one connection per key and cluster; waiting at least 60 s before "
        "reconnecting so that the two do not evict each other forever. Stop the other process",
    ),
}


@dataclass
class Received:
    events: list[Event]
    trades: TradeBatch


class Session:
    """One upstream connection's protocol, from ``connected`` to streaming.

    Feed it every frame with :meth:`receive_frames`; send what :meth:`data_to_send` returns.
    ``auth_failed`` raises :class:`AuthenticationError`, which is fatal: the key was refused.
    """

    def __init__(self, api_key: str, params: str, decoder: TradeDecoder) -> None:
        self._api_key = api_key
        self.params = params
        self.decoder = decoder
        self.state = State.CONNECTING
        self._outgoing: list[str] = []

    def __repr__(self) -> str:
        return f"Session(key={mask_secret(self._api_key)}, params={self.params!r}, state={self.state.value})"

    def receive_frames(self, frames: Sequence[bytes | str], now_ms: int) -> Received:
        decoded = self.decoder.decode(frames, now_ms)
        events: list[Event] = list(decoded.problems)
        for status in decoded.statuses:
            event = self._receive_status(status)
            if event is not None:
                events.append(event)
        return Received(events, decoded.trades)

    def data_to_send(self) -> list[str]:
        """Client frames to send, in order (the auth frame holds the key: never log these)."""
        outgoing, self._outgoing = self._outgoing, []
        return outgoing

    def _receive_status(self, event: Status) -> Event | None:
        status, message = event.status, event.message
        self.decoder.stats.statuses[status] += 1
        if status == "connected":
            if self.state is State.CONNECTING:
                self._send({"action": "auth", "params": self._api_key})
                self.state = State.AUTHENTICATING
            return None
        if status == "auth_success":
            if self.state is State.AUTHENTICATING:
                self._send({"action": "subscribe", "params": self.params})
                self.state = State.SUBSCRIBING
            return Authenticated(message)
        if status == "auth_failed":
            raise AuthenticationError(
                f"upstream refused the API key {mask_secret(self._api_key)} "
                f"({message or 'auth_failed'}): check MASSIVE_API_KEY / POLYGON_API_KEY / "
                "--api-key-file and that the plan includes this feed"
            )
        if status == "success":
            first = self.state is State.SUBSCRIBING
            if first:
                self.state = State.STREAMING
            return Subscribed(message, first)
        action, warning = _STATUS_ACTIONS.get(
            status, (Action.NONE, f"upstream sent an unknown status {status!r}")
        )
        return StatusReceived(status, message, action, warning)

    def _send(self, frame: dict[str, str]) -> None:
        self._outgoing.append(orjson.dumps(frame).decode())


# --- the feed clock ------------------------------------------------------------------------------


class FeedClock:
    """The largest accepted trade time, advanced by wall time while the feed is quiet.

    While connected, once no trade has arrived for ``idle_ms`` (counted from the later of the
    last trade and the subscription's confirmation), the clock advances with the wall time that
    passes beyond that. It never advances while disconnected and never goes back. Before the
    first trade it is 0 (unknown). All times are Unix ms passed in by the caller.
    """

    def __init__(self, idle_ms: int = IDLE_MS) -> None:
        self.idle_ms = idle_ms
        self._value = 0
        self._anchor: int | None = None  # wall time the quiet period started; None: disconnected

    def read(self, now_ms: int) -> int:
        if self._anchor is None or self._value == 0:
            return self._value
        return self._value + max(0, now_ms - self._anchor - self.idle_ms)

    def subscribed(self, now_ms: int) -> None:
        self._value = self.read(now_ms)
        self._anchor = now_ms

    def disconnected(self, now_ms: int) -> None:
        self._value = self.read(now_ms)
        self._anchor = None

    def is_connected(self) -> bool:
        return self._anchor is not None

    def trades_accepted(self, max_t: int, now_ms: int) -> bool:
        """Account for a batch of accepted trades; return whether the clock moved."""
        before = self.read(now_ms)
        self._value = max(before, max_t)
        if self._anchor is not None:
            self._anchor = now_ms
        return self._value > before


def status_frame(status: str, message: str) -> bytes:
    """A server status frame as Polygon sends it (the sim and the tests use it)."""
    return orjson.dumps([{"ev": "status", "status": status, "message": message}])


def trade_event(**fields: Any) -> dict[str, Any]:
    """A ``T`` event dict (tests and the sim build frames with it)."""
    return {"ev": "T", **fields}
