"""``polyfan.client``: the Python API for programs (CONTRACT §10, docs/client.md).

Three ways in, one per kind of consumer::

    from polyfan import client

    async for bar in client.bars("ws://127.0.0.1:8768", "500Ms.TSLA", since=ms, token=token):
        ...  # MB events as dicts, across reconnects: none missed, none twice

    frame = client.history("http://127.0.0.1:8768", "500Ms.TSLA", start, end, token=token)

    with client.trade_batches("tcp://127.0.0.1:8767", ["TSLA", "AAPL"]) as feed:
        for symbol, trades in feed:  # NumPy TRADE records straight off the proxy's ZeroMQ feed
            ...

- :func:`bars` speaks the bridge's WebSocket protocol (CONTRACT §4). It reconnects with backoff
  whenever the connection is lost or a channel is not served exactly (refused, or its history
  failed) and resumes every channel with ``since`` = the start of the next bar it needs; what
  it hands on and what it asks for is decided by the pure :mod:`polyfan.fanout.resume`. When
  the bridge says a ``since`` reached past its bound of bars, the missing ones are fetched from
  ``/api/bars`` first. A wrong token raises :class:`~polyfan.errors.AuthenticationError`.
- :func:`history` pages through ``/api/bars?channel=&from=&to=&limit=`` (CONTRACT §5, §9) and
  returns a ``pandas.DataFrame`` (``pip install 'polyfan[pandas]'``).
- :func:`trade_batches` is a ZeroMQ SUB on a proxy's ``T.<SYM>`` topics that drains every
  message waiting at each wake-up in one compiled call (:mod:`polyfan.wire.zmqio`) and decodes
  them in another (:mod:`polyfan.wire.ingest`), so a Python consumer pays per wake-up, not per
  message; losses that the sequence numbers show are counted in ``lost`` and logged.

Nothing here logs or shows a token or a secret key. Logger: ``polyfan.client``.
"""

from __future__ import annotations

import asyncio
import collections
import gzip
import logging
import ssl as ssl_module
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException

from polyfan.backoff import Backoff
from polyfan.errors import AuthenticationError, BridgeError
from polyfan.fanout.protocol import Channel, Limits, parse_channel
from polyfan.fanout.resume import BarDecision, Gap, Resume, StatusAction, Verdict, channels_from
from polyfan.redact import mask_url
from polyfan.symbols import SYMBOL_RE

if TYPE_CHECKING:
    import pandas as pd
    import zmq

    from polyfan.curve import HandshakeWatch
    from polyfan.wire.ingest import FrameDecoder, TradeColumns
    from polyfan.wire.zmqio import AnyReceiver

log = logging.getLogger("polyfan.client")

__all__ = ["BarStream", "Gap", "TradeBatches", "bars", "history", "trade_batches"]

API_MAX_LIMIT = Limits().api_max_limit  # /api/bars?limit= at most this (docs/bridge.md)
MAX_FRAME_BYTES = 16 * 1024 * 1024  # a server frame: history goes in frames of 1,000 bars
CLOSE_TIMEOUT = 1.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


# --- URLs and times ---------------------------------------------------------------------------


def _split_url(url: str) -> urllib.parse.SplitResult:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("ws", "wss", "http", "https") or not parts.netloc:
        raise ValueError(
            f"url: {mask_url(url)!r} is not ws://, wss://, http:// or https://HOST:PORT"
        )
    return parts


