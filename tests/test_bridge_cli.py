"""``polyfan bridge`` as a user runs it: a real subprocess from the CLI."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import zmq
from massive import WebSocketClient

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan.wire import codec
from procs import Proc, free_port, scrape
from wsclient import Client

T0 = 1_781_622_376_000


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


def http_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return orjson.loads(response.read())


async def test_official_massive_client_connects_authenticates_and_gets_bars_unchanged(
    agg: FakeAgg,
) -> None:
    port = free_port()
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", "--token", "k3y"):
        await asyncio.to_thread(_wait_http, port)
        frames: list[str] = []

        async def processor(message: str | bytes) -> None:
            frames.append(message if isinstance(message, str) else message.decode())

        client = WebSocketClient(
            api_key="k3y",
            feed=f"127.0.0.1:{port}",
            market="stocks",
            secure=False,
            raw=True,
            subscriptions=["500Ms.TSLA"],
            max_reconnects=0,
        )
        task = asyncio.create_task(client.connect(processor))
        try:
            await asyncio.to_thread(agg.wait_subscribed, b"500Ms.TSLA\x00", 15)
            rows = bar_rows(500, T0, 20)
            for i in range(0, 20, 5):
                agg.publish(500, "TSLA", rows[i : i + 5])
            expected = [expected_event("TSLA", 500, r) for r in rows]
            deadline = time.monotonic() + 15
            while sum(f.count('"ev":"MB"') for f in frames) < 20:
                assert time.monotonic() < deadline, frames
                await asyncio.sleep(0.01)
        finally:
            await client.close()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        events = [e for f in frames for e in orjson.loads(f)]
        assert events[0] == {
            "ev": "status",
            "status": "success",
            "message": "subscribed to: 500Ms.TSLA",
        }
        assert [e for e in events if e["ev"] == "MB"] == expected
        for frame in frames:  # byte for byte the canonical compact encoding
            assert frame == orjson.dumps(orjson.loads(frame)).decode()


def _wait_http(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if http_json(port, "/healthz")["aggs_heard"]:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "bridge not healthy"
        time.sleep(0.05)


async def test_sigint_stops_the_bridge_within_2s_with_clients_connected(agg: FakeAgg) -> None:
    port = free_port()
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}") as bridge:
        bridge.wait_for(f"ready: serving ws://127.0.0.1:{port}/")
        assert "no --token configured" in bridge.output
        clients = [await Client.open(f"ws://127.0.0.1:{port}/", token="x") for _ in range(5)]
        for client in clients:
            await client.send({"action": "subscribe", "params": "100Ms.A"})
            await client.statuses(1)
        started = time.monotonic()
        assert await asyncio.to_thread(bridge.stop) == 0
        assert time.monotonic() - started < 2.0
        for client in clients:
            await client.ws.wait_closed()
            assert client.ws.close_code == 1001


async def test_tokens_come_from_the_environment_too(agg: FakeAgg) -> None:
    port = free_port()
    env = {"POLYFAN_TOKENS": "alpha, beta"}
    with Proc(
        "bridge",
        "--sub",
        agg.endpoint,
        "--listen",
        f"127.0.0.1:{port}",
        "--token",
        "gamma",
        env=env,
    ) as bridge:
        bridge.wait_for("ready:")
        assert "no --token configured" not in bridge.output
        for token in ("alpha", "beta", "gamma"):
            client = await Client.open(f"ws://127.0.0.1:{port}/", token=token)
            await client.close()
        client = await Client.open(f"ws://127.0.0.1:{port}/", token=None)
        await client.send({"action": "auth", "params": "alpha,beta"})
        assert (await client.next_event())["status"] == "auth_failed"
        assert "alpha" not in bridge.output
        assert bridge.stop() == 0


def test_a_port_in_use_is_a_clear_error() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with Proc(
            "bridge", "--sub", "tcp://127.0.0.1:1", "--listen", f"127.0.0.1:{port}"
        ) as bridge:
            assert bridge.wait(15) != 0
            assert f"--listen: cannot listen on 127.0.0.1:{port}" in bridge.output
            assert "Traceback" not in bridge.output


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_metrics_port_in_use_is_a_clear_error(workers: str) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = ["bridge", "--sub", "tcp://127.0.0.1:1", "--listen", f"127.0.0.1:{free_port()}"]
        with Proc(*args, "--workers", workers, "--metrics", f"127.0.0.1:{port}") as bridge:
            assert bridge.wait(15) == 2
            assert f"--metrics: cannot listen on 127.0.0.1:{port}" in bridge.output
            assert "Traceback" not in bridge.output


def test_a_bad_sub_endpoint_is_a_usage_error() -> None:
    with Proc("bridge", "--sub", "localhost:8769") as bridge:
        assert bridge.wait(15) == 2
        assert "--sub" in bridge.output


def test_a_bad_allow_origin_is_a_usage_error() -> None:
    with Proc("bridge", "--allow-origin", "app.example") as bridge:
        assert bridge.wait(15) == 2
        assert "--allow-origin" in bridge.output and "Traceback" not in bridge.output


def _status_and_cors(port: int, origin: str) -> tuple[int, str | None]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/api/info", headers={"Origin": origin}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.headers["Access-Control-Allow-Origin"]
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Access-Control-Allow-Origin"]


def test_allow_origin_flags_list_the_pages_that_may_use_the_bridge(agg: FakeAgg) -> None:
    port = free_port()
    listed = ["--allow-origin", "https://a.example", "--allow-origin", "https://b.example:8443"]
    with Proc("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", *listed) as bridge:
        bridge.wait_for("ready:")
        assert _status_and_cors(port, "https://a.example") == (200, "https://a.example")
        assert _status_and_cors(port, "https://b.example:8443") == (200, "https://b.example:8443")
        assert _status_and_cors(port, f"http://127.0.0.1:{port}") == (200, None)
        assert _status_and_cors(port, "https://c.example") == (403, None)


# -- the real pipeline ---------------------------------------------------------------------------


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """ipc:// paths must stay under ~100 bytes; pytest's tmp_path can be longer."""
    with tempfile.TemporaryDirectory(prefix="pf-") as path:
        yield Path(path)


