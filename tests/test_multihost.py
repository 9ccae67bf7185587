"""Three hosts over tcp with CURVE, as network namespaces joined by veth pairs, and a cut link.

The "hosts" are network namespaces on one switch (a Linux bridge in a fourth namespace):
``feed`` runs sim and proxy, ``aggs`` an agg, ``edge`` the bridge; the test itself is a fourth
host (the root namespace, on the same switch) holding a CURVE tap on the proxy (the reference)
and a WebSocket client of the bridge. Cutting a host's switch port (``ip link set DEV down``)
drops its packets with no FIN and no RST, as a pulled cable does.

What must hold (CONTRACT.md §8, §12): while the agg's host is cut off, the client is told
``feed_down``; after the link returns, every process reconnects by itself (ZeroMQ heartbeats
close the dead connections), the client is told ``feed_up``, and every bar it got is exactly
the reference bar or carries ``outage``, and every reference bar it did not get lies inside
the window it was told about.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
import zmq.auth

from polyfan.wire import codec
from procs import Context, Proc
from reference import Bar
from test_agg_process import GRACE, INTERVALS
from test_outages_process import Stream, assert_exact_or_marked, drain_until
from wsclient import Client, eventually

KEY = {"MASSIVE_API_KEY": "test-key-123456"}
SUBNET = "10.77.0"
HOSTS = {"feed": 1, "aggs": 2, "edge": 3, "aggs2": 4}
ME = 254  # the test's own address on the switch
PREFIX = f"pf{os.getpid() % 10_000}"  # namespace and link names, unique per test run
CUT_S = 10.0  # CONTRACT §8: a 10 s cut with no FIN or RST
RECOVER_S = 15.0  # the stated bound: bars flow again within this after the link returns


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"{PREFIX}probe"
    try:
        ip("netns", "add", probe)
        ip("netns", "del", probe)
    except (subprocess.CalledProcessError, OSError) as exc:
        return f"cannot create a network namespace here: {exc}"
    return None


pytestmark = pytest.mark.skipif((reason := netns_unavailable()) is not None, reason=reason or "")


class Network:
    """The switch, the three host namespaces and the test's own port, removed on close."""

    def __init__(self) -> None:
        self.switch = f"{PREFIX}sw"
        self.hosts = {name: f"{PREFIX}{name}" for name in HOSTS}
        self.ports = {name: f"{PREFIX}p{name}"[:15] for name in [*HOSTS, "me"]}
        ip("netns", "add", self.switch)
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for name, host in self.hosts.items():
            ip("netns", "add", host)
            ip("-n", host, "link", "set", "lo", "up")
            self._plug(name, host, HOSTS[name])
        self._plug("me", None, ME)

    def _plug(self, name: str, host: str | None, number: int) -> None:
        inside, port = f"{PREFIX}i{name}"[:15], self.ports[name]
        ip("link", "add", inside, "type", "veth", "peer", "name", port)
        ip("link", "set", port, "netns", self.switch)
        ip("-n", self.switch, "link", "set", port, "master", "br0")
        ip("-n", self.switch, "link", "set", port, "up")
        where = [] if host is None else ["-n", host]
        if host is not None:
            ip("link", "set", inside, "netns", host)
        ip(*where, "addr", "add", f"{SUBNET}.{number}/24", "dev", inside)
        ip(*where, "link", "set", inside, "up")

    def cut(self, name: str) -> None:
        ip("-n", self.switch, "link", "set", self.ports[name], "down")

    def mend(self, name: str) -> None:
        ip("-n", self.switch, "link", "set", self.ports[name], "up")

    def close(self) -> None:
        for host in [*self.hosts.values(), self.switch]:
            with contextlib.suppress(subprocess.CalledProcessError):
                ip("netns", "del", host)
        with contextlib.suppress(subprocess.CalledProcessError):
            ip("link", "del", f"{PREFIX}ime"[:15])


@pytest.fixture
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()


