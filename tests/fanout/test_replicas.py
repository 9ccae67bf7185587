"""The replica rules as values in, values out: no sockets, no clock (``now`` is passed in)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.fanout.replicas import STAND_IN_WAIT, WHOLE_MARGIN_MS, Decision, Replica, Replicas

TOPIC = "500Ms.TSLA"
OTHER = "500Ms.AAPL"
HEARD = 5.0  # seconds a link counts as heard
DTYPE = np.dtype([("s", "<i8"), ("by", "<i8")])  # the rules read only "s"; "by" tags the copy


def bars(by: int, *starts: int) -> np.ndarray:
    return np.array([(s, by) for s in starts], dtype=DTYPE)


def copies(records: np.ndarray) -> list[tuple[int, int]]:
    return [(int(s), int(by)) for s, by in records.tolist()]


def links(*whole_after: float | None, now: float = 0.0) -> tuple[list[Replica], Replicas]:
    """Replicas announced in session 1, heard at ``now``: whole after the given starts (None:
    announce without "from", whole for every bar); and the table over all of them."""
    replicas = []
    for after in whole_after:
        replica = Replica()
        announce: dict[str, object] = {"session": 1}
        if after is not None:
            announce["from"] = int(after) - WHOLE_MARGIN_MS
        replica.announced(announce)
        replica.heard(now)
        replicas.append(replica)
    return replicas, Replicas(lambda topic: replicas)


# -- announces ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("announce", "whole_after"),
    [
        ({"session": 1}, -math.inf),  # an agg from before "from": whole for every bar
        ({"session": 1, "from": None}, math.inf),  # not heard the proxy yet: whole for none
        ({"session": 1, "from": 5_000}, 5_000 + WHOLE_MARGIN_MS),
    ],
)
def test_an_announce_says_after_which_start_the_agg_is_whole(
    announce: dict[str, object], whole_after: float
) -> None:
    replica = Replica()
    assert replica.whole_after == math.inf  # nothing announced: whole for nothing
    assert replica.announced(announce) is False
    assert replica.whole_after == whole_after
    assert replica.session == 1


def test_a_new_session_is_a_restart_and_whole_only_from_its_own_from() -> None:
    replica = Replica()
    replica.announced({"session": 1})
    assert replica.announced({"session": 1}) is False
    assert replica.announced({"session": 2, "from": None}) is True
    assert replica.whole_after == math.inf
    assert replica.announced({"session": 2, "from": 9_000}) is False
    assert replica.whole_after == 9_000 + WHOLE_MARGIN_MS


def test_a_link_is_heard_for_the_given_seconds_after_its_last_message() -> None:
    replica = Replica()
    assert not replica.is_heard(0.0, HEARD)
    replica.heard(10.0)
    assert replica.is_heard(14.9, HEARD)
    assert not replica.is_heard(15.0, HEARD)


# -- one message at a time: each rule -----------------------------------------------------------

# Each case: the replicas' whole_after (None: whole for all), then steps (replica index, starts
# of its message, now) and the decision expected for each: (forwarded copies, redundant, held,
# stood in). Copies are (s, replica index).
Step = tuple[int, tuple[int, ...], float]
Expect = tuple[list[tuple[int, int]], int, int, int]

CASES: dict[str, tuple[tuple[float | None, ...], list[tuple[Step, Expect]]]] = {
    "a whole agg's new bars go straight out": (
        (None,),
        [((0, (100, 200), 0.0), ([(100, 0), (200, 0)], 0, 0, 0))],
    ),
    "bars at or before the newest forwarded are redundant": (
        (None, None),
        [
            ((0, (100, 200), 0.0), ([(100, 0), (200, 0)], 0, 0, 0)),
            ((1, (100, 200, 300), 0.0), ([(300, 1)], 2, 0, 0)),
            ((1, (200,), 0.0), ([], 1, 0, 0)),
        ],
    ),
    "a lone partial agg's bars go out: nobody has whole copies": (
        (5_000,),
        [((0, (100, 200), 0.0), ([(100, 0), (200, 0)], 0, 0, 0))],
    ),
    "partial bars are held while a heard agg is whole for them": (
        (None, 5_000),
        [((1, (100, 200), 0.0), ([], 0, 2, 0))],
    ),
    "partial bars are not held for an agg whole only later than them": (
        (1_000, 5_000),
        [((1, (100, 200), 0.0), ([(100, 1), (200, 1)], 0, 0, 0))],
    ),
    "later whole bars wait behind held ones": (
        (None, 150),
        [
            ((1, (100,), 0.0), ([], 0, 1, 0)),
            ((1, (200, 300), 0.0), ([], 0, 2, 0)),
        ],
    ),
    "whole copies replace stand-ins; one they lack goes out in its place, in order": (
        (None, 5_000),
        [
            ((1, (100, 150, 200), 0.0), ([], 0, 3, 0)),
            ((0, (100, 200, 300), 0.1), ([(100, 0), (150, 1), (200, 0), (300, 0)], 2, 0, 1)),
        ],
    ),
    "stand-ins newer than the whole agg's message stay held": (
        (None, 5_000),
        [
            ((1, (100, 400), 0.0), ([], 0, 2, 0)),
            ((0, (100, 200), 0.1), ([(100, 0), (200, 0)], 1, 0, 0)),
            ((0, (300, 400), 0.2), ([(300, 0), (400, 0)], 1, 0, 0)),
        ],
    ),
    "a start already held keeps its first copy": (
        (None, 5_000, 6_000),
        [
            ((1, (100, 200), 0.0), ([], 0, 2, 0)),
            ((2, (200, 300), 0.0), ([], 1, 1, 0)),
            ((0, (300,), 0.1), ([(100, 1), (200, 1), (300, 0)], 1, 0, 2)),
        ],
    ),
    "held bars and a duplicate in one message: the duplicate is redundant, the rest held": (
        (None, None, 5_000),
        [
            ((0, (100,), 0.0), ([(100, 0)], 0, 0, 0)),
            ((2, (100, 200), 0.0), ([], 1, 1, 0)),
        ],
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_rule(name: str) -> None:
    whole_after, steps = CASES[name]
    replicas, table = links(*whole_after)
    for (index, starts, now), (forwarded, redundant, held, stood_in) in steps:
        for replica in replicas:
            replica.heard(now)
        decision = table.bars_received(replicas[index], 1, TOPIC, bars(index, *starts), now, HEARD)
        assert copies(decision.forward) == forwarded, name
        assert (decision.redundant, decision.held, decision.stood_in) == (
            redundant,
            held,
            stood_in,
        ), name


def test_a_whole_copy_replaces_a_partial_one_held_at_its_start() -> None:
    (whole, late, early), table = links(None, 5_000, 150)
    table.bars_received(late, 1, TOPIC, bars(1, 100, 200), 0.0, HEARD)
    decision = table.bars_received(early, 1, TOPIC, bars(2, 100, 200), 0.0, HEARD)
    assert decision[1:] == (2, 0, 0)  # one copy of each start is dropped either way ...
    assert copies(table.held(TOPIC)) == [(100, 1), (200, 2)]  # type: ignore[arg-type]
    decision = table.bars_received(whole, 1, TOPIC, bars(0, 100), 0.0, HEARD)
    assert (copies(decision.forward), decision.redundant) == ([(100, 0)], 1)
    (release,) = table.stand_ins_due(STAND_IN_WAIT)
    assert copies(release.forward) == [(200, 2)]  # ... the whole one goes out


def test_a_held_whole_copy_beats_the_partial_copy_of_the_message_that_settles_it() -> None:
    """The aggs whole for the held bars fell silent; a later one's message settles them, but
    its copy of a start held whole is not the one that goes out."""
    (_, early, late), table = links(None, 150, 5_000)
    assert table.bars_received(early, 1, TOPIC, bars(1, 100, 200), 0.0, HEARD).held == 2
    later = HEARD + 0.5  # nobody but ``late`` heard since 0
    late.heard(later)
    decision = table.bars_received(late, 1, TOPIC, bars(2, 200), later, HEARD)
    assert copies(decision.forward) == [(100, 1), (200, 1)]
    assert decision[1:] == (1, 0, 1)


def test_partial_bars_are_not_held_for_an_agg_not_heard() -> None:
    (whole, late), table = links(None, 5_000)
    whole.heard(-HEARD)  # last heard HEARD seconds ago
    decision = table.bars_received(late, 1, TOPIC, bars(1, 100), 0.0, HEARD)
    assert copies(decision.forward) == [(100, 1)]


def test_bars_of_a_session_not_announced_yet_are_taken_as_partial() -> None:
    """The agg restarted and its bars came before its new announce: they may lack trades."""
    (whole, restarted), table = links(None, None)
    decision = table.bars_received(restarted, 2, TOPIC, bars(1, 100), 0.0, HEARD)
    assert (copies(decision.forward), decision.held) == ([], 1)
    decision = table.bars_received(whole, 1, TOPIC, bars(0, 100), 0.0, HEARD)
    assert (copies(decision.forward), decision.redundant) == ([(100, 0)], 1)


def test_topics_are_independent() -> None:
    (whole, late), table = links(None, 5_000)
    assert table.bars_received(late, 1, TOPIC, bars(1, 100), 0.0, HEARD).held == 1
    decision = table.bars_received(whole, 1, OTHER, bars(0, 100), 0.0, HEARD)
    assert copies(decision.forward) == [(100, 0)]
    assert table.delivered(TOPIC) is None
    assert table.delivered(OTHER) == 100
    assert copies(table.held(TOPIC)) == [(100, 1)]  # type: ignore[arg-type]
    assert table.held(OTHER) is None


def test_an_empty_message_decides_nothing() -> None:
    (whole,), table = links(None)
    decision = table.bars_received(whole, 1, TOPIC, bars(0), 0.0, HEARD)
    assert (len(decision.forward), decision[1:]) == (0, (0, 0, 0))
    assert table.delivered(TOPIC) is None


# -- the wait -------------------------------------------------------------------------------


def test_stand_ins_go_out_as_they_are_after_the_wait_from_the_first_held() -> None:
    (_, late), table = links(None, 5_000)
    table.bars_received(late, 1, TOPIC, bars(1, 100), 0.0, HEARD)
    table.bars_received(late, 1, TOPIC, bars(1, 200), 0.5, HEARD)
    assert table.stand_ins_due(STAND_IN_WAIT - 0.01) == []
    assert table.has_stand_ins()
    (release,) = table.stand_ins_due(STAND_IN_WAIT)
    assert (release.topic, copies(release.forward), release.redundant) == (
        TOPIC,
        [(100, 1), (200, 1)],
        0,
    )
    assert not table.has_stand_ins()
    assert table.delivered(TOPIC) == 200
    assert table.stand_ins_due(10.0) == []


def test_stand_ins_forwarded_meanwhile_from_elsewhere_are_redundant_at_the_wait() -> None:
    """A whole agg's message settles stand-ins up to its newest bar only; the wait then finds
    the rest, less any start forwarded since (it cannot be sent twice)."""
    (whole, late), table = links(None, 5_000)
    table.bars_received(late, 1, TOPIC, bars(1, 100, 300), 0.0, HEARD)
    table.bars_received(whole, 1, TOPIC, bars(0, 100), 0.1, HEARD)
    assert copies(table.held(TOPIC)) == [(300, 1)]  # type: ignore[arg-type]
    (release,) = table.stand_ins_due(1.0, wait=0.5)
    assert (copies(release.forward), release.redundant) == ([(300, 1)], 0)


def test_stand_ins_go_out_at_once_with_a_whole_agg_s_newer_bars_it_has_no_copy_of() -> None:
    (whole, late, other), table = links(None, 5_000, None)
    table.bars_received(late, 1, TOPIC, bars(1, 100), 0.0, HEARD)
    decision = table.bars_received(other, 1, TOPIC, bars(2, 200), 0.0, HEARD)
    assert (copies(decision.forward), decision.stood_in) == ([(100, 1), (200, 2)], 1)
    assert table.stand_ins_due(10.0) == []
    assert whole.is_heard(0.0, HEARD)


def test_the_shell_passes_the_wait_so_it_can_be_changed() -> None:
    (_, late), table = links(None, 5_000)
    table.bars_received(late, 1, TOPIC, bars(1, 100), 0.0, HEARD)
    assert table.stand_ins_due(0.05, wait=0.05)[0].forward["s"].tolist() == [100]


# -- any interleaving: the property ------------------------------------------------------------

STEP_MS = 100  # bar starts are 0, 100, 200 ...


@dataclass
class Segment:
    """One session of a replica: it sends bars ``first`` .. ``end - 1`` (indices), whole from
    ``whole_from`` on (None: it announces no "from": whole for every bar)."""

    session: int
    first: int
    end: int
    whole_from: int | None

    def announce(self) -> dict[str, object]:
        if self.whole_from is None:
            return {"session": self.session}
        return {"session": self.session, "from": self.whole_from * STEP_MS - 1}

    def is_whole_for(self, index: int) -> bool:
        return self.whole_from is None or index >= self.whole_from


@dataclass
class Link:
    """A replica's stream: per segment, its announce, then its bars in messages, in order."""

    replica: Replica = field(default_factory=Replica)
    segments: list[Segment] = field(default_factory=list)
    events: list[tuple[Segment, list[int] | None]] = field(default_factory=list)  # None: announce


