"""Replays stream in bounded chunks; one manager per bus; the group index; fragmented sends.

Issue 8, items 2 and 4 and the "one fan-out per server" finding: real servers on loopback,
real websockets clients and raw sockets that never read.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
from typing import Any

import pytest
from websockets.asyncio.client import connect

from gathering_lab.events import Event, EventBus
from gathering_lab.protocol import Filters, type_matches
from gathering_lab.testing import recv_json, recv_until, running_server, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, Server, manager_for, serve

PAD = "x" * 1200


async def fill(bus: EventBus, count: int, pad: str = PAD, **ids: Any) -> None:
    for i in range(count):
        await bus.publish(Event(type="load.test", data={"i": i, "pad": pad}, **ids))


def handshake(port: int, query: str, rcvbuf: int = 4096) -> socket.socket:
    """A raw client that completes the WebSocket handshake, then never reads."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.connect(("127.0.0.1", port))
    sock.sendall(
        (
            f"GET /ws/dashboard?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    return sock


async def test_replays_to_clients_that_never_read_hold_one_chunk_each(
    bus: EventBus, manager: ConnectionManager
) -> None:
    await fill(bus, 3000)  # ~3.7 MB of history
    async with running_server(bus=bus, manager=manager) as server:
        socks = [handshake(server.port, f"client_id=s{i}&last_seq=0") for i in range(30)]
        try:
            await wait_for(lambda: manager.replays_active == 30, timeout(10))
            # Each replay waits for its socket to drain: what the server holds per client
            # stays near one chunk, not the whole 3.7 MB history.
            await asyncio.sleep(0.2)
            pending = [s.pending_bytes for s in manager.sessions]
            assert max(pending) <= 2 * manager.replay_chunk_bytes, pending
            # Meanwhile other clients are served at once.
            async with connect(f"{server.url}?client_id=probe") as probe:
                assert (await recv_json(probe))["type"] == "connection.established"
                for _ in range(5):
                    await probe.send(json.dumps({"type": "ping", "id": "p"}))
                    pong = await recv_json(probe, wait=timeout(2))
                    assert pong["type"] == "pong"
        finally:
            for sock in socks:
                sock.close()
        await wait_for(lambda: manager.replays_active == 0, timeout(10))


async def test_a_stalled_replay_is_evicted_and_counted(bus: EventBus) -> None:
    manager = ConnectionManager(replay_stall_timeout=0.3)
    await fill(bus, 500, pad="x" * 20_000)  # 10 MB: more than the kernel's socket buffers
    async with running_server(bus=bus, manager=manager) as server:
        sock = handshake(server.port, "client_id=stall&last_seq=0")
        try:
            await wait_for(lambda: manager.replays_stalled == 1, timeout(10))
            await wait_for(lambda: manager.active_connections == 0, timeout(10))
            assert manager.get_stats()["slow_consumers_closed"] == 1
        finally:
            sock.close()


async def test_url_resume_during_a_publish_storm_is_exactly_once_in_order(
    server: Server, bus: EventBus, manager: ConnectionManager
) -> None:
    await fill(bus, 2000)
    epoch = bus.epoch

    async def storm() -> None:
        for i in range(1000):
            await bus.publish(Event(type="load.live", data={"i": i}))
            if i % 50 == 0:
                await asyncio.sleep(0)

    async with connect(f"{server.url}?client_id=r&last_seq=0&epoch={epoch}", max_size=None) as ws:
        assert (await recv_json(ws))["type"] == "connection.established"
        publisher = asyncio.get_running_loop().create_task(storm())
        seen: set[Any] = set()

        def done(message: dict[str, Any]) -> bool:
            seen.add(message["type"] if message["type"] == "resumed" else message.get("seq"))
            return {"resumed", 3000} <= seen

        got = await recv_until(ws, done, wait=timeout(20))
        await publisher
    seqs = [m["seq"] for m in got if "seq" in m and m["type"] != "resumed"]
    assert seqs == list(range(1, 3001))
    resumed = [m for m in got if m["type"] == "resumed"]
    assert len(resumed) == 1 and resumed[0]["data"]["gap"] is False
    assert manager.replays_completed >= 1


async def test_resume_message_with_a_stale_epoch_is_streamed_and_reports_a_gap(
    server: Server, bus: EventBus
) -> None:
    await fill(bus, 500)
    async with connect(f"{server.url}?client_id=s", max_size=None) as ws:
        assert (await recv_json(ws))["type"] == "connection.established"
        await ws.send(json.dumps({"type": "resume", "data": {"since_seq": 3, "epoch": "old"}}))
        got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=timeout(10))
    assert [m["seq"] for m in got[:-1]] == list(range(1, 501))
    assert got[-1]["data"]["gap"] is True and got[-1]["data"]["count"] == 500


async def test_history_trimmed_while_a_replay_waits_is_a_gap() -> None:
    small = EventBus(history_size=200)
    manager = ConnectionManager()
    await fill(small, 200, pad="x" * 20_000)
    async with running_server(bus=small, manager=manager) as server:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        url = f"{server.url}?client_id=t&last_seq=0&epoch={small.epoch}"
        async with connect(url, sock=sock, max_queue=1, max_size=None) as ws:
            assert (await recv_json(ws))["type"] == "connection.established"
            (session,) = manager.sessions
            await wait_for(lambda: session.pending_bytes > 0, timeout(10))
            assert manager.replays_active == 1
            await fill(small, 400, pad="")  # history now holds 401..600: the replay fell behind it
            got = await recv_until(ws, lambda m: m["type"] == "resumed", wait=timeout(10))
    seqs = [m["seq"] for m in got[:-1]]
    assert seqs == sorted(set(seqs)) and seqs[-1] == 600
    assert seqs[0] == 1 and 401 in seqs and len(seqs) < 600
    assert got[-1]["data"]["gap"] is True and got[-1]["data"]["count"] == len(seqs)


async def test_two_servers_on_two_buses_never_see_each_others_events() -> None:
    bus_a, bus_b = EventBus(), EventBus()
    async with (
        running_server(bus=bus_a, manager=None) as a,
        running_server(bus=bus_b, manager=None) as b,
    ):
        assert a.manager is manager_for(bus_a) and b.manager is manager_for(bus_b)
        assert a.manager is not b.manager
        async with connect(a.url) as wa, connect(b.url) as wb:
            await recv_json(wa), await recv_json(wb)
            await bus_a.publish(Event(type="only.a"))
            await bus_b.publish(Event(type="only.b"))
            got_a, got_b = await recv_json(wa), await recv_json(wb)
            assert (got_a["type"], got_a["seq"]) == ("only.a", 1)
            assert (got_b["type"], got_b["seq"]) == ("only.b", 1)
            await wa.send(json.dumps({"type": "ping"}))
            assert (await recv_json(wa))["type"] == "pong"  # nothing of bus b came first


async def test_a_manager_serves_one_bus_at_a_time() -> None:
    manager = ConnectionManager()
    async with running_server(bus=EventBus(), manager=manager):
        with pytest.raises(ValueError, match="serves one bus"):
            await serve(port=0, bus=EventBus(), manager=manager)
    # Once that server is closed, the manager may serve a new run on another bus.
    bus = EventBus()
    async with running_server(bus=bus, manager=manager) as server:
        assert manager.bus is bus
        async with connect(server.url) as ws:
            await recv_json(ws)
            await bus.publish(Event(type="new.run"))
            assert (await recv_json(ws))["seq"] == 1


async def test_many_distinct_filters_each_get_exactly_what_matches(
    server: Server, bus: EventBus, manager: ConnectionManager
) -> None:
    rng = random.Random(8)
    words = ["task", "agent", "circle"]
    subs = ["created", "started", "member", "done"]
    types = [f"{w}.{s}" for w in words for s in subs] + ["task.member.added", "agent.x.y"]
    choices = types + [f"{w}.*" for w in words] + ["task.member.*", "*"]
    clients = []
    for i in range(40):
        patterns = sorted(set(rng.sample(choices, rng.randint(1, 4))))
        circle = rng.choice([None, 1, 2])
        ws = await connect(f"{server.url}?client_id=c{i}")
        await recv_json(ws)
        data: dict[str, Any] = {"event_types": patterns, "circle_id": circle}
        await ws.send(json.dumps({"type": "subscribe", "data": data}))
        assert (await recv_json(ws))["type"] == "subscribed"
        clients.append((ws, Filters(tuple(patterns), circle)))
    published = []
    for n in range(120):
        event = Event(type=rng.choice(types), circle_id=rng.choice([None, 1, 2]), data={"n": n})
        published.append(await bus.publish(event))
    for ws, filters in clients:
        await ws.send(json.dumps({"type": "ping", "id": "end"}))
        got = await recv_until(ws, lambda m: m["type"] == "pong", wait=timeout(10))
        want = [
            e.seq
            for e in published
            if type_matches(filters.event_types, e.type_name)
            and (filters.circle_id is None or e.circle_id == filters.circle_id)
        ]
        assert [m["seq"] for m in got[:-1]] == want, filters
        await ws.close()
    await wait_for(lambda: manager.get_stats()["filter_groups"] == 0, timeout(5))


async def test_frames_wait_for_a_fragmented_message_in_progress(
    server: Server, bus: EventBus, manager: ConnectionManager
) -> None:
    async with connect(f"{server.url}?client_id=f") as ws:
        await recv_json(ws)
        (session,) = manager.sessions
        release = asyncio.Event()

        async def fragments() -> Any:
            yield '{"type":"note",'
            await release.wait()
            yield '"data":{}}'

        task = asyncio.get_running_loop().create_task(session.connection.send(fragments()))
        await wait_for(lambda: session.connection.send_in_progress is not None, timeout(5))
        await bus.publish(Event(type="during.fragments"))
        manager.flush()
        assert session.deferred and session.pending_bytes > 0
        release.set()
        await task
        first, second = await recv_json(ws), await recv_json(ws)
        assert first["type"] == "note" and second["type"] == "during.fragments"
        assert not session.deferred


def masked_text(payload: str) -> bytes:
    """A client text frame (masked with a zero key, as RFC 6455 allows)."""
    data = payload.encode()
    size = len(data)
    header = bytes([0x81, 0x80 | size]) if size < 126 else bytes([0x81, 0xFE]) + size.to_bytes(2)
    return header + b"\x00\x00\x00\x00" + data


class CountingTransport:
    """Counts the writes to one client's transport (everything else passes through)."""

    def __init__(self, transport: Any) -> None:
        self._transport = transport
        self.writes = 0

    def write(self, data: bytes) -> None:
        self.writes += 1
        self._transport.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


async def test_a_burst_of_publishes_is_written_in_batches_with_replies_in_order(
    server: Server, bus: EventBus, manager: ConnectionManager
) -> None:
    async with connect(f"{server.url}?client_id=watch") as watcher:
        await recv_json(watcher)
        (watch,) = manager.sessions
        counting = CountingTransport(watch.transport)
        watch.transport = counting
        publisher = handshake(server.port, "client_id=pub", rcvbuf=1 << 20)
        try:
            burst = []
            for i in range(200):
                data = {"type": "load.test", "data": {"i": i}}
                burst.append(masked_text(json.dumps({"type": "publish", "id": i, "data": data})))
                if i == 100:
                    burst.append(masked_text('{"type":"ping","id":"mid"}'))
            publisher.sendall(b"".join(burst))
            got = await recv_until(watcher, lambda m: m.get("seq") == 200, wait=timeout(10))
            assert [m["data"]["i"] for m in got] == list(range(200))
            # One write per batch, not one per event (nor one per reply to the publisher).
            assert counting.writes <= 100, counting.writes
            # The publisher got each event, then its ack, in order, with the pong in place.
            stream = b""
            publisher.settimeout(timeout(5))
            while stream.count(b'"published"') < 200:
                stream += publisher.recv(1 << 20)
        finally:
            publisher.close()
    messages = []
    rest = stream[stream.index(b"\r\n\r\n") + 4 :]
    while rest:
        size, start = rest[1] & 0x7F, 2
        if size == 126:
            size, start = int.from_bytes(rest[2:4]), 4
        messages.append(json.loads(rest[start : start + size]))
        rest = rest[start + size :]
    kinds = [(m["type"], m.get("id", m.get("data", {}).get("i"))) for m in messages[1:]]
    expected: list[tuple[str, Any]] = []
    for i in range(200):
        expected += [("load.test", i), ("published", i)]
        if i == 100:
            expected.append(("pong", "mid"))
    assert kinds == expected


@pytest.mark.parametrize("delay", [0.0, 0.05])
async def test_write_delay_coalesces_a_paced_stream_into_fewer_writes(
    bus: EventBus, delay: float
) -> None:
    manager = ConnectionManager(write_delay=delay)
    async with running_server(bus=bus, manager=manager) as server:
        async with connect(f"{server.url}?client_id=w") as ws:
            await recv_json(ws)
            (session,) = manager.sessions
            counting = CountingTransport(session.transport)
            session.transport = counting
            for i in range(20):  # 20 events, one every 5 ms: one loop turn each
                await bus.publish(Event(type="paced.event", data={"i": i}))
                await asyncio.sleep(0.005)
            got = await recv_until(ws, lambda m: m.get("seq") == 20, wait=timeout(5))
    assert [m["data"]["i"] for m in got] == list(range(20))
    assert manager.get_stats()["write_delay"] == delay
    if delay:
        assert counting.writes <= 10, counting.writes  # about 100 ms / 50 ms, not 20
    else:
        assert counting.writes == 20


async def test_a_sliced_flush_takes_in_what_is_published_meanwhile_in_order(
    bus: EventBus,
) -> None:
    # Two clients per loop turn: a flush to nine clients takes five turns, and what is
    # published in between joins it. Each client must still get exactly its events, in
    # order, and the publisher each event before its ack.
    manager = ConnectionManager(flush_slice=2)
    filters = {"all": None, "a": ["a.*"], "b": ["b.*"]}
    async with running_server(bus=bus, manager=manager, publish_rate=0) as server:
        watchers: dict[str, tuple[Any, list[str] | None]] = {}
        for name, types in filters.items():
            for n in range(3 if name == "all" else 2):
                ws = await connect(f"{server.url}?client_id={name}-{n}")
                await recv_json(ws)
                if types:
                    await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": types}}))
                    await recv_until(ws, lambda m: m["type"] == "subscribed")
                watchers[f"{name}-{n}"] = (ws, types)
        async with connect(f"{server.url}?client_id=pub") as pub:
            await recv_json(pub)

            async def publish_from_client() -> None:
                for i in range(40):
                    event = {"type": "a.client" if i % 2 else "b.client", "data": {"i": i}}
                    await pub.send(json.dumps({"type": "publish", "id": i, "data": event}))
                    await asyncio.sleep(0)

            sending = asyncio.create_task(publish_from_client())
            for i in range(60):
                await bus.publish(Event(type="a.local" if i % 3 else "b.local", data={"i": i}))
                await asyncio.sleep(0)  # one loop turn: one slice of the flush under way
            await sending
            got = await recv_until(
                pub, lambda m: m.get("type") == "published" and m.get("id") == 39, wait=timeout(10)
            )
            if not any(m.get("seq") == 100 for m in got):  # read it all, so that it closes
                got += await recv_until(pub, lambda m: m.get("seq") == 100)
            acks = [m for m in got if m["type"] == "published"]
            assert [m["id"] for m in acks] == list(range(40))
            for ack in acks:  # its own event first, then the ack
                position = next(
                    k for k, m in enumerate(got) if m.get("event_id") == ack["data"]["event_id"]
                )
                assert position < got.index(ack)
            published = sorted(bus.get_history(limit=1000), key=lambda e: e.seq or 0)
            assert len(published) == 100
            for name, (ws, types) in watchers.items():
                wanted = [e.seq for e in published if types is None or e.type_name[0] == name[0]]
                received = await recv_until(ws, lambda m, last=wanted[-1]: m.get("seq") == last)
                assert [m["seq"] for m in received] == wanted, name
                await ws.close()
    stats = manager.get_stats()
    assert stats["flush_slice"] == 2
    assert stats["flushes_joined"] > 0  # batches did join a flush under way
    assert stats["flush_turns"] > stats["flushes_joined"]


async def test_a_reply_during_a_sliced_flush_waits_its_turn(bus: EventBus) -> None:
    manager = ConnectionManager(flush_slice=1)
    async with running_server(bus=bus, manager=manager) as server:
        clients = [await connect(f"{server.url}?client_id=c{n}") for n in range(4)]
        for ws in clients:
            await recv_json(ws)
        await bus.publish(Event(type="one.event"))
        await asyncio.sleep(0)  # the flush's first turn: one client written, three to go
        assert manager.get_stats()["flush_turns"] == 1
        for session in manager.sessions:
            assert manager.send(session, {"type": "note", "data": {}})
        # The replies joined the flush under way instead of making it finish at once.
        assert manager.get_stats()["flush_turns"] == 1
        for ws in clients:
            first, second = await recv_json(ws), await recv_json(ws)
            assert (first["type"], second["type"]) == ("one.event", "note")
            await ws.close()
    assert manager.get_stats()["flush_turns"] >= 4


async def test_a_stream_that_never_lets_a_sliced_flush_end_keeps_it_bounded(
    bus: EventBus,
) -> None:
    # One client per turn and an event every turn: the flush under way would take in events
    # for ever. Past flush_bytes it is finished at once and the next one starts.
    manager = ConnectionManager(flush_slice=1, flush_bytes=4096)
    async with running_server(bus=bus, manager=manager) as server:
        clients = [await connect(f"{server.url}?client_id=c{n}") for n in range(4)]
        for ws in clients:
            await recv_json(ws)
        largest = 0
        for i in range(300):
            await bus.publish(Event(type="steady.stream", data={"i": i}))
            await asyncio.sleep(0)
            work = manager._work
            largest = max(largest, work.size if work is not None else 0)
        assert 0 < largest <= manager.flush_bytes
        for ws in clients:
            got = await recv_until(ws, lambda m: m.get("seq") == 300, wait=timeout(10))
            assert [m["data"]["i"] for m in got] == list(range(300))
            await ws.close()
    stats = manager.get_stats()
    assert stats["flushes_finished_early"] > 0
    assert stats["flushes_joined"] > stats["flushes_finished_early"]


@pytest.mark.parametrize("slice_", [0, 1, 128])
async def test_flush_slice_sizes_deliver_the_same(bus: EventBus, slice_: int) -> None:
    manager = ConnectionManager(flush_slice=slice_)
    async with running_server(bus=bus, manager=manager) as server:
        clients = [await connect(f"{server.url}?client_id=c{n}") for n in range(5)]
        for ws in clients:
            await recv_json(ws)
        for i in range(30):
            await bus.publish(Event(type="paced.event", data={"i": i}))
            if i % 4 == 0:
                await asyncio.sleep(0)
        for ws in clients:
            got = await recv_until(ws, lambda m: m.get("seq") == 30)
            assert [m["data"]["i"] for m in got] == list(range(30))
            await ws.close()
    if slice_ == 0:  # one turn per flush: nothing can join one
        assert manager.get_stats()["flushes_joined"] == 0


def test_flush_slice_is_checked() -> None:
    for bad in (-1, 1.5, "8", True, None):
        with pytest.raises(ValueError, match="flush_slice"):
            ConnectionManager(flush_slice=bad)


def test_write_delay_is_checked() -> None:
    for bad in (-0.01, 2, "20ms", True):
        with pytest.raises(ValueError, match="write_delay"):
            ConnectionManager(write_delay=bad)


# The replay tool (gathering_lab.replay) over a server that stops and starts again


def numbered_trace(count: int, step: float = 0.001) -> Any:
    """A DataFrame of ``count`` events whose data numbers them, ``step`` seconds apart."""
    import pandas as pd

    start = pd.Timestamp("2026-01-01", tz="UTC")
    return pd.DataFrame(
        {
            "type": ["replay.test"] * count,
            "data": [{"i": i} for i in range(count)],
            "received_at": [start + pd.Timedelta(seconds=i * step) for i in range(count)],
        }
    )


async def test_replay_goes_on_across_a_server_restart_exactly_once_where_acked() -> None:
    from gathering_lab.replay import replay
    from gathering_lab.testing import free_port

    count = 2000
    bus = EventBus()  # the same process bus on both runs: its log survives the restart
    port = free_port()
    published: list[int] = []
    bus.subscribe("replay.test", lambda event: published.append(event.data["i"]))
    # 2000 events over 2 s, at most 256 in flight (no server rate: no pacing).
    options = {"bus": bus, "port": port, "publish_rate": 0}
    async with running_server(**options) as server:
        task = asyncio.create_task(
            replay(numbered_trace(count), server.url, progress=False, base_delay=0.05)
        )
        await wait_for(lambda: len(published) >= 500, timeout(10))
    down_at = len(published)
    assert down_at < count and not task.done()  # stopped mid-replay
    async with running_server(**options, manager=ConnectionManager()):
        result = await asyncio.wait_for(task, timeout(30))
    assert result.reconnects == 1 and result.connections == 2
    assert result.published == result.total == count and result.failed == 0
    # Every event at least once, in order of first publication; exactly once unless the
    # replay said it may be twice (sent, no ack, connection lost).
    first_seen = list(dict.fromkeys(published))
    assert first_seen == list(range(count))
    twice = {i for i in set(published) if published.count(i) > 1}
    assert twice <= set(result.maybe_duplicated)
    assert all(published.count(i) <= 2 for i in result.maybe_duplicated)
    assert len(published) == count + len(twice)
    assert result.resent >= len(result.maybe_duplicated)


async def test_replay_without_reconnect_fails_at_the_drop() -> None:
    from gathering_lab.exceptions import ConnectionFailed
    from gathering_lab.replay import replay

    bus = EventBus()
    published: list[int] = []
    bus.subscribe("replay.test", lambda event: published.append(event.data["i"]))
    async with running_server(bus=bus, publish_rate=0) as server:
        task = asyncio.create_task(
            replay(numbered_trace(2000), server.url, progress=False, reconnect=False)
        )
        await wait_for(lambda: len(published) >= 100, timeout(10))
    with pytest.raises(ConnectionFailed, match="closed the connection.*1001"):
        await asyncio.wait_for(task, timeout(10))


async def test_replay_gives_up_when_the_server_does_not_come_back() -> None:
    from gathering_lab.exceptions import ConnectionFailed
    from gathering_lab.replay import replay

    bus = EventBus()
    published: list[int] = []
    bus.subscribe("replay.test", lambda event: published.append(event.data["i"]))
    async with running_server(bus=bus, publish_rate=0) as server:
        task = asyncio.create_task(
            replay(
                numbered_trace(2000),
                server.url,
                progress=False,
                base_delay=0.05,
                max_delay=0.1,
                max_retries=3,
            )
        )
        await wait_for(lambda: len(published) >= 100, timeout(10))
    with pytest.raises(ConnectionFailed, match=r"gave up after 3 reconnect attempts .* of 2000"):
        await asyncio.wait_for(task, timeout(10))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"max_retries": -1}, "max_retries"),
        ({"base_delay": 0}, "base_delay"),
        ({"retry_timeout": 0}, "retry_timeout"),
    ],
)
async def test_replay_reconnect_options_are_checked(kwargs: dict[str, Any], match: str) -> None:
    from gathering_lab.replay import replay

    with pytest.raises(ValueError, match=match):
        await replay(numbered_trace(1), "ws://127.0.0.1:9/ws/dashboard", **kwargs)


