"""Trades as Polygon's flat files lay them out: the columns, and the conversions both ways.

Pure (pyarrow arrays in, pyarrow arrays out; no file is opened here). ``polyfan record`` turns
the proxy's wire records into :data:`SCHEMA` tables (:func:`table_from_records`);
``polyfan replay`` reads a recording, any Parquet file or a flat file (``.csv``/``.csv.gz``)
and brings it to :data:`SCHEMA` (:func:`normalize`), then turns rows into Polygon WebSocket
trade events (:func:`trade_events`).

The columns are those of Polygon's stocks trades flat files (shared/polygon/protocol.md,
CONTRACT.md §10), timestamps in nanoseconds::

    ticker                 string
    conditions             list<int32>    [] for a regular trade
    correction             int32
    exchange               int32
    id                     string         null when unknown
    participant_timestamp  int64 ns       null when absent
    price                  float64
    sequence_number        int64
    sip_timestamp          int64 ns
    size                   float64
    tape                   int32
    trf_id                 int32          null when absent
    trf_timestamp          int64 ns       null when absent

What the wire does not carry is written as the closest correct value: the proxy's TRADE record
(docs/wire.md) has no trade id, no participant timestamp and no correction indicator, so a
recording has ``id`` and ``participant_timestamp`` null and ``correction`` 0; its timestamps are
the wire's milliseconds times 1,000,000; ``trf_id``/``trf_timestamp`` 0 on the wire ("absent")
are null.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from polyfan.errors import RecordingError
from polyfan.wire import codec

NS_PER_MS = 1_000_000
MS_PER_DAY = 86_400_000

SCHEMA = pa.schema(
    [
        pa.field("ticker", pa.string(), nullable=False),
        pa.field("conditions", pa.list_(pa.int32())),
        pa.field("correction", pa.int32()),
        pa.field("exchange", pa.int32()),
        pa.field("id", pa.string()),
        pa.field("participant_timestamp", pa.int64()),
        pa.field("price", pa.float64(), nullable=False),
        pa.field("sequence_number", pa.int64()),
        pa.field("sip_timestamp", pa.int64(), nullable=False),
        pa.field("size", pa.float64(), nullable=False),
        pa.field("tape", pa.int32()),
        pa.field("trf_id", pa.int32()),
        pa.field("trf_timestamp", pa.int64()),
    ]
)
COLUMNS = tuple(SCHEMA.names)
REQUIRED = ("ticker", "price", "sip_timestamp", "size")

# How a flat file's text columns are read before :func:`normalize` (conditions stay text: a
# quoted comma list such as "12,37", or empty).
CSV_TYPES: dict[str, pa.DataType] = {
    "ticker": pa.string(),
    "conditions": pa.string(),
    "correction": pa.int64(),
    "exchange": pa.int64(),
    "id": pa.string(),
    "participant_timestamp": pa.int64(),
    "price": pa.float64(),
    "sequence_number": pa.int64(),
    "sip_timestamp": pa.int64(),
    "size": pa.float64(),
    "tape": pa.int64(),
    "trf_id": pa.int64(),
    "trf_timestamp": pa.int64(),
}


def table_from_records(records: np.ndarray, symbols: Sequence[str], rows: np.ndarray) -> pa.Table:
    """Wire TRADE records (``codec.TRADE_DTYPE``) as a :data:`SCHEMA` table, in their order.

    ``rows[i]`` is the index into ``symbols`` of record ``i``'s ticker (the topic it came on).
    """
    n = len(records)
    ticker = pa.DictionaryArray.from_arrays(
        pa.array(rows, pa.int32()), pa.array(list(symbols), pa.string())
    ).cast(pa.string())
    nc = records["nc"].astype(np.int64)
    offsets = np.zeros(n + 1, np.int32)
    np.cumsum(nc, out=offsets[1:])
    used = np.arange(codec.MAX_CONDITIONS) < nc[:, None]
    codes = records["c"][used].astype(np.int32)
    trfi = records["trfi"]
    trft = records["trft"]
    columns = [
        ticker,
        pa.ListArray.from_arrays(pa.array(offsets), pa.array(codes, pa.int32())),
        pa.array(np.zeros(n, np.int32)),
        pa.array(records["x"].astype(np.int32)),
        pa.nulls(n, pa.string()),
        pa.nulls(n, pa.int64()),
        pa.array(records["p"]),
        pa.array(records["q"]),
        pa.array(records["t"] * NS_PER_MS),
        pa.array(records["s"]),
        pa.array(records["z"].astype(np.int32)),
        pa.array(trfi.astype(np.int32), mask=trfi == 0),
        pa.array(trft * NS_PER_MS, mask=trft == 0),
    ]
    return pa.Table.from_arrays(columns, schema=SCHEMA)


def days_of(sip_ns: np.ndarray) -> np.ndarray:
    """The UTC day (days since 1970-01-01) of each SIP timestamp in ns."""
    days: np.ndarray = np.floor_divide(sip_ns, MS_PER_DAY * NS_PER_MS)
    return days


def day_name(day: int) -> str:
    """``YYYY-MM-DD`` of a day index."""
    return str(np.datetime64(int(day), "D"))


def parse_conditions(text: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Flat-file conditions (``"12,37"``, ``"14"``, empty) as list<int32> (empty: ``[]``)."""
    trimmed = pc.utf8_trim_whitespace(text)
    empty = pc.or_kleene(pc.is_null(trimmed), pc.equal(trimmed, ""))
    filled = pc.if_else(empty, pa.scalar("0"), trimmed)
    try:
        lists = pc.split_pattern_regex(filled, r"\s*,\s*").cast(pa.list_(pa.int32()))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise RecordingError(f"conditions: not a comma list of integer codes ({exc})") from exc
    return pc.if_else(empty, pa.scalar([], pa.list_(pa.int32())), lists)


