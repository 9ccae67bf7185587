"""``polyfan replay`` as a user runs it: a Polygon flat file made here, replayed at ``--speed
max`` into a real ``polyfan proxy`` and ``polyfan agg``, gives exactly the bars that pandas
computes over the file.

The reference is written here, fresh, with pandas: the condition rules restated from
shared/polygon/conditions.md (not the project's table, kernels or tests/reference.py), a stable
sort by SIP time (the order the replay sends and the agg applies), a groupby per symbol,
interval and bar start. Sums are taken one trade after another in that order, as the agg adds
them, so every field, ``v`` and ``vw`` included, must match bit for bit.

How the last bars close: the replay's trades are the feed clock (the proxy's clock is the
largest trade time); after the last trade nothing moves it but the proxy's idle rule (CONTRACT
§3: 1 s after the last trade it advances with wall time). So every bar closes, the last ones a
few seconds after the replay ends, and the test waits for the agg's relayed clock to pass the
last bar's ``e + grace`` before comparing: by then every bar there will ever be has been
published (the agg publishes bars before the clock that closed them).
"""

from __future__ import annotations

import contextlib
import csv
import functools
import gzip
import operator
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import zmq

from polyfan.wire import codec
from procs import Context, Proc, endpoint, free_port, scrape

INTERVALS = (100, 250, 1_000, 5_000)
GRACE = 250
BASE_NS = 1_710_513_000_000_000_000  # 2024-03-15T14:30:00Z
HEADER = [
    "ticker", "conditions", "correction", "exchange", "id", "participant_timestamp", "price",
    "sequence_number", "sip_timestamp", "size", "tape", "trf_id", "trf_timestamp",
]  # fmt: skip

# --- shared/polygon/conditions.md, restated for this test -----------------------------------
IN_TABLE = {*range(1, 26), *range(27, 39), 41, 52, 53, 55}
NO_HIGH_LOW = {2, 7, 12, 13, 15, 16, 20, 21, 29, 37, 52, 53}
NO_OPEN_CLOSE = {2, 5, 7, 10, 12, 13, 15, 16, 20, 21, 22, 29, 32, 33, 37, 52, 53}
NO_VOLUME = {15, 16, 38}
INDICATORS = {57, 58, 59, 60, *range(62, 72)}
FORM_T = 12  # updates H/L and O/C too, as Polygon's intraday bars do (CONTRACT §3)


def qualifies(codes: list[int]) -> tuple[bool, bool, bool]:
    """(H/L, O/C, volume): a trade qualifies only if every code allows it."""
    high_low = open_close = volume = True
    for code in codes:
        if code == 0 or code in INDICATORS or code == FORM_T:
            continue
        if code not in IN_TABLE:  # unknown: volume only
            high_low = open_close = False
            continue
        high_low &= code not in NO_HIGH_LOW
        open_close &= code not in NO_OPEN_CLOSE
        volume &= code not in NO_VOLUME
    return high_low, open_close, volume


# --- the flat file ------------------------------------------------------------------------

SYMBOLS = ("AAPL", "A", "BRK.A", "TSLA", "MSFT", "F")
CONDITIONS = [
    "", "", "", "", "", "", "12,37", "14,41", "37", "37", "12", "14", "2", "15", "16", "32",
    "10", "22", "38", "7", "53", "99", "0", "14,57", "14,37,41", "5", "29",
]  # fmt: skip


