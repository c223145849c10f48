"""The event log backends: one contract for memory and Redis, then Redis' faults.

The Redis tests run a real ``redis-server`` (the ``redis_server`` fixture: a free loopback
port, its append-only file in a temp dir) and kill, pause, flush and restart it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from gathering_lab.backends import EventLog, LogEntry, open_log, redis_tail
from gathering_lab.exceptions import BackendUnavailable, GatheringLabError
from gathering_lab.testing import RedisServer, timeout, wait_for

# Short timeouts so that faults show within a test's time (scaled on slow machines).
FAST = {
    "timeout": timeout(1.0),
    "connect_timeout": timeout(0.5),
    "block": 0.2,
    "backoff": 0.02,
    "backoff_max": 0.2,
}

Nodes = Callable[..., Awaitable[list[EventLog]]]


@pytest.fixture(params=["memory", "redis"])
async def nodes(request: pytest.FixtureRequest) -> AsyncIterator[Nodes]:
    """Open ``n`` connected handles ("nodes") on one shared log of the backend."""
    if request.param == "memory":
        url = f"memory://{uuid.uuid4().hex}"
        base: dict[str, Any] = {}
    else:
        server: RedisServer = request.getfixturevalue("redis_server")
        url = server.url
        base = dict(FAST)
    async with _opener(url, base) as make:
        yield make


@pytest.fixture(params=["deliver", "hiredis", "redis-py"])
def tail_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """How a Redis tail reads: hiredis' own protocol handing entries to a ``deliver``
    callback ("deliver"), the same yielding them ("hiredis"), or redis-py's reader."""
    if request.param == "redis-py":
        monkeypatch.setattr(redis_tail, "USE_HIREDIS", False)
    else:
        pytest.importorskip("hiredis")
    mode: str = request.param
    return mode


@pytest.fixture
async def redis_nodes(redis_server: RedisServer) -> AsyncIterator[Nodes]:
    """Like ``nodes``, for Redis only."""
    async with _opener(redis_server.url, FAST) as make:
        yield make


@contextlib.asynccontextmanager
async def _opener(url: str, base: dict[str, Any]) -> AsyncIterator[Nodes]:
    """A ``make(n, **options)`` that opens ``n`` connected logs at ``url``; all closed after."""
    opened: list[EventLog] = []

    async def make(n: int = 1, **options: Any) -> list[EventLog]:
        logs = [open_log(url, **{**base, **options}) for _ in range(n)]
        for log in logs:
            await log.connect()
        opened.extend(logs)
        return logs

    try:
        yield make
    finally:
        for log in opened:
            await log.close()


@contextlib.asynccontextmanager
async def following(
    log: EventLog, after_seq: int = 0, epoch: str | None = None, mode: str = ""
) -> AsyncIterator[list[LogEntry]]:
    """Collect what ``log.tail(after_seq)`` yields into a list, in a background task.

    With ``mode="deliver"`` (see ``tail_mode``) what it hands to ``deliver`` goes there too.
    """
    received: list[LogEntry] = []
    deliver = received.append if mode == "deliver" else None

    async def run() -> None:
        async with contextlib.aclosing(log.tail(after_seq, epoch, deliver)) as entries:
            async for entry in entries:
                received.append(entry)

    task = asyncio.create_task(run())
    try:
        yield received
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def read_all(log: EventLog, after_seq: int = 0, chunk: int = 50) -> list[LogEntry]:
    """Every entry after ``after_seq``, read in chunks of ``chunk``."""
    entries: list[LogEntry] = []
    while True:
        result = await log.read(after_seq, chunk)
        assert len(result.entries) <= chunk
        entries.extend(result.entries)
        if len(result.entries) < chunk:
            return entries
        after_seq = result.entries[-1].seq


# -- the contract, on both backends ---------------------------------------------------------


