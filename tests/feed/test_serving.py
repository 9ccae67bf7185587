"""The server side of Polygon's protocol that sim and replay share: frames in, statuses out."""

from __future__ import annotations

import orjson

from polyfan.feed.serving import ClientState, client_frame_received


def statuses(frames: list[str]) -> list[tuple[str, str]]:
    return [(e["status"], e["message"]) for f in frames for e in orjson.loads(f)]


def test_auth_then_one_success_per_channel() -> None:
    state = ClientState()
    reply = client_frame_received(state, '{"action":"auth","params":"k"}', None)
    assert statuses(reply.frames) == [("auth_success", "authenticated")]
    assert reply.evict_key == "k"
    reply = client_frame_received(state, '{"action":"subscribe","params":"T.A, T.BRK.A"}', None)
    assert statuses(reply.frames) == [
        ("success", "subscribed to: T.A"),
        ("success", "subscribed to: T.BRK.A"),
    ]
    assert reply.subscribed_now
    assert state.wants("BRK.A") and not state.wants("AAPL")
    reply = client_frame_received(state, '{"action":"subscribe","params":"T.*"}', None)
    assert not reply.subscribed_now  # already was
    assert state.wants("AAPL")
    client_frame_received(state, '{"action":"unsubscribe","params":"T.*,T.A,T.BRK.A"}', None)
    assert not state.is_subscribed()


def test_a_wrong_key_is_refused_and_nothing_passes_before_auth() -> None:
    state = ClientState()
    reply = client_frame_received(state, '{"action":"subscribe","params":"T.*"}', "right")
    assert statuses(reply.frames) == [("auth_required", "authentication required")]
    reply = client_frame_received(state, '{"action":"auth","params":"wrong"}', "right")
    assert statuses(reply.frames) == [("auth_failed", "authentication failed")]
    assert state.refused and not state.authenticated


def test_garbage_gets_an_error_status_naming_it() -> None:
    state = ClientState()
    assert statuses(client_frame_received(state, "not json", None).frames)[0][0] == "error"
    assert statuses(client_frame_received(state, "[1]", None).frames)[0][0] == "error"
    client_frame_received(state, '{"action":"auth","params":""}', None)
    assert statuses(client_frame_received(state, '{"action":"x"}', None).frames) == [
        ("error", "unknown action: x")
    ]
    reply = client_frame_received(state, '{"action":"subscribe","params":"nodot"}', None)
    assert statuses(reply.frames) == [("error", "invalid channel: nodot")]


def test_every_channel_is_kept_by_event_type_and_symbol() -> None:
    state = ClientState()
    client_frame_received(state, '{"action":"auth","params":"k"}', None)
    reply = client_frame_received(state, '{"action":"subscribe","params":"Q.AAPL,LULD.*"}', None)
    assert reply.subscribed_now  # a quote channel alone is a subscription
    assert state.wants("AAPL", "Q") and not state.wants("MSFT", "Q")
    assert state.wants("MSFT", "LULD") and state.wants_any("LULD") and state.wants_any("Q")
    assert not state.wants("AAPL") and not state.wants_any("T") and not state.wants_any("A")
    client_frame_received(state, '{"action":"subscribe","params":"A.BRK.A"}', None)
    assert state.wants("BRK.A", "A") and not state.wants("BRK.A", "AM")
    client_frame_received(state, '{"action":"unsubscribe","params":"Q.AAPL,LULD.*,A.BRK.A"}', None)
    assert not state.is_subscribed()
