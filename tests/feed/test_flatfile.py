"""Flat-file columns: wire records in, Polygon's columns out; any flat-file table in, the same
schema out; rows out as Polygon WebSocket trade events."""

from __future__ import annotations

import numpy as np
import orjson
import pyarrow as pa
import pytest

from polyfan.errors import RecordingError
from polyfan.feed import flatfile
from polyfan.wire import codec


def wire_records(rows: list[dict[str, object]]) -> np.ndarray:
    records = np.zeros(len(rows), codec.TRADE_DTYPE)
    for i, row in enumerate(rows):
        codes = list(row.get("c", []))  # type: ignore[call-overload]
        records[i]["t"] = row["t"]
        records[i]["p"] = row["p"]
        records[i]["s"] = row["s"]
        records[i]["q"] = row.get("q", 0)
        records[i]["trft"] = row.get("trft", 0)
        records[i]["trfi"] = row.get("trfi", 0)
        records[i]["x"] = row.get("x", 0)
        records[i]["z"] = row.get("z", 0)
        records[i]["nc"] = len(codes)
        records[i]["c"][: len(codes)] = codes
    return records


def test_wire_records_become_the_flat_file_columns() -> None:
    records = wire_records(
        [
            {"t": 1_710_513_000_123, "p": 172.5, "s": 100, "q": 7, "x": 11, "z": 3},
            {"t": 1_710_513_000_124, "p": 172.505, "s": 0.5, "q": 9, "x": 4, "z": 3,
             "trfi": 202, "trft": 1_710_513_000_125, "c": [12, 37]},
            {"t": 1_710_513_000_124, "p": 10.0, "s": 1, "c": [255]},
        ]
    )  # fmt: skip
    table = flatfile.table_from_records(records, ["AAPL", "BRK.A"], np.array([0, 0, 1]))
    assert table.schema == flatfile.SCHEMA
    assert table.to_pylist() == [
        {"ticker": "AAPL", "conditions": [], "correction": 0, "exchange": 11, "id": None,
         "participant_timestamp": None, "price": 172.5, "sequence_number": 7,
         "sip_timestamp": 1_710_513_000_123_000_000, "size": 100.0, "tape": 3, "trf_id": None,
         "trf_timestamp": None},
        {"ticker": "AAPL", "conditions": [12, 37], "correction": 0, "exchange": 4, "id": None,
         "participant_timestamp": None, "price": 172.505, "sequence_number": 9,
         "sip_timestamp": 1_710_513_000_124_000_000, "size": 0.5, "tape": 3, "trf_id": 202,
         "trf_timestamp": 1_710_513_000_125_000_000},
        {"ticker": "BRK.A", "conditions": [255], "correction": 0, "exchange": 0, "id": None,
         "participant_timestamp": None, "price": 10.0, "sequence_number": 0,
         "sip_timestamp": 1_710_513_000_124_000_000, "size": 1.0, "tape": 0, "trf_id": None,
         "trf_timestamp": None},
    ]  # fmt: skip


def test_days_are_utc_dates_of_the_sip_time() -> None:
    ns = np.array([1_710_460_799_999_999_999, 1_710_460_800_000_000_000])
    days = flatfile.days_of(ns)
    assert [flatfile.day_name(int(d)) for d in days] == ["2024-03-14", "2024-03-15"]


def test_flat_file_conditions_parse_from_quoted_comma_lists() -> None:
    text = pa.array(["12,37", "", None, "14", " 2 , 41 ", "0"])
    assert flatfile.parse_conditions(text).to_pylist() == [[12, 37], [], [], [14], [2, 41], [0]]
    with pytest.raises(RecordingError, match="conditions"):
        flatfile.parse_conditions(pa.array(["12,x"]))


def test_normalize_finds_columns_by_name_and_fills_the_optional_ones() -> None:
    table = pa.table(
        {
            "size": pa.array([100, 5], pa.int64()),
            "ticker": ["A", "B"],
            "extra": [1, 2],
            "sip_timestamp": pa.array([5_000_000, 7_000_001], pa.int64()),
            "price": [1.5, 2.0],
            "conditions": ["37", ""],
            "trf_id": pa.array([None, 201], pa.int64()),
        }
    )
    out = flatfile.normalize(table)
    assert out.schema == flatfile.SCHEMA
    assert out.column("conditions").to_pylist() == [[37], []]
    assert out.column("correction").to_pylist() == [0, 0]
    assert out.column("trf_id").to_pylist() == [None, 201]
    assert out.column("id").to_pylist() == [None, None]
    assert out.column("size").to_pylist() == [100.0, 5.0]


def test_normalize_names_the_missing_required_columns() -> None:
    with pytest.raises(RecordingError, match="no column price, sip_timestamp"):
        flatfile.normalize(pa.table({"ticker": ["A"], "size": [1.0]}))


def test_normalize_takes_list_conditions_as_they_are() -> None:
    table = pa.table(
        {
            "ticker": ["A", "A"],
            "price": [1.0, 1.0],
            "size": [1.0, 1.0],
            "sip_timestamp": [1, 2],
            "conditions": pa.array([[12, 37], None], pa.list_(pa.int64())),
        }
    )
    assert flatfile.normalize(table).column("conditions").to_pylist() == [[12, 37], []]