def write_flat_file(path: Path, rng: random.Random, count: int) -> None:
    """A Polygon trades flat file as the vendor lays it out: sorted by ticker, then SIP time;
    ns timestamps; quoted multi-code conditions; TRF prints (exchange 4, trf_id, trf_timestamp)."""
    rows = []
    prices = {symbol: 20.0 + 37 * i for i, symbol in enumerate(SYMBOLS)}
    sequence = dict.fromkeys(SYMBOLS, 1000)
    weights = [6, 1, 2, 4, 3, 1]
    for i in range(count):
        symbol = rng.choices(SYMBOLS, weights)[0]
        # ~8 s of SIP time; equal milliseconds (and equal nanoseconds) happen
        sip = BASE_NS + rng.randrange(0, 8_000) * 1_000_000
        if rng.random() < 0.5:
            sip += rng.choice((0, 0, 1, 999_999, rng.randrange(1_000_000)))
        prices[symbol] = round(max(1.0, prices[symbol] + rng.choice((-0.02, -0.01, 0, 0.01))), 2)
        price = prices[symbol]
        trf = rng.random() < 0.35
        if trf and rng.random() < 0.3:
            price = round(price + rng.choice((-0.005, 0.0049)), 4)  # sub-penny TRF print
        size: float = rng.choice((100, 100, 200, 300, 1_000, 37, 5, 1))
        if rng.random() < 0.05:
            size = rng.choice((0.5, 1.25, 0.0125))
        sequence[symbol] += rng.randint(1, 9)
        rows.append(
            {
                "ticker": symbol,
                "conditions": rng.choice(CONDITIONS),
                "correction": 0,
                "exchange": 4 if trf else rng.choice((1, 2, 7, 11, 12, 15)),
                "id": str(10_000 + i),
                "participant_timestamp": sip - rng.randrange(0, 3_000_000),
                "price": price,
                "sequence_number": 0,  # filled below, in SIP order per ticker
                "sip_timestamp": sip,
                "size": size,
                "tape": rng.choice((1, 2, 3)),
                "trf_id": rng.choice((201, 202, 203)) if trf else "",
                "trf_timestamp": sip + rng.randrange(0, 2_000_000) if trf else "",
            }
        )
    rows.sort(key=lambda r: (r["ticker"], r["sip_timestamp"]))
    for row in rows:
        sequence[row["ticker"]] += rng.randint(1, 9)
        row["sequence_number"] = sequence[row["ticker"]]
    with gzip.open(path, "wt", newline="") as file:
        writer = csv.DictWriter(file, HEADER)  # quotes "12,37" as the vendor's files do
        writer.writeheader()
        writer.writerows(rows)


# --- the reference, with pandas -----------------------------------------------------------


def sequential_sum(values: pd.Series) -> float:
    """One value after another from 0.0, in the series' order: the agg's own arithmetic."""
    return float(functools.reduce(operator.add, values.tolist(), 0.0))


