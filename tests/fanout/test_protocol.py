"""The client protocol as values in, values out: no sockets, no clock."""

from __future__ import annotations

import math
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.fanout.protocol import (
    AggServes,
    BarsQuery,
    Catalog,
    Channel,
    ChannelError,
    ClientSession,
    Limits,
    ParamError,
    Subscribe,
    TokenBucket,
    Unsubscribe,
    encode_bar,
    join_events,
    parse_bar_topic,
    parse_bars_query,
    parse_channel,
)


def catalog(
    intervals: tuple[int, ...] = (100, 500, 1000), symbols: list[str] | None = None
) -> Catalog:
    c: Catalog[str] = Catalog()
    c.update(
        "agg", AggServes(frozenset(intervals), None if symbols is None else frozenset(symbols))
    )
    return c


def session(tokens: tuple[str, ...] = ("tok",), **limits: Any) -> ClientSession:
    return ClientSession(tokens, Limits(**limits), now=0.0)


def authed(**limits: Any) -> ClientSession:
    s = session(**limits)
    assert s.receive('{"action":"auth","params":"tok"}', 0.0, catalog()).close is None
    return s


def ok(message: str) -> dict[str, str]:
    return {"ev": "status", "status": "success", "message": message}


# -- channels ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "channel"),
    [
        ("500Ms.TSLA", Channel(500, "TSLA")),
        ("100Ms.BRK.A", Channel(100, "BRK.A")),
        ("60000Ms.a:b/c_d-e", Channel(60000, "a:b/c_d-e")),
        ("1000Ms.*", Channel(1000, None)),
    ],
)
def test_channels_parse(text: str, channel: Channel) -> None:
    assert parse_channel(text) == channel
    assert channel.name == text


@pytest.mark.parametrize(
    "text",
    [
        "TSLA",
        "500ms.TSLA",
        "0Ms.TSLA",
        "05Ms.TSLA",
        "-5Ms.TSLA",
        "500Ms.",
        "500Ms.TS LA",
        "500Ms.T$LA",
        "500Ms.TÉSLA",
        "500Ms." + "A" * 33,
        "Ms.TSLA",
        "500Ms.**",
    ],
)
def test_malformed_channels_are_rejected_naming_the_channel(text: str) -> None:
    with pytest.raises(
        ChannelError, match="^" + text.replace("$", r"\$").replace(".", r"\.").replace("*", r"\*")
    ):
        parse_channel(text)


def test_channel_topics_are_exact_for_a_symbol_and_a_prefix_for_star() -> None:
    assert Channel(500, "TSLA").topic == b"500Ms.TSLA\x00"
    assert Channel(500, None).topic == b"500Ms."


def test_bar_topics_parse_back() -> None:
    assert parse_bar_topic("500Ms.BRK.A") == (500, "BRK.A")
    assert parse_bar_topic("_ctl") is None
    assert parse_bar_topic("xMs.A") is None
    assert parse_bar_topic("\u00b2Ms.A") is None  # a digit to str.isdigit, not to int()


# -- auth ----------------------------------------------------------------------------------------


def test_right_token_authenticates() -> None:
    out = session().receive('{"action":"auth","params":"tok"}', 0.0, catalog())
    assert out.events == [{"ev": "status", "status": "auth_success", "message": "authenticated"}]
    assert (out.close, out.bad_requests) == (None, 0)


@pytest.mark.parametrize("params", ['"nope"', "null", "5", '["tok"]'])
def test_wrong_token_fails_and_closes_with_1008(params: str) -> None:
    out = session().receive('{"action":"auth","params":' + params + "}", 0.0, catalog())
    assert out.events == [
        {"ev": "status", "status": "auth_failed", "message": "authentication failed"}
    ]
    assert out.close == (1008, "authentication failed")
    assert out.bad_requests == 1


def test_without_tokens_anything_authenticates() -> None:
    out = session(tokens=()).receive('{"action":"auth"}', 0.0, catalog())
    assert out.events[0]["status"] == "auth_success"


