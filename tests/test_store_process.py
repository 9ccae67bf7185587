"""``polyfan agg --store`` as a user runs it: a real agg from the CLI, killed with SIGKILL and
restarted on the same store, fed by a publisher that speaks the proxy's wire; bars compared
with what the first agg published and with the reference (docs/store.md)."""

from __future__ import annotations

import dataclasses
import json
import random
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from polyfan.bars import segments
from polyfan.wire import codec
from procs import Context, Proc, endpoint, free_port, scrape
from reference import OUTAGE, Bar, Clock, Trades, bar_from_record, reference_bars
from test_agg_process import (
    GRACE,
    INTERVALS,
    SYMBOLS,
    AggOutput,
    FakeProxy,
    Requester,
    agg_args,
    agg_endpoints,
    assert_exact,
    random_events,
)
from test_outages_process import healthy
from wsclient import Client, eventually

FLUSH_MS = 200


def stored_history(ask: Requester, symbol: str, interval: int, **bounds: int) -> list[Bar]:
    request = {"id": 7, "channel": f"{interval}Ms.{symbol}", "limit": 20_000, **bounds}
    request_id, status, bars = codec.records_from_history(ask.ask(request))
    assert (request_id, status) == (7, codec.HistoryStatus.OK)
    return [bar_from_record(b) for b in bars]


def start_agg(
    ctx: Context, proxy_pub: str, agg_pub: str, port: int, *extra: str
) -> tuple[Proc, AggOutput]:
    agg = Proc(*agg_args(proxy_pub, agg_pub, port, *extra))
    agg.wait_for("ready:")
    output = AggOutput(ctx, agg_pub)
    output.pump_until(lambda: output.announces, what="announce")
    return agg, output


class Feeder:
    """Publishes events on the fake proxy from its own thread (the test's thread never touches
    that socket meanwhile), a chunk every ``pause`` seconds, until told to stop: the agg is
    killed while trades still arrive."""

    def __init__(self, fake: FakeProxy, events: list[Clock | Trades], chunk: int, pause: float):
        self.fake = fake
        self.events = events
        self.chunk = chunk
        self.pause = pause
        self.sent = 0  # events published so far
        self.started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while self.sent < len(self.events) and not self._stop.is_set():
            chunk = self.events[self.sent : self.sent + self.chunk]
            self.fake.publish(chunk)
            self.sent += len(chunk)
            self._stop.wait(self.pause)  # the feed's pace, not a wait for anything

    def stop(self) -> list[Clock | Trades]:
        """Stop publishing; the events published, in order."""
        self._stop.set()
        self._thread.join(10)
        assert not self._thread.is_alive()
        return self.events[: self.sent]

    def pace(self) -> float:
        """Feed-clock milliseconds published per wall-clock millisecond."""
        clocks = [e.clock for e in self.events[: self.sent] if isinstance(e, Clock)]
        elapsed = (time.monotonic() - self.started) * 1000
        return (clocks[-1] - clocks[0]) / elapsed if len(clocks) > 1 and elapsed > 0 else 0.0


def event_clock(event: Clock | Trades) -> int:
    """The feed clock an event says: a CLOCK's value, a trade's time."""
    return event.clock if isinstance(event, Clock) else event.trades[0].t


class Heartbeat:
    """The fake proxy's CLOCK, repeated every 100 ms from a thread as a real proxy relays it
    (an agg that hears nothing for 2 s reports an outage): the test's thread uses ``fake``
    only through :meth:`publish` and :meth:`probe`, which hold the same lock."""

    def __init__(self, fake: FakeProxy) -> None:
        self.fake = fake
        self.clock = 0
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            with self.lock:
                self.fake.clock(self.clock)

    def publish(self, events: list[Clock | Trades]) -> None:
        with self.lock:
            self.fake.publish(events)
            self.clock = max([self.clock, *(e.clock for e in events if isinstance(e, Clock))])

    def probe(self, output: AggOutput, clock: int) -> None:
        with self.lock:
            self.fake.probe(output, clock)
            self.clock = max(self.clock, clock)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def closed_by(
    bars: dict[tuple[str, int], list[Bar]], clock: int
) -> dict[tuple[str, int], list[Bar]]:
    """The bars among ``bars`` that the feed clock ``clock`` closes (s + interval + grace)."""
    closed = {
        key: [b for b in series if b.s + key[1] + GRACE <= clock] for key, series in bars.items()
    }
    return {key: series for key, series in closed.items() if series}


