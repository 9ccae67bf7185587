"""HTTP/1.1 on the bridge's port, sans I/O: bytes in, requests out; responses in, bytes out.

Pure: no asyncio, websockets or sockets. :class:`HttpConnection` lets h11 parse and frame
(RFC 9112: pipelined requests one after another, ``HEAD`` without a body, keep-alive and
``Connection: close``, request bodies read and dropped) and says when a request asks for a
WebSocket upgrade, handing back the request's bytes for websockets to take over. What is
answered lives in :mod:`polyfan.web.routes`; :func:`finish` applies what every answer shares:
``Date``, gzip when the client accepts it and the body is over ``GZIP_OVER`` bytes, and
``ETag`` / ``If-None-Match`` (304). :class:`Origins` is CONTRACT §8's ``--allow-origin`` rule.
"""

from __future__ import annotations

import email.utils
import gzip
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs, unquote, urlsplit

import h11
import orjson

MAX_HEADER_BYTES = 16 * 1024  # request line and headers; past it: 431
MAX_DISCARDED_BODY = 1024 * 1024  # request bodies are dropped; past this the connection closes
GZIP_OVER = 1024  # bodies over this many bytes are compressed when the client accepts gzip
ALLOW = "GET, HEAD, OPTIONS"
_COMPRESSIBLE = ("text/", "application/json", "application/javascript", "image/svg+xml")


@dataclass(frozen=True, slots=True)
class Request:
    """One parsed request; header names lower-case, repeated headers joined with ``, ``."""

    method: str
    target: str
    headers: dict[str, str]
    path: str = ""
    query: dict[str, list[str]] = field(default_factory=dict)

    @property
    def is_upgrade(self) -> bool:
        """A WebSocket opening handshake (``Upgrade: websocket``)."""
        return "websocket" in self.headers.get("upgrade", "").lower()


@dataclass(frozen=True, slots=True)
class Malformed:
    """Not HTTP/1.1 as RFC 9112 has it: answer ``status`` (400 or 431) and close."""

    status: int
    reason: str


@dataclass(frozen=True, slots=True)
class Closed:
    """The client closed its side (or sent a body past ``MAX_DISCARDED_BODY``)."""


@dataclass(slots=True)
class Response:
    """An answer before :func:`finish`: status, headers (without Date/Content-Length), body."""

    status: int
    body: bytes = b""
    content_type: str = "application/json"
    headers: list[tuple[str, str]] = field(default_factory=list)
    etag: str | None = None  # a strong validator of the body (static files)


def json_response(status: int, value: object) -> Response:
    return Response(
        status, orjson.dumps(value), "application/json", [("Cache-Control", "no-store")]
    )


class HttpConnection:
    """One client connection's HTTP state: feed :meth:`receive_data`, take
    :meth:`next_event` until it returns None, answer each :class:`Request` with :meth:`send`
    before taking the next one (so pipelined requests are answered in order)."""

    def __init__(self) -> None:
        self._h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        self._method = b"GET"
        self._discarded = 0
        self._h11_request: h11.Request | None = None

    def receive_data(self, data: bytes) -> None:
        """Bytes from the client; ``b""`` when it closed its side."""
        self._h11.receive_data(data)

    @property
    def buffered(self) -> int:
        """Bytes received and not parsed yet (a client that pipelines without reading)."""
        return len(self._h11.trailing_data[0])

    def next_event(self) -> Request | Malformed | Closed | None:
        """The next request, a protocol error, the end, or None: more bytes are needed."""
        conn = self._h11
        while True:
            if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                conn.start_next_cycle()
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                status = exc.error_status_hint if exc.error_status_hint in (400, 431) else 400
                return Malformed(status, str(exc) or "malformed request")
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return None
            if isinstance(event, h11.Request):
                # h11 bounds only what it has not parsed yet: a long head in one read passes
                size = len(event.method) + len(event.target) + 12
                size += sum(len(name) + len(value) + 4 for name, value in event.headers.raw_items())
                if size > MAX_HEADER_BYTES:
                    return Malformed(
                        431, f"request head of {size} bytes; at most {MAX_HEADER_BYTES}"
                    )
                self._method = event.method
                self._discarded = 0
                self._h11_request = event
                return _request(event)
            if isinstance(event, h11.Data):
                self._discarded += len(event.data)
                if self._discarded > MAX_DISCARDED_BODY:
                    return Closed()
                continue
            if isinstance(event, h11.ConnectionClosed):
                return Closed()
            # EndOfMessage: the next cycle starts once the answer is sent

    def hand_over(self) -> bytes:
        """The upgrade request just returned, as bytes, with everything received after it:
        what websockets' connection is fed to take over the socket."""
        request = self._h11_request
        assert request is not None, "hand_over follows a Request"
        lines = [request.method + b" " + request.target + b" HTTP/1.1"]
        lines += [name + b": " + value for name, value in request.headers.raw_items()]
        return b"\r\n".join(lines) + b"\r\n\r\n" + self._h11.trailing_data[0]

    def send(self, response: Response) -> bytes:
        """The bytes of a finished response (:func:`finish`); no body for HEAD, 204 and 304."""
        conn = self._h11
        headers = [(name.encode(), value.encode()) for name, value in response.headers]
        reason = HTTPStatus(response.status).phrase.encode()
        event = h11.Response(status_code=response.status, headers=headers, reason=reason)
        out = conn.send(event) or b""
        if response.body and self._method != b"HEAD" and response.status not in (204, 304):
            out += conn.send(h11.Data(data=response.body)) or b""
        out += conn.send(h11.EndOfMessage()) or b""
        return out

    def must_close(self) -> bool:
        """After the last :meth:`send`: the connection is to be closed (HTTP/1.0, or
        ``Connection: close``)."""
        return self._h11.our_state is h11.MUST_CLOSE


