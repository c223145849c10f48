"""A live tail of a server's events: what ``websocat`` does in the guide, but readable.

::

    async with contextlib.aclosing(listen_messages(url, filters=Filters(("task.*",)))) as feed:
        async for kind, message in feed:
            if kind == "event":
                lines.append(format_event(message))

With ``reconnect=True`` (what ``gathering-lab listen`` does) a dropped connection
is opened again with backoff and resumed after the last ``seq`` received
(``?last_seq=N&epoch=E``, as :class:`~gathering_lab.client.LabClient` does); a server
restart and a gap in its history are yielded as ``"restarted"`` and ``"gap"``.

Filters are sent to the server as a ``subscribe`` message *and* applied here,
so the tail is right even against a server that only speaks the guide's
original protocol (which answers ``subscribe`` with an error, or not at all).

``gathering-lab listen`` (in :mod:`gathering_lab.cli`) is the command-line face of
:func:`listen_messages`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from websockets.exceptions import ConnectionClosed

from . import protocol
from .client import FINAL_CLOSE_CODES
from .connection import DEFAULT_URL, closed_message, open_connection, with_query
from .exceptions import ConnectionFailed, ProtocolError

__all__ = [
    "MessageKind",
    "event_matches",
    "format_event",
    "listen_messages",
]

logger = logging.getLogger("gathering_lab.listen")


#: What :func:`listen_messages` says each message is.
MessageKind = Literal[
    "connected",
    "event",
    "subscribed",
    "subscribe_refused",
    "error",
    "control",
    "resumed",
    "reconnecting",
    "restarted",
    "gap",
]

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


@dataclass(slots=True)
class _Position:
    """Where a listener is in the server's numbering, kept across reconnects."""

    epoch: str | None = None
    last_seq: int | None = None
    close_code: int | None = None
    greeted: bool = False

    def resume_url(self, url: str) -> str:
        """``url`` with ``?last_seq=&epoch=`` once there is a position to resume from."""
        if self.epoch is None or self.last_seq is None:
            return url
        return with_query(url, last_seq=self.last_seq, epoch=self.epoch)


async def listen_messages(
    url: str = DEFAULT_URL,
    *,
    filters: protocol.Filters = _ALL,
    client_id: str | None = None,
    token: str | None = None,
    reconnect: bool = False,
    base_delay: float = 1.0,
    max_delay: float = 30.0,
) -> AsyncGenerator[tuple[MessageKind, dict[str, Any]], None]:
    """Connect to ``url`` and yield ``(kind, message)`` for every message the server sends.

    ``kind`` is ``"connected"`` (the greeting), ``"event"`` (only events that pass
    ``filters``), ``"subscribed"`` (the server applies the filters too),
    ``"subscribe_refused"`` (the server does not know ``subscribe``: filtering is
    local only), ``"resumed"`` (the server's ack of a resume), ``"error"`` or
    ``"control"``. Non-default filters are sent as a ``subscribe`` right after the
    greeting. Use it with :func:`contextlib.aclosing` so the connection closes when
    you stop early.

    With ``reconnect=True``, a connection that drops after its greeting is opened
    again with backoff (``min(base_delay * 2**attempt, max_delay)`` seconds), and
    resumes after the last ``seq`` seen, so no event is missed or yielded twice:
    each wait is yielded first as ``("reconnecting", {"reason", "delay",
    "attempt"})``, a new server run as ``("restarted", {"old_epoch", "new_epoch",
    "last_seq"})`` and events no longer in the server's history as ``("gap",
    resumed-data)``. Close codes that a retry cannot fix (1003, 1007, 1008, 1009)
    still end it.

    Raises ConnectionFailed if the server cannot be reached, is not a WebSocket
    server, or closes the connection (with ``reconnect``: the first time, or for
    good). ``token`` is a JWT for servers with authentication (sent as a Bearer
    header).
    """
    if base_delay <= 0 or max_delay <= 0:
        raise ValueError(f"delays must be positive, not {base_delay!r} and {max_delay!r}")
    position = _Position()
    attempt = 0
    while True:
        try:
            session = _session(url, position, filters, client_id, token)
            async with contextlib.aclosing(session):
                async for kind, message in session:
                    if kind == "connected":
                        attempt = 0  # a session ran: start the backoff again
                    yield kind, message
        except ConnectionFailed as exc:
            if not reconnect or not position.greeted or position.close_code in FINAL_CLOSE_CODES:
                raise
            delay = min(base_delay * 2**attempt, max_delay)
            attempt += 1
            logger.info("%s; reconnecting in %gs (attempt %d)", exc, delay, attempt)
            yield "reconnecting", {"reason": str(exc), "delay": delay, "attempt": attempt}
            await asyncio.sleep(delay)


