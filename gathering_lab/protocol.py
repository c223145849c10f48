"""The GatheRing wire protocol: every message the server and clients exchange.

Pure functions and small value objects, no I/O: the server, the CLI and the
notebook client all build and parse messages here rather than writing JSON by
hand. Server messages are dicts whose first key is ``"type"``; :func:`encode`
turns one into the UTF-8 bytes of a text frame.

Client messages are parsed by :func:`parse_client_message`, which returns one of
:class:`Ping`, :class:`Subscribe`, :class:`Unsubscribe`, :class:`Publish`,
:class:`Resume` or :class:`Auth`, or raises :class:`~gathering_lab.exceptions.ProtocolError`
whose ``code`` is one of :data:`ERROR_CODES`.
"""

from __future__ import annotations

import itertools
import json
import re
import secrets
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .exceptions import ProtocolError

__all__ = [
    "CONNECTED_MESSAGE",
    "CONTROL_TYPES",
    "ERROR_CODES",
    "EVENT_TYPE_PATTERN",
    "MAX_REQUEST_ID_LENGTH",
    "Auth",
    "ClientMessage",
    "Filters",
    "Ping",
    "Publish",
    "RequestId",
    "Resume",
    "Subscribe",
    "Unsubscribe",
    "ack",
    "check_event_type",
    "check_pattern",
    "connection_established",
    "decode",
    "encode",
    "error",
    "format_timestamp",
    "new_event_id",
    "now",
    "parse_client_message",
    "parse_timestamp",
    "pong",
    "request_id",
    "type_matches",
]

CONNECTED_MESSAGE = "Connected to GatheRing WebSocket"

#: Custom event types are dotted lowercase words, e.g. ``deploy.finished``.
EVENT_TYPE_PATTERN = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
_PATTERN_RE = re.compile(r"^(\*|[a-z][a-z0-9_]*(\.[a-z0-9_]+)*(\.\*)?)$")

#: Server messages that are not events (greeting, replies and acknowledgements).
CONTROL_TYPES = frozenset(
    {
        "connection.established",
        "pong",
        "error",
        "published",
        "subscribed",
        "resumed",
        "authenticated",
    }
)

#: Error codes sent in ``{"type": "error", "data": {"code": ...}}``.
ERROR_CODES = frozenset(
    {
        "invalid_json",  # not JSON, or not a JSON object
        "invalid_message",  # JSON object with missing or ill-typed fields
        "unknown_type",  # a client message type the server does not know
        "invalid_event_type",  # a published event type that is not dotted lowercase words
        "forbidden",  # the client's token lacks the role this needs
        "unauthorized",  # no valid token
        "internal_error",  # a bug on the server side; the connection is closed with 1011
        "rate_limited",  # over the connection's publish rate: nothing was published
        "unavailable",  # the bus cannot take the event now: nothing was published
        "too_large",  # a subscription (or other request) past the server's bounds
    }
)

_MAX_INT = 2**63 - 1
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, default=str)
_ID_PREFIX = "evt_" + secrets.token_hex(6)
_ID_COUNTER = itertools.count(secrets.randbelow(2**32))


# Timestamps and ids


def now() -> datetime:
    """Return the current time as an aware UTC datetime."""
    return datetime.now(UTC)


def format_timestamp(moment: datetime | None = None) -> str:
    """Return ``moment`` (default: now) as ISO-8601 UTC with microseconds and a ``Z``."""
    if moment is None:
        moment = datetime.now(UTC)
    elif moment.tzinfo is not UTC:
        if moment.tzinfo is None:
            raise ValueError(f"timestamp must be timezone-aware: {moment!r}")
        moment = moment.astimezone(UTC)
    # isoformat() is about twice as fast as strftime(); it ends with "+00:00" here.
    return moment.isoformat(timespec="microseconds")[:-6] + "Z"


def parse_timestamp(text: str) -> datetime:
    """Parse an ISO-8601 timestamp (``Z`` or offset; seconds or microseconds) as UTC."""
    if not isinstance(text, str):
        raise ValueError(f"timestamp must be a string, not {type(text).__name__}")
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"invalid timestamp {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def new_event_id() -> str:
    """Return a fresh, unique event id ``evt_<24 hex digits>``.

    A random per-process prefix and a counter: unique without a system call per id.
    """
    return f"{_ID_PREFIX}{next(_ID_COUNTER):012x}"


