"""Reaching a GatheRing server: URL checks, query building, connecting, and error text.

The one place the notebook client (:mod:`gathering_lab.client`), the ``demo`` and
``listen`` commands and the widgets share, so they check URLs, name clients,
send tokens and describe failures the same way::

    url = check_url("ws://127.0.0.1:8000/ws/dashboard")
    url = with_query(url, client_id="nb", last_seq=41, epoch="e1")
    async with open_connection(url, token=token) as ws:
        ...

A token always travels in an ``Authorization: Bearer`` header, never in the
URL, and is redacted from websockets' debug logs.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import CONNECTING, OPEN, Event
from websockets.streams import StreamReader

from .auth import install_redaction
from .exceptions import AuthError, ConnectionFailed, ProtocolError

__all__ = [
    "DEFAULT_URL",
    "OPEN_TIMEOUT",
    "TOKEN_ENV",
    "WS_PATH",
    "DispatchConnection",
    "check_url",
    "closed_message",
    "connect_error",
    "connect_options",
    "describe",
    "error_text",
    "get_json",
    "http_url",
    "open_connection",
    "query_param",
    "same_endpoint",
    "with_client_id",
    "with_query",
]

logger = logging.getLogger("gathering_lab.connection")

#: The GatheRing WebSocket endpoint's path.
WS_PATH = "/ws/dashboard"
DEFAULT_URL = f"ws://127.0.0.1:8000{WS_PATH}"
#: Environment variable the ``demo`` and ``listen`` commands read a token from.
TOKEN_ENV = "GATHERING_LAB_TOKEN"
#: Seconds allowed for the TCP connection and the WebSocket handshake.
OPEN_TIMEOUT = 10.0
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})


# URLs


def check_url(url: Any) -> str:
    """Return ``url`` stripped if it is a ``ws://`` or ``wss://`` URL with a host.

    Raises ValueError naming the URL otherwise.
    """
    if not isinstance(url, str):
        raise ValueError(f"the URL must be a ws:// or wss:// URL like {DEFAULT_URL}, not {url!r}")
    url = url.strip()
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if parts.scheme not in ("ws", "wss"):
        raise ValueError(
            f"invalid URL {url!r}: the scheme must be ws:// or wss://, e.g. {DEFAULT_URL}"
        )
    if not parts.hostname:
        raise ValueError(f"invalid URL {url!r}: no host")
    return url


def with_query(url: str, **params: Any) -> str:
    """Return ``url`` with these query parameters set (replacing the URL's own); None skips one."""
    given = {key: str(value) for key, value in params.items() if value is not None}
    if not given:
        return url
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k not in given]
    query.extend(given.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def with_client_id(url: str, client_id: str | None) -> str:
    """Return ``url`` with ``?client_id=`` set to ``client_id`` (None: keep the URL's)."""
    return with_query(url, client_id=client_id)


def query_param(url: str, name: str) -> str | None:
    """The value of query parameter ``name`` in ``url`` (the first one), or None."""
    for key, value in parse_qsl(urlsplit(url).query, keep_blank_values=True):
        if key == name:
            return value
    return None


def http_url(ws_url: str, path: str = "/") -> str:
    """The ``http(s)://`` URL of ``path`` on the server a ``ws(s)://`` URL points at."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a WebSocket URL: {ws_url!r}")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def same_endpoint(url: str, other: str) -> bool:
    """True if two WebSocket URLs point at the same endpoint (the query aside)."""
    a, b = urlsplit(url), urlsplit(other)
    return (a.scheme, a.netloc, a.path.rstrip("/")) == (b.scheme, b.netloc, b.path.rstrip("/"))


# Connecting


def connect_options(
    url: str,
    *,
    token: str | None = None,
    logger: logging.Logger | None = None,
    **options: Any,
) -> dict[str, Any]:
    """The keyword arguments for websockets' ``connect`` to ``url``, ours and ``options``.

    Loopback URLs bypass any configured HTTP proxy; compression is off unless
    ``compression="deflate"`` is passed; ``token`` goes in a Bearer header and the
    ``logger`` websockets writes to (at DEBUG, headers included) redacts it.
    """
    try:
        host = urlsplit(url).hostname
    except ValueError as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    if host in _LOOPBACK_HOSTS:
        options.setdefault("proxy", None)
    options.setdefault("compression", None)
    options.setdefault("open_timeout", OPEN_TIMEOUT)
    options["logger"] = logger if logger is not None else logging.getLogger("websockets.client")
    if token:
        install_redaction(options["logger"])
        headers: Mapping[str, str] = options.get("additional_headers") or {}
        options["additional_headers"] = {**dict(headers), "Authorization": f"Bearer {token}"}
    return options


# The code object of the generator websockets' parser waits in between two frames, when its
# buffer is empty: how DispatchConnection knows the parser holds no part of a frame.
_AT_EOF_CODE = getattr(StreamReader.at_eof, "__code__", None)
#: A frame still incomplete at the end of a read is kept by DispatchConnection's own parser
#: up to this size; a bigger one is left to websockets' parser (no quadratic re-copying).
SPLIT_FRAME_LIMIT = 64 * 2**10


class DispatchConnection(ClientConnection):
    """A client connection that can hand each text message to a callback as soon as it is read.

    websockets queues every incoming message until ``recv()`` takes it (a queue, a
    future and an incremental UTF-8 decoder per message). With :attr:`on_text` set, a
    text message that comes in one frame while nothing waits in that queue is passed,
    as bytes, to ``on_text`` straight from the parse loop instead; ``on_text`` returns
    True when it took the message, False to leave it to the queue (e.g. a frame that is
    not UTF-8: ``recv()`` then fails the connection with 1007, as always). Fragmented
    and binary messages, and every message that arrives while earlier ones are still
    queued, are queued as before, so messages are seen in the order they came: whoever
    reads the queue calls :meth:`taken` after each message it takes, and direct
    delivery resumes once the queue is empty. ``on_text`` must not raise.

    While the connection is open, no extension (compression) is in use, websockets does
    not log frames (DEBUG) and websockets' parser sits between two frames, incoming bytes
    are split into frames here (:meth:`data_received`), several times cheaper per frame
    than websockets' generator-based parser: each unmasked, unfragmented text frame within
    ``max_size`` goes to ``on_text`` (when set and nothing is queued); every other frame
    (ping, pong, close, binary, fragments, a refused text, one too big), whole and in
    order, goes to websockets' parser, which handles it exactly as before. A frame cut
    between two reads waits here for the rest (up to :data:`SPLIT_FRAME_LIMIT` bytes; a
    bigger one is left to websockets and splitting resumes after it). The read that ends
    the handshake is cut after the HTTP response, so the frames in it are split here too.
    :attr:`fast_frames` counts the text frames split here and offered to ``on_text``.

    Pass it as ``create_connection=DispatchConnection`` to websockets' ``connect``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Called with each one-frame text message's bytes; True if it took the message.
        self.on_text: Callable[[bytes], bool] | None = None
        #: Messages delivered to ``on_text`` so far.
        self.dispatched = 0
        #: Text frames split by :meth:`data_received` itself and offered to ``on_text``.
        self.fast_frames = 0
        # Complete messages in the queue, not yet taken. (A fragmented message's frames
        # are queued too; no TEXT frame can come between them: websockets refuses it.)
        self._queued = 0
        # The start of a frame that the last read ended in (only while splitting here).
        self._partial = b""
        # Bytes websockets' parser still needs to finish the big frame it was given.
        self._owed = 0

    def taken(self) -> None:
        """Record that one queued message was taken (``recv()``, ``async for``)."""
        self._queued -= 1

    def _splittable(self) -> bool:
        """True if incoming bytes may be split into frames here (see the class docstring)."""
        protocol = self.protocol
        if (
            protocol.state is not OPEN
            or protocol.debug
            or protocol.extensions
            or protocol.reader.buffer
        ):
            return False
        # Between two frames, websockets' parser waits in StreamReader.at_eof() (the
        # innermost of its generators); anywhere else (e.g. after a frame's header, its
        # buffer empty) it holds part of a frame.
        waiting = protocol.parser
        for _ in range(8):
            inner = getattr(waiting, "gi_yieldfrom", None)
            if inner is None:
                break
            waiting = inner
        return _AT_EOF_CODE is not None and getattr(waiting, "gi_code", None) is _AT_EOF_CODE

    def data_received(self, data: bytes) -> None:
        """Split whole frames here while that is safe; give websockets the rest, in order."""
        if self._owed:
            # websockets' parser holds the start of a big frame: first give it the rest.
            if len(data) <= self._owed:
                self._owed -= len(data)
                super().data_received(data)
                return
            head, data = data[: self._owed], data[self._owed :]
            self._owed = 0
            super().data_received(head)
            if not self._splittable():
                super().data_received(data)
                return
        elif self._partial:
            data = self._partial + data
            self._partial = b""
        elif not self._splittable():
            if self.protocol.state is not CONNECTING:
                super().data_received(data)
                return
            # The read that ends the handshake often holds the first frames too: give
            # websockets the HTTP response alone, so its parser starts the frames between
            # two of them (else it may hold part of one until a read ends on a boundary).
            end = data.find(b"\r\n\r\n") + 4
            if not 4 <= end < len(data):
                super().data_received(data)
                return
            super().data_received(data[:end])
            data = data[end:]
            if not self._splittable():
                super().data_received(data)
                return
        protocol = self.protocol
        limit = protocol.max_message_size
        if protocol.max_fragment_size is not None:
            limit = min(limit or protocol.max_fragment_size, protocol.max_fragment_size)
        size = len(data)
        pos = 0
        while pos < size:
            if size - pos < 2:
                break
            second = data[pos + 1]
            length = second & 0x7F
            if length < 126:
                start = pos + 2
            elif length == 126:
                start = pos + 4
                if start > size:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            else:
                start = pos + 10
                if start > size:
                    break
                length = int.from_bytes(data[pos + 2 : start], "big")
            end = start + length
            if second & 0x80 or (limit is not None and length > limit):
                # Masked (a protocol error) or too big (1009): websockets says so and closes.
                super().data_received(data[pos:])
                return
            if end > size:
                if end - pos > SPLIT_FRAME_LIMIT:
                    # A big frame: websockets' parser takes it as it comes, no re-copying.
                    self._owed = end - size
                    super().data_received(data[pos:])
                    return
                break
            on_text = self.on_text
            if (
                data[pos] == 0x81  # FIN, no RSV bits, TEXT
                and on_text is not None
                and not self._queued
                and protocol.current_size is None
                and protocol.state is OPEN
            ):
                self.fast_frames += 1
                if on_text(data[start:end]):
                    self.dispatched += 1
                    pos = end
                    continue
            # Any other frame, whole: websockets parses it as it would have.
            super().data_received(data[pos:end])
            pos = end
            if pos < size and not self._splittable():
                super().data_received(data[pos:])
                return
        if pos < size:
            self._partial = data[pos:]

    def process_event(self, event: Event) -> None:
        """Offer a one-frame text message to ``on_text`` if nothing is queued; else queue."""
        if self.response is not None and isinstance(event, Frame):
            opcode = event.opcode
            if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
                on_text = self.on_text
                if on_text is not None and opcode is Opcode.TEXT and event.fin and not self._queued:
                    data = event.data
                    if on_text(data if data.__class__ is bytes else bytes(data)):
                        self.dispatched += 1
                        return
                if event.fin:
                    self._queued += 1
        super().process_event(event)


@asynccontextmanager
async def open_connection(
    url: str, *, client_id: str | None = None, token: str | None = None, **options: Any
) -> AsyncIterator[ClientConnection]:
    """Open a WebSocket connection to ``url`` as ``client_id`` (None: the URL's own, if any).

    ``token`` (a JWT, for servers with authentication) goes in an
    ``Authorization: Bearer`` header, never in the URL. Failures raise
    ConnectionFailed with a message for humans that names ``url`` (ValueError for
    a malformed URL). Other ``options`` go to websockets' ``connect`` (see
    :func:`connect_options`).
    """
    options = connect_options(url, token=token, **options)
    try:
        ws = await connect(with_client_id(url, client_id), **options)
    except InvalidURI as exc:
        raise ValueError(f"invalid URL {url!r}: {exc}") from None
    except (OSError, InvalidHandshake, TimeoutError) as exc:
        raise connect_error(url, exc, options["open_timeout"]) from None
    try:
        yield ws
    finally:
        await ws.close()


def get_json(url: str, token: str | None, timeout: float) -> Any:
    """GET ``url`` (with ``token`` as a Bearer header) and parse its JSON body; blocking.

    Raises AuthError on 401/403, ConnectionFailed if the server cannot answer.
    """
    request = urllib.request.Request(url, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.loads(response.read().decode())
    except urllib.error.HTTPError as exc:
        detail = f"GET {url}: {exc.code} {exc.reason}"
        if exc.code in (401, 403):
            raise AuthError(f"{detail} (the stats need a token with the admin role)") from None
        raise ConnectionFailed(detail) from None
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionFailed(f"GET {url}: {getattr(exc, 'reason', exc)}") from None


# Error text


def connect_error(
    url: str, exc: BaseException, open_timeout: float = OPEN_TIMEOUT
) -> ConnectionFailed:
    """Translate a failed WebSocket opening handshake into a message for humans."""
    if isinstance(exc, ConnectionRefusedError):
        return ConnectionFailed(
            f"cannot reach {url}: connection refused — is `gathering-lab serve` running?"
        )
    if isinstance(exc, InvalidStatus):
        response = exc.response
        hint = ""
        if urlsplit(url).path != WS_PATH:
            hint = f"; the GatheRing WebSocket endpoint is {WS_PATH}"
        return ConnectionFailed(
            f"{url} is not a WebSocket endpoint: the server answered "
            f"HTTP {response.status_code} {response.reason_phrase}{hint}"
        )
    if isinstance(exc, InvalidHandshake):
        return ConnectionFailed(f"{url} is not a WebSocket server: {exc}")
    if isinstance(exc, TimeoutError):
        return ConnectionFailed(
            f"cannot reach {url}: no WebSocket handshake within {open_timeout:g}s"
        )
    if isinstance(exc, OSError):
        reason = exc.strerror or str(exc) or type(exc).__name__
        return ConnectionFailed(f"cannot reach {url}: {reason[:1].lower()}{reason[1:]}")
    return ConnectionFailed(f"cannot reach {url}: {exc}")


def closed_message(url: str, exc: ConnectionClosed) -> str:
    """Describe a connection the server closed (or lost), with the close code and reason."""
    if exc.rcvd is None:
        return f"lost the connection to {url}: no close frame received"
    text = f"the server closed the connection to {url}: code {exc.rcvd}"
    reason = exc.rcvd.reason.lower()
    if exc.rcvd.code == 1008 and ("auth" in reason or "token" in reason):
        text += f" (pass a token with --token or ${TOKEN_ENV})"
    return text


def describe(exc: BaseException) -> str:
    """A short reason for a lost or failed connection, for a status line."""
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        if rcvd is not None:
            return f"closed by server: {rcvd.code} {rcvd.reason}".strip()
        return "connection closed abnormally"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused (is the server running?)"
    if isinstance(exc, TimeoutError):
        return "timed out"
    return error_text(exc)


def error_text(error: BaseException | Mapping[str, Any]) -> str:
    """One line for an exception, or for a server ``error`` message (``code: message``)."""
    if isinstance(error, ProtocolError):
        return f"{error.code}: {error.message}"
    if isinstance(error, BaseException):
        if isinstance(error, TimeoutError):
            return "timed out"
        return str(error) or type(error).__name__
    data = error.get("data") or {}
    if isinstance(data, Mapping):
        return f"{data.get('code', 'error')}: {data.get('message', '')}"
    return str(data)
