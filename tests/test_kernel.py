"""gl.start(): in a running loop, in a plain script (thread), and in a real Jupyter kernel."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

import gathering_lab as gl
from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import PortInUseError
from gathering_lab.testing import free_port, recv_json, timeout
from gathering_lab.websocket import ConnectionManager


@pytest.fixture
async def lab(bus: EventBus, manager: ConnectionManager) -> AsyncIterator[gl.Lab]:
    lab = gl.start(port=0, bus=bus, manager=manager)
    yield lab
    lab.stop()


async def test_start_returns_at_once(bus: EventBus, manager: ConnectionManager) -> None:
    lab = gl.start(port=0, bus=bus, manager=manager)
    try:
        assert lab.mode == "loop"
        assert lab.status == "starting"  # serve() is scheduled on the loop, not awaited
        await lab.wait_started()
        assert lab.status == "running"
    finally:
        lab.stop()


async def test_the_lab_serves_clients_and_records_the_bus(lab: gl.Lab, bus: EventBus) -> None:
    assert lab.port > 0 and lab.url == f"ws://127.0.0.1:{lab.port}/ws/dashboard"
    client = await lab.connect("notebook")
    assert lab.status == "running"
    await bus.publish(Event(type="agent.started", data={"agent_id": 1}))
    await client.wait_for_events(1)
    assert client.frame.df["type"].tolist() == ["agent.started"]
    # lab.frame records the bus itself, without a socket.
    assert lab.frame.df["type"].tolist() == ["agent.started"]
    assert "running" in repr(lab) and "running" in lab._repr_html_()


async def test_start_is_idempotent_and_restarts_on_new_options(
    bus: EventBus, manager: ConnectionManager
) -> None:
    port = free_port()
    first = gl.start(port=port, bus=bus, manager=manager)
    try:
        assert gl.start(port=port, bus=bus, manager=manager) is first
        second = gl.start(port=port, bus=bus, manager=manager, max_message_size=4096)
        assert second is not first
        assert first.status == "stopped" and second.running
        await second.wait_started()
        assert second.stats()["max_message_size"] == 4096
    finally:
        gl.stop()


async def test_busy_port_fails_in_the_cell_naming_the_port(lab: gl.Lab) -> None:
    await lab.wait_started()
    with pytest.raises(PortInUseError, match=rf"port {lab.port} .*port={lab.port + 1}"):
        gl.Lab(port=lab.port).start()


async def test_publish_from_another_thread_reaches_clients(lab: gl.Lab) -> None:
    client = await lab.connect("nb")
    await asyncio.to_thread(lab.publish, "task.created", {"from": "thread"}, circle_id=3)
    await client.wait_for_events(1)
    row = client.frame.df.iloc[0]
    assert (row["type"], row["circle_id"], row["data"]) == ("task.created", 3, {"from": "thread"})


async def test_stop_closes_clients_with_1001_and_frees_the_port(
    bus: EventBus, manager: ConnectionManager
) -> None:
    lab = gl.start(port=0, bus=bus, manager=manager)
    await lab.wait_started()
    port = lab.port
    async with ws_connect(lab.url) as ws:
        await recv_json(ws)
        lab.stop()
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1001
    assert lab.status == "stopped" and gl.kernel.current() is None
    again = gl.start(port=port, bus=bus, manager=manager)  # the port is free at once
    try:
        await again.wait_started()
    finally:
        again.stop()


async def test_connect_after_stop_is_refused(lab: gl.Lab) -> None:
    lab.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        await lab.connect()


def test_plain_script_runs_the_lab_in_a_thread(tmp_path: Any) -> None:
    script = tmp_path / "script.py"
    script.write_text(
        textwrap.dedent(
            """
            import asyncio
            import gathering_lab as gl

            lab = gl.start(port=0)            # no running loop: a thread of its own
            assert lab.mode == "thread" and lab.status == "running"

            async def main():
                client = await lab.connect("script")
                # Published on this loop, handled on the lab's: no cross-thread races.
                for i in range(100):
                    await gl.event_bus.publish(gl.Event(type="task.created", data={"i": i}))
                lab.publish("agent.started", {"agent_id": 1})
                await client.wait_for_events(101, timeout=10)
                seqs = client.frame.df["seq"].tolist()
                print("in order:", seqs == list(range(1, 102)))
                await client.close()

            asyncio.run(main())
            lab.stop()
            print("stopped:", lab.status)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=timeout(60)
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["in order: True", "stopped: stopped"]


