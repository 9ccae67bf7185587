"""The ``--metrics`` server of the proxy and the agg (polyfan.metrics.MetricsServer): bounded
threads and connections, the same Prometheus text."""

from __future__ import annotations

import resource
import select
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from polyfan import metrics
from polyfan.metrics import MetricsServer, Registry
from procs import Proc, free_port, scrape

IDLE = 300  # idle connections opened against the server
THREADS_SLACK = 2  # threads over the count before the idle connections


@pytest.fixture
def server() -> Iterator[MetricsServer]:
    registry = Registry()
    registry.counter("polyfan_test_things_total", "Things.").inc(3)
    srv = MetricsServer(registry, "127.0.0.1", 0)
    srv.start()
    yield srv
    srv.close()


def get(port: int, path: str, method: str = "GET") -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_metrics_are_served_as_prometheus_text_and_other_paths_get_404(
    server: MetricsServer,
) -> None:
    status, body = get(server.port, "/metrics")
    assert status == 200
    assert body.startswith(
        b"# HELP polyfan_test_things_total Things.\n"
        b"# TYPE polyfan_test_things_total counter\n"
        b"polyfan_test_things_total 3.0\n"
    )
    assert b"\nprocess_cpu_seconds_total " in body
    assert get(server.port, "/")[1].startswith(body[:100])
    assert get(server.port, "/metrics?x=1")[1].startswith(body[:100])
    assert get(server.port, "/metrics", "HEAD") == (200, b"")
    assert get(server.port, "/nope")[0] == 404
    assert get(server.port, "/metrics", "POST")[0] == 405


def test_a_connection_that_sends_no_request_is_closed_after_the_read_timeout(
    server: MetricsServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics, "READ_TIMEOUT", 0.2)
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        sock.settimeout(3)
        started = time.monotonic()
        assert sock.recv(1) == b""
        assert time.monotonic() - started < 2
    assert server.timeouts == 1


def test_past_the_cap_a_new_connection_takes_the_place_of_the_oldest_idle_one(
    server: MetricsServer,
) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(40)]
    try:
        deadline = time.monotonic() + 5
        while server.evicted < 40 - metrics.MAX_CONNECTIONS:
            assert time.monotonic() < deadline, (server.open, server.evicted)
            time.sleep(0.01)
        assert server.open == metrics.MAX_CONNECTIONS
        assert get(server.port, "/metrics")[0] == 200
        # the oldest were closed
        idle[0].settimeout(3)
        assert idle[0].recv(1) == b""
    finally:
        for sock in idle:
            sock.close()


def threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    raise AssertionError("no Threads: line")


def test_three_hundred_idle_connections_to_the_agg_metrics_take_no_thread_and_a_scrape_still_answers() -> (
    None
):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4096)), hard))
    port = free_port()
    args = ["agg", "--sub", f"tcp://127.0.0.1:{free_port()}"]
    args += ["--pub", f"tcp://127.0.0.1:{free_port()}", "--metrics", f"127.0.0.1:{port}"]
    with Proc(*args) as agg:
        agg.wait_for("ready:", timeout=60)
        pid = agg.popen.pid
        assert scrape(port)["polyfan_agg_bars_total"] == 0
        base = threads(pid)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(IDLE)]
        poller = select.epoll()
        try:
            for sock in idle:
                poller.register(sock.fileno(), select.EPOLLIN | select.EPOLLRDHUP)
            closed: set[int] = set()
            most = base
            # the server has seen every connection once it closed all but its cap of them
            deadline = time.monotonic() + 10
            while len(closed) < IDLE - metrics.MAX_CONNECTIONS:
                most = max(most, threads(pid))
                assert time.monotonic() < deadline, (
                    f"{len(closed)} of {IDLE} idle connections closed; threads {base} -> {most}"
                )
                closed.update(fd for fd, _ in poller.poll(0.05))
            most = max(most, threads(pid))
            assert most <= base + THREADS_SLACK, f"threads {base} -> {most}"
            started = time.monotonic()
            assert scrape(port)["polyfan_agg_bars_total"] == 0
            assert time.monotonic() - started < 1.0
        finally:
            poller.close()
            for sock in idle:
                sock.close()
        assert agg.stop() == 0