async def test_append_numbers_contiguously_and_reads_back(nodes: Nodes) -> None:
    (log,) = await nodes()
    payloads = [b'{"n": %d}' % i for i in range(5)] + [b"\xff\x00 not utf-8"]
    numbered = [await log.append(p) for p in payloads]
    epoch = numbered[0][1]
    assert numbered == [(i, epoch) for i in range(1, 7)]
    result = await log.read(0, 100)
    assert [e[:3] for e in result.entries] == [(i + 1, epoch, p) for i, p in enumerate(payloads)]
    assert (result.epoch, result.last_seq, result.oldest_seq, result.gap) == (epoch, 6, 1, False)
    info = await log.info()
    assert (info.last_seq, info.oldest_seq, info.epoch, info.length) == (6, 1, epoch, 6)
    assert info.health == "ok"


async def test_an_empty_log(nodes: Nodes) -> None:
    (log,) = await nodes()
    result = await log.read(0, 10)
    assert (result.entries, result.last_seq, result.oldest_seq, result.gap) == ([], 0, 1, False)
    info = await log.info()
    assert (info.last_seq, info.oldest_seq, info.length) == (0, 1, 0)


async def test_two_nodes_appending_concurrently_get_one_total_order(nodes: Nodes) -> None:
    a, b = await nodes(2)
    per_publisher = 150

    async def publish(log: EventLog, name: str) -> list[tuple[int, str]]:
        return [await log.append(f"{name}:{i}".encode()) for i in range(per_publisher)]

    async with following(a) as seen_a, following(b) as seen_b:
        got_a, got_b = await asyncio.gather(publish(a, "a"), publish(b, "b"))
        total = 2 * per_publisher
        await wait_for(lambda: len(seen_a) >= total and len(seen_b) >= total, 10)

    seqs = sorted(seq for seq, _ in got_a + got_b)
    assert seqs == list(range(1, total + 1)), "seqs are unique and contiguous"
    assert len({epoch for _, epoch in got_a + got_b}) == 1, "one epoch"
    # each publisher's own order is kept
    assert [s for s, _ in got_a] == sorted(s for s, _ in got_a)
    assert [s for s, _ in got_b] == sorted(s for s, _ in got_b)
    logged = await read_all(a, chunk=64)
    assert [e.seq for e in logged] == list(range(1, total + 1))
    by_seq = {e.seq: e.payload for e in logged}
    assert [by_seq[s] for s, _ in got_a] == [f"a:{i}".encode() for i in range(per_publisher)]
    assert [by_seq[s] for s, _ in got_b] == [f"b:{i}".encode() for i in range(per_publisher)]
    # both nodes' tails yield every entry, in the same order, as the log holds them
    assert seen_a == logged
    assert seen_b == logged


async def test_read_in_bounded_chunks(nodes: Nodes) -> None:
    (log,) = await nodes()
    for i in range(23):
        await log.append(b"%d" % i)
    first = await log.read(0, 10)
    assert [e.seq for e in first.entries] == list(range(1, 11))
    middle = await log.read(10, 10)
    assert [e.seq for e in middle.entries] == list(range(11, 21))
    last = await log.read(20, 10)
    assert [e.seq for e in last.entries] == [21, 22, 23]
    assert not (first.gap or middle.gap or last.gap)
    assert (await log.read(23, 10)).entries == []
    assert [e.seq for e in await read_all(log, chunk=7)] == list(range(1, 24))


async def test_tail_starts_after_the_given_seq_and_follows(nodes: Nodes) -> None:
    (log,) = await nodes()
    for i in range(5):
        await log.append(b"old %d" % i)
    async with following(log, after_seq=3) as seen:
        await wait_for(lambda: len(seen) >= 2)
        await log.append(b"new")
        await wait_for(lambda: len(seen) >= 3)
    assert [(e.seq, e.payload) for e in seen] == [(4, b"old 3"), (5, b"old 4"), (6, b"new")]


