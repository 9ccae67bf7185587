"""The bridge's HTTP (CONTRACT §9) against a running bridge, over raw sockets.

Each test writes exact bytes with asyncio streams and reads the answers as a client would:
status line, headers, and a body of ``Content-Length`` bytes (none for HEAD, 204 and 304).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from openapi_spec_validator import validate
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from fake_agg import FakeAgg, bar_rows, expected_event
from polyfan.bridge import Bridge
from polyfan.config import BridgeConfig
from polyfan.web import routes
from wsclient import eventually

T0 = 1_781_622_376_000 // 1000 * 1000
APP = "https://app.example"
TIMEOUT = 5.0


@dataclass
class Reply:
    status_line: str
    headers: dict[str, str]  # lower-case names
    body: bytes

    @property
    def status(self) -> int:
        return int(self.status_line.split()[1])


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


@pytest.fixture
async def bridge(agg: FakeAgg) -> AsyncIterator[Bridge]:
    bridge = Bridge(
        BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0), allow_origins=(APP,))
    )
    await bridge.start()
    await eventually(lambda: bridge.catalog.intervals, what="the agg's announce")
    yield bridge
    await bridge.stop()


class Conn:
    """One raw TCP connection to the bridge."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, bridge: Bridge) -> Conn:
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        return cls(reader, writer)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def reply(self, *, head: bool = False) -> Reply:
        async with asyncio.timeout(TIMEOUT):
            raw = await self.reader.readuntil(b"\r\n\r\n")
            lines = raw.decode("latin-1").split("\r\n")
            headers: dict[str, str] = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            status = int(lines[0].split()[1])
            length = 0 if head or status in (204, 304) else int(headers["content-length"])
            body = await self.reader.readexactly(length)
        return Reply(lines[0], headers, body)

    async def at_eof(self) -> bool:
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read() == b""

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def request(method: str, path: str, *headers: str, body: bytes = b"") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: bridge.test", *headers]
    if body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def ask(bridge: Bridge, data: bytes, *, head: bool = False) -> Reply:
    conn = await Conn.open(bridge)
    try:
        await conn.send(data)
        return await conn.reply(head=head)
    finally:
        await conn.close()


def counter(bridge: Bridge, name: str) -> float:
    return bridge.registry.values()[name]


async def test_pipelined_requests_in_one_write_are_answered_in_order(
    bridge: Bridge, agg: FakeAgg
) -> None:
    rows = bar_rows(1000, T0, 5)
    agg.publish(1000, "MSFT", rows)
    agg.flush()
    conn = await Conn.open(bridge)
    await conn.send(
        request("GET", "/api/bars?channel=1000Ms.MSFT")  # waits for the agg's reply
        + request("GET", "/healthz")
        + request("GET", "/nope")
    )
    first, second, third = [await conn.reply() for _ in range(3)]
    assert first.status_line == "HTTP/1.1 200 OK"
    assert orjson.loads(first.body) == [expected_event("MSFT", 1000, r) for r in rows]
    assert second.status_line == "HTTP/1.1 200 OK"
    assert orjson.loads(second.body)["status"] == "ok"
    assert third.status_line == "HTTP/1.1 404 Not Found"
    assert orjson.loads(third.body) == {"error": "/nope: not found"}
    # the connection is kept for a fourth
    await conn.send(request("GET", "/healthz"))
    assert (await conn.reply()).status == 200
    await conn.close()


async def test_head_answers_gets_headers_without_a_body(bridge: Bridge) -> None:
    conn = await Conn.open(bridge)
    await conn.send(request("GET", "/api/openapi.json"))
    get = await conn.reply()
    # a HEAD, then a GET in the same write: the GET's status line follows HEAD's headers
    await conn.send(request("HEAD", "/api/openapi.json") + request("GET", "/healthz"))
    head = await conn.reply(head=True)
    after = await conn.reply()
    assert head.status_line == "HTTP/1.1 200 OK"
    assert head.body == b""
    assert int(head.headers["content-length"]) == len(get.body)
    assert head.headers["content-type"] == get.headers["content-type"] == "application/json"
    assert after.status_line == "HTTP/1.1 200 OK"
    assert orjson.loads(after.body)["status"] == "ok"
    await conn.close()


