"""The symbol alphabet, defined once: what a ticker symbol may be, everywhere polyfan checks one.

A symbol is 1 to 32 characters of ``[A-Za-z0-9.:/_-]`` (``BRK.A``, ``X:BTCUSD``). Everything
else derives from :data:`SYMBOL_CHARS` and :data:`MAX_SYMBOL_LENGTH`: the regex the config, the
feed, the decoder and the client protocol use, the byte table the numba scanner uses, the
prefix the agg's peer rules match, and the page's copy in ``web/static/app.js`` (a test
checks that it is this one).
"""

from __future__ import annotations

import re

SYMBOL_CHARS = "A-Za-z0-9.:/_-"  # a regex character class body (``-`` last: literal)
MAX_SYMBOL_LENGTH = 32
SYMBOL_PATTERN = f"[{SYMBOL_CHARS}]{{1,{MAX_SYMBOL_LENGTH}}}"
SYMBOL_RE = re.compile(SYMBOL_PATTERN)
_CHAR_RE = re.compile(f"[{SYMBOL_CHARS}]")


def symbol_bytes() -> bytes:
    """The bytes a symbol may hold, in order (for tables indexed by byte value)."""
    return bytes(b for b in range(128) if _CHAR_RE.fullmatch(chr(b)))
