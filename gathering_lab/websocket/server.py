"""The WebSocket server: ``/ws/dashboard`` plus a few HTTP routes on the same port.

::

    async with serve(port=0) as server:
        print(server.url)          # ws://127.0.0.1:PORT/ws/dashboard

    server = await serve(port=8000)
    server.close()
    await server.wait_closed()
"""

from __future__ import annotations

import errno
import http
import json
import logging
import re
import socket
from collections.abc import Generator, Iterable
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import websockets
from websockets.asyncio.server import Server as _WsServer
from websockets.asyncio.server import ServerConnection
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from .. import __version__, protocol
from ..events import Event, EventBus, event_bus
from ..exceptions import PortInUseError, ProtocolError
from .manager import ConnectionManager, Session, filters_match, get_connection_manager

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "LOOPBACK_ORIGIN", "Server", "bind", "serve"]

logger = logging.getLogger("gathering_lab.websocket.server")

WS_PATH = "/ws/dashboard"
DEFAULT_MAX_MESSAGE_SIZE = 2**20
#: Browser origins accepted by default: loopback hosts on any port.
LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_CLIENT_ID = re.compile(r"^[\w.:@~+-]{1,128}$")
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}


def _json_response(status: http.HTTPStatus, body: Any) -> Response:
    data = json.dumps(body, separators=(",", ":"), default=str).encode()
    return _response(status, data, "application/json")


