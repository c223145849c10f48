"""The guide's own code (websocket-quickstart sections 3 and 4), run against gathering_lab."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from websockets.asyncio.client import connect

from gathering_lab.events import Event, EventType, event_bus
from gathering_lab.testing import recv_json, timeout
from gathering_lab.websocket import get_connection_manager, serve
from gathering_lab.websocket.integration import (
    DEFAULT_BROADCAST_EVENTS,
    setup_custom_broadcasting,
    setup_websocket_broadcasting,
    teardown_broadcasting,
)
from gathering_lab.websocket.server import Server

GUIDE_CLIENT = Path(__file__).parent / "guide" / "section3_client.py"


@pytest.fixture
def cli_server() -> Iterator[int]:
    """`gathering-lab serve` in a subprocess; yields its port."""
    process = subprocess.Popen(
        [sys.executable, "-m", "gathering_lab", "serve", "--port", "0", "--log-level", "warning"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        port = None
        for _ in range(20):  # the banner is a handful of lines
            line = process.stdout.readline()
            found = re.search(r"WebSocket\s+ws://127\.0\.0\.1:(\d+)/ws/dashboard", line)
            if found:
                port = int(found.group(1))
                break
        assert port, "gathering-lab serve did not print its URL"
        yield port
    finally:
        process.terminate()
        _, err = process.communicate(timeout=timeout(10))
    assert process.returncode == 0, err


async def test_section3_python_client_runs_unchanged_against_the_cli_server(
    cli_server: int, tmp_path: Path
) -> None:
    source = GUIDE_CLIENT.read_text()
    script = tmp_path / "client.py"
    script.write_text(
        source.replace("localhost:8000", f"localhost:{cli_server}").replace(
            "timeout=10.0", "timeout=1.0"
        )
    )
    client = await asyncio.create_subprocess_exec(
        sys.executable, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    assert client.stdout is not None
    first = await asyncio.wait_for(client.stdout.readline(), timeout(10))
    assert first.startswith(b"Connected: {'type': 'connection.established'")
    assert b"'client_id': 'python-test'" in first
    pong = await asyncio.wait_for(client.stdout.readline(), timeout(10))
    assert pong.startswith(b"Pong: {'type': 'pong', 'timestamp': '")
    # Generate events from another client, as the guide's step 4 does.
    async with connect(f"ws://127.0.0.1:{cli_server}/ws/dashboard?client_id=gen") as gen:
        await recv_json(gen)
        await gen.send(
            json.dumps(
                {
                    "type": "publish",
                    "data": {
                        "type": "agent.started",
                        "data": {"agent_id": 1, "name": "Alice"},
                        "source_agent_id": 1,
                    },
                }
            )
        )
        await recv_json(gen)
    out, err = await asyncio.wait_for(client.communicate(), timeout(15))
    lines = (first + pong + out).decode().splitlines()
    assert lines[2] == "Event: agent.started - {'agent_id': 1, 'name': 'Alice'}"
    assert lines[-1] == "Timeout - no more events"
    assert client.returncode == 0, err.decode()


@pytest.fixture
async def guide_server() -> AsyncIterator[Server]:
    """A server on the process-wide bus and manager, broadcasting only what setup enables."""
    server = await serve(port=0, broadcast=False)
    try:
        yield server
    finally:
        teardown_broadcasting()
        server.close()
        await server.wait_closed()


async def receive_types(server: Server, publish: list[Event]) -> list[tuple[str, object]]:
    """Publish on the global bus and return what a client received (type, circle)."""
    async with connect(f"{server.url}?client_id=guide") as ws:
        await recv_json(ws)
        for event in publish:
            await event_bus.publish(event)
        await event_bus.publish(Event(type="test.marker"))  # never broadcast: ends the wait
        got: list[tuple[str, object]] = []
        try:
            while True:
                message = json.loads(await asyncio.wait_for(ws.recv(), timeout(0.5)))
                got.append((message["type"], message["circle_id"]))
        except TimeoutError:
            return got


async def test_section3_event_from_the_bus_has_the_documented_shape(guide_server: Server) -> None:
    setup_websocket_broadcasting()
    async with connect(f"{guide_server.url}?client_id=python-test") as ws:
        await recv_json(ws)
        await event_bus.publish(
            Event(
                type=EventType.AGENT_STARTED,
                data={"agent_id": 1, "name": "Alice", "competencies": ["python", "react"]},
                source_agent_id=1,
            )
        )
        message = await recv_json(ws)
    expected = {
        "type": "agent.started",
        "data": {"agent_id": 1, "name": "Alice", "competencies": ["python", "react"]},
        "source_agent_id": 1,
        "circle_id": None,
        "project_id": None,
    }
    assert {k: message[k] for k in expected} == expected
    assert re.fullmatch(r"evt_[0-9a-f]{24}", message["event_id"])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", message["timestamp"])


async def test_broadcast_false_sends_nothing_until_setup(guide_server: Server) -> None:
    assert await receive_types(guide_server, [Event(type=EventType.TASK_CREATED)]) == []


async def test_section4_option1_default_events(guide_server: Server) -> None:
    setup_websocket_broadcasting()
    got = await receive_types(
        guide_server,
        [Event(type=EventType.TASK_CREATED), Event(type=EventType.MEMORY_CREATED)],
    )
    assert EventType.MEMORY_CREATED not in DEFAULT_BROADCAST_EVENTS
    assert got == [("task.created", None)]


async def test_section4_option2_chosen_events(guide_server: Server) -> None:
    setup_websocket_broadcasting(
        event_types=[EventType.AGENT_STARTED, EventType.TASK_CREATED, EventType.TASK_COMPLETED]
    )
    got = await receive_types(
        guide_server,
        [
            Event(type=EventType.AGENT_STARTED),
            Event(type=EventType.TASK_FAILED),
            Event(type=EventType.TASK_COMPLETED),
        ],
    )
    assert [t for t, _ in got] == ["agent.started", "task.completed"]


async def test_section4_option3_filtered(guide_server: Server) -> None:
    setup_custom_broadcasting(EventType.TASK_COMPLETED, filter_fn=lambda e: e.circle_id == 1)
    got = await receive_types(
        guide_server,
        [
            Event(type=EventType.TASK_COMPLETED, circle_id=1),
            Event(type=EventType.TASK_COMPLETED, circle_id=2),
            Event(type=EventType.TASK_CREATED, circle_id=1),
        ],
    )
    assert got == [("task.completed", 1)]


async def test_setup_twice_never_double_sends(guide_server: Server) -> None:
    setup_websocket_broadcasting()
    setup_websocket_broadcasting()
    setup_websocket_broadcasting(event_types=[EventType.TASK_CREATED])
    setup_custom_broadcasting(EventType.TASK_CREATED)
    got = await receive_types(guide_server, [Event(type=EventType.TASK_CREATED)])
    assert got == [("task.created", None)]


async def test_setup_with_a_broadcasting_server_never_double_sends() -> None:
    async with serve(port=0) as server:  # broadcast=True, global bus and manager
        setup_websocket_broadcasting()
        try:
            got = await receive_types(server, [Event(type=EventType.TASK_CREATED)])
        finally:
            teardown_broadcasting()
    assert got == [("task.created", None), ("test.marker", None)]
    assert get_connection_manager().active_connections == 0


def test_setup_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match="list of event types"):
        setup_websocket_broadcasting(event_types="task.created")
    with pytest.raises(TypeError, match="callable"):
        setup_custom_broadcasting(EventType.TASK_CREATED, filter_fn=3)  # type: ignore[arg-type]
