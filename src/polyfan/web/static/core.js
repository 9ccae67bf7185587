// The chart page's pure helpers: values in, values out; no DOM, no network, no chart.
// app.js is the shell around them. The browser tests import this module in the page and
// check these functions directly (tests/test_page_browser.py).

export const BACKOFF_MIN_MS = 250;
export const BACKOFF_MAX_MS = 5000;

const pad = (n, width = 2) => String(n).padStart(width, "0");

/**
 * lightweight-charts counts time in whole seconds; bars go down to 100 ms. A bar is placed at
 * its index since the epoch, s / interval (an integer: bars are epoch aligned), and the
 * formatters map the index back to real time. See docs/page.md.
 */
export const chartTime = (s, interval) => s / interval;
export const barStart = (time, interval) => time * interval;

/** "HH:MM:SS" or "HH:MM:SS.mmm" in the browser's time zone. */
export function formatClock(ms, withMillis) {
  const d = new Date(ms);
  const hms = `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  return withMillis ? `${hms}.${pad(d.getMilliseconds(), 3)}` : hms;
}

/** "YYYY-MM-DD" in the browser's time zone. */
export function formatDate(ms) {
  const d = new Date(ms);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;
}

/** A time-axis label: the coarsest round unit the instant falls on (date, HH:MM, HH:MM:SS, .mmm). */
export function formatTick(ms) {
  const d = new Date(ms);
  if (d.getMilliseconds() !== 0) return formatClock(ms, true);
  if (d.getHours() === 0 && d.getMinutes() === 0 && d.getSeconds() === 0) {
    return d.toLocaleDateString("en-US", { month: "short", day: "numeric" });
  }
  if (d.getSeconds() !== 0) return formatClock(ms, false);
  return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
}

/** 100 -> "100ms", 1000 -> "1s", 60000 -> "1m", 3600000 -> "1h". */
export function intervalLabel(ms) {
  if (ms % 3_600_000 === 0) return `${ms / 3_600_000}h`;
  if (ms % 60_000 === 0) return `${ms / 60_000}m`;
  if (ms % 1000 === 0) return `${ms / 1000}s`;
  return `${ms}ms`;
}

/** Decimal places in the shortest spelling of x (0.1 -> 1, 12.345 -> 3, 1e-7 -> 7). */
export function decimalsOf(x) {
  if (!Number.isFinite(x) || Number.isInteger(x)) return 0;
  const text = String(x);
  const exp = text.indexOf("e-");
  if (exp >= 0) {
    const mantissa = text.slice(0, exp);
    const dot = mantissa.indexOf(".");
    return Number(text.slice(exp + 2)) + (dot >= 0 ? mantissa.length - dot - 1 : 0);
  }
  return text.length - text.indexOf(".") - 1;
}

/** The price precision that shows every o/h/l/c exactly: at least 2, at most 6 decimals. */
export function pricePrecision(bars) {
  let precision = 2;
  for (const b of bars) {
    precision = Math.max(precision, decimalsOf(b.o), decimalsOf(b.h), decimalsOf(b.l), decimalsOf(b.c));
  }
  return Math.min(precision, 6);
}

/** Volume as the legend shows it: thousands separated, up to 4 decimals (fractional shares). */
export const formatVolume = (v) => v.toLocaleString("en-US", { maximumFractionDigits: 4 });

/** Reconnect delay n (from 0): uniform in [d/2, d], d = min(5 s, 250 ms * 2^n). */
export function backoffDelay(attempt, random = Math.random) {
  const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** Math.min(attempt, 30));
  return ceiling / 2 + random() * (ceiling / 2);
}

/** Bars from a and b by bar start s, sorted; on a repeated s the copy from b wins. */
export function mergeSorted(a, b) {
  const byStart = new Map();
  for (const bar of a) byStart.set(bar.s, bar);
  for (const bar of b) byStart.set(bar.s, bar);
  return [...byStart.values()].sort((x, y) => x.s - y.s);
}

/** Whether two MB bars carry the same values. */
export const sameBar = (a, b) =>
  a.o === b.o && a.h === b.h && a.l === b.l && a.c === b.c && a.v === b.v && a.vw === b.vw &&
  a.n === b.n && Boolean(a.outage) === Boolean(b.outage);
