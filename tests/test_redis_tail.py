"""The tail's hiredis connection, over a real socket pair: replies in order, however cut.

The Redis behaviour (XREAD, reconnects, stalls, a killed or hung Redis) is tested through
both tail connections in test_backends.py; here the parts a real Redis rarely produces:
replies split at every byte, error replies, garbage and a peer that hangs up.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from gathering_lab.backends import redis_tail
from gathering_lab.testing import timeout

pytest.importorskip("hiredis")


class SocketConn:
    """Stands in for a redis-py connection: what HiredisTailConnection uses of one."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.disconnects = 0

    @property
    def is_connected(self) -> bool:
        return self._writer is not None

    async def connect(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(sock=self.sock)

    async def disconnect(self, nowait: bool = False) -> None:
        self.disconnects += 1
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


@pytest.fixture
async def pair() -> AsyncIterator[tuple[redis_tail.HiredisTailConnection, socket.socket]]:
    """A tail connection on one end of a socket pair; the test plays Redis on the other."""
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    conn = SocketConn(ours)
    tc = redis_tail.open_tail(conn)
    assert isinstance(tc, redis_tail.HiredisTailConnection)
    await tc.connect()
    yield tc, theirs
    await tc.drop()
    theirs.close()


async def reply(tc: redis_tail.TailConnection) -> Any:
    async with asyncio.timeout(timeout(2.0)):
        return await tc.reply()


async def test_requests_go_out_and_replies_come_back_in_order(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    loop = asyncio.get_running_loop()
    tc.send(b"*1\r\n$4\r\nPING\r\n")
    assert await loop.sock_recv(redis, 100) == b"*1\r\n$4\r\nPING\r\n"
    await loop.sock_sendall(redis, b"+PONG\r\n:7\r\n*2\r\n$1\r\na\r\n*0\r\n")
    assert [await reply(tc) for _ in range(3)] == [b"PONG", 7, [b"a", []]]


async def test_a_reply_cut_at_every_byte_is_parsed_once(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    loop = asyncio.get_running_loop()
    wire = b"*1\r\n*2\r\n$6\r\nstream\r\n*1\r\n*2\r\n$3\r\n5-0\r\n*2\r\n$1\r\nd\r\n$2\r\n{}\r\n"
    for cut in range(1, len(wire)):
        await loop.sock_sendall(redis, wire[:cut])
        await asyncio.sleep(0)  # let the first part arrive alone
        await loop.sock_sendall(redis, wire[cut:])
        assert await reply(tc) == [[b"stream", [[b"5-0", [b"d", b"{}"]]]]], cut
    assert not tc.replies


async def test_error_replies_raise_redis_py_errors_and_the_connection_goes_on(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(
        redis, b"-NOSCRIPT No matching script.\r\n-WRONGTYPE Operation against a key\r\n:1\r\n"
    )
    with pytest.raises(NoScriptError, match="NOSCRIPT"):
        await reply(tc)
    with pytest.raises(ResponseError, match="WRONGTYPE"):
        await reply(tc)
    assert await reply(tc) == 1


async def test_garbage_is_a_lost_connection_not_a_hang(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    loop = asyncio.get_running_loop()
    waiting = asyncio.create_task(reply(tc))
    await asyncio.sleep(0)
    await loop.sock_sendall(redis, b"?not resp\r\n")
    with pytest.raises(RedisConnectionError, match="Protocol error"):
        await waiting
    with pytest.raises(RedisConnectionError):
        tc.send(b"*1\r\n$4\r\nPING\r\n")  # nothing is written to a dead connection


async def test_a_peer_that_hangs_up_fails_the_waiting_read(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    waiting = asyncio.create_task(reply(tc))
    await asyncio.sleep(0)
    redis.close()
    with pytest.raises(RedisConnectionError, match="closed|lost"):
        await waiting


async def test_a_cancelled_read_leaves_no_waiter_and_drop_closes_the_socket(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, redis = pair
    waiting = asyncio.create_task(tc.reply())
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert tc.waiter is None
    await tc.drop()
    assert tc.conn.disconnects == 1
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout(2.0)):
        assert await loop.sock_recv(redis, 10) == b"", "our end was closed"


def test_without_hiredis_the_tail_reads_through_redis_py(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(redis_tail, "USE_HIREDIS", False)
    tc = redis_tail.open_tail(SocketConn(socket.socket()))
    assert isinstance(tc, redis_tail.RedisPyTailConnection)
    assert tc.kind == "redis-py"
    tc.conn.sock.close()


async def test_a_dropped_connections_late_close_does_not_touch_the_next_one(
    pair: tuple[redis_tail.HiredisTailConnection, socket.socket],
) -> None:
    tc, old_peer = pair
    old = tc._protocol
    assert old is not None
    await tc.drop()
    ours, redis = socket.socketpair()
    redis.setblocking(False)
    try:
        tc.conn.sock = ours
        await tc.connect()
        old.connection_lost(None)  # the first transport's close, arriving late
        old.eof_received()
        loop = asyncio.get_running_loop()
        tc.send(b"*1\r\n$4\r\nPING\r\n")  # the new connection is still usable
        assert await loop.sock_recv(redis, 100) == b"*1\r\n$4\r\nPING\r\n"
        await loop.sock_sendall(redis, b"+PONG\r\n")
        assert await reply(tc) == b"PONG"
    finally:
        redis.close()
