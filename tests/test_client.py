"""LabClient against real servers on loopback ports."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, broadcast
from websockets.asyncio.server import serve as ws_serve

from gathering_lab import protocol
from gathering_lab.client import LabClient, connect
from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import ConnectionFailed
from gathering_lab.testing import free_port, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, Server, serve


@pytest.fixture
async def client(server: Server) -> AsyncIterator[LabClient]:
    client = await connect(server.url, "nb", base_delay=0.05)
    yield client
    await client.close()


async def test_connect_ping_publish_and_frame(client: LabClient, bus: EventBus) -> None:
    assert client.connected and client.status == "connected"
    assert client.server_info["client_id"] == "nb"
    assert client.speaks_lab_protocol
    assert 0 < await client.ping() < timeout(5)
    ack = await client.publish("task.created", {"title": "write tests"}, circle_id=1)
    assert ack is not None and ack["seq"] == 1
    await bus.publish(Event(type="agent.started", data={"agent_id": 7}, source_agent_id=7))
    assert await client.wait_for_events(2, timeout(5)) == 2
    df = client.frame.df
    assert list(df["type"]) == ["task.created", "agent.started"]
    assert list(df["seq"]) == [1, 2]
    assert df["client_id"].unique().tolist() == ["nb"]
    assert (df["latency_ms"] >= 0).all()
    assert client.last_seq == 2


async def test_publish_errors_are_raised(client: LabClient) -> None:
    with pytest.raises(ValueError, match="invalid event type"):
        await client.publish("Not A Type")
    with pytest.raises(TypeError, match="data must be a dict"):
        await client.publish("a.b", [1])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="'NOPE'"):
        await client.subscribe(["NOPE"])
    # What only the server can refuse comes back as a ProtocolError.
    await client._ws.send('{"type": "dance"}')  # type: ignore[union-attr]
    await wait_for(lambda: len(client.errors) == 1)
    assert client.errors[0]["data"]["code"] == "unknown_type"


async def test_subscribe_filters_server_side_and_survives_reconnect(
    server: Server, bus: EventBus
) -> None:
    client = await connect(server.url, "f", base_delay=0.05)
    try:
        ack = await client.subscribe("task.*", circle_id=1)
        assert ack == {"event_types": ["task.*"], "circle_id": 1, "project_id": None}
        await bus.publish(Event(type="agent.started", circle_id=1))
        await bus.publish(Event(type="task.created", circle_id=1))
        await client.wait_for_events(1)
        # Cut the connection from the server side; the client comes back by itself.
        session = server.manager.sessions[0]
        session.transport.abort()
        await client.wait_for_status("reconnecting", timeout(5))
        await client.wait_for_status("connected", timeout(5))
        await wait_for(lambda: server.manager.sessions[0].filters.circle_id == 1)
        await bus.publish(Event(type="task.failed", circle_id=2))
        await bus.publish(Event(type="task.completed", circle_id=1))
        await client.wait_for_events(2)
        assert list(client.frame.df["type"]) == ["task.created", "task.completed"]
    finally:
        await client.close()


async def test_cut_mid_stream_ends_with_every_event_exactly_once_in_order(
    server: Server, bus: EventBus
) -> None:
    client = await connect(server.url, "resumer", base_delay=0.05)
    try:
        for i in range(1000):
            await bus.publish(Event(type="load.test", data={"i": i}))
            if i == 200:
                server.manager.sessions[0].transport.abort()
            if i == 600:  # once it is back, cut again
                await wait_for(lambda: client.connected and server.manager.active_connections)
                server.manager.sessions[0].transport.abort()
            if i % 50 == 0:
                await asyncio.sleep(0)
        await client.wait_for_events(1000, timeout(15))
        seqs = client.frame.df["seq"].tolist()
        assert seqs == list(range(1, 1001))
        assert client.reconnects >= 2
        assert client.gaps == 0 and client.restarts == 0
    finally:
        await client.close()


async def test_server_restart_is_detected_and_shown(bus: EventBus) -> None:
    manager = ConnectionManager()
    port = free_port()
    server = await serve(port=port, bus=bus, manager=manager)
    client = await connect(server.url, "r", base_delay=0.05, max_delay=0.2)
    statuses: list[str] = []
    client.on_status(statuses.append)
    try:
        await bus.publish(Event(type="before.restart"))
        await client.wait_for_events(1)
        old_epoch = client.epoch
        server.close()
        await server.wait_closed()
        await client.wait_for_status("reconnecting", timeout(5))
        bus.reset()  # a new server run: new epoch, seq from 1
        server = await serve(port=port, bus=bus, manager=manager)
        await bus.publish(Event(type="while.away"))
        await client.wait_for_status("connected", timeout(5))
        await bus.publish(Event(type="after.restart"))
        await client.wait_for_events(3)
        assert client.restarts == 1
        assert client.status == "connected (server restarted)"
        assert client.epoch == bus.epoch != old_epoch
        types = client.frame.df["type"].tolist()
        # Nothing of the new run is lost, and the restart is a row of its own.
        events = [t for t in types if not t.startswith("lab.")]
        assert events == ["before.restart", "while.away", "after.restart"]
        assert types.index("lab.server.restarted") == 1
        assert "lab.gap" in types
        assert any(s.startswith("reconnecting in 0.05 s") for s in statuses)
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


async def test_backoff_doubles_and_gives_up_after_max_retries(server: Server) -> None:
    client = await connect(server.url, "b", base_delay=0.01, max_delay=0.04, max_retries=4)
    statuses: list[str] = []
    client.on_status(statuses.append)
    server.close()
    await server.wait_closed()
    await client.wait_for_status("disconnected", timeout(10))
    delays = [s.split()[2] for s in statuses if s.startswith("reconnecting in")]
    assert delays == ["0.01", "0.02", "0.04", "0.04"]
    assert client.status == "disconnected after 4 retries"
    await client.close()


async def test_unreachable_server_fails_clearly() -> None:
    with pytest.raises(ConnectionFailed, match="connection refused"):
        await connect(f"ws://127.0.0.1:{free_port()}/ws/dashboard", "x")


async def test_policy_close_is_final(server: Server) -> None:
    client = LabClient(server.url, "bad id with spaces", base_delay=0.01)
    with pytest.raises(ConnectionFailed, match="1008"):
        await client.connect()
    assert client.reconnects == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"url": "http://x/ws"}, "ws:// or wss://"),
        ({"url": "ws://h/ws", "client_id": ""}, "client_id"),
        ({"url": "ws://h/ws", "max_retries": -1}, "max_retries"),
        ({"url": "ws://h/ws", "base_delay": 0}, "base_delay"),
    ],
)
def test_bad_arguments(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabClient(**kwargs)


async def test_requests_before_connect_fail_clearly() -> None:
    with pytest.raises(ConnectionFailed, match="connect"):
        await LabClient("ws://127.0.0.1:1/ws/dashboard").ping()


@pytest.fixture
async def original_server() -> AsyncIterator[tuple[str, set[ServerConnection]]]:
    """A server that speaks only the guide's original protocol: no seq, no acks."""
    clients: set[ServerConnection] = set()

    async def handler(ws: ServerConnection) -> None:
        clients.add(ws)
        await ws.send(
            json.dumps(
                {
                    "type": "connection.established",
                    "data": {"client_id": "x", "message": "Connected to GatheRing WebSocket"},
                    "timestamp": "2024-01-15T10:30:00Z",
                }
            )
        )
        try:
            async for raw in ws:
                if json.loads(raw)["type"] == "ping":
                    await ws.send('{"type": "pong", "timestamp": "2024-01-15T10:30:05Z"}')
        finally:
            clients.discard(ws)

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/dashboard", clients


