// polyfan's live chart page: history over HTTP, live bars over the WebSocket protocol of
// CONTRACT §4, drawn with TradingView's lightweight-charts (served from /static/vendor/).
//
// This module is the shell: DOM, fetch, WebSocket and the chart. The pure helpers (time axis
// mapping, formatting, precision, backoff, merging) live in core.js.
//
// Time axis: lightweight-charts counts time in whole seconds, and our bars go down to 100 ms.
// Each bar is placed at time = s / interval (its index since the epoch), and the formatters
// turn that back into the real HH:MM:SS.mmm. Because bars are epoch aligned, the library's
// "new minute / hour" tick weights land on real round times (every 60 / 3600 bars). See
// docs/page.md.

import {
  backoffDelay,
  barStart,
  chartTime,
  decimalsOf,
  formatClock,
  formatDate,
  formatTick,
  formatVolume,
  intervalLabel,
  mergeSorted,
  pricePrecision,
  sameBar,
} from "/static/core.js";

const LWC = globalThis.LightweightCharts;
if (!LWC) {
  // Installed without the front-end build step (bin/_bootstrap runs it: npm ci, build-assets).
  document.getElementById("message").textContent =
    "the chart library is missing from /static/vendor/: run `npm ci && node bin/build-assets.mjs`";
  throw new Error("lightweight-charts is not loaded (/static/vendor/ is empty)");
}

const COLORS = {
  up: "#26a69a",
  down: "#ef5350",
  outage: "#b58cff",
  upVolume: "rgba(38, 166, 154, 0.45)",
  downVolume: "rgba(239, 83, 80, 0.45)",
  outageVolume: "rgba(181, 140, 255, 0.6)",
  text: "#8b94a3",
  grid: "rgba(42, 49, 61, 0.55)",
  border: "#222a35",
};

const SCROLL_BACK_MARGIN = 40; // bars left of the first one held before older ones are fetched
const RATE_WINDOW_MS = 5000;
const SLOW_MS = 1000; // a live bar arriving later than this after its end is shown as slow
const STALE_MS = 10_000; // a bar that ended longer ago is a replay, not live (for the stats)
const MAX_BARS = 20_000; // held per channel; the oldest tenth is dropped past this
const SYMBOL_RE = /^[A-Za-z0-9.:/_-]{1,32}$/;

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
// The token comes in the URL fragment (/#token=…), which the browser never sends to a server
// or puts in a Referer; ?token=… still works. It leaves the page only in the WebSocket auth
// message and the Authorization header of its HTTP requests.
const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));

// Bars per history request (on load and per scroll-back page); ?limit=N overrides it.
const HISTORY_LIMIT = Math.min(Math.max(Math.trunc(Number(params.get("limit"))) || 600, 10), 5000);

// ---------------------------------------------------------------- state

const state = {
  token: fragment.get("token") || params.get("token") || "polyfan",
  intervals: [],
  symbol: null,
  interval: null,
  generation: 0, // bumped on every channel switch; stale fetches and bars are dropped
  bars: [], // MB objects of the current channel, sorted by s, unique s
  feedWindows: [], // {s, e} on the feed clock from feed_down / feed_up (e null while down)
  index: new Map(), // s -> position in bars
  precision: 2,
  olderLoading: false,
  olderExhausted: false,
  hovered: null, // the bar under the crosshair, or null for "the last bar"
  liveTimes: [], // receive times of live bars, for bars/s
  liveSince: null, // when the current subscription went live (performance.now())
  lastDelayMs: null,
  liveBarCount: 0,
  historyLoaded: false, // the current channel's history request has finished
  everLive: false,
  authFailed: false,
  lastClose: null, // {code, reason} of the last close of the socket
};

const channel = () => `${state.interval}Ms.${state.symbol}`;
const lastBar = () => (state.bars.length ? state.bars[state.bars.length - 1] : null);

// ---------------------------------------------------------------- chart

