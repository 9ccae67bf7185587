"""The symbol alphabet is defined once (polyfan.symbols); every other copy must be it."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

import polyfan
from polyfan import config, symbols
from polyfan.feed import scan
from polyfan.wire import peers


def test_the_alphabet_is_letters_digits_and_five_punctuation_marks() -> None:
    expected = b"-./0123456789:ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz"
    assert symbols.symbol_bytes() == expected
    assert symbols.SYMBOL_RE.fullmatch("BRK.A") and symbols.SYMBOL_RE.fullmatch("X:BTC-USD/_")
    assert not symbols.SYMBOL_RE.fullmatch("A" * 33)
    assert not symbols.SYMBOL_RE.fullmatch("")
    assert not symbols.SYMBOL_RE.fullmatch("A B")


def test_the_config_and_the_scanner_use_the_one_alphabet() -> None:
    assert config.SYMBOL_RE is symbols.SYMBOL_RE
    assert scan.MAX_SYMBOL == symbols.MAX_SYMBOL_LENGTH
    assert bytes(np.flatnonzero(scan._SYMBOL_BYTES).astype(np.uint8)) == symbols.symbol_bytes()
    assert peers._SYMBOL_PREFIX.pattern.startswith(f"[{symbols.SYMBOL_CHARS}]".encode())


def test_the_pages_copy_of_the_alphabet_is_the_python_one() -> None:
    app = Path(polyfan.__file__).parent / "web" / "static" / "app.js"
    match = re.search(r"^const SYMBOL_RE = /(.*)/;$", app.read_text(), re.MULTILINE)
    assert match is not None
    assert match.group(1) == f"^{symbols.SYMBOL_PATTERN}$"
