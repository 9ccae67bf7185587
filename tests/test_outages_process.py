"""Outages end to end, with real processes from the CLI: whatever dies, nothing is lost silently.

A tap on the proxy sees the same message stream the agg sees; the reference bars computed from it
(tests/reference.py) are the bars as they should be. After a ``kill -9`` of the proxy or of the
agg, every bar that reaches a subscriber is either exactly the reference bar or carries
``outage: true``, and every reference bar that never arrives lies inside a reported window.
"""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from polyfan.market import MAX_DISORDER_MS
from polyfan.wire import codec
from procs import Context, Proc, endpoint, free_port, scrape
from reference import CARRIED, Bar, Clock, Trades, bar_from_record, reference_bars
from test_agg_process import GRACE, INTERVALS, agg_args, tap_events
from wsclient import Client, eventually

KEY = {"MASSIVE_API_KEY": "test-key-123456"}


@dataclass
class Stream:
    """Everything one SUB socket receives, drained as it waits (every wait bounded)."""

    sock: zmq.Socket[bytes]
    tap: list[Clock | Trades] = field(default_factory=list)  # trades and clocks, from a proxy
    bars: dict[tuple[str, int], list[Bar]] = field(default_factory=dict)  # from an agg
    outages: list[dict[str, object]] = field(default_factory=list)
    clock: int = 0
    # A SUB misses what a restarted publisher sends before it reconnects, as the agg may: per
    # symbol, the time of the first trade the tap has after such a miss (its reference knows
    # nothing of the bars up to there).
    tap_missed: dict[str, int] = field(default_factory=dict)
    _sessions: set[int] = field(default_factory=set)
    _last: dict[str, tuple[int, int]] = field(default_factory=dict)

    @classmethod
    def open(cls, ctx: Context, address: str, *prefixes: bytes) -> Stream:
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.RCVHWM, 0)
        for prefix in prefixes:
            sock.setsockopt(zmq.SUBSCRIBE, prefix)
        sock.connect(address)
        return cls(sock)

    def drain(self, timeout: float = 0.05) -> None:
        if not self.sock.poll(int(timeout * 1000)):
            return
        while True:
            try:
                message = codec.decode(self.sock.recv(zmq.NOBLOCK))
            except zmq.Again:
                return
            self._take(message)

    def _take(self, message: codec.Message) -> None:
        if message.kind is codec.Kind.CLOCK:
            self.clock = max([self.clock, *codec.records(message)["clock"].tolist()])
        if message.kind is codec.Kind.BARS:
            interval, symbol = message.topic.split(".", 1)
            key = (symbol, int(interval.removesuffix("Ms")))
            self.bars.setdefault(key, []).extend(map(bar_from_record, codec.records(message)))
        elif message.kind is codec.Kind.OUTAGE:
            self.outages.append(codec.decode_json(message))
        else:
            if message.kind is codec.Kind.TRADES:
                self._check_sequence(message)
            self.tap.extend(tap_events(message))

    def _check_sequence(self, message: codec.Message) -> None:
        first_session = not self._sessions or self._sessions == {message.session}
        self._sessions.add(message.session)
        previous = self._last.get(message.topic)
        self._last[message.topic] = (message.session, message.seq)
        if previous is None and first_session:
            return  # the tap's own late start: ``since`` leaves those bars out
        same_session = previous is not None and previous[0] == message.session
        expected = previous[1] + 1 if previous is not None and same_session else 1  # new: from 1
        if message.seq != expected:
            symbol = message.topic.removeprefix("T.")
            first_t = int(codec.records(message)["t"].min())
            self.tap_missed[symbol] = max(self.tap_missed.get(symbol, 0), first_t)


def marked_in(bars: dict[tuple[str, int], list[Bar]], windows: list[tuple[int, int]]) -> int:
    """How many bars carry outage and were open during a window or start inside one."""
    return sum(
        1
        for (_, interval), series in bars.items()
        for bar in series
        if bar.flags & codec.BAR_FLAG_OUTAGE
        and any(bar.s <= hi and bar.s + interval + GRACE > lo for lo, hi in windows)
    )


