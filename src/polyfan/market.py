"""The synthetic market behind ``polyfan sim``: Polygon-shaped stocks events, reproducibly.

Pure: the caller passes the wall time and the number of trades; a seed makes the whole stream
reproducible. :meth:`Market.trades` and :meth:`Market.frames` give ``T`` events only;
:meth:`Market.stream` gives every channel the sim serves: trades, ``Q`` quotes around them,
``LULD`` bands, and ``A``/``AM`` aggregates computed from those very trades (below).
What the trades imitate (see protocol.md and conditions.md):

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

:meth:`Market.stream` adds, from a second random stream (so its trades are the very trades
:meth:`trades` gives for the same seed):

- ``Q``: ``quotes_per_trade`` NBBO quotes per trade (fractional ratios carried over), on the
  same Zipf activity, around each ticker's last price: a 1 to 3 tick spread, sizes of 1 to 30
  round lots, lit exchanges, condition ``c`` (0, sometimes 1 or 2), now and then an indicator
  list ``i``, ``q`` increasing per ticker; mixed into the trade frames at random places.
- ``LULD``: a ticker's price bands (±5 % of a reference price, the symbol under ``T`` as Polygon
  sends it) when it first trades and whenever its price moves more than 1 % from the reference;
  indicators ``[]`` for the first band, ``[21]`` after (stand-ins, not the SIP's meanings).
- ``A`` (1 s) and ``AM`` (1 min): every field of Polygon's aggregate event computed from the
  stream's own trades (late prints excepted) with the ``polygon`` condition rules
  (``bars.conditions``): ``o``/``c`` from trades that may set open/close, ``h``/``l`` from those
  that may set high/low, ``v`` (whole shares, Polygon's ``s``), ``vw`` and ``z`` (average size)
  from volume trades; ``av``, ``a`` (volume-weighted average) and ``op`` (the first open/close
  trade at or after 09:30) per US/Eastern day, as of the window's end. A window is sent
  ``AGG_DELAY_MS`` after it ends (Polygon takes about 2 s), and only if it has an open/close
  trade, as Polygon sends no bar for an interval without an eligible trade. ``vw`` and ``a``
  are rounded to 4 decimals, as Polygon's are.
"""

from __future__ import annotations

import math
import random
import string
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from polyfan.bars import conditions

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

QUOTES_PER_TRADE = 10.0  # the sim's default: NBBO quotes outnumber trades many times over
AGG_DELAY_MS = 100  # an aggregate goes out this long after its window ends
LULD_BAND = 0.05  # price bands at +-5 % of the reference
LULD_MOVE = 0.01  # a new band when the price moves more than 1 % from the reference
_QUOTE_CONDITIONS = (0, 0, 0, 0, 0, 0, 0, 0, 1, 2)
_INDICATORS = ((604,), (604, 606), (1,))
_EASTERN = ZoneInfo("America/New_York")
_RULES = conditions.polygon_rules().tolist()
_OC, _HL, _VOL = conditions.OC, conditions.HL, conditions.VOL


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
    __slots__ = ("band", "day", "luld_q", "price", "q", "quote_q", "sym", "tape", "trade_id")

    def __init__(self, sym: str, rng: random.Random) -> None:
        self.sym = sym
        self.price = round(math.exp(rng.uniform(math.log(2), math.log(800))), 2)
        self.q = rng.randrange(1_000, 5_000_000)
        self.trade_id = rng.randrange(1, 100_000)
        self.tape = rng.choice((1, 2, 3))
        # Market.stream's state (the first random stream above is the trades'; unchanged)
        self.quote_q = self.q
        self.luld_q = 0
        self.band = 0.0  # the LULD reference price; 0: none yet
        self.day = _Day(0)


class _Day:
    """A ticker's US/Eastern trading day so far, as of its last closed second."""

    __slots__ = ("op", "pv", "start", "v")

    def __init__(self, start: int) -> None:
        self.start = start  # midnight US/Eastern, Unix ms
        self.v = 0  # volume
        self.pv = 0.0  # sum of price x size over volume trades
        self.op: float | None = None  # the official open: first O/C trade at or after 09:30


