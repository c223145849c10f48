"""A live tail of a server's events: what ``websocat`` does in the guide, but readable.

::

    async with contextlib.aclosing(listen_messages(url, filters=Filters(("task.*",)))) as feed:
        async for kind, message in feed:
            if kind == "event":
                lines.append(format_event(message))

Filters are sent to the server as a ``subscribe`` message *and* applied here,
so the tail is right even against a server that only speaks the guide's
original protocol (which answers ``subscribe`` with an error, or not at all).

``gathering-lab listen`` (in :mod:`gathering_lab.cli`) is the command-line face of
:func:`listen_messages`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed

from . import protocol
from .connection import DEFAULT_URL, closed_message, open_connection
from .exceptions import ConnectionFailed, ProtocolError

__all__ = [
    "MessageKind",
    "event_matches",
    "format_event",
    "listen_messages",
]

logger = logging.getLogger("gathering_lab.listen")


#: What :func:`listen_messages` says each message is.
MessageKind = Literal["connected", "event", "subscribed", "subscribe_refused", "error", "control"]

_ALL = protocol.Filters()


def event_matches(filters: protocol.Filters, message: dict[str, Any]) -> bool:
    """Return True if the event ``message`` passes ``filters`` (type patterns, circle, project).

    The server's rule (:meth:`protocol.Filters.matches`): ids compare exactly, so
    ``--circle 1`` (an integer) does not match a ``circle_id`` of ``"1"``.
    """
    return filters.matches(
        str(message.get("type")), message.get("circle_id"), message.get("project_id")
    )


def _clock(timestamp: Any) -> str:
    moment: datetime | None = None
    if isinstance(timestamp, str):
        with contextlib.suppress(ValueError):
            moment = protocol.parse_timestamp(timestamp).astimezone()
    if moment is None:
        moment = datetime.now().astimezone()
    return moment.strftime("%H:%M:%S.") + f"{moment.microsecond // 1000:03d}"


def format_event(message: dict[str, Any], width: int = 200) -> str:
    """Return one readable line for an event, at most ``width`` characters.

    ``10:30:00.123  task.created           seq=12 circle=1 project=2 agent=3  {"task_id": 7, ...}``
    (local time; ids that are null are left out; the data is cut to fit).
    """
    meta = []
    for key, label in (
        ("seq", "seq"),
        ("circle_id", "circle"),
        ("project_id", "project"),
        ("source_agent_id", "agent"),
    ):
        value = message.get(key)
        if value is not None:
            meta.append(f"{label}={value}")
    head = f"{_clock(message.get('timestamp'))}  {message.get('type', '?'):<22} {' '.join(meta)}"
    data = message.get("data")
    text = json.dumps(data, ensure_ascii=False, default=str)  # display only, not the wire
    room = max(20, width - len(head) - 2)
    if len(text) > room:
        text = text[: room - 3] + "..."
    return f"{head}  {text}"


async def listen_messages(
    url: str = DEFAULT_URL,
    *,
    filters: protocol.Filters = _ALL,
    client_id: str | None = None,
    token: str | None = None,
) -> AsyncGenerator[tuple[MessageKind, dict[str, Any]], None]:
    """Connect to ``url`` and yield ``(kind, message)`` for every message the server sends.

    ``kind`` is ``"connected"`` (the greeting), ``"event"`` (only events that pass
    ``filters``), ``"subscribed"`` (the server applies the filters too),
    ``"subscribe_refused"`` (the server does not know ``subscribe``: filtering is
    local only), ``"error"`` or ``"control"``. Non-default filters are sent as a
    ``subscribe`` right after the greeting. Use it with :func:`contextlib.aclosing`
    so the connection closes when you stop early.

    Raises ConnectionFailed if the server cannot be reached, is not a WebSocket
    server, or closes the connection. ``token`` is a JWT for servers with
    authentication (sent as a Bearer header).
    """
    async with open_connection(url, client_id=client_id, token=token) as ws:
        subscribe_pending = False
        try:
            async for raw in ws:
                try:
                    message = protocol.decode(raw)
                except ProtocolError as exc:
                    logger.warning("ignoring a message from %s: %s", url, exc)
                    continue
                kind = message["type"]
                if kind == "connection.established":
                    if filters != _ALL:
                        subscribe = protocol.Subscribe(filters).to_message()
                        await ws.send(protocol.encode(subscribe), text=True)
                        subscribe_pending = True
                    yield "connected", message
                elif kind == "subscribed":
                    subscribe_pending = False
                    yield "subscribed", message
                elif kind == "error":
                    if subscribe_pending:
                        subscribe_pending = False
                        yield "subscribe_refused", message
                    else:
                        yield "error", message
                elif kind in protocol.CONTROL_TYPES:
                    yield "control", message
                elif event_matches(filters, message):
                    yield "event", message
        except ConnectionClosed as exc:
            raise ConnectionFailed(closed_message(url, exc)) from None
        close = ws.protocol.close_rcvd
        raise ConnectionFailed(closed_message(url, ConnectionClosed(close, None)))
