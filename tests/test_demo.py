"""The demo traffic: the story model, publishing on a bus, and run_demo against a real server."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest
from websockets.asyncio.client import connect

from gathering_lab import protocol
from gathering_lab.demo import (
    DemoResult,
    demo_messages,
    publish_demo,
    publish_message,
    run_demo,
    with_client_id,
)
from gathering_lab.events import EventBus, EventType
from gathering_lab.exceptions import ConnectionFailed
from gathering_lab.pytest_plugin import GatheringClient, GatheringServer
from gathering_lab.testing import (
    capture_events,
    free_port,
    recv_json,
    recv_until,
    running_server,
    timeout,
    wait_for,
)
from gathering_lab.websocket import Server

#: The event families the guide's test script is expected to show.
FAMILIES = {
    "circle.created",
    "circle.started",
    "agent.started",
    "circle.member.added",
    "task.created",
    "task.assigned",
    "agent.task.assigned",
    "task.started",
    "task.completed",
    "task.failed",
    "agent.task.completed",
    "agent.task.failed",
    "task.conflict.detected",
    "agent.tool.executed",
    "memory.created",
    "memory.shared",
    "conversation.message",
    "conversation.turn.complete",
    "system.warning",
}
PAYLOAD_KEYS = ["type", "data", "source_agent_id", "circle_id", "project_id"]


# The traffic model


def test_same_seed_same_story_other_seed_other_story() -> None:
    assert list(demo_messages(500, seed=7)) == list(demo_messages(500, seed=7))
    assert list(demo_messages(500, seed=7)) != list(demo_messages(500, seed=8))
    assert list(demo_messages(100)) == list(demo_messages(1000))[:100]


def test_count_and_endless() -> None:
    assert list(demo_messages(0)) == []
    assert len(list(demo_messages(37))) == 37
    endless = demo_messages()
    assert len([next(endless) for _ in range(5000)]) == 5000
    with pytest.raises(ValueError, match="count"):
        demo_messages(-1)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_every_payload_is_a_valid_publish(seed: int) -> None:
    for payload in demo_messages(1500, seed=seed):
        assert list(payload) == PAYLOAD_KEYS
        assert protocol.check_event_type(payload["type"]) == payload["type"]
        assert payload["type"] in {t.value for t in EventType}
        parsed = protocol.parse_client_message(publish_message(payload))
        assert parsed == protocol.Publish(**payload)


def test_payload_sizes_are_small() -> None:
    sizes = [len(protocol.encode(p)) for p in demo_messages(3000)]
    assert min(sizes) >= 80
    assert max(sizes) <= 400
    assert 100 <= sum(sizes) / len(sizes) <= 300


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_covers_the_event_families(seed: int) -> None:
    counts = Counter(p["type"] for p in demo_messages(1500, seed=seed))
    assert FAMILIES <= set(counts), FAMILIES - set(counts)
    # Common things are common, rare things rare.
    assert counts["task.created"] > 10 * counts["system.warning"]
    assert counts["task.completed"] > counts["task.failed"] > 0
    assert counts["task.conflict.detected"] < counts["task.started"] / 3


def test_a_short_run_already_tells_the_story() -> None:
    types = [p["type"] for p in demo_messages(30)]
    assert types[0] == "circle.created"
    for kind in ("circle.started", "agent.started", "circle.member.added", "task.created"):
        assert kind in types
    assert sum(t.startswith("task.") for t in types) >= 5


class StoryChecker:
    """Replays the story and checks that every id refers to something that exists."""

    def __init__(self) -> None:
        self.agents: set[int] = set()
        self.circles: dict[int, int] = {}  # circle -> project
        self.members: dict[int, int] = {}  # agent -> circle
        self.tasks: dict[int, dict[str, Any]] = {}
        self.memories: set[int] = set()

    def check(self, p: dict[str, Any]) -> None:
        kind, data = p["type"], p["data"]
        agent, circle, project = p["source_agent_id"], p["circle_id"], p["project_id"]
        if kind == "agent.started":
            assert agent == data["agent_id"] and agent not in self.agents
            assert circle is None and data["name"] and data["competencies"]
            self.agents.add(agent)
            return
        if kind == "circle.created":
            assert circle == data["circle_id"] and circle not in self.circles and project
            self.circles[circle] = project
            return
        if agent is not None:
            assert agent in self.agents, f"{kind}: agent {agent} is not running"
        if circle is not None:
            assert self.circles.get(circle) == project, f"{kind}: circle {circle} / {project}"
        else:
            assert project is None
        if kind == "circle.member.added":
            assert agent == data["agent_id"] and agent not in self.members
            self.members[agent] = circle
        elif kind == "circle.member.removed":
            assert self.members.pop(agent) == circle
            assert all(t.get("agent") != agent for t in self.tasks.values())
        elif kind == "agent.stopped":
            assert agent not in self.members
            self.agents.discard(agent)
        elif kind == "circle.stopped":
            assert circle not in self.members.values()
            assert all(t["circle"] != circle for t in self.tasks.values())
            del self.circles[circle]
        elif kind == "task.created":
            assert data["task_id"] not in self.tasks
            assert self.members[agent] == circle
            self.tasks[data["task_id"]] = {"circle": circle, "state": "created"}
        elif "task_id" in data:
            task = self.tasks[data["task_id"]]
            assert task["circle"] == circle, f"{kind}: task in circle {task['circle']}"
            self.task_event(kind, data, agent, task)
        elif kind.startswith("conversation."):
            assert agent is None or self.members[agent] == circle
        elif kind == "memory.created":
            assert data["memory_id"] not in self.memories and self.members[agent] == circle
            self.memories.add(data["memory_id"])
        elif kind == "memory.shared":
            assert data["memory_id"] in self.memories

    def task_event(self, kind: str, data: dict[str, Any], agent: Any, task: dict[str, Any]) -> None:
        state = task["state"]
        if kind == "task.assigned":
            assert state == "created" and self.members[data["agent_id"]] == task["circle"]
            task.update(state="assigned", agent=data["agent_id"])
            return
        assert agent == task["agent"] == data.get("agent_id", agent), kind
        if kind == "agent.task.assigned":
            assert state == "assigned"
        elif kind == "task.started":
            assert state == "assigned"
            task["state"] = "started"
        elif kind in ("agent.tool.executed", "task.conflict.detected", "memory.recalled"):
            assert state == "started"
            if kind == "task.conflict.detected":
                assert data["conflicting_task_id"] in self.tasks
            if kind == "memory.recalled":
                assert data["memory_id"] in self.memories
        elif kind in ("task.completed", "task.failed"):
            assert state == "started" and data["duration_ms"] >= 0
            task["state"] = "finished"
        elif kind in ("agent.task.completed", "agent.task.failed"):
            assert state == "finished"
            del self.tasks[data["task_id"]]
        else:
            raise AssertionError(f"unexpected task event {kind}")


@pytest.mark.parametrize("seed", [0, 5])
def test_ids_are_consistent_across_the_story(seed: int) -> None:
    checker = StoryChecker()
    for payload in demo_messages(6000, seed=seed):
        checker.check(payload)
    assert len(checker.circles) <= 3


# On an in-process bus


async def test_publish_demo_on_a_bus(bus: EventBus) -> None:
    with capture_events(bus) as captured:
        published = await publish_demo(bus, 40)
    assert published == 40
    expected = list(demo_messages(40))
    assert [e.type_name for e in captured] == [p["type"] for p in expected]
    assert [e.data for e in captured] == [p["data"] for p in expected]
    assert [e.circle_id for e in captured] == [p["circle_id"] for p in expected]
    assert [e.seq for e in captured] == list(range(1, 41))


async def test_publish_demo_is_paced_on_a_monotonic_schedule(bus: EventBus) -> None:
    started = time.monotonic()
    assert await publish_demo(bus, 6, rate=50, seed=3) == 6
    elapsed = time.monotonic() - started
    assert 5 / 50 * 0.95 <= elapsed < timeout(2)


async def test_publish_demo_until_cancelled(bus: EventBus) -> None:
    task = asyncio.create_task(publish_demo(bus, None, rate=200))
    await wait_for(lambda: bus.last_seq >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


@pytest.mark.parametrize(("rate", "count"), [(-1, 5), (float("nan"), 5), (1, 0)])
async def test_publish_demo_rejects_bad_values(bus: EventBus, rate: float, count: int) -> None:
    with pytest.raises(ValueError):
        await publish_demo(bus, count, rate=rate)


# Over WebSocket


def test_with_client_id() -> None:
    url = "ws://h:1/ws/dashboard"
    assert with_client_id(url, "a") == url + "?client_id=a"
    assert with_client_id(url + "?client_id=x&k=1", "a") == url + "?k=1&client_id=a"
    assert with_client_id(url + "?client_id=x", None) == url + "?client_id=x"


async def test_run_demo_publishes_and_another_client_sees_everything(
    gathering_server: GatheringServer, gathering_client: GatheringClient
) -> None:
    reports: list[tuple[int, int]] = []
    result = await run_demo(
        gathering_server.url,
        count=50,
        rate=0,
        progress=lambda r: reports.append((r.sent, r.acked)),
    )
    assert isinstance(result, DemoResult)
    assert (result.sent, result.acked, result.errors, result.unanswered) == (50, 50, 0, 0)
    assert result.elapsed > 0 and result.rate > 0
    assert result.greeting["client_id"] == "demo"
    assert reports[0] == (0, 0) and reports[-1] == (50, 50)

    received = await gathering_client.wait_for_async(count=50)
    expected = list(demo_messages(50))
    assert [m["type"] for m in received] == [p["type"] for p in expected]
    assert [m["data"] for m in received] == [p["data"] for p in expected]
    assert [m["source_agent_id"] for m in received] == [p["source_agent_id"] for p in expected]
    assert [m["seq"] for m in received] == list(range(1, 51))
    assert gathering_server.bus.last_seq == 50


async def test_run_demo_paces_at_the_rate(server: Server) -> None:
    result = await run_demo(server.url, count=5, rate=40, client_id="paced")
    assert result.acked == 5
    assert result.elapsed >= 4 / 40 * 0.95


async def test_run_demo_until_cancelled(gathering_server: GatheringServer) -> None:
    task = asyncio.create_task(run_demo(gathering_server.url, rate=100))
    await gathering_server.wait_for_async(count=10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: gathering_server.stats()["active_connections"] == 0)


async def test_run_demo_unreachable_server() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    with pytest.raises(ConnectionFailed, match="cannot reach .*connection refused") as info:
        await run_demo(url, count=1)
    assert str(info.value).startswith(f"cannot reach {url}:")
    assert "gathering-lab serve" in str(info.value)


async def test_run_demo_not_a_websocket_url(server: Server) -> None:
    with pytest.raises(ConnectionFailed, match="not a WebSocket endpoint.*HTTP 200"):
        await run_demo(server.url.replace("/ws/dashboard", "/health"), count=1)
    url = server.url.replace("/ws/dashboard", "/nowhere")
    with pytest.raises(ConnectionFailed, match="not a WebSocket endpoint.*HTTP 404.*/ws/dashboard"):
        await run_demo(url, count=1)


async def test_run_demo_reports_the_server_closing(server: Server) -> None:
    task = asyncio.create_task(run_demo(server.url, rate=200))
    await wait_for(lambda: server.bus.last_seq >= 5)
    server.close()
    with pytest.raises(ConnectionFailed, match="closed the connection.*code 1001"):
        await asyncio.wait_for(task, timeout(5))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"rate": -1}, "rate"), ({"count": 0}, "count"), ({"max_in_flight": 0}, "max_in_flight")],
)
async def test_run_demo_rejects_bad_values(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        await run_demo("ws://127.0.0.1:9/ws/dashboard", **kwargs)


async def test_publish_messages_round_trip_through_the_server(server: Server) -> None:
    async with connect(f"{server.url}?client_id=raw") as ws:
        await recv_json(ws)
        payload = next(demo_messages())
        await ws.send(publish_message(payload), text=True)
        replies = await recv_until(ws, lambda m: m["type"] == "published")
    assert replies[0]["type"] == payload["type"]  # our own event comes back first
    assert replies[-1]["data"]["seq"] == 1


# Against a server with authentication


async def test_run_demo_with_a_token() -> None:
    auth = pytest.importorskip("gathering_lab.auth")
    secret = "s" * 32
    checker = auth.JWTAuth(secret, timeout=0.5)
    async with running_server(auth=checker) as server:
        token = auth.mint_token(secret, "demo-bot", "subscribe,publish")
        result = await run_demo(server.url, count=5, rate=0, token=token)
        assert (result.acked, result.errors) == (5, 0)
        assert result.greeting["client_id"] == "demo-bot"  # the token names the client

        reader = auth.mint_token(secret, "reader", "subscribe")
        refused = await run_demo(server.url, count=3, rate=0, token=reader)
        assert (refused.sent, refused.acked, refused.errors) == (1, 0, 1)  # stopped at once
        assert refused.last_error is not None and refused.last_error.startswith("forbidden")
        assert refused.stopped_by == refused.last_error
        assert "'publish' role" in refused.stopped_by

        # Endless, paced or not: the first forbidden stops it.
        for rate in (0, 50):
            endless = await asyncio.wait_for(
                run_demo(server.url, rate=rate, token=reader), timeout(10)
            )
            assert (endless.sent, endless.errors) == (1, 1), (rate, endless)
            assert endless.stopped_by is not None and endless.stopped_by.startswith("forbidden")

        # Other refusals do not stop it (the next publish may be accepted).
        kept = await run_demo(server.url, count=3, rate=0, token=reader, stop_on=())
        assert (kept.sent, kept.errors, kept.stopped_by) == (3, 3, None)

        with pytest.raises(ConnectionFailed, match=r"code 1008 .*--token or \$GATHERING_LAB_TOKEN"):
            await run_demo(server.url, count=1)


def test_the_traffic_model_is_deterministic_and_shared() -> None:
    from gathering_lab import demo, traffic

    assert demo.demo_messages is traffic.demo_messages  # one model, re-exported
    first = list(traffic.demo_messages(300, seed=7))
    assert first == list(traffic.demo_messages(300, seed=7))
    assert first != list(traffic.demo_messages(300, seed=8))


# A demo user meets the server's connection limit: the refusal names the serve flag


async def test_the_max_connections_refusal_names_the_cli_flag(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import json

    from websockets.exceptions import InvalidStatus

    caplog.set_level("WARNING", logger="gathering_lab.websocket.server")
    async with running_server(max_connections=1) as server:
        async with connect(f"{server.url}?client_id=first") as first:
            await recv_json(first)
            with pytest.raises(InvalidStatus) as refused:
                async with connect(f"{server.url}?client_id=second", open_timeout=timeout(5)):
                    pass
            with pytest.raises(ConnectionFailed, match="HTTP 503"):
                await run_demo(server.url, count=1)
    body = json.loads(refused.value.response.body or b"")
    assert body["code"] == "max_connections"  # the machine-readable code is unchanged
    assert "(serve --max-connections, max_connections= in Python)" in body["error"]
    lines = [r.getMessage() for r in caplog.records if "refused a connection" in r.getMessage()]
    assert lines and "--max-connections (max_connections=) reached" in lines[0], lines
    assert "max_connections reached" not in lines[0]


# Over the server's publish rate: held back, nothing lost, order kept


async def test_run_demo_as_fast_as_possible_paces_under_a_known_publish_rate() -> None:
    bus = EventBus()
    count = 150
    async with running_server(bus=bus, publish_rate=200, publish_burst=50) as server:
        with capture_events(bus) as published:
            result = await asyncio.wait_for(
                run_demo(server.url, count=count, rate=0, client_id="fast"), timeout(20)
            )
        stats = server.get_stats()
    # The stats are public: the demo paced itself under the rate and was never refused.
    assert (result.sent, result.acked, result.errors, result.unanswered) == (count, count, 0, 0)
    assert result.paced_at == pytest.approx(180) and result.retried == 0
    assert result.held_back == result.paced > 0
    assert stats["publishes_rate_limited"] == 0
    expected = list(demo_messages(count))
    assert [(e.type, e.data) for e in published] == [(p["type"], p["data"]) for p in expected]
    # 25 at once (half the burst), then 180/s.
    assert result.elapsed >= (count - 25) / 180 * 0.9
    assert result.effective_rate == pytest.approx(count / result.elapsed)


async def test_run_demo_refused_with_rate_limited_resends_in_order_and_loses_nothing() -> None:
    auth = pytest.importorskip("gathering_lab.auth")
    secret = "s" * 32
    token = auth.mint_token(secret, "demo-bot", "subscribe,publish")  # no admin: no stats
    bus = EventBus()
    count = 200
    server_options = {"bus": bus, "auth": auth.JWTAuth(secret), "publish_rate": 200}
    async with running_server(**server_options, publish_burst=20) as server:
        with capture_events(bus) as published:
            result = await asyncio.wait_for(
                run_demo(server.url, count=count, rate=0, token=token), timeout(20)
            )
        stats = server.get_stats()
    # Every event published once, in the story's order; no refusal counted as an error.
    assert (result.sent, result.acked, result.errors, result.unanswered) == (count, count, 0, 0)
    expected = list(demo_messages(count))
    assert [(e.type, e.data) for e in published] == [(p["type"], p["data"]) for p in expected]
    # Held back (and says how often), then paced under the rate the refusal named.
    assert result.retried > 0 and result.retried == stats["publishes_rate_limited"]
    assert result.retried < 20, result.retried  # paced after the first refusal
    assert result.paced_at == pytest.approx(180)
    assert result.elapsed >= (count - 20) / 200 * 0.9


async def test_demo_cli_reports_the_times_it_was_held_back() -> None:
    import os
    import re
    import sys

    auth = pytest.importorskip("gathering_lab.auth")
    secret = "s" * 32
    token = auth.mint_token(secret, "demo-bot", "subscribe,publish")  # no admin: no stats
    options = {"auth": auth.JWTAuth(secret), "publish_rate": 100, "publish_burst": 10}
    async with running_server(**options) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "gathering_lab", "demo", "--url", server.url, "--count", "60", "--rate", "0"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "GATHERING_LAB_TOKEN": token},
        )
        try:
            _, err = await asyncio.wait_for(process.communicate(), timeout(30))
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
    text = err.decode()
    assert process.returncode == 0, text
    assert re.search(r"demo: 60 sent, 60 acked, 0 errors, [\d.]+ ev/s, .*held back [1-9]", text)
    last = text.splitlines()[-1]
    assert re.match(
        r"^demo: held back [1-9]\d* times by the server's publish rate: \d+ paced at 90 ev/s, "
        r"[1-9]\d* refused \(rate_limited\) and sent again in order; 60 published at "
        r"[\d.]+ ev/s effective$",
        last,
    ), text
