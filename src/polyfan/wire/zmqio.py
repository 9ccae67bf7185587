"""Per-message ZeroMQ I/O in compiled loops: libzmq called straight from numba.

pyzmq costs ~0.2 µs per ``recv(NOBLOCK)`` and ~0.7 µs per ``send(bytes)``, plus one ``bytes``
object per message; at a few million messages a second that is most of the agg's time. Here one
kernel call moves a whole batch between a socket and one uint8 buffer with offsets (message i
is ``buffer[offsets[i]:offsets[i + 1]]``):

- :class:`Receiver` drains up to ``limit`` messages with ``zmq_msg_init`` / ``zmq_msg_recv``
  (``ZMQ_DONTWAIT``) / ``zmq_msg_data`` / ``zmq_msg_size`` / a copy into the buffer /
  ``zmq_msg_close``, stopping at EAGAIN; ``receive(wait=True)`` first waits for a message
  (bounded by the socket's ``ZMQ_RCVTIMEO``, the GIL released), so that one call is a whole
  wake-up (``polyfan.client.trade_batches``). A message larger than the room left stays held in its
  ``zmq_msg_t``; the buffer grows and the drain continues with it.
- :class:`Sender` calls ``zmq_send(socket, ptr, len, 0)`` once per message of a buffer: each
  message stays its own ZeroMQ message, exactly as ``socket.send(bytes)`` would send it.

The library is the one pyzmq already loaded, found by looking ``zmq_send`` up through pyzmq's own
extension module (``dlsym`` on its handle searches its dependencies, so the symbols are the very
ones pyzmq calls, whatever the file is named), and checked against ``zmq.zmq_version_info()``.
The kernels take the function addresses as arguments and call them through one small intrinsic
(``_call_c``, the C prototype given as a literal string: ``"int(void*, void*, int)"``), so
the compiled code holds no address and numba can cache it (numba's own ctypes support bakes the
address in and refuses to cache). Socket handles are pyzmq's ``socket.underlying``.

When the library cannot be found or loaded (a pyzmq built another way, ``NUMBA_DISABLE_JIT``,
``POLYFAN_LIBZMQ=off``), :func:`open_libzmq` raises :class:`LibzmqUnavailableError` and the callers use
:class:`PyzmqReceiver` and :class:`PyzmqSender`, the same interface over plain pyzmq.
"""

from __future__ import annotations

import ctypes
import errno
import os
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Any

import numpy as np
import zmq
from llvmlite import ir  # type: ignore[import-untyped]
from numba import config as numba_config
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic as _numba_intrinsic

from polyfan.wire.ingest import join_frames, split_frames

ZMQ_DONTWAIT = 1
EAGAIN = errno.EAGAIN
EINTR = errno.EINTR
EINVAL = errno.EINVAL
MSG_WORDS = 8  # zmq_msg_t is 64 bytes, pointer-aligned (libzmq >= 4.1)
MIN_VERSION = (4, 1, 0)

# Receiver state words (shared with the kernel)
R_COUNT = 0  # messages in the buffer
R_HELD = 1  # 1 when the zmq_msg_t holds a received message not yet copied
R_NEED = 2  # bytes the buffer must hold to take the held message
R_ERRNO = 3
N_RECEIVER = 4

# What a drain ended on
DRAINED = 0  # EAGAIN: nothing more waiting
FULL = 1  # ``limit`` messages received
NEED_ROOM = 2  # the held message does not fit: grow the buffer to state[R_NEED] and call again
FAILED = 3  # zmq_msg_recv failed with state[R_ERRNO] (not EAGAIN)

_I8P = ir.IntType(8).as_pointer()
_I64 = ir.IntType(64)
_INT = ir.IntType(32)  # C int on every Linux ABI
_SIZE = ir.IntType(64)  # size_t on 64-bit platforms (checked in open_libzmq)


intrinsic: Callable[..., Any] = _numba_intrinsic  # typed loosely: they are called from numba
literal_intrinsic: Callable[..., Any] = _numba_intrinsic(prefer_literal=True)
_unpack_tuple: Callable[..., Any] = cgutils.unpack_tuple
_star_args: Callable[..., Any] = types.StarArgTuple.from_types


