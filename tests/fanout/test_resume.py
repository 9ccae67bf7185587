"""The client's resume rules (fanout/resume.py), values in and values out: which bars are handed
on, what each channel resumes with, what a status means."""

from __future__ import annotations

from typing import Any

import pytest

from polyfan.fanout.protocol import Channel, parse_channel
from polyfan.fanout.resume import (
    RESUME_SLACK_MS,
    Gap,
    Resume,
    StatusAction,
    Verdict,
    channels_from,
)

T0 = 1_781_622_376_000


def mb(symbol: str, interval: int, s: int, **extra: Any) -> dict[str, Any]:
    return {"ev": "MB", "sym": symbol, "interval": interval, "s": s, "e": s + interval, **extra}


def resume(*names: str, since: int | None = None) -> Resume:
    channels = [parse_channel(n) for n in names]
    return Resume(channels, {c: since for c in channels if c.symbol is not None})


def handed(r: Resume, *events: dict[str, Any]) -> list[int]:
    return [e["s"] for e in events if r.bar(e).verdict is Verdict.HAND_ON]


def test_channels_are_parsed_in_order_once_each_from_a_string_or_a_list() -> None:
    assert channels_from("500Ms.TSLA, 1000Ms.AAPL,500Ms.TSLA") == [
        Channel(500, "TSLA"),
        Channel(1000, "AAPL"),
    ]
    assert channels_from(["100Ms.*"]) == [Channel(100, None)]
    with pytest.raises(ValueError, match="TSLA: not a channel"):
        channels_from("TSLA")


def test_a_star_channel_takes_no_since_and_a_stream_needs_a_channel() -> None:
    star = parse_channel("500Ms.*")
    with pytest.raises(ValueError, match="since needs one symbol"):
        Resume([star], {star: T0})
    with pytest.raises(ValueError, match="at least one"):
        Resume([], {})


def test_the_first_connection_asks_for_what_was_given() -> None:
    r = resume("500Ms.TSLA", "500Ms.AAPL", "100Ms.MSFT", "100Ms.*", since=T0)
    assert r.subscriptions() == [
        (["500Ms.TSLA", "500Ms.AAPL"], T0),
        (["100Ms.MSFT"], T0),
        (["100Ms.*"], None),
    ]
    assert resume("500Ms.TSLA").subscriptions() == [(["500Ms.TSLA"], None)]


def test_a_reconnect_resumes_each_channel_from_the_start_of_the_next_bar_it_needs() -> None:
    r = resume("500Ms.TSLA", "1000Ms.AAPL", since=T0)
    r.connected()
    assert handed(r, mb("TSLA", 500, T0), mb("TSLA", 500, T0 + 1500)) == [T0, T0 + 1500]
    assert handed(r, mb("AAPL", 1000, T0 + 3000)) == [T0 + 3000]
    r.connecting()
    assert r.subscriptions() == [(["500Ms.TSLA"], T0 + 2000), (["1000Ms.AAPL"], T0 + 4000)]


def test_channels_of_one_interval_share_a_frame_with_the_smallest_since_and_drop_the_overlap() -> (
    None
):
    r = resume("500Ms.TSLA", "500Ms.AAPL", since=T0)
    r.connected()
    handed(r, mb("TSLA", 500, T0 + 5000), mb("AAPL", 500, T0 + 1000))
    assert r.subscriptions() == [(["500Ms.TSLA", "500Ms.AAPL"], T0 + 1500)]
    # The shared since brings TSLA's bars from T0 + 1500 again: only the new ones go on.
    again = [mb("TSLA", 500, T0 + 1500 + 500 * k) for k in range(12)]
    assert handed(r, *again) == [T0 + 5500, T0 + 6000, T0 + 6500, T0 + 7000]
    assert r.dropped == 8


def test_nothing_is_handed_on_twice_nor_before_since() -> None:
    r = resume("100Ms.TSLA", since=T0 + 1000)
    assert handed(r, mb("TSLA", 100, T0 + 900), mb("TSLA", 100, T0 + 1000)) == [T0 + 1000]
    assert handed(r, mb("TSLA", 100, T0 + 1000), mb("TSLA", 100, T0 + 1100)) == [T0 + 1100]
    assert handed(r, mb("OTHER", 100, T0 + 5000), {"ev": "MB"}) == []


def test_a_revision_of_a_bar_already_handed_on_is_handed_on_again() -> None:
    r = resume("100Ms.TSLA", since=T0)
    assert handed(r, mb("TSLA", 100, T0), mb("TSLA", 100, T0 + 100)) == [T0, T0 + 100]
    assert handed(r, mb("TSLA", 100, T0, r=1), mb("TSLA", 100, T0, r=0)) == [T0]
    assert r.subscriptions() == [(["100Ms.TSLA"], T0 + 200)]


def test_a_bar_on_both_a_symbol_and_its_star_channel_moves_both() -> None:
    r = resume("100Ms.TSLA", "100Ms.*")
    assert handed(r, mb("TSLA", 100, T0), mb("AAPL", 100, T0), mb("TSLA", 100, T0)) == [T0, T0]
    r.connected()
    assert r.subscriptions() == [(["100Ms.TSLA"], T0 + 100), (["100Ms.*"], None)]


