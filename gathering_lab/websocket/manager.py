"""The connection manager: who is connected, what each wants, and fan-out to them.

Fan-out works in batches. :meth:`ConnectionManager.broadcast` only appends the
event to a pending batch; the batch is flushed once per event-loop iteration
(or sooner when it grows past ``flush_bytes``). A flush builds each event's text
frame once, joins the frames each group of clients wants into one buffer, and
writes that same buffer to every client of the group: one ``transport.write``
per client per flush, however many events the batch holds.

A flush to many clients is written in slices of ``flush_slice`` clients per loop
turn, so that the loop reads sockets (new publishes, the log's replies) in between.
Events broadcast meanwhile join the flush under way: the clients it has not
reached yet get them in the same write, the others in one write after it. An
event so waits for the flush to reach each client, never for a whole flush to end
before its own begins, and each client's events and replies keep their order.

Clients are grouped by their filters and their token's scope (the circles and
projects it may see, :class:`~gathering_lab.auth.Scope`), so a publish tests each
distinct (filters, scope) pair once rather than each client, and a scope is
enforced on the same per-group pass that applies the filters.

Every client's pending outgoing bytes are capped (``max_pending_bytes``). A
client over the cap is a slow consumer: it is sent close code 4008 and its
transport is aborted if it does not take the close frame within a second. What
it did not receive is counted in ``messages_dropped``; it can resume by ``seq``.

Replays (a client resuming from ``seq``) are streamed by :meth:`ConnectionManager.replay`
in chunks of at most ``replay_chunk_bytes``, each written only once the client's
socket has drained, so a replay never holds more than one chunk per client
however much history it covers, and never blocks the loop. A client whose
replay makes no progress for ``replay_stall_timeout`` seconds is evicted like
a slow consumer.

A manager serves one bus: :func:`get_connection_manager` returns the one of
the default bus (the guide's), :func:`manager_for` the one of any other bus, so
two servers on two buses never see each other's events.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import struct
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from websockets.protocol import State

from .. import protocol
from ..auth import EVERYTHING, Scope
from ..events import Event, event_bus
from ..protocol import Filters

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

__all__ = [
    "DEFAULT_MAX_PENDING_BYTES",
    "SLOW_CONSUMER_CLOSE_CODE",
    "ConnectionManager",
    "Session",
    "get_connection_manager",
    "manager_for",
]

logger = logging.getLogger("gathering_lab.websocket.manager")

DEFAULT_MAX_PENDING_BYTES = 4 * 2**20
SLOW_CONSUMER_CLOSE_CODE = 4008
SLOW_CONSUMER_ABORT_AFTER = 1.0
DEFAULT_REPLAY_CHUNK_BYTES = 64 * 2**10
DEFAULT_REPLAY_STALL_TIMEOUT = 30.0
#: Clients a flush writes per event-loop turn before it lets the loop run (0 = all at once).
DEFAULT_FLUSH_SLICE = 128
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
        "live",
        "deferred",
        "deferred_bytes",
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
        self.live = False  # receives broadcasts (False while a resume catches up)
        # Frames held while websockets sends a fragmented message on this connection.
        self.deferred: list[tuple[Any, int]] = []  # (frames, count) or (payloads, count)
        self.deferred_bytes = 0
        remote = connection.remote_address
        self.remote = f"{remote[0]}:{remote[1]}" if remote else None
        forwarded = getattr(connection, "forwarded_for", None)  # a trusted proxy's client
        if forwarded:
            self.remote = forwarded

    @property
    def pending_bytes(self) -> int:
        """Bytes written to this client that the socket has not taken yet."""
        try:
            return self.transport.get_write_buffer_size() + self.deferred_bytes
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
            "live": self.live,
        }

    def __repr__(self) -> str:
        return f"<Session {self.client_id} sent={self.messages_sent}>"


MAX_WRITE_DELAY = 1.0


def check_flush_slice(value: Any) -> int:
    """``value`` if it is a valid ``flush_slice`` (an int >= 0), else ValueError."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"flush_slice must be an int >= 0 (0 = no slices), not {value!r}")
    return value


