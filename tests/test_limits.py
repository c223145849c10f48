"""Admission control and rate limits: the bookkeeping alone, then against real servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import resource
import socket
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import websockets
from websockets.exceptions import InvalidStatus

from gathering_lab.events import EventBus
from gathering_lab.testing import recv_json, running_server, timeout, wait_for
from gathering_lab.websocket import Server
from gathering_lab.websocket.limits import (
    Admission,
    ClientLimits,
    LogThrottle,
    TokenBucket,
    TrustedProxies,
    default_max_connections,
    socket_headroom,
)

HOST = "127.0.0.1"

# --------------------------------------------------------------------------------------------
# The bookkeeping, without sockets


def test_admission_caps_websockets_in_all_and_per_address() -> None:
    admission = Admission(3, 2, headroom=4)
    for key, ip in [("a", "10.0.0.1"), ("b", "10.0.0.1"), ("c", "10.0.0.1"), ("d", "10.0.0.2")]:
        assert admission.opened(key, ip) == (True, [])
    assert admission.admit("a") is None and admission.admit("b") is None
    assert admission.admit("c") == "max_connections_per_ip"
    assert admission.admit("d") is None
    admission.opened("e", "10.0.0.3")
    assert admission.admit("e") == "max_connections"
    assert admission.rejected == {
        "max_connections": 1,
        "max_connections_per_ip": 1,
        "max_sockets": 0,
    }
    admission.closed("a")
    admission.closed("a")  # idempotent
    assert admission.admit("c") is None  # a's place, on its address
    assert (admission.websockets, admission.websockets_from("10.0.0.1")) == (3, 2)
    for key in "bcde":
        admission.closed(key)
    assert (admission.sockets, admission.websockets, admission.handshakes) == (0, 0, 0)
    assert admission.to_dict()["addresses"] == 0  # the per-IP table does not grow for ever


def test_admission_makes_room_by_dropping_the_oldest_silent_handshake() -> None:
    admission = Admission(2, None, headroom=1)  # 3 sockets
    for key in "abc":
        admission.opened(key, "10.0.0.1")
    admission.requested("a")  # a sent its request: not a slowloris
    assert admission.opened("d", "10.0.0.9") == (True, ["b"])
    assert admission.opened("e", "10.0.0.9") == (True, ["c"])
    assert admission.handshakes_evicted == 2
    assert admission.sockets == 3
    admission.closed("b")  # the evicted socket's close arrives later: nothing to undo
    assert admission.sockets == 3
    for key in "de":
        admission.requested(key)
    # Every socket has sent its request: the newcomer is the one refused.
    assert admission.opened("f", "10.0.0.9") == (False, [])
    assert admission.rejected["max_sockets"] == 1
    assert admission.admit("f") == "max_sockets"


def test_admission_per_address_socket_cap_evicts_that_address_only() -> None:
    admission = Admission(100, 2, headroom=1)  # 3 sockets per address
    admission.opened("other", "10.0.0.2")
    for key in ("a1", "a2", "a3"):
        admission.opened(key, "10.0.0.1")
    assert admission.opened("a4", "10.0.0.1") == (True, ["a1"])
    assert admission.sockets_from("10.0.0.1") == 3 and admission.sockets_from("10.0.0.2") == 1


def test_default_max_connections_leaves_room_for_headroom_and_reserve() -> None:
    n = default_max_connections(1024, 20)
    assert n + socket_headroom(n) <= 1024 - 20 - 32 < n + 1 + socket_headroom(n + 1)
    assert 900 <= n < 1000
    assert default_max_connections(40, 30) == 1  # never zero


def test_token_bucket_take_and_reserve() -> None:
    bucket = TokenBucket(10, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True
    assert bucket.take(100.0) and bucket.tokens == 2  # refills up to the burst only
    pacer = TokenBucket(10, 2, now=0.0)
    assert [pacer.reserve(0.0) for _ in range(4)] == pytest.approx([0, 0, 0.1, 0.2])
    with pytest.raises(ValueError, match="rate"):
        TokenBucket(0, 1, 0.0)


def test_log_throttle_reports_once_per_interval_with_the_count_held_back() -> None:
    throttle = LogThrottle(10)
    reports = [throttle.ready(t) for t in (0, 1, 2, 9.9, 10, 11, 25)]
    assert reports == [0, None, None, None, 3, None, 1]


def test_client_limits_count_refusals_and_delays() -> None:
    limits = ClientLimits(TokenBucket(1, 1, 0.0), TokenBucket(1, 1, 0.0), 10)
    assert [limits.allow_publish(0.0) for _ in range(3)] == [True, False, False]
    assert limits.publishes_rate_limited == 2
    assert limits.message_delay(0.0) == 0 and limits.message_delay(0.0) == 1.0
    assert limits.messages_throttled == 1
    assert ClientLimits(None, None, 10).allow_publish(0.0)


# --------------------------------------------------------------------------------------------
# Against a real server


async def http_get(port: int, path: str, wait: float = 5) -> tuple[int, dict[str, str], bytes]:
    """A bounded HTTP/1.1 GET; returns status, headers (lowercase names) and body."""

    async def get() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection(HOST, port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\n\r\n".encode())
            raw = await reader.read(-1)
        finally:
            writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = dict(line.lower().split(": ", 1) for line in lines[1:])
        return int(lines[0].split()[1]), headers, body

    return await asyncio.wait_for(get(), timeout(wait))


async def refused(url: str, **options: Any) -> InvalidStatus:
    with pytest.raises(InvalidStatus) as caught:
        async with websockets.connect(url, open_timeout=timeout(5), **options):
            pass
    return caught.value


async def test_past_max_connections_the_upgrade_gets_503_and_health_still_answers() -> None:
    async with running_server(max_connections=3) as server:
        clients = [await websockets.connect(f"{server.url}?client_id=c{i}") for i in range(3)]
        for ws in clients:
            await recv_json(ws)  # connection.established
        error = await refused(server.url)
        response = error.response
        assert response.status_code == 503
        assert response.headers["Retry-After"] == "5"
        assert response.body is not None and response.body.count(b"\n") == 0
        body = json.loads(response.body)
        assert body["code"] == "max_connections"
        assert "3 WebSocket clients" in body["error"]
        status, _, health = await http_get(server.port, "/health")
        assert status == 200 and json.loads(health)["status"] == "ok"
        stats = server.get_stats()
        assert stats["rejected_connections"] == 1
        assert stats["admission"]["rejected"]["max_connections"] == 1
        assert stats["admission"]["websockets"] == 3
        await clients[0].close()
        await wait_for(lambda: server.get_stats()["admission"]["websockets"] == 2)
        async with websockets.connect(server.url) as again:
            assert (await recv_json(again))["type"] == "connection.established"
        for ws in clients[1:]:
            await ws.close()


# Behind a reverse proxy: X-Forwarded-For from trusted proxies only


def test_trusted_proxies_name_the_client_only_from_a_proxy() -> None:
    proxies = TrustedProxies(["127.0.0.1", "10.0.0.0/8", "::1"])
    assert "127.0.0.1" in proxies and "10.2.3.4" in proxies and "::1" in proxies
    assert "192.0.2.1" not in proxies and "not an ip" not in proxies
    assert "::ffff:127.0.0.1" in proxies  # an IPv4 peer on a dual-stack socket
    # From a proxy: the rightmost address that is not a proxy (what the proxy saw).
    assert proxies.client("127.0.0.1", ["203.0.113.5"]) == "203.0.113.5"
    assert proxies.client("127.0.0.1", ["6.6.6.6, 203.0.113.5"]) == "203.0.113.5"
    assert proxies.client("127.0.0.1", ["6.6.6.6", "203.0.113.5, 10.0.0.7"]) == "203.0.113.5"
    assert proxies.client("::1", ["2001:db8::1"]) == "2001:db8::1"
    # Nothing usable: the proxy itself.
    assert proxies.client("127.0.0.1", []) == "127.0.0.1"
    assert proxies.client("127.0.0.1", ["10.0.0.7"]) == "127.0.0.1"
    assert proxies.client("127.0.0.1", ["203.0.113.5, garbage"]) == "127.0.0.1"
    # From anyone else the header is ignored.
    assert proxies.client("192.0.2.1", ["203.0.113.5"]) == "192.0.2.1"
    assert TrustedProxies().client("127.0.0.1", ["203.0.113.5"]) == "127.0.0.1"
    assert TrustedProxies(["10.0.0.0/8"]).to_list() == ["10.0.0.0/8"]
    with pytest.raises(ValueError, match="trusted_proxies: 'nope' is not an IP address"):
        TrustedProxies(["nope"])
    with pytest.raises(TypeError, match="not a string"):
        TrustedProxies("127.0.0.1")


def test_a_trusted_proxy_is_not_capped_per_address_its_clients_are() -> None:
    admission = Admission(10, 1, headroom=1, trusted_proxies=TrustedProxies(["10.0.0.1"]))
    for key in "abc":  # three sockets from the proxy: past the per-address socket cap of 2
        assert admission.opened(key, "10.0.0.1") == (True, [])
    assert admission.admit("a", "203.0.113.1") is None
    assert admission.admit("b", "203.0.113.2") is None
    assert admission.admit("c", "203.0.113.1") == "max_connections_per_ip"
    assert admission.websockets_from("203.0.113.1") == 1
    admission.closed("a")
    assert admission.websockets_from("203.0.113.1") == 0
    assert admission.admit("c", "203.0.113.1") is None
    # Anyone else is still capped by its own address (its oldest handshake makes room).
    assert admission.opened("x", "10.0.0.9") == (True, [])
    assert admission.opened("y", "10.0.0.9") == (True, [])
    assert admission.opened("z", "10.0.0.9") == (True, ["x"])


async def test_behind_a_trusted_proxy_the_per_address_limit_counts_each_client() -> None:
    async with running_server(
        max_connections=20, max_connections_per_ip=1, trusted_proxies=["127.0.0.1"]
    ) as server:

        def via(client: str) -> dict[str, Any]:
            return {"additional_headers": {"X-Forwarded-For": client}}

        # Twelve clients through the proxy (127.0.0.1): past the per-address socket cap.
        clients = [
            await websockets.connect(f"{server.url}?client_id=c{n}", **via(f"203.0.113.{n}"))
            for n in range(12)
        ]
        for ws in clients:
            assert (await recv_json(ws))["type"] == "connection.established"
        # A second connection of one of them is refused, and named by its own address.
        error = await refused(server.url, **via("203.0.113.3"))
        body = json.loads(error.response.body or b"")
        assert body["code"] == "max_connections_per_ip"
        assert "too many connections from 203.0.113.3" in body["error"]
        # What a client puts in the header itself is left of what the proxy appends.
        error = await refused(server.url, **via("198.51.100.9, 203.0.113.3"))
        assert "from 203.0.113.3" in json.loads(error.response.body or b"")["error"]
        stats = server.get_stats()
        remotes = {c["client_id"]: c["remote"] for c in stats["clients"]}
        assert remotes["c3"] == "203.0.113.3"
        assert stats["admission"]["trusted_proxies"] == ["127.0.0.1/32"]
        assert stats["admission"]["rejected"]["max_connections_per_ip"] == 2
        for ws in clients:
            await ws.close()


async def test_x_forwarded_for_from_anyone_else_is_ignored() -> None:
    async with running_server(max_connections=20, max_connections_per_ip=1) as server:
        headers = {"X-Forwarded-For": "203.0.113.1"}
        async with websockets.connect(server.url, additional_headers=headers) as first:
            await recv_json(first)
            error = await refused(server.url, additional_headers={"X-Forwarded-For": "203.0.113.2"})
            body = json.loads(error.response.body or b"")
            assert "too many connections from 127.0.0.1" in body["error"]
            assert server.get_stats()["clients"][0]["remote"].startswith("127.0.0.1:")


def _can_bind(address: str) -> bool:
    try:
        with socket.socket() as sock:
            sock.bind((address, 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _can_bind("127.0.0.2"), reason="no 127.0.0.2 here (Linux has it)")
async def test_per_address_limit_counts_loopback_and_spares_other_addresses() -> None:
    async with running_server(max_connections=10, max_connections_per_ip=2) as server:
        first = [await websockets.connect(server.url) for _ in range(2)]
        error = await refused(server.url)
        assert error.response.status_code == 503
        assert json.loads(error.response.body or b"")["code"] == "max_connections_per_ip"
        # Another loopback address is another client machine as far as the limit goes.
        async with websockets.connect(server.url, local_addr=("127.0.0.2", 0)) as other:
            greeting = await recv_json(other)
            assert greeting["type"] == "connection.established"
        stats = server.get_stats()["admission"]
        assert stats["rejected"]["max_connections_per_ip"] == 1
        assert stats["rejected"]["max_connections"] == 0
        for ws in first:
            await ws.close()


async def test_silent_sockets_cannot_lock_out_health(bus: EventBus) -> None:
    """Sockets that never send a request are evicted, oldest first, once sockets run short."""
    async with running_server(bus=bus, max_connections=20) as server:
        cap = server.get_stats()["admission"]["max_sockets"]
        idle = [await asyncio.open_connection(HOST, server.port) for _ in range(3 * cap)]
        status, _, _ = await http_get(server.port, "/health")
        assert status == 200
        async with websockets.connect(server.url) as ws:
            assert (await recv_json(ws))["type"] == "connection.established"
        stats = server.get_stats()["admission"]
        assert stats["sockets"] <= cap
        assert stats["handshakes_evicted"] >= 2 * cap
        for _, writer in idle:
            writer.close()


async def test_publish_flood_gets_rate_limited_answers_for_the_excess(bus: EventBus) -> None:
    sent = 200
    async with (
        running_server(bus=bus, publish_rate=20, publish_burst=10, message_rate=0) as server,
        websockets.connect(f"{server.url}?client_id=flood") as ws,
    ):
        await recv_json(ws)
        started = time.monotonic()
        for i in range(sent):
            event = {"type": "load.flood", "data": {"i": i}}
            await ws.send(json.dumps({"type": "publish", "data": event}))
        replies: list[dict[str, Any]] = []
        while len(replies) < sent:  # acks and errors, not the events echoed back
            message = await recv_json(ws)
            if message["type"] in ("published", "error"):
                replies.append(message)
        elapsed = time.monotonic() - started
        published = [r for r in replies if r["type"] == "published"]
        limited = [r for r in replies if r["type"] == "error"]
        assert len(published) + len(limited) == sent
        assert {r["data"]["code"] for r in limited} == {"rate_limited"}
        assert "not published" in limited[0]["data"]["message"]
        # Machine-readable: when to try again (one token at 20/s is at most 50 ms away), and
        # the limits, so a client paces itself without parsing the message.
        for refusal in limited:
            data = refusal["data"]
            assert 0 < data["retry_after"] <= 1 / 20 + 1e-6, data
            assert (data["publish_rate"], data["publish_burst"]) == (20, 10), data
        assert 10 <= len(published) <= 10 + 20 * elapsed + 1
        assert bus.last_seq == len(published)  # nothing refused reached the bus
        stats = server.get_stats()
        assert stats["publishes_rate_limited"] == len(limited)
        (client,) = stats["clients"]
        assert client["publishes_rate_limited"] == len(limited)


async def test_message_rate_paces_a_ping_flood_without_dropping_any(bus: EventBus) -> None:
    async with (
        running_server(bus=bus, message_rate=100, message_burst=10) as server,
        websockets.connect(server.url) as ws,
    ):
        await recv_json(ws)
        started = time.monotonic()
        for i in range(60):
            await ws.send(json.dumps({"type": "ping", "id": i}))
        pongs = [await recv_json(ws) for _ in range(60)]
        elapsed = time.monotonic() - started
        assert [p["type"] for p in pongs] == ["pong"] * 60
        assert elapsed >= 0.4  # 50 over the burst at 100/s
        assert server.get_stats()["messages_throttled"] >= 40


FLOODER = """
import asyncio, json, sys
import websockets

