"""Which new client connections the bridge takes: counts in, decisions out.

Pure: no asyncio, websockets or sockets. The bridge's shell (:mod:`polyfan.web.gate`) asks
:meth:`Admission.admit` for every TCP connection it accepts, before reading a byte, and carries
out the answer: take it, take it after closing one named address's oldest handshake, or close
it at once. It tells :class:`Admission` when a handshake is over (upgraded, or the HTTP request
answered) and when a connection closes. Every count is per process: with ``--workers N`` each
worker admits on its own (docs/limits.md).

A connection is *in the handshake* from its accept until its WebSocket upgrade or HTTP answer.
Bounds, checked in this order (0 turns a per-address bound off, e.g. behind a reverse proxy
where every client has the proxy's address):

- handshakes from one address (``Limits.max_handshakes_per_address``): refused;
- connections from one address, in the handshake or open (``max_connections_per_address``):
  refused;
- open files: connections past the file budget (``RLIMIT_NOFILE`` less a headroom and the
  files open before serving), or handshakes past ``max_handshakes``. Then the newcomer takes
  the place of the oldest handshake of the address holding the most handshakes, if that
  address holds more than the newcomer's would (fair shares: an address flooding the handshake
  pool gives way to one that holds little of it); otherwise the newcomer is refused.

:class:`RefusalLog` turns refusals into one WARNING line per few seconds, with counts.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Refusal(enum.Enum):
    """Why a new connection was closed at once; the value names its counter."""

    ADDRESS_HANDSHAKES = "address_handshakes"
    ADDRESS_CONNECTIONS = "address_connections"
    FILES = "files"
    HANDSHAKES = "handshakes"


@dataclass(frozen=True, slots=True)
class Admit:
    """Take the connection; first close the oldest handshake from ``evict``, if given (it is
    already counted out)."""

    evict: str | None = None


class Admission:
    """Counts of connections and handshakes, in total and per client address."""

    def __init__(
        self,
        *,
        max_connections: int,
        max_handshakes: int,
        max_handshakes_per_address: int = 0,
        max_connections_per_address: int = 0,
    ) -> None:
        if max_connections < 1 or max_handshakes < 1:
            raise ValueError("max_connections and max_handshakes must be at least 1")
        self.max_connections = max_connections
        self.max_handshakes = max_handshakes
        self.max_handshakes_per_address = max_handshakes_per_address
        self.max_connections_per_address = max_connections_per_address
        self.connections = 0  # admitted and not closed, handshakes included
        self.handshakes = 0
        self._connections: dict[str, int] = {}
        self._handshakes: dict[str, int] = {}

    def admit(self, address: str) -> Admit | Refusal:
        """Decide on a new connection from ``address``; an :class:`Admit` is counted in."""
        handshakes = self._handshakes.get(address, 0)
        cap = self.max_handshakes_per_address
        if cap and handshakes >= cap:
            return Refusal.ADDRESS_HANDSHAKES
        cap = self.max_connections_per_address
        if cap and self._connections.get(address, 0) >= cap:
            return Refusal.ADDRESS_CONNECTIONS
        full = None
        if self.connections >= self.max_connections:
            full = Refusal.FILES
        elif self.handshakes >= self.max_handshakes:
            full = Refusal.HANDSHAKES
        evict = None
        if full is not None:
            heaviest = self.heaviest()
            if heaviest is None or self._handshakes[heaviest] <= handshakes + 1:
                return full
            self.closed(heaviest, in_handshake=True)
            evict = heaviest
        self.connections += 1
        self.handshakes += 1
        self._connections[address] = self._connections.get(address, 0) + 1
        self._handshakes[address] = handshakes + 1
        return Admit(evict)

    def handshake_over(self, address: str) -> None:
        """The connection from ``address`` was upgraded or its HTTP request answered."""
        self.handshakes -= 1
        _decrement(self._handshakes, address)

    def closed(self, address: str, *, in_handshake: bool) -> None:
        """The connection from ``address`` closed (``in_handshake``: before its handshake was
        over)."""
        if in_handshake:
            self.handshake_over(address)
        self.connections -= 1
        _decrement(self._connections, address)

    def heaviest(self) -> str | None:
        """The address with the most handshakes in progress (None if there are none)."""
        if not self._handshakes:
            return None
        return max(self._handshakes, key=self._handshakes.__getitem__)

    def handshakes_from(self, address: str) -> int:
        return self._handshakes.get(address, 0)

    def connections_from(self, address: str) -> int:
        return self._connections.get(address, 0)


def _decrement(counts: dict[str, int], address: str) -> None:
    left = counts[address] - 1
    if left:
        counts[address] = left
    else:
        del counts[address]


class RefusalLog:
    """One log line per ``every`` seconds at most about refused and evicted connections.

    :meth:`refused` returns a line to log now (the first refusal after a quiet spell is logged
    at once), or None while the counts are held for the next line; :meth:`due` says when the
    held counts should be logged if nothing else is refused, and :meth:`flush` returns them.
    """

    def __init__(self, every: float) -> None:
        self.every = every
        self._counts: dict[str, int] = {}
        self._last_address = ""
        self._last_line = -float("inf")
        self._since = 0.0

    def refused(self, reason: str, address: str, now: float) -> str | None:
        if not self._counts:
            self._since = now
        self._counts[reason] = self._counts.get(reason, 0) + 1
        self._last_address = address
        if now - self._last_line < self.every:
            return None
        return self.flush(now)

    def due(self) -> float | None:
        """When the held counts are to be logged (None: nothing held)."""
        return self._last_line + self.every if self._counts else None

    def flush(self, now: float) -> str | None:
        if not self._counts:
            return None
        total = sum(self._counts.values())
        reasons = ", ".join(f"{reason}: {n}" for reason, n in sorted(self._counts.items()))
        seconds = max(now - self._since, 0.0)
        line = (
            f"refused or evicted {total} connection(s) in {seconds:.1f} s ({reasons}); "
            f"the last from {self._last_address}"
        )
        self._counts.clear()
        self._last_line = now
        return line


class AuthThrottle:
    """Failed token checks per client address (CONTRACT §8), as a token bucket: an address
    may fail ``failures`` times, then once more every ``refill`` seconds. While it has no
    failure left, its attempts are refused without checking the token, the right one too:
    guessing a token takes checks, and a guesser gets one every ``refill`` seconds.

    Memory is bounded: an address whose bucket has refilled is forgotten, and past
    ``max_addresses`` the oldest is forgotten first (a wider guesser costs itself refills).
    """

    def __init__(self, failures: int, refill: float, max_addresses: int = 65_536) -> None:
        self.failures = failures
        self.refill = refill
        self.max_addresses = max_addresses
        self._buckets: dict[str, tuple[float, float]] = {}  # address -> (left, at), oldest first

    def _left(self, address: str, now: float) -> float:
        bucket = self._buckets.get(address)
        if bucket is None:
            return float(self.failures)
        left, at = bucket
        return min(float(self.failures), left + (now - at) / self.refill)

    def retry_in(self, address: str, now: float) -> float:
        """0 when ``address`` may try a token now, else the seconds until it may."""
        if self.failures <= 0:
            return 0.0
        left = self._left(address, now)
        return 0.0 if left >= 1.0 else (1.0 - left) * self.refill

    def failed(self, address: str, now: float) -> None:
        """``address`` offered a wrong token (or none where one is needed)."""
        if self.failures <= 0:
            return
        left = max(self._left(address, now) - 1.0, 0.0)
        self._buckets.pop(address, None)
        self._buckets[address] = (left, now)
        if len(self._buckets) > self.max_addresses:
            self._prune(now)

    def _prune(self, now: float) -> None:
        for address in [a for a in self._buckets if self._left(a, now) >= self.failures]:
            del self._buckets[address]
        while len(self._buckets) > self.max_addresses:
            del self._buckets[next(iter(self._buckets))]

    def __len__(self) -> int:
        return len(self._buckets)
