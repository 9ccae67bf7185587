"""CURVE on the ZeroMQ links: key files, server and client sockets, who may connect, and what a
refused handshake looks like on each side (CONTRACT.md §8).

Keys are ZeroMQ's certificate files, written and read by pyzmq's own :mod:`zmq.auth`:
``NAME.key`` holds a public key, ``NAME.key_secret`` the pair. A role that binds is a CURVE
server with ``--curve-secret`` (its pair) and ``--curve-allow`` (a directory of the public
certificates allowed to connect); a role that connects is a client with ``--curve-secret`` and
``--curve-server`` (the server's public certificate).

- :class:`Authenticator` is pyzmq's ZAP handler (its own thread): it re-reads the allow
  directory whenever the directory changes, so a key is added or removed without a restart
  (rotation: allow the new key, move the peers, remove the old one); every refusal is logged at
  WARNING with the peer's address and counted.
- :class:`HandshakeWatch` is the client's side: a thread on the socket's monitor that logs a
  refused or failed handshake at ERROR naming the endpoint (ZeroMQ retries with its reconnect
  backoff; the log says so once per endpoint until a handshake succeeds).

Secret keys never reach a log line or a repr: :class:`KeyPair` prints only its public key.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from polyfan.config import CurveConfig
from polyfan.errors import ConfigError

log = logging.getLogger("polyfan.curve")

ZAP_DOMAIN = "polyfan"
# Heartbeats on every tcp socket (CONTRACT §8): a silent cut (no FIN, no RST) closes the
# connection after HEARTBEAT_TIMEOUT_MS, so it shows as silence (an outage) within 10 s.
HEARTBEAT_IVL_MS = 2_000
HEARTBEAT_TIMEOUT_MS = 6_000
HEARTBEAT_TTL_MS = 6_000
REFUSAL_LOG_EVERY = 10.0  # seconds between two log lines about one address (each is counted)
FAILED = (
    zmq.EVENT_HANDSHAKE_FAILED_AUTH
    | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL
    | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
)


@dataclass(frozen=True)
class KeyPair:
    public: bytes
    secret: bytes = field(repr=False)

    def __repr__(self) -> str:
        return f"KeyPair(public={self.public.decode()})"


def write_pair(name: str, directory: Path) -> tuple[Path, Path, bytes]:
    """``polyfan keys``: a new pair as ``DIR/NAME.key`` and ``DIR/NAME.key_secret`` (0600)."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"NAME: {name!r} is not a plain file name")
    directory.mkdir(parents=True, exist_ok=True)
    public_path = directory / f"{name}.key"
    secret_path = directory / f"{name}.key_secret"
    for path in (public_path, secret_path):
        if path.exists():
            raise ConfigError(f"{path} exists; keys are never overwritten")
    old = os.umask(0o077)  # the secret file is never readable by others, not even for a moment
    try:
        zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old)
    secret_path.chmod(0o600)
    public_path.chmod(0o644)
    public, _ = zmq.auth.load_certificate(str(public_path))
    return public_path, secret_path, public


def load_pair(path: Path, flag: str = "--curve-secret") -> KeyPair:
    try:
        public, secret = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag}: cannot read a certificate from {path}: {exc}") from exc
    if secret is None:
        raise ConfigError(f"{flag}: {path} holds no secret key (give the .key_secret file)")
    return KeyPair(public, secret)


def load_public(path: Path, flag: str = "--curve-server") -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(str(path))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{flag}: cannot read a certificate from {path}: {exc}") from exc
    return public


def check_allow_dir(directory: Path) -> None:
    if not directory.is_dir():
        raise ConfigError(f"--curve-allow: {directory} is not a directory")
    if not list(directory.glob("*.key")):
        raise ConfigError(f"--curve-allow: {directory} holds no public certificate (*.key)")


def serve_curve(socket: zmq.Socket[Any], pair: KeyPair) -> None:
    """Make ``socket`` a CURVE server (before it binds)."""
    socket.curve_secretkey = pair.secret
    socket.curve_publickey = pair.public
    socket.curve_server = True
    socket.zap_domain = ZAP_DOMAIN.encode()