async def test_head_of_a_compressed_answer_gives_the_compressed_length(
    bridge: Bridge, agg: FakeAgg
) -> None:
    agg.publish(1000, "MSFT", bar_rows(1000, T0, 100))
    agg.flush()
    gzip_ok = "Accept-Encoding: gzip, deflate"
    get = await ask(bridge, request("GET", "/api/bars?channel=1000Ms.MSFT", gzip_ok))
    head = await ask(bridge, request("HEAD", "/api/bars?channel=1000Ms.MSFT", gzip_ok), head=True)
    assert get.headers["content-encoding"] == head.headers["content-encoding"] == "gzip"
    assert int(head.headers["content-length"]) == len(get.body)


async def test_other_methods_get_405_with_allow_and_their_body_is_read_past(
    bridge: Bridge,
) -> None:
    conn = await Conn.open(bridge)
    await conn.send(
        request("POST", "/api/info", "Content-Type: text/plain", body=b"x" * 5000)
        + request("DELETE", "/")
        + request("GET", "/healthz")
    )
    post, delete, get = [await conn.reply() for _ in range(3)]
    for reply, method in ((post, "POST"), (delete, "DELETE")):
        assert reply.status_line == "HTTP/1.1 405 Method Not Allowed"
        assert reply.headers["allow"] == "GET, HEAD, OPTIONS"
        assert orjson.loads(reply.body) == {"error": f"{method}: method not allowed"}
    assert get.status == 200
    await conn.close()


async def test_options_answers_allow(bridge: Bridge) -> None:
    reply = await ask(bridge, request("OPTIONS", "/api/bars"))
    assert reply.status_line == "HTTP/1.1 204 No Content"
    assert reply.headers["allow"] == "GET, HEAD, OPTIONS"
    assert "access-control-allow-origin" not in reply.headers


async def test_cors_preflight_from_a_listed_origin_is_answered(bridge: Bridge) -> None:
    reply = await ask(
        bridge,
        request(
            "OPTIONS",
            "/api/bars?channel=500Ms.TSLA",
            f"Origin: {APP}",
            "Access-Control-Request-Method: GET",
            "Access-Control-Request-Headers: authorization",
        ),
    )
    assert reply.status_line == "HTTP/1.1 204 No Content"
    assert reply.headers["access-control-allow-origin"] == APP
    assert reply.headers["access-control-allow-methods"] == "GET, HEAD, OPTIONS"
    assert reply.headers["access-control-allow-headers"] == "Authorization"
    assert reply.headers["access-control-max-age"] == "600"
    assert reply.headers["vary"] == "Origin"


async def test_an_unlisted_origin_gets_403_for_preflights_and_requests(bridge: Bridge) -> None:
    bad_before = counter(bridge, "polyfan_bridge_bad_requests_total")
    for data in (
        request(
            "OPTIONS",
            "/api/info",
            "Origin: https://evil.example",
            "Access-Control-Request-Method: GET",
        ),
        request("GET", "/api/info", "Origin: https://evil.example"),
    ):
        reply = await ask(bridge, data)
        assert reply.status_line == "HTTP/1.1 403 Forbidden"
        assert orjson.loads(reply.body) == {
            "error": "https://evil.example: origin not allowed; see --allow-origin"
        }
        assert "access-control-allow-origin" not in reply.headers
    assert counter(bridge, "polyfan_bridge_bad_requests_total") == bad_before + 2


async def test_own_and_listed_origins_and_programs_are_served(bridge: Bridge) -> None:
    listed = await ask(bridge, request("GET", "/healthz", f"Origin: {APP}"))
    assert listed.status == 200 and listed.headers["access-control-allow-origin"] == APP
    own = await ask(bridge, request("GET", "/healthz", "Origin: http://bridge.test"))
    assert own.status == 200 and "access-control-allow-origin" not in own.headers
    program = await ask(bridge, request("GET", "/healthz"))
    assert program.status == 200 and "access-control-allow-origin" not in program.headers


def handshake(origin: str | None) -> bytes:
    headers = [
        "Upgrade: websocket",
        "Connection: Upgrade",
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        "Sec-WebSocket-Version: 13",
    ]
    if origin is not None:
        headers.append(f"Origin: {origin}")
    return request("GET", "/stocks", *headers)


