"""The fan-out core as values in, values out: subscription table, seams, frames, backlogs."""

from __future__ import annotations

import orjson
from hypothesis import given
from hypothesis import strategies as st

from polyfan.fanout import Backlog, Batch, Fanout, chunked, frames_for
from polyfan.protocol import Channel

TSLA = Channel(500, "TSLA")
AAPL = Channel(500, "AAPL")
EVERY = Channel(500, None)


def bars(*starts: int, sym: str = "TSLA") -> list[tuple[int, bytes]]:
    return [(s, b'{"sym":"%s","s":%d}' % (sym.encode(), s)) for s in starts]


def parts(*starts: int, sym: str = "TSLA") -> list[bytes]:
    return [p for _, p in bars(*starts, sym=sym)]


def test_first_client_and_last_client_of_a_channel_are_reported() -> None:
    fan = Fanout()
    assert fan.subscribe(1, TSLA) is True
    assert fan.subscribe(2, TSLA) is False
    assert fan.subscribe(1, TSLA) is False  # idempotent
    assert fan.unsubscribe(1, TSLA) is False
    assert fan.has_subscribers(TSLA)
    assert fan.unsubscribe(2, TSLA) is True
    assert not fan.has_subscribers(TSLA)
    assert fan.unsubscribe(2, TSLA) is False  # already gone


def test_removing_a_client_returns_the_channels_it_was_last_on() -> None:
    fan = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(1, AAPL)
    fan.subscribe(2, AAPL)
    assert fan.remove_client(1) == [TSLA]
    assert fan.channels() == [AAPL]
    assert fan.channels_of(1) == set()


def test_route_sends_to_exact_and_star_clients_once_each() -> None:
    fan = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(2, EVERY)
    fan.subscribe(3, TSLA)
    fan.subscribe(3, EVERY)
    fan.subscribe(4, AAPL)
    batch: Batch = {}
    assert fan.route(500, "TSLA", bars(0, 500), batch) == 3
    assert batch == {1: parts(0, 500), 2: parts(0, 500), 3: parts(0, 500)}
    assert fan.route(1000, "TSLA", bars(0), batch) == 0
    fan.route(500, "AAPL", bars(0, sym="AAPL"), batch)
    assert batch[4] == parts(0, sym="AAPL")
    assert batch[3] == parts(0, 500) + parts(0, sym="AAPL")


def test_since_holds_live_bars_until_history_then_merges_without_repeats() -> None:
    fan = Fanout()
    fan.subscribe(1, TSLA)
    fan.subscribe(2, TSLA, since=True)
    assert fan.is_pending(2, TSLA)
    batch: Batch = {}
    fan.route(500, "TSLA", bars(1000, 1500), batch)
    fan.route(500, "TSLA", bars(2000), batch)
    assert batch == {1: parts(1000, 1500, 2000)}  # client 2 holds them
    merged = fan.complete_history(2, TSLA, bars(0, 500, 1000, 1500))
    assert merged == parts(0, 500, 1000, 1500, 2000)
    assert not fan.is_pending(2, TSLA)
    batch = {}
    fan.route(500, "TSLA", bars(2500), batch)
    assert batch == {1: parts(2500), 2: parts(2500)}


def test_since_with_empty_history_releases_every_held_bar() -> None:
    fan = Fanout()
    fan.subscribe(1, TSLA, since=True)
    fan.route(500, "TSLA", bars(0, 500), {})
    assert fan.complete_history(1, TSLA, []) == parts(0, 500)


def test_history_for_a_client_that_left_the_channel_is_dropped() -> None:
    fan = Fanout()
    fan.subscribe(1, TSLA, since=True)
    fan.route(500, "TSLA", bars(0), {})
    fan.unsubscribe(1, TSLA)
    assert fan.complete_history(1, TSLA, bars(0)) == []


@given(
    st.integers(0, 60),  # history published before the subscription
    st.integers(0, 60),  # bars published between subscribe and the history snapshot
    st.integers(0, 60),  # bars after the snapshot
    st.integers(0, 200),  # since, in bar numbers
)
def test_seam_has_no_gap_and_no_repeat_for_any_interleaving(
    before: int, overlap: int, after: int, since_index: int
) -> None:
    """The agg stores then publishes; the bridge subscribes, then asks: any split works."""
    fan = Fanout()
    fan.subscribe(7, TSLA, since=True)
    published = [i * 500 for i in range(before + overlap + after)]
    since = since_index * 500
    snapshot = [s for s in published[: before + overlap] if s >= since]
    held = published[before:]  # live bars start arriving at the subscription
    batch: Batch = {}
    fan.route(500, "TSLA", bars(*held), batch)
    assert batch == {}
    got = [orjson.loads(p)["s"] for p in fan.complete_history(7, TSLA, bars(*snapshot))]
    assert got == sorted(set(got))  # in order, nothing repeated
    wanted = {s for s in published if s >= since} | set(published[before + overlap :])
    assert wanted <= set(got)  # nothing missing
    unasked = {s for s in published[:before] if s < since}
    assert not unasked & set(got)  # nothing from before since that was not live


def test_frames_are_built_once_per_distinct_bar_list() -> None:
    a, b = parts(0), parts(500)
    frames = frames_for({1: a, 2: list(a), 3: a + b})
    assert frames[1] is frames[2]
    assert orjson.loads(frames[3]) == [{"sym": "TSLA", "s": 0}, {"sym": "TSLA", "s": 500}]


def test_history_is_chunked_into_frames() -> None:
    frames = chunked(parts(0, 1, 2, 3, 4), 2)
    assert [len(orjson.loads(f)) for f in frames] == [2, 2, 1]


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