def test_a_star_channel_resumes_live_and_its_first_bar_reports_the_gap() -> None:
    r = resume("100Ms.*")
    r.connected()
    handed(r, mb("TSLA", 100, T0), mb("AAPL", 100, T0 + 200))
    r.connecting()
    assert r.subscriptions() == [(["100Ms.*"], None)]
    decision = r.bar(mb("MSFT", 100, T0 + 900))
    assert decision.verdict is Verdict.HAND_ON
    assert decision.gaps == (
        Gap(
            "100Ms.*",
            T0 + 200,
            T0 + 900,
            "a * channel resumes live after a reconnect (no since on * channels)",
        ),
    )
    assert r.bar(mb("TSLA", 100, T0 + 1000)).gaps == ()
    # a repeat of what was handed on before the reconnect is dropped (per symbol)
    assert r.bar(mb("AAPL", 100, T0 + 200)).verdict is Verdict.DROP


def test_a_channel_with_no_bar_yet_resumes_a_slack_before_the_newest_bar_seen() -> None:
    r = resume("100Ms.TSLA", "1000Ms.QUIET")
    r.connected()
    handed(r, mb("TSLA", 100, T0 + 60_000))
    assert r.subscriptions() == [
        (["100Ms.TSLA"], T0 + 60_100),
        (["1000Ms.QUIET"], T0 + 60_100 - RESUME_SLACK_MS - 1000 - 100),
    ]


def test_a_reconnect_before_any_bar_at_all_resumes_live_and_says_so_at_the_first_bar() -> None:
    r = resume("100Ms.TSLA")
    r.connected()
    assert r.subscriptions() == [(["100Ms.TSLA"], None)]
    decision = r.bar(mb("TSLA", 100, T0))
    assert decision.verdict is Verdict.HAND_ON
    assert decision.gaps == (
        Gap("100Ms.TSLA", None, T0, "no bar had arrived before the reconnect to resume from"),
    )


def test_a_since_past_the_bound_asks_for_a_backfill_up_to_the_first_bar_sent() -> None:
    r = resume("100Ms.TSLA", since=T0)
    message = "100Ms.TSLA: since reaches past the 20000 most recent bars; only those are sent"
    assert r.status({"ev": "status", "status": "error", "message": message}) is (StatusAction.NOTED)
    decision = r.bar(mb("TSLA", 100, T0 + 5000))
    assert (decision.verdict, decision.channel, decision.start, decision.end) == (
        Verdict.BACKFILL,
        Channel(100, "TSLA"),
        T0,
        T0 + 5000,
    )
    fetched = [mb("TSLA", 100, T0 + 100 * k) for k in range(50)]
    assert [e["s"] for e in r.backfilled(Channel(100, "TSLA"), reversed(fetched))] == [
        T0 + 100 * k for k in range(50)
    ]
    assert handed(r, mb("TSLA", 100, T0 + 5000)) == [T0 + 5000]


def test_a_history_cut_that_starts_before_need_needs_no_backfill() -> None:
    r = resume("100Ms.TSLA", since=T0 + 1000)
    r.status(
        {
            "ev": "status",
            "status": "error",
            "message": "100Ms.TSLA: since reaches past the 5 most recent bars",
        }
    )
    assert r.bar(mb("TSLA", 100, T0)).verdict is Verdict.DROP
    assert handed(r, mb("TSLA", 100, T0 + 1000)) == [T0 + 1000]


@pytest.mark.parametrize(
    ("event", "action"),
    [
        ({"status": "auth_failed", "message": "authentication failed"}, StatusAction.FATAL),
        ({"status": "auth_success", "message": "authenticated"}, StatusAction.AUTHENTICATED),
        ({"status": "success", "message": "subscribed to: 100Ms.TSLA"}, StatusAction.NOTED),
        ({"status": "feed_down", "message": "x", "s": 1}, StatusAction.NOTED),
        (
            {"status": "error", "message": "100Ms.TSLA: no aggregator is connected yet; try again"},
            StatusAction.RECONNECT,
        ),
        (
            {
                "status": "error",
                "message": "100Ms.TSLA: history request timed out; live bars follow",
            },
            StatusAction.RECONNECT,
        ),
        ({"status": "error", "message": "500Ms.AAPL: not ours"}, StatusAction.NOTED),
        ({"status": "error", "message": "rate limit: at most 50 frames"}, StatusAction.NOTED),
    ],
)
def test_statuses_mean_what_they_say(event: dict[str, Any], action: StatusAction) -> None:
    assert resume("100Ms.TSLA").status({"ev": "status", **event}) is action


def test_a_gap_is_told_as_a_status_event() -> None:
    assert Gap("100Ms.TSLA", 5, 9, "why").status() == {
        "ev": "status",
        "status": "gap",
        "channel": "100Ms.TSLA",
        "s": 5,
        "e": 9,
        "message": "100Ms.TSLA: bars with s in [5, 9) may be missing: why",
    }
