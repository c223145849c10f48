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
from gathering_lab.exceptions import ConnectionFailed, ProtocolError
from gathering_lab.testing import (
    free_port,
    recv_json,
    recv_until,
    running_server,
    timeout,
    wait_for,
)
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


# Always a resume point


@pytest.mark.parametrize("cut", ["abort", "restart"])
async def test_restart_into_an_empty_run_then_a_blip_loses_nothing(cut: str) -> None:
    manager = ConnectionManager()
    port = free_port()
    server = await serve(port=port, bus=EventBus(), manager=manager)
    client = await connect(server.url, "rp", base_delay=0.05, max_delay=0.2)
    try:
        server.close()
        await server.wait_closed()
        await client.wait_for_status("reconnecting", timeout(5))
        bus = EventBus()  # a new run (new epoch) with no events yet
        server = await serve(port=port, bus=bus, manager=manager)
        await client.wait_for_status("connected (server restarted)", timeout(5))
        assert client.restarts == 1
        assert client.last_seq == 0  # a resume point, although no event came
        gaps = client.gaps  # the old run's tail: reported by the server as a gap
        # A blip while events are published: they must come back, exactly once.
        if cut == "abort":
            manager.sessions[0].transport.abort()
        else:
            server.close()
            await server.wait_closed()
        await client.wait_for_status("reconnecting", timeout(5))
        for i in range(5):
            await bus.publish(Event(type="while.away", data={"i": i}))
        if cut == "restart":
            server = await serve(port=port, bus=bus, manager=manager)
        await client.wait_for_status("connected", timeout(5))
        await bus.publish(Event(type="after.blip"))
        await client.wait_for_events(6, timeout(5))
        df = client.frame.df
        assert df[~df["type"].str.startswith("lab.")]["seq"].tolist() == [1, 2, 3, 4, 5, 6]
        assert client.gaps == gaps and client.duplicates == 0
    finally:
        await client.close()
        server.close()
        await server.wait_closed()


# A jump in live seq


@pytest.fixture
async def scripted_server() -> AsyncIterator[tuple[str, list[Any]]]:
    """A lab-protocol server that sends what the test puts in ``script`` after the greeting.

    ``script`` holds the greeting's extra data first, then messages to send; a message
    ``"recv"`` waits for one client message (stored back into the list's end).
    """
    script: list[Any] = []

    async def handler(ws: ServerConnection) -> None:
        extras = script[0] if script else {}
        greeting = protocol.connection_established("s", seq=0, epoch="e1", **extras)
        await ws.send(protocol.encode(greeting).decode())
        for step in script[1:]:
            if callable(step):
                await step(ws)
            else:
                await ws.send(json.dumps(step))
        await ws.wait_closed()

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/dashboard", script


def _event(seq: int, kind: str = "task.created") -> dict[str, Any]:
    return {"type": kind, "data": {}, "event_id": f"evt_{seq}", "seq": seq, "epoch": "e1"}


@pytest.mark.parametrize("contiguous", [True, False])
async def test_a_jump_in_live_seq_is_a_gap_when_every_event_is_due(
    scripted_server: tuple[str, list[Any]], contiguous: bool
) -> None:
    url, script = scripted_server
    script += [{"contiguous": contiguous}, _event(1), _event(2), _event(5), _event(6)]
    client = await connect(url, "j")
    try:
        await client.wait_for_events(4)
        if contiguous:
            assert client.gaps == 1
            df = client.frame.df
            assert df["type"].tolist()[2] == "lab.gap"
            assert df["data"].tolist()[2] == {
                "reason": "seq jump",
                "after_seq": 2,
                "seq": 5,
                "missing": 2,
                "epoch": "e1",
            }
        else:  # a server that does not promise every seq (or an older one): no claim
            assert client.gaps == 0
        assert client.last_seq == 6
    finally:
        await client.close()