async def main(url, count):
    async with websockets.connect(url, max_queue=None) as ws:
        await ws.recv()
        await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": ["none.*"]}}))
        await ws.recv()
        frame = json.dumps({"type": "publish", "data": {"type": "load.flood", "data": {"x": 1}}})
        async def drain():
            async for _ in ws:
                pass
        reader = asyncio.create_task(drain())
        print("flooding", flush=True)
        for _ in range(count):
            await ws.send(frame)
        reader.cancel()

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


async def ping_rtts(ws: Any, count: int) -> list[float]:
    rtts = []
    for i in range(count):
        started = time.perf_counter()
        await ws.send(json.dumps({"type": "ping", "id": i}))
        while (await recv_json(ws, 10)).get("type") != "pong":
            pass
        rtts.append(time.perf_counter() - started)
    return rtts


async def probe_under_flood(server: Server) -> tuple[float, float]:
    """Median ping round trip of a probe client alone, then while another process floods."""
    async with websockets.connect(f"{server.url}?client_id=probe") as probe:
        await recv_json(probe)
        await probe.send(json.dumps({"type": "subscribe", "data": {"event_types": ["none.*"]}}))
        await recv_json(probe)
        baseline = statistics.median(await ping_rtts(probe, 100))
        flooder = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOODER, f"{server.url}?client_id=flooder", "200000",
            stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        try:
            assert flooder.stdout is not None
            assert await asyncio.wait_for(flooder.stdout.readline(), timeout(20)) == b"flooding\n"
            # Past the bursts, in the sustained flood (the bursts are a bounded, one-off cost).
            await wait_for(lambda: server.get_stats()["messages_throttled"] > 0, 10)
            flooded = statistics.median(await ping_rtts(probe, 200))
        finally:
            with contextlib.suppress(ProcessLookupError):
                flooder.kill()
            await flooder.wait()
        assert flooder.returncode == -9, "the flood ended before the probe did"
    return baseline, flooded


