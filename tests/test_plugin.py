"""The pytest plugin (gathering_server, gathering_client, gathering_bus) as a user meets it.

The user-side tests run a test file in a pytest SUBPROCESS (pytester), in a directory with
no conftest and no asyncio configuration, as a project that only installed the package.
Until the package is (re)installed with its ``pytest11`` entry point, the subprocess loads
the plugin with ``-p``; once installed, it runs exactly as a user's would, with nothing.
"""

from __future__ import annotations

import importlib.metadata
import re
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

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


def test_a_server_that_fails_to_start_leaves_no_thread() -> None:
    with pytest.raises(ValueError, match="max_connections_per_ip must be an int >= 1"):
        GatheringServer(max_connections_per_ip=0).start()
    assert not [t for t in threading.enumerate() if t.name == "gathering-lab"]


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


# nbval: the shipped sanitize file makes notebooks of live events pass strict --nbval


ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "notebooks" / "templates" / "regression.ipynb"

#: What a user's notebook does: start a lab, publish, display events and the frame.
USER_NOTEBOOK_CELLS = [
    "import gathering_lab as gl\nlab = gl.start(port=0)\nclient = await lab.connect('notebook')",
    "lab",
    "lab.publish('task.created', {'title': 'write the docs'}, circle_id=1)",
    "ack = await client.publish('agent.started', {'agent_id': 7}, source_agent_id=7)\nack",
    "await client.wait_for_events(2)\nclient",
    "client.frame",
    "client.frame.df",
    "lab.bus.get_history()[-1].to_dict()",
    "print(client.server_info)",
    "lab.stop()",
]


def write_user_notebook(directory: Path) -> Path:
    """Write the user's notebook and run it once, saving its outputs as nbval's reference."""
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in USER_NOTEBOOK_CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    client = NotebookClient(
        notebook, timeout=int(timeout(120)), resources={"metadata": {"path": str(directory)}}
    )
    client.execute()
    path = directory / "my_events.ipynb"
    nbformat.write(notebook, path)
    return path


def sanitize_file() -> str:
    """What ``gathering-lab nbval-sanitize`` prints, run as a user runs it."""
    done = subprocess.run(
        [sys.executable, "-m", "gathering_lab", "nbval-sanitize"],
        capture_output=True,
        text=True,
        timeout=SUBPROCESS_TIMEOUT,
        check=True,
    )
    return done.stdout.strip()


def test_nbval_sanitize_prints_the_shipped_file() -> None:
    path = Path(sanitize_file())
    assert path.is_absolute() and path == ROOT / "gathering_lab" / "nbval_sanitize.cfg"
    from nbval.plugin import get_sanitize_patterns

    patterns = get_sanitize_patterns(path.read_text())
    assert len(patterns) >= 15  # every section parses as a regex/replace pair
    for regex, _ in patterns:
        re.compile(regex)


@pytest.mark.parametrize(
    ("text", "sanitized"),
    [
        ("id='evt_74d3ff8084190000539e812f', seq=12", "id='evt_<id>', seq=<seq>"),
        ("{'last_seq': 7, \"seq\": 8}", "{'last_seq': <seq>, \"seq\": <seq>}"),
        ("epoch='f65637988060'", "epoch='<epoch>'"),
        ("2026-11-30T08:10:16.215629Z", "<timestamp>"),
        ("2026-11-30 08:10:16,123 INFO lab", "<timestamp> INFO lab"),
        ("<td>08:10:16.215</td>", "<td><time></td>"),
        ("events-notebook-20261130-081016-215629.csv", "events-notebook-<stamp>.csv"),
        ("2026-11-30 08:10:16+00:00 and 2026-11-30T08:10:16.2+0530", "<timestamp> and <timestamp>"),
        (
            "datetime.datetime(2026, 11, 30, 8, 10, 16, 215629, tzinfo=datetime.timezone.utc)",
            "<datetime>",
        ),
        ("ws://127.0.0.1:42591/ws/dashboard", "ws://127.0.0.1:<port>/ws/dashboard"),
        ("'remote': '127.0.0.1:34244'", "'remote': '127.0.0.1:<port>'"),
        ("'id': 'vm-5087-42591'", "'id': '<node id>'"),
        ("client-3-9f86d081 client-w2-1-0a1b2c3d", "client-<id> client-w2-<id>"),
        ("took 0.52s, in 3.1 ms", "took <duration>, in <duration>"),
        (
            "ReplayResult(total=2, elapsed=0.0034, x=1)",
            "ReplayResult(total=2, elapsed=<duration>, x=1)",
        ),
        ("100%|###| 200/200 [00:00<00:00, 2345.67it/s]", "100%|###| 200/200 [<elapsed>]"),
        ("<object at 0x7f13e7ba7550>", "<object at 0x<address>>"),
        ("'reported_at': 1796026216.5801115", "'reported_at': <unix time>"),
        ("Workbench(children=(HTML(value='3 events'),))", "Workbench(<widget>)"),
        ("0  {'title': 'x'}       3.273  notebook", "0 {'title': 'x'} <latency> notebook"),
        (
            "<td>{'title': 'x'}</td>\n      <td>0.180</td>",
            "<td>{'title': 'x'}</td>\n <td><latency></td>",
        ),
        ("circle_id=1 count 20 rate=20.0", "circle_id=1 count 20 rate=20.0"),  # left alone
    ],
)
def test_the_sanitize_file_masks_what_varies(text: str, sanitized: str) -> None:
    from nbval.plugin import get_sanitize_patterns

    for regex, replace in get_sanitize_patterns(Path(sanitize_file()).read_text()):
        text = re.sub(regex, replace, text)
    assert text == sanitized


@pytest.mark.slow
@pytest.mark.timeout(int(timeout(600)))  # three pytest runs, each starting two kernels
def test_notebooks_pass_strict_nbval_twice_with_the_sanitize_file(
    pytester: pytest.Pytester,
) -> None:
    """The template and a user's notebook of live events pass ``--nbval`` run after run."""
    user_notebook = write_user_notebook(pytester.path)
    sanitize = sanitize_file()
    cells = sum(cell.cell_type == "code" for cell in _cells(TEMPLATE)) + len(USER_NOTEBOOK_CELLS)
    for run in (1, 2):
        # fmt: off
        result = pytester.runpytest_subprocess(
            "--nbval", "--nbval-sanitize-with", sanitize, "-p", "no:cacheprovider",
            str(TEMPLATE), str(user_notebook), timeout=SUBPROCESS_TIMEOUT,
        )
        # fmt: on
        assert result.parseoutcomes() == {"passed": cells}, (run, result.stdout.str()[-3000:])
    # Without the sanitize file the same notebooks fail: the outputs do vary.
    result = pytester.runpytest_subprocess(
        "--nbval", "-p", "no:cacheprovider", str(TEMPLATE), str(user_notebook),
        timeout=SUBPROCESS_TIMEOUT,
    )  # fmt: skip
    assert result.parseoutcomes().get("failed", 0) >= 4, result.stdout.str()[-3000:]


def _cells(path: Path) -> list[Any]:
    import nbformat

    return list(nbformat.read(path, as_version=4).cells)