def make_keys(directory: Path, *names: str) -> None:
    for name in names:
        done = subprocess.run(
            [sys.executable, "-m", "polyfan", "keys", name, "--dir", str(directory)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 0, done.stderr


def allow(keys: Path, directory: Path, *names: str) -> Path:
    directory.mkdir()
    for name in names:
        shutil.copy(keys / f"{name}.key", directory / f"{name}.key")
    return directory


def curve_stream(ctx: Context, address: str, keys: Path, server: str, *prefixes: bytes) -> Stream:
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.RCVHWM, 0)
    public, secret = zmq.auth.load_certificate(str(keys / "test.key_secret"))
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = zmq.auth.load_certificate(str(keys / f"{server}.key"))[0]
    for prefix in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, prefix)
    sock.connect(address)
    return Stream(sock)


SIM_ARGS = ["sim", "--listen", "127.0.0.1:8766", "--symbols", "12", "--rate", "800"]


def proxy_args(pub: str, keys: Path, allowed: Path) -> list[str]:
    return [
        "proxy", "--upstream", "ws://127.0.0.1:8766/stocks", "--pub", pub,
        "--curve-secret", str(keys / "proxy.key_secret"), "--curve-allow", str(allowed),
    ]  # fmt: skip


def serving(address: str) -> bool:
    """The bridge at HOST:PORT has heard an agg's announce (its intervals): it takes
    subscriptions (before that, /healthz may already answer 200 on a CLOCK alone)."""
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=2) as response:
            return bool(json.loads(response.read()).get("intervals"))
    except OSError:
        return False


async def watched(
    context: Context, proxy_pub: str, keys: Path, bridge: str
) -> tuple[Stream, Client, int]:
    """The test's tap on the proxy and a client of the bridge on every channel, once bars
    flow; and the first bar start the tap has seen whole."""
    tap = curve_stream(context, proxy_pub, keys, "proxy", b"T.", codec.CONTROL_TOPIC)
    await eventually(lambda: serving(bridge), timeout=30, what="the bridge hearing an agg")
    client = await Client.open(f"ws://{bridge}/stocks", token="any")
    await client.send({"action": "subscribe", "params": ",".join(f"{i}Ms.*" for i in INTERVALS)})
    assert [e["status"] for e in await client.statuses(len(INTERVALS))] == ["success"] * 3
    first = await client.until(lambda e: e.get("ev") == "MB", timeout=30)
    drain_until([tap], lambda: tap.clock > 0, 20, "the tap's first clock")
    return tap, client, max(tap.clock, int(first["e"])) + max(INTERVALS) + GRACE


def client_bars(events: list[dict[str, object]]) -> dict[tuple[str, int], list[Bar]]:
    published: dict[tuple[str, int], list[Bar]] = {}
    for e in events:
        if e.get("ev") == "MB":
            bar = Bar(
                e["s"], e["o"], e["h"], e["l"], e["c"], e["v"], e["vw"], e["n"],  # type: ignore[arg-type]
                codec.BAR_FLAG_OUTAGE if e.get("outage") else 0,
            )  # fmt: skip
            published.setdefault((str(e["sym"]), int(e["interval"])), []).append(bar)  # type: ignore[call-overload]
    return published


