"""The WebSocket server: ``/ws/dashboard`` plus a few HTTP routes on the same port.

::

    async with serve(port=0) as server:
        server.url                 # ws://127.0.0.1:PORT/ws/dashboard

    server = await serve(port=8000)
    server.close()
    await server.wait_closed()
"""

from __future__ import annotations

import asyncio
import errno
import http
import ipaddress
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Generator, Iterable
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
from ..auth import EVERYTHING, Identity, JWTAuth, bearer_token, install_redaction
from ..backends.bus import LogBus
from ..backends.nodes import REPORT_INTERVAL, Nodes, check_timing, cluster_stats, nodes_for
from ..events import EventBus, event_bus
from ..exceptions import AuthError, BackendUnavailable, PortInUseError
from .limits import (
    DEFAULT_MAX_CONNECTIONS_PER_IP,
    DEFAULT_OPEN_TIMEOUT,
    DEFAULT_PUBLISH_BURST,
    DEFAULT_PUBLISH_RATE,
    DESCRIPTOR_RESERVE,
    Admission,
    LogThrottle,
    RateLimits,
    TrustedProxies,
    default_max_connections,
    descriptor_limit,
    open_descriptors,
)
from .manager import (
    ConnectionManager,
    Session,
    check_flush_slice,
    check_write_delay,
    manager_for,
)
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .metrics import render as render_metrics
from .policy import (
    LOOPBACK_ORIGIN,
    Action,
    ChangeFilters,
    ChangeIdentity,
    ClientPolicy,
    CloseConnection,
    Counters,
    HandshakePolicy,
    PublishEvent,
    Refusal,
    Replay,
    Reply,
    Settings,
)
from .publishing import (
    DEFAULT_MAX_PUBLISHES_IN_FLIGHT,
    PublishWindow,
    check_max_publishes_in_flight,
)

__all__ = ["DEFAULT_MAX_MESSAGE_SIZE", "LOOPBACK_ORIGIN", "Server", "bind", "serve"]

logger = logging.getLogger("gathering_lab.websocket.server")
#: websockets logs request lines, headers and frames here at DEBUG: tokens are redacted.
connection_logger = logging.getLogger("gathering_lab.websocket.connection")
install_redaction(logger, connection_logger)

WS_PATH = "/ws/dashboard"
DEFAULT_MAX_MESSAGE_SIZE = 2**20
#: Headers the server reads one value of: a request with two of one is answered 400.
_SINGLE_HEADERS = ("Authorization", "Host", "Upgrade")
_CLIENT_ID = re.compile(r"^[\w.:@~+-]{1,128}$")
#: Seconds a refused client is asked to wait (Retry-After) before it tries again.
RETRY_AFTER = 5
#: At most one log line per this many seconds for each kind of repeated refusal.
LOG_INTERVAL = 10.0
#: accept() errors that mean "out of descriptors or memory" (asyncio retries after 1 s).
_ACCEPT_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
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
            ("X-Content-Type-Options", "nosniff"),
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
        on_close: Callable[[], None] | None = None,
        owned_bus: Any = None,
    ) -> None:
        self._ws_server = ws_server
        self._on_close = on_close
        self._owned_bus = owned_bus  # a bus serve() started from a URL: closed with the server
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
            self.manager.detach(self._subscription)
            self._subscription = None
        if self._on_close is not None:
            self._on_close()
            self._on_close = None
        self._handler.nodes.stop()
        self.manager.flush()
        # Release the port now (websockets closes the listening socket in a task),
        # so a server can start again on it straight away.
        self._ws_server.server.close()
        self._ws_server.close(close_connections=True)

    async def wait_closed(self) -> None:
        """Wait until the server and every connection are closed (and a bus it started)."""
        await self._ws_server.wait_closed()
        await self._handler.nodes.close()  # removes this node's report from the shared log
        bus, self._owned_bus = self._owned_bus, None
        if bus is not None:
            await bus.close()

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


#: How a refusal's log line names each connection limit: the serve flag, then the keyword.
_LIMIT_NAMES = {
    "max_connections": "--max-connections (max_connections=)",
    "max_connections_per_ip": "--max-connections-per-ip (max_connections_per_ip=)",
}


