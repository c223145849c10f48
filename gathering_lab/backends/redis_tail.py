"""The connection a Redis log's tail reads through: requests sent, replies awaited in order.

A tail sends one ``XREAD`` (or read script) after another on a connection of its own, so the
cost of each round trip is the cost of a node following the log. redis-py sets the
connection up (TLS, AUTH, SELECT, CLIENT SETNAME, keepalive) and, by default, reads every
reply through its stream reader, parser and a task switch. With hiredis installed the tail
takes the connected transport over instead (:class:`HiredisTailConnection`): replies are
parsed in the transport's ``data_received`` and handed to the waiting read directly. On
this repository's benchmark VM that cut a node's CPU per followed event by a third
(BENCHMARKS.md, "The tail's own protocol"). Without hiredis, or if redis-py's connection
no longer has the stream writer this relies on, :class:`RedisPyTailConnection` is used.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

try:
    import hiredis
except ImportError:  # the redis extra brings it; plain `redis` works without
    hiredis = None  # type: ignore[assignment]

__all__ = ["TailConnection", "RedisPyTailConnection", "HiredisTailConnection", "open_tail"]

logger = logging.getLogger("gathering_lab.backends.redis")

#: Set to False to make every tail read through redis-py (tests use it for the fallback).
USE_HIREDIS = hiredis is not None


class TailConnection:
    """One Redis connection held by a tail: :meth:`send` requests, :meth:`reply` in order."""

    #: Which reader parses replies (shown in the log's stats).
    kind = ""

    def __init__(self, conn: Any) -> None:
        #: The redis-py connection (from the tail's own pool) this one wraps.
        self.conn = conn
        #: Where the connection parses replies in its transport's callback: called with
        #: each reply as it is parsed; a reply it takes (returns True) is not queued for
        #: :meth:`reply`. What it raises is raised by the next :meth:`reply`, and it is
        #: unset. Not used by a connection that reads through redis-py.
        self.fast: Callable[[Any], bool] | None = None

    async def connect(self) -> None:
        """(Re)connect if not connected; raises redis-py's connection errors."""
        raise NotImplementedError

    def send(self, packed: bytes) -> None:
        """Send one packed request; raises ConnectionError if the connection is gone."""
        raise NotImplementedError

    async def flush(self) -> None:
        """Write what :meth:`send` may have queued, without waiting for a reply."""

    async def reply(self) -> Any:
        """The next reply; error replies raise (NoScriptError, ResponseError)."""
        raise NotImplementedError

    async def drop(self) -> None:
        """Close the connection (any request on it is lost); :meth:`connect` makes a new one."""
        raise NotImplementedError


class RedisPyTailConnection(TailConnection):
    """Through redis-py's own connection: its stream reader and parser, a task switch per reply."""

    kind = "redis-py"

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self._outgoing: list[bytes] = []

    async def connect(self) -> None:
        """(Re)connect if not connected."""
        if not self.conn.is_connected:
            await self.conn.connect()

    def send(self, packed: bytes) -> None:
        """Queue one request; it is written when the next reply is awaited."""
        self._outgoing.append(packed)

    async def reply(self) -> Any:
        """Write what was queued, then read the next reply."""
        await self.flush()
        return await self.conn.read_response()

    async def flush(self) -> None:
        """Write what was queued without waiting for a reply."""
        if self._outgoing:
            packed, self._outgoing = b"".join(self._outgoing), []
            await self.conn.send_packed_command(packed, check_health=False)

    async def drop(self) -> None:
        """Close the connection; the next request reconnects."""
        self._outgoing = []
        await self.conn.disconnect(nowait=True)


class _Raise:
    """Queued in place of a reply: :meth:`HiredisTailConnection.reply` raises ``exc``."""

    __slots__ = ("exc",)

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