async def test_a_cancelled_tail_ends_promptly(nodes: Nodes) -> None:
    # Python 3.11's asyncio.wait_for (which redis-py sends through when it has a
    # socket_timeout) swallows a cancellation that lands while it waits: a tail that
    # then never ends would hang every shutdown. Cancel at varied points of its loop.
    (log,) = await nodes()
    loop = asyncio.get_running_loop()
    for delay in range(12):
        received: list[LogEntry] = []

        async def run(delay: int, received: list[LogEntry]) -> None:
            async with contextlib.aclosing(log.tail(0)) as entries:
                async for entry in entries:
                    if not received:  # cancel while the tail goes on to its next read
                        task = asyncio.current_task()
                        assert task is not None
                        loop.call_later(delay / 1000, task.cancel)
                    received.append(entry)

        await log.append(b"x")
        task = asyncio.create_task(run(delay, received))
        done, _ = await asyncio.wait([task], timeout=timeout(1.0))
        assert done, f"the tail ignored its cancellation (cancelled after {delay} ms)"
        assert task.cancelled()
    assert (await log.info()).stats["tails"] == 0, "every ended tail is accounted for"


async def test_trimming_past_maxlen_is_a_gap(nodes: Nodes) -> None:
    # Redis trims approximately (MAXLEN ~, whole nodes of 100 entries): append enough.
    (log,) = await nodes(maxlen=10)
    for i in range(350):
        _, epoch = await log.append(b"%d" % i)
    info = await log.info()
    assert info.last_seq == 350
    assert 1 < info.oldest_seq <= 341, info
    oldest = info.oldest_seq
    behind = await log.read(0, 5)
    assert behind.gap, "entries 1.. were trimmed"
    assert behind.entries[0].seq == oldest, "a gap still hands back what is kept"
    assert (await log.read(oldest - 2, 5)).gap
    assert not (await log.read(oldest - 1, 5)).gap, "the oldest kept entry is next: no gap"
    assert not (await log.read(349, 5, epoch=epoch)).gap
    assert (await log.read(351, 5)).gap, "a position past the log's end was lost"
    other = await log.read(349, 5, epoch="not-this-epoch")
    assert other.gap, "another epoch's position is a gap"
    assert other.entries[0].seq == oldest, "and reads from the oldest kept entry"


async def test_bad_arguments_are_refused(nodes: Nodes) -> None:
    (log,) = await nodes()
    with pytest.raises(ValueError, match="after_seq.*-1"):
        await log.read(-1, 10)
    with pytest.raises(ValueError, match="count.*0"):
        await log.read(0, 0)
    with pytest.raises(TypeError, match="payload must be bytes, not str"):
        await log.append("text")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="maxlen"):
        open_log(log.scheme + "://x", maxlen=0)


def test_open_log_picks_a_backend_by_scheme() -> None:
    assert type(open_log("memory://")).__name__ == "MemoryLog"
    assert type(open_log("redis://127.0.0.1:6379/0")).__name__ == "RedisLog"
    assert type(open_log("rediss://127.0.0.1:6380/0")).__name__ == "RedisLog"
    with pytest.raises(ValueError, match="unknown bus url 'kafka://x'.*memory://, redis://"):
        open_log("kafka://x")
    with pytest.raises(ValueError, match="unknown bus url 'localhost:6379'"):
        open_log("localhost:6379")


def test_redis_is_imported_only_for_a_redis_url() -> None:
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['redis'] = None\n"  # as if redis-py were not installed
        "from gathering_lab.backends import open_log\n"
        "open_log('memory://')\n"
        "try:\n"
        "    open_log('redis://127.0.0.1:6379/0')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout(30)
    )
    assert out.returncode == 0, out.stderr
    assert "pip install 'gathering-lab[redis]'" in out.stdout


async def test_memory_logs_are_private_unless_named() -> None:
    a, b = open_log("memory://"), open_log("memory://")
    c, d = open_log("memory://shared-test"), open_log("memory://shared-test")
    for log in (a, b, c, d):
        await log.connect()
    await a.append(b"x")
    await c.append(b"y")
    assert (await b.info()).last_seq == 0
    assert (await d.read(0, 5)).entries[0].payload == b"y"
    for log in (a, b, c, d):
        await log.close()