class LibzmqUnavailableError(RuntimeError):
    """The compiled path cannot be used here; use pyzmq."""


# --- calling C through function addresses -------------------------------------------------


def _integers(*args: Any) -> bool:
    return all(isinstance(a, types.Integer) for a in args)


def _c_call(result: ir.Type, params: list[ir.Type]) -> Callable[..., Any]:
    """Codegen of ``result fn(params...)`` where the intrinsic's arguments are the function's
    address, then its arguments as integers (pointers as addresses)."""

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        as_i64 = [
            context.cast(builder, value, kind, types.int64)
            for value, kind in zip(args, signature.args, strict=True)
        ]
        function = builder.inttoptr(as_i64[0], ir.FunctionType(result, params).as_pointer())
        values = []
        for value, param in zip(as_i64[1:], params, strict=True):
            if isinstance(param, ir.PointerType):
                values.append(builder.inttoptr(value, param))
            elif param.width < 64:
                values.append(builder.trunc(value, param))
            else:
                values.append(value)
        returned = builder.call(function, values)
        if isinstance(result, ir.PointerType):
            return builder.ptrtoint(returned, _I64)
        if result.width < 64:
            return builder.sext(returned, _I64)
        return returned

    return codegen


_C_TYPES = {"int": _INT, "void*": _I8P, "size_t": _SIZE}


def _c_signature(text: str) -> tuple[ir.Type, list[ir.Type]]:
    """``"int(void*, size_t)"`` as LLVM types: the result, then the parameters."""
    result, _, params = text.replace(" ", "").partition("(")
    return _C_TYPES[result], [_C_TYPES[p] for p in params.rstrip(")").split(",") if p]


@literal_intrinsic
def _call_c(typingctx: Any, signature: Any, fn: Any, *args: Any) -> Any:
    """``fn(args...)`` through its address: ``signature`` is the C prototype as a literal string
    over ``int``, ``void*`` and ``size_t`` (``"int(void*, void*, size_t, int)"``); the
    arguments are integers (pointers as addresses), the result an int64 (a pointer as its
    address). One intrinsic for every prototype: numba compiles one body per literal."""
    if not isinstance(signature, types.StringLiteral) or not _integers(fn, *args):
        return None
    result, params = _c_signature(signature.literal_value)
    if len(params) != len(args):
        return None
    call = _c_call(result, params)

    def codegen(context: Any, builder: Any, sig: Any, values: Any) -> Any:
        arguments = [values[1], *_unpack_tuple(builder, values[2])]
        kinds = [sig.args[1], *sig.args[2].types]
        return call(context, builder, types.int64(*kinds), arguments)

    return types.int64(signature, fn, _star_args(args)), codegen


@intrinsic
def _address(typingctx: Any, array: Any) -> Any:
    """The address of an array's first element."""
    if not isinstance(array, types.Array):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, _I64)

    return types.int64(array), codegen


@intrinsic
def _copy(typingctx: Any, dst: Any, src: Any, size: Any) -> Any:
    """``memcpy(dst, src, size)`` between addresses."""
    if not _integers(dst, src, size):
        return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        d, s, n = (
            context.cast(builder, value, kind, types.int64)
            for value, kind in zip(args, signature.args, strict=True)
        )
        builder.call(
            builder.module.declare_intrinsic("llvm.memcpy", [_I8P, _I8P, _I64]),
            [
                builder.inttoptr(d, _I8P),
                builder.inttoptr(s, _I8P),
                n,
                ir.Constant(ir.IntType(1), 0),
            ],
        )
        return context.get_dummy_value()

    return types.void(dst, src, size), codegen


# --- the kernels ---------------------------------------------------------------------------


