"""CURVE on the ZeroMQ links, with real processes from the CLI and real pyzmq peers (§8).

Keys come from ``polyfan keys``; a proxy and an agg bind CURVE servers that serve only the keys
in their ``--curve-allow`` directory (re-read while they run), refuse and count every other
peer, and log the refusal; a connecting role names the endpoint of a refused handshake.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import zmq
import zmq.auth

from polyfan.wire import codec
from procs import Context, Proc, free_port, scrape
from wsclient import Client, eventually

KEY = {"MASSIVE_API_KEY": "test-key-123456"}


def keys(name: str, directory: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "polyfan", "keys", name, "--dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=30,
    )


def pair(directory: Path, name: str) -> tuple[bytes, bytes]:
    public, secret = zmq.auth.load_certificate(str(directory / f"{name}.key_secret"))
    assert secret is not None
    return public, secret


def allow(keys_dir: Path, allow_dir: Path, name: str) -> None:
    allow_dir.mkdir(exist_ok=True)
    shutil.copy(keys_dir / f"{name}.key", allow_dir / f"{name}.key")


def curve_sub(
    ctx: Context, address: str, keys_dir: Path, name: str, server: str
) -> zmq.Socket[bytes]:
    sock = ctx.socket(zmq.SUB)
    public, secret = pair(keys_dir, name)
    sock.curve_publickey, sock.curve_secretkey = public, secret
    sock.curve_serverkey = zmq.auth.load_certificate(str(keys_dir / f"{server}.key"))[0]
    sock.setsockopt(zmq.SUBSCRIBE, b"T.")
    sock.connect(address)
    return sock


def first_trades(sock: zmq.Socket[bytes], timeout: float) -> codec.Message | None:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        if not sock.poll(int(left * 1000)):
            break
        message = codec.decode(sock.recv())
        if message.kind is codec.Kind.TRADES:
            return message
    return None


def sim_and_proxy_args(
    sim_port: int, pub: str, keys_dir: Path, allow_dir: Path
) -> tuple[list[str], list[str]]:
    sim = ["sim", "--listen", f"127.0.0.1:{sim_port}", "--symbols", "12", "--rate", "800"]
    proxy = [
        "proxy",
        "--upstream",
        f"ws://127.0.0.1:{sim_port}/stocks",
        "--pub",
        pub,
        "--curve-secret",
        str(keys_dir / "proxy.key_secret"),
        "--curve-allow",
        str(allow_dir),
    ]
    return sim, proxy


def test_keys_writes_a_zmq_certificate_pair_and_prints_only_the_public_key(tmp_path: Path) -> None:
    done = keys("agg", tmp_path / "k")
    assert done.returncode == 0, done.stderr
    public, secret = pair(tmp_path / "k", "agg")
    assert zmq.auth.load_certificate(str(tmp_path / "k" / "agg.key")) == (public, None)
    assert stat.S_IMODE((tmp_path / "k" / "agg.key_secret").stat().st_mode) == 0o600
    assert public.decode() in done.stdout
    assert secret.decode() not in done.stdout + done.stderr
    again = keys("agg", tmp_path / "k")  # never overwrites a key
    assert again.returncode != 0 and "exists" in again.stderr
    assert pair(tmp_path / "k", "agg") == (public, secret)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["proxy", "--curve-secret", "{k}/proxy.key_secret"], "--curve-secret needs --curve-allow"),
        (["proxy", "--curve-allow", "{k}"], "--curve-allow needs --curve-secret"),
        (["bridge", "--curve-server", "{k}/proxy.key"], "--curve-server needs --curve-secret"),
        (["bridge", "--curve-secret", "{k}/proxy.key_secret"], "--curve-secret needs --curve-server"),
        (
            ["agg", "--sub", "tcp://127.0.0.1:1", "--sub", "tcp://127.0.0.1:2", "--sub", "tcp://127.0.0.1:3",
             "--curve-secret", "{k}/proxy.key_secret", "--curve-server", "{k}/proxy.key",
             "--curve-server", "{k}/proxy.key"],
            "give one for every --sub (3)",
        ),
    ],
)  # fmt: skip
def test_curve_flags_that_do_not_go_together_are_a_usage_error(
    tmp_path: Path, args: list[str], message: str
) -> None:
    assert keys("proxy", tmp_path).returncode == 0
    argv = [a.replace("{k}", str(tmp_path)) for a in args]
    done = subprocess.run(
        [sys.executable, "-m", "polyfan", *argv],
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, **KEY},
    )
    assert done.returncode == 2
    assert message in done.stderr


def test_a_curve_proxy_serves_allowed_keys_refuses_the_rest_and_takes_new_keys_live(
    tmp_path: Path, context: Context
) -> None:
    k, allowed = tmp_path / "keys", tmp_path / "allow"
    for name in ("proxy", "agg", "stranger", "newcomer"):
        assert keys(name, k).returncode == 0
    allow(k, allowed, "agg")
    pub = f"tcp://127.0.0.1:{free_port()}"
    metrics = free_port()
    sim_args, proxy_args = sim_and_proxy_args(free_port(), pub, k, allowed)
    with (
        Proc(*sim_args) as sim,
        Proc(*proxy_args, "--metrics", f"127.0.0.1:{metrics}", env=KEY) as proxy,
    ):
        sim.wait_for("ready:")
        proxy.wait_for("ready:")
        good = curve_sub(context, pub, k, "agg", "proxy")
        assert first_trades(good, 20) is not None
        stranger = curve_sub(context, pub, k, "stranger", "proxy")
        plain = context.socket(zmq.SUB)  # no CURVE at all
        plain.setsockopt(zmq.SUBSCRIBE, b"")
        plain.connect(pub)
        proxy.wait_for(r"refused a handshake from 127\.0\.0\.1", timeout=10)
        assert scrape(metrics)["polyfan_proxy_auth_refused_total"] >= 1
        # both were refused, while the allowed peer kept receiving
        assert first_trades(good, 5) is not None
        assert stranger.poll(500) == 0 and plain.poll(0) == 0
        # rotation: allow a new key while the proxy runs
        allow(k, allowed, "newcomer")
        newcomer = curve_sub(context, pub, k, "newcomer", "proxy")
        assert first_trades(newcomer, 20) is not None
        proxy.wait_for("CURVE: 2 allowed key", timeout=5)
        assert stranger.poll(0) == 0
        secret = pair(k, "proxy")[1].decode()
        assert secret not in proxy.output


def test_a_refused_tap_names_the_endpoint_within_5_seconds(tmp_path: Path) -> None:
    k, allowed = tmp_path / "keys", tmp_path / "allow"
    for name in ("proxy", "agg", "stranger"):
        assert keys(name, k).returncode == 0
    allow(k, allowed, "agg")
    pub = f"tcp://127.0.0.1:{free_port()}"
    sim_args, proxy_args = sim_and_proxy_args(free_port(), pub, k, allowed)
    with Proc(*sim_args) as sim, Proc(*proxy_args, env=KEY) as proxy:
        sim.wait_for("ready:")
        proxy.wait_for("ready:")
        tap = [
            "tap", pub, "T.", "--curve-secret", str(k / "stranger.key_secret"),
            "--curve-server", str(k / "proxy.key"),
        ]  # fmt: skip
        with Proc(*tap) as refused:
            refused.wait_for(rf"handshake with {pub} failed, refused by the server", timeout=5)
        wrong_server = [
            "tap", pub, "T.", "--curve-secret", str(k / "agg.key_secret"),
            "--curve-server", str(k / "stranger.key"),
        ]  # fmt: skip
        with Proc(*wrong_server) as lost:
            lost.wait_for(rf"handshake with {pub} failed", timeout=5)


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2):
            return True
    except OSError:
        return False


async def test_bars_flow_over_curve_from_proxy_through_agg_to_the_bridge_and_strangers_get_nothing(
    tmp_path: Path, context: Context
) -> None:
    k, proxy_allow, agg_allow = tmp_path / "keys", tmp_path / "proxy-allow", tmp_path / "agg-allow"
    for name in ("proxy", "agg", "bridge", "stranger"):
        assert keys(name, k).returncode == 0
    allow(k, proxy_allow, "agg")
    allow(k, agg_allow, "bridge")
    proxy_pub, agg_pub = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    http, agg_metrics = free_port(), free_port()
    sim_args, proxy_args = sim_and_proxy_args(free_port(), proxy_pub, k, proxy_allow)
    agg_args = [
        "agg", "--sub", proxy_pub, "--pub", agg_pub, "--interval", "100ms", "--grace", "100ms",
        "--metrics", f"127.0.0.1:{agg_metrics}",
        "--curve-secret", str(k / "agg.key_secret"), "--curve-allow", str(agg_allow),
        "--curve-server", str(k / "proxy.key"),
    ]  # fmt: skip
    bridge_args = [
        "bridge", "--sub", agg_pub, "--listen", f"127.0.0.1:{http}",
        "--curve-secret", str(k / "bridge.key_secret"), "--curve-server", str(k / "agg.key"),
    ]  # fmt: skip
    with (
        Proc(*sim_args) as sim,
        Proc(*proxy_args, env=KEY) as proxy,
        Proc(*agg_args) as agg,
        Proc(*bridge_args) as bridge,
    ):
        for proc in (sim, proxy, agg, bridge):
            proc.wait_for("ready:")
        await eventually(lambda: healthy(http), timeout=20, what="the bridge hearing the agg")
        client = await Client.open(f"ws://127.0.0.1:{http}/stocks", token="any")
        await client.send({"action": "subscribe", "params": "100Ms.*"})
        assert (await client.statuses(1))[0]["status"] == "success"
        bar = await client.until(lambda e: e.get("ev") == "MB", timeout=20)
        assert bar["interval"] == 100 and bar["v"] > 0
        await client.close()
        # a stranger at the agg's port: refused at the handshake, counted, never served
        stranger = curve_sub(context, agg_pub, k, "stranger", "agg")
        agg.wait_for(r"refused a handshake from 127\.0\.0\.1", timeout=10)
        assert scrape(agg_metrics)["polyfan_agg_auth_refused_total"] >= 1
        assert stranger.poll(200) == 0
        assert "handshake" not in bridge.output  # the bridge's own handshake never failed


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def test_a_stranger_that_queued_a_million_subscriptions_never_reaches_a_curve_agg(
    tmp_path: Path, context: Context
) -> None:
    """docs/limits.md: without CURVE a peer that queues subscriptions before it connects can
    grow the agg (libzmq takes the whole pipe at once); with CURVE it is refused at the
    handshake, before any subscription is read."""
    k, allowed = tmp_path / "keys", tmp_path / "allow"
    for name in ("agg", "bridge", "stranger"):
        assert keys(name, k).returncode == 0
    allow(k, allowed, "bridge")
    agg_pub, metrics = f"tcp://127.0.0.1:{free_port()}", free_port()
    args = [
        "agg", "--sub", f"tcp://127.0.0.1:{free_port()}", "--pub", agg_pub,
        "--metrics", f"127.0.0.1:{metrics}",
        "--curve-secret", str(k / "agg.key_secret"), "--curve-allow", str(allowed),
    ]  # fmt: skip
    with Proc(*args) as agg:
        agg.wait_for("ready:")
        before = rss_mb(agg.popen.pid)
        flood = context.socket(zmq.SUB)
        public, secret = pair(k, "stranger")
        flood.curve_publickey, flood.curve_secretkey = public, secret
        flood.curve_serverkey = pair(k, "agg")[0]
        flood.setsockopt(zmq.SNDHWM, 0)
        for i in range(1_000_000):
            flood.setsockopt(zmq.SUBSCRIBE, b"T.%07d\0" % i)
        flood.connect(agg_pub)
        deadline = time.monotonic() + 10
        peak = before
        while scrape(metrics)["polyfan_agg_auth_refused_total"] < 1:
            assert time.monotonic() < deadline, "the stranger was never refused"
            peak = max(peak, rss_mb(agg.popen.pid))
            time.sleep(0.1)  # paces the RSS samples; the wait itself is the loop's condition
        peak = max(peak, rss_mb(agg.popen.pid))
        print(f"agg RSS {before:.0f} MB, peak {peak:.0f} MB under a 1,000,000-subscription peer")
        assert peak - before < 20, (before, peak)
        assert scrape(metrics)["polyfan_agg_peers_disconnected_total"] == 0  # never got in
        flood.close(0)