def _ws_url(url: str) -> str:
    """The WebSocket URL for a bridge given as ws(s):// or http(s):// (the path is kept)."""
    parts = _split_url(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    return urllib.parse.urlunsplit((scheme, parts.netloc, parts.path or "/", parts.query, ""))


def _http_base(url: str) -> str:
    """``http(s)://HOST:PORT`` of a bridge given as ws(s):// or http(s)://."""
    parts = _split_url(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return f"{scheme}://{parts.netloc}"


def _milliseconds(value: int | datetime, name: str) -> int:
    """Unix ms from an int or an aware datetime (a pandas Timestamp is one)."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{name}: give a timezone-aware datetime (or Unix milliseconds)")
        return (value - _EPOCH) // timedelta(milliseconds=1)
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: {value!r} is not Unix milliseconds nor a datetime")
    return int(value)


# --- HTTP: /api/bars ----------------------------------------------------------------------------


def _get_json(
    url: str, token: str | None, timeout: float, ssl: ssl_module.SSLContext | None
) -> Any:
    request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    shown = mask_url(url)
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ssl) as response:
            body = response.read()
            if response.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
    except urllib.error.HTTPError as exc:
        try:
            detail = orjson.loads(exc.read()).get("error", "")
        except (orjson.JSONDecodeError, AttributeError, OSError):
            detail = exc.reason
        finally:
            exc.close()
        if exc.code == 401:
            raise AuthenticationError(f"{shown}: the bridge refused the token (HTTP 401)") from None
        raise BridgeError(f"{shown}: HTTP {exc.code}: {detail}", exc.code) from None
    except (urllib.error.URLError, OSError) as exc:
        raise BridgeError(f"{shown}: no answer: {exc}") from exc
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BridgeError(f"{shown}: the answer is not JSON") from exc


def fetch_bars(
    url: str,
    channel: str,
    start: int,
    end: int,
    *,
    token: str | None = None,
    page_size: int = API_MAX_LIMIT,
    timeout: float = 30.0,
    ssl: ssl_module.SSLContext | None = None,
) -> list[dict[str, Any]]:
    """Every stored bar of ``channel`` with ``start <= s < end``, oldest first, as ``MB`` dicts.

    ``/api/bars`` answers the newest ``limit`` bars of a range, so the pages go back in time:
    each asks for the bars before the oldest of the previous one, until a page is short."""
    if not 1 <= page_size <= API_MAX_LIMIT:
        raise ValueError(f"page_size: {page_size} is not from 1 to {API_MAX_LIMIT}")
    base = _http_base(url)
    pages: list[list[dict[str, Any]]] = []
    to = end
    while start < to:
        query = urllib.parse.urlencode(
            {"channel": channel, "from": start, "to": to, "limit": page_size}
        )
        page = _get_json(f"{base}/api/bars?{query}", token, timeout, ssl)
        if not isinstance(page, list):
            raise BridgeError(f"{base}/api/bars: the answer is not a JSON array")
        pages.append(page)
        if len(page) < page_size:
            break
        oldest = int(page[0]["s"])
        if oldest >= to:
            raise BridgeError(f"{base}/api/bars: a page of bars not before {to}: cannot page on")
        to = oldest
    return [bar for page in reversed(pages) for bar in page]


# --- bars(): the WebSocket stream -------------------------------------------------------------


def bars(
    url: str,
    channels: str | Iterable[str],
    *,
    since: int | Mapping[str, int] | None = None,
    token: str | None = None,
    statuses: bool = False,
    backfill: bool = True,
    backoff: Backoff | None = None,
    ssl: ssl_module.SSLContext | None = None,
    open_timeout: float = 10.0,
) -> BarStream:
    """Bars of ``channels`` from the bridge at ``url``, as ``MB`` dicts, for ``async for``.

    ``channels``: ``"500Ms.TSLA"``, ``"500Ms.TSLA,1000Ms.AAPL"`` or a list; ``<N>Ms.*`` too.
    ``since`` (Unix ms, or a mapping channel -> ms): start with the stored bars with
    ``s >= since`` (per-symbol channels only). ``token``: the bridge's ``--token``.
    ``statuses=True`` also yields the status events (``ev == "status"``), the bridge's
    (``feed_down``, ``feed_up``, ``error`` ...) and the client's own (``reconnecting``,
    ``gap``); without it they are only logged. ``backfill=False``: when the bridge's ``since``
    bound cuts a resume short, report the ``gap`` instead of fetching the bars over HTTP.
    ``ssl``: the context for ``wss://`` and ``https://`` (a private CA, say).

    Lost connections are retried for ever with ``backoff`` (0.5 s doubling to 30 s, jittered);
    a wrong token raises :class:`~polyfan.errors.AuthenticationError`. docs/client.md has the
    guarantees and their limits.
    """
    chosen = channels_from(channels)
    if isinstance(since, Mapping):
        starts: dict[Channel, int | None] = {}
        for name, value in since.items():
            channel = parse_channel(name)
            if channel not in chosen:
                raise ValueError(f"since: {name} is not one of the channels")
            starts[channel] = _milliseconds(value, f"since[{name!r}]")
    else:
        common = None if since is None else _milliseconds(since, "since")
        starts = {c: common for c in chosen if c.symbol is not None}
        if common is not None and len(starts) < len(chosen):
            raise ValueError("since: * channels take no since (history is per symbol)")
    return BarStream(
        url,
        Resume(chosen, starts),
        token=token,
        statuses=statuses,
        backfill=backfill,
        backoff=backoff,
        ssl=ssl,
        open_timeout=open_timeout,
    )


class BarStream:
    """What :func:`bars` returns: iterate it once with ``async for`` (or use ``async with``).

    ``reconnects``: connections lost (or dropped on purpose) and made again; ``gaps``: every
    :class:`~polyfan.fanout.resume.Gap` reported, in order.
    """

    def __init__(
        self,
        url: str,
        resume: Resume,
        *,
        token: str | None,
        statuses: bool,
        backfill: bool,
        backoff: Backoff | None,
        ssl: ssl_module.SSLContext | None,
        open_timeout: float,
    ) -> None:
        self.url = _ws_url(url)
        self._shown = mask_url(self.url)
        self._resume = resume
        self._token = token
        self._statuses = statuses
        self._backfill = backfill
        self._backoff = backoff or Backoff(initial=0.5, cap=30.0, healthy_after=30.0)
        self._ssl = ssl
        self._open_timeout = open_timeout
        self._ws: ClientConnection | None = None
        self._ready: collections.deque[dict[str, Any]] = collections.deque()
        self._delay = 0.0
        self._closed = False
        self.reconnects = 0
        self.gaps: list[Gap] = []

    @property
    def dropped(self) -> int:
        """Bars received and not handed on: already handed on, from before a channel's
        ``since``, or of a channel not asked for (the overlap of a shared ``since``)."""
        return self._resume.dropped

    def __repr__(self) -> str:
        channels = ",".join(c.name for c in self._resume.series)
        return f"BarStream({self._shown!r}, {channels!r}, reconnects={self.reconnects})"

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self._events()

    async def _events(self) -> AsyncIterator[dict[str, Any]]:
        try:
            while True:
                while self._ready:
                    yield self._ready.popleft()
                if self._closed:
                    return
                await self._fill()
        finally:
            await self.aclose()

    async def __aenter__(self) -> BarStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection; iteration ends."""
        self._closed = True
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()

    # --- one step ----------------------------------------------------------------------

    async def _fill(self) -> None:
        """Connect, or read one frame and queue what it holds for the program."""
        if self._ws is None:
            await self._connect()
            return
        try:
            frame = await self._ws.recv()
        except ConnectionClosed as exc:
            await self._lost(f"connection closed ({_close_reason(exc)})")
            return
        try:
            events = orjson.loads(frame)
        except orjson.JSONDecodeError:
            events = None
        if not isinstance(events, list):
            log.warning("%s: a server frame that is not a JSON array, ignored", self._shown)
            return
        for event in events:
            if not isinstance(event, dict):
                continue
            kind = event.get("ev")
            if kind == "MB":
                await self._bar(event)
            elif kind == "status" and not await self._status(event):
                return  # the rest of the frame comes again after the reconnect

    async def _bar(self, event: dict[str, Any]) -> None:
        decision = self._resume.bar(event)
        while decision.verdict is Verdict.BACKFILL:
            await self._fill_gap(decision)
            decision = self._resume.bar(event)
        for gap in decision.gaps:
            self._gap(gap)
        if decision.verdict is Verdict.HAND_ON:
            self._ready.append(event)

    async def _fill_gap(self, decision: BarDecision) -> None:
        """The bridge's ``since`` bound cut a resume short: fetch ``[start, end)`` over HTTP."""
        channel = decision.channel
        assert channel is not None
        reason = "since reached past the bridge's bound of bars"
        if self._backfill:
            try:
                fetched = await asyncio.to_thread(
                    fetch_bars,
                    self.url,
                    channel.name,
                    decision.start,
                    decision.end,
                    token=self._token,
                    ssl=self._ssl,
                )
            except BridgeError as exc:
                reason += f", and /api/bars failed: {exc}"
            else:
                self._ready.extend(self._resume.backfilled(channel, fetched))
                log.info(
                    "%s: %s: %d bars from /api/bars (since reached past the bridge's bound)",
                    self._shown,
                    channel.name,
                    len(fetched),
                )
                return
        self._gap(Gap(channel.name, decision.start, decision.end, reason))

    async def _status(self, event: dict[str, Any]) -> bool:
        """Handle a status; False when the connection is to be made again."""
        action = self._resume.status(event)
        kind = event.get("status")
        message = str(event.get("message", ""))
        if action is StatusAction.FATAL:
            await self.aclose()
            raise AuthenticationError(f"{self._shown}: the bridge refused the token: {message}")
        if action is StatusAction.AUTHENTICATED:
            self._backoff.connected(time.monotonic())
        if kind in ("error", "feed_down"):
            log.warning("%s: %s: %s", self._shown, kind, message)
        elif kind == "feed_up":
            log.info("%s: feed_up: %s", self._shown, message)
        else:
            log.debug("%s: %s: %s", self._shown, kind, message)
        if self._statuses:
            self._ready.append(event)
        if action is StatusAction.RECONNECT:
            await self._lost(f"a channel is not served exactly ({message})")
            return False
        return True

    def _gap(self, gap: Gap) -> None:
        self.gaps.append(gap)
        event = gap.status()
        log.warning("%s: gap: %s", self._shown, event["message"])
        if self._statuses:
            self._ready.append(event)

    # --- connections -------------------------------------------------------------------

    async def _connect(self) -> None:
        if self._delay:
            await asyncio.sleep(self._delay)
        self._resume.connecting()
        try:
            ws = await connect(
                self.url,
                open_timeout=self._open_timeout,
                close_timeout=CLOSE_TIMEOUT,
                max_size=MAX_FRAME_BYTES,
                compression=None,
                ssl=self._ssl if self.url.startswith("wss:") else None,
            )
        except InvalidURI as exc:
            raise ValueError(f"url: {self._shown}: {exc}") from None
        except (OSError, TimeoutError, WebSocketException) as exc:
            await self._lost(f"cannot connect: {exc}")
            return
        self._ws = ws
        try:
            await ws.send(orjson.dumps({"action": "auth", "params": self._token or ""}).decode())
            for names, since in self._resume.subscriptions():
                request: dict[str, Any] = {"action": "subscribe", "params": ",".join(names)}
                if since is not None:
                    request["since"] = since
                await ws.send(orjson.dumps(request).decode())
        except ConnectionClosed as exc:
            await self._lost(f"connection closed ({_close_reason(exc)})")
            return
        self._resume.connected()
        log.info("%s: connected, subscribing %d channels", self._shown, len(self._resume.series))

    async def _lost(self, reason: str) -> None:
        ws, self._ws = self._ws, None
        if ws is not None:
            await ws.close()
        if self._closed:
            return
        self._backoff.disconnected(time.monotonic())
        self._delay = self._backoff.next_delay()
        self.reconnects += 1
        log.warning("%s: %s; reconnecting in %.1f s", self._shown, reason, self._delay)
        if self._statuses:
            self._ready.append(
                {
                    "ev": "status",
                    "status": "reconnecting",
                    "message": f"{reason}; reconnecting in {self._delay:.1f} s",
                }
            )


def _close_reason(exc: ConnectionClosed) -> str:
    frame = exc.rcvd or exc.sent
    if frame is None:
        return "no close frame"
    return f"code {frame.code}{': ' + frame.reason if frame.reason else ''}"


# --- history(): a DataFrame -----------------------------------------------------------------

COLUMNS = ("sym", "interval", "o", "h", "l", "c", "v", "vw", "n", "s", "e", "outage", "r")


def _pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ImportError(
            "polyfan.client.history needs pandas: pip install 'polyfan[pandas]'"
        ) from None
    return pandas


def history(
    url: str,
    channel: str,
    start: int | datetime,
    end: int | datetime,
    *,
    token: str | None = None,
    page_size: int = API_MAX_LIMIT,
    timeout: float = 30.0,
    ssl: ssl_module.SSLContext | None = None,
) -> pd.DataFrame:
    """The stored bars of one channel with ``start <= s < end`` as a ``pandas.DataFrame``.

    One row per bar, oldest first, columns ``sym interval o h l c v vw n s e outage r``:
    ``s``/``e`` Unix ms (int64), ``vw`` NaN where the bar's is null, ``outage`` False unless
    the bar spans an outage, ``r`` the revision (0: first publication). ``start``/``end``: Unix
    ms or timezone-aware datetimes. ``/api/bars`` is paged (``page_size`` bars a request, at
    most the bridge's maximum of 10,000) as far as the range needs. Raises
    :class:`~polyfan.errors.AuthenticationError` on a wrong token, and
    :class:`~polyfan.errors.BridgeError` when the bridge refuses (an unknown channel: 404) or
    does not answer.
    """
    pandas = _pandas()
    parsed = parse_channel(channel)
    if parsed.symbol is None:
        raise ValueError(f"channel: {channel}: history is per symbol; * is not allowed")
    first, last = _milliseconds(start, "start"), _milliseconds(end, "end")
    if first >= last:
        raise ValueError(f"start: {first} is not before end {last}")
    rows = fetch_bars(
        url, parsed.name, first, last, token=token, page_size=page_size, timeout=timeout, ssl=ssl
    )
    return frame_of(rows, pandas)


def frame_of(rows: list[dict[str, Any]], pandas: Any = None) -> pd.DataFrame:
    """``MB`` dicts as :func:`history`'s DataFrame."""
    pandas = pandas or _pandas()

    def floats(key: str) -> np.ndarray:
        return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)

    def ints(key: str, default: int | None = None) -> np.ndarray:
        return np.array([r.get(key, default) for r in rows], dtype=np.int64)

    return pandas.DataFrame(
        {
            "sym": pandas.array([r["sym"] for r in rows], dtype="string"),
            "interval": ints("interval"),
            **{key: floats(key) for key in ("o", "h", "l", "c", "v", "vw")},
            "n": ints("n"),
            "s": ints("s"),
            "e": ints("e"),
            "outage": np.array([bool(r.get("outage", False)) for r in rows], dtype=bool),
            "r": ints("r", 0),
        },
        columns=list(COLUMNS),
    )