async def test_seq_jumps_a_server_makes_by_design_are_not_gaps(bus: EventBus) -> None:
    from gathering_lab.auth import JWTAuth, mint_token
    from gathering_lab.websocket.integration import setup_custom_broadcasting

    # broadcast=False: only what the setup functions enable goes out.
    manager = ConnectionManager()
    async with running_server(bus=bus, manager=manager, broadcast=False) as server:
        setup_custom_broadcasting("task.created", bus=bus, manager=manager)
        client = await connect(server.url, "partial")
        assert client.server_info["contiguous"] is False
        for kind in ("task.created", "agent.started", "task.created"):
            await bus.publish(Event(type=kind))
        await client.wait_for_events(2)
        assert client.gaps == 0 and client.last_seq == 3
        await client.close()
    # A token scoped to circle 1 does not receive the other circles' events.
    secret = "k" * 32
    async with running_server(bus=EventBus(), auth=JWTAuth(secret)) as server:
        token = mint_token(secret, "scoped", ["subscribe"], circles=[1])
        client = await connect(server.url, token=token)
        for circle in (1, 2, 2, 1):
            await server.bus.publish(Event(type="task.created", circle_id=circle))
        await client.wait_for_events(2)
        assert client.gaps == 0
        await client.close()
    # The client's own filters, and going back to everything, skip seqs too.
    async with running_server(bus=EventBus()) as server:
        client = await connect(server.url, "filtered")
        await client.subscribe("task.*")
        for kind in ("agent.started", "task.created", "agent.started"):
            await server.bus.publish(Event(type=kind))
        await client.unsubscribe()
        for kind in ("agent.started", "task.created"):
            await server.bus.publish(Event(type=kind))
        await client.wait_for_events(3)
        assert client.gaps == 0 and client.last_seq == 5
        # Unfiltered and live: a server-side loss would now show (see the test above).
        assert client._expects_every_seq()
        await client.close()


# A bounded frame


async def test_a_message_over_the_clients_limit_closes_with_1009_for_good(bus: EventBus) -> None:
    assert LabClient("ws://h/ws").max_message_size == 4 * 2**20
    with pytest.raises(ValueError, match="max_message_size"):
        LabClient("ws://h/ws", max_message_size=10)
    async with running_server(bus=bus) as server:
        client = await connect(server.url, "small", base_delay=0.01)  # the default limit
        await bus.publish(Event(type="big.one", data={"x": "a" * (4 * 2**20)}))
        await client.wait_for_status("closed", timeout(10))
        assert client.status.startswith("closed: 1009 a message from the server was over")
        assert "4194304 bytes" in client.status
        assert client.close_code == 1009 and client.reconnects == 0
        assert client.events_received == 0
        await client.close()
        # A bigger limit takes it.
        roomy = await connect(server.url, "roomy", max_message_size=8 * 2**20)
        await bus.publish(Event(type="big.two", data={"x": "b" * (4 * 2**20)}))
        await roomy.wait_for_events(1, timeout(10))
        await roomy.close()


# Request ids


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("r1", True),
        ("x" * 64, True),
        (7, True),
        (-3, True),
        ("x" * 65, False),
        (True, False),
        (1.5, False),
        ([1], False),
        ({"a": 1}, False),
        (2**64, False),
    ],
)
def test_request_id_parsing(value: Any, ok: bool) -> None:
    for message in (
        {"type": "ping", "id": value},
        {"type": "subscribe", "id": value, "data": {"event_types": ["task.*"]}},
        {"type": "unsubscribe", "id": value},
        {"type": "publish", "id": value, "data": {"type": "a.b"}},
        {"type": "resume", "id": value, "data": {"since_seq": 0}},
        {"type": "auth", "id": value, "data": {"token": "t"}},
    ):
        frame = json.dumps(message)
        if ok:
            parsed = protocol.parse_client_message(frame)
            assert parsed.id == value
            assert parsed.to_message()["id"] == value  # and back
        else:
            with pytest.raises(ProtocolError, match="invalid id") as info:
                protocol.parse_client_message(frame)
            assert info.value.code == "invalid_message" and info.value.request_id is None
    # A message that fails to parse still carries its (valid) id, to be echoed.
    with pytest.raises(ProtocolError) as info:
        protocol.parse_client_message('{"type": "publish", "id": "p9", "data": {"type": "Bad"}}')
    assert info.value.request_id == "p9"
    assert protocol.Ping().to_message() == {"type": "ping"}  # no id, no key