def drain_until(
    streams: list[Stream], condition: Callable[[], object], timeout: float, what: str
) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        for stream in streams:
            stream.drain(0.02)


def drain_for(streams: list[Stream], seconds: float) -> None:
    """Keep draining while the scenario runs its course (the downtime a test stages)."""
    end = time.monotonic() + seconds
    drain_until(streams, lambda: time.monotonic() >= end, seconds + 5, "the downtime")


def assert_exact_or_marked(
    published: dict[tuple[str, int], list[Bar]],
    tap: list[Clock | Trades],
    windows: list[tuple[int, int]],
    since: int,
    until: int,
    restarted_from: int | None = None,
    tap_missed: dict[str, int] | None = None,
) -> int:
    """Every published bar in ``[since, until)`` (closed by ``until`` on the feed clock) is the
    reference bar exactly or carries outage, and only one starting by a window's end carries it;
    every missing reference bar overlaps a window. ``restarted_from``: an agg restarted and
    serves bars again from then (the closes it carried are gone). ``tap_missed``: bars of a
    symbol up to a time the tap has not seen whole (:class:`Stream`) are not compared. Returns
    how many bars were marked."""
    expected = reference_bars(tap, INTERVALS, GRACE).bars
    unknown = tap_missed or {}

    def considered(key: tuple[str, int], bar: Bar) -> bool:
        symbol, interval = key
        if symbol in unknown and bar.s <= unknown[symbol] + MAX_DISORDER_MS:
            return False  # might hold a trade the tap missed (sent at most that much out of order)
        return bar.s >= since and bar.s + interval + GRACE <= until

    marked = 0
    after_all = max(hi for _, hi in windows)  # bars starting later may not be marked
    for key in sorted(set(published) | set(expected)):
        interval = key[1]
        mine = {b.s: b for b in published.get(key, []) if considered(key, b)}
        ref = {b.s: b for b in expected.get(key, []) if considered(key, b)}
        assert len(mine) == len([b for b in published.get(key, []) if considered(key, b)])
        # A volume-only bar carries the previous close of its series: the previous close the
        # agg knew, which the reference (from the tap's later start) or an agg that restarted
        # (its state gone) may not share; until a series has had a bar with trades for
        # high/low since then, such a bar is compared by v and n only.
        close_known = False
        forgotten = restarted_from is None  # whether the restart's loss of state was met
        for s, bar in sorted(mine.items()):
            if not forgotten and restarted_from is not None and s > restarted_from:
                close_known, forgotten = False, True
            if bar.flags & codec.BAR_FLAG_OUTAGE:
                assert s <= after_all, (key, bar, "marked, though it starts after every window")
                marked += 1
                # A marked bar may lack trades, so its close may not be the reference's: a
                # volume-only bar after it carries that close (CONTRACT §3) unmarked.
                close_known = False
                continue
            assert s in ref, (key, bar, "published, unmarked, and not in the reference")
            want = ref[s]
            carried = bool(want.flags & CARRIED)
            if carried and not close_known:
                assert bar.n == want.n, (key, bar, want)
            else:
                got = (bar.o, bar.h, bar.l, bar.c, bar.n)
                assert got == (want.o, want.h, want.l, want.c, want.n), (key, bar, want)
                close_known = close_known or not carried
            assert bar.v == pytest.approx(want.v, rel=1e-12), (key, bar, want)
        for s in ref.keys() - mine.keys():
            assert any(s <= hi and s + interval + GRACE > lo for lo, hi in windows), (
                key,
                ref[s],
                "missing, and inside no reported window",
                windows,
            )
    return marked


def healthy(port: int) -> bool:
    return healthy_at(f"127.0.0.1:{port}")


