from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.errors import AuthenticationError
from polyfan.feed.upstream import (
    MAX_RAW_TYPES,
    Action,
    Authenticated,
    EventDecoder,
    FeedClock,
    Problem,
    State,
    StatusReceived,
    Subscribed,
    UpstreamSession,
)
from polyfan.wire import codec

NOW = 1_781_622_376_100
KEY = "s3cr3t-api-key-ABCD1234"
# A real frame from the vendor (protocol.md), and the statuses it sends.
REAL_TRADE = (
    b'{"ev":"T","sym":"AAPL","i":"143541","x":4,"p":297.845,"s":40,"t":1781622376036,'
    b'"pt":1781622376029,"q":4938312,"z":3,"trfi":202,"trft":1781622376036,"ds":"40.0"}'
)
CONNECTED = b'[{"ev":"status","status":"connected","message":"Connected Successfully"}]'
AUTH_SUCCESS = b'[{"ev":"status","status":"auth_success","message":"authenticated"}]'
SUBSCRIBED = b'[{"ev":"status","status":"success","message":"subscribed to: T.*"}]'


def status(name: str, message: str = "") -> bytes:
    return orjson.dumps([{"ev": "status", "status": name, "message": message}])


def frame(*events: dict[str, Any]) -> bytes:
    return orjson.dumps(list(events))


def trade(**fields: Any) -> dict[str, Any]:
    return {"ev": "T", "sym": "AAPL", "p": 10.5, "s": 100, "t": NOW - 50, **fields}


def expected_record(event: dict[str, Any]) -> tuple[Any, ...]:
    """The TRADE_DTYPE record a valid event must become, computed independently."""
    codes = event.get("c") or []
    size = float(event["ds"]) if "ds" in event else float(event["s"])
    return (
        event["t"],
        float(event["p"]),
        size,
        event.get("q", 0),
        event.get("trft", 0),
        event.get("trfi", 0),
        event.get("x", 0),
        event.get("z", 0),
        len(codes),
        [*codes, *[0] * (8 - len(codes))],
        [0, 0],
    )


def as_tuples(records: np.ndarray) -> list[tuple[Any, ...]]:
    return [
        (*row[:9], [int(c) for c in row[9]], [int(c) for c in row[10]]) for row in records.tolist()
    ]


def streaming_session() -> UpstreamSession:
    session = UpstreamSession(KEY, "T.*", EventDecoder())
    session.receive_frames([CONNECTED, AUTH_SUCCESS, SUBSCRIBED], NOW)
    session.data_to_send()
    return session


# --- the session ------------------------------------------------------------------------------


def test_session_authenticates_on_connected_then_subscribes_on_auth_success() -> None:
    session = UpstreamSession(KEY, "T.AAPL,T.MSFT", EventDecoder())
    assert session.receive_frames([CONNECTED], NOW).events == []
    assert session.data_to_send() == ['{"action":"auth","params":"' + KEY + '"}']
    assert session.state is State.AUTHENTICATING

    received = session.receive_frames([AUTH_SUCCESS], NOW)
    assert received.events == [Authenticated("authenticated")]
    assert session.data_to_send() == ['{"action":"subscribe","params":"T.AAPL,T.MSFT"}']

    frames = [
        status("success", "subscribed to: T.AAPL"),
        status("success", "subscribed to: T.MSFT"),
    ]
    assert session.receive_frames(frames, NOW).events == [
        Subscribed("subscribed to: T.AAPL", first=True),
        Subscribed("subscribed to: T.MSFT", first=False),
    ]
    assert session.state is State.STREAMING
    assert session.data_to_send() == []


def test_statuses_and_trades_in_one_frame_are_all_handled() -> None:
    session = UpstreamSession(KEY, "T.*", EventDecoder())
    mixed = orjson.dumps(
        [
            {"ev": "status", "status": "connected", "message": "Connected Successfully"},
            orjson.loads(REAL_TRADE),
        ]
    )
    received = session.receive_frames([mixed], NOW)
    assert len(session.data_to_send()) == 1
    assert received.trades.count == 1


def test_auth_failed_is_fatal_and_the_error_never_shows_the_key() -> None:
    session = UpstreamSession(KEY, "T.*", EventDecoder())
    session.receive_frames([CONNECTED], NOW)
    with pytest.raises(AuthenticationError) as caught:
        session.receive_frames([status("auth_failed", "authentication failed")], NOW)
    text = str(caught.value)
    assert KEY not in text
    assert "authentication failed" in text
    assert "****1234" in text
    assert caught.value.exit_status == 2


