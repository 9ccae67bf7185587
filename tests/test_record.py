"""``polyfan record`` as a user runs it: ``polyfan sim`` -> ``polyfan proxy`` -> ``polyfan
record``, real processes, with a SUB of the test's own on the proxy that sees every message the
recorder sees (with the time it arrived).

- The Parquet files hold exactly what the sim sent, every column the wire lets a recorder
  derive, partitioned by the trades' UTC date; each trade is readable within ``--flush``.
- ``kill -9`` mid-stream, then a restart: the files hold every message that arrived before the
  kill minus at most ``--flush``; what is missing is one run of messages per topic, and the
  restarted recorder names each topic with exactly that count (and the window, from the feed
  clock).
"""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import zmq

from polyfan.feed import recording
from polyfan.sim import read_record
from polyfan.wire import codec
from procs import Context, Proc, endpoint, free_port, scrape

SYMBOLS = "A,AA,AAPL,BRK.A,TSLA,MSFT"
TIMEOUT = 30.0


@dataclass
class Arrival:
    at: float  # time.monotonic() when the test's SUB took it
    message: codec.Message


class Tap:
    """A SUB on the proxy: every message, with when it arrived."""

    def __init__(self, ctx: Context, address: str) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.setsockopt(zmq.SUBSCRIBE, b"T.")
        self.sock.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
        self.sock.connect(address)
        self.arrivals: list[Arrival] = []

    def pump(self, timeout: float = 0.02) -> None:
        if self.sock.poll(int(timeout * 1000)):
            while True:
                try:
                    frame = self.sock.recv(zmq.NOBLOCK)
                except zmq.Again:
                    return
                self.arrivals.append(Arrival(time.monotonic(), codec.decode(frame)))

    def until(self, condition: Callable[[], object], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.pump()

    def trade_messages(self) -> list[Arrival]:
        return [a for a in self.arrivals if a.message.kind is codec.Kind.TRADES]

    def trade_count(self) -> int:
        return sum(a.message.count for a in self.trade_messages())

    def upstream_down(self) -> bool:
        return any(
            a.message.kind is codec.Kind.UPSTREAM
            and codec.records(a.message)["state"][0] == codec.UPSTREAM_DOWN
            for a in self.arrivals
        )


def sent_events(record: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trade event the sim sent, per symbol, in order (its ``--record``)."""
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for _, frame in read_record(record):
        for event in orjson.loads(frame):
            if event.get("ev") == "T":
                by_symbol.setdefault(event["sym"], []).append(event)
    return by_symbol


def recorded(out: Path) -> pa.Table:
    """Everything in the recording, files in name order (the order their data arrived)."""
    paths = sorted(out.glob("trades/date=*/part-*.parquet"), key=lambda p: p.name)
    tables = [pq.read_table(p).append_column("date", pa.array([p.parent.name[5:]] * pq.read_metadata(p).num_rows)) for p in paths]  # fmt: skip
    if not tables:
        return pa.table({"ticker": pa.array([], pa.string())})
    return pa.concat_tables([t.replace_schema_metadata(None) for t in tables])


def recorded_by_symbol(out: Path) -> dict[str, list[dict[str, Any]]]:
    by_symbol: dict[str, list[dict[str, Any]]] = {}
    for row in recorded(out).to_pylist():
        by_symbol.setdefault(row["ticker"], []).append(row)
    return by_symbol


def start_proxy(sim_port: int, pub: str, metrics: int) -> Proc:
    proc = Proc(
        "proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub", pub,
        "--metrics", f"127.0.0.1:{metrics}", env={"MASSIVE_API_KEY": "record-test-key"},
    )  # fmt: skip
    proc.wait_for("ready:", 60)
    return proc


def start_record(pub: str, out: Path, metrics: int, *extra: str) -> Proc:
    proc = Proc(
        "record", "--sub", pub, "--out", str(out), "--metrics", f"127.0.0.1:{metrics}", *extra
    )
    proc.wait_for("ready:", 60)
    deadline = time.monotonic() + TIMEOUT
    # joined once the proxy's clock (10 a second) reaches it
    while scrape(metrics)["polyfan_record_messages_total"] == 0:
        assert time.monotonic() < deadline, f"the recorder hears nothing:\n{proc.output}"
        time.sleep(0.05)
    return proc


def wait_written(metrics: int, count: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while scrape(metrics)["polyfan_record_trades_written_total"] < count:
        assert time.monotonic() < deadline, "the recorder did not write everything"
        time.sleep(0.05)


def test_the_files_hold_exactly_what_the_sim_sent_each_readable_within_the_flush(
    tmp_path: Path, context: Context
) -> None:
    sim_port, proxy_metrics, record_metrics = free_port(), free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    out, sent = tmp_path / "rec", tmp_path / "sent.jsonl"
    flush_s = 0.5
    with (
        start_proxy(sim_port, pub, proxy_metrics) as proxy,
        start_record(pub, out, record_metrics, "--flush", "500ms") as record,
    ):
        tap = Tap(context, pub)
        tap.until(lambda: tap.arrivals, "the proxy's clock")
        with Proc(
            "sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", SYMBOLS, "--rate", "3000",
            "--seed", "7", "--record", str(sent),
        ) as sim:  # fmt: skip
            sim.wait_for("ready:", 60)
            # readable within --flush: a message's trades are in the files soon after it arrived
            delays = []
            for _ in range(3):
                tap.until(lambda: tap.trade_count() > 0, "trades")
                probe = tap.trade_messages()[-1]
                symbol = probe.message.topic[2:]
                q = int(codec.records(probe.message)["q"][-1])
                while not any(
                    row["sequence_number"] == q for row in recorded_by_symbol(out).get(symbol, [])
                ):
                    assert time.monotonic() - probe.at < 5, "a trade is not readable"
                    tap.pump(0.01)
                delays.append(time.monotonic() - probe.at)
            tap.until(lambda: tap.trade_count() >= 6_000, "6,000 trades")
            assert sim.stop() == 0
        tap.until(tap.upstream_down, "the proxy's upstream down")
        total = scrape(proxy_metrics)["polyfan_proxy_trades_total"]
        assert tap.trade_count() == total
        wait_written(record_metrics, int(total))
        counts = scrape(record_metrics)
        assert record.stop() == 0
        assert proxy.stop() == 0
    # the reading itself takes a little; a part is written at most flush_s after its trades came
    assert max(delays) < flush_s + 0.5, delays
    assert counts["polyfan_record_trades_received_total"] == total
    assert counts["polyfan_record_gaps_total"] == 0
    assert counts["polyfan_record_write_errors_total"] == 0
    warnings = [line for line in record.output.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "upstream went down" in warnings[0], record.output

    events, rows = sent_events(sent), recorded_by_symbol(out)
    assert set(rows) == set(events)
    assert sum(len(r) for r in rows.values()) == total
    for symbol, sent_trades in events.items():
        got = rows[symbol]
        want = [
            {
                "ticker": symbol,
                "conditions": e.get("c", []),
                "correction": 0,
                "exchange": e["x"],
                "id": None,  # the wire carries no trade id
                "participant_timestamp": None,  # nor pt
                "price": e["p"],
                "sequence_number": e["q"],
                "sip_timestamp": e["t"] * 1_000_000,
                "size": float(e["ds"]),
                "tape": e["z"],
                "trf_id": e.get("trfi"),
                "trf_timestamp": e["trft"] * 1_000_000 if "trft" in e else None,
                "date": time.strftime("%Y-%m-%d", time.gmtime(e["t"] // 1000)),
            }
            for e in sent_trades
        ]
        assert got == want, symbol
    schema = pq.read_schema(next(out.glob("trades/date=*/part-*.parquet")))
    assert [(f.name, str(f.type)) for f in schema] == [
        ("ticker", "string"), ("conditions", "list<element: int32>"), ("correction", "int32"),
        ("exchange", "int32"), ("id", "string"), ("participant_timestamp", "int64"),
        ("price", "double"), ("sequence_number", "int64"), ("sip_timestamp", "int64"),
        ("size", "double"), ("tape", "int32"), ("trf_id", "int32"), ("trf_timestamp", "int64"),
    ]  # fmt: skip


_MISSING = re.compile(r"missing from the recording, [^:]*: (.*) \(\d+ topics, \d+ messages\)")


def logged_missing(output: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for match in _MISSING.finditer(output):
        for item in match.group(1).split(", "):
            topic, count = item.rsplit(" ", 1)
            counts[topic.removeprefix("T.")] = counts.get(topic.removeprefix("T."), 0) + int(count)
    return counts


def test_kill_9_loses_at_most_the_flush_and_the_restart_names_what_is_missing(
    tmp_path: Path, context: Context
) -> None:
    sim_port, proxy_metrics, record_metrics = free_port(), free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    out = tmp_path / "rec"
    flush_s = 1.0  # the default
    with start_proxy(sim_port, pub, proxy_metrics) as proxy:
        tap = Tap(context, pub)
        tap.until(lambda: tap.arrivals, "the proxy's clock")
        with start_record(pub, out, record_metrics) as first, Proc(
            "sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", SYMBOLS, "--rate",
            "3000", "--seed", "8",
        ) as sim:  # fmt: skip
            sim.wait_for("ready:", 60)
            tap.until(lambda: tap.trade_count() >= 8_000, "8,000 trades")
            first.popen.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            first.wait()
            tap.pump(0)
            with start_record(pub, out, record_metrics) as second:
                second.wait_for("the recorder was down", TIMEOUT)
                second.wait_for("missing from the recording", TIMEOUT)
                seen = tap.trade_count()
                tap.until(lambda: tap.trade_count() >= seen + 3_000, "3,000 more trades")
                assert sim.stop() == 0
                tap.until(tap.upstream_down, "the proxy's upstream down")
                deadline = time.monotonic() + TIMEOUT
                while scrape(record_metrics)["polyfan_record_buffered_trades"] > 0 or (
                    scrape(record_metrics)["polyfan_record_trades_written_total"]
                    < scrape(record_metrics)["polyfan_record_trades_received_total"]
                ):
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
                gaps = scrape(record_metrics)["polyfan_record_gaps_total"]
                assert second.stop() == 0
        assert proxy.stop() == 0

    on_disk: dict[str, set[int]] = {}
    for symbol, rows in recorded_by_symbol(out).items():
        on_disk[symbol] = {row["sequence_number"] for row in rows}
        assert len(on_disk[symbol]) == len(rows), "a trade written twice"
    missing: dict[str, list[Arrival]] = {}
    for arrival in tap.trade_messages():
        symbol = arrival.message.topic[2:]
        qs = {int(q) for q in codec.records(arrival.message)["q"]}
        held = qs & on_disk.get(symbol, set())
        assert held in (set(), qs), "a message partly written"
        if not held:
            missing.setdefault(symbol, []).append(arrival)
    assert missing, "the kill lost nothing: it did not land mid-stream"
    for symbol, arrivals in missing.items():
        # one run of messages per topic, from the last flush before the kill to the restart
        seqs = [a.message.seq for a in arrivals]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), symbol
        # lost: only what arrived since the last flush before the kill (and while it was down)
        earliest = min(a.at for a in arrivals)
        assert earliest >= killed_at - flush_s - 0.3, (symbol, killed_at - earliest)
    # and the restart named every topic with exactly its count
    assert logged_missing(second.output) == {s: len(a) for s, a in missing.items()}
    assert gaps == sum(len(a) for a in missing.values())
    window = re.search(r"the files end at feed clock (\S+) and the proxy", second.output)
    assert window is not None, second.output


def test_a_part_that_cannot_be_written_is_said_counted_and_retried_until_it_is(
    tmp_path: Path, context: Context
) -> None:
    sim_port, proxy_metrics, record_metrics = free_port(), free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    out, sent = tmp_path / "rec", tmp_path / "sent.jsonl"
    # a file where today's date directory must go: every write fails until it is removed
    blocker = out / "trades" / time.strftime("date=%Y-%m-%d", time.gmtime())
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")
    with (
        start_proxy(sim_port, pub, proxy_metrics) as proxy,
        start_record(pub, out, record_metrics, "--flush", "200ms") as record,
    ):
        tap = Tap(context, pub)
        tap.until(lambda: tap.arrivals, "the proxy's clock")
        with Proc(
            "sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", SYMBOLS, "--rate", "2000",
            "--seed", "9", "--record", str(sent),
        ) as sim:  # fmt: skip
            sim.wait_for("ready:", 60)
            record.wait_for(r"ERROR polyfan.record: cannot write part 1 \(\d+ trades\): ")
            deadline = time.monotonic() + TIMEOUT
            while scrape(record_metrics)["polyfan_record_write_errors_total"] < 2:
                assert time.monotonic() < deadline, "no retry"
                tap.pump(0.05)
            assert scrape(record_metrics)["polyfan_record_trades_written_total"] == 0
            blocker.unlink()
            tap.until(lambda: tap.trade_count() >= 4_000, "4,000 trades")
            assert sim.stop() == 0
        tap.until(tap.upstream_down, "the proxy's upstream down")
        total = scrape(proxy_metrics)["polyfan_proxy_trades_total"]
        wait_written(record_metrics, int(total))
        counts = scrape(record_metrics)
        assert record.stop() == 0
        assert proxy.stop() == 0
    assert counts["polyfan_record_gaps_total"] == 0
    assert counts["polyfan_record_dropped_trades_total"] == 0
    rows = recorded_by_symbol(out)
    events = sent_events(sent)
    assert {s: [r["sequence_number"] for r in v] for s, v in rows.items()} == {
        s: [e["q"] for e in v] for s, v in events.items()
    }


def test_a_proxy_restart_is_said_with_its_window_and_counted(
    tmp_path: Path, context: Context
) -> None:
    sim_port, proxy_metrics, record_metrics = free_port(), free_port(), free_port()
    pub = endpoint("ipc", tmp_path, "proxy")
    out = tmp_path / "rec"
    with Proc(
        "sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", SYMBOLS, "--rate", "2000",
        "--seed", "10",
    ) as sim:  # fmt: skip
        sim.wait_for("ready:", 60)
        with (
            start_proxy(sim_port, pub, proxy_metrics) as first,
            start_record(pub, out, record_metrics, "--compact", "0ms") as record,
        ):
            deadline = time.monotonic() + TIMEOUT
            while scrape(record_metrics)["polyfan_record_trades_written_total"] < 1_000:
                assert time.monotonic() < deadline, "nothing written"
                time.sleep(0.05)
            assert first.stop() == 0
            with start_proxy(sim_port, pub, proxy_metrics) as second:
                line = record.wait_for(
                    r"the proxy restarted \(session ([0-9a-f]{16}) -> ([0-9a-f]{16})\): "
                    r"trades between feed clock (\S+) and (\S+) may be missing",
                    TIMEOUT,
                )
                assert line.group(1) != line.group(2)
                assert line.group(3) < line.group(4)  # ISO 8601 UTC sorts as time
                assert scrape(record_metrics)["polyfan_record_publisher_restarts_total"] == 1
                assert scrape(record_metrics)["polyfan_record_gaps_total"] == 0
                assert record.stop() == 0
                assert second.stop() == 0
        assert sim.stop() == 0
    sessions = {
        recording.read_metadata(pq.read_metadata(p).metadata).session  # type: ignore[union-attr]
        for p in out.glob("trades/date=*/part-*.parquet")
    }
    assert len(sessions) == 2  # one session per part: the part closed at the restart
