"""The decoder reads quotes, aggregates and LULD bands into exactly the events they were, and
rejects, counts and names what is not valid."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.feed import scan
from polyfan.feed.upstream import EventBatch, EventDecoder
from polyfan.market import Market
from polyfan.wire import codec, polygon

NOW = 1_781_622_376_100
INDICATORS = st.lists(st.integers(0, 65_535), max_size=4)
PRICES = st.floats(min_value=0, max_value=1e9, allow_nan=False)
VOLUMES = st.floats(min_value=0, max_value=1e15, allow_nan=False) | st.integers(0, 10**15)
SYMBOLS = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ.:/_-0123456789", min_size=1, max_size=32)


def optional(**strategies: Any) -> st.SearchStrategy[dict[str, Any]]:
    """A dict with any subset of the keys."""
    return st.fixed_dictionaries({}, optional=strategies)


quotes = st.builds(
    lambda sym, t, rest: {"ev": "Q", "sym": sym, **rest, "t": t},
    SYMBOLS,
    st.integers(0, NOW),
    optional(
        bx=st.integers(0, 65_535), bp=PRICES, bs=st.integers(0, 2**32 - 1),
        ax=st.integers(0, 65_535), ap=PRICES, **{"as": st.integers(0, 2**32 - 1)},
        c=st.integers(0, 65_535), i=INDICATORS, q=st.integers(-(2**63), 2**63 - 1),
        z=st.integers(0, 255),
    ),
)  # fmt: skip
aggregates = st.builds(
    lambda ev, sym, s, length, rest: {"ev": ev, "sym": sym, **rest, "s": s, "e": s + length},
    st.sampled_from(("A", "AM")),
    SYMBOLS,
    st.integers(0, NOW),
    st.sampled_from((0, 1000, 60_000)),
    optional(
        v=VOLUMES, av=VOLUMES, op=PRICES, vw=PRICES, o=PRICES, c=PRICES, h=PRICES, l=PRICES,
        a=PRICES, z=VOLUMES, otc=st.booleans(),
    ),
)  # fmt: skip
bands = st.builds(
    lambda sym, t, rest: {"ev": "LULD", "T": sym, **rest, "t": t},
    SYMBOLS,
    st.integers(0, 2**62),  # no future check: Polygon's own example is in microseconds
    optional(h=PRICES, l=PRICES, i=INDICATORS, z=st.integers(0, 255), q=st.integers(0, 2**62)),
)


def published(batches: list[EventBatch]) -> dict[str, list[dict[str, Any]]]:
    """What subscribers get: each message through the wire codec, back into Polygon events."""
    received: dict[str, list[dict[str, Any]]] = {}
    for batch in batches:
        for topic, count, payload in zip(batch.topics, batch.counts, batch.payloads, strict=True):
            message = codec.decode(codec.encode(topic, batch.kind, 1, 1, count, payload))
            found = orjson.loads(orjson.dumps(polygon.encode_events_json(message)))
            received.setdefault(message.topic, []).extend(found)
    return received


def topic_of(event: dict[str, Any]) -> str:
    return f"{event['ev']}.{event.get('sym') or event['T']}"


def normalized(event: dict[str, Any]) -> dict[str, Any]:
    """Polygon's integer keys are integers; volumes stay integers when whole."""
    return orjson.loads(orjson.dumps(event))


@settings(deadline=None, max_examples=200)
@given(st.lists(quotes | aggregates | bands, min_size=1, max_size=30))
def test_valid_events_reach_their_topic_as_they_were_sent(sent: list[dict[str, Any]]) -> None:
    decoder = EventDecoder()
    decoded = decoder.decode([orjson.dumps(sent)], NOW)
    expected: dict[str, list[dict[str, Any]]] = {}
    for event in sent:
        expected.setdefault(topic_of(event), []).append(normalized(event))
    assert published(decoded.batches) == expected
    assert decoder.stats.bad_messages == 0 and not decoded.problems