def test_session_repr_never_shows_the_key() -> None:
    assert KEY not in repr(UpstreamSession(KEY, "T.*", EventDecoder()))


@pytest.mark.parametrize(
    ("name", "action"),
    [
        ("auth_timeout", Action.RECONNECT),
        ("auth_required", Action.RECONNECT),
        ("force_disconnect", Action.RECONNECT),
        ("slow_consumer", Action.RECONNECT),
        ("max_connections", Action.COOL_DOWN),
        ("error", Action.NONE),
        ("some_future_status", Action.NONE),
    ],
)
def test_every_other_status_maps_to_what_the_shell_must_do(name: str, action: Action) -> None:
    session = streaming_session()
    received = session.receive_frames([status(name, "why")], NOW)
    assert len(received.events) == 1
    event = received.events[0]
    assert isinstance(event, StatusReceived)
    assert (event.status, event.message, event.action) == (name, "why", action)
    assert session.decoder.stats.statuses[name] == 1


def test_max_connections_warning_says_another_process_uses_the_key() -> None:
    event = streaming_session().receive_frames([status("max_connections")], NOW).events[0]
    assert isinstance(event, StatusReceived)
    assert "ANOTHER PROCESS IS USING THIS API KEY" in event.warning
    assert "60 s" in event.warning


def test_a_repeated_connected_status_does_not_send_the_key_again() -> None:
    session = streaming_session()
    session.receive_frames([CONNECTED], NOW)
    assert session.data_to_send() == []


# --- the decoder: values --------------------------------------------------------------------


def test_a_real_vendor_trade_becomes_exactly_its_record() -> None:
    decoded = EventDecoder().decode([b"[" + REAL_TRADE + b"]"], NOW)
    assert decoded.trades.topics == [b"T.AAPL\x00"]
    assert as_tuples(decoded.trades.records[0]) == [expected_record(orjson.loads(REAL_TRADE))]
    assert decoded.trades.max_t == 1781622376036


def test_trades_are_grouped_per_symbol_in_arrival_order_across_frames() -> None:
    events = [
        trade(sym="AAPL", t=NOW - 5, q=1),
        trade(sym="A", t=NOW - 9, q=2),
        trade(sym="AAPL", t=NOW - 7, q=3),
    ]
    more = [trade(sym="A", t=NOW - 8, q=4), trade(sym="BRK.A", t=NOW - 1, q=5)]
    batch = EventDecoder().decode([frame(*events), frame(*more)], NOW).trades
    by_topic = {
        topic: [int(q) for q in records["q"]]
        for topic, records in zip(batch.topics, batch.records, strict=True)
    }
    assert by_topic == {b"T.AAPL\x00": [1, 3], b"T.A\x00": [2, 4], b"T.BRK.A\x00": [5]}
    assert (batch.count, batch.max_t) == (5, NOW - 1)


def test_ds_is_preferred_to_s_and_conditions_fill_the_fixed_slots() -> None:
    event = trade(s=0, ds="0.25", c=[1, 2, 3, 4, 5, 6, 7, 8])
    records = EventDecoder().decode([frame(event)], NOW).trades.records[0]
    assert as_tuples(records) == [expected_record(event)]
    assert records["s"][0] == 0.25


@pytest.mark.parametrize(
    ("codes", "slots"),
    [
        ([300], [255]),
        ([2**40, 12], [255, 12]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 255]),
        ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [1, 2, 3, 4, 5, 6, 7, 255]),
        ([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]),
    ],
)
def test_codes_the_record_cannot_hold_become_the_out_of_range_code_not_a_lost_trade(
    codes: list[int], slots: list[int]
) -> None:
    """CONTRACT §3: an unknown code qualifies for volume only and is counted. A code above
    254 or past the eighth is unknown: it becomes 255, never a known code."""
    decoder = EventDecoder()
    records = decoder.decode([frame(trade(c=codes))], NOW).trades.records[0]
    assert int(records["nc"][0]) == len(slots)
    assert records["c"][0][: len(slots)].tolist() == slots
    assert decoder.stats.bad_messages == 0 and not decoder.stats.rejected


