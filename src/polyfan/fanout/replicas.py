"""The bridge's replica rules: which aggregator's bars reach clients when several serve a channel.

Pure: no sockets, no clock of its own (the shell passes ``now``, monotonic seconds). It owns,
per aggregator link (:class:`Replica`), the session it announced, from which bar start it is
whole and when it was last heard; per bar topic (:class:`Replicas`), the start of the newest
bar forwarded and the stand-ins held. The shell feeds it what it reads and carries out what it
returns (forward these bars, count those redundant or stood in, log this warning).

The rules, for the bars of one topic from the aggregators serving its channel:

- An aggregator is *whole* for the bars that start after the ``"from"`` its ANNOUNCE gives (the
  feed time it first heard the proxy) plus ``WHOLE_MARGIN_MS``: it may have missed trades of
  earlier ones. An announce without ``"from"`` (an agg from before it) is whole for every bar;
  ``"from": null`` (not heard the proxy yet) for none. Bars of a session it has not announced
  (restarted, its new announce not read yet) are whole for none either.
- Bars at or before the newest forwarded on the topic came from another agg first: counted
  redundant, dropped.
- Bars an agg may have made partial are held as stand-ins while another agg that serves the
  channel and is heard is whole for any of them: that agg's whole copies replace them. While
  stand-ins are held, later bars on the topic from an agg not whole for them wait with them
  (forwarding one would pass the whole copies still to come). A start already held keeps its
  first copy, unless that may be partial and the new one is whole (either way one copy is
  redundant).
- A message not held settles the stand-ins: those it has a copy of are redundant (a held
  whole copy replaces its copy that may be partial); those older than its newest bar that it
  has no copy of go out with it, in ``s`` order (counted as stood in); newer ones stay held.
- Stand-ins that waited ``STAND_IN_WAIT`` seconds (from the first one held on the topic) go out
  as they are, counted as stood in (:meth:`Replicas.stand_ins_due`).

So a topic's bars go out in ``s`` order, each start once, a whole copy whenever a heard agg
whole for the bar sends it before the wait ends, whatever the order the links' messages
interleave in (tests/fanout/test_replicas.py checks it for three replicas that start late and
restart). A bar no agg has whole and that arrives after a newer one went out is dropped
(counted redundant): order wins; with bars closing on one feed clock, that takes a link
lagging the others by more than a bar.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

WHOLE_MARGIN_MS = 1000  # an agg's bars up to this long after its announced "from" may be partial
STAND_IN_WAIT = 1.0  # seconds such bars wait for another agg's whole copies before going out


@dataclass(eq=False)
class Replica:
    """One aggregator link as the replica rules see it."""

    session: object = None  # as last announced (None: nothing announced yet)
    whole_after: float = math.inf  # its bars with s <= this may be partial
    heard_at: float | None = None  # ``now`` of its last message

    def heard(self, now: float) -> None:
        """Anything arrived from the link at ``now``."""
        self.heard_at = now

    def is_heard(self, now: float, within: float) -> bool:
        """Heard from less than ``within`` seconds before ``now``."""
        return self.heard_at is not None and now - self.heard_at < within

    def announced(self, announce: Mapping[str, Any], margin_ms: int = WHOLE_MARGIN_MS) -> bool:
        """Its ANNOUNCE (``session``, ``from``); True when the session changed (a restart)."""
        session = announce.get("session")
        restarted = self.session is not None and session != self.session
        self.session = session
        if "from" not in announce:  # an agg from before "from": taken as whole
            self.whole_after = -math.inf
        elif announce["from"] is None:  # not heard the proxy yet
            self.whole_after = math.inf
        else:
            self.whole_after = int(announce["from"]) + margin_ms
        return restarted


class Decision(NamedTuple):
    """What to do with one message's bars."""

    forward: np.ndarray  # bars to send clients now, in s order (maybe stand-ins among them)
    redundant: int = 0  # bars dropped: clients have them, or will from a held copy
    held: int = 0  # bars of this message held (as stand-ins or behind them)
    stood_in: int = 0  # of ``forward``, stand-ins released (this agg has no copy of them)


class Release(NamedTuple):
    """Stand-ins of a topic that waited in vain: forward them as they are."""

    topic: str
    forward: np.ndarray  # in s order; all stood in
    redundant: int  # held bars dropped meanwhile forwarded from elsewhere