def test_the_sims_stream_is_published_whole_per_topic() -> None:
    market = Market(8, seed=3)
    frames = [f for k in range(400) for f in market.stream(20, NOW - 100_000 + 200 * k)]
    decoder = EventDecoder()
    decoded = decoder.decode([orjson.dumps(f) for f in frames], NOW)
    expected: dict[str, list[dict[str, Any]]] = {}
    for event in (e for f in frames for e in f if e["ev"] != "T"):
        expected.setdefault(topic_of(event), []).append(event)
    assert published(decoded.batches) == expected
    counts = {b.label: b.count for b in decoded.batches}
    assert set(counts) == {"Q", "A", "AM", "LULD"}
    assert decoder.stats.accepted == {**counts, "T": decoded.trades.count}


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"ev": "Q", "sym": "A", "bp": -0.01, "t": 1}, "price"),
        ({"ev": "Q", "sym": "A", "ap": 1e10, "t": 1}, "price"),
        ({"ev": "Q", "sym": "A", "bp": 1e400, "t": 1}, "price"),
        ({"ev": "Q", "sym": "A", "bs": 2**32, "t": 1}, "size"),
        ({"ev": "Q", "sym": "A", "bs": 1.5, "t": 1}, "size"),
        ({"ev": "Q", "sym": "A", "i": [1, 2, 3, 4, 5], "t": 1}, "indicators"),
        ({"ev": "Q", "sym": "A", "t": NOW + 5_001}, "future"),
        ({"ev": "Q", "sym": "A", "t": -1}, "timestamp"),
        ({"ev": "Q", "sym": "A"}, "timestamp"),
        ({"ev": "Q", "sym": "A b", "t": 1}, "symbol"),
        ({"ev": "Q", "sym": "A", "t": 1, "bx": 65_536}, "field"),
        ({"ev": "A", "sym": "A", "s": 2, "e": 1}, "window"),
        ({"ev": "A", "sym": "A", "s": 1, "e": 2, "v": -1}, "size"),
        ({"ev": "AM", "sym": "A", "s": 1, "e": 2, "av": 1e16}, "size"),
        ({"ev": "AM", "sym": "A", "s": 1, "e": 2, "vw": "1"}, "price"),
        ({"ev": "A", "sym": "A", "s": NOW + 5_001, "e": NOW + 6_001}, "future"),
        ({"ev": "A", "sym": "A", "e": 2}, "timestamp"),
        ({"ev": "LULD", "T": "A", "t": 1, "h": -1}, "price"),
        ({"ev": "LULD", "sym": "A", "t": 1}, "symbol"),
    ],
)
def test_invalid_events_are_rejected_counted_by_type_and_named(
    event: dict[str, Any], reason: str
) -> None:
    decoder = EventDecoder()
    good = {"ev": "T", "sym": "A", "p": 1.5, "s": 1, "t": 1}
    decoded = decoder.decode([orjson.dumps([good, event, good])], NOW)
    assert decoded.trades.count == 2  # the trades around it are kept
    assert not decoded.batches
    assert decoder.stats.rejected_events == {event["ev"]: 1}
    assert decoder.stats.bad_messages == 1
    (problem,) = decoded.problems
    assert f"({reason}" in problem.what


def test_a_rejected_aggregate_is_counted_under_its_own_type() -> None:
    decoder = EventDecoder()
    sent = [
        {"ev": "A", "sym": "A", "s": 1, "e": 2, "o": -1.0},
        {"ev": "AM", "sym": "A", "s": 1, "e": 2, "o": -1.0},
        {"ev": "AM", "sym": "A", "s": 1, "e": 2, "o": 1.0},
    ]
    decoded = decoder.decode([orjson.dumps(sent)], NOW)
    assert decoder.stats.rejected_events == {"A": 1, "AM": 1}
    assert published(decoded.batches) == {"AM.A": [sent[2]]}


# --- the numba scanner reads these kinds exactly as msgspec does ---------------------------


def decoded_both_ways(frames: list[bytes]) -> tuple[tuple[Any, ...], tuple[Any, ...], int]:
    """(what the decoder publishes, what it publishes with the scanner off, frames the scanner
    read): trades, every other batch and the counters."""

    def run() -> tuple[Any, ...]:
        decoder = EventDecoder()
        decoded = decoder.decode(frames, NOW)
        trades = [r.tobytes() for r in decoded.trades.records], decoded.trades.topics
        batches = {  # messages by topic (symbol ids, hence topic order, may differ by path)
            (b.label, topic): (payload, count)
            for b in decoded.batches
            for topic, payload, count in zip(b.topics, b.payloads, b.counts, strict=True)
        }
        stats = decoder.stats
        return trades, batches, stats.accepted, stats.rejected_events, stats.bad_messages

    scanned = sum(scan.Columns(len(f)).scan(f, 0, scan.SymbolTable()) >= 0 for f in frames)
    fast = run()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(scan.Columns, "scan", lambda self, frame, row, table: scan.BAIL)
        slow = run()
    return fast, slow, scanned


def spelled(event: dict[str, Any], draw: Any) -> bytes:
    """The event as JSON with spaces here and there, ev first as Polygon writes it."""
    space = draw(st.sampled_from(["", " ", "\n "]))
    items = [f'"{k}":{space}{orjson.dumps(v).decode()}' for k, v in event.items()]
    return ("{" + space + f",{space}".join(items) + space + "}").encode()