async def test_a_websocket_handshake_from_a_foreign_origin_gets_403(bridge: Bridge) -> None:
    reply = await ask(bridge, handshake("https://evil.example"))
    assert reply.status_line == "HTTP/1.1 403 Forbidden"
    assert bridge.clients == {}


@pytest.mark.parametrize("origin", [APP, "http://bridge.test", None])
async def test_a_websocket_handshake_from_an_allowed_origin_or_a_program_upgrades(
    bridge: Bridge, origin: str | None
) -> None:
    conn = await Conn.open(bridge)
    # a plain GET pipelined before the upgrade is answered first, on the same connection
    await conn.send(request("GET", "/healthz") + handshake(origin))
    assert (await conn.reply()).status == 200
    switched = await conn.reply(head=True)
    assert switched.status_line == "HTTP/1.1 101 Switching Protocols"
    assert switched.headers["sec-websocket-accept"] == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    async with asyncio.timeout(TIMEOUT):
        frame = await conn.reader.readexactly(2)
        payload = await conn.reader.readexactly(frame[1] & 0x7F)
    assert orjson.loads(payload)[0]["status"] == "connected"
    await eventually(lambda: len(bridge.clients) == 1, what="the client")
    await conn.close()


async def test_a_garbage_request_gets_400_without_a_traceback_and_others_are_served(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    other = await Conn.open(bridge)
    bad_before = counter(bridge, "polyfan_bridge_bad_requests_total")
    caplog.set_level(logging.DEBUG, logger="polyfan")
    conn = await Conn.open(bridge)
    await conn.send(b"\x16\x03\x01 garbage here\r\n\r\n")
    reply = await conn.reply()
    assert reply.status_line == "HTTP/1.1 400 Bad Request"
    assert reply.headers["connection"] == "close"
    assert "error" in orjson.loads(reply.body)
    assert await conn.at_eof()
    await conn.close()
    await other.send(request("GET", "/healthz"))
    assert (await other.reply()).status == 200
    await other.close()
    assert counter(bridge, "polyfan_bridge_bad_requests_total") == bad_before + 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in caplog.records if r.getMessage().startswith("HTTP from")]


async def test_a_client_that_closes_mid_request_is_counted_without_a_traceback(
    bridge: Bridge, caplog: pytest.LogCaptureFixture
) -> None:
    """Half a request, then the client's FIN: a malformed request, answered into a closed
    socket (write_eof raised ENOTCONN and logged an ERROR with a traceback per connection)."""
    caplog.set_level(logging.DEBUG, logger="polyfan")
    bad_before = counter(bridge, "polyfan_bridge_bad_requests_total")
    for _ in range(3):
        conn = await Conn.open(bridge)
        await conn.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        await conn.close()
    deadline = asyncio.get_running_loop().time() + 5
    while counter(bridge, "polyfan_bridge_bad_requests_total") < bad_before + 3:
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.01)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    assert (await ask(bridge, request("GET", "/healthz"))).status == 200


async def test_oversized_headers_get_431(bridge: Bridge) -> None:
    conn = await Conn.open(bridge)
    await conn.send(request("GET", "/healthz", "X-Big: " + "a" * 64 * 1024))
    reply = await conn.reply()
    assert reply.status_line == "HTTP/1.1 431 Request Header Fields Too Large"
    assert await conn.at_eof()
    await conn.close()
    assert (await ask(bridge, request("GET", "/healthz"))).status == 200


async def test_gzip_when_accepted_and_the_body_is_over_1_kib(bridge: Bridge, agg: FakeAgg) -> None:
    rows = bar_rows(1000, T0, 200)
    agg.publish(1000, "MSFT", rows)
    agg.flush()
    path = "/api/bars?channel=1000Ms.MSFT&limit=200"
    plain = await ask(bridge, request("GET", path))
    assert "content-encoding" not in plain.headers
    assert orjson.loads(plain.body) == [expected_event("MSFT", 1000, r) for r in rows]
    zipped = await ask(bridge, request("GET", path, "Accept-Encoding: br;q=1, gzip;q=0.5"))
    assert zipped.headers["content-encoding"] == "gzip"
    assert zipped.headers["vary"] == "Accept-Encoding"
    assert len(zipped.body) < len(plain.body) // 3
    assert gzip.decompress(zipped.body) == plain.body
    refused = await ask(bridge, request("GET", path, "Accept-Encoding: gzip;q=0"))
    assert "content-encoding" not in refused.headers and refused.body == plain.body
    small = await ask(bridge, request("GET", "/healthz", "Accept-Encoding: gzip"))
    assert len(small.body) <= 1024 and "content-encoding" not in small.headers
    assert orjson.loads(small.body)["status"] == "ok"


