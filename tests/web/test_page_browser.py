"""The chart page in a real browser (Debian's chromium via Playwright) on a real pipeline.

sim → proxy → agg → bridge run as ``polyfan`` subprocesses from the CLI over ipc, exactly as a
user would start them. The page is checked against the bridge's own HTTP API: what the chart
series hold (read back through ``window.polyfan.bars()``) and what the legend shows must equal
``/api/bars``. Every test fails on a console error or an uncaught page error.

One test takes docs/screenshot.png (laptop size), the picture on the README's first screen.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    FloatRect,
    Page,
    ViewportSize,
    WebSocket,
    sync_playwright,
)
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

from procs import CHROMIUM, CHROMIUM_ARGS, Proc, free_port

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
LAPTOP: ViewportSize = {"width": 1280, "height": 800}
PHONE: ViewportSize = {"width": 390, "height": 844}
PRICE_FIELDS = ("o", "h", "l", "c")
# While the bridge is down, chromium itself logs each refused WebSocket attempt as a console
# error; only the restart test allows these, and only until the page is live again.
UNAUTHORIZED = re.compile(r"status of 401 \(Unauthorized\)")
REFUSED = re.compile(r"WebSocket connection to 'ws://[^']+' failed|ERR_CONNECTION_REFUSED")

# ---------------------------------------------------------------- the pipeline


@dataclass
class Pipeline:
    """sim, proxy and agg over ipc; bridges are started on top with ``start_bridge``."""

    run_dir: Path
    sim_port: int = field(default_factory=free_port)
    proxy_metrics_port: int = field(default_factory=free_port)
    procs: dict[str, Proc] = field(default_factory=dict)

    @property
    def trades_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'trades.sock'}"

    @property
    def bars_endpoint(self) -> str:
        return f"ipc://{self.run_dir / 'bars.sock'}"

    def start(self) -> None:
        self.start_sim()
        self.procs["proxy"] = Proc(
            "proxy",
            "--upstream",
            f"ws://127.0.0.1:{self.sim_port}",
            "--pub",
            self.trades_endpoint,
            "--metrics",
            f"127.0.0.1:{self.proxy_metrics_port}",
            env={"MASSIVE_API_KEY": "page-test-key"},
        )
        self.procs["proxy"].wait_for(r"ready:")
        self.procs["agg"] = Proc("agg", "--sub", self.trades_endpoint, "--pub", self.bars_endpoint)
        self.procs["agg"].wait_for(r"ready:", timeout=60)  # numba compiles on a cold cache

    def start_sim(self) -> None:
        sim = Proc("sim", "--listen", f"127.0.0.1:{self.sim_port}", "--symbols", "12")
        self.procs["sim"] = sim
        sim.wait_for(r"ready:")

    def proxy_reconnects(self) -> int:
        url = f"http://127.0.0.1:{self.proxy_metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            text = response.read().decode()
        match = re.search(r"^polyfan_proxy_reconnects_total (\d+)", text, re.MULTILINE)
        assert match, "the proxy does not count its reconnects"
        return int(match.group(1))

    def interrupt_upstream(self) -> None:
        """Restart the sim: the proxy loses its upstream, then reconnects to the new one."""
        reconnects = self.proxy_reconnects()
        self.stop("sim")
        self.start_sim()
        poll(
            lambda: self.proxy_reconnects() > reconnects,
            timeout=15,
            what="the proxy to reconnect upstream",
        )

    def stop(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.stop()
        # Kept with pytest's temporary directories, for a post-mortem of a failed run.
        with (self.run_dir / f"{name}.log").open("a") as log:
            log.write(proc.output + "\n")

    def start_bridge(self, port: int, *flags: str) -> Proc:
        """A bridge on ``port``, once it serves and has heard the agg (symbols are known)."""
        bridge = Proc(
            "bridge", "--sub", self.bars_endpoint, "--listen", f"127.0.0.1:{port}", *flags
        )
        bridge.wait_for(r"ready:", timeout=30)
        token = flags[flags.index("--token") + 1] if "--token" in flags else ""
        poll(
            lambda: get_json(f"http://127.0.0.1:{port}/api/symbols?token={token}"),
            timeout=10,
            what="the bridge to hear the agg's symbols",
        )
        return bridge


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Pipeline]:
    pipeline = Pipeline(run_dir=tmp_path_factory.mktemp("page"))
    try:
        pipeline.start()
        yield pipeline
    finally:
        for name in ("agg", "proxy", "sim"):
            if name in pipeline.procs:
                pipeline.stop(name)


@pytest.fixture(scope="module")
def bridge_url(pipeline: Pipeline) -> Iterator[str]:
    port = free_port()
    bridge = pipeline.start_bridge(port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        status = bridge.stop()
        (pipeline.run_dir / "bridge.log").write_text(bridge.output)
        assert status == 0


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.load(response)


def api_bars(base: str, channel: str, limit: int = 5000) -> list[dict[str, Any]]:
    bars: list[dict[str, Any]] = get_json(f"{base}/api/bars?channel={channel}&limit={limit}")
    return bars


def poll(condition: Callable[[], object], timeout: float, what: str) -> object:
    """Call ``condition`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------- the browser


@dataclass
class Console:
    """What one page did: console errors and page errors (with the ones a test allows), the
    HTTP requests it made and the WebSocket frames it sent, in order."""

    errors: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)
    allow: re.Pattern[str] | None = None
    requests: list[str] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)

    def record(self, text: str) -> None:
        if self.allow is not None and self.allow.search(text):
            self.allowed.append(text)
        else:
            self.errors.append(text)

    def watch(self, page: Page) -> None:
        def on_console(message: ConsoleMessage) -> None:
            if message.type == "error":
                self.record(f"{message.text} ({message.location.get('url')})")

        def on_websocket(socket: WebSocket) -> None:
            socket.on("framesent", lambda payload: self.sent.append(str(payload)))

        page.on("console", on_console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("request", lambda request: self.requests.append(request.url))
        page.on("websocket", on_websocket)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), f"{CHROMIUM} is missing: bin/test installs Debian's chromium"
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS
        )
        yield chromium
        chromium.close()


class Pages:
    """Pages opened by one test, each in a fresh context with a UTC clock."""

    def __init__(self, browser: Browser) -> None:
        self.browser = browser
        self.contexts: list[BrowserContext] = []
        self.consoles: list[Console] = []

    def __call__(
        self,
        url: str,
        viewport: ViewportSize = LAPTOP,
        allow: re.Pattern[str] | None = None,
        **options: Any,
    ) -> tuple[Page, Console]:
        context = self.browser.new_context(viewport=viewport, timezone_id="UTC", **options)
        self.contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(10_000)
        console = Console()
        console.allow = allow  # console errors this page is expected to show, from its start
        self.consoles.append(console)
        console.watch(page)
        page.goto(url)
        return page, console

    def close(self) -> None:
        """Close every page (before its bridge stops: a page would log refused reconnects)."""
        while self.contexts:
            self.contexts.pop().close()


@pytest.fixture
def open_page(browser: Browser) -> Iterator[Pages]:
    """Open the page; fail the test on any console error or uncaught page error."""
    pages = Pages(browser)
    yield pages
    pages.close()
    for console in pages.consoles:
        assert console.errors == [], "console errors on the page"


def page_bars(page: Page) -> list[dict[str, Any]]:
    bars: list[dict[str, Any]] = page.evaluate("window.polyfan.bars()")
    return bars


def wait_for_candles(page: Page, count: int = 1, timeout: float = 5.0) -> None:
    page.wait_for_function(
        f"window.polyfan && window.polyfan.bars().length >= {count}", timeout=timeout * 1000
    )


def wait_until_live(page: Page, timeout: float = 10.0) -> None:
    try:
        page.wait_for_function(
            "window.polyfan && window.polyfan.connection() === 'live'", timeout=timeout * 1000
        )
    except PlaywrightTimeoutError:
        seen = page.evaluate(
            "window.polyfan && [window.polyfan.connection(), window.polyfan.lastClose(),"
            " window.polyfan.message()]"
        )
        raise AssertionError(f"the page is not live within {timeout}s: {seen}") from None


def assert_chart_matches_api(page: Page, base: str, *, min_bars: int = 1) -> list[dict[str, Any]]:
    """The chart holds exactly the API's bars over their common range, with no hole.

    Returns the API bars of that range.
    """
    shown = page_bars(page)
    channel = page.evaluate("window.polyfan.channel()")
    interval = int(channel.split("Ms.")[0])
    stored = api_bars(base, channel)
    assert shown, f"the chart holds no bar of {channel}"
    assert stored, f"/api/bars has no bar of {channel}"
    # Bars close once; the page and the API may each be a bar ahead of the other at the end.
    low = max(shown[0]["s"], stored[0]["s"])
    high = min(shown[-1]["s"], stored[-1]["s"])
    expected = [
        {
            "s": b["s"],
            **{k: b[k] for k in PRICE_FIELDS},
            "v": b["v"],
            "outage": bool(b.get("outage", False)),
        }
        for b in stored
        if low <= b["s"] <= high
    ]
    held = [b for b in shown if low <= b["s"] <= high]
    assert len(expected) >= min_bars, f"only {len(expected)} bars in common"
    assert held == expected
    assert all(b["s"] % interval == 0 for b in shown)
    assert [b["s"] for b in shown] == sorted({b["s"] for b in shown}), "repeated or unsorted"
    return expected


def legend(page: Page) -> dict[str, str]:
    """The legend's fields, read in one go (a live bar may move the crosshair at any time)."""
    fields: dict[str, str] = page.evaluate(
        """() => {
            const legend = document.getElementById('legend');
            const fields = Object.fromEntries([...legend.querySelectorAll('[data-field]')]
                .map((el) => [el.dataset.field, el.textContent]));
            return {...fields, s: legend.dataset.s, hovered: legend.dataset.hovered,
                    time: document.getElementById('legend-time').textContent};
        }"""
    )
    return fields


def tick_text(ms: int) -> str:
    """A time-axis label in UTC: the coarsest round unit the instant falls on."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    if ms % 1000:
        return f"{moment:%H:%M:%S}.{ms % 1000:03d}"
    if moment.second:
        return f"{moment:%H:%M:%S}"
    if moment.hour or moment.minute:
        return f"{moment:%H:%M}"
    return f"{moment:%b} {moment.day}"


def box_of(page: Page, selector: str) -> FloatRect:
    box = page.locator(selector).bounding_box()
    assert box is not None, f"{selector} is not visible"
    return box


def clock_text(ms: int, interval: int) -> str:
    """What the legend shows for a bar start in UTC: date and HH:MM:SS(.mmm below 1 s)."""
    moment = datetime.fromtimestamp(ms / 1000, tz=UTC)
    text = moment.strftime("%Y-%m-%d %H:%M:%S")
    return f"{text}.{ms % 1000:03d}" if interval < 1000 else text


# ---------------------------------------------------------------- tests


def test_page_draws_live_candles_within_5_seconds(open_page: Pages, bridge_url: str) -> None:
    started = time.monotonic()
    page, _ = open_page(f"{bridge_url}/")
    wait_for_candles(page, timeout=5.0)
    wait_until_live(page, timeout=max(0.1, 5.0 - (time.monotonic() - started)))
    # The candles are drawn: the chart's canvases have pixels of the up or down colour, or of
    # the outage colour (the agg's first bars: it cannot know the trades before it started).
    drawn = page.evaluate(
        """() => [...document.querySelectorAll('#chart canvas')].some((canvas) => {
            const ctx = canvas.getContext('2d');
            if (!ctx || !canvas.width || !canvas.height) return false;
            const data = ctx.getImageData(0, 0, canvas.width, canvas.height).data;
            for (let i = 0; i < data.length; i += 4) {
                const [r, g, b] = [data[i], data[i + 1], data[i + 2]];
                if ((r === 38 && g === 166 && b === 154) || (r === 239 && g === 83 && b === 80)) return true;
                if (r === 181 && g === 140 && b === 255) return true;
            }
            return false;
        })"""
    )
    assert drawn, "no candle pixels on the chart's canvases"
    held = len(page_bars(page))
    page.wait_for_function(f"window.polyfan.bars().length > {held}", timeout=5000)


def test_page_defaults_to_the_most_active_symbol_and_suggests_the_others(
    open_page: Pages, bridge_url: str
) -> None:
    page, _ = open_page(f"{bridge_url}/")
    wait_for_candles(page)
    symbols = get_json(f"{bridge_url}/api/symbols")
    info = get_json(f"{bridge_url}/api/info")
    suggested = page.eval_on_selector_all(
        "#symbol-list option", "(os) => os.map((o) => [o.value, o.label])"
    )
    assert {sym for sym, _ in suggested} == {s["sym"] for s in symbols}
    counts = [int(label.split()[0].replace(",", "")) for _, label in suggested]
    assert counts == sorted(counts, reverse=True), "suggestions are not most active first"
    channel = page.evaluate("window.polyfan.channel()")
    assert channel.split("Ms.")[1] in [s["sym"] for s in symbols[:3]]
    assert page.input_value("#symbol") == channel.split("Ms.")[1]
    buttons = page.eval_on_selector_all(
        "#intervals button", "(bs) => bs.map((b) => Number(b.dataset.interval))"
    )
    assert buttons == sorted(info["intervals"])
    checked = page.get_attribute("#intervals button[aria-checked='true']", "data-interval")
    assert checked == channel.split("Ms.")[0]


def test_chart_loads_history_over_http_then_follows_the_websocket_exactly(
    open_page: Pages, bridge_url: str
) -> None:
    page, seen = open_page(f"{bridge_url}/?interval=250")
    wait_until_live(page)
    wait_for_candles(page, count=6, timeout=10)
    channel = page.evaluate("window.polyfan.channel()")
    history = [url for url in seen.requests if "/api/bars?" in url]
    assert history[0] == f"{bridge_url}/api/bars?channel={channel}&limit=600"
    subscribes = [json.loads(frame) for frame in seen.sent if '"subscribe"' in frame]
    assert subscribes[0]["params"] == channel
    assert subscribes[0]["since"] <= page_bars(page)[-1]["s"], "since is past the last bar"
    assert_chart_matches_api(page, bridge_url, min_bars=5)
    # And it keeps matching as live bars arrive over the WebSocket.
    live_before = page.evaluate("window.polyfan.stats().liveBars")
    page.wait_for_function(f"window.polyfan.stats().liveBars >= {live_before + 4}", timeout=5000)
    assert_chart_matches_api(page, bridge_url, min_bars=9)


def test_legend_shows_the_bar_under_the_crosshair(open_page: Pages, bridge_url: str) -> None:
    page, _ = open_page(f"{bridge_url}/?interval=250")
    wait_until_live(page)
    wait_for_candles(page, count=8, timeout=10)
    channel = page.evaluate("window.polyfan.channel()")
    target = page_bars(page)[-6]["s"]
    point = page.evaluate(f"window.polyfan.pointOf({target})")
    assert point is not None
    page.mouse.move(point["x"], point["y"])
    page.wait_for_function("document.getElementById('legend').dataset.hovered === 'true'")
    shown = legend(page)
    # New bars shift the chart under a still mouse: the crosshair may have moved on to a later bar.
    hovered = int(shown["s"])
    assert hovered >= target
    bar = {b["s"]: b for b in api_bars(bridge_url, channel)}[hovered]
    assert hovered != page_bars(page)[-1]["s"], "the legend shows the last bar, not the hovered"
    for name in PRICE_FIELDS:
        assert float(shown[name]) == bar[name], name
    # Volumes with fractional shares are shown to 4 decimals.
    assert float(shown["v"].replace(",", "")) == pytest.approx(bar["v"], abs=5e-5)
    assert shown["v"] == page.evaluate(
        "async (v) => (await import('/static/core.js')).formatVolume(v)", bar["v"]
    )
    assert int(shown["n"]) == bar["n"]
    assert shown["time"] == clock_text(hovered, 250)
    # Off the chart, the legend follows the last bar again.
    page.mouse.move(2, 2)
    page.wait_for_function("document.getElementById('legend').dataset.hovered === 'false'")
    page.wait_for_function(
        "document.getElementById('legend').dataset.s === String(window.polyfan.bars().at(-1).s)",
        timeout=2000,
    )


def test_time_labels_and_helpers_read_real_time(open_page: Pages, bridge_url: str) -> None:
    """core.js (the page's pure helpers) and the chart's configured formatters, in the page."""
    page, _ = open_page(f"{bridge_url}/?interval=250")
    wait_for_candles(page)
    ms = int(datetime(2026, 11, 27, 14, 3, 12, 300_000, tzinfo=UTC).timestamp() * 1000)
    results = page.evaluate(
        """async (ms) => {
            const core = await import('/static/core.js');
            const second = ms - 300, minute = second - 12000, midnight = Date.UTC(2026, 10, 27);
            return {
                ticks: [ms, second, minute, midnight].map(core.formatTick),
                labels: [100, 250, 1000, 5000, 60000, 3600000].map(core.intervalLabel),
                decimals: [12, 12.5, 0.125, 599.02, 1.5e-7].map(core.decimalsOf),
                precision: [
                    core.pricePrecision([{o: 1, h: 2, l: 0.5, c: 1.25}]),
                    core.pricePrecision([{o: 1.123, h: 2, l: 1, c: 1}, {o: 1, h: 1.1234567, l: 1, c: 1}]),
                ],
                low: [0, 1, 2, 3, 4, 5, 6].map((n) => core.backoffDelay(n, () => 0)),
                high: [0, 1, 2, 3, 4, 5, 6].map((n) => core.backoffDelay(n, () => 1)),
                merged: core.mergeSorted([{s: 3, c: 1}, {s: 1, c: 1}], [{s: 2, c: 2}, {s: 3, c: 2}]),
                index: [core.chartTime(ms - 300, 250), core.barStart(core.chartTime(ms - 300, 250), 250)],
            };
        }""",
        ms,
    )
    assert results["ticks"] == ["14:03:12.300", "14:03:12", "14:03", "Nov 27"]
    assert results["labels"] == ["100ms", "250ms", "1s", "5s", "1m", "1h"]
    assert results["decimals"] == [0, 1, 3, 2, 8]
    assert results["precision"] == [2, 6]
    assert results["low"] == [125, 250, 500, 1000, 2000, 2500, 2500]
    assert results["high"] == [250, 500, 1000, 2000, 4000, 5000, 5000]
    assert results["merged"] == [{"s": 1, "c": 1}, {"s": 2, "c": 2}, {"s": 3, "c": 2}]
    assert results["index"] == [(ms - 300) // 250, ms - 300]
    # The chart's own formatters turn the bar index on its time scale back into real time.
    bar = page_bars(page)[-1]
    crosshair, tick = page.evaluate(
        """(s) => {
            const options = window.polyfan.chart.options();
            const time = s / 250;
            return [options.localization.timeFormatter(time), options.timeScale.tickMarkFormatter(time)];
        }""",
        bar["s"],
    )
    assert crosshair == clock_text(bar["s"], 250).split(" ")[1]
    assert tick == tick_text(bar["s"])


def test_switching_symbol_and_interval_shows_the_new_channel(
    open_page: Pages, bridge_url: str
) -> None:
    page, _ = open_page(f"{bridge_url}/")
    wait_until_live(page)
    wait_for_candles(page)
    first = page.evaluate("window.polyfan.channel()")
    symbols = [s["sym"] for s in get_json(f"{bridge_url}/api/symbols")]
    other = next(s for s in symbols if s != first.split("Ms.")[1])

    page.fill("#symbol", other.lower())  # typed in lower case: the page upper-cases it
    page.press("#symbol", "Enter")
    page.wait_for_function(f"window.polyfan.channel().endsWith('Ms.{other}')")
    wait_until_live(page)
    wait_for_candles(page)
    assert page.inner_text("#legend-sym") == other
    assert_chart_matches_api(page, bridge_url)

    page.click("#intervals button[data-interval='1000']")
    page.wait_for_function(f"window.polyfan.channel() === '1000Ms.{other}'")
    wait_until_live(page)
    wait_for_candles(page)
    assert page.get_attribute("#intervals button[aria-checked='true']", "data-interval") == "1000"
    bars = assert_chart_matches_api(page, bridge_url)
    assert all(b["s"] % 1000 == 0 for b in bars)
    assert f"sym={other}" in page.url and "interval=1000" in page.url

    # Keyboard: 1 picks the first interval, "/" focuses the symbol box; a bad symbol is refused.
    page.keyboard.press("1")
    first_interval = min(get_json(f"{bridge_url}/api/info")["intervals"])
    page.wait_for_function(f"window.polyfan.channel() === '{first_interval}Ms.{other}'")
    wait_for_candles(page)
    page.keyboard.press("/")
    assert page.evaluate("document.activeElement.id") == "symbol"
    page.keyboard.type("NOT A SYMBOL")
    page.keyboard.press("Enter")
    page.wait_for_function("window.polyfan.message().includes('is not a symbol')")
    assert page.evaluate("window.polyfan.channel()") == f"{first_interval}Ms.{other}"
    page.keyboard.press("Escape")
    page.click("#intervals button[data-interval='1000']")
    page.wait_for_function(f"window.polyfan.channel() === '1000Ms.{other}'")
    wait_until_live(page)

    # Live bars of the new channel keep arriving, and none of the old channel's.
    live_before = page.evaluate("window.polyfan.stats().liveBars")
    page.wait_for_function(f"window.polyfan.stats().liveBars > {live_before}", timeout=5000)
    assert_chart_matches_api(page, bridge_url)


def test_scrolling_back_loads_older_bars(open_page: Pages, bridge_url: str) -> None:
    symbol = get_json(f"{bridge_url}/api/symbols")[0]["sym"]
    poll(
        lambda: len(api_bars(bridge_url, f"100Ms.{symbol}")) >= 200,
        timeout=30,
        what="200 bars of history",
    )
    # Pages of 20 bars (?limit=20) on a narrow chart (about 60 bars wide): the page first pages
    # back until the chart is full, then only when the user drags it to older times.
    page, _ = open_page(
        f"{bridge_url}/?sym={symbol}&interval=100&limit=20", viewport={"width": 480, "height": 700}
    )
    wait_until_live(page)
    page.wait_for_function("window.polyfan.bars().length >= 60")
    page.wait_for_function("!window.polyfan.stats().olderLoading")
    assert_chart_matches_api(page, bridge_url, min_bars=60)
    first = page_bars(page)[0]["s"]
    box = box_of(page, "#chart")
    y = box["y"] + box["height"] * 0.4
    for _ in range(3):  # drag the chart to the right: older bars come into view
        page.mouse.move(box["x"] + box["width"] * 0.1, y)
        page.mouse.down()
        page.mouse.move(box["x"] + box["width"] * 0.8, y, steps=8)
        page.mouse.up()
    page.wait_for_function(f"window.polyfan.bars()[0].s < {first}", timeout=5000)
    page.wait_for_function("!window.polyfan.stats().olderLoading")
    assert_chart_matches_api(page, bridge_url, min_bars=100)


def test_chart_reconnects_after_a_bridge_restart_and_fills_the_gap(
    open_page: Pages, pipeline: Pipeline
) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    bridge = pipeline.start_bridge(port)
    try:
        page, console = open_page(f"{base}/?interval=250")
        wait_until_live(page)
        wait_for_candles(page, count=4, timeout=10)

        console.allow = REFUSED
        assert bridge.stop() == 0
        page.wait_for_function("window.polyfan.connection() === 'reconnecting'", timeout=5000)
        held = page_bars(page)[-1]["s"]  # the last bar before the bridge went away
        # Let the market move on for at least 8 bars of 250 ms while no bridge is serving.
        poll(
            lambda: time.time() * 1000 > held + 10 * 250,
            timeout=10,
            what="the outage to span 8 bars",
        )
        bridge = pipeline.start_bridge(port)
        wait_until_live(page, timeout=15)
        console.allow = None
        page.wait_for_function(f"window.polyfan.bars().at(-1).s > {held + 10 * 250}", timeout=5000)
        stored = assert_chart_matches_api(page, base, min_bars=12)
        gap = [b["s"] for b in stored if held < b["s"] <= held + 10 * 250]
        assert gap, "no bar was published while the bridge was down"
        assert console.allowed, "the outage was not seen by the browser"
        # The new socket asked for everything from the last bar it held on.
        resubscribe = json.loads([f for f in console.sent if '"subscribe"' in f][-1])
        assert resubscribe["since"] == held
    finally:
        open_page.close()
        bridge.stop()


def test_page_authenticates_with_the_token_from_its_url(
    open_page: Pages, pipeline: Pipeline
) -> None:
    port = free_port()
    bridge = pipeline.start_bridge(port, "--token", "s3cret")
    try:
        page, console = open_page(f"http://127.0.0.1:{port}/#token=wrong", allow=UNAUTHORIZED)
        page.wait_for_function("window.polyfan.connection() === 'auth failed'")
        assert "authentication failed" in page.inner_text("#message")
        assert page.evaluate("window.polyfan.lastClose()") is None  # no reconnect loop
        assert console.allowed  # the bridge said 401 to its HTTP request
        page, _ = open_page(f"http://127.0.0.1:{port}/#token=s3cret")
        wait_until_live(page)
        wait_for_candles(page)  # a 401 on its history request would be a console error: a failure
    finally:
        open_page.close()
        bridge.stop()


def test_page_waits_for_a_late_aggregator_then_goes_live(
    open_page: Pages, pipeline: Pipeline, bridge_url: str
) -> None:
    late = f"ipc://{pipeline.run_dir / 'late.sock'}"
    port = free_port()
    bridge = Proc("bridge", "--sub", late, "--listen", f"127.0.0.1:{port}")
    agg = None
    try:
        bridge.wait_for(r"ready:")
        symbol = get_json(f"{bridge_url}/api/symbols")[0]["sym"]
        page, _ = open_page(f"http://127.0.0.1:{port}/?sym={symbol}&interval=250")
        # No aggregator yet (no intervals announced): the page says so and asks again.
        page.wait_for_function("window.polyfan.message().includes('waiting for an aggregator')")
        assert page.evaluate("window.polyfan.connection()") == "connecting"
        agg = Proc("agg", "--sub", pipeline.trades_endpoint, "--pub", late)
        agg.wait_for(r"ready:", timeout=60)
        wait_until_live(page, timeout=15)
        assert page.evaluate("window.polyfan.channel()") == f"250Ms.{symbol}"
        wait_for_candles(page, count=2, timeout=10)
        assert_chart_matches_api(page, f"http://127.0.0.1:{port}")
    finally:
        open_page.close()
        bridge.stop()
        if agg is not None:
            agg.stop()


def test_page_fits_a_phone_screen(open_page: Pages, bridge_url: str) -> None:
    page, _ = open_page(f"{bridge_url}/", viewport=PHONE, is_mobile=True, has_touch=True)
    wait_until_live(page)
    wait_for_candles(page)
    width = page.evaluate("document.documentElement.scrollWidth")
    assert width <= PHONE["width"], "the page scrolls sideways"
    chart = box_of(page, "#chart")
    assert chart["height"] >= PHONE["height"] * 0.5
    for selector in ("#symbol", "#conn", "#intervals button:last-child", "#stats"):
        box = box_of(page, selector)
        assert box["x"] >= 0, selector
        assert box["x"] + box["width"] <= PHONE["width"] and box["y"] >= 0, selector
        assert box["y"] + box["height"] <= PHONE["height"], selector
    page.tap("#intervals button[data-interval='100']")
    page.wait_for_function("window.polyfan.channel().startsWith('100Ms.')")
    wait_for_candles(page)
    assert_chart_matches_api(page, bridge_url)


def test_screenshot_of_the_page_for_the_readme(open_page: Pages, bridge_url: str) -> None:
    # Before the outage test: its sim restart starts a new random market (a price jump).
    # 100 ms bars, of the symbol whose closes took the most distinct values (liveliest candles).
    symbols = [s["sym"] for s in get_json(f"{bridge_url}/api/symbols")]
    symbol = max(
        symbols, key=lambda sym: len({b["c"] for b in api_bars(bridge_url, f"100Ms.{sym}")})
    )
    page, _ = open_page(f"{bridge_url}/?sym={symbol}&interval=100")
    wait_until_live(page)
    wait_for_candles(page, count=160, timeout=20)
    bars = page_bars(page)
    point = page.evaluate(f"window.polyfan.pointOf({bars[-12]['s']})")
    page.mouse.move(point["x"], point["y"])
    page.wait_for_function("document.getElementById('legend').dataset.hovered === 'true'")
    page.wait_for_function("Number(document.getElementById('stat-rate').textContent) > 0")
    path = ROOT / "docs" / "screenshot.png"
    page.screenshot(path=str(path))
    assert path.stat().st_size > 10_000


def test_bars_spanning_an_upstream_outage_are_shown_as_outage(
    open_page: Pages, pipeline: Pipeline, bridge_url: str
) -> None:
    page, _ = open_page(f"{bridge_url}/?interval=1000")
    wait_until_live(page)
    wait_for_candles(page)
    pipeline.interrupt_upstream()  # the proxy loses the sim and reconnects
    # Wait for the outage to be over on the chart: its bars (often two) all closed.
    page.wait_for_function(
        "(() => { const b = window.polyfan.bars(); return b.some((x) => x.outage) && !b.at(-1).outage; })()",
        timeout=15_000,
    )
    stored = assert_chart_matches_api(page, bridge_url)
    outages = [b["s"] for b in stored if b["outage"]]
    assert outages, "the API has no outage bar where the chart has one"
    # Drawn in the outage colour, marked on the chart, and named in the legend.
    assert page.evaluate(f"window.polyfan.candleColor({outages[0]})") == "#b58cff"
    marked = page.evaluate("window.polyfan.markers()")
    outage_marks = [m for m in marked if m["text"] in ("outage", "")]
    assert outage_marks and outage_marks[0] == {"s": outages[0], "text": "outage"}
    assert {m["s"] for m in outage_marks if m["s"] <= stored[-1]["s"]} == set(outages)
    # The bridge said so too (feed_down, then feed_up with the window): both drawn on the chart.
    page.wait_for_function("window.polyfan.feedWindows().some((w) => w.e !== null)")
    ((window),) = page.evaluate("window.polyfan.feedWindows()")
    assert window["s"] <= window["e"]
    feed_marks = {m["text"]: m["s"] for m in page.evaluate("window.polyfan.markers()")}
    assert feed_marks["feed down"] <= feed_marks["feed up"]
    regular = next(b["s"] for b in stored if not b["outage"])
    assert page.evaluate(f"window.polyfan.candleColor({regular})") is None
    point = page.evaluate(f"window.polyfan.pointOf({outages[0]})")
    page.mouse.move(point["x"], point["y"])
    # Read the legend at one instant: a live bar scrolls the chart under the still mouse, and
    # the legend may show the next bar by the time a second read comes.
    legend_shows_the_outage_bar = f"""(() => {{
        const legend = document.getElementById('legend');
        return legend.dataset.s === '{outages[0]}'
            && !document.getElementById('legend-outage').hidden
            && legend.dataset.direction === 'outage';
    }})()"""
    page.wait_for_function(legend_shows_the_outage_bar)
