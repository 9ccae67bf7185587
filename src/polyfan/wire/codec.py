"""The ZeroMQ wire codec: one pure module that every publisher and subscriber uses.

Every message is a single ZeroMQ frame::

    topic bytes | 0x00 | header (24 bytes) | payload

The topic comes first so that ZeroMQ's prefix filtering works at the publisher; the NUL
terminator makes ``T.A\\0`` a different prefix from ``T.AAPL\\0``. The header is little-endian::

    u8  version      (1)
    u8  kind         (Kind below)
    u16 reserved     (0)
    u32 count        number of records in the payload
    u64 session      the publisher's session id, random at each start
    u64 seq          per-topic sequence number, 1, 2, 3 ... within a session

Payloads are arrays of fixed-size little-endian records (``TRADE_DTYPE``, ``QUOTE_DTYPE``,
``AGG_DTYPE``, ``LULD_DTYPE``, ``BAR_DTYPE``, ``CLOCK_DTYPE``, ``UPSTREAM_DTYPE``) or, for the
low-rate announce message and the events the proxy passes through unparsed (``RAW``), UTF-8
JSON.
docs/wire.md is the reference for programs in other languages.

History requests travel the other way, from an XSUB socket to the agg's XPUB socket, as
``0x02 | JSON``; replies come back on the requester's own topic ``_rep.<id>``.
"""

from __future__ import annotations

import enum
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from polyfan.errors import WireError

VERSION = 1
TERMINATOR = b"\x00"
CONTROL = "_ctl"
CONTROL_TOPIC = b"_ctl\x00"
REPLY_PREFIX = "_rep."
REPLY_ROUTE_HEX = 32  # a reply route is 128 random bits, as 32 lowercase hex digits
REQUEST_MARK = b"\x02"
MAX_CONDITIONS = 8
# Stands for a condition code above 254, or for the codes past a trade's eighth: never a known
# code, so such a trade qualifies for volume only and is counted as carrying an unknown code.
CONDITION_OUT_OF_RANGE = 255

HEADER = struct.Struct("<BBHIQQ")


class Kind(enum.IntEnum):
    TRADES = 1
    BARS = 2
    CLOCK = 3
    UPSTREAM = 4
    ANNOUNCE = 5
    HISTORY = 6
    SYMBOLS = 7
    OUTAGE = 8  # an agg's outage began or ended (JSON, docs/wire.md)
    QUOTES = 9  # Polygon Q events of one symbol (QUOTE_DTYPE)
    AGGREGATES = 10  # Polygon A or AM events of one symbol (AGG_DTYPE); the topic says which
    LULD = 11  # Polygon LULD events of one symbol (LULD_DTYPE)
    RAW = 12  # upstream events of a type the proxy does not parse: a JSON array, as received


TRADE_DTYPE = np.dtype(
    [
        ("t", "<i8"),  # SIP timestamp, Unix ms
        ("p", "<f8"),  # price
        ("s", "<f8"),  # size in shares (from ds when present, else s)
        ("q", "<i8"),  # upstream sequence number (0 when absent)
        ("trft", "<i8"),  # TRF timestamp, Unix ms (0 when absent)
        ("trfi", "<u2"),  # TRF id (0 when absent)
        ("x", "<u2"),  # exchange id (0 when absent)
        ("z", "u1"),  # tape (0 when absent)
        ("nc", "u1"),  # number of condition codes used in c
        ("c", "u1", (MAX_CONDITIONS,)),  # condition codes, first nc are valid
        ("_pad", "u1", (2,)),
    ]
)
assert TRADE_DTYPE.itemsize == 56

# Input bounds (docs/limits.md): no real trade comes near them, and within them every sum a bar
# keeps stays finite. p * s <= 1e9 * 1e12 = 1e21, so even 10**12 trades in one bar sum to at
# most 1e33 (volume: 1e24), against float64's 1.8e308. A trade outside them is bad input: the
# proxy rejects it (reasons "price" / "size") and the agg drops it at decode (counted).
MAX_PRICE = 1e9  # BRK.A trades near 7e5
MAX_SIZE = 1e12  # the largest prints are ~1e8 shares