async def test_static_files_carry_etag_and_cache_control_and_revalidate_with_304(
    bridge: Bridge, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    text = b"body { color: red; }\n" * 100
    (tmp_path / "site.css").write_bytes(text)
    (tmp_path / "index.html").write_bytes(b"<!doctype html><title>t</title>")
    monkeypatch.setattr(routes, "STATIC", tmp_path)
    etag = f'"{hashlib.blake2b(text, digest_size=12).hexdigest()}"'
    got = await ask(bridge, request("GET", "/static/site.css"))
    assert got.status_line == "HTTP/1.1 200 OK"
    assert got.headers["etag"] == etag
    assert got.headers["cache-control"] == "no-cache"
    assert got.headers["content-type"] == "text/css; charset=utf-8"
    assert got.body == text
    again = await ask(bridge, request("GET", "/static/site.css", f"If-None-Match: {etag}"))
    assert again.status_line == "HTTP/1.1 304 Not Modified"
    assert again.headers["etag"] == etag and again.body == b""
    zipped = await ask(bridge, request("GET", "/static/site.css", "Accept-Encoding: gzip"))
    assert zipped.headers["etag"] == etag[:-1] + '-gzip"'
    assert gzip.decompress(zipped.body) == text
    index = await ask(bridge, request("GET", "/"))
    assert index.headers["cache-control"] == "no-cache" and "etag" in index.headers
    (tmp_path / "site.css").write_bytes(b"changed")
    changed = await ask(bridge, request("GET", "/static/site.css", f"If-None-Match: {etag}"))
    assert changed.status == 200 and changed.body == b"changed"


async def test_api_bars_from_and_to_select_bars_from_inclusive_to_exclusive(
    bridge: Bridge, agg: FakeAgg
) -> None:
    rows = bar_rows(500, T0, 40)
    agg.publish(500, "TSLA", rows)
    agg.flush()
    s = [int(x) for x in rows["s"]]
    reply = await ask(
        bridge, request("GET", f"/api/bars?channel=500Ms.TSLA&from={s[10]}&to={s[20]}")
    )
    assert reply.status == 200
    assert orjson.loads(reply.body) == [expected_event("TSLA", 500, r) for r in rows[10:20]]
    reply = await ask(bridge, request("GET", f"/api/bars?channel=500Ms.TSLA&from={s[35]}"))
    assert orjson.loads(reply.body) == [expected_event("TSLA", 500, r) for r in rows[35:]]
    reply = await ask(
        bridge, request("GET", f"/api/bars?channel=500Ms.TSLA&from={s[5]}&to={s[30]}&limit=3")
    )
    assert orjson.loads(reply.body) == [expected_event("TSLA", 500, r) for r in rows[27:30]]


async def test_api_bars_limit_over_the_maximum_gets_400_naming_it(bridge: Bridge) -> None:
    reply = await ask(bridge, request("GET", "/api/bars?channel=500Ms.TSLA&limit=10001"))
    assert reply.status_line == "HTTP/1.1 400 Bad Request"
    assert orjson.loads(reply.body) == {"error": "limit: '10001' is not an integer from 1 to 10000"}


async def test_openapi_document_is_valid_openapi_3_1_and_describes_the_api(
    bridge: Bridge,
) -> None:
    reply = await ask(bridge, request("GET", "/api/openapi.json"))
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    spec: dict[str, Any] = orjson.loads(reply.body)
    validate(spec)
    assert spec["openapi"] == "3.1.0"
    served = {"/api/bars", "/api/symbols", "/api/info", "/healthz", "/metrics", "/"}
    assert served <= set(spec["paths"])
    params = {p["name"] for p in spec["paths"]["/api/bars"]["get"]["parameters"]}
    assert params == {"channel", "limit", "from", "to", "before"}
    limit = next(p for p in spec["paths"]["/api/bars"]["get"]["parameters"] if p["name"] == "limit")
    assert limit["schema"]["maximum"] == bridge.limits.api_max_limit


async def test_with_tokens_every_path_but_the_page_static_files_and_healthz_needs_one(
    agg: FakeAgg,
) -> None:
    """CONTRACT §8: ``Authorization: Bearer TOKEN`` or ``?token=TOKEN``; 401 otherwise."""
    bridge = Bridge(
        BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0), tokens=("tok-1", "tok-2"))
    )
    await bridge.start()
    try:
        await eventually(lambda: bridge.catalog.intervals, what="the agg's announce")
        for path in ("/", "/static/app.js", "/healthz"):
            assert (await ask(bridge, request("GET", path))).status == 200, path
        guarded = ("/api/bars?channel=100Ms.AAPL", "/api/symbols", "/api/info", "/metrics",
                   "/api/openapi.json")  # fmt: skip
        for path in guarded:
            refused = await ask(bridge, request("GET", path))
            assert refused.status == 401, path
            assert refused.headers["www-authenticate"].startswith("Bearer")
            wrong = await ask(bridge, request("GET", path, "Authorization: Bearer tok-3"))
            assert wrong.status == 401, path
            bearer = await ask(bridge, request("GET", path, "Authorization: Bearer tok-2"))
            assert bearer.status == 200, path
            joiner = "&" if "?" in path else "?"
            assert (await ask(bridge, request("GET", f"{path}{joiner}token=tok-1"))).status == 200
        assert counter(bridge, "polyfan_bridge_http_unauthorized_total") == 2 * len(guarded)
        metrics = await ask(bridge, request("GET", "/metrics", "Authorization: Bearer tok-1"))
        assert b"tok-1" not in metrics.body and b"tok-2" not in metrics.body
    finally:
        await bridge.stop()