async def test_a_publish_flood_does_not_monopolise_the_loop(bus: EventBus) -> None:
    async with running_server(bus=bus) as server:  # the default limits
        baseline, flooded = await probe_under_flood(server)
        stats = server.get_stats()
    print(f"ping p50 alone {baseline * 1e3:.2f} ms, during a flood {flooded * 1e3:.2f} ms")
    assert stats["publishes_rate_limited"] > 0
    assert flooded < 20 * baseline + timeout(0.001)  # without the limits: about 1000 x


# --------------------------------------------------------------------------------------------
# Descriptor exhaustion, in a server process of its own with a low RLIMIT_NOFILE


@contextlib.asynccontextmanager
async def serve_process(
    log: Path, nofile: int | None, *args: str, hard: int | None = None
) -> AsyncIterator[tuple[asyncio.subprocess.Process, int]]:
    """``gathering-lab serve --port 0 ARGS`` in a subprocess, its stderr to ``log``; yields the
    process and its port, stopped after.

    With ``nofile``, its soft RLIMIT_NOFILE is ``nofile`` and the hard limit ``hard``, by
    default ``nofile`` too (so serve cannot raise it).
    """

    def limit() -> None:
        assert nofile is not None
        resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard or nofile))

    with log.open("wb") as err:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "gathering_lab", "serve", "--port", "0", *args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=err,
            preexec_fn=None if nofile is None else limit,
        )  # fmt: skip
        try:
            assert process.stdout is not None
            port = 0
            while not port:
                line = await asyncio.wait_for(process.stdout.readline(), timeout(30))
                assert line, log.read_text()
                if match := re.search(rb"ws://127\.0\.0\.1:(\d+)/", line):
                    port = int(match.group(1))
            yield process, port
        finally:
            if process.returncode is None:
                process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), timeout(10))
                except TimeoutError:
                    process.kill()
                    await process.wait()


