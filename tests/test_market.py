from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import orjson
import pandas as pd
import pytest

from polyfan.bars import conditions
from polyfan.config import SYMBOL_RE
from polyfan.feed.upstream import EventDecoder
from polyfan.market import AGG_DELAY_MS, ANCHORS, MAX_DISORDER_MS, QUOTES_PER_TRADE, Market

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
    decoder = EventDecoder()
    decoded = decoder.decode([orjson.dumps(f) for f in frames], NOW)
    assert decoded.trades.count == 5_000
    assert decoder.stats.bad_messages == 0


# --- Market.stream: every channel the sim serves ---------------------------------------------


def run_stream(
    market: Market, ticks: int, per_tick: int, step_ms: int = 10
) -> list[dict[str, Any]]:
    events = []
    for k in range(ticks):
        for frame in market.stream(per_tick, NOW + k * step_ms):
            assert 1 <= len(frame) <= 100
            events += frame
    return events


@pytest.fixture(scope="module")
def channels() -> list[dict[str, Any]]:
    """Two and a half minutes of 12 tickers: A and AM windows close along the way."""
    return run_stream(Market(12, seed=21), ticks=1_500, per_tick=20, step_ms=100)


def test_stream_trades_are_the_very_trades_of_the_same_seed() -> None:
    streamed = [e for e in run_stream(Market(20, seed=3), 10, 50) if e["ev"] == "T"]
    market = Market(20, seed=3)
    expected = [t for k in range(10) for t in market.trades(50, NOW + k * 10)]
    assert streamed == expected


def test_quotes_come_at_the_asked_ratio_around_the_last_price(
    channels: list[dict[str, Any]],
) -> None:
    trades = [e for e in channels if e["ev"] == "T"]
    quotes = [e for e in channels if e["ev"] == "Q"]
    assert len(quotes) == round(QUOTES_PER_TRADE * len(trades))
    last: dict[str, int] = {}
    for q in quotes:
        assert set(q) >= {"ev", "sym", "bx", "bp", "bs", "ax", "ap", "as", "c", "t", "q", "z"}
        assert 0 < q["bp"] < q["ap"] and 1 <= q["bs"] <= 30 and 1 <= q["as"] <= 30
        assert q["q"] > last.get(q["sym"], 0)
        last[q["sym"]] = q["q"]
    assert any("i" in q for q in quotes)
    few = [e for f in Market(5, seed=2).stream(100, NOW, quotes_per_trade=0.5) for e in f]
    assert sum(e["ev"] == "Q" for e in few) == 50


def test_luld_bands_follow_the_price_of_their_ticker(channels: list[dict[str, Any]]) -> None:
    reference: dict[str, float] = {}
    expected = []
    sequence: dict[str, int] = {}
    for e in channels:
        if e["ev"] != "T":
            continue
        ref = reference.get(e["sym"])
        if ref is None or abs(e["p"] - ref) > 0.01 * ref:
            reference[e["sym"]] = e["p"]
            sequence[e["sym"]] = sequence.get(e["sym"], 0) + 1
            digits = 2 if e["p"] >= 1 else 4
            expected.append(
                {
                    "ev": "LULD", "T": e["sym"], "h": round(e["p"] * 1.05, digits),
                    "l": round(e["p"] * 0.95, digits), "i": [] if ref is None else [21],
                    "z": e["z"], "t": e["t"], "q": sequence[e["sym"]],
                }
            )  # fmt: skip
    assert [e for e in channels if e["ev"] == "LULD"] == expected
    assert sum(e["i"] == [21] for e in expected) > 0


def reference_aggregates(
    trades: list[dict[str, Any]], ev: str, length: int
) -> list[dict[str, Any]]:
    """Polygon's aggregate events computed with pandas from the trades, independently."""
    rules = conditions.polygon_rules()
    frame = pd.DataFrame(
        {
            "sym": [t["sym"] for t in trades],
            "t": [t["t"] for t in trades],
            "p": [t["p"] for t in trades],
            "s": [t["s"] for t in trades],
            "rules": [int(np.bitwise_and.reduce(rules[t.get("c") or [0]])) for t in trades],
        }
    )
    frame["oc"] = frame["rules"] & conditions.OC > 0
    frame["hl"] = frame["rules"] & conditions.HL > 0
    frame["vol"] = frame["rules"] & conditions.VOL > 0
    frame["start"] = frame["t"] // length * length
    frame["second"] = frame["t"] // 1000 * 1000
    eastern = pd.to_datetime(frame["t"], unit="ms", utc=True).dt.tz_convert("America/New_York")
    frame["day"] = eastern.dt.date
    opening = eastern.dt.normalize() + pd.Timedelta(hours=9, minutes=30)
    frame["after_open"] = eastern >= opening
    events = []
    for (sym, start), window in frame.groupby(["sym", "start"], sort=False):
        oc, hl, vol = window[window["oc"]], window[window["hl"]], window[window["vol"]]
        if oc.empty:
            continue
        end = start + length
        today = frame[(frame["sym"] == sym) & (frame["day"] == window["day"].iloc[0])]
        # the day as of the window's end, in whole seconds (a second closes before its minute)
        so_far = today[(today["second"] < end) & today["vol"]]
        opens = today[today["oc"] & today["after_open"] & (today["second"] < end)]
        opens = opens.sort_values("second", kind="stable")
        v = int(vol["s"].sum())
        day_v = int(so_far["s"].sum())
        event: dict[str, Any] = {"ev": ev, "sym": sym, "v": v, "av": day_v}
        if not opens.empty:
            event["op"] = float(opens["p"].iloc[0])
        event.update(
            vw=round(float((vol["p"] * vol["s"]).sum()) / v, 4) if v else float(oc["p"].iloc[-1]),
            o=float(oc["p"].iloc[0]),
            c=float(oc["p"].iloc[-1]),
            h=float(hl["p"].max()),
            l=float(hl["p"].min()),
            a=round(float((so_far["p"] * so_far["s"]).sum()) / day_v, 4),
            z=round(v / len(vol)) if len(vol) else 0,
            s=int(start),
            e=int(end),
        )
        events.append(event)
    return events


def test_aggregates_are_computed_from_the_streams_own_trades(
    channels: list[dict[str, Any]],
) -> None:
    trades = [e for e in channels if e["ev"] == "T"]
    for ev, length in (("A", 1000), ("AM", 60_000)):
        sent = [e for e in channels if e["ev"] == ev]
        last_closed = max(e["e"] for e in sent)
        expected = [e for e in reference_aggregates(trades, ev, length) if e["e"] <= last_closed]
        key = lambda e: (e["s"], e["sym"])  # noqa: E731
        assert sorted(sent, key=key) == sorted(expected, key=key)
        assert len(sent) > (2 if ev == "AM" else 100)


def test_aggregates_go_out_after_their_window_in_frames_of_their_own() -> None:
    market = Market(3, seed=4)
    second = NOW + 500 - (NOW + 500) % 1000  # the trades' second: they are at most 3 ms old
    early = [e for f in market.stream(50, NOW + 500) for e in f]
    assert not any(e["ev"] in ("A", "AM") for e in early)
    assert not market.stream(0, second + 1000 + AGG_DELAY_MS - 1)
    later = market.stream(0, second + 1000 + AGG_DELAY_MS)
    symbols = [e["sym"] for f in later for e in f]
    assert symbols and len(set(symbols)) == len(symbols)
    assert set(symbols) <= {e["sym"] for e in early if e["ev"] == "T"}
    assert all(e["ev"] == "A" and e["s"] == second for f in later for e in f)
