"""Figures for the chart page: run ``.venv/bin/python bench/bench_page.py``.

Drives Debian's chromium (headless, Playwright) against ``polyfan demo`` (sim → proxy → agg →
bridge over ipc, started from the CLI) and prints:

- ``first candle``: from navigation start to the first candle held by the chart (page, library
  and history load, WebSocket subscribe), median and max over several loads.
- ``live CPU``: the page's main-thread busy time (Chrome's TaskDuration) per wall second while it
  follows the most active symbol's 100 ms bars live, and the bars/s it received.
- ``setData``: the library drawing 20,000 candles + volume bars from scratch (what a scroll-back
  page or a reconnect gap fill costs at most), measured to the next painted frame.
- ``update``: one live bar (candle + volume ``update``), mean over 2,000 appends.

The machine is shared and has 2 cores: figures are noisy. No figure here is checked by a test.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from playwright.sync_api import Page, sync_playwright

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import CHROMIUM, CHROMIUM_ARGS, free_port


def start_demo(port: int) -> subprocess.Popen[str]:
    demo = subprocess.Popen(
        [sys.executable, "-m", "polyfan", "demo", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert demo.stdout is not None
    deadline = time.monotonic() + 90
    for line in demo.stdout:
        if "ready: demo" in line:
            break
        if time.monotonic() > deadline:
            raise SystemExit("polyfan demo did not get ready")
    else:
        raise SystemExit(f"polyfan demo exited with {demo.wait()}")
    # Keep reading its output, so that a full pipe never blocks it.
    threading.Thread(target=demo.stdout.read, daemon=True).start()
    # Wait until the bridge knows the symbols (the agg has seen trades).
    while True:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/symbols", timeout=5) as r:
            if json.load(r):
                return demo
        time.sleep(0.1)


def first_candle_ms(page: Page, url: str) -> float:
    page.goto(url)
    page.wait_for_function("window.polyfan && window.polyfan.bars().length > 0", timeout=15_000)
    return float(page.evaluate("performance.now()"))


def live_cpu(page: Page, url: str, seconds: float) -> tuple[float, float]:
    page.goto(url)
    page.wait_for_function("window.polyfan && window.polyfan.connection() === 'live'")
    cdp = page.context.new_cdp_session(page)
    cdp.send("Performance.enable")

    def task_seconds() -> float:
        metrics = cdp.send("Performance.getMetrics")["metrics"]
        return float(next(m["value"] for m in metrics if m["name"] == "TaskDuration"))

    bars_before = page.evaluate("window.polyfan.stats().liveBars")
    busy_before, started = task_seconds(), time.monotonic()
    time.sleep(seconds)
    busy = task_seconds() - busy_before
    elapsed = time.monotonic() - started
    bars = page.evaluate("window.polyfan.stats().liveBars") - bars_before
    return busy / elapsed, bars / elapsed


def library_costs(page: Page) -> dict[str, Any]:
    """setData of 20,000 bars and single updates, on a scratch chart in the same page."""
    result: dict[str, Any] = page.evaluate(
        """async () => {
            const box = document.createElement('div');
            box.style.cssText = 'position:fixed;inset:0;z-index:10;background:#000';
            document.body.append(box);
            const L = window.LightweightCharts;
            const chart = L.createChart(box, {autoSize: true});
            const candles = chart.addSeries(L.CandlestickSeries);
            const volume = chart.addSeries(L.HistogramSeries, {}, 1);
            const frame = () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(r)));
            const make = (n, from) => Array.from({length: n}, (_, i) => {
                const o = 100 + Math.sin((from + i) / 50), c = o + Math.cos(from + i) / 10;
                return {time: from + i, open: o, high: Math.max(o, c) + 0.05,
                        low: Math.min(o, c) - 0.05, close: c, value: 1000 + (i % 97)};
            });
            const bars = make(20000, 1e6);
            await frame();
            let t = performance.now();
            candles.setData(bars);
            volume.setData(bars.map((b) => ({time: b.time, value: b.value})));
            await frame();
            const setData = performance.now() - t;
            const more = make(2000, 1e6 + 20000);
            t = performance.now();
            for (const b of more) {
                candles.update(b);
                volume.update({time: b.time, value: b.value});
            }
            await frame();
            const update = (performance.now() - t) / more.length;
            chart.remove();
            box.remove();
            return {setData, update};
        }"""
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--loads", type=int, default=5, help="page loads for first candle")
    parser.add_argument("--seconds", type=float, default=10.0, help="live CPU window")
    args = parser.parse_args()

    port = free_port()
    demo = start_demo(port)
    base = f"http://127.0.0.1:{port}"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
            )
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            loads = [first_candle_ms(page, f"{base}/?interval=500") for _ in range(args.loads)]
            print(
                f"first candle: median {statistics.median(loads):.0f} ms, "
                f"max {max(loads):.0f} ms over {len(loads)} loads (navigation start to candle)"
            )
            busy, rate = live_cpu(page, f"{base}/?interval=100", args.seconds)
            print(
                f"live CPU: {busy * 100:.1f} % of one core on the page's main thread, "
                f"{rate:.1f} live bars/s (100 ms bars, {args.seconds:.0f} s)"
            )
            costs = library_costs(page)
            print(f"setData: {costs['setData']:.0f} ms for 20,000 candles + volume, to paint")
            print(f"update: {costs['update'] * 1000:.0f} µs per live bar (candle + volume)")
            browser.close()
    finally:
        demo.send_signal(signal.SIGINT)
        demo.wait(10)


if __name__ == "__main__":
    main()