async def test_real_pipeline_client_gets_exactly_what_the_agg_published_and_api_bars_agrees(
    short_tmp: Path,
) -> None:
    trades, bars = f"ipc://{short_tmp}/trades.sock", f"ipc://{short_tmp}/bars.sock"
    port = free_port()
    symbols = "AAPL,MSFT,TSLA"
    with (
        Proc(
            "sim", "--listen", "127.0.0.1:0", "--symbols", symbols, "--rate", "600", "--seed", "7"
        ) as sim,
    ):
        url = sim.wait_for(r"ready: .*?(ws://\S+)").group(1)
        with (
            Proc(
                "proxy", "--upstream", url, "--pub", trades, env={"MASSIVE_API_KEY": "demo"}
            ) as proxy,
            Proc(
                "agg", "--sub", trades, "--pub", bars, "--interval", "100ms", "--interval", "1s"
            ) as agg,
            Proc("bridge", "--sub", bars, "--listen", f"127.0.0.1:{port}") as bridge,
        ):
            for proc in (proxy, agg, bridge):
                proc.wait_for("ready:", timeout=60)
            await asyncio.to_thread(_wait_http, port, 30)

            # An independent subscriber on the agg's PUB socket, the reference.
            context = zmq.Context()
            sub = context.socket(zmq.SUB)
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"100Ms.")
            sub.connect(bars)
            reference: list[dict[str, Any]] = []
            client = await Client.open(f"ws://127.0.0.1:{port}/", token="x")
            await client.send({"action": "subscribe", "params": "100Ms.*"})
            assert (await client.next_event())["message"] == "subscribed to: 100Ms.*"

            received: list[dict[str, Any]] = []
            late: Client | None = None
            late_symbol, late_since = "", 0
            deadline = time.monotonic() + 4.0
            while time.monotonic() < deadline:
                while sub.poll(0):
                    message = codec.decode(sub.recv())
                    interval, _, symbol = message.topic.partition("Ms.")
                    reference.extend(
                        expected_event(symbol, int(interval), row) for row in codec.records(message)
                    )
                with contextlib.suppress(TimeoutError):
                    received.append(await client.next_event(timeout=0.05))
                if late is None and reference and time.monotonic() > deadline - 2.0:
                    # A client joining while bars flow, asking for what it missed.
                    late_symbol, late_since = reference[0]["sym"], reference[0]["s"]
                    late = await Client.open(f"ws://127.0.0.1:{port}/", token="x")
                    await late.send(
                        {
                            "action": "subscribe",
                            "params": f"100Ms.{late_symbol}",
                            "since": late_since,
                        }
                    )
            await asyncio.sleep(0.3)
            while sub.poll(0):
                message = codec.decode(sub.recv())
                interval, _, symbol = message.topic.partition("Ms.")
                reference.extend(
                    expected_event(symbol, int(interval), row) for row in codec.records(message)
                )
            received.extend(client.pending())
            sub.close()
            context.term()

            assert len(received) > 30, "too few bars flowed to compare"
            assert all(e["ev"] == "MB" for e in received)
            # Both started at slightly different moments: compare where both were listening.
            # Each topic's bars come whole messages at a time and in s order on both sides,
            # so over the starts both saw of a symbol, each side has all of its bars.
            compared = 0
            for symbol in symbols.split(","):
                mine = [e for e in received if e["sym"] == symbol]
                theirs = [e for e in reference if e["sym"] == symbol]
                assert mine and theirs, f"no {symbol} bars to compare"
                start = max(mine[0]["s"], theirs[0]["s"])
                end = min(mine[-1]["s"], theirs[-1]["s"])
                inside = [e for e in mine if start <= e["s"] <= end]
                assert inside == [e for e in theirs if start <= e["s"] <= end], symbol
                history = await asyncio.to_thread(
                    http_json, port, f"/api/bars?channel=100Ms.{symbol}&limit=10000"
                )
                assert [e for e in history if start <= e["s"] <= end] == inside, symbol
                compared += len(inside)
            assert compared > 20
            assert late is not None
            assert (await late.next_event())["message"] == f"subscribed to: 100Ms.{late_symbol}"
            last = max(e["s"] for e in reference if e["sym"] == late_symbol)
            late_bars = [await late.next_event()]
            while late_bars[-1]["s"] < last:
                late_bars.append(await late.next_event())
            assert late_bars[0]["s"] == late_since  # history first, from since on
            expected = sorted(
                (e for e in reference if e["sym"] == late_symbol and e["s"] >= late_since),
                key=lambda e: e["s"],
            )
            assert late_bars == expected  # then live: nothing missing or repeated at the seam
            await late.close()
            metrics = await asyncio.to_thread(scrape, port)
            assert metrics["polyfan_bridge_gaps_total"] == 0
            await client.close()
            for proc in (bridge, agg, proxy):
                assert proc.stop() == 0
        assert sim.stop() == 0