@settings(deadline=None, max_examples=200)
@given(data=st.data())
def test_the_scanner_reads_quotes_aggregates_and_bands_as_msgspec_does(data: st.DataObject) -> None:
    sent = data.draw(st.lists(quotes | aggregates | bands, min_size=1, max_size=20))
    frame = b"[" + b",".join(spelled(e, data.draw) for e in sent) + b"]"
    fast, slow, _ = decoded_both_ways([frame])
    assert fast == slow


def test_the_scanner_reads_every_frame_of_the_sims_stream() -> None:
    market = Market(8, seed=9)
    frames = [
        orjson.dumps(f) for k in range(300) for f in market.stream(20, NOW - 90_000 + 300 * k)
    ]
    fast, slow, scanned = decoded_both_ways(frames)
    assert scanned == len(frames)  # mixed T, Q, A, AM and LULD frames: none left to msgspec
    assert fast == slow
    assert set(fast[2]) == {"T", "Q", "A", "AM", "LULD"}


@pytest.mark.parametrize(
    ("event", "scanned"),
    [
        (b'{"ev":"Q","sym":"A","t":1,"bp":1.5,"bp":2.5}', True),  # a repeated key: the last one
        (b'{"ev":"Q","sym":"A","t":1,"trfi":3,"trft":4}', True),  # kept by neither
        (b'{"ev":"Q","sym":"A","t":1,"bp":-1.5}', True),  # read, then rejected (price)
        (b'{"ev":"Q","sym":"A","t":1,"i":[]}', True),
        (b'{"ev":"Q","sym":"A","t":99999999999999}', True),  # read, then rejected (future)
        (b'{"ev":"A","sym":"A","s":1,"e":2,"otc":false}', True),
        (
            b'{"ev":"AM","sym":"A","s":1,"e":2,"otc":true,"v":1.25,"dv":"1.25"}',
            False,
        ),  # dv: msgspec
        (b'{"ev":"LULD","T":"A","t":1,"i":[1,2,3,4]}', True),
        (b'{"sym":"A","ev":"Q","t":1}', False),  # ev not first: msgspec
        (b'{"ev":"Q","sym":"A","t":1,"bp":1e2}', False),  # an exponent: msgspec
        (b'{"ev":"Q","sym":"A","t":1,"i":[1,2,3,4,5]}', False),  # too many: msgspec rejects
        (b'{"ev":"Q","sym":"A","t":1,"bs":4294967296}', False),  # out of u32: msgspec rejects
        (b'{"ev":"LULD","T":"A","t":1,"z":256}', False),
        (b'{"ev":"A","sym":"A","s":1,"e":2,"otc":1}', False),
        (b'{"ev":"Q","sym":"A","t":1,"c":null}', False),
    ],
)
def test_the_scanner_and_msgspec_agree_on_edge_cases(event: bytes, scanned: bool) -> None:
    """``scanned``: whether the scanner reads the frame (else it leaves it to msgspec)."""
    trade = b'{"ev":"T","sym":"A","p":1.5,"s":1,"t":1}'
    fast, slow, read = decoded_both_ways([b"[" + trade + b"," + event + b"]"])
    assert fast == slow
    assert read == scanned


def test_the_scanner_runs_the_same_as_python() -> None:
    """scan_frame's py_func on a mixed frame: the same rows as the compiled kernel."""
    market = Market(4, seed=2)
    frame = orjson.dumps([e for f in market.stream(40, NOW - 70_000) for e in f])
    results = []
    for python in (False, True):
        columns, table = scan.Columns(len(frame)), scan.SymbolTable()
        kernel = getattr(scan.scan_frame, "py_func", scan.scan_frame) if python else scan.scan_frame
        row = kernel(
            np.frombuffer(frame, np.uint8), 0, columns.t, columns.p, columns.s, columns.q,
            columns.trft, columns.trfi, columns.x, columns.z, columns.nc, columns.c,
            columns.ids, columns.ints, columns.reals, columns.rows, table.arrays,
            scan._SYMBOL_BYTES, scan._POW10,
        )  # fmt: skip
        kinds = [
            columns.events[k].records(slice(0, int(columns.rows[k])), dtype).tobytes()
            for k, dtype in ((0, codec.QUOTE_DTYPE), (1, codec.AGG_DTYPE), (2, codec.LULD_DTYPE))
        ]
        results.append((row, columns.records(row).tobytes(), columns.rows.tolist(), kinds))
    assert results[0] == results[1]
    assert results[0][2][0] > 0
