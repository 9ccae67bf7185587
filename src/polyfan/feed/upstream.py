"""The upstream session as a pure state machine: frames in, events and replies out.

Nothing here touches a socket or a clock: the proxy shell feeds frames and the wall time in and
writes out what comes back. Three pieces:

- :class:`EventDecoder` parses Polygon frames and validates every ``T`` event into
  ``codec.TRADE_DTYPE`` records grouped by symbol (arrival order kept), and likewise every
  ``Q``, ``A``, ``AM`` and ``LULD`` event into its own records (:mod:`polyfan.feed.events`);
  events of any other type are passed on as they came (``RAW``); everything it skips is
  counted in :class:`FeedStats`.
- :class:`UpstreamSession` follows the protocol of one connection (connected → auth → auth_success →
  subscribe → success) and decides what every status means: a reply to send, a reconnect, a
  cool-down, or :class:`~polyfan.errors.AuthenticationError`.
- :class:`FeedClock` is the feed clock of CONTRACT section 3.

Parsing, fastest first (figures in docs/benchmarks.md, from bench/bench_proxy.py):

1. ``scan.py``, a numba scanner, reads the vendor's usual frames (trades, quotes,
   aggregates, LULD, mixed) straight into columns, with symbols interned to small integers;
2. a frame it is not sure about is decoded by msgspec as a list of the typed events (about 1.5
   times faster than ``orjson.loads`` plus dict handling);
3. a frame msgspec's typed decode refuses (an unknown ``ev``, a malformed event, not JSON at
   all) is split into its elements (``msgspec.Raw``) and handled element by element, so one bad
   event never costs the good ones around it, and an event of an unknown type is passed on
   byte for byte.

All three write into the same columns in arrival order; validation that needs the wall clock
(the 5 s future limit) and the grouping by symbol run once per drain, vectorized.
"""

from __future__ import annotations

import enum
import itertools
import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any

import msgspec
import numpy as np
import orjson
from msgspec import Meta

from polyfan.config import SYMBOL_RE, mask_secret
from polyfan.errors import AuthenticationError
from polyfan.feed import events as kinds
from polyfan.feed import scan
from polyfan.wire import codec

FUTURE_LIMIT_MS = 5_000  # a trade stamped further ahead of the wall clock is rejected
IDLE_MS = 1_000  # the feed clock follows the wall clock after this long without a trade
MAX_CODES = 64  # a trade with more condition codes is rejected (the wire keeps 8: _fitted)
MAX_RAW_TYPES = 64  # unknown event types passed on raw; past that, new ones are bad messages

_U16 = Annotated[int, Meta(ge=0, le=65_535)]
_U8 = Annotated[int, Meta(ge=0, le=255)]
# Integers go into i64 columns: a larger one must be rejected here, not overflow the column.
_I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_NON_NEGATIVE_I64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]


class Trade(msgspec.Struct, tag_field="ev", tag="T", gc=False, omit_defaults=True):
    """One ``T`` event as it arrives; fields polyfan does not publish (``i``, ``pt``) are skipped."""

    sym: str
    p: Annotated[float, Meta(gt=0)]
    t: _NON_NEGATIVE_I64
    s: _NON_NEGATIVE_I64 | None = None
    ds: str | None = None
    # Fitted to the record by _fitted; more than MAX_CODES is not a trade but garbage.
    c: Annotated[list[_NON_NEGATIVE_I64], Meta(max_length=MAX_CODES)] | None = None
    x: _U16 = 0
    z: _U8 = 0
    q: _I64 = 0
    trfi: _U16 = 0
    trft: _I64 = 0


class Status(msgspec.Struct, tag_field="ev", tag="status", gc=False):
    status: str = ""
    message: str = ""


_FRAME = msgspec.json.Decoder(
    list[Trade | kinds.Quote | kinds.SecondAggregate | kinds.MinuteAggregate | kinds.Luld | Status]
)
_ANY = msgspec.json.Decoder()
_ELEMENTS = msgspec.json.Decoder(list[msgspec.Raw])
_TYPES: dict[str, type[msgspec.Struct]] = {"T": Trade, "status": Status, **kinds.TYPES}
_KIND_OF: dict[type, int] = {
    kinds.Quote: scan.QUOTES,
    kinds.SecondAggregate: scan.AGGREGATES,
    kinds.MinuteAggregate: scan.AGGREGATES,
    kinds.Luld: scan.LULDS,
}

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


