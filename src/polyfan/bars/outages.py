"""When the feed behind an agg may have lost trades: outage windows, decided from what arrives.

Pure: the agg's core reports what it saw (a batch's clock, a gap, another publisher session, an
UPSTREAM down/up, the time it last heard anything from the proxy) and gets back the changes to
publish. No sockets, no clocks of its own: times are passed in.

An outage (CONTRACT.md §12) is a window ``[s, e]`` on the feed clock in which trades may have
been missed. It begins when any of these is seen:

- ``upstream``: the proxy reports its upstream connection down (at the clock it reports);
- ``restart``: a control message from a publisher session not heard before (the proxy was
  restarted: whatever it received before it died, and whatever the vendor sent while it was
  down, never reached this agg);
- ``gap``: messages lost between proxy and agg (a sequence gap);
- ``silence``: nothing at all, not even the clock, from the proxy for ``silence_ms``.

The window starts at the feed clock when the cause was seen (the last clock heard before it).
Its end ``e`` is the first clock after every cause has cleared that is past its start: an
upstream clears when the proxy reports it up again, the others at once (the proxy is heard
again). While an outage is open, further causes join it rather than open another. Every bar
still open when it began (``e + grace > s``: a trade arriving then could still have been applied
to it) and every bar that starts inside it (``s <= e``) carries ``outage``.

It is over (published, counted as ended) only once it has *settled*: at the first clock at least
``settle_ms`` past the clock that gave ``e``. A cause seen while it settles joins it again: a
gap, in particular, which each topic shows only when its first message after a cut arrives, one
topic after another. The window is then open-ended again, and ``e`` becomes the first clock
after that cause, as a new outage's end would have been. The agg's ``settle_ms`` is its grace:
a bar that starts after ``e`` closes at a clock past ``e + grace``, so while the outage settles
every such bar is still open, and extending ``e`` marks exactly the bars that the gap's own
outage would have marked (those still open when it was found, and those starting by the first
clock after it), while the one window published still tells the truth: every bar open at ``s``
or starting by ``e`` carries ``outage``. A gap found later is a new outage.

An agg that starts (or restarts) cannot know what it missed before it first heard the proxy:
:meth:`Outages.started` marks the bars still open then (a window ``[clock, clock]``), without
counting an outage (there is no feed loss to report, only this agg's late start).
"""

from __future__ import annotations

from dataclasses import dataclass, field

SILENCE_MS = 2000  # nothing heard from the proxy for this long opens an outage
SETTLE_MS = 0  # by default an outage is over when it ends; the agg settles for its grace
SESSIONS_KEPT_MS = 60_000  # a publisher session not heard for this long is forgotten

UPSTREAM = "upstream"
RESTART = "restart"
GAP = "gap"
SILENCE = "silence"

_DESCRIBED = {
    UPSTREAM: "the proxy's upstream connection is down",
    RESTART: "the proxy restarted",
    GAP: "messages from the proxy were lost",
    SILENCE: "nothing heard from the proxy",
}


def describe(causes: tuple[str, ...]) -> str:
    """The causes in words, for logs and client statuses."""
    return "; ".join(_DESCRIBED.get(cause, cause) for cause in causes)


@dataclass(frozen=True, slots=True)
class Change:
    """An outage began (``e is None``) or ended, with its causes in the order they were seen."""

    s: int
    e: int | None
    causes: tuple[str, ...]

    @property
    def began(self) -> bool:
        return self.e is None

    def as_json(self) -> dict[str, object]:
        return {
            "state": "down" if self.e is None else "up",
            "s": self.s,
            "e": self.e,
            "causes": list(self.causes),
        }


@dataclass(slots=True)
class _Open:
    s: int
    causes: list[str]
    upstream_down: bool = False
    # the feed clock and the proxy's wall time when it said down (the first such since its
    # last up)
    down_at: tuple[int, int] | None = None
    at_least: int = 0  # the window ends no earlier (the upstream's downtime, on the feed clock)
    e: int | None = None  # its end, once a clock has ended it: it is settling (None: open-ended)
    ended_at: int = 0  # the clock that gave ``e``: it is over at the first clock settle_ms on


