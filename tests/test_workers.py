"""``gathering-lab serve --workers N``: N processes on one port, one stream (real processes).

The supervisor runs as a real ``python -m gathering_lab serve --workers 2 --bus redis://...``
subprocess on the ``redis_server`` fixture; clients are real websockets clients and
``/health`` requests, each on a new connection so the kernel spreads them over the workers.
Every wait is a condition with a deadline scaled by GATHERING_LAB_TIMEOUT_FACTOR; every
process is killed in a ``finally``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import sys
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from gathering_lab.cli import main
from gathering_lab.testing import RedisServer, free_port, recv_json, timeout, wait_for
from gathering_lab.workers import RestartPolicy, Supervisor, probe_socket

BANNER = re.compile(
    r"serving (ws://127\.0\.0\.1:(\d+)/ws/dashboard) with 2 workers \(pids (\d+), (\d+);"
)


@dataclass
class Workers:
    """A ``serve --workers 2`` supervisor subprocess and what its banner said."""

    process: asyncio.subprocess.Process
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    url: str = ""
    port: int = 0
    pids: list[int] = field(default_factory=list)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def wait_line(self, stream: list[str], pattern: str, wait: float = 20) -> re.Match[str]:
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for m in map(regex.search, stream) if m]
            return bool(found) or self.process.returncode is not None

        await wait_for(seen, wait)
        assert found, f"no {pattern!r}; exited {self.process.returncode}: {self.out} {self.err}"
        return found[-1]

    async def finish(self, wait: float = 30) -> int:
        return await asyncio.wait_for(self.process.wait(), timeout(wait))


async def _pump(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(") ", 1)[1][0] != "Z"  # a zombie is gone for our purpose
    return True


@contextlib.asynccontextmanager
async def workers(redis: RedisServer) -> AsyncIterator[Workers]:
    """``gathering-lab serve --workers 2 --bus URL --port 0``, up and serving."""
    env = {k: v for k, v in os.environ.items() if k != "GATHERING_LAB_BUS"}
    env["PYTHONUNBUFFERED"] = "1"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--workers",
        "2",
        "--bus",
        redis.url,
        "--port",
        "0",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None and process.stderr is not None
    running = Workers(process)
    readers = [
        asyncio.create_task(_pump(process.stdout, running.out)),
        asyncio.create_task(_pump(process.stderr, running.err)),
    ]
    seen_pids: set[int] = set()
    try:
        banner = await running.wait_line(running.out, BANNER.pattern, wait=60)
        running.url, running.port = banner.group(1), int(banner.group(2))
        running.pids = [int(banner.group(3)), int(banner.group(4))]
        seen_pids.update(running.pids)
        yield running
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for line in running.err:  # children started later (restarts)
            if m := re.search(r"started: pid (\d+)", line):
                seen_pids.add(int(m.group(1)))
        for pid in seen_pids:  # orphans stop on their own; make sure in any case
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for reader in readers:
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)


def _get_health(base: str) -> dict[str, Any]:
    with urllib.request.urlopen(base + "/health", timeout=timeout(5)) as response:
        assert response.status == 200
        health: dict[str, Any] = json.loads(response.read())
        return health


async def health_by_worker(base: str, want: dict[int, int] | None = None) -> dict[int, int]:
    """worker -> pid as /health answers, asked on new connections until both workers answer
    (with the pids in ``want``, if given)."""
    seen: dict[int, int] = {}
    asked = 0

    async def both() -> bool:
        nonlocal asked
        for _ in range(10):
            if asked >= 400:
                raise AssertionError(f"400 /health requests reached only {seen}")
            asked += 1
            health = await asyncio.to_thread(_get_health, base)
            seen[health["worker"]] = health["pid"]
            if len(seen) == 2 and (want is None or seen == want):
                return True
        return False

    deadline = asyncio.get_running_loop().time() + timeout(30)
    while not await both():
        assert asyncio.get_running_loop().time() < deadline, f"/health reached only {seen}"
    return seen


async def client_on_each_worker(url: str) -> dict[int, ClientConnection]:
    """One connected client on worker 0 and one on worker 1 (others closed)."""
    found: dict[int, ClientConnection] = {}
    for _ in range(100):
        ws = await connect(url, max_size=None)
        hello = await recv_json(ws, wait=10)
        match = re.match(r"client-w(\d+)-", hello["data"]["client_id"])
        assert match, hello
        index = int(match.group(1))
        if index in found:
            await ws.close()
        else:
            found[index] = ws
        if len(found) == 2:
            return found
    raise AssertionError(f"100 connections reached only workers {sorted(found)}")


async def markers_until(ws: ClientConnection, last: int) -> list[int]:
    """The ``n`` of every load.test event received up to the one with ``n == last``."""
    got: list[int] = []
    while not got or got[-1] != last:
        message = await recv_json(ws, wait=15)
        if message.get("type") == "load.test":
            got.append(message["data"]["n"])
    return got


async def publish(ws: ClientConnection, n: int) -> None:
    await ws.send(
        json.dumps(
            {"type": "publish", "id": f"p{n}", "data": {"type": "load.test", "data": {"n": n}}}
        )
    )


async def test_workers_share_one_port_and_one_stream(redis_server: RedisServer) -> None:
    async with workers(redis_server) as running:
        # Both workers answer on the one port, each its own process, as the banner said.
        by_worker = await health_by_worker(running.http_url)
        assert sorted(by_worker.values()) == sorted(running.pids)
        assert running.process.pid not in running.pids
        assert {by_worker[0], by_worker[1]} == set(running.pids)
        clients = await client_on_each_worker(running.url)
        a, b = clients[0], clients[1]
        # Published through worker 0, seen on worker 1 exactly once, in order (and back).
        await publish(a, 1)
        await publish(a, 2)
        assert await markers_until(b, 2) == [1, 2]
        await publish(b, 3)
        assert await markers_until(a, 3) == [1, 2, 3]
        assert await markers_until(b, 3) == [3]
        # SIGTERM stops every worker; their clients are closed with 1001 (going away).
        running.process.send_signal(signal.SIGTERM)
        assert await running.finish() == 0
        for ws in (a, b):
            with pytest.raises(ConnectionClosed):
                while True:
                    await asyncio.wait_for(ws.recv(), timeout(10))
            assert ws.close_code == 1001
        await wait_for(lambda: not any(map(_alive, running.pids)), 10)
        assert "stopped 2 workers (0 restarts)" in "".join(running.err)


async def test_a_killed_worker_is_restarted(redis_server: RedisServer) -> None:
    async with workers(redis_server) as running:
        by_worker = await health_by_worker(running.http_url)
        os.kill(by_worker[0], signal.SIGKILL)
        restarted = await running.wait_line(
            running.err, r"worker 0 \(pid \d+\) exited with signal SIGKILL.*restarts in all"
        )
        assert f"pid {by_worker[0]})" in restarted.string
        again = await running.wait_line(running.err, r"worker 0 serving again: pid (\d+)")
        new_pid = int(again.group(1))
        assert new_pid != by_worker[0] and _alive(new_pid)
        # The new process serves the port next to the one that lived on.
        await health_by_worker(running.http_url, want={0: new_pid, 1: by_worker[1]})
        running.process.send_signal(signal.SIGINT)
        assert await running.finish() == 0
        await wait_for(lambda: not _alive(new_pid) and not _alive(by_worker[1]), 10)
        assert "stopped 2 workers (1 restarts)" in "".join(running.err)


async def test_workers_stop_when_the_supervisor_is_killed(redis_server: RedisServer) -> None:
    async with workers(redis_server) as running:
        assert all(map(_alive, running.pids))
        running.process.kill()  # no chance to forward anything: the workers see its pipe close
        await running.finish()
        await wait_for(lambda: not any(map(_alive, running.pids)), 15)


@pytest.mark.parametrize("bus", [None, "memory://", "memory://shared"])
def test_workers_need_a_shared_bus(
    bus: str | None, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("GATHERING_LAB_BUS", raising=False)
    args = ["serve", "--workers", "2", "--port", "0"] + ([] if bus is None else ["--bus", bus])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    assert "error: --workers 2 needs a shared bus" in err and "redis://" in err


@pytest.mark.parametrize("value", ["0", "-1", "257", "two"])
def test_bad_worker_counts_exit_2(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--workers", value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --workers: invalid number" in err and value in err, err


def test_workers_on_an_unreachable_redis_is_one_line(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url = f"redis://127.0.0.1:{free_port()}/0"
    with pytest.raises(SystemExit) as exit_:
        main(["serve", "--workers", "2", "--port", "0", "--bus", url])
    assert str(exit_.value.code).startswith(f"gathering-lab serve: error: --bus {url}: ")
    assert "\n" not in str(exit_.value.code)
    assert "started: pid" not in capsys.readouterr().err  # no worker was started


def test_restart_policy_backs_off_and_gives_up() -> None:
    policy = RestartPolicy(base=0.25, cap=1.0, max_failures=4, stable_after=30)
    assert [policy.delay(k) for k in range(1, 6)] == [0.25, 0.5, 1.0, 1.0, None]
    assert policy.failures(3, lived=1.0) == 4
    assert policy.failures(3, lived=31.0) == 1  # a worker that ran a while starts again


# A stand-in worker: says it serves (on the fd the supervisor passed), then exits 3.
_READY_THEN_DIE = (
    "import os, sys; index, ready, parent = map(int, sys.argv[-1].split(',')); "
    "os.write(ready, b'ready'); sys.exit(3)"
)


async def test_supervisor_gives_up_on_a_worker_that_keeps_dying() -> None:
    policy = RestartPolicy(base=0.01, cap=0.05, max_failures=3, stable_after=30)
    supervisor = Supervisor(
        [sys.executable, "-c", _READY_THEN_DIE], 1, probe_socket("127.0.0.1", 0), policy=policy
    )
    ready: list[int] = []
    code = await asyncio.wait_for(supervisor.run(lambda s: ready.append(s.port)), timeout(60))
    assert code == 1 and ready == [supervisor.port]
    assert supervisor.restarts == 3
    assert supervisor.failure is not None
    assert (
        "worker 0 died 4 times in a row" in supervisor.failure and "status 3" in supervisor.failure
    )


async def test_supervisor_stops_when_a_worker_fails_to_start() -> None:
    supervisor = Supervisor(
        [sys.executable, "-c", "import sys; sys.exit(3)"], 2, probe_socket("127.0.0.1", 0)
    )
    ready: list[int] = []
    code = await asyncio.wait_for(supervisor.run(lambda s: ready.append(1)), timeout(60))
    assert code == 3 and not ready and supervisor.restarts == 0
    assert (
        supervisor.failure is not None and "did not start serving (status 3)" in supervisor.failure
    )
