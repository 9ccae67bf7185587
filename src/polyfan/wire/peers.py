"""The agg's ZeroMQ peers: what one peer may hold, decided without sockets.

Everything that connects to the agg's XPUB is a *peer*: a bridge, a ``tap``, or anyone who can
reach the endpoint. ZeroMQ keeps every subscription a peer sends (in its own trie, even for
topics nobody publishes, about 0.8 KiB each) until the peer disconnects, and queues what the agg
publishes for it up to the send high-water mark whether it reads or not. The shell
(:mod:`polyfan.agg`) tells this table who connected and left (the XPUB's monitor, by file
descriptor), what each peer subscribed (``ZMQ_SRCFD`` of each upstream message) and how much of
its reply bytes still wait in the kernel; the table says what to do:

- a subscription that would read other peers' replies (a prefix of ``_rep.`` shorter than a
  whole route, the empty prefix included) gets the peer **disconnected** at once;
- a subscription to nothing the agg publishes is counted as refused (ZeroMQ has applied it
  already, and it costs the peer's allowance);
- past ``max_subscriptions`` per peer, or when all peers together pass ``max_total`` (then the
  peer holding most goes), the peer is disconnected; so is a peer past ``max_peers``;
- a peer disconnected for its subscriptions has its address **banned** for ``Bans.seconds``
  (:class:`Bans`): the agg's ZAP handler refuses its handshakes, so its socket's reconnect
  cannot replay the flood (ZeroMQ takes a peer's subscriptions in faster than any loop can
  judge them; only a refused handshake stores none);
- a reply is sent only while the peer's reply bytes in flight (sent since its socket's queue was
  last seen short) stay under ``reply_bytes_in_flight``; otherwise it is refused.

docs/limits.md lists the bounds and the memory arithmetic behind them.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from polyfan.symbols import MAX_SYMBOL_LENGTH, SYMBOL_CHARS
from polyfan.wire import codec

# Routes from 16 hex digits on are accepted, so bridges from before 128-bit routes keep
# working; polyfan's bridge makes 32 (codec.REPLY_ROUTE_HEX).
_ROUTE = re.compile(rb"_rep\.([0-9a-f]{16,64})\x00")
_SYMBOL_PREFIX = re.compile(b"[%s]{0,%d}\x00?" % (SYMBOL_CHARS.encode(), MAX_SYMBOL_LENGTH))
_REPLY_PREFIX = codec.REPLY_PREFIX.encode()
_CONTROL = codec.CONTROL_TOPIC


@dataclass(frozen=True, slots=True)
class PeerLimits:
    max_peers: int = 64  # connections at once
    # per peer (agg --peer-subscriptions): a bridge subscribes one topic per channel its
    # clients hold; one whose clients hold more distinct channels needs it raised
    max_subscriptions: int = 20_000
    max_total: int = 200_000  # all peers together
    reply_bytes_in_flight: int = 4 << 20  # per peer
    drained_below: int = 64 << 10  # socket queue under this: the peer reads, in flight is 0


class Verdict(enum.Enum):
    ACCEPTED = "accepted"
    REFUSED = "refused"  # counted, the peer stays
    DISCONNECT = "disconnect"


def subscription_problem(topic: bytes, intervals: Iterable[int]) -> tuple[Verdict, str]:
    """Whether the agg accepts a subscription to ``topic`` (a prefix, as ZeroMQ sends it).

    Accepted: the control topic and its prefixes from ``_c`` on, a whole reply route
    (``_rep.`` + 32 hex digits + NUL), and bar topics and their prefixes for the intervals the
    agg serves (``1``, ``100Ms.``, ``100Ms.AA``, ``100Ms.AAPL\\0``). A prefix of ``_rep.``
    shorter than a route (``""``, ``"_"``, ``"_rep."``, ``"_rep.9f"`` ...) or a malformed
    route would receive other peers' replies: DISCONNECT. Anything else matches nothing the
    agg publishes: REFUSED.
    """
    if _REPLY_PREFIX.startswith(topic) or topic.startswith(_REPLY_PREFIX):
        if _ROUTE.fullmatch(topic):
            return Verdict.ACCEPTED, ""
        return Verdict.DISCONNECT, "reads other peers' replies"
    if len(topic) >= 2 and _CONTROL.startswith(topic):
        return Verdict.ACCEPTED, ""
    for interval in intervals:
        head = b"%dMs." % interval
        if head.startswith(topic):
            return Verdict.ACCEPTED, ""
        if topic.startswith(head) and _SYMBOL_PREFIX.fullmatch(topic, len(head)):
            return Verdict.ACCEPTED, ""
    return Verdict.REFUSED, "matches nothing this agg publishes"


@dataclass(slots=True)
class Peer:
    subscriptions: int = 0  # subscribe messages minus unsubscribe messages
    reply_bytes: int = 0  # reply bytes sent since its socket's queue was last seen short
    leaving: bool = False  # disconnected by the agg; its messages are ignored
    routes: set[str] = field(default_factory=set)  # reply routes it subscribed


@dataclass(frozen=True, slots=True)
class Decision:
    verdict: Verdict
    reason: str = ""
    disconnect: int | None = None  # the peer (fd) to disconnect, if any
    ban: bool = False  # and refuse its address for a while: it floods (see Bans)


@dataclass
class PeerTable:
    """Per-peer allowances, by the file descriptor ZeroMQ reports for the connection."""

    intervals: tuple[int, ...]
    limits: PeerLimits = field(default_factory=PeerLimits)
    peers: dict[int, Peer] = field(default_factory=dict)
    total: int = 0  # subscriptions held by all peers

    def connected(self, fd: int) -> bool:
        """A new connection; False when it is one too many (disconnect it)."""
        self.disconnected(fd)  # a reused descriptor starts over
        if sum(not p.leaving for p in self.peers.values()) >= self.limits.max_peers:
            self.peers[fd] = Peer(leaving=True)
            return False
        self.peers[fd] = Peer()
        return True

    def disconnected(self, fd: int) -> None:
        peer = self.peers.pop(fd, None)
        if peer is not None:
            self.total -= peer.subscriptions

    def _peer(self, fd: int) -> Peer:
        peer = self.peers.get(fd)
        if peer is None:  # its message came before the monitor's word of it
            peer = self.peers[fd] = Peer()
        return peer

    def is_known(self, fd: int) -> bool:
        """Whether ``fd`` is a connection the monitor said opened and has not said closed."""
        return fd in self.peers

    def is_leaving(self, fd: int) -> bool:
        peer = self.peers.get(fd)
        return peer is not None and peer.leaving

    def leave(self, fd: int) -> None:
        """The agg disconnects ``fd``: ignore it until the monitor says it is gone."""
        self._peer(fd).leaving = True

    def subscription(self, fd: int, topic: bytes, subscribe: bool) -> Decision:
        peer = self._peer(fd)
        if peer.leaving:
            return Decision(Verdict.REFUSED, "peer is being disconnected")
        route = _ROUTE.fullmatch(topic)
        if not subscribe:
            if peer.subscriptions > 0:
                peer.subscriptions -= 1
                self.total -= 1
            if route is not None:
                peer.routes.discard(route.group(1).decode())
            return Decision(Verdict.ACCEPTED)
        peer.subscriptions += 1  # ZeroMQ holds it, accepted or not
        self.total += 1
        verdict, reason = subscription_problem(topic, self.intervals)
        if verdict is Verdict.DISCONNECT:
            return Decision(verdict, reason, fd)
        limits = self.limits
        if peer.subscriptions > limits.max_subscriptions:
            return Decision(
                Verdict.DISCONNECT, f"over {limits.max_subscriptions} subscriptions", fd, ban=True
            )
        if self.total > limits.max_total:
            largest = max(
                (f for f, p in self.peers.items() if not p.leaving),
                key=lambda f: self.peers[f].subscriptions,
            )
            return Decision(  # not banned: the one holding most may be a busy bridge
                Verdict.DISCONNECT,
                f"all peers over {limits.max_total} subscriptions; it holds the most",
                largest,
            )
        if route is not None:
            peer.routes.add(route.group(1).decode())
        return Decision(verdict, reason)

    def holds_route(self, fd: int, route: str) -> bool:
        """Whether ``fd`` itself subscribed ``_rep.<route>``: a reply goes only to its asker."""
        peer = self.peers.get(fd)
        return peer is not None and route in peer.routes

    def may_reply(self, fd: int, size: int) -> bool:
        """Whether a reply of ``size`` bytes may go to ``fd`` now (and count it if so)."""
        peer = self._peer(fd)
        if peer.leaving:
            return False
        if peer.reply_bytes and peer.reply_bytes + size > self.limits.reply_bytes_in_flight:
            return False
        peer.reply_bytes += size
        return True

    def awaiting_replies(self) -> list[int]:
        """Peers with reply bytes in flight (the shell looks at their socket queues)."""
        return [fd for fd, peer in self.peers.items() if peer.reply_bytes]

    def queue_seen(self, fd: int, queued: int) -> None:
        """The kernel holds ``queued`` bytes for ``fd``: short means it reads."""
        peer = self.peers.get(fd)
        if peer is not None and queued < self.limits.drained_below:
            peer.reply_bytes = 0


@dataclass
class Bans:
    """Client addresses refused at the handshake for a while: those of peers disconnected for
    flooding subscriptions. An empty address (ipc: a local process) is never banned."""

    seconds: float = 60.0
    until: dict[str, float] = field(default_factory=dict)

    def ban(self, address: str, now: float) -> bool:
        """Refuse ``address`` until ``now + seconds``; True if it was not banned already."""
        if not address:
            return False
        fresh = not self.is_banned(address, now)
        for old in [a for a, until in self.until.items() if until <= now]:
            del self.until[old]
        self.until[address] = now + self.seconds
        return fresh

    def is_banned(self, address: str, now: float) -> bool:
        """(Read only: the ZAP handler asks from its own thread.)"""
        return self.until.get(address, now) > now
