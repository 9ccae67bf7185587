"""``polyfan agg --store`` as a user runs it: a real agg from the CLI, killed with SIGKILL and
restarted on the same store, fed by a publisher that speaks the proxy's wire; bars compared
with what the first agg published and with the reference (docs/store.md)."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyfan.bars import segments
from polyfan.wire import codec
from procs import Context, Proc, scrape
from reference import Bar, Clock, Trades, bar_from_record, reference_bars
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

FLUSH_MS = 200


@pytest.fixture
def context() -> Iterator[Context]:
    ctx = Context()
    yield ctx
    ctx.close()


def stored_history(ask: Requester, symbol: str, interval: int, **bounds: int) -> list[Bar]:
    request = {"id": 7, "channel": f"{interval}Ms.{symbol}", "limit": 20_000, **bounds}
    request_id, status, bars = codec.records_from_history(ask.ask(request))
    assert (request_id, status) == (7, codec.HistoryStatus.OK)
    return [bar_from_record(b) for b in bars]


class TimedOutput(AggOutput):
    """An AggOutput that notes when each bar arrived."""

    def __init__(self, ctx: Context, address: str) -> None:
        super().__init__(ctx, address)
        self.arrivals: dict[tuple[str, int, int], float] = {}

    def pump(self, timeout: float = 0.05) -> bool:
        before = {key: len(bars) for key, bars in self.bars.items()}
        got = super().pump(timeout)
        now = time.monotonic()
        for key, bars in self.bars.items():
            for bar in bars[before.get(key, 0) :]:
                self.arrivals[(*key, bar.s)] = now
        return got


def start_agg(
    ctx: Context, proxy_pub: str, agg_pub: str, port: int, *extra: str
) -> tuple[Proc, TimedOutput]:
    agg = Proc(*agg_args(proxy_pub, agg_pub, port, *extra))
    agg.wait_for("ready:")
    output = TimedOutput(ctx, agg_pub)
    output.pump_until(lambda: output.announces, what="announce")
    return agg, output


def test_kill_9_mid_stream_then_restart_serves_every_flushed_bar_once(
    tmp_path: Path, context: Context
) -> None:
    rng = random.Random(13)
    proxy_pub, agg_pub, port = agg_endpoints("ipc", tmp_path)
    store = ("--store", str(tmp_path / "store"), "--flush", f"{FLUSH_MS}ms")
    fake = FakeProxy(context, proxy_pub, session=21)
    events = random_events(rng, 100_000, 140_000, 6_000)
    agg, output = start_agg(context, proxy_pub, agg_pub, port, *store)
    fake.probe(output, 0)
    sent: list[Clock | Trades] = []
    chunks = [events[i : i + 150] for i in range(0, len(events), 150)]
    for chunk in chunks[: len(chunks) // 2]:  # feed time runs ~7x faster than wall time
        fake.publish(chunk)
        sent += chunk
        end = time.monotonic() + 0.02
        while time.monotonic() < end:
            output.pump(0.005)
    while output.pump(0.05):  # what was already on its way
        pass
    agg.popen.kill()  # SIGKILL mid-stream: no flush, no goodbye
    killed_at = time.monotonic()
    agg.wait()
    while output.pump(0.2):
        pass
    first = output.announces[-1]["session"]
    arrivals = dict(output.arrivals)
    published = {key: list(bars) for key, bars in output.bars.items()}
    assert sum(map(len, published.values())) > 1_000, (
        list(output.seqs)[:20],
        output.clock,
        len(sent),
    )
    # what the first agg published is the reference's (trades after a bar closed are late)
    expected = reference_bars(sent, INTERVALS, GRACE).bars
    for key, bars in published.items():
        by_start = {b.s: b for b in expected[key]}
        for bar in bars:
            ref = by_start[bar.s]
            assert (bar.o, bar.h, bar.l, bar.c, bar.n, bar.flags) == (
                ref.o, ref.h, ref.l, ref.c, ref.n, ref.flags,
            ), (key, bar, ref)  # fmt: skip
            assert bar.v == pytest.approx(ref.v, rel=1e-12)

    agg, output = start_agg(context, proxy_pub, agg_pub, port, *store)
    try:
        announce = output.announces[-1]
        assert announce["session"] != first
        stored = announce["stored"]
        assert isinstance(stored, dict) and isinstance(stored["to"], int)
        assert stored["from"] == min(b.s for bars in published.values() for b in bars)
        ask = Requester(context, agg_pub)
        lost = []
        for (symbol, interval), bars in published.items():
            served = stored_history(ask, symbol, interval)
            starts = [b.s for b in served]
            assert starts == sorted(set(starts)), (symbol, interval)  # none twice, in order
            served_by_start = {b.s: b for b in served}
            for bar in bars:
                if bar.s in served_by_start:
                    assert served_by_start[bar.s] == bar  # bit for bit what was published
                else:
                    lost.append((symbol, interval, bar.s))
            assert set(served_by_start) <= {b.s for b in bars}  # nothing never published
        # only bars published within --flush (plus the time to sync it) before the kill
        late = [key for key in lost if killed_at - arrivals[key] > (FLUSH_MS + 300) / 1000]
        assert late == [], late[:10]
        assert len(lost) < sum(map(len, published.values())) // 4, len(lost)

        # the stream goes on: history joins the disk's bars and the new ones, once each
        second = random_events(rng, 150_000, 160_000, 1_500)
        fake.probe(output, 150_000)
        fake.publish(second)
        fake.probe(output, 170_000)
        for symbol in SYMBOLS[:6]:
            for interval in INTERVALS:
                served = stored_history(ask, symbol, interval)
                starts = [b.s for b in served]
                assert starts == sorted(set(starts))
                new = output.bars.get((symbol, interval), [])
                assert [b for b in served if b.s >= 150_000 - interval] == new
                assert [b for b in served if b.s < 150_000 - interval] == [
                    b
                    for b in published.get((symbol, interval), [])
                    if (symbol, interval, b.s) not in lost
                ]
                since = stored_history(ask, symbol, interval, since=120_000, before=155_000)
                assert since == [b for b in served if 120_000 <= b.s < 155_000]
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
    import numpy as np

    return segments.Segment(np.fromfile(path, dtype=np.uint8)).newest