def error_bytes(status: int, message: str) -> bytes:
    """A complete response for a request h11 could not parse (then the connection closes)."""
    body = orjson.dumps({"error": message})
    phrase = HTTPStatus(status).phrase
    head = (
        f"HTTP/1.1 {status} {phrase}\r\nDate: {email.utils.formatdate(usegmt=True)}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "Connection: close\r\n\r\n"
    )
    return head.encode() + body


def _request(event: h11.Request) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("latin-1")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    url = urlsplit(target)
    return Request(
        event.method.decode("latin-1"),
        target,
        headers,
        unquote(url.path),
        parse_qs(url.query, keep_blank_values=True),
    )


def accepts_gzip(accept_encoding: str) -> bool:
    """``Accept-Encoding`` lists gzip (or ``*``) with a non-zero q."""
    for item in accept_encoding.split(","):
        coding, _, params = item.strip().partition(";")
        if coding.strip().lower() not in ("gzip", "x-gzip", "*"):
            continue
        q = params.strip().lower()
        if q.startswith("q="):
            try:
                return float(q[2:]) > 0
            except ValueError:
                return False
        return True
    return False


def etag_matches(if_none_match: str, etag: str) -> bool:
    """RFC 9110's weak comparison of ``If-None-Match`` against ``etag``."""
    if if_none_match.strip() == "*":
        return True
    bare = etag.removeprefix("W/")
    return any(tag.strip().removeprefix("W/") == bare for tag in if_none_match.split(","))


def finish(request: Request, response: Response, *, gzipped: bytes | None = None) -> Response:
    """The response as sent: compressed when the client accepts gzip and the body is over
    ``GZIP_OVER`` (``gzipped``: the compressed body, if already known), 304 when
    ``If-None-Match`` names its ETag, with ``Date``, ``Content-Type`` and ``Content-Length``."""
    headers = [("Date", email.utils.formatdate(usegmt=True))]
    body = response.body
    etag = response.etag
    compressible = response.content_type.startswith(_COMPRESSIBLE)
    if compressible and len(body) > GZIP_OVER:
        headers.append(("Vary", "Accept-Encoding"))
        if accepts_gzip(request.headers.get("accept-encoding", "")):
            body = gzipped if gzipped is not None else gzip.compress(body, 6, mtime=0)
            headers.append(("Content-Encoding", "gzip"))
            if etag is not None:
                etag = etag[:-1] + '-gzip"'
    if etag is not None:
        headers.append(("ETag", etag))
        if etag_matches(request.headers.get("if-none-match", ""), etag):
            return Response(304, b"", response.content_type, headers + response.headers)
    if response.status != 204:  # RFC 9110: a 204 has neither
        headers.append(("Content-Type", response.content_type))
        headers.append(("Content-Length", str(len(body))))
    return Response(response.status, body, response.content_type, headers + response.headers, etag)


def _normal_origin(origin: str) -> str:
    text = origin.strip().lower().rstrip("/")
    for scheme, port in (("http://", ":80"), ("https://", ":443")):
        if text.startswith(scheme) and text.endswith(port):
            return text[: -len(port)]
    return text


class Origins:
    """``--allow-origin``: which ``Origin`` headers may use the bridge. The bridge's own
    origin (``http://`` + the request's ``Host``) always may, and so may a request without
    ``Origin`` (a program, not a page); ``*`` allows every origin."""

    def __init__(self, allowed: tuple[str, ...] = (), scheme: str = "http") -> None:
        self.any = "*" in allowed
        self.allowed = frozenset(_normal_origin(origin) for origin in allowed if origin != "*")
        self.scheme = scheme

    def allows(self, request: Request) -> bool:
        origin = request.headers.get("origin")
        if origin is None:
            return True
        normal = _normal_origin(origin)
        own = _normal_origin(f"{self.scheme}://{request.headers.get('host', '')}")
        return self.any or normal == own or normal in self.allowed

    def is_foreign(self, request: Request) -> bool:
        """It carries an allowed Origin other than the bridge's own: CORS headers apply."""
        origin = request.headers.get("origin")
        if origin is None or not self.allows(request):
            return False
        own = _normal_origin(f"{self.scheme}://{request.headers.get('host', '')}")
        return _normal_origin(origin) != own