def assert_same_bar(got: Bar, want: Bar, key: object) -> None:
    """Every field exactly; v and vw to 1e-12 relative (the reference sums in another order)."""
    assert (got.s, got.o, got.h, got.l, got.c, got.n, got.flags) == (
        want.s, want.o, want.h, want.l, want.c, want.n, want.flags,
    ), (key, got, want)  # fmt: skip
    assert got.v == pytest.approx(want.v, rel=1e-12), (key, got, want)
    assert (got.vw is None) == (want.vw is None), (key, got, want)
    if want.vw is not None:
        assert got.vw == pytest.approx(want.vw, rel=1e-12), (key, got, want)


def test_kill_9_mid_stream_then_restart_serves_every_durable_bar_once(
    tmp_path: Path, context: Context
) -> None:
    """The agg says what is durable (``polyfan_agg_store_durable_until``, the feed clock of its
    last synced flush); read just before a ``kill -9`` while trades still arrive, every bar
    closed by that clock is served after the restart, each once, equal to the reference. How
    much was lost beyond it is printed, not asserted (a timing)."""
    rng = random.Random(13)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    store = ("--store", str(tmp_path / "store"), "--flush", f"{FLUSH_MS}ms")
    fake = FakeProxy(context, proxy_pub, session=21)
    events = random_events(rng, 100_000, 180_000, 12_000)
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *store)
    fake.probe(output, 0)
    feeder = Feeder(fake, events, chunk=30, pause=0.02)  # feed time ~10x faster than wall
    try:
        deadline = time.monotonic() + 60
        while scrape(port)["polyfan_agg_store_durable_until"] < 130_000:
            assert time.monotonic() < deadline, "nothing durable past 130,000 in 60 s"
            output.pump(0.05)
        end = time.monotonic() + random.uniform(0, 2 * FLUSH_MS / 1000)  # any moment of a flush
        while time.monotonic() < end:
            output.pump(0.01)
        durable = int(scrape(port)["polyfan_agg_store_durable_until"])
        agg.popen.kill()  # SIGKILL mid-stream: no flush, no goodbye
    finally:
        sent = feeder.stop()
    agg.wait()
    pace = feeder.pace()
    while output.pump(0.2):  # what it published before it died
        pass
    first = output.announces[-1]["session"]
    last_clock = output.clock
    assert last_clock is not None and last_clock >= durable
    published = {key: list(bars) for key, bars in output.bars.items()}
    # the reference over everything sent: a bar the agg closed had every trade it gets (later
    # ones are late), whether or not the agg received what came after
    reference = reference_bars(sent, INTERVALS, GRACE).bars
    for key, bars in published.items():  # what the first agg published is the reference's
        by_start = {b.s: b for b in reference[key]}
        for bar in bars:
            assert_same_bar(bar, by_start[bar.s], key)
    must = closed_by(reference, durable)
    assert sum(map(len, must.values())) > 1_000

    agg, output = start_agg(context, proxy_pub, agg_pub, port, *store)
    try:
        announce = output.announces[-1]
        assert announce["session"] != first
        stored = announce["stored"]
        assert isinstance(stored, dict) and isinstance(stored["to"], int)
        stored_to = stored["to"]
        assert durable <= stored_to <= last_clock
        ask = Requester(context, agg_pub)
        served_all: dict[tuple[str, int], list[Bar]] = {}
        for symbol in SYMBOLS:
            for interval in INTERVALS:
                key = (symbol, interval)
                served = stored_history(ask, symbol, interval)
                starts = [b.s for b in served]
                assert starts == sorted(set(starts)), key  # none twice, in order
                ref = {b.s: b for b in reference.get(key, [])}
                mine = {b.s: b for b in published.get(key, [])}
                for bar in served:
                    assert bar.s in ref, (key, bar, "served, never closed")
                    assert_same_bar(bar, ref[bar.s], key)
                    if bar.s in mine:
                        assert bar == mine[bar.s], key  # bit for bit what was published
                # every bar closed by the durable clock; none the agg had not closed
                assert set(starts) >= {b.s for b in must.get(key, [])}, key
                assert set(starts) <= {b.s for b in closed_by(reference, stored_to).get(key, [])}
                if served:
                    served_all[key] = served
        assert stored["from"] == min(bars[0].s for bars in served_all.values())

        # how much a kill -9 lost: printed (pytest -s), a timing, not asserted
        lost = [
            (key, b)
            for key, bars in published.items()
            for b in bars
            if b.s not in {x.s for x in served_all.get(key, [])}
        ]
        print(
            f"\nkill -9 with --flush {FLUSH_MS}ms, feed clock at {pace:.1f}x wall time: "
            f"durable_until read {durable}, stored_to {stored_to}, last clock relayed "
            f"{last_clock}: {last_clock - stored_to} ms of feed clock lost "
            f"(~{(last_clock - stored_to) / max(pace, 1e-9):.0f} ms of wall time), "
            f"{len(lost)} of {sum(map(len, published.values()))} published bars not kept"
        )

        # the stream goes on: history joins the disk's bars and the new ones, once each
        second = random_events(rng, 250_000, 260_000, 1_500)
        fake.probe(output, 250_000)
        fake.publish(second)
        fake.probe(output, 270_000)
        for symbol in SYMBOLS[:6]:
            for interval in INTERVALS:
                key = (symbol, interval)
                served = stored_history(ask, symbol, interval)
                starts = [b.s for b in served]
                assert starts == sorted(set(starts))
                new = output.bars.get(key, [])
                assert [b for b in served if b.s >= 250_000 - interval] == new
                assert [b for b in served if b.s < 250_000 - interval] == served_all.get(key, [])
                since = stored_history(ask, symbol, interval, since=120_000, before=255_000)
                assert since == [b for b in served if 120_000 <= b.s < 255_000]
        assert agg.stop() == 0
    finally:
        agg.stop()
        fake.close()