# -- Redis: keys, atomicity, lost data -----------------------------------------------------


async def test_redis_keys_share_a_hash_tag_and_never_expire(
    redis_nodes: Nodes, redis_server: RedisServer
) -> None:
    (log,) = await redis_nodes()
    await log.append(b"x")
    stream, meta = log.keys  # type: ignore[attr-defined]
    assert stream.startswith("{gathering-lab:events}") and meta.startswith("{gathering-lab:events}")
    assert redis_server.command("TTL", stream) == b":-1"
    assert redis_server.command("TTL", meta) == b":-1"
    assert redis_server.command("CLUSTER", "KEYSLOT", stream) == redis_server.command(
        "CLUSTER", "KEYSLOT", meta
    ) or b"cluster support disabled" in redis_server.command("CLUSTER", "KEYSLOT", stream)


async def test_redis_connections_use_tcp_keepalive(redis_nodes: Nodes) -> None:
    import socket

    (log,) = await redis_nodes()
    await log.append(b"x")
    pool = log._client.connection_pool  # type: ignore[attr-defined]
    held = [*pool._available_connections, *pool._in_use_connections]  # appends hold one
    sockets = [c._writer.get_extra_info("socket") for c in held]
    assert sockets
    for sock in sockets:
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 10


async def test_a_burst_of_appends_waits_for_a_connection(redis_nodes: Nodes) -> None:
    (log,) = await redis_nodes(max_connections=4)
    results = await asyncio.gather(*[log.append(b"%d" % i) for i in range(200)])
    assert sorted(seq for seq, _ in results) == list(range(1, 201))
    assert log.health == "ok"
    assert log.stats()["append_refused"] == 0  # type: ignore[attr-defined]


async def test_flushall_changes_the_epoch_and_is_detected(
    redis_nodes: Nodes,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    tail_mode: str,
) -> None:
    writer, reader = await redis_nodes(2)
    for i in range(5):
        _, old_epoch = await writer.append(b"before %d" % i)
    async with following(reader, mode=tail_mode) as seen:
        await wait_for(lambda: len(seen) == 5)
        assert redis_server.command("FLUSHALL") == b"+OK"
        with caplog.at_level(logging.WARNING, "gathering_lab.backends.redis"):
            seq, new_epoch = await writer.append(b"after")
        assert (seq, new_epoch != old_epoch) == (1, True), "a new epoch, numbered from 1"
        assert writer.stats()["epoch_changes"] == 1  # type: ignore[attr-defined]
        assert "lost its data" in caplog.text
        # the tail was past seq 5 of the old epoch: it must still see seq 1 of the new one
        await wait_for(lambda: len(seen) == 6, 5)
    assert seen[-1][:3] == (1, new_epoch, b"after")
    resume = await reader.read(5, 10, epoch=old_epoch)
    assert resume.gap and [e.payload for e in resume.entries] == [b"after"]


async def test_a_stream_that_vanished_while_its_metadata_stayed_changes_the_epoch(
    redis_nodes: Nodes, redis_server: RedisServer
) -> None:
    (log,) = await redis_nodes()
    for i in range(3):
        _, old_epoch = await log.append(b"%d" % i)
    stream, meta = log.keys  # type: ignore[attr-defined]
    assert redis_server.command("DEL", stream) == b":1"
    seq, epoch = await log.append(b"after")
    assert (seq, epoch != old_epoch) == (1, True)
    assert (await log.read(3, 10, epoch=old_epoch)).gap


async def test_metadata_that_vanished_drops_the_stale_stream(
    redis_nodes: Nodes, redis_server: RedisServer
) -> None:
    (log,) = await redis_nodes()
    for i in range(3):
        _, old_epoch = await log.append(b"%d" % i)
    stream, meta = log.keys  # type: ignore[attr-defined]
    assert redis_server.command("DEL", meta) == b":1"
    stale = await log.read(0, 10)
    assert (stale.entries, stale.epoch != old_epoch) == ([], True), "the stale stream is dropped"
    seq, epoch = await log.append(b"after")
    assert (seq, epoch != old_epoch) == (1, True)
    assert [e.payload for e in (await log.read(0, 10)).entries] == [b"after"]


