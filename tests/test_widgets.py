"""The widgets, driven from Python without a browser, against a real lab and a real client.

Widgets get a recording comm (as ipywidgets' own tests/utils.py does), so tests can also
count what would have been sent to the front end.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import comm
import ipywidgets
import pytest
from traitlets import TraitError

import gathering_lab as gl
from gathering_lab.events import Event, EventBus
from gathering_lab.frame import EventFrame, read_csv, read_parquet
from gathering_lab.protocol import Filters
from gathering_lab.testing import capture_events, free_port, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager
from gathering_lab.widgets import (
    ConnectPanel,
    Controller,
    EventGrid,
    ExportPanel,
    FilterPanel,
    LiveLog,
    Notifications,
    PublishPanel,
    RateChart,
    StatsPanel,
    Workbench,
)

_comm_ids = itertools.count(1)


class RecordingComm:
    """Stands in for a kernel comm: keeps every message a widget sends."""

    kernel = "Truthy"

    def __init__(self, **kwargs: Any) -> None:
        self.comm_id = f"comm-{next(_comm_ids)}"
        self.messages: list[dict[str, Any]] = []

    def open(self, *args: Any, **kwargs: Any) -> None:
        pass

    def on_msg(self, *args: Any, **kwargs: Any) -> None:
        pass

    def send(self, data: Any = None, buffers: Any = None, **kwargs: Any) -> None:
        self.messages.append(data)

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass

    def updates(self, key: str) -> int:
        """How many state updates carried ``key``."""
        return sum(1 for m in self.messages if key in (m or {}).get("state", {}))


@pytest.fixture(autouse=True)
def recording_comm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(comm, "create_comm", lambda **kwargs: RecordingComm(**kwargs))


@pytest.fixture
async def lab(bus: EventBus, manager: ConnectionManager) -> AsyncIterator[gl.Lab]:
    lab = gl.start(port=0, bus=bus, manager=manager)
    await lab.wait_started()
    yield lab
    server, clients = lab.server, list(lab.clients)
    lab.stop()
    if server is not None:
        await server.wait_closed()
    await wait_for(lambda: all(c.status == "closed" for c in clients))


@pytest.fixture
def closing() -> Iterator[Callable[..., Any]]:
    """Register widgets to close at the end of the test (before the lab stops)."""
    opened: list[ipywidgets.Widget] = []

    def track(*widgets: ipywidgets.Widget) -> Any:
        opened.extend(widgets)
        return widgets[0] if len(widgets) == 1 else widgets

    yield track
    for widget in reversed(opened):
        widget.close()


async def connected(controller: Controller, client_id: str = "test") -> gl.LabClient:
    future = controller.connect(client_id=client_id)
    await asyncio.wrap_future(future)
    assert controller.client is not None
    return controller.client


# Connect


async def test_connect_panel_connects_and_shows_status(
    lab: gl.Lab, closing: Callable[..., Any]
) -> None:
    panel = closing(ConnectPanel(lab))
    assert panel.url_input.value == lab.url
    assert "not connected" in panel.status_label.value

    panel.client_id_input.value = "panel-1"
    panel.connect_button.click()
    await wait_for(lambda: panel.status == "connected")
    assert "● connected" in panel.status_label.value
    client = panel.controller.client
    assert client is not None and client.client_id == "panel-1"
    assert [s["client_id"] for s in lab.stats()["clients"]] == ["panel-1"]

    panel.disconnect_button.click()
    await wait_for(lambda: panel.status == "closed")
    assert "closed" in panel.status_label.value


async def test_connect_panel_reports_bad_url_and_refused_connection(
    closing: Callable[..., Any],
) -> None:
    panel = closing(ConnectPanel(None))
    panel.url_input.value = "http://example.com"
    assert panel.connect_button.disabled
    assert "the URL must look like" in panel.error_label.value

    panel.url_input.value = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    assert not panel.connect_button.disabled
    panel.connect_button.click()
    await wait_for(lambda: panel.status.startswith("failed"))
    assert "connection refused" in panel.status_label.value


async def test_connect_panel_sends_a_token(
    bus: EventBus, manager: ConnectionManager, closing: Callable[..., Any]
) -> None:
    from gathering_lab.auth import JWTAuth, mint_token

    secret = "s" * 32
    lab = gl.start(port=0, bus=bus, manager=manager, auth=JWTAuth(secret))
    try:
        await lab.wait_started()
        panel = closing(ConnectPanel(lab))
        panel.connect_button.click()  # no token: refused before any event
        await wait_for(lambda: panel.status.startswith("failed"))
        assert "1008" in panel.status
        panel.token_input.value = mint_token(secret, "alice", ["subscribe"], circles=[1])
        panel.connect_button.click()
        await wait_for(lambda: panel.status == "connected")
        client = panel.controller.client
        assert client is not None and client.client_id == "alice"  # the token names it
        assert [s["client_id"] for s in lab.stats()["clients"]] == ["alice"]
        panel.disconnect_button.click()
        await wait_for(lambda: panel.status == "closed")
    finally:
        lab.stop()


# Publish


async def test_publish_panel_publishes_through_the_client(
    lab: gl.Lab, bus: EventBus, closing: Callable[..., Any]
) -> None:
    controller = Controller(lab)
    client = await connected(controller)
    panel = closing(PublishPanel(controller))
    panel.type_input.value = "task.created"
    panel.data_input.value = '{"title": "Write the guide", "priority": 2}'
    panel.agent_input.value = "7"
    panel.circle_input.value = "1"
    panel.project_input.value = "alpha"
    assert panel.error == "" and not panel.publish_button.disabled

    panel.publish_button.click()
    await wait_for(lambda: panel.published == 1)

    (event,) = bus.get_history()
    assert event.type_name == "task.created"
    assert event.data == {"title": "Write the guide", "priority": 2}
    assert (event.source_agent_id, event.circle_id, event.project_id) == (7, 1, "alpha")
    assert panel.last_result == {
        "type": "task.created",
        "via": "client",
        "event_id": event.id,
        "seq": event.seq,
    }
    assert f"seq {event.seq}" in panel.result_label.value
    assert event.id in panel.result_label.value
    await client.wait_for_events(1)
    assert client.frame.df["type"].tolist() == ["task.created"]
    controller.close()


async def test_publish_panel_validates_as_you_type(closing: Callable[..., Any]) -> None:
    panel = closing(PublishPanel(None))
    assert panel.error == ""

    panel.data_input.value = '{"title": "x",'
    assert panel.error.startswith("invalid JSON: ")
    assert "line 1" in panel.error
    assert "invalid JSON" in panel.error_label.value
    assert panel.publish_button.disabled

    panel.data_input.value = "[1, 2]"
    assert panel.error == "data must be a JSON object {...}, not list"

    panel.data_input.value = '{"ok": true}'
    assert panel.error == "" and not panel.publish_button.disabled

    panel.type_input.value = "Task Created"
    assert "invalid event type 'Task Created'" in panel.error
    assert "invalid event type" in panel.error_label.value
    assert panel.publish_button.disabled

    panel.type_input.value = "deploy.finished"  # custom dotted types are fine
    assert panel.error == ""

    panel.circle_input.value = "two words"
    assert "circle id must be" in panel.error
    panel.circle_input.value = ""
    assert panel.error == "" and panel.error_label.value == ""


async def test_publish_click_from_another_thread_runs_on_the_labs_loop(
    lab: gl.Lab, bus: EventBus, closing: Callable[..., Any]
) -> None:
    controller = Controller(lab)
    await connected(controller)
    panel = closing(PublishPanel(controller, event_type="agent.started", data={"agent_id": 1}))
    seen: list[tuple[int, asyncio.AbstractEventLoop]] = []
    bus.subscribe("*", lambda e: seen.append((threading.get_ident(), asyncio.get_running_loop())))

    clicker = threading.Thread(target=panel.publish_button.click, name="subshell-like")
    clicker.start()
    clicker.join(timeout(5))
    assert not clicker.is_alive()

    await wait_for(lambda: panel.published == 1)
    assert seen == [(threading.get_ident(), asyncio.get_running_loop())]
    assert bus.get_history()[0].data == {"agent_id": 1}
    assert "published agent.started" in panel.result_label.value
    controller.close()


async def test_publish_panel_without_a_client_publishes_on_the_labs_bus(
    lab: gl.Lab, bus: EventBus, closing: Callable[..., Any]
) -> None:
    panel = closing(PublishPanel(lab, event_type="memory.created", data={"k": "v"}))
    with capture_events(bus) as captured:
        panel.publish_button.click()
        await wait_for(lambda: panel.published == 1)
    assert [e.type_name for e in captured] == ["memory.created"]
    assert panel.last_result["via"] == "lab"
    assert panel.last_result["seq"] == captured[0].seq


async def test_publish_panel_shows_why_it_could_not_publish(closing: Callable[..., Any]) -> None:
    panel = closing(PublishPanel(None))
    panel.publish_button.click()
    await wait_for(lambda: "error" in panel.last_result)
    assert "not connected" in panel.last_result["error"]
    assert "not published: not connected" in panel.result_label.value
    assert panel.published == 0


# Filter and live log


def _publish_mix(lab: gl.Lab) -> None:
    lab.publish("task.created", {"title": "a"}, circle_id=1)
    lab.publish("agent.started", {"agent_id": 1}, circle_id=1)
    lab.publish("task.conflict.detected", {"tasks": [1, 2]}, circle_id=2)
    lab.publish("task.completed", {"title": "a"}, circle_id=1, project_id=9)


async def test_filter_panel_filters_the_live_view_locally(
    lab: gl.Lab, closing: Callable[..., Any]
) -> None:
    controller = Controller(lab)
    client = await connected(controller)
    log = closing(LiveLog(controller))
    panel = closing(FilterPanel(controller))
    link = ipywidgets.dlink((panel, "filters"), (log, "filters"))
    _publish_mix(lab)
    await client.wait_for_events(4)
    await wait_for(lambda: log.total == 4)
    assert "agent.started" in log.view.value

    panel.types_input.value = "task.*"
    assert panel.filters == Filters(("task.*",))
    await wait_for(lambda: log.total == 3)
    assert "task.conflict.detected" in log.view.value
    assert "agent.started" not in log.view.value

    panel.circle_input.value = "1"
    await wait_for(lambda: log.total == 2)
    assert "task.conflict.detected" not in log.view.value
    assert "task.completed" in log.view.value and "task.created" in log.view.value

    panel.types_input.value = "Task*"
    assert "invalid event type pattern 'Task*'" in panel.error
    assert "invalid event type pattern" in panel.error_label.value
    assert panel.subscribe_button.disabled
    assert panel.filters == Filters(("task.*",), 1)  # the last valid filters stay

    panel.types_input.value = ""
    panel.circle_input.value = ""
    assert panel.filters is None
    await wait_for(lambda: log.total == 4)
    assert client.events_received == 4  # the server was never asked to filter
    link.unlink()
    controller.close()


async def test_filter_panel_subscribes_on_the_server(
    lab: gl.Lab, manager: ConnectionManager, closing: Callable[..., Any]
) -> None:
    controller = Controller(lab)
    client = await connected(controller)
    panel = closing(FilterPanel(controller))
    panel.types_input.value = "task.*"
    panel.project_input.value = "9"
    panel.subscribe_button.click()
    await wait_for(lambda: panel.subscribed is not None)
    assert panel.subscribed == Filters(("task.*",), None, 9)
    assert "the server now sends task.* · project 9" in panel.result_label.value
    (session,) = manager.sessions
    assert session.filters == Filters(("task.*",), None, 9)

    _publish_mix(lab)
    lab.publish("system.warning", {"message": "last"})
    await wait_for(lambda: lab.bus.last_seq == 5)
    await client.ping()  # everything sent before the pong has arrived
    assert client.frame.df["type"].tolist() == ["task.completed"]

    panel.unsubscribe_button.click()
    await wait_for(lambda: panel.subscribed is None and "everything" in panel.result_label.value)
    lab.publish("agent.stopped", {})
    await client.wait_for_events(2)
    assert client.frame.df["type"].tolist() == ["task.completed", "agent.stopped"]
    controller.close()


async def test_filter_panel_needs_a_client_to_subscribe(closing: Callable[..., Any]) -> None:
    panel = closing(FilterPanel(None))
    panel.types_input.value = "task.*"
    panel.subscribe_button.click()
    await wait_for(lambda: "not subscribed" in panel.result_label.value)
    assert "not connected" in panel.result_label.value
    assert panel.subscribed is None


async def test_live_log_redraws_at_most_five_times_a_second(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    log = closing(LiveLog(frame=frame, rows=10))
    await wait_for(lambda: log.renders == 1)  # the empty frame
    count = 10_000

    def feed() -> float:
        started = time.monotonic()
        for i in range(1, count + 1):
            frame.append({"type": "load.tick", "seq": i, "data": {"i": i}})
            if i % 500 == 0:
                time.sleep(0.02)  # about 10,000 events per second, over ~0.5 s
        return time.monotonic() - started

    started = time.monotonic()
    await asyncio.to_thread(feed)
    await wait_for(lambda: log.total == count)
    elapsed = time.monotonic() - started
    assert ">10000</td>" in log.view.value  # the last event is shown
    assert ">9991</td>" in log.view.value and ">9990</td>" not in log.view.value  # 10 rows
    assert "<b>load.tick</b> 10000" in log.view.value
    allowed = elapsed / log.controller.interval + 3
    assert log.renders <= allowed, (log.renders, elapsed)
    assert 1 < log.renders < 50  # a handful, nowhere near one per event
    assert log.view.comm.updates("value") <= log.renders  # one comm message per redraw


async def test_live_log_follows_clear_and_rows(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    log = closing(LiveLog(frame=frame, rows=3))
    frame.extend({"type": "a.b", "seq": i} for i in range(1, 6))
    await wait_for(lambda: log.total == 5)
    assert ">5</td>" in log.view.value and ">2</td>" not in log.view.value
    log.rows = 5
    await wait_for(lambda: ">1</td>" in log.view.value)
    frame.clear()
    await wait_for(lambda: log.total == 0)
    with pytest.raises(TraitError, match="rows must be between 1 and 500"):
        log.rows = 0


async def test_close_stops_the_render_task(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    log = LiveLog(frame=frame)
    await wait_for(lambda: log.renders == 1)
    ticker = log.controller._ticker
    assert ticker is not None and not ticker.done()
    log.close()
    await wait_for(ticker.done)
    assert ticker.cancelled()
    assert log.controller.closed


# Chart and grid


def _cells(grid: EventGrid, column: str) -> list[Any]:
    at = list(grid.columns).index(column)
    return [row[at] for row in grid.rows]


async def test_rate_chart_counts_events_per_second_by_type(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    chart = closing(RateChart(frame=frame, window=10))
    await wait_for(lambda: chart.updates >= 1)
    assert chart.names == [] and chart.rates() == {}
    now = time.time()
    second = int(now) - 3  # a complete second, inside the window
    for i in range(6):
        frame.append({"type": "task.created", "seq": i}, received_at=second + i / 10)
    for i in range(3):
        frame.append({"type": "agent.started", "seq": 10 + i}, received_at=second + 0.5 + i / 10)
    frame.append({"type": "task.created", "seq": 20}, received_at=second + 1.2)
    frame.append({"type": "task.created", "seq": 21}, received_at=now - 60)  # outside the window
    await wait_for(lambda: chart.names == ["task.created", "agent.started"])
    assert len(chart.times) == 10 and chart.times[-1] >= second + 2
    at = chart.times.index(second)
    assert [series[at] for series in chart.values] == [6, 3]
    assert [series[at + 1] for series in chart.values] == [1, 0]
    assert sum(map(sum, chart.values)) == 10  # the event of a minute ago is not drawn
    assert chart.comm.updates("values") <= chart.updates  # one message per update


async def test_rate_chart_adds_up_rare_types_as_other(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    chart = closing(RateChart(frame=frame, max_types=2))
    second = int(time.time()) - 2
    for kind in ("a.one", "a.two", "a.three", "a.four", "a.one"):
        frame.append({"type": kind}, received_at=second + 0.1)
    await wait_for(lambda: chart.names == ["a.one", "a.two", "other"])
    assert chart.other_types == 2
    at = chart.times.index(second)
    assert [series[at] for series in chart.values] == [2, 1, 2]


async def test_grid_shows_the_latest_rows_sorted_and_filtered(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    grid = closing(EventGrid(frame=frame, limit=5))
    kinds = ("task.created", "agent.started", "memory.created")
    for i in range(1, 31):
        frame.append(
            {"type": kinds[i % 3], "seq": i, "circle_id": i % 4, "data": {"title": f"job {i}"}}
        )
    frame.append({"type": "task.failed", "seq": 31, "data": {"error": "Timeout"}})
    await wait_for(lambda: _cells(grid, "seq") == [31, 30, 29, 28, 27])  # newest first, 5 rows
    assert "31 events (everything); latest 5 shown" in grid.status

    grid.sort_by = "seq"  # what a click on the header sends
    await wait_for(lambda: _cells(grid, "seq") == [27, 28, 29, 30, 31])
    grid.descending = True
    await wait_for(lambda: _cells(grid, "seq") == [31, 30, 29, 28, 27])
    grid.sort_by, grid.descending = "circle", False
    await wait_for(lambda: _cells(grid, "circle") == [0, 1, 2, 3, None])
    assert _cells(grid, "seq")[-1] == 31  # an empty cell sorts last

    # The filter searches the whole frame, not only the rows shown: "job 3" is old.
    grid.sort_by = ""
    grid.filter_text = "JOB 3"
    await wait_for(lambda: _cells(grid, "seq") == [30, 3])
    assert "containing 'JOB 3'" in grid.status
    grid.filter_text = "timeout"  # in the data column
    await wait_for(lambda: _cells(grid, "seq") == [31])
    grid.filter_text = ""
    grid.filters = Filters(("agent.*",))  # the Filter tab's filters, linked by the workbench
    await wait_for(lambda: _cells(grid, "type") == ["agent.started"] * 5)
    assert "agent.*" in grid.status

    frame.append({"type": "agent.started", "seq": 32})  # new rows keep the order asked for
    await wait_for(lambda: _cells(grid, "seq")[0] == 32)
    assert len(grid.rows) == 5
    frame.clear()
    await wait_for(lambda: grid.rows == [])


def test_grid_sorts_and_filters_like_its_front_end(tmp_path: Path) -> None:
    """event_grid.js re-applies sort and filter at once in the browser: same rules as arrange()."""
    import json
    import shutil
    import subprocess
    from importlib import resources

    from gathering_lab.widgets.charts import GRID_COLUMNS, arrange

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    script = resources.files("gathering_lab") / "static" / "event_grid.js"
    (tmp_path / "event_grid.mjs").write_text(script.read_text(encoding="utf-8"))
    rows = [
        [3, "10:00:00.003", "task.created", None, 2, "alpha", '{"n": 3}'],
        [2, "10:00:00.002", "agent.started", 7, None, 9, '{"n": 2}'],
        [1, "10:00:00.001", "Task.Failed", 7, 10, "beta", '{"error": "x"}'],
        [4, "10:00:00.004", "task.created", 1, 2, None, '{"n": 4}'],
    ]
    cases = [
        (column, descending, text)
        for column in ("", *GRID_COLUMNS)
        for descending in (False, True)
        for text in ("", "task", "7", "ZZZ")
    ]
    program = (
        "import { arrange } from './event_grid.mjs';"
        f"const rows = {json.dumps(rows)}, columns = {json.dumps(list(GRID_COLUMNS))};"
        f"const cases = {json.dumps(cases)};"
        "console.log(JSON.stringify(cases.map(([c, d, t]) => arrange(rows, columns, c, d, t))));"
    )
    (tmp_path / "check.mjs").write_text(program)
    result = subprocess.run(
        [node, "check.mjs"], cwd=tmp_path, capture_output=True, text=True, timeout=timeout(30)
    )
    assert result.returncode == 0, result.stderr
    in_browser = json.loads(result.stdout)
    in_kernel = [arrange(rows, GRID_COLUMNS, c, d, t) for c, d, t in cases]
    assert in_browser == in_kernel
    assert [r[0] for r in arrange(rows, GRID_COLUMNS, "project", False, "")] == [2, 3, 1, 4]


async def test_chart_and_grid_send_a_handful_of_updates_for_a_10000_event_burst(
    closing: Callable[..., Any],
) -> None:
    frame = EventFrame()
    controller = Controller()
    chart = closing(RateChart(controller, frame=frame))
    grid = closing(EventGrid(controller, frame=frame, limit=100))
    await wait_for(lambda: chart.updates == 1 and grid.updates == 1)  # the empty frame
    count = 10_000

    def feed() -> None:
        kinds = ("task.created", "agent.started", "memory.created")
        for i in range(1, count + 1):
            frame.append({"type": kinds[i % 3], "seq": i, "data": {"i": i}})
            if i % 500 == 0:
                time.sleep(0.02)  # about 10,000 events per second, over ~0.5 s

    started = time.monotonic()
    await asyncio.to_thread(feed)
    await wait_for(lambda: _cells(grid, "seq")[:1] == [count])
    await wait_for(lambda: sum(map(sum, chart.values)) == count)  # every second complete
    elapsed = time.monotonic() - started
    assert len(grid.rows) == 100 and _cells(grid, "seq")[-1] == count - 99
    assert sorted(chart.names) == ["agent.started", "memory.created", "task.created"]
    allowed = elapsed / controller.interval + 3
    assert 1 < grid.updates <= allowed, (grid.updates, elapsed)
    assert grid.updates < 30  # a handful, nowhere near one per event
    assert chart.updates <= elapsed + 3  # complete seconds: about one a second
    assert grid.comm.updates("rows") <= grid.updates  # one comm message per update
    assert chart.comm.updates("values") <= chart.updates
    controller.close()


async def test_grid_searches_at_most_search_limit_rows(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    frame.append({"type": "needle.found", "seq": 0})
    frame.extend({"type": "hay.stack", "seq": i} for i in range(1, 2_001))
    grid = closing(EventGrid(frame=frame, limit=10, filter_text="needle", search_limit=1_000))
    await wait_for(lambda: grid.skipped == 1_001)
    assert grid.rows == [] and grid.scanned == 1_000
    assert "1001 older not searched" in grid.status
    grid.search_limit = 5_000
    await wait_for(lambda: _cells(grid, "seq") == [0])
    assert grid.skipped == 0


async def test_chart_and_grid_reject_bad_settings(closing: Callable[..., Any]) -> None:
    frame = EventFrame()
    with pytest.raises(TraitError, match="limit must be between 1 and 1000 rows, not 0"):
        EventGrid(frame=frame, limit=0)
    grid = closing(EventGrid(frame=frame))
    with pytest.raises(TraitError, match="sort_by must be '' or one of seq, .*, not 'colour'"):
        grid.sort_by = "colour"
    with pytest.raises(TraitError, match="filter_text must be at most 200 characters, not 201"):
        grid.filter_text = "x" * 201
    with pytest.raises(TraitError, match="search_limit must be between 1000 and 1000000, not 10"):
        grid.search_limit = 10
    with pytest.raises(TraitError, match="invalid event type pattern 'Task\\*'"):
        grid.filters = Filters(("Task*",))
    assert (grid.sort_by, grid.filter_text, grid.limit) == ("", "", 100)  # unchanged
    chart = closing(RateChart(frame=frame))
    with pytest.raises(TraitError, match="window must be between 10 and 3600 seconds, not 5"):
        chart.window = 5
    with pytest.raises(TraitError, match="max_types must be between 1 and 20, not 0"):
        chart.max_types = 0
    with pytest.raises(TraitError, match="height must be between 100 and 1000 pixels, not 50"):
        chart.height = 50
    with pytest.raises(TypeError, match="expected a Lab, a LabClient"):
        RateChart("ws://nowhere")


async def test_closing_the_chart_stops_its_redraws(closing: Callable[..., Any]) -> None:
    chart = RateChart(frame=EventFrame())
    await wait_for(lambda: chart.updates == 1)
    ticker = chart.controller._ticker
    assert ticker is not None
    chart.close()
    await wait_for(ticker.done)
    assert chart.controller.closed and chart.comm is None


# Export


async def test_export_writes_the_frame_and_links_to_it(
    tmp_path: Path, closing: Callable[..., Any]
) -> None:
    frame = EventFrame(client_id="exporter")
    frame.extend({"type": "task.created", "seq": i, "data": {"i": i}} for i in range(1, 6))
    panel = closing(ExportPanel(frame=frame, directory=tmp_path / "out"))
    panel.csv_button.click()
    await wait_for(lambda: panel.exports == 1)
    path = panel.last_export
    assert path.endswith(".csv") and "events-exporter-" in path
    back = read_csv(path)
    assert back["seq"].tolist() == [1, 2, 3, 4, 5] and back.loc[4, "data"] == {"i": 5}
    html = panel.link.outputs[0]["data"]["text/html"]
    assert "download: " in html and Path(path).name in html

    panel.parquet_button.click()
    await wait_for(lambda: panel.exports == 2)
    assert panel.last_export.endswith(".parquet")
    assert read_parquet(panel.last_export)["type"].tolist() == ["task.created"] * 5
    assert len(panel.link.outputs) == 1  # the latest link only

    with pytest.raises(ValueError, match="format must be one of csv, parquet, not 'xls'"):
        panel.export("xls")
    empty = closing(ExportPanel(Controller()))
    empty.csv_button.click()
    await wait_for(lambda: empty.error != "")
    assert "nothing to export" in empty.result_label.value


# Notifications and stats


async def test_notifications_count_and_show_chosen_types(
    lab: gl.Lab, closing: Callable[..., Any]
) -> None:
    controller = Controller(lab)
    client = await connected(controller)
    banner = closing(Notifications(controller, types=["task.failed", "system.*"]))
    assert banner.banner.value == ""
    lab.publish("task.created", {"title": "a"})
    lab.publish("task.failed", {"error": "boom"}, circle_id=3)
    lab.publish("system.error", {"message": "disk full"})
    lab.publish("task.failed", {"error": "again"})
    await client.wait_for_events(4)
    await wait_for(lambda: banner.count == 3)
    assert "3 new notifications" in banner.banner.value
    assert "boom" in banner.banner.value and "disk full" in banner.banner.value
    assert banner.dismiss_button.layout.display == ""

    threading.Thread(target=banner.dismiss_button.click).start()
    await wait_for(lambda: banner.unseen == 0)
    assert banner.banner.value == "" and banner.count == 3
    assert banner.dismiss_button.layout.display == "none"

    lab.publish("task.failed", {"error": "third"})
    await wait_for(lambda: banner.unseen == 1)
    assert "1 new notification" in banner.banner.value and banner.count == 4

    with pytest.raises(TraitError, match="invalid event type pattern"):
        banner.types = ["Task Failed"]
    controller.close()


async def test_stats_panel_shows_the_labs_stats(lab: gl.Lab, closing: Callable[..., Any]) -> None:
    controller = Controller(lab)
    await connected(controller, "stats-watcher")
    panel = closing(StatsPanel(controller, interval=0.5))
    assert panel.source == "lab"
    lab.publish("agent.started", {"agent_id": 1})
    await wait_for(lambda: panel.stats.get("active_connections") == 1)
    await wait_for(lambda: panel.stats["bus"]["events_published"] == 1)
    assert panel.stats["total_connections"] == 1
    assert "<b>1</b>" in panel.view.value
    assert "stats-watcher" in panel.view.value
    assert "bus.events_published" in panel.view.value
    with pytest.raises(TraitError, match="interval must be between"):
        panel.interval = 0.1
    controller.close()


async def test_stats_panel_asks_a_remote_server_over_http(
    bus: EventBus, manager: ConnectionManager, closing: Callable[..., Any]
) -> None:
    async with running_server(bus=bus, manager=manager) as server:
        client = await gl.connect(server.url, "remote-watcher")
        try:
            panel = closing(StatsPanel(client))
            assert panel.source == f"{server.http_url}/admin/websocket/stats"
            await wait_for(lambda: panel.stats.get("active_connections") == 1)
            assert panel.stats["clients"][0]["client_id"] == "remote-watcher"
            assert "remote-watcher" in panel.view.value
            assert panel.error == ""
        finally:
            panel.close()
            await client.close()


# The workbench


async def test_workbench_connects_publishes_and_shows(
    lab: gl.Lab, bus: EventBus, closing: Callable[..., Any], tmp_path: Path
) -> None:
    wb = closing(gl.workbench(lab, notify=["task.failed"], export_dir=tmp_path / "exports"))
    assert isinstance(wb, Workbench)
    await wait_for(lambda: wb.connect_panel.status == "connected")
    assert wb.tabs.titles == ("Publish", "Filter", "Server stats")

    publish = wb.publish_panel
    publish.type_input.value = "task.failed"
    publish.data_input.value = '{"task_id": 42, "error": "timeout"}'
    publish.publish_button.click()
    await wait_for(lambda: publish.published == 1)
    assert bus.get_history()[0].data == {"task_id": 42, "error": "timeout"}
    await wait_for(lambda: any("task.failed" in row for row in wb.grid.rows))
    await wait_for(lambda: wb.notifications.count == 1)
    assert "timeout" in wb.notifications.banner.value

    wb.export.parquet_button.click()  # writes into export_dir what the workbench received
    await wait_for(lambda: wb.export.exports == 1)
    exported = Path(wb.export.last_export)
    assert exported.parent == tmp_path / "exports" and exported.suffix == ".parquet"
    assert "events-workbench-" in exported.name
    assert read_parquet(exported)["type"].tolist() == ["task.failed"]

    await wait_for(lambda: sum(map(sum, wb.chart.values)) == 1)  # once its second is over
    assert wb.chart.names == ["task.failed"]

    wb.filter_panel.types_input.value = "agent.*"  # linked to the chart and the grid
    assert wb.grid.filters == wb.chart.filters == Filters(("agent.*",))
    await wait_for(lambda: wb.grid.rows == [] and wb.chart.names == [])
    wb.stats_panel.refresh()
    await wait_for(lambda: wb.stats_panel.stats.get("active_connections") == 1)

    ticker, client = wb.controller._ticker, wb.controller.client
    assert ticker is not None and client is not None and client.client_id == "workbench"
    wb.close()
    await wait_for(ticker.done)
    await wait_for(lambda: client.status == "closed")  # the client it connected, not the lab
    assert lab.running


async def test_workbench_over_a_client(lab: gl.Lab, closing: Callable[..., Any]) -> None:
    client = await lab.connect("mine")
    wb = closing(gl.workbench(client))
    assert wb.controller.client is client and wb.controller.lab is None
    assert wb.connect_panel.status == "connected"
    assert wb.connect_panel.client_id_input.value == "mine"
    lab.bus.publish_nowait(Event(type="circle.created", data={"name": "c"}))
    await wait_for(lambda: any("circle.created" in row for row in wb.grid.rows))
    assert wb.stats_panel.source.endswith("/admin/websocket/stats")
    wb.close()
    assert client.connected  # a client given to the workbench is left open


async def test_controller_rejects_bad_settings() -> None:
    controller = Controller()
    with pytest.raises(TraitError, match="interval must be between 0.2 and 60"):
        controller.interval = 0.05
    with pytest.raises(TypeError, match="expected a Lab, a LabClient"):
        Controller.of("ws://nowhere")
    panel = FilterPanel(controller)
    with pytest.raises(TraitError, match="invalid event type pattern"):
        panel.filters = Filters(("Not A Pattern",))
    panel.close()
    controller.close()


def test_controller_needs_a_loop_or_a_lab() -> None:
    with pytest.raises(RuntimeError, match="the widgets need an event loop"):
        Controller()


def test_quickstart_is_saved_with_the_widget_state_it_shows() -> None:
    """01_quickstart opens on a workbench, not reprs: every model its outputs show is saved
    (notebooks/save_with_widgets.py), with the grid's rows and the chart's lines."""
    import json
    import re

    notebook = json.loads(
        (Path(__file__).parent.parent / "notebooks" / "01_quickstart.ipynb").read_text()
    )
    state = notebook["metadata"]["widgets"]["application/vnd.jupyter.widget-state+json"]
    models = state["state"]
    shown = [
        output["data"]["application/vnd.jupyter.widget-view+json"]["model_id"]
        for cell in notebook["cells"]
        for output in cell.get("outputs", [])
        if "application/vnd.jupyter.widget-view+json" in output.get("data", {})
    ]
    assert len(shown) == 1  # the workbench
    todo, seen = list(shown), set()
    while todo:
        model_id = todo.pop()
        if model_id not in seen:
            assert model_id in models, model_id
            seen.add(model_id)
            todo += re.findall(r"IPY_MODEL_([0-9a-f]{32})", json.dumps(models[model_id]))
    assert seen == set(models)  # nothing else saved
    views = {m["state"].get("_anywidget_id"): m["state"] for m in models.values()}
    grid = views["gathering_lab.widgets.charts.EventGrid"]
    chart = views["gathering_lab.widgets.charts.RateChart"]
    assert len(grid["rows"]) == 61 and "_esm" in grid
    assert chart["names"] == ["task.created", "agent.started", "memory.created"]
    assert sum(map(sum, chart["values"])) == 61
    assert "uPlot" in chart["_esm"]