async def test_slowloris_of_1100_sockets_under_1024_descriptors_leaves_health_up(
    tmp_path: Path,
) -> None:
    async with serve_process(tmp_path / "serve.log", 1024, "--log-level", "info") as (_, port):
        idle = []
        for _ in range(1100):
            idle.append(await asyncio.open_connection(HOST, port))
        started = time.monotonic()
        status, _, body = await http_get(port, "/health", wait=5)
        answered = time.monotonic() - started
        assert status == 200, body
        status, _, body = await http_get(port, "/admin/websocket/stats")
        stats = json.loads(body)
        print(f"/health answered in {answered * 1e3:.0f} ms; admission {stats['admission']}")
        assert stats["admission"]["handshakes_evicted"] > 0
        assert stats["admission"]["sockets"] <= stats["admission"]["max_sockets"]
        assert stats["accept_errors"] == 0
        for _, writer in idle:
            writer.close()
    log = (tmp_path / "serve.log").read_text()
    assert "Traceback" not in log
    assert log.count("to make room") == 1  # one line for 1,100 evictions (per 10 s)


async def test_accept_errors_log_one_line_per_interval(tmp_path: Path) -> None:
    log = tmp_path / "serve.log"
    # max_connections above what 64 descriptors allow: accept() does fail with EMFILE.
    args = ("--max-connections", "500", "--log-level", "debug")
    async with serve_process(log, 64, *args) as (_, port):
        assert "needs about" in log.read_text()  # the warning about the descriptor budget
        idle = []
        for _ in range(80):
            idle.append(await asyncio.open_connection(HOST, port))
        # asyncio retries accept() every second: wait for three more failures.
        await wait_for(lambda: log.read_text().count("accept() failed again") >= 3, 10)
        for _, writer in idle:
            writer.close()
        await wait_for(lambda: _health_ok(port), 10)
        _, _, body = await http_get(port, "/admin/websocket/stats")
        assert json.loads(body)["accept_errors"] >= 4
    text = log.read_text()
    assert text.count("WARNING gathering_lab.websocket.server: accept() failed") == 1
    assert "socket.accept() out of system resource" not in text
    assert "ERROR asyncio" not in text


