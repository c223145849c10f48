"""Cluster-wide stats (``/admin/websocket/stats`` summed over the live nodes) and ``/metrics``.

Nodes are real servers (``serve(bus=URL)`` on free ports, and one ``gathering-lab serve``
process for the killed node) on the ``redis_server`` fixture, with real websockets clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_limits import serve_process  # tests/ is on sys.path
from websockets.asyncio.client import ClientConnection, connect

from gathering_lab.auth import JWTAuth, mint_token
from gathering_lab.backends.nodes import REPORT_INTERVAL, TTL_INTERVALS
from gathering_lab.events import Event
from gathering_lab.testing import (
    RedisServer,
    recv_json,
    recv_until,
    running_server,
    timeout,
    wait_for,
)
from gathering_lab.websocket import ConnectionManager, Server, serve

SECRET = "metrics-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
TTL = REPORT_INTERVAL * TTL_INTERVALS


@contextlib.asynccontextmanager
async def node(url: str, **options: Any) -> AsyncIterator[Server]:
    """A server with its own manager and a bus on the log at ``url``; closed (bus too) after."""
    server = await serve(port=0, bus=url, manager=ConnectionManager(), **options)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()


async def greeted(url: str) -> ClientConnection:
    ws = await connect(url, max_size=None)
    assert (await recv_json(ws))["type"] == "connection.established"
    return ws


def _get(url: str, token: str | None = None, method: str = "GET") -> tuple[int, str, bytes]:
    request = urllib.request.Request(url, method=method)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout(5)) as response:
            return response.status, response.headers["Content-Type"], response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers["Content-Type"], exc.read()


async def get(
    server: Server | str, path: str, token: str | None = None, method: str = "GET"
) -> tuple[int, str, bytes]:
    base = server if isinstance(server, str) else server.http_url
    return await asyncio.to_thread(_get, base + path, token, method)


async def stats(server: Server | str) -> dict[str, Any]:
    status, _, body = await get(server, "/admin/websocket/stats")
    assert status == 200, body
    result: dict[str, Any] = json.loads(body)
    return result


Samples = dict[str, dict[tuple[Any, ...], float]]


async def metrics(server: Server, token: str | None = None) -> Samples:
    """``/metrics`` parsed by prometheus_client: {sample name: {labels: value}}."""
    status, content_type, body = await get(server, "/metrics", token)
    assert status == 200, body
    assert content_type.startswith("text/plain")
    samples: Samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            labels = tuple(sorted(sample.labels.items()))
            samples.setdefault(sample.name, {})[labels] = sample.value
    return samples


def node_ids(result: dict[str, Any]) -> set[str]:
    return {entry["id"] for entry in result["nodes"]}


async def test_stats_on_either_node_sum_both_and_list_both(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        clients = [await greeted(a.url)] + [await greeted(b.url) for _ in range(2)]
        try:
            await a.bus.publish(Event(type="load.test", data={"i": 1}))
            for ws in clients:
                await recv_until(ws, lambda m: m.get("type") == "load.test")
            ids = {a.get_stats()["node"]["id"], b.get_stats()["node"]["id"]}
            assert len(ids) == 2

            async def summed(server: Server) -> bool:
                result = await stats(server)
                return result["active_connections"] == 3 and result["total_messages_sent"] >= 6

            for server in (a, b):
                # b reports its new clients within one interval
                await wait_for(lambda s=server: summed(s), wait=4 * REPORT_INTERVAL)
                result = await stats(server)
                assert node_ids(result) == ids
                own = result["node"]
                assert own["id"] == server.get_stats()["node"]["id"]
                by_id = {entry["id"]: entry for entry in result["nodes"]}
                assert by_id[a.get_stats()["node"]["id"]]["connections"] == 1
                assert by_id[b.get_stats()["node"]["id"]]["connections"] == 2
                assert by_id[own["id"]]["address"].endswith(f":{server.port}")
                assert result["total_connections"] == 3
                local = server.manager.get_stats()
                # every key is summed: this node's figures plus the other's report
                other = next(e for e in result["nodes"] if e["id"] != own["id"])
                assert result["total_messages_sent"] == (
                    local["total_messages_sent"] + other["messages_sent"]
                )
                assert result["total_broadcasts"] == local["total_broadcasts"] + other["broadcasts"]
                assert len(result["clients"]) == 3
                assert sorted(c["node"] for c in result["clients"]) == sorted(
                    [by_id[e]["id"] for e in by_id for _ in range(by_id[e]["connections"])]
                )
                assert result["cluster"]["shared"] is True
                assert result["cluster"]["nodes_live"] == 2
        finally:
            for ws in clients:
                await ws.close()


async def test_a_killed_node_drops_out_after_the_ttl_a_closed_one_at_once(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    log = tmp_path / "serve.log"
    async with serve_process(log, None, "--bus", redis_server.url) as (process, port):
        async with node(redis_server.url) as a:

            async def listed() -> set[int]:
                return {int(e["address"].rsplit(":", 1)[1]) for e in (await stats(a))["nodes"]}

            await wait_for(lambda: _contains(listed(), port), wait=30)
            killed_at = asyncio.get_running_loop().time()
            process.send_signal(signal.SIGKILL)
            await process.wait()
            assert port in await listed()  # its report lives on until it expires
            await wait_for(lambda: _lacks(listed(), port), wait=TTL + 2 * REPORT_INTERVAL)
            # it dropped out because its report expired, not earlier
            assert asyncio.get_running_loop().time() - killed_at >= TTL / 2

            async with node(redis_server.url) as b:
                b_id = b.get_stats()["node"]["id"]
                await wait_for(lambda: _contains(listed(), b.port), wait=10)
                key = b._handler.nodes.prefix + b_id  # type: ignore[attr-defined]
                assert redis_server.command("EXISTS", key) == b":1"
            # closed cleanly: its report is removed at once
            assert redis_server.command("EXISTS", key) == b":0"
            assert b.port not in await listed()
            assert [e["id"] for e in (await stats(a))["nodes"]] == [a.get_stats()["node"]["id"]]


async def _contains(values: Any, item: int) -> bool:
    return item in await values


async def _lacks(values: Any, item: int) -> bool:
    return item not in await values


async def test_metrics_parse_and_carry_the_node_figures(redis_server: RedisServer) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        ws = await greeted(a.url)
        gone = await greeted(a.url)
        await gone.close(1000)
        await greeted(b.url)  # left open: closed with b
        await a.bus.publish(Event(type="load.test", data={"i": 1}))
        await recv_until(ws, lambda m: m.get("type") == "load.test")
        await wait_for(lambda: a.get_stats()["close_codes"].get("1000") == 1)
        await wait_for(lambda: _cluster_nodes(a, 2), wait=4 * REPORT_INTERVAL)
        samples = await metrics(a)
        assert samples["gathering_lab_active_connections"][()] == 1
        assert samples["gathering_lab_connections_total"][()] == 2
        assert samples["gathering_lab_messages_sent_total"][()] == a.manager.total_messages_sent
        assert samples["gathering_lab_broadcasts_total"][()] >= 1
        assert samples["gathering_lab_close_codes_total"][(("code", "1000"),)] == 1
        assert samples["gathering_lab_cluster_nodes"][()] == 2
        assert samples["gathering_lab_bus_up"][()] == 1
        assert samples["gathering_lab_bus_lag"][()] == 0
        assert samples["gathering_lab_bus_last_seq"][()] == a.bus.last_seq
        for name in (
            "gathering_lab_messages_dropped_total",
            "gathering_lab_slow_consumers_closed_total",
            "gathering_lab_rejected_connections_total",
            "gathering_lab_publishes_rate_limited_total",
            "gathering_lab_publishes_unavailable_total",
            "gathering_lab_log_reconnects_total",
            "gathering_lab_log_tail_reconnects_total",
            "gathering_lab_bus_publishes_unavailable_total",
        ):
            assert samples[name][()] == 0, name
        status, _, body = await get(a, "/metrics", method="POST")
        assert status == 405 and b"only GET" in body
        await ws.close()


async def _cluster_nodes(server: Server, count: int) -> bool:
    return (await stats(server))["cluster"]["nodes_live"] == count


async def test_memory_bus_stats_are_this_nodes_with_one_node() -> None:
    async with running_server() as server:
        ws = await greeted(server.url)
        result = await stats(server)
        assert result["active_connections"] == 1 and result["total_connections"] == 1
        assert [e["id"] for e in result["nodes"]] == [result["node"]["id"]]
        assert result["node"]["connections"] == 1
        assert result["cluster"]["shared"] is False
        assert "node" not in result["clients"][0]  # the guide's client entries, unchanged
        samples = await metrics(server)
        assert samples["gathering_lab_active_connections"][()] == 1
        assert samples["gathering_lab_cluster_nodes"][()] == 1
        assert samples["gathering_lab_bus_lag"][()] == 0
        await ws.close()


@pytest.mark.parametrize("path", ["/metrics", "/admin/websocket/stats"])
async def test_auth_on_metrics_and_stats_need_the_admin_role(path: str) -> None:
    async with running_server(auth=JWTAuth(SECRET)) as server:
        status, _, body = await get(server, path)
        assert status == 401 and b"unauthorized" in body
        status, _, _ = await get(server, path, token="not-a-token")
        assert status == 401
        viewer = mint_token(SECRET, "viewer", ("subscribe",))
        status, _, body = await get(server, path, token=viewer)
        assert status == 403 and b"admin" in body
        admin = mint_token(SECRET, "ops", ("admin",))
        status, _, body = await get(server, path, token=admin)
        assert status == 200
        if path == "/metrics":
            assert b"gathering_lab_active_connections" in body


async def test_redis_down_stats_answer_with_this_node_and_count_failures(
    redis_server: RedisServer,
) -> None:
    async with node(redis_server.url) as a, node(redis_server.url) as b:
        await wait_for(lambda: _cluster_nodes(a, 2), wait=4 * REPORT_INTERVAL)
        del b
        redis_server.kill()
        started = asyncio.get_running_loop().time()
        result = await stats(a)
        # bounded: the other nodes' reports are given up on within read_timeout
        assert asyncio.get_running_loop().time() - started < timeout(5)
        assert [e["id"] for e in result["nodes"]] == [result["node"]["id"]]
        assert "read_error" in result["cluster"]
        assert result["cluster"]["read_failures"] >= 1
        await wait_for(
            lambda: a.get_stats()["cluster"]["report_failures"] >= 1, wait=4 * REPORT_INTERVAL
        )
        assert "ConnectionError" in a.get_stats()["cluster"]["report_error"]
        reports = a.get_stats()["cluster"]["reports"]
        redis_server.start()
        # reporting (retried every interval) resumes, and both nodes are listed again
        await wait_for(
            lambda: a.get_stats()["cluster"]["reports"] > reports, wait=2 * REPORT_INTERVAL + 15
        )
        assert a.get_stats()["cluster"]["report_error"] is None
        await wait_for(lambda: _cluster_nodes(a, 2), wait=4 * REPORT_INTERVAL)