# Event types and patterns


def check_event_type(value: Any) -> str:
    """Return ``value`` as an event type string, or raise ProtocolError if it is not one."""
    value = getattr(value, "value", value)  # EventType members
    if not isinstance(value, str):
        raise ProtocolError(
            "invalid_event_type", f"event type must be a string, not {type(value).__name__}"
        )
    if not EVENT_TYPE_PATTERN.match(value):
        raise ProtocolError(
            "invalid_event_type",
            f"invalid event type {value!r}: expected dotted lowercase words like 'task.created'",
        )
    return value


def type_matches(patterns: Iterable[str], type_name: str) -> bool:
    """True if ``type_name`` matches one of ``patterns`` (``*``, ``task.*``, ``task.created``).

    ``task.*`` matches every type that starts with ``task.``, however many segments follow.
    """
    for pattern in patterns:
        if pattern == "*" or pattern == type_name:
            return True
        if pattern.endswith(".*") and type_name.startswith(pattern[:-1]):
            return True
    return False


def check_pattern(value: Any) -> str:
    """Return ``value`` as a subscription pattern (``*``, ``task.*``, ``task.created``)."""
    value = getattr(value, "value", value)
    if not isinstance(value, str) or not _PATTERN_RE.match(value):
        raise ProtocolError(
            "invalid_message",
            f"invalid event type pattern {value!r}: expected '*', 'task.*' or 'task.created'",
        )
    return value


# Server -> client messages


def encode(message: Mapping[str, Any]) -> bytes:
    """Serialise a message to the compact UTF-8 JSON of one text frame."""
    return _ENCODER.encode(message).encode()


def decode(frame: str | bytes) -> dict[str, Any]:
    """Parse a server message (the inverse of :func:`encode`); raises ProtocolError."""
    try:
        message = json.loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"invalid JSON: {exc}") from None
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        raise ProtocolError("invalid_message", "message must be a JSON object with a 'type'")
    return message


def connection_established(client_id: str, **extras: Any) -> dict[str, Any]:
    """Build the greeting sent when a client connects; ``extras`` go into ``data``."""
    return {
        "type": "connection.established",
        "data": {"client_id": client_id, "message": CONNECTED_MESSAGE, **extras},
        "timestamp": format_timestamp(),
    }


def pong(request_id: Any = None) -> dict[str, Any]:
    """Build the reply to a ``ping``; echoes the client's ``id`` when it sent one."""
    message: dict[str, Any] = {"type": "pong", "timestamp": format_timestamp()}
    if request_id is not None:
        message["id"] = request_id
    return message


def error(code: str, message: str, request_id: Any = None) -> dict[str, Any]:
    """Build an ``error`` message with one of :data:`ERROR_CODES`; echoes the request's ``id``."""
    if code not in ERROR_CODES:
        raise ValueError(f"unknown error code {code!r}")
    reply: dict[str, Any] = {
        "type": "error",
        "data": {"code": code, "message": message},
        "timestamp": format_timestamp(),
    }
    if request_id is not None:
        reply["id"] = request_id
    return reply


def ack(kind: str, request_id: Any = None, **data: Any) -> dict[str, Any]:
    """Build an acknowledgement (``subscribed``, ``published``, ``resumed``, ``authenticated``).

    ``request_id`` is the ``id`` of the client message it answers, echoed when given.
    """
    reply: dict[str, Any] = {"type": kind, "data": data, "timestamp": format_timestamp()}
    if request_id is not None:
        reply["id"] = request_id
    return reply


# Client -> server messages

#: A client's request id: a string of at most :data:`MAX_REQUEST_ID_LENGTH` characters or an int.
RequestId = str | int
MAX_REQUEST_ID_LENGTH = 64


