"""Record and replay (issue 10, item 2): real servers on loopback, the real CLI as subprocesses.

Every wait is a condition with a deadline (scaled by GATHERING_LAB_TIMEOUT_FACTOR);
every subprocess is killed in a ``finally``. Network: 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from gathering_lab.auth import JWTAuth, mint_token
from gathering_lab.cli import main
from gathering_lab.events import Event, EventBus
from gathering_lab.kernel import Lab
from gathering_lab.record import (
    Recorder,
    read_recording,
    record,
    recording_parts,
    write_demo_recording,
)
from gathering_lab.replay import load_events, replay
from gathering_lab.testing import capture_events, running_server, timeout, wait_for
from gathering_lab.traffic import demo_messages
from gathering_lab.websocket import ConnectionManager, Server

ROOT = Path(__file__).resolve().parent.parent
TRACE = ROOT / "notebooks" / "data" / "demo_trace.parquet"
KEYS = ("type", "data", "source_agent_id", "circle_id", "project_id")


def events_of(frame: Any) -> list[tuple[Any, ...]]:
    """What a replay must keep: each event's type, data and ids, in order."""
    payloads, _, _ = load_events(frame)
    return [tuple(json.dumps(p[k], sort_keys=True) for k in KEYS) for p in payloads]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


class Proc:
    """A ``gathering-lab`` subprocess with its stderr collected as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.err: list[str] = []
        assert process.stderr is not None
        self.reader = asyncio.create_task(self._pump(process.stderr))

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        while line := await stream.readline():
            self.err.append(line.decode())

    @property
    def stderr(self) -> str:
        return "".join(self.err)

    async def wait_err(self, text: str, wait: float = 15) -> None:
        try:
            await wait_for(lambda: text in self.stderr or self.process.returncode is not None, wait)
        except TimeoutError:
            raise AssertionError(f"no {text!r} in stderr: {self.stderr}") from None
        assert text in self.stderr, self.stderr

    async def finish(self, wait: float = 30) -> int:
        code = await asyncio.wait_for(self.process.wait(), timeout(wait))
        await asyncio.wait_for(self.reader, timeout(5))
        return code


@contextlib.asynccontextmanager
async def cli(*args: str) -> AsyncIterator[Proc]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
    )
    proc = Proc(process)
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        proc.reader.cancel()
        await asyncio.gather(proc.reader, return_exceptions=True)


async def clients_of(server: Server, count: int = 1) -> None:
    await wait_for(lambda: server.get_stats()["active_connections"] >= count, 10)


# The shipped trace


def test_shipped_trace_is_the_seeded_story(tmp_path: Path) -> None:
    again = write_demo_recording(tmp_path / "trace.parquet", 200)
    shipped, fresh = read_recording(TRACE), read_recording(again)
    assert len(shipped) == 200
    assert events_of(shipped) == events_of(fresh)
    assert shipped["received_at"].equals(fresh["received_at"])
    assert [p["type"] for p in demo_messages(200)] == shipped["type"].tolist()


# End to end: replaying a recording and recording the replay gives the same events


async def test_replay_of_a_recording_records_the_same_events(tmp_path: Path) -> None:
    first, second = tmp_path / "first.parquet", tmp_path / "second.jsonl"
    expected = events_of(read_recording(TRACE))
    async with running_server() as a, running_server() as b:
        async with cli("record", "--url", a.url, "--out", str(first), "--count", "200") as rec:
            await clients_of(a)
            async with cli("replay", str(TRACE), "--url", a.url, "--as-fast-as-possible") as rep:
                assert await rep.finish() == 0, rep.stderr
            assert "200 of 200 events published" in rep.stderr
            assert await rec.finish() == 0, rec.stderr
        assert "record: 200 events" in rec.stderr
        assert events_of(read_recording(first)) == expected

        async with cli("record", "--url", b.url, "--out", str(second), "--count", "200") as rec:
            await clients_of(b)
            async with cli("replay", str(first), "--url", b.url, "--speed", "100") as rep:
                assert await rep.finish() == 0, rep.stderr
            assert await rec.finish() == 0, rec.stderr
        recorded = read_recording(second)
    assert events_of(recorded) == expected
    # Each row keeps its envelope and its receive time.
    assert recorded["seq"].tolist() == list(range(1, 201))
    assert recorded["received_at"].notna().all()
    assert recorded["event_id"].str.startswith("evt_").all()


@pytest.mark.parametrize(
    ("suffix", "how"),
    [("parquet", signal.SIGINT), ("parquet", signal.SIGTERM), ("jsonl", signal.SIGKILL)],
)
async def test_a_stopped_recording_is_complete(tmp_path: Path, suffix: str, how: int) -> None:
    out = tmp_path / f"stopped.{suffix}"
    bus = EventBus()
    async with running_server(bus=bus) as server:
        async with cli(
            "record", "--url", server.url, "--out", str(out), "--log-level", "info"
        ) as rec:
            await clients_of(server)
            for i in range(50):
                await bus.publish(Event(type="load.test", data={"i": i}))
            if suffix == "parquet":
                await rec.wait_err("(50 rows in all)")  # a row group is in the file
            else:
                await wait_for(lambda: out.exists() and out.read_text().count("\n") >= 50, 10)
            rec.process.send_signal(how)
            code = await rec.finish()
        if how == signal.SIGKILL:
            assert code == -signal.SIGKILL  # no cleanup ran: JSON lines need none
        else:
            assert code == 0, rec.stderr
            assert "stopped by stopped" in rec.stderr or "stopped" in rec.stderr
    frame = read_recording(out)
    assert [row["i"] for row in frame["data"]] == list(range(50))


@pytest.mark.parametrize("suffix", ["parquet", "jsonl"])
def test_rotation_makes_several_readable_files(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"rotated.{suffix}"
    with Recorder(path, rotate_bytes=4096, flush_rows=25) as recorder:
        for i, payload in enumerate(demo_messages(400)):
            recorder.write({**payload, "seq": i + 1}, 1_700_000_000.0 + i)
    parts = recording_parts(path)
    assert len(parts) >= 3 and parts == recorder.files
    assert parts[1].name == f"rotated.1.{suffix}"
    sizes = []
    for part in parts:  # each part is a file of its own
        if suffix == "parquet":
            sizes.append(pq.read_table(part).num_rows)
        else:
            lines = part.read_text().splitlines()
            sizes.append(sum(1 for line in lines if json.loads(line)["message"]))
    assert sum(sizes) == 400 and all(sizes)
    frame = read_recording(path)
    assert frame["seq"].tolist() == list(range(1, 401))
    assert frame["type"].tolist() == [p["type"] for p in demo_messages(400)]


async def test_rotation_from_the_cli(tmp_path: Path) -> None:
    out = tmp_path / "cli.jsonl"
    async with running_server() as server:
        async with cli(
            "record", "--url", server.url, "--out", str(out), "--count", "200",
            "--rotate-bytes", "8k",
        ) as rec:  # fmt: skip
            await clients_of(server)
            async with cli("replay", str(TRACE), "--url", server.url, "--speed", "1000") as rep:
                assert await rep.finish() == 0, rep.stderr
            assert await rec.finish() == 0, rec.stderr
    assert len(recording_parts(out)) >= 3, rec.stderr
    assert "more files" in rec.stderr
    assert events_of(read_recording(out)) == events_of(read_recording(TRACE))


# Rate limits: refused publishes are sent again, in order


async def test_rate_limited_publishes_are_resent_in_order(tmp_path: Path) -> None:
    secret = "s" * 32
    token = mint_token(secret, "replayer", ["publish", "subscribe"])  # no admin: no stats
    bus = EventBus()
    trace = write_demo_recording(tmp_path / "t.parquet", 60)
    async with running_server(
        bus=bus, auth=JWTAuth(secret), publish_rate=100, publish_burst=5
    ) as server:
        with capture_events(bus) as published:
            result = await replay(trace, server.url, speed=None, token=token, progress=False)
        stats = server.get_stats()
    assert result.published == 60 and result.failed == 0
    assert result.retried > 0 and result.retried == stats["publishes_rate_limited"]
    assert result.reordered == 0
    assert [(e.type, e.data) for e in published] == [
        (p["type"], p["data"]) for p in demo_messages(60)
    ]


async def test_a_known_publish_rate_is_paced_not_refused(tmp_path: Path) -> None:
    bus = EventBus()
    trace = write_demo_recording(tmp_path / "t.parquet", 40)
    async with running_server(bus=bus, publish_rate=40, publish_burst=10) as server:
        with capture_events(bus) as published:
            result = await replay(trace, server.url, speed=None, progress=False)
        stats = server.get_stats()
    assert result.published == 40 and result.retried == 0
    assert stats["publishes_rate_limited"] == 0
    # 5 at once (half the burst), then 36/s: the pace kept it under the server's limit.
    assert result.elapsed >= 35 / 36 * 0.9
    assert [e.type for e in published] == [p["type"] for p in demo_messages(40)]


# Timing and Lab.replay


async def test_lab_replay_keeps_order_and_scaled_timing(tmp_path: Path) -> None:
    trace = write_demo_recording(tmp_path / "t.jsonl", 11, rate=20.0)  # spans 0.5 s
    bus = EventBus()
    lab = Lab("127.0.0.1", 0, bus=bus, manager=ConnectionManager()).start()
    try:
        await lab.wait_started()
        with capture_events(bus) as published:
            started = time.monotonic()
            real = await lab.replay(trace, speed=1, progress=False)
            real_time = time.monotonic() - started
            fast = await lab.replay(trace, speed=None, progress=False)
            faster = await lab.replay(read_recording(trace), speed=10, progress=False)
    finally:
        lab.stop()
    assert real.published == fast.published == faster.published == 11
    assert real_time >= 0.49
    assert faster.elapsed >= 0.049 and faster.elapsed < real.elapsed
    assert fast.elapsed < real.elapsed
    types = [p["type"] for p in demo_messages(11)]
    assert [e.type for e in published] == types * 3


async def test_replay_skips_the_clients_own_rows(tmp_path: Path) -> None:
    path = tmp_path / "gap.jsonl"
    with Recorder(path) as recorder:
        recorder.write({"type": "task.created", "data": {"n": 1}}, 1.0)
        recorder.write({"type": "lab.gap", "data": {"reason": "seq jump"}}, 2.0)
        recorder.write({"type": "task.created", "data": {"n": 2}}, 3.0)
    payloads, times, skipped = load_events(path)
    assert [p["data"] for p in payloads] == [{"n": 1}, {"n": 2}]
    assert times == [1.0, 3.0] and skipped == 1


# Bad arguments: one clear line, a non-zero exit


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["replay", "{tmp}/missing.parquet"], "no such recording"),
        (["replay", "{tmp}/trace.csv"], "unknown recording format '.csv'"),
        (["replay", str(TRACE), "--speed", "0"], "invalid speed 0"),
        (["replay", str(TRACE), "--speed", "-2"], "invalid speed -2"),
        (["record", "--out", "{tmp}/out.txt"], "unknown recording format '.txt'"),
        (["record", "--out", "{tmp}/nowhere/out.jsonl"], "no such directory"),
        (["record", "--out", str(TRACE)], "exists"),
    ],
)
def test_bad_arguments_give_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    code = main([arg.replace("{tmp}", str(tmp_path)) for arg in args])
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and message in err and err.startswith("gathering-lab "), err


async def test_library_arguments_are_checked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="speed must be a number > 0"):
        await replay(TRACE, "ws://127.0.0.1:9/ws/dashboard", speed=0)
    with pytest.raises(ValueError, match="unknown recording format"):
        Recorder(tmp_path / "x.csv")
    with pytest.raises(FileExistsError, match="exists"):
        Recorder(TRACE)
    with pytest.raises(FileNotFoundError, match="no such recording"):
        read_recording(tmp_path / "none.parquet")
    with pytest.raises(ValueError, match="count must be"):
        await record("ws://127.0.0.1:9/ws/dashboard", tmp_path / "x.jsonl", count=0)