async def test_failed_token_checks_from_an_address_are_throttled_and_others_still_get_in(
    agg: FakeAgg,
) -> None:
    """CONTRACT §8: past its allowance of failed checks (3 here), an address's WebSocket auth
    is refused unchecked, the right token too (1008), and its HTTP requests get 429 with
    Retry-After; another address is not affected. Asking HTTP without a token guesses
    nothing and is not counted against the address."""
    bridge = Bridge(
        BridgeConfig(
            sub=(agg.endpoint,), listen=("127.0.0.1", 0), tokens=("tok-1",), auth_failures=3
        )
    )
    await bridge.start()
    url = f"ws://127.0.0.1:{bridge.port}/"

    async def auth(token: str, source: str = "127.0.0.1") -> tuple[dict[str, Any], int | None]:
        async with connect(url, local_addr=(source, 0)) as ws:
            assert orjson.loads(await ws.recv())[0]["status"] == "connected"
            await ws.send(orjson.dumps({"action": "auth", "params": token}).decode())
            answer = orjson.loads(await asyncio.wait_for(ws.recv(), TIMEOUT))[0]
            if answer["status"] == "auth_failed":  # the close follows
                with contextlib.suppress(ConnectionClosed):
                    await asyncio.wait_for(ws.recv(), TIMEOUT)
            return answer, ws.close_code

    try:
        assert (await ask(bridge, request("GET", "/api/info"))).status == 401  # no token: free
        for guess in ("tok-2", "tok-3"):
            answer, code = await auth(guess)
            assert (answer["message"], code) == ("authentication failed", 1008)
        wrong = await ask(bridge, request("GET", "/api/info?token=tok-4"))  # the third failure
        assert wrong.status == 401
        answer, code = await auth("tok-1")  # right, but no longer checked
        assert answer["status"] == "auth_failed" and code == 1008
        assert answer["message"].startswith("too many failed auth attempts from this address")
        throttled = await ask(bridge, request("GET", "/api/info?token=tok-1"))
        assert throttled.status == 429
        assert 1 <= int(throttled.headers["retry-after"]) <= 6
        answer, _ = await auth("tok-1", source="127.0.0.2")
        assert answer["status"] == "auth_success"
        assert counter(bridge, "polyfan_bridge_auth_failures_total") == 4  # 2 ws, 2 http
        assert counter(bridge, "polyfan_bridge_auth_throttled_total") == 2
    finally:
        await bridge.stop()