def test_bars_older_than_history_come_from_disk_retain_deletes_and_a_cut_tail_is_skipped(
    tmp_path: Path, context: Context
) -> None:
    rng = random.Random(5)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    directory = tmp_path / "store"
    # memory holds 5 s of bars; logs are sealed every 1.875 s of feed clock; disk keeps 20 s
    flags = ("--store", str(directory), "--flush", "100ms", "--history", "5s", "--retain", "20s")
    fake = FakeProxy(context, proxy_pub, session=31)
    events = random_events(rng, 100_000, 140_000, 4_000)
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *flags)
    try:
        fake.probe(output, 0)
        for at in range(0, len(events), 200):  # ~1 s of feed clock per flush (100 ms)
            fake.publish(events[at : at + 200])
            end = time.monotonic() + 0.12
            while time.monotonic() < end:
                output.pump(0.01)
        fake.probe(output, 141_000)
        ask = Requester(context, agg_pub)
        expected = reference_bars([*events, Clock(141_000)], INTERVALS, GRACE).bars
        cutoff = 141_000 - 20_000

        def settled() -> bool:  # every bar flushed, and the retention applied on a roll
            values = scrape(port)
            return values["polyfan_agg_store_bars_written_total"] == values[
                "polyfan_agg_bars_total"
            ] and all(
                _newest(path) >= cutoff for path in sorted((directory / "seg").glob("*.bars"))[:-1]
            )

        fake.probe(output, 141_000)
        deadline = time.monotonic() + 20
        while not settled():
            assert time.monotonic() < deadline, "the store never caught up"
            fake.probe(output, 141_000)
        for symbol in SYMBOLS[:8]:
            for interval in INTERVALS:
                served = stored_history(ask, symbol, interval)
                published = output.bars.get((symbol, interval), [])
                key = (symbol, interval)
                assert_exact({key: published}, {key: expected.get(key, [])})
                # far older than --history, from disk; back to the retention at least
                kept = [b for b in published if b.s >= cutoff]
                assert served[-len(kept) :] == kept if kept else True, (
                    [b.s for b in served][-60:],
                    [b.s for b in kept],
                    sorted(p.name for p in (directory / "seg").glob("*")),
                    sorted(p.name for p in (directory / "wal").glob("*")),
                )
                assert served == published[len(published) - len(served) :]
                assert served and served[0].s < 136_000  # older than the memory's 5 s
        oldest = min(_oldest(path) for path in (directory / "seg").glob("*.bars"))
        assert oldest > 100_000  # the first segments went
        assert agg.stop() == 0  # the open log stays, to be sealed by the next start
    finally:
        agg.stop()
    first_published = output.bars
    logs = sorted((directory / "wal").glob("*.log"))
    assert logs, "no open log left by the stop"
    whole = logs[-1].read_bytes()
    logs[-1].write_bytes(whole + whole[:40])  # a frame cut short, as a crash mid-write leaves
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *flags)
    try:
        agg.wait_for("bytes after them cut")
        assert "40 bytes after them cut (a frame cut short" in agg.output
        ask = Requester(context, agg_pub)
        for symbol in SYMBOLS[:4]:
            published = first_published.get((symbol, 1_000), [])
            served = stored_history(ask, symbol, 1_000, since=cutoff)
            assert served == [b for b in published if b.s >= cutoff][-len(served) :]
            assert served[-1] == published[-1]
        assert agg.stop() == 0
    finally:
        agg.stop()
        fake.close()


