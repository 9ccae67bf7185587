"""The outage rules (polyfan.bars.outages): values in, changes out, no sockets and no clocks."""

from __future__ import annotations

import pytest

from polyfan.bars.outages import GAP, RESTART, SILENCE, UPSTREAM, Change, Outages, describe


def heard_from(outages: Outages, session: int, now_ms: int, clock: int | None = None) -> None:
    assert outages.session_seen(session, clock, now_ms) == []


def test_an_upstream_outage_ends_at_the_first_clock_past_its_start_after_the_up() -> None:
    outages = Outages()
    assert outages.upstream_down(5_000) == [Change(5_000, None, (UPSTREAM,))]
    assert outages.clock_received(6_000, 0) == []  # still down: clocks do not end it
    assert outages.upstream_up() == []
    assert outages.clock_received(5_000, 0) == []  # not past its start yet
    assert outages.clock_received(5_001, 0) == [Change(5_000, 5_001, (UPSTREAM,))]
    assert outages.windows == [(5_000, 5_001)]
    assert outages.began_total == 1
    assert not outages.is_open()


def test_a_gap_opens_an_outage_that_the_next_clock_past_it_closes() -> None:
    outages = Outages()
    assert outages.lost(None) == []  # nothing to anchor it to before the first clock
    assert outages.lost(7_000) == [Change(7_000, None, (GAP,))]
    assert outages.current() == Change(7_000, None, (GAP,))
    assert outages.clock_received(7_100, 0) == [Change(7_000, 7_100, (GAP,))]
    assert outages.current() is None


def test_a_new_publisher_session_is_a_restart_but_not_those_heard_at_the_start() -> None:
    outages = Outages(silence_ms=2_000)
    heard_from(outages, 1, now_ms=0)
    heard_from(outages, 2, now_ms=1_999)  # a second proxy heard from the start
    heard_from(outages, 1, now_ms=5_000)  # both known: no restart
    assert outages.session_seen(3, 9_000, now_ms=5_000) == [Change(9_000, None, (RESTART,))]
    assert outages.clock_received(9_500, 5_100) == [Change(9_000, 9_500, (RESTART,))]


def test_silence_opens_an_outage_once_and_the_next_clock_closes_it() -> None:
    outages = Outages(silence_ms=2_000)
    assert outages.silent(10_000, 50_000) == []  # never heard: nothing to be silent about
    outages.heard(10_000)
    assert outages.silent(11_999, 50_000) == []
    assert outages.silent(12_000, 50_000) == [Change(50_000, None, (SILENCE,))]
    assert outages.silent(13_000, 50_000) == []  # already open
    assert outages.clock_received(50_200, 13_100) == [Change(50_000, 50_200, (SILENCE,))]
    assert outages.began_total == 1


def test_causes_seen_while_an_outage_is_open_join_it() -> None:
    outages = Outages(silence_ms=2_000)
    heard_from(outages, 1, now_ms=0)
    outages.heard(1_000)
    assert outages.silent(3_000, 40_000) == [Change(40_000, None, (SILENCE,))]
    # the proxy comes back as a new process whose upstream is not up yet
    assert outages.session_seen(2, 40_000, 8_000) == []
    assert outages.upstream_down(40_000) == []
    assert outages.clock_received(40_000, 8_000) == []
    assert outages.upstream_up() == []
    assert outages.clock_received(47_000, 9_000) == [
        Change(40_000, 47_000, (SILENCE, RESTART, UPSTREAM))
    ]
    assert outages.began_total == 1
    assert outages.windows == [(40_000, 47_000)]


def test_an_agg_start_marks_the_bars_still_open_without_counting_an_outage() -> None:
    outages = Outages()
    outages.started(20_000)
    assert outages.windows == [(20_000, 20_000)]
    assert outages.began_total == 0
    assert outages.current() is None


def test_old_windows_are_forgotten_but_an_open_one_never() -> None:
    outages = Outages()
    outages.started(1_000)
    outages.lost(2_000)
    outages.clock_received(2_500, 0)
    outages.upstream_down(9_000)
    outages.forget_before(2_400)
    assert outages.windows == [(2_000, 2_500), (9_000, None)]
    outages.forget_before(10**12)
    assert outages.windows == [(9_000, None)]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (Change(1, None, (GAP,)), {"state": "down", "s": 1, "e": None, "causes": ["gap"]}),
        (
            Change(1, 5, (SILENCE, RESTART)),
            {"state": "up", "s": 1, "e": 5, "causes": ["silence", "restart"]},
        ),
    ],
)
def test_changes_as_published(change: Change, expected: dict[str, object]) -> None:
    assert change.as_json() == expected
    assert change.began is (expected["state"] == "down")


