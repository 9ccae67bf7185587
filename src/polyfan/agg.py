"""``polyfan agg``: the shell that moves bytes between ZeroMQ and :class:`Aggregator`.

A synchronous poll loop over two sockets:

- a SUB connected to every ``--sub`` (the proxy), subscribed to ``T.<SYM>\\0`` per listed symbol
  (or ``T.`` for ``*``) and the control topic. Everything waiting is drained (up to
  ``BATCH_FRAMES``) into one buffer and handed to the core in one call.
- an XPUB bound on ``--pub`` (XPUB_VERBOSER), on which bars, the relayed control messages and
  the announce go out, and subscriptions and history requests come in. Each upstream message
  is handed to the core with the file descriptor of the connection it came on (``ZMQ_SRCFD``),
  and a monitor socket reports connections opening and closing, so the core keeps per-peer
  allowances (:mod:`polyfan.wire.peers`); a peer past them is disconnected by shutting its socket
  down (libzmq has no call to drop one peer of a bound socket).

Both per-message loops (drain the SUB, publish each bar message) are compiled calls into the
libzmq pyzmq loaded (:mod:`polyfan.wire.zmqio`), or pyzmq's own ``recv`` / ``send`` when that library
cannot be used: one INFO line at start says which.

The poll timeout is short so SIGINT/SIGTERM stop the loop within 2 s; both exit with status 0.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import gc
import logging
import os
import signal
import socket
import struct
import termios
import time
from collections.abc import Callable
from types import FrameType

import numpy as np
import zmq
import zmq.utils.monitor

from polyfan import curve
from polyfan.bars import history, segments
from polyfan.bars.aggregator import Aggregator
from polyfan.config import AggConfig, format_duration_ms
from polyfan.errors import ConfigError
from polyfan.metrics import MetricsServer, Registry, listen
from polyfan.store import SEAL_MS, BarStore
from polyfan.wire import codec, zmqio
from polyfan.wire.peers import Bans

log = logging.getLogger("polyfan.agg")

BATCH_FRAMES = 4096  # frames drained into one batch at most
RCVHWM = 2_000_000  # messages queued from the proxy before ZeroMQ drops (counted as gaps)
# Messages queued per subscriber before ZeroMQ drops (seen as gaps there). Sized from a memory
# budget (docs/limits.md): a bar message is 64 bytes a bar + ~60 of topic and header, so a
# stalled peer holds at most ~250,000 x 128 B = 32 MB of bars, plus its reply bytes in flight
# (peers.PeerLimits.reply_bytes_in_flight, 4 MiB, + one reply, 1.3 MB); 64 peers at most:
# ~2.4 GB in the worst case of every peer subscribed to everything and stalled. 250,000
# messages are 1.5 s of the busiest market measured (10,000 symbols, six intervals).
SNDHWM = 250_000
# ZMQ_MAXMSGSIZE: what peers send upstream is subscriptions (a topic) and requests (a small JSON
# object); anything longer disconnects the peer in libzmq itself.
PEER_MAXMSGSIZE = 4096
# Upstream messages queued in each peer's pipe. libzmq's XPUB drains a peer's pipe while its I/O
# thread refills it (it resumes reading at half the mark), so the mark bounds how much one poll or
# receive can move into the XPUB's own unbounded queue before the loop judges it: 100 let a
# flood of 1,000,000 subscriptions add up to 262 MB; 10 adds under 10 MB and still takes
# 20,000 subscriptions in 0.1 s (docs/limits.md). The ban and CURVE do the rest.
PEER_RCVHWM = 10
# From the proxy: one message carries one symbol's trades of one drain (docs/wire.md): 64 MiB
# is 1.2 million trades of one symbol in one pass, far beyond any real burst.
SUB_MAXMSGSIZE = 64 << 20
POLL_MS = 50
ANNOUNCE_EVERY_S = 1.0
THROUGHPUT_EVERY_S = 10.0
TRIM_EVERY_S = 0.1


def warm_up(
    config: AggConfig,
    receiver: zmqio.AnyReceiver | None = None,
    sender: zmqio.AnySender | None = None,
) -> None:
    """Run every kernel once through a throwaway core (and load the receive and send kernels),
    so no batch waits for numba to load."""
    core = Aggregator(dataclasses.replace(config, symbols=None), session=1)
    trade = np.zeros(1, dtype=codec.TRADE_DTYPE)
    trade["t"], trade["p"], trade["s"] = 1_000, 1.0, 1.0
    clock = np.array([(10**9, 0)], dtype=codec.CLOCK_DTYPE)
    core.frames_received(
        [
            codec.encode(codec.trade_topic("WARM"), codec.Kind.TRADES, 1, 1, 1, trade.tobytes()),
            codec.encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, 1, 1, clock.tobytes()),
        ]
    )
    core.tick()
    interval = config.intervals_ms[0]
    core.request_received(
        {"id": 1, "reply": "0" * codec.REPLY_ROUTE_HEX, "channel": f"{interval}Ms.WARM", "since": 0}
    )
    history.warm_up()  # the one bar above never fills a record: pack, walk and decode too
    if receiver is not None:
        receiver.warm_up()
    if sender is not None:
        sender.warm_up()


class _Stop:
    def __init__(self) -> None:
        self.requested = False

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True


def seal_ms(config: AggConfig) -> int:
    """How much feed clock a write-ahead log covers before it is sealed. Memory keeps its bars
    until then, whatever ``--history`` says (``BarStore.unsealed_from``), so it is sealed well
    within ``--history`` to keep memory to it: a bar flushed at clock C starts after C minus
    the longest interval and the grace (docs/store.md)."""
    room = config.history_ms - max(config.intervals_ms) - config.grace_ms
    return max(100, min(SEAL_MS, room // 2))


def open_store(config: AggConfig, registry: Registry) -> BarStore | None:
    """``--store``: the bars a previous process left, read back (logged), or None."""
    if config.store is None:
        return None
    store = BarStore(
        config.store,
        config.intervals_ms,
        retain_ms=config.retain_ms,
        flush_ms=config.flush_ms,
        seal_ms=seal_ms(config),
        registry=registry,
    )
    try:
        loaded = store.open()
    except OSError as exc:
        raise ConfigError(f"--store: cannot use {config.store}: {exc}") from exc
    log.info(
        "store %s: %d bars in %d segments, oldest bar %s, last flush at feed clock %s; "
        "%d logs sealed (%d bytes cut), %d segments past --retain deleted, in %.2f s",
        config.store,
        loaded.bars,
        loaded.segments,
        loaded.oldest,
        loaded.stored_to,
        loaded.sealed_logs,
        loaded.cut_bytes,
        loaded.removed,
        loaded.seconds,
    )
    return store


def run(config: AggConfig) -> int:
    registry = Registry()
    store = open_store(config, registry)
    core = Aggregator(config, registry, store=store)
    context = zmq.Context()
    sub = context.socket(zmq.SUB)
    pub = context.socket(zmq.XPUB)
    receiver, sender, io_note = zmqio.receiver_and_sender(sub, pub, BATCH_FRAMES)
    log.info("%s", io_note)
    metrics: MetricsServer | None = None
    monitor: zmq.Socket[bytes] | None = None
    gatekeeper = Gatekeeper(context, core.bans, config, core)
    client = curve.Client(config.curve, "agg", list(config.sub))
    pair = None if config.curve.secret is None else curve.load_pair(config.curve.secret)
    if config.curve.allow is not None:
        curve.check_allow_dir(config.curve.allow)
    watch: curve.HandshakeWatch | None = None
    stop = _Stop()
    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        warm_up(config, receiver, sender)
        if store is not None:
            segments.warm_up()
            store.start(core.decoder.symbol_names)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, RCVHWM)
        sub.setsockopt(zmq.RCVBUF, 8 << 20)
        sub.setsockopt(zmq.MAXMSGSIZE, SUB_MAXMSGSIZE)
        # Subscriptions travel to the proxy as messages, and ZeroMQ silently drops those beyond
        # the SUB's send high-water mark (1,000 by default): a long --symbols list would lose
        # topics, the control topic first (ZeroMQ sends them in byte order; "_" follows "T").
        sub.setsockopt(zmq.SNDHWM, 0)
        sub.setsockopt(zmq.SUBSCRIBE, codec.CONTROL_TOPIC)
        if config.symbols is None:
            sub.setsockopt(zmq.SUBSCRIBE, b"T.")
        else:
            for symbol in config.symbols:
                sub.setsockopt(zmq.SUBSCRIBE, codec.trade_topic(symbol))
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, SNDHWM)
        pub.setsockopt(zmq.XPUB_VERBOSER, 1)  # every (un)subscription, for the allowances
        pub.setsockopt(zmq.MAXMSGSIZE, PEER_MAXMSGSIZE)
        pub.setsockopt(zmq.RCVHWM, PEER_RCVHWM)
        gatekeeper.start()
        pub.setsockopt(zmq.ZAP_DOMAIN, ZAP_DOMAIN)  # every handshake asks the gatekeeper
        if config.pub.startswith("tcp://"):
            curve.heartbeats(pub)
        if pair is not None and config.curve.allow is not None:
            curve.serve_curve(pub, pair)
        else:
            curve.warn_open_tcp("agg", [config.pub])
        watch = client.watch(sub)
        monitor = pub.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        try:
            pub.bind(config.pub)
        except zmq.ZMQError as exc:
            raise ConfigError(f"--pub: cannot bind {config.pub}: {exc}") from exc
        for index, endpoint in enumerate(config.sub):
            try:
                client.connect(sub, index, endpoint)
            except zmq.ZMQError as exc:
                raise ConfigError(f"--sub: cannot connect to {endpoint}: {exc}") from exc
        metrics_note = ""
        if config.metrics is not None:
            metrics = listen(config.metrics, registry)
            metrics.start()
            metrics_note = f", metrics http://{config.metrics[0]}:{metrics.port}/metrics"
        # Everything made so far (numba's and llvmlite's object graphs above all) lives as
        # long as the process: keep it out of every garbage collection the loop triggers.
        gc.collect()
        gc.freeze()
        log.info(
            "ready: agg session %016x, sub %s, pub %s, intervals %s, grace %s, symbols %s%s",
            core.session,
            ",".join(config.sub),
            config.pub,
            " ".join(format_duration_ms(i) for i in config.intervals_ms),
            format_duration_ms(config.grace_ms),
            "*" if config.symbols is None else ",".join(config.symbols),
            metrics_note + ("" if config.store is None else f", store {config.store}"),
        )
        _loop(core, sub, pub, monitor, receiver, sender, stop)
    finally:
        if store is not None:
            store.close()
        if metrics is not None:
            metrics.close()
        receiver.close()
        sub.close(0)
        if monitor is not None:
            with contextlib.suppress(zmq.ZMQError):
                pub.disable_monitor()
            monitor.close(0)
        pub.close(0)
        gatekeeper.stop()
        if watch is not None:
            watch.close()
        context.term()
        for sig, handler in previous.items():  # last: a second signal must not cut this short
            signal.signal(sig, handler)
    log.info("stopped")
    return 0


ZAP_DOMAIN = curve.ZAP_DOMAIN.encode()
HEAP_TRIM_FOR_S = 5.0  # after a disconnect, give freed memory back to the system for this long
HEAP_TRIM_EVERY_S = 1.0  # ... at most this often


class Gatekeeper(curve.Authenticator):
    """pyzmq's ZAP handler (its own thread): refuses the handshakes of banned addresses, and
    with ``--curve-allow`` every key not allowed."""

    def __init__(
        self,
        context: zmq.Context[zmq.Socket[bytes]],
        bans: Bans,
        config: AggConfig,
        core: Aggregator,
    ) -> None:
        super().__init__(
            context, config.curve.allow, core.auth_refused_total.inc, "polyfan.agg.zap"
        )
        self.bans = bans

    def refusal(self, address: str) -> bytes | None:
        if self.bans.is_banned(address, time.monotonic()):
            return b"banned for flooding subscriptions"
        return None


def _heap_trimmer() -> Callable[[], None]:
    """glibc's malloc_trim: memory libzmq freed (a dropped peer's subscriptions) goes back to
    the system instead of staying in the process; a no-op where there is no glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None

    def trimmed() -> None:
        trim(0)

    return trimmed