def _oldest(path: Path) -> int:
    return int(path.stem.split("-")[0])


def _newest(path: Path) -> int:
    return segments.Segment(np.fromfile(path, dtype=np.uint8)).newest


def test_a_quiet_store_still_deletes_what_is_past_retain(tmp_path: Path, context: Context) -> None:
    """Bars stop; the feed clock goes on. No log is sealed any more (the open one holds no
    bar), yet the segments past --retain go, on the writer's timer; the newest stays."""
    rng = random.Random(7)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    directory = tmp_path / "store"
    flags = ("--store", str(directory), "--flush", "100ms", "--history", "5s", "--retain", "20s")
    fake = FakeProxy(context, proxy_pub, session=41)
    events = random_events(rng, 100_000, 110_000, 1_000)
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *flags)
    try:
        fake.probe(output, 0)
        for second in range(100_000, 110_000, 1_000):  # a flush a second of feed clock at most:
            chunk = [e for e in events if second <= event_clock(e) < second + 1_000]
            fake.publish(chunk)  # logs are sealed every 1,875 ms of it (--history 5s)
            fake.probe(output, second + 999)
            deadline = time.monotonic() + 20
            while scrape(port)["polyfan_agg_store_durable_until"] < second + 999:
                assert time.monotonic() < deadline, "no flush"
                output.pump(0.01)
        for clock in range(110_000, 114_001, 500):  # no more trades: the last logs are sealed
            fake.probe(output, clock)

        def logs_hold_no_bar() -> bool:
            values = scrape(port)
            return values["polyfan_agg_store_bars_written_total"] == values[
                "polyfan_agg_bars_total"
            ] and all(
                len(segments.decode_log(path.read_bytes()).bars) == 0
                for path in (directory / "wal").glob("*.log")
            )

        deadline = time.monotonic() + 20
        while not logs_hold_no_bar():
            assert time.monotonic() < deadline, "the last bars were never sealed"
            fake.probe(output, 114_000)
        kept = sorted((directory / "seg").glob("*.bars"))
        assert len(kept) >= 4, [p.name for p in kept]  # none past --retain yet
        fake.probe(output, 300_000)  # quiet for over --retain: everything but the newest goes
        deadline = time.monotonic() + 20
        while len(list((directory / "seg").glob("*.bars"))) > 1:
            assert time.monotonic() < deadline, "the retention never ran"
            time.sleep(0.05)
        assert sorted((directory / "seg").glob("*.bars")) == kept[-1:]
        agg.wait_for("segments older than the retention deleted")
        assert scrape(port)["polyfan_agg_store_segments"] == 1
        assert agg.stop() == 0
    finally:
        agg.stop()
        fake.close()


def bar_from_event(event: dict[str, object]) -> Bar:
    """A bridge's MB event as a :class:`Bar` (the reference's CARRIED flag is not on the
    JSON: compare ``flags & OUTAGE``)."""
    assert event["ev"] == "MB"
    vw = event["vw"]
    return Bar(
        int(event["s"]),  # type: ignore[call-overload]
        float(event["o"]),  # type: ignore[arg-type]
        float(event["h"]),  # type: ignore[arg-type]
        float(event["l"]),  # type: ignore[arg-type]
        float(event["c"]),  # type: ignore[arg-type]
        float(event["v"]),  # type: ignore[arg-type]
        None if vw is None else float(vw),  # type: ignore[arg-type]
        int(event["n"]),  # type: ignore[call-overload]
        OUTAGE if event.get("outage") else 0,
    )


