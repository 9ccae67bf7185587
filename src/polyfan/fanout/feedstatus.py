"""Which clients' feeds are down: the bridge's ``feed_down`` / ``feed_up`` decisions (pure).

Inputs are what the bridge learns of each aggregator: an outage it reports (OUTAGE messages and
its announce, :mod:`polyfan.bars.outages`), that it is no longer heard (killed, partitioned) or came
back under a new session (restarted: its history went with it). Outputs are the statuses to send
(CONTRACT.md §12). A channel's feed is down when every aggregator serving it is down, so a
replica that carries on keeps its clients' feed up; a client's feed is down while any of its
channels' is. A client hears ``feed_down`` once when its feed goes down, with the start of the
window on the feed clock (``s``), and ``feed_up`` once when it is back, with the window's bounds
(``s``, ``e``); a client that subscribes while the feed is down hears ``feed_down`` at once.

No sockets, no clocks: the bridge passes feed-clock values in and sends what comes out.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from polyfan.fanout.protocol import Channel

A = TypeVar("A", bound=Hashable)  # an aggregator
C = TypeVar("C", bound=Hashable)  # a client

OUTAGE = "outage"  # the agg reports an outage of the feed behind it
SILENT = "silent"  # the agg is not heard


@dataclass(slots=True)
class _Down:
    s: int
    why: str


@dataclass(slots=True)
class _ClientDown:
    s: int
    why: str


@dataclass
class FeedStatus(Generic[A, C]):
    """The down state of each aggregator, and of each client's feed as last told."""

    _aggs: dict[A, dict[str, _Down]] = field(default_factory=dict)
    _back: dict[A, tuple[int, str]] = field(default_factory=dict)  # last recovery: e, why
    _clients: dict[C, _ClientDown] = field(default_factory=dict)

    def agg_down(self, agg: A, reason: str, s: int, why: str) -> bool:
        """``agg`` is down for ``reason`` (OUTAGE or SILENT) since feed clock ``s``; True if
        that is news."""
        reasons = self._aggs.setdefault(agg, {})
        if reason in reasons:
            return False
        reasons[reason] = _Down(s, why)
        return True

    def agg_up(self, agg: A, reason: str, e: int, why: str) -> bool:
        """``agg`` is no longer down for ``reason``, from feed clock ``e``; True if it was."""
        reasons = self._aggs.get(agg)
        if not reasons or reasons.pop(reason, None) is None:
            return False
        if not reasons:
            del self._aggs[agg]
        self._back[agg] = (e, why)
        return True

    def is_down(self, agg: A) -> bool:
        return bool(self._aggs.get(agg))

    def down_since(self, agg: A) -> int | None:
        reasons = self._aggs.get(agg)
        return min(down.s for down in reasons.values()) if reasons else None

    def forget_client(self, client: C) -> None:
        self._clients.pop(client, None)

    def statuses(
        self,
        clients: Iterable[tuple[C, Collection[Channel]]],
        serving: Callable[[Channel], Collection[A]],
        symbols: Callable[[A], frozenset[str] | None] | None = None,
    ) -> list[tuple[C, dict[str, Any]]]:
        """The statuses each client must get now: ``(client, status event)``. ``symbols``
        says which symbols each agg serves (None: all), for ``<N>Ms.*`` channels served by
        shards: such a channel is down when a down agg serves symbols no agg still up does."""
        out: list[tuple[C, dict[str, Any]]] = []
        for client, channels in clients:
            down = self._channel_down(channels, serving, symbols)
            told = self._clients.get(client)
            if down is not None and told is None:
                s, why, names = down
                self._clients[client] = _ClientDown(s, why)
                out.append((client, feed_down(s, why, names)))
            elif down is None and told is not None:
                del self._clients[client]
                e, why = self._recovery(channels, serving, told.s)
                out.append((client, feed_up(told.s, e, why)))
        return out

    def _channel_down(
        self,
        channels: Collection[Channel],
        serving: Callable[[Channel], Collection[A]],
        symbols: Callable[[A], frozenset[str] | None] | None,
    ) -> tuple[int, str, list[str]] | None:
        """``(s, why, channel names)`` for the client's channels that are down."""
        found: list[tuple[int, str, str]] = []
        for channel in channels:
            aggs = serving(channel)
            down_aggs = [agg for agg in aggs if self._aggs.get(agg)]
            if not down_aggs:
                continue
            if len(down_aggs) < len(aggs) and not (
                channel.symbol is None
                and symbols is not None
                and _uncovered(down_aggs, [a for a in aggs if a not in down_aggs], symbols)
            ):
                continue  # a replica still up carries it
            downs = [down for agg in down_aggs for down in self._aggs[agg].values()]
            first = min(downs, key=lambda down: down.s)
            found.append((first.s, first.why, channel.name))
        if not found:
            return None
        s, why, _ = min(found)
        return s, why, sorted(name for _, _, name in found)

    def _recovery(
        self, channels: Collection[Channel], serving: Callable[[Channel], Collection[A]], s: int
    ) -> tuple[int, str]:
        backs = [
            self._back[agg] for channel in channels for agg in serving(channel) if agg in self._back
        ]
        if not backs:
            return s, "the feed is back"
        return max(backs)


def _uncovered(down: list[A], up: list[A], symbols: Callable[[A], frozenset[str] | None]) -> bool:
    """Whether an agg that is down serves symbols no agg that is up serves."""
    up_symbols = [symbols(agg) for agg in up]
    if any(served is None for served in up_symbols):
        return False  # an agg still up serves every symbol
    covered = frozenset().union(*(served for served in up_symbols if served is not None))
    for agg in down:
        served = symbols(agg)
        if served is None or not served <= covered:
            return True
    return False


def feed_down(s: int, why: str, channels: list[str]) -> dict[str, Any]:
    shown = ", ".join(channels[:5]) + (
        f" and {len(channels) - 5} more" if len(channels) > 5 else ""
    )
    return {
        "ev": "status",
        "status": "feed_down",
        "message": f"{why}: trades may be missing from {s} on; bars of {shown} from then carry "
        "outage: true",
        "s": s,
    }


def feed_up(s: int, e: int, why: str) -> dict[str, Any]:
    return {
        "ev": "status",
        "status": "feed_up",
        "message": f"{why}: bars from {s} to {e} carry outage: true where trades may be missing",
        "s": s,
        "e": max(e, s),
    }