class _Window:
    """An aggregate window of one ticker being filled."""

    __slots__ = ("c", "day", "first_open", "h", "l", "n", "o", "opens", "pv", "start", "v")

    def __init__(self, start: int, day: tuple[int, int, int]) -> None:
        self.start = start
        self.day = day  # (midnight, next midnight, 09:30) US/Eastern, Unix ms
        self.o = self.c = math.nan
        self.h = -math.inf
        self.l = math.inf
        self.v = 0
        self.pv = 0.0
        self.n = 0  # volume trades
        self.first_open: float | None = None  # first O/C trade at or after 09:30
        self.opens = 0  # O/C trades

    def add(self, t: int, price: float, size: int, rules: int) -> None:
        if rules & _HL:
            self.h = max(self.h, price)
            self.l = min(self.l, price)
        if rules & _OC:
            if not self.opens:
                self.o = price
            self.c = price
            self.opens += 1
            if self.first_open is None and t >= self.day[2]:
                self.first_open = price
        if rules & _VOL:
            self.v += size
            self.pv += price * size
            self.n += 1


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
        # Market.stream's quotes, their places and the frame sizes: a stream of their own, so
        # that the trades stay those of ``trades`` for the same seed
        self._channel_rng = random.Random(None if seed is None else f"{seed}/channels")
        self._quotes_due = 0.0
        # open aggregate windows: start -> ticker index -> window
        self._seconds: dict[int, dict[int, _Window]] = {}
        self._minutes: dict[int, dict[int, _Window]] = {}
        self._day_bounds = (0, 0, 0)
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

    def stream(
        self, count: int, now_ms: int, *, quotes_per_trade: float = QUOTES_PER_TRADE
    ) -> list[list[dict[str, Any]]]:
        """``count`` trades with their ``LULD`` bands, about ``quotes_per_trade`` quotes per
        trade among them, in frames of 1 to 100 events; then, in frames of their own, the
        ``A`` and ``AM`` aggregates whose windows ended ``AGG_DELAY_MS`` before ``now_ms``.
        Call it with ``count`` 0 to let aggregates out while no trade is due."""
        rng = self._rng
        events: list[dict[str, Any]] = []
        tickers = rng.choices(range(len(self._tickers)), cum_weights=self._cumulative, k=count)
        for index in tickers:
            ticker = self._tickers[index]
            trade = self._trade(ticker, now_ms, rng)
            events.append(trade)
            if trade["t"] >= now_ms - MAX_DISORDER_MS:  # late prints are not aggregated
                band = self._observe(index, ticker, trade)
                if band is not None:
                    events.append(band)
        channel_rng = self._channel_rng
        self._quotes_due += count * quotes_per_trade
        quotes = int(self._quotes_due)
        self._quotes_due -= quotes
        if quotes:
            made = [self._quote(ticker, now_ms, channel_rng) for ticker in self._quoting(quotes)]
            total = len(events) + quotes
            places = set(channel_rng.sample(range(total), quotes))
            trades_and_bands = iter(events)
            made_iter = iter(made)
            events = [next(made_iter if i in places else trades_and_bands) for i in range(total)]
        frames = self._split(events, channel_rng)
        aggregates = self._closed_aggregates(now_ms)
        return frames + self._split(aggregates, channel_rng)

    @staticmethod
    def _split(events: list[dict[str, Any]], rng: random.Random) -> list[list[dict[str, Any]]]:
        frames = []
        start = 0
        while start < len(events):
            size = rng.randint(1, MAX_FRAME_EVENTS)
            frames.append(events[start : start + size])
            start += size
        return frames

    def _quoting(self, count: int) -> list[_Ticker]:
        return self._channel_rng.choices(self._tickers, cum_weights=self._cumulative, k=count)

    @staticmethod
    def _quote(ticker: _Ticker, now_ms: int, rng: random.Random) -> dict[str, Any]:
        price = ticker.price
        tick = 0.01 if price >= 1 else 0.0001
        spread = rng.choice((1, 1, 1, 2, 2, 3))
        bid = max(tick, round(math.floor(price / tick - spread / 2) * tick, 4))
        ask = round(bid + spread * tick, 4)
        ticker.quote_q += rng.randint(1, 9)
        event: dict[str, Any] = {
            "ev": "Q",
            "sym": ticker.sym,
            "bx": rng.choices(_LIT_EXCHANGES, _LIT_WEIGHTS)[0],
            "bp": bid,
            "bs": rng.randint(1, 30),
            "ax": rng.choices(_LIT_EXCHANGES, _LIT_WEIGHTS)[0],
            "ap": ask,
            "as": rng.randint(1, 30),
            "c": rng.choice(_QUOTE_CONDITIONS),
        }
        if rng.random() < 0.05:
            event["i"] = list(rng.choice(_INDICATORS))
        event["t"] = now_ms - rng.randint(0, MAX_DISORDER_MS)
        event["q"] = ticker.quote_q
        event["z"] = ticker.tape
        return event

    def _observe(self, index: int, ticker: _Ticker, trade: dict[str, Any]) -> dict[str, Any] | None:
        """Add a trade to its ticker's open aggregate windows; its new LULD band, if any."""
        t, price = trade["t"], trade["p"]
        codes = trade.get("c")
        rules = conditions.REGULAR
        if codes:
            for code in codes:
                rules &= _RULES[code]
        day = self._day_bounds
        if not day[0] <= t < day[1]:
            day = self._day_bounds = _eastern_day(t)
        for windows, length in ((self._seconds, 1000), (self._minutes, 60_000)):
            start = t - t % length
            open_windows = windows.get(start)
            if open_windows is None:
                open_windows = windows[start] = {}
            window = open_windows.get(index)
            if window is None:
                window = open_windows[index] = _Window(start, day)
            window.add(t, price, trade["s"], rules)
        if ticker.band and abs(price - ticker.band) <= LULD_MOVE * ticker.band:
            return None
        first = not ticker.band
        ticker.band = price
        ticker.luld_q += 1
        digits = 2 if price >= 1 else 4
        return {
            "ev": "LULD",
            "T": ticker.sym,
            "h": round(price * (1 + LULD_BAND), digits),
            "l": round(price * (1 - LULD_BAND), digits),
            "i": [] if first else [21],
            "z": ticker.tape,
            "t": t,
            "q": ticker.luld_q,
        }

    def _closed_aggregates(self, now_ms: int) -> list[dict[str, Any]]:
        """The ``A`` then ``AM`` events of every window that ended ``AGG_DELAY_MS`` ago, oldest
        first; the day's totals move on with each closed second."""
        events = []
        for ev, windows, length in (("A", self._seconds, 1000), ("AM", self._minutes, 60_000)):
            for start in sorted(s for s in windows if s + length + AGG_DELAY_MS <= now_ms):
                for index, window in sorted(windows.pop(start).items()):
                    ticker = self._tickers[index]
                    if ev == "A":
                        self._close_second(ticker, window)
                    if window.opens:
                        events.append(self._aggregate(ev, ticker, window, length))
        return events

    @staticmethod
    def _close_second(ticker: _Ticker, window: _Window) -> None:
        day = ticker.day
        if day.start != window.day[0]:
            day = ticker.day = _Day(window.day[0])
        day.v += window.v
        day.pv += window.pv
        if day.op is None and window.first_open is not None:
            day.op = window.first_open

    @staticmethod
    def _aggregate(ev: str, ticker: _Ticker, window: _Window, length: int) -> dict[str, Any]:
        day = ticker.day
        event: dict[str, Any] = {"ev": ev, "sym": ticker.sym, "v": window.v, "av": day.v}
        if day.op is not None:
            event["op"] = day.op
        event.update(
            vw=round(window.pv / window.v, 4) if window.v else window.c,
            o=window.o,
            c=window.c,
            h=window.h,
            l=window.l,
            a=round(day.pv / day.v, 4) if day.v else window.c,
            z=round(window.v / window.n) if window.n else 0,
            s=window.start,
            e=window.start + length,
        )
        return event

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


def _eastern_day(t_ms: int) -> tuple[int, int, int]:
    """The US/Eastern day of ``t_ms``: (midnight, next midnight, 09:30), Unix ms."""
    date = datetime.fromtimestamp(t_ms / 1000, _EASTERN).date()
    midnight = datetime(date.year, date.month, date.day, tzinfo=_EASTERN)
    following = date + timedelta(days=1)
    after = datetime(following.year, following.month, following.day, tzinfo=_EASTERN)
    opening = midnight.replace(hour=9, minute=30)

    def ms(moment: datetime) -> int:
        return int(moment.timestamp()) * 1000

    return ms(midnight), ms(after), ms(opening)
