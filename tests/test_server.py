"""The WebSocket server against real clients on a loopback port."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import urllib.error
import urllib.request
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from gathering_lab.events import Event, EventBus, EventType
from gathering_lab.exceptions import PortInUseError
from gathering_lab.testing import recv_json, recv_until, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, Server, serve

GUIDE_KEYS = [
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


async def joined(server: Server, client_id: str = "test", **kwargs: Any) -> ClientConnection:
    ws = await connect(f"{server.url}?client_id={client_id}", **kwargs)
    hello = await recv_json(ws)
    assert hello["type"] == "connection.established"
    return ws


def http_get(server: Server, path: str, method: str = "GET") -> tuple[int, str, dict[str, Any]]:
    request = urllib.request.Request(server.http_url + path, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout(5)) as response:
            body = response.read().decode()
            return response.status, response.headers["Content-Type"], json.loads(body)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], json.loads(exc.read().decode())


async def get(server: Server, path: str, method: str = "GET") -> tuple[int, str, dict[str, Any]]:
    return await asyncio.to_thread(http_get, server, path, method)


# Connecting


async def test_connection_established_as_in_the_guide(server: Server, bus: EventBus) -> None:
    async with connect(f"{server.url}?client_id=test-cli") as ws:
        hello = await recv_json(ws)
    assert list(hello) == ["type", "data", "timestamp"]
    assert hello["type"] == "connection.established"
    assert hello["data"]["client_id"] == "test-cli"
    assert hello["data"]["message"] == "Connected to GatheRing WebSocket"
    assert hello["data"]["epoch"] == bus.epoch
    assert hello["data"]["seq"] == 0
    assert hello["timestamp"].endswith("Z")


async def test_client_id_is_generated_when_missing(server: Server) -> None:
    async with connect(server.url) as a, connect(server.url) as b:
        ids = {(await recv_json(a))["data"]["client_id"], (await recv_json(b))["data"]["client_id"]}
    assert len(ids) == 2
    assert all(i.startswith("client-") for i in ids)


async def test_bad_client_id_is_refused_with_1008(server: Server) -> None:
    async with connect(f"{server.url}?client_id=%3Cscript%3E") as ws:
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
    assert ws.close_code == 1008
    assert "client_id" in (ws.close_reason or "")


async def test_ping_pong_echoes_id(server: Server) -> None:
    async with await joined(server) as ws:
        await ws.send(json.dumps({"type": "ping"}))
        pong = await recv_json(ws)
        assert list(pong) == ["type", "timestamp"]
        assert pong["type"] == "pong"
        await ws.send(json.dumps({"type": "ping", "id": 42}))
        assert (await recv_json(ws))["id"] == 42


# Broadcasting


async def test_bus_events_reach_every_client_with_the_guides_keys(
    server: Server, bus: EventBus
) -> None:
    clients = [await joined(server, f"c{i}") for i in range(3)]
    await bus.publish(
        Event(
            type=EventType.AGENT_STARTED,
            data={"agent_id": 1, "name": "Alice", "competencies": ["python", "react"]},
            source_agent_id=1,
        )
    )
    for ws in clients:
        event = await recv_json(ws)
        assert list(event) == GUIDE_KEYS
        assert event["type"] == "agent.started"
        assert event["data"] == {
            "agent_id": 1,
            "name": "Alice",
            "competencies": ["python", "react"],
        }
        assert event["source_agent_id"] == 1
        assert event["circle_id"] is None and event["project_id"] is None
        assert event["event_id"].startswith("evt_")
        assert event["seq"] == 1 and event["epoch"] == bus.epoch
        await ws.close()


async def test_many_clients_get_every_event_once_in_order(server: Server, bus: EventBus) -> None:
    clients = [await joined(server, f"c{i}") for i in range(20)]
    for i in range(300):
        await bus.publish(Event(type="task.created", data={"i": i}))

    async def drain(ws: ClientConnection) -> list[int]:
        return [(await recv_json(ws))["data"]["i"] for _ in range(300)]

    results = await asyncio.gather(*(drain(ws) for ws in clients))
    assert all(r == list(range(300)) for r in results)
    stats = server.get_stats()
    assert stats["total_broadcasts"] == 300
    assert stats["total_messages_sent"] >= 20 * 301
    for ws in clients:
        await ws.close()


async def test_client_publish_is_acked_and_broadcast(server: Server, bus: EventBus) -> None:
    async with await joined(server, "pub") as pub, await joined(server, "sub") as sub:
        await pub.send(
            json.dumps(
                {
                    "type": "publish",
                    "data": {"type": "task.created", "data": {"title": "x"}, "circle_id": 1},
                }
            )
        )
        got = await recv_until(pub, lambda m: m["type"] == "published")
        ack = got[-1]
        assert ack["data"]["seq"] == 1
        assert ack["data"]["event_id"].startswith("evt_")
        event = await recv_json(sub)
        assert event["type"] == "task.created"
        assert event["circle_id"] == 1
        assert event["event_id"] == ack["data"]["event_id"]
        # The publisher receives its own event like any subscriber.
        assert [m["type"] for m in got] == ["task.created", "published"]
    assert bus.get_history()[0].data == {"title": "x"}


async def test_server_side_subscribe_filters(server: Server, bus: EventBus) -> None:
    async with await joined(server, "f") as ws, await joined(server, "all") as other:
        await ws.send(
            json.dumps({"type": "subscribe", "data": {"event_types": ["task.*"], "circle_id": 1}})
        )
        ack = await recv_json(ws)
        assert ack["type"] == "subscribed"
        assert ack["data"] == {"event_types": ["task.*"], "circle_id": 1, "project_id": None}
        await bus.publish(Event(type="agent.started", circle_id=1))
        await bus.publish(Event(type="task.created", circle_id=2))
        await bus.publish(Event(type="task.conflict.detected", circle_id=1))
        event = await recv_json(ws)
        assert (event["type"], event["seq"]) == ("task.conflict.detected", 3)
        assert [(await recv_json(other))["seq"] for _ in range(3)] == [1, 2, 3]
        await ws.send(json.dumps({"type": "unsubscribe"}))
        assert (await recv_json(ws))["data"]["event_types"] == ["*"]
        await bus.publish(Event(type="agent.started"))
        assert (await recv_json(ws))["seq"] == 4
        assert server.get_stats()["filter_groups"] == 1


async def test_compressed_clients_receive_the_same_events(bus: EventBus) -> None:
    async with running_server(bus=bus, compression="deflate") as server:
        async with await joined(server, "z", compression="deflate") as ws:
            assert server.get_stats()["clients"][0]["compression"] is True
            for i in range(5):
                await bus.publish(Event(type="a.b", data={"i": i, "pad": "x" * 500}))
            assert [(await recv_json(ws))["data"]["i"] for _ in range(5)] == list(range(5))


# HTTP routes


async def test_stats_endpoint_has_the_guides_keys(server: Server, bus: EventBus) -> None:
    async with await joined(server, "dashboard-1") as ws:
        await ws.send(json.dumps({"type": "ping"}))
        await recv_json(ws)
        await bus.publish(Event(type="a.b"))
        await recv_json(ws)
        status, content_type, stats = await get(server, "/admin/websocket/stats")
    assert status == 200 and content_type == "application/json"
    for key in ("active_connections", "total_connections", "total_messages_sent"):
        assert isinstance(stats[key], int)
    assert stats["active_connections"] == 1
    assert stats["total_broadcasts"] == 1
    client = stats["clients"][0]
    assert client["client_id"] == "dashboard-1"
    assert client["connected_at"].endswith("Z")
    assert client["messages_sent"] == 3  # hello, pong, event
    assert client["messages_received"] == 1
    assert stats["max_message_size"] == 2**20
    assert stats["max_pending_bytes"] == 4 * 2**20


async def test_health_404_405_and_426(server: Server) -> None:
    status, _, body = await get(server, "/health")
    assert status == 200 and body["status"] == "ok"
    status, content_type, body = await get(server, "/nope")
    assert status == 404 and content_type == "application/json"
    assert body == {"error": "not found: /nope"}
    status, _, body = await get(server, "/admin/websocket/stats", method="POST")
    assert status == 405 and "only GET" in body["error"]
    status, _, body = await get(server, "/ws/dashboard")
    assert status == 426


# Origins


async def test_foreign_origin_is_closed_1008_before_any_data(server: Server) -> None:
    async with connect(server.url, origin="http://evil.example") as ws:  # type: ignore[arg-type]
        with pytest.raises(ConnectionClosed):
            await recv_json(ws)
    assert ws.close_code == 1008
    assert ws.close_reason == "Unauthorized origin"
    assert server.get_stats()["rejected_connections"] == 1
    assert server.get_stats()["total_connections"] == 0


@pytest.mark.parametrize(
    "origin", ["http://localhost:3000", "http://127.0.0.1:8000", "http://[::1]:5173"]
)
async def test_loopback_origins_are_allowed(server: Server, origin: str) -> None:
    async with await joined(server, origin=origin):  # type: ignore[arg-type]
        pass


@pytest.mark.parametrize(
    ("headers", "accepted"),
    [
        # The dashboard this server served, reached by a public name (e.g. via a proxy).
        ("Host: lab.example.com\r\nOrigin: https://lab.example.com\r\n", True),
        ("Host: lab.example.com\r\nOrigin: https://evil.example.com\r\n", False),
    ],
)
async def test_same_origin_pages_are_allowed(server: Server, headers: str, accepted: bool) -> None:
    reader, writer = await raw_handshake(server, headers=headers)
    first = await asyncio.wait_for(reader.read(2), timeout(5))
    if accepted:
        assert first == b"\x81\x7e"  # a text frame: connection.established
    else:
        assert first[0] == 0x88  # a close frame first, no data
        rest = await asyncio.wait_for(reader.readexactly(first[1]), timeout(5))
        assert rest[:2] == (1008).to_bytes(2, "big")
        assert rest[2:] == b"Unauthorized origin"
    writer.close()


async def test_allowed_origins_extend_the_list(bus: EventBus) -> None:
    async with running_server(bus=bus, allowed_origins=["https://app.example.com"]) as server:
        async with await joined(server, origin="https://app.example.com"):  # type: ignore[arg-type]
            pass
        async with connect(server.url, origin="https://other.example.com") as ws:  # type: ignore[arg-type]
            with pytest.raises(ConnectionClosed):
                await recv_json(ws)
        assert ws.close_code == 1008


# Bad input


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "invalid_json"),
        ('{"type": "dance"}', "unknown_type"),
        ('{"type": "publish", "data": {"type": "Not A Type"}}', "invalid_event_type"),
        ('{"type": "publish", "data": {"type": "a.b", "data": "text"}}', "invalid_message"),
    ],
)
async def test_bad_messages_get_an_error_and_the_connection_stays_open(
    server: Server, bus: EventBus, frame: str, code: str
) -> None:
    async with await joined(server, "bad") as bad, await joined(server, "good") as good:
        await bad.send(frame)
        reply = await recv_json(bad)
        assert reply["type"] == "error"
        assert reply["data"]["code"] == code
        assert reply["data"]["message"]
        await bus.publish(Event(type="a.b"))
        assert (await recv_json(bad))["type"] == "a.b"
        assert (await recv_json(good))["type"] == "a.b"
    assert bus.get_stats()["events_published"] == 1


@pytest.mark.parametrize(
    ("send", "close_code"),
    [
        ("binary", 1003),
        ("oversized", 1009),
    ],
)
async def test_binary_and_oversized_frames_close_only_that_client(
    server: Server, bus: EventBus, send: str, close_code: int
) -> None:
    async with await joined(server, "good") as good:
        bad = await joined(server, "bad", max_size=None)
        if send == "binary":
            await bad.send(b"\x00\x01")
        else:
            await bad.send("x" * (2**20 + 1))
        with pytest.raises(ConnectionClosed):
            await recv_json(bad)
        assert bad.close_code == close_code
        await bus.publish(Event(type="a.b"))
        assert (await recv_json(good))["type"] == "a.b"
    await wait_for(lambda: server.get_stats()["close_codes"].get(str(close_code)) == 1, timeout(5))


async def test_invalid_utf8_closes_1007(server: Server, bus: EventBus) -> None:
    reader, writer = await raw_handshake(server)
    # A masked text frame whose payload is not UTF-8.
    payload = b"\xff\xfe"
    writer.write(bytes([0x81, 0x80 | len(payload)]) + b"\x00\x00\x00\x00" + payload)
    data = await asyncio.wait_for(reader.read(), timeout(5))
    close = data[data.rfind(b"\x88") :]
    assert int.from_bytes(close[2:4], "big") == 1007
    writer.close()


async def raw_handshake(
    server: Server, client_id: str = "raw", rcvbuf: int | None = None, headers: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", server.port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(
        (
            f"GET /ws/dashboard?client_id={client_id} HTTP/1.1\r\n"
            + (headers if headers is not None else f"Host: 127.0.0.1:{server.port}\r\n")
            + "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout(5))
    assert head.startswith(b"HTTP/1.1 101")
    return reader, writer


# Backpressure


async def test_a_client_that_never_reads_is_closed_4008_and_others_get_everything(
    bus: EventBus,
) -> None:
    manager = ConnectionManager(max_pending_bytes=256 * 1024)
    async with running_server(bus=bus, manager=manager) as server:
        good = await joined(server, "good", max_size=None)
        reader, writer = await raw_handshake(server, "stuck", rcvbuf=4096)
        await wait_for(lambda: manager.active_connections == 2)
        received: list[int] = []

        async def consume() -> None:
            while len(received) < 2000:
                received.append((await recv_json(good))["data"]["i"])

        consumer = asyncio.create_task(consume())
        for i in range(2000):
            await bus.publish(Event(type="load.test", data={"i": i, "pad": "x" * 8000}))
            if i % 10 == 0:  # a source the good client can keep up with
                await wait_for(lambda i=i: len(received) >= i - 10, interval=0.001)
        await asyncio.wait_for(consumer, timeout(10))
        assert received == list(range(2000))
        stats = server.get_stats()
        assert stats["slow_consumers_closed"] == 1
        assert stats["messages_dropped"] >= 1
        assert [c["client_id"] for c in stats["clients"]] == ["good"]
        # The stuck client's transport is aborted: reading it now ends, it never hangs.
        with contextlib.suppress(ConnectionResetError):
            while await asyncio.wait_for(reader.read(2**16), timeout(5)):
                pass
        writer.close()
        await good.close()


async def test_slow_reader_that_catches_up_sees_close_4008(bus: EventBus) -> None:
    manager = ConnectionManager(max_pending_bytes=32 * 1024)
    async with running_server(bus=bus, manager=manager) as server:
        slow = await joined(server, "slow", max_queue=1, max_size=None)
        for i in range(5000):
            await bus.publish(Event(type="load.test", data={"i": i, "pad": "x" * 1000}))
            if manager.slow_consumers_closed:
                break
        assert manager.slow_consumers_closed == 1
        with pytest.raises(ConnectionClosedError):
            while True:
                await asyncio.wait_for(slow.recv(), timeout(5))
        assert slow.close_code == 4008
        assert slow.close_reason == "slow consumer"


# Lifecycle


async def test_close_sends_1001_to_clients(bus: EventBus) -> None:
    server = await serve(port=0, bus=bus, manager=ConnectionManager())
    ws = await joined(server)
    server.close()
    await asyncio.wait_for(server.wait_closed(), timeout(5))
    with pytest.raises(ConnectionClosed):
        await recv_json(ws)
    assert ws.close_code == 1001
    assert not server.is_serving


async def test_busy_port_fails_at_once_with_a_clear_error(server: Server) -> None:
    with pytest.raises(PortInUseError, match=f"port {server.port} .* already in use"):
        serve(port=server.port)


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"port": 70000}, ValueError),
        ({"port": -1}, ValueError),
        ({"allowed_origins": "http://x"}, TypeError),
        ({"max_message_size": 10}, ValueError),
        ({"max_pending_bytes": 1}, ValueError),
        ({"compression": "zip"}, ValueError),
    ],
)
def test_bad_serve_arguments(kwargs: dict[str, Any], error: type[Exception]) -> None:
    with pytest.raises(error):
        serve(**{"port": 0, **kwargs})


async def test_resume_from_query_replays_what_was_missed(server: Server, bus: EventBus) -> None:
    for i in range(5):
        await bus.publish(Event(type="a.b", data={"i": i}))
    async with connect(f"{server.url}?client_id=r&last_seq=2&epoch={bus.epoch}") as ws:
        got = await recv_until(ws, lambda m: m["type"] == "resumed")
    assert [m["type"] for m in got] == ["connection.established", "a.b", "a.b", "a.b", "resumed"]
    assert [m["seq"] for m in got[1:4]] == [3, 4, 5]
    assert got[-1]["data"]["count"] == 3 and got[-1]["data"]["gap"] is False