@njit(cache=True, nogil=True)
def send_messages(
    fn_send: int,
    fn_errno: int,
    socket: int,
    buf: np.ndarray,
    offsets: np.ndarray,
    start: int,
    stop: int,
) -> tuple[int, int]:
    """``zmq_send(socket, buf + offsets[i], offsets[i + 1] - offsets[i], 0)`` for i in
    ``start..stop``. Returns ``(stop, 0)``, or the index of the message that failed and errno
    (that message was not sent)."""
    base = _address(buf)
    size = buf.shape[0]
    for i in range(start, stop):
        begin = offsets[i]
        end = offsets[i + 1]
        if begin < 0 or end < begin or end > size:
            return i, EINVAL
        if (
            _call_c("int(void*, void*, size_t, int)", fn_send, socket, base + begin, end - begin, 0)
            < 0
        ):
            return i, _call_c("int()", fn_errno)
    return stop, 0


@njit(cache=True, nogil=True)
def receive_messages(
    fn_init: int,
    fn_recv: int,
    fn_data: int,
    fn_size: int,
    fn_close: int,
    fn_errno: int,
    socket: int,
    msg: np.ndarray,
    buf: np.ndarray,
    offsets: np.ndarray,
    limit: int,
    state: np.ndarray,
    wait: bool = False,
) -> int:
    """Receive messages without waiting into ``buf`` after the ``state[R_COUNT]`` already there,
    until ``limit`` are there (FULL), none is waiting (DRAINED), the next does not fit
    (NEED_ROOM: it stays held in ``msg``) or libzmq fails (FAILED, errno in ``state``). With
    ``wait`` and nothing in ``buf`` yet, the first receive waits for a message, as long as the
    socket's ``ZMQ_RCVTIMEO`` allows (then DRAINED with none); the GIL is released meanwhile."""
    count = state[R_COUNT]
    used = offsets[count]
    base = _address(buf)
    room = buf.shape[0]
    handle = _address(msg)
    while count < limit:
        if state[R_HELD] == 0:
            _call_c("int(void*)", fn_init, handle)
            flags = 0 if wait and count == 0 else ZMQ_DONTWAIT
            if _call_c("int(void*, void*, int)", fn_recv, handle, socket, flags) < 0:
                code = _call_c("int()", fn_errno)
                _call_c("int(void*)", fn_close, handle)
                state[R_COUNT] = count
                if code == EAGAIN:
                    return DRAINED
                state[R_ERRNO] = code
                return FAILED
            state[R_HELD] = 1
        size = _call_c("size_t(void*)", fn_size, handle)
        if used + size > room:
            state[R_COUNT] = count
            state[R_NEED] = used + size
            return NEED_ROOM
        _copy(base + used, _call_c("void*(void*)", fn_data, handle), size)
        _call_c("int(void*)", fn_close, handle)
        state[R_HELD] = 0
        used += size
        count += 1
        offsets[count] = used
    state[R_COUNT] = count
    return FULL


# --- the library ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Libzmq:
    """The addresses of the libzmq functions the kernels call, from the library pyzmq uses."""

    path: str
    version: tuple[int, int, int]
    send: int
    msg_init: int
    msg_recv: int
    msg_data: int
    msg_size: int
    msg_close: int
    errno: int
    handle: Any  # the ctypes.CDLL the addresses come from, kept alive


class _DlInfo(ctypes.Structure):
    _fields_ = (
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    )


def _file_of(address: int) -> str:
    """The file the code at ``address`` was loaded from (``dladdr``), for the log."""
    try:
        libc = ctypes.CDLL(None)
        info = _DlInfo()
        if libc.dladdr(ctypes.c_void_p(address), ctypes.byref(info)) and info.dli_fname:
            return os.fsdecode(info.dli_fname)
    except (OSError, AttributeError):
        pass
    return "?"