async def test_replay_cli_reconnects_and_reports_it(tmp_path: Any) -> None:
    import os
    import re
    import sys

    from gathering_lab.record import write_demo_recording
    from gathering_lab.testing import free_port

    trace = write_demo_recording(tmp_path / "t.jsonl", 2000, rate=1000)  # 2 s at speed 1
    bus = EventBus()
    published: list[Event] = []
    bus.subscribe("*", published.append)
    options = {"bus": bus, "port": free_port(), "publish_rate": 0}
    async with running_server(**options) as server:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            *("-m", "gathering_lab", "replay", str(trace), "--url", server.url),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "TQDM_DISABLE": "1"},
        )
        try:
            await wait_for(lambda: len(published) >= 300, timeout(20))
        except BaseException:
            process.kill()
            raise
    try:
        async with running_server(**options, manager=ConnectionManager()):
            _, err = await asyncio.wait_for(process.communicate(), timeout(30))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    text = err.decode()
    assert process.returncode == 0, text
    summary = re.search(
        r"replay: 2000 of 2000 events published in [\d.]+ s \(\d+ ev/s\); held back 0 times "
        r"by the server's publish rate .*, 1 reconnects \((\d+) events may have been "
        r"published twice\)",
        text,
    )
    assert summary is not None, text
    twice = int(summary.group(1))
    assert len(published) - 2000 <= twice
    if twice:
        assert "may have been published twice (sent, no ack, connection lost): events #" in text
    assert "reconnecting in" in text and "Traceback" not in text


