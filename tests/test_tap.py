"""``polyfan tap`` as a user runs it, against a PUB socket in the test."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest
import zmq

from polyfan.wire import codec
from procs import Proc, endpoint

SESSION = 0x9F3A_0000_0000_0001


@pytest.fixture
def xpub(tmp_path: Path) -> Iterator[tuple[zmq.Socket[Any], str]]:
    context: zmq.Context[Any] = zmq.Context()
    socket = context.socket(zmq.XPUB)
    socket.setsockopt(zmq.LINGER, 0)
    address = endpoint("ipc", tmp_path, "tap")
    socket.bind(address)
    yield socket, address
    socket.close(0)
    context.term()


def wait_for_subscriptions(socket: zmq.Socket[Any], count: int, timeout: float = 10.0) -> None:
    """No slow-joiner sleep: the XPUB sees each of the tap's subscriptions arrive."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"saw {seen} of {count} subscriptions"
        if socket.poll(int(remaining * 1000)) and socket.recv()[:1] == b"\x01":
            seen += 1


def json_lines(output: str) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in output.splitlines() if line.startswith("{")]


def test_tap_decodes_every_kind_and_filters_by_prefix(xpub: tuple[zmq.Socket[Any], str]) -> None:
    socket, address = xpub
    trades = np.zeros(2, codec.TRADE_DTYPE)
    trades["t"] = [1_000, 1_001]
    trades["p"] = [10.5, 10.25]
    trades["s"] = [100, 0.5]
    trades["nc"] = [0, 2]
    trades["c"][1, :2] = [14, 37]
    trades["x"] = [4, 12]
    bars = np.zeros(1, codec.BAR_DTYPE)
    bars[0] = (1_000, 10.5, 10.5, 10.25, 10.25, 100.5, math.nan, 2, codec.BAR_FLAG_CARRIED)
    clock = np.array([(1_500, 1_501)], codec.CLOCK_DTYPE)
    upstream = np.array([(codec.UPSTREAM_DOWN, 1_500, 1_502)], codec.UPSTREAM_DTYPE)
    messages = [
        codec.encode(codec.trade_topic("AAPL"), codec.Kind.TRADES, SESSION, 1, 2, trades.tobytes()),
        codec.encode(codec.trade_topic("A"), codec.Kind.TRADES, SESSION, 1, 2, trades.tobytes()),
        codec.encode(codec.bar_topic(500, "A"), codec.Kind.BARS, SESSION, 1, 1, bars.tobytes()),
        codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, SESSION, 1, 1, clock.tobytes()),
        codec.encode(codec.CONTROL_TOPIC, codec.Kind.UPSTREAM, SESSION, 2, 1, upstream.tobytes()),
        codec.encode_json(codec.CONTROL_TOPIC, codec.Kind.ANNOUNCE, SESSION, 3, {"grace": 250}),
        codec.encode_history(codec.reply_topic("ab"), SESSION, 1, 17, codec.HistoryStatus.OK, bars),
        codec.encode(codec.trade_topic("A"), codec.Kind.TRADES, SESSION, 4, 2, trades.tobytes()),
    ]
    with Proc("tap", address, "T.A", "500Ms.A", "_ctl", "_rep.", "--count", "7") as tap:
        wait_for_subscriptions(socket, 4)
        for message in messages:
            socket.send(message)
        assert tap.wait() == 0, tap.output
    lines = json_lines(tap.output)
    header = {"session": f"{SESSION:016x}"}
    expected_trades = [
        {"t": 1000, "p": 10.5, "s": 100.0, "c": [], "x": 4, "z": 0, "q": 0, "trfi": 0, "trft": 0},
        {"t": 1001, "p": 10.25, "s": 0.5, "c": [14, 37], "x": 12, "z": 0, "q": 0, "trfi": 0, "trft": 0},
    ]  # fmt: skip
    bar = {
        "ev": "MB", "o": 10.5, "h": 10.5, "l": 10.25, "c": 10.25, "v": 100.5, "vw": None,
        "n": 2, "s": 1000, "flags": codec.BAR_FLAG_CARRIED,
    }  # fmt: skip
    assert lines == [
        {"topic": "T.A", "kind": "trades", **header, "seq": 1, "sym": "A", "trades": expected_trades},
        {"topic": "500Ms.A", "kind": "bars", **header, "seq": 1,
         "bars": [{**bar, "sym": "A", "interval": 500, "e": 1500}]},
        {"topic": "_ctl", "kind": "clock", **header, "seq": 1, "clock": 1500, "wall": 1501},
        {"topic": "_ctl", "kind": "upstream", **header, "seq": 2, "state": "down", "clock": 1500,
         "wall": 1502},
        {"topic": "_ctl", "kind": "announce", **header, "seq": 3, "value": {"grace": 250}},
        {"topic": "_rep.ab", "kind": "history", **header, "seq": 1, "id": 17, "status": "OK",
         "bars": [bar]},
        {"topic": "T.A", "kind": "trades", **header, "seq": 4, "sym": "A", "trades": expected_trades},
    ]  # fmt: skip
    assert "gap on T.A: 2 messages lost before seq 4" in tap.output


