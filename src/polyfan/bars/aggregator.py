"""The agg's core: received frames in, messages to publish out; requests in, replies out.

No sockets here: :mod:`polyfan.agg` moves bytes between ZeroMQ and this class. One call per
received batch (``frames_received``) decodes every frame with one kernel call, applies every
trade to every interval with one more, closes the bars the feed clock has passed, stores them in
the history and returns the messages to publish: the bars (one message per topic, oldest first),
then the relayed UPSTREAM and CLOCK control messages and any OUTAGE change under this agg's own
session and sequence numbers. What may have been missed (:mod:`polyfan.bars.outages`) is decided
from each batch and from ``silence_checked`` between batches. ``upstream_received`` answers what arrives on the XPUB: subscriptions (an announce when
someone subscribes to the control topic) and history / symbols requests (docs/architecture.md,
"Requests to an agg, exactly").
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from polyfan.bars import conditions
from polyfan.bars.history import History
from polyfan.bars.outages import Change, Outages, describe
from polyfan.bars.state import Bars
from polyfan.config import AggConfig
from polyfan.errors import WireError
from polyfan.fanout import protocol
from polyfan.jit import chosen
from polyfan.metrics import Registry
from polyfan.wire import codec, decode, encode, peers
from polyfan.wire.ingest import FrameDecoder, join_frames, split_frames

log = logging.getLogger("polyfan.agg")

_REPLY_RE = re.compile(r"[0-9a-f]{16,64}")  # a reply route (peers._ROUTE)
MAX_REPLY_BARS = 20_000  # bars in one HISTORY reply at most (docs/limits.md); a larger limit is
# BAD_REQUEST, no limit means the most recent MAX_REPLY_BARS
_U64_MAX = 2**64 - 1
_I64_MIN, _I64_MAX = -(2**63), 2**63 - 1
# agg --store: memory keeps bars not yet sealed on disk past --history, by this much at most
HOLD_UNSEALED_MAX_MS = 10 * 60_000
WARN_EVERY_S = 5.0  # a continuing loss is one WARNING per this many seconds, with its count
BAR_TOPIC_WIDTH = 8 + decode.TOPIC_WIDTH  # "60000Ms." + the longest symbol a topic can carry
BAR_SIZE = codec.BAR_DTYPE.itemsize
# polyfan_agg_bar_delay_seconds's bucket bounds: sub-millisecond to a stalled second
BAR_DELAY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.003, 0.004, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
    0.5, 1.0,
)  # fmt: skip
SUBSCRIBE = 1
UNSUBSCRIBE = 0


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


def _channel(value: Any) -> protocol.Channel | None:
    """The channel a history request names (the bridge's grammar), or None."""
    try:
        return protocol.parse_channel(value) if isinstance(value, str) else None
    except protocol.ChannelError:
        return None


def _optional_int(value: Any) -> bool:
    """None, or an int the kernels can take (JSON allows up to 2**64 - 1; int64 stops short)."""
    return value is None or (
        isinstance(value, int) and not isinstance(value, bool) and _I64_MIN <= value <= _I64_MAX
    )


class StoredBars(Protocol):
    """Closed bars on disk (:class:`polyfan.store.BarStore`, ``agg --store``)."""

    stored_to: int | None  # the feed clock of the last flush a previous process made

    def put(self, series: np.ndarray, bars: np.ndarray, clock: int | None) -> None: ...

    def clocked(self, clock: int | None) -> None: ...

    def select(
        self, name: str, interval: int, since: int | None, before: int | None, limit: int | None
    ) -> np.ndarray: ...

    def oldest_stored(self) -> int | None: ...

    def unsealed_from(self) -> int | None: ...


_NO_SERIES = np.zeros(0, dtype=np.int64)
_NO_BARS = np.zeros(0, dtype=codec.BAR_DTYPE)


@dataclass(frozen=True, slots=True)
class PeerOutcome:
    """What one upstream message from a peer asks of the shell: a message to publish, and a
    peer (file descriptor) to disconnect."""

    reply: bytes | None = None
    disconnect: int | None = None
    ban: bool = False  # refuse the disconnected peer's address for a while (peers.Bans)


_NOTHING = PeerOutcome()


@dataclass(frozen=True, slots=True)
class Outgoing:
    """What one batch makes to publish, in this order: ``count`` BARS messages in one buffer
    (message i is ``buffer[offsets[i]:offsets[i + 1]]``, one per topic, oldest first), then
    the relayed control messages (UPSTREAM, CLOCK). ``series`` and ``bars`` are the closed
    bars themselves, stored in the history by :meth:`Aggregator.batch_sent`."""

    buffer: np.ndarray
    offsets: np.ndarray
    count: int
    control: list[bytes]
    series: np.ndarray
    bars: np.ndarray

    def messages(self) -> list[bytes]:
        """Every message, as bytes, in publishing order."""
        return [*split_frames(self.buffer, self.offsets, self.count), *self.control]


class Aggregator:
    """Bars for every symbol and interval of one agg, with their history and announce."""

    def __init__(
        self,
        config: AggConfig,
        registry: Registry | None = None,
        *,
        session: int | None = None,
        jit: bool = True,
        peer_limits: peers.PeerLimits | None = None,
        store: StoredBars | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.session = session if session is not None else int.from_bytes(os.urandom(8), "little")
        self.intervals = tuple(config.intervals_ms)
        self.decoder = FrameDecoder(config.symbols, jit=jit)
        self.bars = Bars(
            self.intervals,
            config.grace_ms,
            conditions.load_rules(config.conditions, config.conditions_file),
            jit=jit,
        )
        self.history = History(config.history_ms, jit=jit)
        self.sequencer = codec.Sequencer(self.session)
        self._encode_bars: Callable[..., Any] = chosen(encode.encode_bars, jit)
        self._bar_topics_for = 0  # symbols whose bar topics are in the table
        self._bar_topic_bytes = np.zeros((0, BAR_TOPIC_WIDTH), dtype=np.uint8)
        self._bar_topic_len = np.zeros(0, dtype=np.int64)
        self._bar_seqs = np.zeros(0, dtype=np.int64)  # last sequence number per bar topic
        self._relayed_clock: tuple[int, int] | None = None
        # The feed clock when this agg first heard the proxy: bars starting at or before it may
        # lack trades sent before it listened (announced as "from"; a bridge with another agg
        # serving the same channel prefers that agg's bars for them).
        self.listening_from: int | None = None
        # With --store: the feed clock of the previous process's last flush. Every bar it
        # closed by then is on disk: the clock starts there (a trade for such a bar is late,
        # as it would have been), and the window from there to the first CLOCK heard is one
        # this agg was not listening in (its bars carry outage: true).
        self.stored_to = None if store is None else store.stored_to
        if self.stored_to is not None:
            self.decoder.state[decode.D_CLOCK] = self.stored_to
        # an outage is over once the clock is a grace past the clock that ended it: each
        # topic's gap after a cut, found as its first message since arrives, joins it
        # (bars/outages.py, docs/outages.md)
        self.outages = Outages(settle_ms=config.grace_ms)
        self._windows_revision = 0  # the outages' revision the bars last got
        self._warned: dict[str, tuple[float, int]] = {}
        self.debug = log.isEnabledFor(logging.DEBUG)
        registry = registry or Registry()
        self.registry = registry
        self.trades_total = registry.counter(
            "polyfan_agg_trades_total", "Trades received from the proxy."
        )
        self.late_total = registry.counter(
            "polyfan_agg_late_trades_total",
            "Trades whose bar had already closed, once per interval they were late for.",
        )
        self.gaps_total = registry.counter(
            "polyfan_agg_gaps_total", "Messages lost between proxy and agg (sequence gaps)."
        )
        self.bars_total = registry.counter("polyfan_agg_bars_total", "Bars published.")
        self.outages_total = registry.counter(
            "polyfan_agg_outages_total",
            "Outages begun: windows in which trades may have been missed (upstream down, proxy "
            "restarted, messages lost, or nothing heard from the proxy for 2 s).",
        )
        self.unknown_total = registry.counter(
            "polyfan_agg_unknown_conditions_total",
            "Trades carrying a condition code not in the table.",
        )
        self.bad_total = registry.counter(
            "polyfan_agg_bad_messages_total",
            "Received messages that did not decode, and trades beyond the input bounds.",
        )
        self.ignored_total = registry.counter(
            "polyfan_agg_ignored_messages_total",
            "Received messages on a topic or of a kind the agg does not use.",
        )
        self.requests_total = registry.counter(
            "polyfan_agg_requests_total", "History and symbols requests answered."
        )
        self.bad_requests_total = registry.counter(
            "polyfan_agg_bad_requests_total", "Requests that were malformed or not served."
        )
        self.refused_subscriptions_total = registry.counter(
            "polyfan_agg_refused_subscriptions_total",
            "Subscriptions to nothing the agg publishes (the peer stays; each costs its "
            "allowance).",
        )
        self.refused_requests_total = registry.counter(
            "polyfan_agg_refused_requests_total",
            "Requests not answered: the peer had too many reply bytes in flight, or named a "
            "reply route it does not subscribe itself.",
        )
        self.auth_refused_total = registry.counter(
            "polyfan_agg_auth_refused_total",
            "ZeroMQ handshakes refused: a key not in --curve-allow, or a banned address.",
        )
        self.peers_banned_total = registry.counter(
            "polyfan_agg_peers_banned_total",
            "Peer addresses refused at the handshake for a while after flooding subscriptions.",
        )
        self.bans = peers.Bans()
        self.peers_disconnected_total = registry.counter(
            "polyfan_agg_peers_disconnected_total",
            "Peers the agg disconnected: one too many, over their subscription allowance, or "
            "subscribed to read other peers' replies.",
        )
        if peer_limits is None:
            allowance = config.peer_subscriptions
            peer_limits = peers.PeerLimits(max_subscriptions=allowance, max_total=10 * allowance)
        self.peers = peers.PeerTable(self.intervals, peer_limits)
        self.open_bars_gauge = registry.gauge("polyfan_agg_open_bars", "Bars open now.")
        self.symbols_gauge = registry.gauge("polyfan_agg_symbols", "Symbols seen.")
        self.history_gauge = registry.gauge("polyfan_agg_history_series", "Series with history.")
        self.packed_gauge = registry.gauge(
            "polyfan_agg_history_packed_bytes",
            "Bytes of history in packed records (live log segments).",
        )
        self.bar_delay = registry.histogram(
            "polyfan_agg_bar_delay_seconds",
            "Per bar: from the moment the feed clock passed its end plus the grace (the agg "
            "woke to read the batch carrying that CLOCK) to its publication (the batch's bars "
            "sent).",
            BAR_DELAY_BUCKETS,
        )
        registry.alias(
            "polyfan_agg_publish_delay_seconds",
            "The same observations as polyfan_agg_bar_delay_seconds (its earlier name).",
            self.bar_delay,
        )
        registry.on_collect(self._collect)

    def _collect(self) -> None:
        self.open_bars_gauge.value = self.bars.open_bars
        self.symbols_gauge.value = len(self.decoder.symbol_names)
        self.history_gauge.value = len(self.history)
        self.packed_gauge.value = self.history.cold_bytes

    # --- trades in, bars out ------------------------------------------------------------

    def frames_received(self, frames: Sequence[bytes], now_ms: int | None = None) -> list[bytes]:
        """Handle one batch of frames from the proxy; return the messages to publish (their
        bars are already in the history)."""
        out = self.batch_received(*join_frames(frames), now_ms)
        self.batch_sent(out)
        return out.messages()

    def batch_received(
        self, buffer: np.ndarray, offsets: np.ndarray, count: int, now_ms: int | None = None
    ) -> Outgoing:
        """Handle one batch of ``count`` frames held in one buffer (frame i is
        ``buffer[offsets[i]:offsets[i + 1]]``) that arrived at monotonic ``now_ms``; return
        what to publish, in order. Call :meth:`batch_sent` once it is published: storing the
        bars in the history waits until then, so that it does not delay them (before any
        request is answered)."""
        now_ms = _now_ms() if now_ms is None else now_ms
        decoder = self.decoder
        bad_before = decoder.bad_messages
        gaps_before = decoder.gaps
        clock_before = decoder.clock
        outages = self.outages
        outages.heard(now_ms)
        changes: list[Change] = []
        control: list[bytes] = []
        gaps_noted = gaps_before

        def lost(clock: int | None) -> None:
            """Messages lost in this batch so far (a gap) are an outage from the clock before
            the batch (``clock`` before the first)."""
            nonlocal gaps_noted
            at = clock_before if clock_before is not None else clock
            if decoder.gaps != gaps_noted and at is not None:
                changes.extend(outages.lost(at))
                gaps_noted = decoder.gaps

        def special(frame: bytes, clock: int | None) -> None:  # in arrival order
            changes.extend(self._settled(now_ms))
            # losses before the frame come first: an UPSTREAM down (or a restart) later in the
            # batch must not start the window at its own, later, clock
            lost(clock)
            changes.extend(self._control_frame(frame, clock, now_ms, control))
            self._arm()

        self._arm()
        batch = decoder.decode_buffer(buffer, offsets, count, special)
        self.trades_total.value += len(batch.trades)
        late_before = self.bars.late_trades
        self.bars.add_trades(batch.trades, batch.symbols, batch.clocks)
        self._count(bad_before, gaps_before, late_before)
        changes += self._settled(now_ms)
        lost(decoder.clock)
        clock = decoder.clock
        if self.listening_from is None and clock is not None:
            self.listening_from = clock
            outages.started(clock, self.stored_to)
        if decoder.control_session is not None:  # the first one is never a special
            outages.session_heard(decoder.control_session, now_ms)
        self._outages_changed(changes)
        series, bars = self._bars_to_close()
        buffer, offsets, count = self._encode_closed(series, bars)
        if clock is not None and self._relayed_clock != (clock, decoder.clock_wall):
            self._relayed_clock = (clock, decoder.clock_wall)
            record = np.array([self._relayed_clock], dtype=codec.CLOCK_DTYPE)
            control.append(self._encode(codec.CONTROL_TOPIC, codec.Kind.CLOCK, 1, record.tobytes()))
        control += map(self._outage_message, changes)
        return Outgoing(buffer, offsets, count, control, series, bars)

    def _arm(self) -> None:
        """An outage whose causes have cleared ends at the first CLOCK past its start: the
        decoder notes it as it decodes, in arrival order."""
        self.decoder.close_past(self.outages.closes_past())

    def _settled(self, now_ms: int) -> list[Change]:
        """End the outage the decoder saw a CLOCK end (see :meth:`_arm`)."""
        clock = self.decoder.closed_at()
        return [] if clock is None else self.outages.clock_received(clock, now_ms)

    def silence_checked(self, now_ms: int | None = None) -> list[bytes]:
        """Between batches: an outage begins when nothing has come from the proxy for 2 s;
        return the messages that say so."""
        now_ms = _now_ms() if now_ms is None else now_ms
        changes = self.outages.silent(now_ms, self.decoder.clock)
        self._outages_changed(changes)
        return [self._outage_message(change) for change in changes]

    def _outages_changed(self, changes: list[Change]) -> None:
        """Give the bars the windows when they changed, count and log the changes."""
        outages = self.outages
        if outages.revision != self._windows_revision:
            self.bars.set_outages(outages.windows)
            self._windows_revision = outages.revision
        self.outages_total.value = outages.began_total
        for change in changes:
            if change.e is None:
                log.warning(
                    "outage begins at feed clock %d: %s; bars from then carry outage: true",
                    change.s,
                    describe(change.causes),
                )
            else:
                log.warning(
                    "outage over: feed clock %d to %d (%.3f s) marked as outage (%s)",
                    change.s,
                    change.e,
                    (change.e - change.s) / 1000,
                    describe(change.causes),
                )

    def _outage_message(self, change: Change) -> bytes:
        return self.sequencer.encode_json(codec.CONTROL_TOPIC, codec.Kind.OUTAGE, change.as_json())

    def batch_sent(self, out: Outgoing) -> None:
        """The batch ``out`` has been published: store its bars in the history (and queue
        them for the disk with ``--store``)."""
        if len(out.series):
            self.history.add_closed(out.series, out.bars)
        if self.store is not None:
            if len(out.series):
                self.store.put(out.series, out.bars, self.decoder.clock)
            self.store.clocked(self.decoder.clock)

    def _count(self, bad_before: int, gaps_before: int, late_before: int) -> None:
        decoder = self.decoder
        self.unknown_total.value = self.bars.unknown_conditions
        self.ignored_total.value = decoder.ignored_messages
        if decoder.bad_messages != bad_before:
            self.bad_total.value = decoder.bad_messages
            self._warn("bad", decoder.bad_messages, "%d messages (or out-of-bounds trades) dropped")
        if decoder.gaps != gaps_before:
            self.gaps_total.value = decoder.gaps
            self._warn("gaps", decoder.gaps, "%d messages from the proxy lost in transit")
        if self.bars.late_trades != late_before:
            self.late_total.value = self.bars.late_trades
            if self.debug:
                log.debug("%d late trades not applied", self.bars.late_trades - late_before)

    def _warn(self, what: str, total: int, message: str) -> None:
        """A WARNING with the count since the last one, at most every WARN_EVERY_S seconds."""
        now = time.monotonic()
        last_at, last_total = self._warned.get(what, (-WARN_EVERY_S, 0))
        if now - last_at >= WARN_EVERY_S:
            log.warning(message, total - last_total)
            self._warned[what] = (now, total)

    def _control_frame(
        self, frame: bytes, clock_before: int | None, now_ms: int, relay: list[bytes]
    ) -> list[Change]:
        """A control frame the decoder handed back, ``clock_before`` the feed clock before
        it: another publisher session (the proxy restarted), or an UPSTREAM down/up (relayed
        under this agg's session)."""
        try:
            message = codec.decode(frame)
        except WireError:
            return []
        changes = self.outages.session_seen(message.session, clock_before, now_ms)
        if message.kind is not codec.Kind.UPSTREAM:
            return changes
        for state, clock, wall in codec.records(message).tolist():
            if state == codec.UPSTREAM_DOWN:
                log.warning("proxy reports the upstream down at feed clock %d", clock)
                changes += self.outages.upstream_down(clock, wall)
            else:
                log.info("proxy reports the upstream up again")
                changes += self.outages.upstream_up(wall)
        relay.append(
            self._encode(
                codec.CONTROL_TOPIC, codec.Kind.UPSTREAM, message.count, bytes(message.payload)
            )
        )
        return changes

    def bars_closed(self) -> list[bytes]:
        """Close what the feed clock has passed; one BARS message per topic, oldest first
        (the bars are stored in the history)."""
        series, bars = self._bars_to_close()
        if len(series):
            self.history.add_closed(series, bars)
            if self.store is not None:
                self.store.put(series, bars, self.decoder.clock)
        return split_frames(*self._encode_closed(series, bars))

    def _bars_to_close(self) -> tuple[np.ndarray, np.ndarray]:
        """The bars the feed clock has passed: ``(series ids, BAR records)``, counted."""
        clock = self.decoder.clock
        if clock is None:
            return _NO_SERIES, _NO_BARS
        series, bars = self.bars.closed_bars(clock)
        self.bars_total.value += len(series)
        return series, bars

    def _encode_closed(
        self, series: np.ndarray, bars: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Closed bars as one BARS message per topic, in one buffer: ``(buffer, offsets,
        count)``."""
        count = len(series)
        if count == 0:
            return np.zeros(1, np.uint8), np.zeros(1, np.int64), 0
        self._ensure_bar_topics()
        out = np.empty(count * (BAR_TOPIC_WIDTH + 1 + codec.HEADER.size + BAR_SIZE), np.uint8)
        offsets = np.empty(count + 1, dtype=np.int64)
        messages = self._encode_bars(
            series,
            bars.view(np.uint8),
            (self._bar_topic_bytes, self._bar_topic_len),
            self._bar_seqs,
            np.uint64(self.session),
            out,
            offsets,
        )
        return out, offsets, int(messages)

    def _grow_bar_topics(self, size: int) -> None:
        grown = np.zeros((size, BAR_TOPIC_WIDTH), dtype=np.uint8)
        grown[: len(self._bar_topic_bytes)] = self._bar_topic_bytes
        self._bar_topic_bytes = grown
        self._bar_topic_len = np.concatenate(
            [self._bar_topic_len, np.zeros(size - len(self._bar_topic_len), np.int64)]
        )
        self._bar_seqs = np.concatenate(
            [self._bar_seqs, np.zeros(size - len(self._bar_seqs), np.int64)]
        )

    def _ensure_bar_topics(self) -> None:
        """Topic bytes (without terminator) and sequence numbers for every series."""
        names = self.decoder.symbol_names
        n_int = len(self.intervals)
        have = self._bar_topics_for
        if have == len(names):
            return
        need = len(names) * n_int
        if need > len(self._bar_topic_len):
            self._grow_bar_topics(max(need, 2 * len(self._bar_topic_len)))
        for symbol in range(have, len(names)):
            for k, interval in enumerate(self.intervals):
                topic = codec.bar_topic(interval, names[symbol])[:-1][:BAR_TOPIC_WIDTH]
                row = symbol * n_int + k
                self._bar_topic_bytes[row, : len(topic)] = np.frombuffer(topic, np.uint8)
                self._bar_topic_len[row] = len(topic)
        self._bar_topics_for = len(names)

    def _encode(self, topic: bytes, kind: codec.Kind, count: int, payload: bytes) -> bytes:
        return self.sequencer.encode(topic, kind, count, payload)

    def tick(self, busy: Callable[[], bool] | None = None) -> None:
        """Housekeeping between batches: grow the open-bar pool and the bar topic table ahead
        of need, trim and pack
        the history against the feed clock, packing later when ``busy()`` says messages are
        waiting."""
        self.bars.keep_room()
        if 4 * len(self.decoder.symbol_names) * len(self.intervals) > 3 * len(self._bar_topic_len):
            self._grow_bar_topics(2 * len(self._bar_topic_len))  # ahead of the batch needing it
        clock = self.decoder.clock
        if clock is not None:
            hold = None if self.store is None else self.store.unsealed_from()
            if hold is not None:
                # a bar is in memory or in a sealed segment, never neither; unless the store
                # is stuck that long (its errors are logged): then memory goes back to --history
                hold = max(hold, clock - self.history.keep_ms - HOLD_UNSEALED_MAX_MS)
            self.history.trim(clock, busy, hold)
            self.outages.forget_before(self.bars.outages_needed_after(clock))
            self._outages_changed([])

    # --- the XPUB side: subscriptions and requests --------------------------------------

    def announce(self) -> bytes:
        symbols = self.config.symbols
        value = {
            "session": self.session,
            "intervals": list(self.intervals),
            "symbols": None if symbols is None else list(symbols),
            "grace": self.config.grace_ms,
            "history": self.config.history_ms,
            "from": self.listening_from,
            "outage": None if (now := self.outages.current()) is None else now.as_json(),
            "last_outage": None if (last := self.outages.last_closed) is None else last.as_json(),
        }
        if self.store is not None:
            # history on disk: bars from "from" on (whole unless marked outage), up to "to"
            # for a restarted agg (its previous process's last flush; what came between that
            # and this agg's own "from" is missing, and its bars carry outage: true)
            value["stored"] = {"from": self.store.oldest_stored(), "to": self.stored_to}
        return self.sequencer.encode_json(codec.CONTROL_TOPIC, codec.Kind.ANNOUNCE, value)

    def peer_connected(self, fd: int) -> bool:
        """A connection on the XPUB (monitor ACCEPTED); False: disconnect it, one too many."""
        if self.peers.connected(fd):
            return True
        self._peer_disconnected(fd, f"more than {self.peers.limits.max_peers} peers")
        return False

    def peer_gone(self, fd: int) -> None:
        """A connection on the XPUB ended (monitor DISCONNECTED)."""
        self.peers.disconnected(fd)

    def _peer_disconnected(self, fd: int, reason: str) -> None:
        self.peers.leave(fd)
        self.peers_disconnected_total.value += 1
        self._warn(
            "peers",
            int(self.peers_disconnected_total.value),
            "%d ZeroMQ peers disconnected (the latest: " + reason.replace("%", "%%") + ")",
        )

    def warn_peers_banned(self, address: str) -> None:
        self._warn(
            "bans",
            int(self.peers_banned_total.value),
            "%d peer addresses banned for "
            + f"{self.bans.seconds:g} s for flooding subscriptions (the latest: {address})".replace(
                "%", "%%"
            ),
        )

    def peer_message(self, fd: int, frame: bytes) -> PeerOutcome:
        """A frame from the XPUB sent by the peer on file descriptor ``fd`` (``ZMQ_SRCFD``;
        negative for the unsubscriptions ZeroMQ makes when a peer leaves)."""
        if fd < 0 or not self.peers.is_known(fd) or self.peers.is_leaving(fd):
            # ZeroMQ's own unsubscriptions for a peer that left (no fd), or what a connection
            # the monitor has seen close still had queued: judging it would start a new peer
            return _NOTHING
        if frame and frame[0] in (SUBSCRIBE, UNSUBSCRIBE):
            topic = frame[1:]
            decision = self.peers.subscription(fd, topic, frame[0] == SUBSCRIBE)
            if decision.verdict is peers.Verdict.DISCONNECT:
                assert decision.disconnect is not None
                self._peer_disconnected(decision.disconnect, f"{topic[:80]!r}: {decision.reason}")
                return PeerOutcome(disconnect=decision.disconnect, ban=decision.ban)
            if decision.verdict is peers.Verdict.REFUSED:
                self.refused_subscriptions_total.value += 1
                self._warn(
                    "subscriptions",
                    int(self.refused_subscriptions_total.value),
                    "%d subscriptions refused (the latest: "
                    + f"{topic[:80]!r}: {decision.reason}".replace("%", "%%")
                    + ")",
                )
                return _NOTHING
            return PeerOutcome(self.upstream_received(frame))
        reply = self.upstream_received(frame, lambda route: self.peers.holds_route(fd, route))
        if reply is None:
            return _NOTHING
        if not self.peers.may_reply(fd, len(reply)):
            self._refuse_request("reply bytes in flight over the allowance")
            return _NOTHING
        return PeerOutcome(reply)

    def _refuse_request(self, reason: str) -> None:
        self.refused_requests_total.value += 1
        self._warn(
            "refused",
            int(self.refused_requests_total.value),
            "%d requests not answered (the latest: " + reason + ")",
        )

    def _bad_request(self, detail: str) -> None:
        self.bad_requests_total.value += 1
        self._warn(
            "requests",
            int(self.bad_requests_total.value),
            "%d bad requests (the latest: " + detail.replace("%", "%%") + ")",
        )

    def upstream_received(
        self, frame: bytes, may_reply_on: Callable[[str], bool] | None = None
    ) -> bytes | None:
        """A frame from the XPUB: a (un)subscription or a request; return what to publish.
        ``may_reply_on(route)``: whether the requester itself subscribes the reply route."""
        if not frame:
            return None
        if frame[0] == SUBSCRIBE:
            return self.announce() if codec.CONTROL_TOPIC.startswith(frame[1:]) else None
        if frame[0] == UNSUBSCRIBE:
            return None
        try:
            request = codec.decode_request(frame)
        except WireError as exc:
            self._bad_request(str(exc))
            return None
        return self.request_received(request, may_reply_on)

    def request_received(
        self, request: dict[str, Any], may_reply_on: Callable[[str], bool] | None = None
    ) -> bytes | None:
        reply = request.get("reply")
        if not isinstance(reply, str) or _REPLY_RE.fullmatch(reply) is None:
            self._bad_request(f"no usable reply route: {str(request)[:200]}")
            return None
        if may_reply_on is not None and not may_reply_on(reply):
            self._refuse_request("the reply route is not the requester's own")
            return None
        topic = codec.reply_topic(reply)
        request_id = request.get("id")
        if not isinstance(request_id, int) or isinstance(request_id, bool):
            request_id = -1
        op = request.get("op", "bars")
        check = codec.channel_check(request.get("channel"))
        if not 0 <= request_id <= _U64_MAX or op not in ("bars", "symbols"):
            return self._history_reply(topic, 0, codec.HistoryStatus.BAD_REQUEST, check)
        if op == "symbols":
            self.requests_total.value += 1
            counts = self.decoder.symbol_trades
            names = self.decoder.symbol_names
            order = np.argsort(-counts[: len(names)], kind="stable")
            symbols = [[names[i], int(counts[i])] for i in order.tolist() if counts[i] > 0]
            return self.sequencer.encode_json(
                topic, codec.Kind.SYMBOLS, {"id": request_id, "op": "symbols", "symbols": symbols}
            )
        return self._bars_reply(topic, request_id, request, check)

    def _bars_reply(
        self, topic: bytes, request_id: int, request: dict[str, Any], check: int
    ) -> bytes:
        channel = _channel(request.get("channel"))
        since, before, limit = (request.get(k) for k in ("since", "before", "limit"))
        if (
            channel is None
            or channel.symbol is None
            or not (_optional_int(since) and _optional_int(before) and _optional_int(limit))
            or (limit is not None and not 0 <= limit <= MAX_REPLY_BARS)
        ):
            return self._history_reply(topic, request_id, codec.HistoryStatus.BAD_REQUEST, check)
        if limit is None:
            limit = MAX_REPLY_BARS
        interval, symbol = channel.interval, channel.symbol
        if interval not in self.intervals:
            return self._history_reply(
                topic, request_id, codec.HistoryStatus.INTERVAL_NOT_SERVED, check
            )
        if self.config.symbols is not None and symbol not in self.config.symbols:
            return self._history_reply(
                topic, request_id, codec.HistoryStatus.SYMBOL_NOT_SERVED, check
            )
        self.requests_total.value += 1
        symbol_id = self.decoder.known_symbol_id(symbol)
        if symbol_id is None:
            bars = np.zeros(0, dtype=codec.BAR_DTYPE)
        else:
            series = self.bars.series_id(symbol_id, interval)
            bars = self.history.select(series, since, before, limit)
        if self.store is not None and len(bars) < limit:
            # older bars from disk: those before the oldest in memory (the memory's copy of a
            # start wins, so each start comes once)
            older = self.store.select(
                symbol,
                interval,
                since,
                int(bars["s"][0]) if len(bars) else before,
                limit - len(bars),
            )
            if len(older):
                bars = np.concatenate([older, bars])
        return self.sequencer.encode_history(topic, request_id, codec.HistoryStatus.OK, bars, check)

    def _history_reply(
        self, topic: bytes, request_id: int, status: codec.HistoryStatus, check: int
    ) -> bytes:
        self.bad_requests_total.value += 1
        return self.sequencer.encode_history(
            topic, request_id, status, np.zeros(0, dtype=codec.BAR_DTYPE), check
        )
