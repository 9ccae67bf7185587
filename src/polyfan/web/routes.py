"""What the bridge answers over HTTP: the route table, methods, CORS and static files.

:class:`Router` takes a parsed :class:`~polyfan.web.http.Request` and returns the finished
:class:`~polyfan.web.http.Response`, in this order: an ``Origin`` that
:class:`~polyfan.web.http.Origins` refuses gets 403; a method other than GET, HEAD and OPTIONS
gets 405 with ``Allow``; OPTIONS gets 204 with ``Allow`` (and, for a CORS preflight, the
``Access-Control-*`` answer); then the path: ``/`` and ``/static/...`` (files with ``ETag``
and ``Cache-Control: no-cache``, so a browser revalidates and gets 304), ``/api/openapi.json``
(the API described in OpenAPI 3.1, ``web/openapi.json``), and the handlers the bridge gives for
its live data. A handler's :class:`~polyfan.fanout.protocol.ParamError` is a 400 naming the
parameter. No websockets or sockets here; asyncio only to await the bridge's handlers and to
compress a large body on a thread (zlib lets go of the GIL), so the fan-out loop never waits
for it.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import hmac
import math
import mimetypes
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from polyfan.fanout.protocol import ParamError
from polyfan.web.admission import AuthThrottle
from polyfan.web.http import (
    ALLOW,
    GZIP_OVER,
    Origins,
    Request,
    Response,
    accepts_gzip,
    finish,
    json_response,
)

STATIC = Path(__file__).parent / "static"
OPENAPI = Path(__file__).parent / "openapi.json"
COMPRESS_ON_THREAD_OVER = 64 * 1024  # bodies over this are gzipped off the event loop
PREFLIGHT_MAX_AGE = 600  # seconds a browser may keep a preflight's answer
HTML = "text/html; charset=utf-8"

PLACEHOLDER = b"""<!doctype html><meta charset="utf-8"><title>polyfan</title>
<h1>polyfan bridge</h1><p>The chart page assets are not built. The bridge serves the
WebSocket protocol on any path and the HTTP API: <a href="/api/info">/api/info</a>,
<a href="/api/symbols">/api/symbols</a>, <a href="/healthz">/healthz</a>,
<a href="/metrics">/metrics</a>, <a href="/api/openapi.json">/api/openapi.json</a>.</p>
"""

CONTENT_TYPES = {
    ".html": HTML,
    ".js": "text/javascript; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".json": "application/json",
    ".map": "application/json",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".woff2": "font/woff2",
    ".txt": "text/plain; charset=utf-8",
}

Handler = Callable[[dict[str, list[str]]], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _File:
    stamp: tuple[int, int]  # (mtime_ns, size) when read
    body: bytes
    gzipped: bytes | None
    etag: str
    content_type: str


class StaticFiles:
    """Files under one directory (``STATIC`` when None, looked up on each request), read once
    per change, with their ETag and gzip body."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._files: dict[Path, _File] = {}

    def get(self, relative: str) -> _File | None:
        """The file at ``relative``, never anything outside the root; None if missing."""
        try:
            root = (self.root or STATIC).resolve()
            path = (root / relative).resolve()
            if not path.is_relative_to(root) or not path.is_file():
                return None
            stat = path.stat()
        except (OSError, ValueError):
            return None
        stamp = (stat.st_mtime_ns, stat.st_size)
        cached = self._files.get(path)
        if cached is not None and cached.stamp == stamp:
            return cached
        try:
            body = path.read_bytes()
        except OSError:
            return None
        content_type = CONTENT_TYPES.get(path.suffix) or (
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        )
        file = _File(
            stamp,
            body,
            gzip.compress(body, 9, mtime=0) if len(body) > GZIP_OVER else None,
            f'"{hashlib.blake2b(body, digest_size=12).hexdigest()}"',
            content_type,
        )
        self._files[path] = file
        return file