def _ban(core: Aggregator, address: str) -> None:
    if core.bans.ban(address, time.monotonic()):
        core.peers_banned_total.value += 1
        core.warn_peers_banned(address)


def _peer_name(fd: int) -> object:
    """Both ends of the connection on ``fd`` (None when it is gone): what tells a peer from
    whatever holds the same descriptor number later."""
    try:
        with socket.socket(fileno=os.dup(fd)) as peer:
            return (peer.getsockname(), peer.getpeername())
    except OSError:
        return None


class Connections:
    """The XPUB's connections by descriptor, as the monitor reported them: the agg acts on a
    descriptor (disconnects it, bans its address) only while it is still that connection."""

    def __init__(self) -> None:
        self.names: dict[int, object] = {}

    def opened(self, fd: int) -> None:
        self.names[fd] = _peer_name(fd)

    def closed(self, fd: int) -> None:
        self.names.pop(fd, None)

    def is_same(self, fd: int) -> bool:
        name = self.names.get(fd)
        return name is not None and name == _peer_name(fd)

    def address(self, fd: int) -> str:
        """The peer's IP address ("" for ipc, or when the descriptor is no longer it)."""
        name = self.names.get(fd)
        if not self.is_same(fd) or not isinstance(name, tuple):
            return ""
        peer = name[1]
        return str(peer[0]) if isinstance(peer, tuple) else ""

    def disconnect(self, fd: int) -> None:
        """Shut the connection down under libzmq, which then drops it (and everything it
        subscribed) as if the peer had gone; the descriptor itself stays libzmq's to close.
        Nothing is done if the descriptor is no longer that connection."""
        if not self.is_same(fd):
            log.debug("peer fd %d is gone or another connection now: not disconnected", fd)
            return
        try:
            with socket.socket(fileno=os.dup(fd)) as peer:
                peer.shutdown(socket.SHUT_RDWR)
        except OSError as exc:
            log.debug("disconnecting peer fd %d: %s", fd, exc)


