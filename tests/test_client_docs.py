"""docs/client.md's examples, run as written: each ``python`` block is a program, started as a
subprocess with the addresses and token of this test's own bridge or proxy put in its
``BRIDGE = ...``, ``PROXY = ...`` and ``TOKEN = ...`` lines, its output checked line by line."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan.bridge import Bridge
from polyfan.config import BridgeConfig
from test_client import TOKEN, Publisher, frame_of_rows
from wsclient import eventually

DOC = Path(__file__).parents[1] / "docs" / "client.md"
BLOCKS = re.findall(r"^```python\n(.*?)^```$", DOC.read_text(), flags=re.M | re.S)


def example(call: str) -> str:
    """The one example that calls ``client.<call>(``."""
    found = [block for block in BLOCKS if f"client.{call}(" in block]
    assert len(found) == 1, f"docs/client.md: {len(found)} python examples of client.{call}"
    return found[0]


def configured(code: str, **values: str) -> str:
    """The example with its constants set (each must be there, once)."""
    for name, value in values.items():
        code, count = re.subn(rf"^{name} = .*$", f"{name} = {value!r}", code, flags=re.M)
        assert count == 1, f"the example has no single {name} = ... line"
    return code


def test_every_example_is_one_of_these() -> None:
    assert len(BLOCKS) == 3
    for call in ("bars", "history", "trade_batches"):
        example(call)


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


async def start_bridge(agg: FakeAgg) -> Bridge:
    bridge = Bridge(BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0), tokens=(TOKEN,)))
    await bridge.start()
    await eventually(lambda: bridge.catalog.intervals, what="the agg's announce")
    return bridge


def line_of(event: dict[str, Any]) -> str:
    keys = ("sym", "interval", "s", "o", "h", "l", "c", "v")
    return " ".join(str(event[k]) for k in keys)


async def test_the_bars_example_prints_the_last_minute_then_live_bars(
    agg: FakeAgg, tmp_path: Path
) -> None:
    now = int(time.time() * 1000)
    tsla = bar_rows(500, (now - 30_000) // 500 * 500, 10)
    aapl = bar_rows(1000, (now - 20_000) // 1000 * 1000, 5, price=50.0)
    agg.publish(500, "TSLA", tsla)
    agg.publish(1000, "AAPL", aapl)
    agg.flush()
    bridge = await start_bridge(agg)
    script = tmp_path / "bars_example.py"
    script.write_text(
        configured(example("bars"), BRIDGE=f"ws://127.0.0.1:{bridge.port}", TOKEN=TOKEN)
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        lines = [
            (await asyncio.wait_for(process.stdout.readline(), 15)).decode().rstrip("\n")
            for _ in range(15)
        ]
        await asyncio.to_thread(agg.wait_subscribed, b"500Ms.TSLA\x00")
        live = bar_rows(500, int(tsla["s"][-1]) + 500, 1, price=120.0)
        agg.publish(500, "TSLA", live)
        lines.append((await asyncio.wait_for(process.stdout.readline(), 15)).decode().rstrip())
    finally:
        process.kill()
        await process.wait()
        await bridge.stop()
    assert [x for x in lines if x.startswith("TSLA ")] == [
        line_of(expected_event("TSLA", 500, row)) for row in np.concatenate([tsla, live])
    ]
    assert [x for x in lines if x.startswith("AAPL ")] == [
        line_of(expected_event("AAPL", 1000, row)) for row in aapl
    ]


async def test_the_history_example_prints_the_last_hour(agg: FakeAgg, tmp_path: Path) -> None:
    now = int(time.time() * 1000)
    rows = bar_rows(500, (now - 600_000) // 500 * 500, 30)
    rows["v"][3] = 12.5
    agg.publish(500, "TSLA", rows)
    agg.flush()
    bridge = await start_bridge(agg)
    script = tmp_path / "history_example.py"
    script.write_text(
        configured(example("history"), BRIDGE=f"http://127.0.0.1:{bridge.port}", TOKEN=TOKEN)
    )
    try:
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        await bridge.stop()
    assert done.returncode == 0, done.stderr
    frame = frame_of_rows("TSLA", 500, rows)
    assert done.stdout == (
        f"{len(frame)} bars, volume {frame['v'].sum()}\n"
        + frame[["s", "o", "h", "l", "c", "v"]].tail(3).to_string(index=False)
        + "\n"
    )


def test_the_trade_batches_example_prints_each_batch(tmp_path: Path) -> None:
    address = f"ipc://{tmp_path}/proxy"
    publisher = Publisher(address)
    script = tmp_path / "trades_example.py"
    script.write_text(configured(example("trade_batches"), PROXY=address))
    process = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, text=True, bufsize=1
    )
    lines: list[str] = []
    reader = threading.Thread(
        target=lambda: lines.extend(line.rstrip("\n") for line in process.stdout or ()),
        daemon=True,
    )
    reader.start()
    sent: dict[str, list[np.ndarray]] = {"TSLA": [], "AAPL": [], "MSFT": []}
    try:
        deadline = time.monotonic() + 60
        k = 0
        while len(lines) < 6:
            assert time.monotonic() < deadline, f"the example printed {lines}"
            for symbol in sent:
                sent[symbol].append(publisher.trades(symbol, 1_000 + 10 * k, 1 + k % 3))
            k += 1
            time.sleep(0.02)  # the stream's pace
    finally:
        process.kill()
        process.wait()
        reader.join(5)
        if process.stdout is not None:
            process.stdout.close()
        publisher.close()
    for line in lines[:6]:
        symbol, count, last_t, _, _ = line.split()
        assert symbol in ("TSLA", "AAPL"), line
        # the batch is the trades of the symbol's messages that ended with the one of last_t
        records = np.concatenate(sent[symbol])
        end = int(np.flatnonzero(records["t"] == int(last_t))[-1]) + 1
        batch = records[end - int(count) : end]
        assert line == (
            f"{symbol} {len(batch)} {batch['t'][-1]} {batch['p'][-1]} {batch['s'].sum()}"
        )