def _response(status: http.HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers(
        [
            ("Content-Type", content_type),
            ("Content-Length", str(len(body))),
            ("Cache-Control", "no-store"),
            ("Connection", "close"),
        ]
    )
    return Response(status.value, status.phrase, headers, body)


def _static_file(name: str) -> bytes | None:
    if "/" in name or name.startswith("."):
        return None
    try:
        return (resources.files("gathering_lab") / "static" / name).read_bytes()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


class Server:
    """A running gathering_lab server; returned by :func:`serve`."""

    def __init__(
        self,
        ws_server: _WsServer,
        *,
        bus: EventBus,
        manager: ConnectionManager,
        handler: _Handler,
        subscription: str | None,
        host: str,
    ) -> None:
        self._ws_server = ws_server
        self.bus = bus
        self.manager = manager
        self._handler = handler
        self._subscription = subscription
        self.host = host
        sockname = next(iter(ws_server.sockets)).getsockname()
        self.port: int = sockname[1]

    @property
    def url(self) -> str:
        """The WebSocket URL of the dashboard endpoint."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "wss" if self._handler.tls else "ws"
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        """The base HTTP URL (dashboard, stats, health)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self._handler.tls else "http"
        return f"{scheme}://{host}:{self.port}"

    @property
    def is_serving(self) -> bool:
        """True until the server is closed."""
        return self._ws_server.is_serving()

    def close(self) -> None:
        """Stop accepting connections and close every client with 1001 (going away)."""
        if self._subscription is not None:
            self.bus.unsubscribe(self._subscription)
            self._subscription = None
        self.manager.flush()
        # Release the port now (websockets closes the listening socket in a task),
        # so a server can start again on it straight away.
        self._ws_server.server.close()
        self._ws_server.close(close_connections=True)

    async def wait_closed(self) -> None:
        """Wait until the server and every connection are closed."""
        await self._ws_server.wait_closed()

    def get_stats(self) -> dict[str, Any]:
        """The stats served at ``/admin/websocket/stats``."""
        return self._handler.stats()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        await self.wait_closed()

    def __repr__(self) -> str:
        state = "serving" if self.is_serving else "closed"
        return f"<Server {self.url} {state} clients={self.manager.active_connections}>"


class _Handler:
    """Per-server connection handling: HTTP routes, origin check, the message loop."""

    def __init__(
        self,
        *,
        bus: EventBus,
        manager: ConnectionManager,
        allowed_origins: Iterable[str],
        max_message_size: int,
        tls: bool,
    ) -> None:
        self.bus = bus
        self.manager = manager
        self.tls = tls
        self.max_message_size = max_message_size
        self.allow_any_origin = False
        self.allowed_origins: set[str] = set()
        for origin in allowed_origins:
            if origin == "*":
                self.allow_any_origin = True
            else:
                self.allowed_origins.add(origin.rstrip("/"))

    # HTTP

    def process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if request.method != "GET":
            return _json_response(
                http.HTTPStatus.METHOD_NOT_ALLOWED,
                {"error": f"method {request.method} not allowed; only GET"},
            )
        if path == WS_PATH:
            if request.headers.get("Upgrade", "").lower() != "websocket":
                return _json_response(
                    http.HTTPStatus.UPGRADE_REQUIRED,
                    {"error": f"{WS_PATH} is a WebSocket endpoint: use a WebSocket client"},
                )
            return None
        if path == "/health":
            return _json_response(
                http.HTTPStatus.OK,
                {
                    "status": "ok",
                    "server": f"gathering_lab/{__version__}",
                    "active_connections": self.manager.active_connections,
                    "seq": self.bus.last_seq,
                    "epoch": self.bus.epoch,
                },
            )
        if path == "/admin/websocket/stats":
            return _json_response(http.HTTPStatus.OK, self.stats())
        if path in ("/", "/dashboard", "/dashboard/"):
            page = _static_file("dashboard.html")
            if page is not None:
                return _response(http.HTTPStatus.OK, page, _STATIC_TYPES[".html"])
        elif path.startswith("/static/"):
            name = path.removeprefix("/static/")
            body = _static_file(name)
            suffix = name[name.rfind(".") :] if "." in name else ""
            if body is not None and suffix in _STATIC_TYPES:
                return _response(http.HTTPStatus.OK, body, _STATIC_TYPES[suffix])
        return _json_response(http.HTTPStatus.NOT_FOUND, {"error": f"not found: {path}"})

    def stats(self) -> dict[str, Any]:
        stats = self.manager.get_stats()
        stats["max_message_size"] = self.max_message_size
        stats["bus"] = self.bus.get_stats()
        stats["server"] = f"gathering_lab/{__version__}"
        return stats

    def origin_allowed(self, origin: str | None) -> bool:
        if origin is None or self.allow_any_origin:
            return True
        origin = origin.rstrip("/")
        return origin in self.allowed_origins or LOOPBACK_ORIGIN.match(origin) is not None

    # WebSocket

    async def __call__(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None  # set by the handshake
        origin = request.headers.get("Origin")
        if not self.origin_allowed(origin):
            self.manager.rejected_connections += 1
            logger.warning("refused origin %r from %s", origin, connection.remote_address)
            await connection.close(1008, "Unauthorized origin")
            return
        query = parse_qs(urlsplit(request.path).query)
        client_id = (query.get("client_id") or [""])[0]
        if not client_id:
            client_id = self.manager.new_client_id()
        elif not _CLIENT_ID.match(client_id):
            self.manager.rejected_connections += 1
            await connection.close(
                1008, "invalid client_id: use 1-128 letters, digits or . _ - : @ ~ +"
            )
            return
        try:
            resume = self._resume_from_query(query)
        except ProtocolError as exc:
            self.manager.rejected_connections += 1
            await connection.close(1008, exc.message[:120])
            return

        session = self.manager.connect(connection, client_id)
        session.joined_seq = self.bus.last_seq
        logger.info("client %s connected from %s", client_id, session.remote)
        try:
            self.manager.send(
                session,
                protocol.connection_established(
                    client_id,
                    server=f"gathering_lab/{__version__}",
                    seq=self.bus.last_seq,
                    epoch=self.bus.epoch,
                    filters=session.filters.to_dict(),
                ),
            )
            if resume is not None:
                self._resume(session, resume)
            await self._message_loop(connection, session)
        except ConnectionClosed:
            pass
        except Exception:
            logger.error("connection handler failed for %s", client_id, exc_info=True)
            await connection.close(1011, "internal error")
        finally:
            self.manager.disconnect(session)
            logger.info("client %s disconnected", client_id)

    async def _message_loop(self, connection: ServerConnection, session: Session) -> None:
        async for frame in connection:
            session.messages_received += 1
            if isinstance(frame, bytes):
                await connection.close(1003, "binary frames are not supported; send JSON text")
                return
            try:
                message = protocol.parse_client_message(frame)
                reply = await self._dispatch(session, message)
            except ProtocolError as exc:
                reply = protocol.error(exc.code, exc.message)
            if reply is not None:
                self.manager.send(session, reply)

    async def _dispatch(
        self, session: Session, message: protocol.ClientMessage
    ) -> dict[str, Any] | None:
        if isinstance(message, protocol.Ping):
            return protocol.pong(message.id)
        if isinstance(message, protocol.Publish):
            event = Event(
                type=message.type,
                data=message.data,
                source_agent_id=message.source_agent_id,
                circle_id=message.circle_id,
                project_id=message.project_id,
            )
            await self.bus.publish(event)
            return protocol.ack("published", event_id=event.id, seq=event.seq)
        if isinstance(message, protocol.Subscribe):
            self.manager.set_filters(session, message.filters)
            return protocol.ack("subscribed", **message.filters.to_dict())
        if isinstance(message, protocol.Unsubscribe):
            self.manager.set_filters(session, protocol.Filters())
            return protocol.ack("subscribed", **protocol.Filters().to_dict())
        if isinstance(message, protocol.Resume):
            self._resume(session, message)
            return None
        if isinstance(message, protocol.Auth):
            raise ProtocolError("invalid_message", "authentication is off on this server")
        raise ProtocolError("unknown_type", f"unsupported message {type(message).__name__}")

    @staticmethod
    def _resume_from_query(query: dict[str, list[str]]) -> protocol.Resume | None:
        if "last_seq" not in query:
            return None
        raw = query["last_seq"][0]
        if not raw.isdigit():
            raise ProtocolError("invalid_message", f"last_seq must be an integer >= 0, not {raw!r}")
        epochs = query.get("epoch")
        epoch = epochs[0] if epochs else None
        return protocol.Resume(int(raw), epoch)

    def _resume(self, session: Session, resume: protocol.Resume) -> None:
        bus = self.bus
        gap = (resume.epoch is not None and resume.epoch != bus.epoch) or (
            resume.since_seq + 1 < bus.oldest_seq
        )
        if resume.epoch is not None and resume.epoch != bus.epoch:
            # Another run of the numbering: the old one is gone (gap), but this
            # run's history is all new to the client.
            events = bus.since(0)
        else:
            events = bus.since(resume.since_seq)
        # Events after joined_seq already went out live: replay only those before.
        # (Resuming in the URL, ?last_seq=N, also keeps everything in order.)
        limit = session.joined_seq
        events = [e for e in events if (e.seq or 0) <= limit and filters_match(session.filters, e)]
        sent = self.manager.send_events(session, events)
        self.manager.send(
            session,
            protocol.ack(
                "resumed",
                count=sent,
                since_seq=resume.since_seq,
                seq=bus.last_seq,
                epoch=bus.epoch,
                gap=gap,
            ),
        )


def _bind(host: str, port: int) -> socket.socket:
    """Bind a listening TCP socket now, so a busy port fails at once with a clear error."""
    if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer from 0 to 65535, not {port!r}")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from None
        raise
    sock.setblocking(False)
    return sock


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """Bind a listening socket for :func:`serve` (``sock=``); raises PortInUseError if busy."""
    return _bind(host, port)


class serve:  # noqa: N801 - used like a function, as websockets.serve is
    """Start a gathering_lab server on the running event loop.

    Use ``server = await serve(...)`` or ``async with serve(...) as server:``.
    ``port=0`` picks a free port (``server.port``). With ``broadcast=True`` every
    event of ``bus`` goes to the clients; with ``broadcast=False`` only what
    :func:`~gathering_lab.websocket.integration.setup_websocket_broadcasting`
    and ``setup_custom_broadcasting`` enable.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        bus: EventBus | None = None,
        manager: ConnectionManager | None = None,
        broadcast: bool = True,
        sock: socket.socket | None = None,
        # Security
        allowed_origins: Iterable[str] = (),
        ssl: Any = None,
        # Limits
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_pending_bytes: int | None = None,
        compression: str | None = None,
        # Timeouts
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float | None = 5,
    ) -> None:
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins must be a list of origins, not a string")
        if not isinstance(max_message_size, int) or max_message_size < 1024:
            raise ValueError(f"max_message_size must be an int >= 1024, not {max_message_size!r}")
        if compression not in (None, "off", "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, not {compression!r}")
        self.host = host
        self.port = port
        self.bus = bus if bus is not None else event_bus
        self.manager = manager if manager is not None else get_connection_manager()
        if max_pending_bytes is not None:
            if not isinstance(max_pending_bytes, int) or max_pending_bytes < 1024:
                raise ValueError(
                    f"max_pending_bytes must be an int >= 1024, not {max_pending_bytes!r}"
                )
            self.manager.max_pending_bytes = max_pending_bytes
        self.manager.max_message_size = max_message_size
        self.broadcast = broadcast
        self.sock = sock if sock is not None else _bind(host, port)
        self.ssl = ssl
        self.handler = _Handler(
            bus=self.bus,
            manager=self.manager,
            allowed_origins=allowed_origins,
            max_message_size=max_message_size,
            tls=ssl is not None,
        )
        self.options: dict[str, Any] = {
            "compression": "deflate" if compression == "deflate" else None,
            "max_size": max_message_size,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
        }
        self._server: Server | None = None

    async def _start(self) -> Server:
        ws_server = await websockets.serve(
            self.handler,
            sock=self.sock,
            ssl=self.ssl,
            process_request=self.handler.process_request,
            server_header=f"gathering_lab/{__version__}",
            logger=logging.getLogger("gathering_lab.websocket.connection"),
            **self.options,
        )
        subscription = self.manager.attach(self.bus) if self.broadcast else None
        host = self.sock.getsockname()[0]
        self._server = Server(
            ws_server,
            bus=self.bus,
            manager=self.manager,
            handler=self.handler,
            subscription=subscription,
            host=host,
        )
        logger.info("serving on %s", self._server.url)
        return self._server

    def __await__(self) -> Generator[Any, None, Server]:
        return self._start().__await__()

    async def __aenter__(self) -> Server:
        return await self._start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
