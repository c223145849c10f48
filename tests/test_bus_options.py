"""Options in the bus URL (``redis://...?maxlen=50``) and the node report flags of ``serve``.

The Redis cases run against a real ``redis-server`` (the ``redis_server`` fixture) with
real servers and websockets clients; the CLI cases run ``python -m gathering_lab serve``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from test_cluster import _run_cli as run_serve_cli  # tests/ is on sys.path
from test_limits import serve_process
from websockets.asyncio.client import connect

from gathering_lab.backends.bus import LogBus, bus_for_url
from gathering_lab.backends.nodes import REPORT_INTERVAL, TTL_INTERVALS, check_timing
from gathering_lab.backends.options import split_url
from gathering_lab.events import Event
from gathering_lab.kernel import Lab
from gathering_lab.testing import RedisServer, free_port, recv_json, recv_until, timeout, wait_for
from gathering_lab.websocket import ConnectionManager, serve


def test_url_options_reach_the_log_and_the_bus_and_redis_py_keeps_its_own() -> None:
    url = (
        "redis://127.0.0.1:6379/0?maxlen=50&delivery_timeout=2.5&timeout=500ms&name=orders"
        "&connect_timeout=1&block=1s&backoff=0.1&backoff_max=3&max_connections=4"
        "&db=3&client_name=me&health_check_interval=10"
    )
    bus = bus_for_url(url)
    assert isinstance(bus, LogBus)
    log: Any = bus.log
    assert (log.maxlen, log.name, log.timeout, log.connect_timeout, log.block) == (
        50,
        "orders",
        0.5,
        1.0,
        1.0,
    )
    assert (log.backoff, log.backoff_max, log.max_connections) == (0.1, 3.0, 4)
    assert bus.delivery_timeout == 2.5
    options = bus.get_stats()["log"]["options"]  # all of them in the stats, the bus's too
    assert (options["maxlen"], options["delivery_timeout"], options["block"]) == (50, 2.5, 1.0)
    assert log.keys[0] == "{gathering-lab:orders}:stream"
    # redis-py's own options stay in the URL its pool is made from; ours are gone.
    assert log.url == "redis://127.0.0.1:6379/0?db=3&client_name=me&health_check_interval=10"
    pool = log._new_client("x", 2).connection_pool
    assert pool.connection_kwargs["db"] == 3
    assert pool.connection_kwargs["health_check_interval"] == 10
    # gl.start(bus=...) goes the same way.
    lab = Lab(port=0, bus="redis://127.0.0.1:6379/0?maxlen=77")
    assert isinstance(lab.bus, LogBus) and lab.bus.log.maxlen == 77  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("maxlen=abc", "bus url option maxlen='abc' is not an integer"),
        ("maxlen=0", "bus url option maxlen='0' is out of range"),
        ("maxlen=1&maxlen=2", "bus url option maxlen is given twice"),
        ("delivery_timeout=soon", "bus url option delivery_timeout='soon' is not a number"),
        ("timeout=0", "bus url option timeout='0' is out of range"),
        ("timeout=99999", "bus url option timeout='99999' is out of range"),
        ("name=a%7Bb%7D", "bus url option name='a{b}' is not a valid log name"),
        ("frobnicate=1", "unknown bus url option 'frobnicate': use backoff"),
        ("socket_timeout=3", "bus url option socket_timeout='3' is set by gathering-lab: use"),
        ("db=x", "bus url option db='x' is not valid for redis-py"),
        ("ssl_ca_certs=/x", "bus url option ssl_ca_certs='/x' needs a rediss://"),
    ],
)
def test_a_bad_url_option_is_one_line_naming_it(query: str, message: str) -> None:
    with pytest.raises(ValueError) as raised:
        bus_for_url(f"redis://127.0.0.1:6379/0?{query}")
    text = str(raised.value)
    assert text.startswith(message), text
    assert "\n" not in text and text[0].islower()


def test_options_contradicting_keywords_and_options_on_memory_are_refused() -> None:
    with pytest.raises(ValueError, match="maxlen=50 contradicts maxlen=60"):
        bus_for_url("redis://127.0.0.1:6379/0?maxlen=50", maxlen=60)
    with pytest.raises(ValueError, match="takes no options"):
        bus_for_url("memory://?maxlen=5")
    # An option of ours that reached the log directly is named, not passed to redis-py.
    from gathering_lab.backends import open_log

    with pytest.raises(ValueError, match="maxlen='5'|maxlen=5"):
        open_log("redis://127.0.0.1:6379/0?maxlen=5")
    assert split_url("redis://h:1/0") == ("redis://h:1/0", {}, {})


async def test_maxlen_from_the_url_trims_the_log_so_a_late_resume_reports_a_gap(
    redis_server: RedisServer,
) -> None:
    events = 300
    trimmed = await serve(port=0, bus=redis_server.url + "?maxlen=50", manager=ConnectionManager())
    try:
        assert trimmed.get_stats()["bus"]["log"]["options"]["maxlen"] == 50
        first = await trimmed.bus.publish(Event(type="load.test", data={"i": 0}))
        for i in range(1, events):
            await trimmed.bus.publish(Event(type="load.test", data={"i": i}))
    finally:
        trimmed.close()
        await trimmed.wait_closed()
    length = int(redis_server.command("XLEN", "{gathering-lab:events}:stream")[1:])
    assert length < events / 2  # MAXLEN ~ trims whole nodes: about 50, never 300
    # A node started now preloads what the log kept: a client resuming from the first
    # event is told it missed some.
    late = await serve(port=0, bus=redis_server.url, manager=ConnectionManager())
    try:
        ws = await connect(f"{late.url}?last_seq={first.seq}&epoch={first.epoch}")
        async with ws:
            assert (await recv_json(ws))["type"] == "connection.established"
            got = await recv_until(ws, lambda m: m["type"] == "resumed")
            assert got[-1]["data"]["gap"] is True
            assert len(got) - 1 == length
            assert got[-2]["data"]["i"] == events - 1
    finally:
        late.close()
        await late.wait_closed()


async def _serve_cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, list[str]]:
    """Run ``gathering-lab serve --port 0 ARGS`` expecting it to exit; its code and stderr lines."""
    code, lines, _ = await run_serve_cli(*args, env=env)
    return code, lines


@pytest.mark.parametrize(
    ("how", "query", "message"),
    [
        ("flag", "maxlen=many", "bus url option maxlen='many' is not an integer"),
        ("flag", "maxlen=-3", "bus url option maxlen='-3' is out of range"),
        ("flag", "nonsense=1", "unknown bus url option 'nonsense'"),
        ("env", "delivery_timeout=0", "bus url option delivery_timeout='0' is out of range"),
    ],
)
async def test_cli_with_a_bad_bus_option_exits_with_one_line(
    how: str, query: str, message: str
) -> None:
    # No redis-server needed: the URL is refused before any connection.
    url = f"redis://127.0.0.1:{free_port()}/0?{query}"
    if how == "flag":
        code, lines = await _serve_cli("--bus", url)
    else:
        code, lines = await _serve_cli(env={"GATHERING_LAB_BUS": url})
    assert code != 0
    assert len(lines) == 1, lines
    assert lines[0] == f"gathering-lab serve: error: --bus: {message}" or lines[0].startswith(
        f"gathering-lab serve: error: --bus: {message}"
    ), lines


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--node-report-interval", "2s", "--node-ttl", "1s"), "must exceed the report interval"),
        (("--node-report-interval", "5s"), None),  # default TTL: 3 intervals, fine
        (("--node-ttl", "1s"), "must exceed the report interval 2s"),
        (("--node-report-interval", "soon"), "invalid duration 'soon'"),
        (("--node-report-interval", "1ms"), "invalid duration '1ms': from 50ms"),
    ],
)
async def test_cli_node_report_flags_are_checked(
    args: tuple[str, ...], message: str | None
) -> None:
    if message is None:  # accepted: it gets as far as the (unreachable) bus
        code, lines = await _serve_cli(*args, "--bus", f"redis://127.0.0.1:{free_port()}/0")
        assert code != 0 and len(lines) == 1 and "cannot reach redis" in lines[0], lines
        return
    code, lines = await _serve_cli(*args)
    assert code == 2
    assert any(message in line for line in lines), lines
    assert not any("Traceback" in line for line in lines), lines


def test_check_timing() -> None:
    assert check_timing() == (REPORT_INTERVAL, REPORT_INTERVAL * TTL_INTERVALS)
    assert check_timing(0.5, 2) == (0.5, 2.0)
    for interval, ttl in ((1, 1), (0.01, None), (True, None), (1, 10_000)):
        with pytest.raises(ValueError, match="node report"):
            check_timing(interval, ttl)


def _stats(port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{port}/admin/websocket/stats"
    with urllib.request.urlopen(url, timeout=timeout(5)) as response:
        result: dict[str, Any] = json.loads(response.read())
    return result


async def test_report_interval_and_ttl_flags_take_effect(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    flags = ("--bus", redis_server.url, "--node-report-interval", "200ms", "--node-ttl", "1s")
    async with serve_process(tmp_path / "serve.log", None, *flags) as (process, port):
        watcher = await serve(port=0, bus=redis_server.url, manager=ConnectionManager())
        try:

            async def listed() -> set[int]:
                stats = await asyncio.to_thread(_stats, watcher.port)
                return {int(e["address"].rsplit(":", 1)[1]) for e in stats["nodes"]}

            async def has_killed_node() -> bool:
                return port in await listed()

            await wait_for(has_killed_node, wait=30)
            cluster = (await asyncio.to_thread(_stats, port))["cluster"]
            assert (cluster["report_interval"], cluster["report_ttl"]) == (0.2, 1.0)
            node_id = (await asyncio.to_thread(_stats, port))["node"]["id"]
            pttl = int(redis_server.command("PTTL", f"{{gathering-lab:events}}:node:{node_id}")[1:])
            assert 0 < pttl <= 1000  # the report's key lives --node-ttl, not the default 6 s
            killed_at = asyncio.get_running_loop().time()
            process.send_signal(signal.SIGKILL)
            await process.wait()

            async def gone() -> bool:
                return port not in await listed()

            await wait_for(gone, wait=REPORT_INTERVAL * TTL_INTERVALS)
            took = asyncio.get_running_loop().time() - killed_at
            # Gone after its 1 s TTL, well before the default TTL (6 s) would have let it go.
            assert took < REPORT_INTERVAL * TTL_INTERVALS - 1, took
        finally:
            watcher.close()
            await watcher.wait_closed()


async def test_cli_banner_names_the_log_and_its_length(redis_server: RedisServer) -> None:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        "0",
        "--bus",
        redis_server.url + "?maxlen=500&name=demo&client_name=banner",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ},
    )
    assert process.stdout is not None
    try:
        line = b""
        while not line.lstrip().startswith(b"bus "):
            line = await asyncio.wait_for(process.stdout.readline(), timeout(30))
            assert line, "serve exited before its banner"
        text = line.decode()
        assert f"127.0.0.1:{redis_server.port}/0 (" in text
        assert "log 'demo', keeps 500)" in text, text
        # redis-py's own option reached the connections: Redis lists them by that name.
        import redis

        with redis.Redis.from_url(redis_server.url) as admin:
            names = {c["name"] for c in admin.client_list()}
        assert "banner" in names, names
    finally:
        process.kill()
        await process.wait()


async def test_an_unreachable_redis_error_keeps_the_password_out() -> None:
    secret = "s3cret-in-url"
    url = f"redis://user:{secret}@127.0.0.1:{free_port()}/0?connect_timeout=1"
    code, lines = await _serve_cli("--bus", url)
    assert code != 0 and len(lines) == 1, lines
    assert "cannot reach redis" in lines[0] and "127.0.0.1" in lines[0], lines
    assert secret not in lines[0] and "user" not in lines[0], lines