def tradeable(records: np.ndarray) -> np.ndarray:
    """Which TRADE_DTYPE records are within the input bounds: ``0 < p <= MAX_PRICE`` and
    ``0 <= s <= MAX_SIZE`` (NaN fails both)."""
    p, s = records["p"], records["s"]
    with np.errstate(invalid="ignore"):
        return (p > 0) & (p <= MAX_PRICE) & (s >= 0) & (s <= MAX_SIZE)


BAR_FLAG_OUTAGE = 1  # the bar spans an upstream outage: trades may be missing
BAR_FLAG_CARRIED = 2  # volume-only bar: o/h/l/c carried from the previous close

BAR_DTYPE = np.dtype(
    [
        ("s", "<i8"),  # bar start, Unix ms; e = s + interval
        ("o", "<f8"),
        ("h", "<f8"),
        ("l", "<f8"),
        ("c", "<f8"),
        ("v", "<f8"),
        ("vw", "<f8"),  # NaN when v == 0
        ("n", "<u4"),
        ("flags", "<u4"),
    ]
)
assert BAR_DTYPE.itemsize == 64

# --- Polygon's other stocks events (docs/wire.md). Each record keeps which of the event's
# optional keys were present in ``has`` (bits below), so wire.polygon turns a record back into
# the very event dict it came from. Absent numbers are 0 in the record.

MAX_INDICATORS = 4  # indicator codes a quote or LULD record holds (more: the event is rejected)
MAX_VOLUME = 1e15  # an aggregate's v, av and z: [0, MAX_VOLUME] (a day of SPY is ~1e8)

QUOTE_BX, QUOTE_BP, QUOTE_BS = 1, 2, 4
QUOTE_AX, QUOTE_AP, QUOTE_AS = 8, 16, 32
QUOTE_C, QUOTE_I, QUOTE_Q, QUOTE_Z = 64, 128, 256, 512

QUOTE_DTYPE = np.dtype(
    [
        ("t", "<i8"),  # SIP timestamp, Unix ms
        ("q", "<i8"),  # upstream sequence number
        ("bp", "<f8"),  # bid price
        ("ap", "<f8"),  # ask price
        ("bs", "<u4"),  # bid size, in round lots as Polygon sends it
        ("as", "<u4"),  # ask size, in round lots
        ("bx", "<u2"),  # bid exchange id
        ("ax", "<u2"),  # ask exchange id
        ("c", "<u2"),  # quote condition
        ("i", "<u2", (MAX_INDICATORS,)),  # indicator codes, the first ni are valid
        ("z", "u1"),  # tape
        ("ni", "u1"),  # how many indicator codes are valid in i
        ("has", "<u2"),  # which optional keys the event had: QUOTE_* bits
        ("_pad", "u1", (6,)),
    ]
)
assert QUOTE_DTYPE.itemsize == 64

AGG_V, AGG_AV, AGG_OP, AGG_VW, AGG_O, AGG_C = 1, 2, 4, 8, 16, 32
AGG_H, AGG_L, AGG_A, AGG_Z, AGG_OTC = 64, 128, 256, 512, 1024

AGG_DTYPE = np.dtype(
    [
        ("s", "<i8"),  # window start, Unix ms
        ("e", "<i8"),  # window end, Unix ms
        ("o", "<f8"),
        ("h", "<f8"),
        ("l", "<f8"),
        ("c", "<f8"),
        ("v", "<f8"),  # the window's volume
        ("vw", "<f8"),  # the window's volume-weighted average price
        ("av", "<f8"),  # today's accumulated volume
        ("op", "<f8"),  # today's official opening price
        ("a", "<f8"),  # today's volume-weighted average price
        ("z", "<f8"),  # the window's average trade size
        ("has", "<u2"),  # which optional keys the event had: AGG_* bits
        ("otc", "u1"),  # 1: "otc": true
        ("_pad", "u1", (5,)),
    ]
)
assert AGG_DTYPE.itemsize == 104

LULD_H, LULD_L, LULD_I, LULD_Z, LULD_Q = 1, 2, 4, 8, 16

