"""The session policy: who may connect, and what each client message becomes. No I/O.

The server (:mod:`~gathering_lab.websocket.server`) is a thin asyncio shell: it reads
frames, asks this module what to do, does it, and writes what it is told to write.
Every decision (origin, token, client id, resume point, permissions, rate limits,
the reply to each message and the request id it echoes) is made here, from plain
values, so it is tested without sockets, the way websockets keeps its ``protocol.py``
apart from its asyncio layer::

    gate = HandshakePolicy(auth=None, allowed_origins=())
    gate.check_origin(origins, hosts)                 # raises Refusal (close 1008)
    client = ClientPolicy("dashboard-1", identity=None, settings=Settings())
    action = client.receive('{"type":"ping","id":1}', now=time.monotonic())
    # Reply({"type": "pong", ..., "id": 1})

:meth:`ClientPolicy.receive` returns one action: :class:`Reply`, :class:`PublishEvent`,
:class:`ChangeFilters`, :class:`ChangeIdentity`, :class:`Replay` or
:class:`CloseConnection`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from .. import __version__, protocol
from ..auth import EVERYTHING, Identity, JWTAuth, Scope, bearer_token
from ..events import Event
from ..exceptions import AuthError, BackendUnavailable, ProtocolError
from .limits import ClientLimits, RateLimits

__all__ = [
    "LOOPBACK_ORIGIN",
    "Action",
    "ChangeFilters",
    "ChangeIdentity",
    "ClientPolicy",
    "CloseConnection",
    "Counters",
    "HandshakePolicy",
    "PublishEvent",
    "Refusal",
    "Replay",
    "Reply",
    "Settings",
]

logger = logging.getLogger("gathering_lab.websocket.server")

#: Browser origins accepted by default: loopback hosts on any port.
LOOPBACK_ORIGIN = re.compile(r"^https?://(localhost|127\.0\.0\.1|\[::1\])(:\d{1,5})?$")
_MAX_SEQ = 2**63 - 1
ALL = protocol.Filters()
_CLIENT_ID = re.compile(r"^[\w.:@~+-]{1,128}$")
SERVER_NAME = f"gathering_lab/{__version__}"


# Handshake


class Refusal(Exception):
    """The connection is refused: close it with ``code`` and ``reason`` (before any event)."""

    def __init__(self, reason: str, code: int = 1008) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason[:120]  # a close reason must fit in a control frame


class HandshakePolicy:
    """Who may connect: origin, token, client id and resume point, decided from the request."""

    def __init__(self, *, auth: JWTAuth | None, allowed_origins: Iterable[str]) -> None:
        self.auth = auth
        self.allow_any_origin = False
        self.allowed_origins: set[str] = set()
        for origin in allowed_origins:
            if origin == "*":
                self.allow_any_origin = True
            else:
                self.allowed_origins.add(origin.rstrip("/"))

    def origin_allowed(self, origin: str | None, host: str | None = None) -> bool:
        """True for no Origin (not a browser), loopback, listed, or same-origin pages."""
        if origin is None or self.allow_any_origin:
            return True
        origin = origin.rstrip("/")
        if origin in self.allowed_origins or LOOPBACK_ORIGIN.match(origin) is not None:
            return True
        # The page this server served itself (reached by any name): another site's
        # page cannot make its Origin match our Host.
        return host is not None and urlsplit(origin).netloc.lower() == host.lower()

    def check_origin(self, origins: list[str], hosts: list[str]) -> None:
        """Raise Refusal ("Unauthorized origin") unless the request's origin is accepted."""
        origin = origins[0] if origins else None
        host = hosts[0] if len(hosts) == 1 else None
        if len(origins) > 1 or not self.origin_allowed(origin, host):
            raise Refusal("Unauthorized origin")

    def token(self, authorization: str | None, query: Mapping[str, list[str]]) -> str | None:
        """The token of the request (``Authorization: Bearer`` first, then ``?token=``)."""
        token = bearer_token(authorization)
        if token is None:
            token = next(iter(query.get("token", [])), None)
        return token

    @staticmethod
    def auth_frame(frame: str | bytes) -> protocol.Auth:
        """The first frame of a client that had no token in its request: it must be ``auth``."""
        message: protocol.ClientMessage | None = None
        if isinstance(frame, str):
            try:
                message = protocol.parse_client_message(frame)
            except ProtocolError:
                message = None
        if not isinstance(message, protocol.Auth):
            raise Refusal(
                'authentication required: send {"type":"auth","data":{"token":...}} first'
            )
        return message

    def identify(self, token: str) -> Identity:
        """The identity a token proves; Refusal if it is bad or grants nothing to a client."""
        assert self.auth is not None
        try:
            identity = self.auth.verify(token)
        except AuthError as exc:
            raise Refusal(str(exc)) from None
        if not (identity.has_role("subscribe") or identity.has_role("publish")):
            raise Refusal("the token grants neither 'subscribe' nor 'publish'")
        return identity

    @staticmethod
    def client_id(
        query: Mapping[str, list[str]], identity: Identity | None, new_id: Callable[[], str]
    ) -> str:
        """The client's id: the token's ``sub``, else ``?client_id=``, else a fresh one."""
        requested = (query.get("client_id") or [""])[0]
        if identity is not None:
            # The token names the client: a ?client_id= that disagrees is ignored.
            if requested and requested != identity.sub:
                logger.info("client_id %r ignored: the token is for %r", requested, identity.sub)
            return identity.sub
        if not requested:
            return new_id()
        if not _CLIENT_ID.match(requested):
            raise Refusal("invalid client_id: use 1-128 letters, digits or . _ - : @ ~ +")
        return requested

    @staticmethod
    def resume(query: Mapping[str, list[str]]) -> protocol.Resume | None:
        """The resume point asked for in the URL (``?last_seq=N&epoch=E``), if any."""
        if "last_seq" not in query:
            return None
        raw = query["last_seq"][0]
        if not (raw.isascii() and raw.isdigit()) or int(raw) > _MAX_SEQ:
            raise Refusal(f"last_seq must be an integer >= 0, not {raw[:40]!r}")
        epochs = query.get("epoch")
        return protocol.Resume(int(raw), epochs[0] if epochs else None)

    @staticmethod
    def greeting(
        client_id: str,
        identity: Identity | None,
        *,
        seq: int,
        epoch: str,
        filters: protocol.Filters,
        all_events: bool,
    ) -> dict[str, Any]:
        """The ``connection.established`` message."""
        scope = EVERYTHING if identity is None else identity.receive_scope
        extras = {} if identity is None else identity.to_dict()
        return protocol.connection_established(
            client_id,
            server=SERVER_NAME,
            seq=seq,
            epoch=epoch,
            filters=filters.to_dict(),
            # Every event after `seq` reaches this client unless its own filters
            # exclude it: a jump in seq is a loss (not so with a scope, or
            # broadcast=False, which skip events).
            contiguous=all_events and scope.unrestricted,
            request_ids=True,  # acks and errors echo the request's "id"
            **extras,
        )


