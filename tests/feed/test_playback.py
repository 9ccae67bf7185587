"""The replay's pacing: SIP time over the speed, from an anchor; max speed sends everything."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyfan.feed.playback import Pacer, frames_of

S = 1_000_000_000  # ns per second


def test_trades_are_due_at_their_sip_time_over_the_speed() -> None:
    sip = np.array([100 * S, 100 * S, 101 * S, 103 * S, 110 * S], np.int64)
    pacer = Pacer(2.0)
    pacer.start(int(sip[0]), now=50.0)
    assert pacer.due_count(sip, 0, 50.0) == 2  # both at the anchor
    assert pacer.due_count(sip, 2, 50.49) == 0
    assert pacer.due_count(sip, 2, 50.5) == 1  # 1 s of SIP time at 2x is 0.5 s
    assert pacer.due_at(103 * S) == pytest.approx(51.5)
    assert pacer.due_count(sip, 3, 60.0) == 2


def test_max_speed_makes_everything_due_at_once() -> None:
    sip = np.array([1, 2, 3 * S], np.int64)
    pacer = Pacer(None)
    pacer.start(1, now=0.0)
    assert pacer.due_count(sip, 1, 0.0) == 2
    assert pacer.due_at(3 * S) == -math.inf


def test_pause_and_resume_reanchors_so_a_pause_is_no_burst() -> None:
    sip = np.array([0, S, 2 * S, 3 * S], np.int64)
    pacer = Pacer(1.0)
    pacer.start(0, now=0.0)
    assert pacer.due_count(sip, 0, 1.0) == 2
    pacer.pause()
    assert not pacer.is_started()
    pacer.start(2 * S, now=100.0)  # resumed 99 s later at the next trade
    assert pacer.due_count(sip, 2, 100.0) == 1
    assert pacer.due_count(sip, 3, 100.5) == 0
    with pytest.raises(ValueError):
        Pacer(0)


def test_frames_split_a_batch_into_bounded_runs() -> None:
    assert frames_of(250, 100) == [(0, 100), (100, 200), (200, 250)]
    assert frames_of(0, 100) == []
