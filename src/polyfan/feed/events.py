"""Polygon's other stocks events (``Q``, ``A``, ``AM``, ``LULD``): types, checks, messages.

The trade decoder (:class:`polyfan.feed.upstream.EventDecoder`) reads these events with the
numba scanner or, for a frame the scanner leaves, with msgspec into the types below; both paths
fill the same columns (``scan.QUOTE_LAYOUT``, ``AGG_LAYOUT``, ``LULD_LAYOUT``). This module
holds what is particular to each kind:

- the msgspec types, which validate what a type can say (integers within their record field,
  required keys, at most ``codec.MAX_INDICATORS`` indicators) and keep which optional keys an
  event had (``UNSET``);
- :func:`fill`: decoded events into columns, with the ``has`` bits of codec.py;
- :data:`KINDS`: per kind, the checks on values (prices within ``[0, MAX_PRICE]``, volumes
  within ``[0, MAX_VOLUME]``, no timestamp more than 5 s ahead of the wall clock...) run on the
  columns once per drain, vectorized, whichever parser filled them; and the record dtype.

Absent numbers are 0 in the columns, which every check accepts. A rejected event is skipped,
counted by kind and named (rate-limited) by the decoder, as a rejected trade is.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
import numpy as np
from msgspec import UNSET, Meta, UnsetType

from polyfan.feed import scan
from polyfan.wire import codec

FUTURE_LIMIT_MS = 5_000  # as for trades: an event stamped further ahead is rejected

_U8 = Annotated[int, Meta(ge=0, le=255)]
_U16 = Annotated[int, Meta(ge=0, le=65_535)]
_U32 = Annotated[int, Meta(ge=0, le=2**32 - 1)]
_I64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
_NON_NEGATIVE_I64 = Annotated[int, Meta(ge=0, le=2**63 - 1)]
_INDICATORS = Annotated[list[_U16], Meta(max_length=codec.MAX_INDICATORS)]


class Quote(msgspec.Struct, tag_field="ev", tag="Q", gc=False):
    """One ``Q`` event (NBBO quote); keys not listed here are ignored."""

    sym: str
    t: _NON_NEGATIVE_I64
    bx: _U16 | UnsetType = UNSET
    bp: float | UnsetType = UNSET
    bs: _U32 | UnsetType = UNSET
    ax: _U16 | UnsetType = UNSET
    ap: float | UnsetType = UNSET
    as_: _U32 | UnsetType = msgspec.field(default=UNSET, name="as")
    c: _U16 | UnsetType = UNSET
    i: _INDICATORS | UnsetType = UNSET
    q: _I64 | UnsetType = UNSET
    z: _U8 | UnsetType = UNSET


class SecondAggregate(msgspec.Struct, tag_field="ev", tag="A", gc=False):
    """One ``A`` event (Polygon's per-second bar); ``AM`` is :class:`MinuteAggregate`."""

    sym: str
    s: _NON_NEGATIVE_I64
    e: _NON_NEGATIVE_I64
    v: float | UnsetType = UNSET
    av: float | UnsetType = UNSET
    op: float | UnsetType = UNSET
    vw: float | UnsetType = UNSET
    o: float | UnsetType = UNSET
    c: float | UnsetType = UNSET
    h: float | UnsetType = UNSET
    l: float | UnsetType = UNSET  # noqa: E741 (Polygon's name)
    a: float | UnsetType = UNSET
    z: float | UnsetType = UNSET
    otc: bool | UnsetType = UNSET


class MinuteAggregate(SecondAggregate, tag="AM"):
    """One ``AM`` event (Polygon's per-minute bar)."""


class Luld(msgspec.Struct, tag_field="ev", tag="LULD", gc=False):
    """One ``LULD`` event (limit-up / limit-down bands); Polygon names the symbol ``T``."""

    sym: str = msgspec.field(name="T")
    t: _NON_NEGATIVE_I64
    h: float | UnsetType = UNSET
    l: float | UnsetType = UNSET  # noqa: E741
    i: _INDICATORS | UnsetType = UNSET
    z: _U8 | UnsetType = UNSET
    q: _I64 | UnsetType = UNSET


TYPES: dict[str, type[msgspec.Struct]] = {
    "Q": Quote,
    "A": SecondAggregate,
    "AM": MinuteAggregate,
    "LULD": Luld,
}

# Optional keys: (attribute, column, has bit)
_QUOTE_KEYS = (
    ("bx", "bx", codec.QUOTE_BX), ("bp", "bp", codec.QUOTE_BP), ("bs", "bs", codec.QUOTE_BS),
    ("ax", "ax", codec.QUOTE_AX), ("ap", "ap", codec.QUOTE_AP), ("as_", "as", codec.QUOTE_AS),
    ("c", "c", codec.QUOTE_C), ("q", "q", codec.QUOTE_Q), ("z", "z", codec.QUOTE_Z),
)  # fmt: skip
_AGG_KEYS = (
    ("v", "v", codec.AGG_V), ("av", "av", codec.AGG_AV), ("op", "op", codec.AGG_OP),
    ("vw", "vw", codec.AGG_VW), ("o", "o", codec.AGG_O), ("c", "c", codec.AGG_C),
    ("h", "h", codec.AGG_H), ("l", "l", codec.AGG_L), ("a", "a", codec.AGG_A),
    ("z", "z", codec.AGG_Z), ("otc", "otc", codec.AGG_OTC),
)  # fmt: skip
_LULD_KEYS = (
    ("h", "h", codec.LULD_H), ("l", "l", codec.LULD_L), ("z", "z", codec.LULD_Z),
    ("q", "q", codec.LULD_Q),
)  # fmt: skip

# Which key a msgspec error names -> the reason a rejection is counted under.
REASONS = {
    "Q": {"sym": "symbol", "t": "timestamp", "bp": "price", "ap": "price", "bs": "size",
          "as": "size", "i": "indicators"},
    "A": {"sym": "symbol", "s": "timestamp", "e": "timestamp", "v": "size", "av": "size",
          "z": "size", **{key: "price" for key in ("op", "vw", "o", "c", "h", "l", "a")}},
    "LULD": {"T": "symbol", "t": "timestamp", "h": "price", "l": "price", "i": "indicators"},
}  # fmt: skip
REASONS["AM"] = REASONS["A"]


def fill(
    kind: int, events: list[Any], columns: scan.EventColumns, start: int, ids: list[int]
) -> int:
    """Write msgspec-decoded events of one kind (``scan.QUOTES`` ...) into ``columns`` from row
    ``start``, with their symbol ids; return the next free row."""
    n = len(events)
    end = start + n
    rows = slice(start, end)
    has = np.zeros(n, np.int64)
    keys: tuple[tuple[str, str, int], ...]
    required: tuple[str, ...]
    if kind == scan.QUOTES:
        keys, required, indicator_bit = _QUOTE_KEYS, ("t",), codec.QUOTE_I
    elif kind == scan.AGGREGATES:
        keys, required, indicator_bit = _AGG_KEYS, ("s", "e"), 0
        columns.column("minute")[rows] = [type(e) is MinuteAggregate for e in events]
    else:
        keys, required, indicator_bit = _LULD_KEYS, ("t",), codec.LULD_I
    for name in required:
        columns.column(name)[rows] = [getattr(e, name) for e in events]
    for attribute, column, bit in keys:
        values = [getattr(e, attribute) for e in events]
        present = np.fromiter((v is not UNSET for v in values), np.bool_, n)
        columns.column(column)[rows] = [0 if v is UNSET else v for v in values]
        has[present] |= bit
    if indicator_bit:
        found = [e.i for e in events]
        present = np.fromiter((i is not UNSET for i in found), np.bool_, n)
        has[present] |= indicator_bit
        lists = [[] if i is UNSET else i for i in found]
        counts = np.fromiter(map(len, lists), np.int64, n)
        columns.column("ni")[rows] = counts
        codes = columns.column("i")
        codes[rows] = 0
        if counts.any():
            at = np.repeat(np.arange(start, end), counts)
            slots = np.arange(len(at)) - np.repeat(np.cumsum(counts) - counts, counts)
            codes[at, slots] = [code for found_codes in lists for code in found_codes]
    columns.column("has")[rows] = has
    columns.column("ids")[rows] = ids
    return end


def _within(values: np.ndarray, high: float) -> np.ndarray:
    with np.errstate(invalid="ignore"):
        return (values >= 0) & (values <= high)


def _prices(*names: str) -> Callable[[scan.EventColumns, int, int], np.ndarray]:
    def check(columns: scan.EventColumns, n: int, now_ms: int) -> np.ndarray:
        ok = np.ones(n, np.bool_)
        for name in names:
            ok &= _within(columns.column(name)[:n], codec.MAX_PRICE)
        return ok

    return check


def _volumes(columns: scan.EventColumns, n: int, now_ms: int) -> np.ndarray:
    ok = np.ones(n, np.bool_)
    for name in ("v", "av", "z"):
        ok &= _within(columns.column(name)[:n], codec.MAX_VOLUME)
    return ok


def _symbol(columns: scan.EventColumns, n: int, now_ms: int) -> np.ndarray:
    return columns.column("ids")[:n] >= 0


def _not_ahead(name: str) -> Callable[[scan.EventColumns, int, int], np.ndarray]:
    def check(columns: scan.EventColumns, n: int, now_ms: int) -> np.ndarray:
        return columns.column(name)[:n] <= now_ms + FUTURE_LIMIT_MS

    return check


def _window(columns: scan.EventColumns, n: int, now_ms: int) -> np.ndarray:
    return columns.column("e")[:n] >= columns.column("s")[:n]


@dataclass(frozen=True)
class KindInfo:
    """What the decoder needs to know of one event kind's columns."""

    name: str  # what problems call one event
    kind: codec.Kind
    dtype: np.dtype
    # (reason, check): a check gives which of the first n rows pass, at a given wall time
    checks: tuple[tuple[str, Callable[[scan.EventColumns, int, int], np.ndarray]], ...]


KINDS = {
    scan.QUOTES: KindInfo(
        "quote",
        codec.Kind.QUOTES,
        codec.QUOTE_DTYPE,
        (("symbol", _symbol), ("price", _prices("bp", "ap")), ("future", _not_ahead("t"))),
    ),
    scan.AGGREGATES: KindInfo(
        "aggregate",
        codec.Kind.AGGREGATES,
        codec.AGG_DTYPE,
        (
            ("symbol", _symbol),
            ("price", _prices("o", "h", "l", "c", "vw", "op", "a")),
            ("size", _volumes),
            ("window", _window),
            ("future", _not_ahead("s")),
        ),
    ),
    # LULD's t: the documents say ms, their example is in microseconds: no future check
    scan.LULDS: KindInfo(
        "LULD",
        codec.Kind.LULD,
        codec.LULD_DTYPE,
        (("symbol", _symbol), ("price", _prices("h", "l"))),
    ),
}