async def test_a_silent_10_s_cut_of_the_agg_host_is_told_marked_and_recovered(
    network: Network, context: Context, tmp_path: Path
) -> None:
    keys = tmp_path / "keys"
    make_keys(keys, "proxy", "agg", "bridge", "test")
    proxy_allow = allow(keys, tmp_path / "proxy-allow", "agg", "test")
    agg_allow = allow(keys, tmp_path / "agg-allow", "bridge", "test")
    feed, aggs, edge = (f"{SUBNET}.{HOSTS[n]}" for n in ("feed", "aggs", "edge"))
    proxy_pub, agg_pub, http = f"tcp://{feed}:8767", f"tcp://{aggs}:8769", 8768
    agg_args = [
        "agg", "--sub", proxy_pub, "--pub", agg_pub, "--grace", f"{GRACE}ms",
        *(a for i in INTERVALS for a in ("--interval", f"{i}ms")),
        "--curve-secret", str(keys / "agg.key_secret"), "--curve-allow", str(agg_allow),
        "--curve-server", str(keys / "proxy.key"),
    ]  # fmt: skip
    bridge_args = [
        "bridge", "--sub", agg_pub, "--listen", f"{edge}:{http}",
        "--curve-secret", str(keys / "bridge.key_secret"), "--curve-server", str(keys / "agg.key"),
    ]  # fmt: skip
    hosts = network.hosts
    with (
        Proc(*SIM_ARGS, netns=hosts["feed"]) as sim,
        Proc(*proxy_args(proxy_pub, keys, proxy_allow), env=KEY, netns=hosts["feed"]) as proxy,
        Proc(*agg_args, netns=hosts["aggs"]) as agg,
        Proc(*bridge_args, netns=hosts["edge"]) as bridge,
    ):
        for proc in (sim, proxy, agg, bridge):
            proc.wait_for("ready:")
        tap, client, since = await watched(context, proxy_pub, keys, f"{edge}:{http}")
        await client.until(lambda e: e.get("ev") == "MB" and e["s"] > since + 1_000, timeout=20)

        network.cut("aggs")  # no FIN, no RST: its packets just stop
        cut_at = time.monotonic()
        down = await client.until(lambda e: e.get("status") == "feed_down", timeout=5)
        told_down_after = time.monotonic() - cut_at
        drain_until([tap], lambda: time.monotonic() - cut_at >= CUT_S, CUT_S + 5, "the cut")
        network.mend("aggs")
        mended_at = time.monotonic()
        up = await client.until(lambda e: e.get("status") == "feed_up", timeout=RECOVER_S)
        told_up_after = time.monotonic() - mended_at
        until = int(up["e"]) + max(INTERVALS) + GRACE + 1_000
        await client.until(
            lambda e: e.get("ev") == "MB" and e["s"] > until + 1_000, timeout=RECOVER_S
        )
        recovered_after = time.monotonic() - mended_at
        drain_until([tap], lambda: tap.clock > until + 2_000, 10, "the tap after the window")
        await client.close()
        begun = agg.output.count("outage begins")
        print(
            f"feed_down {told_down_after:.1f} s after the cut; feed_up {told_up_after:.1f} s and "
            f"bars past the window {recovered_after:.1f} s after the link returned; "
            f"{begun} outage(s) begun by the agg"
        )
        for proc in (bridge, agg, proxy, sim):  # nothing hangs: each stops cleanly
            assert proc.stop() == 0, proc.output[-2000:]
    assert told_down_after < 3.0  # CONTRACT §12
    # One cut, one outage: the sequence gap each topic shows as its first message after the
    # cut arrives joins the silence's outage while it settles (docs/outages.md). Before that
    # rule the agg began 5 to 7 outages for this cut. A topic first heard again more than a
    # grace past the outage's end would begin a second one: at most that.
    assert 1 <= begun <= 2, agg.output[-3000:]
    # every window the client was told of (one or, at most, two)
    ups = [e for e in client.events if e.get("status") == "feed_up"]
    windows = [(int(e["s"]), int(e["e"])) for e in ups]  # type: ignore[call-overload]
    assert windows[0][0] == int(down["s"]) and windows[0][1] > windows[0][0]
    published = client_bars(client.events)
    marked = assert_exact_or_marked(
        published, tap.tap, windows, since, until, restarted_from=None, tap_missed=tap.tap_missed
    )
    assert marked > 0  # the bars open while the agg heard nothing
    assert "handshake" not in agg.output + bridge.output  # CURVE never refused a peer of ours


