"""polyfan.web.http without sockets: scripted bytes in, requests and response bytes out."""

from __future__ import annotations

import gzip

import pytest

from polyfan.config import parse_origin
from polyfan.errors import ConfigError
from polyfan.web.http import (
    Closed,
    HttpConnection,
    Malformed,
    Origins,
    Request,
    Response,
    accepts_gzip,
    etag_matches,
    finish,
)


def request(headers: dict[str, str], method: str = "GET") -> Request:
    return Request(method, "/", headers, "/")


def test_requests_split_anywhere_come_out_whole_and_in_order() -> None:
    conn = HttpConnection()
    data = b"GET /a?x=1 HTTP/1.1\r\nHost: h\r\n\r\nHEAD /b HTTP/1.1\r\nHost: h\r\n\r\n"
    for k in range(0, len(data), 7):
        conn.receive_data(data[k : k + 7])
    first = conn.next_event()
    assert isinstance(first, Request)
    assert (first.method, first.path, first.query, first.headers) == (
        "GET",
        "/a",
        {"x": ["1"]},
        {"host": "h"},
    )
    assert conn.send(Response(200, b"ok", "text/plain", [("Content-Length", "2")])).endswith(
        b"\r\n\r\nok"
    )
    second = conn.next_event()
    assert isinstance(second, Request) and second.method == "HEAD"
    sent = conn.send(Response(200, b"body", "text/plain", [("Content-Length", "4")]))
    assert sent.startswith(b"HTTP/1.1 200 OK\r\n") and sent.endswith(b"Content-Length: 4\r\n\r\n")
    assert conn.next_event() is None


def test_an_upgrade_is_handed_over_with_the_bytes_after_it() -> None:
    conn = HttpConnection()
    conn.receive_data(
        b"GET /s HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05"
    )
    event = conn.next_event()
    assert isinstance(event, Request) and event.is_upgrade
    assert conn.hand_over() == (
        b"GET /s HTTP/1.1\r\nHost: h\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05"
    )


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"garbage\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 20_000 + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\nHost: h\r\nX: " + b"a" * 20_000, 431),  # not even complete
    ],
)
def test_malformed_requests_are_400_and_oversized_heads_431(data: bytes, status: int) -> None:
    conn = HttpConnection()
    conn.receive_data(data)
    event = conn.next_event()
    assert isinstance(event, Malformed) and event.status == status


def test_a_body_is_dropped_and_the_next_request_follows() -> None:
    conn = HttpConnection()
    conn.receive_data(
        b"POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello"
        b"GET /next HTTP/1.1\r\nHost: h\r\n\r\n"
    )
    post = conn.next_event()
    assert isinstance(post, Request) and post.method == "POST"
    conn.send(Response(405, b"", "text/plain", [("Content-Length", "0")]))
    after = conn.next_event()
    assert isinstance(after, Request) and after.path == "/next"


def test_the_end_of_input_is_closed_and_http_1_0_must_close() -> None:
    conn = HttpConnection()
    conn.receive_data(b"GET / HTTP/1.0\r\n\r\n")
    conn.receive_data(b"")
    assert isinstance(conn.next_event(), Request)
    conn.send(Response(200, b"x", "text/plain", [("Content-Length", "1")]))
    assert conn.must_close()
    assert isinstance(HttpConnection().next_event(), type(None))
    ended = HttpConnection()
    ended.receive_data(b"")
    assert isinstance(ended.next_event(), Closed)


@pytest.mark.parametrize(
    ("header", "accepted"),
    [
        ("gzip", True),
        ("br, gzip;q=0.5", True),
        ("gzip;q=0", False),
        ("deflate", False),
        ("*", True),
        ("", False),
        ("gzip;q=x", False),
    ],
)
def test_accept_encoding(header: str, accepted: bool) -> None:
    assert accepts_gzip(header) is accepted


def test_etag_comparison_is_weak_and_takes_lists_and_star() -> None:
    assert etag_matches('"a", "b"', '"b"')
    assert etag_matches('W/"b"', '"b"')
    assert etag_matches("*", '"b"')
    assert not etag_matches('"a"', '"b"')


def test_finish_compresses_over_1_kib_when_accepted_and_answers_304_for_the_etag() -> None:
    body = b"x" * 2000
    accepted = request({"accept-encoding": "gzip"})
    out = finish(accepted, Response(200, body, "application/json", etag='"t"'))
    headers = dict(out.headers)
    assert headers["Content-Encoding"] == "gzip" and headers["ETag"] == '"t-gzip"'
    assert gzip.decompress(out.body) == body and headers["Content-Length"] == str(len(out.body))
    small = finish(accepted, Response(200, b"x" * 1024, "application/json"))
    assert "Content-Encoding" not in dict(small.headers)
    image = finish(accepted, Response(200, body, "image/png"))
    assert image.body == body
    cached = finish(request({"if-none-match": '"t"'}), Response(200, body, "text/css", etag='"t"'))
    assert cached.status == 304 and cached.body == b""
    empty = finish(request({}), Response(204, b"", "text/plain"))
    assert "Content-Length" not in dict(empty.headers)


def test_origins_own_listed_any_and_none() -> None:
    origins = Origins(("https://app.example",))
    host = {"host": "bridge:8768"}
    assert origins.allows(request(host))
    assert origins.allows(request({**host, "origin": "http://bridge:8768"}))
    assert origins.allows(request({**host, "origin": "https://APP.example:443"}))
    assert not origins.allows(request({**host, "origin": "https://evil.example"}))
    assert not origins.allows(request({**host, "origin": "null"}))
    assert not origins.is_foreign(request({**host, "origin": "http://bridge:8768"}))
    assert origins.is_foreign(request({**host, "origin": "https://app.example"}))
    assert Origins(("*",)).allows(request({**host, "origin": "https://evil.example"}))


def test_allow_origin_values_are_origins_or_star() -> None:
    assert parse_origin("https://app.example/") == "https://app.example"
    assert parse_origin("*") == "*"
    for bad in ("app.example", "ftp://x", "https://x/path", "https://"):
        with pytest.raises(ConfigError, match="--allow-origin"):
            parse_origin(bad)
