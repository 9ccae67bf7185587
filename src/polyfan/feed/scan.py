"""A numba scanner for Polygon stocks frames: JSON bytes straight into columns.

The proxy's hot path. It handles the shapes the vendor actually sends — a JSON array of flat
objects: ``T`` trades whose keys are among ``ev sym i x p s ds c t pt q z trfi trft``, and,
with ``ev`` as their first key (as the vendor writes them), ``Q`` quotes (``sym bx bp bs ax ap
as c i t q z``, and ``trfi trft``, not kept), ``A``/``AM`` aggregates (``sym v av op vw o c h l
a z s e otc``) and ``LULD`` bands (``T h l i z t q``), mixed in any order — and nothing
else: the moment a frame holds anything it is not sure about (a status, another ``ev``, an
unknown key, a string escape, an exponent, a null, a number with more than 15 significant
digits, a value out of range, a missing field...) it gives up on the whole frame and
``feed.EventDecoder`` decodes that frame with msgspec instead, which validates and counts
everything. So the scanner never decides that a trade is invalid; it only accepts trades it can
read exactly, and it must produce exactly what the msgspec path would (tests/feed/test_scan.py
compares the two on generated frames).

Numbers are converted with Clinger's fast path: a decimal with at most 15 significant digits
and at most 22 fraction digits is ``mantissa / 10**k`` with both operands exact doubles, so one
IEEE division gives the correctly rounded value, the same double that ``float(text)`` gives.

Symbols are interned in the wire's topic table (:mod:`polyfan.wire.topics`, the same hash and
probe as the agg's topic lookups; :class:`SymbolTable` is a fixed one), so each trade leaves the
scanner with a small integer symbol id; ids are shared with the msgspec path.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from polyfan.symbols import MAX_SYMBOL_LENGTH, symbol_bytes
from polyfan.wire import codec, topics

MAX_SYMBOL = MAX_SYMBOL_LENGTH
TABLE_SLOTS = 1 << 18
MAX_SYMBOLS = TABLE_SLOTS // 2
MIN_TRADE_BYTES = 24  # no trade object the scanner accepts is shorter: bounds rows per frame

_SYMBOL_BYTES = np.zeros(256, np.bool_)
_SYMBOL_BYTES[list(symbol_bytes())] = True
_POW10 = np.array([10.0**k for k in range(23)])

BAIL = -1


def warm_up() -> None:
    """Compile the scanner now (about 10 s the first time, then cached) rather than on a trade."""
    Columns(4).scan(b'[{"ev":"T","sym":"A","p":1.5,"s":1,"t":1,"c":[1]}]', 0, SymbolTable())


class SymbolTable(topics.TopicTable):
    """Symbol bytes -> small integer id: a fixed topic table the scanner interns into."""

    def __init__(self) -> None:
        super().__init__(MAX_SYMBOL, rows=MAX_SYMBOLS, slots=TABLE_SLOTS, grow=False)

    @property
    def count(self) -> np.ndarray:
        """``count[0]``: symbols interned so far."""
        return self.arrays[3]

    def intern(self, symbol: bytes) -> int:
        """The id of a valid symbol (interning it), or -1 if invalid or the table is full."""
        data = np.frombuffer(symbol, np.uint8)
        return int(_intern(data, 0, len(data), self.arrays, _SYMBOL_BYTES))

    def name(self, symbol_id: int) -> str:
        return self.bytes_of(symbol_id).decode()


# The columns of the other event kinds. Each kind is a plane of two arrays shared by all kinds
# (``Columns.ints``: int64, ``Columns.reals``: float64, both [kind, row, column]), so the
# scanner takes two arrays for all of them (numba unboxes every argument on every call: forty
# column arrays cost 3 us a frame). Names are the record fields the columns become
# (codec.QUOTE_DTYPE ...), plus ``ids`` (the symbol id) and, for aggregates, ``minute`` (1: an
# ``AM`` event). Integers are int64 here; both parsers keep them within their field's range.
QUOTES, AGGREGATES, LULDS = 0, 1, 2  # Columns.rows and the planes, by kind
_MINUTES = 3  # what _event_type says of an AM event (AGGREGATES columns, minute = 1)
MAX_INDICATORS = codec.MAX_INDICATORS
# quotes: ints
Q_T, Q_Q, Q_BS, Q_AS, Q_BX, Q_AX, Q_C, Q_Z, Q_NI, Q_HAS, Q_IDS, Q_I = range(12)
Q_BP, Q_AP = range(2)  # reals
# aggregates: ints, then reals
A_S, A_E, A_HAS, A_OTC, A_MINUTE, A_IDS = range(6)
A_O, A_H, A_L, A_C, A_V, A_VW, A_AV, A_OP, A_A, A_Z = range(10)
# LULD: ints, then reals
L_T, L_Q, L_Z, L_NI, L_HAS, L_IDS, L_I = range(7)
L_H, L_L = range(2)
INT_COLUMNS = 16  # Q_I + MAX_INDICATORS, the widest
REAL_COLUMNS = 10

# name -> (real?, first column, width; 0: a single column)
Layout = dict[str, tuple[bool, int, int]]
QUOTE_LAYOUT: Layout = {
    "t": (False, Q_T, 0), "q": (False, Q_Q, 0), "bs": (False, Q_BS, 0),
    "as": (False, Q_AS, 0), "bx": (False, Q_BX, 0), "ax": (False, Q_AX, 0),
    "c": (False, Q_C, 0), "z": (False, Q_Z, 0), "ni": (False, Q_NI, 0),
    "has": (False, Q_HAS, 0), "ids": (False, Q_IDS, 0), "i": (False, Q_I, MAX_INDICATORS),
    "bp": (True, Q_BP, 0), "ap": (True, Q_AP, 0),
}  # fmt: skip
AGG_LAYOUT: Layout = {
    "s": (False, A_S, 0), "e": (False, A_E, 0), "has": (False, A_HAS, 0),
    "otc": (False, A_OTC, 0), "minute": (False, A_MINUTE, 0), "ids": (False, A_IDS, 0),
    "o": (True, A_O, 0), "h": (True, A_H, 0), "l": (True, A_L, 0), "c": (True, A_C, 0),
    "v": (True, A_V, 0), "vw": (True, A_VW, 0), "av": (True, A_AV, 0),
    "op": (True, A_OP, 0), "a": (True, A_A, 0), "z": (True, A_Z, 0),
}  # fmt: skip
LULD_LAYOUT: Layout = {
    "t": (False, L_T, 0), "q": (False, L_Q, 0), "z": (False, L_Z, 0), "ni": (False, L_NI, 0),
    "has": (False, L_HAS, 0), "ids": (False, L_IDS, 0), "i": (False, L_I, MAX_INDICATORS),
    "h": (True, L_H, 0), "l": (True, L_L, 0),
}  # fmt: skip
QUOTE_BX, QUOTE_BP, QUOTE_BS = codec.QUOTE_BX, codec.QUOTE_BP, codec.QUOTE_BS
QUOTE_AX, QUOTE_AP, QUOTE_AS = codec.QUOTE_AX, codec.QUOTE_AP, codec.QUOTE_AS
QUOTE_C, QUOTE_I, QUOTE_Q, QUOTE_Z = codec.QUOTE_C, codec.QUOTE_I, codec.QUOTE_Q, codec.QUOTE_Z
AGG_V, AGG_AV, AGG_OP, AGG_VW = codec.AGG_V, codec.AGG_AV, codec.AGG_OP, codec.AGG_VW
AGG_O, AGG_C, AGG_H, AGG_L = codec.AGG_O, codec.AGG_C, codec.AGG_H, codec.AGG_L
AGG_A, AGG_Z, AGG_OTC = codec.AGG_A, codec.AGG_Z, codec.AGG_OTC
LULD_H, LULD_L, LULD_I, LULD_Z, LULD_Q = (
    codec.LULD_H, codec.LULD_L, codec.LULD_I, codec.LULD_Z, codec.LULD_Q
)  # fmt: skip


class EventColumns:
    """One kind's columns (``QUOTE_LAYOUT`` ...), by name: views of its planes."""

    def __init__(self, layout: Layout, ints: np.ndarray, reals: np.ndarray) -> None:
        self.layout = layout
        self.ints = ints
        self.reals = reals

    def column(self, name: str) -> np.ndarray:
        real, first, width = self.layout[name]
        plane = self.reals if real else self.ints
        return plane[:, first : first + width] if width else plane[:, first]

    def records(self, rows: np.ndarray | slice, dtype: np.dtype) -> np.ndarray:
        """The selected rows as ``dtype`` records (fields without a column stay 0)."""
        records = np.zeros(len(self.ints[rows]), dtype)
        for name in dtype.names or ():
            if name in self.layout:
                records[name] = self.column(name)[rows]
        return records


