from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime

import pytest

from gathering_lab.events import Event, EventBus, EventType, event_bus


def test_event_types_are_the_gathering_list() -> None:
    assert EventType.AGENT_STARTED == "agent.started"
    assert EventType("task.conflict.detected") is EventType.TASK_CONFLICT_DETECTED
    assert len(EventType) == 24
    assert all(member.name.lower().replace("_", ".") != "" for member in EventType)


def test_event_defaults_and_envelope() -> None:
    event = Event(type=EventType.AGENT_STARTED, data={"agent_id": 1}, source_agent_id=1)
    assert event.id.startswith("evt_")
    assert event.timestamp.tzinfo is not None
    assert event.seq is None
    wire = event.to_dict()
    assert list(wire) == [
        "type",
        "data",
        "source_agent_id",
        "circle_id",
        "project_id",
        "event_id",
        "timestamp",
        "seq",
        "epoch",
    ]
    assert wire["type"] == "agent.started"
    assert wire["timestamp"].endswith("Z")


def test_event_from_dict_round_trips() -> None:
    event = Event(type="deploy.finished", data={"ok": True}, circle_id=3)
    back = Event.from_dict(event.to_dict())
    assert back.to_dict() == event.to_dict()
    assert back.type == "deploy.finished"
    old = Event.from_dict({"type": "agent.started", "timestamp": "2024-01-15T10:30:00Z"})
    assert old.timestamp == datetime(2024, 1, 15, 10, 30, tzinfo=UTC)
    assert old.type is EventType.AGENT_STARTED


