from __future__ import annotations

from collections import Counter

import orjson
import pytest

from polyfan.config import SYMBOL_RE
from polyfan.feed.upstream import TradeDecoder
from polyfan.market import ANCHORS, MAX_DISORDER_MS, Market

NOW = 1_781_622_376_000


@pytest.fixture(scope="module")
def stream() -> list[dict[str, object]]:
    return Market(50, seed=7).trades(30_000, NOW)


def test_generated_tickers_always_include_the_colliding_and_dotted_anchors() -> None:
    for count in (4, 5, 50, 500):
        symbols = Market(count, seed=1).symbols
        assert symbols[:4] == ANCHORS
        assert len(set(symbols)) == count
        assert all(SYMBOL_RE.fullmatch(s) for s in symbols)
    assert Market(2, seed=1).symbols == ("A", "AA")


def test_the_same_seed_gives_the_same_stream_and_another_seed_does_not() -> None:
    assert Market(20, seed=3).trades(500, NOW) == Market(20, seed=3).trades(500, NOW)
    assert Market(20, seed=3).trades(500, NOW) != Market(20, seed=4).trades(500, NOW)


def test_a_given_symbol_list_is_used_as_is() -> None:
    trades = Market(("TSLA", "BRK.B"), seed=1).trades(200, NOW)
    assert {t["sym"] for t in trades} == {"TSLA", "BRK.B"}


def test_activity_is_skewed_a_few_symbols_trade_most(stream: list[dict[str, object]]) -> None:
    counts = sorted(Counter(t["sym"] for t in stream).values(), reverse=True)
    assert sum(counts[:5]) > 0.4 * len(stream)
    assert counts[-1] < counts[0] / 20


def test_conditions_appear_at_realistic_rates(stream: list[dict[str, object]]) -> None:
    n = len(stream)
    codes = [tuple(t.get("c", ())) for t in stream]  # type: ignore[call-overload]
    odd = sum(37 in c for c in codes) / n
    assert 0.28 < odd < 0.36
    assert 0.09 < sum(14 in c for c in codes) / n < 0.15
    assert 0.02 < sum(12 in c for c in codes) / n < 0.06
    assert sum(c == (14, 37) for c in codes) > 0
    assert 0.45 < sum(c == () for c in codes) / n < 0.65
    assert {2, 7, 10, 41} <= {code for c in codes for code in c}
    # every odd lot is under 100 shares, every lot a multiple of 100
    for t, c in zip(stream, codes, strict=True):
        size = float(t["ds"])  # type: ignore[arg-type]
        assert (size < 100) == (37 in c)
        assert t["s"] == int(size)


def test_off_exchange_prints_carry_their_trf_fields(stream: list[dict[str, object]]) -> None:
    off = [t for t in stream if t["x"] == 4]
    assert 0.3 < len(off) / len(stream) < 0.4
    assert all(t["trfi"] in (201, 202, 203) and t["trft"] >= t["t"] for t in off)
    assert not any("trfi" in t for t in stream if t["x"] != 4)


def test_sequence_numbers_increase_per_symbol_with_gaps(stream: list[dict[str, object]]) -> None:
    last: dict[object, int] = {}
    steps = []
    for t in stream:
        q = int(t["q"])  # type: ignore[call-overload]
        if t["sym"] in last:
            assert q > last[t["sym"]]
            steps.append(q - last[t["sym"]])
        last[t["sym"]] = q
    assert max(steps) > 1


def test_timestamps_are_wall_time_never_later_and_never_older_than_a_few_ms(
    stream: list[dict[str, object]],
) -> None:
    assert all(NOW - MAX_DISORDER_MS <= t["t"] <= NOW for t in stream)  # type: ignore[operator]
    assert all(t["pt"] <= t["t"] for t in stream)  # type: ignore[operator]


def test_late_prints_only_when_asked_and_only_off_exchange() -> None:
    trades = Market(20, seed=5, late_fraction=0.5).trades(2_000, NOW)
    late = [t for t in trades if t["t"] < NOW - MAX_DISORDER_MS]
    assert late
    assert all(t["x"] == 4 and NOW - 120_000 <= t["t"] <= NOW - 1_000 for t in late)


def test_frames_hold_one_to_a_hundred_events_and_every_trade_is_valid() -> None:
    market = Market(50, seed=9)
    frames = market.frames(5_000, NOW)
    assert sum(len(f) for f in frames) == 5_000
    assert all(1 <= len(f) <= 100 for f in frames)
    assert max(len(f) for f in frames) > 50
    decoder = TradeDecoder()
    decoded = decoder.decode([orjson.dumps(f) for f in frames], NOW)
    assert decoded.trades.count == 5_000
    assert decoder.stats.bad_messages == 0
