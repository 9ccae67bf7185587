"""serve_until_stopped: SIGINT or SIGTERM sets the event the server waits on; handlers go after."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from polyfan.lifecycle import serve_until_stopped


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_a_stop_signal_sets_the_event_and_the_server_shuts_down(signum: int) -> None:
    steps: list[str] = []

    async def serve(stop: asyncio.Event) -> None:
        steps.append("serving")
        asyncio.get_running_loop().call_soon(os.kill, os.getpid(), signum)
        await asyncio.wait_for(stop.wait(), timeout=5)
        steps.append("stopped")

    await serve_until_stopped(serve)
    assert steps == ["serving", "stopped"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_the_handlers_are_removed_when_the_server_fails() -> None:
    async def serve(stop: asyncio.Event) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        await serve_until_stopped(serve)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