def without_carried(bar: Bar) -> Bar:
    return dataclasses.replace(bar, flags=bar.flags & OUTAGE)


async def subscribed_since_stored(
    http: int, symbol: str, reference: dict[tuple[str, int], list[Bar]]
) -> Client:
    """A client on ``1000Ms.<symbol>`` with ``since`` 100000, once it has got the stored bars:
    every reference bar, once, in order."""
    client = await Client.open(f"ws://127.0.0.1:{http}/stocks", token="any")
    await client.send({"action": "subscribe", "params": f"1000Ms.{symbol}", "since": 100_000})
    assert (await client.statuses(1))[0]["status"] == "success"
    want = [without_carried(b) for b in reference[(symbol, 1_000)]]
    history = [bar_from_event(e) for e in await client.bars(len(want))]
    assert [b.s for b in history] == [b.s for b in want]
    for mine, ref in zip(history, want, strict=True):
        assert_same_bar(mine, ref, symbol)
    return client


def get_json(http: int, path: str) -> object:
    with urllib.request.urlopen(f"http://127.0.0.1:{http}{path}", timeout=10) as response:
        assert response.status == 200
        return json.loads(response.read())


async def test_through_a_bridge_a_restarted_agg_serves_its_stored_bars_once(
    tmp_path: Path, context: Context
) -> None:
    """A real bridge in front of a ``--store`` agg that is killed with SIGKILL and restarted:
    clients are told it kept its bars, and ``/api/bars`` (from/to) and ``since`` give the
    bars from before the restart (far older than --history) once each, equal to the
    reference, then the new ones."""
    rng = random.Random(17)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    http = free_port()
    flags = ("--store", str(tmp_path / "store"), "--flush", "100ms", "--history", "5s")
    fake = FakeProxy(context, proxy_pub, session=51)
    proxy = Heartbeat(fake)
    events = random_events(rng, 100_000, 130_000, 3_000)
    reference = reference_bars([*events, Clock(131_500)], INTERVALS, GRACE).bars
    bridge = Proc("bridge", "--sub", agg_pub, "--listen", f"127.0.0.1:{http}")
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *flags)
    try:
        bridge.wait_for("ready:")
        await eventually(lambda: healthy(http), timeout=20, what="the bridge hearing the agg")
        watcher = await Client.open(f"ws://127.0.0.1:{http}/stocks", token="any")
        await watcher.send({"action": "subscribe", "params": "1000Ms.AAPL"})
        assert (await watcher.statuses(1))[0]["status"] == "success"
        proxy.probe(output, 0)
        for at in range(0, len(events), 100):  # ~1 s of feed clock a flush
            proxy.publish(events[at : at + 100])
            end = time.monotonic() + 0.12
            while time.monotonic() < end:
                output.pump(0.01)
        proxy.probe(output, 131_500)  # every bar of the events closed
        deadline = time.monotonic() + 20
        while scrape(port)["polyfan_agg_store_durable_until"] < 131_500:
            assert time.monotonic() < deadline, "the last bars never became durable"
            output.pump(0.05)
        agg.popen.kill()
        agg.wait()
        down = await watcher.until(lambda e: e.get("status") == "feed_down", timeout=5)
        proxy.clock = 140_000  # the proxy's clock went on: the first a restarted agg hears
        agg, output = start_agg(context, proxy_pub, agg_pub, port, *flags)
        stored = output.announces[-1]["stored"]
        assert isinstance(stored, dict) and stored["to"] == 131_500
        proxy.probe(output, 140_000)  # it hears the proxy: "from" is announced, the feed is up
        up = await watcher.until(lambda e: e.get("status") == "feed_up", timeout=15)
        assert (up["s"], up["e"]) == (down["s"], 140_000)
        assert up["message"] == (
            "the aggregator restarted: it kept its bars up to 131500 on disk; bars from then "
            "to 140000 may be missing or short; it serves bars again from 140000: bars from "
            "131500 to 140000 carry outage: true where trades may be missing"
        )

        symbols = [s for s in SYMBOLS if (s, 1_000) in reference][:8]
        for symbol in symbols:  # from disk, each once, as the first agg made them
            for interval in INTERVALS:
                want = [without_carried(b) for b in reference.get((symbol, interval), [])]
                query = f"channel={interval}Ms.{symbol}&from=100000&to=140000&limit=10000"
                got = [bar_from_event(e) for e in get_json(http, f"/api/bars?{query}")]  # type: ignore[union-attr]
                assert [b.s for b in got] == [b.s for b in want], (symbol, interval)
                for mine, ref in zip(got, want, strict=True):
                    assert_same_bar(mine, ref, (symbol, interval))
                half = (100_000 + 130_000) // 2
                query = f"channel={interval}Ms.{symbol}&from={half}&to=140000&limit=10000"
                part = [bar_from_event(e) for e in get_json(http, f"/api/bars?{query}")]  # type: ignore[union-attr]
                assert part == [b for b in got if b.s >= half]

        # since: the stored bars, then the live ones, none twice
        symbol = symbols[0]
        client = await subscribed_since_stored(http, symbol, reference)
        second = random_events(rng, 141_000, 146_000, 500)
        proxy.publish(second)
        proxy.probe(output, 148_000)
        new = output.bars.get((symbol, 1_000), [])
        assert new and new[0].s >= 140_000
        live = [bar_from_event(e) for e in await client.bars(len(new))]
        assert live == [without_carried(b) for b in new]
        await client.close()
        await watcher.close()
        assert agg.stop() == 0
        assert bridge.stop() == 0
    finally:
        agg.stop()
        bridge.stop()
        proxy.stop()
        fake.close()