def canonical(rows: list[dict[str, object]]) -> pa.Table:
    full = [{name: row.get(name) for name in flatfile.COLUMNS} for row in rows]
    for row in full:
        row["conditions"] = row["conditions"] or []
    return pa.Table.from_pylist(full, schema=flatfile.SCHEMA)


def test_select_keeps_the_time_window_and_symbols_and_counts_unusable_rows() -> None:
    ms = flatfile.NS_PER_MS
    table = canonical(
        [
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 999 * ms},
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 1_000 * ms},
            {"ticker": "B", "price": 1.0, "size": 1.0, "sip_timestamp": 1_500 * ms},
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 2_000 * ms - 1},
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 2_000 * ms},
        ]
    )
    chosen, unusable = flatfile.select(table, flatfile.Selection(1_000, 2_000, ("A",)))
    assert chosen["sip_timestamp"].to_pylist() == [1_000 * ms, 2_000 * ms - 1]
    assert unusable == 0
    everything, _ = flatfile.select(table, flatfile.Selection())
    assert everything.num_rows == 5


def test_time_order_is_a_stable_sort_of_sip_time() -> None:
    table = canonical(
        [
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 30, "id": "a"},
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 10, "id": "b"},
            {"ticker": "B", "price": 1.0, "size": 1.0, "sip_timestamp": 30, "id": "c"},
            {"ticker": "A", "price": 1.0, "size": 1.0, "sip_timestamp": 10, "id": "d"},
        ]
    )
    assert flatfile.in_time_order(table)["id"].to_pylist() == ["b", "d", "a", "c"]


def test_rows_become_polygon_trade_events_with_nulls_left_out() -> None:
    ms = flatfile.NS_PER_MS
    table = canonical(
        [
            {"ticker": "AAPL", "conditions": [12, 37], "exchange": 4, "id": "77", "price": 1.5,
             "sequence_number": 9, "sip_timestamp": 1_000 * ms + 999_999, "size": 0.5,
             "tape": 3, "trf_id": 202, "trf_timestamp": 1_001 * ms + 1,
             "participant_timestamp": 998 * ms},
            {"ticker": "A", "price": 2.0, "sip_timestamp": 5 * ms, "size": 300.0},
        ]
    )  # fmt: skip
    assert flatfile.trade_events(table) == [
        {"ev": "T", "sym": "AAPL", "x": 4, "i": "77", "z": 3, "p": 1.5, "s": 0, "ds": "0.5",
         "c": [12, 37], "t": 1_000, "q": 9, "trfi": 202, "trft": 1_001, "pt": 998},
        {"ev": "T", "sym": "A", "p": 2.0, "s": 300, "t": 5},
    ]  # fmt: skip


def test_event_texts_are_the_events_as_json_text_exactly() -> None:
    ms = flatfile.NS_PER_MS
    prices = [0.1, 100.0, 20.5, 1e-05, 172.505, 3.0000000000000004, 1e21, 7.25]
    rows: list[dict[str, object]] = []
    for i, price in enumerate(prices):
        rows.append(
            {"ticker": ["A", "BRK.A", 'odd"name', "T\\x"][i % 4], "price": price,
             "size": [100.0, 0.5, 1.0125, 0.0][i % 4], "sip_timestamp": 1_710_513_000_000 * ms + i,
             "conditions": [[], [12, 37], [14], []][i % 4], "exchange": [4, None][i % 2],
             "id": [None, "77", "a\nb"][i % 3], "tape": [1, 2, 3, None][i % 4],
             "sequence_number": [5, None][i % 2], "trf_id": [202, None, None][i % 3],
             "trf_timestamp": [ms * 9 + 1, None, None][i % 3],
             "participant_timestamp": [None, ms * 3 - 1][i % 2]}
        )  # fmt: skip
    table = canonical(rows)
    events = flatfile.trade_events(table)
    for part in (table, table.slice(3, 4), pa.concat_tables([table.slice(0, 2), table.slice(5)])):
        texts = flatfile.event_texts(part)
        expected = flatfile.trade_events(part)
        assert [orjson.loads(texts.event(i)) for i in range(len(texts))] == expected
        assert orjson.loads(texts.frame(0, len(texts))) == expected
    assert orjson.loads(flatfile.event_texts(table).frame(2, 5)) == events[2:5]
    assert len(flatfile.event_texts(table.slice(0, 0))) == 0


def test_the_kernels_plain_python_bodies_give_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """STYLE §2: the compiled kernels and their ``py_func`` agree (coverage runs see these)."""
    records = wire_records(
        [{"t": 5, "p": 1.25, "s": 0.5, "c": [12, 37, 255], "trfi": 201, "trft": 6, "x": 4},
         {"t": 6, "p": 100.0, "s": 300, "q": 7, "z": 1}]
    )  # fmt: skip
    rows = np.array([0, 1])
    compiled = flatfile.table_from_records(records, ["A", "BRK.A"], rows)
    compiled_texts = flatfile.event_texts(compiled)
    for name in ("_flatten_conditions", "_write_events"):
        kernel = getattr(flatfile, name)
        monkeypatch.setattr(flatfile, name, getattr(kernel, "py_func", kernel))
    plain = flatfile.table_from_records(records, ["A", "BRK.A"], rows)
    assert plain.equals(compiled)
    plain_texts = flatfile.event_texts(plain)
    assert plain_texts.data == compiled_texts.data
    assert plain_texts.offsets.tolist() == compiled_texts.offsets.tolist()
