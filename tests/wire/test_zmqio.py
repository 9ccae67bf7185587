"""The compiled ZeroMQ receive and send loops against plain pyzmq peers, and their fallback.

Every test that moves messages runs over ipc and tcp, for the libzmq-from-numba pair and for the
pyzmq fallback pair (same interface), and checks the messages byte for byte and in order.
"""

from __future__ import annotations

import ctypes.util
import errno
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import zmq
from numba import config as numba_config

from polyfan import agg
from polyfan.config import AggConfig
from polyfan.wire import zmqio
from polyfan.wire.ingest import join_frames
from procs import Context, endpoint

TRANSPORTS = ["ipc", "tcp"]
PATHS = ["numba", "pyzmq"]
# A coverage run with NUMBA_DISABLE_JIT=1 cannot run compiled code: the agg falls back then.
needs_jit = pytest.mark.skipif(
    numba_config.DISABLE_JIT, reason="NUMBA_DISABLE_JIT: only the pyzmq path can run"
)


@pytest.fixture
def ctx() -> Iterator[Context]:
    context = Context()
    yield context
    context.close()


@pytest.fixture
def lib() -> zmqio.Libzmq:
    if numba_config.DISABLE_JIT:
        pytest.skip("NUMBA_DISABLE_JIT: only the pyzmq path can run")
    return zmqio.open_libzmq()


def receiver(path: str, sock: zmq.Socket[bytes], limit: int, size: int = 1 << 16) -> Any:
    if path == "numba":
        if numba_config.DISABLE_JIT:
            pytest.skip("NUMBA_DISABLE_JIT: only the pyzmq path can run")
        return zmqio.Receiver(sock, zmqio.open_libzmq(), limit, size)
    return zmqio.PyzmqReceiver(sock, limit)


def sender(path: str, sock: zmq.Socket[bytes]) -> Any:
    if path == "numba":
        if numba_config.DISABLE_JIT:
            pytest.skip("NUMBA_DISABLE_JIT: only the pyzmq path can run")
        return zmqio.Sender(sock, zmqio.open_libzmq())
    return zmqio.PyzmqSender(sock)


def pub_sub(
    ctx: Context, address: str, *prefixes: bytes, kind: int = zmq.PUB
) -> tuple[zmq.Socket[bytes], zmq.Socket[bytes]]:
    """A PUB (or XPUB) and a SUB connected to it, past the slow joiner (a probe arrived)."""
    pub = ctx.socket(kind)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.bind(address)
    if address.startswith("tcp://") and address.endswith(":0"):
        address = pub.getsockopt(zmq.LAST_ENDPOINT).decode()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    for prefix in (*prefixes, b"probe"):
        sub.setsockopt(zmq.SUBSCRIBE, prefix)
    sub.connect(address)
    deadline = time.monotonic() + 10
    while not sub.poll(10):
        assert time.monotonic() < deadline, "the SUB never received the probe"
        pub.send(b"probe")
    # One pipe, in order: once the last probe is in, no earlier one can still come.
    pub.send(b"probe-last")
    while sub.recv() != b"probe-last":
        pass
    sub.setsockopt(zmq.UNSUBSCRIBE, b"probe")
    return pub, sub


def drain(take: Callable[[], tuple[np.ndarray, np.ndarray, int]], expected: int) -> list[bytes]:
    """Call ``take`` until ``expected`` messages came (5 s at most); return them as bytes."""
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while len(got) < expected:
        assert time.monotonic() < deadline, f"{len(got)} of {expected} messages arrived"
        buffer, offsets, count = take()
        got += [buffer[offsets[i] : offsets[i + 1]].tobytes() for i in range(count)]
    return got


def recv_all(sock: zmq.Socket[bytes], expected: int) -> list[bytes]:
    got = []
    for _ in range(expected):
        assert sock.poll(5_000), f"{len(got)} of {expected} messages arrived"
        got.append(sock.recv())
    return got