@pytest.mark.parametrize(
    "frame",
    [
        '{"action":"subscribe","params":"500Ms.TSLA"}',
        '{"action":"unsubscribe","params":"500Ms.A"}',
        '{"action":"dance"}',
        "{}",
    ],
)
def test_anything_before_auth_is_an_error(frame: str) -> None:
    s = session()
    out = s.receive(frame, 0.0, catalog())
    assert out.events[0]["status"] == "error"
    assert "not authenticated" in out.events[0]["message"]
    assert (out.commands, out.close, out.bad_requests) == ([], None, 1)
    assert not s.authenticated


# -- subscribe / unsubscribe ---------------------------------------------------------------------


def test_subscribe_gives_one_success_per_channel_and_commands_in_order() -> None:
    out = authed().receive(
        '{"action":"subscribe","params":"500Ms.TSLA, 1000Ms.AAPL,,100Ms.*"}', 0.0, catalog()
    )
    assert out.events == [
        ok("subscribed to: 500Ms.TSLA"),
        ok("subscribed to: 1000Ms.AAPL"),
        ok("subscribed to: 100Ms.*"),
    ]
    assert out.commands == [
        Subscribe(Channel(500, "TSLA"), None),
        Subscribe(Channel(1000, "AAPL"), None),
        Subscribe(Channel(100, None), None),
    ]


def test_subscribing_twice_answers_success_but_opens_once() -> None:
    s = authed()
    s.receive('{"action":"subscribe","params":"500Ms.TSLA"}', 0.0, catalog())
    out = s.receive('{"action":"subscribe","params":"500Ms.TSLA"}', 0.0, catalog())
    assert out.events == [ok("subscribed to: 500Ms.TSLA")]
    assert out.commands == []


def test_subscribe_with_since_asks_for_history_even_when_already_subscribed() -> None:
    s = authed()
    out = s.receive('{"action":"subscribe","params":"500Ms.TSLA","since":1000}', 0.0, catalog())
    assert out.commands == [Subscribe(Channel(500, "TSLA"), 1000)]
    out = s.receive('{"action":"subscribe","params":"500Ms.TSLA","since":2000}', 0.0, catalog())
    assert out.commands == [Subscribe(Channel(500, "TSLA"), 2000)]


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        ("{oops", "malformed JSON: send one JSON object per frame"),
        ("[]", 'not a JSON object: send {"action": ..., "params": ...}'),
        ('"auth"', 'not a JSON object: send {"action": ..., "params": ...}'),
        (
            '{"action":"dance"}',
            "action 'dance': unknown action; use auth, subscribe or unsubscribe",
        ),
        (
            '{"action":7}',
            "action is not a string: unknown action; use auth, subscribe or unsubscribe",
        ),
        ('{"params":"x"}', "action missing: unknown action; use auth, subscribe or unsubscribe"),
        (
            '{"action":"subscribe"}',
            "subscribe: params must be a comma-separated string of channels like 500Ms.TSLA,1000Ms.AAPL",
        ),
        (
            '{"action":"subscribe","params":" , "}',
            "subscribe: params must be a comma-separated string of channels like 500Ms.TSLA,1000Ms.AAPL",
        ),
        (
            '{"action":"subscribe","params":"700Ms.TSLA"}',
            "700Ms.TSLA: interval 700ms is not served; served: 100Ms, 500Ms, 1000Ms",
        ),
        (
            '{"action":"subscribe","params":"500Ms.T$LA"}',
            "500Ms.T$LA: bad symbol 'T$LA'; use 1 to 32 of A-Z a-z 0-9 . : / _ - or *",
        ),
        (
            '{"action":"subscribe","params":"TSLA"}',
            "TSLA: not a channel; write <N>Ms.<SYMBOL> like 500Ms.TSLA",
        ),
        (
            '{"action":"subscribe","params":"500Ms.A","since":-1}',
            "subscribe: since must be an integer of Unix milliseconds",
        ),
        (
            '{"action":"subscribe","params":"500Ms.A","since":1.5}',
            "subscribe: since must be an integer of Unix milliseconds",
        ),
        (
            '{"action":"subscribe","params":"500Ms.A","since":true}',
            "subscribe: since must be an integer of Unix milliseconds",
        ),
        (
            '{"action":"subscribe","params":"500Ms.A","since":9223372036854775808}',
            "subscribe: since must be an integer of Unix milliseconds",
        ),
        (
            '{"action":"subscribe","params":"500Ms.*","since":5}',
            "500Ms.*: since needs one symbol; history is per symbol",
        ),
        (
            '{"action":"unsubscribe","params":"nope"}',
            "nope: not a channel; write <N>Ms.<SYMBOL> like 500Ms.TSLA",
        ),
    ],
)
def test_bad_requests_get_exact_error_statuses_and_are_counted(frame: str, message: str) -> None:
    s = authed()
    out = s.receive(frame, 0.0, catalog())
    assert out.events == [{"ev": "status", "status": "error", "message": message}]
    assert (out.commands, out.close, out.bad_requests) == ([], None, 1)
    assert s.channels == set()


