"""What the bridge knows of each aggregator, and what the aggregators' messages mean (pure).

One :class:`Link` per ``--sub`` aggregator: what it announced (intervals, symbols, session,
from when its bars are whole), the feed clock it relays, the bar topics it was asked for, its
sequence gaps, whether it is heard. :class:`Links` takes each received message and decides:

- bars: counted, checked for gaps, deduplicated across replicas (:mod:`polyfan.fanout.replicas`)
  and queued as :class:`~polyfan.fanout.subscriptions.Arrival` s for the shell to deliver;
- announces, outages and silences: the aggregator's down/up state in
  :class:`~polyfan.fanout.feedstatus.FeedStatus`, with ``on_feed_changed`` called when clients
  are due a ``feed_down`` / ``feed_up``;
- replies: matched against the requests the bridge has waiting (:class:`Requests`), so a peer
  cannot answer for the aggregator, for another channel or ahead of time;
- routing: which aggregators a channel's topic is subscribed on, as clients come and go.

No sockets: the shell reads the sockets, hands frames in, and sends what ``send`` is given
(subscriptions and requests upstream). Time comes from ``clock`` (``time.monotonic``).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from polyfan.bars.outages import describe
from polyfan.errors import WireError
from polyfan.fanout.counters import SILENT_AFTER, BridgeCounters
from polyfan.fanout.feedstatus import OUTAGE, SILENT, FeedStatus
from polyfan.fanout.protocol import AggServes, Catalog, Channel, encode_bars, parse_bar_topic
from polyfan.fanout.replicas import STAND_IN_WAIT, Replica, Replicas
from polyfan.fanout.subscriptions import Arrival
from polyfan.wire import codec

log = logging.getLogger("polyfan.bridge")

WARN_EVERY_S = 5.0  # a continuing problem is one WARNING per this many seconds, with its count
HEARD_WITHIN = 5.0  # an aggregator heard from this recently counts as up (announce: every 1 s)
RESTARTED = "the aggregator restarted: the bars and history it held went with it"


@dataclass(eq=False)
class Link:
    """One aggregator, as the bridge knows it (``index``: its ``--sub``'s position)."""

    index: int
    endpoint: str
    gaps: codec.GapCounter = field(default_factory=codec.GapCounter)
    announce: dict[str, Any] | None = None
    replica: Replica = field(default_factory=Replica)  # what the replica rules know of it
    upstream_up: bool | None = None
    was_heard: bool | None = None  # as last reported by the watcher (None: not yet)
    topics: set[bytes] = field(default_factory=set)  # subscribed ZeroMQ prefixes
    seen: set[str] = field(default_factory=set)  # bar topics received (for gap counting)
    clock: int | None = None  # the feed clock it last relayed
    silent_session: int | None = None  # its session when it fell silent (None: it is heard)
    silent: bool = False

    @property
    def heard_at(self) -> float | None:
        """Monotonic time of its last message."""
        return self.replica.heard_at

    @property
    def whole_after(self) -> float:
        """Its bars with ``s`` at or before this may be partial (announce "from")."""
        return self.replica.whole_after

    def session(self) -> int | None:
        value = (self.announce or {}).get("session")
        return value if isinstance(value, int) else None

    def is_heard(self, now: float) -> bool:
        return self.replica.is_heard(now, HEARD_WITHIN)

    def status(self, now: float) -> dict[str, Any]:
        """``/api/info``'s view of it."""
        announce = self.announce or {}
        return {
            "endpoint": self.endpoint,
            "heard": self.is_heard(now),
            "seconds_since_heard": (
                None if self.heard_at is None else round(now - self.heard_at, 3)
            ),
            "session": announce.get("session"),
            "intervals": announce.get("intervals"),
            "symbols": announce.get("symbols"),
            "grace": announce.get("grace"),
            "history": announce.get("history"),
            "upstream_up": self.upstream_up,
            "gaps": self.gaps.lost,
        }


@dataclass(eq=False)
class Pending:
    """A request sent to an aggregator, waiting for its reply (``waiter``: the shell's)."""

    waiter: Any
    link: Link
    kind: codec.Kind
    channel: str
    check: int  # codec.channel_check of the channel asked


class Links:
    """Every aggregator link and the decisions their messages make (module docstring)."""

    def __init__(
        self,
        endpoints: Iterable[str],
        counters: BridgeCounters,
        send: Callable[[Link, bytes], None],
        on_feed_changed: Callable[[], None],
        on_reply: Callable[[Pending, codec.Message], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.links = [Link(index, endpoint) for index, endpoint in enumerate(endpoints)]
        self.counters = counters
        self.catalog: Catalog[Link] = Catalog()
        self.feed: FeedStatus[Link, Any] = FeedStatus()
        self.replicas = Replicas(self._replicas_serving)  # the replica rules' state
        self.requests: dict[int, Pending] = {}
        self.arrivals: list[Arrival] = []  # bars forwarded, not yet delivered (_forward)
        self.arrived_at = 0.0  # clock() when the oldest of them arrived
        self.wanted: Callable[[], Iterable[Channel]] = tuple  # channels clients are on
        self._send = send
        self._feed_changed = on_feed_changed
        self._on_reply = on_reply
        self._clock = clock
        self._channel_links: dict[Channel, list[Link]] = {}
        self._bad_replies_warned: tuple[float, float] = (-math.inf, 0.0)
        self.debug = log.isEnabledFor(logging.DEBUG)

    # -- what goes upstream -------------------------------------------------------------------

    def subscribe(self, link: Link, topic: bytes) -> None:
        if topic not in link.topics:
            link.topics.add(topic)
            self._send(link, b"\x01" + topic)

    def unsubscribe(self, link: Link, topic: bytes) -> None:
        if topic in link.topics:
            link.topics.discard(topic)
            self._send(link, b"\x00" + topic)

    def route(self, channel: Channel) -> None:
        """Subscribe the channel's topic on the aggs that serve it (idempotent)."""
        links = self._channel_links.setdefault(channel, [])
        for link in self.serving(channel):
            if link not in links:
                links.append(link)
                self.subscribe(link, channel.topic)

    def unroute(self, channel: Channel) -> None:
        for link in self._channel_links.pop(channel, []):
            self.unsubscribe(link, channel.topic)
            # Topics no longer received from this agg start afresh if subscribed again:
            # messages published meanwhile were not lost, just not asked for.
            for topic in [t for t in link.seen if (t + "\0").encode().startswith(channel.topic)]:
                if not any((topic + "\0").encode().startswith(other) for other in link.topics):
                    link.gaps.forget(topic)
                    link.seen.discard(topic)

    def serving(self, channel: Channel) -> list[Link]:
        """Every agg that serves the channel, in ``--sub`` order: shards by symbol, or
        replicas whose bars are deduplicated by start (:mod:`polyfan.fanout.replicas`)."""
        served = self.catalog.aggs_for(channel)
        return [link for link in self.links if link in served]

    def answering(self, channel: Channel) -> list[Link]:
        """The aggs to ask for a channel's history: those that serve it and are heard (a
        request to a silent agg would only wait in ZeroMQ's queue for its return), the one
        that has listened longest first."""
        now = self._clock()
        links = self._channel_links.get(channel) or self.serving(channel)
        return sorted(
            (link for link in links if link.is_heard(now)), key=lambda link: link.whole_after
        )

    def heard(self) -> list[Link]:
        now = self._clock()
        return [link for link in self.links if link.is_heard(now)]

    def request(self, link: Link, request_id: int, body: dict[str, Any], waiter: Any) -> None:
        """Send a request (``body``, its reply route included) and wait for its reply under
        ``request_id`` (the shell picks it at random: nobody can answer it ahead of the
        agg)."""
        op = body.get("op", "bars")
        channel = body.get("channel")
        self.requests[request_id] = Pending(
            waiter,
            link,
            codec.Kind.SYMBOLS if op == "symbols" else codec.Kind.HISTORY,
            str(channel),
            codec.channel_check(channel),
        )
        self.counters.history_requests.inc()
        self._send(link, codec.encode_request({"id": request_id, **body}))

    # -- what comes back ----------------------------------------------------------------------

    def received(self, link: Link, frame: bytes) -> int:
        """Handle one message; return how many bars it carried."""
        try:
            message = codec.decode(frame)
        except WireError as exc:
            self.counters.wire_errors.inc()
            if self.debug:
                log.debug("from %s: %s", link.endpoint, exc)
            return 0
        link.replica.heard(self._clock())
        kind = message.kind
        if kind is codec.Kind.BARS:
            self._bars_received(link, message)
            return message.count
        if kind is codec.Kind.CLOCK:
            if message.count:
                clock = int(codec.records(message)["clock"].max())
                link.clock = clock if link.clock is None else max(link.clock, clock)
        elif kind is codec.Kind.OUTAGE:
            self._outage_reported(link, message)
        elif kind is codec.Kind.ANNOUNCE:
            self._announced(link, message)
        elif kind is codec.Kind.HISTORY or kind is codec.Kind.SYMBOLS:
            self._replied(link, message)
        elif kind is codec.Kind.UPSTREAM:
            state = int(codec.records(message)["state"][-1]) if message.count else None
            link.upstream_up = state == codec.UPSTREAM_UP
        return 0

    def _bars_received(self, link: Link, message: codec.Message) -> None:
        parsed = parse_bar_topic(message.topic)
        if parsed is None:
            self.counters.wire_errors.inc()
            return
        interval, symbol = parsed
        records = codec.records(message)
        self.counters.bars_received.inc(len(records))
        topics = link.topics
        if (message.topic + "\0").encode() not in topics and (
            b"%dMs." % interval not in topics
        ):  # in flight when its channel's last client left: not asked for, and no loss either
            self.counters.bars_unwanted.inc(len(records))
            return
        link.seen.add(message.topic)
        lost = link.gaps.observe(message.topic, message.session, message.seq)
        if lost:
            log.warning("lost %d bar message(s) on %s from %s", lost, message.topic, link.endpoint)
        if len(records) == 0:
            return
        topic = message.topic
        decision = self.replicas.bars_received(
            link.replica, message.session, topic, records, self._clock(), HEARD_WITHIN
        )
        if decision.redundant:
            self.counters.bars_redundant.inc(decision.redundant)
        if decision.stood_in:
            self.counters.bars_stood_in.inc(decision.stood_in)
            log.warning(
                "%s: %d bar(s) held for a whole copy from another aggregator go out as they are "
                "(they may lack trades): %s has no copy of them",
                topic,
                decision.stood_in,
                link.endpoint,
            )
        if len(decision.forward):
            self._forward(interval, symbol, decision.forward)

    def _forward(self, interval: int, symbol: str, records: np.ndarray) -> None:
        """Queue bars for clients. Whoever delivers next (any agg's reader at the end of its
        pass, or the stand-in flush) delivers everything queued, in the order it was queued:
        a topic's bars reach clients in ``s`` order whichever agg and pass they came through.
        """
        if not self.arrivals:
            self.arrived_at = self._clock()  # the pass's oldest bar (delivery histogram)
        rows = records.tolist()
        parts = encode_bars(interval, symbol, rows)
        self.arrivals.append(
            (interval, symbol, [(row[0], part) for row, part in zip(rows, parts, strict=True)])
        )

    def take_arrivals(self) -> tuple[list[Arrival], float]:
        """The bars queued for clients and when the oldest arrived; the queue empties."""
        arrivals, self.arrivals = self.arrivals, []
        return arrivals, self.arrived_at

    def _replicas_serving(self, topic: str) -> list[Replica]:
        """The replica rules' view of the aggs that serve a bar topic's channel."""
        parsed = parse_bar_topic(topic)
        if parsed is None:
            return []
        return [link.replica for link in self.catalog.aggs_for(Channel(*parsed))]

    def flush_stand_ins(self) -> None:
        """Queue the stand-ins that waited ``STAND_IN_WAIT`` for a whole copy in vain."""
        for release in self.replicas.stand_ins_due(self._clock(), STAND_IN_WAIT):
            self.counters.bars_redundant.inc(release.redundant)
            parsed = parse_bar_topic(release.topic)
            if not len(release.forward) or parsed is None:
                continue
            self.counters.bars_stood_in.inc(len(release.forward))
            log.warning(
                "%s: no whole copy of %d bar(s) came from another aggregator within %gs; "
                "sending them as they are (they may lack trades)",
                release.topic,
                len(release.forward),
                STAND_IN_WAIT,
            )
            self._forward(*parsed, release.forward)

    def _announced(self, link: Link, message: codec.Message) -> None:
        try:
            announce = codec.decode_json(message)
            intervals = frozenset(int(i) for i in announce["intervals"])
            symbols = announce.get("symbols")
            serves = AggServes(intervals, None if symbols is None else frozenset(symbols))
        except (WireError, KeyError, TypeError, ValueError) as exc:
            self.counters.wire_errors.inc()
            log.warning("bad ANNOUNCE from %s: %s", link.endpoint, exc)
            return
        first = link.announce is None
        restarted = (
            not first
            and link.announce is not None
            and link.announce.get("session") != announce.get("session")
        )
        if restarted and not link.silent:  # too quick to be seen silent: its history is lost
            self._restarted_unseen(link)
        link.announce = announce
        # its outage first: one still open keeps the feed down past the silence's end
        self._outage_announced(link, announce.get("outage"))
        if link.silent:
            self._heard_again(link, announce)
        link.replica.announced(announce)
        self.catalog.update(link, serves)
        if first or restarted:
            log.info(
                "aggregator %s %s: intervals %s, symbols %s",
                link.endpoint,
                "restarted" if restarted else "heard",
                ",".join(str(i) for i in sorted(intervals)),
                "*" if symbols is None else len(symbols),
            )
            for channel in self.wanted():
                self.route(channel)

    # -- down and up --------------------------------------------------------------------------

    def watch(self, link: Link, started: float) -> None:
        """The watcher's look at ``link`` (a few times a second; ``started``: the bridge's
        start): silent for SILENT_AFTER, it is down (:meth:`_watch_silence`); not heard for
        HEARD_WITHIN, or heard again, it is logged."""
        self._watch_silence(link)
        now = self._clock()
        heard = link.is_heard(now)
        if heard == link.was_heard:
            return
        if heard:
            if link.was_heard is not None:
                log.info("aggregator %s heard again", link.endpoint)
        elif link.was_heard:
            log.warning("aggregator %s silent for %gs", link.endpoint, HEARD_WITHIN)
        elif now - started < HEARD_WITHIN:
            return  # still starting
        else:
            log.warning(
                "nothing heard from aggregator %s in %gs: is it running there?",
                link.endpoint,
                HEARD_WITHIN,
            )
        link.was_heard = heard

    def _watch_silence(self, link: Link) -> None:
        """An agg heard before and silent for SILENT_AFTER is down (its clients' feed too,
        unless a replica carries their channels) until it announces itself again."""
        if link.heard_at is None:
            return
        if self._clock() - link.heard_at >= SILENT_AFTER and not link.silent:
            self._gone_silent(
                link,
                "an aggregator of this feed is not heard",
                f"not heard for {SILENT_AFTER:g}s: its clients' feed is down unless a replica "
                "carries their channels",
            )

    def _gone_silent(self, link: Link, why: str, note: str) -> None:
        """``link`` is down from the last clock it relayed (``why`` for its clients, ``note``
        for the log) until it announces itself again (:meth:`_heard_again`)."""
        link.silent = True
        link.silent_session = link.session()
        s = link.clock if link.clock is not None else 0
        if self.feed.agg_down(link, SILENT, s, why):
            self.counters.outages.inc()
            log.warning("aggregator %s %s", link.endpoint, note)
            self._feed_changed()

    def _heard_again(self, link: Link, announce: dict[str, Any]) -> None:
        """A silent agg announces itself again (it announces every second): it is back,
        restarted if its session changed, once a restarted one has heard the proxy (its
        bars start then: "from")."""
        restarted = announce.get("session") != link.silent_session
        if restarted and not isinstance(announce.get("from"), int):
            return  # not yet: a later announce says from when
        link.silent = False
        e, why = self._back_from(link, restarted)
        if self.feed.agg_up(link, SILENT, e, why):
            log.info("aggregator %s heard again: %s", link.endpoint, why)
            self._feed_changed()

    def _back_from(self, link: Link, restarted: bool) -> tuple[int, str]:
        """Where a silent or restarted agg's bars start again, and what was lost."""
        clock = link.clock if link.clock is not None else 0
        if not restarted:
            # An outage that began and ended while this bridge was cut off from the agg
            # (partitioned, not restarted) reached it only in the announce: the window told
            # to clients covers it.
            last = (link.announce or {}).get("last_outage") or {}
            since = self.feed.down_since(link)
            if isinstance(last.get("e"), int) and since is not None and last["e"] > since:
                clock = max(clock, int(last["e"]))
            return clock, "the aggregator is heard again"
        start = (link.announce or {}).get("from")
        e = int(start) if isinstance(start, int) else clock
        stored = (link.announce or {}).get("stored")
        if isinstance(stored, dict) and isinstance(stored.get("to"), int):
            # agg --store: its history before the restart is on disk, up to its last flush
            return e, (
                f"the aggregator restarted: it kept its bars up to {stored['to']} on disk; "
                f"bars from then to {e} may be missing or short; it serves bars again from {e}"
            )
        return e, f"{RESTARTED}; it serves bars again from {e}"

    def _restarted_unseen(self, link: Link) -> None:
        """An agg restarted too quickly to be seen silent: down as a silent one (its old
        session recorded: the new announce is not stored yet), back as one comes back
        (:meth:`_heard_again`, called next)."""
        self._gone_silent(link, RESTARTED, RESTARTED.removeprefix("the aggregator "))

    def _outage_reported(self, link: Link, message: codec.Message) -> None:
        """An OUTAGE message: the feed behind ``link`` lost trades, or is whole again."""
        try:
            self._outage_announced(link, codec.decode_json(message), reported=True)
        except (WireError, KeyError, TypeError, ValueError) as exc:
            self.counters.wire_errors.inc()
            log.warning("bad OUTAGE from %s: %s", link.endpoint, exc)

    def _outage_announced(self, link: Link, outage: Any, *, reported: bool = False) -> None:
        """An agg's outage state, from an OUTAGE message or (as a backstop for a message
        missed while subscribing) its announce: ``{"state", "s", "e", "causes"}`` or None."""
        if outage is None:
            if (
                not reported
                and link.clock is not None
                and self.feed.agg_up(link, OUTAGE, link.clock, "the feed is whole again")
            ):
                self._feed_changed()
            return
        causes = tuple(str(cause) for cause in outage.get("causes") or ())
        why = describe(causes) or "outage"
        if outage["state"] == "down":
            if self.feed.agg_down(link, OUTAGE, int(outage["s"]), why):
                self.counters.outages.inc()
                log.warning(
                    "aggregator %s reports an outage from feed clock %d: %s",
                    link.endpoint,
                    int(outage["s"]),
                    why,
                )
                self._feed_changed()
        elif self.feed.agg_up(link, OUTAGE, int(outage["e"]), f"outage over ({why})"):
            log.info(
                "aggregator %s: outage over, feed clock %d to %d",
                link.endpoint,
                int(outage["s"]),
                int(outage["e"]),
            )
            self._feed_changed()

    # -- replies ------------------------------------------------------------------------------

    def _replied(self, link: Link, message: codec.Message) -> None:
        """A reply on this bridge's route: taken only as the answer to a request it has
        waiting, from the agg it asked, of the kind and for the channel it asked."""
        check = None
        try:
            if message.kind is codec.Kind.HISTORY:
                request_id = codec.records_from_history(message)[0]
                check = codec.history_channel_check(message)
            else:
                request_id = int(codec.decode_json(message)["id"])
        except (WireError, KeyError, TypeError, ValueError):
            self.counters.wire_errors.inc()
            return
        pending = self.requests.get(request_id)
        problem = None
        if pending is None:
            problem = f"reply {request_id} answers no request waiting"
        elif pending.link is not link:
            problem = f"reply {request_id} came from {link.endpoint}, not the aggregator asked"
        elif pending.kind is not message.kind:
            problem = f"reply {request_id} is {message.kind.name}, not {pending.kind.name}"
        elif check is not None and check != pending.check:
            problem = f"reply {request_id} answers another channel than {pending.channel}"
        if problem is not None:
            self._bad_reply(problem)
            return
        assert pending is not None
        del self.requests[request_id]
        self._on_reply(pending, message)

    def _bad_reply(self, problem: str) -> None:
        """Counted; one WARNING per WARN_EVERY_S at most, with the count since the last."""
        self.counters.bad_replies.inc()
        total = self.counters.bad_replies.value
        warned_at, warned_total = self._bad_replies_warned
        now = self._clock()
        if now - warned_at >= WARN_EVERY_S:
            log.warning("%d replies ignored (the latest: %s)", total - warned_total, problem)
            self._bad_replies_warned = (now, total)
