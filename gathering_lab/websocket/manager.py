"""The connection manager: who is connected, what each wants, and fan-out to them.

Fan-out works in batches. :meth:`ConnectionManager.broadcast` only appends the
event to a pending batch; the batch is flushed once per event-loop iteration
(or sooner when it grows past ``flush_bytes``). A flush builds each event's text
frame once, joins the frames each group of clients wants into one buffer, and
writes that same buffer to every client of the group: one ``transport.write``
per client per flush, however many events the batch holds.

Clients are grouped by their filters and their token's scope (the circles and
projects it may see, :class:`~gathering_lab.auth.Scope`), so a publish tests each
distinct (filters, scope) pair once rather than each client, and a scope is
enforced on the same per-group pass that applies the filters.

Every client's pending outgoing bytes are capped (``max_pending_bytes``). A
client over the cap is a slow consumer: it is sent close code 4008 and its
transport is aborted if it does not take the close frame within a second. What
it did not receive is counted in ``messages_dropped``; it can resume by ``seq``.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from .. import protocol
from ..auth import EVERYTHING, Scope
from ..events import Event
from ..protocol import Filters

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "SLOW_CONSUMER_CLOSE_CODE",
    "ConnectionManager",
    "Session",
    "get_connection_manager",
]

logger = logging.getLogger("gathering_lab.websocket.manager")

DEFAULT_MAX_PENDING_BYTES = 4 * 2**20
SLOW_CONSUMER_CLOSE_CODE = 4008
SLOW_CONSUMER_ABORT_AFTER = 1.0
ALL = Filters()
GroupKey = tuple[Filters, Scope]


def text_frame(payload: bytes) -> bytes:
    """Return an unmasked, final WebSocket text frame carrying ``payload`` (server side)."""
    length = len(payload)
    if length < 126:
        header = bytes((0x81, length))
    elif length < 65536:
        header = struct.pack("!BBH", 0x81, 126, length)
    else:
        header = struct.pack("!BBQ", 0x81, 127, length)
    return header + payload


def filters_match(filters: Filters, event: Event) -> bool:
    """Return True if ``event`` passes ``filters`` (type patterns, circle, project)."""
    return filters.matches(event.type_name, event.circle_id, event.project_id)


class Session:
    """One connected client as the manager sees it."""

    __slots__ = (
        "client_id",
        "connection",
        "transport",
        "raw",
        "connected_at",
        "messages_sent",
        "messages_received",
        "filters",
        "closing",
        "remote",
        "joined_seq",
        "scope",
        "identity",
    )

    def __init__(self, connection: ServerConnection, client_id: str) -> None:
        self.client_id = client_id
        self.connection = connection
        self.transport = connection.transport
        # Without extensions (compression), a prebuilt frame can be written as is.
        self.raw = not connection.protocol.extensions
        self.connected_at = protocol.format_timestamp()
        self.messages_sent = 0
        self.messages_received = 0
        self.filters = ALL
        self.scope: Scope = EVERYTHING
        self.identity: Any = None  # an auth.Identity when the server checks tokens
        self.closing = False
        self.joined_seq = 0
        remote = connection.remote_address
        self.remote = f"{remote[0]}:{remote[1]}" if remote else None

    @property
    def pending_bytes(self) -> int:
        """Bytes written to this client that the socket has not taken yet."""
        try:
            return self.transport.get_write_buffer_size()
        except Exception:  # transport already gone
            return 0

    def to_dict(self) -> dict[str, Any]:
        """Return this client's line of the stats."""
        return {
            "client_id": self.client_id,
            "connected_at": self.connected_at,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "filters": self.filters.to_dict(),
            "pending_bytes": self.pending_bytes,
            "remote": self.remote,
            "compression": not self.raw,
            "scope": self.scope.to_dict(),
        }

    def __repr__(self) -> str:
        return f"<Session {self.client_id} sent={self.messages_sent}>"