@cache
def open_libzmq() -> Libzmq:
    """The libzmq pyzmq loaded, ready for the kernels; raises :class:`LibzmqUnavailableError`."""
    if os.environ.get("POLYFAN_LIBZMQ", "").lower() in ("off", "0", "pyzmq"):
        raise LibzmqUnavailableError("POLYFAN_LIBZMQ=off")
    if getattr(numba_config, "DISABLE_JIT", False):
        raise LibzmqUnavailableError("NUMBA_DISABLE_JIT is set")
    if ctypes.sizeof(ctypes.c_size_t) != 8 or ctypes.sizeof(ctypes.c_int) != 4:
        raise LibzmqUnavailableError("not a 64-bit platform")
    try:
        from zmq.backend.cython import _zmq  # the extension linked against libzmq
    except ImportError as exc:
        raise LibzmqUnavailableError(f"pyzmq has no cython backend ({exc})") from exc
    extension = getattr(_zmq, "__file__", None)
    if not extension:
        raise LibzmqUnavailableError("pyzmq's cython backend has no file")
    try:
        # dlopen of a loaded file returns its handle; dlsym on it searches its dependencies.
        library = ctypes.CDLL(extension, mode=ctypes.RTLD_LOCAL)
        functions = {
            name: ctypes.cast(getattr(library, f"zmq_{name}"), ctypes.c_void_p).value
            for name in ("send", "msg_init", "msg_recv", "msg_data", "msg_size", "msg_close")
        }
        functions["errno"] = ctypes.cast(library.zmq_errno, ctypes.c_void_p).value
        version_of = library.zmq_version
    except (OSError, AttributeError) as exc:
        raise LibzmqUnavailableError(f"cannot find libzmq through {extension}: {exc}") from exc
    major, minor, patch = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    version_of.restype = None
    version_of(ctypes.byref(major), ctypes.byref(minor), ctypes.byref(patch))
    version = (major.value, minor.value, patch.value)
    if version != tuple(zmq.zmq_version_info()):
        raise LibzmqUnavailableError(
            f"libzmq found is {version}, pyzmq reports {tuple(zmq.zmq_version_info())}"
        )
    if version < MIN_VERSION:
        raise LibzmqUnavailableError(f"libzmq {version} is older than {MIN_VERSION}")
    addresses = {name: int(value or 0) for name, value in functions.items()}
    if not all(addresses.values()):
        raise LibzmqUnavailableError("a libzmq function has no address")
    return Libzmq(
        path=_file_of(addresses["send"]),
        version=version,
        handle=library,
        **addresses,
    )


def _handle(socket: zmq.Socket[Any]) -> int:
    if socket.closed:
        raise zmq.ZMQError(errno.ENOTSOCK)
    return int(socket.underlying)


# --- receivers and senders -----------------------------------------------------------------


class Receiver:
    """Drains a socket into one buffer with offsets, in compiled code."""

    def __init__(
        self, socket: zmq.Socket[Any], lib: Libzmq, limit: int, size: int = 1 << 20
    ) -> None:
        self.socket = socket
        self.lib = lib
        self.limit = limit
        self.buffer = np.empty(max(size, 64), dtype=np.uint8)
        self.offsets = np.zeros(limit + 1, dtype=np.int64)
        self.state = np.zeros(N_RECEIVER, dtype=np.int64)
        self._msg = np.zeros(MSG_WORDS, dtype=np.int64)

    def receive(self, wait: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        """Everything waiting, up to ``limit`` messages: ``(buffer, offsets, count)``. The
        arrays are reused by the next call. With ``wait``, wait for a first message as long as
        the socket's ``ZMQ_RCVTIMEO`` allows (set one: -1 waits for ever), the GIL released."""
        lib = self.lib
        socket = _handle(self.socket)
        state = self.state
        state[R_COUNT] = 0
        self.offsets[0] = 0
        while True:
            status = receive_messages(
                lib.msg_init,
                lib.msg_recv,
                lib.msg_data,
                lib.msg_size,
                lib.msg_close,
                lib.errno,
                socket,
                self._msg,
                self.buffer,
                self.offsets,
                self.limit,
                state,
                wait,
            )
            if status == NEED_ROOM:
                self._grow(int(state[R_NEED]))
            elif status == FAILED:
                code = int(state[R_ERRNO])
                if code != errno.EINTR:
                    raise zmq.ZMQError(code)
                if wait:  # a signal: let Python run its handler (Ctrl-C) before waiting again
                    return self.buffer, self.offsets, int(state[R_COUNT])
            else:
                return self.buffer, self.offsets, int(state[R_COUNT])

    def _grow(self, need: int) -> None:
        grown = np.empty(max(need, 2 * len(self.buffer)), dtype=np.uint8)
        used = int(self.offsets[self.state[R_COUNT]])
        grown[:used] = self.buffer[:used]
        self.buffer = grown

    def warm_up(self) -> None:
        """Load the kernel (no message is received)."""
        lib = self.lib
        state = np.zeros(N_RECEIVER, dtype=np.int64)
        receive_messages(
            lib.msg_init,
            lib.msg_recv,
            lib.msg_data,
            lib.msg_size,
            lib.msg_close,
            lib.errno,
            0,
            self._msg,
            self.buffer,
            self.offsets,
            0,
            state,
            False,
        )

    def close(self) -> None:
        """Release a message still held (the socket itself is the caller's)."""
        if self.state[R_HELD]:
            ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_void_p)(self.lib.msg_close)(
                self._msg.ctypes.data
            )
            self.state[R_HELD] = 0


