"""Run polyfan commands as real subprocesses, as a user would, for the process tests.

Every long-running command logs one INFO line starting with ``ready:`` once it serves;
``Proc.wait_for`` blocks (with a timeout) until a line matching a pattern appears.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import zmq

POLYFAN = [sys.executable, "-m", "polyfan"]

# Debian's chromium, headless, as root, on a closed network (no background connections).
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scrape(port: int) -> dict[str, float]:
    """``GET /metrics`` on localhost: every sample, by name with its labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def endpoint(transport: str, tmp_path: Path, name: str) -> str:
    """A fresh ZeroMQ endpoint: ``ipc://`` under tmp_path or ``tcp://127.0.0.1:<free port>``."""
    if transport == "ipc":
        return f"ipc://{tmp_path / name}.sock"
    return f"tcp://127.0.0.1:{free_port()}"


class Proc:
    """A polyfan subprocess whose combined output is collected line by line."""

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, netns: str | None = None
    ) -> None:
        full_env = dict(os.environ)
        full_env.setdefault("POLYFAN_LOG", "info")
        full_env.update(env or {})
        self.args = args
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self.popen = subprocess.Popen(
            [*(["ip", "netns", "exec", netns] if netns else []), *POLYFAN, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=full_env,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    @property
    def output(self) -> str:
        with self._cond:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """Block until an output line (from index ``start``) matches ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (
                    self.popen.poll() is not None and not self._reader.is_alive()
                ):
                    raise AssertionError(
                        f"polyfan {' '.join(self.args)}: no line matching {pattern!r} "
                        f"(exit {self.popen.poll()}); output:\n{self.output}"
                    )
                self._cond.wait(min(remaining, 0.1))

    def stop(self, timeout: float = 5.0) -> int:
        """SIGINT, as Ctrl-C would; return the exit status (kill if it does not stop)."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGINT)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
                self._close_output()
                raise AssertionError(
                    f"polyfan {' '.join(self.args)} did not stop on SIGINT; output:\n"
                    f"{self.output[-4000:]}"
                ) from None
        self._close_output()
        return self.popen.returncode

    def _close_output(self) -> None:
        """Join the reader and close the pipe (an open one is a ResourceWarning, an error here)."""
        self._reader.join(2)
        if self.popen.stdout is not None and not self._reader.is_alive():
            self.popen.stdout.close()

    def wait(self, timeout: float = 10.0) -> int:
        status = self.popen.wait(timeout)
        self._close_output()
        return status

    def __enter__(self) -> Proc:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()
        self._close_output()


class Context:
    """A ZeroMQ context that keeps its sockets (linger 0) until the test ends, then closes them."""

    def __init__(self) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sockets: list[zmq.Socket[bytes]] = []

    def socket(self, kind: int) -> zmq.Socket[bytes]:
        sock = self.ctx.socket(kind)
        sock.setsockopt(zmq.LINGER, 0)
        self.sockets.append(sock)
        return sock

    def close(self) -> None:
        for sock in self.sockets:
            sock.close(0)
        self.ctx.term()