def write_logs(directory: Path, logs: int, symbols: int, frames: int) -> int:
    """Write-ahead logs as a killed agg leaves them (whole frames of 1 s bars); return the
    bars written."""
    (directory / "wal").mkdir(parents=True)
    names = [f"S{i}" for i in range(symbols)]
    numbers = np.arange(symbols, dtype=np.int64)
    intervals = np.full(symbols, 1_000, dtype=np.int64)
    for log in range(logs):
        chunks = []
        for frame in range(frames):
            s = 100_000 + (log * frames + frame) * 1_000
            bars = np.zeros(symbols, dtype=codec.BAR_DTYPE)
            bars["s"] = s
            bars["o"] = bars["h"] = bars["l"] = bars["c"] = bars["vw"] = 10 + numbers / 100
            bars["v"], bars["n"] = 100, 1
            chunks.append(
                segments.encode_frame(
                    s + 1_000 + GRACE, names if frame == 0 else [], numbers, intervals, bars
                )
            )
        (directory / "wal" / f"{100_000 + log * frames * 1_000:020d}.log").write_bytes(
            b"".join(chunks)
        )
    return logs * frames * symbols


def test_sigterm_while_the_start_seals_what_a_kill_left_exits_0_within_2s_and_loses_nothing(
    tmp_path: Path, context: Context
) -> None:
    directory = tmp_path / "store"
    total = write_logs(directory, logs=4, symbols=20_000, frames=15)  # ~0.3 s of sealing each
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    with Proc(*agg_args(proxy_pub, agg_pub, port, "--store", str(directory))) as agg:
        agg.wait_for(r"store: .*\.log: 15 flushes sealed")  # sealing the first of four
        agg.popen.terminate()
        signalled = time.monotonic()
        assert agg.wait(5) == 0
        took = time.monotonic() - signalled
        assert took < 2, took
        assert "ready:" not in agg.output
    print(f"\nSIGTERM during the start-up seal: exited 0 in {took:.2f} s")
    agg, _ = start_agg(context, proxy_pub, agg_pub, port, "--store", str(directory))
    try:
        agg.wait_for(f"store {directory}: {total} bars in 4 segments")
        ask = Requester(context, agg_pub)
        served = stored_history(ask, "S123", 1_000)
        assert [b.s for b in served] == [100_000 + i * 1_000 for i in range(60)]
        assert {(b.o, b.n) for b in served} == {(11.23, 1)}
        assert agg.stop() == 0
    finally:
        agg.stop()


def api_bars(http: int, channel: str, since: int, to: int) -> list[Bar]:
    query = f"channel={channel}&from={since}&to={to}&limit=10000"
    events = get_json(http, f"/api/bars?{query}")
    assert isinstance(events, list)
    return [bar_from_event(e) for e in events]


