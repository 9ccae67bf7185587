"""When ``polyfan replay`` sends each trade: SIP time over ``--speed``, from an anchor.

Pure: the caller passes the wall time (any monotonic seconds) and the trades' SIP timestamps
(ns, sorted). A :class:`Pacer` anchors the first trade it sends at the wall time it is started
(or resumed) and makes every later trade due ``(sip - anchor_sip) / speed`` after it; with no
speed (``--speed max``) every trade is due at once, and the client's reading is the only pace.
Pausing (no client subscribed) and resuming re-anchors, so a pause never turns into a burst.
"""

from __future__ import annotations

import math

import numpy as np

NS_PER_S = 1_000_000_000


class Pacer:
    """Which trades are due by a given wall time."""

    def __init__(self, speed: float | None) -> None:
        if speed is not None and not 0 < speed < math.inf:
            raise ValueError("pacer: speed must be above 0 (None: as fast as possible)")
        self.speed = speed
        self._anchor_sip: int | None = None
        self._anchor_wall = 0.0

    def start(self, next_sip_ns: int, now: float) -> None:
        """(Re)anchor: the trade at ``next_sip_ns`` is due at ``now``."""
        self._anchor_sip = next_sip_ns
        self._anchor_wall = now

    def is_started(self) -> bool:
        return self._anchor_sip is not None

    def pause(self) -> None:
        self._anchor_sip = None

    def due_until(self, now: float) -> float:
        """Every trade with ``sip_ns <=`` this is due at ``now`` (infinite at max speed)."""
        if self.speed is None:
            return math.inf
        if self._anchor_sip is None:
            raise ValueError("pacer: not started")
        return self._anchor_sip + (now - self._anchor_wall) * self.speed * NS_PER_S

    def due_at(self, sip_ns: int) -> float:
        """The wall time a trade at ``sip_ns`` is due (now or earlier at max speed)."""
        if self.speed is None:
            return -math.inf
        if self._anchor_sip is None:
            raise ValueError("pacer: not started")
        return self._anchor_wall + (sip_ns - self._anchor_sip) / (self.speed * NS_PER_S)

    def due_count(self, sip_ns: np.ndarray, start: int, now: float) -> int:
        """How many trades from ``start`` of the sorted ``sip_ns`` are due at ``now``."""
        limit = self.due_until(now)
        if limit == math.inf:
            return len(sip_ns) - start
        end = int(np.searchsorted(sip_ns, math.floor(limit), side="right"))
        return max(0, end - start)


def frames_of(count: int, per_frame: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive frames of at most ``per_frame`` events over ``count``."""
    return [(i, min(i + per_frame, count)) for i in range(0, count, per_frame)]