def check_write_delay(value: Any) -> float:
    """Return ``value`` as a write delay in seconds (0 = off, at most 1 s); ValueError if not."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"write_delay must be a number of seconds, not {value!r}")
    if not 0 <= value <= MAX_WRITE_DELAY:
        raise ValueError(f"write_delay must be from 0 to {MAX_WRITE_DELAY:g} s, not {value!r}")
    return float(value)


class _Job:
    """One group's part of a flush: who gets it, which events of the batch, their frames."""

    __slots__ = ("key", "members", "indices", "blob")

    def __init__(
        self, key: GroupKey, members: list[Session], indices: Sequence[int], blob: bytes
    ) -> None:
        self.key, self.members, self.indices, self.blob = key, members, indices, blob


class _Flush:
    """A batch being written over several loop turns, and how far it got."""

    __slots__ = ("batch", "frames", "jobs", "replies", "job", "member", "size")

    def __init__(
        self,
        batch: list[Event],
        frames: list[bytes],
        jobs: list[_Job],
        replies: dict[Session, list[tuple[int, bytes]]],
    ) -> None:
        self.batch, self.frames, self.jobs, self.replies = batch, frames, jobs, replies
        self.job = 0  # jobs[job].members[member] is the next client to write
        self.member = 0
        self.size = sum(map(len, frames))  # bytes of the frames it holds

    def merge(
        self,
        batch: list[Event],
        frames: list[bytes],
        chosen: dict[GroupKey, Sequence[int]],
        blobs: dict[GroupKey, bytes],
        replies: dict[Session, list[tuple[int, bytes]]],
        groups: dict[GroupKey, set[Session]],
    ) -> None:
        """Add a newer batch: clients not written yet get it with this one, the rest after.

        Per client, events and replies keep their order: the newer batch's indices and
        reply positions are shifted past this batch's.
        """
        offset = len(self.batch)
        self.batch = self.batch + batch
        self.frames = self.frames + frames
        self.size += sum(map(len, frames))
        waiting: dict[GroupKey, set[Session]] = {}  # not written yet, by group
        jobs: list[_Job] = []
        for number, job in enumerate(self.jobs[self.job :]):
            members = job.members[self.member :] if number == 0 else job.members
            extra = chosen.get(job.key)
            if extra:
                job = _Job(
                    job.key,
                    members,
                    [*job.indices, *(offset + i for i in extra)],
                    job.blob + blobs[job.key],
                )
            else:
                job = _Job(job.key, members, job.indices, job.blob)
            jobs.append(job)
            waiting.setdefault(job.key, set()).update(members)
        for key, indices in chosen.items():
            current = groups.get(key)
            if not indices or not current:
                continue
            done = [s for s in current if s not in waiting.get(key, ())]
            if done:
                jobs.append(_Job(key, done, [offset + i for i in indices], blobs[key]))
        self.jobs, self.job, self.member = jobs, 0, 0
        for session, mine in replies.items():
            shifted = [(offset + position, payload) for position, payload in mine]
            self.replies[session] = self.replies.get(session, []) + shifted