LULD_DTYPE = np.dtype(
    [
        ("t", "<i8"),  # timestamp, as Polygon sends it
        ("q", "<i8"),  # upstream sequence number
        ("h", "<f8"),  # limit-up price
        ("l", "<f8"),  # limit-down price
        ("i", "<u2", (MAX_INDICATORS,)),  # indicator codes, the first ni are valid
        ("z", "u1"),  # tape
        ("ni", "u1"),
        ("has", "<u2"),  # which optional keys the event had: LULD_* bits
        ("_pad", "u1", (4,)),
    ]
)
assert LULD_DTYPE.itemsize == 48

CLOCK_DTYPE = np.dtype([("clock", "<i8"), ("wall", "<i8")])

UPSTREAM_DOWN = 0
UPSTREAM_UP = 1
UPSTREAM_DTYPE = np.dtype([("state", "<i8"), ("clock", "<i8"), ("wall", "<i8")])


def trade_topic(symbol: str) -> bytes:
    return b"T." + symbol.encode() + TERMINATOR


# Polygon's stocks channels the proxy parses, by event type: the topic prefix of each is the
# event type and a dot (``Q.TSLA``), and each carries one record kind.
EVENT_KINDS = {"T": Kind.TRADES, "Q": Kind.QUOTES, "A": Kind.AGGREGATES, "AM": Kind.AGGREGATES}
EVENT_KINDS["LULD"] = Kind.LULD
RAW_PREFIX = "raw."  # raw.<ev>: events of a type the proxy passes through unparsed


def event_topic(ev: str, symbol: str) -> bytes:
    """The topic of Polygon event type ``ev`` (``T``, ``Q``, ``A``, ``AM``, ``LULD``) of a symbol."""
    return f"{ev}.{symbol}".encode() + TERMINATOR


def raw_topic(ev: str) -> bytes:
    """Where the proxy publishes events of type ``ev`` that it does not parse."""
    return (RAW_PREFIX + ev).encode() + TERMINATOR


def topic_event(topic: str) -> tuple[str, str]:
    """``(event type, symbol)`` of an event topic: ``Q.BRK.A`` is ``("Q", "BRK.A")``; for
    ``raw.NOI`` it is ``("raw", "NOI")``."""
    ev, _, rest = topic.partition(".")
    return ev, rest


def bar_channel(interval_ms: int, symbol: str) -> str:
    return f"{interval_ms}Ms.{symbol}"


def bar_topic(interval_ms: int, symbol: str) -> bytes:
    return f"{interval_ms}Ms.{symbol}".encode() + TERMINATOR


def reply_topic(requester: str) -> bytes:
    return (REPLY_PREFIX + requester).encode() + TERMINATOR


def subscription_prefix(text: str) -> bytes:
    """The ZeroMQ prefix for what a user types: ``T.TSLA`` is exact, ``T.`` is a prefix.

    A prefix ending in ``.`` (or empty) matches every topic under it, and so does one ending in
    ``.*`` as Polygon and the bridge spell it (``T.*``, ``500Ms.*``; ``*`` alone is everything);
    anything else is one topic and gets its terminator, so ``T.A`` never matches ``T.AAPL``.
    """
    if text == "*" or text.endswith(".*"):
        text = text[:-1]
    if text == "" or text.endswith("."):
        return text.encode()
    return text.encode() + TERMINATOR


# "Everything" as prefixes that never match a reply topic: an agg disconnects a peer whose
# subscription would read other peers' replies (the empty prefix, "_", "_rep." ...).
EVERYTHING_BUT_REPLIES = (
    b"T.",
    b"Q.",
    b"A.",
    b"AM.",
    b"LULD.",
    RAW_PREFIX.encode(),
    CONTROL_TOPIC,
    *(str(digit).encode() for digit in range(1, 10)),
)


def subscription_prefixes(text: str) -> tuple[bytes, ...]:
    """What to subscribe for what a user types (:func:`subscription_prefix`), with everything
    (``""``, ``*``) spelled as :data:`EVERYTHING_BUT_REPLIES`: every event kind, control and
    bars."""
    prefix = subscription_prefix(text)
    return EVERYTHING_BUT_REPLIES if prefix == b"" else (prefix,)