def missing_columns(names: Sequence[str]) -> list[str]:
    """The required columns a file lacks (columns are found by header name)."""
    return [c for c in REQUIRED if c not in names]


def normalize(table: pa.Table) -> pa.Table:
    """Any table with flat-file column names as :data:`SCHEMA`: columns found by name (extra
    ones dropped, optional missing ones null), types cast, text conditions parsed."""
    missing = missing_columns(table.column_names)
    if missing:
        raise RecordingError(
            f"no column {', '.join(missing)} (columns found by header name; "
            f"this file has {', '.join(table.column_names) or 'none'})"
        )
    n = table.num_rows
    columns = []
    for field in SCHEMA:
        if field.name not in table.column_names:
            if field.name == "conditions":
                columns.append(_empty_lists(n))
            elif field.name == "correction":
                columns.append(pa.array(np.zeros(n, np.int32)))
            else:
                columns.append(pa.nulls(n, field.type))
            continue
        column = table.column(field.name)
        try:
            if field.name == "conditions" and pa.types.is_string(column.type):
                column = parse_conditions(column)
            elif field.name == "conditions" and pa.types.is_null(column.type):
                column = pa.chunked_array([_empty_lists(n)])
            elif field.name == "conditions":
                column = pc.fill_null(column.cast(field.type), pa.scalar([], field.type))
            else:
                column = column.cast(field.type)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise RecordingError(f"column {field.name}: {exc}") from exc
        columns.append(column)
    return pa.Table.from_arrays(columns, schema=SCHEMA)


@dataclass(frozen=True)
class Selection:
    """What to replay: ``from_ms <= SIP time < to_ms`` and these symbols (None: all)."""

    from_ms: int | None = None
    to_ms: int | None = None
    symbols: tuple[str, ...] | None = None


