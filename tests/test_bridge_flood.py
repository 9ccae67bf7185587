"""``polyfan bridge`` under connection floods (CONTRACT §12): real processes, real sockets.

A flood process (tests/flood.py) holds thousands of half-open connections from loopback
addresses 127.0.0.2 ... while a WebSocket client receives bars and /healthz is asked every
50 ms. The bridge must refuse what is over its caps at once, keep its files and memory
bounded, and keep serving the client and /healthz with their usual latency.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from websockets.exceptions import InvalidMessage

from fake_agg import FakeAgg, bar_rows
from polyfan.fanout.protocol import Limits
from procs import Proc, free_port, scrape
from wsclient import Client

T0 = 1_781_622_376_000
FLOOD = Path(__file__).with_name("flood.py")
LIMITS = Limits()
HEALTHZ_BOUND = 1.0  # seconds, every /healthz answer during the flood
BAR_BOUND = 1.0  # seconds from publication to the client, every bar during the flood
RSS_GROWTH_BOUND = 40 * 1024 * 1024  # bytes over the bridge's RSS before the flood
# files over the caps: the client, /healthz, and one burst of the flood's connections (it opens
# at most 200 per 0.1 s) accepted and not yet refused
FILES_SLACK = 250


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


@pytest.fixture(autouse=True)
def many_files() -> Iterator[None]:
    """The test process holds the client side of nothing big, but raise its limit anyway."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def status(pid: int) -> dict[str, str]:
    lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    return {key: value.strip() for key, _, value in (line.partition(":") for line in lines)}


def rss_bytes(pid: int) -> int:
    return int(status(pid)["VmRSS"].split()[0]) * 1024


def healthz_seconds(port: int) -> float:
    """One /healthz on a new connection from 127.0.0.1; its latency (inf if unanswered in 3 s)."""
    start = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=3) as response:
            response.read()
            if response.status != 200:
                return float("inf")
    except OSError:
        return float("inf")
    return time.monotonic() - start


