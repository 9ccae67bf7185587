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