def varied_messages(count: int, seed: int = 1) -> list[bytes]:
    """Messages of 0 to 3,000 bytes (and a few of 1-3 MB), every byte value, each unique."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        size = int(rng.integers(0, 3_000)) if i % 97 else int(rng.integers(1 << 20, 3 << 20))
        body = rng.integers(0, 256, size, dtype=np.uint8).tobytes()
        out.append(i.to_bytes(4, "little") + body if size else b"")
    return out


def send_buffer(messages: list[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    buffer, offsets, count = join_frames(messages)
    return buffer.copy(), offsets, count  # writable, as the agg's encoded bars are


# --- the library -------------------------------------------------------------------------


def test_libzmq_is_the_one_pyzmq_loaded(lib: zmqio.Libzmq) -> None:
    assert lib.version == zmq.zmq_version_info()
    assert "zmq" in Path(lib.path).name
    assert all(
        getattr(lib, name) > 0
        for name in ("send", "msg_init", "msg_recv", "msg_data", "msg_size", "msg_close", "errno")
    )


# --- sending -----------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_message_sent_arrives_byte_exact_and_in_order(
    path: str, transport: str, tmp_path: Path, ctx: Context
) -> None:
    pub, sub = pub_sub(ctx, endpoint(transport, tmp_path, "s"), b"")
    messages = varied_messages(400)
    sender(path, pub).send(*send_buffer(messages))
    assert recv_all(sub, len(messages)) == messages
    assert not sub.poll(50)


@pytest.mark.parametrize("path", PATHS)
def test_sent_messages_reach_only_the_subscribers_of_their_topic(
    path: str, tmp_path: Path, ctx: Context
) -> None:
    address = endpoint("ipc", tmp_path, "t")
    pub, tsla = pub_sub(ctx, address, b"500Ms.TSLA\0", kind=zmq.XPUB)
    tslax = ctx.socket(zmq.SUB)
    tslax.setsockopt(zmq.SUBSCRIBE, b"500Ms.TSLAX\0")
    tslax.connect(address)
    pub.setsockopt(zmq.RCVTIMEO, 5_000)
    while pub.recv() != b"\x01500Ms.TSLAX\0":  # the XPUB has the second subscriber's topic
        pass
    messages = [
        b"500Ms.TSLA\0one",
        b"500Ms.TSLAX\0two",
        b"500Ms.TSL\0three",
        b"500Ms.TSLA\0four",
        b"500Ms.TSLAX\0five",
    ]
    sender(path, pub).send(*send_buffer(messages))
    assert recv_all(tsla, 2) == [b"500Ms.TSLA\0one", b"500Ms.TSLA\0four"]
    assert recv_all(tslax, 2) == [b"500Ms.TSLAX\0two", b"500Ms.TSLAX\0five"]
    assert not tsla.poll(50)
    assert not tslax.poll(0)


@needs_jit
def test_compiled_and_pyzmq_sends_on_one_socket_keep_their_order(
    tmp_path: Path, ctx: Context
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "o"), b"")
    fast = sender("numba", pub)
    fast.send(*send_buffer([b"a", b"b"]))
    pub.send(b"c")
    fast.send(*send_buffer([b"d"]))
    fast.send(*send_buffer([]))
    pub.send(b"e")
    assert recv_all(sub, 5) == [b"a", b"b", b"c", b"d", b"e"]


def test_a_send_that_libzmq_refuses_raises_its_errno(ctx: Context, lib: zmqio.Libzmq) -> None:
    sub = ctx.socket(zmq.SUB)  # a SUB cannot send: zmq_send fails with ENOTSUP
    with pytest.raises(zmq.ZMQError) as raised:
        zmqio.Sender(sub, lib).send(*send_buffer([b"x"]))
    assert raised.value.errno == zmq.ENOTSUP
    sub.close(0)
    with pytest.raises(zmq.ZMQError) as raised:
        zmqio.Sender(sub, lib).send(*send_buffer([b"x"]))
    assert raised.value.errno == errno.ENOTSOCK


def test_offsets_outside_the_buffer_are_refused_not_read(
    tmp_path: Path, ctx: Context, lib: zmqio.Libzmq
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "b"), b"")
    buffer = np.frombuffer(b"abcdef", np.uint8).copy()
    with pytest.raises(zmq.ZMQError) as raised:
        zmqio.Sender(pub, lib).send(buffer, np.array([0, 2, 99], np.int64), 2)
    assert raised.value.errno == errno.EINVAL
    with pytest.raises(ValueError, match="offsets"):
        zmqio.Sender(pub, lib).send(buffer, np.array([0, 2], np.int64), 2)
    assert recv_all(sub, 1) == [b"ab"]  # the messages before the bad one went out
    assert not sub.poll(50)


# --- receiving ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_every_message_received_is_byte_exact_and_in_order(
    path: str, transport: str, tmp_path: Path, ctx: Context
) -> None:
    pub, sub = pub_sub(ctx, endpoint(transport, tmp_path, "r"), b"")
    messages = varied_messages(400, seed=2)
    for message in messages:
        pub.send(message)
    got = drain(receiver(path, sub, limit=64).receive, len(messages))
    assert got == messages


@pytest.mark.parametrize("path", PATHS)
def test_a_drain_stops_at_the_limit_and_the_next_takes_the_rest(
    path: str, tmp_path: Path, ctx: Context
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "l"), b"")
    messages = [b"m%d" % i for i in range(25)]
    for message in messages:
        pub.send(message)
    pub.send(b"last")
    take = receiver(path, sub, limit=10).receive
    assert sub.poll(5_000)
    # the messages may arrive in pieces: collect until the last is here, checking each drain
    got: list[bytes] = []
    deadline = time.monotonic() + 5
    while b"last" not in got:
        assert time.monotonic() < deadline
        buffer, offsets, count = take()
        assert count <= 10
        got += [buffer[offsets[i] : offsets[i + 1]].tobytes() for i in range(count)]
    assert got == [*messages, b"last"]


@pytest.mark.parametrize("path", PATHS)
def test_an_empty_socket_gives_an_empty_batch(path: str, tmp_path: Path, ctx: Context) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "e"), b"")
    take = receiver(path, sub, limit=16).receive
    for _ in range(3):
        assert take()[2] == 0
    pub.send(b"after")
    assert drain(take, 1) == [b"after"]
    assert take()[2] == 0


@pytest.mark.parametrize("path", PATHS)
def test_received_topics_are_filtered_by_the_subscription(
    path: str, tmp_path: Path, ctx: Context
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "f"), b"T.A\0", b"_ctl")
    for message in (b"T.AA\0x", b"T.A\0one", b"T.AAPL\0y", b"_ctl\0two", b"T.A\0three"):
        pub.send(message)
    assert drain(receiver(path, sub, limit=16).receive, 3) == [
        b"T.A\0one",
        b"_ctl\0two",
        b"T.A\0three",
    ]


def test_messages_bigger_than_the_buffer_grow_it_and_the_drain_goes_on(
    tmp_path: Path, ctx: Context, lib: zmqio.Libzmq
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "g"), b"")
    messages = [b"small", bytes(range(256)) * 40, b"", b"x" * 100, bytes(5 << 20), b"end"]
    for message in messages:
        pub.send(message)
    take = zmqio.Receiver(sub, lib, limit=100, size=64)
    assert drain(take.receive, len(messages)) == messages
    assert len(take.buffer) >= sum(map(len, messages)) - len(b"small") - len(b"end")
    assert take.state[zmqio.R_HELD] == 0


def test_a_message_held_when_the_receiver_closes_is_released(
    tmp_path: Path, ctx: Context, lib: zmqio.Libzmq
) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "h"), b"")
    pub.send(b"y" * 1_000)
    take = zmqio.Receiver(sub, lib, limit=10, size=64)
    state = take.state
    state[zmqio.R_COUNT] = 0
    take.offsets[0] = 0
    assert sub.poll(5_000)
    status = zmqio.receive_messages(
        lib.msg_init,
        lib.msg_recv,
        lib.msg_data,
        lib.msg_size,
        lib.msg_close,
        lib.errno,
        sub.underlying,
        take._msg,
        take.buffer,
        take.offsets,
        10,
        state,
    )
    assert status == zmqio.NEED_ROOM
    assert (state[zmqio.R_HELD], state[zmqio.R_NEED], state[zmqio.R_COUNT]) == (1, 1_000, 0)
    take.close()
    assert state[zmqio.R_HELD] == 0


def test_a_receive_that_libzmq_refuses_raises_its_errno(ctx: Context, lib: zmqio.Libzmq) -> None:
    pub = ctx.socket(zmq.PUB)  # a PUB cannot receive: zmq_msg_recv fails with ENOTSUP
    with pytest.raises(zmq.ZMQError) as raised:
        zmqio.Receiver(pub, lib, limit=4).receive()
    assert raised.value.errno == zmq.ENOTSUP


# --- the fallback ------------------------------------------------------------------------


@pytest.fixture
def fresh_lookup() -> Iterator[None]:
    zmqio.open_libzmq.cache_clear()
    yield
    zmqio.open_libzmq.cache_clear()


@pytest.mark.usefixtures("fresh_lookup")
@pytest.mark.parametrize("how", ["env", "missing-file", "not-libzmq", "no-jit"])
def test_when_libzmq_cannot_be_used_the_pyzmq_pair_is_chosen_and_said_once(
    how: str,
    tmp_path: Path,
    ctx: Context,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from zmq.backend.cython import _zmq

    if how == "env":
        monkeypatch.setenv("POLYFAN_LIBZMQ", "off")
    elif how == "missing-file":
        monkeypatch.setattr(_zmq, "__file__", str(tmp_path / "gone.so"))
    elif how == "not-libzmq":
        libc = ctypes.util.find_library("c")
        assert libc is not None
        monkeypatch.setattr(_zmq, "__file__", libc)
    else:
        monkeypatch.setattr(zmqio.numba_config, "DISABLE_JIT", True)
    with pytest.raises(zmqio.LibzmqUnavailableError):
        zmqio.open_libzmq()
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "x"), b"")
    take, give, note = zmqio.receiver_and_sender(sub, pub, 8)
    assert isinstance(take, zmqio.PyzmqReceiver)
    assert isinstance(give, zmqio.PyzmqSender)
    assert note.endswith("messages go through pyzmq")
    give.send(*send_buffer([b"one", b"two"]))
    assert drain(take.receive, 2) == [b"one", b"two"]


@needs_jit
def test_the_compiled_pair_is_chosen_when_libzmq_is_there(tmp_path: Path, ctx: Context) -> None:
    pub, sub = pub_sub(ctx, endpoint("ipc", tmp_path, "c"), b"")
    take, give, note = zmqio.receiver_and_sender(sub, pub, 8)
    assert isinstance(take, zmqio.Receiver)
    assert isinstance(give, zmqio.Sender)
    assert "messages go through libzmq" in note
    agg.warm_up(AggConfig(), take, give)  # loads both kernels, moves nothing
    assert take.receive()[2] == 0
    give.send(*send_buffer([b"one", b"two"]))
    assert drain(take.receive, 2) == [b"one", b"two"]
