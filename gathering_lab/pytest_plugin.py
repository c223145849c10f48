"""pytest fixtures for testing code that publishes or consumes GatheRing events.

Installed with the package (the ``pytest11`` entry point ``gathering_lab``): a test asks
for a fixture by name, with no conftest and no asyncio configuration::

    def test_my_agent_announces_itself(gathering_server, gathering_client):
        my_agent.run(gathering_server.url)            # your code, connecting as it does
        [event] = gathering_client.wait_for(type="agent.started", timeout=5)
        assert event["data"]["agent_id"] == 7

    async def test_my_consumer(gathering_server, gathering_client):
        consumer = await my_consumer.start(gathering_server.url)
        await gathering_client.publish_async("task.created", {"title": "x"})
        await consumer.wait_until_seen("x")

* ``gathering_server``: a server with its own bus and connection manager on a free
  127.0.0.1 port, on its own event loop in a background thread, so the same fixture
  serves synchronous tests and async tests on any loop (pytest-asyncio's, anyio's, or
  the one this plugin gives an ``async def`` test that no other plugin runs). It records
  every event published on its bus (:attr:`GatheringServer.events`). Stopped after the
  test, its port closed. Configure it by overriding ``gathering_server_options``.
* ``gathering_client``: a :class:`~gathering_lab.client.LabClient` connected to it, driven
  through :class:`GatheringClient` (blocking methods, and ``*_async`` twins to await from
  any loop); closed after the test.
* ``gathering_bus``: the server's bus (not a standalone one), so what a test publishes on
  it reaches the server's clients. It lives on the server's loop: publish from a test
  with ``gathering_server.publish(...)``, ``bus.publish_nowait(...)`` or
  ``await bus.publish(...)`` (both hand the event to that loop); handlers run there.

Waits (``wait_for``) take a timeout scaled by ``GATHERING_LAB_TIMEOUT_FACTOR`` and, when
it passes, raise :class:`EventsNotReceived` listing what did arrive.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any, TypeVar

import pytest

from . import protocol
from .testing import timeout as scaled_timeout
from .testing import wait_for as wait_for_condition

if TYPE_CHECKING:
    from .client import LabClient
    from .events import Event, EventBus
    from .frame import EventFrame
    from .kernel import Lab

__all__ = [
    "EventLog",
    "EventsNotReceived",
    "GatheringClient",
    "GatheringServer",
    "gathering_bus",
    "gathering_client",
    "gathering_server",
    "gathering_server_options",
]

logger = logging.getLogger("gathering_lab.pytest_plugin")

_T = TypeVar("_T")
#: The fixtures of this plugin: an ``async def`` test using one is run here if nothing else does.
FIXTURES = frozenset({"gathering_server", "gathering_client", "gathering_bus"})
#: How many of the events that did arrive a timeout's message lists (the latest ones).
SHOWN_ON_TIMEOUT = 20
_ID_FIELDS = ("source_agent_id", "circle_id", "project_id")
#: Markers of async frameworks whose plugins run their own tests.
_OTHER_FRAMEWORKS = ("anyio", "trio")

Message = dict[str, Any]
Predicate = Callable[[Message], bool]


class EventsNotReceived(TimeoutError):
    """The events waited for did not arrive in time; the message lists those that did."""


class EventLog:
    """The events (wire envelopes, as dicts) something received, in order, from any thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._events: list[Message] = []
        self._changed = threading.Condition()

    def append(self, message: Message) -> None:
        """Record one event (called from the server's thread)."""
        with self._changed:
            self._events.append(message)
            self._changed.notify_all()

    @property
    def events(self) -> list[Message]:
        """A copy of everything recorded so far, oldest first."""
        with self._changed:
            return list(self._events)

    def __len__(self) -> int:
        with self._changed:
            return len(self._events)

    def clear(self) -> None:
        """Forget what was recorded (later waits count from here)."""
        with self._changed:
            self._events.clear()

    def matching(
        self,
        type: str | None = None,  # noqa: A002 - the protocol's name
        *,
        data: dict[str, Any] | None = None,
        where: Predicate | None = None,
        **ids: Any,
    ) -> list[Message]:
        """The recorded events that match (see :meth:`wait_for`), oldest first."""
        match = _matcher(type, data, where, ids)
        return [message for message in self.events if match(message)]

    def wait_for(
        self,
        type: str | None = None,  # noqa: A002 - the protocol's name
        *,
        count: int = 1,
        timeout: float = 5.0,
        data: dict[str, Any] | None = None,
        where: Predicate | None = None,
        **ids: Any,
    ) -> list[Message]:
        """Block until ``count`` recorded events match; return all that match, oldest first.

        ``type`` is a type or a pattern (``task.created``, ``task.*``, ``*``); ``data`` matches
        events whose data has these keys with these values; ``circle_id=``, ``project_id=``,
        ``source_agent_id=`` match ids exactly; ``where(message)`` is any other test. Raises
        :class:`EventsNotReceived` after ``timeout`` seconds (scaled by
        ``GATHERING_LAB_TIMEOUT_FACTOR``), listing the events that did arrive. Counts every
        event recorded since the start (or :meth:`clear`), not only those after the call.
        """
        __tracebackhide__ = True
        _check_count(count)
        match = _matcher(type, data, where, ids)
        deadline = time.monotonic() + scaled_timeout(timeout)
        with self._changed:
            while True:
                found = [message for message in self._events if match(message)]
                left = deadline - time.monotonic()
                if len(found) >= count or left <= 0:
                    break
                self._changed.wait(left)
        if len(found) < count:
            raise self._not_received(type, data, where, ids, count, len(found), timeout)
        return found

    async def wait_for_async(
        self,
        type: str | None = None,  # noqa: A002 - the protocol's name
        *,
        count: int = 1,
        timeout: float = 5.0,
        data: dict[str, Any] | None = None,
        where: Predicate | None = None,
        **ids: Any,
    ) -> list[Message]:
        """:meth:`wait_for` for async tests: awaits (on any loop) instead of blocking."""
        __tracebackhide__ = True
        _check_count(count)
        match = _matcher(type, data, where, ids)
        found: list[Message] = []

        def enough() -> bool:
            nonlocal found
            found = [message for message in self.events if match(message)]
            return len(found) >= count

        try:
            await wait_for_condition(enough, timeout)
        except TimeoutError:
            raise self._not_received(type, data, where, ids, count, len(found), timeout) from None
        return found

    def _not_received(
        self,
        type: str | None,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None,
        where: Predicate | None,
        ids: dict[str, Any],
        count: int,
        found: int,
        timeout: float,
    ) -> EventsNotReceived:
        criteria = [f"type={type!r}"] if type is not None else []
        criteria += [f"{key}={value!r}" for key, value in ids.items()]
        if data is not None:
            criteria.append(f"data={data!r}")
        if where is not None:
            criteria.append(f"where={getattr(where, '__qualname__', where)!r}")
        wanted = " ".join(criteria) or "(any)"
        arrived = self.events
        waited = scaled_timeout(timeout)
        lines = [
            f"{self.name}: waited {waited:g}s for {count} event(s) matching {wanted}; "
            f"{found} matched, {len(arrived)} arrived in all"
            + (":" if arrived else " (nothing was published, or nothing reached it)")
        ]
        if len(arrived) > SHOWN_ON_TIMEOUT:
            lines.append(f"  ... {len(arrived) - SHOWN_ON_TIMEOUT} earlier event(s) not shown")
        lines += [f"  {_describe(message)}" for message in arrived[-SHOWN_ON_TIMEOUT:]]
        return EventsNotReceived("\n".join(lines))

    def __repr__(self) -> str:
        return f"<EventLog {self.name} events={len(self)}>"