# What a client message becomes


@dataclass(frozen=True, slots=True)
class Reply:
    """Send ``message`` to the client."""

    message: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PublishEvent:
    """Publish ``event`` on the bus, then answer with :meth:`ClientPolicy.published`."""

    event: Event
    request_id: Any = None


@dataclass(frozen=True, slots=True)
class ChangeFilters:
    """Deliver only what ``filters`` let through from now on, then send ``reply``."""

    filters: protocol.Filters
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class ChangeIdentity:
    """A fresh token: apply its scope and expiry, then send ``reply``."""

    identity: Identity
    reply: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Replay:
    """Replay what the client missed, then answer with :meth:`ClientPolicy.resumed`."""

    resume: protocol.Resume


@dataclass(frozen=True, slots=True)
class CloseConnection:
    """Close the connection with ``code`` and ``reason``."""

    code: int
    reason: str


Action = Reply | PublishEvent | ChangeFilters | ChangeIdentity | Replay | CloseConnection


@dataclass(slots=True)
class Counters:
    """What a server's clients were refused or held back, for the stats."""

    protocol_errors: dict[str, int] = field(default_factory=dict)
    publishes_rate_limited: int = 0
    messages_throttled: int = 0
    #: Publishes answered ``unavailable``: the bus's shared log could not be reached.
    publishes_unavailable: int = 0


