"""The fan-out core as values in, values out: subscription table, seams, frames, backlogs."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.fanout.protocol import Channel
from polyfan.fanout.subscriptions import Arrival, Backlog, Fanout, chunked

TSLA = Channel(500, "TSLA")
AAPL = Channel(500, "AAPL")
EVERY = Channel(500, None)


def bars(*starts: int, sym: str = "TSLA") -> list[tuple[int, bytes]]:
    return [(s, b'{"sym":"%s","s":%d}' % (sym.encode(), s)) for s in starts]


def parts(*starts: int, sym: str = "TSLA") -> list[bytes]:
    return [p for _, p in bars(*starts, sym=sym)]


def per_client(fan: Fanout[int], *arrivals: Arrival) -> dict[int, list[bytes]]:
    """What each client gets from one pass; each client must appear at most once."""
    out: dict[int, list[bytes]] = {}
    for bars_, clients in fan.deliveries(list(arrivals)):
        for client in clients:
            assert client not in out, f"client {client} got two frames in one pass"
            out[client] = bars_
    return out


def test_first_client_and_last_client_of_a_channel_are_reported() -> None:
    fan: Fanout[int] = Fanout()
    assert fan.subscribe(1, TSLA) is True
    assert fan.subscribe(2, TSLA) is False
    assert fan.subscribe(1, TSLA) is False  # idempotent
    assert fan.unsubscribe(1, TSLA) is False
    assert fan.has_subscribers(TSLA)
    assert fan.unsubscribe(2, TSLA) is True
    assert not fan.has_subscribers(TSLA)
    assert fan.unsubscribe(2, TSLA) is False  # already gone


def test_removing_a_client_returns_the_channels_it_was_last_on() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(1, AAPL)
    fan.subscribe(2, AAPL)
    assert fan.remove_client(1) == [TSLA]
    assert fan.channels() == [AAPL]
    assert fan.channels_of(1) == set()


def test_one_pass_gives_exact_and_star_clients_each_bar_once_in_one_frame() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(2, EVERY)
    fan.subscribe(3, TSLA)
    fan.subscribe(3, EVERY)
    fan.subscribe(4, AAPL)
    fan.subscribe(5, Channel(1000, "TSLA"))
    got = per_client(
        fan,
        (500, "TSLA", bars(0, 500)),
        (1000, "MSFT", bars(0, sym="MSFT")),  # nobody
        (500, "AAPL", bars(0, sym="AAPL")),
    )
    assert got == {
        1: parts(0, 500),
        2: parts(0, 500) + parts(0, sym="AAPL"),
        3: parts(0, 500) + parts(0, sym="AAPL"),
        4: parts(0, sym="AAPL"),
    }


def test_clients_with_the_same_channels_share_one_delivery() -> None:
    fan: Fanout[int] = Fanout()
    for client in range(100):
        fan.subscribe(client, TSLA)
        fan.subscribe(client, AAPL)
    fan.subscribe(100, TSLA)
    deliveries = fan.deliveries([(500, "TSLA", bars(0)), (500, "AAPL", bars(0, sym="AAPL"))])
    assert sorted((len(c), b) for b, c in deliveries) == [
        (1, parts(0)),
        (100, parts(0) + parts(0, sym="AAPL")),
    ]
    fan.unsubscribe(100, TSLA)
    assert fan.deliveries([(500, "TSLA", bars(0))]) == [(parts(0), set(range(100)))]


def test_a_pass_with_no_subscribed_bars_delivers_nothing() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, AAPL)
    assert fan.deliveries([(500, "TSLA", bars(0))]) == []
    assert fan.deliveries([]) == []


def test_since_holds_live_bars_until_history_then_merges_without_repeats() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(2, TSLA)
    seam = fan.hold(2, TSLA)
    assert fan.is_pending(2, TSLA)
    assert per_client(fan, (500, "TSLA", bars(1000, 1500))) == {1: parts(1000, 1500)}
    assert per_client(fan, (500, "TSLA", bars(2000))) == {1: parts(2000)}  # client 2 holds them
    merged = fan.complete_history(2, TSLA, seam, bars(0, 500, 1000, 1500))
    assert merged == parts(0, 500, 1000, 1500, 2000)
    assert not fan.is_pending(2, TSLA)
    assert per_client(fan, (500, "TSLA", bars(2500))) == {1: parts(2500), 2: parts(2500)}


def test_a_pending_client_still_gets_its_other_channels_in_the_same_pass() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    seam = fan.hold(1, TSLA)
    fan.subscribe(1, AAPL)
    fan.subscribe(2, TSLA)
    fan.subscribe(2, AAPL)
    got = per_client(fan, (500, "TSLA", bars(0)), (500, "AAPL", bars(0, sym="AAPL")))
    assert got == {1: parts(0, sym="AAPL"), 2: parts(0) + parts(0, sym="AAPL")}
    assert fan.complete_history(1, TSLA, seam, []) == parts(0)


def test_since_with_empty_history_releases_every_held_bar() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    seam = fan.hold(1, TSLA)
    assert per_client(fan, (500, "TSLA", bars(0, 500))) == {}
    assert fan.complete_history(1, TSLA, seam, []) == parts(0, 500)


def test_history_for_a_client_that_left_the_channel_is_dropped() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    seam = fan.hold(1, TSLA)
    per_client(fan, (500, "TSLA", bars(0)))
    fan.unsubscribe(1, TSLA)
    assert fan.complete_history(1, TSLA, seam, bars(0)) == []


@given(
    st.integers(0, 60),  # history published before the subscription
    st.integers(0, 60),  # bars published between subscribe and the history snapshot
    st.integers(0, 60),  # bars after the snapshot
    st.integers(0, 200),  # since, in bar numbers
    st.floats(0, 1),  # how much of the live stream arrives before the history reply
    st.integers(1, 5),  # live bars per pass after the reply
)
def test_seam_has_no_gap_and_no_repeat_for_any_interleaving(
    before: int, overlap: int, after: int, since_index: int, early: float, per_pass: int
) -> None:
    """The agg stores then publishes; the bridge subscribes, then asks. Live bars and the
    reply travel on different sockets, so the reply may overtake live bars the agg sent
    before it: any split of the live stream around the reply works."""
    fan: Fanout[int] = Fanout()
    fan.subscribe(7, TSLA)
    seam = fan.hold(7, TSLA)
    published = [i * 500 for i in range(before + overlap + after)]
    since = since_index * 500
    snapshot = [s for s in published[: before + overlap] if s >= since]
    live = published[before:]  # live bars start arriving at the subscription
    split = round(early * len(live))
    assert per_client(fan, (500, "TSLA", bars(*live[:split]))) == {}
    merged = fan.complete_history(7, TSLA, seam, bars(*snapshot))
    for i in range(split, len(live), per_pass):
        merged += per_client(fan, (500, "TSLA", bars(*live[i : i + per_pass]))).get(7, [])
    assert not fan.is_pending(7, TSLA)
    got = [orjson.loads(p)["s"] for p in merged]
    assert got == sorted(set(got))  # in order, nothing repeated
    wanted = {s for s in published if s >= since} | set(published[before + overlap :])
    assert wanted <= set(got)  # nothing missing
    unasked = {s for s in published[:before] if s < since}
    assert not unasked & set(got)  # nothing from before since that was not live


def test_live_bars_the_history_reply_overtook_are_not_repeated() -> None:
    """The reply (history up to 1500) is handled before live 1000 and 1500 arrive."""
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(2, TSLA)
    seam = fan.hold(2, TSLA)
    assert fan.complete_history(2, TSLA, seam, bars(0, 500, 1000, 1500)) == parts(
        0, 500, 1000, 1500
    )
    assert per_client(fan, (500, "TSLA", bars(1000))) == {1: parts(1000)}
    assert per_client(fan, (500, "TSLA", bars(1500, 2000))) == {
        1: parts(1500, 2000),
        2: parts(2000),
    }
    assert per_client(fan, (500, "TSLA", bars(2500))) == {1: parts(2500), 2: parts(2500)}


def test_a_trailing_seam_ends_with_the_client_leaving_the_channel() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    seam = fan.hold(1, TSLA)
    assert fan.complete_history(1, TSLA, seam, bars(0, 500)) == parts(0, 500)
    fan.unsubscribe(1, TSLA)
    fan.subscribe(1, TSLA)  # a new subscription without since: every live bar from now on
    assert per_client(fan, (500, "TSLA", bars(500, 1000))) == {1: parts(500, 1000)}


def test_history_is_chunked_into_frames() -> None:
    frames = chunked(parts(0, 1, 2, 3, 4), 2)
    assert [len(orjson.loads(f)) for f, _ in frames] == [2, 2, 1]
    assert [bars for _, bars in frames] == [2, 2, 1]
    assert [s for f, _ in frames for s in (e["s"] for e in orjson.loads(f))] == [0, 1, 2, 3, 4]


def test_backlog_refuses_past_its_bound_and_keeps_what_it_had() -> None:
    backlog = Backlog(limit_bytes=20)
    assert backlog.push(b"[1234567]", 1)  # 9 bytes
    assert backlog.push(b"[12345678]", 2)  # 19
    assert not backlog.push(b"[1]", 1)  # would be 22
    assert (len(backlog), backlog.bytes, backlog.bars) == (2, 19, 3)
    assert backlog.clear() == 3
    assert (len(backlog), backlog.bytes, backlog.bars) == (0, 0, 0)


def test_backlog_merges_queued_frames_into_one_array_up_to_merge_bytes() -> None:
    backlog = Backlog(limit_bytes=1000, merge_bytes=20)
    for frame, n in (
        (b"[1,2]", 2),
        (b"[3]", 1),
        (b"[]", 0),
        (b"[4,5,6]", 3),
        (b"[7,8,9,10,11]", 5),
    ):
        assert backlog.push(frame, n)
    assert backlog.pop() == (b"[1,2,3,4,5,6]", 6)
    assert backlog.pop() == (b"[7,8,9,10,11]", 5)
    assert backlog.pop() is None
    assert (backlog.bytes, backlog.bars) == (0, 0)


@given(st.lists(st.lists(st.integers(0, 9), max_size=5), max_size=30), st.integers(2, 40))
def test_backlog_pops_every_event_in_order(frames: list[list[int]], merge: int) -> None:
    backlog = Backlog(limit_bytes=10**6, merge_bytes=merge)
    for events in frames:
        backlog.push(orjson.dumps(events), len(events))
    out: list[int] = []
    bars = 0
    while (item := backlog.pop()) is not None:
        out.extend(orjson.loads(item[0]))
        bars += item[1]
    assert out == [e for events in frames for e in events]
    assert bars == len(out)


def test_a_seam_cancelled_by_unsubscribe_ignores_its_late_history() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    old = fan.hold(1, TSLA)
    fan.unsubscribe(1, TSLA)
    fan.subscribe(1, TSLA)  # subscribed again, without since: live from now on
    assert per_client(fan, (500, "TSLA", bars(1000))) == {1: parts(1000)}
    assert fan.complete_history(1, TSLA, old, bars(0, 500, 1000)) == []
    assert per_client(fan, (500, "TSLA", bars(1500))) == {1: parts(1500)}


def test_two_since_requests_each_get_history_and_no_live_bar_is_lost() -> None:
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    first = fan.hold(1, TSLA)
    second = fan.hold(1, TSLA)
    assert per_client(fan, (500, "TSLA", bars(1000, 1500))) == {}
    assert fan.complete_history(1, TSLA, first, bars(500, 1000)) == parts(500, 1000)
    assert per_client(fan, (500, "TSLA", bars(2000))) == {}  # still held for the second
    assert fan.complete_history(1, TSLA, second, bars(0, 500, 1000, 1500)) == parts(
        0, 500, 1000, 1500, 2000
    )
    assert per_client(fan, (500, "TSLA", bars(2500))) == {1: parts(2500)}


CHANNELS = [TSLA, AAPL, EVERY, Channel(1000, "TSLA")]


def by_name(channel: Channel) -> tuple[int, str]:
    return channel.interval, channel.symbol or ""


def test_a_client_on_a_symbol_and_on_star_of_one_interval_can_leave() -> None:
    """Channel(500, None) and Channel(500, "TSLA") do not compare: the table orders them
    itself, ``*`` first."""
    fan: Fanout[int] = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(1, EVERY)
    fan.subscribe(2, Channel(100, "ZZZ"))
    assert fan.channels() == [Channel(100, "ZZZ"), EVERY, TSLA]
    assert fan.remove_client(1) == [EVERY, TSLA]
    assert fan.channels() == [Channel(100, "ZZZ")]


Op = tuple[str, int, int]  # (subscribe | unsubscribe | remove, client, channel index)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["subscribe", "unsubscribe", "remove"]),
            st.integers(0, 3),
            st.integers(0, len(CHANNELS) - 1),
        ),
        max_size=40,
    )
)
def test_any_subscribes_and_unsubscribes_keep_the_table_consistent(ops: list[Op]) -> None:
    """Against a plain model (client -> channels): first / last client reported exactly when
    a channel gains its first or loses its last, channel -> clients and client -> channels
    agree, ``has_subscribers`` and ``channels`` say so, and one pass gives each client every
    bar of its channels (exact or star) once, in one frame."""
    fan: Fanout[int] = Fanout()
    model: dict[int, set[Channel]] = {}

    def on(channel: Channel) -> set[int]:
        return {client for client, channels in model.items() if channel in channels}

    for op, client, index in ops:
        channel = CHANNELS[index]
        if op == "subscribe":
            first = not on(channel)
            assert fan.subscribe(client, channel) is first
            model.setdefault(client, set()).add(channel)
        elif op == "unsubscribe":
            was_on = on(channel)
            last = was_on == {client}
            assert fan.unsubscribe(client, channel) is last
            model.get(client, set()).discard(channel)
        else:
            before = {channel: on(channel) for channel in CHANNELS}
            emptied = fan.remove_client(client)
            model.pop(client, None)
            assert emptied == sorted((c for c in CHANNELS if before[c] == {client}), key=by_name)
        for channel in CHANNELS:
            assert fan.has_subscribers(channel) is bool(on(channel))
        assert fan.channels() == sorted((c for c in CHANNELS if on(c)), key=by_name)
        for someone in range(4):
            assert fan.channels_of(someone) == model.get(someone, set())
    got = per_client(fan, (500, "TSLA", bars(0)), (500, "AAPL", bars(0, sym="AAPL")))
    wanted: dict[int, list[bytes]] = {}
    for client, channels in model.items():
        mine = [
            part
            for sym, part in (("TSLA", parts(0)), ("AAPL", parts(0, sym="AAPL")))
            if Channel(500, sym) in channels or EVERY in channels
        ]
        if mine:
            wanted[client] = [p for ps in mine for p in ps]
    assert got == wanted
