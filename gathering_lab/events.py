"""Events and the in-process event bus (API compatible with GatheRing's ``gathering.events``).

::

    from gathering_lab.events import event_bus, Event, EventType

    await event_bus.publish(Event(type=EventType.AGENT_STARTED, data={"agent_id": 1}))

The bus numbers every published event with a monotonically increasing ``seq``
and keeps the most recent ones in a bounded history, so a client that lost its
connection can ask for what it missed (:meth:`EventBus.since`). ``epoch`` names
one run of that numbering: it changes whenever the history restarts.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import secrets
import threading
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from . import protocol
from .exceptions import ProtocolError

__all__ = ["DEFAULT_HISTORY_BYTES", "Event", "EventBus", "EventHandler", "EventType", "event_bus"]

logger = logging.getLogger("gathering_lab.events")


class EventType(str, Enum):
    """The event types GatheRing components publish; any dotted lowercase string is allowed too."""

    AGENT_STARTED = "agent.started"
    AGENT_STOPPED = "agent.stopped"
    AGENT_TASK_ASSIGNED = "agent.task.assigned"
    AGENT_TASK_COMPLETED = "agent.task.completed"
    AGENT_TASK_FAILED = "agent.task.failed"
    AGENT_TOOL_EXECUTED = "agent.tool.executed"
    MEMORY_CREATED = "memory.created"
    MEMORY_SHARED = "memory.shared"
    MEMORY_RECALLED = "memory.recalled"
    CIRCLE_CREATED = "circle.created"
    CIRCLE_STARTED = "circle.started"
    CIRCLE_STOPPED = "circle.stopped"
    CIRCLE_MEMBER_ADDED = "circle.member.added"
    CIRCLE_MEMBER_REMOVED = "circle.member.removed"
    TASK_CREATED = "task.created"
    TASK_ASSIGNED = "task.assigned"
    TASK_STARTED = "task.started"
    TASK_COMPLETED = "task.completed"
    TASK_FAILED = "task.failed"
    TASK_CONFLICT_DETECTED = "task.conflict.detected"
    CONVERSATION_MESSAGE = "conversation.message"
    CONVERSATION_TURN_COMPLETE = "conversation.turn.complete"
    SYSTEM_ERROR = "system.error"
    SYSTEM_WARNING = "system.warning"

    def __str__(self) -> str:
        return self.value


_KNOWN_TYPES = {member.value: member for member in EventType}
_ID_FIELDS = frozenset({"circle_id", "project_id", "source_agent_id"})


def _coerce_type(value: EventType | str) -> EventType | str:
    if isinstance(value, EventType):
        return value
    known = _KNOWN_TYPES.get(value) if isinstance(value, str) else None
    if known is not None:
        return known
    try:
        return protocol.check_event_type(value)
    except ProtocolError as exc:
        raise ValueError(exc.message) from None


@dataclass(slots=True, eq=False)
class Event:
    """One event: what happened (``type``, ``data``), who and where, when, and its bus ``seq``."""

    type: EventType | str
    data: dict[str, Any] = field(default_factory=dict)
    source_agent_id: Any = None
    circle_id: Any = None
    project_id: Any = None
    timestamp: datetime = field(default_factory=protocol.now)
    id: str = field(default_factory=protocol.new_event_id)
    seq: int | None = None
    epoch: str | None = None
    _wire: bytes | None = field(default=None, repr=False)
    #: The WebSocket text frame around ``_wire``, built and cached by the connection manager.
    _frame: bytes | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self.type = _coerce_type(self.type)
        if self.data is None:
            self.data = {}
        elif not isinstance(self.data, dict):
            raise TypeError(f"event data must be a dict, not {type(self.data).__name__}")
        if not isinstance(self.timestamp, datetime) or self.timestamp.tzinfo is None:
            raise ValueError(f"timestamp must be a timezone-aware datetime: {self.timestamp!r}")

    @property
    def type_name(self) -> str:
        """The event type as a plain string (``"agent.started"``)."""
        kind = self.type
        # _value_ is what .value returns, without the enum property's lookup (hot path).
        return kind._value_ if kind.__class__ is EventType else kind

    def matches_filter(self, **attrs: Any) -> bool:
        """Return True if every given attribute equals the event's (``circle_id=1``).

        Ids (``circle_id``, ``project_id``, ``source_agent_id``) compare by
        :func:`~gathering_lab.protocol.same_id`, the rule filters and scopes use.
        """
        for name, expected in attrs.items():
            if name == "type":
                expected = getattr(expected, "value", expected)
                if self.type_name != expected:
                    return False
            elif name in _ID_FIELDS:
                if expected is None:
                    if getattr(self, name) is not None:
                        return False
                elif not protocol.same_id(expected, getattr(self, name)):
                    return False
            elif getattr(self, name, None) != expected:
                return False
        return True

    def to_dict(self) -> dict[str, Any]:
        """Return the wire envelope: the guide's keys, then ``seq`` and ``epoch``."""
        return {
            "type": self.type_name,
            "data": self.data,
            "source_agent_id": self.source_agent_id,
            "circle_id": self.circle_id,
            "project_id": self.project_id,
            "event_id": self.id,
            "timestamp": protocol.format_timestamp(self.timestamp),
            "seq": self.seq,
            "epoch": self.epoch,
        }

    def encoded(self) -> bytes:
        """Return the envelope as strict UTF-8 JSON, serialised once and cached.

        Raises ValueError if it cannot be strict JSON (NaN, a lone surrogate, data
        nested deeper than :data:`~gathering_lab.protocol.MAX_DEPTH`): the bus refuses
        such an event before numbering it, so every event in a history encodes.
        """
        wire = self._wire
        if wire is None:
            try:
                wire = self._wire = protocol.encode(self.to_dict())
            except ValueError as exc:
                raise ValueError(f"event {self.type_name} cannot be sent: {exc}") from None
        return wire

    @classmethod
    def from_dict(cls, message: dict[str, Any]) -> Event:
        """Build an event from a wire envelope (the inverse of :meth:`to_dict`)."""
        if not isinstance(message, dict):
            raise TypeError(f"expected a dict, not {type(message).__name__}")
        kwargs: dict[str, Any] = {
            "type": message.get("type"),
            "data": message.get("data") or {},
            "source_agent_id": message.get("source_agent_id"),
            "circle_id": message.get("circle_id"),
            "project_id": message.get("project_id"),
            "seq": message.get("seq"),
            "epoch": message.get("epoch"),
        }
        if message.get("event_id"):
            kwargs["id"] = message["event_id"]
        if message.get("timestamp"):
            kwargs["timestamp"] = protocol.parse_timestamp(message["timestamp"])
        return cls(**kwargs)


