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
import orjson
import pyarrow as pa
import pyarrow.compute as pc
from numba import njit

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
    nc = records["nc"]
    offsets = np.empty(n + 1, np.int32)
    codes = np.empty(int(nc.sum(dtype=np.int64)), np.int32)
    _flatten_conditions(nc, records["c"], offsets, codes)
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


@njit(cache=True)
def _flatten_conditions(nc, c, offsets, codes):  # type: ignore[no-untyped-def]
    """The first ``nc[i]`` codes of every row of ``c``, one after another, and where each row's
    start (Arrow list offsets)."""
    k = 0
    for i in range(len(nc)):
        offsets[i] = k
        for j in range(nc[i]):
            codes[k] = c[i, j]
            k += 1
    offsets[len(nc)] = k


def warm_up() -> None:
    """Compile (or load from numba's cache) the kernels now rather than on the first trades."""
    table = table_from_records(np.zeros(1, codec.TRADE_DTYPE), ["A"], np.zeros(1, np.int32))
    event_texts(table)


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


@dataclass(frozen=True)
class EventTexts:
    """Rows as Polygon trade events in JSON text, one after another: event ``i`` is
    ``data[offsets[i] : offsets[i + 1] - 1]`` (each is followed by a comma), so a frame of
    events ``i`` to ``j`` is one slice (:meth:`frame`)."""

    data: bytes
    offsets: np.ndarray

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def event(self, i: int) -> bytes:
        return self.data[self.offsets[i] : self.offsets[i + 1] - 1]

    def frame(self, start: int, stop: int) -> str:
        """Events ``start`` to ``stop`` (exclusive) as one frame: a JSON array."""
        return "[" + self.data[self.offsets[start] : self.offsets[stop] - 1].decode() + "]"


def event_texts(table: pa.Table) -> EventTexts:
    """:func:`trade_events` as JSON text, written by one compiled loop (the replay's hot path:
    no dict per trade). Prices and fractional sizes are written as the shortest text that
    reads back as the same double (Arrow's float formatting); a ticker or id that needs
    escaping is escaped by orjson."""
    n = table.num_rows
    if n == 0:
        return EventTexts(b"", np.zeros(1, np.int64))
    table = table.combine_chunks()
    ticker = pc.dictionary_encode(table["ticker"].chunk(0))
    names = [orjson.dumps(name) for name in ticker.dictionary.to_pylist()]
    sym_data, sym_offsets = _joined(names)
    size = table["size"].chunk(0).to_numpy()
    whole = np.floor(size)
    ids = _json_strings(table["id"].chunk(0))
    conditions = table["conditions"].chunk(0)
    cond_offsets = np.asarray(pc.subtract(conditions.offsets, conditions.offsets[0]), np.int64)
    cond_values = np.asarray(conditions.flatten().to_numpy(zero_copy_only=False), np.int64)
    price = pc.cast(table["price"].chunk(0), pa.string())
    fractional = size != whole
    # the exact size as text of the fractional ones only, in row order (formatting costs)
    ds = pc.cast(pa.array(size[fractional]), pa.string())
    price_data, price_offsets = _buffers(price)
    ds_data, ds_offsets = _buffers(ds)
    id_data, id_offsets = _buffers(ids)
    columns = [_int_column(table[name].chunk(0), name in _NS_FIELDS) for name in _INT_FIELDS]
    # keys and punctuation (about 80 bytes), 7 integers of at most 20 characters, the texts
    bound = n * (240 + max(len(name) for name in names)) + 5 * len(cond_values)
    bound += int(price_offsets[-1] + ds_offsets[-1] + id_offsets[-1])
    out = np.empty(bound, np.uint8)
    offsets = np.empty(n + 1, np.int64)
    _write_events(
        out,
        offsets,
        ticker.indices.to_numpy(zero_copy_only=False).astype(np.int64),
        sym_data,
        sym_offsets,
        pc.is_valid(ids).to_numpy(zero_copy_only=False),
        id_data,
        id_offsets,
        price_data,
        price_offsets,
        whole.astype(np.int64),
        fractional,
        ds_data,
        ds_offsets,
        cond_offsets,
        cond_values,
        *(values for pair in columns for values in pair),
    )
    return EventTexts(out[: offsets[n]].tobytes(), offsets)


# integer fields in the order _write_events takes them (ms for the ns timestamps)
_INT_FIELDS = (
    "exchange",
    "tape",
    "sip_timestamp",
    "sequence_number",
    "trf_id",
    "trf_timestamp",
    "participant_timestamp",
)
_NS_FIELDS = {"sip_timestamp", "trf_timestamp", "participant_timestamp"}


def _int_column(column: pa.Array, ns: bool) -> tuple[np.ndarray, np.ndarray]:
    """(is valid, int64 values) of an integer column; ``ns``: floored to ms, exactly."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False)
    values = np.asarray(pc.fill_null(column, 0).to_numpy(zero_copy_only=False), np.int64)
    return valid, np.floor_divide(values, NS_PER_MS) if ns else values


def _joined(items: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(items) + 1, np.int64)
    np.cumsum([len(item) for item in items], out=offsets[1:])
    return np.frombuffer(b"".join(items) or b"\x00", np.uint8), offsets


def _buffers(strings: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """A string array's bytes and offsets (int64, from 0), nulls as empty."""
    strings = pc.fill_null(strings, "").cast(pa.string())
    _, offsets_buffer, data = strings.buffers()
    start = strings.offset
    offsets = np.frombuffer(offsets_buffer, np.int32)[start : start + len(strings) + 1]
    offsets = offsets.astype(np.int64)
    raw = np.frombuffer(data, np.uint8) if data is not None and data.size else np.zeros(1, np.uint8)
    return raw[offsets[0] :], offsets - offsets[0]