async def test_one_agg_host_cut_off_while_its_replica_carries_on_costs_clients_nothing(
    network: Network, context: Context, tmp_path: Path
) -> None:
    """Two aggs on two hosts serve the same channels; one host is cut for 10 s and returns.
    The client is never told its feed is down, and gets every bar exactly once, exact."""
    keys = tmp_path / "keys"
    make_keys(keys, "proxy", "agg", "bridge", "test")
    proxy_allow = allow(keys, tmp_path / "proxy-allow", "agg", "test")
    agg_allow = allow(keys, tmp_path / "agg-allow", "bridge", "test")
    feed, edge = f"{SUBNET}.{HOSTS['feed']}", f"{SUBNET}.{HOSTS['edge']}"
    proxy_pub, http = f"tcp://{feed}:8767", 8768
    agg_pubs = [f"tcp://{SUBNET}.{HOSTS[h]}:8769" for h in ("aggs", "aggs2")]

    def agg_args(pub: str) -> list[str]:
        return [
            "agg", "--sub", proxy_pub, "--pub", pub, "--grace", f"{GRACE}ms",
            *(a for i in INTERVALS for a in ("--interval", f"{i}ms")),
            "--curve-secret", str(keys / "agg.key_secret"), "--curve-allow", str(agg_allow),
            "--curve-server", str(keys / "proxy.key"),
        ]  # fmt: skip

    hosts = network.hosts
    with (
        Proc(*SIM_ARGS, netns=hosts["feed"]) as sim,
        Proc(*proxy_args(proxy_pub, keys, proxy_allow), env=KEY, netns=hosts["feed"]) as proxy,
        Proc(*agg_args(agg_pubs[0]), netns=hosts["aggs"]) as agg1,
        Proc(*agg_args(agg_pubs[1]), netns=hosts["aggs2"]) as agg2,
        Proc(
            "bridge", *(a for pub in agg_pubs for a in ("--sub", pub)),
            "--listen", f"{edge}:{http}", "--curve-secret", str(keys / "bridge.key_secret"),
            "--curve-server", str(keys / "agg.key"),
            netns=hosts["edge"],
        ) as bridge,
    ):  # fmt: skip
        for proc in (sim, proxy, agg1, agg2, bridge):
            proc.wait_for("ready:")
        tap, client, whole = await watched(context, proxy_pub, keys, f"{edge}:{http}")
        since = whole + 2_000  # both aggs whole from here: each listened from before it
        await client.until(lambda e: e.get("ev") == "MB" and e["s"] > since + 1_000, timeout=20)
        network.cut("aggs")
        cut_at = time.monotonic()
        drain_until([tap], lambda: time.monotonic() - cut_at >= CUT_S, CUT_S + 5, "the cut")
        network.mend("aggs")
        await eventually(
            lambda: "heard again" in bridge.output, timeout=RECOVER_S, what="agg 1 heard again"
        )
        until = tap.clock - max(INTERVALS) - GRACE - 1_000
        await client.until(lambda e: e.get("ev") == "MB" and e["s"] > until + 1_000, timeout=20)
        drain_until([tap], lambda: tap.clock > until + 3_000, 10, "the tap after the window")
        await client.close()
        for proc in (bridge, agg1, agg2, proxy, sim):
            assert proc.stop() == 0, proc.output[-2000:]
    assert not [e for e in client.events if str(e.get("status", "")).startswith("feed_")]
    published = client_bars(client.events)
    marked = assert_exact_or_marked(
        published, tap.tap, [(0, 0)], since, until, tap_missed=tap.tap_missed
    )
    assert marked == 0  # the replica was whole for every bar: none marked, none missing
    assert "not heard" in bridge.output  # the bridge did see agg 1 go