def request_id(message: Mapping[str, Any]) -> RequestId | None:
    """Return the ``id`` of a client message (None if it has none); raise ProtocolError if bad.

    A request id is a string of at most 64 characters or an integer; replies echo it
    unchanged, so a client matches each reply to its request by equality.
    """
    value = message.get("id")
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and -_MAX_INT <= value <= _MAX_INT:
        return value
    if isinstance(value, str) and len(value) <= MAX_REQUEST_ID_LENGTH:
        return value
    shown = repr(value)
    if len(shown) > 40:
        shown = shown[:37] + "..."
    raise ProtocolError(
        "invalid_message",
        f"invalid id {shown}: expected a string of at most {MAX_REQUEST_ID_LENGTH} characters "
        "or an integer",
    )


def _with_id(message: dict[str, Any], rid: RequestId | None) -> dict[str, Any]:
    if rid is not None:
        message["id"] = rid
    return message


@dataclass(frozen=True, slots=True)
class Filters:
    """What a client wants to receive: type patterns and optional circle / project."""

    event_types: tuple[str, ...] = ("*",)
    circle_id: Any = None
    project_id: Any = None

    def matches(self, type_name: str, circle_id: Any = None, project_id: Any = None) -> bool:
        """True if an event of this type, circle and project passes these filters."""
        if self.circle_id is not None and circle_id != self.circle_id:
            return False
        if self.project_id is not None and project_id != self.project_id:
            return False
        return type_matches(self.event_types, type_name)

    def to_dict(self) -> dict[str, Any]:
        """Return the filters as sent in a ``subscribe`` message."""
        return {
            "event_types": list(self.event_types),
            "circle_id": self.circle_id,
            "project_id": self.project_id,
        }


@dataclass(frozen=True, slots=True)
class Ping:
    """``{"type": "ping"}``, with an optional ``id`` echoed in the pong."""

    id: RequestId | None = None

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends."""
        return _with_id({"type": "ping"}, self.id)


@dataclass(frozen=True, slots=True)
class Subscribe:
    """``{"type": "subscribe", "data": {...}}``: replace this client's filters."""

    filters: Filters = field(default_factory=Filters)
    id: RequestId | None = None

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends."""
        return _with_id({"type": "subscribe", "data": self.filters.to_dict()}, self.id)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """``{"type": "unsubscribe"}``: receive everything again."""

    id: RequestId | None = None

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends."""
        return _with_id({"type": "unsubscribe"}, self.id)


@dataclass(frozen=True, slots=True)
class Publish:
    """``{"type": "publish", "data": {...}}``: an event to publish on the server's bus."""

    type: str
    data: dict[str, Any]
    source_agent_id: Any = None
    circle_id: Any = None
    project_id: Any = None
    id: RequestId | None = None

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends (the type is checked first)."""
        message = {
            "type": "publish",
            "data": {
                "type": check_event_type(self.type),
                "data": self.data,
                "source_agent_id": self.source_agent_id,
                "circle_id": self.circle_id,
                "project_id": self.project_id,
            },
        }
        return _with_id(message, self.id)


@dataclass(frozen=True, slots=True)
class Resume:
    """``{"type": "resume", "data": {"since_seq": N, "epoch": E}}``: replay what was missed."""

    since_seq: int
    epoch: str | None = None
    id: RequestId | None = None

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends."""
        message = {"type": "resume", "data": {"since_seq": self.since_seq, "epoch": self.epoch}}
        return _with_id(message, self.id)


@dataclass(frozen=True, slots=True)
class Auth:
    """``{"type": "auth", "data": {"token": T}}``: authenticate (browsers)."""

    token: str
    id: RequestId | None = None

    def __repr__(self) -> str:  # never show a token
        shown = "" if self.id is None else f", id={self.id!r}"
        return f"Auth(token=<hidden>{shown})"

    def to_message(self) -> dict[str, Any]:
        """Return the message a client sends."""
        return _with_id({"type": "auth", "data": {"token": self.token}}, self.id)


ClientMessage = Ping | Subscribe | Unsubscribe | Publish | Resume | Auth


def _data(message: dict[str, Any], kind: str) -> dict[str, Any]:
    data = message.get("data", {})
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ProtocolError("invalid_message", f"'{kind}' data must be an object")
    return data