class Sender:
    """Sends each message of a buffer with offsets as its own ZeroMQ message, in compiled code."""

    def __init__(self, socket: zmq.Socket[Any], lib: Libzmq) -> None:
        self.socket = socket
        self.lib = lib

    def send(self, buffer: np.ndarray, offsets: np.ndarray, count: int) -> None:
        """Send messages ``0..count``, as ``socket.send(message)`` would, in order."""
        if not 0 <= count < len(offsets):
            raise ValueError(f"count {count} outside the {len(offsets)} offsets")
        lib = self.lib
        socket = _handle(self.socket)
        start = 0
        while start < count:
            start, code = send_messages(lib.send, lib.errno, socket, buffer, offsets, start, count)
            if code == errno.EINTR:
                continue
            if code:
                raise zmq.ZMQError(code)

    def warm_up(self) -> None:
        """Load the kernel (nothing is sent)."""
        buffer = np.zeros(1, dtype=np.uint8)
        send_messages(self.lib.send, self.lib.errno, 0, buffer, np.zeros(1, np.int64), 0, 0)


class PyzmqReceiver:
    """:class:`Receiver`'s interface over pyzmq's ``recv``: the fallback."""

    def __init__(self, socket: zmq.Socket[Any], limit: int) -> None:
        self.socket = socket
        self.limit = limit

    def receive(self, wait: bool = False) -> tuple[np.ndarray, np.ndarray, int]:
        if wait:
            timeout = int(self.socket.getsockopt(zmq.RCVTIMEO))
            self.socket.poll(None if timeout < 0 else timeout)
        frames: list[bytes] = []
        append = frames.append
        recv = self.socket.recv
        for _ in range(self.limit):
            try:
                append(recv(zmq.NOBLOCK))
            except zmq.Again:
                break
        return join_frames(frames)

    def warm_up(self) -> None:
        pass

    def close(self) -> None:
        pass


class PyzmqSender:
    """:class:`Sender`'s interface over pyzmq's ``send``: the fallback."""

    def __init__(self, socket: zmq.Socket[Any]) -> None:
        self.socket = socket

    def send(self, buffer: np.ndarray, offsets: np.ndarray, count: int) -> None:
        send = self.socket.send
        for message in split_frames(buffer, offsets, count):
            send(message)

    def warm_up(self) -> None:
        pass


AnyReceiver = Receiver | PyzmqReceiver
AnySender = Sender | PyzmqSender


def receiver_and_sender(
    sub: zmq.Socket[Any], pub: zmq.Socket[Any], limit: int
) -> tuple[AnyReceiver, AnySender, str]:
    """The compiled pair when libzmq can be used, else pyzmq's; and a line saying which."""
    try:
        lib = open_libzmq()
    except LibzmqUnavailableError as exc:
        note = f"libzmq not callable from numba ({exc}): messages go through pyzmq"
        return PyzmqReceiver(sub, limit), PyzmqSender(pub), note
    note = f"messages go through libzmq {'.'.join(map(str, lib.version))} from numba ({lib.path})"
    return Receiver(sub, lib, limit), Sender(pub, lib), note
