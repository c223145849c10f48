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
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import orjson

from .exceptions import ProtocolError

__all__ = [
    "CONNECTED_MESSAGE",
    "CONTROL_TYPES",
    "DEFAULT_MAX_PATTERNS",
    "ERROR_CODES",
    "EVENT_TYPE_PATTERN",
    "MAX_REQUEST_ID_LENGTH",
    "MAX_DEPTH",
    "MAX_PATTERN_LENGTH",
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
    "id_key",
    "loads",
    "new_event_id",
    "now",
    "parse_client_message",
    "parse_timestamp",
    "pong",
    "request_id",
    "same_id",
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

#: Deepest nesting an event's ``data`` may have (``{}`` is 1, ``{"a": []}`` is 2): deeper
#: JSON is refused before it is numbered, far below where parsers and encoders recurse out.
MAX_DEPTH = 64
#: Longest event type or subscription pattern, in characters.
MAX_PATTERN_LENGTH = 255
#: Default most type patterns one ``subscribe`` may hold (``serve(max_patterns=...)``).
DEFAULT_MAX_PATTERNS = 64

_MAX_INT = 2**63 - 1
# allow_nan=False: NaN and Infinity are not JSON, and browsers' JSON.parse refuses them.
# The standard library's encoder is the reference (and the slow path) of encode().
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False, default=str)
# orjson, the fast path, writes what _ENCODER writes (compact, UTF-8, keys in insertion
# order) once datetimes and dataclasses go to _orjson_default like any other object
# JSON has no type for. It refuses lone surrogates, non-str keys and ints past 64 bits
# (encode() then takes the slow path) but writes NaN and Infinity as null (encode()
# checks for that).
_ORJSON_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_PASSTHROUGH_DATACLASS
_orjson_dumps = orjson.dumps
_orjson_loads = orjson.loads
_OrjsonDecodeError = orjson.JSONDecodeError
# orjson reads the ints of [-2**63, 2**64 - 1] exactly and others as floats, silently.
# Past that range an int has 20 digits or more, or is negative with 19: with digits and
# "-" mapped to "0" (and anything else to " "), both are a run of 20 "0"s, which
# _maybe_big() looks for (so do some harmless others, e.g. long fractions).
_DIGITS = bytes(48 if 48 <= i <= 57 or i == 45 else 32 for i in range(256))
_TWENTY = b"0" * 20
_ORJSON_UTC_Z = orjson.OPT_UTC_Z
_join = b"".join
_CONTAINERS = (dict, list, tuple)
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
    if moment.microsecond and moment.__class__ is datetime:
        # orjson writes RFC 3339 with a Z and six digits of microseconds unless they are
        # 0: the same text as isoformat(timespec="microseconds"), about 5x faster.
        return _orjson_dumps(moment, option=_ORJSON_UTC_Z)[1:-1].decode()
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
    if len(value) > MAX_PATTERN_LENGTH:
        raise ProtocolError(
            "invalid_event_type",
            f"event type {value[:40]!r}... is {len(value)} characters long; "
            f"the limit is {MAX_PATTERN_LENGTH}",
        )
    if not EVENT_TYPE_PATTERN.match(value):
        raise ProtocolError(
            "invalid_event_type",
            f"invalid event type {value!r}: expected dotted lowercase words like 'task.created'",
        )
    return value


def type_matches(patterns: Collection[str], type_name: str) -> bool:
    """True if ``type_name`` matches one of ``patterns`` (``*``, ``task.*``, ``task.created``).

    ``task.*`` matches every type that starts with ``task.``, however many segments follow.
    The one matching rule of the package (filters, bus routing, history, clients). It looks
    ``type_name`` and its prefixes up in ``patterns``: with a set or frozenset its cost
    grows with the depth of the type, not with the number of patterns.
    """
    if "*" in patterns or type_name in patterns:
        return True
    if len(type_name) > MAX_PATTERN_LENGTH:  # not a valid type: only "*" matches it
        return False
    dot = type_name.find(".")
    while dot != -1:
        if type_name[: dot + 1] + "*" in patterns:
            return True
        dot = type_name.find(".", dot + 1)
    return False


