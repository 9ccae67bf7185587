"""Condition rules as data: the built-in table, ``all``, and the vendor-dump loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from polyfan.bars import conditions
from polyfan.bars.conditions import HL, OC, UNKNOWN, VOL
from polyfan.errors import ConfigError
from reference import ALLOWS, INDICATORS, allows


def letters(entry: int) -> str:
    return "".join(letter for bit, letter in ((HL, "H"), (OC, "O"), (VOL, "V")) if entry & bit)


def test_polygon_rules_match_conditions_md_for_every_code() -> None:
    rules = conditions.polygon_rules()
    for code in range(256):
        expected, unknown = allows((code,))
        assert letters(int(rules[code])) == expected, code
        assert bool(rules[code] & UNKNOWN) == unknown, code


def test_form_t_also_updates_high_low_and_open_close() -> None:
    assert ALLOWS[12] == "V"  # the table says volume only ...
    assert conditions.polygon_rules()[12] == HL | OC | VOL  # ... polygon's bars use it fully


def test_indicator_codes_restrict_nothing_and_are_not_unknown() -> None:
    rules = conditions.polygon_rules()
    assert {code for code in range(256) if rules[code] == HL | OC | VOL} >= INDICATORS | {0}


def test_unknown_codes_allow_volume_only_and_are_flagged() -> None:
    rules = conditions.polygon_rules()
    for code in (26, 39, 40, 42, 61, 99, 255):
        assert rules[code] == VOL | UNKNOWN


def test_all_rules_make_every_code_regular() -> None:
    assert set(conditions.all_rules().tolist()) == {HL | OC | VOL}


def vendor_dump() -> dict[str, object]:
    """The shape of ``GET /v3/reference/conditions``: a results list with update_rules."""
    results: list[dict[str, object]] = []
    for code, allowed in ALLOWS.items():
        results.append(
            {
                "id": code,
                "type": "sale_condition",
                "name": f"code {code}",
                "asset_class": "stocks",
                "data_types": ["trade"],
                "update_rules": {
                    "consolidated": {
                        "updates_high_low": "H" in allowed,
                        "updates_open_close": "O" in allowed,
                        "updates_volume": "V" in allowed,
                    },
                    "market_center": {
                        "updates_high_low": True,
                        "updates_open_close": True,
                        "updates_volume": True,
                    },
                },
            }
        )
    for code in INDICATORS:
        results.append({"id": code, "asset_class": "stocks", "data_types": ["trade"]})
    # Another asset class and a quote condition must not leak into the stock trade table.
    results.append(
        {"id": 26, "asset_class": "options", "data_types": ["trade"], "update_rules": {}}
    )
    results.append({"id": 39, "asset_class": "stocks", "data_types": ["bbo"], "update_rules": {}})
    return {"results": results, "status": "OK", "count": len(results)}


def test_a_vendor_dump_of_the_same_table_gives_the_built_in_rules(tmp_path: Path) -> None:
    path = tmp_path / "conditions.json"
    path.write_text(json.dumps(vendor_dump()))
    assert conditions.load_rules("polygon", path).tolist() == conditions.polygon_rules().tolist()


def test_a_vendor_dump_can_change_a_rule() -> None:
    dump = vendor_dump()
    results = dump["results"]
    assert isinstance(results, list)
    results[0]["update_rules"]["consolidated"]["updates_volume"] = False  # code 1
    assert conditions.rules_from_reference(dump)[1] == HL | OC


def test_code_255_stays_unknown_whatever_a_vendor_dump_says() -> None:
    """255 stands for codes the wire cannot carry (above 254, or past a trade's eighth)."""
    dump = vendor_dump()
    results = dump["results"]
    assert isinstance(results, list)
    regular = {
        "consolidated": {
            k: True for k in ("updates_high_low", "updates_open_close", "updates_volume")
        }
    }
    results.append(
        {"id": 255, "asset_class": "stocks", "data_types": ["trade"], "update_rules": regular}
    )
    results.append({"id": 300, "asset_class": "stocks", "data_types": ["trade"]})  # an indicator
    assert conditions.rules_from_reference(dump)[255] == VOL | UNKNOWN


@pytest.mark.parametrize(
    ("text", "problem"),
    [("[1, 2]", "not a condition"), ('{"x": 1}', "results"), ("nope", "not JSON")],
)
def test_a_bad_conditions_file_is_a_config_error(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "conditions.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=problem):
        conditions.load_rules("polygon", path)
