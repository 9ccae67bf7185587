"""URL credentials never reach a log line, an error message or a repr."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from polyfan.config import AggConfig, BridgeConfig, ProxyConfig, TapConfig
from polyfan.redact import MaskingFormatter, mask_url, mask_urls_in


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        # userinfo with a password: the user stays, the password goes
        (
            "wss://user:secretpass@socket.massive.com/stocks",
            "wss://user:****@socket.massive.com/stocks",
        ),
        # userinfo with no password is usually a key itself: all of it goes
        ("wss://SECRETKEY@socket.massive.com/stocks", "wss://****@socket.massive.com/stocks"),
        ("ws://user:@h:1/x", "ws://user:****@h:1/x"),
        # an '@' inside the password
        ("ws://u:p@ss@h/x", "ws://u:****@h/x"),
        # query keys, case-insensitive, several in one URL, other parameters kept
        ("ws://h/stocks?apiKey=SECRETKEY", "ws://h/stocks?apiKey=****"),
        (
            "ws://h/s?APIKEY=a&x=1&api_key=b&Token=c",
            "ws://h/s?APIKEY=****&x=1&api_key=****&Token=****",
        ),
        (
            "ws://h/s?apikey=a;api-key=b&access_token=c",
            "ws://h/s?apikey=****;api-key=****&access_token=****",
        ),
        ("ws://h/s?api%5Fkey=a", "ws://h/s?api%5Fkey=****"),
        ("ws://h/s?monkey=banana&keys=1", "ws://h/s?monkey=banana&keys=1"),
        # fragments
        ("http://h:8768/#token=SECRET", "http://h:8768/#token=****"),
        ("ws://h/s?x=1#frag", "ws://h/s?x=1#frag"),
        # IPv6 hosts keep their brackets and port
        ("ws://user:pw@[::1]:8766/stocks?apiKey=K", "ws://user:****@[::1]:8766/stocks?apiKey=****"),
        ("ws://[2001:db8::1]:443/x", "ws://[2001:db8::1]:443/x"),
        # nothing to hide: unchanged
        ("wss://socket.massive.com/stocks", "wss://socket.massive.com/stocks"),
        ("tcp://127.0.0.1:8767", "tcp://127.0.0.1:8767"),
        ("ipc:///tmp/polyfan/trades", "ipc:///tmp/polyfan/trades"),
        # no scheme
        ("user:pw@host:80/x", "user:****@host:80/x"),
        # a '/' the user did not encode in the password: masked rather than shown
        ("ws://u:pa/ss@h/x", "ws://u:****@h/x"),
    ],
)
def test_mask_url_hides_credentials_and_keeps_the_rest(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    "url",
    ["", "ws://[::1", "ws://[", "://", "%%%", "ws://u:p@", "@", "ws://h/?=&=#", "\x00\udcff"],
)
def test_mask_url_never_raises_on_invalid_urls(url: str) -> None:
    assert isinstance(mask_url(url), str)
    assert isinstance(mask_urls_in(url), str)


@settings(max_examples=300, deadline=None)
@given(
    user=st.text("abcXYZ019_-.", min_size=1, max_size=8),
    password=st.text("abcXYZ019_-.~!$'()*+,;=", min_size=6, max_size=16).map(lambda s: "Q" + s),
    key=st.text("ABCDEFGHJKLMNPQRSTUVWXYZ0123456789", min_size=8, max_size=32),
    name=st.sampled_from(["apiKey", "APIKEY", "apikey", "api_key", "token", "TOKEN"]),
    host=st.sampled_from(["127.0.0.1:8766", "[::1]:8766", "socket.massive.com", "h"]),
    extra=st.text("abc=&;", max_size=6),
)
def test_no_generated_credential_survives_masking(
    user: str, password: str, key: str, name: str, host: str, extra: str
) -> None:
    url = f"wss://{user}:{password}@{host}/stocks?{extra}&{name}={key}#x"
    masked = mask_url(url)
    assert password not in masked
    assert f"={key}" not in masked
    assert host in masked
    assert password not in mask_urls_in(f"error: cannot open {url!r} (refused)")


def test_urls_inside_text_and_request_lines_are_masked() -> None:
    text = (
        "InvalidURI: ws://u:hunter2@h:1/x?apiKey=K1 isn't a valid URI; "
        "> GET /stocks?apiKey=K2&x=1 HTTP/1.1; config ProxyConfig(upstream='ws://K3@h/')"
    )
    masked = mask_urls_in(text)
    for secret in ("hunter2", "K1", "K2", "K3"):
        assert secret not in masked
    assert "ws://u:****@h:1/x?apiKey=****" in masked
    assert "GET /stocks?apiKey=****&x=1" in masked


@pytest.mark.parametrize("after", [",", ".", ";", ":", ")", "!", " (refused)"])
def test_text_around_a_url_is_kept(after: str) -> None:
    text = f"connecting to ws://u:pw@h:1/s?apiKey=KEY&x=1{after} subscribing T.*"
    assert (
        mask_urls_in(text)
        == f"connecting to ws://u:****@h:1/s?apiKey=****&x=1{after} subscribing T.*"
    )
    already = mask_urls_in(text)
    assert mask_urls_in(already) == already  # masking twice changes nothing


def test_the_log_formatter_masks_messages_and_tracebacks() -> None:
    formatter = MaskingFormatter(logging.Formatter("%(levelname)s %(message)s"))
    try:
        raise ValueError("cannot reach ws://me:hunter2@h/x?token=T0K3N")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "polyfan.proxy", logging.ERROR, __file__, 1, "connecting to %s", ("ws://me:hunter2@h/",),
            sys.exc_info(),
        )  # fmt: skip
    line = formatter.format(record)
    assert "hunter2" not in line and "T0K3N" not in line
    assert "ERROR connecting to ws://me:****@h/" in line
    assert "ValueError: cannot reach ws://me:****@h/x?token=****" in line


def test_config_reprs_never_show_url_credentials() -> None:
    proxy = ProxyConfig(api_key="ABCDEFGHIJKLMNOP", upstream="ws://u:secretpass@h/s?apiKey=KK")
    shown = repr(proxy)
    assert "secretpass" not in shown and "KK" not in shown and "ABCDEFGHIJKLMNOP" not in shown
    assert "upstream='ws://u:****@h/s?apiKey=****'" in shown
    assert proxy.upstream == "ws://u:secretpass@h/s?apiKey=KK"  # the value itself is untouched
    assert "pw" not in repr(AggConfig(sub=("tcp://a:pw@h:1",)))
    assert "pw" not in repr(BridgeConfig(sub=("tcp://a:pw@h:1",), tokens=("tok",)))
    assert "tok" not in repr(BridgeConfig(tokens=("tok",)))
    assert (
        repr(TapConfig("tcp://x:pw@h:1"))
        == "TapConfig(endpoint='tcp://x:****@h:1', prefixes=(), count=None, "
        "curve=CurveConfig(secret=None, allow=None, servers=()))"
    )