const chartBox = $("chart");
const chart = LWC.createChart(chartBox, {
  autoSize: true,
  layout: {
    background: { type: LWC.ColorType.Solid, color: "transparent" },
    textColor: COLORS.text,
    fontFamily: getComputedStyle(document.documentElement).getPropertyValue("--mono").trim(),
    fontSize: 11,
    attributionLogo: true,
    panes: { separatorColor: COLORS.border, separatorHoverColor: "rgba(120, 130, 150, 0.25)" },
  },
  grid: { vertLines: { color: COLORS.grid }, horzLines: { color: COLORS.grid } },
  crosshair: { mode: LWC.CrosshairMode.Normal },
  rightPriceScale: { borderColor: COLORS.border },
  timeScale: {
    borderColor: COLORS.border,
    timeVisible: true,
    secondsVisible: true,
    rightOffset: 4,
    barSpacing: 8,
    minBarSpacing: 0.5,
    tickMarkMaxCharacterLength: 12,
    tickMarkFormatter: (time) => formatTick(barStart(time, state.interval)),
  },
  localization: {
    timeFormatter: (time) => formatClock(barStart(time, state.interval), state.interval < 1000),
  },
});

const candles = chart.addSeries(LWC.CandlestickSeries, {
  upColor: COLORS.up,
  downColor: COLORS.down,
  borderUpColor: COLORS.up,
  borderDownColor: COLORS.down,
  wickUpColor: COLORS.up,
  wickDownColor: COLORS.down,
  priceLineWidth: 1,
});
const volume = chart.addSeries(
  LWC.HistogramSeries,
  { priceFormat: { type: "volume" }, priceLineVisible: false, lastValueVisible: true },
  1,
);
chart.panes()[0].setStretchFactor(3);
chart.panes()[1].setStretchFactor(1);
const markers = LWC.createSeriesMarkers(candles, []);

function toCandle(b) {
  const candle = { time: chartTime(b.s, state.interval), open: b.o, high: b.h, low: b.l, close: b.c };
  if (b.outage) {
    candle.color = COLORS.outage;
    candle.borderColor = COLORS.outage;
    candle.wickColor = COLORS.outage;
  }
  return candle;
}

function toVolume(b) {
  const color = b.outage ? COLORS.outageVolume : b.c >= b.o ? COLORS.upVolume : COLORS.downVolume;
  return { time: chartTime(b.s, state.interval), value: b.v, color };
}

/** A feed-clock time as the status line shows it: HH:MM:SS.mmm UTC. */
function feedTime(ms) {
  return `${new Date(ms).toISOString().slice(11, 23)} UTC`;
}

/** Where the feed went down and came back (feed_down / feed_up), on the nearest bars. */
function feedMarkers() {
  const list = [];
  const bars = state.bars;
  if (!bars.length) return list;
  const at = (ms, position, text) => {
    let i = bars.findIndex((b) => b.s + state.interval > ms);
    if (i < 0) i = bars.length - 1;
    list.push({
      time: chartTime(bars[i].s, state.interval),
      position,
      shape: position === "belowBar" ? "arrowUp" : "arrowDown",
      color: COLORS.outage,
      size: 1,
      text,
    });
  };
  for (const w of state.feedWindows) {
    at(w.s, "aboveBar", "feed down"); // on the last bar while none reaches past it yet
    if (w.e !== null) at(w.e, "belowBar", "feed up");
  }
  return list;
}

function allMarkers() {
  return [...outageMarkers(), ...feedMarkers()].sort((a, b) => a.time - b.time);
}

function outageMarkers() {
  const list = [];
  for (const b of state.bars) {
    if (b.outage) {
      list.push({
        time: chartTime(b.s, state.interval),
        position: "aboveBar",
        shape: "square",
        color: COLORS.outage,
        size: 0.6,
        text: list.length && list[list.length - 1].time === chartTime(b.s, state.interval) - 1 ? "" : "outage",
      });
    }
  }
  return list;
}

function applyPrecision() {
  const precision = pricePrecision(state.bars);
  if (precision !== state.precision) {
    state.precision = precision;
    candles.applyOptions({ priceFormat: { type: "price", precision, minMove: 10 ** -precision } });
  }
}

function reindex() {
  state.index = new Map(state.bars.map((b, i) => [b.s, i]));
}

/** Replace everything the series hold with state.bars (history loads, gap fills, resets). */
function redraw() {
  reindex();
  applyPrecision();
  candles.setData(state.bars.map(toCandle));
  volume.setData(state.bars.map(toVolume));
  markers.setMarkers(allMarkers());
  renderLegend();
  $("stat-count").textContent = String(state.bars.length);
}