def _json_strings(column: pa.Array) -> pa.Array:
    """Strings as JSON string literals (null stays null)."""
    quoted = pc.binary_join_element_wise('"', column, '"', "")
    needs = pc.fill_null(pc.match_substring_regex(column, r'["\\\x00-\x1f]'), False)
    if not pc.any(needs).as_py():
        return quoted
    values = quoted.to_pylist()
    for i in np.flatnonzero(needs.to_numpy(zero_copy_only=False)):
        values[i] = orjson.dumps(column[int(i)].as_py()).decode()
    return pa.array(values, pa.string())


def _key(text: str) -> np.ndarray:
    return np.frombuffer(text.encode(), np.uint8).copy()


_EV = _key('{"ev":"T","sym":')
_X = _key(',"x":')
_I = _key(',"i":')
_Z = _key(',"z":')
_P = _key(',"p":')
_S = _key(',"s":')
_DS = _key(',"ds":"')
_C = _key(',"c":[')
_T_KEY = _key(',"t":')
_Q = _key(',"q":')
_TRFI = _key(',"trfi":')
_TRFT = _key(',"trft":')
_PT = _key(',"pt":')


@njit(cache=True)
def _put(out, pos, data, start, stop):  # type: ignore[no-untyped-def]
    for k in range(start, stop):
        out[pos] = data[k]
        pos += 1
    return pos


@njit(cache=True)
def _itoa(out, pos, value):  # type: ignore[no-untyped-def]
    if value < 0:
        out[pos] = 45  # -
        pos += 1
        value = -value
    start = pos
    while True:
        out[pos] = 48 + value % 10
        pos += 1
        value //= 10
        if value == 0:
            break
    i, j = start, pos - 1
    while i < j:
        out[i], out[j] = out[j], out[i]
        i += 1
        j -= 1
    return pos


@njit(cache=True)
def _write_events(  # type: ignore[no-untyped-def]
    out, offsets, sym, sym_data, sym_offsets, has_id, id_data, id_offsets,
    price_data, price_offsets, s_int, fractional, ds_data, ds_offsets, cond_offsets,
    cond_values, has_x, x, has_z, z, has_t, t, has_q, q, has_trfi, trfi, has_trft, trft,
    has_pt, pt,
):  # fmt: skip
    """Every row as a Polygon trade event in JSON, each followed by a comma."""
    pos = 0
    f = 0  # fractional sizes so far
    for i in range(len(sym)):
        offsets[i] = pos
        pos = _put(out, pos, _EV, 0, len(_EV))
        pos = _put(out, pos, sym_data, sym_offsets[sym[i]], sym_offsets[sym[i] + 1])
        if has_x[i]:
            pos = _put(out, pos, _X, 0, len(_X))
            pos = _itoa(out, pos, x[i])
        if has_id[i]:
            pos = _put(out, pos, _I, 0, len(_I))
            pos = _put(out, pos, id_data, id_offsets[i], id_offsets[i + 1])
        if has_z[i]:
            pos = _put(out, pos, _Z, 0, len(_Z))
            pos = _itoa(out, pos, z[i])
        pos = _put(out, pos, _P, 0, len(_P))
        pos = _put(out, pos, price_data, price_offsets[i], price_offsets[i + 1])
        pos = _put(out, pos, _S, 0, len(_S))
        pos = _itoa(out, pos, s_int[i])
        if fractional[i]:
            pos = _put(out, pos, _DS, 0, len(_DS))
            pos = _put(out, pos, ds_data, ds_offsets[f], ds_offsets[f + 1])
            f += 1
            out[pos] = 34  # "
            pos += 1
        if cond_offsets[i + 1] > cond_offsets[i]:
            pos = _put(out, pos, _C, 0, len(_C))
            for k in range(cond_offsets[i], cond_offsets[i + 1]):
                if k > cond_offsets[i]:
                    out[pos] = 44  # ,
                    pos += 1
                pos = _itoa(out, pos, cond_values[k])
            out[pos] = 93  # ]
            pos += 1
        pos = _put(out, pos, _T_KEY, 0, len(_T_KEY))
        pos = _itoa(out, pos, t[i])
        if has_q[i]:
            pos = _put(out, pos, _Q, 0, len(_Q))
            pos = _itoa(out, pos, q[i])
        if has_trfi[i]:
            pos = _put(out, pos, _TRFI, 0, len(_TRFI))
            pos = _itoa(out, pos, trfi[i])
        if has_trft[i]:
            pos = _put(out, pos, _TRFT, 0, len(_TRFT))
            pos = _itoa(out, pos, trft[i])
        if has_pt[i]:
            pos = _put(out, pos, _PT, 0, len(_PT))
            pos = _itoa(out, pos, pt[i])
        out[pos] = 125  # }
        out[pos + 1] = 44  # ,
        pos += 2
    offsets[len(sym)] = pos


def _ms_or_none(column: pa.ChunkedArray | pa.Array) -> list[int | None]:
    """Nanoseconds floored to ms (exactly, in int64), None where null."""
    valid = pc.is_valid(column).to_numpy(zero_copy_only=False).tolist()
    ms = np.floor_divide(pc.fill_null(column, 0).to_numpy(), NS_PER_MS).tolist()
    return [m if v else None for m, v in zip(ms, valid, strict=True)]


def _empty_lists(n: int) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.int32()))
