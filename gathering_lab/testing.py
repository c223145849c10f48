"""Helpers for testing code that uses gathering_lab (our own tests use them too).

::

    from gathering_lab.testing import running_server, recv_json

    async with running_server() as server:          # own bus and manager, free port
        async with websockets.connect(server.url) as ws:
            hello = await recv_json(ws)

Timeouts scale with the ``GATHERING_LAB_TIMEOUT_FACTOR`` environment variable
(e.g. ``3`` on a slow CI machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from .events import Event, EventBus
from .websocket.manager import ConnectionManager
from .websocket.server import Server, serve

__all__ = [
    "capture_events",
    "free_port",
    "recv_json",
    "recv_until",
    "running_server",
    "timeout",
    "wait_for",
]


def timeout(seconds: float) -> float:
    """Return ``seconds`` scaled by ``GATHERING_LAB_TIMEOUT_FACTOR`` (default 1)."""
    return seconds * float(os.environ.get("GATHERING_LAB_TIMEOUT_FACTOR", "1"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_server(**options: Any) -> AsyncIterator[Server]:
    """Run a server on a free loopback port with its own bus and manager, then close it."""
    options.setdefault("port", 0)
    options.setdefault("bus", EventBus())
    options.setdefault("manager", ConnectionManager())
    async with serve(**options) as server:
        yield server


@contextlib.contextmanager
def capture_events(bus: EventBus, pattern: str = "*") -> Iterator[list[Event]]:
    """Collect the events published on ``bus`` (matching ``pattern``) into a list."""
    captured: list[Event] = []
    sub_id = bus.subscribe(pattern, captured.append, name="capture_events")
    try:
        yield captured
    finally:
        bus.unsubscribe(sub_id)


async def recv_json(ws: Any, wait: float = 5.0) -> dict[str, Any]:
    """Receive one message from a websockets connection and parse it as JSON."""
    raw = await asyncio.wait_for(ws.recv(), timeout(wait))
    message: dict[str, Any] = json.loads(raw)
    return message


async def recv_until(
    ws: Any, predicate: Callable[[dict[str, Any]], bool], wait: float = 5.0
) -> list[dict[str, Any]]:
    """Receive messages until one satisfies ``predicate``; return all received, that one last."""
    deadline = time.monotonic() + timeout(wait)
    received: list[dict[str, Any]] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no matching message within {wait}s; got {received[-5:]}")
        message = json.loads(await asyncio.wait_for(ws.recv(), left))
        received.append(message)
        if predicate(message):
            return received


async def wait_for(
    condition: Callable[[], object | Awaitable[object]], wait: float = 5.0, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` is true; raise TimeoutError after ``wait`` seconds."""
    deadline = time.monotonic() + timeout(wait)
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {wait}s")
        await asyncio.sleep(interval)
