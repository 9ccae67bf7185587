"""The reconnect schedule: capped exponential backoff with jitter, reset after a healthy period.

Pure: the caller passes the time (any monotonic seconds) and may pass its own random source.
Delay ``n`` (from 0) is drawn uniformly from ``[d/2, d]`` with ``d = min(cap, initial * 2**n)``
("equal jitter"): never zero, so a crowd of clients never reconnects in lockstep, and never
above the cap. The attempt count resets only once a connection has stayed up for
``healthy_after`` seconds, so a server that accepts and then drops at once still backs off.
"""

from __future__ import annotations

import random

MAX_CONNECTIONS_COOL_DOWN = 60.0  # seconds; protocol.md: at least a minute


class Backoff:
    def __init__(
        self,
        *,
        initial: float = 0.5,
        cap: float = 30.0,
        healthy_after: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        if not 0 < initial <= cap:
            raise ValueError("backoff: need 0 < initial <= cap")
        self.initial = initial
        self.cap = cap
        self.healthy_after = healthy_after
        self.attempts = 0
        self._rng = rng if rng is not None else random.Random()
        self._connected_at: float | None = None

    def connected(self, now: float) -> None:
        """A connection is up (count its healthy period from ``now``)."""
        self._connected_at = now

    def disconnected(self, now: float) -> None:
        """The connection is gone; reset the schedule if it had been healthy."""
        if self._connected_at is not None and now - self._connected_at >= self.healthy_after:
            self.attempts = 0
        self._connected_at = None

    def next_delay(self) -> float:
        """Seconds to wait before the next connection attempt."""
        ceiling = min(self.cap, self.initial * 2.0 ** min(self.attempts, 64))
        self.attempts += 1
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def cool_down(self) -> float:
        """The delay after ``max_connections``: at least a minute, and the schedule still grows."""
        return max(MAX_CONNECTIONS_COOL_DOWN, self.next_delay())