class ConnectionManager:
    """Registry of connected clients, fan-out of events to them, and the stats of both.

    A manager serves one bus (:meth:`bind`); give each bus its own (:func:`manager_for`).
    """

    def __init__(
        self,
        *,
        max_pending_bytes: int = DEFAULT_MAX_PENDING_BYTES,
        flush_bytes: int = 256 * 2**10,
        replay_chunk_bytes: int = DEFAULT_REPLAY_CHUNK_BYTES,
        replay_stall_timeout: float = DEFAULT_REPLAY_STALL_TIMEOUT,
        write_delay: float = 0.0,
        flush_slice: int = DEFAULT_FLUSH_SLICE,
    ) -> None:
        if not isinstance(max_pending_bytes, int) or max_pending_bytes < 1024:
            raise ValueError(f"max_pending_bytes must be an int >= 1024, not {max_pending_bytes!r}")
        if not isinstance(replay_chunk_bytes, int) or replay_chunk_bytes < 1024:
            raise ValueError(
                f"replay_chunk_bytes must be an int >= 1024, not {replay_chunk_bytes!r}"
            )
        if not isinstance(replay_stall_timeout, int | float) or replay_stall_timeout <= 0:
            raise ValueError(
                f"replay_stall_timeout must be a positive number, not {replay_stall_timeout!r}"
            )
        self.max_pending_bytes = max_pending_bytes
        self.flush_bytes = flush_bytes
        self.replay_chunk_bytes = replay_chunk_bytes
        self.replay_stall_timeout = float(replay_stall_timeout)
        self.write_delay = check_write_delay(write_delay)
        self.max_message_size: int | None = None
        self._bus: weakref.ref[Any] | None = None
        self._sessions: dict[int, Session] = {}
        self._groups: dict[GroupKey, set[Session]] = {}
        self._by_pattern: dict[str, set[GroupKey]] = {}
        self._candidates: dict[str, tuple[str, ...]] = {}
        self._pending: list[Event] = []
        self._pending_bytes = 0
        # Replies (acks, pongs, errors) queued with the pending batch: the batch position
        # each was sent at, and its JSON.
        self._replies: dict[Session, list[tuple[int, bytes]]] = {}
        self._flush_handle: asyncio.Handle | None = None
        self._work: _Flush | None = None  # a flush under way, written over several turns
        self.flush_slice = check_flush_slice(flush_slice)
        self._last_seq: dict[str | None, int] = {}
        self._attachments: set[str] = set()  # bus subscriptions that feed broadcast()
        self._ids = itertools.count(1)
        #: Generated client ids start with this (``client-w1`` in worker 1 of serve --workers).
        self.client_id_prefix = "client"
        self.total_connections = 0
        self.total_messages_sent = 0
        self.total_broadcasts = 0
        self.slow_consumers_closed = 0
        self.messages_dropped = 0
        self.rejected_connections = 0
        self.events_skipped = 0
        self.replays_active = 0
        self.replays_completed = 0
        self.replays_stalled = 0
        self.replayed_events = 0
        self.flush_turns = 0  # loop turns that wrote a slice of a flush
        self.flushes_joined = 0  # batches that joined a flush under way
        self.flushes_finished_early = 0  # flushes grown past flush_bytes, finished at once

    # The bus

    @property
    def bus(self) -> Any:
        """The bus whose events this manager fans out (None until bound)."""
        return self._bus() if self._bus is not None else None

    def bind(self, bus: Any) -> None:
        """Serve ``bus``.

        Raises ValueError while this manager serves another bus (it has clients or
        a bus subscription there); once both are gone it may move to a new bus.
        """
        current = self.bus
        if current is bus:
            return
        if current is not None and (self._sessions or self._attachments):
            raise ValueError(
                f"this connection manager already serves {current!r}; a manager serves one "
                "bus: pass manager_for(bus) or a new ConnectionManager()"
            )
        self._bus = weakref.ref(bus)
        self._last_seq.clear()

    def attach(self, bus: Any, event_type: str = "*", filter_fn: Any = None) -> str:
        """Broadcast ``bus`` events of ``event_type`` to clients; returns the subscription id."""
        self.bind(bus)
        sub_id = str(
            bus.subscribe(event_type, self.broadcast, filter_fn, name="websocket-broadcast")
        )
        self._attachments.add(sub_id)
        return sub_id

    def detach(self, sub_id: str) -> bool:
        """Undo :meth:`attach`; returns False if ``sub_id`` is not one of this manager's."""
        if sub_id not in self._attachments:
            return False
        self._attachments.discard(sub_id)
        bus = self.bus
        return bool(bus is not None and bus.unsubscribe(sub_id))

    # Registry

    def connect(
        self,
        connection: ServerConnection,
        client_id: str,
        scope: Scope = EVERYTHING,
        *,
        live: bool = True,
    ) -> Session:
        """Register a connected client.

        With ``live=True`` it receives broadcasts from the next flush on; with
        ``live=False`` only once :meth:`join` (or a :meth:`replay` that joins) makes it live.
        ``scope`` bounds what it can ever receive, whatever filters it sets.
        """
        session = Session(connection, client_id)
        session.scope = scope
        self._sessions[id(connection)] = session
        self.total_connections += 1
        if live:
            self.join(session)
        return session

    def join(self, session: Session) -> None:
        """Make a registered client live: it receives what is broadcast from now on."""
        self.flush()  # what was published before it joined is not its business
        if session.live or id(session.connection) not in self._sessions:
            return
        session.live = True
        bus = self.bus
        session.joined_seq = bus.last_seq if bus is not None else 0
        self._join_group(session)

    def disconnect(self, session: Session) -> None:
        """Forget a client (idempotent)."""
        if self._sessions.pop(id(session.connection), None) is None:
            return
        if session.live:
            self._leave_group(session)
        session.live = False

    def _join_group(self, session: Session) -> None:
        key = (session.filters, session.scope)
        members = self._groups.get(key)
        if members is None:
            members = self._groups[key] = set()
            for pattern in session.filters.event_types:
                self._by_pattern.setdefault(pattern, set()).add(key)
        members.add(session)

    def _leave_group(self, session: Session) -> None:
        key = (session.filters, session.scope)
        members = self._groups.get(key)
        if members is None:
            return
        members.discard(session)
        if members:
            return
        del self._groups[key]
        for pattern in key[0].event_types:
            keys = self._by_pattern.get(pattern)
            if keys is not None:
                keys.discard(key)
                if not keys:
                    del self._by_pattern[pattern]

    def set_filters(self, session: Session, filters: Filters) -> None:
        """Change what a client receives from the next flush on."""
        self._regroup(session, filters, session.scope)

    def set_scope(self, session: Session, scope: Scope) -> None:
        """Change what a client may receive (a refreshed token) from the next flush on."""
        self._regroup(session, session.filters, scope)

    def _regroup(self, session: Session, filters: Filters, scope: Scope) -> None:
        self.flush()
        if session.live:
            self._leave_group(session)
            session.filters, session.scope = filters, scope
            self._join_group(session)
        else:
            session.filters, session.scope = filters, scope

    def new_client_id(self) -> str:
        """Return a client id for a client that did not give one."""
        return f"{self.client_id_prefix}-{next(self._ids)}-{protocol.new_event_id()[4:12]}"

    @property
    def sessions(self) -> list[Session]:
        """The connected clients."""
        return list(self._sessions.values())

    @property
    def active_connections(self) -> int:
        """How many clients are connected now."""
        return len(self._sessions)

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
        if not self._groups:
            return
        payload = self._payload(event)  # None (skipped, counted) if it cannot be encoded
        if payload is None:
            return
        self._pending.append(event)
        self._pending_bytes += len(payload)
        if self._pending_bytes >= self.flush_bytes:
            self.flush()
        elif self._flush_handle is None:
            try:
                self._schedule()
            except RuntimeError:  # no running loop: send now
                self.flush()

    def _payload(self, event: Event) -> bytes | None:
        """The event's JSON, or None (counted and logged) if it cannot be encoded."""
        try:
            return event.encoded()
        except Exception:
            self.events_skipped += 1
            logger.error("skipped event %s: it cannot be encoded", event.id, exc_info=True)
            return None

    def _frame(self, event: Event) -> bytes:
        """The event's server text frame, built once and cached on the event."""
        frame = event._frame
        if frame is None:
            frame = event._frame = text_frame(event.encoded())
        return frame

    def _matching_groups(self, event: Event) -> set[GroupKey]:
        candidates = self._candidates.get(event.type_name)
        if candidates is None:
            if len(self._candidates) >= 4096:
                self._candidates.clear()
            candidates = self._candidates[event.type_name] = tuple(
                protocol.matching_patterns(event.type_name)
            )
        found: set[GroupKey] = set()
        for pattern in candidates:
            keys = self._by_pattern.get(pattern)
            if keys:
                found.update(keys)
        return found

    def flush(self) -> None:
        """Send everything queued now: the flush under way and the pending batch."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if self._take_pending():
            self._write_some(None)

    def _flush_soon(self) -> None:
        """The loop's flush: up to ``flush_slice`` clients per turn, over as many turns as needed.

        Events broadcast meanwhile join the flush under way (unless there is a write delay):
        the clients it has not reached yet get them in the same write, the others in a
        write after it. So an event waits for the loop to reach each client, not for a
        whole flush to end before its own begins.
        """
        self._flush_handle = None
        if (self._work is None or not self.write_delay) and not self._take_pending():
            return
        self.flush_turns += 1
        self._write_some(self.flush_slice or None)
        if self._work is not None:
            self._flush_handle = asyncio.get_running_loop().call_soon(self._flush_soon)
        elif self._pending:
            self._schedule()

    def _schedule(self) -> None:
        loop = asyncio.get_running_loop()
        if self.write_delay:
            # Opt-in coalescing: what is published within the delay goes out as one
            # write per client, for up to write_delay more latency.
            self._flush_handle = loop.call_later(self.write_delay, self._flush_soon)
        else:
            self._flush_handle = loop.call_soon(self._flush_soon)

    def _take_pending(self) -> bool:
        """Make the pending batch part of the flush under way; False if there is nothing to do."""
        batch = self._pending
        if not batch and not self._replies:
            return self._work is not None
        self._pending = []
        self._pending_bytes = 0
        frames = [self._frame(event) for event in batch]
        replies, self._replies = self._replies, {}
        chosen: dict[GroupKey, Sequence[int]]
        if not batch:
            chosen = {}
        elif len(self._groups) == 1 and (ALL, EVERYTHING) in self._groups:
            chosen = {(ALL, EVERYTHING): range(len(batch))}  # everyone wants everything
        else:
            # Only the groups whose patterns match an event are looked at, so the cost
            # grows with the matches, not with the number of distinct filters.
            picked: dict[GroupKey, list[int]] = {}
            for index, event in enumerate(batch):
                for key in self._matching_groups(event):
                    filters, scope = key
                    if filters_match(filters, event) and (
                        scope.unrestricted or scope.allows(event)
                    ):
                        picked.setdefault(key, []).append(index)
            chosen = picked  # type: ignore[assignment]
        blobs: dict[GroupKey, bytes] = {}
        for key, indices in chosen.items():
            if len(indices) == 1:
                blobs[key] = frames[indices[0]]
            elif len(indices) == len(frames):
                blobs[key] = b"".join(frames)
            else:
                blobs[key] = b"".join(frames[i] for i in indices)
        work = self._work
        if work is not None and work.size + sum(map(len, frames)) > self.flush_bytes:
            # A stream that never lets a flush end would grow it without bound: past
            # flush_bytes, the flush under way is finished now and the batch starts anew.
            self._write_some(None)
            self.flushes_finished_early += 1
            work = None
        if work is None:
            jobs = [
                _Job(key, list(members), indices, blobs[key])
                for key, indices in chosen.items()
                if indices and (members := self._groups.get(key))
            ]
            self._work = _Flush(batch, frames, jobs, replies)
            return True
        work.merge(batch, frames, chosen, blobs, replies, self._groups)
        self.flushes_joined += 1
        return True

    def _write_some(self, budget: int | None) -> None:
        """Write the flush under way to up to ``budget`` clients (all if None)."""
        work = self._work
        assert work is not None
        batch, frames, replies, jobs = work.batch, work.frames, work.replies, work.jobs
        while work.job < len(jobs):
            job = jobs[work.job]
            members, indices, blob = job.members, job.indices, job.blob
            start = work.member
            stop = len(members) if budget is None else min(len(members), start + budget)
            count = len(indices)
            for session in members[start:stop]:
                mine = replies.pop(session, None) if replies else None
                if mine is not None:
                    self._write_merged(session, batch, frames, indices, mine)
                elif session.raw:
                    self._write(session, blob, count)
                else:
                    self._write_messages(session, [batch[i].encoded() for i in indices])
            if budget is not None:
                budget -= stop - start
            if stop < len(members):
                work.member = stop
                return
            work.job += 1
            work.member = 0
            if budget is not None and budget <= 0 and work.job < len(jobs):
                return
        self._work = None
        for session, mine in replies.items():  # replies to clients no event was for
            self._write_merged(session, batch, frames, (), mine)

    def _write_merged(
        self,
        session: Session,
        batch: list[Event],
        frames: list[bytes],
        indices: Sequence[int],
        replies: list[tuple[int, bytes]],
    ) -> None:
        """Write a client's events of this batch with its replies where they were sent."""
        payloads: list[bytes] = []
        raw: list[bytes] = []
        queue = iter(replies)
        reply = next(queue, None)
        for index in indices:
            # A reply queued when `position` events were pending goes before event `position`.
            while reply is not None and reply[0] <= index:
                payloads.append(reply[1])
                raw.append(text_frame(reply[1]))
                reply = next(queue, None)
            payloads.append(batch[index].encoded())
            raw.append(frames[index])
        while reply is not None:
            payloads.append(reply[1])
            raw.append(text_frame(reply[1]))
            reply = next(queue, None)
        if session.raw:
            self._write(session, b"".join(raw), len(raw))
        else:
            self._write_messages(session, payloads)

    def _writable(self, session: Session, count: int) -> bool:
        """True if the client is open and under its pending cap (else it is evicted)."""
        connection = session.connection
        if session.closing or connection.protocol.state is not State.OPEN:
            return False
        pending = session.transport.get_write_buffer_size() + session.deferred_bytes
        if pending > self.max_pending_bytes:
            self._evict(session, count)
            return False
        return True

    def _write(self, session: Session, blob: bytes, count: int) -> bool:
        """Write prebuilt frames to a client; False if it is gone or was evicted."""
        connection = session.connection
        if session.closing or connection.protocol.state is not State.OPEN:
            return False
        transport = session.transport
        if transport.get_write_buffer_size() + session.deferred_bytes > self.max_pending_bytes:
            self._evict(session, count)
            return False
        if session.deferred or connection.send_in_progress is not None:
            self._hold(session, blob, len(blob), count)
            return True
        transport.write(blob)
        session.messages_sent += count
        self.total_messages_sent += count
        return True

    def _write_messages(self, session: Session, payloads: list[bytes]) -> bool:
        """Send messages through websockets' framing (compression); False if not sent."""
        count = len(payloads)
        if not self._writable(session, count):
            return False
        connection = session.connection
        if session.deferred or connection.send_in_progress is not None:
            self._hold(session, payloads, sum(map(len, payloads)), count)
            return True
        try:
            for payload in payloads:
                connection.protocol.send_text(payload)
            connection.send_data()
        except Exception:
            logger.warning("could not write to %s", session.client_id, exc_info=True)
            return False
        session.messages_sent += count
        self.total_messages_sent += count
        return True

    def _hold(self, session: Session, item: Any, size: int, count: int) -> None:
        """Hold frames while websockets sends a fragmented message.

        Frames written now would cut into that message, so they wait for it (and
        count towards the client's pending bytes meanwhile).
        """
        in_progress = session.connection.send_in_progress
        if not session.deferred and in_progress is not None:
            in_progress.add_done_callback(lambda _: self._write_deferred(session))
        session.deferred.append((item, count))
        session.deferred_bytes += size

    def _write_deferred(self, session: Session) -> None:
        in_progress = session.connection.send_in_progress
        if in_progress is not None:
            in_progress.add_done_callback(lambda _: self._write_deferred(session))
            return
        deferred, session.deferred, session.deferred_bytes = session.deferred, [], 0
        for item, count in deferred:
            if session.raw:
                self._write(session, item, count)
            else:
                self._write_messages(session, item)

    def send(self, session: Session, message: dict[str, Any]) -> bool:
        """Send one control message (ack, pong, error) to a client, in order with events.

        Returns False if the client is gone or was closed as a slow consumer.
        """
        payload = protocol.encode(message)
        if session.live and (self._pending or self._work is not None):
            # Events wait for the next flush (or a flush is under way): the reply goes out
            # with them, after those queued before it, so a burst of requests costs one
            # write per client, and a reply does not make a sliced flush finish at once.
            self._replies.setdefault(session, []).append((len(self._pending), payload))
            self._pending_bytes += len(payload)
            if self._flush_handle is None:
                self._schedule()
            return not session.closing
        self.flush()
        if session.raw:
            return self._write(session, text_frame(payload), 1)
        return self._write_messages(session, [payload])

    def _send_events(self, session: Session, events: list[Event]) -> bool:
        if session.raw:
            frames = [self._frame(e) for e in events]
            return self._write(session, b"".join(frames), len(frames))
        return self._write_messages(session, [e.encoded() for e in events])

    async def replay(
        self,
        session: Session,
        since_seq: int,
        *,
        epoch: str | None = None,
        upto: int | None = None,
        join: bool = False,
    ) -> tuple[int, bool]:
        """Stream the bus's events after ``since_seq`` to one client; return (sent, gap).

        Only events the client's filters and scope let through are sent, at most
        ``replay_chunk_bytes`` at a time, each chunk once the socket has drained.
        ``upto`` stops at that seq; ``join=True`` goes on until the client has
        caught up and then makes it live, with no event missed or sent twice.
        ``gap`` is True if events it asked for are no longer in history (or
        ``epoch`` names another run of the numbering: then the whole history of
        this run is replayed).
        """
        bus = self.bus
        if bus is None:
            raise RuntimeError("this connection manager serves no bus: bind() it first")
        self.flush()
        gap = epoch is not None and epoch != bus.epoch
        next_seq = 1 if gap else since_seq + 1
        sent = 0
        self.replays_active += 1
        try:
            while not session.closing:
                oldest = bus.oldest_seq
                if next_seq < oldest:  # no longer in history (or trimmed while replaying)
                    gap = True
                    next_seq = oldest
                chunk = bus.since(next_seq - 1, limit=_REPLAY_READ)
                if upto is not None:
                    chunk = [e for e in chunk if e.seq is not None and e.seq <= upto]
                if not chunk:
                    if join:
                        self.join(session)  # no await since since(): nothing slipped in
                    break
                wanted: list[Event] = []
                size = 0
                for event in chunk:
                    assert event.seq is not None
                    next_seq = event.seq + 1
                    if not session.scope.allows(event) or not filters_match(session.filters, event):
                        continue
                    payload = self._payload(event)
                    if payload is None:
                        continue
                    wanted.append(event)
                    size += len(payload)
                    if size >= self.replay_chunk_bytes:
                        break
                if wanted:
                    if not self._send_events(session, wanted):
                        break
                    sent += len(wanted)
                    self.replayed_events += len(wanted)
                    if not await self._drain(session):
                        break
                else:
                    await asyncio.sleep(0)  # a long filtered-out stretch still yields
        finally:
            self.replays_active -= 1
        if not session.closing:
            self.replays_completed += 1
        return sent, gap

    async def _drain(self, session: Session) -> bool:
        """Wait until the client's socket takes what was written; False if it never does."""
        connection = session.connection
        try:
            await asyncio.wait_for(connection.drain(), self.replay_stall_timeout)
        except TimeoutError:
            self.replays_stalled += 1
            logger.warning(
                "replay to %s made no progress in %gs", session.client_id, self.replay_stall_timeout
            )
            if not session.closing:
                self._evict(session, 0)
            return False
        except Exception:  # the connection was lost while paused
            return False
        if connection.transport.is_closing():
            await asyncio.sleep(0)
        return not session.closing

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
            "events_skipped": self.events_skipped,
            "rejected_connections": self.rejected_connections,
            "filter_groups": len(self._groups),
            "replays_active": self.replays_active,
            "replays_completed": self.replays_completed,
            "replays_stalled": self.replays_stalled,
            "replayed_events": self.replayed_events,
            "max_pending_bytes": self.max_pending_bytes,
            "max_message_size": self.max_message_size,
            "replay_chunk_bytes": self.replay_chunk_bytes,
            "write_delay": self.write_delay,
            "flush_slice": self.flush_slice,
            "flush_turns": self.flush_turns,
            "flushes_joined": self.flushes_joined,
            "flushes_finished_early": self.flushes_finished_early,
        }

    def __repr__(self) -> str:
        return (
            f"<ConnectionManager active={len(self._sessions)} "
            f"broadcasts={self.total_broadcasts} sent={self.total_messages_sent}>"
        )


#: How many events a replay reads from history at a time (before filtering).
_REPLAY_READ = 512
# bus -> its manager; the manager holds its bus weakly, so this never keeps a bus alive.
_managers: weakref.WeakKeyDictionary[Any, ConnectionManager] = weakref.WeakKeyDictionary()


def manager_for(bus: Any) -> ConnectionManager:
    """Return the process-wide connection manager of ``bus`` (created on first use)."""
    manager = _managers.get(bus)
    if manager is None:
        manager = _managers[bus] = ConnectionManager()
        manager.bind(bus)
    return manager


def get_connection_manager() -> ConnectionManager:
    """Return the process-wide connection manager of the default bus (the guide's)."""
    return manager_for(event_bus)