def reference_bars(trades: pd.DataFrame) -> pd.DataFrame:
    """Every bar CONTRACT §3 defines over ``trades`` (in the order the agg applies them)."""
    rules = trades["codes"].map(qualifies)
    trades = trades.assign(
        hl=rules.str[0],
        oc=rules.str[1],
        vol=rules.str[2],
        pv=trades["price"] * trades["size"],
    )
    trades = trades[trades["hl"] | trades["oc"] | trades["vol"]]
    bars = []
    for interval in INTERVALS:
        frame = trades.assign(interval=interval, s=trades["t"] // interval * interval)
        groups = frame.groupby(["ticker", "interval", "s"], sort=True)
        first = groups["price"].first()
        table = pd.DataFrame(
            {
                "n": groups.size(),
                "h": frame[frame["hl"]].groupby(["ticker", "interval", "s"])["price"].max(),
                "l": frame[frame["hl"]].groupby(["ticker", "interval", "s"])["price"].min(),
                "o_oc": frame[frame["oc"]].groupby(["ticker", "interval", "s"])["price"].first(),
                "c_oc": frame[frame["oc"]].groupby(["ticker", "interval", "s"])["price"].last(),
                "o_hl": frame[frame["hl"]].groupby(["ticker", "interval", "s"])["price"].first(),
                "c_hl": frame[frame["hl"]].groupby(["ticker", "interval", "s"])["price"].last(),
                "v": frame[frame["vol"]]
                .groupby(["ticker", "interval", "s"])["size"]
                .agg(sequential_sum),
                "pv": frame[frame["vol"]]
                .groupby(["ticker", "interval", "s"])["pv"]
                .agg(sequential_sum),
                "own_o": first,
                "own_h": groups["price"].max(),
                "own_l": groups["price"].min(),
                "own_c": groups["price"].last(),
            }
        ).reset_index()
        bars.append(table)
    table = pd.concat(bars, ignore_index=True).sort_values(["ticker", "interval", "s"])
    out = []
    for (_, _), series in table.groupby(["ticker", "interval"], sort=True):
        previous_close: float | None = None
        for row in series.itertuples():
            v = 0.0 if pd.isna(row.v) else row.v
            flags = 0
            if pd.isna(row.h):  # nothing for H/L in the bar: a volume-only bar
                if previous_close is not None:
                    o = h = low = c = previous_close
                    flags = 2  # carried
                else:
                    o, h, low, c = row.own_o, row.own_h, row.own_l, row.own_c
            else:
                h, low = row.h, row.l
                o = row.o_hl if pd.isna(row.o_oc) else row.o_oc
                c = row.c_hl if pd.isna(row.c_oc) else row.c_oc
            out.append(
                {
                    "sym": row.ticker,
                    "interval": row.interval,
                    "s": int(row.s),
                    "o": float(o),
                    "h": float(h),
                    "l": float(low),
                    "c": float(c),
                    "v": float(v),
                    "vw": row.pv / v if v > 0 else None,
                    "n": int(row.n),
                    "flags": flags,
                }
            )
            previous_close = float(c)
    return pd.DataFrame(out)


def read_flat_file(path: Path) -> pd.DataFrame:
    """The file as pandas reads it, in the order the replay sends it: SIP time, then file order."""
    frame = pd.read_csv(path, dtype={"conditions": str, "id": str}, keep_default_na=False)
    frame = frame.sort_values("sip_timestamp", kind="stable").reset_index(drop=True)
    frame["t"] = frame["sip_timestamp"] // 1_000_000
    frame["codes"] = frame["conditions"].map(lambda text: [int(c) for c in text.split(",") if c])
    return frame


# --- the processes ------------------------------------------------------------------------


class Received:
    """Everything a SUB gets, decoded; every receive bounded by a deadline."""

    def __init__(self, ctx: Context, address: str, *prefixes: bytes) -> None:
        self.sock = ctx.socket(zmq.SUB)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        for prefix in prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, prefix)
        self.sock.connect(address)
        self.messages: list[codec.Message] = []
        self.clock = 0

    def pump(self, timeout: float = 0.05) -> None:
        if self.sock.poll(int(timeout * 1000)):
            while True:
                try:
                    message = codec.decode(self.sock.recv(zmq.NOBLOCK))
                except zmq.Again:
                    return
                self.messages.append(message)
                if message.kind is codec.Kind.CLOCK:
                    self.clock = max(self.clock, int(codec.records(message)["clock"].max()))

    def until(self, condition: Any, what: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.pump()

    def bars(self) -> pd.DataFrame:
        rows = []
        for message in self.messages:
            if message.kind is not codec.Kind.BARS:
                continue
            head, symbol = message.topic.split(".", 1)
            interval = int(head.removesuffix("Ms"))
            for s, o, h, low, c, v, vw, n, flags in codec.records(message).tolist():
                rows.append(
                    {
                        "sym": symbol, "interval": interval, "s": s, "o": o, "h": h, "l": low,
                        "c": c, "v": v, "vw": None if np.isnan(vw) else vw, "n": n,
                        "flags": flags,
                    }
                )  # fmt: skip
        return pd.DataFrame(rows)

    def trades(self) -> dict[str, np.ndarray]:
        by_symbol: dict[str, list[np.ndarray]] = {}
        for message in self.messages:
            if message.kind is codec.Kind.TRADES:
                by_symbol.setdefault(message.topic[2:], []).append(codec.records(message))
        return {symbol: np.concatenate(parts) for symbol, parts in by_symbol.items()}


def trade_count(received: Received) -> int:
    return sum(m.count for m in received.messages if m.kind is codec.Kind.TRADES)


def agg_args(sub: str, pub: str, metrics: int) -> list[str]:
    args = ["agg", "--sub", sub, "--pub", pub, "--grace", f"{GRACE}ms"]
    for interval in INTERVALS:
        args += ["--interval", f"{interval}ms"]
    return [*args, "--metrics", f"127.0.0.1:{metrics}"]


def bar_prefixes() -> list[bytes]:
    return [f"{interval}Ms.".encode() for interval in INTERVALS] + [codec.CONTROL_TOPIC]


@dataclass
class Pipeline:
    tap: Received  # a SUB on the proxy: trades and clock
    bars: Received  # a SUB on the agg: bars and the relayed clock
    proxy_metrics: int
    agg_metrics: int
    replay: Proc


@contextlib.contextmanager
def replay_into_agg(
    ctx: Context, tmp_path: Path, path: Path, *replay_args: str
) -> Iterator[Pipeline]:
    """``polyfan replay PATH --speed max`` -> ``polyfan proxy`` -> ``polyfan agg``, with a SUB
    on each publisher; yields once the replay has sent everything."""
    replay_port, proxy_metrics, agg_metrics = free_port(), free_port(), free_port()
    proxy_pub = endpoint("ipc", tmp_path, "proxy")
    agg_pub = endpoint("ipc", tmp_path, "agg")
    # The proxy starts first and retries the replay's port, so the agg and the SUBs have
    # joined before the first trade.
    with (
        Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{replay_port}/stocks", "--pub", proxy_pub,
            "--metrics", f"127.0.0.1:{proxy_metrics}", env={"MASSIVE_API_KEY": "replay-test-key"},
        ) as proxy,
        Proc(*agg_args(proxy_pub, agg_pub, agg_metrics)) as agg,
    ):  # fmt: skip
        proxy.wait_for("ready:", 60)
        agg.wait_for("ready:", 60)
        tap = Received(ctx, proxy_pub, b"T.", codec.CONTROL_TOPIC)
        bars = Received(ctx, agg_pub, *bar_prefixes())
        tap.until(lambda: tap.messages, "the proxy's clock on the tap")
        bars.until(lambda: bars.messages, "the agg relaying the proxy's clock")
        with Proc(
            "replay", str(path), "--speed", "max", "--listen", f"127.0.0.1:{replay_port}",
            *replay_args,
        ) as replay:  # fmt: skip
            replay.wait_for("ready:", 60)
            replay.wait_for("replay finished", 60)
            yield Pipeline(tap, bars, proxy_metrics, agg_metrics, replay)
            assert replay.stop() == 0
        assert agg.stop() == 0, agg.output
        assert proxy.stop() == 0, proxy.output