class Columns:
    """Preallocated columns for one drain: trades (attributes), and the other kinds in
    ``events`` (``QUOTES``, ``AGGREGATES``, ``LULDS``), whose rows in use are ``rows``. The
    scanner fills trade rows ``[0, n)`` and moves ``rows`` on."""

    def __init__(self, capacity: int) -> None:
        self.ints = np.zeros((3, capacity, INT_COLUMNS), np.int64)
        self.reals = np.zeros((3, capacity, REAL_COLUMNS), np.float64)
        self.rows = np.zeros(3, np.int64)
        self.events = self._views()
        self.t = np.empty(capacity, np.int64)
        self.p = np.empty(capacity, np.float64)
        self.s = np.empty(capacity, np.float64)
        self.q = np.empty(capacity, np.int64)
        self.trft = np.empty(capacity, np.int64)
        self.trfi = np.empty(capacity, np.int64)
        self.x = np.empty(capacity, np.int64)
        self.z = np.empty(capacity, np.int64)
        self.nc = np.empty(capacity, np.uint8)
        self.c = np.zeros((capacity, codec.MAX_CONDITIONS), np.uint8)
        self.ids = np.empty(capacity, np.int64)

    def scan(self, frame: bytes, row: int, table: SymbolTable) -> int:
        """Scan one frame into trade rows from ``row`` and the other kinds' rows from ``rows``;
        the next free trade row (``rows`` moved on), or ``BAIL`` (nothing moved)."""
        return int(
            scan_frame(
                np.frombuffer(frame, np.uint8), row, self.t, self.p, self.s, self.q, self.trft,
                self.trfi, self.x, self.z, self.nc, self.c, self.ids,
                self.ints, self.reals, self.rows, table.arrays, _SYMBOL_BYTES, _POW10,
            )
        )  # fmt: skip

    def _views(self) -> tuple[EventColumns, ...]:
        return tuple(
            EventColumns(layout, self.ints[kind], self.reals[kind])
            for kind, layout in enumerate((QUOTE_LAYOUT, AGG_LAYOUT, LULD_LAYOUT))
        )

    def adopt_events(self, other: Columns) -> None:
        """Take ``other``'s rows of the other kinds (this one being at least as large)."""
        capacity = other.ints.shape[1]
        self.ints[:, :capacity] = other.ints
        self.reals[:, :capacity] = other.reals
        self.rows[:] = other.rows

    def records(self, n: int) -> np.ndarray:
        records = np.zeros(n, codec.TRADE_DTYPE)
        for name in ("t", "p", "s", "q", "trft", "trfi", "x", "z", "nc", "c"):
            records[name] = getattr(self, name)[:n]
        return records


