"""``polyfan record``'s decisions: how parts are named, what each says about the feed, and what
was lost, while running and across the recorder's own restarts.

Pure: names, metadata dicts and sequence numbers in, decisions out (record.py does the files).

**Parts.** Every flush writes, per UTC date of the trades it holds, one Parquet file
``DIR/trades/date=YYYY-MM-DD/part-<run>-<seq>.parquet``: ``run`` is the recorder's start time
(``20240315T143000123456Z``), ``seq`` counts flushes from 1 (8 digits). Compaction merges
consecutive parts of one run in one date directory into ``part-<run>-<first>-<last>.parquet``.
Names sort as the data was received: by run, then by first flush.

**Metadata.** Each file carries one key-value entry, ``polyfan.record``, JSON (:class:`PartInfo`):
the proxy's session, whether the recorder has seen that session from its start, the last
sequence number of every topic in the file, the last ``_ctl`` sequence number, the feed clock at
the flush, and for a compacted file the parts it replaced.

**Losses.** :class:`Ledger` follows the publisher's session and per-topic sequence numbers
(docs/wire.md): a jump in a topic's numbers is that many messages lost; a new session is a
proxy restart (its trades between the old session's last clock and the new one's first are
unknown). Started from what the files say (:func:`resume_state`), the same rules show what went
missing while the recorder itself was down, including what it had received but not yet
flushed when it was killed.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import orjson

from polyfan.wire import codec

TRADES_DIR = "trades"  # DIR/trades/date=YYYY-MM-DD/
METADATA_KEY = b"polyfan.record"
METADATA_VERSION = 1
_NAME = re.compile(r"^part-(\d{8}T\d{12}Z)-(\d{8})(?:-(\d{8}))?\.parquet$")


def run_stamp(wall_ns: int) -> str:
    """A run's name: its start time, UTC, to the microsecond (sorts as it happened)."""
    when = datetime.datetime(1970, 1, 1) + datetime.timedelta(microseconds=wall_ns // 1000)
    return when.strftime("%Y%m%dT%H%M%S%fZ")


def iso_ms(ms: int) -> str:
    """Unix ms as RFC 3339 UTC, to the millisecond (for log lines)."""
    when = datetime.datetime(1970, 1, 1) + datetime.timedelta(milliseconds=ms)
    return when.isoformat(timespec="milliseconds") + "Z"


def part_name(run: str, seq: int) -> str:
    return f"part-{run}-{seq:08d}.parquet"


def compacted_name(run: str, first: int, last: int) -> str:
    return f"part-{run}-{first:08d}-{last:08d}.parquet"


def temp_name(name: str) -> str:
    """Where a file is written before its rename: hidden (readers and globs skip it)."""
    return f".{name}.tmp"


def is_temp_name(name: str) -> bool:
    return name.startswith(".part-") and name.endswith(".tmp")


@dataclass(frozen=True, order=True)
class PartName:
    """A part's place in the recording: sorting these sorts files as their data arrived."""

    run: str
    first: int
    last: int
    compacted: bool

    @property
    def name(self) -> str:
        if self.compacted:
            return compacted_name(self.run, self.first, self.last)
        return part_name(self.run, self.first)


def parse_name(name: str) -> PartName | None:
    """``part-<run>-<seq>.parquet`` or ``part-<run>-<first>-<last>.parquet``; None otherwise."""
    match = _NAME.match(name)
    if match is None:
        return None
    first = int(match.group(2))
    if match.group(3) is None:
        return PartName(match.group(1), first, first, False)
    return PartName(match.group(1), first, int(match.group(3)), True)


@dataclass
class PartInfo:
    """What one file says about the feed up to its last message (``polyfan.record``)."""

    session: int  # the proxy's session id; 0: none seen yet
    from_start: bool  # the recorder has had this session from before its first trade
    topics: dict[str, int]  # symbol -> last sequence number of its topic, in this file
    ctl_seq: int  # last sequence number on _ctl seen (0: none)
    clock: int  # the feed clock (ms) when the file's last message had arrived
    trades: int  # rows in the file
    replaces: list[str] = field(default_factory=list)  # a compacted file's parts

    def to_metadata(self) -> dict[bytes, bytes]:
        value = {
            "version": METADATA_VERSION,
            "session": f"{self.session:016x}",
            "from_start": self.from_start,
            "topics": self.topics,
            "ctl_seq": self.ctl_seq,
            "clock": self.clock,
            "trades": self.trades,
        }
        if self.replaces:
            value["replaces"] = self.replaces
        return {METADATA_KEY: orjson.dumps(value)}


def read_metadata(metadata: dict[bytes, bytes] | None) -> PartInfo | None:
    """A file's :class:`PartInfo`, or None when it has none (not written by ``record``)."""
    raw = (metadata or {}).get(METADATA_KEY)
    if raw is None:
        return None
    try:
        value: Any = orjson.loads(raw)
        return PartInfo(
            session=int(value["session"], 16),
            from_start=bool(value["from_start"]),
            topics={str(k): int(v) for k, v in value["topics"].items()},
            ctl_seq=int(value["ctl_seq"]),
            clock=int(value["clock"]),
            trades=int(value["trades"]),
            replaces=[str(name) for name in value.get("replaces", [])],
        )
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


def merged(infos: list[PartInfo], replaces: list[str]) -> PartInfo:
    """The metadata of a compacted file made of ``infos`` (oldest first): the last session's
    topics (the only ones a restart compares with), its clock and ``_ctl`` number."""
    last = infos[-1]
    topics: dict[str, int] = {}
    for info in infos:
        if info.session == last.session:
            topics.update(info.topics)
    return PartInfo(
        session=last.session,
        from_start=last.from_start,
        topics=topics,
        ctl_seq=last.ctl_seq,
        clock=max(info.clock for info in infos),
        trades=sum(info.trades for info in infos),
        replaces=replaces,
    )


@dataclass
class SessionState:
    """What the files hold of one proxy session: its last numbers and clock."""

    session: int
    from_start: bool
    topics: dict[str, int]
    ctl_seq: int
    clock: int


def resume_state(newest_first: Iterable[PartInfo]) -> SessionState | None:
    """The newest session's state from the files' metadata, newest file first: every file of
    that session contributes its topics (newer numbers win); the walk stops at another session."""
    state: SessionState | None = None
    for info in newest_first:
        if info.session == 0:
            continue
        if state is None:
            state = SessionState(
                info.session, info.from_start, dict(info.topics), info.ctl_seq, info.clock
            )
            continue
        if info.session != state.session:
            break
        for topic, seq in info.topics.items():
            state.topics.setdefault(topic, seq)
    return state


# --- what the ledger reports -----------------------------------------------------------------


@dataclass(frozen=True)
class Lost:
    """``count`` messages of ``symbol``'s topic are missing before ``seq``."""

    symbol: str
    count: int
    seq: int
    while_down: bool  # missing across the recorder's own restart (else: lost while running)


@dataclass(frozen=True)
class Resumed:
    """The recorder restarted on the same proxy session: the files end at feed clock
    ``from_clock``, the feed is now at ``to_clock``; ``ctl_lost`` control messages missed."""

    session: int
    from_clock: int
    to_clock: int
    ctl_lost: int


@dataclass(frozen=True)
class PublisherRestarted:
    """The proxy restarted (a new session): trades between ``from_clock`` (the old session's
    last) and ``to_clock`` (the new one's first) may be missing; ``to_clock`` is 0 until known."""

    old: int
    new: int
    from_clock: int
    to_clock: int


Event = Lost | Resumed | PublisherRestarted


class Ledger:
    """Sessions and sequence numbers of what the recorder receives, and what they say is lost.

    Feed it every message in arrival order: :meth:`control_received` for ``_ctl`` (with the
    clock it carries), :meth:`trades_received` for a topic's trades. Before a message of a new
    session is fed, :meth:`is_new_session` says so, so that the shell can close the current
    part first (one session per part), and pass that message's largest trade time (the
    window of a proxy restart ends there). :meth:`part_written` hands over the metadata of the
    part being closed, given the largest trade time in it.
    """

    def __init__(self, resumed: SessionState | None = None) -> None:
        self.resumed = resumed
        self.session = 0
        self.from_start = False
        self.last: dict[str, int] = {}  # symbol -> last seq
        self.ctl_seq = 0
        self.clock = 0
        self.lost = 0  # messages, while running and across restarts
        self.restarts = 0  # proxy sessions after the first
        self._delta: dict[str, int] = {}  # topics since the last part
        self._resumed = False  # carrying on a session from the files
        self._seen: set[str] = set()  # topics seen since then (their first gap: while down)
        self._pending_restart: PublisherRestarted | None = None
        self._resume_pending = resumed is not None

    def is_new_session(self, session: int) -> bool:
        return session != self.session

    def control_received(self, session: int, seq: int, clock: int) -> list[Event]:
        events = self._session(session, first_clock=clock, ctl_seq=seq)
        self.ctl_seq = max(self.ctl_seq, seq)
        if clock:
            events += self._clock_known(clock)
        return events

    def trades_received(self, symbol: str, session: int, seq: int, max_t: int = 0) -> list[Event]:
        """One trades message; ``max_t`` (its largest trade time) is needed only for the first
        message of a new session."""
        events = (
            self._session(session, first_clock=max_t, ctl_seq=None)
            if session != self.session
            else []
        )
        if max_t:
            events += self._clock_known(max_t)
        previous = self.last.get(symbol)
        while_down = self._resumed and symbol not in self._seen
        if self._resumed:
            self._seen.add(symbol)
        lost = 0
        if previous is not None:
            lost = max(0, seq - previous - 1)
        elif self.from_start:
            lost = seq - 1
        if seq > (previous or 0):
            self.last[symbol] = seq
            self._delta[symbol] = seq
        if lost:
            self.lost += lost
            events.append(Lost(symbol, lost, seq, while_down))
        return events

    def part_written(self, trades: int, max_t: int = 0) -> PartInfo:
        """The metadata of the part that holds every message fed since the previous one
        (``max_t``: the largest trade time in it)."""
        self.clock = max(self.clock, max_t)
        info = PartInfo(
            session=self.session,
            from_start=self.from_start,
            topics=dict(self._delta),
            ctl_seq=self.ctl_seq,
            clock=self.clock,
            trades=trades,
        )
        self._delta = {}
        return info

    def _clock_known(self, clock: int) -> list[Event]:
        self.clock = max(self.clock, clock)
        pending = self._pending_restart
        if pending is None or clock <= 0:
            return []
        self._pending_restart = None
        return [PublisherRestarted(pending.old, pending.new, pending.from_clock, clock)]

    def _session(self, session: int, *, first_clock: int, ctl_seq: int | None) -> list[Event]:
        """Take up ``session`` if it is new; ``ctl_seq`` is None for a trades message."""
        if session == self.session:
            return []
        events: list[Event] = []
        resumed = self.resumed if self._resume_pending else None
        self._resume_pending = False
        if resumed is not None and resumed.session == session:
            # the recorder restarted; the proxy did not: carry on from the files' numbers
            self.session = session
            self.from_start = resumed.from_start
            self.last = dict(resumed.topics)
            self._resumed = True
            self._seen = set()
            self.ctl_seq = resumed.ctl_seq
            self.clock = resumed.clock
            self._delta = {}
            ctl_lost = 0 if ctl_seq is None else max(0, ctl_seq - resumed.ctl_seq - 1)
            events.append(Resumed(session, resumed.clock, first_clock, ctl_lost))
            return events
        previous_session = self.session or (resumed.session if resumed is not None else 0)
        previous_clock = self.clock or (resumed.clock if resumed is not None else 0)
        if previous_session:
            self.restarts += 1
            self._pending_restart = PublisherRestarted(previous_session, session, previous_clock, 0)
        self.session = session
        # Seen from its start when the first thing heard of it is the clock before any trade.
        self.from_start = ctl_seq is not None and first_clock == 0
        self.last = {}
        self._resumed = False
        self._seen = set()
        self.ctl_seq = 0
        self.clock = 0
        self._delta = {}
        return events


def control_clock(message: codec.Message) -> int:
    """The feed clock a ``_ctl`` CLOCK or UPSTREAM message carries (0 for other kinds)."""
    if message.kind in (codec.Kind.CLOCK, codec.Kind.UPSTREAM):
        records = codec.records(message)
        if len(records):
            return int(records["clock"][-1])
    return 0
