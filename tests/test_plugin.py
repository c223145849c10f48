"""The pytest plugin (gathering_server, gathering_client, gathering_bus) as a user meets it.

The user-side tests run a test file in a pytest SUBPROCESS (pytester), in a directory with
no conftest and no asyncio configuration, as a project that only installed the package.
Until the package is (re)installed with its ``pytest11`` entry point, the subprocess loads
the plugin with ``-p``; once installed, it runs exactly as a user's would, with nothing.
"""

from __future__ import annotations

import importlib.metadata
import socket
import threading

import pytest

from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import ConnectionFailed
from gathering_lab.pytest_plugin import (
    SHOWN_ON_TIMEOUT,
    EventLog,
    EventsNotReceived,
    GatheringClient,
    GatheringServer,
)
from gathering_lab.testing import timeout

pytest_plugins = ["pytester"]

ENTRY_POINT = "gathering_lab"


def _declared() -> bool:
    return any(ep.name == ENTRY_POINT for ep in importlib.metadata.entry_points(group="pytest11"))


#: ``-p`` while the entry point is not installed (loading it twice would be an error).
PLUGIN_ARGS: tuple[str, ...] = () if _declared() else ("-p", "gathering_lab.pytest_plugin")
SUBPROCESS_TIMEOUT = timeout(120)


def run_user_tests(pytester: pytest.Pytester, *args: str) -> pytest.RunResult:
    """Run the test files made in ``pytester`` in a subprocess, as a user's project would."""
    # Errors in the server's thread or unclosed sockets would show up as these warnings.
    # fmt: off
    return pytester.runpytest_subprocess(
        *PLUGIN_ARGS, "-p", "no:cacheprovider",
        "-W", "error::pytest.PytestUnraisableExceptionWarning", "-W", "error::ResourceWarning",
        *args, timeout=SUBPROCESS_TIMEOUT,
    )
    # fmt: on


def test_the_pytest11_entry_point_is_declared() -> None:
    """``pip install gathering-lab`` is enough: pytest loads the plugin by its entry point."""
    points = {ep.name: ep.value for ep in importlib.metadata.entry_points(group="pytest11")}
    assert points.get(ENTRY_POINT) == "gathering_lab.pytest_plugin", (
        "the pytest11 entry point is not installed: reinstall the package (pip install -e .)"
    )


USER_TESTS = """
from pathlib import Path

import pytest

from gathering_lab.events import Event


def test_sync(gathering_server, gathering_client):
    gathering_server.publish("task.created", {"title": "sync"}, circle_id=1)
    [event] = gathering_client.wait_for("task.created", circle_id=1)
    assert event["data"] == {"title": "sync"}
    ack = gathering_client.publish("agent.started", {"agent_id": 7})
    assert ack["seq"] == 2
    published = gathering_server.wait_for(count=2)
    assert [e["type"] for e in published] == ["task.created", "agent.started"]


MARK
async def test_async(gathering_server, gathering_client, gathering_bus):
    await gathering_bus.publish(Event("task.created", {"title": "async"}))
    await gathering_client.publish_async("agent.started", {"agent_id": 8})
    events = await gathering_client.wait_for_async(count=2)
    assert [e["type"] for e in events] == ["task.created", "agent.started"]
    assert gathering_server.stats()["bus"]["events_published"] == 2
    Path("async_test_ran").write_text("yes")
"""


@pytest.mark.parametrize(
    ("mode", "mark", "options"),
    [
        ("no asyncio configuration", "", ()),
        ("pytest-asyncio strict, marked", "@pytest.mark.asyncio", ()),
        ("pytest-asyncio auto", "", ("-o", "asyncio_mode=auto")),
    ],
)
def test_a_users_sync_and_async_tests_pass(
    pytester: pytest.Pytester, mode: str, mark: str, options: tuple[str, ...]
) -> None:
    pytester.makepyfile(test_user=USER_TESTS.replace("MARK", mark))
    result = run_user_tests(pytester, *options)
    result.assert_outcomes(passed=2)
    # The async test ran to its end (a coroutine never awaited would not get there).
    assert (pytester.path / "async_test_ran").read_text() == "yes", mode


FAILING_WAITS = """
def test_waits_in_vain(gathering_server, gathering_client):
    gathering_server.publish("task.created", {"title": "only this"})
    gathering_client.wait_for("agent.started", count=2, timeout=0.5)


async def test_waits_in_vain_async(gathering_server):
    gathering_server.publish("task.created", {"title": "async one"}, circle_id=3)
    await gathering_server.wait_for_async("agent.*", timeout=0.5)
"""


def test_a_wait_that_times_out_says_what_arrived(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_waits=FAILING_WAITS)
    result = run_user_tests(pytester)
    result.assert_outcomes(failed=2)
    result.stdout.fnmatch_lines(
        [
            "*gathering_client.wait_for(*",  # the user's line, not the plugin's insides
            "E*EventsNotReceived: gathering_client 'pytest': waited *s for 2 event(s) matching"
            " type='agent.started'; 0 matched, 1 arrived in all:",
            "E*seq=1 task.created data={'title': 'only this'}",
            "test_waits.py:3: EventsNotReceived",
        ]
    )
    result.stdout.fnmatch_lines(
        [
            "E*EventsNotReceived: gathering_server: waited *s for 1 event(s) matching"
            " type='agent.*'; 0 matched, 1 arrived in all:",
            "E*seq=1 task.created circle_id=3 data={'title': 'async one'}",
        ]
    )
    assert "pytest_plugin.py" not in result.stdout.str()