@njit(cache=True, error_model="numpy")
def _intern(buf, start, end, arrays, symbol_bytes):  # type: ignore[no-untyped-def]
    """The id of the symbol in ``buf[start:end]``, interning it; -1 if it is not a valid symbol
    or the table is full.

    Characters are checked only when a symbol is first seen: a symbol found in the table was
    valid when it went in.
    """
    length = end - start
    if length < 1 or length > MAX_SYMBOL:
        return -1
    sid = topics.find_topic(buf, start, length, arrays)
    if sid >= 0:
        return sid
    for i in range(start, end):
        if not symbol_bytes[buf[i]]:
            return -1
    return topics.add_topic(buf, start, length, arrays)


@njit(cache=True, error_model="numpy")
def _skip_ws(buf, i, n):  # type: ignore[no-untyped-def]
    while i < n and (buf[i] == 32 or buf[i] == 10 or buf[i] == 13 or buf[i] == 9):
        i += 1
    return i


@njit(cache=True, error_model="numpy")
def _number(buf, i, n, pow10):  # type: ignore[no-untyped-def]
    """A JSON number at ``i``: (ok, is_integer, integer, float, next index)."""
    negative = False
    if i < n and buf[i] == 45:  # -
        negative = True
        i += 1
    start = i
    mantissa = 0
    digits = 0
    while i < n and 48 <= buf[i] <= 57:
        if digits > 0 or buf[i] != 48:
            digits += 1
        mantissa = mantissa * 10 + (int(buf[i]) - 48)
        i += 1
        if digits > 18:
            return False, False, 0, 0.0, i
    int_digits = i - start
    if int_digits == 0 or (int_digits > 1 and buf[start] == 48):
        return False, False, 0, 0.0, i  # no digits, or a leading zero
    fraction = 0
    whole = mantissa
    zero_fraction = True  # "40.0", as ds usually is: no division needed
    if i < n and buf[i] == 46:  # .
        i += 1
        while i < n and 48 <= buf[i] <= 57:
            if buf[i] != 48:
                zero_fraction = False
            if digits > 0 or buf[i] != 48:
                digits += 1
            mantissa = mantissa * 10 + (int(buf[i]) - 48)
            fraction += 1
            i += 1
            if digits > 15 or fraction > 22:
                return False, False, 0, 0.0, i
        if fraction == 0:
            return False, False, 0, 0.0, i
    if i < n and (buf[i] == 101 or buf[i] == 69):  # e E: leave to msgspec
        return False, False, 0, 0.0, i
    if zero_fraction and fraction > 0:
        value = float(whole)
        return True, False, 0, -value if negative else value, i  # -0.0 stays -0.0
    if negative:
        mantissa = -mantissa
    if fraction == 0:
        if digits > 15:  # an integer, but too long to be an exact float
            return True, True, mantissa, np.nan, i
        return True, True, mantissa, float(mantissa), i
    return True, False, 0, mantissa / pow10[fraction], i


