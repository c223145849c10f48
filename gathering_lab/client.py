"""LabClient: an async WebSocket client for any GatheRing-protocol server.

::

    client = await gl.connect("ws://127.0.0.1:8000/ws/dashboard", "notebook")
    await client.ping()                       # round trip in seconds
    await client.publish("task.created", {"title": "x"}, circle_id=1)
    await client.wait_for_events(1)
    client.frame.df                           # what it received, as a DataFrame
    await client.close()

The client receives in a background task into an :class:`~gathering_lab.frame.EventFrame`.
When the connection drops it reconnects with exponential backoff (``min(1 s *
2**attempt, 30 s)``, reset after a successful connect, as in the guide's section 6.2)
and asks the server to resume from the last ``seq`` it saw, so nothing is lost
and nothing is received twice. A server restart (a new ``epoch``) or a gap in
history is recorded as a row of the frame (``lab.server.restarted``, ``lab.gap``)
and in :attr:`LabClient.status`, never hidden.

Every request carries a fresh ``id`` and is settled only by the reply that
echoes it; replies without an ``id`` (servers that do not echo) are matched to
the oldest pending request of their kind.

It also works against a server that speaks only the guide's original protocol
(no ``seq``, no acknowledgements): then ``publish`` returns None and filters are
applied on the client side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol
from .auth import install_redaction
from .connection import (
    DispatchConnection,
    check_url,
    connect_error,
    connect_options,
    describe,
    get_json,
    http_url,
    with_query,
)
from .events import EventType
from .exceptions import ConnectionFailed, ProtocolError
from .frame import EventFrame

__all__ = ["LabClient", "connect", "http_url"]

logger = logging.getLogger("gathering_lab.client")
#: websockets logs the request (headers included) here at DEBUG: tokens are redacted.
connection_logger = logging.getLogger("gathering_lab.client.connection")
install_redaction(logger, connection_logger)

#: Close codes after which reconnecting cannot help.
FINAL_CLOSE_CODES = frozenset({1003, 1007, 1008, 1009})
#: The largest server message a LabClient accepts by default (the server's own
#: default limit is 1 MiB per client message; an event it sends adds its envelope).
DEFAULT_MAX_MESSAGE_SIZE = 4 * 2**20
#: Reply types that answer a request.
_REPLY_TYPES = frozenset({"pong", "error", "published", "subscribed", "resumed", "authenticated"})
_CONTROL_TYPES = protocol.CONTROL_TYPES
_decode = protocol.decode
_time = time.time

EventCallback = Callable[[dict[str, Any]], None]


@dataclasses.dataclass(slots=True)
class _Request:
    """A request waiting for its reply: the reply type it expects and who waits for it."""

    kind: str  # the reply type: "pong", "published", "subscribed", "authenticated"
    future: asyncio.Future[dict[str, Any]] | None  # None: the client's own (re-subscribe, ...)
    changes_filters: bool = False


class LabClient:
    """A reconnecting client that collects a server's events into :attr:`frame`."""

    def __init__(
        self,
        url: str | Sequence[str],
        client_id: str | None = None,
        *,
        frame: EventFrame | None = None,
        max_rows: int | None = None,
        token: str | None = None,
        reconnect: bool = True,
        max_retries: int | None = None,
        base_delay: float = 1.0,
        max_delay: float = 30.0,
        heartbeat: float | None = 30.0,
        open_timeout: float = 10.0,
        request_timeout: float = 10.0,
        ping_timeout: float | None = 60.0,
        max_message_size: int | None = DEFAULT_MAX_MESSAGE_SIZE,
    ) -> None:
        urls = [check_url(url)] if isinstance(url, str) else [check_url(u) for u in url]
        urls = list(dict.fromkeys(urls))  # each once, in order
        if not urls:
            raise ValueError("url must be a ws:// URL or a non-empty list of them, not []")
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise ValueError(f"client_id must be a non-empty string, not {client_id!r}")
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError(f"max_retries must be an integer >= 0 or None, not {max_retries!r}")
        for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        if max_message_size is not None and (
            not isinstance(max_message_size, int)
            or isinstance(max_message_size, bool)
            or max_message_size < 1024
        ):
            raise ValueError(
                f"max_message_size must be an integer >= 1024 or None, not {max_message_size!r}"
            )
        #: The servers to connect to, in order: the first that answers; after a lost
        #: connection, the next one (nodes of one cluster share the log, so the client
        #: resumes where it was on any of them).
        self.urls = urls
        #: The server in use (or tried last).
        self.url = urls[0]
        self.client_id = client_id
        self.frame = frame if frame is not None else EventFrame(max_rows, client_id=client_id)
        self.token = token
        self.reconnect = reconnect
        self.max_retries = max_retries
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.heartbeat = heartbeat
        self.open_timeout = open_timeout
        self.request_timeout = request_timeout
        self.ping_timeout = ping_timeout
        #: The largest message accepted from the server, in bytes (None: no limit);
        #: a bigger one closes the connection with 1009, for good.
        self.max_message_size = max_message_size

        self.status = "idle"
        self.server_info: dict[str, Any] = {}
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.events_received = 0
        self.duplicates = 0
        #: Publishes sent again after the server answered ``rate_limited``.
        self.publish_retries = 0
        self.reconnects = 0
        #: Times it moved on to the next of :attr:`urls`.
        self.failovers = 0
        self.restarts = 0
        self.gaps = 0
        self.errors: deque[dict[str, Any]] = deque(maxlen=100)
        self.close_code: int | None = None
        self.close_reason: str | None = None

        self._filters: protocol.Filters | None = None
        self._refused_too_big = False
        self._restarted = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._connected = asyncio.Event()
        self._first_attempt: asyncio.Future[None] | None = None
        # Requests by id, oldest first (the order replies without an id are matched in).
        self._pending: dict[str, _Request] = {}
        self._ids = itertools.count(1)
        self._heartbeat_id: str | None = None
        self._echoes_ids = False  # the server echoes request ids (this connection)
        # When a jump in live seq means a loss (see _expects_every_seq).
        self._contiguous = False
        self._replaying = False
        self._resync = False
        self._filter_requests = 0
        self._listeners: list[EventCallback] = []
        self._status_listeners: list[Callable[[str], None]] = []
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # Lifecycle

    async def connect(self) -> LabClient:
        """Connect and wait for ``connection.established``; raises ConnectionFailed if not."""
        if self._task is not None and not self._task.done():
            await self._wait_connected(self.open_timeout)
            return self
        self._closing = False
        loop = asyncio.get_running_loop()
        self._first_attempt = loop.create_future()
        self._task = loop.create_task(self._run(), name=f"LabClient {self.client_id}")
        self._task.add_done_callback(self._log_failure)
        await asyncio.shield(self._first_attempt)
        return self

    async def close(self) -> None:
        """Close the connection for good (no reconnect); the frame keeps its rows."""
        self._closing = True
        if self._ws is not None:
            await self._ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._tasks):
            task.cancel()
        self._set_status("closed")

    async def __aenter__(self) -> LabClient:
        return await self.connect()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the client receives on (None before :meth:`connect`)."""
        return self._task.get_loop() if self._task is not None else None

    @property
    def connected(self) -> bool:
        """True while a connection is open and greeted."""
        return self._connected.is_set()

    @property
    def speaks_lab_protocol(self) -> bool:
        """True if the server sends ``seq`` and acknowledgements (gathering_lab's extensions)."""
        return "epoch" in self.server_info

    # Requests

    async def ping(self) -> float:
        """Send an application ping and return the round-trip time in seconds."""
        ws = await self._ready()
        request_id = self._new_id()
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = _Request("pong", future)
        started = time.perf_counter()
        try:
            await ws.send(protocol.encode(protocol.Ping(request_id).to_message()).decode())
            await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            raise ConnectionFailed(f"no pong within {self.request_timeout}s") from None
        finally:
            self._drop(request_id)
        return time.perf_counter() - started

    async def publish(
        self,
        type: EventType | str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        *,
        source_agent_id: Any = None,
        circle_id: Any = None,
        project_id: Any = None,
    ) -> dict[str, Any] | None:
        """Publish an event through the server; returns the ack (``event_id``, ``seq``).

        Returns None against a server that does not acknowledge (the guide's original).
        Raises ValueError for a bad type or data, ProtocolError if the server refuses.
        A server that answers ``rate_limited`` (nothing was published) is asked again,
        slower, until ``request_timeout`` has passed; each retry is counted in
        :attr:`publish_retries`.
        """
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise TypeError(f"data must be a dict, not {data.__class__.__name__}")
        request = protocol.Publish(type, data, source_agent_id, circle_id, project_id)
        try:
            message = request.to_message()
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.request_timeout
        delay = 0.05
        while True:
            try:
                return await self._request("published", dict(message))
            except ProtocolError as exc:
                if exc.code != "rate_limited" or loop.time() + delay > deadline:
                    raise
            self.publish_retries += 1
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)

    async def subscribe(
        self,
        event_types: list[str] | tuple[str, ...] | str | None = None,
        *,
        circle_id: Any = None,
        project_id: Any = None,
    ) -> dict[str, Any] | None:
        """Receive only these types (patterns like ``task.*``), circle and project.

        The filters are kept and sent again after a reconnect. Against a server
        that does not know ``subscribe``, they are applied on this side only.
        """
        if isinstance(event_types, str):
            event_types = [event_types]
        data = {"event_types": list(event_types) if event_types else None}
        if circle_id is not None:
            data["circle_id"] = circle_id
        if project_id is not None:
            data["project_id"] = project_id
        try:
            parsed = protocol.parse_client_message(
                protocol.encode({"type": "subscribe", "data": data})
            )
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        assert isinstance(parsed, protocol.Subscribe)
        self._filters = parsed.filters
        return await self._request("subscribed", parsed.to_message(), changes_filters=True)

    async def unsubscribe(self) -> dict[str, Any] | None:
        """Receive everything again."""
        self._filters = None
        message = protocol.Unsubscribe().to_message()
        return await self._request("subscribed", message, changes_filters=True)

    async def authenticate(self, token: str) -> dict[str, Any] | None:
        """Present a fresh token on the open connection (e.g. before the old one expires).

        Returns the server's ``authenticated`` ack; the token is also used for reconnects.
        Raises ProtocolError (``unauthorized``, ``forbidden``) if the server refuses it.
        """
        if not isinstance(token, str) or not token:
            raise ValueError("token must be a non-empty string")
        ack = await self._request("authenticated", protocol.Auth(token).to_message())
        self.token = token
        return ack

    async def fetch_stats(self) -> dict[str, Any]:
        """GET the server's ``/admin/websocket/stats`` (with this client's token, if any).

        Raises AuthError without the admin role, ConnectionFailed if the server cannot answer.
        """
        url = http_url(self.url, "/admin/websocket/stats")
        stats = await asyncio.to_thread(get_json, url, self.token, self.request_timeout)
        if not isinstance(stats, dict):
            raise ConnectionFailed(f"GET {url}: expected a JSON object, got {stats!r:.80}")
        return stats

    async def wait_for_events(self, count: int, timeout: float = 10.0) -> int:
        """Wait until at least ``count`` events were received in all; returns the total."""
        try:
            await self._wait(lambda: self.events_received >= count, timeout)
        except TimeoutError:
            raise TimeoutError(
                f"received {self.events_received} of {count} events within {timeout}s"
            ) from None
        return self.events_received

    async def wait_for_status(self, status: str, timeout: float = 10.0) -> None:
        """Wait until :attr:`status` starts with ``status`` (e.g. ``"connected"``)."""
        try:
            await self._wait(lambda: self.status.startswith(status), timeout)
        except TimeoutError:
            raise TimeoutError(
                f"status is {self.status!r}, not {status!r}, after {timeout}s"
            ) from None

    async def _wait(self, predicate: Callable[[], bool], timeout: float) -> None:
        if predicate():
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        entry = (predicate, future)
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(future, timeout)
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    def on_event(self, callback: EventCallback) -> Callable[[], None]:
        """Call ``callback(message)`` for each received event; returns a function to stop."""
        self._listeners.append(callback)
        return lambda: self._listeners.remove(callback)

    def on_status(self, callback: Callable[[str], None]) -> Callable[[], None]:
        """Call ``callback(status)`` on each status change; returns a function to stop."""
        self._status_listeners.append(callback)
        return lambda: self._status_listeners.remove(callback)

    async def _ready(self) -> ClientConnection:
        if self._task is None:
            raise ConnectionFailed("not connected: call 'await client.connect()' first")
        await self._wait_connected(self.request_timeout)
        assert self._ws is not None
        return self._ws

    async def _wait_connected(self, timeout: float) -> None:
        if self._closing:
            raise ConnectionFailed("the client is closed")
        try:
            await asyncio.wait_for(self._connected.wait(), timeout)
        except TimeoutError:
            raise ConnectionFailed(f"not connected ({self.status}) after {timeout}s") from None

    def _new_id(self) -> str:
        return f"r{next(self._ids)}"

    async def _request(
        self, kind: str, message: dict[str, Any], *, changes_filters: bool = False
    ) -> dict[str, Any] | None:
        """Send ``message`` with a fresh id and return the data of the reply that echoes it."""
        ws = await self._ready()
        request_id = message["id"] = self._new_id()
        if not self.speaks_lab_protocol:
            await ws.send(protocol.encode(message).decode())
            return None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._add_pending(request_id, _Request(kind, future, changes_filters))
        try:
            await ws.send(protocol.encode(message).decode())
            reply = await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            raise ConnectionFailed(f"no '{kind}' reply within {self.request_timeout}s") from None
        finally:
            self._drop(request_id)
        data = reply.get("data")
        return data if isinstance(data, dict) else {}

    def _add_pending(self, request_id: str, request: _Request) -> None:
        self._pending[request_id] = request
        if request.changes_filters:
            # Until the server answers, events may still follow the old filters.
            self._filter_requests += 1

    def _drop(self, request_id: str) -> _Request | None:
        """Forget a request (answered, timed out or lost); returns it if it was pending."""
        request = self._pending.pop(request_id, None)
        if request is not None and request.changes_filters:
            self._filter_requests -= 1
            self._resync = True  # the next event may jump: filters changed in between
        return request

    # The connection loop

    async def _run(self) -> None:
        attempt = 0
        first_errors: list[ConnectionFailed] = []  # one per URL, while none has answered
        while not self._closing:
            self._set_status("connecting" if attempt == 0 else "reconnecting")
            try:
                await self._session()
                attempt = 0  # a session ran: start the backoff again
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ConnectionClosed) as exc:
                reason = describe(exc)
                if self._first_attempt is not None and not self._first_attempt.done():
                    if isinstance(exc, ConnectionClosed | InvalidURI):
                        error = ConnectionFailed(f"cannot connect to {self.url}: {reason}")
                    else:
                        error = connect_error(self.url, exc, self.open_timeout)
                    first_errors.append(error)
                    if len(first_errors) < len(self.urls):  # try the next one at once
                        self._next_url(reason)
                        continue
                    if len(first_errors) > 1:
                        error = ConnectionFailed("; ".join(str(e) for e in first_errors))
                    self._first_attempt.set_exception(error)
                    self._set_status(f"disconnected: {reason}")
                    return
                logger.info("connection to %s lost: %s", self.url, reason)
            finally:
                self._connected.clear()
                self._ws = None
                self._fail_pending(ConnectionFailed("connection lost"))
            if self._closing:
                break
            if self.close_code in FINAL_CLOSE_CODES:
                by = "closed" if self._refused_too_big else "closed by server"
                self._set_status(f"{by}: {self.close_code} {self.close_reason}")
                return
            if not self.reconnect or (self.max_retries is not None and attempt >= self.max_retries):
                self._set_status(f"disconnected after {attempt} retries")
                return
            if len(self.urls) > 1:  # this one dropped or refused: the next one
                self._next_url(self.close_reason or "connection lost")
            delay = min(self.base_delay * 2**attempt, self.max_delay)
            attempt += 1
            self.reconnects += 1
            to = f" to {self.url}" if len(self.urls) > 1 else ""
            self._set_status(f"reconnecting{to} in {delay:g} s (attempt {attempt})")
            await asyncio.sleep(delay)

    def _next_url(self, reason: str) -> None:
        """Move on to the next of :attr:`urls` (round robin)."""
        urls = self.urls
        index = (urls.index(self.url) + 1) % len(urls) if self.url in urls else 0
        logger.info("%s: %s; trying %s", self.url, reason, urls[index])
        self.url = urls[index]
        self.failovers += 1

    def _connect_url(self) -> str:
        # Resuming in the URL lets the server replay what we missed before any live
        # event: every event exactly once, in order.
        self._replaying = self.last_seq is not None and self.epoch is not None
        if self._replaying:
            return with_query(
                self.url, client_id=self.client_id, last_seq=self.last_seq, epoch=self.epoch
            )
        return with_query(self.url, client_id=self.client_id)

    async def _session(self) -> None:
        self.close_code = self.close_reason = None
        url = self._connect_url()
        options = connect_options(
            url,
            token=self.token,
            logger=connection_logger,
            open_timeout=self.open_timeout,
            ping_timeout=self.ping_timeout,
            max_size=self.max_message_size,
            create_connection=DispatchConnection,
        )
        async with ws_connect(url, **options) as ws:
            self._ws = ws
            direct = ws if isinstance(ws, DispatchConnection) else None
            try:
                hello = protocol.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
                if direct is not None:
                    direct.taken()
                if hello["type"] != "connection.established":
                    raise ConnectionFailed(f"unexpected greeting {hello['type']!r}")
                self._greeted(hello)
                await self._after_greeting(ws)
                heartbeat = self._spawn(self._heartbeat(ws)) if self.heartbeat else None
                try:
                    if direct is not None:
                        # Text messages now reach _dispatched() as they are read; the
                        # loop below takes the rest, and what came before, in order.
                        direct.on_text = self._dispatched
                    async for raw in ws:
                        if direct is not None:
                            direct.taken()
                        self._handle(raw)
                finally:
                    if direct is not None:
                        direct.on_text = None
                    if heartbeat is not None:
                        heartbeat.cancel()
            finally:
                self.close_code = ws.close_code
                self.close_reason = ws.close_reason
                sent = ws.protocol.close_sent
                self._refused_too_big = sent is not None and sent.code == 1009
                if self._refused_too_big:  # we refused a message: a resume would get it again
                    self.close_code = 1009
                    self.close_reason = (
                        f"a message from the server was over max_message_size "
                        f"({self.max_message_size} bytes)"
                    )
                    logger.error("closing %s: %s", self.url, self.close_reason)

    def _greeted(self, hello: dict[str, Any]) -> None:
        data = hello.get("data") or {}
        self.server_info = data
        if self.token and data.get("client_id"):
            self.client_id = data["client_id"]  # with a token, the server names us (its sub)
        self.client_id = self.client_id or data.get("client_id")
        if self.frame.client_id is None and self.client_id:
            self.frame.client_id = self.client_id
        self._echoes_ids = data.get("request_ids") is True
        self._contiguous = data.get("contiguous") is True
        self._resync = False
        epoch = data.get("epoch")
        seq = data.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool):
            seq = None
        self._restarted = self.epoch is not None and epoch is not None and epoch != self.epoch
        if self._restarted:
            self.restarts += 1
            self._mark(
                "lab.server.restarted",
                {"old_epoch": self.epoch, "new_epoch": epoch, "last_seq": self.last_seq},
            )
            logger.warning("server restarted (epoch %s -> %s)", self.epoch, epoch)
            # We resumed in the URL: the server replays the new run from its start
            # (and says "gap" for the old run's tail). Otherwise the new run's events
            # up to `seq` never come: a gap.
            if self._replaying:
                self.last_seq = 0
            else:
                self.last_seq = seq
                if seq:
                    self._gap({"reason": "server restarted", "epoch": epoch, "seq": seq})
        elif self.last_seq is None and seq is not None:
            # Everything after the server's seq comes live: a later resume starts there,
            # even if no event arrived before the connection dropped.
            self.last_seq = seq
        if epoch is None:
            self._replaying = False  # not a lab-protocol server: no replay, no `resumed`
        self.epoch = epoch

    async def _after_greeting(self, ws: ClientConnection) -> None:
        if self._filters is not None:
            # Filters are kept across reconnects; the ack is not waited for. The
            # request has its own id (and its own place among replies without one),
            # so its ack can never settle a user's request.
            request_id = self._new_id()
            if self.speaks_lab_protocol:
                self._add_pending(request_id, _Request("subscribed", None, True))
            message = protocol.Subscribe(self._filters, request_id).to_message()
            await ws.send(protocol.encode(message).decode())
        self._connected.set()
        # Shown until the next change, so a restart is never silent.
        self._set_status("connected (server restarted)" if self._restarted else "connected")
        if self._first_attempt is not None and not self._first_attempt.done():
            self._first_attempt.set_result(None)

    async def _heartbeat(self, ws: ClientConnection) -> None:
        assert self.heartbeat is not None
        while True:
            await asyncio.sleep(self.heartbeat)
            # One heartbeat ping pending at a time, with its own id: its pong settles
            # nothing of the user's.
            if self._heartbeat_id is not None:
                self._drop(self._heartbeat_id)
            request_id = self._heartbeat_id = self._new_id()
            self._add_pending(request_id, _Request("pong", None))
            await ws.send(protocol.encode(protocol.Ping(request_id).to_message()).decode())

    def _dispatched(self, raw: bytes) -> bool:
        """A text frame straight from the connection's parse loop; False leaves it queued.

        Never raises. A frame that is not a valid message (not UTF-8, not JSON) goes on
        to the queue, where websockets checks its UTF-8 and :meth:`_handle` logs the rest.
        """
        received_at = _time()
        try:
            message = _decode(raw)
        except ProtocolError:
            return False
        try:
            # _message() inlined for events, the common case.
            if message["type"] in _CONTROL_TYPES:
                self._message(message, received_at)
            else:
                self._event(message, received_at)
        except Exception:
            logger.exception("failed to handle a message from the server")
        return True

    def _handle(self, raw: str | bytes) -> None:
        received_at = time.time()
        try:
            message = protocol.decode(raw)
        except ProtocolError as exc:
            logger.warning("ignoring a bad message from the server: %s", exc)
            return
        self._message(message, received_at)

    def _message(self, message: dict[str, Any], received_at: float) -> None:
        kind = message["type"]
        if kind not in protocol.CONTROL_TYPES:
            self._event(message, received_at)
            return
        if kind == "resumed":
            self._replaying = False
            data = message.get("data") or {}
            if data.get("gap"):
                self._gap(data)
        elif kind == "authenticated":
            data = message.get("data") or {}
            scope = data.get("scope") or {}
            if scope.get("circles") is not None or scope.get("projects") is not None:
                self._contiguous = False  # a narrower token: the server skips events
        if kind == "error":
            self.errors.append(message)
        if kind in _REPLY_TYPES:
            self._settle(kind, message)

    def _settle(self, kind: str, message: dict[str, Any]) -> None:
        """Settle the request this reply answers: the one whose id it echoes.

        A reply without an id, from a server that does not echo ids, answers the
        oldest pending request of its kind (of any kind, for an error).
        """
        request_id = message.get("id")
        request: _Request | None = None
        if request_id is not None:
            self._echoes_ids = True
            if isinstance(request_id, str):
                request = self._drop(request_id)
            if request is None:
                logger.debug("reply %r to no pending request (timed out?)", request_id)
        elif not self._echoes_ids:
            oldest = next(
                (
                    key
                    for key, pending in self._pending.items()
                    if kind == "error" or pending.kind == kind
                ),
                None,
            )
            request = None if oldest is None else self._drop(oldest)
        if kind == "error":
            data = message.get("data") or {}
            error = ProtocolError(str(data.get("code")), str(data.get("message")), request_id)
            if request is not None and request.future is not None:
                if not request.future.done():
                    request.future.set_exception(error)
            else:
                logger.warning("server error: %s: %s", error.code, error.message)
        elif request is not None and request.future is not None and not request.future.done():
            request.future.set_result(message)

    def _expects_every_seq(self) -> bool:
        """True when each live event's seq must follow the last one: a jump is a loss.

        Only when the server says it sends every event of its bus to this client
        (``contiguous`` in its greeting: no ``broadcast=False``, no token scope), the
        client has no filters and is not changing them, and no replay is under way.
        Filters, scopes and partial broadcasting skip seqs by design.
        """
        return (
            self._contiguous
            and self._filters is None
            and self._filter_requests == 0
            and not self._resync
            and not self._replaying
        )

    def _gap(self, data: dict[str, Any]) -> None:
        self.gaps += 1
        self._mark("lab.gap", data)
        logger.warning("events lost: %s", data)

    def _event(self, message: dict[str, Any], received_at: float) -> None:
        seq = message.get("seq")
        if seq.__class__ is int or (isinstance(seq, int) and not isinstance(seq, bool)):
            last_seq = self.last_seq
            if last_seq is not None and message.get("epoch") == self.epoch:
                if seq <= last_seq:
                    self.duplicates += 1
                    return
                if seq > last_seq + 1 and self._expects_every_seq():
                    self._gap(
                        {
                            "reason": "seq jump",
                            "after_seq": last_seq,
                            "seq": seq,
                            "missing": seq - last_seq - 1,
                            "epoch": self.epoch,
                        }
                    )
            self.last_seq = seq
            self._resync = False
        if self._filters is not None and not self._filters.matches(
            str(message.get("type")), message.get("circle_id"), message.get("project_id")
        ):
            return  # servers without `subscribe`, and replays from before it took effect
        self.frame.append(message, received_at)
        self.events_received += 1
        if self._listeners:
            for callback in list(self._listeners):
                try:
                    callback(message)
                except Exception:
                    logger.exception("event callback %r failed", callback)
        if self._waiters:
            self._notify()

    def _mark(self, kind: str, data: dict[str, Any]) -> None:
        self.frame.append(
            {"type": kind, "data": data, "timestamp": protocol.format_timestamp()}, time.time()
        )

    # Helpers

    def _set_status(self, status: str) -> None:
        if status == self.status:
            return
        self.status = status
        for callback in list(self._status_listeners):
            try:
                callback(status)
            except Exception:
                logger.exception("status callback %r failed", callback)
        self._notify()

    def _notify(self) -> None:
        for predicate, future in self._waiters:
            if not future.done() and predicate():
                future.set_result(None)

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        self._log_failure(task)

    @staticmethod
    def _log_failure(task: asyncio.Task[Any]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            if not isinstance(exc, ConnectionClosed):
                logger.error("background task %s failed", task.get_name(), exc_info=exc)

    def _fail_pending(self, error: Exception) -> None:
        for request_id in list(self._pending):
            request = self._drop(request_id)
            if request is not None and request.future is not None and not request.future.done():
                request.future.set_exception(error)
        self._heartbeat_id = None
        self._resync = False

    def __repr__(self) -> str:
        return (
            f"<LabClient {self.client_id} {self.status} url={self.url} "
            f"events={self.events_received} last_seq={self.last_seq}>"
        )


async def connect(
    url: str | Sequence[str], client_id: str | None = None, **options: Any
) -> LabClient:
    """Connect a :class:`LabClient` to ``url`` (or the first of several that answers);
    return it once greeted."""
    return await LabClient(url, client_id, **options).connect()