# --- trade_batches(): the proxy's ZeroMQ feed -------------------------------------------------

POLL_MS = 100  # a blocked iterator notices close() from another thread within this
DRAIN_LIMIT = 8192  # messages per compiled receive call (it is called again while full)
LOSS_LOG_EVERY = 5.0  # seconds between two WARNING lines about losses (each is counted)
CHECK_EVERY = 0.25  # seconds between two looks at the loss counts


def trade_batches(
    endpoint: str,
    symbols: str | Iterable[str],
    *,
    curve_secret: str | Path | None = None,
    curve_server: str | Path | None = None,
    rcvhwm: int = 1_000_000,
    coalesce_ms: float = 0.0,
) -> TradeBatches:
    """A blocking iterator over a proxy's trades for ``symbols``: ``(symbol, batch)`` items.

    ``endpoint``: the proxy's ``--pub`` (``tcp://HOST:8767``, ``ipc://PATH``). ``symbols``:
    ``["TSLA", "AAPL"]``, ``"TSLA,AAPL"`` or ``"*"`` for every symbol. ``batch`` is a NumPy
    structured array of ``polyfan.wire.codec.TRADE_DTYPE`` records (``t`` int64 SIP ms, ``p``
    float64, ``s`` float64 size, ``c``/``nc`` conditions, ``x``, ``q`` ...), one symbol's
    trades in arrival order; each wake-up drains every message waiting and yields one item per
    symbol in it. With CURVE (CONTRACT §8): ``curve_secret`` is this program's
    ``NAME.key_secret``, ``curve_server`` the proxy's public ``NAME.key``. ``coalesce_ms``:
    wake up at most once per that many milliseconds, so that each wake-up takes more
    messages (trades wait up to that long; a wake-up costs 40-50 µs of CPU on the benchmark
    machine, docs/client.md).
    """
    return TradeBatches(
        endpoint,
        symbols,
        curve_secret=curve_secret,
        curve_server=curve_server,
        rcvhwm=rcvhwm,
        coalesce_ms=coalesce_ms,
    )