@njit(cache=True, error_model="numpy")
def _integer(buf, i, n):  # type: ignore[no-untyped-def]
    """A JSON integer at ``i`` (at most 18 digits): (ok, value, next index)."""
    negative = False
    if i < n and buf[i] == 45:  # -
        negative = True
        i += 1
    start = i
    value = 0
    while i < n and 48 <= buf[i] <= 57:
        value = value * 10 + (int(buf[i]) - 48)
        i += 1
    digits = i - start
    if digits == 0 or digits > 18 or (digits > 1 and buf[start] == 48):
        return False, 0, i
    if i < n and (buf[i] == 46 or buf[i] == 101 or buf[i] == 69):  # . e E: not an integer
        return False, 0, i
    return True, -value if negative else value, i


@njit(cache=True, error_model="numpy")
def _string_end(buf, i, n):  # type: ignore[no-untyped-def]
    """Index of the closing quote of a string whose content starts at ``i``; -1 to bail."""
    while i < n:
        b = buf[i]
        if b == 34:
            return i
        if b == 92 or b < 32:  # escapes and control characters: leave to msgspec
            return -1
        i += 1
    return -1


@njit(cache=True, error_model="numpy")
def _key(buf, i, n):  # type: ignore[no-untyped-def]
    """A key at ``i`` (its opening quote) and its colon: (key start, length, value index);
    key start -1 to bail."""
    if i >= n or buf[i] != 34:
        return -1, 0, i
    key = i + 1
    end = _string_end(buf, key, n)
    if end < 0:
        return -1, 0, i
    i = _skip_ws(buf, end + 1, n)
    if i >= n or buf[i] != 58:  # :
        return -1, 0, i
    i = _skip_ws(buf, i + 1, n)
    if i >= n:
        return -1, 0, i
    return key, end - key, i


@njit(cache=True, error_model="numpy")
def _next_key(buf, i, n):  # type: ignore[no-untyped-def]
    """After a value: 1 and the index past a comma, 0 and the index past the closing brace,
    or -1 to bail."""
    i = _skip_ws(buf, i, n)
    if i >= n:
        return -1, i
    if buf[i] == 44:  # ,
        return 1, _skip_ws(buf, i + 1, n)
    if buf[i] == 125:  # }
        return 0, i + 1
    return -1, i


@njit(cache=True, error_model="numpy")
def _symbol(buf, i, n, symbols, symbol_bytes):  # type: ignore[no-untyped-def]
    """A symbol string at ``i``: (its id or -1, next index)."""
    if buf[i] != 34:
        return -1, i
    end = _string_end(buf, i + 1, n)
    if end < 0:
        return -1, i
    return _intern(buf, i + 1, end, symbols, symbol_bytes), end + 1


@njit(cache=True, error_model="numpy")
def _bounded(buf, i, n, high):  # type: ignore[no-untyped-def]
    """An integer in ``[0, high]`` at ``i``: (value or -1, next index)."""
    ok, value, i = _integer(buf, i, n)
    if not ok or value < 0 or value > high:
        return -1, i
    return value, i


@njit(cache=True, error_model="numpy")
def _real(buf, i, n, pow10):  # type: ignore[no-untyped-def]
    """A number read exactly at ``i``: (ok, value, next index)."""
    ok, _, _, value, i = _number(buf, i, n, pow10)
    return ok and value == value, value, i


@njit(cache=True, error_model="numpy")
def _indicators(buf, i, n, out, row, first):  # type: ignore[no-untyped-def]
    """A list of at most MAX_INDICATORS u16 codes at ``i`` into ``out[row, first:]``: (count or
    -1, next index)."""
    for k in range(MAX_INDICATORS):
        out[row, first + k] = 0
    if buf[i] != 91:  # [
        return -1, i
    i = _skip_ws(buf, i + 1, n)
    if i < n and buf[i] == 93:
        return 0, i + 1
    count = 0
    while True:
        if count >= MAX_INDICATORS:
            return -1, i
        code, i = _bounded(buf, i, n, 65535)
        if code < 0:
            return -1, i
        out[row, first + count] = code
        count += 1
        i = _skip_ws(buf, i, n)
        if i >= n:
            return -1, i
        if buf[i] == 93:
            return count, i + 1
        if buf[i] != 44:
            return -1, i
        i = _skip_ws(buf, i + 1, n)


