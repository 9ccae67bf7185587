"""polyfan.metrics: the registry, its prometheus_client collector and the text it renders."""

from __future__ import annotations

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from polyfan import metrics
from polyfan.metrics import Registry


def parsed(registry: Registry, values: dict[str, float] | None = None) -> dict[str, list[Sample]]:
    text = registry.render(values).decode()
    return {family.name: family.samples for family in text_string_to_metric_families(text)}


def test_counters_gauges_and_process_metrics_are_rendered() -> None:
    registry = Registry()
    things = registry.counter("polyfan_test_things_total", "Things.")
    level = registry.gauge("polyfan_test_level", "Level.")
    things.value += 3
    registry.on_collect(lambda: setattr(level, "value", 7.5))
    families = parsed(registry)
    assert [(s.name, s.value) for s in families["polyfan_test_things"]] == [
        ("polyfan_test_things_total", 3.0)
    ]
    assert [(s.name, s.value) for s in families["polyfan_test_level"]] == [
        ("polyfan_test_level", 7.5)
    ]
    for name in ("process_cpu_seconds", "process_resident_memory_bytes", "process_open_fds"):
        assert families[name][0].value > 0
    assert families["python_info"][0].labels["implementation"] == "CPython"


@pytest.mark.parametrize("value", ['say "hi"', "two\nlines", "back\\slash", 'all "\n\\ of them'])
def test_a_label_value_with_a_quote_newline_or_backslash_parses_back(value: str) -> None:
    registry = Registry()
    statuses = registry.labeled("polyfan_test_statuses_total", "Statuses.", "status")
    statuses.inc("plain", 2)
    statuses.inc(value)
    families = parsed(registry)
    got = {s.labels["status"]: s.value for s in families["polyfan_test_statuses"]}
    assert got == {"plain": 2.0, value: 1.0}


def test_label_sets_are_bounded_in_number_and_length() -> None:
    registry = Registry()
    reasons = registry.labeled("polyfan_test_reasons_total", "Reasons.", "reason")
    for i in range(3 * metrics.MAX_LABEL_VALUES):
        reasons.inc(f"r{i}")
    assert len(reasons.values) == metrics.MAX_LABEL_VALUES
    reasons.values = {f"r{i}": 1.0 for i in range(100)} | {"x" * 500: 4.0}
    got = {s.labels["reason"]: s.value for s in parsed(registry)["polyfan_test_reasons"]}
    assert len(got) == metrics.MAX_LABEL_VALUES
    assert sum(got.values()) == 104.0
    assert got[metrics.OTHER] == 100 - (metrics.MAX_LABEL_VALUES - 1) + 4.0
    assert all(len(label) <= metrics.MAX_LABEL_CHARS for label in got)


def test_histogram_buckets_are_cumulative_with_sum_and_count() -> None:
    registry = Registry()
    delay = registry.histogram("polyfan_test_delay_seconds", "Delay.", (0.001, 0.01, 0.1))
    registry.alias("polyfan_test_old_delay_seconds", "The same.", delay)
    delay.observe(0.0005, 3)  # le 0.001
    delay.observe(0.001)  # on the bound: le 0.001
    delay.observe_many(np.array([0.005, 0.05, 0.05, 5.0]))
    for name in ("polyfan_test_delay_seconds", "polyfan_test_old_delay_seconds"):
        samples = parsed(registry)[name]
        buckets = [(s.labels["le"], s.value) for s in samples if s.name.endswith("_bucket")]
        assert buckets == [("0.001", 4.0), ("0.01", 5.0), ("0.1", 7.0), ("+Inf", 8.0)]
        rest = {s.name.removeprefix(name): s.value for s in samples if "le" not in s.labels}
        assert rest == {"_count": 8.0, "_sum": pytest.approx(0.0015 + 0.001 + 5.105)}


def test_values_stand_in_for_the_process_own_as_the_workers_sums() -> None:
    registry = Registry()
    sent = registry.counter("polyfan_test_sent_total", "Sent.")
    delay = registry.histogram("polyfan_test_delay_seconds", "Delay.", (0.01,))
    sent.value, _ = 2, delay.observe(0.001, 2)
    names = registry.values()
    assert names == {
        "polyfan_test_sent_total": 2,
        'polyfan_test_delay_seconds_bucket{le="0.01"}': 2.0,
        'polyfan_test_delay_seconds_bucket{le="+Inf"}': 2.0,
        "polyfan_test_delay_seconds_sum": 0.002,
        "polyfan_test_delay_seconds_count": 2.0,
    }
    summed = {name: 3 * value for name, value in names.items()}  # three workers alike
    families = parsed(registry, summed)
    assert families["polyfan_test_sent"][0].value == 6.0
    buckets = [s.value for s in families["polyfan_test_delay_seconds"] if "le" in s.labels]
    assert buckets == [6.0, 6.0]


def test_names_are_registered_once_and_counters_end_in_total() -> None:
    registry = Registry()
    registry.counter("polyfan_test_a_total", "A.")
    with pytest.raises(ValueError, match="twice"):
        registry.gauge("polyfan_test_a_total", "A again.")
    with pytest.raises(ValueError, match="_total"):
        registry.counter("polyfan_test_b", "B.")
    with pytest.raises(ValueError, match="increasing"):
        registry.histogram("polyfan_test_c_seconds", "C.", (0.1, 0.01))
