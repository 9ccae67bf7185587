"""A scripted aggregator for the bridge tests: a real ZeroMQ XPUB speaking the agg protocol.

It runs on its own thread (one socket, one thread), announces what it serves on ``_ctl``
(every 200 ms and whenever ``_ctl`` is subscribed), records the subscriptions it sees, answers
``bars`` and ``symbols`` requests from what it published, and publishes the bars a test gives
it, storing them before publishing them as the real agg does.
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import zmq

from polyfan.wire import codec


def bar_rows(
    interval: int, start: int, count: int, *, price: float = 100.0, flags: int = 0
) -> np.ndarray:
    """``count`` consecutive bars from ``start``, with exact binary fractions for prices."""
    rows = np.zeros(count, dtype=codec.BAR_DTYPE)
    k = np.arange(count)
    rows["s"] = start + k * interval
    rows["o"] = price + k * 0.25
    rows["h"] = price + k * 0.25 + 1.5
    rows["l"] = price + k * 0.25 - 0.75
    rows["c"] = price + k * 0.25 + 0.5
    rows["v"] = 100 + k
    rows["vw"] = price + k * 0.25 + 0.125
    rows["n"] = 1 + k % 7
    rows["flags"] = flags
    return rows


def expected_event(symbol: str, interval: int, row: np.void) -> dict[str, Any]:
    """The MB event a client must receive for one row, built independently of protocol.py."""
    v = float(row["v"])
    vw = float(row["vw"])
    event: dict[str, Any] = {
        "ev": "MB",
        "sym": symbol,
        "interval": interval,
        "o": float(row["o"]),
        "h": float(row["h"]),
        "l": float(row["l"]),
        "c": float(row["c"]),
        "v": int(v) if v == int(v) else v,
        "vw": None if vw != vw else vw,
        "n": int(row["n"]),
        "s": int(row["s"]),
        "e": int(row["s"]) + interval,
    }
    if int(row["flags"]) & codec.BAR_FLAG_OUTAGE:
        event["outage"] = True
    return event


class FakeAgg:
    def __init__(
        self,
        endpoint: str,
        intervals: Sequence[int] = (100, 250, 500, 1000),
        symbols: Sequence[str] | None = None,
        announce_every: float = 0.2,
        listening_from: int | None = None,
    ) -> None:
        self.announce_every = announce_every
        self.listening_from = listening_from  # announced as "from"
        self.session = secrets.randbits(63)
        self.intervals = list(intervals)
        self.symbols = None if symbols is None else list(symbols)
        self.sequencer = codec.Sequencer(self.session)
        self.history: dict[str, list[np.ndarray]] = {}
        self.trades: dict[str, int] = {}
        self.subscriptions: list[bytes] = []  # every (un)subscribe seen, in order
        self.requests: list[dict[str, Any]] = []
        self.answer_requests = True
        self.answer_instead: dict[str, str] = {}  # channel asked -> channel answered (forged)
        self._outbox: queue.Queue[tuple[str, Any]] = queue.Queue()
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._context = zmq.Context()
        self._socket = self._context.socket(zmq.XPUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SNDHWM, 0)
        self._socket.setsockopt(zmq.XPUB_VERBOSE, 1)
        self._socket.bind(endpoint)
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    # -- test side -------------------------------------------------------------------------

    def publish(self, interval: int, symbol: str, rows: np.ndarray) -> None:
        """Store, then publish, one BARS message (from the agg thread)."""
        self._outbox.put(("bars", (interval, symbol, rows.copy())))

    def publish_raw(self, frame: bytes) -> None:
        self._outbox.put(("raw", frame))

    def set_trades(self, counts: dict[str, int]) -> None:
        self.trades = dict(counts)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until everything queued so far went out."""
        done = threading.Event()
        self._outbox.put(("flush", done))
        assert done.wait(timeout), "fake agg did not flush"

    def wait_subscribed(self, topic: bytes, timeout: float = 5.0) -> None:
        self._wait(lambda: self.is_subscribed(topic), timeout, f"subscription to {topic!r}")

    def wait_subscribed_times(self, topic: bytes, times: int, timeout: float = 5.0) -> None:
        """Wait until ``topic`` has been subscribed ``times`` times (by as many sockets)."""
        self._wait(lambda: self.subscribe_count(topic) >= times, timeout, f"{times} x {topic!r}")

    def wait_unsubscribed(self, topic: bytes, timeout: float = 5.0) -> None:
        self._wait(lambda: not self.is_subscribed(topic), timeout, f"unsubscribe of {topic!r}")

    def is_subscribed(self, topic: bytes) -> bool:
        """The last (un)subscribe seen for ``topic`` was a subscribe."""
        with self._cond:
            for message in reversed(self.subscriptions):
                if message[1:] == topic:
                    return message[0] == 1
        return False

    def subscribe_count(self, topic: bytes) -> int:
        with self._cond:
            return sum(1 for m in self.subscriptions if m == b"\x01" + topic)

    def _wait(self, predicate: Any, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"fake agg: no {what} within {timeout}s"
                self._cond.wait(min(remaining, 0.05))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._socket.close(linger=0)
        self._context.term()

    def __enter__(self) -> FakeAgg:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- agg thread ------------------------------------------------------------------------

    def _run(self) -> None:
        poller = zmq.Poller()
        poller.register(self._socket, zmq.POLLIN)
        next_announce = 0.0
        while not self._stop.is_set():
            if time.monotonic() >= next_announce:
                self._announce()
                next_announce = time.monotonic() + self.announce_every
            for _ in range(1000):
                try:
                    kind, value = self._outbox.get_nowait()
                except queue.Empty:
                    break
                if kind == "bars":
                    self._publish_bars(*value)
                elif kind == "raw":
                    self._socket.send(value)
                else:
                    value.set()
            if dict(poller.poll(5)):
                while True:
                    try:
                        message = self._socket.recv(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._upstream(message)

    def _announce(self) -> None:
        self._socket.send(
            self.sequencer.encode_json(
                codec.CONTROL_TOPIC,
                codec.Kind.ANNOUNCE,
                {
                    "session": self.session,
                    "intervals": self.intervals,
                    "symbols": self.symbols,
                    "grace": 250,
                    "history": 3_600_000,
                    "from": self.listening_from,
                },
            )
        )

    def _publish_bars(self, interval: int, symbol: str, rows: np.ndarray) -> None:
        self.history.setdefault(codec.bar_channel(interval, symbol), []).append(rows)
        topic = codec.bar_topic(interval, symbol)
        self._socket.send(self.sequencer.encode(topic, codec.Kind.BARS, len(rows), rows.tobytes()))

    def _upstream(self, message: bytes) -> None:
        if message[:1] in (b"\x00", b"\x01"):
            with self._cond:
                self.subscriptions.append(message)
                self._cond.notify_all()
            if message == b"\x01" + codec.CONTROL_TOPIC:
                self._announce()
            return
        request = codec.decode_request(message)
        with self._cond:
            self.requests.append(request)
            self._cond.notify_all()
        if not self.answer_requests:
            return
        topic = codec.reply_topic(request["reply"])
        seq = self.sequencer.next(topic)
        if request.get("op", "bars") == "symbols":
            ranked = sorted(self.trades.items(), key=lambda kv: (-kv[1], kv[0]))
            self._socket.send(
                codec.encode_json(
                    topic,
                    codec.Kind.SYMBOLS,
                    self.session,
                    seq,
                    {"id": request["id"], "symbols": [list(kv) for kv in ranked]},
                )
            )
            return
        # What a forged request gets answered with: the agg answers the request someone else
        # sent on this requester's route (for another channel) under the requester's next id.
        channel = self.answer_instead.get(request["channel"], request["channel"])
        interval_text, _, symbol = channel.partition("Ms.")
        status = codec.HistoryStatus.OK
        bars = np.zeros(0, dtype=codec.BAR_DTYPE)
        if not interval_text.isdigit() or symbol in ("", "*"):
            status = codec.HistoryStatus.BAD_REQUEST
        elif int(interval_text) not in self.intervals:
            status = codec.HistoryStatus.INTERVAL_NOT_SERVED
        elif self.symbols is not None and symbol not in self.symbols:
            status = codec.HistoryStatus.SYMBOL_NOT_SERVED
        else:
            stored = self.history.get(channel)
            if stored:
                bars = np.concatenate(stored)
                if request.get("since") is not None:
                    bars = bars[bars["s"] >= request["since"]]
                if request.get("before") is not None:
                    bars = bars[bars["s"] < request["before"]]
                if request.get("limit") is not None:
                    bars = bars[-int(request["limit"]) :] if request["limit"] else bars[:0]
        self._socket.send(
            codec.encode_history(
                topic, self.session, seq, request["id"], status, bars, codec.channel_check(channel)
            )
        )