async def test_server_echoes_the_id_on_every_ack_and_error(server: Server) -> None:
    import websockets

    async with websockets.connect(server.url) as ws:
        await recv_json(ws)  # greeting
        exchanges: list[tuple[dict[str, Any], str, Any]] = [
            ({"type": "ping", "id": 1}, "pong", 1),
            ({"type": "subscribe", "id": "s", "data": {"event_types": ["a.*"]}}, "subscribed", "s"),
            ({"type": "unsubscribe", "id": "u"}, "subscribed", "u"),
            ({"type": "publish", "id": "p", "data": {"type": "a.b"}}, "published", "p"),
            ({"type": "resume", "id": "r", "data": {"since_seq": 0}}, "resumed", "r"),
            # Errors, also for messages that failed to parse.
            ({"type": "dance", "id": "e1"}, "error", "e1"),
            ({"type": "publish", "id": "e2", "data": {"type": "Bad"}}, "error", "e2"),
            ({"type": "subscribe", "id": 3, "data": {"event_types": []}}, "error", 3),
            ({"id": "e4"}, "error", "e4"),
            ({"type": "auth", "id": "e5", "data": {"token": "t"}}, "error", "e5"),  # auth off
            ({"type": "ping", "id": ["bad"]}, "error", None),  # an id it cannot echo
        ]
        for request, kind, echoed in exchanges:
            await ws.send(json.dumps(request))
            replies = await recv_until(ws, lambda m: m["type"] in protocol.CONTROL_TYPES)
            assert replies[-1]["type"] == kind, (request, replies[-1])
            assert replies[-1].get("id") == echoed, (request, replies[-1])
        await ws.send("not json")
        assert "id" not in (await recv_until(ws, lambda m: m["type"] == "error"))[-1]


async def test_auth_frames_get_their_id_back(bus: EventBus) -> None:
    import websockets

    from gathering_lab.auth import JWTAuth, mint_token

    secret = "k" * 32
    async with running_server(bus=bus, auth=JWTAuth(secret)) as server:
        async with websockets.connect(server.url) as ws:
            token = mint_token(secret, "ann", ["subscribe"])
            await ws.send(json.dumps({"type": "auth", "id": "a1", "data": {"token": token}}))
            messages = await recv_until(ws, lambda m: m["type"] == "authenticated")
            assert messages[-1]["id"] == "a1"
            again = mint_token(secret, "ann", ["subscribe"], ttl="2h")
            await ws.send(json.dumps({"type": "auth", "id": 2, "data": {"token": again}}))
            assert (await recv_until(ws, lambda m: m["type"] == "authenticated"))[-1]["id"] == 2
            await ws.send(json.dumps({"type": "auth", "id": 3, "data": {"token": "x.y.z"}}))
            error = (await recv_until(ws, lambda m: m["type"] == "error"))[-1]
            assert error["id"] == 3 and error["data"]["code"] == "unauthorized"


async def test_an_error_settles_only_the_request_it_answers(
    scripted_server: tuple[str, list[Any]],
) -> None:
    url, script = scripted_server

    async def answer_out_of_order(ws: ServerConnection) -> None:
        first = json.loads(await ws.recv())
        second = json.loads(await ws.recv())
        await ws.send(protocol.encode(protocol.error("forbidden", "no", second["id"])).decode())
        ack = protocol.ack("published", first["id"], event_id="evt_1", seq=1)
        await ws.send(protocol.encode(ack).decode())

    script += [{"request_ids": True}, answer_out_of_order]
    client = await connect(url, "ids")
    try:
        good = asyncio.create_task(client.publish("a.b"))
        await wait_for(lambda: len(client._pending) == 1)
        bad = asyncio.create_task(client.publish("c.d"))
        with pytest.raises(ProtocolError, match="no") as info:
            await bad
        assert info.value.code == "forbidden"
        assert await good == {"event_id": "evt_1", "seq": 1}
        assert not client._pending
    finally:
        await client.close()


async def test_a_late_reply_never_settles_the_next_request(bus: EventBus) -> None:
    gate = asyncio.Event()

    async def slow(event: Event) -> None:
        await gate.wait()

    bus.subscribe("slow.*", slow)
    async with running_server(bus=bus) as server:
        client = await connect(server.url, "late", request_timeout=timeout(0.3))
        try:
            with pytest.raises(ConnectionFailed, match="no 'published' reply"):
                await client.publish("slow.one")  # the server is still busy with it
            fast = asyncio.create_task(client.publish("fast.one"))
            await wait_for(lambda: len(client._pending) == 1)
            gate.set()
            ack = await fast
            # The slow publish's late ack (seq 1) is not taken for this one's.
            assert ack is not None and ack["seq"] == 2
        finally:
            gate.set()
            await client.close()


