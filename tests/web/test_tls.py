"""TLS at the client edge (CONTRACT §8): ``--tls-cert/--tls-key`` serve https:// and wss:// on
the same port, with a real handshake against a self-signed certificate made here by openssl."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest
from websockets.asyncio.client import connect

from fake_agg import FakeAgg
from polyfan.bridge import Bridge
from polyfan.config import BridgeConfig
from polyfan.errors import ConfigError
from procs import Proc, free_port
from wsclient import eventually

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl command")


@pytest.fixture
def certificate(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def agg() -> Iterator[FakeAgg]:
    with FakeAgg("tcp://127.0.0.1:*") as fake:
        yield fake


@pytest.fixture
async def bridge(agg: FakeAgg, certificate: tuple[Path, Path]) -> AsyncIterator[Bridge]:
    cert, key = certificate
    config = BridgeConfig(
        sub=(agg.endpoint,), listen=("127.0.0.1", 0), tokens=("tok",), tls_cert=cert, tls_key=key
    )
    bridge = Bridge(config)
    await bridge.start()
    await eventually(lambda: bridge.catalog.intervals, what="the agg's announce")
    yield bridge
    await bridge.stop()


def trusting(cert: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(cert))
    return context


def https_get(url: str, context: ssl.SSLContext, *headers: tuple[str, str]) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def test_https_and_wss_on_one_port_with_a_verified_certificate(
    bridge: Bridge, certificate: tuple[Path, Path]
) -> None:
    context = trusting(certificate[0])
    base = f"https://127.0.0.1:{bridge.port}"
    status, body = await asyncio.to_thread(https_get, f"{base}/healthz", context)
    assert status == 200 and orjson.loads(body)["status"] == "ok"
    status, _ = await asyncio.to_thread(https_get, f"{base}/api/info", context)
    assert status == 401  # the token rules hold over TLS too
    status, body = await asyncio.to_thread(
        https_get, f"{base}/api/info", context, ("Authorization", "Bearer tok")
    )
    assert status == 200 and "intervals" in orjson.loads(body)
    # the page's own origin is https:// now: a same-origin WebSocket from it is accepted
    async with connect(
        f"wss://127.0.0.1:{bridge.port}/stocks",
        ssl=context,
        origin=f"https://127.0.0.1:{bridge.port}",  # type: ignore[arg-type]
    ) as ws:
        connected = orjson.loads(await ws.recv())
        assert connected[0]["status"] == "connected"
        await ws.send(orjson.dumps({"action": "auth", "params": "tok"}))
        assert orjson.loads(await ws.recv())[0]["status"] == "auth_success"


async def test_a_client_that_does_not_trust_the_certificate_is_refused(bridge: Bridge) -> None:
    with pytest.raises(urllib.error.URLError) as refused:
        await asyncio.to_thread(
            https_get, f"https://127.0.0.1:{bridge.port}/healthz", ssl.create_default_context()
        )
    assert isinstance(refused.value.reason, ssl.SSLCertVerificationError)


async def test_plain_http_to_the_tls_port_gets_no_answer(bridge: Bridge) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    await writer.drain()
    async with asyncio.timeout(15):
        data = await reader.read()
    assert not data.startswith(b"HTTP/1.1 200")
    writer.close()


async def test_a_certificate_that_does_not_load_is_a_config_error(
    agg: FakeAgg, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a key")
    bridge = Bridge(
        BridgeConfig(sub=(agg.endpoint,), listen=("127.0.0.1", 0), tls_cert=certificate[0],
                     tls_key=bad)
    )  # fmt: skip
    with pytest.raises(ConfigError, match="--tls-cert/--tls-key"):
        await bridge.start()


def test_the_cli_serves_tls_and_says_so(certificate: tuple[Path, Path]) -> None:
    cert, key = certificate
    port = free_port()
    with Proc("bridge", "--listen", f"127.0.0.1:{port}", "--tls-cert", str(cert),
              "--tls-key", str(key)) as bridge:  # fmt: skip
        bridge.wait_for(rf"ready: serving wss://127\.0\.0\.1:{port}/ and https://")
        status, _ = https_get(f"https://127.0.0.1:{port}/", trusting(cert))
        assert status == 200
        assert bridge.stop() == 0
    with Proc("bridge", "--tls-cert", str(cert)) as half:
        assert half.wait() == 2
        assert "--tls-cert and --tls-key go together" in half.output