def _symbol_list(symbols: str | Iterable[str]) -> list[str] | None:
    """The symbols asked for (None: every symbol), each checked against the alphabet."""
    texts = symbols.split(",") if isinstance(symbols, str) else list(symbols)
    chosen: list[str] = []
    for text in texts:
        text = text.strip()
        if text in ("*", ""):
            if text == "*":
                return None
            continue
        if SYMBOL_RE.fullmatch(text) is None:
            raise ValueError(
                f"symbols: {text!r} is not a symbol (1 to 32 of A-Z a-z 0-9 . : / _ -) nor *"
            )
        if text not in chosen:
            chosen.append(text)
    if not chosen:
        raise ValueError("symbols: give at least one, like ['TSLA'], or '*'")
    return chosen


class TradeBatches:
    """What :func:`trade_batches` returns: iterate it on one thread; ``close()`` from any.

    ``lost``: messages lost between the proxy and here (sequence gaps; a proxy restart is not
    a loss); ``trades``: trades handed on; ``wakeups``: waits that ended with messages (each
    drained all that were waiting); ``joined``: True once the subscriptions are known to be in
    effect at the proxy (its control topic has been heard; :meth:`wait_joined`).
    """

    def __init__(
        self,
        endpoint: str,
        symbols: str | Iterable[str],
        *,
        curve_secret: str | Path | None = None,
        curve_server: str | Path | None = None,
        rcvhwm: int = 1_000_000,
        coalesce_ms: float = 0.0,
    ) -> None:
        import zmq

        from polyfan import curve
        from polyfan.config import CurveConfig
        from polyfan.wire import codec, zmqio
        from polyfan.wire.ingest import FrameDecoder, TradeColumns

        chosen = _symbol_list(symbols)
        if not 0 <= coalesce_ms <= 1000:
            raise ValueError(f"coalesce_ms: {coalesce_ms} is not from 0 to 1000")
        if (curve_secret is None) != (curve_server is None):
            raise ValueError("curve_secret and curve_server: give both (CURVE) or neither")
        config = CurveConfig(
            None if curve_secret is None else Path(curve_secret),
            None,
            () if curve_server is None else (Path(curve_server),),
        )
        self.endpoint = endpoint
        self._shown = mask_url(endpoint)
        self.trades = 0
        self.wakeups = 0
        self.joined = False
        self._zmq = zmq
        self._ready: collections.deque[tuple[str, np.ndarray]] = collections.deque()
        self._lock = threading.Lock()
        self._busy = False
        self._closing = False
        self._closed = False
        self._next_check = 0.0
        self._coalesce = coalesce_ms / 1000
        self._woke = 0.0
        self._logged_at = -LOSS_LOG_EVERY
        self._logged_lost = 0
        self._logged_bad = 0
        self._dtype = codec.TRADE_DTYPE
        self._record_size = codec.TRADE_DTYPE.itemsize
        self._decoder: FrameDecoder = FrameDecoder(chosen)
        self._columns: TradeColumns = TradeColumns()
        self._names = self._decoder.symbol_names
        curve_client = curve.Client(config, "client", [endpoint])
        self._context: zmq.Context[Any] = zmq.Context()
        self._socket: zmq.Socket[Any] = self._context.socket(zmq.SUB)
        self._watch: HandshakeWatch | None = None
        try:
            self._socket.setsockopt(zmq.LINGER, 0)
            self._socket.setsockopt(zmq.RCVHWM, rcvhwm)
            self._socket.setsockopt(zmq.SNDHWM, 0)  # subscriptions beyond it would be dropped
            self._socket.setsockopt(zmq.RCVTIMEO, POLL_MS)  # how long one wait may block
            self._watch = curve_client.watch(self._socket)
            try:
                curve_client.connect(self._socket, 0, endpoint)
            except zmq.ZMQError as exc:
                raise ValueError(f"endpoint: cannot connect to {self._shown}: {exc}") from None
            topics = [codec.CONTROL_TOPIC]  # until heard: then the subscriptions are in effect
            topics += [b"T."] if chosen is None else [codec.trade_topic(s) for s in chosen]
            for topic in topics:
                self._socket.setsockopt(zmq.SUBSCRIBE, topic)
            self._receiver: AnyReceiver = self._make_receiver(zmqio)
        except BaseException:
            self._close_now()
            raise
        log.info(
            "trade_batches: subscribed to %s on %s",
            "every symbol" if chosen is None else ",".join(chosen),
            self._shown,
        )

    def _make_receiver(self, zmqio: Any) -> AnyReceiver:
        try:
            lib = zmqio.open_libzmq()
        except zmqio.LibzmqUnavailableError as exc:
            log.info("trade_batches: messages go through pyzmq (%s)", exc)
            receiver: AnyReceiver = zmqio.PyzmqReceiver(self._socket, DRAIN_LIMIT)
        else:
            receiver = zmqio.Receiver(self._socket, lib, DRAIN_LIMIT)
        receiver.warm_up()
        return receiver

    def __repr__(self) -> str:
        return f"TradeBatches({self._shown!r}, lost={self.lost}, trades={self.trades})"

    def __iter__(self) -> Iterator[tuple[str, np.ndarray]]:
        return self

    def __next__(self) -> tuple[str, np.ndarray]:
        ready = self._ready
        if ready and not self._closing:
            return ready.popleft()
        with self._lock:
            if self._closing:
                self._close_now()
                raise StopIteration
            self._busy = True
        try:
            while not ready:
                self._drain()  # waits up to POLL_MS for a first message, GIL released
                if self._closing:
                    raise StopIteration
            return ready.popleft()
        finally:
            with self._lock:
                self._busy = False
                if self._closing:
                    self._close_now()

    def wait_joined(self, timeout: float = 10.0) -> bool:
        """Receive (keeping what arrives for the iteration) until the proxy's control topic is
        heard, so that every trade published from then on reaches this iterator; False if it
        was not heard within ``timeout`` seconds (checked every 0.1 s)."""
        deadline = time.monotonic() + timeout
        while not self.joined and not self._closed and time.monotonic() < deadline:
            self._drain()
        return self.joined

    def _drain(self) -> None:
        """Wait for a message (at most POLL_MS), then take every message waiting, received
        and decoded in compiled calls, as one item per symbol."""
        decoder = self._decoder
        receive = self._receiver.receive
        if self._coalesce:
            early = self._woke + self._coalesce - time.monotonic()
            if early > 0:
                time.sleep(early)
        wait = True
        while True:
            buffer, offsets, count = receive(wait)
            if count == 0:
                break
            if wait:
                self.wakeups += 1
                if self._coalesce:
                    self._woke = time.monotonic()
            trades = decoder.decode_into(buffer, offsets, count, self._columns)
            if trades:
                self._take(trades, count)
            if count < DRAIN_LIMIT:
                break
            wait = False
        if not self.joined and decoder.control_session is not None:
            self.joined = True
            self._socket.setsockopt(self._zmq.UNSUBSCRIBE, b"_ctl\x00")
        if time.monotonic() >= self._next_check:
            self._check()

    def _take(self, count: int, messages: int) -> None:
        """The ``count`` trades decoded from ``messages`` messages, as items (copies: the
        columns are reused)."""
        self.trades += count
        columns = self._columns
        if messages == 1:  # one message: one topic, one symbol
            records = columns.records[: count * self._record_size].copy()
            batch = np.ndarray((count,), self._dtype, records)
            self._ready.append((self._names[columns.symbols[0]], batch))
            return
        names = self._names
        trades, ids, bounds = columns.grouped(count, len(names))
        append = self._ready.append
        for symbol, a, b in zip(ids, bounds, bounds[1:], strict=False):
            append((names[symbol], trades[a:b]))

    @property
    def lost(self) -> int:
        """Messages lost between the proxy and here, from sequence numbers (a new publisher
        session, a restarted proxy, is not a loss)."""
        return self._decoder.gaps

    def _check(self, final: bool = False) -> None:
        """Log losses and undecodable messages (at most one line each per LOSS_LOG_EVERY)."""
        now = time.monotonic()
        self._next_check = now + CHECK_EVERY
        lost, bad = self._decoder.gaps, self._decoder.bad_messages
        if not final and now - self._logged_at < LOSS_LOG_EVERY:
            return
        if lost > self._logged_lost:
            log.warning(
                "trade_batches: %d messages lost from %s (sequence numbers; %d in total)",
                lost - self._logged_lost,
                self._shown,
                lost,
            )
        if bad > self._logged_bad:
            log.warning(
                "trade_batches: %d undecodable messages from %s (%d in total)",
                bad - self._logged_bad,
                self._shown,
                bad,
            )
        if lost > self._logged_lost or bad > self._logged_bad:
            self._logged_at = now
        self._logged_lost, self._logged_bad = lost, bad

    def close(self) -> None:
        """End the iteration and close the socket (from any thread: a blocked ``next`` returns
        within 0.1 s)."""
        with self._lock:
            self._closing = True
            if self._busy:
                return
            self._close_now()

    def _close_now(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        self._check(final=True)
        receiver = getattr(self, "_receiver", None)
        if receiver is not None:
            receiver.close()
        self._socket.close(linger=0)
        if self._watch is not None:
            self._watch.close()
        self._context.term()

    def __enter__(self) -> TradeBatches:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