def test_past_64_unknown_event_types_new_ones_are_bad_messages_and_trades_carry_on() -> None:
    """Each unknown type is a topic and a metric label: an upstream that invents types
    cannot grow them without bound."""
    decoder = EventDecoder()
    kinds = [f"X{k}" for k in range(MAX_RAW_TYPES + 6)]
    unknown = b",".join(b'{"ev":"%s","v":1}' % k.encode() for k in kinds)
    text = b"[" + unknown + b"," + frame(trade(q=1))[1:-1] + b',{"ev":"X0","v":2}]'
    decoded = decoder.decode([text], NOW)
    assert [int(q) for q in decoded.trades.records[0]["q"]] == [1]
    assert decoder.stats.raw == {k: 1 + (k == "X0") for k in kinds[:MAX_RAW_TYPES]}
    assert decoder.stats.bad_messages == 6
    assert sum(p.what.startswith("an event of a new unknown type") for p in decoded.problems) == 6


def test_unknown_events_pass_on_raw_and_unknown_fields_are_skipped() -> None:
    decoder = EventDecoder()
    noi = b'{"ev":"NOI","T":"AAPL","t":1601318039223013600,"at":930,"a":"M","b":25.03}'
    events = [
        trade(q=1, brand_new_field={"x": [1]}),
        trade(q=2),
    ]
    text = (
        b"["
        + noi
        + b","
        + frame(*events)[1:-1]
        + b',{"ev":"FMV","sym":"A","fmv":1.5},'
        + noi
        + b"]"
    )
    decoded = decoder.decode([text], NOW)
    assert [int(q) for q in decoded.trades.records[0]["q"]] == [1, 2]
    assert decoder.stats.unknown_events == 3
    assert decoder.stats.raw == {"NOI": 2, "FMV": 1}
    assert decoder.stats.bad_messages == 0
    (raw,) = decoded.batches
    assert (raw.kind, raw.label) == (codec.Kind.RAW, "raw")
    assert dict(zip(raw.topics, zip(raw.counts, raw.payloads, strict=True), strict=True)) == {
        b"raw.NOI\x00": (2, b"[" + noi + b"," + noi + b"]"),  # byte for byte, as received
        b"raw.FMV\x00": (1, b'[{"ev":"FMV","sym":"A","fmv":1.5}]'),
    }


def test_an_event_without_a_usable_type_is_skipped_counted_and_named() -> None:
    decoder = EventDecoder()
    decoded = decoder.decode([b'[{"sym":"A"},{"ev":"T T"},{"ev":7}]'], NOW)
    assert decoder.stats.bad_messages == 3 and decoder.stats.unknown_events == 0
    assert not decoded.batches
    assert all("without a usable ev" in p.what for p in decoded.problems)


symbol_text = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ.:/_-0123456789", min_size=1, max_size=32)
trade_events = st.builds(
    lambda sym, p, size, as_ds, t, codes, x, z, q, trf: {
        "ev": "T",
        "sym": sym,
        "p": p,
        **({"ds": repr(float(size))} if as_ds else {"s": size}),
        "t": t,
        **({"c": codes} if codes is not None else {}),
        "x": x,
        "z": z,
        "q": q,
        **({"trfi": trf[0], "trft": trf[1]} if trf else {}),
    },
    symbol_text,
    st.floats(min_value=1e-4, max_value=1e6, allow_nan=False),
    st.integers(0, 10**9),
    st.booleans(),
    st.integers(0, NOW),
    st.none() | st.lists(st.integers(0, 255), max_size=8),
    st.integers(0, 65535),
    st.integers(0, 255),
    st.integers(0, 2**62),
    st.none() | st.tuples(st.integers(0, 65535), st.integers(0, 2**62)),
)


@settings(deadline=None)  # the first example may compile the numba scanner
@given(st.lists(trade_events, min_size=1, max_size=30))
def test_valid_trades_survive_decode_and_the_wire_round_trip(events: list[dict[str, Any]]) -> None:
    batch = EventDecoder().decode([frame(*events)], NOW).trades
    assert batch.count == len(events)
    received: dict[str, list[tuple[Any, ...]]] = {}
    for seq, (topic, records) in enumerate(zip(batch.topics, batch.records, strict=True), start=1):
        message = codec.decode(
            codec.encode(topic, codec.Kind.TRADES, 7, seq, len(records), records.tobytes())
        )
        received[message.topic] = as_tuples(codec.records(message))
    expected: dict[str, list[tuple[Any, ...]]] = {}
    for event in events:
        expected.setdefault("T." + event["sym"], []).append(expected_record(event))
    assert received == expected


