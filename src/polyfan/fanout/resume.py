"""The client side of the bridge protocol (``polyfan.client.bars``): which bars to hand on, what
``since`` to resume each channel with after a reconnect, what each status means.

Pure: no asyncio, websockets or zmq. :class:`Resume` holds what a program has been given so far;
the shell (``polyfan.client``) feeds it every event the bridge sends and carries out what it
answers:

- :meth:`Resume.subscriptions` is what to send on each (re)connection: ``(channels, since)``
  pairs, one ``subscribe`` frame each. A channel resumes from the start of the next bar it
  needs (``need``: its last bar's ``s`` plus its interval), so nothing handed on is sent again
  and nothing after it is skipped. Channels of one interval share one frame, with the smallest
  ``since`` of the group (the bridge allows 50 frames a second); what that brings from before
  a channel's own ``need`` is dropped here.
- :meth:`Resume.bar` says whether a bar is handed on (``HAND_ON``), is one already handed on or
  from before ``need`` (``DROP``), or first needs the bars the bridge could not send
  (``BACKFILL``: its ``since`` reached past the bridge's bound of bars, so the shell fetches
  ``[start, end)`` over HTTP, gives them to :meth:`Resume.backfilled`, then asks again).
- :meth:`Resume.status` sorts the bridge's statuses: ``FATAL`` (``auth_failed``: the token is
  wrong; retrying cannot help), ``RECONNECT`` (a channel was refused or its history failed: the
  shell reconnects and every channel resumes with ``since``), ``AUTHENTICATED``, or ``NOTED``.

A ``*`` channel takes no ``since`` (the bridge's history is per symbol): after a reconnect it
resumes live, and its first bar after the reconnect yields a :class:`Gap` from the newest bar
start it had seen to that bar's start (bars of any symbol with ``s`` in it may be missing).
Every channel keeps the newest start handed on per symbol, so nothing is handed on twice.

A revision (a bar with ``"r": k``, ``k > 0``, CONTRACT §10 ``--revise``) of a bar already
handed on is handed on too: it replaces that bar, it does not repeat it.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from polyfan.fanout.protocol import Channel, parse_channel

# A channel with no bar yet, resumed after a reconnect, starts this far before the newest bar
# end the stream has seen (an agg's grace and the bridge's delivery, with room to spare).
RESUME_SLACK_MS = 5_000
_SINCE_PAST = re.compile(r"since reaches past the (\d+) most recent bars")


class Verdict(enum.Enum):
    HAND_ON = "hand on"
    DROP = "drop"
    BACKFILL = "backfill"


class StatusAction(enum.Enum):
    NOTED = "noted"  # pass it on, nothing to do
    AUTHENTICATED = "authenticated"
    RECONNECT = "reconnect"  # a channel is not served exactly on this connection
    FATAL = "fatal"  # the bridge refused the token


@dataclass(frozen=True, slots=True)
class Gap:
    """Bars of ``channel`` with ``start <= s < end`` may be missing (``start`` None: unknown)."""

    channel: str
    start: int | None
    end: int
    reason: str

    def status(self) -> dict[str, Any]:
        """The status event a program gets for it (``"status": "gap"``, made by the client)."""
        return {
            "ev": "status",
            "status": "gap",
            "channel": self.channel,
            "s": self.start,
            "e": self.end,
            "message": f"{self.channel}: bars with s in [{self.start}, {self.end}) may be "
            f"missing: {self.reason}",
        }


@dataclass(frozen=True, slots=True)
class BarDecision:
    verdict: Verdict
    channel: Channel | None = None
    start: int = 0  # BACKFILL: fetch bars with start <= s < end first
    end: int = 0
    gaps: tuple[Gap, ...] = ()


@dataclass(slots=True)
class _Series:
    """What one subscribed channel has handed on."""

    channel: Channel
    need: int | None  # per-symbol channel: the smallest s still to hand on (None: any)
    last: dict[str, int] = field(default_factory=dict)  # symbol -> newest s handed on
    backfill_from: int | None = None  # the bridge said since reached past its bound
    resumed_at: int | None = None  # a * channel resumed live: its gap starts here
    blind: bool = False  # resumed live with nothing known: the first bar bounds the gap


class Resume:
    """What a ``bars()`` stream has handed on, channel by channel."""

    def __init__(self, channels: Iterable[Channel], since: Mapping[Channel, int | None]) -> None:
        self.series: dict[Channel, _Series] = {}
        for channel in channels:
            start = since.get(channel)
            if start is not None and channel.symbol is None:
                raise ValueError(f"{channel.name}: since needs one symbol; history is per symbol")
            self.series.setdefault(channel, _Series(channel, start))
        if not self.series:
            raise ValueError("channels: give at least one, like 500Ms.TSLA")
        self.clock_hint: int | None = None  # the newest bar end seen on any channel
        self.dropped = 0  # bars dropped as already handed on (overlap of a shared since)
        self._connected_once = False

    # --- what to send --------------------------------------------------------------------

    def subscriptions(self) -> list[tuple[list[str], int | None]]:
        """The ``subscribe`` frames for a new connection: ``(channel names, since)``."""
        live: list[str] = []
        by_interval: dict[int, tuple[list[str], int]] = {}
        for series in self.series.values():
            since = self._since(series)
            if since is None:
                live.append(series.channel.name)
                continue
            names, smallest = by_interval.get(series.channel.interval, ([], since))
            names.append(series.channel.name)
            by_interval[series.channel.interval] = (names, min(smallest, since))
        frames: list[tuple[list[str], int | None]] = [
            (names, since) for names, since in by_interval.values()
        ]
        if live:
            frames.append((live, None))
        return frames

    def _since(self, series: _Series) -> int | None:
        channel = series.channel
        if channel.symbol is None:
            if self._connected_once:
                series.resumed_at = max(series.last.values(), default=None)
                series.blind = series.resumed_at is None
            return None
        if series.need is not None:
            return series.need
        if not self._connected_once:
            return None
        if self.clock_hint is None:
            series.blind = True
            return None
        interval = channel.interval
        return max(0, (self.clock_hint - RESUME_SLACK_MS - interval) // interval * interval)

    def connecting(self) -> None:
        """A new connection is being made (call before :meth:`subscriptions`)."""
        for series in self.series.values():
            series.backfill_from = None

    def connected(self) -> None:
        """The subscriptions of :meth:`subscriptions` were sent on a connection."""
        self._connected_once = True

    # --- what arrives --------------------------------------------------------------------

    def _series_of(self, symbol: str, interval: int) -> list[_Series]:
        found = []
        exact = self.series.get(Channel(interval, symbol))
        if exact is not None:
            found.append(exact)
        every = self.series.get(Channel(interval, None))
        if every is not None:
            found.append(every)
        return found

    def bar(self, event: Mapping[str, Any]) -> BarDecision:
        """What to do with one ``MB`` event."""
        try:
            symbol = event["sym"]
            interval = int(event["interval"])
            start = int(event["s"])
        except (KeyError, TypeError, ValueError):
            return BarDecision(Verdict.DROP)
        found = self._series_of(symbol, interval)
        if not found:
            self.dropped += 1
            return BarDecision(Verdict.DROP)  # a channel this stream did not ask for
        revision = event.get("r")
        is_revision = isinstance(revision, int) and revision > 0
        gaps: list[Gap] = []
        fresh = False
        for series in found:
            if series.backfill_from is not None:
                begin, series.backfill_from = series.backfill_from, None
                if start > begin:
                    return BarDecision(Verdict.BACKFILL, series.channel, begin, start)
            last = series.last.get(symbol)
            if (last is not None and start <= last) or (
                series.need is not None and start < series.need
            ):
                continue
            fresh = True
            if series.resumed_at is not None or series.blind:
                reason = "a * channel resumes live after a reconnect (no since on * channels)"
                if series.channel.symbol is not None:
                    reason = "no bar had arrived before the reconnect to resume from"
                gaps.append(Gap(series.channel.name, series.resumed_at, start, reason))
                series.resumed_at = None
                series.blind = False
        if not fresh:
            if is_revision:
                return BarDecision(Verdict.HAND_ON)
            self.dropped += 1
            return BarDecision(Verdict.DROP)
        for series in found:
            self._handed_on(series, symbol, start)
        end = event.get("e")
        if isinstance(end, int) and (self.clock_hint is None or end > self.clock_hint):
            self.clock_hint = end
        return BarDecision(Verdict.HAND_ON, gaps=tuple(gaps))

    def _handed_on(self, series: _Series, symbol: str, start: int) -> None:
        if start > series.last.get(symbol, start - 1):
            series.last[symbol] = start
        if series.channel.symbol is not None:
            series.need = max(series.need or 0, start + series.channel.interval)

    def backfilled(self, channel: Channel, events: Iterable[Mapping[str, Any]]) -> list[Any]:
        """The bars fetched for a BACKFILL that are to be handed on, oldest first."""
        series = self.series[channel]
        out = []
        for event in sorted(events, key=lambda e: int(e["s"])):
            start = int(event["s"])
            if series.need is not None and start < series.need:
                continue
            out.append(event)
            self._handed_on(series, channel.symbol or str(event["sym"]), start)
        return out

    def status(self, event: Mapping[str, Any]) -> StatusAction:
        """What one status event means for the stream."""
        kind = event.get("status")
        if kind == "auth_failed":
            return StatusAction.FATAL
        if kind == "auth_success":
            return StatusAction.AUTHENTICATED
        if kind != "error":
            return StatusAction.NOTED
        message = str(event.get("message", ""))
        name, colon, _ = message.partition(":")
        series = next((s for s in self.series.values() if s.channel.name == name), None)
        if not colon or series is None:
            return StatusAction.NOTED  # not about one of this stream's channels
        if _SINCE_PAST.search(message) and series.channel.symbol is not None:
            series.backfill_from = series.need
            return StatusAction.NOTED
        return StatusAction.RECONNECT


def channels_from(value: str | Iterable[str]) -> list[Channel]:
    """``"500Ms.TSLA,1000Ms.AAPL"`` or ``["500Ms.TSLA", ...]`` as channels, in order, once each
    (raises ValueError naming a malformed one)."""
    texts = value.split(",") if isinstance(value, str) else list(value)
    out: list[Channel] = []
    for text in texts:
        text = text.strip()
        if text:
            channel = parse_channel(text)
            if channel not in out:
                out.append(channel)
    return out
