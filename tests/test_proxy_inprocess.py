"""The proxy shell in-process, for paths a subprocess test would have to wait too long for."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from websockets.asyncio.server import ServerConnection, serve

from polyfan import proxy
from polyfan.config import ProxyConfig

TIMEOUT = 10.0


async def test_a_server_that_never_confirms_the_subscription_is_left_and_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(proxy, "SUBSCRIBE_TIMEOUT_S", 0.3)
    connections: list[ServerConnection] = []
    two = asyncio.Event()

    async def silent(ws: ServerConnection) -> None:  # accepts, then says nothing
        connections.append(ws)
        if len(connections) >= 2:
            two.set()
        await ws.wait_closed()

    async with serve(silent, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        config = ProxyConfig(
            api_key="k" * 20, upstream=f"ws://127.0.0.1:{port}", pub=f"ipc://{tmp_path}/p"
        )
        the_proxy = proxy.Proxy(config)
        stop = asyncio.Event()
        task = asyncio.create_task(the_proxy.serve(stop))
        try:
            await asyncio.wait_for(two.wait(), TIMEOUT)
        finally:
            stop.set()
            await asyncio.wait_for(task, TIMEOUT)
    assert connections[0].close_code is not None  # the proxy left the first one
    assert the_proxy.m_reconnects.value >= 1
    assert the_proxy.m_trades.value == 0