@st.composite
def streams(draw: st.DrawFn) -> tuple[int, list[Link]]:
    """Up to three replicas of the same bars. Each starts at some bar (the first may be whole
    from the start) and may restart; a session is partial for its first ``margin`` bars (the
    same margin for all: a later start is whole later); bars sent before a restart stay sent,
    those between it and the new session's first bar are lost to that replica."""
    count = draw(st.integers(4, 14))
    margin = draw(st.integers(1, 3))
    made: list[Link] = []
    for number in range(draw(st.integers(1, 3))):
        link = Link()
        first = draw(st.integers(0, count - 1))
        whole_from: int | None = first + margin
        if number == 0 and draw(st.booleans()):
            first, whole_from = 0, None
        session = number * 100
        while first < count:
            end = draw(st.integers(first + 1, count))
            segment = Segment(session, first, end, whole_from)
            link.segments.append(segment)
            link.events.append((segment, None))
            index = first
            while index < end:
                size = draw(st.integers(1, 3))
                link.events.append((segment, list(range(index, min(index + size, end)))))
                index += size
            if end == count or not draw(st.booleans()):
                break
            session += 1
            first = draw(st.integers(end, count))  # restarted: whole again only later
            whole_from = first + margin
        made.append(link)
    return count, made


@dataclass
class Run:
    forwarded: list[tuple[int, int, bool]] = field(default_factory=list)  # (index, link, whole)
    received: int = 0
    redundant: int = 0
    stood_in: int = 0


