"""``polyfan sim``: a local stand-in for the Polygon stocks WebSocket, fed by ``market.py``.

It speaks the protocol of shared/polygon/protocol.md through the server core it shares with
``polyfan replay`` (:mod:`polyfan.stockserver`, :mod:`polyfan.feed.serving`): ``connected`` on
open; ``auth`` with the
``--api-key`` (any key when none is set) gets ``auth_success``, a wrong key ``auth_failed`` and a
close; anything else before auth gets ``auth_required``; ``subscribe`` / ``unsubscribe`` take
channels such as ``T.*,Q.*,A.AAPL`` and answer one ``success`` status per channel. It streams
``T`` trades at ``--rate`` per second over all symbols, ``Q`` quotes at ``--quotes-per-trade``
times that rate (only while a client subscribes quotes), ``LULD`` bands, and ``A``/``AM``
aggregates computed from its own trades (:meth:`polyfan.market.Market.stream`), in frames of 1
to 100 events; each client gets the events of the channels it subscribed. Like the real server, it allows one connection per key: a second
connection authenticating with the same key gets the older one ``max_connections`` and a close
(1008); and a client that falls more than ``MAX_BACKLOG_FRAMES`` frames behind gets
``slow_consumer`` and is closed.

For tests:

- ``--script PATH`` sends the file's lines verbatim, one text frame each (garbage allowed),
  once the client has subscribed, instead of the market stream; the connection stays open.
- ``--record PATH`` writes every frame sent after subscribe as a JSON line
  ``{"client": N, "frame": "<the frame text>"}``: the reference of exactly what was sent.
- SIGUSR1 drops every client connection abruptly (no close frame), as the real server can.

:class:`SimServer` runs in-process as well (tests use it with their own event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from pathlib import Path

import orjson

from polyfan.config import SimConfig
from polyfan.feed.serving import status
from polyfan.lifecycle import serve_until_stopped
from polyfan.market import Market
from polyfan.stockserver import StocksServer, StreamClient

__all__ = ["SimServer", "read_record", "run", "serve_sim", "status"]

log = logging.getLogger("polyfan.sim")

TICK_S = 0.01
MAX_CATCH_UP_S = 0.1  # a late tick makes at most this much of --rate at once
THROUGHPUT_EVERY_S = 5.0
MAX_BACKLOG_FRAMES = 20_000
KINDS = frozenset({"T", "Q", "A", "AM", "LULD"})  # the event types the market makes


class SimServer:
    """The simulator: ``await start()``, then it serves until ``await close()``."""

    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.market = Market(config.symbols, config.seed, late_fraction=config.late_fraction)
        self.script = config.script.read_text().splitlines() if config.script else None
        self.server = StocksServer(
            config.listen,
            api_key=config.api_key,
            log=log,
            max_backlog=MAX_BACKLOG_FRAMES,
            record=config.record,
            on_subscribed=self._send_script if self.script is not None else None,
        )
        self._producer: asyncio.Task[None] | None = None

    @property
    def port(self) -> int:
        return self.server.port

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def events_sent(self) -> int:
        return self.server.events_sent

    async def start(self) -> None:
        await self.server.start()
        if self.script is None:
            self._producer = asyncio.create_task(self._produce())

    async def close(self) -> None:
        if self._producer is not None:
            self._producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._producer
        await self.server.close()

    def drop_clients(self) -> int:
        """Abort every client's TCP connection without a close frame; return how many."""
        return self.server.drop_clients()

    def _send_script(self, client: StreamClient) -> None:
        assert self.script is not None
        for line in self.script:
            client.queue(line)

    # --- the market stream ------------------------------------------------------------------

    async def _produce(self) -> None:
        rate = self.config.rate
        due = 0.0
        last = time.monotonic()
        last_report, reported = last, 0
        dropped = 0  # trades not made since the last report: the sim could not keep up
        while True:
            await asyncio.sleep(TICK_S)
            now = time.monotonic()
            due += rate * (now - last)
            last = now
            if due > rate * MAX_CATCH_UP_S:  # behind: catching up would only fall further back
                dropped += int(due - rate * MAX_CATCH_UP_S)
                due = rate * MAX_CATCH_UP_S
            count = int(due)
            due -= count
            streaming = self.server.streaming()
            if streaming:
                quoting = any(c.state.wants_any("Q") for c in streaming)
                frames = self.market.stream(
                    count,
                    int(time.time() * 1000),
                    quotes_per_trade=self.config.quotes_per_trade if quoting else 0.0,
                )
                self.server.publish(frames, streaming, KINDS)
            if now - last_report >= THROUGHPUT_EVERY_S:
                log.info(
                    "sent %d events in %.0f s (%.0f/s) to %d clients",
                    self.events_sent - reported,
                    now - last_report,
                    (self.events_sent - reported) / (now - last_report),
                    len(streaming),
                )
                if dropped:
                    log.warning(
                        "cannot keep up with --rate %g: %d trades (and their quotes) not made "
                        "in the last %.0f s",
                        rate,
                        dropped,
                        now - last_report,
                    )
                self.server.flush_record()
                last_report, reported, dropped = now, self.events_sent, 0


async def serve_sim(config: SimConfig, stop: asyncio.Event) -> None:
    """Serve until ``stop`` is set; SIGUSR1 drops every client connection."""
    sim = SimServer(config)
    await sim.start()
    loop = asyncio.get_running_loop()

    def drop() -> None:
        log.info("SIGUSR1: dropping %d client connections", sim.drop_clients())

    loop.add_signal_handler(signal.SIGUSR1, drop)
    symbols = sim.market.symbols
    log.info(
        "ready: sim listening on %s (%d symbols, %s)",
        sim.url,
        len(symbols),
        f"script {config.script}"
        if sim.script is not None
        else f"{config.rate:g} trades/s, {config.quotes_per_trade:g} quotes per trade",
    )
    try:
        await stop.wait()
    finally:
        loop.remove_signal_handler(signal.SIGUSR1)
        log.info("stopping; sent %d events", sim.events_sent)
        await sim.close()


def run(config: SimConfig) -> int:
    asyncio.run(serve_until_stopped(lambda stop: serve_sim(config, stop)))
    return 0


def read_record(path: Path) -> list[tuple[int, str]]:
    """``(client, frame text)`` for every line of a ``--record`` file."""
    rows = []
    for line in path.read_bytes().splitlines():
        value = orjson.loads(line)
        rows.append((int(value["client"]), str(value["frame"])))
    return rows
