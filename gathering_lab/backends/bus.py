"""A bus whose numbering and order come from a shared event log (:class:`LogBus`).

::

    bus = LogBus("redis://127.0.0.1:6379/0")
    await bus.start()                  # connect, preload history, follow the log
    await bus.publish(Event(type="agent.started", data={"agent_id": 1}))
    await bus.close()

Every node that opens the same log is one bus: :meth:`LogBus.publish` appends the
event's envelope to the log, which gives it the cluster-wide ``seq`` and the log's
``epoch``; one task per node follows the log and, for each entry, builds the event,
keeps it in the node's history ring and dispatches it to the node's handlers. So the
handlers of every node see every event of the cluster, in the log's order, with the
same ``seq``, ``epoch`` and ``event_id``; :meth:`~EventBus.since`,
:meth:`~EventBus.get_history` and the stats work from the local ring as on the
in-process bus (:class:`~gathering_lab.events.EventBus`, whose hot path is untouched).

Publishing is batched both ways. :meth:`LogBus.submit` queues an event; one task per node
appends everything queued meanwhile in one call (:meth:`EventLog.append_many`: one script
call on Redis, consecutive ``seq``, in the order submitted), so many publishes, from one
connection or many, are in flight at once. The tail delivers every entry of one read in
one loop turn, so the connection manager writes them to each client as one buffer, as it
does on the in-process bus. A node recognises its own entries by the token it appended them
with and delivers the :class:`Event` it already has (no decoding), then calls the
publisher back: so a publisher's answer always follows its own event.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import json
import logging
import random
import secrets
from collections.abc import Callable
from typing import Any

from .. import protocol
from ..events import DEFAULT_HISTORY_BYTES, Event, EventBus, event_bus
from ..exceptions import BackendUnavailable
from . import open_log
from .base import EventLog, Health, LogEntry

__all__ = ["BUS_ENV", "LogBus", "bus_for_url", "is_memory_url"]

logger = logging.getLogger("gathering_lab.backends.bus")

#: The environment variable ``gathering-lab serve`` reads its bus URL from (``--bus`` wins).
BUS_ENV = "GATHERING_LAB_BUS"
#: Entries read per round trip when the history is preloaded.
PRELOAD_CHUNK = 512
#: Seconds a publish waits for its own entry to come back through this node's tail.
DEFAULT_DELIVERY_TIMEOUT = 5.0
#: At most this many events (and about this many bytes) go to the log in one append call.
MAX_APPEND_BATCH = 512
MAX_APPEND_BATCH_BYTES = 4 * 2**20

#: Called once per submitted event: ``(event, None)`` once this node delivered it (or it
#: is in the log and was not delivered within the delivery timeout), ``(event, exc)`` if
#: it is not in the log (BackendUnavailable).
Done = Callable[[Event, BaseException | None], None]


@functools.lru_cache(maxsize=16)
def _json_string(text: str) -> bytes:
    return json.dumps(text).encode()


class _Pending:
    """One submitted event on its way to the log and back through this node's tail."""

    __slots__ = ("event", "payload", "token", "done", "seq")

    def __init__(self, event: Event, payload: bytes, token: bytes, done: Done) -> None:
        self.event = event
        self.payload = payload
        self.token = token
        self.done = done
        self.seq = 0  # the log's, once appended


def is_memory_url(url: str | None) -> bool:
    """Whether ``url`` names today's in-process bus (None, ``""``, ``memory://``)."""
    return url is None or url.strip().rstrip("/").lower() in ("", "memory:", "memory:/")


def bus_for_url(url: str | None, **options: Any) -> EventBus:
    """The bus a URL names: the process's default bus for ``memory://`` (or None),
    else an unstarted :class:`LogBus` on that log.

    The URL's query may set the log's and the bus's options
    (``redis://host:6379/0?maxlen=100000&delivery_timeout=5``, see
    :mod:`gathering_lab.backends.options`); ``options`` are keywords of :class:`LogBus`
    (and of the log) too, and must not contradict the URL.

    Raises ValueError for an unknown scheme or a bad option (one line naming it and its
    value), ImportError if redis-py is missing.
    """
    if is_memory_url(url):
        return event_bus
    assert url is not None
    if "://" in url and url.split("://", 1)[0].lower() in ("redis", "rediss"):
        from .options import split_url

        url, log_options, bus_options = split_url(url)
        for name, value in {**log_options, **bus_options}.items():
            if name in options and options[name] != value:
                raise ValueError(
                    f"bus url option {name}={value!r} contradicts {name}={options[name]!r}"
                )
        options = {**options, **log_options, **bus_options}
    elif "?" in url:
        raise ValueError(f"bus url {url!r} takes no options: only redis:// and rediss:// do")
    return LogBus(url, **options)