def test_causes_read_as_words() -> None:
    assert describe((UPSTREAM, GAP)) == (
        "the proxy's upstream connection is down; messages from the proxy were lost"
    )


def test_an_outage_opened_before_the_start_window_still_closes_itself() -> None:
    # a gap (or an UPSTREAM down) in the agg's first batch opens a window before started()
    # appends its own: closing must end the open one, not the last one
    outages = Outages()
    outages.lost(1_000)
    outages.started(1_000)
    assert outages.clock_received(1_200, 0) == [Change(1_000, 1_200, (GAP,))]
    assert outages.windows == [(1_000, 1_200), (1_000, 1_000)]
    outages.forget_before(5_000)
    assert outages.windows == []


def test_an_upstream_outage_lasts_at_least_the_upstream_downtime() -> None:
    # a quiet market: the proxy's clock stands still while it is disconnected and creeps on
    # by idle advance after it reconnects, so the first clock past the start comes early
    outages = Outages()
    outages.upstream_down(10_000, wall=50_000)
    outages.upstream_up(wall=170_000)  # two minutes later
    assert outages.clock_received(10_050, 0) == [Change(10_000, 130_000, (UPSTREAM,))]


def test_a_proxy_restart_ends_an_upstream_outage_whose_up_was_missed() -> None:
    outages = Outages(silence_ms=2_000)
    heard_from(outages, 1, now_ms=0)
    outages.upstream_down(8_000, wall=1)
    assert outages.session_seen(2, 8_000, now_ms=10_000) == []  # joins the open outage
    assert outages.clock_received(0, 10_100) == []  # the new proxy's clock before its trades
    assert outages.clock_received(9_000, 10_200) == [Change(8_000, 9_000, (UPSTREAM, RESTART))]


def test_the_first_publisher_session_is_known_without_a_decision() -> None:
    outages = Outages(silence_ms=2_000)
    outages.heard(0)
    outages.session_heard(1, 0)
    heard_from(outages, 1, now_ms=5_000)  # the same proxy later: no restart
    assert outages.session_seen(2, 7_000, now_ms=6_000) == [Change(7_000, None, (RESTART,))]


# -- settling: one outage per cut, though each topic shows its gap as its first message arrives
#
# A case is a list of steps, each with the changes it publishes and the windows after it (the
# bars' marking), then the outages counted. Steps, as the agg makes the calls:
#   ("silence", clock)        nothing heard for silence_ms, the feed clock being ``clock``
#   ("clock", clock)          a CLOCK arrived (the decoder noted it past closes_past())
#   ("gap", clock)            a batch showed a sequence gap, ``clock`` the feed clock before it
#   ("down", clock, wall)     the proxy says its upstream is down
#   ("up", wall)              ... and up again
Step = tuple[object, ...]
Case = tuple[int, list[tuple[Step, list[Change], list[tuple[int, int | None]]]], int]