def test_one_bad_channel_does_not_spoil_the_others_and_answers_keep_their_order() -> None:
    out = authed().receive(
        '{"action":"subscribe","params":"bad,500Ms.TSLA,700Ms.X"}', 0.0, catalog()
    )
    assert [e["status"] for e in out.events] == ["error", "success", "error"]
    assert out.commands == [Subscribe(Channel(500, "TSLA"), None)]
    assert out.bad_requests == 2


def test_symbol_outside_every_aggs_list_is_not_served() -> None:
    c = catalog(symbols=["AAPL"])
    out = authed().receive('{"action":"subscribe","params":"500Ms.TSLA,500Ms.AAPL"}', 0.0, c)
    assert out.events[0] == {
        "ev": "status",
        "status": "error",
        "message": "500Ms.TSLA: symbol TSLA is not served by any aggregator",
    }
    assert out.events[1] == ok("subscribed to: 500Ms.AAPL")


def test_no_aggregator_yet_is_an_error_not_a_silent_subscription() -> None:
    out = authed().receive('{"action":"subscribe","params":"500Ms.TSLA"}', 0.0, Catalog())
    assert (
        out.events[0]["message"] == "500Ms.TSLA: no aggregator is connected yet; try again shortly"
    )


def test_unsubscribe_answers_success_and_closes_only_what_was_open() -> None:
    s = authed()
    s.receive('{"action":"subscribe","params":"500Ms.TSLA"}', 0.0, catalog())
    out = s.receive('{"action":"unsubscribe","params":"500Ms.TSLA,500Ms.AAPL"}', 0.0, catalog())
    assert out.events == [ok("unsubscribed to: 500Ms.TSLA"), ok("unsubscribed to: 500Ms.AAPL")]
    assert out.commands == [Unsubscribe(Channel(500, "TSLA"))]
    assert s.channels == set()


def test_subscription_limit_counts_channels_per_connection() -> None:
    s = authed(max_subscriptions=2)
    out = s.receive(
        '{"action":"subscribe","params":"500Ms.A,500Ms.B,500Ms.C,500Ms.A"}', 0.0, catalog()
    )
    assert [e["status"] for e in out.events] == ["success", "success", "error", "success"]
    assert (
        out.events[2]["message"]
        == "500Ms.C: subscription limit of 2 channels per connection reached"
    )


def test_rate_limit_is_a_token_bucket() -> None:
    s = session(rate_per_second=2.0, rate_burst=3.0)
    frame = '{"action":"auth","params":"tok"}'
    results = [s.receive(frame, 0.0, catalog()).events[0]["status"] for _ in range(4)]
    assert results == ["auth_success", "auth_success", "auth_success", "error"]
    assert s.receive(frame, 0.4, catalog()).events[0]["status"] == "error"  # 0.8 token
    assert s.receive(frame, 0.5, catalog()).events[0]["status"] == "auth_success"  # 1.0 token
    out = s.receive(frame, 0.5, catalog())
    assert (
        out.events[0]["message"]
        == "rate limit: at most 2 frames per second (burst 3); frame ignored"
    )
    assert out.bad_requests == 1