def healthy_at(address: str) -> bool:
    """Whether the bridge at HOST:PORT answers /healthz with 200 (it hears an aggregator)."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=2):
            return True
    except OSError:  # 503 (HTTPError) while no aggregator is heard
        return False


@dataclass(frozen=True)
class Pipeline:
    """Addresses and arguments of one sim -> proxy -> agg -> bridge run over ipc."""

    sim_port: int
    http: int
    proxy_pub: str
    agg_pub: str

    @classmethod
    def at(cls, tmp_path: Path) -> Pipeline:
        return cls(
            free_port(),
            free_port(),
            endpoint("ipc", tmp_path, "proxy"),
            endpoint("ipc", tmp_path, "agg"),
        )

    @property
    def proxy_args(self) -> list[str]:
        upstream = f"ws://127.0.0.1:{self.sim_port}/stocks"
        return ["proxy", "--upstream", upstream, "--pub", self.proxy_pub]

    @property
    def bridge_args(self) -> list[str]:
        return ["bridge", "--sub", self.agg_pub, "--listen", f"127.0.0.1:{self.http}"]


def sim_args(port: int) -> list[str]:
    return ["sim", "--listen", f"127.0.0.1:{port}", "--symbols", "12", "--rate", "800"]


async def test_a_proxy_killed_and_restarted_leaves_only_exact_or_marked_bars_and_clients_are_told(
    tmp_path: Path, context: Context
) -> None:
    p = Pipeline.at(tmp_path)
    sim_port, http, proxy_pub, agg_pub = p.sim_port, p.http, p.proxy_pub, p.agg_pub
    proxy_args, bridge_args = p.proxy_args, p.bridge_args
    metrics = free_port()
    with (
        Proc(*sim_args(sim_port)) as sim,
        Proc(*proxy_args, env=KEY) as proxy,
        Proc(*agg_args(proxy_pub, agg_pub, metrics)) as agg,
        Proc(*bridge_args) as bridge,
    ):
        for proc in (sim, agg, bridge):
            proc.wait_for("ready:")
        tap = Stream.open(context, proxy_pub, b"T.", codec.CONTROL_TOPIC)
        out = Stream.open(context, agg_pub, codec.CONTROL_TOPIC, b"100Ms.", b"250Ms.", b"1000Ms.")
        streams = [tap, out]
        await eventually(lambda: healthy(http), timeout=20, what="the bridge hearing the agg")
        client = await Client.open(f"ws://127.0.0.1:{http}/stocks", token="any")
        await client.send({"action": "subscribe", "params": "1000Ms.*"})
        assert (await client.statuses(1))[0]["status"] == "success"
        drain_until(streams, lambda: tap.clock > 0 and out.bars, 20, "trades and bars")
        since = tap.clock + max(INTERVALS) + GRACE  # bars the tap saw whole
        drain_until(streams, lambda: out.clock > since + 1_000, 20, "a second of bars")
        proxy.popen.kill()  # kill -9: no UPSTREAM down, no goodbye
        proxy.popen.wait()
        killed = time.monotonic()
        told_down = await client.until(lambda e: e.get("status") == "feed_down", timeout=5)
        assert time.monotonic() - killed < 3.0  # CONTRACT §12: within 3 s
        drain_until(streams, lambda: out.outages, 5, "the agg reporting the silence")
        (down,) = out.outages
        assert (down["state"], down["causes"]) == ("down", ["silence"])
        assert (
            told_down["s"] == down["s"] and "nothing heard from the proxy" in told_down["message"]
        )
        drain_for(streams, 3.0 - (time.monotonic() - killed))  # the proxy stays dead 3 s
        with Proc(*proxy_args, env=KEY) as second:
            second.wait_for("ready:")
            drain_until(streams, lambda: len(out.outages) == 2, 15, "the outage's end")
            up = out.outages[1]
            assert up["state"] == "up" and up["s"] == down["s"]
            assert up["causes"] == ["silence", "restart"]
            assert isinstance(up["e"], int) and up["e"] > down["s"]
            told_up = await client.until(lambda e: e.get("status") == "feed_up", timeout=5)
            assert (told_up["s"], told_up["e"]) == (up["s"], up["e"])
            until = up["e"] + max(INTERVALS) + GRACE + 1_000
            drain_until(streams, lambda: min(tap.clock, out.clock) > until, 20, "bars after it")
            values = scrape(metrics)
        await client.close()
        windows = [(int(up["s"]), int(up["e"]))]
        assert_exact_or_marked(out.bars, tap.tap, windows, since, until, tap_missed=tap.tap_missed)
        # the bars open when it died, and those of the restart, carry outage (counted on the
        # agg's output alone: the tap may have missed the new proxy's first trades of every
        # symbol, and then compares none of the bars near the window)
        assert marked_in(out.bars, windows) > 0
        assert values["polyfan_agg_outages_total"] == 1
        assert "outage begins" in agg.output and "outage over" in agg.output


async def test_an_agg_killed_and_restarted_is_told_to_clients_and_its_bars_are_exact_or_marked(
    tmp_path: Path, context: Context
) -> None:
    p = Pipeline.at(tmp_path)
    sim_port, http, proxy_pub, agg_pub = p.sim_port, p.http, p.proxy_pub, p.agg_pub
    proxy_args, bridge_args = p.proxy_args, p.bridge_args
    channels = [f"{interval}Ms.*" for interval in INTERVALS]
    with (
        Proc(*sim_args(sim_port)) as sim,
        Proc(*proxy_args, env=KEY) as proxy,
        Proc(*agg_args(proxy_pub, agg_pub, free_port())) as agg,
        Proc(*bridge_args) as bridge,
    ):
        for proc in (sim, proxy, agg, bridge):
            proc.wait_for("ready:")
        tap = Stream.open(context, proxy_pub, b"T.", codec.CONTROL_TOPIC)
        await eventually(lambda: healthy(http), timeout=20, what="the bridge hearing the agg")
        client = await Client.open(f"ws://127.0.0.1:{http}/stocks", token="any")
        await client.send({"action": "subscribe", "params": ",".join(channels)})
        assert [e["status"] for e in await client.statuses(3)] == ["success"] * 3
        first_bar = await client.until(lambda e: e["ev"] == "MB", timeout=20)
        tap.drain()
        since = max(tap.clock, first_bar["e"]) + max(INTERVALS) + GRACE
        await client.until(lambda e: e["ev"] == "MB" and e["s"] > since + 1_000, timeout=20)
        agg.popen.kill()  # kill -9
        agg.popen.wait()
        killed = time.monotonic()
        down = await client.until(lambda e: e.get("status") == "feed_down", timeout=5)
        assert time.monotonic() - killed < 3.0  # CONTRACT §12: within 3 s
        tap.drain()
        with Proc(*agg_args(proxy_pub, agg_pub, free_port())) as second:
            second.wait_for("ready:")
            up = await client.until(lambda e: e.get("status") == "feed_up", timeout=15)
            assert up["s"] == down["s"] and up["e"] >= up["s"]
            assert "restarted" in up["message"]
            # clients are told what happened, not where the bridge's aggregators live
            assert agg_pub not in down["message"] + up["message"]
            until = up["e"] + max(INTERVALS) + GRACE + 1_000
            await client.until(lambda e: e["ev"] == "MB" and e["s"] > until + 1_000, timeout=20)
            tap.drain()
            health = scrape(http)
        published: dict[tuple[str, int], list[Bar]] = {}
        for event in client.events:
            if event["ev"] == "MB":
                bar = Bar(
                    event["s"], event["o"], event["h"], event["l"], event["c"], event["v"],
                    event["vw"], event["n"],
                    codec.BAR_FLAG_OUTAGE if event.get("outage") else 0,
                )  # fmt: skip
                published.setdefault((event["sym"], event["interval"]), []).append(bar)
        windows = [(int(down["s"]), int(up["e"]))]
        marked = assert_exact_or_marked(
            published, tap.tap, windows, since, until, restarted_from=int(up["e"])
        )
        assert marked > 0  # the new agg's first bars: it cannot know what came before it
        assert health["polyfan_bridge_outages_total"] == 1
        assert health["polyfan_bridge_feed_statuses_total"] == 2
        await client.close()