S, G, U = SILENCE, GAP, UPSTREAM
SETTLING: dict[str, Case] = {
    # the cut seen in tests/test_multihost.py: the silence ends at the first clock after the
    # link returns; the topics' gaps come in that batch and in later ones, each joining the
    # outage while it settles (the clock less than a grace past the clock that last ended it)
    "a cut is one outage, its topics' gaps joining it while it settles": (
        250,
        [
            (("silence", 10_000), [Change(10_000, None, (S,))], [(10_000, None)]),
            (("clock", 20_000), [], [(10_000, 20_000)]),  # ended, not over: settling
            (("gap", 20_000), [], [(10_000, None)]),  # topic A: open-ended again
            (("clock", 20_010), [], [(10_000, 20_010)]),
            (("clock", 20_050), [], [(10_000, 20_010)]),
            (("gap", 20_050), [], [(10_000, None)]),  # topic C, 40 ms later
            (("clock", 20_100), [], [(10_000, 20_100)]),
            (("clock", 20_349), [], [(10_000, 20_100)]),  # not a grace past 20_100 yet
            (("clock", 20_350), [Change(10_000, 20_100, (S, G))], [(10_000, 20_100)]),
        ],
        1,
    ),
    "a gap once the outage is over is another outage": (
        250,
        [
            (("silence", 10_000), [Change(10_000, None, (S,))], [(10_000, None)]),
            (("clock", 20_000), [], [(10_000, 20_000)]),
            (("clock", 20_250), [Change(10_000, 20_000, (S,))], [(10_000, 20_000)]),
            (("gap", 20_250), [Change(20_250, None, (G,))], [(10_000, 20_000), (20_250, None)]),
            (("clock", 20_300), [], [(10_000, 20_000), (20_250, 20_300)]),
            (
                ("clock", 20_550),
                [Change(20_250, 20_300, (G,))],
                [(10_000, 20_000), (20_250, 20_300)],
            ),
        ],
        2,
    ),
    "without settling (the default) every clock that ends an outage makes it over": (
        0,
        [
            (("silence", 10_000), [Change(10_000, None, (S,))], [(10_000, None)]),
            (("clock", 20_000), [Change(10_000, 20_000, (S,))], [(10_000, 20_000)]),
            (("gap", 10_000), [Change(10_000, None, (G,))], [(10_000, 20_000), (10_000, None)]),
            (
                ("clock", 20_010),
                [Change(10_000, 20_010, (G,))],
                [(10_000, 20_000), (10_000, 20_010)],
            ),
        ],
        2,
    ),
    # the proxy falls silent again while the outage settles: it is open-ended again (an
    # outage with silence among its causes must not ignore the second silence)
    "silence while settling reopens the outage": (
        250,
        [
            (("silence", 10_000), [Change(10_000, None, (S,))], [(10_000, None)]),
            (("clock", 20_000), [], [(10_000, 20_000)]),
            (("silence", 20_000), [], [(10_000, None)]),
            (("clock", 30_000), [], [(10_000, 30_000)]),
            (("clock", 30_250), [Change(10_000, 30_000, (S,))], [(10_000, 30_000)]),
        ],
        1,
    ),
    "an upstream down while settling joins, and clocks wait for its up": (
        250,
        [
            (("gap", 5_000), [Change(5_000, None, (G,))], [(5_000, None)]),
            (("clock", 5_100), [], [(5_000, 5_100)]),
            (("down", 5_150, 1_000), [], [(5_000, None)]),
            (("clock", 5_500), [], [(5_000, None)]),  # still down
            (("up", 3_000), [], [(5_000, None)]),  # down 2 s from 5_150: ends by 7_150
            (("clock", 5_600), [], [(5_000, 7_150)]),
            (("clock", 5_850), [Change(5_000, 7_150, (G, U))], [(5_000, 7_150)]),
        ],
        1,
    ),
    # settling counts from the clock that ended it, not from an end the downtime pushed later
    # (in a quiet market that end can be minutes ahead of the clock)
    "an upstream outage settles from the clock that ended it": (
        250,
        [
            (("down", 10_000, 50_000), [Change(10_000, None, (U,))], [(10_000, None)]),
            (("up", 170_000), [], [(10_000, None)]),
            (("clock", 10_050), [], [(10_000, 130_000)]),
            (("clock", 10_300), [Change(10_000, 130_000, (U,))], [(10_000, 130_000)]),
        ],
        1,
    ),
}


@pytest.mark.parametrize("case", list(SETTLING), ids=list(SETTLING))
def test_settling(case: str) -> None:
    settle_ms, steps, began = SETTLING[case]
    outages = Outages(silence_ms=2_000, settle_ms=settle_ms)
    now = 0
    outages.heard(now)
    for step, changes, windows in steps:
        now += 10
        match step:
            case ("silence", int(clock)):
                now += 2_000
                got = outages.silent(now, clock)
            case ("clock", int(clock)):
                got = outages.clock_received(clock, now)
            case ("gap", int(clock)):
                outages.heard(now)
                got = outages.lost(clock)
            case ("down", int(clock), int(wall)):
                outages.heard(now)
                got = outages.upstream_down(clock, wall)
            case ("up", int(wall)):
                outages.heard(now)
                got = outages.upstream_up(wall)
        assert (step, got, outages.windows) == (step, changes, windows)
    assert outages.began_total == began
    assert not outages.is_open()


def test_while_settling_the_decoder_waits_for_a_clock_a_settle_past_the_end() -> None:
    outages = Outages(settle_ms=250)
    outages.lost(1_000)
    assert outages.closes_past() == 1_000  # the first clock past its start ends it
    assert outages.clock_received(1_100, 0) == []
    assert outages.closes_past() == 1_349  # ... and the first at 1_350 or later makes it over
    assert outages.current() == Change(1_000, None, (GAP,))  # still down, for the announce
    outages.lost(1_100)
    assert outages.closes_past() == 1_000  # open-ended again: any clock after ends it


def test_a_settling_outage_keeps_its_window_and_finds_it_among_the_start_window() -> None:
    outages = Outages(settle_ms=250)
    outages.lost(1_000)
    outages.started(1_000)
    assert outages.clock_received(1_200, 0) == []
    outages.forget_before(5_000)  # never the window of the outage still settling
    assert outages.windows == [(1_000, 1_200)]
    assert outages.lost(1_200) == []
    assert outages.windows == [(1_000, None)]
    assert outages.clock_received(1_300, 0) == []
    assert outages.clock_received(1_550, 0) == [Change(1_000, 1_300, (GAP,))]