async def test_replay_over_a_redis_log_survives_a_node_restart(redis_server: Any) -> None:
    from gathering_lab.replay import replay
    from gathering_lab.testing import free_port
    from gathering_lab.websocket import serve as serve_node

    count = 1000
    port = free_port()

    async def node() -> Server:
        return await serve_node(
            port=port, bus=redis_server.url, manager=ConnectionManager(), publish_rate=0
        )

    first = await node()
    try:
        task = asyncio.create_task(
            replay(numbered_trace(count, 0.002), first.url, progress=False, base_delay=0.05)
        )
        await wait_for(lambda: first.bus.last_seq >= 300, timeout(10))
    finally:
        first.close()
        await first.wait_closed()
    assert not task.done()
    second = await node()  # a new bus on the same log: seq and epoch go on
    try:
        result = await asyncio.wait_for(task, timeout(30))
        last, epoch = second.bus.last_seq, second.bus.epoch
        url = f"{second.url}?client_id=check&last_seq=0&epoch={epoch}"
        async with connect(url, max_size=None) as ws:
            got = await recv_until(ws, lambda m: m.get("seq") == last, wait=timeout(20))
    finally:
        second.close()
        await second.wait_closed()
    assert result.reconnects == 1 and result.published == count and result.failed == 0
    published = [m["data"]["i"] for m in got if m.get("type") == "replay.test"]
    assert list(dict.fromkeys(published)) == list(range(count))  # all, in order
    twice = {i for i in set(published) if published.count(i) > 1}
    assert twice <= set(result.maybe_duplicated)  # exactly once where acknowledged
    assert len(published) == count + len(twice)