# -- several worker processes on one port ------------------------------------------------------


async def test_replica_aggs_each_bar_once_in_order_and_bars_carry_on_when_one_is_killed(
    short_tmp: Path,
) -> None:
    """Two aggs on the same proxy, both behind one bridge: clients get each bar once, equal to
    what the surviving agg published, before and after the other is killed."""
    trades = f"ipc://{short_tmp}/trades.sock"
    first, second = f"ipc://{short_tmp}/bars1.sock", f"ipc://{short_tmp}/bars2.sock"
    port = free_port()
    symbols = "AAPL,MSFT,TSLA"
    agg_args = ("--sub", trades, "--interval", "100ms")
    with Proc(
        "sim", "--listen", "127.0.0.1:0", "--symbols", symbols, "--rate", "600", "--seed", "11"
    ) as sim:
        url = sim.wait_for(r"ready: .*?(ws://\S+)").group(1)
        with (
            Proc("proxy", "--upstream", url, "--pub", trades, env={"MASSIVE_API_KEY": "demo"}),
            Proc("agg", *agg_args, "--pub", first) as doomed,
            Proc("agg", *agg_args, "--pub", second) as survivor,
            Proc(
                "bridge", "--sub", first, "--sub", second, "--listen", f"127.0.0.1:{port}"
            ) as bridge,
        ):
            for proc in (doomed, survivor, bridge):
                proc.wait_for("ready:", timeout=60)
            deadline = time.monotonic() + 30
            while (await asyncio.to_thread(_healthz, port)).get("aggs_heard") != 2:
                assert time.monotonic() < deadline, "the bridge did not hear both aggs"
                await asyncio.sleep(0.05)
            context = zmq.Context()
            sub = context.socket(zmq.SUB)  # the reference: what the surviving agg publishes
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.SUBSCRIBE, b"100Ms.")
            sub.connect(second)
            reference: list[dict[str, Any]] = []

            def take_reference() -> None:
                while sub.poll(0):
                    message = codec.decode(sub.recv())
                    symbol = message.topic.partition("Ms.")[2]
                    reference.extend(expected_event(symbol, 100, r) for r in codec.records(message))

            exact = await Client.open(f"ws://127.0.0.1:{port}/", token="x")
            star = await Client.open(f"ws://127.0.0.1:{port}/", token="x")
            await exact.send({"action": "subscribe", "params": "100Ms.MSFT"})
            await star.send({"action": "subscribe", "params": "100Ms.*"})
            for client in (exact, star):
                assert (await client.next_event())["message"].startswith("subscribed to: ")
            killed_at = 0
            deadline = time.monotonic() + 5.0

            async def take_bars() -> None:
                for client in (exact, star):
                    with contextlib.suppress(TimeoutError):
                        while True:
                            await client.next_event(timeout=0.01)

            while time.monotonic() < deadline:
                take_reference()
                await take_bars()
                if not killed_at and time.monotonic() > deadline - 2.5:
                    doomed.popen.kill()  # the first --sub agg dies mid-stream
                    killed_at = reference[-1]["s"] if reference else 0
            await take_bars()
            take_reference()
            sub.close()
            context.term()
            assert killed_at, "no bars before the kill"
            for client, names in ((exact, ["MSFT"]), (star, symbols.split(","))):
                received = [e for e in client.events if e["ev"] == "MB"]
                for symbol in names:
                    mine = [e for e in received if e["sym"] == symbol]
                    theirs = [e for e in reference if e["sym"] == symbol]
                    starts = [e["s"] for e in mine]
                    assert starts == sorted(set(starts)), f"{symbol}: repeated or out of order"
                    # Both aggs listened by the reference's first bar: from 1 s (the margin)
                    # on, every bar is whole in both, so the copies are equal.
                    start = theirs[0]["s"] + 1_000
                    end = min(mine[-1]["s"], theirs[-1]["s"])
                    assert end > killed_at + 1_000, f"{symbol}: too little after the kill"
                    inside = [e for e in mine if start <= e["s"] <= end]
                    assert inside == [e for e in theirs if start <= e["s"] <= end], symbol
            values = await asyncio.to_thread(scrape, port)
            assert values["polyfan_bridge_bars_redundant_total"] > 0
            assert values["polyfan_bridge_gaps_total"] == 0
            await exact.close()
            await star.close()