@dataclass(frozen=True, slots=True)
class Message:
    topic: str
    kind: Kind
    session: int
    seq: int
    count: int
    payload: memoryview


def encode(topic: bytes, kind: Kind, session: int, seq: int, count: int, payload: bytes) -> bytes:
    """One message: ``topic`` must already end with the terminator."""
    return b"".join((topic, HEADER.pack(VERSION, kind, 0, count, session, seq), payload))


def decode(frame: bytes) -> Message:
    """Split a frame into topic, header fields and payload; raise WireError if it is not ours."""
    end = frame.find(TERMINATOR)
    if end < 0:
        raise WireError("message has no topic terminator")
    start = end + 1
    if len(frame) < start + HEADER.size:
        raise WireError(f"message on {frame[:end]!r} is shorter than its header")
    version, kind, _, count, session, seq = HEADER.unpack_from(frame, start)
    if version != VERSION:
        raise WireError(
            f"message on {frame[:end]!r} has wire version {version}, expected {VERSION}"
        )
    try:
        kind = Kind(kind)
    except ValueError:
        raise WireError(f"message on {frame[:end]!r} has unknown kind {kind}") from None
    payload = memoryview(frame)[start + HEADER.size :]
    record = _RECORD_DTYPE.get(kind)
    if record is not None and len(payload) != count * record.itemsize:
        raise WireError(
            f"message on {frame[:end]!r}: {len(payload)} payload bytes for {count} records"
        )
    try:
        topic = frame[:end].decode()
    except UnicodeDecodeError:
        raise WireError("message topic is not UTF-8") from None
    return Message(topic, kind, session, seq, count, payload)


_RECORD_DTYPE = {
    Kind.TRADES: TRADE_DTYPE,
    Kind.QUOTES: QUOTE_DTYPE,
    Kind.AGGREGATES: AGG_DTYPE,
    Kind.LULD: LULD_DTYPE,
    Kind.BARS: BAR_DTYPE,
    Kind.CLOCK: CLOCK_DTYPE,
    Kind.UPSTREAM: UPSTREAM_DTYPE,
}


def records(message: Message) -> np.ndarray:
    """The payload as a read-only structured array (no copy)."""
    dtype = _RECORD_DTYPE.get(message.kind)
    if dtype is None:
        raise WireError(f"{message.kind.name} messages carry no records")
    return np.frombuffer(message.payload, dtype=dtype)


class HistoryStatus(enum.IntEnum):
    OK = 0
    INTERVAL_NOT_SERVED = 1
    SYMBOL_NOT_SERVED = 2
    BAD_REQUEST = 3


HISTORY_HEAD = struct.Struct("<QII")  # request id, HistoryStatus, channel check


def channel_check(channel: object) -> int:
    """What a HISTORY reply carries of the channel it answers: CRC-32 of the channel as the
    request spelled it (UTF-8), or 0 when the request named no string. A requester compares it
    with the channel it asked for, so a reply to someone else's request for another channel is
    never taken for its own (docs/wire.md, ``HISTORY``)."""
    if not isinstance(channel, str):
        return 0
    return zlib.crc32(channel.encode("utf-8", "surrogatepass"))


def history_channel_check(message: Message) -> int:
    """The channel check of a HISTORY reply (0 from an agg older than the check)."""
    if message.kind is not Kind.HISTORY or len(message.payload) < HISTORY_HEAD.size:
        raise WireError("not a history reply")
    return int(HISTORY_HEAD.unpack_from(message.payload)[2])


def records_from_history(message: Message) -> tuple[int, HistoryStatus, np.ndarray]:
    """A HISTORY reply: ``(request id, status, bars)``; bars oldest first."""
    if message.kind is not Kind.HISTORY or len(message.payload) < HISTORY_HEAD.size:
        raise WireError("not a history reply")
    request_id, status, _ = HISTORY_HEAD.unpack_from(message.payload)
    body = message.payload[HISTORY_HEAD.size :]
    if len(body) != message.count * BAR_DTYPE.itemsize:
        raise WireError("history reply record count does not match its payload")
    bars = np.frombuffer(body, dtype=BAR_DTYPE)
    try:
        return request_id, HistoryStatus(status), bars
    except ValueError:
        raise WireError(f"history reply has unknown status {status}") from None


