"""The one topic table: the scanner's symbols and the decoder's topics share its kernels."""

from __future__ import annotations

import numpy as np
import pytest

from polyfan.wire import topics


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "py_func"])
def test_names_get_ids_in_order_and_are_found_again_after_the_table_grows(jit: bool) -> None:
    table = topics.TopicTable(16, rows=2, slots=4, jit=jit)
    names = [f"T.S{i}".encode() for i in range(300)]
    assert [table.add(name) for name in names] == list(range(300))
    assert len(table) == 300
    assert [table.find(name) for name in names] == list(range(300))
    assert table.find(b"T.NOPE") == -1
    assert table.bytes_of(123) == b"T.S123"
    slots = table.arrays[0]
    assert len(slots) >= 600 and len(slots) & (len(slots) - 1) == 0
    assert sorted(slots[slots >= 0].tolist()) == list(range(300))


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "py_func"])
def test_a_fixed_table_refuses_names_once_full_or_too_long(jit: bool) -> None:
    table = topics.TopicTable(4, rows=2, slots=4, grow=False, jit=jit)
    assert table.add(b"LONGER") == -1
    assert (table.add(b"A"), table.add(b"B"), table.add(b"C")) == (0, 1, -1)
    assert (table.find(b"A"), table.find(b"B"), table.find(b"C")) == (0, 1, -1)


@pytest.mark.parametrize("jit", [True, False], ids=["compiled", "py_func"])
def test_the_kernels_find_a_name_inside_a_larger_buffer(jit: bool) -> None:
    table = topics.TopicTable(8, jit=jit)
    table.add(b"AAPL")
    buf = np.frombuffer(b"xxAAPLyy", np.uint8)
    find = topics.chosen(topics.find_topic, jit)
    assert find(buf, 2, 4, table.arrays) == 0
    assert find(buf, 2, 3, table.arrays) == -1
    add = topics.chosen(topics.add_topic, jit)
    assert add(buf, 2, 3, table.arrays) == 1
    assert table.bytes_of(1) == b"AAP"


def test_the_hash_is_the_same_compiled_and_in_python() -> None:
    buf = np.frombuffer(bytes(range(256)) * 3, np.uint8)
    for length in (0, 1, 7, 32, 128, 700):
        assert topics.topic_hash(buf, 5, length) == topics.topic_hash.py_func(buf, 5, length)