class _ReplyProtocol(asyncio.Protocol):
    """Feeds what arrives to hiredis and queues each complete reply for the tail."""

    def __init__(self, owner: HiredisTailConnection) -> None:
        self.owner = owner
        self.reader = hiredis.Reader()

    def data_received(self, data: bytes) -> None:
        owner = self.owner
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                fast = owner.fast
                if fast is None or not fast(reply):
                    owner.replies.append(reply)
        except hiredis.ProtocolError as exc:
            owner.lost(RedisConnectionError(f"Protocol error from redis: {exc}"))
            return
        except Exception as exc:  # the fast handler's (its deliver's): for the reader
            owner.fast = None
            owner.replies.append(_Raise(exc))
        waiter = owner.waiter
        if waiter is not None and owner.replies and not waiter.done():
            waiter.set_result(None)

    def eof_received(self) -> bool:
        if self.owner._protocol is self:  # not a connection dropped and replaced since
            self.owner.lost(RedisConnectionError("Connection closed by server."))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.owner._protocol is self:
            self.owner.lost(RedisConnectionError(f"Connection lost: {exc or 'closed'}"))


class HiredisTailConnection(TailConnection):
    """redis-py connects; replies are parsed by hiredis in the transport's callback."""

    kind = "hiredis"

    def __init__(self, conn: Any) -> None:
        super().__init__(conn)
        self.replies: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[None] | None = None
        self._transport: asyncio.Transport | None = None
        self._protocol: _ReplyProtocol | None = None
        self._lost: Exception | None = None

    @staticmethod
    def supported(conn: Any) -> bool:
        """Whether this redis-py connection exposes the stream writer taken over."""
        return USE_HIREDIS and hasattr(conn, "_writer") and hasattr(conn, "_reader")

    async def connect(self) -> None:
        """(Re)connect through redis-py, then read the transport's replies here."""
        if self._transport is not None and self._lost is None:
            return
        if self._transport is not None:
            await self.drop()
        conn = self.conn
        if not conn.is_connected:
            await conn.connect()
        writer, reader = conn._writer, conn._reader
        transport = writer.transport
        if getattr(reader, "_buffer", b""):
            # Bytes redis-py read but did not parse: nothing should be pending here.
            await conn.disconnect(nowait=True)
            raise RedisConnectionError("unexpected data on the tail's new connection")
        self.replies.clear()
        self._lost = None
        protocol = self._protocol = _ReplyProtocol(self)
        transport.set_protocol(protocol)
        self._transport = transport

    def lost(self, exc: Exception) -> None:
        """The connection ended or sent garbage: fail the pending and next reads."""
        if self._lost is None:
            self._lost = exc
        if self._transport is not None:
            self._transport.close()
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def send(self, packed: bytes) -> None:
        """Write one request now."""
        transport = self._transport
        if transport is None or self._lost is not None or transport.is_closing():
            raise self._lost or RedisConnectionError("the tail's connection is closed")
        transport.write(packed)

    async def reply(self) -> Any:
        """The next reply, as soon as it is parsed (no task switch if already here)."""
        replies = self.replies
        while not replies:
            if self._lost is not None:
                raise self._lost
            waiter = self.waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self.waiter = None
        reply = replies.popleft()
        if reply.__class__ is _Raise:
            raise reply.exc
        if isinstance(reply, hiredis.ReplyError):
            message = str(reply)
            if message.startswith("NOSCRIPT"):
                raise NoScriptError(message)
            raise ResponseError(message)
        return reply

    async def drop(self) -> None:
        """Close the transport and redis-py's connection (the next connect makes a new one)."""
        transport, self._transport = self._transport, None
        self._protocol = None
        if transport is not None:
            transport.close()
        self.fast = None
        self.replies.clear()
        self._lost = None
        await self.conn.disconnect(nowait=True)


def open_tail(conn: Any) -> TailConnection:
    """The fastest tail connection available around a redis-py connection."""
    if HiredisTailConnection.supported(conn):
        return HiredisTailConnection(conn)
    return RedisPyTailConnection(conn)