def _fitted(codes: list[int]) -> list[int]:
    """A trade's condition codes as the record holds them: at most ``MAX_CONDITIONS`` codes of
    0-255. A code above 254, and the codes past the eighth, become ``CONDITION_OUT_OF_RANGE``
    (an unknown code: the trade counts for volume only, and is counted) rather than losing the
    trade."""
    if len(codes) <= codec.MAX_CONDITIONS and max(codes) < codec.CONDITION_OUT_OF_RANGE:
        return codes
    fitted = [min(code, codec.CONDITION_OUT_OF_RANGE) for code in codes]
    if len(fitted) > codec.MAX_CONDITIONS:
        fitted[codec.MAX_CONDITIONS - 1 :] = [codec.CONDITION_OUT_OF_RANGE]
    return fitted


@dataclass
class FeedStats:
    """What the decoder and the session have counted; the proxy exports these as metrics."""

    frames: int = 0
    trades: int = 0  # accepted trades
    bad_messages: int = 0  # frames, elements and events skipped as malformed
    rejected: Counter[str] = field(default_factory=Counter)  # trades rejected, by reason
    unknown_events: int = 0  # events of a type not parsed, passed on raw
    statuses: Counter[str] = field(default_factory=Counter)
    accepted: Counter[str] = field(default_factory=Counter)  # by ev: T, Q, A, AM, LULD
    rejected_events: Counter[str] = field(default_factory=Counter)  # by ev, trades included
    raw: Counter[str] = field(default_factory=Counter)  # events passed on raw, by ev


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
class EventBatch:
    """Messages of one event type (``label``: ``Q``, ``A``, ``AM``, ``LULD`` or ``raw``): per
    topic, the payload and its record (event) count, in arrival order within a topic."""

    kind: codec.Kind
    label: str
    topics: list[bytes]
    payloads: list[bytes]
    counts: list[int]

    @property
    def count(self) -> int:
        return sum(self.counts)


@dataclass(frozen=True, slots=True)
class Problem:
    """Something skipped as malformed; the shell logs these, rate-limited."""

    what: str


@dataclass
class Decoded:
    trades: TradeBatch
    statuses: list[Status]
    problems: list[Problem]
    batches: list[EventBatch] = field(default_factory=list)  # every other event type


