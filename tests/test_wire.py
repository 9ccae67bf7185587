from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyfan import wire
from polyfan.errors import WireError

symbols = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabc0123456789.:/_-", min_size=1, max_size=32)


@given(
    symbol=symbols,
    session=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    ts=st.lists(st.integers(-(2**62), 2**62), max_size=20),
)
def test_trade_messages_round_trip(symbol: str, session: int, seq: int, ts: list[int]) -> None:
    trades = np.zeros(len(ts), dtype=wire.TRADE_DTYPE)
    trades["t"] = ts
    trades["p"] = 1.25
    trades["c"][:, 0] = 37
    trades["nc"] = 1
    frame = wire.encode(
        wire.trade_topic(symbol), wire.Kind.TRADES, session, seq, len(ts), trades.tobytes()
    )
    message = wire.decode(frame)
    assert (message.topic, message.kind, message.session, message.seq) == (
        f"T.{symbol}",
        wire.Kind.TRADES,
        session,
        seq,
    )
    assert np.array_equal(wire.records(message), trades)


def test_exact_topic_prefix_never_matches_a_longer_symbol() -> None:
    prefix = wire.subscription_prefix("T.A")
    assert wire.trade_topic("A").startswith(prefix)
    assert not wire.trade_topic("AAPL").startswith(prefix)
    assert not wire.bar_topic(500, "TSLAX").startswith(wire.subscription_prefix("500Ms.TSLA"))
    assert wire.trade_topic("AAPL").startswith(wire.subscription_prefix("T."))


def test_a_star_after_the_dot_subscribes_to_every_symbol_as_polygon_spells_it() -> None:
    assert wire.subscription_prefix("T.*") == wire.subscription_prefix("T.") == b"T."
    assert wire.subscription_prefix("500Ms.*") == b"500Ms."
    assert wire.subscription_prefix("*") == wire.subscription_prefix("") == b""


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"T.A", "terminator"),
        (b"T.A\x00\x01", "shorter than its header"),
        (b"T.A\x00" + wire.HEADER.pack(9, 1, 0, 0, 0, 0), "wire version 9"),
        (b"T.A\x00" + wire.HEADER.pack(1, 99, 0, 0, 0, 0), "unknown kind 99"),
        (b"T.A\x00" + wire.HEADER.pack(1, 1, 0, 2, 0, 0) + b"x" * 56, "56 payload bytes for 2"),
    ],
)
def test_malformed_messages_raise_wire_error(frame: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        wire.decode(frame)


def test_gap_counter_counts_losses_but_not_restarts_or_late_joins() -> None:
    gaps = wire.GapCounter()
    assert gaps.observe("T.A", 1, 5) == 0  # joined late
    assert gaps.observe("T.A", 1, 6) == 0
    assert gaps.observe("T.A", 1, 9) == 2
    assert gaps.observe("T.A", 2, 1) == 0  # publisher restarted
    assert gaps.observe("T.B", 2, 1) == 0
    assert gaps.lost == 2


@pytest.mark.parametrize("extra", [b"x", b"x" * 64, b"x" * 65])
def test_a_history_reply_whose_payload_is_not_its_count_of_bars_raises_wire_error(
    extra: bytes,
) -> None:
    bars = np.zeros(1, wire.BAR_DTYPE)
    frame = wire.encode_history(wire.reply_topic("r"), 1, 1, 7, wire.HistoryStatus.OK, bars)
    assert wire.records_from_history(wire.decode(frame))[0] == 7
    with pytest.raises(WireError, match="record count"):
        wire.records_from_history(wire.decode(frame + extra))


def test_sequencer_numbers_each_topic_and_stamps_its_session() -> None:
    sequencer = wire.Sequencer(session=77)
    topic = wire.bar_topic(500, "A")
    first = wire.decode(sequencer.encode(topic, wire.Kind.BARS, 0, b""))
    announce = wire.decode(sequencer.encode_json(wire.CONTROL_TOPIC, wire.Kind.ANNOUNCE, {"x": 1}))
    second = wire.decode(sequencer.encode(topic, wire.Kind.BARS, 0, b""))
    reply = sequencer.encode_history(
        wire.reply_topic("r"), 9, wire.HistoryStatus.OK, np.zeros(2, wire.BAR_DTYPE)
    )
    request_id, status, bars = wire.records_from_history(wire.decode(reply))
    assert [(m.topic, m.session, m.seq) for m in (first, announce, second)] == [
        ("500Ms.A", 77, 1),
        ("_ctl", 77, 1),
        ("500Ms.A", 77, 2),
    ]
    assert wire.decode_json(announce) == {"x": 1}
    assert (request_id, status, len(bars), wire.decode(reply).seq) == (
        9,
        wire.HistoryStatus.OK,
        2,
        1,
    )