def test_token_bucket_never_exceeds_its_burst() -> None:
    bucket = TokenBucket(10.0, 2.0, now=0.0)
    assert [bucket.take(100.0) for _ in range(3)] == [True, True, False]


def test_binary_frames_are_read_as_json_too() -> None:
    out = session().receive(b'{"action":"auth","params":"tok"}', 0.0, catalog())
    assert out.events[0]["status"] == "auth_success"


# -- bar events ----------------------------------------------------------------------------------


def test_a_bar_encodes_as_an_mb_event_with_fields_in_order() -> None:
    part = encode_bar(500, "TSLA", 1000, 1.5, 2.25, 1.0, 2.0, 300.0, 1.75, 4, 0)
    assert part == (
        b'{"ev":"MB","sym":"TSLA","interval":500,"o":1.5,"h":2.25,"l":1.0,"c":2.0,'
        b'"v":300,"vw":1.75,"n":4,"s":1000,"e":1500}'
    )


def test_fractional_volume_nan_vwap_and_outage_flag() -> None:
    event = orjson.loads(encode_bar(100, "A", 0, 1, 1, 1, 1, 0.5, math.nan, 1, 1 | 2))
    assert (event["v"], event["vw"], event["outage"]) == (0.5, None, True)
    assert "outage" not in orjson.loads(encode_bar(100, "A", 0, 1, 1, 1, 1, 1, 1, 1, 2))


def test_frames_join_pre_encoded_events() -> None:
    assert join_events([b'{"a":1}', b'{"b":2}']) == b'[{"a":1},{"b":2}]'
    assert orjson.loads(join_events([])) == []


# -- /api/bars parameters ------------------------------------------------------------------------


def test_bars_query_defaults_and_values() -> None:
    limits = Limits()
    assert parse_bars_query({"channel": ["500Ms.TSLA"]}, limits) == BarsQuery(
        Channel(500, "TSLA"), 600, None
    )
    assert parse_bars_query(
        {"channel": ["500Ms.TSLA"], "limit": ["10000"], "before": ["123"]}, limits
    ) == BarsQuery(Channel(500, "TSLA"), 10000, 123)
    assert parse_bars_query(
        {"channel": ["500Ms.TSLA"], "before": ["9223372036854775807"]}, limits
    ) == BarsQuery(Channel(500, "TSLA"), 600, 2**63 - 1)
    assert parse_bars_query(
        {"channel": ["500Ms.TSLA"], "from": ["1000"], "to": ["2000"]}, limits
    ) == BarsQuery(Channel(500, "TSLA"), 600, 2000, 1000)


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({}, "channel: required, like channel=500Ms.TSLA"),
        ({"channel": ["x"]}, "channel: x: not a channel; write <N>Ms.<SYMBOL> like 500Ms.TSLA"),
        (
            {"channel": ["500Ms.*"]},
            "channel: 500Ms.*: history is per symbol; * is not allowed here",
        ),
        ({"channel": ["500Ms.A", "500Ms.B"]}, "channel: given more than once"),
        ({"channel": ["500Ms.A"], "limit": ["0"]}, "limit: '0' is not an integer from 1 to 10000"),
        (
            {"channel": ["500Ms.A"], "limit": ["1e3"]},
            "limit: '1e3' is not an integer from 1 to 10000",
        ),
        (
            {"channel": ["500Ms.A"], "limit": ["\u00b2"]},
            "limit: '\u00b2' is not an integer from 1 to 10000",
        ),
        ({"channel": ["500Ms.A"], "before": ["soon"]}, "before: 'soon' is not Unix milliseconds"),
        (
            {"channel": ["500Ms.A"], "before": ["\u00b2"]},
            "before: '\u00b2' is not Unix milliseconds",
        ),
        (
            {"channel": ["500Ms.A"], "before": ["9223372036854775808"]},
            "before: '9223372036854775808' is not Unix milliseconds",
        ),
        (
            {"channel": ["500Ms.A"], "before": ["1" * 5000]},
            f"before: '{'1' * 5000}' is not Unix milliseconds",
        ),
        (
            {"channel": ["500Ms.A"], "since": ["1"]},
            "since: unknown parameter; use channel, limit, from, to and before",
        ),
        ({"channel": ["500Ms.A"], "from": ["x"]}, "from: 'x' is not Unix milliseconds"),
        (
            {"channel": ["500Ms.A"], "to": ["5"], "before": ["5"]},
            "to: give to or before, not both (they mean the same)",
        ),
        ({"channel": ["500Ms.A"], "from": ["5"], "to": ["5"]}, "from: 5 is not before to 5"),
    ],
)
def test_bad_bars_queries_name_the_parameter(query: dict[str, list[str]], message: str) -> None:
    with pytest.raises(ParamError) as info:
        parse_bars_query(query, Limits())
    assert str(info.value) == message