async def test_the_resubscribe_after_a_reconnect_settles_no_user_request(
    server: Server, bus: EventBus
) -> None:
    client = await connect(server.url, "rs", base_delay=0.05)
    try:
        await client.subscribe("agent.*")
        server.manager.sessions[0].transport.abort()
        await client.wait_for_status("reconnecting", timeout(5))
        # Two subscribes wait for the connection; the client re-subscribes first
        # (with the latest filters, task.*), then sends these two.
        first = asyncio.create_task(client.subscribe("memory.*"))
        await asyncio.sleep(0)
        second = asyncio.create_task(client.subscribe("task.*"))
        assert (await first)["event_types"] == ["memory.*"]  # type: ignore[index]
        assert (await second)["event_types"] == ["task.*"]  # type: ignore[index]
        assert server.manager.sessions[0].filters.event_types == ("task.*",)
    finally:
        await client.close()


async def test_replies_without_ids_are_matched_oldest_first(
    scripted_server: tuple[str, list[Any]],
) -> None:
    url, script = scripted_server

    async def answer_without_ids(ws: ServerConnection) -> None:
        for seq in (1, 2):
            json.loads(await ws.recv())
            ack = protocol.ack("published", event_id=f"evt_{seq}", seq=seq)
            await ws.send(protocol.encode(ack).decode())
        json.loads(await ws.recv())
        await ws.send(protocol.encode(protocol.error("forbidden", "nope")).decode())

    script += [{}, answer_without_ids]  # an older lab server: acks, no ids
    client = await connect(url, "old")
    try:
        acks = await asyncio.gather(client.publish("a.b"), client.publish("a.c"))
        assert [a["seq"] for a in acks if a] == [1, 2]
        with pytest.raises(ProtocolError, match="nope"):
            await client.subscribe("a.*")
    finally:
        await client.close()


async def test_publish_slows_down_when_the_server_says_rate_limited(bus: EventBus) -> None:
    async with running_server(bus=bus, publish_rate=20, publish_burst=2) as server:
        client = LabClient(server.url, "eager", heartbeat=None, request_timeout=timeout(10))
        await client.connect()
        try:
            acks = [await client.publish("burst.event", {"i": i}) for i in range(8)]
        finally:
            await client.close()
    assert [a["seq"] for a in acks if a] == list(range(1, 9))  # all published, in order
    assert client.publish_retries > 0
    assert server.get_stats()["publishes_rate_limited"] == client.publish_retries


async def test_publish_gives_up_on_rate_limited_after_its_timeout(bus: EventBus) -> None:
    async with running_server(
        bus=bus, publish_rate=0.1, publish_burst=1, message_rate=100, message_burst=100
    ) as server:
        client = LabClient(server.url, "stuck", heartbeat=None, request_timeout=0.3)
        await client.connect()
        try:
            await client.publish("first.event")
            with pytest.raises(ProtocolError) as refused:
                await client.publish("second.event")
        finally:
            await client.close()
    assert refused.value.code == "rate_limited" and client.publish_retries >= 1
    assert bus.last_seq == 1


async def test_a_client_given_several_urls_connects_to_the_first_that_answers(
    server: Server,
) -> None:
    dead = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    client = LabClient([dead, server.url], "fallback")
    try:
        await client.connect()
        assert (client.url, client.failovers, client.urls) == (server.url, 1, [dead, server.url])
        assert client.connected
    finally:
        await client.close()
    other = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    with pytest.raises(ConnectionFailed) as failed:
        await LabClient([dead, other, dead], "nowhere").connect()  # each tried once
    assert dead in str(failed.value) and other in str(failed.value)


@pytest.mark.parametrize(
    "urls, message",
    [([], "non-empty list"), (["http://127.0.0.1:1/"], "ws:// or wss://"), ([None], "ws://")],
)
def test_bad_url_lists_are_refused(urls: list[Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        LabClient(urls)