class ConnectionManager:
    """Registry of connected clients, fan-out of events to them, and the stats of both."""

    def __init__(
        self,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        flush_bytes: int = 256 * 2**10,
    ) -> None:
        if not isinstance(max_pending_bytes, int) or max_pending_bytes < 1024:
            raise ValueError(f"max_pending_bytes must be an int >= 1024, not {max_pending_bytes!r}")
        self.max_pending_bytes = max_pending_bytes
        self.flush_bytes = flush_bytes
        self.max_message_size: int | None = None
        self._sessions: dict[int, Session] = {}
        self._groups: dict[GroupKey, set[Session]] = {}
        self._pending: list[Event] = []
        self._pending_bytes = 0
        self._flush_handle: asyncio.Handle | None = None
        self._last_seq: dict[str | None, int] = {}
        self._bus_subscriptions: dict[int, tuple[Any, str, int]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ids = itertools.count(1)
        self.total_connections = 0
        self.total_messages_sent = 0
        self.total_broadcasts = 0
        self.slow_consumers_closed = 0
        self.messages_dropped = 0
        self.rejected_connections = 0

    # Registry

    def connect(
        self, connection: ServerConnection, client_id: str, scope: Scope = EVERYTHING
    ) -> Session:
        """Register a connected client; it receives broadcasts from the next flush on.

        ``scope`` bounds what it can ever receive, whatever filters it sets.
        """
        self.flush()  # what was published before it connected is not its business
        session = Session(connection, client_id)
        session.scope = scope
        self._sessions[id(connection)] = session
        self._groups.setdefault((session.filters, scope), set()).add(session)
        self.total_connections += 1
        return session

    def disconnect(self, session: Session) -> None:
        """Forget a client (idempotent)."""
        if self._sessions.pop(id(session.connection), None) is None:
            return
        self._leave_group(session)

    def _leave_group(self, session: Session) -> None:
        key = (session.filters, session.scope)
        members = self._groups.get(key)
        if members is not None:
            members.discard(session)
            if not members:
                del self._groups[key]

    def set_filters(self, session: Session, filters: Filters) -> None:
        """Change what a client receives from the next flush on."""
        self._regroup(session, filters, session.scope)

    def set_scope(self, session: Session, scope: Scope) -> None:
        """Change what a client may receive (a refreshed token) from the next flush on."""
        self._regroup(session, session.filters, scope)

    def _regroup(self, session: Session, filters: Filters, scope: Scope) -> None:
        self.flush()
        if id(session.connection) in self._sessions:
            self._leave_group(session)
            session.filters, session.scope = filters, scope
            self._groups.setdefault((filters, scope), set()).add(session)
        else:
            session.filters, session.scope = filters, scope

    def new_client_id(self) -> str:
        """Return a client id for a client that did not give one."""
        return f"client-{next(self._ids)}-{protocol.new_event_id()[4:12]}"

    @property
    def sessions(self) -> list[Session]:
        """The connected clients."""
        return list(self._sessions.values())

    @property
    def active_connections(self) -> int:
        """How many clients are connected now."""
        return len(self._sessions)

    # Bus wiring

    def attach(self, bus: Any, event_type: str = "*", filter_fn: Any = None) -> str:
        """Broadcast ``bus`` events of ``event_type`` to clients; returns the subscription id."""
        return str(bus.subscribe(event_type, self.broadcast, filter_fn, name="websocket-broadcast"))

    # Fan-out

    def broadcast(self, event: Event) -> None:
        """Queue ``event`` for every client whose filters it passes (sent at the next flush)."""
        if event.seq is not None:
            # Several subscriptions (a server's and the setup functions') may route one
            # event here: send it once.
            last = self._last_seq.get(event.epoch, 0)
            if event.seq <= last:
                return
            self._last_seq[event.epoch] = event.seq
        self.total_broadcasts += 1
        if not self._sessions:
            return
        try:
            size = len(event.encoded())
        except ValueError:  # never numbered by a bus: it cannot be sent, skip it
            logger.error("not broadcasting %s", event.id, exc_info=True)
            return
        self._pending.append(event)
        self._pending_bytes += size
        if self._pending_bytes >= self.flush_bytes:
            self.flush()
        elif self._flush_handle is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                self.flush()
                return
            self._flush_handle = loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send the pending batch now."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        batch = self._pending
        if not batch:
            return
        self._pending = []
        self._pending_bytes = 0
        payloads = [event.encoded() for event in batch]
        frames = [text_frame(p) for p in payloads]
        for (filters, scope), members in list(self._groups.items()):
            chosen: Sequence[int]
            if scope.empty:
                continue
            if scope.unrestricted:
                if filters is ALL or filters == ALL:
                    chosen = range(len(batch))
                else:
                    chosen = [i for i, event in enumerate(batch) if filters_match(filters, event)]
            else:
                chosen = [
                    i
                    for i, event in enumerate(batch)
                    if scope.allows(event) and filters_match(filters, event)
                ]
            if not chosen:
                continue
            blob = frames[0] if len(frames) == 1 else b"".join(frames[i] for i in chosen)
            count = len(chosen)
            for session in list(members):
                if session.raw:
                    self._write(session, blob, count)
                else:
                    self._write_messages(session, [payloads[i] for i in chosen])

    def _write(self, session: Session, blob: bytes, count: int) -> None:
        if session.closing or session.connection.protocol.state is not State.OPEN:
            return
        if session.transport.get_write_buffer_size() > self.max_pending_bytes:
            self._evict(session, count)
            return
        session.transport.write(blob)
        session.messages_sent += count
        self.total_messages_sent += count

    def _write_messages(self, session: Session, payloads: list[bytes]) -> None:
        connection = session.connection
        if session.closing or connection.protocol.state is not State.OPEN:
            return
        if session.transport.get_write_buffer_size() > self.max_pending_bytes:
            self._evict(session, len(payloads))
            return
        try:
            for payload in payloads:
                connection.protocol.send_text(payload)
            connection.send_data()
        except Exception:
            logger.warning("could not write to %s", session.client_id, exc_info=True)
            return
        session.messages_sent += len(payloads)
        self.total_messages_sent += len(payloads)

    def send(self, session: Session, message: dict[str, Any]) -> bool:
        """Send one control message (ack, pong, error) to a client, in order with events.

        Returns False if the client is gone or was closed as a slow consumer.
        """
        self.flush()
        payload = protocol.encode(message)
        if session.raw:
            before = session.messages_sent
            self._write(session, text_frame(payload), 1)
        else:
            before = session.messages_sent
            self._write_messages(session, [payload])
        return session.messages_sent > before

    def send_events(self, session: Session, events: Iterable[Event]) -> int:
        """Send past events to one client (a resume); returns how many were written."""
        self.flush()
        batch = list(events)
        if not batch:
            return 0
        before = session.messages_sent
        if session.raw:
            self._write(session, b"".join(text_frame(e.encoded()) for e in batch), len(batch))
        else:
            self._write_messages(session, [e.encoded() for e in batch])
        return session.messages_sent - before

    def _evict(self, session: Session, count: int) -> None:
        session.closing = True
        self.slow_consumers_closed += 1
        self.messages_dropped += count
        self.disconnect(session)
        logger.warning(
            "closing slow consumer %s: %d bytes pending (cap %d)",
            session.client_id,
            session.pending_bytes,
            self.max_pending_bytes,
        )
        connection = session.connection
        try:
            connection.protocol.send_close(SLOW_CONSUMER_CLOSE_CODE, "slow consumer")
            connection.send_data()
        except Exception:
            logger.debug("could not send close frame to %s", session.client_id, exc_info=True)
        loop = asyncio.get_running_loop()

        def abort() -> None:
            if connection.protocol.state is not State.CLOSED:
                connection.transport.abort()

        loop.call_later(SLOW_CONSUMER_ABORT_AFTER, abort)

    # Stats

    def get_stats(self) -> dict[str, Any]:
        """Return the guide's stats (active/total connections, messages, broadcasts, clients)."""
        return {
            "active_connections": len(self._sessions),
            "total_connections": self.total_connections,
            "total_messages_sent": self.total_messages_sent,
            "total_broadcasts": self.total_broadcasts,
            "clients": [s.to_dict() for s in self._sessions.values()],
            "slow_consumers_closed": self.slow_consumers_closed,
            "messages_dropped": self.messages_dropped,
            "rejected_connections": self.rejected_connections,
            "filter_groups": len(self._groups),
            "max_pending_bytes": self.max_pending_bytes,
            "max_message_size": self.max_message_size,
        }

    def __repr__(self) -> str:
        return (
            f"<ConnectionManager active={len(self._sessions)} "
            f"broadcasts={self.total_broadcasts} sent={self.total_messages_sent}>"
        )


_manager: ConnectionManager | None = None


def get_connection_manager() -> ConnectionManager:
    """Return the process-wide connection manager (created on first use)."""
    global _manager
    if _manager is None:
        _manager = ConnectionManager()
    return _manager