def queued_bytes(fd: int) -> int:
    """Bytes the kernel still holds to send on ``fd`` (TIOCOUTQ: tcp and unix sockets)."""
    try:
        return int(struct.unpack("i", fcntl.ioctl(fd, termios.TIOCOUTQ, b"\0\0\0\0"))[0])
    except OSError:
        return 0


def _peer_events(core: Aggregator, monitor: zmq.Socket[bytes], connections: Connections) -> None:
    """Connections opened and closed on the XPUB, from its monitor (value: the fd).

    libzmq writes a connection's ACCEPTED (and the DISCONNECTED of the one that held its
    descriptor before) ahead of its first message, but on another socket: a peer's messages can
    be read before the monitor's word of it. Reading ``ZMQ_EVENTS`` first makes the monitor
    take every event written so far (a non-blocking recv looks only every ~1 ms), so called
    after each XPUB message, this has seen that message's connection open."""
    while int(monitor.getsockopt(zmq.EVENTS)) & zmq.POLLIN:
        try:
            event = zmq.utils.monitor.recv_monitor_message(monitor, zmq.NOBLOCK)
        except zmq.Again:
            return
        fd = int(event["value"])
        if event["event"] == zmq.EVENT_ACCEPTED:
            connections.opened(fd)
            if not core.peer_connected(fd):
                connections.disconnect(fd)
        else:
            connections.closed(fd)
            core.peer_gone(fd)


