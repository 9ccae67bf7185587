"""The bridge's fan-out core: who gets which bar, the ``since`` seam, and per-client backlogs.

Pure: no asyncio, websockets or zmq; a client is any hashable value (the shell's connection
object, or an integer in the tests).

- :class:`Fanout` keeps the subscription table (channel → clients, client → channels) and
  groups clients by their exact set of channels. Its answers tell the shell when a channel
  gained its first client (subscribe the ZeroMQ topic) or lost its last (unsubscribe it).
  :meth:`Fanout.deliveries` takes one pass's encoded bars and returns ``(bars, clients)``
  pairs: each client in at most one pair, so it gets one frame per pass, and the frame of a
  group of clients with the same channels is built once, not once per client.
- A client that subscribes with ``since`` gets a :class:`Seam` (:meth:`Fanout.hold`): its
  live bars on that channel are held (:meth:`Fanout.deliveries` leaves them out) until the
  history reply arrives; :meth:`Fanout.complete_history` returns history then the held live
  bars, dropping any live bar whose start ``s`` the history already covered. The topic is
  subscribed before history is requested, so the two overlap and nothing is missing at the
  seam. Live bars and the history reply come over different sockets, so a bar the agg
  published before it answered may still be on its way when the reply is handled: the seam
  stays open, trailing, and drops live bars the history covered until the first newer one
  passes, so nothing is repeated either.
- :class:`Backlog` is one client's bounded queue of unsent frames; :meth:`Backlog.push` says no
  when the bound would be passed, and the shell then closes the client with 1013.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Sequence
from typing import Generic, TypeVar

from polyfan.fanout.protocol import Channel, join_events

Arrival = tuple[int, str, Sequence[tuple[int, bytes]]]  # interval, symbol, [(s, encoded bar)]
C = TypeVar("C", bound=Hashable)


def _in_order(channel: Channel) -> tuple[int, str]:
    """Channels by interval, then ``*`` before the symbols (``Channel``'s own order cannot
    compare a ``*`` channel, whose symbol is None, with another of the same interval)."""
    return channel.interval, "" if channel.symbol is None else channel.symbol


class Fanout(Generic[C]):
    """Subscription table and ``since`` seams for every client of one bridge."""

    def __init__(self) -> None:
        self._clients: dict[Channel, set[C]] = {}
        self._channels: dict[C, set[Channel]] = {}
        self._pending: dict[Channel, dict[C, Seam]] = {}
        self._groups: dict[frozenset[Channel], set[C]] = {}
        self._group_of: dict[C, frozenset[Channel]] = {}

    def _regroup(self, client: C) -> None:
        """Move ``client`` to the group of its current channel set."""
        old = self._group_of.pop(client, None)
        if old is not None:
            members = self._groups[old]
            members.discard(client)
            if not members:
                del self._groups[old]
        channels = self._channels.get(client)
        if channels:
            key = frozenset(channels)
            self._group_of[client] = key
            self._groups.setdefault(key, set()).add(client)

    def subscribe(self, client: C, channel: Channel) -> bool:
        """Add ``client`` to ``channel``; True if it is the channel's first client."""
        clients = self._clients.setdefault(channel, set())
        first = not clients
        if client not in clients:
            clients.add(client)
            self._channels.setdefault(client, set()).add(channel)
            self._regroup(client)
        return first

    def hold(self, client: C, channel: Channel) -> Seam:
        """Start a ``since`` request: hold the client's live bars on the channel until
        :meth:`complete_history` is called with the returned seam."""
        seam = self._pending.setdefault(channel, {}).setdefault(client, Seam())
        seam.requests += 1
        return seam

    def unsubscribe(self, client: C, channel: Channel) -> bool:
        """Remove ``client`` from ``channel``; True if it was the channel's last client."""
        self._drop_pending(client, channel)
        channels = self._channels.get(client)
        if channels is not None:
            channels.discard(channel)
        clients = self._clients.get(channel)
        if clients is None or client not in clients:
            return False
        clients.discard(client)
        self._regroup(client)
        if clients:
            return False
        del self._clients[channel]
        return True

    def remove_client(self, client: C) -> list[Channel]:
        """Forget a client; return the channels it was the last client of."""
        emptied = [
            channel
            for channel in sorted(self._channels.get(client, ()), key=_in_order)
            if self.unsubscribe(client, channel)
        ]
        self._channels.pop(client, None)
        return emptied

    def has_subscribers(self, channel: Channel) -> bool:
        return channel in self._clients

    def channels(self) -> list[Channel]:
        """Every channel with at least one client."""
        return sorted(self._clients, key=_in_order)

    def channels_of(self, client: C) -> set[Channel]:
        return set(self._channels.get(client, ()))

    def is_pending(self, client: C, channel: Channel) -> bool:
        """True while a ``since`` request of ``client`` on ``channel`` awaits its history."""
        seam = self._pending.get(channel, {}).get(client)
        return seam is not None and seam.requests > 0

    def deliveries(self, arrivals: Sequence[Arrival]) -> list[tuple[list[bytes], Collection[C]]]:
        """One pass's bars, per topic in arrival order, as ``(bars, clients)`` pairs.

        The client collections may be the table's own sets: use them before the table changes.

        A client on both ``500Ms.TSLA`` and ``500Ms.*`` gets each bar once; a client pending
        on a channel (``since``) has that channel's bars held for it instead.
        """
        exact = [Channel(interval, symbol) for interval, symbol, _ in arrivals]
        every = [Channel(interval, None) for interval, _, _ in arrivals]
        touched = {c for c in (*exact, *every) if c in self._clients}
        if not touched:
            return []
        pending = {c: self._pending[c] for c in exact if c in self._pending}
        waiting = {client for held in pending.values() for client in held}
        out: list[tuple[list[bytes], Collection[C]]] = []
        for key, members in self._groups.items():
            if key.isdisjoint(touched):
                continue
            wanted = [i for i in range(len(arrivals)) if exact[i] in key or every[i] in key]
            parts = [part for i in wanted for _, part in arrivals[i][2]]
            special = members & waiting if waiting else None
            if not special:
                out.append((parts, members))
                continue
            out.append((parts, members - special))
            for client in special:
                mine: list[bytes] = []
                for i in wanted:
                    seams = pending.get(exact[i])
                    seam = None if seams is None else seams.get(client)
                    if seam is None:
                        mine.extend(part for _, part in arrivals[i][2])
                    elif seam.requests > 0:
                        seam.held.extend(arrivals[i][2])
                    else:
                        mine.extend(self._trail(client, exact[i], seam, arrivals[i][2]))
                if mine:
                    out.append((mine, (client,)))
        return out

    def _trail(
        self, client: C, channel: Channel, seam: Seam, bars: Sequence[tuple[int, bytes]]
    ) -> list[bytes]:
        """A trailing seam's live bars: those its history did not cover. The first newer bar
        closes the seam (a channel's bars arrive in ``s`` order)."""
        floor = seam.floor
        fresh = [part for s, part in bars if floor is None or s > floor]
        if fresh:
            self._drop_pending(client, channel)
        return fresh

    def complete_history(
        self, client: C, channel: Channel, seam: Seam, history: Sequence[tuple[int, bytes]]
    ) -> list[bytes]:
        """End one ``since`` request: its history bars, then the held live bars it did not cover.

        Returns nothing if the seam was cancelled meanwhile (the client unsubscribed or left;
        a later subscription is a new seam). With several ``since`` requests outstanding on a
        channel, each gets its history, and live bars stay held until the last one is done.
        """
        if self._pending.get(channel, {}).get(client) is not seam:
            return []
        seam.requests -= 1
        parts = [part for _, part in history]
        if history and (seam.floor is None or history[-1][0] > seam.floor):
            seam.floor = history[-1][0]
        floor = seam.floor
        fresh = [(s, part) for s, part in seam.held if floor is None or s > floor]
        if seam.requests > 0:  # keep holding for the other request; drop what this covered
            seam.held = fresh
            return parts
        seam.held = []
        if fresh or floor is None:
            self._drop_pending(client, channel)  # live bars have passed the history
        parts.extend(part for _, part in fresh)
        return parts

    def _drop_pending(self, client: C, channel: Channel) -> None:
        pending = self._pending.get(channel)
        if pending is None:
            return
        pending.pop(client, None)
        if not pending:
            del self._pending[channel]