async def _health_ok(port: int) -> bool:
    try:
        status, _, _ = await http_get(port, "/health", wait=1)
    except (OSError, TimeoutError, ValueError, IndexError):
        return False
    return status == 200


async def test_serve_raises_the_soft_descriptor_limit_and_derives_max_connections(
    tmp_path: Path,
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard RLIMIT_NOFILE here is {hard}")
    log = tmp_path / "serve.log"
    async with serve_process(log, 1024, "--log-level", "info", hard=4096) as (_, port):
        _, _, body = await http_get(port, "/admin/websocket/stats")
    admission = json.loads(body)["admission"]
    assert "from 1024 to 4096" in log.read_text()
    # What 4096 descriptors allow, less the reserve and the headroom: well past 1024.
    assert 3800 < admission["max_connections"] < admission["max_sockets"] < 4096
    assert admission["max_connections_per_ip"] == 256


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-connections", "0", "must be at least 1"),
        ("--max-connections-per-ip", "-1", "must be >= 0"),
        ("--publish-rate", "fast", "invalid rate 'fast'"),
        ("--publish-burst", "0", "must be at least 1"),
        ("--open-timeout", "soon", "soon"),
        ("--trusted-proxy", "nginx", "'nginx' is not an IP address or network"),
        ("--flush-slice", "-1", "must be >= 0"),
    ],
)
async def test_serve_rejects_bad_limit_flags(flag: str, value: str, message: str) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gathering_lab", "serve", "--port", "0", flag, value,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(process.communicate(), timeout(20))
    assert process.returncode == 2
    assert flag in err.decode() and message in err.decode()


async def test_serve_keywords_are_checked() -> None:
    for bad in (
        {"max_connections": 0},
        {"max_connections_per_ip": 0},
        {"publish_rate": -1},
        {"publish_burst": 0},
        {"message_rate": float("nan")},
        {"open_timeout": 0},
        {"trusted_proxies": ["nginx"]},
    ):
        (name,) = bad
        with pytest.raises(ValueError, match=name):
            async with running_server(**bad):
                pass