@njit(cache=True, error_model="numpy")
def _event_type(buf, i, n):  # type: ignore[no-untyped-def]
    """The ``ev`` string at ``i``: (QUOTES, AGGREGATES (``A``), _MINUTES (``AM``), LULDS, or -1;
    next index)."""
    if buf[i] != 34:
        return -1, i
    end = _string_end(buf, i + 1, n)
    if end < 0:
        return -1, i
    length = end - i - 1
    b0 = buf[i + 1]
    if length == 1 and b0 == 81:  # Q
        return QUOTES, end + 1
    if length == 1 and b0 == 65:  # A
        return AGGREGATES, end + 1
    if length == 2 and b0 == 65 and buf[i + 2] == 77:  # AM
        return _MINUTES, end + 1
    if length == 4 and b0 == 76 and buf[i + 2] == 85 and buf[i + 3] == 76 and buf[i + 4] == 68:
        return LULDS, end + 1
    return -1, i


@njit(cache=True, error_model="numpy")
def _scan_quote(buf, i, n, row, ints, reals, symbols, symbol_bytes, pow10):  # type: ignore[no-untyped-def]
    """The rest of a ``Q`` object after its ``ev`` into row ``row`` of the quotes' planes: the
    index past it, or -1."""
    sym = -1
    t = -1
    q = 0
    bp = 0.0
    ap = 0.0
    bs = 0
    ask_size = 0
    bx = 0
    ax = 0
    c = 0
    z = 0
    ni = 0
    has = 0
    for k in range(MAX_INDICATORS):
        ints[row, Q_I + k] = 0
    more, i = _next_key(buf, i, n)
    while more == 1:
        key, length, i = _key(buf, i, n)
        if key < 0:
            return -1
        k0 = buf[key]
        k1 = buf[key + 1] if length > 1 else 0
        if length == 3 and k0 == 115 and k1 == 121 and buf[key + 2] == 109:  # sym
            sym, i = _symbol(buf, i, n, symbols, symbol_bytes)
            if sym < 0:
                return -1
        elif length == 2 and k1 == 112 and (k0 == 98 or k0 == 97):  # bp ap
            ok, value, i = _real(buf, i, n, pow10)
            if not ok:
                return -1
            if k0 == 98:
                bp = value
                has |= QUOTE_BP
            else:
                ap = value
                has |= QUOTE_AP
        elif length == 2 and k1 == 115 and (k0 == 98 or k0 == 97):  # bs as
            value, i = _bounded(buf, i, n, 4294967295)
            if value < 0:
                return -1
            if k0 == 98:
                bs = value
                has |= QUOTE_BS
            else:
                ask_size = value
                has |= QUOTE_AS
        elif length == 2 and k1 == 120 and (k0 == 98 or k0 == 97):  # bx ax
            value, i = _bounded(buf, i, n, 65535)
            if value < 0:
                return -1
            if k0 == 98:
                bx = value
                has |= QUOTE_BX
            else:
                ax = value
                has |= QUOTE_AX
        elif length == 1 and k0 == 99:  # c
            c, i = _bounded(buf, i, n, 65535)
            if c < 0:
                return -1
            has |= QUOTE_C
        elif length == 1 and k0 == 105:  # i
            ni, i = _indicators(buf, i, n, ints, row, Q_I)
            if ni < 0:
                return -1
            has |= QUOTE_I
        elif length == 1 and k0 == 116:  # t
            t, i = _bounded(buf, i, n, 999_999_999_999_999_999)
            if t < 0:
                return -1
        elif length == 1 and k0 == 113:  # q
            ok, q, i = _integer(buf, i, n)
            if not ok:
                return -1
            has |= QUOTE_Q
        elif length == 1 and k0 == 122:  # z
            z, i = _bounded(buf, i, n, 255)
            if z < 0:
                return -1
            has |= QUOTE_Z
        elif length == 4 and k0 == 116 and k1 == 114 and buf[key + 2] == 102:  # trfi trft
            ok, _, i = _integer(buf, i, n)  # not kept (msgspec ignores them too)
            if not ok or (buf[key + 3] != 105 and buf[key + 3] != 116):
                return -1
        else:
            return -1
        more, i = _next_key(buf, i, n)
    if more < 0 or sym < 0 or t < 0:
        return -1
    ints[row, Q_T] = t
    ints[row, Q_Q] = q
    ints[row, Q_BS] = bs
    ints[row, Q_AS] = ask_size
    ints[row, Q_BX] = bx
    ints[row, Q_AX] = ax
    ints[row, Q_C] = c
    ints[row, Q_Z] = z
    ints[row, Q_NI] = ni
    ints[row, Q_HAS] = has
    ints[row, Q_IDS] = sym
    reals[row, Q_BP] = bp
    reals[row, Q_AP] = ap
    return i