/** Merge bars of the current channel (any order, may overlap what is held). */
function mergeBars(incoming) {
  const appended = [];
  let rewrite = false; // something older than the last bar changed: redraw everything
  for (const b of incoming) {
    const last = lastBar();
    const at = state.index.get(b.s);
    if (at !== undefined) {
      // A repeat (the seam of a `since` subscription): the server's copy wins.
      if (!sameBar(state.bars[at], b)) {
        state.bars[at] = b;
        if (at === state.bars.length - 1) appended.push(b);
        else rewrite = true;
      }
    } else if (!last || b.s > last.s) {
      state.index.set(b.s, state.bars.length);
      state.bars.push(b);
      appended.push(b);
    } else {
      state.bars.push(b);
      state.bars.sort((x, y) => x.s - y.s);
      reindex();
      rewrite = true;
    }
  }
  if (state.bars.length > MAX_BARS) {
    state.bars.splice(0, state.bars.length - MAX_BARS + MAX_BARS / 10);
    state.olderExhausted = false; // what was dropped can be paged back in
    rewrite = true;
  }
  if (rewrite) {
    redraw();
    return;
  }
  for (const b of appended) {
    candles.update(toCandle(b));
    volume.update(toVolume(b));
  }
  if (appended.some((b) => b.outage) || state.feedWindows.length) markers.setMarkers(allMarkers());
  if (appended.some((b) => pricePrecision([b]) > state.precision)) applyPrecision();
  if (state.hovered === null) renderLegend();
  $("stat-count").textContent = String(state.bars.length);
}

// ---------------------------------------------------------------- legend and stats

function renderLegend() {
  const b = state.hovered ?? lastBar();
  $("legend-sym").textContent = state.symbol ?? "—";
  $("legend-interval").textContent = state.interval ? intervalLabel(state.interval) : "";
  const fields = document.querySelectorAll("#legend [data-field]");
  if (!b) {
    $("legend-time").textContent = "";
    for (const el of fields) el.textContent = "";
    $("legend-outage").hidden = true;
    return;
  }
  const text = {
    o: b.o.toFixed(state.precision),
    h: b.h.toFixed(state.precision),
    l: b.l.toFixed(state.precision),
    c: b.c.toFixed(state.precision),
    v: formatVolume(b.v),
    vw: b.vw === null || b.vw === undefined ? "—" : b.vw.toFixed(Math.max(state.precision, 4)),
    n: String(b.n),
    change: "",
  };
  const previous = state.index.has(b.s) ? state.bars[state.index.get(b.s) - 1] : undefined;
  if (previous) {
    const delta = b.c - previous.c;
    text.change = `${delta >= 0 ? "+" : ""}${((delta / previous.c) * 100).toFixed(2)}%`;
  }
  for (const el of fields) el.textContent = text[el.dataset.field];
  const legend = $("legend");
  legend.dataset.s = String(b.s);
  legend.dataset.hovered = String(state.hovered !== null);
  legend.dataset.direction = b.outage ? "outage" : b.c >= b.o ? "up" : "down";
  $("legend-time").textContent = `${formatDate(b.s)} ${formatClock(b.s, state.interval < 1000)}`;
  $("legend-outage").hidden = !b.outage;
}

chart.subscribeCrosshairMove((param) => {
  const hovered =
    param.time === undefined ? null : (state.bars[state.index.get(barStart(param.time, state.interval))] ?? null);
  if (hovered !== state.hovered) {
    state.hovered = hovered;
    renderLegend();
  }
});

function renderStats() {
  const now = performance.now();
  while (state.liveTimes.length && now - state.liveTimes[0] > RATE_WINDOW_MS) state.liveTimes.shift();
  // Over the last 5 s, or since the subscription went live when that is more recent.
  const span = state.liveSince === null ? RATE_WINDOW_MS : Math.min(RATE_WINDOW_MS, now - state.liveSince);
  const rate = span >= 1000 ? state.liveTimes.length / (span / 1000) : 0;
  $("stat-rate").textContent = rate.toFixed(1);
  $("stat-delay").textContent = state.lastDelayMs === null ? "—" : `${state.lastDelayMs} ms`;
  $("stat-delay").classList.toggle("slow", state.lastDelayMs !== null && state.lastDelayMs > SLOW_MS);
}
setInterval(renderStats, 500);

function showMessage(text) {
  $("message").textContent = text;
}

// ---------------------------------------------------------------- HTTP