async def test_a_restart_without_persistence_changes_the_epoch(
    redis_nodes: Nodes, redis_server: RedisServer
) -> None:
    (log,) = await redis_nodes()
    _, old_epoch = await log.append(b"x")
    redis_server.kill()
    for path in redis_server.dir.glob("appendonlydir/*"):
        path.unlink()  # as if Redis had kept nothing
    redis_server.start()
    seq, epoch = await _append_when_up(log, b"y")
    assert (seq, epoch != old_epoch) == (1, True)


# -- Redis: faults ---------------------------------------------------------------------


async def _append_when_up(log: EventLog, payload: bytes, wait: float = 10) -> tuple[int, str]:
    """Append, retrying while the log is unavailable (as a publisher would)."""
    deadline = time.monotonic() + timeout(wait)
    while True:
        try:
            return await log.append(payload)
        except BackendUnavailable:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def test_a_tail_survives_client_kill_without_loss(
    redis_nodes: Nodes, redis_server: RedisServer, tail_mode: str
) -> None:
    writer, reader = await redis_nodes(2)
    async with following(reader, mode=tail_mode) as seen:
        for i in range(20):
            await writer.append(b"%d" % i)
        await wait_for(lambda: len(seen) == 20)
        # kill every client connection: the tail's blocked XREAD and the writer's pool
        reply = redis_server.command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
        assert int(reply.lstrip(b":")) >= 2, reply
        for i in range(20, 40):
            await writer.append(b"%d" % i)  # the pool replaces the killed connection
        await wait_for(lambda: len(seen) == 40, 10)
    assert [e.seq for e in seen] == list(range(1, 41)), "every entry once, in order"
    assert [e.payload for e in seen] == [b"%d" % i for i in range(40)]
    assert reader.stats()["tail_reconnects"] >= 1  # type: ignore[attr-defined]
    kind = "redis-py" if tail_mode == "redis-py" else "hiredis"
    assert reader.stats()["tail_reader"] == kind  # type: ignore[attr-defined]
    stats = writer.stats()  # type: ignore[attr-defined]
    assert stats["append_retries"] >= 1 and stats["append_refused"] == 0
    assert reader.health == writer.health == "ok"


async def test_a_tail_hands_reads_that_follow_on_to_deliver_in_order(
    redis_nodes: Nodes,
) -> None:
    pytest.importorskip("hiredis")
    writer, reader = await redis_nodes(2)
    await writer.append(b"0")
    yielded: list[LogEntry] = []
    delivered: list[LogEntry] = []
    both: list[LogEntry] = []

    def deliver(entry: LogEntry) -> None:
        delivered.append(entry)
        both.append(entry)

    async def run() -> None:
        async with contextlib.aclosing(reader.tail(0, None, deliver)) as entries:
            async for entry in entries:
                yielded.append(entry)
                both.append(entry)

    task = asyncio.create_task(run())
    try:
        await wait_for(lambda: len(both) == 1)
        for i in range(1, 30):
            await writer.append(b"%d" % i)  # one at a time: one XREAD each
        await wait_for(lambda: len(both) == 30)
        await writer.append_many([b"%d" % i for i in range(30, 60)])  # one XREAD, one batch
        await wait_for(lambda: len(both) == 60)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [e.seq for e in both] == list(range(1, 61)), "every entry once, in order"
    assert [e.payload for e in both] == [b"%d" % i for i in range(60)]
    assert yielded[0].seq == 1, "the first read (the script's) is yielded"
    assert len(delivered) >= 50, "reads that follow on go to deliver, from the callback"
    stats = reader.stats()  # type: ignore[attr-defined]
    assert stats["tail_entries"] == 60 and stats["tails"] == 0


