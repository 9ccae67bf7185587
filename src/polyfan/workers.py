"""``polyfan bridge --workers N``: N bridge processes sharing one port with ``SO_REUSEPORT``.

One bridge process writes every client's frame with one ``send()`` per client per pass; the
kernel spends most of a pass there. With N workers the kernel spreads new connections over N
processes (each a complete bridge with its own aggregator subscriptions), so the passes run in
parallel on N cores.

The parent forks the workers before any event loop, socket or thread exists, waits for each to
serve, logs the one ``ready:`` line, and supervises: SIGINT/SIGTERM are passed on and the
workers stop within 2 s; if a worker dies, the others are stopped and the bridge exits 1.

Counters stay whole: each worker copies its counter values into its row of a shared table
(:class:`SharedTable`) every 250 ms and whenever it answers ``/metrics``, ``/healthz`` or
``/api/info``, which report the sum over all workers (other workers' rows at most 250 ms old).
The histograms (``polyfan_bridge_delivery_seconds``) are shared the same way, one column per
bucket: bucket counts, sums and counts add up exactly, so the bridge's histogram is the one of
all its workers' observations. ``--metrics HOST:PORT`` is served by the parent from the table
(its ``process_*`` metrics are the parent's own); ``/metrics`` on the client port by whichever
worker takes the request (the same sums; ``process_*`` of that worker).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import signal
import time
from collections.abc import Callable, Coroutine, Sequence
from types import FrameType
from typing import Any

import numpy as np

from polyfan.config import BridgeConfig
from polyfan.errors import ConfigError
from polyfan.metrics import Registry, listen

log = logging.getLogger("polyfan.bridge")

STOP_TIMEOUT = 1.6  # seconds for workers to stop before they are killed


class SharedTable:
    """One row of float64 counter values per worker, in memory shared by all of them."""

    def __init__(self, workers: int, names: Sequence[str]) -> None:
        self.names = list(names)
        self._raw: Any = multiprocessing.get_context("fork").RawArray("d", workers * len(names))
        self.rows = np.frombuffer(self._raw, dtype=np.float64).reshape(workers, len(names))

    def publish(self, worker: int, values: dict[str, float]) -> None:
        self.rows[worker] = [values.get(name, 0.0) for name in self.names]

    def totals(self) -> dict[str, float]:
        return dict(zip(self.names, self.rows.sum(axis=0).tolist(), strict=True))


class Worker:
    """This process's place among the workers, handed to its :class:`~polyfan.bridge.Bridge`."""

    def __init__(self, index: int, count: int, table: SharedTable) -> None:
        self.index = index
        self.count = count
        self.table = table


Serve = Callable[[Worker, Any], Coroutine[Any, Any, None]]


def run_workers(config: BridgeConfig, workers: int, serve: Serve, counters: Registry) -> int:
    """Fork ``workers`` bridges on one port and supervise them; exit status 0, or 1 if one dies.

    ``serve(worker, ready)`` runs one bridge until SIGTERM and puts ``worker.index`` on
    ``ready`` once it serves; ``counters``, a registry with the bridge's metrics declared, names
    the columns of the shared table (its samples) and renders the table's sums for
    ``--metrics``. Both come from the bridge (this module imports nothing of it).
    """
    if config.listen[1] == 0:
        raise ConfigError("--listen: give a port (not 0) with --workers; they share it")
    context = multiprocessing.get_context("fork")
    table = SharedTable(workers, list(counters.values()))
    metrics = None
    if config.metrics is not None:  # bound now, started once the workers are forked
        metrics = listen(config.metrics, lambda: counters.render(table.totals()))
    ready: Any = context.SimpleQueue()

    def work(index: int) -> None:
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        asyncio.run(serve(Worker(index, workers, table), ready))

    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    processes = []
    try:
        for index in range(workers):
            process = context.Process(target=work, args=(index,), name=f"bridge-worker-{index}")
            process.start()
            processes.append(process)
        if metrics is not None:
            metrics.start()
        waiting = set(range(workers))
        while waiting and not stopping:
            if not ready.empty():
                waiting.discard(ready.get())
                continue
            _check(processes)
            time.sleep(0.02)
        if not stopping:
            if not config.tokens:
                log.warning("no --token configured: any client auth is accepted")
            host, port = config.listen
            ws, web = ("wss", "https") if config.tls_cert is not None else ("ws", "http")
            log.info(
                "ready: serving %s://%s:%d/ and %s://%s:%d/ with %d workers from %d "
                "aggregator(s): %s",
                ws,
                host,
                port,
                web,
                host,
                port,
                workers,
                len(config.sub),
                ", ".join(config.sub),
            )
        while not stopping:
            _check(processes)
            time.sleep(0.05)
        return 0
    except WorkerExitedError as exc:
        log.error("%s; stopping the other workers", exc)
        return 1
    finally:
        if metrics is not None:
            metrics.close()
        _stop(processes)
        for signum, handler in previous.items():
            signal.signal(signum, handler)


class WorkerExitedError(Exception):
    pass


def _check(processes: list[Any]) -> None:
    for process in processes:
        if process.exitcode is not None:
            raise WorkerExitedError(f"{process.name} exited with status {process.exitcode}")


def _stop(processes: list[Any]) -> None:
    for process in processes:
        if process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                process.terminate()  # SIGTERM: a clean stop
    deadline = time.monotonic() + STOP_TIMEOUT
    for process in processes:
        process.join(max(0.01, deadline - time.monotonic()))
        if process.exitcode is None:
            log.warning("%s did not stop; killing it", process.name)
            process.kill()
            process.join()