def matching_patterns(type_name: str) -> list[str]:
    """Every pattern that matches ``type_name``: ``*``, the type, and ``a.*``, ``a.b.*``..."""
    found = ["*", type_name]
    if len(type_name) <= MAX_PATTERN_LENGTH:
        dot = type_name.find(".")
        while dot != -1:
            found.append(type_name[: dot + 1] + "*")
            dot = type_name.find(".", dot + 1)
    return found


def check_pattern(value: Any) -> str:
    """Return ``value`` as a subscription pattern (``*``, ``task.*``, ``task.created``)."""
    value = getattr(value, "value", value)
    if isinstance(value, str) and len(value) > MAX_PATTERN_LENGTH:
        raise ProtocolError(
            "too_large",
            f"event type pattern {value[:40]!r}... is {len(value)} characters long; "
            f"the limit is {MAX_PATTERN_LENGTH}",
        )
    if not isinstance(value, str) or not _PATTERN_RE.match(value):
        raise ProtocolError(
            "invalid_message",
            f"invalid event type pattern {value!r}: expected '*', 'task.*' or 'task.created'",
        )
    return value


# Server -> client messages


def check_depth(value: Any, limit: int = MAX_DEPTH) -> None:
    """Raise ValueError if ``value`` nests dicts and lists more than ``limit`` levels deep.

    ``{}`` and ``[]`` are one level, ``{"a": [1]}`` two; scalars are none. Iterative, so it
    never recurses out, and it stops at the first level past ``limit``.
    """
    level = [value] if isinstance(value, _CONTAINERS) else []
    depth = 0
    while level:
        depth += 1
        if depth > limit:
            raise ValueError(f"nested more than {limit} levels deep")
        below: list[Any] = []
        for node in level:
            for child in node.values() if isinstance(node, dict) else node:
                if isinstance(child, _CONTAINERS):
                    below.append(child)
        level = below


def _orjson_default(value: Any) -> Any:
    """What orjson writes for an object it has no JSON type for: what ``json`` writes."""
    if isinstance(value, float):  # a float subclass (numpy.float64): json writes the number
        return float(value)
    return str(value)


def _known_nulls(message: Mapping[str, Any]) -> int:
    """How many ``null`` the envelope and its ``data`` hold at their first level (a lower bound)."""
    count = 0
    for value in message.values():
        if value is None:
            count += 1
    data = message.get("data")
    if data.__class__ is dict:
        for value in data.values():
            if value is None:
                count += 1
    return count


def _encode_stdlib(message: Mapping[str, Any], max_depth: int) -> bytes:
    """encode() with the standard library: the reference, and the path for what orjson refuses."""
    try:
        text = _ENCODER.encode(message)
    except ValueError as exc:  # NaN / Infinity, circular references
        raise ValueError(f"not strict JSON: {exc}") from None
    except TypeError as exc:  # keys JSON cannot have
        raise ValueError(f"not JSON: {exc}") from None
    except RecursionError:
        raise ValueError(f"nested more than {max_depth} levels deep") from None
    # Fewer brackets than levels allowed cannot nest too deep: walk only the others.
    if text.count("{") + text.count("[") > max_depth:
        check_depth(message, max_depth)
    try:
        return text.encode()
    except UnicodeEncodeError as exc:
        bad = exc.object[exc.start : exc.end]
        raise ValueError(
            f"not strict JSON: a string holds the lone surrogate {bad!r}, which UTF-8 cannot encode"
        ) from None


