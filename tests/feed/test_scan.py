"""The numba scanner reads exactly what msgspec reads, and gives up on everything else."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.feed import scan, upstream

NOW = 1_781_622_376_100


def scan_one(frame: bytes, *, python: bool = False) -> tuple[int, scan.Columns, scan.SymbolTable]:
    table = scan.SymbolTable()
    columns = scan.Columns(len(frame) // scan.MIN_TRADE_BYTES + 1)
    if not python:
        return columns.scan(frame, 0, table), columns, table
    # py_func: the same code as plain Python (scan_frame itself is plain with NUMBA_DISABLE_JIT=1)
    rows = getattr(scan.scan_frame, "py_func", scan.scan_frame)(
        np.frombuffer(frame, np.uint8), 0, columns.t, columns.p, columns.s, columns.q,
        columns.trft, columns.trfi, columns.x, columns.z, columns.nc, columns.c, columns.ids,
        columns.ints, columns.reals, columns.rows,
        table.arrays, scan._SYMBOL_BYTES, scan._POW10,
    )  # fmt: skip
    return int(rows), columns, table


def reference(frame: bytes) -> list[tuple[Any, ...]]:
    """What the msgspec path reads from the same bytes."""
    rows = []
    for trade in msgspec.json.decode(frame, type=list[upstream.Trade]):
        size = float(trade.ds) if trade.ds is not None else float(trade.s)  # type: ignore[arg-type]
        codes = trade.c or []
        rows.append(
            (trade.sym, trade.t, trade.p, size, trade.q, trade.trft, trade.trfi, trade.x,
             trade.z, codes)
        )  # fmt: skip
    return rows


def scanned(columns: scan.Columns, table: scan.SymbolTable, n: int) -> list[tuple[Any, ...]]:
    rows = []
    for i in range(n):
        codes = columns.c[i, : columns.nc[i]].tolist()
        rows.append(
            (table.name(int(columns.ids[i])), int(columns.t[i]), float(columns.p[i]),
             float(columns.s[i]), int(columns.q[i]), int(columns.trft[i]),
             int(columns.trfi[i]), int(columns.x[i]), int(columns.z[i]), codes)
        )  # fmt: skip
    return rows


def decimal_text(value: float, draw: Any) -> str:
    """A JSON number for ``value`` in one of the spellings a feed might use."""
    style = draw(st.sampled_from(["repr", *["rounded"] * 8, *["fixed"] * 4, *["padded"] * 4]))
    if style == "repr" or not math.isfinite(value):  # 17 significant digits: usually a bail
        return repr(value)
    if style == "rounded":
        return repr(round(value, draw(st.integers(0, 8))))
    digits = draw(st.integers(0, 6))
    text = f"{value:.{digits}f}"
    return text + "0" * draw(st.integers(0, 2)) if "." in text and style == "padded" else text


@st.composite
def frames(draw: Any) -> tuple[bytes, int]:
    events = []
    for _ in range(draw(st.integers(1, 12))):
        fields: list[tuple[str, str]] = [
            ("ev", '"T"'),
            ("sym", orjson.dumps(draw(st.sampled_from(["A", "AA", "AAPL", "BRK.A", "X:Y/Z_1-2"]))).decode()),
            ("p", decimal_text(draw(st.floats(1e-4, 1e6)), draw)),
            ("t", str(draw(st.integers(0, NOW)))),
        ]  # fmt: skip
        if draw(st.booleans()):
            fields.append(("s", str(draw(st.integers(0, 10**9)))))
            if draw(st.booleans()):
                fields.append(("ds", '"' + decimal_text(draw(st.floats(0, 1e6)), draw) + '"'))
        else:
            fields.append(("ds", '"' + decimal_text(draw(st.floats(0, 1e6)), draw) + '"'))
        optional = {
            "i": orjson.dumps(str(draw(st.integers(0, 10**12)))).decode(),
            "x": str(draw(st.integers(0, 65535))),
            "z": str(draw(st.integers(0, 255))),
            "q": str(draw(st.integers(-(10**17), 10**17))),
            "pt": str(draw(st.integers(0, NOW))),
            "trfi": str(draw(st.integers(0, 65535))),
            "trft": str(draw(st.integers(0, NOW))),
            "c": orjson.dumps(draw(st.lists(st.integers(0, 255), max_size=8))).decode(),
        }
        for key in draw(st.lists(st.sampled_from(sorted(optional)), unique=True)):
            fields.append((key, optional[key]))
        order = draw(st.permutations(fields))
        space = draw(st.sampled_from(["", " ", "\n  "]))
        events.append("{" + f",{space}".join(f'"{k}":{space}{v}' for k, v in order) + "}")
    return ("[" + ",".join(events) + "]").encode(), len(events)


@settings(deadline=None)  # the first example may compile the numba scanner
@given(frames())
def test_scanner_reads_exactly_what_msgspec_reads(case: tuple[bytes, int]) -> None:
    frame, count = case
    rows, columns, table = scan_one(frame)
    try:
        expected = reference(frame)
    except msgspec.ValidationError:  # an invalid trade: the scanner must leave it to msgspec
        assert rows == scan.BAIL
        return
    if rows == scan.BAIL:  # allowed (e.g. 16+ significant digits), never a wrong value
        return
    assert rows == count
    assert scanned(columns, table, rows) == expected


def test_real_vendor_frames_are_scanned_not_bailed() -> None:
    frame = (
        b'[{"ev":"T","sym":"AAPL","i":"143541","x":4,"p":297.845,"s":40,"t":1781622376036,'
        b'"pt":1781622376029,"q":4938312,"z":3,"trfi":202,"trft":1781622376036,"ds":"40.0"},'
        b' {"ev":"T","sym":"BRK.A","x":12,"p":712000.5,"s":1,"c":[14, 37],"t":1781622376040,"q":7}]'
    )
    for python in (False, True):
        rows, columns, table = scan_one(frame, python=python)
        assert rows == 2
        assert scanned(columns, table, rows) == reference(frame)


def test_an_empty_array_is_zero_trades() -> None:
    assert scan_one(b" [ ] ")[0] == 0


@pytest.mark.parametrize(
    "frame",
    [
        b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]',
        b'[{"ev":"Q","sym":"AAPL"}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"new_key":1}]',
        b'[{"ev":"T","sym":"AA\\u0050L","p":1.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5e2,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"c":null}]',
        b'[{"ev":"T","sym":"AAPL","p":1.2345678901234567,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":-1.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":0,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1}]',
        b'[{"ev":"T","p":1.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"BRK A","p":1.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"' + b"A" * 33 + b'","p":1.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1.5}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":-1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"ds":"1e3","t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"ds":" 5","t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"c":[1,2,3,4,5,6,7,8,9]}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"c":[256]}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"pt":1.2.3}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"pt":-}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"pt":"1"}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1,"x":65536}]',
        b'[{"ev":"T","sym":"AAPL","p":01.5,"s":1,"t":1}]',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1}',
        b'[{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1}] x',
        b'{"ev":"T","sym":"AAPL","p":1.5,"s":1,"t":1}',
        b"[1]",
        b"",
    ],
)
def test_scanner_gives_up_on_anything_it_is_not_sure_about(frame: bytes) -> None:
    assert scan_one(frame)[0] == scan.BAIL
    assert scan_one(frame, python=True)[0] == scan.BAIL


def test_frames_the_scanner_refuses_keep_their_place_in_arrival_order() -> None:
    decoder = upstream.EventDecoder()
    fast = b'[{"ev":"T","sym":"A","p":1.5,"s":1,"t":10,"q":1}]'
    slow = b'[{"ev":"T","sym":"A","p":1.5e0,"s":1,"t":11,"q":2},{"ev":"NOI"}]'
    decoded = decoder.decode([fast, slow, fast.replace(b'"q":1', b'"q":3')], NOW)
    assert decoded.trades.records[0]["q"].tolist() == [1, 2, 3]
    assert decoder.stats.unknown_events == 1


def test_symbols_get_the_same_id_on_both_paths() -> None:
    decoder = upstream.EventDecoder()
    slow = b'[{"ev":"T","sym":"MSFT","p":1e1,"s":1,"t":1}]'
    fast = b'[{"ev":"T","sym":"MSFT","p":10,"s":1,"t":2}]'
    decoded = decoder.decode([slow, fast], NOW)
    assert decoded.trades.topics == [b"T.MSFT\x00"]
    assert decoded.trades.records[0]["t"].tolist() == [1, 2]
    assert decoder.symbols.intern(b"MSFT") == 0


def test_the_symbol_table_interns_many_symbols_without_mixing_them() -> None:
    table = scan.SymbolTable()
    names = [f"S{i}".encode() for i in range(20_000)]
    ids = [table.intern(name) for name in names]
    assert ids == list(range(20_000))
    assert [table.intern(name) for name in names[::997]] == ids[::997]
    assert table.name(12_345) == "S12345"
    assert table.intern(b"") == -1
    assert table.intern(b"A" * 33) == -1


@pytest.mark.parametrize(
    ("price", "size"),
    [
        ("297.845", '"40.0"'),
        ("1", '"-0.0"'),
        ("0.0001", '"0.0125"'),
        ("12.50", '"100.000"'),
        ("999999999999999", '"0"'),
        ("1.0000000000001", '"123456789012345"'),
        ("0.1", '"0.3"'),
    ],
)
def test_number_spellings_convert_to_the_same_doubles_as_msgspec_and_float(
    price: str, size: str
) -> None:
    frame = f'[{{"ev":"T","sym":"A","p":{price},"ds":{size},"t":1}}]'.encode()
    rows, columns, _ = scan_one(frame)
    assert rows == 1
    assert columns.p[0].tobytes() == np.float64(float(price)).tobytes()
    assert columns.s[0].tobytes() == np.float64(float(size.strip('"'))).tobytes()


@pytest.mark.parametrize("python", [False, True], ids=["jit", "py_func"])
@pytest.mark.parametrize(
    ("value", "column", "reason", "scanned"),
    [
        (b'"p":1000000000.5,"s":1', "p", "price", 1_000_000_000.5),
        (b'"p":1000000001,"s":1', "p", "price", 1_000_000_001.0),
        (b'"p":1e308,"s":1', "p", "price", None),  # an exponent: left to msgspec
        (b'"p":10.5,"s":1000000000001', "s", "size", 1_000_000_000_001.0),
        (b'"p":10.5,"ds":"1000000000000.5"', "s", "size", 1_000_000_000_000.5),
        (b'"p":10.5,"ds":"1e13"', "s", "size", None),
    ],
)
def test_values_beyond_the_input_bounds_are_read_exactly_then_rejected_on_either_path(
    python: bool, value: bytes, column: str, reason: str, scanned: float | None
) -> None:
    """The scanner never judges a value (msgspec's path would not either): it reads it, or
    bails; the decoder rejects it after either, so the two paths still agree."""
    bad = b'{"ev":"T","sym":"A",' + value + b',"t":' + str(NOW - 5).encode() + b"}"
    good = b'{"ev":"T","sym":"A","p":10.5,"s":100,"t":%d}'
    data = b"[" + good % (NOW - 9) + b"," + bad + b"," + good % (NOW - 1) + b"]"
    rows, columns, _ = scan_one(data, python=python)
    if scanned is None:
        assert rows == scan.BAIL
    else:
        assert rows == 3
        assert getattr(columns, column)[1] == scanned
    decoder = upstream.EventDecoder()
    decoded = decoder.decode([data], NOW)
    assert decoded.trades.records[0]["t"].tolist() == [NOW - 9, NOW - 1]
    assert +decoder.stats.rejected == {reason: 1}
    assert decoder.stats.bad_messages == 1