class LogBus(EventBus):
    """An :class:`~gathering_lab.events.EventBus` numbered and ordered by a shared log.

    ``log`` is an :class:`~gathering_lab.backends.EventLog` or a URL for
    :func:`~gathering_lab.backends.open_log` (``log_options`` then go to it).
    ``history_size`` and ``history_bytes`` bound the local ring, as on the in-process bus.
    Call :meth:`start` before publishing and :meth:`close` at the end.

    :meth:`publish` returns once the log took the event and this node's tail delivered it
    (at most ``delivery_timeout`` seconds later; past that it returns anyway, counted in
    ``delivery_timeouts``), so a publisher reads its own writes in history and clients
    get its acknowledgement after the event. It raises
    :class:`~gathering_lab.exceptions.BackendUnavailable` while the log cannot be reached.
    Concurrent publishes (and :meth:`submit`) go to the log together, in the order made.
    """

    def __init__(
        self,
        log: EventLog | str,
        *,
        history_size: int = 10_000,
        history_bytes: int = DEFAULT_HISTORY_BYTES,
        delivery_timeout: float = DEFAULT_DELIVERY_TIMEOUT,
        **log_options: Any,
    ) -> None:
        super().__init__(history_size, history_bytes)
        if isinstance(log, str):
            log = open_log(log, **log_options)
        elif log_options:
            raise TypeError("log options go with a URL, not with an opened log")
        if not isinstance(log, EventLog):
            raise TypeError(f"log must be an EventLog or a URL, not {type(log).__name__}")
        if (
            not isinstance(delivery_timeout, int | float)
            or isinstance(delivery_timeout, bool)
            or delivery_timeout <= 0
        ):
            raise ValueError(
                f"delivery_timeout must be a positive number of seconds, not {delivery_timeout!r}"
            )
        self.log = log
        self.delivery_timeout = float(delivery_timeout)
        self.epoch = ""  # the log's, once started
        self._follower: asyncio.Task[None] | None = None
        self._appender: asyncio.Task[None] | None = None
        self._closed = False
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        # Submitted, not yet sent to the log (in order); sent, not yet delivered (by token).
        self._queue: list[_Pending] = []
        self._queued = asyncio.Event()
        self._own: dict[bytes, _Pending] = {}
        # Sent batches whose events the tail must deliver by then (one timer for all).
        self._deadlines: collections.deque[tuple[float, list[_Pending]]] = collections.deque()
        self._sweeper: asyncio.TimerHandle | None = None
        self._token_prefix = secrets.token_hex(6).encode() + b":"
        self._tokens = itertools.count(1)
        self._received = 0
        self._appended = 0
        self._append_calls = 0
        self._append_batch_max = 0
        self._delivered_own = 0
        self._own_direct = 0
        self._unavailable = 0
        self._invalid = 0
        self._epoch_changes = 0
        self._tail_failures = 0
        self._delivery_timeouts = 0
        self._publish_failures = 0
        self._preloaded = 0

    # Life cycle

    @property
    def started(self) -> bool:
        """True between :meth:`start` and :meth:`close`."""
        return self._follower is not None and not self._closed

    async def start(self) -> LogBus:
        """Connect the log, preload the history ring from it and start following it.

        Raises BackendUnavailable if the log cannot be reached.
        """
        if self._follower is not None:
            return self
        if self._closed:
            raise RuntimeError("this bus was closed; make a new LogBus")
        loop = asyncio.get_running_loop()
        self.bind_loop(loop)
        await self.log.connect()
        try:
            after = await self._preload()
        except BaseException:
            await self.log.close()
            raise
        self._follower = loop.create_task(self._follow(after), name="gathering-lab log tail")
        self._appender = loop.create_task(self._append_loop(), name="gathering-lab log appender")
        logger.info(
            "bus on %s: epoch %s, last seq %d, %d events preloaded",
            getattr(self.log, "where", self.log.scheme + "://"),
            self.epoch,
            self._seq,
            self._preloaded,
        )
        return self

    async def _preload(self) -> int:
        """Fill the ring with the log's most recent events (in chunks); return the last seq."""
        info = await self.log.info()
        self.epoch = info.epoch
        after = max(0, info.oldest_seq - 1, info.last_seq - self._history_size)
        self._seq = after
        # Bounded: what is appended meanwhile beyond these chunks comes through the tail.
        for _ in range(self._history_size // PRELOAD_CHUNK + 4):
            chunk = await self.log.read(after, PRELOAD_CHUNK, self.epoch)
            if chunk.epoch != self.epoch:  # the log lost its data meanwhile
                with self._lock:
                    self._history.clear()
                    self._history_bytes = 0
                    self.epoch = chunk.epoch
            if not chunk.entries:
                break
            for entry in chunk.entries:
                event = self._decode(entry)
                if event is not None:
                    self._keep(event)
                    self._preloaded += 1
                after = entry.seq
            self._seq = after
        return after

    async def close(self) -> None:
        """Stop following the log and close it (idempotent).

        Events submitted but not yet sent to the log are answered BackendUnavailable.
        """
        self._closed = True
        for name in ("_appender", "_follower"):
            task = getattr(self, name)
            setattr(self, name, None)
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        self._deadlines.clear()
        queue, self._queue = self._queue, []
        closed = BackendUnavailable("the bus was closed before this event was sent to its log")
        for pending in queue:
            self._finish(pending, closed)
        self._settle_own(lambda pending: True)
        self._wake_all()
        await self.log.close()

    # Following the log

    async def _follow(self, after: int) -> None:
        """Deliver every entry of the log after ``after``; restart the tail if it fails."""
        delay = 0.05
        while not self._closed:
            try:
                # Entries come either through the iterator or, for the reads that follow
                # on (Redis with hiredis), straight to _deliver from the connection's
                # callback; either way every entry of one read is delivered in the same
                # loop turn (an async generator yields without a trip through the event
                # loop), so the connection manager sends them to each client in one write.
                delivered = self._received
                entries = self.log.tail(self._seq, self.epoch, deliver=self._deliver_entry)
                try:
                    async for entry in entries:
                        self._deliver(entry)
                finally:
                    aclose = getattr(entries, "aclose", None)
                    if aclose is not None:
                        await aclose()
                if self._closed:
                    return
                raise RuntimeError("the log's tail ended while the bus is open")
            except asyncio.CancelledError:
                raise
            except Exception:
                if self._received > delivered:  # it had worked since the last failure
                    delay = 0.05
                self._tail_failures += 1
                logger.exception(
                    "the bus's tail of its log failed after seq %d; following again in %.2fs",
                    self._seq,
                    delay,
                )
                await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                delay = min(delay * 2, 2.0)

    def _deliver_entry(self, entry: LogEntry) -> None:
        # Looks _deliver up at each call (tests hold a node's tail by replacing it).
        self._deliver(entry)

    def _deliver(self, entry: LogEntry, own: _Pending | None = None) -> None:
        """Keep one log entry in history, run the handlers it matches, answer its publisher.

        ``own`` is this node's submission the entry holds, if the caller already knows it.
        """
        if entry.epoch != self.epoch:
            self._new_epoch(entry)
        elif entry.seq <= self._seq:
            return  # already delivered (a tail that read again from before, or the appender)
        if own is None and self._own and entry.token:
            own = self._own.pop(entry.token, None)
        if own is not None:
            # This node's own event: no need to decode what it encoded.
            event: Event | None = own.event
            assert event is not None
            event.seq, event.epoch = entry.seq, entry.epoch
            event._wire = self._splice(entry)
            event._frame = None
            self._delivered_own += 1
        else:
            event = self._decode(entry)
        if event is None:
            with self._lock:
                self._seq = entry.seq
        else:
            self._keep(event)
            self._received += 1
            self._dispatch(event)
        if own is not None:
            self._finish(own, None)
        if self._waiters:
            self._wake(entry.seq)

    def _new_epoch(self, entry: LogEntry) -> None:
        self._epoch_changes += 1
        logger.warning(
            "the bus's log changed epoch %s -> %s (it lost its data): history cleared, "
            "clients resuming from before get a gap",
            self.epoch,
            entry.epoch,
        )
        old = self.epoch
        with self._lock:
            self._history.clear()
            self._history_bytes = 0
            self.epoch = entry.epoch
            self._seq = entry.seq - 1
        # Events appended in the old epoch will not come through the tail: they were in
        # the log (acknowledged as on a timeout); those of the new epoch still will.
        self._settle_own(lambda pending: pending.seq > 0 and pending.event.epoch == old)
        self._wake_all()

    @staticmethod
    def _splice(entry: LogEntry) -> bytes:
        # The payload is the envelope without seq and epoch, which to_dict() puts last.
        tail = b',"seq":%d,"epoch":%s}' % (entry.seq, _json_string(entry.epoch))
        return entry.payload.rstrip()[:-1] + tail

    def _decode(self, entry: LogEntry) -> Event | None:
        """The event an entry holds (its wire form spliced with seq and epoch), or None."""
        try:
            event = Event.from_dict(protocol.loads(entry.payload))  # orjson, exact ints
        except (ValueError, TypeError) as exc:
            self._invalid += 1
            logger.error("skipped log entry %d: not an event envelope (%s)", entry.seq, exc)
            return None
        event.seq, event.epoch = entry.seq, entry.epoch
        event._wire = self._splice(entry)
        return event

    def _keep(self, event: Event) -> None:
        history = self._history
        size = len(event._wire or b"")
        with self._lock:
            if history and event.seq != (history[-1].seq or 0) + 1:
                # A hole (entries trimmed before this node read them, or one it could
                # not decode): the ring stays contiguous, so since() reports the gap.
                history.clear()
                self._history_bytes = 0
            self._seq = event.seq or self._seq
            history.append(event)
            self._history_bytes += size
            if len(history) > self._history_size or self._history_bytes > self._history_bytes_cap:
                self._evict()

    def _dispatch(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        for sub in self._route(event.type_name):
            awaitable = self._run_sync(sub, event)
            if awaitable is not None:
                task = loop.create_task(self._run_async(sub, awaitable, event))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

    def _wake(self, seq: int) -> None:
        if not self._waiters:
            return
        for key in [k for k in self._waiters if k <= seq]:
            for future in self._waiters.pop(key):
                if not future.done():
                    future.set_result(None)

    def _wake_all(self) -> None:
        waiters, self._waiters = self._waiters, {}
        for futures in waiters.values():
            for future in futures:
                if not future.done():
                    future.set_result(None)

    async def catch_up(self, seq: int, timeout: float | None = None) -> bool:
        """Wait until this node has delivered ``seq`` (or the epoch changed); False on timeout."""
        if seq <= self._seq or self._closed:
            return True
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(seq, []).append(future)
        try:
            await asyncio.wait_for(future, self.delivery_timeout if timeout is None else timeout)
        except TimeoutError:
            return seq <= self._seq
        return True

    # Publishing

    def submit(self, event: Event, done: Done) -> None:
        """Queue ``event`` for the log, after everything submitted on this node before it.

        ``done(event, None)`` is called once this node's tail delivered it (right after
        its handlers ran, in the same loop turn), or once it is in the log and the tail
        has not delivered it within ``delivery_timeout`` (counted in
        ``delivery_timeouts``); ``done(event, exc)`` with a BackendUnavailable if it is not
        in the log. Never called from within ``submit``. Call on the bus's loop.

        Raises ValueError (counted in ``events_rejected``) if it cannot be strict JSON.
        """
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, not {type(event).__name__}")
        if event.seq is not None:
            raise ValueError(
                f"event {event.id} was already published (seq {event.seq}); publish a new Event"
            )
        if self._follower is None or self._closed:
            raise RuntimeError("this bus is not started: await bus.start() first")
        envelope = event.to_dict()
        del envelope["seq"], envelope["epoch"]
        try:
            payload = protocol.encode(envelope)
        except ValueError as exc:
            with self._lock:
                self._rejected += 1
            logger.warning("refused to publish %s: %s", event.id, exc)
            raise ValueError(f"event {event.type_name} cannot be sent: {exc}") from None
        token = b"%s%x" % (self._token_prefix, next(self._tokens))
        self._queue.append(_Pending(event, payload, token, done))
        self._queued.set()

    async def publish(self, event: Event) -> Event:
        """Append ``event`` to the log (which numbers it) and wait until this node delivered it.

        Raises ValueError (counted in ``events_rejected``) if it cannot be strict JSON,
        BackendUnavailable (counted in ``publishes_unavailable``) if the log cannot be reached.
        """
        home = self._foreign_home()
        if home is not None:
            future = asyncio.run_coroutine_threadsafe(self.publish(event), home)
            return await asyncio.wrap_future(future)
        answer: asyncio.Future[Event] = asyncio.get_running_loop().create_future()

        def done(event: Event, exc: BaseException | None) -> None:
            if answer.done():  # the caller was cancelled
                return
            if exc is None:
                answer.set_result(event)
            else:
                answer.set_exception(exc)

        self.submit(event, done)
        return await answer

    async def _append_loop(self) -> None:
        """Send what was submitted to the log, one call per batch, one call at a time."""
        queued = self._queued
        while True:
            await queued.wait()
            queued.clear()
            while self._queue:
                await self._append_batch(self._take())

    def _take(self) -> list[_Pending]:
        queue = self._queue
        count, size = 0, 0
        for pending in queue:
            size += len(pending.payload)
            if count and (count >= MAX_APPEND_BATCH or size > MAX_APPEND_BATCH_BYTES):
                break
            count += 1
        batch = queue[:count]
        del queue[:count]
        return batch

    async def _append_batch(self, batch: list[_Pending]) -> None:
        own = self._own
        for pending in batch:  # the tail may deliver them before the append's reply
            own[pending.token] = pending
        self._append_calls += 1
        if len(batch) > self._append_batch_max:
            self._append_batch_max = len(batch)
        try:
            numbered = await self.log.append_many(
                [p.payload for p in batch], [p.token for p in batch]
            )
        except BaseException as exc:
            if isinstance(exc, BackendUnavailable):
                failure = exc
            elif isinstance(exc, asyncio.CancelledError):
                failure = BackendUnavailable("the bus was closed while appending this event")
            else:
                logger.exception("appending %d events to the log failed", len(batch))
                failure = BackendUnavailable(f"the event log failed: {exc}")
            self._unavailable += len(batch)
            for pending in batch:
                # Not in the log as far as this node knows (unless its tail delivered it).
                if own.pop(pending.token, None) is not None:
                    self._finish(pending, failure)
            if isinstance(exc, asyncio.CancelledError):
                raise
            return
        self._appended += len(batch)
        if (
            numbered
            and numbered[0][1] == self.epoch
            and numbered[0][0] == self._seq + 1
            and not self._closed
        ):
            # Nothing between what this node delivered and this batch (the script gave it
            # consecutive seqs): deliver it now, not a read later. The tail will read these
            # entries too and skip them, as delivered.
            for pending, (seq, epoch) in zip(batch, numbered, strict=True):
                if own.pop(pending.token, None) is pending:
                    self._deliver(LogEntry(seq, epoch, pending.payload, pending.token), pending)
            self._own_direct += len(batch)
            return
        late: list[_Pending] = []
        for pending, (seq, epoch) in zip(batch, numbered, strict=True):
            if own.get(pending.token) is not pending:
                continue  # delivered already
            pending.seq = seq
            pending.event.seq, pending.event.epoch = seq, epoch
            pending.event._wire = pending.event._frame = None
            if epoch == self.epoch and seq <= self._seq:
                # The tail passed it without seeing it (trimmed before it read it).
                del own[pending.token]
                self._finish(pending, None)
            else:
                late.append(pending)
        if late:
            loop = asyncio.get_running_loop()
            self._deadlines.append((loop.time() + self.delivery_timeout, late))
            if self._sweeper is None:
                self._sweeper = loop.call_later(self.delivery_timeout, self._sweep)

    def _sweep(self) -> None:
        """Answer what the tail has not delivered in time, batch by batch (one timer)."""
        self._sweeper = None
        loop = asyncio.get_running_loop()
        deadlines = self._deadlines
        now = loop.time()
        while deadlines and deadlines[0][0] <= now:
            self._overdue(deadlines.popleft()[1])
        if deadlines and not self._closed:
            self._sweeper = loop.call_at(deadlines[0][0], self._sweep)

    def _overdue(self, batch: list[_Pending]) -> None:
        """Answer the events of a batch the tail has not delivered in time (they are in the log)."""
        own = self._own
        overdue = [p for p in batch if own.get(p.token) is p]
        if not overdue:
            return
        self._delivery_timeouts += len(overdue)
        logger.warning(
            "%d events (seq %d..%d) are in the log but this node's tail has not delivered "
            "them within %gs (it is at seq %d)",
            len(overdue),
            overdue[0].seq,
            overdue[-1].seq,
            self.delivery_timeout,
            self._seq,
        )
        for pending in overdue:
            del self._own[pending.token]
            self._finish(pending, None)

    def _settle_own(self, which: Callable[[_Pending], bool]) -> None:
        """Answer the sent, undelivered events ``which`` picks as in the log."""
        for token, pending in list(self._own.items()):
            if pending.seq > 0 and which(pending):
                del self._own[token]
                self._finish(pending, None)

    def _finish(self, pending: _Pending, exc: BaseException | None) -> None:
        try:
            pending.done(pending.event, exc)
        except Exception:
            logger.exception("the publisher's callback for %s failed", pending.event.id)

    def publish_nowait(self, event: Event) -> Event:
        """Schedule :meth:`publish` (from any thread); failures are logged and counted."""
        if not isinstance(event, Event):
            raise TypeError(f"expected an Event, not {type(event).__name__}")
        home = self._foreign_home()
        if home is not None:
            home.call_soon_threadsafe(self._schedule, event)
        else:
            self._schedule(event)
        return event

    def _schedule(self, event: Event) -> None:
        try:
            self.submit(event, self._published_nowait)
        except Exception as exc:
            self._publish_failures += 1
            logger.error("publish_nowait failed: %s", exc)

    def _published_nowait(self, event: Event, exc: BaseException | None) -> None:
        if exc is not None:
            self._publish_failures += 1
            logger.error("publish_nowait failed: %s", exc)

    # Administration

    @property
    def health(self) -> Health:
        """The log's health: ``ok``, ``degraded`` (unreachable, reconnecting) or ``closed``."""
        return self.log.health

    def get_stats(self) -> dict[str, Any]:
        """The in-process bus's counters, plus the log's health and figures."""
        stats = super().get_stats()
        stats["events_published"] = self._appended
        stats.update(
            {
                "backend": self.log.scheme,
                "health": self.log.health,
                "events_received": self._received,
                "events_preloaded": self._preloaded,
                "events_invalid": self._invalid,
                "publishes_unavailable": self._unavailable,
                "publish_failures": self._publish_failures,
                "delivery_timeouts": self._delivery_timeouts,
                "epoch_changes": self._epoch_changes,
                "tail_failures": self._tail_failures,
                "append_calls": self._append_calls,
                "append_batch_max": self._append_batch_max,
                "appends_queued": len(self._queue),
                "appends_in_flight": len(self._own),
                "own_events_delivered": self._delivered_own,
                "own_events_delivered_on_append": self._own_direct,
            }
        )
        log_stats = getattr(self.log, "stats", None)
        stats["log"] = log_stats() if callable(log_stats) else {}
        options = stats["log"].get("options")
        if isinstance(options, dict):  # the bus URL's options in one place (a copy: not the log's)
            stats["log"]["options"] = {**options, "delivery_timeout": self.delivery_timeout}
        return stats

    def reset(self) -> None:
        """Not supported: the numbering belongs to the log."""
        raise RuntimeError("a LogBus cannot be reset: its numbering belongs to the shared log")

    def __repr__(self) -> str:
        return (
            f"<LogBus {self.log!r} epoch={self.epoch} seq={self._seq} "
            f"health={self.log.health} history={len(self._history)}>"
        )