def connect_curve(socket: zmq.Socket[Any], pair: KeyPair, server: bytes) -> None:
    """Make ``socket`` a CURVE client of the server whose public key is ``server``."""
    socket.curve_secretkey = pair.secret
    socket.curve_publickey = pair.public
    socket.curve_serverkey = server


def heartbeats(socket: zmq.Socket[Any]) -> None:
    """ZeroMQ heartbeats: a peer silent for HEARTBEAT_TIMEOUT_MS is disconnected."""
    socket.setsockopt(zmq.HEARTBEAT_IVL, HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, HEARTBEAT_TIMEOUT_MS)
    socket.setsockopt(zmq.HEARTBEAT_TTL, HEARTBEAT_TTL_MS)


def is_open_tcp(endpoint: str) -> bool:
    """A tcp endpoint on an address other than loopback (where CURVE matters)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    return host not in ("127.0.0.1", "localhost", "::1") and not host.startswith("127.")


def warn_open_tcp(role: str, endpoints: list[str]) -> None:
    for endpoint in endpoints:
        if is_open_tcp(endpoint):
            port = endpoint.rsplit(":", 1)[-1]
            log.warning(
                "%s: tcp without CURVE on %s: anyone who can reach port %s reads the feed",
                role,
                endpoint,
                port,
            )


class Authenticator(ThreadAuthenticator):
    """pyzmq's ZAP handler with polyfan's rules: an allow directory re-read when it changes,
    refusals logged and counted, and :meth:`refusal` for a role's own reasons (bans)."""

    def __init__(
        self,
        context: zmq.Context[Any],
        allow: Path | None,
        on_refused: Callable[[], None] = lambda: None,
        name: str = "polyfan.zap",
    ) -> None:
        super().__init__(context, log=logging.getLogger(name))
        self.allow_dir = allow
        self.on_refused = on_refused
        self._allow_stamp: object = None
        self._address = "?"
        self._logger = logging.getLogger(name)
        self._logged: dict[str, float] = {}  # address -> when its last refusal was logged

    def start(self) -> None:
        super().start()
        if self.allow_dir is not None:
            self._reload()

    def _reload(self) -> None:
        assert self.allow_dir is not None
        try:
            stamp: object = sorted(
                (p.name, p.stat().st_mtime_ns) for p in self.allow_dir.glob("*.key")
            )
        except OSError:
            stamp = None
        if stamp != self._allow_stamp:
            self._allow_stamp = stamp
            self.configure_curve(domain=ZAP_DOMAIN, location=str(self.allow_dir))
            keys = len(self.certs.get(ZAP_DOMAIN, {}))
            self._logger.info("CURVE: %d allowed key(s) from %s", keys, self.allow_dir)

    def refusal(self, address: str) -> bytes | None:
        """A role's own reason to refuse ``address`` before its key is looked at."""
        return None

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        if len(msg) >= 6:
            self._address = msg[3].decode("utf-8", "replace")
            reason = self.refusal(self._address)
            if reason is not None:
                self._send_zap_reply(msg[1], b"400", reason)
                return
            if self.allow_dir is not None:
                self._reload()
        await super().handle_zap_message(msg)

    def _send_zap_reply(
        self, request_id: bytes, status_code: bytes, status_text: bytes, user_id: str = ""
    ) -> None:
        if status_code != b"200":
            self.on_refused()
            now = time.monotonic()
            if now - self._logged.get(self._address, -math.inf) >= REFUSAL_LOG_EVERY:
                if len(self._logged) > 10_000:
                    self._logged.clear()
                self._logged[self._address] = now
                self._logger.warning(
                    "refused a handshake from %s: %s (counted; logged once per %gs per address)",
                    self._address,
                    status_text.decode("utf-8", "replace"),
                    REFUSAL_LOG_EVERY,
                )
        super()._send_zap_reply(request_id, status_code, status_text, user_id or "anonymous")


