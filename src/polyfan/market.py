"""The synthetic market behind ``polyfan sim``: Polygon-shaped ``T`` events, reproducibly.

Pure: the caller passes the wall time and the number of trades; a seed makes the whole stream
reproducible. What it imitates (see protocol.md and conditions.md):

- tickers that always include ``A``, ``AA``, ``AAPL`` and ``BRK.A`` (prefix-colliding and
  dotted names), then well-known ones, then generated ones;
- Zipf-like activity (weight ``1 / rank**1.1``): a few symbols trade most;
- random-walk prices on a penny tick (1/100 of a penny under $1), sub-penny off-exchange prints;
- round lots, odd lots (about a third of trades, condition 37), a few fractional-share trades
  (``s`` is the whole part, ``ds`` the exact size as a decimal string);
- conditions at realistic rates: 14 ISO, 12 Form T, combinations such as ``[14, 37]``, and
  occasional 2, 7, 10, 22, 41, 53;
- exchange ids, about 35% off-exchange (``x`` 4) with ``trfi``/``trft``; tape ``z``; trade id
  ``i``; ``pt`` a few ms before ``t``; ``q`` increasing per symbol with gaps;
- ``t`` is the wall clock, at most ``MAX_DISORDER_MS`` behind it: never older than an agg's
  grace, so exact end-to-end bar tests stay deterministic. ``late_fraction`` > 0 adds
  off-exchange prints stamped 1 s to 2 min in the past, as the real feed has.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from typing import Any

ANCHORS = ("A", "AA", "AAPL", "BRK.A")
WELL_KNOWN = (
    "TSLA", "NVDA", "MSFT", "AMZN", "SPY", "QQQ", "META", "GOOGL", "AMD", "NFLX", "BAC", "F",
    "T", "INTC", "PLTR", "SOFI", "NIO", "AAL", "BRK.B", "GOOG", "JPM", "XOM", "WMT", "KO",
    "PFE", "DIS", "UBER", "COIN", "MARA", "RIVN", "IWM", "TQQQ", "SQQQ", "GME", "AMC", "BABA",
    "CCL", "SNAP", "C", "WFC", "AAPU", "AAON", "ABNB", "ADBE", "AVGO", "COST", "CSCO", "CVX",
    "HD", "ORCL",
)  # fmt: skip
MAX_DISORDER_MS = 3
MAX_FRAME_EVENTS = 100

ODD_LOT = 37
_RARE_CONDITIONS = ((2, 0.003), (7, 0.001), (10, 0.003), (22, 0.002), (41, 0.01), (53, 0.005))
_LIT_EXCHANGES = (1, 2, 3, 7, 8, 10, 11, 12, 15, 17, 19, 20, 21)
_LIT_WEIGHTS = (2, 1, 1, 3, 2, 1, 8, 10, 2, 1, 4, 1, 1)
_TRFS = (201, 202, 203)


def symbol_names(count: int, rng: random.Random) -> tuple[str, ...]:
    """``count`` distinct tickers: the anchors first, then well-known ones, then generated."""
    names = list((ANCHORS + WELL_KNOWN)[:count])
    taken = set(names)
    while len(names) < count:
        name = "".join(rng.choices(string.ascii_uppercase, k=rng.choice((3, 4, 4))))
        if name not in taken:
            taken.add(name)
            names.append(name)
    return tuple(names)


class _Ticker:
    __slots__ = ("price", "q", "sym", "tape", "trade_id")

    def __init__(self, sym: str, rng: random.Random) -> None:
        self.sym = sym
        self.price = round(math.exp(rng.uniform(math.log(2), math.log(800))), 2)
        self.q = rng.randrange(1_000, 5_000_000)
        self.trade_id = rng.randrange(1, 100_000)
        self.tape = rng.choice((1, 2, 3))


class Market:
    """A reproducible stream of trade events for a fixed set of tickers."""

    def __init__(
        self,
        symbols: int | Sequence[str],
        seed: int | None = None,
        *,
        late_fraction: float = 0.0,
    ) -> None:
        self._rng = random.Random(seed)
        names = symbol_names(symbols, self._rng) if isinstance(symbols, int) else tuple(symbols)
        if not names:
            raise ValueError("market: need at least one symbol")
        self.symbols = names
        self.late_fraction = late_fraction
        self._tickers = [_Ticker(sym, self._rng) for sym in names]
        ranks = list(range(1, len(names) + 1))
        self._rng.shuffle(ranks)
        weights = [1.0 / rank**1.1 for rank in ranks]
        total = 0.0
        self._cumulative: list[float] = []
        for weight in weights:
            total += weight
            self._cumulative.append(total)

    def trades(self, count: int, now_ms: int) -> list[dict[str, Any]]:
        """``count`` trade events stamped around ``now_ms`` (never after it)."""
        rng = self._rng
        tickers = rng.choices(self._tickers, cum_weights=self._cumulative, k=count)
        return [self._trade(ticker, now_ms, rng) for ticker in tickers]

    def frames(self, count: int, now_ms: int) -> list[list[dict[str, Any]]]:
        """``count`` trades split into frames of 1 to 100 events, as the real feed batches."""
        trades = self.trades(count, now_ms)
        frames = []
        start = 0
        while start < count:
            size = self._rng.randint(1, MAX_FRAME_EVENTS)
            frames.append(trades[start : start + size])
            start += size
        return frames

    def _trade(self, ticker: _Ticker, now_ms: int, rng: random.Random) -> dict[str, Any]:
        ticker.price = self._step(ticker.price, rng)
        ticker.q += rng.randint(1, 40)
        ticker.trade_id += 1
        t = now_ms - rng.randint(0, MAX_DISORDER_MS)
        off_exchange = rng.random() < 0.35
        price = ticker.price
        if off_exchange and rng.random() < 0.2:
            price = round(price + 0.005 * rng.choice((-1, 1)), 4)  # sub-penny midpoint print
        late = off_exchange and self.late_fraction > 0 and rng.random() < self.late_fraction
        if late:
            t = now_ms - rng.randint(1_000, 120_000)

        conditions: list[int] = []
        draw = rng.random()
        if draw < 0.12:
            conditions.append(14)
        elif draw < 0.16:
            conditions.append(12)
        for code, rate in _RARE_CONDITIONS:
            if rng.random() < rate:
                conditions.append(code)
        if rng.random() < 0.32:
            if rng.random() < 0.05:
                size = rng.choice((0.5, 0.25, 1.5, 0.0125, 2.75))
            else:
                size = rng.randint(1, 99)
            conditions.append(ODD_LOT)
        elif rng.random() < 0.005:
            size = rng.choice((5_000, 10_000, 25_000))
        else:
            size = 100 * rng.choice((1, 1, 1, 1, 2, 2, 3, 5, 10))

        event: dict[str, Any] = {
            "ev": "T",
            "sym": ticker.sym,
            "i": str(ticker.trade_id),
            "x": 4 if off_exchange else rng.choices(_LIT_EXCHANGES, _LIT_WEIGHTS)[0],
            "p": price,
            "s": int(size),
        }
        if conditions:
            event["c"] = sorted(conditions)
        event["t"] = t
        event["pt"] = t - rng.randint(0, 3)
        event["q"] = ticker.q
        event["z"] = ticker.tape
        if off_exchange:
            event["trfi"] = rng.choice(_TRFS)
            event["trft"] = t + rng.randint(0, 1)
        event["ds"] = repr(float(size))
        return event

    @staticmethod
    def _step(price: float, rng: random.Random) -> float:
        moved = price * math.exp(rng.gauss(0.0, 0.0004))
        tick = 0.01 if moved >= 1 else 0.0001
        return max(tick, round(round(moved / tick) * tick, 4))