class Seam:
    """One client's ``since`` seam on one channel: outstanding requests, held live bars, and
    the newest start ``floor`` its history has sent (trailing: no request left, live bars up
    to ``floor`` are repeats)."""

    __slots__ = ("floor", "held", "requests")

    def __init__(self) -> None:
        self.requests = 0
        self.held: list[tuple[int, bytes]] = []
        self.floor: int | None = None


def chunked(parts: Sequence[bytes], size: int) -> list[tuple[bytes, int]]:
    """Frames of at most ``size`` events each, with how many each holds (history is sent
    in several frames)."""
    return [
        (join_events(parts[i : i + size]), len(parts[i : i + size]))
        for i in range(0, len(parts), size)
    ]


class Backlog:
    """One client's unsent frames, bounded in bytes, with how many bars each carries.

    ``push`` refuses a frame that would take the backlog past ``limit_bytes`` (the shell then
    closes the client with 1013: nothing is dropped silently); ``oldest`` says when the oldest
    frame still queued was queued (the shell's bound on time behind). ``pop`` merges queued frames
    into one JSON array of at most ``merge_bytes`` (a bigger frame goes alone), so a client
    that fell behind catches up in fewer, larger writes.
    """

    def __init__(self, limit_bytes: int, merge_bytes: int = 256 * 1024) -> None:
        self.limit_bytes = limit_bytes
        self.merge_bytes = merge_bytes
        self._frames: deque[tuple[bytes, int, float]] = deque()
        self.bytes = 0
        self.bars = 0

    def __len__(self) -> int:
        return len(self._frames)

    def push(self, frame: bytes, bars: int = 0, at: float = 0.0) -> bool:
        """Queue a frame carrying ``bars`` bars, queued at time ``at``; False (and nothing
        queued) past the bound."""
        if self.bytes + len(frame) > self.limit_bytes:
            return False
        self._frames.append((frame, bars, at))
        self.bytes += len(frame)
        self.bars += bars
        return True

    def pop(self) -> tuple[bytes, int] | None:
        """The next frame to send (several merged) and its bar count, or None when empty."""
        if not self._frames:
            return None
        first, bars, _ = self._frames.popleft()
        size = len(first)
        if self._frames and size + len(self._frames[0][0]) <= self.merge_bytes:
            inner = [first[1:-1]]
            while self._frames and size + len(self._frames[0][0]) <= self.merge_bytes:
                frame, count, _ = self._frames.popleft()
                size += len(frame)
                bars += count
                inner.append(frame[1:-1])
            first = b"[" + b",".join(part for part in inner if part) + b"]"
        self.bytes -= size
        self.bars -= bars
        return first, bars

    def oldest(self) -> float | None:
        """When the oldest frame still queued was queued (None: nothing is)."""
        return self._frames[0][2] if self._frames else None

    def clear(self) -> int:
        """Drop everything queued; return how many bars were dropped."""
        dropped = self.bars
        self._frames.clear()
        self.bytes = 0
        self.bars = 0
        return dropped
