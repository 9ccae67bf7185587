"""The ``polyfan`` command line: builds each role's config and calls its ``run``.

Only this module configures logging handlers. Errors that are polyfan's own print one line
and exit with the error's status; tracebacks only at debug level.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import click

from polyfan import config as cfg
from polyfan import redact
from polyfan.errors import ConfigError, PolyfanError

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("polyfan")
RAW = "polyfan.raw"  # ctx.meta key: option values as given, before parsing
PRINT_CONFIG = "polyfan.print_config"
SECRET_PARAMS = frozenset({"tokens", "api_key"})  # masked by --print-config


class RoleCommand(click.Command):
    """A role's command: every flag also from ``POLYFAN_<ROLE>_<FLAG>`` and the ``--config``
    file's ``[role]`` table, and ``--print-config`` to show the effective configuration."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.params.append(
            click.Option(
                ["--print-config"],
                is_flag=True,
                expose_value=False,
                callback=_remember_print_config,
                help="Print the effective configuration as TOML (secrets masked) and exit.",
            )
        )

    def invoke(self, ctx: click.Context) -> Any:
        if ctx.meta.get(PRINT_CONFIG):
            click.echo(config_toml(ctx), nl=False)
            ctx.exit(0)
        return super().invoke(ctx)


def _remember_print_config(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    ctx.meta[PRINT_CONFIG] = value


def config_toml(ctx: click.Context) -> str:
    """The command's effective flags as one TOML table, as given (durations as typed)."""
    raw = ctx.meta.get(RAW, {})
    lines = [f"[{ctx.info_name}]"]
    assert isinstance(ctx.command, click.Command)
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name in (None, "print_config", "help"):
            continue
        name = param.name
        value = raw.get(name, ctx.params.get(name))
        if name == "tokens":  # the bridge also reads them from POLYFAN_TOKENS
            value = cfg.read_tokens(os.environ, tuple(value or ()))
        if value is None or value == ():
            lines.append(f"# {_flag_name(param)} not set")
            continue
        if name in SECRET_PARAMS:
            value = "****" if isinstance(value, str) else ["****" for _ in value]
        lines.append(f"{_flag_name(param)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _flag_name(param: click.Option) -> str:
    longest = max(param.opts, key=len)
    return longest.lstrip("-")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(redact.mask_url(str(value)), ensure_ascii=False)


class JsonFormatter(logging.Formatter):
    """``--log-format json``: one JSON object per line (CONTRACT.md §9)."""

    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, tz=UTC)
        line: dict[str, Any] = {
            "ts": stamp.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def _load_config_file(path: Path, group: click.Group) -> dict[str, dict[str, Any]]:
    """``--config FILE``: one TOML table per role, keys as the flags are spelled."""
    import tomllib

    try:
        with path.open("rb") as file:
            data = tomllib.load(file)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="--config") from None
    default_map: dict[str, dict[str, Any]] = {}
    for role, table in data.items():
        command = group.commands.get(role)
        if command is None or not isinstance(table, dict):
            raise click.BadParameter(
                f"{path}: [{role}] is not a role ({', '.join(sorted(group.commands))})",
                param_hint="--config",
            )
        names = {
            flag.lstrip("-"): param.name
            for param in command.params
            if isinstance(param, click.Option)
            for flag in param.opts
        }
        for key, value in table.items():
            name = names.get(key) or names.get(key.replace("_", "-"))
            if name is None or name == "print_config":
                raise click.BadParameter(
                    f"{path}: [{role}] has no flag {key!r}", param_hint="--config"
                )
            default_map.setdefault(role, {})[name] = value
    return default_map


def _parsed(parse: Callable[..., Any]) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """A click callback running one of :mod:`polyfan.config`'s parsers on an option's value
    (each value of a repeatable option); its :class:`ConfigError` becomes a usage error."""

    def convert(ctx: click.Context, param: click.Parameter, value: Any) -> Any:
        if param.name is not None:  # as given, for --print-config
            ctx.meta.setdefault(RAW, {})[param.name] = value
        if value is None:
            return None
        name = (
            param.opts[0]
            if param.opts and param.opts[0].startswith("-")
            else param.human_readable_name
        )
        try:
            if isinstance(value, tuple):
                return tuple(parse(v, name=name) for v in value)
            return parse(value, name=name)
        except ConfigError as exc:
            raise click.BadParameter(str(exc).split(": ", 1)[-1]) from None

    return convert


def _call(converter: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    try:
        return converter(*args, **kwargs)
    except ConfigError as exc:
        raise click.UsageError(str(exc)) from None


def _sub_option(default: str, what: str) -> Callable[[F], F]:
    return click.option(
        "--sub",
        metavar="ENDPOINT",
        multiple=True,
        default=(default,),
        show_default=True,
        callback=_parsed(cfg.validate_endpoint),
        help=f"{what} PUB endpoint to connect to; repeatable.",
    )


_CURVE_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


def _curve_options(*, binds: bool, connects: bool) -> Callable[[F], F]:
    """--curve-secret, and --curve-allow for a role that binds, --curve-server for one that
    connects (CONTRACT.md §8)."""

    def decorate(f: F) -> F:
        if connects:
            f = click.option(
                "--curve-server",
                "curve_servers",
                metavar="FILE",
                multiple=True,
                type=_CURVE_FILE,
                help="The server's public certificate (NAME.key): one for every --sub in "
                "order, or one for all.",
            )(f)
        if binds:
            f = click.option(
                "--curve-allow",
                metavar="DIR",
                type=click.Path(exists=True, file_okay=False, path_type=Path),
                help="Directory of the public certificates (*.key) allowed to connect; "
                "re-read when it changes.",
            )(f)
        return click.option(
            "--curve-secret",
            metavar="FILE",
            type=_CURVE_FILE,
            help="This role's CURVE key pair (NAME.key_secret from `polyfan keys`).",
        )(f)

    return decorate


def _count_option(name: str, default: int, minimum: int, help: str) -> Callable[[F], F]:
    """A whole-number flag with a lower bound and its default shown."""
    return click.option(
        name, type=click.IntRange(min=minimum), default=default, show_default=True, help=help
    )


_metrics_option = click.option(
    "--metrics",
    default=None,
    metavar="HOST:PORT",
    callback=_parsed(cfg.parse_host_port),
    help="Serve Prometheus counters here.",
)


def _exit_cleanly(signum: int, frame: object) -> None:
    """SIGTERM before a command has set up its own handling: stop at once, status 0."""
    raise SystemExit(0)


def _run(run: Callable[[Any], int], config: Any) -> None:
    try:
        status = run(config)
    except PolyfanError as exc:
        if log.isEnabledFor(logging.DEBUG):
            log.exception("fatal")
        click.echo(f"polyfan: {redact.mask_urls_in(str(exc))}", err=True)
        sys.exit(exc.exit_status)
    except KeyboardInterrupt:
        status = 0
    sys.exit(status)


@click.group(
    context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "POLYFAN"}
)
@click.option(
    "--log-level",
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
    default=None,
    help="Log level (default info; env POLYFAN_LOG).",
)
@click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one object per line (ts, level, role, logger, msg).",
)
@click.option(
    "--config",
    "config_file",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="TOML file, one table per role ([agg], [bridge] ...); flags and environment win.",
)
@click.version_option(package_name="polyfan")
@click.pass_context
def main(
    ctx: click.Context, log_level: str | None, log_format: str, config_file: Path | None
) -> None:
    """polyfan: fan out one Polygon/Massive trade feed over ZeroMQ and serve sub-second bars."""
    # Each command handles SIGTERM itself once it runs; until then (imports, numba's cache,
    # binding) it must stop cleanly too (CONTRACT §2).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    level = (log_level or os.environ.get("POLYFAN_LOG") or "info").upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise click.UsageError(
            f"POLYFAN_LOG: {level.lower()!r} is not debug, info, warning or error"
        )
    if config_file is not None:
        assert isinstance(ctx.command, click.Group)
        ctx.default_map = _load_config_file(config_file, ctx.command)
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter(ctx.invoked_subcommand or "polyfan"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    redact.install(logging.getLogger())  # no URL credentials in any line (docs/proxy.md)
    log.debug(
        "polyfan %s starting (pid %d)", click.get_current_context().invoked_subcommand, os.getpid()
    )


@main.command(cls=RoleCommand)
@click.option(
    "--upstream",
    metavar="URL",
    envvar=["POLYFAN_UPSTREAM", "POLYFAN_PROXY_UPSTREAM"],
    default=cfg.DEFAULT_UPSTREAM,
    show_default=True,
    help="Upstream WebSocket URL (env POLYFAN_UPSTREAM).",
)
@click.option(
    "--api-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Read the API key from this file (else env MASSIVE_API_KEY, then POLYGON_API_KEY).",
)
@click.option(
    "--subscribe",
    metavar="PARAMS",
    default="T.*",
    show_default=True,
    help="Upstream channels, any stocks ones: T.*,Q.*,A.*,AM.*,LULD.* or Q.AAPL,...",
)
@click.option(
    "--pub",
    metavar="ENDPOINT",
    callback=_parsed(cfg.validate_endpoint),
    default=cfg.DEFAULT_PROXY_PUB,
    show_default=True,
    help="ZeroMQ PUB endpoint to bind.",
)
@_metrics_option
@_curve_options(binds=True, connects=False)
def proxy(
    upstream: str,
    api_key_file: Path | None,
    subscribe: str,
    pub: str,
    metrics: tuple[str, int] | None,
    curve_secret: Path | None,
    curve_allow: Path | None,
) -> None:
    """Hold the one upstream connection and republish every event on ZeroMQ (trades, and any
    other stocks channel --subscribe names: quotes, aggregates, LULD, ...)."""
    from polyfan import proxy as role

    config = cfg.ProxyConfig(
        api_key=_call(cfg.read_api_key, os.environ, api_key_file),
        upstream=upstream,
        subscribe=subscribe,
        pub=pub,
        metrics=metrics,
        curve=_call(cfg.curve_config, curve_secret, curve_allow, binds=True, connects=False),
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@_sub_option(cfg.DEFAULT_PROXY_PUB, "Proxy")
@click.option(
    "--pub",
    metavar="ENDPOINT",
    callback=_parsed(cfg.validate_endpoint),
    default=cfg.DEFAULT_AGG_PUB,
    show_default=True,
    help="ZeroMQ endpoint to bind for bars.",
)
@click.option(
    "--symbols",
    default="*",
    metavar="LIST",
    show_default=True,
    callback=_parsed(cfg.parse_symbols),
    help="* for every symbol, or TSLA,AAPL.",
)
@click.option(
    "--interval",
    "intervals",
    metavar="DUR",
    multiple=True,
    default=cfg.DEFAULT_INTERVALS,
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="Bar interval (100ms to 1m); repeatable.",
)
@click.option(
    "--grace",
    metavar="DUR",
    default="250ms",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="How long a bar waits for late trades.",
)
@click.option(
    "--conditions",
    type=click.Choice(["polygon", "all"]),
    default="polygon",
    show_default=True,
    help="Trade-condition rules: Polygon's table, or every trade regular.",
)
@click.option(
    "--conditions-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="JSON dump of /v3/reference/conditions to use instead of the built-in table.",
)
@click.option(
    "--history",
    metavar="DUR",
    default="1h",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="Bars kept per symbol and interval for late joiners.",
)
@click.option(
    "--peer-subscriptions",
    type=click.IntRange(min=1),
    default=cfg.AggConfig.peer_subscriptions,
    show_default=True,
    help="Subscriptions one ZeroMQ peer may hold (a bridge holds one per channel); past it "
    "the peer is disconnected and its address refused for 60 s (docs/limits.md).",
)
@click.option(
    "--store",
    type=click.Path(file_okay=False, path_type=Path),
    metavar="DIR",
    help="Write closed bars to DIR and read them back at start: history, since and /api/bars "
    "reach bars from before a restart and older than --history (docs/store.md).",
)
@click.option(
    "--retain",
    metavar="DUR",
    default="7d",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="With --store: bars kept on disk (older segments are deleted whole).",
)
@click.option(
    "--flush",
    metavar="DUR",
    default="1s",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="With --store: how often closed bars are made durable (a kill -9 loses at most this).",
)
@_metrics_option
@_curve_options(binds=True, connects=True)
def agg(
    sub: tuple[str, ...],
    pub: str,
    symbols: tuple[str, ...] | None,
    intervals: tuple[int, ...],
    grace: int,
    conditions: str,
    conditions_file: Path | None,
    history: int,
    peer_subscriptions: int,
    store: Path | None,
    retain: int,
    flush: int,
    metrics: tuple[str, int] | None,
    curve_secret: Path | None,
    curve_allow: Path | None,
    curve_servers: tuple[Path, ...],
) -> None:
    """Build exact OHLCV bars from the proxy's trades and publish them."""
    from polyfan import agg as role

    for interval in intervals:
        if not 100 <= interval <= 60_000:
            raise click.BadParameter(
                f"{interval}ms is outside 100ms to 1m", param_hint="--interval"
            )
    if flush < 10:
        raise click.BadParameter(f"{flush}ms is under 10ms", param_hint="--flush")
    if retain < 1000:
        raise click.BadParameter(f"{retain}ms is under 1s", param_hint="--retain")
    config = cfg.AggConfig(
        sub=sub,
        pub=pub,
        symbols=symbols,
        intervals_ms=tuple(sorted(set(intervals))),
        grace_ms=grace,
        conditions=conditions,
        conditions_file=conditions_file,
        history_ms=history,
        peer_subscriptions=peer_subscriptions,
        store=store,
        retain_ms=retain,
        flush_ms=flush,
        metrics=metrics,
        curve=_call(
            cfg.curve_config,
            curve_secret,
            curve_allow,
            curve_servers,
            subs=len(sub),
            binds=True,
            connects=True,
        ),
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@_sub_option(cfg.DEFAULT_AGG_PUB, "Aggregator")
@click.option(
    "--listen",
    metavar="HOST:PORT",
    callback=_parsed(cfg.parse_host_port),
    default=cfg.DEFAULT_BRIDGE_LISTEN,
    show_default=True,
    help="HOST:PORT for WebSocket and HTTP.",
)
@click.option(
    "--token",
    "tokens",
    metavar="TOKEN",
    multiple=True,
    help="Accepted client token; repeatable (env POLYFAN_TOKENS, comma-separated).",
)
@_count_option(
    "--workers", 1, 1, "Processes sharing the port (SO_REUSEPORT), for many thousands of clients."
)
@_count_option(
    "--max-handshakes",
    cfg.BridgeConfig.max_handshakes,
    1,
    "Connections still in the handshake at once, per process (docs/limits.md).",
)
@_count_option(
    "--max-handshakes-per-address",
    cfg.BridgeConfig.max_handshakes_per_address,
    0,
    "Of those, from one client address; 0: no cap (behind a reverse proxy).",
)
@_count_option(
    "--max-connections-per-address",
    cfg.BridgeConfig.max_connections_per_address,
    0,
    "Connections (handshakes and clients) from one client address; 0: no cap.",
)
@_count_option(
    "--auth-failures",
    cfg.BridgeConfig.auth_failures,
    0,
    "Failed token checks from one client address before its attempts are refused unchecked "
    "(then one more every 6 s); 0: no throttle (behind a reverse proxy).",
)
@_curve_options(binds=False, connects=True)
@_metrics_option
@click.option(
    "--allow-origin",
    "allow_origins",
    metavar="ORIGIN",
    multiple=True,
    callback=_parsed(cfg.parse_origin),
    help="A web page origin (scheme://host[:port], or *) allowed to use the bridge besides "
    "its own; repeatable. Requests and WebSocket handshakes from other origins get 403.",
)
@click.option(
    "--tls-cert",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM certificate (chain): serve wss:// and https:// on --listen. Needs --tls-key.",
)
@click.option(
    "--tls-key",
    metavar="FILE",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="PEM private key of --tls-cert.",
)
def bridge(
    sub: tuple[str, ...],
    listen: tuple[str, int],
    tokens: tuple[str, ...],
    workers: int,
    max_handshakes: int,
    max_handshakes_per_address: int,
    max_connections_per_address: int,
    auth_failures: int,
    curve_secret: Path | None,
    curve_servers: tuple[Path, ...],
    metrics: tuple[str, int] | None,
    allow_origins: tuple[str, ...],
    tls_cert: Path | None,
    tls_key: Path | None,
) -> None:
    """Serve bars to WebSocket clients, the chart page and the HTTP API."""
    from polyfan import bridge as role

    if (tls_cert is None) != (tls_key is None):
        raise click.UsageError("--tls-cert and --tls-key go together")

    config = cfg.BridgeConfig(
        sub=sub,
        listen=listen,
        tokens=cfg.read_tokens(os.environ, tokens),
        workers=workers,
        max_handshakes=max_handshakes,
        max_handshakes_per_address=max_handshakes_per_address,
        max_connections_per_address=max_connections_per_address,
        auth_failures=auth_failures,
        curve=_call(
            cfg.curve_config,
            curve_secret,
            servers=curve_servers,
            subs=len(sub),
            binds=False,
            connects=True,
        ),
        metrics=metrics,
        allow_origins=allow_origins,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    _run(role.run, config)


def _sim_symbols(text: str, *, name: str = "--symbols") -> int | tuple[str, ...]:
    if text.strip().isdigit():
        count = int(text)
        if count < 1:
            raise ConfigError(f"{name}: need at least one symbol")
        return count
    symbols = cfg.parse_symbols(text, name=name)
    if symbols is None:
        raise ConfigError(f"{name}: give a count or a list, not *")
    return symbols


@main.command(cls=RoleCommand)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    callback=_parsed(cfg.parse_host_port),
    default=cfg.DEFAULT_SIM_LISTEN,
    show_default=True,
    help="HOST:PORT to serve on.",
)
@click.option(
    "--symbols",
    default="50",
    show_default=True,
    callback=_parsed(_sim_symbols),
    help="How many tickers, or a list: A,AA,AAPL.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=2000,
    show_default=True,
    help="Trades per second.",
)
@click.option(
    "--quotes-per-trade",
    type=click.FloatRange(min=0),
    default=10.0,
    show_default=True,
    help="Q events per trade, sent while a client subscribes quotes.",
)
@click.option("--seed", type=int, default=None, help="Seed for a reproducible market.")
@click.option("--api-key", default=None, help="Accept only this key (default: any).")
@click.option(
    "--late-prints",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Share of off-exchange prints stamped 1 s to 2 min in the past (default 0).",
)
@click.option(
    "--script",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    hidden=True,
    help="Send this file's lines verbatim, one frame each, after subscribe (tests).",
)
@click.option(
    "--record",
    type=click.Path(dir_okay=False, path_type=Path),
    hidden=True,
    help="Write every frame sent as JSON lines {client, frame} (tests).",
)
def sim(
    listen: tuple[str, int],
    symbols: int | tuple[str, ...],
    rate: float,
    quotes_per_trade: float,
    seed: int | None,
    api_key: str | None,
    late_prints: float,
    script: Path | None,
    record: Path | None,
) -> None:
    """A local stand-in for the Polygon stocks WebSocket, with a synthetic market.

    SIGUSR1 drops every client connection abruptly, as the real server can.
    """
    from polyfan import sim as role

    config = cfg.SimConfig(
        listen=listen,
        symbols=symbols,
        rate=rate,
        seed=seed,
        api_key=api_key,
        script=script,
        record=record,
        late_fraction=late_prints,
        quotes_per_trade=quotes_per_trade,
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    callback=_parsed(cfg.parse_host_port),
    default=cfg.DEFAULT_BRIDGE_LISTEN,
    show_default=True,
    help="HOST:PORT for the chart page.",
)
@click.option(
    "--symbols",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="How many simulated tickers.",
)
@click.option(
    "--rate",
    type=click.FloatRange(min=0, min_open=True),
    default=2000,
    show_default=True,
    help="Simulated trades per second.",
)
def demo(listen: tuple[str, int], symbols: int, rate: float) -> None:
    """Run sim, proxy, agg and bridge over ipc on this machine; no API key needed."""
    from polyfan import demo as role

    config = cfg.DemoConfig(
        listen=listen,
        symbols=symbols,
        rate=rate,
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@click.argument("endpoint", callback=_parsed(cfg.validate_endpoint))
@click.argument("prefixes", nargs=-1)
@click.option(
    "--count", type=click.IntRange(min=1), default=None, help="Exit after this many messages."
)
@_curve_options(binds=False, connects=True)
def tap(
    endpoint: str,
    prefixes: tuple[str, ...],
    count: int | None,
    curve_secret: Path | None,
    curve_servers: tuple[Path, ...],
) -> None:
    """Print what a polyfan PUB endpoint publishes, one JSON object per line.

    PREFIXES as users type them: T.TSLA, T. (or T.*), 500Ms.TSLA (default: everything).
    """
    from polyfan import tap as role

    config = cfg.TapConfig(
        endpoint=endpoint,
        prefixes=prefixes,
        count=count,
        curve=_call(
            cfg.curve_config,
            curve_secret,
            servers=curve_servers,
            subs=1,
            binds=False,
            connects=True,
        ),
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@click.argument("prefixes", nargs=-1)
@click.option(
    "--sub",
    metavar="ENDPOINT",
    default=cfg.DEFAULT_PROXY_PUB,
    show_default=True,
    callback=_parsed(cfg.validate_endpoint),
    help="The proxy's PUB endpoint to connect to.",
)
@click.option(
    "--out",
    metavar="DIR",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Write Parquet under DIR/trades/date=YYYY-MM-DD/.",
)
@click.option(
    "--flush",
    metavar="DUR",
    default="1s",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="How often received trades are written (and readable); a kill -9 loses at most this.",
)
@click.option(
    "--compact",
    metavar="DUR",
    default="1h",
    show_default=True,
    callback=_parsed(cfg.parse_duration_ms),
    help="How often this run's parts are merged into one file per date (and at stop); 0ms: never.",
)
@_metrics_option
@_curve_options(binds=False, connects=True)
def record(
    prefixes: tuple[str, ...],
    sub: str,
    out: Path,
    flush: int,
    compact: int,
    metrics: tuple[str, int] | None,
    curve_secret: Path | None,
    curve_servers: tuple[Path, ...],
) -> None:
    """Write every trade from a proxy to Parquet files with Polygon's flat-file columns.

    PREFIXES as users type them: T. (default: every trade), T.TSLA, T.AAPL ...
    """
    from polyfan import record as role

    if flush < 1:
        raise click.BadParameter("must be at least 1ms", param_hint="--flush")
    for prefix in prefixes:
        if not prefix.startswith("T."):
            raise click.BadParameter(
                f"{prefix!r}: record takes trade prefixes (T., T.TSLA)", param_hint="PREFIXES"
            )
    config = cfg.RecordConfig(
        sub=sub,
        out=out,
        prefixes=prefixes or ("T.",),
        flush_ms=flush,
        compact_ms=compact,
        metrics=metrics,
        curve=_call(
            cfg.curve_config,
            curve_secret,
            servers=curve_servers,
            subs=1,
            binds=False,
            connects=True,
        ),
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@click.argument("path", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--speed",
    metavar="X|max",
    default="1",
    show_default=True,
    callback=_parsed(cfg.parse_speed),
    help="How many times faster than SIP time (2: twice as fast), or max: as fast as the "
    "clients read.",
)
@click.option(
    "--listen",
    metavar="HOST:PORT",
    callback=_parsed(cfg.parse_host_port),
    default=cfg.DEFAULT_SIM_LISTEN,
    show_default=True,
    help="HOST:PORT to serve the Polygon stocks WebSocket on.",
)
@click.option(
    "--from",
    "from_",
    metavar="TS",
    envvar="POLYFAN_REPLAY_FROM",
    default=None,
    callback=_parsed(cfg.parse_timestamp_ms),
    help="Replay trades with SIP time at or after this (Unix ms or ISO 8601; UTC if no offset).",
)
@click.option(
    "--to",
    metavar="TS",
    default=None,
    callback=_parsed(cfg.parse_timestamp_ms),
    help="Replay trades with SIP time before this.",
)
@click.option(
    "--symbols",
    default="*",
    metavar="LIST",
    show_default=True,
    callback=_parsed(cfg.parse_symbols),
    help="* for every symbol, or TSLA,AAPL.",
)
@click.option("--api-key", default=None, help="Accept only this key (default: any).")
def replay(
    path: Path,
    speed: float | None,
    listen: tuple[str, int],
    from_: int | None,
    to: int | None,
    symbols: tuple[str, ...] | None,
    api_key: str | None,
) -> None:
    """Serve recorded trades over the Polygon stocks WebSocket protocol, like sim.

    PATH: a record directory, a Parquet file or directory, or a Polygon flat file
    (.csv or .csv.gz). Point a proxy's --upstream at ws://HOST:PORT/stocks.
    """
    from polyfan import replay as role

    if from_ is not None and to is not None and from_ >= to:
        raise click.BadParameter("must be after --from", param_hint="--to")
    config = cfg.ReplayConfig(
        path=path,
        speed=speed,
        listen=listen,
        from_ms=from_,
        to_ms=to,
        symbols=symbols,
        api_key=api_key,
    )
    _run(role.run, config)


@main.command(cls=RoleCommand)
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=".",
    show_default=True,
    help="Where to write NAME.key and NAME.key_secret.",
)
def keys(name: str, directory: Path) -> None:
    """Write a CURVE key pair: DIR/NAME.key (public) and DIR/NAME.key_secret (secret, 0600).

    Prints the two paths and the public key, never the secret.
    """
    from polyfan import curve

    try:
        public_path, secret_path, public = curve.write_pair(name, directory)
    except PolyfanError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"public key file: {public_path}")
    click.echo(f"secret key file: {secret_path} (mode 0600; never share it)")
    click.echo(f"public key: {public.decode()}")