def encode(message: Mapping[str, Any], max_depth: int = MAX_DEPTH + 1) -> bytes:
    """Serialise a message to the compact, strict UTF-8 JSON of one text frame.

    Strict means what every JSON parser, browsers' ``JSON.parse`` included, accepts: no
    NaN or Infinity, no lone UTF-16 surrogate in a string, at most ``max_depth`` levels
    of nesting (an event's ``data`` may nest :data:`MAX_DEPTH` levels inside its envelope).
    Objects JSON has no type for are written as their ``str()``. Raises ValueError
    (naming the problem) for anything else.

    The bytes are those of the standard library's ``json`` (``separators=(",", ":")``,
    ``ensure_ascii=False``), keys in insertion order, except for the spelling of some
    floats (orjson writes ``1e-7`` and ``0.00001`` where ``json`` writes ``1e-07`` and
    ``1e-05``: the same numbers) and for plain ``Enum`` members, written as their value.
    Integers of any size are written exactly.
    """
    try:
        data = _orjson_dumps(message, default=_orjson_default, option=_ORJSON_OPTIONS)
    except TypeError:  # lone surrogate, non-str key, int past 64 bits, too deep, circular
        return _encode_stdlib(message, max_depth)
    # orjson writes NaN and Infinity as null. Each one adds a "null" to the output; so
    # does each None: if there are no more "null" than the Nones seen at the first two
    # levels, there is no NaN. Otherwise the strict encoder decides (and names it).
    nulls = data.count(b"null")
    if nulls and nulls > _known_nulls(message):
        _encode_stdlib(message, max_depth)
    # Fewer brackets than levels allowed cannot nest too deep: walk only the others.
    if data.count(b"{") + data.count(b"[") > max_depth:
        check_depth(message, max_depth)
    # orjson's bytes keep the buffer it wrote into (4 KiB at least since 3.12, however
    # short the JSON): a copy of the right size, since events stay in history.
    return _join((data, b""))


def _refuse_nan(name: str) -> Any:
    raise ValueError(f"{name} is not JSON: numbers must be finite")


#: Strict JSON with the standard library: the exact int for numbers past 64 bits.
_EXACT_DECODER = json.JSONDecoder(parse_constant=_refuse_nan)


def _maybe_big(raw: bytes) -> bool:
    """True if ``raw`` may hold an int orjson does not read exactly (past 64 bits)."""
    return _TWENTY in raw.translate(_DIGITS)


def loads(frame: str | bytes) -> Any:
    """Parse strict JSON: raise ValueError for NaN, Infinity (``1e999`` too), lone surrogates.

    Integers are exact, however long (orjson would turn those past 64 bits into floats:
    a frame with 20 digits in a row, or a minus and 19, is parsed by the standard library).
    """
    value = _orjson_loads(frame)  # JSONDecodeError is a ValueError
    raw = frame.encode() if isinstance(frame, str) else frame
    if _maybe_big(raw):
        value = _EXACT_DECODER.decode(frame if isinstance(frame, str) else frame.decode())
    return value


def decode(frame: str | bytes) -> dict[str, Any]:
    """Parse a server message (the inverse of :func:`encode`); raises ProtocolError.

    Strict like :func:`encode`: NaN, Infinity and lone surrogates are ``invalid_json``;
    integers are exact however long (see :func:`loads`, inlined here: the client's hot path).
    """
    try:
        message = _orjson_loads(frame)
        raw: bytes = frame.encode() if isinstance(frame, str) else frame
        if _maybe_big(raw):
            message = loads(frame)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"invalid JSON: {exc}") from None
    if message.__class__ is not dict or message.get("type").__class__ is not str:
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


class _NoId:
    """What a filter on a value that is no id (a float, a bool) wants: matches nothing."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        return False

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "<no id>"


_NO_ID = _NoId()


def _wanted_id(value: Any) -> Any:
    if value is None:
        return None
    key = id_key(value)
    return _NO_ID if key is None else key


def id_key(value: Any) -> int | str | None:
    """The form a circle, project or agent id compares by; None for what is no id.

    An id is an integer or a string, and two ids are equal when they are the same kind
    and the same value: ``1`` and ``"1"`` are different circles. Booleans, floats and
    other objects are no ids and match nothing. Subclasses (``IntEnum``, ``StrEnum``)
    compare as the plain int or str JSON sends for them.
    """
    kind = value.__class__
    if kind is int or kind is str:
        return value
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, str):
        return str.__str__(value)
    return None


def same_id(wanted: Any, value: Any) -> bool:
    """True if ``value`` is the id ``wanted`` under :func:`id_key`'s rule (exact)."""
    key = id_key(wanted)
    return key is not None and id_key(value) == key  # an int never equals a str


