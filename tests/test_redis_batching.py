"""Publishes in flight and batched appends and deliveries on the Redis bus (issue 9).

Real parts: two server nodes (each its own connection manager and ``LogBus``) on the
``redis_server`` fixture, real websockets clients. A connection may have several publishes
in flight: they go to the log together, in order, and each answer follows its own event.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_cluster_stats import greeted, node  # tests/ is on sys.path
from test_limits import serve_process
from websockets.asyncio.client import ClientConnection

from gathering_lab import protocol
from gathering_lab.backends import open_log
from gathering_lab.events import Event
from gathering_lab.testing import RedisServer, recv_json, recv_until, timeout, wait_for


def publish_frame(i: int) -> str:
    return json.dumps(
        {"type": "publish", "id": f"p{i}", "data": {"type": "load.test", "data": {"i": i}}}
    )


async def collect(ws: ClientConnection, answers: int, wait: float = 10.0) -> list[dict[str, Any]]:
    """Messages until ``answers`` answers to publishes (``published`` or ``error``) came."""
    got: list[dict[str, Any]] = []
    deadline = asyncio.get_running_loop().time() + timeout(wait)
    while sum(m["type"] in ("published", "error") for m in got) < answers:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError(f"{answers} answers not all within {wait}s: {got[-3:]}")
        got.append(json.loads(await asyncio.wait_for(ws.recv(), left)))
    return got


async def nothing_more(ws: ClientConnection) -> list[dict[str, Any]]:
    """What arrives before the answer to a ping sent now (events sent twice would show)."""
    await ws.send(json.dumps({"type": "ping", "id": "last"}))
    return (await recv_until(ws, lambda m: m["type"] == "pong"))[:-1]


def ids(messages: list[dict[str, Any]]) -> list[tuple[int, str, str]]:
    return [(m["seq"], m["epoch"], m["event_id"]) for m in messages]


async def test_publishes_in_flight_from_one_connection_keep_order_acks_and_exactly_once(
    redis_server: RedisServer,
) -> None:
    count = 200
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        pub, sub_a, sub_b = await greeted(a.url), await greeted(a.url), await greeted(b.url)
        async with pub, sub_a, sub_b:
            before = a.bus.get_stats()
            calls_before = before["append_calls"]
            for i in range(count):  # no wait for answers: they are in flight together
                await pub.send(publish_frame(i))
            got = await collect(pub, count)
            # One answer per publish, all acks, in the order sent, each after its own event.
            answers = [m for m in got if m["type"] in ("published", "error")]
            assert [m["type"] for m in answers] == ["published"] * count
            assert [m["id"] for m in answers] == [f"p{i}" for i in range(count)]
            position = {m["data"]["i"]: n for n, m in enumerate(got) if "event_id" in m}
            for n, m in enumerate(got):
                if m["type"] == "published":
                    i = int(m["id"][1:])
                    assert position[i] < n, f"the ack of p{i} came before its event"
                    assert got[position[i]]["seq"] == m["data"]["seq"]
            mine = [m for m in got if "event_id" in m]
            assert [m["data"]["i"] for m in mine] == list(range(count)), "the publisher's order"
            seqs = [m["seq"] for m in mine]
            assert seqs == list(range(seqs[0], seqs[0] + count))
            # Both nodes' subscribers: every event once, in that order, same seq/epoch/id.
            for ws in (sub_a, sub_b):
                seen = await collect_events(ws, count)
                assert ids(seen) == ids(mine)
                assert await nothing_more(ws) == []
            assert await nothing_more(pub) == []
            stats = a.bus.get_stats()
            # They went to Redis together: fewer script calls than events.
            assert stats["append_batch_max"] >= 2
            assert stats["append_calls"] - calls_before < count
            assert stats["log"]["append_calls"] == stats["append_calls"]
            # a delivered its own events without decoding them (from the append's reply or
            # through its tail, by token); b decoded every one.
            assert stats["own_events_delivered"] - before["own_events_delivered"] == count
            assert b.bus.get_stats()["own_events_delivered"] == 0
            assert a.get_stats()["publishes_held"] == 0  # 200 < the window of 256


async def collect_events(ws: ClientConnection, count: int) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = []
    while len(got) < count:
        message = await recv_json(ws, wait=10)
        if "event_id" in message:
            got.append(message)
    return got


async def test_a_full_window_holds_the_next_message_and_keeps_the_order(
    redis_server: RedisServer,
) -> None:
    count = 60
    async with node(redis_server.url, max_publishes_in_flight=4) as a:
        pub = await greeted(a.url)
        async with pub:
            for i in range(count):
                await pub.send(publish_frame(i))
            await pub.send(json.dumps({"type": "ping", "id": "after"}))
            got = await recv_until(pub, lambda m: m["type"] == "pong")
            answers = [m["id"] for m in got if m["type"] in ("published", "error", "pong")]
            assert answers == [f"p{i}" for i in range(count)] + ["after"]
            assert all(m["type"] != "error" for m in got)
            stats = a.get_stats()
            assert stats["publishes_held"] >= 1 and stats["max_publishes_in_flight"] == 4


async def test_redis_lost_with_publishes_in_flight_answers_each_in_order(
    redis_server: RedisServer,
) -> None:
    landed, stuck, later = 20, 30, 5
    async with node(redis_server.url) as a:
        pub = await greeted(a.url)
        async with pub:
            for i in range(landed):
                await pub.send(publish_frame(i))
            await collect(pub, landed)
            redis_server.pause()  # hung: what is sent now stays in flight
            for i in range(landed, landed + stuck):
                await pub.send(publish_frame(i))

            def in_flight() -> int:
                stats = a.bus.get_stats()
                return int(stats["appends_in_flight"] + stats["appends_queued"])

            await wait_for(lambda: in_flight() == stuck)
            redis_server.kill()  # with those never processed
            for i in range(landed + stuck, landed + stuck + later):
                await pub.send(publish_frame(i))
            got = await collect(pub, stuck + later, wait=20)
            answers = [m for m in got if m["type"] in ("published", "error")]
            # Nothing silent: one answer each, in the order sent, all "unavailable".
            assert [m["id"] for m in answers] == [
                f"p{i}" for i in range(landed, landed + stuck + later)
            ]
            assert {(m["type"], m["data"]["code"]) for m in answers} == {("error", "unavailable")}
            assert a.get_stats()["publishes_unavailable"] == stuck + later
            assert in_flight() == 0

    redis_server.start()  # same port, same append-only file (fsync always)
    log = open_log(redis_server.url)
    await log.connect()
    try:
        entries = (await log.read(0, 1000)).entries
    finally:
        await log.close()
    # The acknowledged ones are in the log, the refused ones are not.
    assert [json.loads(e.payload)["data"]["i"] for e in entries] == list(range(landed))


async def test_events_appended_together_reach_a_client_of_another_node_in_one_write(
    redis_server: RedisServer,
) -> None:
    count = 50
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        sub = await greeted(b.url)
        async with sub:
            await a.bus.publish(Event(type="load.test", data={"i": -1}))
            await collect_events(sub, 1)  # live, and b's tail is waiting in XREAD
            (session,) = b.manager.sessions
            transport = session.transport
            write = transport.write
            writes: list[int] = []

            def counting_write(data: Any) -> None:  # a spy: the real write still happens
                writes.append(len(data))
                write(data)

            transport.write = counting_write  # type: ignore[method-assign]
            answered: list[BaseException | None] = []
            calls_before = a.bus.get_stats()["append_calls"]
            for i in range(count):  # in one loop turn: one append call, atomically
                a.bus.submit(
                    Event(type="load.test", data={"i": i}), lambda e, x: answered.append(x)
                )
            seen = await collect_events(sub, count)
            assert [m["data"]["i"] for m in seen] == list(range(count))
            assert len(writes) == 1, f"{count} events took {len(writes)} writes to one client"
            assert a.bus.get_stats()["append_calls"] == calls_before + 1
            assert b.bus.get_stats()["log"]["tail_batch_max"] >= count
            await wait_for(lambda: len(answered) == count)
            assert answered == [None] * count
            assert b.bus.get_stats()["own_events_delivered"] == 0  # b decoded them: not its own
            assert a.bus.get_stats()["own_events_delivered"] >= count


async def http_get(port: int, path: str) -> bytes:
    """The body of a bounded GET to the server on ``port`` (urllib, in a thread)."""

    def get() -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout(10)) as r:
            body: bytes = r.read()
            return body

    return await asyncio.to_thread(get)


async def test_serve_flag_bounds_publishes_in_flight_and_reports_it(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    count = 60
    flags = ("--bus", redis_server.url, "--max-publishes-in-flight", "3")
    async with serve_process(tmp_path / "serve.log", None, *flags) as (_, port):
        pub = await greeted(f"ws://127.0.0.1:{port}/ws/dashboard")
        async with pub:
            for i in range(count):  # no wait for answers: at most 3 of them in flight
                await pub.send(publish_frame(i))
            await pub.send(json.dumps({"type": "ping", "id": "after"}))
            got = await recv_until(pub, lambda m: m["type"] == "pong", wait=20)
            answers = [m for m in got if m["type"] in ("published", "error", "pong")]
            assert [m["id"] for m in answers] == [f"p{i}" for i in range(count)] + ["after"]
            assert [m["type"] for m in answers[:-1]] == ["published"] * count
        stats = json.loads(await http_get(port, "/admin/websocket/stats"))
        assert stats["max_publishes_in_flight"] == 3
        assert stats["publishes_held"] >= 1  # the 4th publish already waited
        text = (await http_get(port, "/metrics")).decode()
        samples = {
            sample.name: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }
        assert samples["gathering_lab_max_publishes_in_flight"] == 3
        assert samples["gathering_lab_publishes_held_total"] == stats["publishes_held"]


async def test_serve_flag_default_is_in_the_stats(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    async with serve_process(tmp_path / "serve.log", None, "--bus", redis_server.url) as (_, port):
        stats = json.loads(await http_get(port, "/admin/websocket/stats"))
    assert stats["max_publishes_in_flight"] == 256 and stats["publishes_held"] == 0


@pytest.mark.parametrize("value", ["0", "-4", "many"])
async def test_serve_refuses_a_bad_max_publishes_in_flight(value: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gathering_lab", "serve", "--port", "0",
        "--max-publishes-in-flight", value,
        stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), timeout(20))
    assert process.returncode == 2 and out == b""
    last = err.decode().strip().splitlines()[-1]
    assert "--max-publishes-in-flight" in last and "Traceback" not in err.decode()
    assert repr(value) in last or f" {value}:" in last


def client_list(port: int) -> str:
    """Redis's CLIENT LIST (a bulk reply), over a plain socket."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout(5)) as sock:
        sock.sendall(b"CLIENT LIST\r\n")
        reply = b""
        while b"\r\n" not in reply:
            reply += sock.recv(65536)
        head, _, body = reply.partition(b"\r\n")
        size = int(head[1:])
        while len(body) < size:
            chunk = sock.recv(65536)
            assert chunk, "redis closed the connection"
            body += chunk
        return body[:size].decode()