EventHandler = Callable[[Event], Awaitable[None] | None]


@dataclass(slots=True)
class _Subscription:
    id: str
    pattern: str
    handler: EventHandler
    filter_fn: Callable[[Event], bool] | None
    name: str


_YIELD_EVERY = 256
#: Default bound on the encoded bytes a bus keeps in history (``history_bytes``).
DEFAULT_HISTORY_BYTES = 64 * 2**20
#: Distinct event types whose routes are cached; past it the cache starts over.
_MAX_ROUTES = 4096


def _new_epoch() -> str:
    return secrets.token_hex(6)


def _check_positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value!r}")


class EventBus:
    """An in-process publish/subscribe bus with pattern subscriptions and a numbered history.

    Handlers may be plain functions or coroutine functions. A failing handler is
    logged and counted in ``handler_errors``; it never stops the others.

    Every event is encoded (strict JSON) once, when it is published and before it is
    numbered: one that cannot be is refused with ValueError and counted in
    ``events_rejected``, so whatever is in history can always be sent and replayed.

    The history keeps at most ``history_size`` events and ``history_bytes`` bytes of
    their encoded JSON, dropping the oldest first (counted in ``history_evicted``; a
    resume from before the oldest kept event reports a gap). The default of 64 MiB
    holds the default 10,000 events at up to 6.5 KiB each, and at least 64 events at
    the server's largest message (1 MiB); what it costs in memory is about twice that
    (the events' Python objects besides their JSON), so a stream of large events cannot
    grow the process by gigabytes. An event larger than ``history_bytes`` is delivered
    live but not kept.

    Publishing happens on the bus's home loop. Reading and subscribing
    (:meth:`get_history`, :meth:`since`, :meth:`subscribe`, :meth:`unsubscribe`,
    :meth:`get_stats`) are safe from any thread: they hold a lock for as long as a copy.
    """

    def __init__(
        self, history_size: int = 10_000, history_bytes: int = DEFAULT_HISTORY_BYTES
    ) -> None:
        _check_positive("history_size", history_size)
        _check_positive("history_bytes", history_bytes)
        self._lock = threading.Lock()
        self._subs: dict[str, _Subscription] = {}
        self._routes: dict[str, tuple[_Subscription, ...]] = {}
        self._history: deque[Event] = deque()
        self._history_size = history_size
        self._history_bytes_cap = history_bytes
        self._history_bytes = 0
        self._evicted = 0
        self._rejected = 0
        self._ids = itertools.count(1)
        self._seq = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self.epoch = _new_epoch()
        self._published = 0
        self._delivered = 0
        self._errors = 0

    # Subscriptions

    def subscribe(
        self,
        event_type: EventType | str,
        handler: EventHandler,
        filter_fn: Callable[[Event], bool] | None = None,
        name: str | None = None,
    ) -> str:
        """Call ``handler`` for each event matching ``event_type`` (or ``"*"``, ``"task.*"``).

        Returns the subscription id for :meth:`unsubscribe`.
        """
        try:
            pattern = protocol.check_pattern(event_type)
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        if not callable(handler):
            raise TypeError(f"handler must be callable, not {type(handler).__name__}")
        if filter_fn is not None and not callable(filter_fn):
            raise TypeError(f"filter_fn must be callable, not {type(filter_fn).__name__}")
        with self._lock:
            sub_id = f"sub_{next(self._ids)}"
            self._subs[sub_id] = _Subscription(
                id=sub_id,
                pattern=pattern,
                handler=handler,
                filter_fn=filter_fn,
                name=name or str(getattr(handler, "__qualname__", None) or repr(handler)),
            )
            self._routes = {}
        return sub_id

    def unsubscribe(self, sub_id: str) -> bool:
        """Remove a subscription; return False if there was none with that id."""
        with self._lock:
            removed = self._subs.pop(sub_id, None) is not None
            if removed:
                self._routes = {}
        return removed

    def _route(self, type_name: str) -> tuple[_Subscription, ...]:
        routes = self._routes  # replaced, never mutated, by (un)subscribe in other threads
        subs = routes.get(type_name)
        if subs is None:
            with self._lock:
                wanted = set(protocol.matching_patterns(type_name))
                subs = tuple(s for s in self._subs.values() if s.pattern in wanted)
                routes = self._routes
                if len(routes) >= _MAX_ROUTES:
                    routes = self._routes = {}
                routes[type_name] = subs
        return subs

    # Publishing

    def _record(self, event: Event) -> tuple[_Subscription, ...]:
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, not {type(event).__name__}")
        if event.seq is not None:
            raise ValueError(
                f"event {event.id} was already published (seq {event.seq}); publish a new Event"
            )
        # Encode the envelope as it will be sent, before it is numbered for good.
        event.seq = self._seq + 1
        event.epoch = self.epoch
        event._wire = event._frame = None
        try:
            size = len(event.encoded())
        except ValueError as exc:
            event.seq = event.epoch = None
            self._rejected += 1
            logger.warning("refused to publish %s: %s", event.id, exc)
            raise
        history = self._history
        with self._lock:
            self._seq = event.seq
            history.append(event)
            self._history_bytes += size
            if len(history) > self._history_size or self._history_bytes > self._history_bytes_cap:
                self._evict()
        self._published += 1
        return self._route(event.type_name)

    def _evict(self) -> None:
        """Drop the oldest events until history fits both bounds (with the lock held)."""
        history = self._history
        while history and (
            len(history) > self._history_size or self._history_bytes > self._history_bytes_cap
        ):
            old = history.popleft()
            self._history_bytes -= len(old._wire or b"")
            self._evicted += 1

    def _run_sync(self, sub: _Subscription, event: Event) -> Awaitable[None] | None:
        try:
            if sub.filter_fn is not None and not sub.filter_fn(event):
                return None
            result = sub.handler(event)
        except Exception:
            self._errors += 1
            logger.exception("event handler %s failed on %s", sub.name, event.type_name)
            return None
        if result is not None and inspect.isawaitable(result):
            return result
        self._delivered += 1
        return None

    async def _run_async(
        self, sub: _Subscription, awaitable: Awaitable[None], event: Event
    ) -> None:
        try:
            await awaitable
        except Exception:
            self._errors += 1
            logger.exception("event handler %s failed on %s", sub.name, event.type_name)
        else:
            self._delivered += 1

    def bind_loop(self, loop: asyncio.AbstractEventLoop, thread_id: int | None = None) -> None:
        """Make ``loop`` (running in thread ``thread_id``) the bus's home.

        Publishing from another thread or loop then hands the event to the home
        loop, so handlers always run there and ``seq`` order is delivery order.
        A bus binds itself to the first loop it publishes on.
        """
        self._loop = loop
        self._loop_thread = threading.get_ident() if thread_id is None else thread_id

    def _foreign_home(self) -> asyncio.AbstractEventLoop | None:
        """The home loop if it runs elsewhere and is alive, else None (and rebind here)."""
        home = self._loop
        if home is not None and threading.get_ident() != self._loop_thread:
            if home.is_running() and not home.is_closed():
                return home
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            return None
        if here is not home:
            self.bind_loop(here)
        return None

    async def publish(self, event: Event) -> Event:
        """Publish ``event`` to every matching handler and wait for the async ones to finish."""
        home = self._foreign_home()
        if home is not None:
            future = asyncio.run_coroutine_threadsafe(self.publish(event), home)
            return await asyncio.wrap_future(future)
        pending = []
        for sub in self._record(event):
            awaitable = self._run_sync(sub, event)
            if awaitable is not None:
                pending.append(self._run_async(sub, awaitable, event))
        if len(pending) == 1:
            await pending[0]
        elif pending:
            await asyncio.gather(*pending)
        elif self._seq % _YIELD_EVERY == 0:
            # A tight publishing loop whose handlers are all sync would never let
            # the loop run: give sockets a chance to drain now and then.
            await asyncio.sleep(0)
        return event

    def publish_nowait(self, event: Event) -> Event:
        """Publish ``event`` without waiting: sync handlers run now, async ones are scheduled.

        Safe to call from another thread: the event is then handed to the bus's loop.
        """
        home = self._foreign_home()
        if home is not None:
            if not isinstance(event, Event):
                raise TypeError(f"expected an Event, not {type(event).__name__}")
            # Refuse what cannot be sent here, in the caller's thread (the home loop
            # encodes again, with the event's seq).
            try:
                protocol.encode(event.to_dict())
            except ValueError as exc:
                with self._lock:
                    self._rejected += 1
                raise ValueError(f"event {event.type_name} cannot be sent: {exc}") from None
            home.call_soon_threadsafe(self._publish_here, event)
            return event
        return self._publish_here(event)

    def _publish_here(self, event: Event) -> Event:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        for sub in self._record(event):
            awaitable = self._run_sync(sub, event)
            if awaitable is None:
                continue
            if loop is None:
                self._errors += 1
                close = getattr(awaitable, "close", None)
                if close is not None:
                    close()
                logger.error(
                    "async handler %s skipped for %s: no running event loop",
                    sub.name,
                    event.type_name,
                )
                continue
            task = loop.create_task(self._run_async(sub, awaitable, event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return event

    # History

    def get_history(
        self, event_type: EventType | str | None = None, limit: int = 100, **filters: Any
    ) -> list[Event]:
        """Return up to ``limit`` recent events, most recent first, matching type and filters."""
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"limit must be a non-negative integer, not {limit!r}")
        wanted: set[str] | None = None
        if event_type is not None:
            try:
                pattern = protocol.check_pattern(event_type)
            except ProtocolError as exc:
                raise ValueError(exc.message) from None
            if pattern != "*":
                wanted = {pattern}
        with self._lock:
            snapshot = list(self._history)
        found: list[Event] = []
        for event in reversed(snapshot):
            if len(found) >= limit:
                break
            if wanted is not None and not protocol.type_matches(wanted, event.type_name):
                continue
            if filters and not event.matches_filter(**filters):
                continue
            found.append(event)
        return found

    @property
    def health(self) -> str:
        """``ok``: an in-process bus is always reachable (one on a shared log may be degraded)."""
        return "ok"

    async def catch_up(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until this bus has delivered ``seq`` (in-process it already has); True when so."""
        return True

    @property
    def last_seq(self) -> int:
        """The ``seq`` of the most recently published event (0 before the first)."""
        return self._seq

    @property
    def oldest_seq(self) -> int:
        """The ``seq`` of the oldest event still in history (``last_seq + 1`` if it is empty)."""
        with self._lock:
            return self._oldest_seq()

    def _oldest_seq(self) -> int:
        history = self._history
        return history[0].seq if history else self._seq + 1  # type: ignore[return-value]

    def since(self, seq: int, limit: int | None = None) -> list[Event]:
        """Return the events after ``seq`` still in history, oldest first (at most ``limit``)."""
        if not isinstance(seq, int) or seq < 0:
            raise ValueError(f"seq must be a non-negative integer, not {seq!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 0):
            raise ValueError(f"limit must be a non-negative integer or None, not {limit!r}")
        with self._lock:
            start = max(0, seq + 1 - self._oldest_seq())
            if start >= len(self._history):
                return []
            stop = None if limit is None else start + limit
            if start == 0 and stop is None:
                return list(self._history)
            return list(itertools.islice(self._history, start, stop))

    # Administration

    def get_stats(self) -> dict[str, Any]:
        """Return counters: events_published, events_rejected, history_bytes, and so on."""
        with self._lock:
            return {
                "events_published": self._published,
                "events_delivered": self._delivered,
                "events_rejected": self._rejected,
                "handler_errors": self._errors,
                "active_subscribers": len(self._subs),
                "history_size": len(self._history),
                "history_capacity": self._history_size,
                "history_bytes": self._history_bytes,
                "history_bytes_capacity": self._history_bytes_cap,
                "history_evicted": self._evicted,
                "last_seq": self._seq,
                "epoch": self.epoch,
            }

    def configure(
        self, *, history_size: int | None = None, history_bytes: int | None = None
    ) -> None:
        """Change settings; a smaller history keeps the most recent events that fit."""
        if history_size is not None:
            _check_positive("history_size", history_size)
        if history_bytes is not None:
            _check_positive("history_bytes", history_bytes)
        with self._lock:
            if history_size is not None:
                self._history_size = history_size
            if history_bytes is not None:
                self._history_bytes_cap = history_bytes
            self._evict()

    def clear_history(self) -> None:
        """Forget past events; ``seq`` keeps counting, so resumes from before report a gap."""
        with self._lock:
            self._history.clear()
            self._history_bytes = 0

    def reset(self) -> None:
        """Drop every subscription, the history and the counters, and start a new epoch."""
        with self._lock:
            self._subs.clear()
            self._routes = {}
            self._history.clear()
            self._history_bytes = 0
            self._seq = 0
            self._published = self._delivered = self._errors = 0
            self._rejected = self._evicted = 0
            self.epoch = _new_epoch()

    def __repr__(self) -> str:
        return (
            f"<EventBus epoch={self.epoch} seq={self._seq} "
            f"subscribers={len(self._subs)} history={len(self._history)}>"
        )


#: The process-wide default bus, as in GatheRing.
event_bus = EventBus()