def _healthz(port: int) -> dict[str, Any]:
    try:
        return dict(http_json(port, "/healthz"))
    except OSError:
        return {}


def children_of(pid: int) -> list[int]:
    return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


async def test_workers_share_the_port_and_every_client_gets_every_bar_and_counters_add_up(
    agg: FakeAgg,
) -> None:
    port, metrics = free_port(), free_port()
    args = ("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", "--workers", "2")
    with Proc(*args, "--metrics", f"127.0.0.1:{metrics}") as bridge:
        bridge.wait_for("ready: serving .* with 2 workers")
        assert bridge.output.count("no --token configured") == 1
        assert len(children_of(bridge.popen.pid)) == 2
        # Each worker is a whole bridge: wait until both have heard the agg's announce.
        first = bridge.wait_for(r"aggregator \S+ heard")
        bridge.wait_for(r"aggregator \S+ heard", start=bridge.lines.index(first.string) + 1)
        clients = []
        for _ in range(200):
            client = await Client.open(f"ws://127.0.0.1:{port}/", token="x")
            await client.send({"action": "subscribe", "params": "500Ms.W"})
            clients.append(client)
        for client in clients:
            assert (await client.next_event())["message"] == "subscribed to: 500Ms.W"
        # Both workers subscribed the topic on the agg (each is a whole bridge).
        await asyncio.to_thread(agg.wait_subscribed_times, b"500Ms.W\x00", 2)
        rows = bar_rows(500, T0, 10)
        agg.publish(500, "W", rows)
        expected = [expected_event("W", 500, r) for r in rows]
        for client in clients:
            assert await client.bars(10) == expected

        def counters_add_up(port: int) -> bool:
            values = scrape(port)
            return (
                values["polyfan_bridge_clients"] == 200
                and values["polyfan_bridge_bars_sent_total"] == 2000
                and values["polyfan_bridge_connections_total"] == 200
                # every bar written to a client observed once, whichever worker wrote it
                and values["polyfan_bridge_delivery_seconds_count"] == 2000
                and values['polyfan_bridge_delivery_seconds_bucket{le="+Inf"}'] == 2000
            )

        # the client port (any worker) and --metrics (the parent) give the same sums
        for where in (port, metrics):
            deadline = time.monotonic() + 5
            while not await asyncio.to_thread(counters_add_up, where):
                assert time.monotonic() < deadline, f"summed counters on port {where}"
                await asyncio.sleep(0.1)
        assert scrape(metrics)["process_cpu_seconds_total"] >= 0
        assert (await asyncio.to_thread(http_json, port, "/healthz"))["clients"] == 200
        started = time.monotonic()
        assert await asyncio.to_thread(bridge.stop) == 0
        assert time.monotonic() - started < 2.0
        for client in clients:
            await client.ws.wait_closed()


def test_a_worker_that_dies_stops_the_bridge_with_status_1(agg: FakeAgg) -> None:
    port = free_port()
    args = ("bridge", "--sub", agg.endpoint, "--listen", f"127.0.0.1:{port}", "--workers", "2")
    with Proc(*args) as bridge:
        bridge.wait_for("ready:")
        workers = children_of(bridge.popen.pid)
        os.kill(workers[0], signal.SIGKILL)
        assert bridge.wait(5) == 1
        assert "exited with status -9; stopping the other workers" in bridge.output
        assert (
            not Path(f"/proc/{workers[1]}").exists()
            or "Z" in Path(f"/proc/{workers[1]}/stat").read_text().split()[2]
        )


def test_workers_need_a_fixed_port() -> None:
    with Proc("bridge", "--listen", "127.0.0.1:0", "--workers", "2") as bridge:
        assert bridge.wait(10) == 2
        assert "give a port (not 0) with --workers" in bridge.output
