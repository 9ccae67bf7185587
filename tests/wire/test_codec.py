from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from polyfan.errors import WireError
from polyfan.wire import codec

symbols = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabc0123456789.:/_-", min_size=1, max_size=32)


@given(
    symbol=symbols,
    session=st.integers(0, 2**64 - 1),
    seq=st.integers(0, 2**64 - 1),
    ts=st.lists(st.integers(-(2**62), 2**62), max_size=20),
)
def test_trade_messages_round_trip(symbol: str, session: int, seq: int, ts: list[int]) -> None:
    trades = np.zeros(len(ts), dtype=codec.TRADE_DTYPE)
    trades["t"] = ts
    trades["p"] = 1.25
    trades["c"][:, 0] = 37
    trades["nc"] = 1
    frame = codec.encode(
        codec.trade_topic(symbol), codec.Kind.TRADES, session, seq, len(ts), trades.tobytes()
    )
    message = codec.decode(frame)
    assert (message.topic, message.kind, message.session, message.seq) == (
        f"T.{symbol}",
        codec.Kind.TRADES,
        session,
        seq,
    )
    assert np.array_equal(codec.records(message), trades)


def test_exact_topic_prefix_never_matches_a_longer_symbol() -> None:
    prefix = codec.subscription_prefix("T.A")
    assert codec.trade_topic("A").startswith(prefix)
    assert not codec.trade_topic("AAPL").startswith(prefix)
    assert not codec.bar_topic(500, "TSLAX").startswith(codec.subscription_prefix("500Ms.TSLA"))
    assert codec.trade_topic("AAPL").startswith(codec.subscription_prefix("T."))


def test_a_star_after_the_dot_subscribes_to_every_symbol_as_polygon_spells_it() -> None:
    assert codec.subscription_prefix("T.*") == codec.subscription_prefix("T.") == b"T."
    assert codec.subscription_prefix("500Ms.*") == b"500Ms."
    assert codec.subscription_prefix("*") == codec.subscription_prefix("") == b""


@pytest.mark.parametrize(
    ("frame", "problem"),
    [
        (b"T.A", "terminator"),
        (b"T.A\x00\x01", "shorter than its header"),
        (b"T.A\x00" + codec.HEADER.pack(9, 1, 0, 0, 0, 0), "wire version 9"),
        (b"T.A\x00" + codec.HEADER.pack(1, 99, 0, 0, 0, 0), "unknown kind 99"),
        (b"T.A\x00" + codec.HEADER.pack(1, 1, 0, 2, 0, 0) + b"x" * 56, "56 payload bytes for 2"),
    ],
)
def test_malformed_messages_raise_wire_error(frame: bytes, problem: str) -> None:
    with pytest.raises(WireError, match=problem):
        codec.decode(frame)


def test_gap_counter_counts_losses_but_not_restarts_or_late_joins() -> None:
    gaps = codec.GapCounter()
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
    bars = np.zeros(1, codec.BAR_DTYPE)
    frame = codec.encode_history(codec.reply_topic("r"), 1, 1, 7, codec.HistoryStatus.OK, bars)
    assert codec.records_from_history(codec.decode(frame))[0] == 7
    with pytest.raises(WireError, match="record count"):
        codec.records_from_history(codec.decode(frame + extra))


def test_sequencer_numbers_each_topic_and_stamps_its_session() -> None:
    sequencer = codec.Sequencer(session=77)
    topic = codec.bar_topic(500, "A")
    first = codec.decode(sequencer.encode(topic, codec.Kind.BARS, 0, b""))
    announce = codec.decode(
        sequencer.encode_json(codec.CONTROL_TOPIC, codec.Kind.ANNOUNCE, {"x": 1})
    )
    second = codec.decode(sequencer.encode(topic, codec.Kind.BARS, 0, b""))
    reply = sequencer.encode_history(
        codec.reply_topic("r"), 9, codec.HistoryStatus.OK, np.zeros(2, codec.BAR_DTYPE)
    )
    request_id, status, bars = codec.records_from_history(codec.decode(reply))
    assert [(m.topic, m.session, m.seq) for m in (first, announce, second)] == [
        ("500Ms.A", 77, 1),
        ("_ctl", 77, 1),
        ("500Ms.A", 77, 2),
    ]
    assert codec.decode_json(announce) == {"x": 1}
    assert (request_id, status, len(bars), codec.decode(reply).seq) == (
        9,
        codec.HistoryStatus.OK,
        2,
        1,
    )