def _loop(
    core: Aggregator,
    sub: zmq.Socket[bytes],
    pub: zmq.Socket[bytes],
    monitor: zmq.Socket[bytes],
    receiver: zmqio.AnyReceiver,
    sender: zmqio.AnySender,
    stop: _Stop,
) -> None:
    poller = zmq.Poller()
    poller.register(sub, zmq.POLLIN)
    poller.register(pub, zmq.POLLIN)
    poller.register(monitor, zmq.POLLIN)
    receive = receiver.receive
    send_bars = sender.send
    send = pub.send
    noblock = zmq.NOBLOCK
    again = zmq.Again
    connections = Connections()

    def waiting() -> bool:
        return bool(sub.poll(0))

    now = time.monotonic()
    next_announce = now
    next_trim = now + TRIM_EVERY_S
    trim_heap = _heap_trimmer()
    trim_heap_until = next_heap_trim = 0.0
    next_report = now + THROUGHPUT_EVERY_S
    trades_at_report = 0.0
    bars_at_report = 0.0
    bar_delay = core.bar_delay
    while not stop.requested:
        events = dict(poller.poll(POLL_MS))
        if sub in events:
            woke = time.perf_counter()
            out = core.batch_received(*receive())
            send_bars(out.buffer, out.offsets, out.count)
            for message in out.control:
                send(message)
            if out.count:
                bar_delay.observe(time.perf_counter() - woke, len(out.series))
            core.batch_sent(out)  # the history, once the bars are out
        if monitor in events:
            _peer_events(core, monitor, connections)
        if pub in events:
            for _ in range(1000):
                try:
                    received = pub.recv(noblock, copy=False)
                except again:
                    break
                # its connection's ACCEPTED before the message is judged (a new peer, or a
                # reused descriptor starting over), even one accepted during this pass
                _peer_events(core, monitor, connections)
                frame = received.bytes
                try:
                    fd = int(received.get(zmq.SRCFD))
                except zmq.ZMQError:
                    fd = -1
                try:
                    outcome = core.peer_message(fd, frame)
                except Exception:  # a request must never take the bars down with it
                    core.bad_requests_total.value += 1
                    log.exception("request %.200r failed; the agg carries on", frame)
                    continue
                if outcome.disconnect is not None:
                    if outcome.ban:
                        _ban(core, connections.address(outcome.disconnect))
                    connections.disconnect(outcome.disconnect)
                    trim_heap_until = time.monotonic() + HEAP_TRIM_FOR_S
                if outcome.reply is not None:
                    send(outcome.reply)
        now = time.monotonic()
        if not waiting():  # (a long pass is not the proxy's silence)
            for message in core.silence_checked(int(now * 1000)):
                send(message)
        if now >= next_announce:
            send(core.announce())
            next_announce = now + ANNOUNCE_EVERY_S
        if now < trim_heap_until and now >= next_heap_trim:
            trim_heap()
            next_heap_trim = now + HEAP_TRIM_EVERY_S
        if now >= next_trim:
            for fd in core.peers.awaiting_replies():
                core.peers.queue_seen(fd, queued_bytes(fd))
            core.tick(waiting)
            next_trim = now + TRIM_EVERY_S
        if now >= next_report:
            elapsed = THROUGHPUT_EVERY_S + (now - next_report)
            trades = core.trades_total.value
            bars = core.bars_total.value
            log.info(
                "%.0f trades/s, %.0f bars/s, %d open bars, %d symbols, %d late, %d gaps",
                (trades - trades_at_report) / elapsed,
                (bars - bars_at_report) / elapsed,
                core.bars.open_bars,
                len(core.decoder.symbol_names),
                core.late_total.value,
                core.gaps_total.value,
            )
            trades_at_report, bars_at_report = trades, bars
            next_report = now + THROUGHPUT_EVERY_S