async def test_works_against_the_guides_original_protocol(
    original_server: tuple[str, set[ServerConnection]],
) -> None:
    url, clients = original_server
    client = await connect(url, "legacy")
    try:
        assert not client.speaks_lab_protocol
        assert await client.ping() > 0
        assert await client.publish("task.created", {}) is None
        assert await client.subscribe("task.*") is None  # applied locally
        for kind in ("agent.started", "task.created"):
            broadcast(
                clients,
                json.dumps(
                    {
                        "type": kind,
                        "data": {},
                        "source_agent_id": None,
                        "circle_id": None,
                        "project_id": None,
                        "event_id": "evt_1",
                        "timestamp": "2024-01-15T10:30:00Z",
                    }
                ),
            )
        await client.wait_for_events(1)
        assert client.frame.df["type"].tolist() == ["task.created"]
        assert client.frame.df["seq"].isna().all()
    finally:
        await client.close()


async def test_protocol_module_is_used_for_client_messages() -> None:
    # The client's subscribe builds its filters with protocol's parser: same validation.
    assert protocol.Filters().event_types == ("*",)


async def test_on_event_callbacks(server: Server, bus: EventBus) -> None:
    async with running_server(bus=bus) as other:
        client = await connect(other.url, "cb")
        seen: list[str] = []
        stop = client.on_event(lambda m: seen.append(m["type"]))
        client.on_event(lambda m: 1 / 0)  # a broken callback is logged, never fatal
        await bus.publish(Event(type="a.b"))
        await client.wait_for_events(1)
        stop()
        await bus.publish(Event(type="c.d"))
        await client.wait_for_events(2)
        assert seen == ["a.b"]
        await client.close()


async def test_fetch_stats(client: LabClient) -> None:
    stats = await client.fetch_stats()
    assert stats["active_connections"] == 1
    assert stats["clients"][0]["client_id"] == "nb"


async def test_fetch_stats_unreachable_fails_clearly() -> None:
    client = LabClient(f"ws://127.0.0.1:{free_port()}/ws/dashboard")
    with pytest.raises(ConnectionFailed, match="GET http://127.0.0.1:.*/admin/websocket/stats"):
        await client.fetch_stats()


async def test_tokens_stats_and_refresh(bus: EventBus) -> None:
    from gathering_lab.auth import JWTAuth, mint_token
    from gathering_lab.exceptions import AuthError, ProtocolError

    secret = "k" * 32
    async with running_server(bus=bus, auth=JWTAuth(secret)) as server:
        reader = await connect(server.url, token=mint_token(secret, "ann", ["subscribe"]))
        try:
            assert reader.client_id == "ann"
            with pytest.raises(AuthError, match="403"):
                await reader.fetch_stats()
            # A fresh token on the open connection: acknowledged, and kept for reconnects.
            fresh = mint_token(secret, "ann", ["subscribe", "admin"], ttl="2h")
            ack = await reader.authenticate(fresh)
            assert ack is not None and ack["roles"] == ["admin", "subscribe"]
            assert reader.token == fresh
            assert (await reader.fetch_stats())["active_connections"] == 1
            with pytest.raises(ProtocolError) as info:
                await reader.authenticate(mint_token(secret, "bob", ["subscribe"]))
            assert info.value.code == "forbidden"
            assert reader.token == fresh and reader.connected
            with pytest.raises(ValueError, match="token"):
                await reader.authenticate("")
        finally:
            await reader.close()