class Flood:
    """tests/flood.py as a child process; ``counts`` is its latest report."""

    def __init__(self, port: int, addresses: list[str], per_address: int) -> None:
        self.counts: dict[str, int] = {}
        self.popen = subprocess.Popen(
            [sys.executable, str(FLOOD), str(port), ",".join(addresses), str(per_address)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self.counts = json.loads(line)

    def stop(self) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.close()
        try:
            self.popen.wait(5)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait()
        self._reader.join(2)
        assert self.popen.stdout is not None
        self.popen.stdout.close()


@dataclass
class Measured:
    healthz: list[float] = field(default_factory=list)
    bar_delays: list[float] = field(default_factory=list)
    files: list[int] = field(default_factory=list)
    rss: list[int] = field(default_factory=list)


async def wait_healthy(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
                if json.loads(r.read())["aggs_heard"]:
                    return
        except OSError:
            pass
        assert time.monotonic() < deadline, "bridge not healthy"
        await asyncio.sleep(0.05)


async def flood_and_measure(
    agg: FakeAgg, addresses: list[str], per_address: int, seconds: float
) -> tuple[Measured, Measured, dict[str, float], dict[str, int]]:
    """Run a bridge, connect a client, then flood for ``seconds`` while measuring; return the
    measurements before and during the flood, the bridge's counters after, the flood's counts."""
    port = free_port()
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}") as bridge:
        await wait_healthy(port)
        pid = bridge.popen.pid
        client = await Client.open(f"ws://127.0.0.1:{port}/", token="any")
        await client.send({"action": "subscribe", "params": "100Ms.TSLA"})
        assert (await client.next_event())["status"] == "success"
        await asyncio.to_thread(agg.wait_subscribed, b"100Ms.TSLA\x00", 10)
        rows = bar_rows(100, T0, 1000)
        sent = 0

        async def measure(span: float, into: Measured) -> None:
            nonlocal sent
            stop = time.monotonic() + span

            def ask_healthz() -> None:
                while time.monotonic() < stop:
                    into.healthz.append(healthz_seconds(port))
                    time.sleep(0.05)

            asker = asyncio.create_task(asyncio.to_thread(ask_healthz))
            while time.monotonic() < stop:
                published = time.monotonic()
                agg.publish(100, "TSLA", rows[sent : sent + 1])
                bar = (await client.bars(1, timeout=5))[0]
                into.bar_delays.append(time.monotonic() - published)
                assert bar["s"] == int(rows[sent]["s"]), bar
                sent += 1
                into.files.append(open_files(pid))
                into.rss.append(rss_bytes(pid))
                await asyncio.sleep(0.1)
            await asyncio.wait_for(asker, 10)

        before = Measured()
        await measure(1.0, before)
        flood = Flood(port, addresses, per_address)
        try:
            total = len(addresses) * per_address
            deadline = time.monotonic() + 15
            while flood.counts.get("connects", 0) < total:
                assert flood.popen.poll() is None, "flood process died"
                assert time.monotonic() < deadline, f"flood did not connect: {flood.counts}"
                await asyncio.sleep(0.05)
            during = Measured()
            await measure(seconds, during)
            counts = dict(flood.counts)
        finally:
            flood.stop()
        counters = scrape(port)
        await client.close()
    return before, during, counters, counts


def report(before: Measured, during: Measured, counts: dict[str, int]) -> str:
    return (
        f"healthz max {max(before.healthz):.3f} s before, {max(during.healthz):.3f} s during "
        f"({len(during.healthz)} asked); bar delay max {max(before.bar_delays):.3f} s before, "
        f"{max(during.bar_delays):.3f} s during; open files {max(before.files)} before, "
        f"{max(during.files)} during; RSS {max(before.rss) >> 20} MiB before, "
        f"{max(during.rss) >> 20} MiB during; flood {counts}"
    )


async def test_a_half_open_flood_from_one_address_is_held_to_its_per_address_cap_while_a_client_and_healthz_keep_their_latency(
    agg: FakeAgg,
) -> None:
    before, during, counters, counts = await flood_and_measure(
        agg, ["127.0.0.2"], 4000, seconds=6.0
    )
    print(report(before, during, counts))
    # every /healthz answered, fast; every bar delivered, fast
    assert max(during.healthz) < HEALTHZ_BOUND, report(before, during, counts)
    assert max(during.bar_delays) < BAR_BOUND, report(before, during, counts)
    # the bridge held at most the address's cap of handshakes
    cap = LIMITS.max_handshakes_per_address
    assert max(during.files) <= max(before.files) + cap + FILES_SLACK, report(
        before, during, counts
    )
    assert max(during.rss) <= max(before.rss) + RSS_GROWTH_BOUND, report(before, during, counts)
    # the rest were refused at once, and counted
    refused = counters["polyfan_bridge_refused_address_handshakes_total"]
    assert refused >= 4000 - cap, counters
    assert counters["polyfan_bridge_refused_connections_total"] >= refused
    assert counts["closed_by_server"] >= 4000 - cap, counts


async def test_a_flood_from_forty_addresses_fills_at_most_the_handshake_cap_and_healthz_still_gets_in(
    agg: FakeAgg,
) -> None:
    addresses = [f"127.0.0.{k}" for k in range(2, 42)]
    before, during, counters, counts = await flood_and_measure(agg, addresses, 100, seconds=6.0)
    print(report(before, during, counts))
    assert max(during.healthz) < HEALTHZ_BOUND, report(before, during, counts)
    assert max(during.bar_delays) < BAR_BOUND, report(before, during, counts)
    assert max(during.files) <= max(before.files) + LIMITS.max_handshakes + FILES_SLACK, report(
        before, during, counts
    )
    assert max(during.rss) <= max(before.rss) + RSS_GROWTH_BOUND, report(before, during, counts)
    # over the cap, the flood's own connections were refused, and /healthz took the place of
    # one from the address holding the most
    assert counters["polyfan_bridge_refused_handshakes_total"] > 0, counters
    assert counters["polyfan_bridge_handshakes_evicted_total"] > 0, counters
    # held longer than request_timeout without a request: closed
    assert counters["polyfan_bridge_handshake_timeouts_total"] > 0, counters


async def open_when_free(url: str) -> Client:
    """A client, once the bridge has counted out this address's last connection (a closed
    one is counted out when the bridge sees it close, a moment after the client did)."""
    deadline = time.monotonic() + 5
    while True:
        try:
            return await Client.open(url, token="t")
        except (InvalidMessage, ConnectionResetError):  # reset at once: still at its cap
            assert time.monotonic() < deadline, "the address never got its place back"
            await asyncio.sleep(0.05)


def scrape_when_free(port: int) -> dict[str, float]:
    deadline = time.monotonic() + 5
    while True:
        try:
            return scrape(port)
        except OSError:  # reset at once: the address is still at its cap
            assert time.monotonic() < deadline, "the address never got its place back"
            time.sleep(0.05)


async def test_the_connection_caps_are_flags_and_past_them_connections_are_refused(
    agg: FakeAgg,
) -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/"
    args = ["--max-handshakes", "7", "--max-handshakes-per-address", "0"]
    args += ["--max-connections-per-address", "3"]
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", *args) as bridge:
        bridge.wait_for("ready:")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/info", timeout=5) as response:
            limits = json.load(response)["limits"]
        assert (
            limits["max_handshakes"],
            limits["max_handshakes_per_address"],
            limits["max_connections_per_address"],
        ) == (7, 0, 3)
        clients = [await open_when_free(url) for _ in range(3)]
        # a fourth from 127.0.0.1: reset at once (seen during the connect or the handshake)
        with pytest.raises((InvalidMessage, ConnectionResetError)):
            await Client.open(url, token="t")
        await clients.pop().close()  # one place free: /metrics can be asked
        values = await asyncio.to_thread(scrape_when_free, port)
        assert values["polyfan_bridge_refused_address_connections_total"] >= 1
        clients.append(await open_when_free(url))
        for client in clients:
            await client.close()