class Router:
    """The bridge's HTTP answers; ``handlers`` maps a path to the bridge's live-data handler."""

    def __init__(
        self,
        handlers: Mapping[str, Handler],
        origins: Origins,
        *,
        on_bad_request: Callable[[], None] = lambda: None,
        static: Path | None = None,
        tokens: Sequence[str] = (),
        on_unauthorized: Callable[[], None] = lambda: None,
        throttle: AuthThrottle | None = None,
        on_throttled: Callable[[], None] = lambda: None,
    ) -> None:
        self.handlers = dict(handlers)
        self.tokens = tuple(token.encode() for token in tokens)
        self.on_unauthorized = on_unauthorized
        self.throttle = throttle if throttle is not None else AuthThrottle(0, 1.0)
        self.on_throttled = on_throttled
        self.origins = origins
        self.on_bad_request = on_bad_request
        self.static = StaticFiles(static)
        self.openapi = OPENAPI.read_bytes()

    async def answer(self, request: Request, address: str = "") -> Response:
        """The finished response to ``request`` from client ``address`` (see the module
        docstring for the order)."""
        if not self.origins.allows(request):
            self.on_bad_request()
            origin = request.headers.get("origin", "")
            return self._finish(
                request,
                json_response(403, {"error": f"{origin}: origin not allowed; see --allow-origin"}),
            )
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            self.on_bad_request()
            response = json_response(405, {"error": f"{request.method}: method not allowed"})
            response.headers.append(("Allow", ALLOW))
            return self._finish(request, response)
        if request.method == "OPTIONS":
            return self._finish(request, self._options(request))
        gzipped = None
        try:
            response, gzipped = await self._get(request, address)
        except ParamError as exc:
            self.on_bad_request()
            response = json_response(400, {"error": str(exc)})
        if (
            gzipped is None
            and len(response.body) > COMPRESS_ON_THREAD_OVER
            and accepts_gzip(request.headers.get("accept-encoding", ""))
        ):
            gzipped = await asyncio.to_thread(gzip.compress, response.body, 6, mtime=0)
        return self._finish(request, response, gzipped)

    def _finish(
        self, request: Request, response: Response, gzipped: bytes | None = None
    ) -> Response:
        if self.origins.is_foreign(request):
            response.headers.append(("Access-Control-Allow-Origin", request.headers["origin"]))
            response.headers.append(("Vary", "Origin"))
        return finish(request, response, gzipped=gzipped)

    def _options(self, request: Request) -> Response:
        response = Response(204, b"", "text/plain", [("Allow", ALLOW)])
        if "access-control-request-method" in request.headers and "origin" in request.headers:
            response.headers += [
                ("Access-Control-Allow-Methods", ALLOW),
                ("Access-Control-Allow-Headers", "Authorization"),
                ("Access-Control-Max-Age", str(PREFLIGHT_MAX_AGE)),
            ]
        return response

    async def _get(self, request: Request, address: str) -> tuple[Response, bytes | None]:
        path = request.path
        if path in ("/", "/index.html"):
            file = self.static.get("index.html")
            if file is None:
                return Response(200, PLACEHOLDER, HTML, [("Cache-Control", "no-cache")]), None
            return _file_response(file), file.gzipped
        if path.startswith("/static/"):
            file = self.static.get(path[len("/static/") :])
            if file is None:
                return json_response(404, {"error": f"{path}: not found"}), None
            return _file_response(file), file.gzipped
        if self.tokens and path != "/healthz":
            refused = self._refused(request, address)
            if refused is not None:
                return refused, None
        if path == "/api/openapi.json":
            return Response(
                200, self.openapi, "application/json", [("Cache-Control", "no-cache")]
            ), None
        handler = self.handlers.get(path)
        if handler is None:
            return json_response(404, {"error": f"{path}: not found"}), None
        # ``token`` authenticates (above); it is no parameter of any handler
        query = {name: values for name, values in request.query.items() if name != "token"}
        return await handler(query), None

    def _refused(self, request: Request, address: str) -> Response | None:
        """None when ``request`` carries a right token; else 401, or 429 unchecked while
        ``address`` has failed too often (CONTRACT §8)."""
        now = time.monotonic()
        retry_in = self.throttle.retry_in(address, now)
        if retry_in:
            self.on_throttled()
            seconds = math.ceil(retry_in)
            response = json_response(
                429,
                {"error": f"too many failed token checks from this address; retry in {seconds} s"},
            )
            response.headers.append(("Retry-After", str(seconds)))
            return response
        offered = self._offered(request)
        if self._authorized(offered):
            return None
        self.on_unauthorized()
        if offered:  # a wrong token; asking without one guesses nothing
            self.throttle.failed(address, now)
        response = json_response(
            401,
            {"error": f"{request.path}: needs a token (Authorization: Bearer TOKEN, or ?token=)"},
        )
        response.headers.append(("WWW-Authenticate", 'Bearer realm="polyfan"'))
        return response

    @staticmethod
    def _offered(request: Request) -> list[str]:
        """The tokens a request offers: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``
        (CONTRACT §8)."""
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        offered = [given.strip()] if scheme.lower() == "bearer" else []
        return offered + request.query.get("token", [])

    def _authorized(self, offered: list[str]) -> bool:
        """One of ``offered`` is an accepted token, compared in constant time with each."""
        return any(
            hmac.compare_digest(candidate.encode(), token)
            for candidate in offered
            for token in self.tokens
        )


def _file_response(file: _File) -> Response:
    return Response(200, file.body, file.content_type, [("Cache-Control", "no-cache")], file.etag)