@pytest.fixture
def flat_file(tmp_path: Path) -> Path:
    path = tmp_path / "2024-03-15.csv.gz"
    write_flat_file(path, random.Random(20240315), 2_400)
    return path


def test_a_flat_file_replayed_through_proxy_and_agg_gives_exactly_the_pandas_bars(
    tmp_path: Path, context: Context, flat_file: Path
) -> None:
    trades = read_flat_file(flat_file)
    expected = reference_bars(trades)
    # the file exercises what the rules distinguish
    assert (expected["flags"] == 2).any(), "no volume-only bar carried from a previous close"
    assert trades["conditions"].str.contains(",").any()
    assert (trades["exchange"] == 4).any()
    assert (trades["trf_id"] != "").any()
    last_close = int((expected["s"] + expected["interval"]).max()) + GRACE

    with replay_into_agg(context, tmp_path, flat_file) as run:
        tap, bars = run.tap, run.bars
        tap.until(lambda: trade_count(tap) >= len(trades), "every trade on the proxy")
        bars.until(lambda: bars.clock >= last_close, "the agg's clock past the last bar's close")
        proxy_counts, agg_counts = scrape(run.proxy_metrics), scrape(run.agg_metrics)

    # replay -> proxy: every field the wire carries, exactly, in SIP order per symbol
    received = tap.trades()
    assert set(received) == set(SYMBOLS)
    for symbol, records in received.items():
        rows = trades[trades["ticker"] == symbol]
        assert records["t"].tolist() == rows["t"].tolist(), symbol
        assert records["p"].tolist() == rows["price"].tolist(), symbol
        assert records["s"].tolist() == rows["size"].tolist(), symbol
        assert records["q"].tolist() == rows["sequence_number"].tolist(), symbol
        assert records["x"].tolist() == rows["exchange"].tolist(), symbol
        assert records["z"].tolist() == rows["tape"].tolist(), symbol
        trf_id = [int(v) if v != "" else 0 for v in rows["trf_id"]]
        trf_ms = [int(v) // 1_000_000 if v != "" else 0 for v in rows["trf_timestamp"]]
        assert records["trfi"].tolist() == trf_id, symbol
        assert records["trft"].tolist() == trf_ms, symbol
        codes = [list(map(int, c[:n])) for c, n in zip(records["c"], records["nc"], strict=True)]
        assert codes == rows["codes"].tolist(), symbol
    assert proxy_counts["polyfan_proxy_trades_total"] == len(trades)

    # proxy -> agg: exactly the pandas bars, each once
    published = bars.bars()
    key = ["sym", "interval", "s"]
    assert not published.duplicated(key).any()
    got = published.sort_values(key).reset_index(drop=True)
    want = expected.sort_values(key).reset_index(drop=True)
    assert got[key].values.tolist() == want[key].values.tolist()
    for column in ("o", "h", "l", "c", "v", "n", "flags"):
        assert got[column].tolist() == want[column].tolist(), column
    assert [None if pd.isna(v) else v for v in got["vw"]] == [
        None if v is None or pd.isna(v) else v for v in want["vw"]
    ]
    assert agg_counts["polyfan_agg_trades_total"] == len(trades)
    assert agg_counts["polyfan_agg_late_trades_total"] == 0
    assert agg_counts["polyfan_agg_gaps_total"] == 0
    assert agg_counts["polyfan_agg_bars_total"] == len(expected)


def bars_by_key(frame: pd.DataFrame) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(r["sym"], r["interval"], r["s"]): r for r in frame.to_dict("records")}


