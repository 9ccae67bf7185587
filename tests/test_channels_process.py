"""Every stocks channel through the proxy, as a user runs it: ``polyfan sim`` (a script of
known frames, or the market with ``--record``) -> ``polyfan proxy --subscribe T.*,Q.*,...`` ->
a ZeroMQ SUB here. What the SUB receives on each topic is compared, event by event and field by
field, with what the sim sent."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import zmq

from polyfan.market import Market
from polyfan.sim import read_record
from polyfan.wire import codec, polygon
from procs import Context, Proc, endpoint, free_port, scrape
from test_proxy_process import Subscriber

KEY = "channels-key-0123456789"
TIMEOUT = 30.0
CHANNELS = "T.*,Q.*,A.*,AM.*,LULD.*,NOI.*"
TRADE_KEYS_NOT_ON_THE_WIRE = ("i", "pt", "ds")


class Collector(Subscriber):
    """A SUB socket on everything the proxy publishes, every receive bounded by a deadline."""

    def __init__(self, context: Context, address: str) -> None:
        super().__init__(context, address)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")

    def joined(self) -> bool:
        return any(m.kind is codec.Kind.CLOCK for m in self.messages)

    def events(self) -> dict[str, list[dict[str, Any]]]:
        """Every Polygon event received, by topic, in order."""
        found: dict[str, list[dict[str, Any]]] = {}
        for message in self.messages:
            if message.topic != codec.CONTROL:
                decoded = orjson.loads(orjson.dumps(polygon.encode_events_json(message)))
                found.setdefault(message.topic, []).extend(decoded)
        return found

    def count(self) -> int:
        return sum(m.count for m in self.messages if m.topic != codec.CONTROL)


def sent_events(frames: list[str]) -> dict[str, list[dict[str, Any]]]:
    """What the proxy must publish for the frames the sim sent, by topic: every valid event,
    trades without the keys the wire does not carry (``ds`` only when fractional), events of
    types the proxy does not parse as they came."""
    expected: dict[str, list[dict[str, Any]]] = {}
    for frame in frames:
        try:
            value = orjson.loads(frame)
        except orjson.JSONDecodeError:
            continue
        for event in value if isinstance(value, list) else []:
            if not isinstance(event, dict) or event.get("invalid"):
                continue
            ev = event["ev"]
            if ev == "T":
                kept = {k: v for k, v in event.items() if k not in TRADE_KEYS_NOT_ON_THE_WIRE}
                if not float(event["ds"]).is_integer():
                    kept["ds"] = event["ds"]
                event = kept
            if ev in ("T", "Q", "A", "AM", "LULD"):
                topic = f"{ev}.{event.get('sym') or event['T']}"
            else:
                topic = f"raw.{ev}"
            expected.setdefault(topic, []).append(event)
    return expected


def start_proxy(upstream: str, pub: str, metrics: int) -> Proc:
    proc = Proc(
        "proxy", "--upstream", upstream, "--pub", pub, "--metrics", f"127.0.0.1:{metrics}",
        "--subscribe", CHANNELS, env={"MASSIVE_API_KEY": KEY},
    )  # fmt: skip
    proc.wait_for("ready:")
    return proc


def stop(proc: Proc) -> None:
    assert proc.stop() == 0, proc.output


def assert_contiguous_sequences(messages: list[codec.Message]) -> None:
    """One session; on every event topic, seq 1, 2, 3 ... with no gap (the SUB joined before
    the first event; on ``_ctl`` from the first one it saw)."""
    assert len({m.session for m in messages}) == 1
    last: dict[str, int] = {}
    for message in messages:
        first = message.seq - 1 if message.topic == codec.CONTROL else 0
        assert message.seq == last.get(message.topic, first) + 1, message.topic
        last[message.topic] = message.seq


def test_every_event_of_a_known_script_arrives_on_its_topic_exactly(
    tmp_path: Path, context: Context
) -> None:
    now = int(time.time() * 1000)
    market = Market(8, seed=31)
    # two and a half minutes of market ending now: every kind, A and AM windows closed
    frames = [
        orjson.dumps(frame).decode()
        for k in range(1_500)
        for frame in market.stream(3, now - 150_000 + 100 * k, quotes_per_trade=4)
    ]
    noi = '{"ev":"NOI","T":"AAPL","t":1601318039223013600,"at":930,"a":"M","i":44,"b":25.03}'
    quote = {"ev": "Q", "sym": "AAPL", "bp": 1.5, "ap": 1.51, "t": now}
    trade = {"ev": "T", "sym": "AAPL", "x": 12, "p": 1.5, "s": 100, "t": now, "q": 7, "z": 3}
    trade["ds"] = "100.0"
    garbage = [
        # malformed quotes between good trades: rejected and counted, the trades carry on
        orjson.dumps([trade, {**quote, "bp": "cheap", "invalid": 1}, trade]).decode(),
        orjson.dumps([{**quote, "ap": -1.0, "invalid": 1}, trade]).decode(),
        orjson.dumps([{**quote, "t": now + 600_000, "invalid": 1}]).decode(),
        orjson.dumps([{"ev": "Q", "sym": "AAPL", "invalid": 1}]).decode(),
        orjson.dumps([{**quote, "i": [1, 2, 3, 4, 5], "invalid": 1}, quote]).decode(),
        # unknown types: passed on as they came, on raw.<ev>
        f"[{noi},{orjson.dumps(trade).decode()},{noi}]",
        '[{"ev":"FMV","sym":"AAPL","fmv":1.5,"t":5}]',
    ]
    script = frames[:100] + garbage + frames[100:]
    path = tmp_path / "script.txt"
    path.write_text("\n".join(script) + "\n")
    expected = sent_events(script)
    total = sum(map(len, expected.values()))

    port, metrics = free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        sub = Collector(context, pub)
        sub.receive_until(Collector.joined, TIMEOUT)
        with Proc("sim", "--listen", f"127.0.0.1:{port}", "--script", str(path)) as sim:
            sim.wait_for("ready:")
            sub.receive_until(lambda s: s.count() >= total, TIMEOUT)
            stop(sim)
        values = scrape(metrics)
        proxy.wait_for("skipped malformed upstream input")
        stop(proxy)

    received = sub.events()
    assert set(received) == set(expected)
    for topic, sent in expected.items():
        assert received[topic] == sent, topic
    assert {topic.split(".")[0] for topic in expected} == {"T", "Q", "A", "AM", "LULD", "raw"}
    assert_contiguous_sequences(sub.messages)
    kinds = {m.topic: m.kind for m in sub.messages}
    assert kinds["Q.AAPL"] is codec.Kind.QUOTES and kinds["AM.AAPL"] is codec.Kind.AGGREGATES
    assert kinds["LULD.AAPL"] is codec.Kind.LULD and kinds["raw.NOI"] is codec.Kind.RAW
    raw = b"".join(bytes(m.payload) for m in sub.messages if m.topic == "raw.NOI")
    assert raw == f"[{noi},{noi}]".encode()  # byte for byte

    def count(label: str) -> int:
        return sum(len(v) for k, v in expected.items() if k.split(".")[0] == label)

    for label in ("T", "Q", "A", "AM", "LULD"):
        assert values[f'polyfan_proxy_events_total{{kind="{label}"}}'] == count(label)
    assert values['polyfan_proxy_events_total{kind="raw"}'] == 3
    assert values['polyfan_proxy_raw_events_total{ev="NOI"}'] == 2
    assert values['polyfan_proxy_raw_events_total{ev="FMV"}'] == 1
    assert values["polyfan_proxy_unknown_events_total"] == 3
    assert values['polyfan_proxy_rejected_events_total{kind="Q"}'] == 5
    assert values["polyfan_proxy_bad_messages_total"] == 5
    assert values["polyfan_proxy_trades_total"] == count("T")


def test_the_sims_market_on_every_channel_reaches_subscribers_whole(
    tmp_path: Path, context: Context
) -> None:
    """The live market stream (trades, 10 quotes per trade, bands, aggregates) against the
    sim's own record of every frame it sent."""
    port, metrics = free_port(), free_port()
    pub = endpoint("tcp", tmp_path, "proxy")
    record = tmp_path / "sent.jsonl"
    with start_proxy(f"ws://127.0.0.1:{port}/stocks", pub, metrics) as proxy:
        sub = Collector(context, pub)
        sub.receive_until(Collector.joined, TIMEOUT)
        with Proc(
            "sim", "--listen", f"127.0.0.1:{port}", "--symbols", "A,AA,AAPL,BRK.A,TSLA",
            "--rate", "1000", "--seed", "5", "--record", str(record),
        ) as sim:  # fmt: skip
            sim.wait_for("ready:")
            sub.receive_until(
                lambda s: (
                    any(m.kind is codec.Kind.AGGREGATES for m in s.messages) and s.count() >= 20_000
                ),
                TIMEOUT,
            )
            stop(sim)
        expected = sent_events([frame for _, frame in read_record(record)])
        total = sum(map(len, expected.values()))
        sub.receive_until(lambda s: s.count() >= total, TIMEOUT)
        values = scrape(metrics)
        stop(proxy)
    received = sub.events()
    assert set(received) == set(expected)
    for topic, sent in expected.items():
        assert received[topic] == sent, topic
    assert_contiguous_sequences(sub.messages)
    quotes = sum(len(v) for k, v in expected.items() if k.startswith("Q."))
    trades = sum(len(v) for k, v in expected.items() if k.startswith("T."))
    assert 9 * trades <= quotes <= 11 * trades
    assert values["polyfan_proxy_bad_messages_total"] == 0