async def test_a_bridge_joins_a_memory_only_replica_and_a_restarted_store_agg(
    tmp_path: Path, context: Context
) -> None:
    """A (memory only, --history 20s, first in --sub) and B (--store) serve the same channels;
    B is killed and restarted, so A has been whole the longest and B reaches further back.
    /api/bars and since give every bar once, equal to the reference: the newest from A's
    memory, the older from B's disk (both asked)."""
    rng = random.Random(19)
    proxy_pub, a_pub, a_port = agg_endpoints("ipc", tmp_path)
    b_pub, b_port, http = endpoint("ipc", tmp_path, "b"), free_port(), free_port()
    b_flags = ("--store", str(tmp_path / "store"), "--flush", "100ms", "--history", "5s")
    fake = FakeProxy(context, proxy_pub, session=61)
    proxy = Heartbeat(fake)
    events = random_events(rng, 100_000, 130_000, 3_000)
    reference = reference_bars([*events, Clock(131_500)], INTERVALS, GRACE).bars
    bridge = Proc("bridge", "--sub", a_pub, "--sub", b_pub, "--listen", f"127.0.0.1:{http}")
    a, out_a = start_agg(context, proxy_pub, a_pub, a_port, "--history", "20s")
    b, out_b = start_agg(context, proxy_pub, b_pub, b_port, *b_flags)
    try:
        bridge.wait_for("ready:")
        for output in (out_a, out_b):
            proxy.probe(output, 0)
        for at in range(0, len(events), 100):
            proxy.publish(events[at : at + 100])
            end = time.monotonic() + 0.12
            while time.monotonic() < end:
                out_a.pump(0.005)
                out_b.pump(0.005)
        for output in (out_a, out_b):
            proxy.probe(output, 131_500)
        deadline = time.monotonic() + 20
        while scrape(b_port)["polyfan_agg_store_durable_until"] < 131_500:
            assert time.monotonic() < deadline, "the last bars never became durable"
            out_b.pump(0.05)
        b.popen.kill()
        b.wait()
        proxy.clock = 140_000  # the proxy's clock went on: the first the restarted agg hears
        b, out_b = start_agg(context, proxy_pub, b_pub, b_port, *b_flags)
        session = out_b.announces[-1]["session"]
        for output in (out_a, out_b):
            proxy.probe(output, 140_000)

        def b_restarted_is_heard() -> bool:
            info = get_json(http, "/api/info")
            assert isinstance(info, dict)
            return bool(info["aggs"][1]["session"] == session and info["aggs"][1]["heard"])

        await eventually(b_restarted_is_heard, timeout=15, what="the bridge hearing B again")
        asked = (
            scrape(a_port)["polyfan_agg_requests_total"],
            scrape(b_port)["polyfan_agg_requests_total"],
        )
        symbols = [s for s in SYMBOLS if (s, 1_000) in reference][:6]
        for symbol in symbols:
            for interval in INTERVALS:
                key = (symbol, interval)
                want = [without_carried(b) for b in reference.get(key, [])]
                got = api_bars(http, f"{interval}Ms.{symbol}", 100_000, 140_000)
                assert [b.s for b in got] == [b.s for b in want], key
                for mine, ref in zip(got, want, strict=True):
                    assert_same_bar(mine, ref, key)
        # A answered each, and B for what is older than A's memory (the first 20 s of bars)
        count = len(symbols) * len(INTERVALS)
        assert scrape(a_port)["polyfan_agg_requests_total"] == asked[0] + count
        assert scrape(b_port)["polyfan_agg_requests_total"] == asked[1] + count

        symbol = symbols[0]
        client = await subscribed_since_stored(http, symbol, reference)
        second = random_events(rng, 141_000, 146_000, 500)
        proxy.publish(second)
        for output in (out_a, out_b):
            proxy.probe(output, 148_000)
        new = out_a.bars.get((symbol, 1_000), [])[len(reference[(symbol, 1_000)]) :]
        assert new and new[0].s >= 141_000
        live = [bar_from_event(e) for e in await client.bars(len(new))]
        assert live == [without_carried(b) for b in new]  # once each, whichever agg sent it
        await client.close()
        for proc in (a, b, bridge):
            assert proc.stop() == 0
    finally:
        for proc in (a, b, bridge):
            proc.stop()
        proxy.stop()
        fake.close()