async function getJSON(url) {
  const response = await fetch(url, {
    headers: { Accept: "application/json", Authorization: `Bearer ${state.token}` },
  });
  if (!response.ok) {
    const error = new Error(`${url}: HTTP ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return response.json();
}

function barsUrl(before) {
  const query = new URLSearchParams({ channel: channel(), limit: String(HISTORY_LIMIT) });
  if (before !== undefined) query.set("before", String(before));
  return `/api/bars?${query}`;
}

async function loadHistory() {
  const generation = state.generation;
  let bars;
  try {
    bars = await getJSON(barsUrl());
  } catch (error) {
    showMessage(`history: ${error.message}`);
    bars = [];
  }
  if (generation !== state.generation) return;
  state.historyLoaded = true;
  // Live bars may already have arrived (the socket was subscribed first): merge, do not replace.
  state.bars = mergeSorted(bars, state.bars);
  redraw();
  chart.timeScale().scrollToRealTime();
}

async function loadOlder() {
  if (state.olderLoading || state.olderExhausted || !state.bars.length) return;
  const generation = state.generation;
  state.olderLoading = true;
  try {
    const older = await getJSON(barsUrl(state.bars[0].s));
    if (generation !== state.generation) return;
    if (!older.length) {
      state.olderExhausted = true;
      return;
    }
    state.bars = mergeSorted(older, state.bars);
    redraw();
  } catch (error) {
    showMessage(`older bars: ${error.message}`);
  } finally {
    if (generation === state.generation) state.olderLoading = false;
  }
}

chart.timeScale().subscribeVisibleLogicalRangeChange((range) => {
  if (range && range.from < SCROLL_BACK_MARGIN) loadOlder();
});

// ---------------------------------------------------------------- WebSocket

const feed = {
  socket: null,
  attempt: 0,
  authSent: false, // auth went out on this socket (after the server's "connected")
  subscribed: null, // channel we asked for on this socket
  timer: null, // reconnect
  retry: null, // re-subscribe after the server refused the subscription
  retries: 0,
};

function setConnection(status) {
  const el = $("conn");
  el.dataset.state = status;
  el.querySelector(".conn-label").textContent = status;
}

function send(message) {
  if (feed.socket && feed.socket.readyState === WebSocket.OPEN) {
    feed.socket.send(JSON.stringify(message));
  }
}

function subscribeCurrent() {
  if (!state.historyLoaded || !feed.authSent || feed.subscribed === channel()) return;
  const message = { action: "subscribe", params: channel() };
  // Everything from the last bar held on (inclusive: the seam is deduplicated by s), or, before
  // any bar is held, the same window the history request covers.
  const last = lastBar();
  message.since = last ? last.s : Date.now() - HISTORY_LIMIT * state.interval;
  send(message);
  feed.subscribed = channel();
}

function connect() {
  clearTimeout(feed.timer);
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const socket = new WebSocket(`${scheme}//${location.host}/stocks`);
  feed.socket = socket;
  feed.authSent = false;
  feed.subscribed = null;
  setConnection(feed.attempt === 0 && !state.everLive ? "connecting" : "reconnecting");
  socket.onmessage = (event) => {
    if (socket !== feed.socket) return;
    let events;
    try {
      events = JSON.parse(event.data);
    } catch {
      showMessage("server sent a frame that is not JSON");
      return;
    }
    const bars = [];
    for (const ev of events) {
      if (ev.ev === "MB") {
        if (ev.sym === state.symbol && ev.interval === state.interval) bars.push(ev);
      } else if (ev.ev === "status") {
        onStatus(ev);
      }
    }
    if (bars.length) onBars(bars);
  };
  socket.onclose = (event) => {
    if (socket !== feed.socket) return;
    feed.socket = null;
    feed.authSent = false;
    if (state.authFailed) return;
    state.lastClose = { code: event.code, reason: event.reason };
    if (event.code !== 1006) showMessage(`connection closed: ${event.code} ${event.reason}`.trim());
    setConnection("reconnecting");
    feed.timer = setTimeout(connect, backoffDelay(feed.attempt++));
  };
}

function onStatus(ev) {
  switch (ev.status) {
    case "connected":
      // A window still open from before this connection: the bridge says feed_down again
      // after the subscribe if it is still down (and a feed_up missed while away is unknown).
      state.feedWindows = state.feedWindows.filter((w) => w.e !== null);
      send({ action: "auth", params: state.token });
      feed.authSent = true; // the server takes auth and subscribe back to back, in order
      subscribeCurrent();
      break;
    case "auth_success":
      break;
    case "feed_down": {
      // The feed behind our channels may be losing trades from ev.s on (CONTRACT §12).
      const open = state.feedWindows.find((w) => w.e === null);
      if (!open) state.feedWindows.push({ s: ev.s, e: null });
      setConnection("feed down");
      showMessage(`feed down since ${feedTime(ev.s)}: trades may be missing`);
      markers.setMarkers(allMarkers());
      break;
    }
    case "feed_up": {
      const open = state.feedWindows.find((w) => w.e === null);
      if (open) {
        open.s = ev.s;
        open.e = ev.e;
      } else {
        state.feedWindows.push({ s: ev.s, e: ev.e });
      }
      setConnection("live");
      showMessage(`feed back; ${feedTime(ev.s)} to ${feedTime(ev.e)} may lack trades`);
      markers.setMarkers(allMarkers());
      break;
    }
    case "auth_failed":
      state.authFailed = true;
      setConnection("auth failed");
      showMessage(`authentication failed: ${ev.message}; add #token=… to the URL`);
      break;
    case "success":
      // Exactly ours: "unsubscribed to: <ours>" (a quick switch back) or "…: 1500Ms.A" for
      // 500Ms.A would end with the same text.
      if (ev.message === `subscribed to: ${channel()}`) {
        feed.attempt = 0;
        feed.retries = 0;
        state.everLive = true;
        state.liveSince ??= performance.now();
        setConnection("live");
        showMessage("");
      }
      break;
    case "error":
      showMessage(ev.message);
      // Our subscription was refused (e.g. a restarted bridge that has not heard its
      // aggregators yet): ask again after a backoff; `since` still covers everything missed.
      if (feed.subscribed === channel() && ev.message?.startsWith(`${channel()}:`)) {
        feed.subscribed = null;
        const socket = feed.socket;
        clearTimeout(feed.retry);
        feed.retry = setTimeout(() => {
          if (socket === feed.socket) subscribeCurrent();
        }, backoffDelay(feed.retries++));
      }
      break;
    default:
      break;
  }
}

function onBars(bars) {
  const now = Date.now();
  const tick = performance.now();
  const last = lastBar();
  let newest = null;
  for (const b of bars) {
    // New bars count as live; the stats leave out the replay of a gap (`since`) by age.
    if ((!last || b.s > last.s) && now - b.e < STALE_MS) {
      state.liveBarCount += 1;
      state.liveTimes.push(tick);
      newest = b;
    }
  }
  if (newest) state.lastDelayMs = now - newest.e;
  mergeBars(bars);
}

// ---------------------------------------------------------------- controls

function selectChannel(symbol, interval) {
  if (symbol === state.symbol && interval === state.interval) return;
  if (feed.subscribed) send({ action: "unsubscribe", params: feed.subscribed });
  feed.subscribed = null;
  clearTimeout(feed.retry);
  feed.retries = 0;
  state.generation += 1;
  state.symbol = symbol;
  state.interval = interval;
  state.bars = [];
  state.index = new Map();
  state.hovered = null;
  state.olderExhausted = false;
  state.olderLoading = false;
  state.liveTimes = [];
  state.liveSince = null;
  state.lastDelayMs = null;
  state.historyLoaded = false;
  redraw();
  $("symbol").value = symbol;
  for (const button of document.querySelectorAll("#intervals button")) {
    button.setAttribute("aria-checked", String(Number(button.dataset.interval) === interval));
  }
  const query = new URLSearchParams(location.search);
  query.set("sym", symbol);
  query.set("interval", String(interval));
  history.replaceState(null, "", `?${query}`);
  document.title = `${symbol} ${intervalLabel(interval)} · polyfan`;
  // History first, then the socket subscription with since = the last bar held.
  loadHistory().then(subscribeCurrent);
}

function buildIntervalPicker() {
  const box = $("intervals");
  box.replaceChildren();
  for (const interval of state.intervals) {
    const button = document.createElement("button");
    button.type = "button";
    button.setAttribute("role", "radio");
    button.dataset.interval = String(interval);
    button.textContent = intervalLabel(interval);
    button.addEventListener("click", () => selectChannel(state.symbol, interval));
    box.append(button);
  }
}

async function refreshSymbols() {
  try {
    const symbols = await getJSON("/api/symbols");
    const list = $("symbol-list");
    list.replaceChildren(
      ...symbols.map(({ sym, trades }) => {
        const option = document.createElement("option");
        option.value = sym;
        option.label = `${trades.toLocaleString("en-US")} trades`;
        return option;
      }),
    );
    return symbols;
  } catch (error) {
    showMessage(`symbols: ${error.message}`);
    return [];
  }
}

$("symbol-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const symbol = $("symbol").value.trim().toUpperCase();
  if (!SYMBOL_RE.test(symbol)) {
    showMessage(`"${symbol}" is not a symbol (1 to 32 of A-Z 0-9 . : / _ -)`);
    return;
  }
  $("symbol").blur();
  selectChannel(symbol, state.interval);
});
$("symbol").addEventListener("change", () => $("symbol-form").requestSubmit());
$("symbol").addEventListener("focus", () => {
  $("symbol").select();
  refreshSymbols();
});

// Keyboard: "/" focuses the symbol box, 1-9 pick an interval (as listed), Escape leaves the box.
document.addEventListener("keydown", (event) => {
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  if (event.target instanceof HTMLInputElement) {
    if (event.key === "Escape") event.target.blur();
    return;
  }
  if (event.key === "/") {
    event.preventDefault();
    $("symbol").focus();
  } else if (/^[1-9]$/.test(event.key) && state.intervals[Number(event.key) - 1] !== undefined) {
    selectChannel(state.symbol, state.intervals[Number(event.key) - 1]);
  }
});

// ---------------------------------------------------------------- start

function pickInterval(intervals, wanted) {
  if (intervals.includes(wanted)) return wanted;
  return intervals.find((i) => i >= 500) ?? intervals[0];
}

/** The intervals the aggregators serve; waits (with backoff) until the bridge has heard one. */
async function servedIntervals() {
  for (let attempt = 0; ; attempt++) {
    try {
      const info = await getJSON("/api/info");
      if (info.intervals?.length) return [...info.intervals].sort((a, b) => a - b);
      showMessage("waiting for an aggregator: the bridge has not heard one yet");
    } catch (error) {
      if (error.status === 401) {
        // the bridge wants a token and this one is not it: asking again will not help
        state.authFailed = true;
        setConnection("auth failed");
        showMessage("authentication failed: wrong or missing token; add #token=… to the URL");
        return null;
      }
      showMessage(`info: ${error.message}`);
    }
    await new Promise((resolve) => setTimeout(resolve, backoffDelay(attempt)));
  }
}

async function start() {
  const intervals = await servedIntervals();
  if (intervals === null) return;
  state.intervals = intervals;
  showMessage("");
  buildIntervalPicker();
  const symbols = await refreshSymbols();
  const wanted = (params.get("sym") || "").trim().toUpperCase();
  if (wanted && !SYMBOL_RE.test(wanted)) showMessage(`"${wanted}" is not a symbol`);
  const symbol = SYMBOL_RE.test(wanted) ? wanted : (symbols[0]?.sym ?? "AAPL");
  const interval = pickInterval(state.intervals, Number(params.get("interval") || 500));
  connect();
  selectChannel(symbol, interval);
}

// For the browser tests and the curious: what the chart holds, read back from the series.
globalThis.polyfan = {
  chart,
  channel,
  connection: () => $("conn").dataset.state,
  bars() {
    const volumes = new Map(volume.data().map((d) => [d.time, d.value]));
    return candles.data().map((d) => {
      const s = barStart(d.time, state.interval);
      return {
        s,
        o: d.open,
        h: d.high,
        l: d.low,
        c: d.close,
        v: volumes.get(d.time),
        outage: Boolean(state.bars[state.index.get(s)]?.outage),
      };
    });
  },
  /** Page coordinates of the middle of the candle that starts at s (for crosshair tests). */
  pointOf(s) {
    const x = chart.timeScale().timeToCoordinate(chartTime(s, state.interval));
    const b = state.bars[state.index.get(s)];
    if (x === null || !b) return null;
    const y = candles.priceToCoordinate((b.o + b.c) / 2);
    const box = chartBox.getBoundingClientRect();
    return { x: box.left + x, y: box.top + (y ?? 20) };
  },
  /** The feed windows the page was told of (feed_down / feed_up), as {s, e}. */
  feedWindows: () => state.feedWindows.map((w) => ({ ...w })),
  /** The outage markers drawn on the chart, as {s, text}. */
  markers: () => markers.markers().map((m) => ({ s: barStart(m.time, state.interval), text: m.text })),
  /** What the candle of bar s is painted with (the outage colour for outage bars). */
  candleColor(s) {
    const d = candles.data().find((c) => c.time === chartTime(s, state.interval));
    return d ? (d.color ?? null) : undefined;
  },
  lastClose: () => state.lastClose ?? null,
  message: () => $("message").textContent,
  stats: () => ({
    liveBars: state.liveBarCount,
    lastDelayMs: state.lastDelayMs,
    olderExhausted: state.olderExhausted,
    olderLoading: state.olderLoading,
  }),
};

start();
