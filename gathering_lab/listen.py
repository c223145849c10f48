"""A live tail of a server's events: what ``websocat`` does in the guide, but readable.

::

    async with contextlib.aclosing(listen_messages(url, filters=Filters(("task.*",)))) as feed:
        async for kind, message in feed:
            if kind == "event":
                print(format_event(message))

Filters are sent to the server as a ``subscribe`` message *and* applied here,
so the tail is right even against a server that only speaks the guide's
original protocol (which answers ``subscribe`` with an error, or not at all).

``gathering-lab listen`` is the command-line face of :func:`listen_messages`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import Any, Literal
from urllib.parse import parse_qs, urlsplit

from websockets.exceptions import ConnectionClosed

from . import protocol
from .demo import (
    DEFAULT_URL,
    TOKEN_ENV,
    add_token_argument,
    closed_message,
    open_connection,
    positive_int,
    ws_url,
)
from .exceptions import ConnectionFailed, ProtocolError

__all__ = [
    "CONTROL_TYPES",
    "MessageKind",
    "add_arguments",
    "event_matches",
    "format_event",
    "listen_messages",
    "run_cli",
]

logger = logging.getLogger("gathering_lab.listen")

#: Server messages that are not events.
CONTROL_TYPES = frozenset(
    {
        "connection.established",
        "pong",
        "error",
        "subscribed",
        "published",
        "resumed",
        "authenticated",
    }
)

#: What :func:`listen_messages` says each message is.
MessageKind = Literal["connected", "event", "subscribed", "subscribe_refused", "error", "control"]

_ALL = protocol.Filters()


def _type_matches(patterns: tuple[str, ...], type_name: str) -> bool:
    for pattern in patterns:
        if pattern == "*" or pattern == type_name:
            return True
        if pattern.endswith(".*") and type_name.startswith(pattern[:-1]):
            return True
    return False


def _same_id(wanted: Any, value: Any) -> bool:
    return wanted is None or (value is not None and str(value) == str(wanted))


def event_matches(filters: protocol.Filters, message: dict[str, Any]) -> bool:
    """Return True if the event ``message`` passes ``filters`` (type patterns, circle, project).

    Ids compare as text, so ``--circle 1`` matches ``1`` and ``"1"`` alike.
    """
    return (
        _same_id(filters.circle_id, message.get("circle_id"))
        and _same_id(filters.project_id, message.get("project_id"))
        and _type_matches(filters.event_types, str(message.get("type")))
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
                elif kind in CONTROL_TYPES:
                    yield "control", message
                elif event_matches(filters, message):
                    yield "event", message
        except ConnectionClosed as exc:
            raise ConnectionFailed(closed_message(url, exc)) from None
        close = ws.protocol.close_rcvd
        raise ConnectionFailed(closed_message(url, ConnectionClosed(close, None)))


# Command line


def _pattern(text: str) -> str:
    try:
        return protocol.check_pattern(text)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _scope_id(text: str) -> int | str:
    text = text.strip()
    if not text or len(text) > 128:
        raise argparse.ArgumentTypeError(f"invalid id {text!r}: expected 1-128 characters")
    return int(text) if re.fullmatch(r"-?\d+", text) else text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``listen`` command's arguments."""
    parser.add_argument(
        "url", nargs="?", type=ws_url, default=DEFAULT_URL, help=f"server URL ({DEFAULT_URL})"
    )
    parser.add_argument(
        "--type",
        dest="types",
        action="append",
        type=_pattern,
        metavar="PATTERN",
        help="only these event types: task.created, task.* or * (repeatable)",
    )
    parser.add_argument("--circle", type=_scope_id, metavar="ID", help="only this circle_id")
    parser.add_argument("--project", type=_scope_id, metavar="ID", help="only this project_id")
    parser.add_argument(
        "--client-id",
        default=None,
        help="client id (default: the URL's client_id, the token's subject, else listen-PID)",
    )
    add_token_argument(parser)
    parser.add_argument(
        "--json", action="store_true", help="print each message as one JSON line (for jq)"
    )
    parser.add_argument(
        "--count", type=positive_int, default=None, help="exit after N events (default: Ctrl+C)"
    )


def _width() -> int:
    if sys.stdout.isatty():
        return max(60, shutil.get_terminal_size().columns)
    return 200


def _error_text(message: dict[str, Any]) -> str:
    data = message.get("data") or {}
    if isinstance(data, dict):
        return f"{data.get('code', 'error')}: {data.get('message', '')}"
    return str(data)


async def run_cli(args: argparse.Namespace) -> int:
    """Run ``gathering-lab listen``: status on stderr, one line (or JSON) per event on stdout."""
    out, err = sys.stdout, sys.stderr
    filters = protocol.Filters(tuple(args.types or ("*",)), args.circle, args.project)
    if "*" in filters.event_types:
        filters = protocol.Filters(("*",), args.circle, args.project)
    token = args.token or os.environ.get(TOKEN_ENV)
    client_id = args.client_id
    if client_id is None and not token and "client_id" not in parse_qs(urlsplit(args.url).query):
        client_id = f"listen-{os.getpid()}"  # with a token, the server names us after its sub
    width = _width()
    seen = 0
    feed = listen_messages(args.url, filters=filters, client_id=client_id, token=token)
    try:
        async with contextlib.aclosing(feed):
            async for kind, message in feed:
                if kind == "error":
                    print(f"listen: server error: {_error_text(message)}", file=err, flush=True)
                    continue
                if args.json:
                    print(protocol.encode(message).decode(), file=out, flush=True)
                if kind == "event":
                    if not args.json:
                        print(format_event(message, width), file=out, flush=True)
                    seen += 1
                    if args.count is not None and seen >= args.count:
                        return 0
                elif kind == "connected":
                    data = message.get("data") or {}
                    server = data.get("server", "server")
                    print(
                        f"listen: connected to {args.url} as {data.get('client_id')} ({server})",
                        file=err,
                        flush=True,
                    )
                elif kind == "subscribed":
                    logger.info("the server filters for us: %s", message.get("data"))
                elif kind == "subscribe_refused":
                    print(
                        "listen: the server does not support subscribe "
                        f"({_error_text(message)}); filtering locally",
                        file=err,
                        flush=True,
                    )
    except BrokenPipeError:  # `gathering-lab listen | head`
        with contextlib.suppress(OSError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, out.fileno())
        return 0
    except asyncio.CancelledError:
        print(f"listen: stopped after {seen} events", file=err, flush=True)
        raise
    return 0  # pragma: no cover - the feed only ends by raising ConnectionFailed
