"""Records of every event kind turn back into the very Polygon events they came from."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from polyfan.errors import WireError
from polyfan.market import Market
from polyfan.wire import codec, polygon

NOW = 1_781_622_376_000

QUOTE_BITS = {"bx": 1, "bp": 2, "bs": 4, "ax": 8, "ap": 16, "as": 32, "c": 64, "i": 128}
QUOTE_BITS |= {"q": 256, "z": 512}
AGG_BITS = {"v": 1, "av": 2, "op": 4, "vw": 8, "o": 16, "c": 32, "h": 64, "l": 128, "a": 256}
AGG_BITS |= {"z": 512, "otc": 1024}
LULD_BITS = {"h": 1, "l": 2, "i": 4, "z": 8, "q": 16}


def has(event: dict[str, Any], bits: dict[str, int]) -> int:
    return sum(bit for key, bit in bits.items() if key in event)


def codes(event: dict[str, Any]) -> tuple[int, list[int]]:
    found = event.get("i", [])
    return len(found), [*found, *[0] * (4 - len(found))]


def quote_record(e: dict[str, Any]) -> tuple[Any, ...]:
    """The QUOTE_DTYPE record of an event, as docs/wire.md lays it out (written independently)."""
    ni, i = codes(e)
    return (
        e["t"], e.get("q", 0), e.get("bp", 0.0), e.get("ap", 0.0), e.get("bs", 0),
        e.get("as", 0), e.get("bx", 0), e.get("ax", 0), e.get("c", 0), i, e.get("z", 0), ni,
        has(e, QUOTE_BITS), [0] * 6,
    )  # fmt: skip


def agg_record(e: dict[str, Any]) -> tuple[Any, ...]:
    return (
        e["s"], e["e"], e.get("o", 0.0), e.get("h", 0.0), e.get("l", 0.0), e.get("c", 0.0),
        e.get("v", 0.0), e.get("vw", 0.0), e.get("av", 0.0), e.get("op", 0.0),
        e.get("a", 0.0), e.get("z", 0.0), has(e, AGG_BITS), int(e.get("otc", False)), [0] * 5,
    )  # fmt: skip


def luld_record(e: dict[str, Any]) -> tuple[Any, ...]:
    ni, i = codes(e)
    return (
        e["t"], e.get("q", 0), e.get("h", 0.0), e.get("l", 0.0), i, e.get("z", 0), ni,
        has(e, LULD_BITS), [0] * 4,
    )  # fmt: skip


def records(rows: list[tuple[Any, ...]], dtype: np.dtype) -> np.ndarray:
    return np.array(rows, dtype=dtype)


def json_ready(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a subscriber sends on: JSON text (numpy scalars would not serialize), read back."""
    return orjson.loads(orjson.dumps(events))


@pytest.fixture(scope="module")
def stream() -> list[dict[str, Any]]:
    market = Market(6, seed=5)
    return [e for k in range(700) for f in market.stream(10, NOW + 100 * k) for e in f]


def by_symbol(stream: list[dict[str, Any]], ev: str) -> dict[str, list[dict[str, Any]]]:
    found: dict[str, list[dict[str, Any]]] = {}
    for e in stream:
        if e["ev"] == ev:
            found.setdefault(e.get("sym") or e["T"], []).append(e)
    assert found
    return found


def test_the_sims_quotes_come_back_from_their_records(stream: list[dict[str, Any]]) -> None:
    for symbol, quotes in by_symbol(stream, "Q").items():
        rows = records([quote_record(q) for q in quotes], codec.QUOTE_DTYPE)
        assert json_ready(polygon.encode_quotes_json(rows, symbol)) == quotes


def test_the_sims_aggregates_come_back_from_their_records(stream: list[dict[str, Any]]) -> None:
    for ev in ("A", "AM"):
        for symbol, aggs in by_symbol(stream, ev).items():
            rows = records([agg_record(a) for a in aggs], codec.AGG_DTYPE)
            assert json_ready(polygon.encode_aggs_json(rows, ev, symbol)) == aggs


def test_the_sims_bands_come_back_from_their_records(stream: list[dict[str, Any]]) -> None:
    for symbol, bands in by_symbol(stream, "LULD").items():
        rows = records([luld_record(b) for b in bands], codec.LULD_DTYPE)
        assert json_ready(polygon.encode_luld_json(rows, symbol)) == bands