def test_a_recording_replayed_gives_the_bars_of_the_live_run(
    tmp_path: Path, context: Context
) -> None:
    """sim -> proxy -> (agg, record) live; then the recording -> replay -> proxy -> agg: the
    same bars, over every bar the recording holds whole (the recorder stops mid-stream)."""
    sim_port, agg_metrics, record_metrics = free_port(), free_port(), free_port()
    proxy_pub = endpoint("ipc", tmp_path, "live-proxy")
    agg_pub = endpoint("ipc", tmp_path, "live-agg")
    out = tmp_path / "rec"
    with (
        Proc(
            "proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub", proxy_pub,
            env={"MASSIVE_API_KEY": "replay-test-key"},
        ) as proxy,
        Proc(*agg_args(proxy_pub, agg_pub, agg_metrics)) as agg,
        Proc("record", "--sub", proxy_pub, "--out", str(out), "--metrics",
             f"127.0.0.1:{record_metrics}") as record,
    ):  # fmt: skip
        for proc in (proxy, agg, record):
            proc.wait_for("ready:", 60)
        tap = Received(context, proxy_pub, b"T.", codec.CONTROL_TOPIC)
        live = Received(context, agg_pub, *bar_prefixes())
        tap.until(lambda: tap.messages, "the proxy's clock on the tap")
        live.until(lambda: live.messages, "the agg relaying the proxy's clock")
        deadline = time.monotonic() + 30
        while scrape(record_metrics)["polyfan_record_messages_total"] == 0:
            assert time.monotonic() < deadline, "the recorder hears nothing"
            tap.pump()
        with Proc(
            "sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", "12", "--rate", "3000",
            "--seed", "12",
        ) as sim:  # fmt: skip
            sim.wait_for("ready:", 60)
            tap.until(lambda: trade_count(tap) >= 9_000, "9,000 trades")
            assert record.stop() == 0  # mid-stream: its last flush holds all it received
            recorded = pq.read_table(out / "trades").to_pandas()
            tap.until(lambda: trade_count(tap) >= 12_000, "12,000 trades")
            held = set(
                zip(recorded["ticker"], recorded["sequence_number"].astype(int), strict=True)
            )
            # every trade the recorder did not get is at or after this: bars ending by it are whole
            cutoff = min(
                int(t)
                for symbol, records in tap.trades().items()
                for t, q in zip(records["t"], records["q"], strict=True)
                if (symbol, int(q)) not in held
            )
            live.until(lambda: live.clock >= cutoff + GRACE, "the live agg past the cutoff")
            assert sim.stop() == 0
        assert agg.stop() == 0
        assert proxy.stop() == 0
    assert len(held) == len(recorded) > 1_000
    live_bars = live.bars()
    whole = live_bars[live_bars["s"] + live_bars["interval"] <= cutoff]

    with replay_into_agg(context, tmp_path, out) as run:
        run.tap.until(lambda: trade_count(run.tap) >= len(recorded), "every recorded trade")
        last = int((whole["s"] + whole["interval"]).max()) + GRACE
        run.bars.until(lambda: run.bars.clock >= last, "the agg's clock past the whole bars")
    replayed = run.bars.bars()
    replayed = replayed[replayed["s"] + replayed["interval"] <= cutoff]
    want, got = bars_by_key(whole), bars_by_key(replayed)
    assert sorted(got) == sorted(want)
    assert len(want) > 500
    for key, bar in want.items():
        mine = got[key]
        # v and vw to 1e-12: the live agg summed in arrival order, the replayed one in SIP order
        for field in ("o", "h", "l", "c", "n", "flags"):
            assert mine[field] == bar[field], (key, field, mine, bar)
        assert mine["v"] == pytest.approx(bar["v"], rel=1e-12), key
        assert (mine["vw"] is None) == (bar["vw"] is None), key
        if bar["vw"] is not None:
            assert mine["vw"] == pytest.approx(bar["vw"], rel=1e-12), key
