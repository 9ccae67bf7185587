"""Small helpers for the bridge tests: a WebSocket client that reads events with deadlines."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect


class Client:
    """A test client: every receive is bounded; events are kept in arrival order."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.events: list[dict[str, Any]] = []
        self.frames = 0
        self._read = 0

    @classmethod
    async def open(cls, url: str, token: str | None = "secret") -> Client:
        client = cls(await connect(url, max_size=None, compression=None))
        assert await client.next_event() == {
            "ev": "status",
            "status": "connected",
            "message": "Connected Successfully",
        }
        if token is not None:
            await client.send({"action": "auth", "params": token})
            assert (await client.next_event())["status"] == "auth_success"
        return client

    async def send(self, value: Any) -> None:
        await self.ws.send(orjson.dumps(value).decode())

    async def _fill(self, timeout: float) -> None:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        events = orjson.loads(frame)
        assert isinstance(events, list), f"server frame is not a JSON array: {frame!r}"
        self.frames += 1
        self.events.extend(events)

    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        while self._read >= len(self.events):
            await self._fill(timeout)
        event = self.events[self._read]
        self._read += 1
        return event

    async def statuses(self, count: int, timeout: float = 5.0) -> list[dict[str, Any]]:
        """The next ``count`` events, which must all be status events."""
        events = [await self.next_event(timeout) for _ in range(count)]
        assert all(e["ev"] == "status" for e in events), events
        return events

    async def bars(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        """The next ``count`` events, which must all be bars."""
        deadline = time.monotonic() + timeout
        events = []
        for _ in range(count):
            event = await self.next_event(max(0.01, deadline - time.monotonic()))
            assert event["ev"] == "MB", f"expected a bar, got {event}"
            events.append(event)
        return events

    async def until(
        self, predicate: Callable[[dict[str, Any]], bool], timeout: float = 5.0
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            event = await self.next_event(max(0.01, deadline - time.monotonic()))
            if predicate(event):
                return event

    def pending(self) -> list[dict[str, Any]]:
        """Events received but not read yet."""
        return self.events[self._read :]

    async def close(self) -> None:
        await self.ws.close()


async def eventually(predicate: Callable[[], Any], timeout: float = 5.0, what: str = "") -> Any:
    """Poll ``predicate`` until it is truthy; fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.01)