# --- the decoder: malformed input and the validator -----------------------------------------


@pytest.mark.parametrize(
    ("bad", "problem"),
    [
        (b"not json at all", "not JSON"),
        (b'[{"ev":"T"', "not JSON"),
        (b"", "not JSON"),
        (b'{"ev":"T","sym":"AAPL"}', "not a JSON array"),
        (b"42", "not a JSON array"),
        (b'["T", 1, null]', "not an object"),
        (b'[{"ev":"status","status":7}]', "invalid status"),
    ],
)
def test_malformed_frames_are_skipped_counted_and_named(bad: bytes, problem: str) -> None:
    decoder = EventDecoder()
    good = frame(trade(q=1))
    decoded = decoder.decode([good, bad, good], NOW)
    assert decoded.trades.count == 2
    assert decoder.stats.bad_messages == (3 if problem == "not an object" else 1)
    assert any(problem in p.what for p in decoded.problems)
    assert all(isinstance(p, Problem) for p in decoded.problems)


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"sym": ""}, "symbol"),
        ({"sym": "A" * 33}, "symbol"),
        ({"sym": "BRK A"}, "symbol"),
        ({"sym": "ÄPPL"}, "symbol"),
        ({"sym": 7}, "symbol"),
        ({"sym": None}, "symbol"),
        ({"p": 0}, "price"),
        ({"p": -1.5}, "price"),
        ({"p": "10.5"}, "price"),
        ({"p": 1e999}, "price"),
        ({"p": None}, "price"),
        # beyond the input bounds: a bar's sums would overflow (docs/limits.md)
        ({"p": 1e308}, "price"),
        ({"p": 1_000_000_000.5}, "price"),
        ({"p": 1_000_000_001}, "price"),
        ({"s": 10**12 + 1}, "size"),
        ({"s": 2**62}, "size"),
        ({"ds": "1e13"}, "size"),
        ({"ds": "1000000000000.5"}, "size"),
        ({"ds": "1e308"}, "size"),
        ({"p": 1e300, "s": 10**12}, "price"),
        ({"s": -1}, "size"),
        ({"s": 1.5}, "size"),
        ({"ds": "abc"}, "size"),
        ({"ds": "nan"}, "size"),
        ({"ds": "inf"}, "size"),
        ({"ds": "-1"}, "size"),
        ({"ds": 40}, "size"),
        ({"t": 1.5}, "timestamp"),
        ({"t": "1781622376036"}, "timestamp"),
        ({"t": -1}, "timestamp"),
        ({"t": NOW + 5_001}, "future"),
        ({"c": [-1]}, "conditions"),
        ({"c": list(range(65))}, "conditions"),
        ({"c": ["37"]}, "conditions"),
        ({"c": 37}, "conditions"),
        ({"x": 70_000}, "field"),
        ({"z": "3"}, "field"),
    ],
)
def test_invalid_trades_are_rejected_by_reason_and_valid_neighbours_kept(
    fields: dict[str, Any], reason: str
) -> None:
    decoder = EventDecoder()
    decoded = decoder.decode([frame(trade(q=1), trade(q=2, **fields), trade(q=3))], NOW)
    assert [int(q) for q in decoded.trades.records[0]["q"]] == [1, 3]
    assert +decoder.stats.rejected == {reason: 1}
    assert decoder.stats.bad_messages == 1
    assert decoder.stats.trades == 2


@pytest.mark.parametrize(
    "fields",
    [
        {"sym": "BRK.A"},
        {"sym": "A" * 32},
        {"sym": "X:BTC-USD/2_a"},
        {"s": None, "ds": "0.5"},
        {"s": 0},
        {"c": None},
        {"c": []},
        {"c": [0]},
        {"c": [255, 0, 1, 2, 3, 4, 5, 6]},
        {"t": NOW + 5_000},
        {"t": 0},
        {"p": 1e9},  # the bounds are inclusive
        {"p": 1_000_000_000},
        {"s": 10**12},
        {"s": None, "ds": "1000000000000.0"},
        {"p": 1e9, "s": 10**12},
        {"p": 0.0001},
    ],
)
def test_edge_values_that_are_valid_are_accepted(fields: dict[str, Any]) -> None:
    decoder = EventDecoder()
    event = trade(**fields)
    decoded = decoder.decode([frame(event)], NOW)
    assert decoded.trades.count == 1
    if fields.get("s", 1) is None:
        del event["s"]
    assert as_tuples(decoded.trades.records[0]) == [expected_record(event)]


