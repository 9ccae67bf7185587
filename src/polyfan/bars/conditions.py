"""Trade-condition rules as data: which codes let a trade update H/L, O/C and volume.

A rule set is a 256-entry ``uint8`` lookup table indexed by condition code (the wire carries
codes as ``u1``). Each entry is a bit set of :data:`HL`, :data:`OC` and :data:`VOL`, plus
:data:`UNKNOWN` for a code the table does not know. The kernels AND the entries of a trade's
codes together: a trade qualifies for a thing only if every one of its codes allows it.

- ``polygon`` (the default): the consolidated rules of Polygon's table
  (shared/polygon/conditions.md, as served by ``/v3/reference/conditions`` on 2026-07-09).
  Code 0 is regular. Code 12 (Form T / extended hours) also updates H/L and O/C, as the
  vendor's own intraday bars do. Indicator codes with no update rules (57-60, 62-71) restrict
  nothing. Any other code qualifies for volume only and carries the UNKNOWN bit so it is counted.
- ``all``: every code is regular.
- :func:`rules_from_reference` builds a ``polygon``-style table from a JSON dump of the vendor's
  endpoint, so the table can be replaced without touching code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from polyfan.errors import ConfigError
from polyfan.wire import codec

HL = 1
OC = 2
VOL = 4
UNKNOWN = 8
REGULAR = HL | OC | VOL

FORM_T = 12
INDICATOR_CODES = (*range(57, 61), *range(62, 72))

# Consolidated rules from shared/polygon/conditions.md: code -> (H/L, O/C, Vol).
POLYGON_TABLE: Mapping[int, tuple[bool, bool, bool]] = {
    1: (True, True, True),
    2: (False, False, True),
    3: (True, True, True),
    4: (True, True, True),
    5: (True, False, True),
    6: (True, True, True),
    7: (False, False, True),
    8: (True, True, True),
    9: (True, True, True),
    10: (True, False, True),
    11: (True, True, True),
    12: (False, False, True),
    13: (False, False, True),
    14: (True, True, True),
    15: (False, False, False),
    16: (False, False, False),
    17: (True, True, True),
    18: (True, True, True),
    19: (True, True, True),
    20: (False, False, True),
    21: (False, False, True),
    22: (True, False, True),
    23: (True, True, True),
    24: (True, True, True),
    25: (True, True, True),
    27: (True, True, True),
    28: (True, True, True),
    29: (False, False, True),
    30: (True, True, True),
    31: (True, True, True),
    32: (True, False, True),
    33: (True, False, True),
    34: (True, True, True),
    35: (True, True, True),
    36: (True, True, True),
    37: (False, False, True),
    38: (True, True, False),
    41: (True, True, True),
    52: (False, False, True),
    53: (False, False, True),
    55: (True, True, True),
}


def _bits(hl: bool, oc: bool, vol: bool) -> int:
    return (HL if hl else 0) | (OC if oc else 0) | (VOL if vol else 0)


def rules_from_table(
    table: Mapping[int, tuple[bool, bool, bool]], indicators: Iterable[int] = INDICATOR_CODES
) -> np.ndarray:
    """The ``polygon`` lookup table for a code -> (H/L, O/C, Vol) mapping."""
    rules = np.full(256, VOL | UNKNOWN, dtype=np.uint8)
    known = range(codec.CONDITION_OUT_OF_RANGE)  # 255 stands for codes the wire cannot carry
    for code in indicators:
        if code in known:
            rules[code] = REGULAR
    for code, (hl, oc, vol) in table.items():
        if code in known:
            rules[code] = _bits(hl, oc, vol)
    rules[0] = REGULAR
    rules[FORM_T] |= HL | OC
    return rules


def polygon_rules() -> np.ndarray:
    return rules_from_table(POLYGON_TABLE)


def all_rules() -> np.ndarray:
    """Every code regular: ``--conditions all``."""
    return np.full(256, REGULAR, dtype=np.uint8)


def rules_from_reference(dump: Any) -> np.ndarray:
    """A lookup table from the JSON of ``/v3/reference/conditions`` (or its ``results`` list).

    Only stock trade conditions are used. A condition without ``update_rules`` is an indicator:
    it restricts nothing. The ``polygon`` adjustments (code 0 regular, code 12 also H/L and O/C)
    apply as for the built-in table.
    """
    results = dump.get("results") if isinstance(dump, dict) else dump
    if not isinstance(results, list):
        raise ConfigError("--conditions-file: expected a JSON object with a 'results' list")
    table: dict[int, tuple[bool, bool, bool]] = {}
    indicators: list[int] = []
    for item in results:
        if not isinstance(item, dict) or not isinstance(item.get("id"), int):
            raise ConfigError(f"--conditions-file: {item!r} is not a condition with an id")
        if item.get("asset_class", "stocks") != "stocks":
            continue
        if "trade" not in item.get("data_types", ["trade"]):
            continue
        rules = item.get("update_rules")
        consolidated = rules.get("consolidated") if isinstance(rules, dict) else None
        if not isinstance(consolidated, dict):
            indicators.append(item["id"])
            continue
        table[item["id"]] = (
            bool(consolidated.get("updates_high_low", False)),
            bool(consolidated.get("updates_open_close", False)),
            bool(consolidated.get("updates_volume", False)),
        )
    return rules_from_table(table, indicators)


def load_rules(name: str, path: Path | None = None) -> np.ndarray:
    """The rule set for ``--conditions NAME`` and ``--conditions-file PATH``."""
    if name == "all":
        return all_rules()
    if name != "polygon":
        raise ConfigError(f"--conditions: {name!r} is not polygon or all")
    if path is None:
        return polygon_rules()
    try:
        dump = json.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"--conditions-file: cannot read {path}: {exc.strerror}") from exc
    except ValueError as exc:
        raise ConfigError(f"--conditions-file: {path} is not JSON: {exc}") from exc
    return rules_from_reference(dump)