class EventDecoder:
    """Polygon frames in; validated trade records per symbol, the other events' messages per
    topic, and the status events out.

    Each frame goes first through the numba scanner (``scan.py``), which reads the
    vendor's usual frames straight into columns; a frame it is not sure about is decoded
    with msgspec (typed, then element by element), which validates and counts everything.
    Both paths write into the same columns, so arrival order is kept across them.
    """

    def __init__(self, stats: FeedStats | None = None) -> None:
        self.stats = stats if stats is not None else FeedStats()
        self.symbols = scan.SymbolTable()
        self._symbol_ids: dict[str, int] = {}
        self._topics: list[bytes] = []
        self._event_topics: dict[str, list[bytes]] = {ev: [] for ev in kinds.TYPES}
        self._columns = scan.Columns(4096)

    def decode(self, frames: Sequence[bytes | str], now_ms: int) -> Decoded:
        """Decode frames received in this order; ``now_ms`` is the wall clock (Unix ms)."""
        stats = self.stats
        stats.frames += len(frames)
        problems: list[Problem] = []
        statuses: list[Status] = []
        raw: dict[str, list[bytes]] = {}
        table = self.symbols
        row = 0
        for frame in frames:
            data = frame.encode() if isinstance(frame, str) else frame
            columns = self._reserve(row, len(data) // scan.MIN_TRADE_BYTES + 1)
            scanned = columns.scan(data, row, table)
            if scanned >= 0:
                row = scanned
                continue
            try:
                events = _FRAME.decode(data)
            except msgspec.DecodeError:
                events = self._decode_slowly(data, problems, raw)
            trades = [e for e in events if type(e) is Trade]
            if len(trades) < len(events):
                found = [e for e in events if type(e) is Status]
                statuses += found
                if len(trades) + len(found) < len(events):
                    self._fill_events(events, row)
            row = self._fill(trades, row)
        batch = self._batch(row, now_ms, problems)
        batches = self._event_batches(now_ms, problems)
        if raw:
            batches.append(self._raw_batch(raw))
        return Decoded(batch, statuses, problems, batches)

    def _reserve(self, row: int, more: int) -> scan.Columns:
        """Room for ``more`` trade rows past ``row``. The other kinds share the capacity; the
        scanner leaves a frame to msgspec when one of them is full, and :meth:`_fill_events`
        makes room (so checking them here, every frame, is not needed)."""
        columns = self._columns
        capacity = len(columns.t)
        if row + more > capacity:
            columns = self._grown(row, max(2 * capacity, row + more))
        return columns

    def _grown(self, row: int, size: int) -> scan.Columns:
        columns = self._columns
        grown = scan.Columns(size)
        for name in ("t", "p", "s", "q", "trft", "trfi", "x", "z", "nc", "c", "ids"):
            getattr(grown, name)[:row] = getattr(columns, name)[:row]
        grown.adopt_events(columns)
        self._columns = grown
        return grown

    def _fill_events(self, events: list[Any], row: int) -> None:
        """Write the quotes, aggregates and LULD events msgspec decoded into their columns
        (``row``: the trade rows in use)."""
        by_kind: dict[int, list[Any]] = {}
        for event in events:
            kind = _KIND_OF.get(type(event))
            if kind is not None:
                by_kind.setdefault(kind, []).append(event)
        for kind, found in by_kind.items():
            columns = self._columns
            start = int(columns.rows[kind])
            capacity = len(columns.t)
            if start + len(found) > capacity:
                columns = self._grown(row, max(2 * capacity, start + len(found)))
            ids = self._ids([e.sym for e in found])
            columns.rows[kind] = kinds.fill(kind, found, columns.events[kind], start, ids)

    def _fill(self, trades: list[Trade], row: int) -> int:
        """Write trades decoded by msgspec into the columns from ``row``; the next free row."""
        n = len(trades)
        if n == 0:
            return row
        columns = self._reserve(row, n)
        end = row + n
        columns.t[row:end] = [t.t for t in trades]
        columns.p[row:end] = [t.p for t in trades]
        columns.s[row:end] = self._sizes(trades)
        columns.q[row:end] = [t.q for t in trades]
        columns.trft[row:end] = [t.trft for t in trades]
        columns.trfi[row:end] = [t.trfi for t in trades]
        columns.x[row:end] = [t.x for t in trades]
        columns.z[row:end] = [t.z for t in trades]
        columns.c[row:end] = 0
        conditions = [_fitted(t.c) if t.c else _NO_CONDITIONS for t in trades]
        counts = np.fromiter(map(len, conditions), np.int64, n)
        columns.nc[row:end] = counts
        if counts.any():
            rows = np.repeat(np.arange(row, end), counts)
            slots = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
            columns.c[rows, slots] = [code for codes in conditions for code in codes]
        columns.ids[row:end] = self._ids([t.sym for t in trades])
        return end

    def _decode_slowly(
        self, frame: bytes | str, problems: list[Problem], raw: dict[str, list[bytes]]
    ) -> list[Any]:
        """Element by element, after the typed decode refused the frame; events of a type not
        parsed go into ``raw`` (by ``ev``) as they came."""
        stats = self.stats
        try:
            elements = _ELEMENTS.decode(frame)
        except msgspec.ValidationError:
            stats.bad_messages += 1
            problems.append(Problem(f"a frame is not a JSON array: {_excerpt(frame)}"))
            return []
        except msgspec.DecodeError:
            stats.bad_messages += 1
            problems.append(Problem(f"a frame is not JSON: {_excerpt(frame)}"))
            return []
        events: list[Any] = []
        for text in elements:
            element = _ANY.decode(text)
            if not isinstance(element, dict):
                stats.bad_messages += 1
                problems.append(Problem(f"a frame element is not an object: {_excerpt(element)}"))
                continue
            ev = element.get("ev")
            kind = _TYPES.get(ev) if isinstance(ev, str) else None
            if kind is None:
                usable = isinstance(ev, str) and SYMBOL_RE.fullmatch(ev) is not None
                if (
                    usable
                    and isinstance(ev, str)
                    and (ev in stats.raw or len(stats.raw) < MAX_RAW_TYPES)
                ):
                    raw.setdefault(ev, []).append(bytes(text))
                    stats.unknown_events += 1
                    stats.raw[ev] += 1
                elif usable:
                    stats.bad_messages += 1
                    problems.append(
                        Problem(
                            f"an event of a new unknown type {ev!r} after {MAX_RAW_TYPES} such "
                            "types were passed on raw: dropped"
                        )
                    )
                else:
                    stats.bad_messages += 1
                    problems.append(Problem(f"an event without a usable ev: {_excerpt(element)}"))
                continue
            assert isinstance(ev, str)
            try:
                events.append(msgspec.convert(element, kind))
            except msgspec.ValidationError as exc:
                if ev == "status":
                    stats.bad_messages += 1
                    problems.append(Problem(f"invalid status ({exc}): {_excerpt(element)}"))
                elif ev == "T":
                    self._reject(_reason(str(exc)), 1)
                    problems.append(Problem(f"invalid trade ({exc}): {_excerpt(element)}"))
                else:
                    reason = _reason(str(exc), kinds.REASONS[ev])
                    self._reject_events(ev, 1)
                    problems.append(
                        Problem(f"invalid {ev} event ({reason}: {exc}): {_excerpt(element)}")
                    )
        return events

    def _reject(self, reason: str, count: int) -> None:
        self.stats.rejected[reason] += count
        self.stats.rejected_events["T"] += count
        self.stats.bad_messages += count

    def _reject_events(self, ev: str, count: int) -> None:
        if not count:
            return
        self.stats.rejected_events[ev] += count
        self.stats.bad_messages += count

    def _event_batches(self, now_ms: int, problems: list[Problem]) -> list[EventBatch]:
        """Validate the quote, aggregate and LULD rows filled this drain; one batch per event
        type, one message per topic."""
        columns = self._columns
        used = columns.rows.tolist()
        batches: list[EventBatch] = []
        if not any(used):
            return batches  # a drain of trades only: as cheap as before these kinds existed
        columns.rows[:] = 0  # for the next drain
        for kind, info in kinds.KINDS.items():
            n = used[kind]
            if n == 0:
                continue
            table = columns.events[kind]
            self._learn_symbols()
            valid = np.ones(n, np.bool_)
            minute = table.column("minute")[:n] if kind == scan.AGGREGATES else None
            for reason, check in info.checks:
                ok = check(table, n, now_ms)
                if not ok.all():
                    bad = ~ok & valid
                    if minute is None:
                        self._reject_events(_LABELS[kind], int(bad.sum()))
                    else:
                        self._reject_events("AM", int((bad & (minute == 1)).sum()))
                        self._reject_events("A", int((bad & (minute == 0)).sum()))
                    for index in np.flatnonzero(bad)[:3].tolist():
                        problems.append(
                            Problem(
                                f"invalid {info.name} ({reason}): "
                                f"{self._describe_event(table, info, index)}"
                            )
                        )
                    valid &= ok
            rows = np.flatnonzero(valid)
            if len(rows) == 0:
                continue
            records = table.records(rows, info.dtype)
            ids = table.column("ids")[rows]
            if minute is None:
                batches.append(self._grouped(info.kind, _LABELS[kind], records, ids))
            else:
                minutes = minute[rows] == 1
                for label, chosen in (("A", ~minutes), ("AM", minutes)):
                    if chosen.any():
                        batches.append(
                            self._grouped(info.kind, label, records[chosen], ids[chosen])
                        )
        return batches

    def _grouped(
        self, kind: codec.Kind, label: str, records: np.ndarray, ids: np.ndarray
    ) -> EventBatch:
        """One message per symbol, arrival order kept within each."""
        self.stats.accepted[label] += len(records)
        order = np.argsort(ids, kind="stable")
        sorted_ids = ids[order]
        grouped = records[order]
        starts = (np.flatnonzero(sorted_ids[1:] != sorted_ids[:-1]) + 1).tolist()
        bounds = [0, *starts, len(records)]
        topics = self._event_topics[label]
        for sid in range(len(topics), len(self._topics)):
            topics.append(codec.event_topic(label, self.symbols.name(sid)))
        return EventBatch(
            kind,
            label,
            [topics[sid] for sid in sorted_ids[bounds[:-1]].tolist()],
            [grouped[a:b].tobytes() for a, b in itertools.pairwise(bounds)],
            [b - a for a, b in itertools.pairwise(bounds)],
        )

    @staticmethod
    def _raw_batch(raw: dict[str, list[bytes]]) -> EventBatch:
        """The events of types not parsed: one message per type, as a JSON array."""
        return EventBatch(
            codec.Kind.RAW,
            "raw",
            [codec.raw_topic(ev) for ev in raw],
            [b"[" + b",".join(texts) + b"]" for texts in raw.values()],
            [len(texts) for texts in raw.values()],
        )

    def _describe_event(self, table: scan.EventColumns, info: kinds.KindInfo, index: int) -> str:
        sid = int(table.column("ids")[index])
        symbol = self.symbols.name(sid) if sid >= 0 else "(invalid)"
        fields = " ".join(
            f"{name}={table.column(name)[index]}"
            for name in info.dtype.names or ()
            if name in table.layout and name not in ("i", "has")
        )
        return f"sym={symbol} {fields}"

    def _batch(self, n: int, now_ms: int, problems: list[Problem]) -> TradeBatch:
        """Validate rows ``[0, n)`` of the columns and group the valid ones by symbol."""
        if n == 0:
            return TradeBatch.empty()
        columns = self._columns
        records = columns.records(n)
        ids = columns.ids[:n].copy()
        self._learn_symbols()
        valid = np.ones(n, dtype=bool)
        checks = (
            ("symbol", ids >= 0),
            # within codec.MAX_PRICE / MAX_SIZE: a bar's sums stay finite (docs/limits.md)
            ("price", (records["p"] > 0) & (records["p"] <= codec.MAX_PRICE)),
            ("size", (records["s"] >= 0) & (records["s"] <= codec.MAX_SIZE)),
            ("future", records["t"] <= now_ms + FUTURE_LIMIT_MS),
        )
        for reason, ok in checks:
            if not ok.all():
                bad = ~ok & valid
                self._reject(reason, int(bad.sum()))
                for index in np.flatnonzero(bad)[:3].tolist():
                    problems.append(
                        Problem(f"invalid trade ({reason}): {self._describe(records, ids, index)}")
                    )
                valid &= ok
        if not valid.all():
            records = records[valid]
            ids = ids[valid]
        count = len(records)
        self.stats.trades += count
        self.stats.accepted["T"] += count
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

    def _describe(self, records: np.ndarray, ids: np.ndarray, index: int) -> str:
        sid = int(ids[index])
        symbol = self.symbols.name(sid) if sid >= 0 else "(invalid)"
        t, p, s = records["t"][index], records["p"][index], records["s"][index]
        return f"sym={symbol} t={t} p={p} s={s}"

    @staticmethod
    def _sizes(trades: list[Trade]) -> np.ndarray:
        """``ds`` when present, else ``s``; NaN (rejected as ``size``) when neither parses."""
        try:
            return np.array([t.s if t.ds is None else float(t.ds) for t in trades], np.float64)
        except (TypeError, ValueError):
            return np.array([_size(t) for t in trades], dtype=np.float64)

    def _ids(self, symbols: list[str]) -> list[int]:
        """The symbol id of each trade decoded by msgspec (-1 for an invalid symbol)."""
        known = self._symbol_ids
        ids = [known.get(s, -1) for s in symbols]
        if -1 in ids:
            for index, symbol in enumerate(symbols):
                if ids[index] == -1 and SYMBOL_RE.fullmatch(symbol) is not None:
                    ids[index] = self.symbols.intern(symbol.encode())
            self._learn_symbols()
        return ids

    def _learn_symbols(self) -> None:
        """Give every newly interned symbol its topic (the scanner interns as it goes)."""
        topics = self._topics
        for sid in range(len(topics), int(self.symbols.count[0])):
            name = self.symbols.name(sid)
            self._symbol_ids[name] = sid
            topics.append(codec.trade_topic(name))


def _size(trade: Trade) -> float:
    if trade.ds is None:
        return math.nan if trade.s is None else float(trade.s)
    try:
        return float(trade.ds)
    except ValueError:
        return math.nan


_LABELS = {scan.QUOTES: "Q", scan.LULDS: "LULD"}


def _reason(error: str, reasons: dict[str, str] = _REASONS) -> str:
    match = _ERROR_FIELD.search(error)
    if match is None:
        return "malformed"
    return reasons.get(match.group(1) or match.group(2), "field")


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
    batches: list[EventBatch] = field(default_factory=list)  # quotes, aggregates, LULD, raw


class UpstreamSession:
    """One upstream connection's protocol, from ``connected`` to streaming.

    Feed it every frame with :meth:`receive_frames`; send what :meth:`data_to_send` returns.
    ``auth_failed`` raises :class:`AuthenticationError`, which is fatal: the key was refused.
    """

    def __init__(self, api_key: str, params: str, decoder: EventDecoder) -> None:
        self._api_key = api_key
        self.params = params
        self.decoder = decoder
        self.state = State.CONNECTING
        self._outgoing: list[str] = []

    def __repr__(self) -> str:
        return f"UpstreamSession(key={mask_secret(self._api_key)}, params={self.params!r}, state={self.state.value})"

    def receive_frames(self, frames: Sequence[bytes | str], now_ms: int) -> Received:
        decoded = self.decoder.decode(frames, now_ms)
        events: list[Event] = list(decoded.problems)
        for status in decoded.statuses:
            event = self._receive_status(status)
            if event is not None:
                events.append(event)
        return Received(events, decoded.trades, decoded.batches)

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
        self._highest = 0  # the largest value read: a wall clock stepping back never lowers it

    def read(self, now_ms: int) -> int:
        value = self._value
        if self._anchor is not None and value != 0:
            value += max(0, now_ms - self._anchor - self.idle_ms)
        self._highest = max(self._highest, value)
        return self._highest

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