class HandshakeWatch:
    """Logs a client socket's failed handshakes at ERROR, naming the endpoint, as they happen.

    One line per endpoint until a handshake with it succeeds again (ZeroMQ retries on its own,
    with its reconnect interval); then one INFO line. Runs on its own thread, which owns the
    monitor socket.
    """

    def __init__(self, socket: zmq.Socket[Any], role: str) -> None:
        self.role = role
        self.failed: dict[str, float] = {}
        # A plain PAIR from a plain shadow of the context: an asyncio socket's own
        # get_monitor_socket would be an asyncio socket, which this thread cannot use.
        address = f"inproc://polyfan-handshakes-{id(self):x}"
        socket.monitor(address, FAILED | zmq.EVENT_HANDSHAKE_SUCCEEDED)
        context: zmq.Context[Any] = zmq.Context.shadow(socket.context.underlying)
        self._monitor = context.socket(zmq.PAIR)
        self._monitor.connect(address)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{role}-handshakes", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        monitor = self._monitor
        try:
            while not self._stop.is_set():
                if not monitor.poll(100):
                    continue
                event = recv_monitor_message(monitor)
                self._seen(int(event["event"]), event["endpoint"].decode(), int(event["value"]))
        except zmq.ZMQError:
            pass  # the context is going away
        finally:
            with contextlib.suppress(zmq.ZMQError):
                monitor.close(linger=0)

    def _seen(self, event: int, endpoint: str, value: int) -> None:
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            if self.failed.pop(endpoint, None) is not None:
                log.info("%s: CURVE handshake with %s succeeded", self.role, endpoint)
            return
        if endpoint in self.failed:
            return
        self.failed[endpoint] = time.monotonic()
        if event == zmq.EVENT_HANDSHAKE_FAILED_AUTH:
            why = f"refused by the server (ZAP status {value}): is this key in its --curve-allow?"
        elif event == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL:
            why = "a protocol error: do both sides use CURVE, with this server's public key?"
        else:
            why = "no reply that decrypts: is --curve-server this server's public key?"
        log.error("%s: handshake with %s failed, %s; retrying", self.role, endpoint, why)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def server_side(
    context: zmq.Context[Any],
    socket: zmq.Socket[Any],
    config: CurveConfig,
    role: str,
    endpoint: str,
    on_refused: Callable[[], None],
) -> Authenticator | None:
    """Prepare a socket that binds ``endpoint``: heartbeats on tcp; with a key pair, a CURVE
    server whose peers the returned (started) :class:`Authenticator` checks; without one, a
    warning when the endpoint is reachable from other hosts."""
    if endpoint.startswith("tcp://"):
        heartbeats(socket)
    if config.secret is None or config.allow is None:
        warn_open_tcp(role, [endpoint])
        return None
    pair = load_pair(config.secret)
    check_allow_dir(config.allow)
    authenticator = Authenticator(context, config.allow, on_refused, f"polyfan.{role}.zap")
    authenticator.start()
    serve_curve(socket, pair)
    return authenticator


class Client:
    """A role's CURVE client side: the key pair, and each ``--sub``'s server key."""

    def __init__(self, config: CurveConfig, role: str, endpoints: list[str]) -> None:
        self.role = role
        self.pair = None if config.secret is None else load_pair(config.secret)
        self.servers = [
            None if (path := config.server_for(i)) is None else load_public(path)
            for i in range(len(endpoints))
        ]
        if self.pair is None:
            warn_open_tcp(role, endpoints)

    def connect(self, socket: zmq.Socket[Any], index: int, endpoint: str) -> None:
        """Connect ``socket`` to its ``index``-th endpoint (options apply per connect)."""
        if endpoint.startswith("tcp://"):
            heartbeats(socket)
        server = self.servers[index]
        if self.pair is not None and server is not None:
            connect_curve(socket, self.pair, server)
        socket.connect(endpoint)

    def watch(self, socket: zmq.Socket[Any]) -> HandshakeWatch | None:
        """A handshake watcher for ``socket`` when it uses CURVE (close it before the context)."""
        return None if self.pair is None else HandshakeWatch(socket, self.role)
