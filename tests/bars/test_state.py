"""The bar kernels (jitted and through ``py_func``) against the plain-Python reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from polyfan.bars import conditions
from polyfan.bars.outages import Outages
from polyfan.bars.state import Bars
from polyfan.wire import codec
from reference import Bar, Clock, Result, Trade, Trades, Upstream, bar_from_record, reference_bars

SYMBOLS = ["A", "AA", "AAPL", "BRK.A"]
# Known codes of every kind (regular, vol-only, H/L-only, nothing, H/L+O/C-only, Form T,
# indicators) and unknown ones (26 is not in the table).
CODES = [0, 1, 2, 5, 10, 12, 14, 15, 16, 22, 26, 29, 32, 37, 38, 57, 62, 71, 99, 200]
JIT = [pytest.param(True, id="jit"), pytest.param(False, id="py_func")]
INT64_MIN = np.iinfo(np.int64).min


def rules_for(rule_set: str) -> np.ndarray:
    return conditions.all_rules() if rule_set == "all" else conditions.polygon_rules()


class Run:
    """Feed reference events to :class:`Bars` the way the agg does: batches, then closing."""

    def __init__(
        self,
        intervals: tuple[int, ...],
        grace: int,
        *,
        rule_set: str = "polygon",
        jit: bool = True,
        pool_size: int = 1024,
    ) -> None:
        self.intervals = intervals
        self.bars = Bars(intervals, grace, rules_for(rule_set), jit=jit, pool_size=pool_size)
        self.names: list[str] = []
        self.clock: int | None = None
        self.published: dict[tuple[str, int], list[Bar]] = {}
        self.outages = Outages()  # upstream down/up only: the agg's other causes need its shell

    def symbol_id(self, symbol: str) -> int:
        if symbol not in self.names:
            self.names.append(symbol)
        return self.names.index(symbol)

    def batch(self, events: list[Clock | Trades | Upstream]) -> None:
        rows = []
        for event in events:
            if isinstance(event, Clock):
                self.clock = event.clock if self.clock is None else max(self.clock, event.clock)
                self.outages.clock_received(self.clock, 0)
                continue
            if isinstance(event, Upstream):
                if event.down:
                    self.outages.upstream_down(event.clock)
                else:
                    self.outages.upstream_up()
                continue
            sid = self.symbol_id(event.symbol)
            arrival_clock = INT64_MIN if self.clock is None else self.clock
            rows.extend((trade, sid, arrival_clock) for trade in event.trades)
        trades = np.zeros(len(rows), dtype=codec.TRADE_DTYPE)
        for i, (trade, _, _) in enumerate(rows):
            trades[i]["t"] = trade.t
            trades[i]["p"] = trade.p
            trades[i]["s"] = trade.size
            trades[i]["nc"] = len(trade.codes)
            trades[i]["c"][: len(trade.codes)] = trade.codes
        symbols = np.array([sid for _, sid, _ in rows], dtype=np.int64)
        clocks = np.array([clock for _, _, clock in rows], dtype=np.int64)
        self.bars.add_trades(trades, symbols, clocks)
        self.bars.set_outages(self.outages.windows)
        if self.clock is not None:
            self.close(self.clock)

    def close(self, clock: int) -> None:
        series, bars = self.bars.closed_bars(clock)
        assert len(series) == len(bars)
        n_int = len(self.intervals)
        for key, record in zip(series.tolist(), bars, strict=True):
            name, interval = self.names[key // n_int], self.intervals[key % n_int]
            self.published.setdefault((name, interval), []).append(bar_from_record(record))


def assert_same_bars(published: dict[tuple[str, int], list[Bar]], expected: Result) -> None:
    """o/h/l/c/n/flags/s exactly; v and vw to 1e-12 relative, because the kernel sums in
    arrival order and the reference with fsum in time order (float addition is not associative)."""
    assert sorted(published) == sorted(expected.bars)
    for key, bars in expected.bars.items():
        got = published[key]
        assert [b.s for b in got] == [b.s for b in bars], key
        for mine, ref in zip(got, bars, strict=True):
            assert (mine.s, mine.o, mine.h, mine.l, mine.c, mine.n, mine.flags) == (
                ref.s,
                ref.o,
                ref.h,
                ref.l,
                ref.c,
                ref.n,
                ref.flags,
            ), key
            assert mine.v == pytest.approx(ref.v, rel=1e-12, abs=1e-12), key
            if ref.vw is None:
                assert mine.vw is None, key
            else:
                assert mine.vw == pytest.approx(ref.vw, rel=1e-12), key


# --- property tests ------------------------------------------------------------------------

sizes = st.one_of(st.integers(0, 500).map(float), st.sampled_from([0.5, 0.25, 1.125, 33.3, 1e-3]))
trade_parts = st.tuples(
    st.integers(-60, 30),  # t relative to the proxy's clock: disorder, late prints, ahead
    st.integers(995, 1010),  # price in cents: ties for first/last/max/min
    sizes,
    st.lists(st.sampled_from(CODES), max_size=3),
)
event_parts = st.one_of(
    st.tuples(st.just("clock"), st.integers(-5, 25)),
    st.tuples(st.just("down")),
    st.tuples(st.just("up"), st.integers(0, 40)),  # wall time at up, after the clock at down
    st.tuples(
        st.just("trades"), st.sampled_from(SYMBOLS), st.lists(trade_parts, min_size=1, max_size=6)
    ),
)


@st.composite
def streams(draw: st.DrawFn) -> list[list[Clock | Trades | Upstream]]:
    """Batches of events as the agg receives them."""
    clock = draw(st.sampled_from([0, 1_781_622_376_000]))
    high = clock  # the proxy's clock (the largest sent): UPSTREAM records carry it
    grain = draw(st.sampled_from([1, 10, 50]))  # coarse grains land on bar edges and closes
    batches: list[list[Clock | Trades | Upstream]] = [[]]
    for kind, *rest in draw(st.lists(event_parts, max_size=60)):
        if kind == "clock":
            clock += rest[0] * grain
            high = max(high, clock)
            batches[-1].append(Clock(clock))
        elif kind == "down":
            batches[-1].append(Upstream(True, high, 0))
        elif kind == "up":
            batches[-1].append(Upstream(False, high, high + rest[0] * grain))
        else:
            symbol, parts = rest
            trades = tuple(
                Trade(clock + dt * grain, cents / 100, size, tuple(codes))
                for dt, cents, size, codes in parts
            )
            batches[-1].append(Trades(symbol, trades))
        if draw(st.booleans()):
            batches.append([])
    if draw(st.booleans()):
        clock += 120_000  # the clock runs on: everything closes
        batches.append([Clock(clock)])
    return batches


intervals_st = st.lists(
    st.sampled_from([100, 250, 500, 1000, 60_000]), min_size=1, max_size=3, unique=True
).map(lambda xs: tuple(sorted(xs)))


@pytest.mark.parametrize("jit", JIT)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    batches=streams(),
    intervals=intervals_st,
    grace=st.sampled_from([0, 50, 250]),
    rule_set=st.sampled_from(["polygon", "polygon", "all"]),
    pool_size=st.sampled_from([1, 2, 1024]),
)
def test_kernels_agree_with_the_reference_on_random_streams(
    jit: bool,
    batches: list[list[Clock | Trades | Upstream]],
    intervals: tuple[int, ...],
    grace: int,
    rule_set: str,
    pool_size: int,
) -> None:
    run = Run(intervals, grace, rule_set=rule_set, jit=jit, pool_size=pool_size)
    for batch in batches:
        run.batch(batch)
    expected = reference_bars([e for b in batches for e in b], intervals, grace, rule_set)
    assert_same_bars(run.published, expected)
    assert run.bars.late_trades == expected.late
    assert run.bars.unknown_conditions == expected.unknown


# --- cases a reader can check by hand --------------------------------------------------


@pytest.mark.parametrize("jit", JIT)
def test_bar_closes_when_clock_reaches_end_plus_grace_and_not_before(jit: bool) -> None:
    run = Run((100,), 50, jit=jit)
    run.batch([Trades("AAPL", (Trade(1_000, 10.0, 5),)), Clock(1_149)])
    assert run.published == {}
    assert run.bars.next_close == 1_150
    run.batch([Clock(1_150)])
    assert run.published == {("AAPL", 100): [Bar(1_000, 10.0, 10.0, 10.0, 10.0, 5.0, 10.0, 1, 0)]}
    run.batch([Clock(9_999)])
    assert len(run.published[("AAPL", 100)]) == 1


@pytest.mark.parametrize("jit", JIT)
def test_trade_minutes_ahead_of_the_clock_opens_another_bar_without_overwriting(jit: bool) -> None:
    run = Run((100, 250), 250, jit=jit, pool_size=1)
    ahead = 1_000 + 5 * 60_000
    run.batch(
        [
            Clock(1_000),
            Trades("A", (Trade(1_010, 1.0, 1), Trade(ahead, 2.0, 1), Trade(1_020, 3.0, 1))),
        ]
    )
    assert run.bars.open_bars == 4
    run.batch([Clock(ahead + 1_000)])
    assert [(b.s, b.o, b.c, b.n) for b in run.published[("A", 100)]] == [
        (1_000, 1.0, 3.0, 2),
        (ahead, 2.0, 2.0, 1),
    ]
    assert [(b.s, b.o, b.c, b.n) for b in run.published[("A", 250)]] == [
        (1_000, 1.0, 3.0, 2),
        (ahead, 2.0, 2.0, 1),
    ]


@pytest.mark.parametrize("jit", JIT)
def test_volume_only_bar_carries_the_previous_close(jit: bool) -> None:
    run = Run((100,), 0, jit=jit)
    odd_lot = (37,)
    run.batch(
        [
            Trades("BRK.A", (Trade(1_000, 10.0, 100), Trade(1_050, 11.0, 100))),
            Trades("BRK.A", (Trade(1_110, 50.0, 3, odd_lot), Trade(1_120, 60.0, 1, odd_lot))),
            Clock(2_000),
        ]
    )
    first, carried = run.published[("BRK.A", 100)]
    assert (carried.o, carried.h, carried.l, carried.c) == (11.0, 11.0, 11.0, 11.0)
    assert (carried.v, carried.vw, carried.n, carried.flags) == (
        4.0,
        52.5,
        2,
        codec.BAR_FLAG_CARRIED,
    )
    assert first.flags == 0


@pytest.mark.parametrize("jit", JIT)
def test_volume_only_bar_without_previous_close_takes_its_own_prices(jit: bool) -> None:
    run = Run((100,), 0, jit=jit)
    run.batch(
        [
            Trades("AA", (Trade(1_060, 5.0, 1, (37,)), Trade(1_010, 7.0, 1, (37,)))),
            Trades("AA", (Trade(1_010, 6.0, 1, (12, 37)), Trade(1_090, 4.0, 2, (37,)))),
            Clock(2_000),
        ]
    )
    (bar,) = run.published[("AA", 100)]
    # (t, arrival) order: 7.0 (1010, 2nd), 6.0 (1010, 3rd), 5.0, 4.0
    assert (bar.o, bar.h, bar.l, bar.c, bar.n, bar.flags) == (7.0, 7.0, 4.0, 4.0, 4, 0)


@pytest.mark.parametrize("jit", JIT)
def test_open_close_fall_back_to_high_low_trades(jit: bool) -> None:
    run = Run((1_000,), 0, jit=jit)
    # 32: H/L but not O/C; 12 alone is regular under polygon; 15 counts for nothing.
    run.batch(
        [
            Trades("A", (Trade(1_500, 2.0, 1, (32,)), Trade(1_100, 3.0, 1, (32,)))),
            Trades("A", (Trade(1_200, 99.0, 1, (15,)),)),
            Clock(5_000),
        ]
    )
    (bar,) = run.published[("A", 1_000)]
    assert (bar.o, bar.h, bar.l, bar.c, bar.n) == (3.0, 3.0, 2.0, 2.0, 2)


@pytest.mark.parametrize("jit", JIT)
def test_late_trade_is_counted_per_interval_it_is_late_for_and_not_applied(jit: bool) -> None:
    run = Run((100, 60_000), 250, jit=jit)
    run.batch([Trades("AAPL", (Trade(60_000, 1.0, 1),)), Clock(60_400)])
    assert [b.s for b in run.published[("AAPL", 100)]] == [60_000]
    run.batch([Trades("AAPL", (Trade(60_050, 9.0, 1),)), Clock(200_000)])
    assert run.bars.late_trades == 1
    assert run.published[("AAPL", 100)][0].h == 1.0
    assert run.published[("AAPL", 60_000)][0].h == 9.0


@pytest.mark.parametrize("jit", JIT)
def test_unknown_codes_count_once_per_trade_and_allow_volume_only(jit: bool) -> None:
    run = Run((100, 250), 0, jit=jit)
    run.batch(
        [
            Trades("A", (Trade(1_000, 1.0, 10), Trade(1_010, 5.0, 10, (99, 200)))),
            Trades("A", (Trade(1_020, 6.0, 10, (15, 99)),)),
            Clock(5_000),
        ]
    )
    assert run.bars.unknown_conditions == 2
    (bar,) = run.published[("A", 100)]
    assert (bar.h, bar.v, bar.n) == (1.0, 20.0, 2)


@pytest.mark.parametrize("jit", JIT)
def test_bars_overlapping_an_outage_window_are_flagged(jit: bool) -> None:
    run = Run((100, 1_000), 0, jit=jit)
    run.batch([Trades("A", (Trade(10_050, 1.0, 1), Trade(10_950, 1.0, 1))), Clock(10_960)])
    run.batch([Upstream(True, 10_960, 0)])
    assert run.outages.is_open()
    run.batch([Upstream(False, 10_960, 0), Clock(10_960)])  # not past the start: still open
    assert run.outages.is_open()
    run.batch(
        [
            Trades("A", (Trade(12_000, 2.0, 1), Trade(12_040, 2.0, 1))),
            Clock(12_040),  # the first clock past it closes it: [10_960, 12_040]
            Trades("A", (Trade(12_100, 2.0, 1),)),
            Clock(20_000),
        ]
    )
    assert run.outages.windows == [(10_960, 12_040)]
    flags = {(i, b.s): b.flags for (_, i), bars in run.published.items() for b in bars}
    assert flags == {
        (100, 10_000): 0,
        (100, 10_900): codec.BAR_FLAG_OUTAGE,  # open when the upstream went down
        (100, 12_000): codec.BAR_FLAG_OUTAGE,  # starts inside it
        (100, 12_100): 0,
        (1_000, 10_000): codec.BAR_FLAG_OUTAGE,
        (1_000, 12_000): codec.BAR_FLAG_OUTAGE,
    }


@pytest.mark.parametrize("jit", JIT)
def test_an_outage_that_ended_still_flags_a_longer_bar_open_across_it(jit: bool) -> None:
    run = Run((100, 1_000), 0, jit=jit)
    run.batch([Trades("A", (Trade(10_050, 1.0, 1),)), Clock(10_100)])
    run.batch([Upstream(True, 10_100, 0), Upstream(False, 10_100, 0), Clock(10_150)])
    # a 100 ms bar closes well after the outage ended; the 1 s bar is still open across it
    run.batch([Trades("A", (Trade(10_300, 1.0, 1),)), Clock(10_400)])
    run.batch([Clock(11_000)])
    flags = {(i, b.s): b.flags for (_, i), bars in run.published.items() for b in bars}
    assert flags == {(100, 10_000): 0, (100, 10_300): 0, (1_000, 10_000): codec.BAR_FLAG_OUTAGE}


@pytest.mark.parametrize("jit", JIT)
def test_bars_closing_together_come_grouped_by_series_oldest_first(jit: bool) -> None:
    bars = Bars((100,), 0, conditions.polygon_rules(), jit=jit, pool_size=1)
    trades = np.zeros(6, dtype=codec.TRADE_DTYPE)
    trades["t"] = [1_250, 1_050, 1_150, 1_050, 1_350, 1_150]
    trades["p"] = 1.0
    trades["s"] = 1.0
    symbols = np.array([0, 1, 1, 0, 1, 0], dtype=np.int64)
    bars.add_trades(trades, symbols, np.full(6, INT64_MIN, dtype=np.int64))
    series, closed = bars.closed_bars(10_000)
    assert series.tolist() == [0, 0, 0, 1, 1, 1]
    assert closed["s"].tolist() == [1_000, 1_100, 1_200, 1_000, 1_100, 1_300]
    assert bars.open_bars == 0
    assert bars.closed_bars(20_000)[0].size == 0


def test_the_pool_grows_ahead_of_need_between_batches() -> None:
    bars = Bars((100,), 0, conditions.polygon_rules(), pool_size=8)
    trades = np.zeros(7, dtype=codec.TRADE_DTYPE)
    trades["t"] = np.arange(7) * 100  # seven open bars: one slot of eight left
    trades["p"] = 1.0
    trades["s"] = 1.0
    bars.add_trades(trades, np.zeros(7, dtype=np.int64), np.full(7, INT64_MIN, dtype=np.int64))
    assert len(bars.pool_i) == 8
    assert bars.keep_room()
    assert len(bars.pool_i) == 16
    assert not bars.keep_room()  # nine of sixteen free
    series, closed = bars.closed_bars(10_000)
    assert series.tolist() == [0] * 7
    assert closed["s"].tolist() == list(range(0, 700, 100))