def select(table: pa.Table, selection: Selection) -> tuple[pa.Table, int]:
    """Rows within ``selection`` and usable as trades, and how many usable rows were
    skipped for lacking a ticker, price, size or SIP time."""
    usable = pc.and_(
        pc.and_(pc.is_valid(table["ticker"]), pc.is_valid(table["price"])),
        pc.and_(pc.is_valid(table["size"]), pc.is_valid(table["sip_timestamp"])),
    )
    unusable = table.num_rows - pc.sum(usable.cast(pa.int64())).as_py() if table.num_rows else 0
    keep = usable
    sip = table["sip_timestamp"]
    if selection.from_ms is not None:
        keep = pc.and_(keep, pc.greater_equal(sip, selection.from_ms * NS_PER_MS))
    if selection.to_ms is not None:
        keep = pc.and_(keep, pc.less(sip, selection.to_ms * NS_PER_MS))
    if selection.symbols is not None:
        keep = pc.and_(keep, pc.is_in(table["ticker"], pa.array(selection.symbols, pa.string())))
    return table.filter(pc.fill_null(keep, False)), int(unusable or 0)


def in_time_order(table: pa.Table) -> pa.Table:
    """Sorted by SIP timestamp; rows with equal timestamps keep their order (a stable sort:
    a recording's arrival order, a flat file's sequence)."""
    order = np.argsort(table["sip_timestamp"].to_numpy(), kind="stable")
    return table.take(pa.array(order))


def trade_events(table: pa.Table) -> list[dict[str, Any]]:
    """Rows of a :data:`SCHEMA` table as Polygon WebSocket trade events, in row order:
    ``{"ev":"T","sym","x","i","z","p","s","c","t","q","trfi","trft","pt"}`` with ``t``, ``trft``
    and ``pt`` in ms (ns floored), ``s`` the whole shares and ``ds`` the exact size when it is
    fractional; null fields and empty conditions are left out, as Polygon leaves them out."""
    sip = table["sip_timestamp"].to_numpy()
    t_ms = np.floor_divide(sip, NS_PER_MS).tolist()
    size = table["size"].to_numpy()
    whole = np.floor(size)
    s_int = whole.astype(np.int64).tolist()
    fractional = (size != whole).tolist()
    sizes = size.tolist()
    columns = {
        name: table[name].to_pylist()
        for name in ("ticker", "exchange", "id", "tape", "price", "conditions", "sequence_number")
    }
    trfi = table["trf_id"].to_pylist()
    trft = _ms_or_none(table["trf_timestamp"])
    pt = _ms_or_none(table["participant_timestamp"])
    events = []
    for i, sym in enumerate(columns["ticker"]):
        event: dict[str, Any] = {"ev": "T", "sym": sym}
        x = columns["exchange"][i]
        if x is not None:
            event["x"] = x
        trade_id = columns["id"][i]
        if trade_id is not None:
            event["i"] = trade_id
        z = columns["tape"][i]
        if z is not None:
            event["z"] = z
        event["p"] = columns["price"][i]
        event["s"] = s_int[i]
        if fractional[i]:
            event["ds"] = repr(sizes[i])
        codes = columns["conditions"][i]
        if codes:
            event["c"] = codes
        event["t"] = t_ms[i]
        q = columns["sequence_number"][i]
        if q is not None:
            event["q"] = q
        if trfi[i] is not None:
            event["trfi"] = trfi[i]
        if trft[i] is not None:
            event["trft"] = trft[i]
        if pt[i] is not None:
            event["pt"] = pt[i]
        events.append(event)
    return events


def _ms_or_none(column: pa.ChunkedArray | pa.Array) -> list[int | None]:
    """Nanoseconds floored to ms (exactly, in int64), None where null."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False).tolist()
    ms = np.floor_divide(pc.fill_null(column, 0).to_numpy(), NS_PER_MS).tolist()
    return [m if v else None for m, v in zip(ms, valid, strict=True)]


def _empty_lists(n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32()))
