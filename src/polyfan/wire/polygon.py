"""Wire records back into Polygon's event dicts: what a subscriber hands to Polygon's clients.

The proxy turns every ``Q``, ``A``, ``AM`` and ``LULD`` event into a fixed-size record
(``codec.QUOTE_DTYPE``, ``AGG_DTYPE``, ``LULD_DTYPE``) that keeps which optional keys the event
had (``has``). These functions undo that: the dict they return for a record equals the event
the proxy received, key for key (tests/wire/test_polygon.py; unknown keys the proxy drops, such
as an aggregate's ``dv``, are not there). Polygon's integer keys come back as ``int``; prices
as ``float``; an aggregate's ``v``, ``av`` and ``z`` (integers in Polygon's documents, kept as
float64 for fractional shares) as ``int`` when whole.

Trades lose more on the wire (``i`` and ``pt`` are not carried, ``s``/``ds`` are one size):
:func:`encode_trades_json` gives ``s`` (whole shares) and ``ds`` only for a fractional size.

Every function returns JSON-ready dicts (``orjson.dumps`` them), in Polygon's key order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from polyfan.errors import WireError
from polyfan.wire import codec


def _number(value: float) -> int | float:
    """A volume as Polygon writes it: an integer when whole."""
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


def encode_trades_json(records: np.ndarray, symbol: str) -> list[dict[str, Any]]:
    """``T`` events for TRADE_DTYPE records (without ``i`` and ``pt``, which the wire lacks)."""
    events = []
    for t, p, s, q, trft, trfi, x, z, nc, c, _ in records.tolist():
        event: dict[str, Any] = {"ev": "T", "sym": symbol, "x": x, "p": p, "s": int(s)}
        if nc:
            event["c"] = [int(code) for code in c[:nc]]
        event.update(t=t, q=q, z=z)
        if trfi or trft:
            event.update(trfi=trfi, trft=trft)
        if not float(s).is_integer():
            event["ds"] = repr(s)
        events.append(event)
    return events


def encode_quotes_json(records: np.ndarray, symbol: str) -> list[dict[str, Any]]:
    """``Q`` events for QUOTE_DTYPE records, with exactly the keys each event had."""
    events = []
    for t, q, bp, ap, bs, as_, bx, ax, c, i, z, ni, has, _ in records.tolist():
        event: dict[str, Any] = {"ev": "Q", "sym": symbol}
        if has & codec.QUOTE_BX:
            event["bx"] = bx
        if has & codec.QUOTE_BP:
            event["bp"] = bp
        if has & codec.QUOTE_BS:
            event["bs"] = bs
        if has & codec.QUOTE_AX:
            event["ax"] = ax
        if has & codec.QUOTE_AP:
            event["ap"] = ap
        if has & codec.QUOTE_AS:
            event["as"] = as_
        if has & codec.QUOTE_C:
            event["c"] = c
        if has & codec.QUOTE_I:
            event["i"] = i[:ni].tolist()
        event["t"] = t
        if has & codec.QUOTE_Q:
            event["q"] = q
        if has & codec.QUOTE_Z:
            event["z"] = z
        events.append(event)
    return events


def encode_aggs_json(records: np.ndarray, ev: str, symbol: str) -> list[dict[str, Any]]:
    """``A`` or ``AM`` (``ev``) events for AGG_DTYPE records, with exactly their keys."""
    events = []
    for s, e, o, h, low, c, v, vw, av, op, a, z, has, otc, _ in records.tolist():
        event: dict[str, Any] = {"ev": ev, "sym": symbol}
        if has & codec.AGG_V:
            event["v"] = _number(v)
        if has & codec.AGG_AV:
            event["av"] = _number(av)
        if has & codec.AGG_OP:
            event["op"] = op
        if has & codec.AGG_VW:
            event["vw"] = vw
        if has & codec.AGG_O:
            event["o"] = o
        if has & codec.AGG_C:
            event["c"] = c
        if has & codec.AGG_H:
            event["h"] = h
        if has & codec.AGG_L:
            event["l"] = low
        if has & codec.AGG_A:
            event["a"] = a
        if has & codec.AGG_Z:
            event["z"] = _number(z)
        event.update(s=s, e=e)
        if has & codec.AGG_OTC:
            event["otc"] = bool(otc)
        events.append(event)
    return events


def encode_luld_json(records: np.ndarray, symbol: str) -> list[dict[str, Any]]:
    """``LULD`` events for LULD_DTYPE records (the symbol under ``T``, as Polygon sends it)."""
    events = []
    for t, q, h, low, i, z, ni, has, _ in records.tolist():
        event: dict[str, Any] = {"ev": "LULD", "T": symbol}
        if has & codec.LULD_H:
            event["h"] = h
        if has & codec.LULD_L:
            event["l"] = low
        if has & codec.LULD_I:
            event["i"] = i[:ni].tolist()
        if has & codec.LULD_Z:
            event["z"] = z
        event["t"] = t
        if has & codec.LULD_Q:
            event["q"] = q
        events.append(event)
    return events


def encode_events_json(message: codec.Message) -> list[Any]:
    """The Polygon events one proxy message carries, whatever its kind: the records of
    ``T.``/``Q.``/``A.``/``AM.``/``LULD.`` topics as dicts, a ``RAW`` message's events as
    parsed JSON. Raises :class:`~polyfan.errors.WireError` for any other kind."""
    ev, symbol = codec.topic_event(message.topic)
    kind = message.kind
    if kind is codec.Kind.RAW:
        value = codec.decode_json(message)
        return value if isinstance(value, list) else [value]
    records = codec.records(message)
    if kind is codec.Kind.TRADES:
        return encode_trades_json(records, symbol)
    if kind is codec.Kind.QUOTES:
        return encode_quotes_json(records, symbol)
    if kind is codec.Kind.AGGREGATES:
        return encode_aggs_json(records, ev, symbol)
    if kind is codec.Kind.LULD:
        return encode_luld_json(records, symbol)
    raise WireError(f"{kind.name} messages carry no Polygon events")