@dataclass
class Outages:
    """The outage state of one agg's feed. Every method returns the changes it made."""

    silence_ms: int = SILENCE_MS
    settle_ms: int = SETTLE_MS  # over this far past the clock that ended it (the agg's grace)
    began_total: int = 0  # outages begun (polyfan_agg_outages_total)
    # for the bars, oldest first; ``revision`` is bumped whenever they change
    windows: list[tuple[int, int | None]] = field(default_factory=list)
    revision: int = 0
    _open: _Open | None = None
    # the latest outage that ended: in the announce, for a subscriber that was cut off from
    # this agg while it began and ended (its OUTAGE messages never reached it)
    last_closed: Change | None = None
    _heard_at: int | None = None  # monotonic ms of the last message from the proxy
    _first_heard_at: int | None = None  # sessions first seen within silence_ms of it: no restart
    _sessions: dict[int, int] = field(default_factory=dict)  # publisher session -> heard at (ms)

    # -- what it is now ---------------------------------------------------------------------

    def is_open(self) -> bool:
        return self._open is not None

    def closes_past(self) -> int | None:
        """The clock the first CLOCK must pass to end the open outage, or once ended, to be
        over (None: none is open, or its upstream is still down)."""
        open_ = self._open
        if open_ is None or open_.upstream_down:
            return None
        return open_.s if open_.e is None else open_.ended_at + self.settle_ms - 1

    def current(self) -> Change | None:
        """The open outage, as its ``began`` change (None when the feed is whole)."""
        if self._open is None:
            return None
        return Change(self._open.s, None, tuple(self._open.causes))

    # -- what was seen ----------------------------------------------------------------------

    def started(self, clock: int, stored_to: int | None = None) -> None:
        """This agg first heard the proxy at feed clock ``clock``: bars still open then may lack
        earlier trades. Marked, not counted, not published. ``stored_to``: a previous process
        of this agg stored every bar it closed up to that clock (``agg --store``): the bars
        from there on may lack the trades it heard after it, or that nobody heard."""
        self.windows.append((min(clock, stored_to) if stored_to is not None else clock, clock))
        self.revision += 1

    def heard(self, now_ms: int) -> None:
        """A message (any) arrived from the proxy at monotonic ``now_ms``."""
        self._heard_at = now_ms
        if self._first_heard_at is None:
            self._first_heard_at = now_ms

    def session_heard(self, session: int, now_ms: int) -> None:
        """Publisher ``session`` was heard (no decision: the first session is only known)."""
        self._sessions[session] = now_ms

    def session_seen(self, session: int, clock: int | None, now_ms: int) -> list[Change]:
        """A control message of publisher ``session``; ``clock`` is the feed clock before it."""
        known = self._sessions
        self.heard(now_ms)
        assert self._first_heard_at is not None
        # Several proxies may publish to one agg: those heard from the start are not restarts.
        new = session not in known and now_ms - self._first_heard_at >= self.silence_ms
        known[session] = now_ms
        for old in [s for s, at in known.items() if now_ms - at > SESSIONS_KEPT_MS]:
            del known[old]
        if not new or clock is None:
            return []
        changes = self._begin(RESTART, clock)
        assert self._open is not None
        # A new proxy starts with its upstream not yet up and says "up" once it is; if that UP
        # was missed (sent before this agg reconnected), the outage must still end: it ends
        # at the first clock of the new proxy past its start, which needs trades flowing.
        self._open.upstream_down = False
        return changes

    def lost(self, clock: int | None) -> list[Change]:
        """Messages were lost (a sequence gap) while the feed clock was ``clock``."""
        return [] if clock is None else self._begin(GAP, clock)

    def upstream_down(self, clock: int, wall: int | None = None) -> list[Change]:
        """The proxy reports its upstream down at feed clock ``clock`` (its wall time
        ``wall``)."""
        changes = self._begin(UPSTREAM, clock)
        assert self._open is not None
        self._open.upstream_down = True
        if self._open.down_at is None and wall is not None:
            self._open.down_at = (clock, wall)
        return changes

    def upstream_up(self, wall: int | None = None) -> list[Change]:
        """The proxy is connected upstream again (at its wall time ``wall``): the outage can
        end at the next clock past its start, and no earlier than the clock when the upstream
        went down plus the time it was down: the feed clock stands still while the proxy is
        disconnected, so in a quiet market the next clock could be just past the start,
        leaving bars that lost trades during the downtime unmarked. (From the clock of the
        down, not the outage's start: the outage may have begun earlier, from another cause.)"""
        open_ = self._open
        if open_ is not None:
            open_.upstream_down = False
            if wall is not None and open_.down_at is not None:
                clock, down_wall = open_.down_at
                open_.at_least = max(open_.at_least, clock + max(0, wall - down_wall))
                open_.down_at = None
        return []

    def silent(self, now_ms: int, clock: int | None) -> list[Change]:
        """Check for silence at monotonic ``now_ms``; ``clock`` is the feed clock now."""
        heard = self._heard_at
        if heard is None or clock is None or now_ms - heard < self.silence_ms:
            return []
        open_ = self._open
        if open_ is not None and open_.e is None and SILENCE in open_.causes:
            return []
        return self._begin(SILENCE, clock)

    def clock_received(self, clock: int, now_ms: int) -> list[Change]:
        """A CLOCK arrived and the feed clock is now ``clock``: the end of an open outage whose
        causes have cleared, once the clock has moved past its start; it is over once the clock
        is ``settle_ms`` past the clock that ended it."""
        self._heard_at = now_ms
        open_ = self._open
        if open_ is None or open_.upstream_down:
            return []
        if open_.e is None:
            if clock <= open_.s:
                return []
            end = max(clock, open_.at_least)
            self._set_window(open_, end)
            open_.e, open_.ended_at = end, clock
        if clock < open_.ended_at + self.settle_ms:
            return []
        self._open = None
        self.last_closed = Change(open_.s, open_.e, tuple(open_.causes))
        return [self.last_closed]

    def forget_before(self, clock: int) -> None:
        """Drop windows that ended before ``clock`` (no bar still open can overlap them)."""
        open_ = self._open
        mine = None if open_ is None else (open_.s, open_.e)
        kept = [w for w in self.windows if w[1] is None or w[1] >= clock or w == mine]
        if len(kept) != len(self.windows):
            self.windows = kept
            self.revision += 1

    # -- inside -----------------------------------------------------------------------------

    def _set_window(self, open_: _Open, end: int | None) -> None:
        """The open outage's window now ends at ``end`` (None: open-ended)."""
        # not always the last window (the agg's start window may follow it)
        at = self.windows.index((open_.s, open_.e))
        self.windows[at] = (open_.s, end)
        self.revision += 1

    def _begin(self, cause: str, clock: int) -> list[Change]:
        open_ = self._open
        if open_ is not None:
            if cause not in open_.causes:
                open_.causes.append(cause)
            if open_.e is not None:  # it was settling: open-ended again, until a clock after
                self._set_window(open_, None)
                open_.e = None
            return []
        self._open = _Open(clock, [cause])
        self.began_total += 1
        self.windows.append((clock, None))
        self.revision += 1
        return [Change(clock, None, (cause,))]
