"""How a long-running asyncio command lives: it serves until SIGINT or SIGTERM, then stops.

``polyfan proxy``, ``polyfan sim`` and ``polyfan bridge`` each hand :func:`serve_until_stopped`
a coroutine function that serves until the event it is given is set, then shuts down cleanly
(closing its sockets, logging its last counts) before returning. The signal handlers are
installed before it starts and removed when it returns.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


async def serve_until_stopped(serve: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run ``serve(stop)`` with ``stop`` set by SIGINT or SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, stop.set)
    try:
        await serve(stop)
    finally:
        for signum in STOP_SIGNALS:
            loop.remove_signal_handler(signum)