def test_stats_from_another_thread_are_read_on_the_labs_loop() -> None:
    import threading

    lab = gl.start(port=0, bus=EventBus(), manager=ConnectionManager())  # no loop: a thread
    try:
        assert lab.mode == "thread" and lab._thread is not None
        assert lab._on_loop(threading.get_ident) == lab._thread.ident

        async def churn() -> None:
            for _ in range(30):
                async with ws_connect(lab.url) as ws:
                    await recv_json(ws)

        future = asyncio.run_coroutine_threadsafe(churn(), lab.loop)
        reads = 0
        while not future.done():  # the manager's registry changes under our feet
            assert lab.stats()["status"] == "running"
            reads += 1
        future.result()
        assert reads > 0 and lab.stats()["total_connections"] == 30
    finally:
        lab.stop()


class Kernel:
    """A real IPython kernel driven through jupyter_client."""

    def __init__(self, client: Any) -> None:
        self.client = client

    async def run(self, code: str, wait: float = 30) -> str:
        outputs: list[str] = []
        errors: list[str] = []

        def hook(message: dict[str, Any]) -> None:
            content = message["content"]
            kind = message["msg_type"]
            if kind == "stream":
                outputs.append(content["text"])
            elif kind in ("execute_result", "display_data"):
                outputs.append(content["data"].get("text/plain", ""))
            elif kind == "error":
                errors.append("\n".join(content["traceback"]))

        reply = await self.client.execute_interactive(
            textwrap.dedent(code), output_hook=hook, timeout=timeout(wait)
        )
        assert reply["content"]["status"] == "ok", "\n".join(errors)
        return "".join(outputs)


@pytest.fixture
async def kernel() -> AsyncIterator[Kernel]:
    from jupyter_client.manager import AsyncKernelManager

    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=timeout(60))
        yield Kernel(client)
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)


@pytest.mark.slow
async def test_in_a_real_kernel_the_server_lives_between_cells(kernel: Kernel) -> None:
    port = free_port()
    out = await kernel.run(
        f"""
        import time, asyncio
        import gathering_lab as gl

        lab = gl.start(port={port})
        print(lab.mode, lab.status)
        """
    )
    assert out.strip() == "loop starting"
    # Between cells the kernel is idle and the server answers an outside client.
    async with ws_connect(f"ws://127.0.0.1:{port}/ws/dashboard?client_id=outside") as ws:
        hello = await recv_json(ws)
        assert hello["data"]["client_id"] == "outside"
        out = await kernel.run(
            """
            client = await lab.connect("notebook")
            await gl.event_bus.publish(gl.Event(type="agent.started", data={"agent_id": 1}))
            await client.wait_for_events(1)
            print(client.frame.df["type"].tolist(), lab.status)
            """
        )
        assert out.strip() == "['agent.started'] running"
        assert (await recv_json(ws))["type"] == "agent.started"
        # A long computing cell stalls the loop; keepalive must not drop anyone.
        await kernel.run("time.sleep(3)")
        out = await kernel.run(
            """
            await gl.event_bus.publish(gl.Event(type="after.long.cell"))
            await client.wait_for_events(2)
            print(client.status, client.reconnects, lab.manager.active_connections)
            """
        )
        assert out.strip() == "connected 0 2"
        assert (await recv_json(ws))["type"] == "after.long.cell"
        out = await kernel.run("lab.stop(); print(lab.status)")
        assert out.strip() == "stopped"
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
        assert ws.close_code == 1001
    # The same port again, in the same kernel, at once.
    out = await kernel.run(
        f"""
        lab = gl.start(port={port})
        client = await lab.connect("again")
        print(client.status)
        lab.stop()
        """
    )
    assert out.strip() == "connected"


@pytest.mark.slow
async def test_in_a_real_kernel_a_busy_port_fails_in_the_cell(kernel: Kernel) -> None:
    port = free_port()
    await kernel.run(f"import gathering_lab as gl\nlab = gl.start(port={port})")
    out = await kernel.run(
        f"""
        try:
            gl.Lab(port={port}).start()
        except gl.PortInUseError as exc:
            print(exc)
        """
    )
    assert f"port {port} on 127.0.0.1 is already in use" in out
