"""Configuration: one frozen dataclass per role, and the parsers the CLI uses to build them.

Nothing here touches a socket. Reading the environment takes a mapping, so tests pass a dict.
Secrets are declared ``repr=False`` so that a logged config never shows them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from polyfan import symbols
from polyfan.errors import ConfigError
from polyfan.redact import mask_url

DEFAULT_UPSTREAM = "wss://socket.massive.com/stocks"
DEFAULT_PROXY_PUB = "tcp://127.0.0.1:8767"
DEFAULT_AGG_PUB = "tcp://127.0.0.1:8769"
DEFAULT_BRIDGE_LISTEN = "127.0.0.1:8768"
DEFAULT_SIM_LISTEN = "127.0.0.1:8766"
DEFAULT_INTERVALS = ("100ms", "250ms", "500ms", "1s", "5s", "1m")

SYMBOL_RE = symbols.SYMBOL_RE  # polyfan.symbols defines the alphabet once

_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration_ms(text: str, *, name: str = "duration") -> int:
    """Parse ``250ms``, ``1s``, ``5m``, ``1h`` or ``7d`` into whole milliseconds."""
    match = _DURATION_RE.match(text)
    if match is None:
        raise ConfigError(
            f"{name}: {text!r} is not a duration; write it like 250ms, 1s, 5m, 1h or 7d"
        )
    value = float(match.group(1)) * _UNIT_MS[match.group(2)]
    if value != int(value):
        raise ConfigError(f"{name}: {text!r} is not a whole number of milliseconds")
    return int(value)


def format_duration_ms(ms: int) -> str:
    """The shortest exact spelling of ``ms``: 100ms, 1s, 5m, 1h, 7d."""
    for unit in ("d", "h", "m", "s"):
        size = _UNIT_MS[unit]
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


def parse_timestamp_ms(text: str, *, name: str = "timestamp") -> int:
    """A point in time as Unix milliseconds: ``1710513000000`` (ms), or ISO 8601
    (``2024-03-15``, ``2024-03-15T14:30:00Z``, ``2024-03-15T10:30:00.250-04:00``); a time
    without an offset is UTC."""
    text = text.strip()
    if text.lstrip("-").isdigit():
        return int(text)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigError(
            f"{name}: {text!r} is not a time; write Unix milliseconds or ISO 8601 "
            "like 2024-03-15T14:30:00Z"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    delta = when - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def parse_speed(text: str, *, name: str = "--speed") -> float | None:
    """A replay speed: a factor over SIP time (``1``, ``10``, ``0.5``), or ``max`` (None)."""
    if text.strip().lower() == "max":
        return None
    try:
        speed = float(text)
    except ValueError:
        raise ConfigError(f"{name}: {text!r} is not a number or max") from None
    if not 0 < speed < float("inf"):
        raise ConfigError(f"{name}: {text!r} must be above 0 (or max)")
    return speed


def parse_host_port(text: str, *, name: str = "address") -> tuple[str, int]:
    """Parse ``HOST:PORT`` (``[::1]:PORT`` for IPv6)."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{name}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port_text)


def parse_origin(text: str, *, name: str = "--allow-origin") -> str:
    """A web origin as browsers send it (``https://app.example:8443``), or ``*`` for any."""
    if text == "*":
        return text
    scheme, sep, rest = text.partition("://")
    if scheme not in ("http", "https") or not sep or not rest or "/" in rest.rstrip("/"):
        raise ConfigError(f"{name}: {text!r} is not an origin like https://host[:port] or *")
    return text.rstrip("/")


def parse_symbols(text: str, *, name: str = "--symbols") -> tuple[str, ...] | None:
    """``*`` means every symbol (``None``); otherwise a comma list of valid tickers."""
    if text.strip() == "*":
        return None
    symbols = tuple(s.strip() for s in text.split(",") if s.strip())
    if not symbols:
        raise ConfigError(f"{name}: empty symbol list; use * for every symbol")
    for symbol in symbols:
        if SYMBOL_RE.fullmatch(symbol) is None:
            raise ConfigError(
                f"{name}: {symbol!r} is not a symbol (1 to 32 of A-Z a-z 0-9 . : / _ -)"
            )
    return symbols


