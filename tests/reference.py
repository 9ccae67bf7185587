"""Reference bars, written straight from CONTRACT.md section 3 and shared/polygon/conditions.md.

Plain Python: sort the trades of each bar by (t, arrival order) and read the answer off. It
shares no code with polyfan (not even the condition table): the rules are re-stated below from
conditions.md, so a transcription error in either place shows up as a disagreement.

Input is the stream as the agg receives it: a list of events in arrival order, each
``Clock(value)`` (a CLOCK record: the feed clock, which the agg keeps monotonic),
``Trades(symbol, [Trade, ...])`` (one trade message) or ``Upstream(down, clock, wall)`` (an
UPSTREAM record). A trade is late for an interval when its bar's ``e + grace`` is at or below the
clock at its arrival; late trades are not applied and are counted once per interval. Bars close
once the clock reaches ``e + grace``. An outage runs from the clock of an UPSTREAM down to the
first clock, after the next UPSTREAM up, that is past its start (on to the end while none comes:
CONTRACT.md §12); a bar still open when one began (``e + grace`` past its start) or starting
inside it is flagged.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

# conditions.md, consolidated columns: code -> "HOV" letters it allows (H/L, O/C, Vol).
ALLOWS = {
    1: "HOV", 2: "V", 3: "HOV", 4: "HOV", 5: "HV", 6: "HOV", 7: "V", 8: "HOV", 9: "HOV",
    10: "HV", 11: "HOV", 12: "V", 13: "V", 14: "HOV", 15: "", 16: "", 17: "HOV", 18: "HOV",
    19: "HOV", 20: "V", 21: "V", 22: "HV", 23: "HOV", 24: "HOV", 25: "HOV", 27: "HOV",
    28: "HOV", 29: "V", 30: "HOV", 31: "HOV", 32: "HV", 33: "HV", 34: "HOV", 35: "HOV",
    36: "HOV", 37: "V", 38: "HO", 41: "HOV", 52: "V", 53: "V", 55: "HOV",
}  # fmt: skip
INDICATORS = {57, 58, 59, 60, 62, 63, 64, 65, 66, 67, 68, 69, 70, 71}


def allows(codes: tuple[int, ...], rule_set: str = "polygon") -> tuple[str, bool]:
    """The letters a trade qualifies for, and whether it carries an unknown code."""
    if rule_set == "all" or not codes:
        return "HOV", False
    qualifies = set("HOV")
    unknown = False
    for code in codes:
        if code == 0 or code in INDICATORS:
            continue  # regular / indicator: restricts nothing
        if code == 12:
            letters = "HOV"  # Form T also updates H/L and O/C, as Polygon's bars do
        elif code in ALLOWS:
            letters = ALLOWS[code]
        else:
            letters, unknown = "V", True
        qualifies &= set(letters)
    return "".join(sorted(qualifies, key="HOV".index)), unknown


@dataclass(frozen=True)
class Trade:
    t: int
    p: float
    size: float
    codes: tuple[int, ...] = ()


@dataclass(frozen=True)
class Clock:
    clock: int


@dataclass(frozen=True)
class Trades:
    symbol: str
    trades: tuple[Trade, ...]


@dataclass(frozen=True)
class Upstream:
    down: bool
    clock: int
    wall: int


@dataclass(frozen=True)
class Bar:
    s: int
    o: float
    h: float
    l: float  # noqa: E741
    c: float
    v: float
    vw: float | None
    n: int
    flags: int


def bar_from_record(record: np.void) -> Bar:
    """A published BAR record (one row of ``wire.BAR_DTYPE``) as a :class:`Bar`."""
    vw = float(record["vw"])
    return Bar(
        int(record["s"]),
        float(record["o"]),
        float(record["h"]),
        float(record["l"]),
        float(record["c"]),
        float(record["v"]),
        None if math.isnan(vw) else vw,
        int(record["n"]),
        int(record["flags"]),
    )


@dataclass
class Result:
    bars: dict[tuple[str, int], list[Bar]] = field(default_factory=dict)  # closed, oldest first
    late: int = 0
    unknown: int = 0
    clock: int | None = None


OUTAGE = 1
CARRIED = 2


def reference_bars(
    events: Sequence[Clock | Trades | Upstream],
    intervals: tuple[int, ...],
    grace: int,
    rule_set: str = "polygon",
) -> Result:
    result = Result()
    clock: int | None = None
    arrival = 0
    buckets: dict[tuple[str, int, int], list[tuple[int, int, Trade, str]]] = defaultdict(list)
    outages: list[tuple[int, float]] = []
    down_at: int | None = None
    up_again = False
    for event in events:
        if isinstance(event, Clock):
            clock = event.clock if clock is None else max(clock, event.clock)
            if down_at is not None and up_again and clock > down_at:
                outages.append((down_at, clock))
                down_at = None
            continue
        if isinstance(event, Upstream):
            if event.down and down_at is None:
                down_at = event.clock
            up_again = not event.down
            continue
        for trade in event.trades:
            arrival += 1
            letters, unknown = allows(trade.codes, rule_set)
            result.unknown += unknown
            if not letters:
                continue
            for interval in intervals:
                s = math.floor(trade.t / interval) * interval
                if clock is not None and s + interval + grace <= clock:
                    result.late += 1
                    continue
                buckets[(event.symbol, interval, s)].append((trade.t, arrival, trade, letters))
    result.clock = clock
    if down_at is not None:
        outages.append((down_at, math.inf))
    series: dict[tuple[str, int], list[int]] = defaultdict(list)
    for symbol, interval, s in buckets:
        if clock is not None and s + interval + grace <= clock:
            series[(symbol, interval)].append(s)
    for (symbol, interval), starts in series.items():
        previous_close: float | None = None
        bars = []
        for s in sorted(starts):
            ordered = sorted(buckets[(symbol, interval, s)], key=lambda x: (x[0], x[1]))
            bar = _bar(s, interval, grace, ordered, previous_close, outages)
            bars.append(bar)
            previous_close = bar.c
        result.bars[(symbol, interval)] = bars
    return result


def _bar(
    s: int,
    interval: int,
    grace: int,
    ordered: list[tuple[int, int, Trade, str]],
    previous_close: float | None,
    outages: list[tuple[int, float]],
) -> Bar:
    prices = [trade.p for _, _, trade, _ in ordered]
    hl = [trade.p for _, _, trade, letters in ordered if "H" in letters]
    oc = [trade.p for _, _, trade, letters in ordered if "O" in letters]
    vol = [(trade.p, trade.size) for _, _, trade, letters in ordered if "V" in letters]
    flags = 0
    if not hl:
        if previous_close is not None:
            o = h = low = c = previous_close
            flags |= CARRIED
        else:
            o, h, low, c = prices[0], max(prices), min(prices), prices[-1]
    else:
        h, low = max(hl), min(hl)
        o, c = (oc[0], oc[-1]) if oc else (hl[0], hl[-1])
    if any(s <= hi and s + interval + grace > lo for lo, hi in outages):
        flags |= OUTAGE
    v = math.fsum(size for _, size in vol)
    vw = math.fsum(p * size for p, size in vol) / v if v > 0 else None
    return Bar(s, o, h, low, c, v, vw, len(ordered), flags)