def _scope_id(data: dict[str, Any], key: str) -> Any:
    value = data.get(key)
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if isinstance(value, str) and value:
        return value
    raise ProtocolError(
        "invalid_message", f"{key} must be an integer, a non-empty string or null, not {value!r}"
    )


def _parse_ping(message: dict[str, Any]) -> Ping:
    return Ping(request_id(message))


def _parse_subscribe(message: dict[str, Any]) -> Subscribe:
    data = _data(message, "subscribe")
    unknown = set(data) - {"event_types", "circle_id", "project_id"}
    if unknown:
        raise ProtocolError("invalid_message", f"unknown subscribe field(s): {sorted(unknown)}")
    types = data.get("event_types")
    if types is None:
        patterns: tuple[str, ...] = ("*",)
    elif isinstance(types, str):
        patterns = (check_pattern(types),)
    elif isinstance(types, list) and types:
        patterns = tuple(dict.fromkeys(check_pattern(t) for t in types))
    else:
        raise ProtocolError(
            "invalid_message", "event_types must be a non-empty list of patterns or null"
        )
    if "*" in patterns:
        patterns = ("*",)
    filters = Filters(patterns, _scope_id(data, "circle_id"), _scope_id(data, "project_id"))
    return Subscribe(filters, request_id(message))


def _parse_unsubscribe(message: dict[str, Any]) -> Unsubscribe:
    return Unsubscribe(request_id(message))


def _parse_publish(message: dict[str, Any]) -> Publish:
    data = _data(message, "publish")
    if "type" not in data:
        raise ProtocolError("invalid_message", "'publish' data needs an event 'type'")
    payload = data.get("data", {})
    if payload is None:
        payload = {}
    if not isinstance(payload, dict):
        raise ProtocolError("invalid_message", "event data must be a JSON object")
    return Publish(
        type=check_event_type(data["type"]),
        data=payload,
        source_agent_id=_scope_id(data, "source_agent_id"),
        circle_id=_scope_id(data, "circle_id"),
        project_id=_scope_id(data, "project_id"),
        id=request_id(message),
    )


def _parse_resume(message: dict[str, Any]) -> Resume:
    data = _data(message, "resume")
    since = data.get("since_seq")
    if not isinstance(since, int) or isinstance(since, bool) or not 0 <= since <= _MAX_INT:
        raise ProtocolError("invalid_message", f"since_seq must be an integer >= 0, not {since!r}")
    epoch = data.get("epoch")
    if epoch is not None and not isinstance(epoch, str):
        raise ProtocolError("invalid_message", f"epoch must be a string, not {epoch!r}")
    return Resume(since, epoch, request_id(message))


def _parse_auth(message: dict[str, Any]) -> Auth:
    token = _data(message, "auth").get("token")
    if not isinstance(token, str) or not token:
        raise ProtocolError("invalid_message", "'auth' data needs a non-empty string 'token'")
    return Auth(token, request_id(message))


_PARSERS: dict[str, Callable[[dict[str, Any]], ClientMessage]] = {
    "ping": _parse_ping,
    "subscribe": _parse_subscribe,
    "unsubscribe": _parse_unsubscribe,
    "publish": _parse_publish,
    "resume": _parse_resume,
    "auth": _parse_auth,
}


def parse_client_message(frame: str | bytes) -> ClientMessage:
    """Parse and validate one text frame from a client; raise ProtocolError if it is bad.

    When the frame is a JSON object with a valid ``id``, the ProtocolError carries
    it as ``request_id``, so the error reply can echo it.
    """
    try:
        message = json.loads(frame)
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("invalid_json", "message is not valid JSON") from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_json", "message must be a JSON object")
    rid = request_id(message)
    try:
        kind = message.get("type")
        if not isinstance(kind, str):
            raise ProtocolError("invalid_message", "message needs a string 'type'")
        parser = _PARSERS.get(kind)
        if parser is None:
            shown = kind if len(kind) <= 64 else kind[:61] + "..."
            raise ProtocolError(
                "unknown_type",
                f"unknown message type {shown!r}; expected one of {', '.join(_PARSERS)}",
            )
        return parser(message)
    except ProtocolError as exc:
        if exc.request_id is None:
            exc.request_id = rid
        raise
