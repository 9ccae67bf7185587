"""Configuration from flags, environment and a TOML file, ``--print-config``, and JSON logs
(CONTRACT.md §9), through the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from datetime import datetime
from pathlib import Path

import pytest

from procs import Proc, free_port

SITE = """
[agg]
grace = "20ms"
interval = ["100ms", "1s"]
symbols = "AAPL,TSLA"

[bridge]
token = ["file-token-123"]
listen = "0.0.0.0:9000"
"""


def polyfan(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("POLYFAN_")}
    return subprocess.run(
        [sys.executable, "-m", "polyfan", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**clean, **(env or {})},
    )


def printed(*args: str, env: dict[str, str] | None = None) -> dict[str, object]:
    done = polyfan(*args, "--print-config", env=env)
    assert done.returncode == 0, done.stderr
    return tomllib.loads(done.stdout)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(SITE)
    return path


def test_flag_beats_environment_beats_file_beats_default(site: Path) -> None:
    assert printed("agg")["agg"]["grace"] == "250ms"  # type: ignore[index]
    assert printed("--config", str(site), "agg")["agg"]["grace"] == "20ms"  # type: ignore[index]
    env = {"POLYFAN_AGG_GRACE": "50ms"}
    assert printed("--config", str(site), "agg", env=env)["agg"]["grace"] == "50ms"  # type: ignore[index]
    with_flag = printed("--config", str(site), "agg", "--grace", "70ms", env=env)
    assert with_flag["agg"]["grace"] == "70ms"  # type: ignore[index]
    agg = printed("--config", str(site), "agg")["agg"]
    assert agg["interval"] == ["100ms", "1s"] and agg["symbols"] == "AAPL,TSLA"  # type: ignore[index]


def test_every_flag_has_its_environment_variable_and_the_old_names_stay() -> None:
    bridge = printed("bridge", env={"POLYFAN_BRIDGE_LISTEN": "0.0.0.0:8768"})["bridge"]
    assert bridge["listen"] == "0.0.0.0:8768"  # type: ignore[index]
    proxy = printed(
        "proxy", env={"POLYFAN_UPSTREAM": "ws://127.0.0.1:1/stocks", "MASSIVE_API_KEY": "k"}
    )
    assert proxy["proxy"]["upstream"] == "ws://127.0.0.1:1/stocks"  # type: ignore[index]
    proxy = printed("proxy", env={"POLYFAN_PROXY_SUBSCRIBE": "T.AAPL", "MASSIVE_API_KEY": "k"})
    assert proxy["proxy"]["subscribe"] == "T.AAPL"  # type: ignore[index]


def test_print_config_masks_secrets_and_reads_back_as_the_same_configuration(
    site: Path, tmp_path: Path
) -> None:
    env = {
        "POLYFAN_UPSTREAM": "wss://user:hunter2@example.test/stocks?apiKey=abc123secret",
        "MASSIVE_API_KEY": "k",
    }
    proxy = polyfan("proxy", "--print-config", env=env)
    assert "hunter2" not in proxy.stdout and "abc123secret" not in proxy.stdout
    bridge = polyfan("--config", str(site), "bridge", "--print-config")
    assert "file-token-123" not in bridge.stdout
    assert tomllib.loads(bridge.stdout)["bridge"]["token"] == ["****"]
    tokens = {"POLYFAN_TOKENS": "env-token-1,env-token-2"}  # counted too, and masked
    bridge = polyfan("--config", str(site), "bridge", "--print-config", env=tokens)
    assert "env-token" not in bridge.stdout and "file-token-123" not in bridge.stdout
    assert tomllib.loads(bridge.stdout)["bridge"]["token"] == ["****"] * 3
    agg = polyfan("--config", str(site), "agg", "--grace", "30ms", "--print-config").stdout
    again = tmp_path / "again.toml"
    again.write_text(agg)
    assert polyfan("--config", str(again), "agg", "--print-config").stdout == agg


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("[agg]\nnope = 1\n", "[agg] has no flag 'nope'"),
        ("[aggregator]\ngrace = '1s'\n", "[aggregator] is not a role"),
        ("[agg\n", "site.toml"),
    ],
)
def test_a_bad_config_file_is_a_usage_error_naming_the_problem(
    tmp_path: Path, text: str, problem: str
) -> None:
    path = tmp_path / "site.toml"
    path.write_text(text)
    done = polyfan("--config", str(path), "agg", "--print-config")
    assert done.returncode == 2 and problem in done.stderr


def test_a_bad_value_from_the_file_is_refused_like_the_flag(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text('[agg]\ngrace = "soon"\n')
    done = polyfan("--config", str(path), "agg")
    assert done.returncode == 2 and "--grace" in done.stderr


@pytest.mark.parametrize("how", ["flag", "env"])
def test_json_logs_are_one_object_per_line(how: str) -> None:
    args = ["--log-format", "json"] if how == "flag" else []
    env = {} if how == "flag" else {"POLYFAN_LOG_FORMAT": "json"}
    with Proc(*args, "sim", "--listen", f"127.0.0.1:{free_port()}", env=env) as sim:
        sim.wait_for("ready:")
        assert sim.stop() == 0
        output = sim.output
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) >= 2
    for line in lines:
        entry = json.loads(line)
        assert entry["role"] == "sim" and entry["logger"].startswith("polyfan")
        assert entry["level"] in ("debug", "info", "warning", "error")
        assert entry["ts"].endswith("Z")
        assert datetime.fromisoformat(entry["ts"]).utcoffset() is not None
        assert isinstance(entry["msg"], str)
    assert any(json.loads(line)["msg"].startswith("ready:") for line in lines)