def validate_endpoint(text: str, *, name: str) -> str:
    """Accept the ZeroMQ transports polyfan supports: tcp:// and ipc://."""
    if not text.startswith(("tcp://", "ipc://")) or len(text) <= len("ipc://"):
        raise ConfigError(
            f"{name}: {text!r} is not a ZeroMQ endpoint (tcp://HOST:PORT or ipc://PATH)"
        )
    return text


def read_api_key(env: Mapping[str, str], key_file: Path | None) -> str:
    """The API key: ``--api-key-file`` if given, else ``MASSIVE_API_KEY``, else ``POLYGON_API_KEY``."""
    if key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"--api-key-file: cannot read {key_file}: {exc.strerror}") from exc
        if not key:
            raise ConfigError(f"--api-key-file: {key_file} is empty")
        return key
    for var in ("MASSIVE_API_KEY", "POLYGON_API_KEY"):
        key = env.get(var, "").strip()
        if key:
            return key
    raise ConfigError("no API key: set MASSIVE_API_KEY (or POLYGON_API_KEY) or pass --api-key-file")


def read_tokens(env: Mapping[str, str], flags: tuple[str, ...]) -> tuple[str, ...]:
    """Bridge tokens: every ``--token`` plus the comma list in ``POLYFAN_TOKENS``."""
    from_env = tuple(t.strip() for t in env.get("POLYFAN_TOKENS", "").split(",") if t.strip())
    return tuple(dict.fromkeys(flags + from_env))


def mask_secret(secret: str) -> str:
    """``****`` plus at most the last 4 characters (none for short secrets)."""
    return "****" + (secret[-4:] if len(secret) >= 12 else "")


def _masked(value: Any) -> Any:
    if isinstance(value, str):
        return mask_url(value) if "://" in value or "@" in value else value
    if isinstance(value, tuple):
        return tuple(_masked(v) for v in value)
    return value


def _repr_masking_urls(self: Any) -> str:
    """The dataclass repr, with URL credentials masked (secrets are ``repr=False`` already)."""
    shown = ", ".join(
        f"{f.name}={_masked(getattr(self, f.name))!r}" for f in fields(self) if f.repr
    )
    return f"{type(self).__name__}({shown})"


@dataclass(frozen=True)
class CurveConfig:
    """CURVE key files (CONTRACT.md §8); every path empty: plain ZeroMQ."""

    secret: Path | None = None  # this role's pair (.key_secret)
    allow: Path | None = None  # roles that bind: public certificates allowed to connect
    servers: tuple[Path, ...] = ()  # roles that connect: one server certificate, or one per --sub

    def server_for(self, index: int) -> Path | None:
        if not self.servers:
            return None
        return self.servers[0] if len(self.servers) == 1 else self.servers[index]


def curve_config(
    secret: Path | None,
    allow: Path | None = None,
    servers: tuple[Path, ...] = (),
    *,
    subs: int = 0,
    binds: bool,
    connects: bool,
) -> CurveConfig:
    """Check that the CURVE flags a role got go together; a usage error names what is missing."""
    if allow is not None and secret is None:
        raise ConfigError("--curve-allow needs --curve-secret (this role's own key pair)")
    if servers and secret is None:
        raise ConfigError("--curve-server needs --curve-secret (this role's own key pair)")
    if secret is not None:
        if binds and not connects and allow is None:
            raise ConfigError("--curve-secret needs --curve-allow")
        if connects and not binds and not servers:
            raise ConfigError("--curve-secret needs --curve-server")
        if allow is None and not servers:
            raise ConfigError("--curve-secret needs --curve-allow or --curve-server")
    if servers and len(servers) not in (1, subs):
        raise ConfigError(
            f"--curve-server: give one for every --sub ({subs}) in order, or one for all; "
            f"got {len(servers)}"
        )
    return CurveConfig(secret, allow, servers)