async def _session(
    url: str,
    position: _Position,
    filters: protocol.Filters,
    client_id: str | None,
    token: str | None,
) -> AsyncGenerator[tuple[MessageKind, dict[str, Any]], None]:
    """One connection of :func:`listen_messages`: from the greeting until it closes."""
    position.close_code = None
    resume_url = position.resume_url(url)
    try:
        async with open_connection(resume_url, client_id=client_id, token=token) as ws:
            subscribe_pending = False
            restarted = False
            try:
                async for raw in ws:
                    try:
                        message = protocol.decode(raw)
                    except ProtocolError as exc:
                        logger.warning("ignoring a message from %s: %s", url, exc)
                        continue
                    kind = message["type"]
                    if kind == "connection.established":
                        restart = _greeted(position, message, resume_url != url)
                        if filters != _ALL:
                            subscribe = protocol.Subscribe(filters).to_message()
                            await ws.send(protocol.encode(subscribe), text=True)
                            subscribe_pending = True
                        yield "connected", message
                        if restart is not None:
                            restarted = True
                            yield "restarted", restart
                    elif kind == "resumed":
                        data = message.get("data") or {}
                        yield "resumed", message
                        if data.get("gap") and not restarted:
                            yield "gap", data
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
                    elif _new(position, message) and event_matches(filters, message):
                        yield "event", message
            except ConnectionClosed as exc:
                position.close_code = exc.rcvd.code if exc.rcvd is not None else None
                raise ConnectionFailed(closed_message(url, exc)) from None
            close = ws.protocol.close_rcvd
            position.close_code = close.code if close is not None else None
            raise ConnectionFailed(closed_message(url, ConnectionClosed(close, None)))
    except ConnectionFailed as exc:  # name the URL the user gave, not the resume query
        if resume_url == url:
            raise
        raise ConnectionFailed(str(exc).replace(resume_url, url)) from None


def _greeted(position: _Position, message: dict[str, Any], resuming: bool) -> dict[str, Any] | None:
    """Take the greeting's ``epoch`` and ``seq``; return what a server restart changed, if so."""
    data = message.get("data") or {}
    epoch = data.get("epoch")
    seq = data.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool):
        seq = None
    position.greeted = True
    restart = None
    if position.epoch is not None and epoch is not None and epoch != position.epoch:
        restart = {"old_epoch": position.epoch, "new_epoch": epoch, "last_seq": position.last_seq}
        # Resuming in the URL, the server replays its new run from the start.
        position.last_seq = 0 if resuming else seq
    elif position.last_seq is None:
        position.last_seq = seq  # everything after it comes live
    position.epoch = epoch if isinstance(epoch, str) else None
    return restart


def _new(position: _Position, message: dict[str, Any]) -> bool:
    """Advance the position past an event; False if it was seen before (a replay overlap)."""
    seq = message.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or message.get("epoch") != position.epoch:
        return True
    if position.last_seq is not None and seq <= position.last_seq:
        logger.debug("skipping event seq=%d: already seen", seq)
        return False
    position.last_seq = seq
    return True
