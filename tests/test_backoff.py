from __future__ import annotations

import random

import pytest

from polyfan.backoff import MAX_CONNECTIONS_COOL_DOWN, Backoff


def schedule(backoff: Backoff, count: int) -> list[float]:
    return [backoff.next_delay() for _ in range(count)]


def test_delays_grow_exponentially_within_their_jitter_band_up_to_the_cap() -> None:
    backoff = Backoff(initial=0.5, cap=8.0, rng=random.Random(1))
    for attempt, delay in enumerate(schedule(backoff, 10)):
        ceiling = min(8.0, 0.5 * 2**attempt)
        assert ceiling / 2 <= delay <= ceiling


def test_jitter_spreads_clients_that_fail_together() -> None:
    first = schedule(Backoff(rng=random.Random(1)), 6)
    second = schedule(Backoff(rng=random.Random(2)), 6)
    assert first != second


def test_schedule_resets_only_after_a_healthy_period() -> None:
    backoff = Backoff(initial=1.0, cap=60.0, healthy_after=30.0, rng=random.Random(3))
    schedule(backoff, 4)
    backoff.connected(100.0)
    backoff.disconnected(110.0)  # up for 10 s: a flapping server keeps backing off
    assert backoff.attempts == 4
    assert 8.0 <= backoff.next_delay() <= 16.0
    backoff.connected(200.0)
    backoff.disconnected(230.0)  # up for 30 s: healthy
    assert backoff.attempts == 0
    assert 0.5 <= backoff.next_delay() <= 1.0


def test_max_connections_cools_down_at_least_a_minute() -> None:
    backoff = Backoff(rng=random.Random(4))
    assert backoff.cool_down() >= MAX_CONNECTIONS_COOL_DOWN
    assert backoff.attempts == 1


def test_initial_delay_must_be_positive_and_below_the_cap() -> None:
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=0.0)
    with pytest.raises(ValueError, match="initial"):
        Backoff(initial=10.0, cap=1.0)