def test_tap_prints_quotes_aggregates_bands_and_raw_events_as_polygon_sent_them(
    xpub: tuple[zmq.Socket[Any], str],
) -> None:
    socket, address = xpub
    quote = np.zeros(1, codec.QUOTE_DTYPE)
    quote[0] = (1_000, 7, 10.5, 10.52, 3, 4, 12, 11, 0, [604, 0, 0, 0], 3, 1, 1023, [0] * 6)
    agg = np.zeros(1, codec.AGG_DTYPE)
    agg[0] = (60_000, 120_000, 1, 3, 0.5, 2, 700, 1.9, 9_000, 1.5, 1.7, 350, 0x3FF, 0, [0] * 5)
    band = np.zeros(1, codec.LULD_DTYPE)
    band[0] = (2_000, 5, 11.0, 9.0, [21, 0, 0, 0], 2, 1, 31, [0] * 4)
    raw = b'[{"ev":"NOI","T":"A","x":10}]'
    messages = [
        codec.encode(codec.event_topic("Q", "A"), codec.Kind.QUOTES, SESSION, 1, 1, quote.tobytes()),
        codec.encode(codec.event_topic("AM", "A"), codec.Kind.AGGREGATES, SESSION, 1, 1, agg.tobytes()),
        codec.encode(codec.event_topic("LULD", "A"), codec.Kind.LULD, SESSION, 1, 1, band.tobytes()),
        codec.encode(codec.raw_topic("NOI"), codec.Kind.RAW, SESSION, 1, 1, raw),
    ]  # fmt: skip
    with Proc("tap", address, "--count", "4") as tap:
        wait_for_subscriptions(socket, len(codec.EVERYTHING_BUT_REPLIES))
        for message in messages:
            socket.send(message)
        assert tap.wait() == 0, tap.output
    header = {"session": f"{SESSION:016x}", "seq": 1}
    assert json_lines(tap.output) == [
        {"topic": "Q.A", "kind": "quotes", **header, "sym": "A", "events": [
            {"ev": "Q", "sym": "A", "bx": 12, "bp": 10.5, "bs": 3, "ax": 11, "ap": 10.52,
             "as": 4, "c": 0, "i": [604], "t": 1000, "q": 7, "z": 3}]},
        {"topic": "AM.A", "kind": "aggregates", **header, "sym": "A", "events": [
            {"ev": "AM", "sym": "A", "v": 700, "av": 9000, "op": 1.5, "vw": 1.9, "o": 1.0,
             "c": 2.0, "h": 3.0, "l": 0.5, "a": 1.7, "z": 350, "s": 60000, "e": 120000}]},
        {"topic": "LULD.A", "kind": "luld", **header, "sym": "A", "events": [
            {"ev": "LULD", "T": "A", "h": 11.0, "l": 9.0, "i": [21], "z": 2, "t": 2000,
             "q": 5}]},
        {"topic": "raw.NOI", "kind": "raw", **header,
         "events": [{"ev": "NOI", "T": "A", "x": 10}]},
    ]  # fmt: skip


def test_tap_with_no_prefix_receives_everything_but_replies_and_stops_on_ctrl_c(
    xpub: tuple[zmq.Socket[Any], str],
) -> None:
    """Everything but other peers' replies: an agg disconnects a peer that subscribes to a
    prefix of ``_rep.`` (the empty prefix included), so the tap spells "everything" without."""
    socket, address = xpub
    bar = np.zeros(1, codec.BAR_DTYPE)
    with Proc("tap", address) as tap:
        tap.wait_for("ready:")
        wait_for_subscriptions(socket, len(codec.EVERYTHING_BUT_REPLIES))
        socket.send(codec.encode_json(codec.reply_topic("x"), codec.Kind.SYMBOLS, 1, 1, {"id": 1}))
        socket.send(codec.encode_json(codec.CONTROL_TOPIC, codec.Kind.ANNOUNCE, 1, 1, {"id": 2}))
        socket.send(
            codec.encode(codec.bar_topic(500, "X"), codec.Kind.BARS, 1, 1, 1, bar.tobytes())
        )
        socket.send(codec.encode(codec.trade_topic("X"), codec.Kind.TRADES, 1, 1, 0, b""))
        tap.wait_for('"topic":"T.X"')
        assert tap.stop() == 0
    assert [line["topic"] for line in json_lines(tap.output)] == ["_ctl", "500Ms.X", "T.X"]


def test_an_endpoint_zeromq_refuses_exits_2_with_one_line_and_no_traceback() -> None:
    with Proc("tap", "tcp://localhost") as tap:  # no port
        assert tap.wait() == 2
    assert "cannot connect to tcp://localhost" in tap.output
    assert "Traceback" not in tap.output


def test_a_control_message_without_its_record_is_a_warning_not_a_crash(
    xpub: tuple[zmq.Socket[Any], str],
) -> None:
    socket, address = xpub
    clock = np.array([(1_500, 1_501)], codec.CLOCK_DTYPE)
    with Proc("tap", address, "_ctl", "--count", "2") as tap:
        wait_for_subscriptions(socket, 1)
        socket.send(codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, SESSION, 1, 0, b""))
        socket.send(
            codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, SESSION, 2, 1, clock.tobytes())
        )
        assert tap.wait() == 0, tap.output
    assert "undecodable message: CLOCK message carries 0 records, not 1" in tap.output
    assert [line["clock"] for line in json_lines(tap.output)] == [1_500]