class Replicas:
    """Per bar topic: the newest start forwarded and the stand-ins held.

    ``serving(topic)`` gives the :class:`Replica` of every agg that serves the topic's channel;
    it is asked only when a message's bars are in question (not per message).
    """

    def __init__(self, serving: Callable[[str], Iterable[Replica]]) -> None:
        self._serving = serving
        self._delivered: dict[str, int] = {}  # bar topic -> start of the newest bar forwarded
        # bar topic -> (since, bars awaiting another agg's whole copies, oldest first, and
        # which of them are whole copies: an agg's later bars held behind the others)
        self._stand_ins: dict[str, tuple[float, np.ndarray, np.ndarray]] = {}

    def delivered(self, topic: str) -> int | None:
        """The start of the newest bar forwarded on ``topic`` (None: none yet)."""
        return self._delivered.get(topic)

    def has_stand_ins(self) -> bool:
        return bool(self._stand_ins)

    def held(self, topic: str) -> np.ndarray | None:
        """The bars held on ``topic``, oldest first (None: none)."""
        held = self._stand_ins.get(topic)
        return None if held is None else held[1]

    def bars_received(
        self,
        replica: Replica,
        session: object,
        topic: str,
        records: np.ndarray,
        now: float,
        heard_within: float,
    ) -> Decision:
        """One message's bars (a record array with field ``s``, ascending) from ``replica``,
        sent under ``session``, at ``now``; a link counts as heard ``heard_within`` seconds."""
        if not len(records):
            return Decision(records)
        starts = records["s"]
        first = int(starts[0])
        delivered = self._delivered.get(topic)
        whole_after = replica.whole_after if session == replica.session else math.inf
        if (
            (delivered is not None and first <= delivered)
            or first <= whole_after
            or topic in self._stand_ins
        ):
            return self._sort_out(
                replica, whole_after, topic, records, delivered, now, heard_within
            )
        self._delivered[topic] = int(starts[-1])
        return Decision(records)

    def stand_ins_due(self, now: float, wait: float = STAND_IN_WAIT) -> list[Release]:
        """The stand-ins that waited ``wait`` seconds for a whole copy in vain, to forward."""
        due: list[Release] = []
        for topic, (since, records, _) in list(self._stand_ins.items()):
            if now - since < wait:
                continue
            del self._stand_ins[topic]
            delivered = self._delivered.get(topic)
            redundant = 0
            if delivered is not None:
                fresh = records[records["s"] > delivered]
                redundant = len(records) - len(fresh)
                records = fresh
            if len(records):
                self._delivered[topic] = int(records["s"][-1])
            if len(records) or redundant:
                due.append(Release(topic, records, redundant))
        return due

    def _sort_out(
        self,
        replica: Replica,
        whole_after: float,
        topic: str,
        records: np.ndarray,
        delivered: int | None,
        now: float,
        heard_within: float,
    ) -> Decision:
        """The bars of one message to forward, when some are in question (the rules above)."""
        redundant = 0
        if delivered is not None and int(records["s"][0]) <= delivered:
            if int(records["s"][-1]) <= delivered:
                return Decision(records[:0], redundant=len(records))
            fresh = records[records["s"] > delivered]
            redundant = len(records) - len(fresh)
            records = fresh
        held = self._stand_ins.get(topic)
        # the newest bar in question (this message's or held) this agg may not have whole
        doubtful = _newest_at_or_before(records["s"], whole_after)
        if held is not None:
            doubtful = max(doubtful, _newest_at_or_before(held[1]["s"], whole_after))
        if doubtful > -math.inf and any(  # another heard agg is whole for it
            other is not replica
            and other.is_heard(now, heard_within)
            and other.whole_after < doubtful
            for other in self._serving(topic)
        ):
            kept = self._hold(topic, records, records["s"] > whole_after, now)
            return Decision(records[:0], redundant + len(records) - kept, kept)
        if held is None:
            self._delivered[topic] = int(records["s"][-1])
            return Decision(records, redundant)
        del self._stand_ins[topic]
        since, stand_ins, wholes = held
        last = int(records["s"][-1])
        is_later = stand_ins["s"] > last
        if is_later.any():
            self._stand_ins[topic] = (since, stand_ins[is_later], wholes[is_later])
        is_due = ~is_later
        due, due_whole = stand_ins[is_due], wholes[is_due]
        covered = np.isin(due["s"], records["s"])
        redundant += int(covered.sum())
        if (covered & due_whole).any():  # a held whole copy beats this message's partial one
            at = np.searchsorted(records["s"], due["s"][covered & due_whole])
            partial = records["s"][at] <= whole_after
            if partial.any():
                records = records.copy()
                records[at[partial]] = due[covered & due_whole][partial]
        released = due[~covered]
        self._delivered[topic] = last
        if not len(released):
            return Decision(records, redundant)
        merged = np.concatenate([released, records])
        return Decision(merged[np.argsort(merged["s"], kind="stable")], redundant, 0, len(released))

    def _hold(self, topic: str, records: np.ndarray, whole: np.ndarray, now: float) -> int:
        """Add bars to a topic's stand-ins, ``whole`` saying which are whole copies (a start
        already held keeps its first copy unless this one is whole and that one is not);
        return how many starts were added."""
        held = self._stand_ins.get(topic)
        if held is None:
            self._stand_ins[topic] = (now, records, whole)
            return len(records)
        since, stand_ins, wholes = held
        known = np.isin(records["s"], stand_ins["s"])
        if known.any() and whole.any():
            at = np.searchsorted(stand_ins["s"], records["s"][known])
            better = whole[known] & ~wholes[at]
            if better.any():
                stand_ins, wholes = stand_ins.copy(), wholes.copy()
                stand_ins[at[better]] = records[known][better]
                wholes[at[better]] = True
        new = ~known
        count = int(new.sum())
        if count:
            merged = np.concatenate([stand_ins, records[new]])
            order = np.argsort(merged["s"], kind="stable")
            stand_ins, wholes = merged[order], np.concatenate([wholes, whole[new]])[order]
        self._stand_ins[topic] = (since, stand_ins, wholes)
        return count


def _newest_at_or_before(starts: np.ndarray, limit: float) -> float:
    """The greatest of ascending ``starts`` that is ``<= limit`` (-inf: none)."""
    at = int(np.searchsorted(starts, limit, side="right"))
    return float(starts[at - 1]) if at else -math.inf