def encode_history(
    topic: bytes,
    session: int,
    seq: int,
    request_id: int,
    status: HistoryStatus,
    bars: np.ndarray,
    check: int = 0,
) -> bytes:
    """``check``: :func:`channel_check` of the channel the request named."""
    payload = (
        HISTORY_HEAD.pack(request_id, status, check)
        + np.ascontiguousarray(bars, BAR_DTYPE).tobytes()
    )
    return encode(topic, Kind.HISTORY, session, seq, len(bars), payload)


def encode_json(topic: bytes, kind: Kind, session: int, seq: int, value: Any) -> bytes:
    return encode(topic, kind, session, seq, 1, orjson.dumps(value))


def decode_json(message: Message) -> Any:
    try:
        return orjson.loads(message.payload)
    except orjson.JSONDecodeError as exc:
        raise WireError(f"{message.kind.name} message on {message.topic!r} is not JSON") from exc


def encode_request(value: dict[str, Any]) -> bytes:
    """A history request, sent upstream from an XSUB socket to an XPUB."""
    return REQUEST_MARK + orjson.dumps(value)


def decode_request(frame: bytes) -> dict[str, Any]:
    if not frame.startswith(REQUEST_MARK):
        raise WireError("upstream message is not a history request")
    try:
        value = orjson.loads(frame[1:])
    except orjson.JSONDecodeError as exc:
        raise WireError("history request is not JSON") from exc
    if not isinstance(value, dict):
        raise WireError("history request is not a JSON object")
    return value


_REPLY_PREFIX_BYTES = REPLY_PREFIX.encode()


class Sequencer:
    """A publisher's session id and per-topic sequence numbers (1, 2, 3 ... per topic), and
    the messages that carry them: each ``encode*`` takes the topic's next number."""

    def __init__(self, session: int) -> None:
        self.session = session
        self._last: dict[bytes, int] = {}

    def next(self, topic: bytes) -> int:
        if topic.startswith(_REPLY_PREFIX_BYTES):
            # Reply topics share one sequence: a table entry per requester route would grow
            # with every route a peer makes up (docs/wire.md, "Sequence numbers").
            topic = _REPLY_PREFIX_BYTES
        seq = self._last.get(topic, 0) + 1
        self._last[topic] = seq
        return seq

    def encode(self, topic: bytes, kind: Kind, count: int, payload: bytes) -> bytes:
        return encode(topic, kind, self.session, self.next(topic), count, payload)

    def encode_json(self, topic: bytes, kind: Kind, value: Any) -> bytes:
        return encode_json(topic, kind, self.session, self.next(topic), value)

    def encode_history(
        self,
        topic: bytes,
        request_id: int,
        status: HistoryStatus,
        bars: np.ndarray,
        check: int = 0,
    ) -> bytes:
        return encode_history(
            topic, self.session, self.next(topic), request_id, status, bars, check
        )


class GapCounter:
    """Subscriber side: how many messages a topic's sequence numbers say were lost.

    A new session id is a publisher restart, not a loss: the topic starts over. The first
    message seen on a topic (a late joiner) is not a loss either.
    """

    def __init__(self) -> None:
        self._last: dict[str, tuple[int, int]] = {}
        self.lost = 0

    def observe(self, topic: str, session: int, seq: int) -> int:
        """Record one message; return how many were lost just before it."""
        previous = self._last.get(topic)
        self._last[topic] = (session, seq)
        if previous is None or previous[0] != session or seq <= previous[1]:
            return 0
        lost = seq - previous[1] - 1
        self.lost += lost
        return lost

    def forget(self, topic: str) -> None:
        """Stop tracking a topic (after an unsubscribe the next message is a fresh start)."""
        self._last.pop(topic, None)