def play(
    data: st.DataObject,
    made: list[Link],
    ticks: bool,
    silent: Replica | None = None,
    in_clock_order: bool = False,
) -> Run:
    """Deliver every link's events, links interleaved as ``data`` draws; ``now`` moves a little
    before each event (by up to the whole wait and more with ``ticks``), and past the wait at
    the end."""
    replicas = [link.replica for link in made]
    if silent is not None:
        replicas.append(silent)
    table = Replicas(lambda topic: replicas)
    run = Run()
    for link in made:  # the bridge asks for bars once it has heard the announces
        segment, announce = link.events[0]
        assert announce is None
        link.replica.announced(segment.announce(), margin_ms=0)
        link.replica.heard(0.0)
    positions = [1] * len(made)
    now = 0.0
    whole_of: dict[tuple[int, int], bool] = {}  # (link, index) -> whole copy

    def take(copy: np.ndarray) -> None:
        for s, by in copy.tolist():
            run.forwarded.append((s // STEP_MS, by, whole_of[(by, s // STEP_MS)]))

    while True:
        waiting = [n for n, link in enumerate(made) if positions[n] < len(link.events)]
        if not waiting:
            break
        if in_clock_order:  # the link whose next message begins first (ties: any)
            first = {n: first_bar(made[n].events[positions[n] :]) for n in waiting}
            waiting = [n for n in waiting if first[n] == min(first.values())]
        n = data.draw(st.sampled_from(waiting))
        segment, indices = made[n].events[positions[n]]
        positions[n] += 1
        step = (
            data.draw(st.sampled_from([0.0, 0.3, STAND_IN_WAIT, 3.0]))
            if ticks
            else data.draw(st.sampled_from([0.0, 0.001]))
        )
        now += step
        for release in table.stand_ins_due(now):
            run.redundant += release.redundant
            run.stood_in += len(release.forward)
            take(release.forward)
        replica = made[n].replica
        replica.heard(now)
        if indices is None:
            replica.announced(segment.announce(), margin_ms=0)
            continue
        for index in indices:
            whole_of[(n, index)] = segment.is_whole_for(index)
        records = bars(n, *(index * STEP_MS for index in indices))
        run.received += len(records)
        decision = table.bars_received(replica, segment.session, TOPIC, records, now, HEARD)
        assert isinstance(decision, Decision)
        run.redundant += decision.redundant
        run.stood_in += decision.stood_in
        take(decision.forward)
    for release in table.stand_ins_due(now + 2 * STAND_IN_WAIT):
        run.redundant += release.redundant
        run.stood_in += len(release.forward)
        take(release.forward)
    assert not table.has_stand_ins()
    return run


def first_bar(events: list[tuple[Segment, list[int] | None]]) -> int:
    """The first bar of the next message among ``events`` (an announce goes with it)."""
    return next(indices[0] for _, indices in events if indices)


def sent(made: list[Link]) -> tuple[set[int], set[int]]:
    """Bar indices some replica sent at all, and those some replica sent whole."""
    anyhow: set[int] = set()
    whole: set[int] = set()
    for link in made:
        for segment, indices in link.events:
            for index in indices or ():
                anyhow.add(index)
                if segment.is_whole_for(index):
                    whole.add(index)
    return anyhow, whole


def silent_replica(draw: bool) -> Replica | None:
    """An agg announced whole for every bar and not heard for longer than HEARD: it must make
    nobody wait."""
    if not draw:
        return None
    replica = Replica()
    replica.announced({"session": 999})
    replica.heard(-2 * HEARD)
    return replica


def check_order_and_count(run: Run) -> None:
    """A topic's bars go out in s order, each start once; every bar received is forwarded or
    counted redundant; stand-ins are among those forwarded."""
    starts = [index for index, _, _ in run.forwarded]
    assert starts == sorted(set(starts))
    assert run.received == len(run.forwarded) + run.redundant
    assert run.stood_in <= len(run.forwarded)


@settings(max_examples=1000, deadline=None)
@given(streams(), st.booleans(), st.data())
def test_every_bar_a_whole_replica_had_goes_out_once_in_order_whole(
    stream: tuple[int, list[Link]], silent: bool, data: st.DataObject
) -> None:
    """Any interleaving of the replicas' streams (each link in its order), every replica
    heard, no stand-in waiting the whole wait before everything arrived: every bar a replica
    had whole goes out, once, as a whole copy, in s order. A silent agg whole for all changes
    nothing."""
    _, made = stream
    run = play(data, made, ticks=False, silent=silent_replica(silent))
    check_order_and_count(run)
    _, whole = sent(made)
    out = {index: is_whole for index, _, is_whole in run.forwarded}
    for index in sorted(whole):
        assert out.get(index) is True, (index, run.forwarded)


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans(), st.data())
def test_in_clock_order_every_bar_any_replica_had_goes_out_once(
    stream: tuple[int, list[Link]], silent: bool, data: st.DataObject
) -> None:
    """The links' messages arriving in the order their first bars began (as bars close on one
    feed clock: a replica's message is never overtaken by another's of newer bars only), ties
    in any order: every bar any replica had goes out once and in order, those no whole replica
    had as stand-ins or as the only copy, those one had as its whole copy."""
    _, made = stream
    run = play(data, made, ticks=False, silent=silent_replica(silent), in_clock_order=True)
    check_order_and_count(run)
    anyhow, whole = sent(made)
    out = {index: is_whole for index, _, is_whole in run.forwarded}
    assert set(out) == anyhow
    for index in sorted(whole):
        assert out[index] is True, (index, run.forwarded)


@settings(max_examples=300, deadline=None)
@given(streams(), st.booleans(), st.data())
def test_whatever_the_delays_a_topic_s_bars_go_out_in_order_each_once_and_counted(
    stream: tuple[int, list[Link]], silent: bool, data: st.DataObject
) -> None:
    """Time passing between messages past the stand-in wait (a whole replica late by more
    than the wait loses to the stand-ins): still in s order, each start once, every bar
    received forwarded or counted redundant, nothing held for ever."""
    _, made = stream
    run = play(data, made, ticks=True, silent=silent_replica(silent))
    check_order_and_count(run)
