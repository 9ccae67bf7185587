"""``polyfan demo``: the whole pipeline from one command, stopped by Ctrl-C."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from polyfan.demo import STOP_TIMEOUT
from procs import Proc, free_port
from wsclient import Client


def http_json(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as response:
        return orjson.loads(response.read())


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def command_line(pid: int) -> str:
    return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()


def role(pid: int) -> str:
    return command_line(pid).split(" -m polyfan ")[1].split()[0]


async def test_demo_serves_the_page_and_live_bars_then_stops_everything_on_ctrl_c() -> None:
    port = free_port()
    env = {"MASSIVE_API_KEY": "real-key-must-not-leak-1234"}
    with Proc(
        "demo", "--listen", f"127.0.0.1:{port}", "--symbols", "5", "--rate", "500", env=env
    ) as demo:
        demo.wait_for("ready: demo serving", timeout=90)
        assert f"polyfan demo: open http://127.0.0.1:{port}/" in demo.output
        children = children_of(demo.popen.pid)
        roles = sorted(role(pid) for pid in children)
        assert roles == ["agg", "bridge", "proxy", "sim"]
        for pid in children:  # only the proxy has a key, and it is the demo's, not the user's
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            keys = [v for v in environ if v.startswith((b"MASSIVE_API_KEY=", b"POLYGON_API_KEY="))]
            assert keys == ([b"MASSIVE_API_KEY=demo"] if role(pid) == "proxy" else [])

        page = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read()
        )
        assert b"<html" in page.lower() or b"<!doctype html" in page.lower()
        symbols = await asyncio.to_thread(http_json, port, "/api/symbols")
        deadline = time.monotonic() + 10
        while not symbols:
            assert time.monotonic() < deadline, "no symbol traded"
            await asyncio.sleep(0.1)
            symbols = await asyncio.to_thread(http_json, port, "/api/symbols")
        top = symbols[0]["sym"]
        client = await Client.open(f"ws://127.0.0.1:{port}/", token="demo")
        await client.send({"action": "subscribe", "params": "100Ms.*"})
        assert (await client.next_event())["message"] == "subscribed to: 100Ms.*"
        bar = (await client.bars(1, timeout=10))[0]
        assert bar["interval"] == 100 and bar["e"] == bar["s"] + 100
        deadline = time.monotonic() + 10
        history = await asyncio.to_thread(http_json, port, f"/api/bars?channel=1000Ms.{top}")
        while not history:  # the first 1 s bar closes about 1.25 s after the first trade
            assert time.monotonic() < deadline, f"no 1s bar of {top} stored"
            await asyncio.sleep(0.1)
            history = await asyncio.to_thread(http_json, port, f"/api/bars?channel=1000Ms.{top}")
        assert all(b["sym"] == top and b["interval"] == 1000 for b in history)

        assert await asyncio.to_thread(demo.stop, STOP_TIMEOUT + 5) == 0
        assert "did not stop on SIGINT" not in demo.output  # each child stopped by itself
        for pid in children:
            assert not Path(f"/proc/{pid}").exists() or "zombie" in _state(pid)
        assert "real-key-must-not-leak" not in demo.output
        await client.ws.wait_closed()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split("\n")[0].lower()
    except (OSError, IndexError):
        return "zombie"


def test_demo_says_which_child_died_and_exits_non_zero() -> None:
    port = free_port()
    with Proc("demo", "--listen", f"127.0.0.1:{port}", "--symbols", "3", "--rate", "100") as demo:
        demo.wait_for("ready: demo serving", timeout=90)
        agg = next(p for p in children_of(demo.popen.pid) if role(p) == "agg")
        os.kill(agg, signal.SIGKILL)
        assert demo.wait(10) == 1
        assert "demo: agg exited unexpectedly with status -9" in demo.output


def test_demo_with_its_port_taken_reports_the_bridge_failure() -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with Proc(
            "demo", "--listen", f"127.0.0.1:{port}", "--symbols", "2", "--rate", "50"
        ) as demo:
            assert demo.wait(90) == 1
            assert "demo: bridge exited with status" in demo.output
            assert "cannot listen" in demo.output


def test_demo_on_every_interface_prints_a_url_a_browser_can_open() -> None:
    port = free_port()
    with Proc("demo", "--listen", f"0.0.0.0:{port}", "--symbols", "2", "--rate", "50") as demo:
        demo.wait_for("ready: demo serving", timeout=90)
        assert f"polyfan demo: open http://127.0.0.1:{port}/" in demo.output
        deadline = time.monotonic() + 10
        while True:
            try:
                assert http_json(port, "/healthz")["status"] == "ok"
                break
            except urllib.error.HTTPError as exc:  # 503 until the agg's announce arrives
                assert exc.code == 503
                assert time.monotonic() < deadline, "the demo's bridge never became healthy"
                time.sleep(0.1)
        assert demo.stop() == 0