@dataclass(frozen=True)
class ProxyConfig:
    __repr__ = _repr_masking_urls

    api_key: str = field(repr=False)
    upstream: str = DEFAULT_UPSTREAM
    subscribe: str = "T.*"
    pub: str = DEFAULT_PROXY_PUB
    metrics: tuple[str, int] | None = None
    curve: CurveConfig = CurveConfig()


@dataclass(frozen=True)
class AggConfig:
    __repr__ = _repr_masking_urls

    sub: tuple[str, ...] = (DEFAULT_PROXY_PUB,)
    pub: str = DEFAULT_AGG_PUB
    symbols: tuple[str, ...] | None = None  # None: every symbol
    intervals_ms: tuple[int, ...] = (100, 250, 500, 1000, 5000, 60_000)
    grace_ms: int = 250
    conditions: str = "polygon"
    conditions_file: Path | None = None
    history_ms: int = 3_600_000
    peer_subscriptions: int = 20_000  # per ZeroMQ peer of --pub (peers.PeerLimits)
    store: Path | None = None  # closed bars on disk (docs/store.md)
    retain_ms: int = 7 * 86_400_000  # --store keeps bars this long (whole segments)
    flush_ms: int = 1000  # --store makes closed bars durable this often
    metrics: tuple[str, int] | None = None
    curve: CurveConfig = CurveConfig()


@dataclass(frozen=True)
class BridgeConfig:
    __repr__ = _repr_masking_urls

    sub: tuple[str, ...] = (DEFAULT_AGG_PUB,)
    listen: tuple[str, int] = ("127.0.0.1", 8768)
    tokens: tuple[str, ...] = field(default=(), repr=False)
    workers: int = 1  # processes sharing the port (SO_REUSEPORT)
    # New connections, per process (protocol.Limits has the rest of the bounds)
    max_handshakes: int = 500
    max_handshakes_per_address: int = 256  # 0: no cap
    max_connections_per_address: int = 10_000  # 0: no cap
    auth_failures: int = 10  # failed token checks per address before throttling; 0: none
    curve: CurveConfig = CurveConfig()
    metrics: tuple[str, int] | None = None
    # Origin headers allowed besides the bridge's own ("*": any); others get 403
    allow_origins: tuple[str, ...] = ()
    tls_cert: Path | None = None  # with tls_key: wss:// and https:// on listen
    tls_key: Path | None = None


@dataclass(frozen=True)
class SimConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8766)
    symbols: int | tuple[str, ...] = 50
    rate: float = 2000.0
    seed: int | None = None
    api_key: str | None = field(default=None, repr=False)
    script: Path | None = None  # send these frames verbatim after subscribe (tests)
    record: Path | None = None  # write every frame sent, as JSON lines (tests)
    late_fraction: float = 0.0  # share of off-exchange prints stamped in the past
    quotes_per_trade: float = 10.0  # Q events per trade while a client subscribes quotes


@dataclass(frozen=True)
class DemoConfig:
    listen: tuple[str, int] = ("127.0.0.1", 8768)
    symbols: int = 50
    rate: float = 2000.0


@dataclass(frozen=True)
class RecordConfig:
    __repr__ = _repr_masking_urls

    sub: str
    out: Path
    prefixes: tuple[str, ...] = ("T.",)
    flush_ms: int = 1000
    compact_ms: int = 3_600_000  # merge this run's parts this often (and at stop)
    metrics: tuple[str, int] | None = None
    curve: CurveConfig = CurveConfig()


@dataclass(frozen=True)
class ReplayConfig:
    path: Path
    speed: float | None = 1.0  # None: as fast as the client reads
    listen: tuple[str, int] = ("127.0.0.1", 8766)
    from_ms: int | None = None
    to_ms: int | None = None
    symbols: tuple[str, ...] | None = None  # None: every symbol
    api_key: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class TapConfig:
    __repr__ = _repr_masking_urls

    endpoint: str
    prefixes: tuple[str, ...] = ()
    count: int | None = None
    curve: CurveConfig = CurveConfig()