@njit(cache=True, error_model="numpy")
def _scan_aggregate(buf, i, n, row, minute, ints, reals, symbols, symbol_bytes, pow10):  # type: ignore[no-untyped-def]
    """The rest of an ``A`` / ``AM`` object after its ``ev``: the index past it, or -1."""
    sym = -1
    start = -1
    end = -1
    o = h = low = c = v = vw = av = op = a = z = 0.0
    otc = 0
    has = 0
    more, i = _next_key(buf, i, n)
    while more == 1:
        key, length, i = _key(buf, i, n)
        if key < 0:
            return -1
        k0 = buf[key]
        k1 = buf[key + 1] if length > 1 else 0
        if length == 3 and k0 == 115 and k1 == 121 and buf[key + 2] == 109:  # sym
            sym, i = _symbol(buf, i, n, symbols, symbol_bytes)
            if sym < 0:
                return -1
        elif length == 3 and k0 == 111 and k1 == 116 and buf[key + 2] == 99:  # otc
            if i + 3 < n and buf[i] == 116 and buf[i + 1] == 114 and buf[i + 2] == 117:
                if buf[i + 3] != 101:  # true
                    return -1
                otc = 1
                i += 4
            elif i + 4 < n and buf[i] == 102 and buf[i + 1] == 97 and buf[i + 2] == 108:
                if buf[i + 3] != 115 or buf[i + 4] != 101:  # false
                    return -1
                otc = 0
                i += 5
            else:
                return -1
            has |= AGG_OTC
        elif length == 1 and (k0 == 115 or k0 == 101):  # s e
            value, i = _bounded(buf, i, n, 999_999_999_999_999_999)
            if value < 0:
                return -1
            if k0 == 115:
                start = value
            else:
                end = value
        else:
            ok, value, i = _real(buf, i, n, pow10)
            if not ok:
                return -1
            if length == 1:
                if k0 == 118:  # v
                    v = value
                    has |= AGG_V
                elif k0 == 111:  # o
                    o = value
                    has |= AGG_O
                elif k0 == 99:  # c
                    c = value
                    has |= AGG_C
                elif k0 == 104:  # h
                    h = value
                    has |= AGG_H
                elif k0 == 108:  # l
                    low = value
                    has |= AGG_L
                elif k0 == 97:  # a
                    a = value
                    has |= AGG_A
                elif k0 == 122:  # z
                    z = value
                    has |= AGG_Z
                else:
                    return -1
            elif length == 2 and k0 == 97 and k1 == 118:  # av
                av = value
                has |= AGG_AV
            elif length == 2 and k0 == 111 and k1 == 112:  # op
                op = value
                has |= AGG_OP
            elif length == 2 and k0 == 118 and k1 == 119:  # vw
                vw = value
                has |= AGG_VW
            else:
                return -1
        more, i = _next_key(buf, i, n)
    if more < 0 or sym < 0 or start < 0 or end < 0:
        return -1
    ints[row, A_S] = start
    ints[row, A_E] = end
    ints[row, A_HAS] = has
    ints[row, A_OTC] = otc
    ints[row, A_MINUTE] = minute
    ints[row, A_IDS] = sym
    reals[row, A_O] = o
    reals[row, A_H] = h
    reals[row, A_L] = low
    reals[row, A_C] = c
    reals[row, A_V] = v
    reals[row, A_VW] = vw
    reals[row, A_AV] = av
    reals[row, A_OP] = op
    reals[row, A_A] = a
    reals[row, A_Z] = z
    return i