def _check_count(count: int) -> None:
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be an integer >= 1, not {count!r}")


def _matcher(
    type: str | None,  # noqa: A002 - the protocol's name
    data: dict[str, Any] | None,
    where: Predicate | None,
    ids: dict[str, Any],
) -> Predicate:
    """A test for one message from ``wait_for``'s criteria; bad criteria raise here."""
    patterns: frozenset[str] | None = None
    if type is not None:
        try:
            patterns = frozenset({protocol.check_pattern(type)})
        except protocol.ProtocolError as exc:
            raise ValueError(exc.message) from None
    unknown = sorted(set(ids) - set(_ID_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown criterion {unknown[0]!r}: use type=, data=, where= or one of "
            f"{', '.join(_ID_FIELDS)}"
        )
    if data is not None and not isinstance(data, dict):
        raise TypeError(f"data must be a dict of the keys to match, not {_type_name(data)}")
    if where is not None and not callable(where):
        raise TypeError(f"where must be callable, not {_type_name(where)}")

    def match(message: Message) -> bool:
        if patterns is not None and not protocol.type_matches(patterns, str(message.get("type"))):
            return False
        for key, wanted in ids.items():
            value = message.get(key)
            if (value is not None) if wanted is None else not protocol.same_id(wanted, value):
                return False
        if data is not None:
            got = message.get("data")
            if not isinstance(got, dict):
                return False
            if any(key not in got or got[key] != value for key, value in data.items()):
                return False
        return where is None or bool(where(message))

    return match


def _type_name(value: object) -> str:
    """The name of ``value``'s type, for error messages."""
    return type(value).__name__


def _describe(message: Message, limit: int = 160) -> str:
    """One line per event for a timeout's message: seq, type, ids, data."""
    parts = [f"seq={message.get('seq')}", str(message.get("type"))]
    parts += [f"{key}={message[key]!r}" for key in _ID_FIELDS if message.get(key) is not None]
    parts.append(f"data={message.get('data')!r}")
    line = " ".join(parts)
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


class GatheringServer:
    """A server with its own bus on a free 127.0.0.1 port, on its own loop and thread.

    Built on :class:`~gathering_lab.kernel.Lab` (its thread mode): ``options`` are the
    Lab's and :func:`~gathering_lab.websocket.serve`'s keywords (``max_clients=``,
    ``auth=``...). Every event published on its bus is recorded in :attr:`events`.
    """

    def __init__(self, **options: Any) -> None:
        from .events import EventBus
        from .kernel import Lab
        from .websocket import ConnectionManager

        options.setdefault("bus", EventBus())
        options.setdefault("manager", ConnectionManager())
        host = options.pop("host", "127.0.0.1")
        port = options.pop("port", 0)  # 0: a free one
        self.lab: Lab = Lab(host, port, **options)
        #: Every event published on the bus since the server started (or ``events.clear()``).
        self.events = EventLog("gathering_server")
        self.clients: list[GatheringClient] = []
        self._capture: str | None = None
        self._client_ids = itertools.count(1)

    def start(self) -> GatheringServer:
        """Start serving on a thread of its own; returns once it accepts connections."""
        self._capture = self.bus.subscribe("*", self._record, name="gathering_server.events")
        try:
            self._start_lab()
        except BaseException:
            self.stop()  # a failed start leaves the lab's thread running: end it
            raise
        if self.lab.status != "running":
            self.stop()
            raise RuntimeError(f"the gathering_server did not start: {self.lab.status}")
        return self

    def _start_lab(self) -> None:
        if _running_loop() is None:
            self.lab.start()
        else:
            # Lab.start() would serve on the caller's loop: start it from a thread with none.
            failure: list[BaseException] = []

            def start() -> None:
                try:
                    self.lab.start()
                except BaseException as exc:
                    failure.append(exc)

            thread = threading.Thread(target=start, name="gathering_server start")
            thread.start()
            thread.join()
            if failure:
                raise failure[0]

    def _record(self, event: Event) -> None:
        self.events.append(event.to_dict())

    def stop(self) -> None:
        """Close its clients, then stop the server; its port is closed on return."""
        for client in list(self.clients):
            client.close()
        if self._capture is not None:
            self.bus.unsubscribe(self._capture)
            self._capture = None
        self.lab.stop()

    # What a test reads

    @property
    def url(self) -> str:
        """The WebSocket URL to connect to (``ws://127.0.0.1:PORT/ws/dashboard``)."""
        return self.lab.url

    @property
    def http_url(self) -> str:
        """The base HTTP URL (``/health``, ``/admin/websocket/stats``, ``/dashboard``)."""
        return self.lab.http_url

    @property
    def port(self) -> int:
        """The TCP port it listens on."""
        return int(self.lab.port)

    @property
    def bus(self) -> EventBus:
        """Its event bus (it lives on the server's loop; see the module's notes)."""
        return self.lab.bus

    @property
    def frame(self) -> EventFrame:
        """Everything published on the bus, as an :class:`~gathering_lab.frame.EventFrame`."""
        return self.lab.frame

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop the server runs on (in its own thread)."""
        loop = self.lab.loop
        assert loop is not None, "the gathering_server is not started"
        return loop

    def stats(self) -> dict[str, Any]:
        """The server's stats, as served at ``/admin/websocket/stats``."""
        return self.lab.stats()

    # What a test does

    def publish(
        self,
        type: str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        **ids: Any,
    ) -> Event:
        """Publish an event on the bus from any thread; returns it, numbered (``seq`` set)."""
        from .events import Event

        event = Event(type=type, data=data or {}, **ids)
        return self.run(_publish(self.bus, event))

    def run(self, coroutine: Coroutine[Any, Any, _T], timeout: float = 10.0) -> _T:
        """Run ``coroutine`` on the server's loop and wait (blocking) for its result."""
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        return future.result(scaled_timeout(timeout))

    async def run_async(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        """Run ``coroutine`` on the server's loop and await its result from any loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, self.loop))

    def connect(self, client_id: str | None = None, **options: Any) -> GatheringClient:
        """Connect another :class:`GatheringClient` (``LabClient`` keywords); closed on stop."""
        client_id = client_id or f"pytest-{next(self._client_ids)}"
        client = GatheringClient(self, client_id)
        self.run(client._open(options))
        self.clients.append(client)
        return client

    async def connect_async(self, client_id: str | None = None, **options: Any) -> GatheringClient:
        """:meth:`connect` for async tests."""
        client_id = client_id or f"pytest-{next(self._client_ids)}"
        client = GatheringClient(self, client_id)
        await self.run_async(client._open(options))
        self.clients.append(client)
        return client

    def wait_for(self, type: str | None = None, **criteria: Any) -> list[Message]:  # noqa: A002
        """Wait until events published on the bus match; see :meth:`EventLog.wait_for`."""
        __tracebackhide__ = True
        return self.events.wait_for(type, **criteria)

    async def wait_for_async(self, type: str | None = None, **criteria: Any) -> list[Message]:  # noqa: A002
        """:meth:`wait_for` for async tests."""
        __tracebackhide__ = True
        return await self.events.wait_for_async(type, **criteria)

    def __repr__(self) -> str:
        return f"<GatheringServer {self.url} {self.lab.status} events={len(self.events)}>"


async def _publish(bus: EventBus, event: Event) -> Event:
    return bus.publish_nowait(event)  # on the bus's own loop: numbered at once


class GatheringClient:
    """A :class:`~gathering_lab.client.LabClient` connected to a :class:`GatheringServer`.

    The client runs on the server's loop; its methods block the caller (sync tests) and
    their ``*_async`` twins can be awaited from any loop (async tests). Every event it
    receives is recorded in :attr:`events`.
    """

    def __init__(self, server: GatheringServer, client_id: str) -> None:
        self.server = server
        self.client_id = client_id
        #: Every event this client received, oldest first.
        self.events = EventLog(f"gathering_client {client_id!r}")
        self._client: LabClient | None = None

    async def _open(self, options: dict[str, Any]) -> None:
        from .client import LabClient

        client = LabClient(self.server.url, self.client_id, **options)
        client.on_event(self.events.append)  # before connecting: nothing is missed
        await client.connect()
        self._client = client

    @property
    def lab_client(self) -> LabClient:
        """The underlying LabClient (its coroutines must run on :attr:`GatheringServer.loop`)."""
        assert self._client is not None, "the client is not connected"
        return self._client

    @property
    def url(self) -> str:
        """The server URL it is connected to."""
        return self.server.url

    @property
    def frame(self) -> EventFrame:
        """What it received, as an :class:`~gathering_lab.frame.EventFrame`."""
        return self.lab_client.frame

    @property
    def status(self) -> str:
        """The LabClient's status (``connected``, ``closed``...)."""
        return self.lab_client.status

    def publish(
        self,
        type: str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        **ids: Any,
    ) -> dict[str, Any] | None:
        """Publish through the server and return its ack (``event_id``, ``seq``)."""
        return self.server.run(self.lab_client.publish(type, data, **ids))

    async def publish_async(
        self,
        type: str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        **ids: Any,
    ) -> dict[str, Any] | None:
        """:meth:`publish` for async tests."""
        return await self.server.run_async(self.lab_client.publish(type, data, **ids))

    def subscribe(self, event_types: list[str] | str | None = None, **ids: Any) -> Any:
        """Receive only these types (patterns) and ids; returns the server's ack."""
        return self.server.run(self.lab_client.subscribe(event_types, **ids))

    async def subscribe_async(self, event_types: list[str] | str | None = None, **ids: Any) -> Any:
        """:meth:`subscribe` for async tests."""
        return await self.server.run_async(self.lab_client.subscribe(event_types, **ids))

    def ping(self) -> float:
        """An application ping; returns the round trip in seconds."""
        return self.server.run(self.lab_client.ping())

    async def ping_async(self) -> float:
        """:meth:`ping` for async tests."""
        return await self.server.run_async(self.lab_client.ping())

    def wait_for(self, type: str | None = None, **criteria: Any) -> list[Message]:  # noqa: A002
        """Wait until received events match; see :meth:`EventLog.wait_for`."""
        __tracebackhide__ = True
        return self.events.wait_for(type, **criteria)

    async def wait_for_async(self, type: str | None = None, **criteria: Any) -> list[Message]:  # noqa: A002
        """:meth:`wait_for` for async tests."""
        __tracebackhide__ = True
        return await self.events.wait_for_async(type, **criteria)

    def close(self) -> None:
        """Close the connection for good (the recorded events stay)."""
        if self in self.server.clients:
            self.server.clients.remove(self)
        if self._client is not None and self.server.lab.running:
            self.server.run(self._client.close())

    def __repr__(self) -> str:
        status = self._client.status if self._client is not None else "not connected"
        return f"<GatheringClient {self.client_id} {status} events={len(self.events)}>"


# Fixtures


@pytest.fixture
def gathering_server_options() -> dict[str, Any]:
    """Keywords for the ``gathering_server`` fixture's server; override it to configure one."""
    return {}


@pytest.fixture
def gathering_server(gathering_server_options: dict[str, Any]) -> Iterator[GatheringServer]:
    """A running server with its own bus on a free 127.0.0.1 port, stopped after the test."""
    server = GatheringServer(**gathering_server_options).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def gathering_client(gathering_server: GatheringServer) -> Iterator[GatheringClient]:
    """A LabClient (client id ``pytest``) connected to ``gathering_server``, closed after."""
    client = gathering_server.connect("pytest")
    try:
        yield client
    finally:
        client.close()


@pytest.fixture
def gathering_bus(gathering_server: GatheringServer) -> EventBus:
    """The ``gathering_server``'s bus: what is published on it reaches the server's clients."""
    return gathering_server.bus


# ``async def`` tests


@pytest.hookimpl
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    """Run an ``async def`` test that uses these fixtures when no other plugin runs it.

    pytest-asyncio (any mode) has already made the tests it runs synchronous, and anyio
    runs its own first; what is left would fail with "async def functions are not
    natively supported". Such a test gets a fresh event loop (``asyncio.run``) here.
    Tests not using these fixtures, or marked for another framework, are left alone.
    """
    function = pyfuncitem.obj
    if not inspect.iscoroutinefunction(function):
        return None
    if not FIXTURES.intersection(pyfuncitem.fixturenames):
        return None
    if any(pyfuncitem.get_closest_marker(name) for name in _OTHER_FRAMEWORKS):
        return None
    arguments = {name: pyfuncitem.funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
    asyncio.run(function(**arguments))
    return True