@dataclass(frozen=True, slots=True)
class Filters:
    """What a client wants to receive: type patterns and optional circle / project.

    Type patterns match by :func:`type_matches` (``*``, ``task.*``, ``task.created``),
    looked up in a frozenset built once, so matching costs the same for one pattern or
    a thousand. Ids match by :func:`same_id`: exactly, so ``circle_id=1`` does not
    match an event whose ``circle_id`` is ``"1"`` (server, ``LabClient``, ``gathering-lab
    listen``, the widgets, token scopes and ``gathering-ws.js`` all use this rule).
    """

    event_types: tuple[str, ...] = ("*",)
    circle_id: Any = None
    project_id: Any = None
    _types: frozenset[str] = field(init=False, repr=False, compare=False)
    _circle: Any = field(init=False, repr=False, compare=False)
    _project: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        types = self.event_types
        if isinstance(types, str):
            types = (types,)
            object.__setattr__(self, "event_types", types)
        object.__setattr__(self, "_types", frozenset(types))
        object.__setattr__(self, "_circle", _wanted_id(self.circle_id))
        object.__setattr__(self, "_project", _wanted_id(self.project_id))

    def matches(self, type_name: str, circle_id: Any = None, project_id: Any = None) -> bool:
        """True if an event of this type, circle and project passes these filters."""
        wanted = self._circle
        if wanted is not None and not (
            circle_id == wanted
            if circle_id.__class__ is wanted.__class__
            else id_key(circle_id) == wanted
        ):
            return False
        wanted = self._project
        if wanted is not None and not (
            project_id == wanted
            if project_id.__class__ is wanted.__class__
            else id_key(project_id) == wanted
        ):
            return False
        return type_matches(self._types, type_name)

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


def _parse_subscribe(
    message: dict[str, Any], max_patterns: int = DEFAULT_MAX_PATTERNS
) -> Subscribe:
    data = _data(message, "subscribe")
    unknown = set(data) - {"event_types", "circle_id", "project_id"}
    if unknown:
        shown = sorted(unknown)[:5]
        raise ProtocolError("invalid_message", f"unknown subscribe field(s): {shown}")
    types = data.get("event_types")
    if types is None:
        patterns: tuple[str, ...] = ("*",)
    elif isinstance(types, str):
        patterns = (check_pattern(types),)
    elif isinstance(types, list) and types:
        if len(types) > max_patterns:
            raise ProtocolError(
                "too_large",
                f"subscribe has {len(types)} event type patterns; the limit is {max_patterns}",
            )
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


def _refuse_constant(name: str) -> Any:
    raise ProtocolError(
        "invalid_message", f"{name} is not JSON: numbers must be finite (no NaN or Infinity)"
    )


def _lone_surrogate(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that UTF-8 cannot encode, if any."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            if not node.isascii():
                try:
                    node.encode()
                except UnicodeEncodeError:
                    return node
        elif isinstance(node, dict):
            stack.extend(node)
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


#: Parses client frames; NaN and Infinity raise ProtocolError (built once: json.loads with
#: parse_constant= would build a decoder per call).
_STRICT_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)


def _brackets(frame: str | bytes) -> int:
    if isinstance(frame, str):
        return frame.count("{") + frame.count("[")
    return frame.count(b"{") + frame.count(b"[")


def _lenient_request_id(frame: str | bytes) -> RequestId | None:
    """The ``id`` of a frame that is JSON but for NaN or Infinity, if it has a valid one."""
    try:
        message = json.loads(frame)
        return request_id(message) if isinstance(message, dict) else None
    except (ValueError, RecursionError, ProtocolError):
        return None