@dataclass(frozen=True, slots=True)
class Settings:
    """A server's settings that shape each client's policy."""

    auth: JWTAuth | None = None
    max_patterns: int = protocol.DEFAULT_MAX_PATTERNS
    rates: RateLimits = field(default_factory=lambda: RateLimits(0))


class ClientPolicy:
    """What one connected client may do, and the reply to each of its messages."""

    def __init__(
        self,
        client_id: str,
        identity: Identity | None,
        *,
        settings: Settings,
        counters: Counters | None = None,
        now: float = 0.0,
    ) -> None:
        self.client_id = client_id
        self.identity = identity
        self.settings = settings
        self.counters = counters if counters is not None else Counters()
        self.limits: ClientLimits = settings.rates.for_client(now)

    @property
    def scope(self) -> Scope:
        """What this client may ever receive (its token's circles and projects)."""
        return EVERYTHING if self.identity is None else self.identity.receive_scope

    # Messages

    def throttle(self, now: float) -> float:
        """Seconds to wait before handling the message just received (0 under the rate)."""
        if self.limits.messages is None:
            return 0.0
        delay = self.limits.message_delay(now)
        if delay > 0:
            self.counters.messages_throttled += 1
        return delay

    def receive(self, frame: str | bytes, now: float) -> Action:
        """Decide what to do with one frame from the client."""
        if isinstance(frame, bytes):
            return CloseConnection(1003, "binary frames are not supported; send JSON text")
        message: protocol.ClientMessage | None = None
        try:
            message = protocol.parse_client_message(frame, max_patterns=self.settings.max_patterns)
            return self._dispatch(message, now)
        except ProtocolError as exc:
            # Echo the request's id, also when the message failed to parse.
            return Reply(self.error(exc, exc.request_id if message is None else message.id))

    def error(self, exc: ProtocolError, request_id: Any = None) -> dict[str, Any]:
        """The ``error`` reply to a refused request (counted by code)."""
        errors = self.counters.protocol_errors
        errors[exc.code] = errors.get(exc.code, 0) + 1
        reply = protocol.error(exc.code, exc.message, request_id)
        if exc.details:
            reply["data"].update(exc.details)
        return reply

    def _dispatch(self, message: protocol.ClientMessage, now: float) -> Action:
        if isinstance(message, protocol.Ping):
            return Reply(protocol.pong(message.id))
        if isinstance(message, protocol.Auth):
            return self._reauthenticate(message)
        if isinstance(message, protocol.Publish):
            return self._publish(message, now)
        self._require("subscribe", type(message).__name__.lower())
        if isinstance(message, protocol.Subscribe):
            filters = message.filters
            return ChangeFilters(
                filters, protocol.ack("subscribed", message.id, **filters.to_dict())
            )
        if isinstance(message, protocol.Unsubscribe):
            filters = protocol.Filters()
            return ChangeFilters(
                filters, protocol.ack("subscribed", message.id, **filters.to_dict())
            )
        if isinstance(message, protocol.Resume):
            return Replay(message)
        raise ProtocolError("unknown_type", f"unsupported message {type(message).__name__}")

    def _require(self, role: str, action: str) -> None:
        identity = self.identity
        if identity is not None and not identity.has_role(role):
            roles = ", ".join(sorted(identity.roles)) or "none"
            raise ProtocolError(
                "forbidden", f"{action} needs the '{role}' role; this token has: {roles}"
            )

    def _publish(self, message: protocol.Publish, now: float) -> Action:
        self._require("publish", "publish")
        identity = self.identity
        if identity is not None and not identity.scope.allows_ids(
            message.circle_id, message.project_id
        ):
            raise ProtocolError(
                "forbidden",
                f"circle_id={message.circle_id!r}, project_id={message.project_id!r} "
                f"is outside this token's scope {identity.scope.to_dict()}",
            )
        if not self.limits.allow_publish(now):
            self._rate_limited(now)
        event = Event(
            type=message.type,
            data=message.data,
            source_agent_id=message.source_agent_id,
            circle_id=message.circle_id,
            project_id=message.project_id,
        )
        return PublishEvent(event, message.id)

    def _rate_limited(self, now: float) -> None:
        """Count and log (at most every 10 s per client) a refused publish, then refuse it."""
        rates = self.settings.rates
        limits = self.limits
        self.counters.publishes_rate_limited += 1
        held = limits.log.ready(now)
        if held is not None:
            logger.warning(
                "client %s publishes faster than %g/s (burst %d): refused with rate_limited "
                "(%d so far from it, %d since the last report)",
                self.client_id,
                rates.publish_rate,
                rates.publish_burst,
                limits.publishes_rate_limited,
                held,
            )
        raise ProtocolError(
            "rate_limited",
            f"publish rate over {rates.publish_rate:g} events/s (burst {rates.publish_burst}): "
            "this event was not published; slow down and send it again",
            details={
                "retry_after": round(limits.publish_wait(now), 6),
                "publish_rate": rates.publish_rate,
                "publish_burst": rates.publish_burst,
            },
        )

    def _reauthenticate(self, message: protocol.Auth) -> Action:
        """A fresh token on an open connection (e.g. before the old one expires)."""
        auth = self.settings.auth
        if auth is None:
            raise ProtocolError("invalid_message", "authentication is off on this server")
        try:
            identity = auth.verify(message.token)
        except AuthError as exc:
            raise ProtocolError("unauthorized", str(exc)) from None
        if identity.sub != self.client_id:
            raise ProtocolError(
                "forbidden", "the token is for another client id; reconnect to change identity"
            )
        if not (identity.has_role("subscribe") or identity.has_role("publish")):
            raise ProtocolError("forbidden", "the token grants neither 'subscribe' nor 'publish'")
        self.identity = identity
        return ChangeIdentity(identity, self.authenticated(message.id))

    def resume_from_url(self, resume: protocol.Resume) -> Action:
        """What a resume asked for in the URL becomes (a replay, or an error if not allowed)."""
        try:
            self._require("subscribe", "resume")
        except ProtocolError as exc:
            return Reply(self.error(exc, resume.id))
        return Replay(resume)

    # Replies to what the shell did

    def authenticated(self, request_id: Any = None) -> dict[str, Any]:
        """The ``authenticated`` ack for this client's current identity."""
        identity = self.identity
        if identity is None:
            raise ValueError("this client has no identity: authentication is off")
        return protocol.ack(
            "authenticated",
            request_id,
            client_id=self.client_id,
            **identity.to_dict(),
            expires_at=identity.expires_at,
        )

    def published(self, action: PublishEvent, failure: Exception | None = None) -> dict[str, Any]:
        """The answer to a publish: ``published``, ``invalid_message`` if the bus refused it,
        or ``unavailable`` if its shared log could not be reached (nothing was published).
        """
        if isinstance(failure, BackendUnavailable):
            self.counters.publishes_unavailable += 1
            return self.error(
                ProtocolError(
                    "unavailable",
                    f"the event log cannot be reached ({failure}); this event was not "
                    "published: send it again later",
                ),
                action.request_id,
            )
        if failure is not None:  # not strict JSON: refused before it was numbered
            return self.error(ProtocolError("invalid_message", str(failure)), action.request_id)
        event = action.event
        return protocol.ack("published", action.request_id, event_id=event.id, seq=event.seq)

    def resumed(
        self, resume: protocol.Resume, *, sent: int, gap: bool, seq: int, epoch: str
    ) -> dict[str, Any]:
        """The ``resumed`` ack after a replay of ``sent`` events."""
        return protocol.ack(
            "resumed",
            resume.id,
            count=sent,
            since_seq=resume.since_seq,
            seq=seq,
            epoch=epoch,
            gap=gap,
        )
