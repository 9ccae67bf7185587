"""The metrics scraped by a real Prometheus server (Debian's ``prometheus``, installed by
bin/test): a sim -> proxy -> agg -> bridge pipeline started from the CLI, every role with
``--metrics``, and queries through Prometheus's HTTP API (a rate, histogram quantiles, ``up``).
"""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from procs import Proc, free_port, scrape
from test_agg_process import agg_args
from test_outages_process import KEY, Pipeline, healthy, sim_args
from wsclient import Client, eventually

PROMETHEUS = Path("/usr/bin/prometheus")
WAIT = 60.0  # seconds for Prometheus to have scraped what a query needs


def prometheus_config(targets: dict[str, int]) -> str:
    """Prometheus's YAML (JSON is YAML): one job per role, scraped every second."""
    jobs = [
        {"job_name": job, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
        for job, port in targets.items()
    ]
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": jobs,
    }
    return json.dumps(config, indent=2)


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[dict[str, int]], int]]:
    """Start Prometheus (the binary, not the Debian service) on the given targets; its port."""
    assert PROMETHEUS.exists(), f"{PROMETHEUS} is missing: bin/test installs Debian's prometheus"
    processes: list[subprocess.Popen[bytes]] = []

    def start(targets: dict[str, int]) -> int:
        config = tmp_path / "prometheus.yml"
        config.write_text(prometheus_config(targets))
        port = free_port()
        with (tmp_path / "prometheus.log").open("w") as log:  # the child keeps its own copy
            process = subprocess.Popen(
                [
                    str(PROMETHEUS),
                    f"--config.file={config}",
                    f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        processes.append(process)
        return port

    yield start
    for process in processes:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def query(port: int, expression: str) -> list[dict[str, Any]]:
    """An instant query's result vector (empty while Prometheus is not ready or has no data)."""
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expression})
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            body = json.loads(response.read())
    except OSError:
        return []
    assert body["status"] == "success", body
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def until(port: int, expression: str, ok: Callable[[list[dict[str, Any]]], bool]) -> Any:
    """Poll ``expression`` until ``ok(result)``, at most WAIT seconds; the result."""
    deadline = time.monotonic() + WAIT
    while True:
        result = query(port, expression)
        if result and ok(result):
            return result
        assert time.monotonic() < deadline, f"{expression}: {result}"
        time.sleep(0.25)


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


async def test_prometheus_scrapes_proxy_agg_and_bridge_and_answers_rate_and_quantiles(
    tmp_path: Path, prometheus: Callable[[dict[str, int]], int]
) -> None:
    p = Pipeline.at(tmp_path)
    ports = {"proxy": free_port(), "agg": free_port(), "bridge": free_port()}
    bridge_args = [*p.bridge_args, "--metrics", f"127.0.0.1:{ports['bridge']}"]
    with (
        Proc(*sim_args(p.sim_port)) as sim,
        Proc(*p.proxy_args, "--metrics", f"127.0.0.1:{ports['proxy']}", env=KEY) as proxy,
        Proc(*agg_args(p.proxy_pub, p.agg_pub, ports["agg"])) as agg,
        Proc(*bridge_args) as bridge,
    ):
        for proc in (sim, proxy, agg, bridge):
            proc.wait_for("ready:", timeout=60)
        await eventually(lambda: healthy(p.http), timeout=20, what="the bridge hearing the agg")
        client = await Client.open(f"ws://127.0.0.1:{p.http}/stocks", token="any")
        await client.send({"action": "subscribe", "params": "100Ms.*"})
        assert (await client.statuses(1))[0]["status"] == "success"
        # the bridge's client port serves the same registry
        assert "polyfan_bridge_delivery_seconds_count" in scrape(p.http)
        port = prometheus({**ports, "bridge_http": p.http})

        up = until(port, "up", lambda r: len(r) == 4 and all(value(s) == 1 for s in r))
        assert {s["metric"]["job"] for s in up} == {"proxy", "agg", "bridge", "bridge_http"}

        (rate,) = until(port, "rate(polyfan_agg_trades_total[5s]) > 0", lambda r: True)
        assert value(rate) > 0
        (rate,) = until(port, "rate(polyfan_proxy_trades_total[5s]) > 0", lambda r: True)
        assert value(rate) > 0

        bars = until(port, "increase(polyfan_agg_bar_delay_seconds_count[5s]) > 0", lambda r: True)
        assert len(bars) == 1
        q = "histogram_quantile(0.99, rate(polyfan_agg_bar_delay_seconds_bucket[5s]))"
        (p99,) = until(port, q, lambda r: value(r[0]) == value(r[0]))  # not NaN
        assert 0 < value(p99) <= 1.0  # seconds; the largest finite bucket bound

        q = "histogram_quantile(0.5, rate(polyfan_bridge_delivery_seconds_bucket[5s]))"
        medians = until(port, q, lambda r: len(r) == 2 and all(value(s) == value(s) for s in r))
        assert {s["metric"]["job"] for s in medians} == {"bridge", "bridge_http"}
        assert all(0 < value(s) <= 5.0 for s in medians)

        (cpu,) = until(port, 'process_cpu_seconds_total{job="agg"}', lambda r: True)
        assert value(cpu) > 0
        await client.close()
        for proc in (bridge, agg, proxy, sim):
            assert proc.stop() == 0