def parse_client_message(
    frame: str | bytes, *, max_patterns: int = DEFAULT_MAX_PATTERNS
) -> ClientMessage:
    """Parse and validate one text frame from a client; raise ProtocolError if it is bad.

    Only what can go out again as strict JSON gets through: NaN and Infinity, a lone
    UTF-16 surrogate (``"\\ud800"``) anywhere, or an event ``data`` nested more than
    :data:`MAX_DEPTH` levels are refused with ``invalid_message``. A ``subscribe`` may
    hold at most ``max_patterns`` type patterns of :data:`MAX_PATTERN_LENGTH` characters
    (past either: ``too_large``). Integers are kept exact, however long.

    When the frame is a JSON object with a valid ``id``, the ProtocolError carries
    it as ``request_id``, so the error reply can echo it.
    """
    # The fast path: orjson refuses NaN, Infinity and lone surrogates (raw or escaped)
    # itself. What it refuses, and numbers it might not keep exact, take the standard
    # library's path, which names the problem.
    try:
        message = _orjson_loads(frame)
    except _OrjsonDecodeError:
        return _parse_stdlib(frame, max_patterns)
    raw = frame.encode() if isinstance(frame, str) else frame
    if _maybe_big(raw):
        return _parse_stdlib(frame, max_patterns)
    if message.__class__ is not dict:
        raise ProtocolError("invalid_json", "message must be a JSON object")
    return _validated(message, frame, max_patterns, surrogates=False)


def _parse_stdlib(frame: str | bytes, max_patterns: int) -> ClientMessage:
    """parse_client_message() with the standard library's parser."""
    if isinstance(frame, str) and not frame.isascii():
        try:  # a str from Python may hold a raw lone surrogate (a text frame cannot)
            frame.encode()
        except UnicodeEncodeError:
            raise ProtocolError(
                "invalid_message", "message holds a lone UTF-16 surrogate: not valid Unicode text"
            ) from None
    try:
        message = _STRICT_DECODER.decode(frame if isinstance(frame, str) else frame.decode())
    except ProtocolError as exc:  # NaN or Infinity: still answer with the request's id
        exc.request_id = _lenient_request_id(frame)
        raise
    except (ValueError, UnicodeDecodeError):
        raise ProtocolError("invalid_json", "message is not valid JSON") from None
    except RecursionError:
        raise ProtocolError(
            "invalid_message", f"message is nested too deeply (event data: {MAX_DEPTH} levels)"
        ) from None
    if not isinstance(message, dict):
        raise ProtocolError("invalid_json", "message must be a JSON object")
    return _validated(message, frame, max_patterns, surrogates=True)


def _validated(
    message: dict[str, Any], frame: str | bytes, max_patterns: int, *, surrogates: bool
) -> ClientMessage:
    """The checks after parsing: id, depth, lone surrogates (if ``surrogates``), fields."""
    rid = request_id(message)
    try:
        try:
            # The message wraps an event's data two levels deep: {"data": {"data": {...}}}.
            # Fewer brackets than levels allowed cannot nest too deep: walk only the others.
            if _brackets(frame) > MAX_DEPTH + 2:
                check_depth(message, MAX_DEPTH + 2)
        except ValueError:
            raise ProtocolError(
                "invalid_message",
                f"message is nested too deeply: event data may nest at most {MAX_DEPTH} levels",
            ) from None
        # A lone surrogate can only come from a \u escape: UTF-8 text frames cannot carry one.
        if (
            surrogates
            and ("\\u" in frame if isinstance(frame, str) else b"\\u" in frame)
            and (bad := _lone_surrogate(message)) is not None
        ):
            raise ProtocolError(
                "invalid_message",
                f"string {bad[:40]!r} holds a lone UTF-16 surrogate, which is not valid Unicode "
                "text: send characters outside the BMP as surrogate pairs",
            )
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
        if parser is _parse_subscribe:
            return _parse_subscribe(message, max_patterns)
        return parser(message)
    except ProtocolError as exc:
        if exc.request_id is None:
            exc.request_id = rid
        raise
