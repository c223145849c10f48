"""Poison input and unbounded growth over real sockets (issue 8, items 1, 3 and 4)."""

from __future__ import annotations

import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from gathering_lab import protocol
from gathering_lab.events import Event, EventBus
from gathering_lab.testing import recv_json, recv_until, running_server
from gathering_lab.websocket import Server


def strict_loads(raw: str | bytes) -> dict[str, Any]:
    """json.loads that fails on NaN/Infinity, as browsers' JSON.parse does."""

    def refuse(name: str) -> Any:
        raise AssertionError(f"{name} reached a client")

    message: dict[str, Any] = json.loads(raw, parse_constant=refuse)
    return message


async def joined(server: Server, query: str = "") -> ClientConnection:
    ws = await connect(f"{server.url}{query}")
    assert (await recv_json(ws))["type"] == "connection.established"
    return ws


def publish(data_json: str, type_name: str = "a.b") -> str:
    return '{"type":"publish","data":{"type":"' + type_name + '","data":' + data_json + "}}"


async def test_poison_publishes_are_refused_and_replay_keeps_working(
    server: Server, bus: EventBus
) -> None:
    async with await joined(server) as publisher, await joined(server) as watcher:
        await publisher.send(publish('{"n":1}'))
        # A lone surrogate (as JSON text), NaN, an overflowing float, deep nesting.
        poison = [
            '{"x":"\\ud800"}',
            '{"x":NaN}',
            '{"x":1e999}',
            '{"x":' + "[" * 2000 + "]" * 2000 + "}",
        ]
        for data_json in poison:
            await publisher.send(publish(data_json))
        await publisher.send(publish('{"n":2}'))
        await publisher.send('{"type":"ping","id":7}')
        received = await recv_until(publisher, lambda m: m["type"] == "pong")
        errors = [m for m in received if m["type"] == "error"]
        assert [e["data"]["code"] for e in errors] == ["invalid_message"] * 4
        assert "surrogate" in errors[0]["data"]["message"]
        assert "not strict JSON" in errors[2]["data"]["message"]  # refused by the bus
        acks = [m["data"]["seq"] for m in received if m["type"] == "published"]
        assert acks == [1, 2]  # nothing poisoned was numbered
        events = await recv_until(watcher, lambda m: m.get("seq") == 2)
        assert [e["data"] for e in events] == [{"n": 1}, {"n": 2}]
    assert bus.get_stats()["events_rejected"] == 1  # 1e999 got past the parser
    assert server.get_stats()["protocol_errors"] == {"invalid_message": 4}
    # A later client replays everything from the start.
    async with await joined(server, "?last_seq=0") as late:
        raw = [await late.recv() for _ in range(3)]
    messages = [strict_loads(r) for r in raw]
    assert [m.get("seq") for m in messages[:2]] == [1, 2]
    assert messages[2]["type"] == "resumed" and messages[2]["data"]["gap"] is False


async def test_nan_never_reaches_a_client(server: Server, bus: EventBus) -> None:
    async with await joined(server) as client:
        try:
            await bus.publish(Event("a.b", {"x": float("nan")}))
        except ValueError:
            pass
        else:
            raise AssertionError("NaN was published")
        await bus.publish(Event("a.b", {"x": 1.5}))
        message = strict_loads(await client.recv())
        assert message["data"] == {"x": 1.5} and message["seq"] == 1


async def test_huge_subscriptions_are_too_large_and_the_ack_stays_small(
    bus: EventBus, manager: Any
) -> None:
    async with running_server(bus=bus, manager=manager, max_patterns=100) as server:
        async with await joined(server) as client:
            patterns = [f"p{i}.x" for i in range(75_000)]
            await client.send(json.dumps({"type": "subscribe", "data": {"event_types": patterns}}))
            raw = await client.recv()
            assert len(raw) < 500
            reply = strict_loads(raw)
            assert reply["type"] == "error" and reply["data"]["code"] == "too_large"
            assert "limit is 100" in reply["data"]["message"]
            long = "a." + "b" * protocol.MAX_PATTERN_LENGTH
            await client.send(json.dumps({"type": "subscribe", "data": {"event_types": [long]}}))
            assert strict_loads(await client.recv())["data"]["code"] == "too_large"
            # Still open, still receiving everything.
            await client.send(
                json.dumps({"type": "subscribe", "data": {"event_types": patterns[:100]}})
            )
            ack = strict_loads(await client.recv())
            assert ack["type"] == "subscribed" and len(ack["data"]["event_types"]) == 100
            await bus.publish(Event("p99.x"))
            assert strict_loads(await client.recv())["type"] == "p99.x"
        stats = server.get_stats()
        assert stats["protocol_errors"] == {"too_large": 2}
        assert stats["max_patterns"] == 100


async def test_large_publishes_keep_history_under_its_byte_cap(manager: Any) -> None:
    cap = 4 * 2**20
    bus = EventBus(history_bytes=cap)
    async with running_server(bus=bus, manager=manager) as server:
        async with await joined(server) as publisher:
            blob = json.dumps({"blob": "x" * 1_000_000})
            for _ in range(12):
                await publisher.send(publish(blob, "big.blob"))
                reply = strict_loads(await publisher.recv())
                while reply["type"] != "published":  # its own event comes back first
                    reply = strict_loads(await publisher.recv())
                assert bus.get_stats()["history_bytes"] <= cap
        stats = bus.get_stats()
        assert stats["history_size"] == 4 and stats["history_evicted"] == 8
        async with await joined(server, "?last_seq=0") as late:
            replayed = await recv_until(late, lambda m: m["type"] == "resumed")
        assert [m.get("seq") for m in replayed[:-1]] == [9, 10, 11, 12]
        assert replayed[-1]["data"]["gap"] is True


async def test_server_side_filters_compare_ids_exactly(server: Server, bus: EventBus) -> None:
    async with await joined(server) as client:
        await client.send(json.dumps({"type": "subscribe", "data": {"circle_id": 1}}))
        assert strict_loads(await client.recv())["type"] == "subscribed"
        await bus.publish(Event("a.b", {"n": "string"}, circle_id="1"))
        await bus.publish(Event("a.b", {"n": "int"}, circle_id=1))
        assert strict_loads(await client.recv())["data"] == {"n": "int"}