@pytest.mark.parametrize(
    ("field", "digits", "reason"),
    [
        ("t", b"99999999999999999999", "timestamp"),
        ("s", b"99999999999999999999", "size"),
        ("s", b"1" + b"0" * 400, "size"),
        ("q", b"99999999999999999999", "field"),
        ("q", b"-99999999999999999999", "field"),
        ("trft", b"99999999999999999999", "field"),
    ],
)
def test_an_integer_too_large_for_its_column_is_rejected_not_a_crash(
    field: str, digits: bytes, reason: str
) -> None:
    decoder = EventDecoder()
    huge = frame(trade(**{field: "HUGE"})).replace(b'"HUGE"', digits)
    decoded = decoder.decode([frame(trade(t=NOW - 2)), huge, frame(trade(t=NOW - 1))], NOW)
    assert decoded.trades.records[0]["t"].tolist() == [NOW - 2, NOW - 1]
    assert +decoder.stats.rejected == {reason: 1}
    assert decoder.stats.bad_messages == 1


def test_a_trade_with_neither_s_nor_ds_is_rejected_as_size() -> None:
    decoder = EventDecoder()
    event = trade()
    del event["s"]
    assert decoder.decode([frame(event)], NOW).trades.count == 0
    assert decoder.stats.rejected["size"] == 1


# --- the feed clock --------------------------------------------------------------------------


def test_clock_is_zero_until_the_first_trade_then_the_largest_trade_time() -> None:
    clock = FeedClock()
    clock.subscribed(1_000)
    assert clock.read(10_000) == 0
    assert clock.trades_accepted(5_000, 10_000)
    assert not clock.trades_accepted(4_000, 10_001)  # an older trade never moves it back
    assert clock.read(10_001) == 5_000


def test_clock_follows_wall_time_beyond_one_quiet_second_while_connected() -> None:
    clock = FeedClock()
    clock.subscribed(0)
    clock.trades_accepted(50_000, 10_000)
    assert clock.read(11_000) == 50_000
    assert clock.read(11_250) == 50_250
    assert clock.read(13_000) == 52_000
    # a trade older than the advanced clock keeps it; the quiet second starts again
    assert not clock.trades_accepted(51_000, 13_000)
    assert clock.read(14_000) == 52_000
    assert clock.read(14_100) == 52_100


def test_clock_never_goes_back_when_the_wall_clock_steps_back() -> None:
    clock = FeedClock()
    clock.subscribed(0)
    clock.trades_accepted(50_000, 10_000)
    assert clock.read(13_000) == 52_000
    assert clock.read(11_500) == 52_000  # the machine's clock was stepped back 1.5 s
    assert clock.read(14_000) == 53_000


def test_quiet_second_counts_from_the_later_of_last_trade_and_subscription() -> None:
    clock = FeedClock()
    clock.subscribed(0)
    clock.trades_accepted(50_000, 1_000)
    clock.disconnected(1_100)
    clock.subscribed(5_000)  # reconnected: the quiet second starts at the confirmation
    assert clock.read(5_900) == 50_000
    assert clock.read(6_500) == 50_500


def test_clock_never_advances_while_disconnected() -> None:
    clock = FeedClock()
    clock.subscribed(0)
    clock.trades_accepted(50_000, 1_000)
    clock.disconnected(3_000)  # advanced 1 s before the drop
    assert clock.read(3_000) == 51_000
    assert clock.read(60_000) == 51_000
    assert not clock.is_connected()


def test_a_future_trade_is_rejected_and_never_moves_the_clock() -> None:
    decoder = EventDecoder()
    clock = FeedClock()
    clock.subscribed(NOW - 10)
    batch = decoder.decode([frame(trade(t=NOW - 20), trade(t=NOW + 60_000))], NOW).trades
    clock.trades_accepted(batch.max_t, NOW)
    assert clock.read(NOW) == NOW - 20
    assert decoder.stats.rejected["future"] == 1
