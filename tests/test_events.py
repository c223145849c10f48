from __future__ import annotations

import asyncio
import logging
import threading
from datetime import UTC, datetime
from typing import Any

import pytest

from gathering_lab import protocol
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


# Strict JSON before history (issue 8)


def nested(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = [value]
    return value


@pytest.mark.parametrize(
    "data",
    [
        {"x": float("nan")},
        {"x": float("inf")},
        {"x": "\ud800"},
        {"deep": nested(protocol.MAX_DEPTH)},
    ],
    ids=["nan", "inf", "surrogate", "deep"],
)
async def test_unencodable_events_are_refused_before_they_are_numbered(
    bus: EventBus, data: dict[str, object], caplog: pytest.LogCaptureFixture
) -> None:
    seen: list[Event] = []
    bus.subscribe("*", seen.append)
    bad = Event("a.b", data)
    with caplog.at_level(logging.WARNING, "gathering_lab.events"):
        with pytest.raises(ValueError, match="a.b cannot be sent"):
            await bus.publish(bad)
    assert "refused to publish" in caplog.text
    assert bad.seq is None and bad.epoch is None
    with pytest.raises(ValueError):
        bus.publish_nowait(Event("a.b", data))
    good = await bus.publish(Event("a.b", {"ok": True}))
    assert good.seq == 1  # nothing was numbered
    assert [e.seq for e in bus.since(0)] == [1]
    assert seen == [good]
    stats = bus.get_stats()
    assert stats["events_rejected"] == 2
    assert stats["events_published"] == 1


def test_every_event_in_history_is_encoded_once(bus: EventBus) -> None:
    event = bus.publish_nowait(Event("a.b", {"n": 1}))
    wire = event._wire
    assert wire is not None and b'"seq":1' in wire
    assert event.encoded() is wire
    assert event._frame is None  # the manager's frame cache starts empty


async def test_publishing_from_a_thread_refuses_in_the_callers_thread(bus: EventBus) -> None:
    bus.bind_loop(asyncio.get_running_loop())
    bad = Event("a.b", {"x": float("nan")})
    with pytest.raises(ValueError, match="not strict JSON"):
        await asyncio.to_thread(bus.publish_nowait, bad)
    assert bus.get_stats()["events_rejected"] == 1
    assert bus.last_seq == 0


# History bounded in bytes


def test_history_is_bounded_in_bytes(bus: EventBus) -> None:
    cap = 4 * 2**20
    bus.configure(history_bytes=cap)
    blob = "x" * 2**20
    for i in range(30):
        bus.publish_nowait(Event("big.blob", {"i": i, "blob": blob}))
        assert bus.get_stats()["history_bytes"] <= cap
    stats = bus.get_stats()
    assert stats["history_bytes_capacity"] == cap
    assert stats["history_size"] == 3  # four 1 MiB events plus envelopes do not fit
    assert stats["history_evicted"] == 27
    assert stats["history_bytes"] == sum(len(e.encoded()) for e in bus.since(0))
    assert bus.oldest_seq == 28  # a resume from before sees the gap
    assert [e.seq for e in bus.since(10)] == [28, 29, 30]
    assert [e.data["i"] for e in bus.get_history(limit=5)] == [29, 28, 27]


def test_count_and_bytes_bounds_and_reconfiguring(bus: EventBus) -> None:
    small = EventBus(history_size=5, history_bytes=10_000)
    for i in range(20):
        small.publish_nowait(Event("a.b", {"i": i}))
    assert [e.data["i"] for e in small.since(0)] == [15, 16, 17, 18, 19]
    assert small.get_stats()["history_evicted"] == 15
    small.publish_nowait(Event("a.b", {"blob": "y" * 20_000}))  # larger than the cap
    assert small.since(0) == [] and small.oldest_seq == small.last_seq + 1 == 22
    assert small.get_stats()["history_bytes"] == 0
    for _ in range(5):
        small.publish_nowait(Event("a.b", {"blob": "z" * 1500}))
    small.configure(history_bytes=4000)
    assert len(small.since(0)) == 2 and small.get_stats()["history_bytes"] <= 4000
    small.clear_history()
    assert small.get_stats()["history_bytes"] == 0
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError, match="history_bytes"):
            EventBus(history_bytes=bad)  # type: ignore[arg-type]


def test_route_cache_is_bounded(bus: EventBus) -> None:
    bus.subscribe("t.*", lambda e: None)
    for i in range(5000):
        bus.publish_nowait(Event(f"t.n{i}"))
    assert 0 < len(bus._routes) <= 4096


# Reads from other threads


async def test_reads_from_another_thread_while_the_loop_publishes(bus: EventBus) -> None:
    bus.configure(history_size=500)
    stop = threading.Event()
    errors: list[BaseException] = []
    reads = 0

    def hammer() -> None:
        nonlocal reads
        try:
            while not stop.is_set():
                sub = bus.subscribe("a.*", lambda e: None)
                history = bus.get_history(limit=1000)
                since = bus.since(max(0, bus.last_seq - 300))
                bus.get_stats()
                bus.unsubscribe(sub)
                seqs = [e.seq for e in since]
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
                assert len(history) <= 500
                reads += 1
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=hammer)
    thread.start()
    try:
        for i in range(20_000):
            bus.publish_nowait(Event(f"a.t{i % 7}", {"i": i}))
            if i % 100 == 0:
                await asyncio.sleep(0)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert not errors, errors[0]
    assert reads > 10
    assert bus.last_seq == 20_000 and len(bus.since(0)) == 500