def test_known_type_strings_become_members_and_bad_types_are_refused() -> None:
    assert Event(type="task.created").type is EventType.TASK_CREATED
    with pytest.raises(ValueError, match="'Task Created'"):
        Event(type="Task Created")
    with pytest.raises(TypeError, match="data must be a dict"):
        Event(type="task.created", data=[1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="timezone-aware"):
        Event(type="task.created", timestamp=datetime(2024, 1, 1))


def test_matches_filter() -> None:
    event = Event(type="task.created", circle_id=1, project_id=2)
    assert event.matches_filter(circle_id=1)
    assert event.matches_filter(circle_id=1, project_id=2, type=EventType.TASK_CREATED)
    assert not event.matches_filter(circle_id=2)
    assert not event.matches_filter(type="task.failed")


async def test_publish_numbers_events_and_delivers_to_sync_and_async_handlers(
    bus: EventBus,
) -> None:
    seen_sync: list[int] = []
    seen_async: list[int] = []

    async def slow(event: Event) -> None:
        await asyncio.sleep(0)
        seen_async.append(event.seq or 0)

    bus.subscribe("*", lambda e: seen_sync.append(e.seq))
    bus.subscribe(EventType.TASK_CREATED, slow)
    for _ in range(3):
        await bus.publish(Event(type=EventType.TASK_CREATED))
    assert seen_sync == [1, 2, 3]
    assert seen_async == [1, 2, 3]
    stats = bus.get_stats()
    assert stats["events_published"] == 3
    assert stats["events_delivered"] == 6
    assert stats["active_subscribers"] == 2
    assert stats["history_size"] == 3


async def test_async_handlers_run_concurrently(bus: EventBus) -> None:
    both_started = asyncio.Event()
    started = 0

    async def handler(event: Event) -> None:
        nonlocal started
        started += 1
        if started == 2:
            both_started.set()
        await asyncio.wait_for(both_started.wait(), 2)

    bus.subscribe("*", handler)
    bus.subscribe("*", handler)
    await asyncio.wait_for(bus.publish(Event(type="a.b")), 3)
    assert bus.get_stats()["handler_errors"] == 0


@pytest.mark.parametrize(
    ("pattern", "matched"),
    [
        ("*", ["task.created", "task.conflict.detected", "agent.started"]),
        ("task.*", ["task.created", "task.conflict.detected"]),
        ("task.conflict.*", ["task.conflict.detected"]),
        ("task.created", ["task.created"]),
        ("agent.*", ["agent.started"]),
    ],
)
async def test_patterns(bus: EventBus, pattern: str, matched: list[str]) -> None:
    got: list[str] = []
    bus.subscribe(pattern, lambda e: got.append(e.type_name))
    for kind in ("task.created", "task.conflict.detected", "agent.started"):
        await bus.publish(Event(type=kind))
    assert got == matched


async def test_filter_fn_and_unsubscribe(bus: EventBus) -> None:
    got: list[int] = []
    sub = bus.subscribe(
        "*", lambda e: got.append(e.circle_id), filter_fn=lambda e: e.circle_id == 1
    )
    await bus.publish(Event(type="a.b", circle_id=1))
    await bus.publish(Event(type="a.b", circle_id=2))
    assert got == [1]
    assert bus.unsubscribe(sub) is True
    assert bus.unsubscribe(sub) is False
    await bus.publish(Event(type="a.b", circle_id=1))
    assert got == [1]


async def test_failing_handler_is_isolated_counted_and_logged(
    bus: EventBus, caplog: pytest.LogCaptureFixture
) -> None:
    got: list[str] = []

    def broken(event: Event) -> None:
        raise RuntimeError("boom")

    async def broken_async(event: Event) -> None:
        raise RuntimeError("async boom")

    bus.subscribe("*", broken, name="broken")
    bus.subscribe("*", broken_async, name="broken_async")
    bus.subscribe("*", lambda e: got.append(e.type_name))
    with caplog.at_level(logging.ERROR, logger="gathering_lab.events"):
        await bus.publish(Event(type="a.b"))
    assert got == ["a.b"]
    assert bus.get_stats()["handler_errors"] == 2
    assert "broken" in caplog.text and "boom" in caplog.text


async def test_publish_nowait_runs_sync_now_and_schedules_async(bus: EventBus) -> None:
    got: list[str] = []
    done = asyncio.Event()

    async def later(event: Event) -> None:
        got.append("async")
        done.set()

    bus.subscribe("*", lambda e: got.append("sync"))
    bus.subscribe("*", later)
    event = bus.publish_nowait(Event(type="a.b"))
    assert event.seq == 1
    assert got == ["sync"]
    await asyncio.wait_for(done.wait(), 2)
    assert got == ["sync", "async"]


async def test_publish_nowait_from_another_thread_lands_on_the_loop(bus: EventBus) -> None:
    loop_thread = threading.get_ident()
    arrived = asyncio.Event()
    threads: list[int] = []

    def handler(event: Event) -> None:
        threads.append(threading.get_ident())
        arrived.set()

    bus.subscribe("*", handler)
    await bus.publish(Event(type="warm.up"))  # binds the bus to this loop
    arrived.clear()
    threads.clear()
    worker = threading.Thread(target=bus.publish_nowait, args=(Event(type="from.thread"),))
    worker.start()
    worker.join(2)
    await asyncio.wait_for(arrived.wait(), 2)
    assert threads == [loop_thread]


def test_publish_nowait_without_loop_runs_sync_and_reports_async() -> None:
    bus = EventBus()
    got: list[str] = []

    async def needs_loop(event: Event) -> None:
        got.append("never")

    bus.subscribe("*", lambda e: got.append("sync"))
    bus.subscribe("*", needs_loop)
    bus.publish_nowait(Event(type="a.b"))
    assert got == ["sync"]
    assert bus.get_stats()["handler_errors"] == 1


async def test_republishing_the_same_event_is_refused(bus: EventBus) -> None:
    event = await bus.publish(Event(type="a.b"))
    with pytest.raises(ValueError, match="already published"):
        await bus.publish(event)


async def test_history_is_bounded_most_recent_first_and_filterable() -> None:
    bus = EventBus(history_size=5)
    for i in range(8):
        await bus.publish(Event(type="task.created" if i % 2 else "agent.started", circle_id=i))
    history = bus.get_history()
    assert [e.seq for e in history] == [8, 7, 6, 5, 4]
    assert [e.seq for e in bus.get_history(limit=2)] == [8, 7]
    assert [e.seq for e in bus.get_history("task.*")] == [8, 6, 4]
    assert [e.seq for e in bus.get_history(EventType.AGENT_STARTED, circle_id=4)] == [5]
    with pytest.raises(ValueError, match="limit"):
        bus.get_history(limit=-1)


async def test_since_returns_what_came_after_oldest_first() -> None:
    bus = EventBus(history_size=5)
    for _ in range(8):
        await bus.publish(Event(type="a.b"))
    assert bus.oldest_seq == 4
    assert bus.last_seq == 8
    assert [e.seq for e in bus.since(6)] == [7, 8]
    assert [e.seq for e in bus.since(0)] == [4, 5, 6, 7, 8]
    assert bus.since(8) == []
    with pytest.raises(ValueError):
        bus.since(-1)


async def test_reset_clear_and_configure(bus: EventBus) -> None:
    bus.subscribe("*", lambda e: None)
    for _ in range(4):
        await bus.publish(Event(type="a.b"))
    epoch = bus.epoch
    bus.configure(history_size=2)
    assert [e.seq for e in bus.get_history()] == [4, 3]
    bus.clear_history()
    assert bus.get_stats()["history_size"] == 0
    assert bus.oldest_seq == 5
    bus.reset()
    assert bus.epoch != epoch
    assert bus.get_stats()["active_subscribers"] == 0
    assert (await bus.publish(Event(type="a.b"))).seq == 1
    with pytest.raises(ValueError):
        bus.configure(history_size=0)
    with pytest.raises(ValueError):
        EventBus(history_size=0)


def test_bad_subscribe_arguments() -> None:
    bus = EventBus()
    with pytest.raises(ValueError, match="pattern"):
        bus.subscribe("Task", lambda e: None)
    with pytest.raises(TypeError, match="callable"):
        bus.subscribe("*", "not a function")  # type: ignore[arg-type]


def test_module_level_bus_exists() -> None:
    assert isinstance(event_bus, EventBus)
