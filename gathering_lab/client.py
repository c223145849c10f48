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

It also works against a server that speaks only the guide's original protocol
(no ``seq``, no acknowledgements): then ``publish`` returns None and filters are
applied on the client side only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidURI

from . import protocol
from .auth import install_redaction
from .events import EventType
from .exceptions import AuthError, ConnectionFailed, ProtocolError
from .frame import EventFrame

__all__ = ["LabClient", "connect", "http_url"]

logger = logging.getLogger("gathering_lab.client")
#: websockets logs the request (headers included) here at DEBUG: tokens are redacted.
connection_logger = logging.getLogger("gathering_lab.client.connection")
install_redaction(logger, connection_logger)

#: Close codes after which reconnecting cannot help.
FINAL_CLOSE_CODES = frozenset({1003, 1007, 1008, 1009})

EventCallback = Callable[[dict[str, Any]], None]


def http_url(ws_url: str, path: str = "/") -> str:
    """The ``http(s)://`` URL of ``path`` on the server a ``ws(s)://`` URL points at."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme)
    if scheme is None or not parts.netloc:
        raise ValueError(f"not a WebSocket URL: {ws_url!r}")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def _get_json(url: str, token: str | None, timeout: float) -> Any:
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


def _with_query(url: str, **params: Any) -> str:
    parts = urlsplit(url)
    query = dict(parse_qsl(parts.query))
    query.update({k: str(v) for k, v in params.items() if v is not None})
    return urlunsplit(parts._replace(query=urlencode(query)))


class LabClient:
    """A reconnecting client that collects a server's events into :attr:`frame`."""

    def __init__(
        self,
        url: str,
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
    ) -> None:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise ValueError(f"url must be a ws:// or wss:// URL, not {url!r}")
        if client_id is not None and (not isinstance(client_id, str) or not client_id):
            raise ValueError(f"client_id must be a non-empty string, not {client_id!r}")
        if max_retries is not None and (not isinstance(max_retries, int) or max_retries < 0):
            raise ValueError(f"max_retries must be an integer >= 0 or None, not {max_retries!r}")
        for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
            if not isinstance(value, int | float) or value <= 0:
                raise ValueError(f"{name} must be a positive number, not {value!r}")
        self.url = url
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

        self.status = "idle"
        self.server_info: dict[str, Any] = {}
        self.epoch: str | None = None
        self.last_seq: int | None = None
        self.events_received = 0
        self.duplicates = 0
        self.reconnects = 0
        self.restarts = 0
        self.gaps = 0
        self.errors: deque[dict[str, Any]] = deque(maxlen=100)
        self.close_code: int | None = None
        self.close_reason: str | None = None

        self._filters: protocol.Filters | None = None
        self._restarted = False
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._connected = asyncio.Event()
        self._first_attempt: asyncio.Future[None] | None = None
        self._pending: deque[tuple[str, asyncio.Future[dict[str, Any]]]] = deque()
        self._pings: dict[str, asyncio.Future[float]] = {}
        self._ids = itertools.count(1)
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
        request_id = f"p{next(self._ids)}"
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._pings[request_id] = future
        started = time.perf_counter()
        try:
            await ws.send(protocol.encode(protocol.Ping(request_id).to_message()).decode())
            await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            raise ConnectionFailed(f"no pong within {self.request_timeout}s") from None
        finally:
            self._pings.pop(request_id, None)
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
        return await self._request("published", message)

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
        return await self._request("subscribed", parsed.to_message())

    async def unsubscribe(self) -> dict[str, Any] | None:
        """Receive everything again."""
        self._filters = None
        return await self._request("subscribed", protocol.Unsubscribe().to_message())

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
        stats = await asyncio.to_thread(_get_json, url, self.token, self.request_timeout)
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

    async def _request(self, kind: str, message: dict[str, Any]) -> dict[str, Any] | None:
        ws = await self._ready()
        if not self.speaks_lab_protocol:
            await ws.send(protocol.encode(message).decode())
            return None
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (kind, future)
        self._pending.append(entry)
        try:
            await ws.send(protocol.encode(message).decode())
            return await asyncio.wait_for(future, self.request_timeout)
        except TimeoutError:
            raise ConnectionFailed(f"no '{kind}' reply within {self.request_timeout}s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._pending.remove(entry)

    # The connection loop

    async def _run(self) -> None:
        attempt = 0
        while not self._closing:
            self._set_status("connecting" if attempt == 0 else "reconnecting")
            try:
                await self._session()
                attempt = 0  # a session ran: start the backoff again
            except (OSError, InvalidHandshake, InvalidURI, TimeoutError, ConnectionClosed) as exc:
                reason = self._describe(exc)
                if self._first_attempt is not None and not self._first_attempt.done():
                    self._first_attempt.set_exception(
                        ConnectionFailed(f"cannot connect to {self.url}: {reason}")
                    )
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
                self._set_status(f"closed by server: {self.close_code} {self.close_reason}")
                return
            if not self.reconnect or (self.max_retries is not None and attempt >= self.max_retries):
                self._set_status(f"disconnected after {attempt} retries")
                return
            delay = min(self.base_delay * 2**attempt, self.max_delay)
            attempt += 1
            self.reconnects += 1
            self._set_status(f"reconnecting in {delay:g} s (attempt {attempt})")
            await asyncio.sleep(delay)

    def _connect_url(self) -> str:
        # Resuming in the URL lets the server replay what we missed before any live
        # event: every event exactly once, in order.
        if self.last_seq is not None and self.epoch is not None:
            return _with_query(
                self.url, client_id=self.client_id, last_seq=self.last_seq, epoch=self.epoch
            )
        return _with_query(self.url, client_id=self.client_id)

    async def _session(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        self.close_code = self.close_reason = None
        async with ws_connect(
            self._connect_url(),
            additional_headers=headers,
            open_timeout=self.open_timeout,
            ping_timeout=self.ping_timeout,
            max_size=None,
            compression=None,
            logger=connection_logger,
        ) as ws:
            self._ws = ws
            try:
                hello = protocol.decode(await asyncio.wait_for(ws.recv(), self.open_timeout))
                if hello["type"] != "connection.established":
                    raise ConnectionFailed(f"unexpected greeting {hello['type']!r}")
                self._greeted(hello)
                await self._after_greeting(ws)
                heartbeat = self._spawn(self._heartbeat(ws)) if self.heartbeat else None
                try:
                    async for raw in ws:
                        self._handle(raw)
                finally:
                    if heartbeat is not None:
                        heartbeat.cancel()
            finally:
                self.close_code = ws.close_code
                self.close_reason = ws.close_reason

    def _greeted(self, hello: dict[str, Any]) -> None:
        data = hello.get("data") or {}
        self.server_info = data
        if self.token and data.get("client_id"):
            self.client_id = data["client_id"]  # with a token, the server names us (its sub)
        self.client_id = self.client_id or data.get("client_id")
        if self.frame.client_id is None and self.client_id:
            self.frame.client_id = self.client_id
        epoch = data.get("epoch")
        self._restarted = self.epoch is not None and epoch is not None and epoch != self.epoch
        if self._restarted:
            self.restarts += 1
            self._mark(
                "lab.server.restarted",
                {"old_epoch": self.epoch, "new_epoch": epoch, "last_seq": self.last_seq},
            )
            logger.warning("server restarted (epoch %s -> %s)", self.epoch, epoch)
            self.last_seq = None
        elif self.last_seq is None and isinstance(data.get("seq"), int):
            # Everything after the server's seq comes live: a later resume starts there,
            # even if no event arrived before the connection dropped.
            self.last_seq = data["seq"]
        self.epoch = epoch

    async def _after_greeting(self, ws: ClientConnection) -> None:
        if self._filters is not None:
            # Filters are kept across reconnects; the ack is not waited for.
            message = protocol.Subscribe(self._filters).to_message()
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
            await ws.send('{"type":"ping"}')

    def _handle(self, raw: str | bytes) -> None:
        received_at = time.time()
        try:
            message = protocol.decode(raw)
        except ProtocolError as exc:
            logger.warning("ignoring a bad message from the server: %s", exc)
            return
        kind = message["type"]
        if kind not in protocol.CONTROL_TYPES:
            self._event(message, received_at)
        elif kind == "pong":
            if "id" in message:
                ping = self._pings.get(str(message["id"]))
            else:  # the guide's original server does not echo ids: oldest first
                ping = next((p for p in self._pings.values() if not p.done()), None)
            if ping is not None and not ping.done():
                ping.set_result(received_at)
        elif kind == "error":
            self.errors.append(message)
            data = message.get("data") or {}
            error = ProtocolError(str(data.get("code")), str(data.get("message")))
            if self._pending:
                _, future = self._pending.popleft()
                if not future.done():
                    future.set_exception(error)
            else:
                logger.warning("server error: %s", error.message)
        elif kind == "resumed":
            data = message.get("data") or {}
            if data.get("gap"):
                self.gaps += 1
                self._mark("lab.gap", data)
                logger.warning("resume left a gap: %s", data)
        else:
            for index, (wanted, waiting) in enumerate(self._pending):
                if wanted == kind:
                    del self._pending[index]
                    if not waiting.done():
                        waiting.set_result(message.get("data") or {})
                    break

    def _event(self, message: dict[str, Any], received_at: float) -> None:
        seq = message.get("seq")
        if isinstance(seq, int):
            if message.get("epoch") == self.epoch and self.last_seq is not None:
                if seq <= self.last_seq:
                    self.duplicates += 1
                    return
            self.last_seq = seq
        if self._filters is not None and not self._filters.matches(
            str(message.get("type")), message.get("circle_id"), message.get("project_id")
        ):
            return  # servers without `subscribe`, and replays from before it took effect
        self.frame.append(message, received_at)
        self.events_received += 1
        for callback in list(self._listeners):
            try:
                callback(message)
            except Exception:
                logger.exception("event callback %r failed", callback)
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
        while self._pending:
            _, future = self._pending.popleft()
            if not future.done():
                future.set_exception(error)
        for ping in self._pings.values():
            if not ping.done():
                ping.set_exception(error)

    def _describe(self, exc: BaseException) -> str:
        if isinstance(exc, ConnectionClosed):
            rcvd = exc.rcvd
            if rcvd is not None:
                return f"closed by server: {rcvd.code} {rcvd.reason}".strip()
            return "connection closed abnormally"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused (is the server running?)"
        if isinstance(exc, TimeoutError):
            return "timed out"
        return str(exc) or type(exc).__name__

    def __repr__(self) -> str:
        return (
            f"<LabClient {self.client_id} {self.status} url={self.url} "
            f"events={self.events_received} last_seq={self.last_seq}>"
        )


async def connect(url: str, client_id: str | None = None, **options: Any) -> LabClient:
    """Connect a :class:`LabClient` to ``url`` and return it once greeted."""
    return await LabClient(url, client_id, **options).connect()