class FaultyRelay:
    """A TCP relay that delays what it forwards, as a slow and lossy path does: 100 ms ± 30 ms
    each way, and 2% of chunks held a further 200 ms (what a lost segment costs TCP: a
    retransmission; bytes are never dropped, TCP would not let them be). Order is kept."""

    def __init__(self, listen: tuple[str, int], target: tuple[str, int], seed: int = 7) -> None:
        self.listen, self.target = listen, target
        self.random = random.Random(seed)
        self.chunks = 0
        self.held = 0
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._connected, *self.listen)
        )
        self.ready.set()
        self.loop.run_forever()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        try:
            await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        released = 0.0

        async def release() -> None:
            while True:
                at, chunk = await queue.get()
                if not chunk:
                    writer.close()
                    return
                await asyncio.sleep(max(0.0, at - loop.time()))
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(release())
        try:
            while chunk := await reader.read(65536):
                self.chunks += 1
                delay = 0.1 + self.random.uniform(-0.03, 0.03)
                if self.random.random() < 0.02:
                    self.held += 1
                    delay += 0.2
                released = max(released, loop.time() + delay)  # in order, as TCP delivers
                queue.put_nowait((released, chunk))
        finally:
            queue.put_nowait((released, b""))
            await sender

    def close(self) -> None:
        async def shut() -> None:
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.server.wait_closed()

        asyncio.run_coroutine_threadsafe(shut(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


async def test_a_slow_lossy_path_between_proxy_and_agg_still_gives_exact_bars(
    network: Network, context: Context, tmp_path: Path
) -> None:
    """100 ms ± 30 ms of delay and 2% of chunks held as retransmissions are, between proxy and
    agg, under the grace: the bars closed on the feed clock are exact, none marked, and the
    client hears no feed status."""
    keys = tmp_path / "keys"
    make_keys(keys, "proxy", "agg", "bridge", "test")
    proxy_allow = allow(keys, tmp_path / "proxy-allow", "agg", "test")
    agg_allow = allow(keys, tmp_path / "agg-allow", "bridge", "test")
    feed, aggs, edge = (f"{SUBNET}.{HOSTS[n]}" for n in ("feed", "aggs", "edge"))
    proxy_pub, agg_pub, http = f"tcp://{feed}:8767", f"tcp://{aggs}:8769", 8768
    relay = FaultyRelay((f"{SUBNET}.{ME}", 18767), (feed, 8767))
    hosts = network.hosts
    try:
        with (
            Proc(*SIM_ARGS, netns=hosts["feed"]) as sim,
            Proc(*proxy_args(proxy_pub, keys, proxy_allow), env=KEY, netns=hosts["feed"]) as proxy,
            Proc(
                "agg", "--sub", f"tcp://{SUBNET}.{ME}:18767", "--pub", agg_pub,
                "--grace", f"{GRACE}ms", *(a for i in INTERVALS for a in ("--interval", f"{i}ms")),
                "--curve-secret", str(keys / "agg.key_secret"), "--curve-allow", str(agg_allow),
                "--curve-server", str(keys / "proxy.key"),
                netns=hosts["aggs"],
            ) as agg,
            Proc(
                "bridge", "--sub", agg_pub, "--listen", f"{edge}:{http}",
                "--curve-secret", str(keys / "bridge.key_secret"),
                "--curve-server", str(keys / "agg.key"),
                netns=hosts["edge"],
            ) as bridge,
        ):  # fmt: skip
            for proc in (sim, proxy, agg, bridge):
                proc.wait_for("ready:")
            tap, client, since = await watched(context, proxy_pub, keys, f"{edge}:{http}")
            until = since + 8_000
            await client.until(lambda e: e.get("ev") == "MB" and e["s"] > until + 1_000, timeout=30)
            drain_until([tap], lambda: tap.clock > until + 3_000, 10, "the tap after the run")
            await client.close()
            for proc in (bridge, agg, proxy, sim):
                assert proc.stop() == 0, proc.output[-2000:]
    finally:
        relay.close()
    print(f"relay: {relay.chunks} chunks, {relay.held} held as retransmissions")
    assert relay.held > 0
    assert not [e for e in client.events if str(e.get("status", "")).startswith("feed_")]
    marked = assert_exact_or_marked(
        client_bars(client.events), tap.tap, [(0, 0)], since, until, tap_missed=tap.tap_missed
    )
    assert marked == 0
    assert "outage" not in agg.output
