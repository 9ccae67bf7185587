"""``polyfan demo``: sim, proxy, agg and bridge on this machine over ipc, from one command.

Each role runs as its own ``python -m polyfan`` child process, started in pipeline order; the
next starts once the previous logged its ``ready:`` line. ZeroMQ endpoints are ``ipc://``
sockets in a temporary directory; the simulator listens on a free loopback port. Only the
proxy gets an API key (``MASSIVE_API_KEY=demo``, which the simulator accepts); any real key in
the environment is removed from every child's environment.

Children's log lines are forwarded to stderr prefixed with the role's name. Ctrl-C or SIGTERM
stops the children (bridge first) and exits 0 within 2 s; if a child dies, the demo says which
one and exits 1.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from polyfan.config import DemoConfig
from polyfan.errors import PolyfanError

log = logging.getLogger("polyfan.demo")

READY_TIMEOUT = 60.0  # the agg compiles its numba kernels on its first run
STOP_TIMEOUT = 1.5  # SIGINT, then SIGKILL: the whole demo stops within 2 s
_KEY_VARS = ("MASSIVE_API_KEY", "POLYGON_API_KEY")
_SIM_URL = re.compile(r"(ws://\S+)")


class DemoError(PolyfanError):
    """A child did not start or died."""


@dataclass(eq=False)
class Child:
    """One ``polyfan <role>`` process whose output is forwarded line by line."""

    name: str
    popen: subprocess.Popen[str]
    ready_line: str | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    reader: threading.Thread | None = None

    def forward(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            sys.stderr.write(f"[{self.name}] {line}")
            if self.ready_line is None and "ready:" in line:
                self.ready_line = line
                self.ready.set()
        self.ready.set()  # exited: wake whoever waits

    def is_running(self) -> bool:
        return self.popen.poll() is None


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Ask Linux to SIGTERM the child if the demo itself is killed."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _start(name: str, args: list[str], env: dict[str, str]) -> Child:
    popen = subprocess.Popen(
        [sys.executable, "-m", "polyfan", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        env=env,
        text=True,
        bufsize=1,
        process_group=0,  # Ctrl-C reaches the demo only; it stops the children in order
        preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
    )
    child = Child(name, popen)
    child.reader = threading.Thread(target=child.forward, name=f"demo-{name}", daemon=True)
    child.reader.start()
    return child


def _wait_ready(child: Child, stopping: threading.Event) -> str:
    deadline = time.monotonic() + READY_TIMEOUT
    while not child.ready.wait(0.05):
        if stopping.is_set():
            raise KeyboardInterrupt
        if time.monotonic() > deadline:
            raise DemoError(f"demo: {child.name} did not become ready within {READY_TIMEOUT:g}s")
    if child.ready_line is None:
        status = child.popen.wait()
        raise DemoError(f"demo: {child.name} exited with status {status} before it was ready")
    return child.ready_line


def _wait_healthy(url: str, stopping: threading.Event, timeout: float = 10.0) -> None:
    """Wait until the bridge has heard the agg (its /healthz says 200), so the page loads
    with the intervals it needs; carry on with a warning if that takes too long."""
    deadline = time.monotonic() + timeout
    while not stopping.is_set():
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # 503 until the agg's announce arrives
        if time.monotonic() > deadline:
            log.warning("the bridge has not heard the agg after %gs; serving anyway", timeout)
            return
        time.sleep(0.05)
    raise KeyboardInterrupt


def _stop(children: list[Child]) -> None:
    for child in reversed(children):  # bridge first, sim last
        if child.is_running():
            with contextlib.suppress(ProcessLookupError):
                child.popen.send_signal(signal.SIGINT)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in children:
        try:
            child.popen.wait(max(0.01, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop on SIGINT; killing it", child.name)
            child.popen.kill()
            child.popen.wait()
    for child in children:
        if child.reader is not None:
            child.reader.join(0.2)
        if child.popen.stdout is not None:
            child.popen.stdout.close()


def _browsable(host: str) -> str:
    """The address to open for a listen host: a wildcard listens on loopback too."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


def compile_kernels() -> None:
    """Compile and cache the numba kernels of the proxy and the agg (bin/_bootstrap runs this
    after installing), so that the first ``polyfan demo`` serves within seconds."""
    from polyfan import agg
    from polyfan.config import AggConfig
    from polyfan.feed import scan

    scan.warm_up()
    agg.warm_up(AggConfig())


def run(config: DemoConfig) -> int:
    """Start the pipeline, print the URL, wait for a signal or a child's death."""
    stopping = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stopping.set()

    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
    for number in (signal.SIGINT, signal.SIGTERM):
        previous[number] = signal.signal(number, on_signal)
    base_env = {k: v for k, v in os.environ.items() if k not in _KEY_VARS}
    base_env.setdefault("POLYFAN_LOG", logging.getLevelName(logging.getLogger().level).lower())
    tmp = Path(tempfile.mkdtemp(prefix="polyfan-demo-"))
    proxy_pub = f"ipc://{tmp / 'proxy.sock'}"
    agg_pub = f"ipc://{tmp / 'agg.sock'}"
    host, port = config.listen
    children: list[Child] = []
    try:
        sim = _start(
            "sim",
            [
                "sim",
                "--listen",
                "127.0.0.1:0",
                "--symbols",
                str(config.symbols),
                "--rate",
                f"{config.rate:g}",
            ],
            base_env,
        )
        children.append(sim)
        match = _SIM_URL.search(_wait_ready(sim, stopping))
        if match is None:
            raise DemoError("demo: the sim's ready line does not name its URL")
        steps = [
            (
                "proxy",
                ["proxy", "--upstream", match.group(1), "--pub", proxy_pub],
                {**base_env, "MASSIVE_API_KEY": "demo"},
            ),
            ("agg", ["agg", "--sub", proxy_pub, "--pub", agg_pub], base_env),
            ("bridge", ["bridge", "--sub", agg_pub, "--listen", f"{host}:{port}"], base_env),
        ]
        for name, args, env in steps:
            child = _start(name, args, env)
            children.append(child)
            _wait_ready(child, stopping)
        url = f"http://{_browsable(host)}:{port}/"
        _wait_healthy(url + "healthz", stopping)
        print(f"polyfan demo: open {url}", flush=True)
        log.info("ready: demo serving %s (sim, proxy, agg, bridge over ipc in %s)", url, tmp)
        while not stopping.wait(0.1):
            for child in children:
                status = child.popen.poll()
                if status is not None:
                    raise DemoError(f"demo: {child.name} exited unexpectedly with status {status}")
        log.info("stopping the demo")
        return 0
    except KeyboardInterrupt:
        log.info("stopping the demo")
        return 0
    except DemoError as exc:
        log.error("%s", exc)
        return 1
    finally:
        _stop(children)
        shutil.rmtree(tmp, ignore_errors=True)
        for signum_, handler in previous.items():
            signal.signal(signum_, handler)
