"""``agg --store`` in one process: the agg's core with a real :class:`BarStore` on disk, no
sockets. A bar the agg has closed is in its memory or in a sealed segment, never neither
(docs/store.md, "Memory and disk")."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_aggregator import clock_frame, history, trades_frame

from polyfan.bars.aggregator import HOLD_UNSEALED_MAX_MS, Aggregator
from polyfan.config import AggConfig
from polyfan.store import BarStore
from polyfan.wire import codec

INTERVALS = (100, 1_000)
HOUR = 3_600_000


def wait_until(condition: object, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def agg(tmp_path: Path) -> Iterator[tuple[Aggregator, BarStore]]:
    """An agg core keeping 1 s of bars in memory, with a store whose writer flushes only
    when told (``flush_now``)."""
    config = AggConfig(intervals_ms=INTERVALS, grace_ms=0, symbols=("AAPL",), history_ms=1_000)
    store = BarStore(tmp_path, INTERVALS, retain_ms=HOUR, flush_ms=HOUR, seal_ms=100)
    store.open()
    core = Aggregator(config, session=7, store=store)
    yield core, store
    store.close()


def test_memory_keeps_the_bars_not_yet_sealed_past_history_then_the_disk_serves_them(
    agg: tuple[Aggregator, BarStore],
) -> None:
    core, store = agg
    times = list(range(1_050, 30_000, 100))  # one trade a bar, 29 s of bars
    core.frames_received([trades_frame("AAPL", 1, *times), clock_frame(1, 31_000)])
    core.tick()
    every = [t - 50 for t in times]
    series = core.bars.series_id(core.decoder.known_symbol_id("AAPL") or 0, 100)
    # nothing is on disk yet: memory holds every bar, 29 s of them with --history 1s
    assert store.unsealed_from() == 1_000
    assert core.history.select(series)["s"].tolist() == every
    assert history(core, {"id": 1, "channel": "100Ms.AAPL"}) == (1, codec.HistoryStatus.OK, every)

    store.start(core.decoder.symbol_names)
    store.flush_now()  # one frame with every bar in the open log: memory still holds them
    wait_until(lambda: store.written_total.value == core.bars_total.value, "the flush")
    core.tick()
    assert store.unsealed_from() == 1_000
    assert core.history.select(series)["s"].tolist() == every
    core.frames_received([clock_frame(2, 31_200)])
    store.flush_now()  # the clock passes the log's seal_ms: sealed, a segment holds them
    wait_until(lambda: store.unsealed_from() is None, "the seal")
    core.tick()
    assert core.history.select(series)["s"].tolist() == []  # memory back to --history
    assert history(core, {"id": 2, "channel": "100Ms.AAPL"}) == (2, codec.HistoryStatus.OK, every)
    assert history(core, {"id": 3, "channel": "1000Ms.AAPL", "since": 5_000, "limit": 3}) == (
        3, codec.HistoryStatus.OK, [27_000, 28_000, 29_000],
    )  # fmt: skip


def test_a_store_that_never_seals_holds_memory_past_history_by_a_bounded_time(
    agg: tuple[Aggregator, BarStore],
) -> None:
    core, store = agg  # its writer is never started: a disk that hangs
    core.frames_received([trades_frame("AAPL", 1, 1_050, 2_050), clock_frame(1, 3_000)])
    series = core.bars.series_id(core.decoder.known_symbol_id("AAPL") or 0, 100)
    late = 1_000 + 1_000 + HOLD_UNSEALED_MAX_MS
    core.frames_received([trades_frame("AAPL", 2, late + 50), clock_frame(2, late + 1_000)])
    core.tick()
    assert store.unsealed_from() == 1_000
    assert core.history.select(series)["s"].tolist() == [2_000, late]  # 1,000: past the bound
