"""What a client sees when a process dies: run ``.venv/bin/python bench/bench_outages.py``.

Starts sim → proxy → agg → bridge from the CLI over ipc, subscribes a WebSocket client to
``100Ms.*`` and prints, for ``kill -9`` of the proxy (restarted ``--down`` seconds later) and of
the agg (the same):

- ``feed_down after``: from the kill to the client's ``feed_down`` status (CONTRACT §12: 3 s);
- ``feed_up after restart``: from the restart to the client's ``feed_up``;
- ``window``: the ``[s, e]`` the client was told, in feed-clock seconds;
- ``bars marked``: 100 ms bars the client got with ``outage: true`` around it, and the bars it
  got unmarked inside the window (must be 0).

The machine is shared and has 2 cores: figures are noisy. No figure here is checked by a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from procs import free_port

KEY = {"MASSIVE_API_KEY": "bench-key-123456"}


def start(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    full = {**os.environ, "POLYFAN_LOG": "warning", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-m", "polyfan", *args],
        env=full,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


async def events_until(
    ws: ClientConnection, bars: list[dict[str, Any]], status: str, timeout: float
) -> dict[str, Any]:
    """Read until the status ``status`` arrives; bars meanwhile go into ``bars``."""
    deadline = time.monotonic() + timeout
    while True:
        frame = await asyncio.wait_for(ws.recv(), max(0.01, deadline - time.monotonic()))
        for event in orjson.loads(frame):
            if event["ev"] == "MB":
                bars.append(event)
            elif event.get("status") == status:
                return event


async def scenario(name: str, which: str, down_s: float, procs: dict[str, Any]) -> None:
    ws = procs["ws"]
    bars: list[dict[str, Any]] = []
    victim = procs[which]
    victim.kill()
    victim.wait()
    killed = time.monotonic()
    told_down = await events_until(ws, bars, "feed_down", 10)
    down_after = time.monotonic() - killed
    await asyncio.sleep(max(0.0, down_s - (time.monotonic() - killed)))
    procs[which] = start(*procs[f"{which}_args"], env=KEY if which == "proxy" else None)
    restarted = time.monotonic()
    told_up = await events_until(ws, bars, "feed_up", 30)
    up_after = time.monotonic() - restarted
    s, e = told_up["s"], told_up["e"]
    end = time.monotonic() + 3  # the bars that close after it
    while time.monotonic() < end:
        try:
            await events_until(ws, bars, "never", end - time.monotonic())
        except TimeoutError:
            break
    marked = sum(1 for b in bars if b.get("outage"))
    unmarked_inside = sum(1 for b in bars if not b.get("outage") and s <= b["s"] <= e)
    print(
        f"{name:<22} feed_down after {down_after:5.2f} s   feed_up after restart "
        f"{up_after:5.2f} s   window {(e - s) / 1000:6.2f} s (told down at s={told_down['s']})   "
        f"bars marked {marked:4d}   unmarked inside {unmarked_inside}"
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--down", type=float, default=5.0, help="seconds each process stays dead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        sim_port, http = free_port(), free_port()
        proxy_pub, agg_pub = f"ipc://{tmp}/proxy", f"ipc://{tmp}/agg"
        procs: dict[str, Any] = {
            "proxy_args": ("proxy", "--upstream", f"ws://127.0.0.1:{sim_port}/stocks", "--pub",
                           proxy_pub),
            "agg_args": ("agg", "--sub", proxy_pub, "--pub", agg_pub),
        }  # fmt: skip
        procs["sim"] = start("sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", "50")
        procs["proxy"] = start(*procs["proxy_args"], env=KEY)
        procs["agg"] = start(*procs["agg_args"])
        procs["bridge"] = start("bridge", "--sub", agg_pub, "--listen", f"127.0.0.1:{http}")
        try:
            deadline = time.monotonic() + 60
            while not healthy(http):
                assert time.monotonic() < deadline, "the bridge never heard the agg"
                await asyncio.sleep(0.2)
            async with connect(f"ws://127.0.0.1:{http}/", max_size=None) as ws:
                await ws.send(orjson.dumps({"action": "auth", "params": "bench"}).decode())
                await ws.send(orjson.dumps({"action": "subscribe", "params": "100Ms.*"}).decode())
                procs["ws"] = ws
                await asyncio.sleep(5)  # bars flow, and the agg's first (marked) bars are past
                print(f"sim 50 symbols at 2,000 trades/s; each process dead {args.down:g} s")
                await scenario("kill -9 proxy", "proxy", args.down, procs)
                await asyncio.sleep(3)
                await scenario("kill -9 agg", "agg", args.down, procs)
        finally:
            for key in ("bridge", "agg", "proxy", "sim"):
                procs[key].terminate()
                procs[key].wait()


if __name__ == "__main__":
    asyncio.run(main())
