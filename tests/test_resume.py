"""Resume: what a client missed is replayed exactly once, in order, and a gap is never hidden.

Real clients on loopback: plain websockets clients (the wire protocol as any client sees
it) and LabClient (which resumes by itself).
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gathering_lab.client import LabClient
from gathering_lab.events import Event, EventBus
from gathering_lab.testing import recv_json, recv_until, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, Server

N = 1000


async def greeted(url: str, **kwargs: Any) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url, max_size=None, **kwargs)
    hello = await recv_json(ws)
    assert hello["type"] == "connection.established"
    return ws, hello["data"]


async def publish(bus: EventBus, count: int, pad: int = 0, **ids: Any) -> list[int]:
    seqs = []
    for i in range(count):
        event = await bus.publish(Event(type="load.test", data={"i": i, "pad": "x" * pad}, **ids))
        assert event.seq is not None
        seqs.append(event.seq)
    return seqs


def seqs_of(messages: list[dict[str, Any]]) -> list[int]:
    return [m["seq"] for m in messages if m["type"] == "load.test"]


@pytest.fixture
async def lab_client(server: Server) -> AsyncIterator[LabClient]:
    client = LabClient(server.url, "lab", base_delay=0.05, max_delay=0.2, heartbeat=None)
    await client.connect()
    yield client
    await client.close()


# Plain websockets clients


async def test_reconnect_with_last_seq_gets_exactly_the_missed_events_in_order(
    server: Server, bus: EventBus
) -> None:
    await publish(bus, 5)
    ws, hello = await greeted(f"{server.url}?client_id=r")
    last_seq, epoch = hello["seq"], hello["epoch"]
    assert last_seq == 5
    await ws.close()
    missed = await publish(bus, N)
    ws, hello = await greeted(f"{server.url}?client_id=r&last_seq={last_seq}&epoch={epoch}")
    got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=10)
    assert seqs_of(got) == missed == list(range(6, 6 + N))
    assert [m["data"]["i"] for m in got[:-1]] == list(range(N))
    assert all(m["epoch"] == epoch for m in got[:-1])
    ack = got[-1]["data"]
    assert ack == {
        "count": N,
        "since_seq": 5,
        "seq": 5 + N,
        "epoch": epoch,
        "gap": False,
    }
    # Then it continues live, nothing replayed twice.
    await bus.publish(Event(type="after.resume"))
    after = await recv_json(ws)
    assert (after["type"], after["seq"]) == ("after.resume", 6 + N)
    await ws.close()


async def test_the_resume_message_does_the_same(server: Server, bus: EventBus) -> None:
    ws, hello = await greeted(server.url)
    start = hello["seq"]
    await ws.close()
    missed = await publish(bus, N)
    ws, hello = await greeted(server.url)
    await ws.send(
        json.dumps({"type": "resume", "data": {"since_seq": start, "epoch": hello["epoch"]}})
    )
    got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=10)
    assert seqs_of(got) == missed
    assert got[-1]["data"]["count"] == N and got[-1]["data"]["gap"] is False
    await ws.close()


async def test_live_events_during_the_resume_are_neither_lost_nor_repeated(
    server: Server, bus: EventBus
) -> None:
    ws, hello = await greeted(server.url)
    await ws.close()
    first = await publish(bus, N // 2)
    # Publishing goes on while the client reconnects and resumes.
    publisher = asyncio.create_task(publish(bus, N // 2))
    ws, _ = await greeted(f"{server.url}?last_seq={hello['seq']}&epoch={hello['epoch']}")
    second = await publisher
    seen: set[str] = set()

    def done(message: dict[str, Any]) -> bool:
        seen.add("resumed" if message["type"] == "resumed" else str(message.get("seq")))
        return {"resumed", str(second[-1])} <= seen

    got = await recv_until(ws, done, wait=10)
    assert seqs_of(got) == first + second
    types = [m["type"] for m in got]
    assert types.count("resumed") == 1
    # Replayed events come before the ack, live ones after it: one ordered stream.
    split = types.index("resumed")
    joined_at = got[split]["data"]["seq"]
    assert all(m["seq"] <= joined_at for m in got[:split])
    assert all(m["seq"] > joined_at for m in got[split + 1 :])
    await ws.close()


async def test_resume_applies_the_clients_filters(server: Server, bus: EventBus) -> None:
    for i in range(20):
        await bus.publish(Event(type="task.created" if i % 2 else "agent.started", circle_id=i % 4))
    ws, hello = await greeted(server.url)
    await ws.send(
        json.dumps({"type": "subscribe", "data": {"event_types": ["task.*"], "circle_id": 1}})
    )
    assert (await recv_json(ws))["type"] == "subscribed"
    await ws.send(json.dumps({"type": "resume", "data": {"since_seq": 0}}))
    got = await recv_until(ws, lambda m: m["type"] == "resumed")
    assert [m["seq"] for m in got[:-1]] == [2, 6, 10, 14, 18]  # i = 1, 5, 9, 13, 17
    assert got[-1]["data"]["count"] == 5
    await ws.close()


# Gaps


async def test_a_resume_older_than_history_reports_a_gap(manager: ConnectionManager) -> None:
    bus = EventBus(history_size=100)
    async with running_server(bus=bus, manager=manager) as server:
        ws, hello = await greeted(server.url)
        await ws.close()
        missed = await publish(bus, N)
        ws, _ = await greeted(f"{server.url}?last_seq={hello['seq']}&epoch={hello['epoch']}")
        got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=10)
        await ws.close()
    # What history still holds is replayed, in order, and the rest is said to be gone.
    assert seqs_of(got) == missed[-100:]
    ack = got[-1]["data"]
    assert ack["gap"] is True and ack["count"] == 100 and ack["since_seq"] == 0


async def test_a_resume_from_another_epoch_reports_a_gap(server: Server, bus: EventBus) -> None:
    current = await publish(bus, 10)
    ws, _ = await greeted(f"{server.url}?last_seq=500&epoch=previous-run")
    got = await recv_until(ws, lambda m: m["type"] == "resumed")
    await ws.close()
    # Seq 500 of another run means nothing here: all of this run is new to the client.
    assert seqs_of(got) == current
    assert got[-1]["data"]["gap"] is True and got[-1]["data"]["epoch"] == bus.epoch


async def test_lab_client_records_a_gap(manager: ConnectionManager) -> None:
    bus = EventBus(history_size=50)
    async with running_server(bus=bus, manager=manager) as server:
        client = LabClient(server.url, "gappy", base_delay=0.05, heartbeat=None)
        await client.connect()
        try:
            await client.close()
            await publish(bus, 200)
            await client.connect()
            await client.wait_for_events(50, timeout(10))
            await wait_for(lambda: client.gaps == 1)
            df = client.frame.df
            assert "lab.gap" in set(df["type"])
            assert list(df.loc[df["type"] == "load.test", "seq"]) == list(range(151, 201))
        finally:
            await client.close()


# LabClient


async def test_lab_client_close_publish_reconnect(lab_client: LabClient, bus: EventBus) -> None:
    before = await publish(bus, 3)
    await lab_client.wait_for_events(3)
    await lab_client.close()
    missed = await publish(bus, N)
    await lab_client.connect()
    await lab_client.wait_for_events(3 + N, timeout(10))
    after = await publish(bus, 2)
    await lab_client.wait_for_events(5 + N)
    assert list(lab_client.frame.df["seq"]) == before + missed + after
    assert lab_client.duplicates == 0 and lab_client.gaps == 0 and lab_client.restarts == 0


async def test_lab_client_cut_by_the_network_resumes_without_loss(
    server: Server, bus: EventBus, lab_client: LabClient
) -> None:
    before = await publish(bus, 10)
    await lab_client.wait_for_events(10)
    server.manager.sessions[0].transport.abort()  # the connection dies under it
    missed = await publish(bus, N)
    await lab_client.wait_for_events(10 + N, timeout(15))
    assert lab_client.reconnects >= 1
    assert list(lab_client.frame.df["seq"]) == before + missed
    assert lab_client.duplicates == 0


# Slow consumers (4008)


async def test_a_client_evicted_as_slow_resumes_without_loss(bus: EventBus) -> None:
    manager = ConnectionManager(max_pending_bytes=64 * 1024)
    async with running_server(bus=bus, manager=manager) as server:
        # A client that stops reading: a tiny receive buffer and no reads.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.setblocking(False)
        stuck, hello = await greeted(f"{server.url}?client_id=stuck", sock=sock, max_queue=1)
        stuck.transport.pause_reading()
        missed: list[int] = []
        while not manager.slow_consumers_closed:
            missed += await publish(bus, 50, pad=8000)
            assert len(missed) <= 5000, "never evicted"
        assert manager.messages_dropped >= 1
        missed += await publish(bus, N)  # and more while it is away
        stuck.transport.abort()
        # It comes back with the last seq it saw and gets everything.
        ws, _ = await greeted(
            f"{server.url}?client_id=stuck&last_seq={hello['seq']}&epoch={hello['epoch']}"
        )
        got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=10)
        assert seqs_of(got) == missed
        assert got[-1]["data"]["gap"] is False
        await ws.close()


async def test_lab_client_evicted_as_slow_resumes_without_loss(bus: EventBus) -> None:
    manager = ConnectionManager(max_pending_bytes=64 * 1024)
    async with running_server(bus=bus, manager=manager) as server:
        client = LabClient(server.url, "slow", base_delay=0.05, max_delay=0.2, heartbeat=None)
        await client.connect()
        try:
            before = await publish(bus, 5)
            await client.wait_for_events(5)
            assert client._ws is not None
            client._ws.transport.pause_reading()  # the notebook cell that hogs the loop
            missed: list[int] = []
            while not manager.slow_consumers_closed:
                missed += await publish(bus, 50, pad=8000)
                assert len(missed) <= 5000, "never evicted"
            missed += await publish(bus, N)  # and more while it is away
            client._ws.transport.resume_reading()
            total = len(before) + len(missed)
            await client.wait_for_events(total, timeout(20))
            assert client.reconnects >= 1
            assert list(client.frame.df["seq"]) == before + missed
            assert client.duplicates == 0 and client.gaps == 0
        finally:
            await client.close()
