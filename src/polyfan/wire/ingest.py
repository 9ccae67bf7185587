"""Turn a batch of received ZeroMQ frames into trade columns, in one kernel call.

:class:`FrameDecoder` owns the topic table (topic bytes -> symbol id or control), the per-topic
sequence state (gaps counted exactly as :class:`polyfan.wire.codec.GapCounter` counts them: a new
session id is a publisher restart, not a loss) and the feed clock (the largest CLOCK seen, so it
never runs backwards). ``decode(frames)`` returns the batch's trades in arrival order, each with
its symbol id and the feed clock at its arrival, plus the control frames other than CLOCK
(UPSTREAM, ...) and any control frame from a publisher session other than the one before it,
for the caller to handle; ``decode_buffer(buffer, offsets, count)`` does the same
for frames already in one buffer (the agg's compiled receive path). It is the same codec as :mod:`polyfan.wire.codec`, compiled:
the tests check the two agree frame for frame.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from polyfan.config import SYMBOL_RE
from polyfan.jit import chosen
from polyfan.wire import codec, decode
from polyfan.wire.topics import TopicTable

_INT64_MIN = int(np.iinfo(np.int64).min)
_INT64_MAX = int(np.iinfo(np.int64).max)
SpecialHandler = Callable[[bytes, "int | None"], None]  # the frame, the clock before it


@dataclass(frozen=True, slots=True)
class Batch:
    trades: np.ndarray  # TRADE_DTYPE records, arrival order
    symbols: np.ndarray  # int64 symbol id per trade
    clocks: np.ndarray  # int64 feed clock at each trade's arrival
    specials: list[bytes]  # control frames other than CLOCK, in arrival order


class TradeColumns:
    """Outputs that :meth:`FrameDecoder.decode_into` reuses from call to call (grown when a
    batch needs more room): a consumer that copies out what it keeps allocates nothing per
    batch but that copy (``polyfan.client.trade_batches``), and :meth:`grouped` makes that copy
    grouped by symbol in one kernel call."""

    def __init__(self, room: int = 1024, frames: int = 1024, *, jit: bool = True) -> None:
        self.room = 0
        self.frames = 0
        self._group: Callable[..., Any] = chosen(decode.group_by_symbol, jit)
        self._slot = np.full(64, -1, dtype=np.int64)
        self._allocate(room, frames)

    def _allocate(self, room: int, frames: int) -> None:
        self.room, self.frames = room, frames
        self.records = np.empty(room * decode.TRADE_SIZE, dtype=np.uint8)
        self.symbols = np.empty(room, dtype=np.int64)
        self.clocks = np.empty(room, dtype=np.int64)
        self.specials = np.empty(frames, dtype=np.int64)
        self._ids = np.empty(room, dtype=np.int64)
        self._bounds = np.empty(room + 1, dtype=np.int64)
        self._fill = np.empty(room, dtype=np.int64)
        self.outputs = (
            self.records,
            self.records.view(np.float64),
            self.symbols,
            self.clocks,
            self.specials,
        )

    def fit(self, room: int, frames: int) -> None:
        """Room for ``room`` trades from ``frames`` frames."""
        if room > self.room or frames > self.frames:
            self._allocate(max(room, 2 * self.room), max(frames, 2 * self.frames))

    def trades(self, count: int) -> np.ndarray:
        """The first ``count`` trades decoded, as TRADE_DTYPE records (overwritten next call)."""
        return self.records[: count * decode.TRADE_SIZE].view(codec.TRADE_DTYPE)

    def grouped(self, count: int, symbols: int) -> tuple[np.ndarray, list[int], list[int]]:
        """A copy of the first ``count`` trades grouped by symbol id (ids below ``symbols``):
        ``(records, ids, bounds)``, group g being symbol ``ids[g]``'s trades in arrival order,
        ``records[bounds[g]:bounds[g + 1]]``; the groups in the order of their first trade."""
        if symbols > len(self._slot):
            self._slot = np.full(max(symbols, 2 * len(self._slot)), -1, dtype=np.int64)
        out = np.empty(count * decode.TRADE_SIZE, dtype=np.uint8)
        groups = self._group(
            self.records,
            self.symbols,
            count,
            out,
            (self._slot, self._ids, self._bounds, self._fill),
        )
        return (
            np.ndarray((count,), codec.TRADE_DTYPE, out),
            self._ids[:groups].tolist(),
            self._bounds[: groups + 1].tolist(),
        )


def join_frames(frames: Sequence[bytes]) -> tuple[np.ndarray, np.ndarray, int]:
    """Frames as one buffer with offsets: ``(buffer, offsets, count)``."""
    offsets = np.zeros(len(frames) + 1, dtype=np.int64)
    np.cumsum([len(f) for f in frames], out=offsets[1:])
    return np.frombuffer(b"".join(frames), dtype=np.uint8), offsets, len(frames)


def split_frames(buffer: np.ndarray, offsets: np.ndarray, count: int) -> list[bytes]:
    """The messages of a buffer with offsets, as bytes."""
    if count == 0:
        return []
    bounds = offsets[: count + 1].tolist()
    data = buffer[: bounds[-1]].tobytes()
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


class FrameDecoder:
    """Topic table, sequence state and feed clock for one subscriber."""

    def __init__(self, symbols: Sequence[str] | None = None, *, jit: bool = True) -> None:
        self._decode: Callable[..., Any] = chosen(decode.decode_frames, jit)
        self._unknown: Callable[..., Any] = chosen(decode.unknown_topics, jit)
        self._accept = None if symbols is None else frozenset(symbols)
        self.symbol_names: list[str] = []
        self._symbol_ids: dict[str, int] = {}
        self._topics = TopicTable(decode.TOPIC_WIDTH, jit=jit)
        self._topic_sym = np.zeros(32, dtype=np.int64)
        self._last_session = np.zeros(32, dtype=np.uint64)
        self._last_seq = np.zeros(32, dtype=np.uint64)
        self._seen = np.zeros(32, dtype=np.uint8)
        self.symbol_trades = np.zeros(64, dtype=np.int64)
        self.state = np.zeros(decode.N_DECODER, dtype=np.int64)
        self._viewed: np.ndarray | None = None  # decode_into: the buffer last seen ...
        self._readonly = np.zeros(0, dtype=np.uint8)  # ... and its read-only view
        self.state[decode.D_CLOCK] = _INT64_MIN
        self.state[decode.D_CLOSE_PAST] = _INT64_MAX
        self.state[decode.D_CLOSED_AT] = _INT64_MIN
        self._add_topic(codec.CONTROL.encode(), decode.TOPIC_CONTROL)
        for symbol in symbols or ():
            self.symbol_id(symbol)

    # --- what it has seen ---------------------------------------------------------------

    @property
    def clock(self) -> int | None:
        """The feed clock: the largest CLOCK received so far (None before the first)."""
        return int(self.state[decode.D_CLOCK]) if self.state[decode.D_HAS_CLOCK] else None

    @property
    def clock_wall(self) -> int:
        return int(self.state[decode.D_CLOCK_WALL])

    @property
    def control_session(self) -> int | None:
        """The publisher session of the last control message (None before the first)."""
        return int(self._last_session[0]) if self._seen[0] else None

    def close_past(self, clock: int | None) -> None:
        """Note the first CLOCK from now on that takes the feed clock past ``clock`` (None:
        none); :meth:`closed_at` tells it."""
        self.state[decode.D_CLOSE_PAST] = _INT64_MAX if clock is None else clock

    def closed_at(self) -> int | None:
        """The feed clock the CLOCK asked for by :meth:`close_past` made, once, else None."""
        value = int(self.state[decode.D_CLOSED_AT])
        if value == _INT64_MIN:
            return None
        self.state[decode.D_CLOSED_AT] = _INT64_MIN
        return value

    @property
    def gaps(self) -> int:
        return int(self.state[decode.D_GAPS])

    @property
    def bad_messages(self) -> int:
        return int(self.state[decode.D_BAD])

    @property
    def rejected_trades(self) -> int:
        """Trades outside ``codec.MAX_PRICE`` / ``MAX_SIZE``, dropped (also in bad_messages)."""
        return int(self.state[decode.D_REJECTED])

    @property
    def ignored_messages(self) -> int:
        return int(self.state[decode.D_IGNORED])

    def symbol_id(self, symbol: str) -> int:
        """The id of ``symbol`` (registering it and its trade topic if new)."""
        sid = self._symbol_ids.get(symbol)
        if sid is None:
            sid = len(self.symbol_names)
            self._symbol_ids[symbol] = sid
            self.symbol_names.append(symbol)
            if sid >= len(self.symbol_trades):
                self.symbol_trades = np.concatenate(
                    [self.symbol_trades, np.zeros_like(self.symbol_trades)]
                )
            self._add_topic(codec.trade_topic(symbol)[:-1], sid)
        return sid

    def known_symbol_id(self, symbol: str) -> int | None:
        """The id of ``symbol`` if a trade topic of it has been registered, else None."""
        return self._symbol_ids.get(symbol)

    # --- the topic table ----------------------------------------------------------------

    def _add_topic(self, topic: bytes, sym: int) -> None:
        tid = self._topics.add(topic)
        if tid < 0:
            raise ValueError(f"topic longer than {decode.TOPIC_WIDTH} bytes: {topic!r}")
        if tid >= len(self._topic_sym):
            grow = len(self._topic_sym)
            for name in ("_topic_sym", "_last_session", "_last_seq", "_seen"):
                array = getattr(self, name)
                setattr(self, name, np.concatenate([array, np.zeros(grow, dtype=array.dtype)]))
        self._topic_sym[tid] = sym

    def _register_new_topics(self, buf: np.ndarray, offsets: np.ndarray, start: int) -> None:
        """Register every topic of the batch not yet in the table, from frame ``start`` on."""
        found = np.empty(len(offsets) - 1 - start, dtype=np.int64)
        count = self._unknown(buf, offsets, start, self._topics.arrays, found)
        seen: set[bytes] = set()
        for index in found[:count].tolist():
            frame = buf[offsets[index] : offsets[index + 1]].tobytes()
            topic = frame[: frame.index(codec.TERMINATOR)]
            if topic not in seen:
                seen.add(topic)
                self._register(topic)

    def _run(
        self,
        buf: np.ndarray,
        offsets: np.ndarray,
        outputs: tuple[np.ndarray, ...],
        special: SpecialHandler | None = None,
    ) -> None:
        """Run the decoder kernel over every frame of ``buf``: it stops at a topic it has not
        met (registered here, then it goes on from that frame) and, with ``special``, after
        each special frame (handed to it with the feed clock before it)."""
        state = self.state
        start = 0
        while True:
            start = self._decode(
                buf,
                offsets,
                start,
                self._topics.arrays,
                (self._topic_sym, self._last_session, self._last_seq, self._seen),
                self.symbol_trades,
                state,
                outputs,
            )
            if start == -1:
                return
            if start < -1:  # stopped after a special frame
                frame = -(start + 2)
                assert special is not None
                before = int(state[decode.D_SPECIAL_CLOCK])
                special(
                    buf[offsets[frame] : offsets[frame + 1]].tobytes(),
                    None if before == _INT64_MIN else before,
                )
                state[decode.D_SPECIALS] = 0
                start = frame + 1
                continue
            self._register_new_topics(buf, offsets, start)

    def _register(self, topic: bytes) -> None:
        # Only a symbol the proxy could have sent: its topic re-encodes to the same bytes (an
        # undecodable one would never be found in the table: the kernel would hand the same
        # frame back forever) and its bar topics fit the table.
        symbol = topic[2:].decode("ascii", errors="replace") if topic.startswith(b"T.") else ""
        if SYMBOL_RE.fullmatch(symbol) and (self._accept is None or symbol in self._accept):
            self.symbol_id(symbol)
        else:
            self._add_topic(topic, decode.TOPIC_IGNORED)

    # --- decoding -----------------------------------------------------------------------

    def decode(self, frames: Sequence[bytes]) -> Batch:
        """Decode received frames, in arrival order, into one batch of trades."""
        return self.decode_buffer(*join_frames(frames))

    def decode_into(
        self, buffer: np.ndarray, offsets: np.ndarray, count: int, columns: TradeColumns
    ) -> int:
        """:meth:`decode_buffer` without allocating: the trades of ``count`` frames into
        ``columns`` (``columns.trades(n)``, ``columns.symbols[:n]``, ``columns.clocks[:n]``),
        in arrival order; returns how many. Control frames move the clock (CLOCK) or are left
        out (the others). Made for a receiver that reuses its buffer: the read-only view the
        kernel takes is made once per buffer, not once per call."""
        if buffer is not self._viewed:
            self._viewed = buffer
            self._readonly = buffer.view()
            self._readonly.flags.writeable = False  # the kernel's one array type
        columns.fit(int(offsets[count]) // decode.TRADE_SIZE, count)
        state = self.state
        state[decode.D_TRADES] = 0
        state[decode.D_SPECIALS] = 0
        state[decode.D_STOP_AT_SPECIALS] = 0
        self._run(self._readonly, offsets[: count + 1], columns.outputs)
        return int(state[decode.D_TRADES])

    def decode_buffer(
        self,
        buffer: np.ndarray,
        offsets: np.ndarray,
        count: int,
        special: SpecialHandler | None = None,
    ) -> Batch:
        """Decode ``count`` received frames held in one buffer (frame i is
        ``buffer[offsets[i]:offsets[i + 1]]``), in arrival order, into one batch of trades.
        With ``special``, each special frame is handed to it as it is met, with the feed
        clock before it, instead of listed in the batch. Nothing in the batch refers
        to ``buffer``: the caller may reuse it."""
        offsets = offsets[: count + 1]
        buf = buffer[: offsets[-1]]
        buf.flags.writeable = False  # one array type for the kernels, whoever owns the buffer
        room = len(buf) // decode.TRADE_SIZE
        out = np.empty(room * decode.TRADE_SIZE, dtype=np.uint8)
        out_words = out.view(np.float64)
        symbols = np.empty(room, dtype=np.int64)
        clocks = np.empty(room, dtype=np.int64)
        specials = np.empty(count, dtype=np.int64)
        state = self.state
        state[decode.D_TRADES] = 0
        state[decode.D_SPECIALS] = 0
        state[decode.D_STOP_AT_SPECIALS] = special is not None
        self._run(buf, offsets, (out, out_words, symbols, clocks, specials), special)
        count = int(state[decode.D_TRADES])
        return Batch(
            trades=out[: count * decode.TRADE_SIZE].view(codec.TRADE_DTYPE),
            symbols=symbols[:count],
            clocks=clocks[:count],
            specials=[
                buf[offsets[f] : offsets[f + 1]].tobytes()
                for f in specials[: state[decode.D_SPECIALS]].tolist()
            ],
        )