class _Gate:
    """Admission at accept() and at the upgrade, and accept() failures: counts, 503s, logs."""

    def __init__(
        self,
        admission: Admission,
        manager: ConnectionManager,
        open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
    ) -> None:
        self.admission = admission
        self.manager = manager
        self.open_timeout = open_timeout
        self.accept_errors = 0
        self._accept_log = LogThrottle(LOG_INTERVAL)
        self._refusal_log = LogThrottle(LOG_INTERVAL)
        self._eviction_log = LogThrottle(LOG_INTERVAL)
        self._busy = _json_response(
            http.HTTPStatus.SERVICE_UNAVAILABLE,
            {"error": "server busy: too many open connections; retry later", "code": "max_sockets"},
        )
        self._busy.headers["Retry-After"] = str(RETRY_AFTER)
        self._busy.headers["Server"] = f"gathering_lab/{__version__}"

    def admit(self, connection: ServerConnection, request: Request) -> Response | None:
        """None if this WebSocket upgrade may go on, else the 503 that refuses it.

        From a trusted proxy, the client is the one its ``X-Forwarded-For`` names: it is
        counted under that address, and logged and shown in the stats with it.
        """
        client = None
        trusted = self.admission.trusted_proxies
        if trusted:
            peer = _peer_ip(connection)
            forwarded = trusted.client(peer, request.headers.get_all("X-Forwarded-For"))
            if forwarded != peer:
                client = forwarded
                connection.forwarded_for = forwarded  # type: ignore[attr-defined]
        reason = self.admission.admit(connection, client)
        return None if reason is None else self._refuse_admission(connection, reason)

    def accepted(self, connection: ServerConnection, transport: Any) -> None:
        """Count a socket just accepted; make room for it, or answer 503 and close it."""
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        keep, evicted = self.admission.opened(connection, ip)
        for victim in evicted:
            assert isinstance(victim, ServerConnection)
            victim.transport.abort()
        if evicted:
            held = self._eviction_log.ready(time.monotonic())
            if held is not None:
                logger.warning(
                    "at %d sockets: closed the oldest connection that had not sent its "
                    "request yet, to make room (%d more since the last report)",
                    self.admission.sockets,
                    held,
                )
        if not keep:
            self.manager.rejected_connections += 1
            self._log_refusal(ip, "max_sockets")
            transport.write(self._busy.serialize())
            transport.close()

    def _refuse_admission(self, connection: ServerConnection, reason: str) -> Response:
        """The 503 answer to a WebSocket upgrade over a connection limit."""
        self.manager.rejected_connections += 1
        ip = _client_ip(connection)
        self._log_refusal(ip, reason)
        if reason == "max_connections_per_ip":
            text = (
                f"too many connections from {ip}: {self.admission.max_connections_per_ip} "
                "WebSocket clients per address (serve --max-connections-per-ip, "
                "max_connections_per_ip= in Python); retry later"
            )
        elif reason == "max_connections":
            text = (
                f"too many connections: this server takes {self.admission.max_connections} "
                "WebSocket clients (serve --max-connections, max_connections= in Python); "
                "retry later"
            )
        else:
            text = "server busy: too many open connections; retry later"
        response = _json_response(
            http.HTTPStatus.SERVICE_UNAVAILABLE, {"error": text, "code": reason}
        )
        response.headers["Retry-After"] = str(RETRY_AFTER)
        return response

    def _log_refusal(self, ip: str, reason: str) -> None:
        held = self._refusal_log.ready(time.monotonic())
        if held is not None:
            logger.warning(
                "refused a connection from %s with 503: %s reached (%d sockets, %d WebSocket "
                "clients; %d more refusals since the last report)",
                ip or "?",
                _LIMIT_NAMES.get(reason, reason),
                self.admission.sockets,
                self.admission.websockets,
                held,
            )

    def accept_failed(self, exc: OSError) -> None:
        """accept() ran out of descriptors or memory: count it, log it at most every 10 s."""
        self.accept_errors += 1
        held = self._accept_log.ready(time.monotonic())
        if held is None:
            logger.debug("accept() failed again: %s", exc.strerror)
            return
        logger.warning(
            "accept() failed: %s (errno %s) with %d sockets open; new connections wait in the "
            "listen backlog, retried every second (%d more failures since the last report). "
            "Raise the descriptor limit (ulimit -n) or lower --max-connections",
            exc.strerror,
            errno.errorcode.get(exc.errno or 0, exc.errno),
            self.admission.sockets,
            held,
        )

    def stats(self) -> dict[str, Any]:
        """The admission figures and accept() failures for the stats."""
        admission = self.admission.to_dict()
        admission["open_timeout"] = self.open_timeout
        return {"accept_errors": self.accept_errors, "admission": admission}


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
        auth: JWTAuth | None = None,
        max_patterns: int = protocol.DEFAULT_MAX_PATTERNS,
        gate: _Gate | None = None,
        rates: RateLimits | None = None,
        max_publishes_in_flight: int = DEFAULT_MAX_PUBLISHES_IN_FLIGHT,
    ) -> None:
        self.bus = bus
        self.manager = manager
        self.tls = tls
        self.auth = auth
        self.max_patterns = max_patterns
        self.handshake = HandshakePolicy(auth=auth, allowed_origins=allowed_origins)
        self.counters = Counters()
        self._expiry: dict[Session, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        #: HTTP requests answered 400 (duplicated headers), on any route.
        self.bad_requests = 0
        self.max_message_size = max_message_size
        #: True when the server broadcasts every event of its bus (serve(broadcast=True)).
        self.all_events = True
        # Admission control and rate limits (see limits.py).
        self.gate = gate if gate is not None else _Gate(Admission(2**20, None), manager)
        self.rates = rates if rates is not None else RateLimits(0)
        self.settings = Settings(auth=auth, max_patterns=max_patterns, rates=self.rates)
        self._policies: dict[Session, ClientPolicy] = {}
        #: How clients' connections ended, by close code sent (or received).
        self.close_codes: dict[str, int] = {}
        #: This process's index among several serving one port (serve --workers), or None.
        self.worker: int | None = None
        self._unavailable_log = LogThrottle(LOG_INTERVAL)
        #: This node and the others on the same shared log (set by serve()).
        self.nodes: Nodes = Nodes("", "", self.local_stats)
        # On a shared log, each connection has several publishes in flight (publishing.py).
        self.max_publishes_in_flight = check_max_publishes_in_flight(max_publishes_in_flight)
        self._windows: dict[Session, PublishWindow] = {}
        self.publishes_held = 0  # of connections that closed; open ones count in their window

    # HTTP

    def process_request(
        self, connection: ServerConnection, request: Request
    ) -> Response | Awaitable[Response] | None:
        self.gate.admission.requested(connection)
        path = urlsplit(request.path).path
        for name in _SINGLE_HEADERS:  # read with headers.get(), which raises on duplicates
            count = len(request.headers.get_all(name))
            if count > 1:
                return self._bad_request(connection, path, f"{count} {name!r} headers")
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
            return self.gate.admit(connection, request)
        if path == "/health":
            # A bus on a shared log is degraded while the log cannot be reached.
            health = self.bus.health
            return _json_response(
                http.HTTPStatus.OK if health == "ok" else http.HTTPStatus.SERVICE_UNAVAILABLE,
                {
                    "status": "ok" if health == "ok" else "degraded",
                    "server": f"gathering_lab/{__version__}",
                    "active_connections": self.manager.active_connections,
                    "seq": self.bus.last_seq,
                    "epoch": self.bus.epoch,
                    **self._worker_fields(),
                },
            )
        if path in ("/admin/websocket/stats", "/metrics"):
            denied = self._check_admin(request) if self.auth is not None else None
            if denied is not None:
                return denied
            return self._stats_response() if path != "/metrics" else self._metrics_response()
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

    def _bad_request(self, connection: ServerConnection, path: str, problem: str) -> Response:
        """Count, log (without header values) and answer 400 to a malformed request."""
        self.bad_requests += 1
        if path == WS_PATH:
            self.manager.rejected_connections += 1
        logger.info("bad request for %s from %s: %s", path, connection.remote_address, problem)
        return _json_response(
            http.HTTPStatus.BAD_REQUEST, {"error": f"bad request: {problem}; send exactly one"}
        )

    def _check_admin(self, request: Request) -> Response | None:
        """None if the request carries a token with the admin role, else a 401/403 response."""
        assert self.auth is not None
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            token = next(iter(parse_qs(urlsplit(request.path).query).get("token", [])), None)
        if token is None:
            response = _json_response(
                http.HTTPStatus.UNAUTHORIZED,
                {"error": "unauthorized: send 'Authorization: Bearer <token>' or ?token="},
            )
            response.headers["WWW-Authenticate"] = 'Bearer realm="gathering-lab"'
            return response
        try:
            identity = self.auth.verify(token)
        except AuthError as exc:
            response = _json_response(
                http.HTTPStatus.UNAUTHORIZED, {"error": f"unauthorized: {exc}"}
            )
            response.headers["WWW-Authenticate"] = (
                'Bearer realm="gathering-lab", error="invalid_token"'
            )
            return response
        if not identity.has_role("admin"):
            return _json_response(
                http.HTTPStatus.FORBIDDEN, {"error": "forbidden: the stats need the 'admin' role"}
            )
        return None

    def _worker_fields(self) -> dict[str, Any]:
        """``worker`` and ``pid`` for a server that is one of several processes on a port."""
        return {} if self.worker is None else {"worker": self.worker, "pid": os.getpid()}

    def stats(self) -> dict[str, Any]:
        """The stats, summed over the live nodes as last read (see backends/nodes.py)."""
        return cluster_stats(self.local_stats(), self.nodes, self.nodes.cached())

    async def fresh_stats(self) -> dict[str, Any]:
        """The stats with the other nodes' reports read now (bounded)."""
        try:
            peers, error = await self.nodes.peers(), None
        except Exception as exc:  # noqa: BLE001 - Redis down: this node's figures, said so
            peers, error = [], f"{type(exc).__name__}: {exc}"
        return cluster_stats(self.local_stats(), self.nodes, peers, error)

    async def _stats_response(self) -> Response:
        return _json_response(http.HTTPStatus.OK, await self.fresh_stats())

    async def _metrics_response(self) -> Response:
        stats = await self.fresh_stats()
        lag: int | None = 0
        log = getattr(self.bus, "log", None)
        if log is not None:
            try:
                async with asyncio.timeout(2.0):
                    info = await log.info()
                lag = None
                if info.epoch == self.bus.epoch:
                    lag = max(0, info.last_seq - self.bus.last_seq)
            except Exception as exc:  # noqa: BLE001 - no lag figure rather than no metrics
                logger.debug("no bus lag for /metrics: %s", exc)
                lag = None
        body = render_metrics(stats, lag)
        return _response(http.HTTPStatus.OK, body, METRICS_CONTENT_TYPE)

    def local_stats(self) -> dict[str, Any]:
        """This node's own stats."""
        stats = self.manager.get_stats()
        stats.update(self._worker_fields())
        stats["max_message_size"] = self.max_message_size
        stats["max_patterns"] = self.max_patterns
        stats["protocol_errors"] = dict(self.counters.protocol_errors)
        stats["close_codes"] = dict(self.close_codes)
        stats["bus"] = self.bus.get_stats()
        stats["server"] = f"gathering_lab/{__version__}"
        stats["auth"] = None if self.auth is None else self.auth.algorithm
        stats["bad_requests"] = self.bad_requests
        stats.update(self.gate.stats())
        stats["publishes_rate_limited"] = self.counters.publishes_rate_limited
        stats["publishes_unavailable"] = self.counters.publishes_unavailable
        stats["max_publishes_in_flight"] = self.max_publishes_in_flight
        stats["publishes_held"] = self.publishes_held + sum(w.held for w in self._windows.values())
        stats["messages_throttled"] = self.counters.messages_throttled
        stats["rate_limits"] = self.rates.to_dict()
        mine = {(s.client_id, s.remote): p.limits for s, p in self._policies.items()}
        for client in stats.get("clients", ()):
            limits = mine.get((client.get("client_id"), client.get("remote")))
            if limits is not None:
                client["publishes_rate_limited"] = limits.publishes_rate_limited
                client["messages_throttled"] = limits.messages_throttled
        return stats

    # WebSocket

    async def __call__(self, connection: ServerConnection) -> None:
        request = connection.request
        assert request is not None  # set by the handshake
        query = parse_qs(urlsplit(request.path).query)
        headers = request.headers
        handshake = self.handshake
        auth_frame: protocol.Auth | None = None
        try:
            handshake.check_origin(headers.get_all("Origin"), headers.get_all("Host"))
            identity: Identity | None = None
            if self.auth is not None:
                token = handshake.token(headers.get("Authorization"), query)
                if token is None:
                    # Browsers cannot set headers: the first frame must be {"type": "auth"}.
                    auth_frame = handshake.auth_frame(await self._first_frame(connection))
                    token = auth_frame.token
                identity = handshake.identify(token)
            client_id = handshake.client_id(query, identity, self.manager.new_client_id)
            resume = handshake.resume(query)
        except Refusal as refusal:
            self.manager.rejected_connections += 1
            hint = ""
            if refusal.reason == "Unauthorized origin":  # say how to accept it
                hint = (
                    f" {str(headers.get('Origin'))[:100]!r}; to accept it: gathering-lab serve "
                    "--allowed-origin ORIGIN (allowed_origins=[...] in Python)"
                )
            ip = _client_ip(connection)
            logger.info("refused a client from %s: %s%s", ip, refusal.reason, hint)
            await connection.close(refusal.code, refusal.reason)
            return
        except ConnectionClosed:
            return

        scope = EVERYTHING if identity is None else identity.receive_scope
        # A client resuming in the URL joins live delivery only once its replay has
        # caught up: every event exactly once, in order.
        session = self.manager.connect(connection, client_id, scope, live=resume is None)
        session.identity = identity
        policy = ClientPolicy(
            client_id,
            identity,
            settings=self.settings,
            counters=self.counters,
            now=time.monotonic(),
        )
        self._policies[session] = policy
        if isinstance(self.bus, LogBus):
            self._windows[session] = PublishWindow(
                self.bus.submit,
                lambda action, failure: self._answer(session, policy, action, failure),
                self.max_publishes_in_flight,
            )
        logger.info("client %s connected from %s", client_id, session.remote)
        try:
            greeting = handshake.greeting(
                client_id,
                identity,
                seq=self.bus.last_seq,
                epoch=self.bus.epoch,
                filters=session.filters,
                all_events=self.all_events,
            )
            self.manager.send(session, greeting)
            if identity is not None:
                self._schedule_expiry(session)
                if auth_frame is not None:
                    self.manager.send(session, policy.authenticated(auth_frame.id))
            if resume is not None:
                if not await self._run(session, policy, policy.resume_from_url(resume)):
                    return
            self.manager.join(session)  # (a URL replay that caught up has joined already)
            await self._message_loop(connection, session, policy)
        except ConnectionClosed:
            pass
        except Exception:
            logger.error("connection handler failed for %s", client_id, exc_info=True)
            await connection.close(1011, "internal error")
        finally:
            expiry = self._expiry.pop(session, None)
            if expiry is not None:
                expiry.cancel()
            self._policies.pop(session, None)
            window = self._windows.pop(session, None)
            if window is not None:
                self.publishes_held += window.held
            self.manager.disconnect(session)
            logger.info("client %s disconnected", client_id)
            self._count_close(connection)

    def _count_close(self, connection: ServerConnection) -> None:
        """Count how a client's connection ended, by close code (1009 too big, 4008 slow...)."""
        state = connection.protocol
        close = state.close_sent or state.close_rcvd
        key = str(close.code) if close is not None else "abnormal"
        self.close_codes[key] = self.close_codes.get(key, 0) + 1

    async def _first_frame(self, connection: ServerConnection) -> str | bytes:
        assert self.auth is not None
        try:
            return await asyncio.wait_for(connection.recv(), self.auth.timeout)
        except TimeoutError:
            raise Refusal("authentication timeout") from None

    async def _message_loop(
        self, connection: ServerConnection, session: Session, policy: ClientPolicy
    ) -> None:
        async for frame in connection:
            session.messages_received += 1
            # Over the message rate: read this client's next messages later (its frames
            # wait in websockets' queue, then in TCP buffers). Nothing is dropped.
            delay = policy.throttle(time.monotonic())
            if delay > 0:
                await asyncio.sleep(delay)
            if session.closing and not isinstance(frame, bytes):
                continue  # evicted, or its token expired: the close is under way
            if not await self._run(session, policy, policy.receive(frame, time.monotonic())):
                return

    async def _run(self, session: Session, policy: ClientPolicy, action: Action) -> bool:
        """Do what the policy decided; False once the connection is being closed."""
        manager = self.manager
        window = self._windows.get(session)
        if window is not None and window.in_flight and not isinstance(action, PublishEvent):
            await window.settle()  # answers keep the order of the client's requests
        if isinstance(action, Reply):
            manager.send(session, action.message)
        elif isinstance(action, PublishEvent):
            if window is not None:
                await window.publish(action)  # answered in order, once delivered here
                return True
            try:
                await self.bus.publish(action.event)
            except (ValueError, BackendUnavailable) as exc:
                self._answer(session, policy, action, exc)
            else:
                manager.send(session, policy.published(action))
        elif isinstance(action, ChangeFilters):
            manager.set_filters(session, action.filters)
            manager.send(session, action.reply)
        elif isinstance(action, Replay):
            await self._replay(session, policy, action.resume)
        elif isinstance(action, ChangeIdentity):
            session.identity = action.identity
            manager.set_scope(session, action.identity.receive_scope)
            self._schedule_expiry(session)
            manager.send(session, action.reply)
        elif isinstance(action, CloseConnection):
            await session.connection.close(action.code, action.reason)
            return False
        return True

    def _answer(
        self,
        session: Session,
        policy: ClientPolicy,
        action: PublishEvent,
        failure: BaseException | None,
    ) -> None:
        """Answer a publish: ``published``, or the error ``failure`` maps to (logged)."""
        if failure is None:
            self.manager.send(session, policy.published(action))
            return
        assert isinstance(failure, Exception)
        self.manager.send(session, policy.published(action, failure))
        if isinstance(failure, BackendUnavailable):
            held = self._unavailable_log.ready(time.monotonic())
            if held is not None:
                logger.warning(
                    "refused a publish from %s with unavailable: %s (%d more since the "
                    "last report)",
                    session.client_id,
                    failure,
                    held,
                )

    async def _replay(
        self, session: Session, policy: ClientPolicy, resume: protocol.Resume
    ) -> None:
        """Replay what the client missed, then acknowledge with ``resumed``.

        A client resuming in the URL is not live yet: the replay goes on until it has
        caught up, then makes it live. A ``resume`` message arrives after live delivery
        has started: only the events published before the client joined are replayed,
        so none is sent twice.
        """
        join = not session.live
        if resume.epoch == self.bus.epoch:
            # On a shared log the client may have seen, on another node, events this
            # node's tail has not delivered yet: wait for them (bounded).
            await self.bus.catch_up(resume.since_seq)
        sent, gap = await self.manager.replay(
            session,
            resume.since_seq,
            epoch=resume.epoch,
            upto=None if join else session.joined_seq,
            join=join,
        )
        if not session.closing:
            bus = self.bus
            ack = policy.resumed(resume, sent=sent, gap=gap, seq=bus.last_seq, epoch=bus.epoch)
            self.manager.send(session, ack)

    # Token expiry

    def _schedule_expiry(self, session: Session) -> None:
        """Close the connection with 1008 when its token expires."""
        old = self._expiry.pop(session, None)
        if old is not None:
            old.cancel()
        identity = session.identity
        if identity is None or identity.expires_at is None or self.auth is None:
            return
        delay = max(0.0, identity.expires_at + self.auth.leeway - time.time())
        loop = asyncio.get_running_loop()
        self._expiry[session] = loop.call_later(delay, self._expire, session)

    def _expire(self, session: Session) -> None:
        self._expiry.pop(session, None)
        session.closing = True  # nothing more is sent to it, nothing more it sends is run
        self.manager.disconnect(session)
        logger.info("closing %s: its token expired", session.client_id)
        task = asyncio.get_running_loop().create_task(
            session.connection.close(1008, "token expired")
        )
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _is_loopback(sock: socket.socket) -> bool:
    try:
        return ipaddress.ip_address(sock.getsockname()[0]).is_loopback
    except (ValueError, OSError):
        return False


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind a listening TCP socket now, so a busy port fails at once with a clear error.

    With ``reuse_port`` the socket sets SO_REUSEPORT: several processes bind the same port
    and the kernel spreads new connections over them (Linux).
    """
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
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from None
        raise
    sock.setblocking(False)
    return sock


def _peer_ip(connection: ServerConnection) -> str:
    """The address the connection comes from (a proxy's, behind one)."""
    remote = connection.remote_address
    return str(remote[0]) if remote else ""


def _client_ip(connection: ServerConnection) -> str:
    """The client's address: a trusted proxy's ``X-Forwarded-For`` if it gave one."""
    forwarded: str | None = getattr(connection, "forwarded_for", None)
    return forwarded or _peer_ip(connection)


def _admission(
    max_connections: int | None, per_ip: int | None, trusted_proxies: Iterable[str] = ()
) -> Admission:
    """The admission counts for serve(): checks the keywords, defaults from the fd limit."""
    if per_ip is not None and (isinstance(per_ip, bool) or not isinstance(per_ip, int)):
        raise ValueError(f"max_connections_per_ip must be an int >= 1 or None, not {per_ip!r}")
    proxies = TrustedProxies(trusted_proxies)  # TypeError / ValueError for bad ones
    soft, open_now = descriptor_limit(), open_descriptors()
    if max_connections is None:
        return Admission(default_max_connections(soft, open_now), per_ip, trusted_proxies=proxies)
    if isinstance(max_connections, bool) or not isinstance(max_connections, int):
        raise ValueError(f"max_connections must be an int >= 1, not {max_connections!r}")
    admission = Admission(max_connections, per_ip, trusted_proxies=proxies)
    needed = admission.max_sockets + open_now + DESCRIPTOR_RESERVE
    if needed > soft:
        logger.warning(
            "--max-connections %d (max_connections= in Python) needs about %d file "
            "descriptors but this process may open %d (RLIMIT_NOFILE): past about %d sockets "
            "accept() fails with EMFILE. Raise the limit (ulimit -n) or lower --max-connections",
            max_connections,
            needed,
            soft,
            max(0, soft - open_now - DESCRIPTOR_RESERVE),
        )
    return admission


def _connection_class(handler: _Handler) -> type[ServerConnection]:
    """A ServerConnection that reports its socket's accept and close to ``handler``."""

    class Connection(ServerConnection):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            handler.gate.accepted(self, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            handler.gate.admission.closed(self)
            super().connection_lost(exc)

    return Connection


def _filter_accept_errors(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, handler: _Handler
) -> Callable[[], None]:
    """Route the loop's accept() resource errors on ``sock`` to ``handler``; return an undo.

    asyncio reports each failed accept() (EMFILE, ENFILE, ENOBUFS, ENOMEM) to the loop's
    exception handler, whose default logs a traceback each time: up to a hundred per second
    (its accept loop goes on trying within one turn, then again a second later). Other
    errors, and other sockets', go to the handler that was there before.
    """
    previous = loop.get_exception_handler()
    fileno = sock.fileno()

    def on_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        listening = context.get("socket")
        if (
            isinstance(exc, OSError)
            and exc.errno in _ACCEPT_RESOURCE_ERRNOS
            and listening is not None
            and listening.fileno() == fileno
        ):
            handler.gate.accept_failed(exc)
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(on_error)

    def restore() -> None:
        if loop.get_exception_handler() is on_error:
            loop.set_exception_handler(previous)

    return restore


def bind(host: str = "127.0.0.1", port: int = 8000, *, reuse_port: bool = False) -> socket.socket:
    """Bind a listening socket for :func:`serve` (``sock=``); raises PortInUseError if busy.

    ``reuse_port=True`` sets SO_REUSEPORT, so several processes can serve one port.
    """
    return _bind(host, port, reuse_port)


class serve:  # noqa: N801 - used like a function, as websockets.serve is
    """Start a gathering_lab server on the running event loop.

    Use ``server = await serve(...)`` or ``async with serve(...) as server:``.
    ``port=0`` picks a free port (``server.port``). With ``broadcast=True`` every
    event of ``bus`` goes to the clients; with ``broadcast=False`` only what
    :func:`~gathering_lab.websocket.integration.setup_websocket_broadcasting`
    and ``setup_custom_broadcasting`` enable.

    ``bus`` may be a URL: ``memory://`` is the process's default bus; ``redis://host:port/db``
    (or ``memory://NAME``) opens a :class:`~gathering_lab.backends.bus.LogBus` on that shared
    log, started before serving (BackendUnavailable if the log cannot be reached) and closed
    by :meth:`Server.wait_closed`: several servers on one log give one stream.

    ``reuse_port=True`` binds with SO_REUSEPORT (several processes on one port); ``worker``
    names this process among them: ``/health`` and the stats then carry ``worker`` and
    ``pid``, and generated client ids start with ``client-w<worker>-``.

    ``write_delay`` (seconds, off by default) holds each client's frames up to that long
    and writes them as one buffer: fewer writes for up to that much more latency.
    ``flush_slice`` (128; 0 = all at once) is how many clients a flush writes per loop
    turn; events published meanwhile join the flush under way.

    On a shared Redis log, each node reports its figures every ``node_report_interval``
    seconds (2) into a key that expires after ``node_ttl`` (default three intervals; it
    must exceed the interval): a node that stops reporting drops out of ``nodes`` then.

    Admission and rate limits (``0`` or ``None`` = no limit where noted):
    ``max_connections`` WebSocket clients in all (default: what the descriptor limit
    allows, see :func:`~gathering_lab.websocket.limits.default_max_connections`) and
    ``max_connections_per_ip`` from one address (None = no limit); past either, the
    upgrade is refused with HTTP 503. ``trusted_proxies`` (addresses or networks of
    reverse proxies, e.g. ``["127.0.0.1"]``): from those, the client is the address their
    ``X-Forwarded-For`` names, and the per-address limit counts it (not the proxy).
    ``open_timeout`` bounds a connection's handshake.
    ``publish_rate`` publishes per second per connection with ``publish_burst`` above it
    (0 = no limit; the excess is answered ``rate_limited``); ``message_rate`` and
    ``message_burst`` pace every message a client sends (default: twice the publish
    figures; 0 = no limit; past it the server reads that client's next message later).
    On a shared log, ``max_publishes_in_flight`` publishes per connection go to the log
    together; past that, the server reads that client's next message once one is answered
    (counted in ``publishes_held``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        bus: EventBus | str | None = None,
        manager: ConnectionManager | None = None,
        broadcast: bool = True,
        sock: socket.socket | None = None,
        reuse_port: bool = False,
        worker: int | None = None,
        # Security
        allowed_origins: Iterable[str] = (),
        auth: JWTAuth | None = None,
        ssl: Any = None,
        # Limits
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        max_pending_bytes: int | None = None,
        max_patterns: int = protocol.DEFAULT_MAX_PATTERNS,
        compression: str | None = None,
        write_delay: float | None = None,
        flush_slice: int | None = None,
        node_report_interval: float = REPORT_INTERVAL,
        node_ttl: float | None = None,
        # Admission and rate limits
        max_connections: int | None = None,
        max_connections_per_ip: int | None = DEFAULT_MAX_CONNECTIONS_PER_IP,
        trusted_proxies: Iterable[str] = (),
        publish_rate: float = DEFAULT_PUBLISH_RATE,
        publish_burst: int = DEFAULT_PUBLISH_BURST,
        message_rate: float | None = None,
        message_burst: int | None = None,
        max_publishes_in_flight: int = DEFAULT_MAX_PUBLISHES_IN_FLIGHT,
        # Timeouts
        open_timeout: float | None = DEFAULT_OPEN_TIMEOUT,
        ping_interval: float | None = 20,
        ping_timeout: float | None = 20,
        close_timeout: float | None = 5,
    ) -> None:
        if isinstance(allowed_origins, str):
            raise TypeError("allowed_origins must be a list of origins, not a string")
        if not isinstance(max_message_size, int) or max_message_size < 1024:
            raise ValueError(f"max_message_size must be an int >= 1024, not {max_message_size!r}")
        if not isinstance(max_patterns, int) or isinstance(max_patterns, bool) or max_patterns < 1:
            raise ValueError(f"max_patterns must be a positive integer, not {max_patterns!r}")
        if compression not in (None, "off", "deflate"):
            raise ValueError(f"compression must be 'deflate' or None, not {compression!r}")
        if auth is not None and not isinstance(auth, JWTAuth):
            raise TypeError(f"auth must be a JWTAuth or None, not {type(auth).__name__}")
        # Checked before the port is bound.
        rates = RateLimits(publish_rate, publish_burst, message_rate, message_burst, LOG_INTERVAL)
        check_max_publishes_in_flight(max_publishes_in_flight)
        if open_timeout is not None and not (
            isinstance(open_timeout, (int, float)) and 0 < open_timeout < float("inf")
        ):
            raise ValueError(f"open_timeout must be a number of seconds > 0, not {open_timeout!r}")
        admission = _admission(max_connections, max_connections_per_ip, trusted_proxies)
        self.node_timing = check_timing(node_report_interval, node_ttl)
        self.host = host
        self.port = port
        #: A bus this serve() opened from a URL: started before serving, closed with the server.
        self._owned_bus: Any = None
        if isinstance(bus, str):
            from ..backends.bus import LogBus, bus_for_url

            bus = bus_for_url(bus)  # ValueError for an unknown scheme
            if isinstance(bus, LogBus):
                self._owned_bus = bus
        self.bus = bus if bus is not None else event_bus
        self.manager = manager if manager is not None else manager_for(self.bus)
        self.manager.bind(self.bus)  # ValueError if it already serves another bus
        if max_pending_bytes is not None:
            if not isinstance(max_pending_bytes, int) or max_pending_bytes < 1024:
                raise ValueError(
                    f"max_pending_bytes must be an int >= 1024, not {max_pending_bytes!r}"
                )
            self.manager.max_pending_bytes = max_pending_bytes
        if write_delay is not None:
            self.manager.write_delay = check_write_delay(write_delay)
        if flush_slice is not None:
            self.manager.flush_slice = check_flush_slice(flush_slice)
        self.manager.max_message_size = max_message_size
        self.broadcast = broadcast
        if worker is not None:
            self.manager.client_id_prefix = f"client-w{worker}"
        self.sock = sock if sock is not None else _bind(host, port, reuse_port)
        if auth is None and not _is_loopback(self.sock):
            logger.warning(
                "serving on %s without authentication: whoever reaches this port reads every "
                "event and may publish; keep it on loopback or pass auth= (--jwt-secret)",
                self.sock.getsockname()[0],
            )
        self.ssl = ssl
        self.handler = _Handler(
            bus=self.bus,
            manager=self.manager,
            allowed_origins=allowed_origins,
            max_message_size=max_message_size,
            tls=ssl is not None,
            auth=auth,
            max_patterns=max_patterns,
            gate=_Gate(admission, self.manager, open_timeout),
            rates=rates,
            max_publishes_in_flight=max_publishes_in_flight,
        )
        self.handler.all_events = broadcast
        self.handler.worker = worker
        self.options: dict[str, Any] = {
            "compression": "deflate" if compression == "deflate" else None,
            "max_size": max_message_size,
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
        }
        self._server: Server | None = None

    async def _start(self) -> Server:
        if self._owned_bus is not None:
            try:
                await self._owned_bus.start()  # BackendUnavailable if its log is unreachable
            except BaseException:
                self.sock.close()
                await self._owned_bus.close()
                raise
        ws_server = await websockets.serve(
            self.handler,
            sock=self.sock,
            ssl=self.ssl,
            process_request=self.handler.process_request,
            server_header=f"gathering_lab/{__version__}",
            logger=connection_logger,
            create_connection=_connection_class(self.handler),
            **self.options,
        )
        restore = _filter_accept_errors(asyncio.get_running_loop(), self.sock, self.handler)
        host, port = self.sock.getsockname()[:2]
        interval, ttl = self.node_timing
        nodes = nodes_for(
            self.bus, port, host, self.handler.local_stats, interval=interval, ttl=ttl
        )
        self.handler.nodes = nodes
        await nodes.start()  # reports this node's figures to a shared log (a failure is logged)
        subscription = self.manager.attach(self.bus) if self.broadcast else None
        host = self.sock.getsockname()[0]
        self._server = Server(
            ws_server,
            bus=self.bus,
            manager=self.manager,
            handler=self.handler,
            subscription=subscription,
            host=host,
            on_close=restore,
            owned_bus=self._owned_bus,
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