@njit(cache=True, error_model="numpy")
def _scan_luld(buf, i, n, row, ints, reals, symbols, symbol_bytes, pow10):  # type: ignore[no-untyped-def]
    """The rest of a ``LULD`` object after its ``ev``: the index past it, or -1."""
    sym = -1
    t = -1
    q = 0
    h = 0.0
    low = 0.0
    z = 0
    ni = 0
    has = 0
    for k in range(MAX_INDICATORS):
        ints[row, L_I + k] = 0
    more, i = _next_key(buf, i, n)
    while more == 1:
        key, length, i = _key(buf, i, n)
        if key < 0 or length != 1:
            return -1
        k0 = buf[key]
        if k0 == 84:  # T: the symbol
            sym, i = _symbol(buf, i, n, symbols, symbol_bytes)
            if sym < 0:
                return -1
        elif k0 == 104 or k0 == 108:  # h l
            ok, value, i = _real(buf, i, n, pow10)
            if not ok:
                return -1
            if k0 == 104:
                h = value
                has |= LULD_H
            else:
                low = value
                has |= LULD_L
        elif k0 == 105:  # i
            ni, i = _indicators(buf, i, n, ints, row, L_I)
            if ni < 0:
                return -1
            has |= LULD_I
        elif k0 == 122:  # z
            z, i = _bounded(buf, i, n, 255)
            if z < 0:
                return -1
            has |= LULD_Z
        elif k0 == 116:  # t
            t, i = _bounded(buf, i, n, 999_999_999_999_999_999)
            if t < 0:
                return -1
        elif k0 == 113:  # q
            ok, q, i = _integer(buf, i, n)
            if not ok:
                return -1
            has |= LULD_Q
        else:
            return -1
        more, i = _next_key(buf, i, n)
    if more < 0 or sym < 0 or t < 0:
        return -1
    ints[row, L_T] = t
    ints[row, L_Q] = q
    ints[row, L_Z] = z
    ints[row, L_NI] = ni
    ints[row, L_HAS] = has
    ints[row, L_IDS] = sym
    reals[row, L_H] = h
    reals[row, L_L] = low
    return i