STOPPED = """
import socket
import threading

ports = []


def test_serves(gathering_server):
    ports.append(gathering_server.port)
    with socket.create_connection(("127.0.0.1", gathering_server.port), timeout=5):
        pass


async def test_serves_async(gathering_client):
    ports.append(gathering_client.server.port)
    assert await gathering_client.ping_async() > 0


def test_each_server_was_stopped_after_its_test():
    assert len(ports) == 2 and ports[0] != ports[1]
    for port in ports:
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still open"
    assert [t.name for t in threading.enumerate() if t.name == "gathering-lab"] == []
"""


def test_the_server_is_stopped_and_its_port_closed(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_stopped=STOPPED)
    result = run_user_tests(pytester)
    result.assert_outcomes(passed=3)


# In-process: the project's own tests get the same fixtures (conftest loads the plugin).


def test_wait_for_matches_type_pattern_ids_data_and_predicate(
    gathering_server: GatheringServer, gathering_client: GatheringClient
) -> None:
    gathering_server.publish("task.created", {"title": "a", "n": 1}, circle_id=1)
    gathering_server.publish("task.updated", {"title": "a", "n": 2}, circle_id=2)
    gathering_server.publish("agent.started", {"agent_id": 7}, project_id="p")
    assert len(gathering_client.wait_for("task.*", count=2)) == 2
    assert [e["seq"] for e in gathering_client.wait_for(circle_id=2)] == [2]
    assert [e["seq"] for e in gathering_client.wait_for(data={"title": "a"}, count=2)] == [1, 2]
    [started] = gathering_client.wait_for(project_id="p", where=lambda e: e["seq"] > 2)
    assert started["type"] == "agent.started"
    assert gathering_client.events.matching("agent.*") == [started]
    # The server's record is every event on its bus, whoever published it.
    assert len(gathering_server.events) == 3


def test_bad_criteria_are_refused_clearly(gathering_server: GatheringServer) -> None:
    with pytest.raises(ValueError, match="count must be an integer >= 1, not 0"):
        gathering_server.wait_for(count=0)
    with pytest.raises(ValueError, match="invalid event type pattern 'no spaces'"):
        gathering_server.wait_for("no spaces")
    with pytest.raises(TypeError, match="unknown criterion 'circle'"):
        gathering_server.wait_for(circle=1)
    with pytest.raises(TypeError, match="data must be a dict of the keys to match, not list"):
        gathering_server.wait_for(data=["title"])


async def test_the_bus_fixture_is_the_servers_bus(
    gathering_server: GatheringServer, gathering_client: GatheringClient, gathering_bus: EventBus
) -> None:
    assert gathering_bus is gathering_server.bus
    # From this test's loop, the bus hands the event to the server's loop.
    published = await gathering_bus.publish(Event("task.created", {"title": "from the bus"}))
    assert published.seq == 1
    [received] = await gathering_client.wait_for_async("task.created")
    assert received["event_id"] == published.id
    assert gathering_client.frame.counts().to_dict() == {"task.created": 1}


def test_the_timeout_message_shows_the_latest_events() -> None:
    log = EventLog("log")
    for seq in range(1, SHOWN_ON_TIMEOUT + 6):
        log.append({"type": "tick", "seq": seq, "data": {}})
    with pytest.raises(EventsNotReceived) as caught:
        log.wait_for("tock", timeout=0.05)
    message = str(caught.value)
    assert f"0 matched, {SHOWN_ON_TIMEOUT + 5} arrived in all" in message
    assert "... 5 earlier event(s) not shown" in message
    assert "seq=5 tick" not in message and f"seq={SHOWN_ON_TIMEOUT + 5} tick" in message
    assert isinstance(caught.value, TimeoutError)


class TestServerOptions:
    @pytest.fixture
    def gathering_server_options(self) -> dict[str, object]:
        return {"max_connections": 1}

    def test_options_reach_the_server(
        self, gathering_server: GatheringServer, gathering_client: GatheringClient
    ) -> None:
        with pytest.raises(ConnectionFailed, match="503 Service Unavailable"):
            gathering_server.connect("second", reconnect=False)
        assert gathering_client.ping() > 0


def test_a_server_started_inside_a_running_loop_still_gets_its_own_thread() -> None:
    import asyncio

    async def start() -> GatheringServer:
        return GatheringServer().start()

    server = asyncio.run(start())  # that loop is gone now; the server is not
    try:
        assert server.loop.is_running() and server.lab.mode == "thread"
        client = server.connect()
        server.publish("task.created", {"title": "after"})
        assert client.wait_for("task.created")[0]["data"] == {"title": "after"}
    finally:
        server.stop()
    with socket.socket() as sock:
        assert sock.connect_ex(("127.0.0.1", server.port)) != 0
    assert not [t for t in threading.enumerate() if t.name == "gathering-lab"]