async def test_an_error_in_deliver_ends_the_tail_with_it(redis_nodes: Nodes) -> None:
    pytest.importorskip("hiredis")
    writer, reader = await redis_nodes(2)
    await writer.append(b"first")

    def deliver(entry: LogEntry) -> None:
        raise LookupError(f"handler failed on {entry.seq}")

    seen: list[LogEntry] = []

    async def run() -> None:
        async with contextlib.aclosing(reader.tail(0, None, deliver)) as entries:
            async for entry in entries:
                seen.append(entry)
                await writer.append(b"second")  # read by XREAD: goes to deliver

    with pytest.raises(LookupError, match="handler failed on 2"):
        async with asyncio.timeout(timeout(5.0)):
            await run()
    assert [e.seq for e in seen] == [1]
    assert reader.stats()["tails"] == 0  # type: ignore[attr-defined]


async def test_an_append_retried_after_a_lost_reply_is_in_the_log_once(
    redis_nodes: Nodes,
) -> None:
    # The retry path's check, driven directly: the first try landed but its reply was lost.
    (log,) = await redis_nodes()
    await log.append(b"before")
    script, keys = log._append_script, log.keys  # type: ignore[attr-defined]
    # ARGV: new epoch, maxlen, retry's known seq and epoch ('' on a first try), then
    # (payload, token) per entry.
    first = await script(keys=keys, args=["e", 10_000, "", "", b"once", "tok-1"])
    epoch = first[1].decode()
    again = await script(keys=keys, args=["e", 10_000, 1, epoch, b"once", "tok-1"])
    assert (int(again[0]), again[1], int(again[2])) == (2, first[1], 1), "found, not re-added"
    fresh = await script(keys=keys, args=["e", 10_000, 1, epoch, b"new", "tok-2"])
    assert (int(fresh[0]), int(fresh[2])) == (3, 0), "a first try that never landed is added"
    # A batch that landed is found by its first token, as a whole.
    batch = ["e", 10_000, "", "", b"b1", "tok-3", b"b2", "tok-4", b"b3", "tok-5"]
    landed = await script(keys=keys, args=batch)
    batch[2:4] = [3, epoch]
    retried = await script(keys=keys, args=batch)
    assert (int(landed[0]), int(retried[0]), int(retried[2])) == (4, 4, 1)
    entries = (await log.read(0, 10)).entries
    assert [e.payload for e in entries] == [b"before", b"once", b"new", b"b1", b"b2", b"b3"]
    assert [e.token for e in entries[3:]] == [b"tok-3", b"tok-4", b"tok-5"]


async def test_redis_killed_and_restarted_with_its_aof_keeps_the_epoch(
    redis_nodes: Nodes, redis_server: RedisServer, tail_mode: str
) -> None:
    writer, reader = await redis_nodes(2)
    for i in range(50):
        _, epoch = await writer.append(b"%d" % i)
    async with following(reader, mode=tail_mode) as seen:
        await wait_for(lambda: len(seen) == 50)
        redis_server.kill()
        with pytest.raises(BackendUnavailable):
            await writer.append(b"while down")
        await wait_for(lambda: writer.health == "degraded")
        redis_server.start()
        await wait_for(lambda: writer.health == "ok", 10)
        for i in range(50, 60):
            seq, same_epoch = await _append_when_up(writer, b"%d" % i)
            assert same_epoch == epoch
        await wait_for(lambda: len(seen) >= 60, 10)
    assert seq == 60, "nothing acknowledged was lost, nothing refused was numbered"
    assert [e.seq for e in seen] == list(range(1, 61))
    assert {e.epoch for e in seen} == {epoch}
    assert [e.payload for e in seen] == [b"%d" % i for i in range(60)]
    assert not (await reader.read(50, 100, epoch=epoch)).gap
    stats = writer.stats()  # type: ignore[attr-defined]
    assert stats["reconnects"] >= 1 and stats["append_refused"] >= 1
    assert stats["epoch_changes"] == 0


