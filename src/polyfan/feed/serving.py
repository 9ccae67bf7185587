"""The server side of Polygon's stocks WebSocket protocol, as ``sim`` and ``replay`` speak it.

Pure: a client's frame goes in with that client's :class:`ClientState`, and the status frames to
answer come out (:func:`client_frame_received`), with what the server around it must carry
out (close the connection after ``auth_failed``, evict another connection that used the same
key, start streaming to a client that has just subscribed). The protocol is
shared/polygon/protocol.md's:

- ``auth`` with the server's key (any key when it has none) gets ``auth_success``; a wrong key
  gets ``auth_failed`` and the connection is closed (1008); anything else before auth gets
  ``auth_required``.
- ``subscribe`` / ``unsubscribe`` take a comma list of channels ``<EV>.<SYM>`` or ``<EV>.*``
  (``T.*,Q.*,A.AAPL``); every channel gets its own ``success`` status (``subscribed to:
  T.AAPL``); a channel without a ``.`` gets an ``error`` status naming it. The state keeps
  every channel; what a server streams on which (``T``, ``Q``, ``A``, ``AM``, ``LULD`` for the
  sim, ``T`` for the replay) is the server's: other channels are acknowledged, as the real
  server does, and carry nothing.
- One connection per key: the server tells the older connection ``max_connections`` and closes
  it (1008) when a newer one authenticates with the same key.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import orjson

MAX_CONNECTIONS_MESSAGE = "Maximum number of websocket connections exceeded."


def status(status: str, message: str) -> str:
    """One status event as the server frames it: a JSON array of one object."""
    return orjson.dumps([{"ev": "status", "status": status, "message": message}]).decode()


_NO_SYMBOLS: frozenset[str] = frozenset()


@dataclass
class ClientState:
    """What the protocol knows about one connection."""

    authenticated: bool = False
    refused: bool = False  # auth_failed: close the connection
    key: str | None = None  # the key it authenticated with (None once evicted)
    everything: set[str] = field(default_factory=set)  # event types subscribed as <EV>.*
    channels: dict[str, set[str]] = field(default_factory=dict)  # event type -> symbols

    def is_subscribed(self) -> bool:
        return bool(self.everything) or any(self.channels.values())

    def wants(self, symbol: str, ev: str = "T") -> bool:
        """Whether events of type ``ev`` (a trade by default) of ``symbol`` go to this client."""
        return ev in self.everything or symbol in self.channels.get(ev, _NO_SYMBOLS)

    def wants_any(self, ev: str) -> bool:
        """Whether any event of type ``ev`` goes to this client."""
        return ev in self.everything or bool(self.channels.get(ev))

    @property
    def all_symbols(self) -> bool:
        """``T.*``: every trade."""
        return "T" in self.everything

    @property
    def symbols(self) -> set[str] | frozenset[str]:
        """The symbols whose trades were subscribed one by one (``T.AAPL``)."""
        return self.channels.get("T", _NO_SYMBOLS)


@dataclass(frozen=True)
class Reply:
    """The frames to send back, and what the server must carry out besides."""

    frames: list[str]
    evict_key: str | None = None  # close every *other* connection authenticated with this key
    subscribed_now: bool = False  # the client went from no subscription to one


def client_frame_received(state: ClientState, message: str | bytes, api_key: str | None) -> Reply:
    """Apply one client frame to ``state``; return the replies (``api_key``: None accepts any)."""
    try:
        request = orjson.loads(message)
    except orjson.JSONDecodeError:
        return Reply([status("error", "invalid message: not JSON")])
    if not isinstance(request, dict) or not isinstance(request.get("params", ""), str):
        return Reply([status("error", "invalid message: expected {action, params}")])
    action, params = request.get("action"), request.get("params", "")
    if action == "auth":
        if api_key is not None and params != api_key:
            state.refused = True
            return Reply([status("auth_failed", "authentication failed")])
        state.authenticated = True
        state.key = params
        return Reply([status("auth_success", "authenticated")], evict_key=params)
    if not state.authenticated:
        return Reply([status("auth_required", "authentication required")])
    if action not in ("subscribe", "unsubscribe"):
        return Reply([status("error", f"unknown action: {action}")])
    frames = []
    was_subscribed = state.is_subscribed()
    for channel in (c.strip() for c in params.split(",")):
        prefix, dot, symbol = channel.partition(".")
        if not dot or not prefix or not symbol:
            frames.append(status("error", f"invalid channel: {channel}"))
            continue
        if action == "subscribe":
            if symbol == "*":
                state.everything.add(prefix)
            else:
                state.channels.setdefault(prefix, set()).add(symbol)
        elif symbol == "*":
            state.everything.discard(prefix)
        else:
            state.channels.get(prefix, set()).discard(symbol)
        verb = "subscribed to" if action == "subscribe" else "unsubscribed to"
        frames.append(status("success", f"{verb}: {channel}"))
    return Reply(frames, subscribed_now=not was_subscribed and state.is_subscribed())