async def test_a_tail_asks_for_the_next_entries_before_delivering_a_batch(
    redis_server: RedisServer,
) -> None:
    # The events come from a bare log (no tail of its own), so b's is the only tail.
    log = open_log(redis_server.url)
    await log.connect()

    async def append(i: int) -> None:
        envelope = Event(type="load.test", data={"i": i}).to_dict()
        del envelope["seq"], envelope["epoch"]
        await log.append(protocol.encode(envelope))

    def tail_blocked() -> bool:
        """Whether a tail connection is blocked in XREAD now (CLIENT LIST, flag b)."""
        for line in client_list(redis_server.port).splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            if fields.get("name", "").startswith("gathering-lab-tail"):
                return fields.get("cmd") == "xread" and "b" in fields.get("flags", "")
        return False

    blocked_while_delivering: list[bool] = []

    def handler(event: Event) -> None:
        # Runs inside b's delivery of the batch, holding b's loop: only a request sent
        # before the batch was delivered can be blocked in Redis meanwhile.
        deadline = time.monotonic() + timeout(2)
        while not tail_blocked() and time.monotonic() < deadline:
            time.sleep(0.005)
        blocked_while_delivering.append(tail_blocked())

    try:
        async with node(redis_server.url) as b:
            await append(0)
            await wait_for(lambda: b.bus.last_seq >= 1)
            b.bus.subscribe("load.*", handler)
            for i in range(1, 4):
                await append(i)
                await wait_for(lambda i=i: len(blocked_while_delivering) == i)
            assert blocked_while_delivering == [True, True, True]
    finally:
        await log.close()