@njit(cache=True, error_model="numpy")
def scan_frame(  # type: ignore[no-untyped-def]
    buf, row, t_out, p_out, s_out, q_out, trft_out, trfi_out, x_out, z_out, nc_out, c_out,
    id_out, ints, reals, rows, symbols, symbol_bytes, pow10,
):  # fmt: skip
    """One frame: trades into the trade columns from ``row``, the other kinds into their
    planes of ``ints`` and ``reals`` from ``rows``; the next trade row (``rows`` moved on), or -1 (bail: nothing
    moved, though rows past those in use may have been written)."""
    n = buf.shape[0]
    capacity = t_out.shape[0]
    quote_row, aggregate_row, luld_row = rows[QUOTES], rows[AGGREGATES], rows[LULDS]
    event_rows = ints.shape[1]
    i = _skip_ws(buf, 0, n)
    if i >= n or buf[i] != 91:  # [
        return -1
    i = _skip_ws(buf, i + 1, n)
    if i < n and buf[i] == 93:  # ]
        i = _skip_ws(buf, i + 1, n)
        return row if i == n else -1
    while True:
        if i >= n or buf[i] != 123 or row >= capacity:  # {
            return -1
        i += 1
        first = True  # the next key is the object's first
        other = False  # a quote, aggregate or LULD, read whole
        is_trade = False
        sym_id = -1
        price = np.nan
        size_s = np.nan
        size_ds = np.nan
        t = -1
        q = 0
        trft = 0
        trfi = 0
        x = 0
        z = 0
        nc = 0
        for k in range(8):
            c_out[row, k] = 0
        while True:
            i = _skip_ws(buf, i, n)
            if i >= n or buf[i] != 34:
                return -1
            key = i + 1
            i = _string_end(buf, key, n)
            if i < 0:
                return -1
            length = i - key
            k0 = buf[key]
            k1 = buf[key + 1] if length > 1 else 0
            i = _skip_ws(buf, i + 1, n)
            if i >= n or buf[i] != 58:  # :
                return -1
            i = _skip_ws(buf, i + 1, n)
            if i >= n:
                return -1
            if length == 2 and k0 == 101 and k1 == 118:  # ev
                if i + 2 < n and buf[i] == 34 and buf[i + 1] == 84 and buf[i + 2] == 34:
                    is_trade = True
                    i += 3
                elif not first:
                    return -1  # another type is read only when it says so first
                else:
                    kind, i = _event_type(buf, i, n)
                    if kind == QUOTES and quote_row < event_rows:
                        i = _scan_quote(
                            buf, i, n, quote_row, ints[QUOTES], reals[QUOTES], symbols,
                            symbol_bytes, pow10,
                        )  # fmt: skip
                        quote_row += 1
                    elif kind in (AGGREGATES, _MINUTES) and aggregate_row < event_rows:
                        i = _scan_aggregate(
                            buf, i, n, aggregate_row, 1 if kind == _MINUTES else 0,
                            ints[AGGREGATES], reals[AGGREGATES], symbols, symbol_bytes, pow10,
                        )  # fmt: skip
                        aggregate_row += 1
                    elif kind == LULDS and luld_row < event_rows:
                        i = _scan_luld(
                            buf, i, n, luld_row, ints[LULDS], reals[LULDS], symbols,
                            symbol_bytes, pow10,
                        )  # fmt: skip
                        luld_row += 1
                    else:
                        return -1
                    if i < 0:
                        return -1
                    other = True
                    break
            elif length == 3 and k0 == 115 and k1 == 121 and buf[key + 2] == 109:  # sym
                if buf[i] != 34:
                    return -1
                end = _string_end(buf, i + 1, n)
                if end < 0:
                    return -1
                sym_id = _intern(buf, i + 1, end, symbols, symbol_bytes)
                if sym_id < 0:
                    return -1
                i = end + 1
            elif length == 2 and k0 == 100 and k1 == 115:  # ds
                if buf[i] != 34:
                    return -1
                ok, _, _, value, end = _number(buf, i + 1, n, pow10)
                if not ok or end >= n or buf[end] != 34 or not value >= 0:
                    return -1
                size_ds = value
                i = end + 1
            elif length == 1 and k0 == 99:  # c
                if buf[i] != 91:
                    return -1
                i = _skip_ws(buf, i + 1, n)
                if i < n and buf[i] == 93:
                    i += 1
                else:
                    while True:
                        ok, is_int, code, _, i = _number(buf, i, n, pow10)
                        if not ok or not is_int or code < 0 or code > 255 or nc >= 8:
                            return -1
                        c_out[row, nc] = code
                        nc += 1
                        i = _skip_ws(buf, i, n)
                        if i >= n:
                            return -1
                        if buf[i] == 93:
                            i += 1
                            break
                        if buf[i] != 44:
                            return -1
                        i = _skip_ws(buf, i + 1, n)
            elif length == 2 and k0 == 112 and k1 == 116:  # pt: an integer, not published
                ok, _, i = _integer(buf, i, n)
                if not ok:
                    return -1
            elif length == 1 and k0 == 105:  # i: a string, not published
                if buf[i] != 34:
                    return -1
                end = _string_end(buf, i + 1, n)
                if end < 0:
                    return -1
                i = end + 1
            else:
                if length == 1 and k0 == 112:  # p
                    ok, _, _, value, i = _number(buf, i, n, pow10)
                    if not ok or not value > 0:
                        return -1
                    price = value
                    integer = 0
                else:
                    ok, integer, i = _integer(buf, i, n)
                    if not ok:
                        return -1
                if length == 1 and k0 == 112:  # p
                    pass
                elif length == 1 and k0 == 115:  # s
                    if integer < 0 or integer > 999_999_999_999_999:  # exact as a double
                        return -1
                    size_s = float(integer)
                elif length == 1 and k0 == 116:  # t
                    if integer < 0:
                        return -1
                    t = integer
                elif length == 1 and k0 == 113:  # q
                    q = integer
                elif length == 1 and k0 == 120:  # x
                    if integer < 0 or integer > 65535:
                        return -1
                    x = integer
                elif length == 1 and k0 == 122:  # z
                    if integer < 0 or integer > 255:
                        return -1
                    z = integer
                elif length == 4 and k0 == 116 and k1 == 114 and buf[key + 2] == 102:  # trf.
                    if buf[key + 3] == 105:  # trfi
                        if integer < 0 or integer > 65535:
                            return -1
                        trfi = integer
                    elif buf[key + 3] == 116:  # trft
                        trft = integer
                    else:
                        return -1
                else:
                    return -1  # an unknown key: leave to msgspec
            first = False
            i = _skip_ws(buf, i, n)
            if i >= n:
                return -1
            if buf[i] == 44:  # ,
                i += 1
                continue
            if buf[i] == 125:  # }
                i += 1
                break
            return -1
        if not other:
            if not is_trade or sym_id < 0 or price != price or t < 0:
                return -1
            size = size_ds if size_ds == size_ds else size_s
            if size != size:
                return -1
            t_out[row] = t
            p_out[row] = price
            s_out[row] = size
            q_out[row] = q
            trft_out[row] = trft
            trfi_out[row] = trfi
            x_out[row] = x
            z_out[row] = z
            nc_out[row] = nc
            id_out[row] = sym_id
            row += 1
        i = _skip_ws(buf, i, n)
        if i >= n:
            return -1
        if buf[i] == 44:
            i = _skip_ws(buf, i + 1, n)
            continue
        if buf[i] == 93:
            i = _skip_ws(buf, i + 1, n)
            if i != n:
                return -1
            rows[QUOTES] = quote_row
            rows[AGGREGATES] = aggregate_row
            rows[LULDS] = luld_row
            return row
        return -1