# -- any sequence of frames: the session's channels and commands agree -------------------------

ITEMS = ["500Ms.TSLA", "500Ms.AAPL", "100Ms.*", "500Ms.NOPE", "700Ms.TSLA", "bad", " "]
Frame = tuple[str, list[str], int | None]  # (action, channel items, since)


@settings(max_examples=300, deadline=None)
@given(
    st.integers(1, 3),
    st.lists(
        st.tuples(
            st.sampled_from(["subscribe", "unsubscribe"]),
            st.lists(st.sampled_from(ITEMS), min_size=1, max_size=4),
            st.none() | st.just(1000),
        ),
        max_size=25,
    ),
)
def test_any_subscribes_and_unsubscribes_keep_channels_and_commands_consistent(
    limit: int, frames: list[Frame]
) -> None:
    """Against a plain model: one answer per channel named, in order (an error for one not
    served, malformed, over the limit, or ``since`` on ``*``); the session's channels stay
    within the limit; the commands, replayed as the shell does, open each channel once and
    close only what is open, so they always rebuild exactly the session's channels; errors
    are counted."""
    c = catalog(intervals=(100, 500), symbols=["TSLA", "AAPL"])
    s = authed(max_subscriptions=limit)
    model: set[Channel] = set()
    opened: set[Channel] = set()  # what the commands have opened (the Fanout's view)
    for action, items, since in frames:
        body: dict[str, Any] = {"action": action, "params": ",".join(items)}
        if since is not None:
            body["since"] = since
        out = s.receive(orjson.dumps(body), 0.0, c)
        named = [item.strip() for item in items if item.strip()]
        if not named:  # nothing but blanks: one error for the frame
            assert [e["status"] for e in out.events] == ["error"]
            assert (out.commands, out.bad_requests) == ([], 1)
            continue
        expected: list[str] = []
        commands: list[Subscribe | Unsubscribe] = []
        for item in named:
            try:
                channel = parse_channel(item)
            except ChannelError:
                expected.append("error")
                continue
            if action == "unsubscribe":
                expected.append("success")
                if channel in model:
                    model.discard(channel)
                    commands.append(Unsubscribe(channel))
                continue
            if (
                c.why_not_served(channel) is not None
                or (since is not None and channel.symbol is None)
                or (channel not in model and len(model) >= limit)
            ):
                expected.append("error")
            else:
                expected.append("success")
                if channel not in model or since is not None:
                    commands.append(Subscribe(channel, since))
                model.add(channel)
        assert [e["status"] for e in out.events] == expected
        assert out.commands == commands
        assert out.bad_requests == expected.count("error")
        assert out.close is None
        for command in out.commands:
            if isinstance(command, Subscribe):
                assert command.since is not None or command.channel not in opened
                opened.add(command.channel)
            else:
                assert command.channel in opened
                opened.discard(command.channel)
        assert s.channels == model == opened
        assert len(s.channels) <= limit