async def test_append_while_redis_is_down_raises_within_a_bounded_time(
    redis_nodes: Nodes, redis_server: RedisServer
) -> None:
    (log,) = await redis_nodes()
    await log.append(b"x")
    redis_server.kill()
    for _ in range(3):
        started = time.monotonic()
        with pytest.raises(BackendUnavailable, match=r"redis at redis://127\.0\.0\.1:\d+/0 is"):
            await log.append(b"y")
        assert time.monotonic() - started < timeout(2.0)
    info = await log.info()
    assert (info.health, info.last_seq) == ("degraded", 1)
    assert info.stats["append_refused"] == 3
    assert isinstance(BackendUnavailable("x"), GatheringLabError)


async def test_a_hung_redis_is_a_stall_detected_and_counted(
    redis_nodes: Nodes,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    tail_mode: str,
) -> None:
    writer, reader = await redis_nodes(2)
    await writer.append(b"before")
    caplog.set_level(logging.WARNING, "gathering_lab.backends.redis")
    async with following(reader, mode=tail_mode) as seen:
        await wait_for(lambda: len(seen) == 1)
        redis_server.pause()
        try:
            started = time.monotonic()
            with pytest.raises(BackendUnavailable):
                await writer.append(b"while hung")
            assert time.monotonic() - started < timeout(3.0), "bounded by the command timeout"
            await wait_for(lambda: reader.stats()["tail_stalls"] >= 1, 10)  # type: ignore[attr-defined]
            assert "stalled" in caplog.text
        finally:
            redis_server.resume()
        await wait_for(lambda: writer.health == "ok", 10)
        await _append_when_up(writer, b"after")
        await wait_for(lambda: any(e.payload == b"after" for e in seen), 10)
    # the append refused while hung may or may not have reached the log (its reply was
    # lost); whatever the log holds, the tail yields it once and in order
    assert [e.seq for e in seen] == list(range(1, len(seen) + 1))
    assert seen[-1].payload == b"after"


async def test_a_tail_that_fails_is_logged_counted_and_retried(
    redis_nodes: Nodes,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    tail_mode: str,
) -> None:
    writer, reader = await redis_nodes(2)
    await writer.append(b"1")
    stream, _ = writer.keys  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, "gathering_lab.backends.redis")
    async with following(reader, mode=tail_mode) as seen:
        await wait_for(lambda: len(seen) == 1)
        # someone overwrites the stream with a string: XREAD fails with WRONGTYPE
        assert redis_server.command("SET", stream, "oops") == b"+OK"
        await wait_for(lambda: reader.stats()["tail_errors"] >= 1, 5)  # type: ignore[attr-defined]
        assert "WRONGTYPE" in caplog.text
        assert redis_server.command("DEL", stream) == b":1"
        seq, epoch = await writer.append(b"after")
        await wait_for(lambda: len(seen) == 2, 5)
    assert seen[-1][:3] == (seq, epoch, b"after")
    assert epoch != seen[0].epoch, "the lost stream started a new epoch"


async def test_connect_to_an_unreachable_redis_is_one_clear_error() -> None:
    from gathering_lab.testing import free_port

    log = open_log(f"redis://127.0.0.1:{free_port()}/0", **FAST)
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"cannot reach redis at redis://127\.0\.0\.1"):
        await log.connect()
    assert time.monotonic() - started < timeout(3.0)
    assert log.health == "closed"


async def test_an_evicting_memory_policy_is_warned_about(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    assert redis_server.command("CONFIG", "SET", "maxmemory-policy", "allkeys-lru") == b"+OK"
    log = open_log(redis_server.url, **FAST)
    with caplog.at_level(logging.WARNING, "gathering_lab.backends.redis"):
        await log.connect()
    await log.close()
    assert "maxmemory-policy allkeys-lru" in caplog.text
    assert log.stats()["maxmemory_policy"] == "allkeys-lru"  # type: ignore[attr-defined]