@pytest.mark.parametrize(
    "event",
    [
        {"ev": "Q", "sym": "A", "t": 5},  # only what is required
        {"ev": "Q", "sym": "A", "bp": 0.0, "ap": 1e9, "i": [], "t": 0, "q": -3},
        {"ev": "Q", "sym": "A", "bs": 2**32 - 1, "c": 65535, "i": [1, 2, 3, 65535], "t": 1},
    ],
)
def test_absent_and_extreme_quote_keys_round_trip(event: dict[str, Any]) -> None:
    rows = records([quote_record(event)], codec.QUOTE_DTYPE)
    assert json_ready(polygon.encode_quotes_json(rows, "A")) == [event]


@pytest.mark.parametrize(
    "event",
    [
        {"ev": "AM", "sym": "X", "s": 0, "e": 60_000},
        {"ev": "A", "sym": "X", "v": 1.5, "av": 10**12, "z": 0.25, "s": 1, "e": 2, "otc": True},
        {"ev": "A", "sym": "X", "o": 1.0, "c": 2.0, "s": 1, "e": 2, "otc": False},
    ],
)
def test_absent_and_fractional_aggregate_keys_round_trip(event: dict[str, Any]) -> None:
    rows = records([agg_record(event)], codec.AGG_DTYPE)
    assert polygon.encode_aggs_json(rows, event["ev"], "X") == [event]
    whole = polygon.encode_aggs_json(rows, event["ev"], "X")[0]
    assert all(type(whole[key]) is type(event[key]) for key in event)  # int stays int


def test_a_message_of_any_kind_decodes_to_its_events(stream: list[dict[str, Any]]) -> None:
    quotes = by_symbol(stream, "Q")["AAPL"][:3]
    rows = records([quote_record(q) for q in quotes], codec.QUOTE_DTYPE)
    frame = codec.encode(codec.event_topic("Q", "AAPL"), codec.Kind.QUOTES, 9, 4, 3, rows.tobytes())
    message = codec.decode(frame)
    assert (message.topic, message.kind, message.count) == ("Q.AAPL", codec.Kind.QUOTES, 3)
    assert polygon.encode_events_json(message) == quotes
    minute = by_symbol(stream, "AM")["AAPL"][:1]
    rows = records([agg_record(a) for a in minute], codec.AGG_DTYPE)
    frame = codec.encode(
        codec.event_topic("AM", "AAPL"), codec.Kind.AGGREGATES, 9, 1, 1, rows.tobytes()
    )
    assert polygon.encode_events_json(codec.decode(frame)) == minute
    raw = b'[{"ev":"NOI","T":"AAPL","x":10},{"ev":"NOI","T":"A"}]'
    frame = codec.encode(codec.raw_topic("NOI"), codec.Kind.RAW, 9, 1, 2, raw)
    message = codec.decode(frame)
    assert codec.topic_event(message.topic) == ("raw", "NOI")
    assert polygon.encode_events_json(message) == [
        {"ev": "NOI", "T": "AAPL", "x": 10},
        {"ev": "NOI", "T": "A"},
    ]
    bars = codec.encode(b"500Ms.A\x00", codec.Kind.BARS, 9, 1, 0, b"")
    with pytest.raises(WireError):
        polygon.encode_events_json(codec.decode(bars))


def test_a_record_payload_of_the_wrong_length_is_refused() -> None:
    frame = codec.encode(codec.event_topic("Q", "A"), codec.Kind.QUOTES, 1, 1, 2, b"x" * 64)
    with pytest.raises(WireError, match="64 payload bytes for 2 records"):
        codec.decode(frame)


def test_trades_come_back_without_what_the_wire_does_not_carry() -> None:
    trades = Market(3, seed=1).trades(300, NOW)
    for symbol in {t["sym"] for t in trades}:
        mine = [t for t in trades if t["sym"] == symbol]
        rows = np.zeros(len(mine), codec.TRADE_DTYPE)
        for k, t in enumerate(mine):
            c = t.get("c", [])
            rows[k] = (
                t["t"], t["p"], float(t["ds"]), t["q"], t.get("trft", 0), t.get("trfi", 0),
                t["x"], t["z"], len(c), [*c, *[0] * (8 - len(c))], [0, 0],
            )  # fmt: skip
        expected = []
        for t in mine:
            kept = {k: v for k, v in t.items() if k not in ("i", "pt", "ds")}
            if not float(t["ds"]).is_integer():
                kept["ds"] = t["ds"]
            expected.append(kept)
        assert json_ready(polygon.encode_trades_json(rows, symbol)) == expected
