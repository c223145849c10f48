"""Several servers on one shared log (a real ``redis-server``) give one stream.

Each test runs two nodes (``serve(bus=URL)`` on two free ports, each with its own bus and
connection manager) on the ``redis_server`` fixture, and talks to them with real
websockets clients; the fault tests kill and restart Redis with its append-only file.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect

from gathering_lab.backends.bus import LogBus
from gathering_lab.events import Event
from gathering_lab.kernel import Lab
from gathering_lab.testing import (
    RedisServer,
    capture_events,
    free_port,
    recv_json,
    recv_until,
    timeout,
    wait_for,
)
from gathering_lab.websocket import ConnectionManager, Server, serve


@contextlib.asynccontextmanager
async def node(url: str) -> AsyncIterator[Server]:
    """A server with its own manager and a bus on the log at ``url``; closed (bus too) after."""
    server = await serve(port=0, bus=url, manager=ConnectionManager())
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


async def greeted(url: str) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(url, max_size=None)
    hello = await recv_json(ws)
    assert hello["type"] == "connection.established"
    return ws, hello["data"]


async def publish(ws: ClientConnection, i: int, request_id: str | None = None) -> None:
    message = {"type": "publish", "data": {"type": "load.test", "data": {"i": i}}}
    if request_id is not None:
        message["id"] = request_id
    await ws.send(json.dumps(message))


async def events(ws: ClientConnection, count: int, wait: float = 10.0) -> list[dict[str, Any]]:
    """The next ``count`` events (acks and other replies skipped)."""
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    while len(got) < count:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"{len(got)} of {count} events within {wait}s: {got[-3:]}")
        message = json.loads(await asyncio.wait_for(ws.recv(), left))
        if "event_id" in message:
            got.append(message)
    return got


def http_get(server: Server, path: str) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(server.http_url + path, timeout=timeout(5)) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


async def health(server: Server) -> tuple[int, dict[str, Any]]:
    return await asyncio.to_thread(http_get, server, "/health")


def ids(messages: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(m["seq"], m["epoch"], m["event_id"]) for m in messages]


async def test_two_nodes_give_one_stream_in_one_order(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        assert a.bus is not b.bus and isinstance(a.bus, LogBus)
        assert a.bus.epoch == b.bus.epoch
        with capture_events(a.bus) as seen_a, capture_events(b.bus) as seen_b:
            ws_a, _ = await greeted(a.url)
            ws_b, _ = await greeted(b.url)
            async with ws_a, ws_b:
                # Both nodes publish at once: one total order, each publisher's kept.
                for i in range(20):
                    await publish(ws_a, i)
                    await publish(ws_b, 100 + i)
                got_a = await events(ws_a, 40)
                got_b = await events(ws_b, 40)
        assert ids(got_a) == ids(got_b)
        seqs = [m["seq"] for m in got_a]
        assert seqs == list(range(seqs[0], seqs[0] + 40))
        assert {m["epoch"] for m in got_a} == {a.bus.epoch}
        numbers = [m["data"]["i"] for m in got_a]
        assert [n for n in numbers if n < 100] == list(range(20))
        assert [n for n in numbers if n >= 100] == list(range(100, 120))
        # Bus-level handlers on every node see every event of the cluster, in that order.
        assert [(e.seq, e.epoch, e.id) for e in seen_a] == ids(got_a)
        assert [(e.seq, e.epoch, e.id) for e in seen_b] == ids(got_a)
        assert [e.seq for e in b.bus.since(0)][-40:] == seqs


async def test_a_publish_on_one_node_is_acked_with_the_seq_the_other_delivers(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        ws_a, _ = await greeted(a.url)
        ws_b, _ = await greeted(b.url)
        async with ws_a, ws_b:
            await publish(ws_a, 1, request_id="p1")
            got = await recv_until(ws_a, lambda m: m["type"] == "published")
            ack = got[-1]["data"]
            # As on the in-process bus: the publisher's own event comes before its ack.
            assert [m["type"] for m in got] == ["load.test", "published"]
            (event,) = await events(ws_b, 1)
            assert (event["seq"], event["event_id"]) == (ack["seq"], ack["event_id"])
            assert event["epoch"] == a.bus.epoch == b.bus.epoch
            assert event == got[0]


async def test_a_client_resumes_on_another_node_with_exactly_what_it_missed(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        ws, hello = await greeted(a.url)
        async with ws:
            for i in range(5):
                await a.bus.publish(Event(type="load.test", data={"i": i}))
            seen = await events(ws, 5)
        last_seq, epoch = seen[-1]["seq"], seen[-1]["epoch"]
        missed = [await a.bus.publish(Event(type="load.test", data={"i": i})) for i in range(7)]
        # a's publish returns once a delivered it; b's tail reads it in parallel. What b has
        # not delivered when the replay ends would come live after the ack (still exactly
        # once): wait for b so the replay holds all 7 (a lagging tail: the test after this).
        await wait_for(lambda: b.bus.last_seq >= missed[-1].seq)
        ws, _ = await greeted(f"{b.url}?client_id=mover&last_seq={last_seq}&epoch={epoch}")
        async with ws:
            got = await recv_until(ws, lambda m: m["type"] == "resumed")
            replayed, ack = got[:-1], got[-1]["data"]
            assert [(m["seq"], m["event_id"]) for m in replayed] == [(e.seq, e.id) for e in missed]
            assert ack["gap"] is False and ack["count"] == 7 and ack["epoch"] == epoch
            later = await a.bus.publish(Event(type="load.test", data={"i": 99}))
            (live,) = await events(ws, 1)
            assert live["seq"] == later.seq == last_seq + 8  # once, no gap, no repeat


async def test_a_node_whose_tail_lags_catches_up_before_it_replays(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        assert isinstance(b.bus, LogBus)
        start = b.bus.last_seq
        # Hold b's tail: the entries it reads wait here until released.
        held: list[Any] = []
        deliver = b.bus._deliver
        monkeypatch.setattr(b.bus, "_deliver", held.append)
        missed = [await a.bus.publish(Event(type="load.test", data={"i": i})) for i in range(3)]
        await wait_for(lambda: len(held) == 3)
        seen_on_a = missed[-1]
        assert b.bus.last_seq == start  # b is behind what the client saw on a
        ws = await connect(f"{b.url}?last_seq={seen_on_a.seq}&epoch={seen_on_a.epoch}")
        async with ws:
            await recv_json(ws)  # the greeting
            await wait_for(lambda: b.bus._waiters)  # the replay waits for b's tail
            monkeypatch.setattr(b.bus, "_deliver", deliver)
            for entry in held:
                deliver(entry)
            got = await recv_until(ws, lambda m: m["type"] == "resumed")
            assert got[-1]["data"]["count"] == 0 and got[-1]["data"]["gap"] is False
            later = await a.bus.publish(Event(type="load.test", data={"i": 9}))
            (live,) = await events(ws, 1)
            # Without the catch-up, b would have made the client live at its older seq
            # and sent the 3 events it already had again.
            assert live["seq"] == later.seq == seen_on_a.seq + 1


async def test_a_node_restarted_keeps_the_epoch_and_a_resuming_client_loses_nothing(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as b:
        async with node(redis_server.url) as a:
            ws, _ = await greeted(a.url)
            async with ws:
                await b.bus.publish(Event(type="load.test", data={"i": 0}))
                (seen,) = await events(ws, 1)
        missed = [await b.bus.publish(Event(type="load.test", data={"i": i})) for i in range(5)]
        async with node(redis_server.url) as again:
            assert again.bus.epoch == seen["epoch"]
            assert again.bus.last_seq >= seen["seq"] + 5  # preloaded from the log
            url = f"{again.url}?last_seq={seen['seq']}&epoch={seen['epoch']}"
            ws, _ = await greeted(url)
            async with ws:
                got = await recv_until(ws, lambda m: m["type"] == "resumed")
                assert [m["event_id"] for m in got[:-1]] == [e.id for e in missed]
                assert got[-1]["data"]["gap"] is False


async def test_redis_down_publish_unavailable_health_503_then_recovers(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        ws_a, _ = await greeted(a.url)
        ws_b, _ = await greeted(b.url)
        async with ws_a, ws_b:
            await publish(ws_a, 0)
            await recv_until(ws_a, lambda m: m["type"] == "published")
            (before,) = await events(ws_b, 1)
            assert (await health(a))[0] == 200

            redis_server.kill()
            await publish(ws_a, 1, request_id="lost")
            got = await recv_until(ws_a, lambda m: m["type"] in ("error", "published"))
            error = got[-1]
            assert error["type"] == "error" and error["data"]["code"] == "unavailable"
            assert error["id"] == "lost" and "not published" in error["data"]["message"]
            for server in (a, b):  # b learns it through its tail
                await wait_for(lambda s=server: _status_is(s, 503), wait=10)
                status, body = await health(server)
                assert status == 503 and body["status"] == "degraded"
            # The WebSocket connections stay open and answer.
            await ws_a.send(json.dumps({"type": "ping", "id": "still-there"}))
            pong = await recv_until(ws_a, lambda m: m["type"] == "pong")
            assert pong[-1]["type"] == "pong"
            assert a.get_stats()["publishes_unavailable"] == 1
            assert a.bus.get_stats()["health"] == "degraded"

            redis_server.start()  # same port, same append-only file
            for server in (a, b):
                await wait_for(lambda s=server: _status_is(s, 200), wait=15)
            await publish(ws_a, 2)
            (after,) = await events(ws_b, 1, wait=15)
            assert after["epoch"] == before["epoch"]
            assert after["seq"] == before["seq"] + 1  # the refused publish is not in the log
            assert after["data"] == {"i": 2}


async def _status_is(server: Server, status: int) -> bool:
    return (await health(server))[0] == status


async def test_a_lab_joined_to_the_log_shares_the_stream(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a:
        lab = Lab(port=0, bus=redis_server.url)
        lab.start()
        try:
            await lab.wait_started(timeout(10))
            assert lab.bus is not a.bus and lab.bus.epoch == a.bus.epoch
            ws, _ = await greeted(a.url)
            async with ws:
                lab.publish("agent.started", {"agent_id": 7})
                (event,) = await events(ws, 1)
            assert event["type"] == "agent.started" and event["data"] == {"agent_id": 7}
            await wait_for(lambda: len(lab.frame) >= 1)
        finally:
            lab.stop()
        await wait_for(lambda: lab.bus.health == "closed")


def test_an_unknown_bus_scheme_is_refused_before_serving() -> None:
    with pytest.raises(ValueError, match="bogus://x"):
        serve(port=0, bus="bogus://x")


async def _run_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str], float]:
    loop = asyncio.get_running_loop()
    started = loop.time()
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        "0",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        _, stderr = await asyncio.wait_for(process.communicate(), timeout(30))
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    lines = [line for line in stderr.decode().splitlines() if line.strip()]
    assert process.returncode is not None
    return process.returncode, lines, loop.time() - started


async def test_cli_with_an_unreachable_redis_exits_with_one_line() -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    code, lines, took = await _run_cli("--bus", url)
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0].startswith("gathering-lab serve: error: --bus ") and "redis" in lines[0]
    assert took < timeout(30)


@pytest.mark.parametrize("how", ["flag", "env"])
async def test_cli_with_an_unknown_bus_scheme_exits_with_one_line(how: str) -> None:
    if how == "flag":
        code, lines, _ = await _run_cli("--bus", "bogus://x")
    else:
        code, lines, _ = await _run_cli(env={"GATHERING_LAB_BUS": "bogus://x"})
    assert code != 0
    assert len(lines) == 1, lines
    assert "unknown bus url 'bogus://x'" in lines[0]


async def test_a_flushed_log_changes_the_epoch_everywhere_and_resumes_report_a_gap(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        for i in range(3):
            await a.bus.publish(Event(type="load.test", data={"i": i}))
        assert isinstance(b.bus, LogBus) and await b.bus.catch_up(3)
        old_epoch = b.bus.epoch
        assert redis_server.command("FLUSHALL") == b"+OK"
        fresh = await a.bus.publish(Event(type="load.test", data={"i": 99}))
        assert fresh.epoch != old_epoch and fresh.seq == 1
        await wait_for(lambda: b.bus.epoch == fresh.epoch, wait=10)  # b's tail noticed
        assert [e.id for e in b.bus.since(0)] == [fresh.id]
        assert b.bus.get_stats()["epoch_changes"] == 1
        ws, _ = await greeted(f"{b.url}?last_seq=3&epoch={old_epoch}")
        async with ws:
            got = await recv_until(ws, lambda m: m["type"] == "resumed")
            assert [m["event_id"] for m in got[:-1]] == [fresh.id]
            assert got[-1]["data"]["gap"] is True and got[-1]["data"]["epoch"] == fresh.epoch


# The bus alone, on a named memory log (two nodes in one process, no Redis).


@pytest.fixture
async def memory_nodes() -> AsyncIterator[tuple[LogBus, LogBus]]:
    name = f"memory://cluster-{os.getpid()}-{id(object())}"
    first, second = LogBus(name), LogBus(name)
    await first.start()
    await second.start()
    try:
        yield first, second
    finally:
        await first.close()
        await second.close()


async def test_the_bus_refuses_what_it_cannot_send_and_counts_it(
    memory_nodes: tuple[LogBus, LogBus],
) -> None:
    bus, other = memory_nodes
    with pytest.raises(ValueError, match="cannot be sent"):
        await bus.publish(Event(type="load.test", data={"x": float("nan")}))
    event = await bus.publish(Event(type="load.test"))
    with pytest.raises(ValueError, match="already published"):
        await bus.publish(event)
    stats = bus.get_stats()
    assert stats["events_rejected"] == 1 and stats["events_published"] == 1
    assert stats["last_seq"] == 1
    assert await other.catch_up(1) and other.get_stats()["events_received"] == 1
    with pytest.raises(RuntimeError, match="not started"):
        await LogBus("memory://").publish(Event(type="load.test"))


async def test_publish_nowait_from_another_thread_reaches_every_node(
    memory_nodes: tuple[LogBus, LogBus],
) -> None:
    bus, other = memory_nodes
    with capture_events(other) as seen:
        await asyncio.to_thread(bus.publish_nowait, Event(type="load.test", data={"i": 1}))
        await wait_for(lambda: len(seen) == 1)
    assert seen[0].seq == 1 and seen[0].epoch == bus.epoch == other.epoch
    assert bus.get_history()[0].id == seen[0].id


async def test_a_node_started_late_preloads_the_history_in_order() -> None:
    name = f"memory://preload-{id(object())}"
    first = await LogBus(name).start()
    try:
        for i in range(1200):  # more than two preload chunks
            await first.publish(Event(type="load.test", data={"i": i}))
        late = await LogBus(name, history_size=1000).start()
        try:
            assert late.last_seq == 1200 and late.oldest_seq == 201
            assert [e.seq for e in late.since(1100)] == list(range(1101, 1201))
            assert late.since(0)[0].encoded() == first.since(200)[0].encoded()
        finally:
            await late.close()
    finally:
        await first.close()


async def test_a_lab_client_given_both_nodes_fails_over_and_resumes_without_loss(
    redis_server: RedisServer,
) -> None:
    from gathering_lab.client import LabClient

    async with node(redis_server.url) as b:
        stack = contextlib.AsyncExitStack()
        a = await stack.enter_async_context(node(redis_server.url))
        client = LabClient([a.url, b.url], "failover", base_delay=0.05)
        try:
            await client.connect()
            assert client.url == a.url
            for i in range(5):
                await b.bus.publish(Event(type="load.test", data={"i": i}))
            await wait_for(lambda: client.events_received == 5)
            await stack.aclose()  # node a stops: its clients are cut off
            for i in range(5, 10):  # published while the client moves to b
                await b.bus.publish(Event(type="load.test", data={"i": i}))
            await wait_for(lambda: client.events_received == 10, timeout(10))
            assert client.url == b.url and client.failovers >= 1
            assert client.connected and client.reconnects >= 1
            rows = client.frame.df
            assert list(rows["data"].map(lambda d: d["i"])) == list(range(10)), "once, in order"
            seqs = list(rows["seq"])
            assert seqs == list(range(seqs[0], seqs[0] + 10)), "one log: contiguous seqs"
            assert (client.gaps, client.restarts, client.duplicates) == (0, 0, 0)
        finally:
            await client.close()
            await stack.aclose()
