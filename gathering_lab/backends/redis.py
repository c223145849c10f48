"""An event log in a Redis stream (``redis://host:port/db``, ``rediss://`` for TLS).

Every node that opens the same URL (and ``name``) shares one log. Its keys form one
hash-tagged family, so they live in one slot of a Redis Cluster, and none has a TTL::

    {gathering-lab:NAME}:stream   entries: id "<seq>-0", fields d (payload), e (epoch), i (token)
    {gathering-lab:NAME}:meta     hash: e (epoch), s (last seq)

One Lua script appends atomically: it takes the next ``seq`` from the metadata, XADDs the
entry with ``<seq>-0`` as its id (``MAXLEN ~`` caps the length) and returns ``seq`` and
``epoch``. Another reads a bounded chunk together with the epoch, last and oldest ``seq``
(one atomic view, so a gap is never reported against a half-updated log).

Lost data is detected, never papered over (the approach of centrifugal/centrifuge's
``broker_history_add_stream.lua``: epoch and offset in one meta hash, and the stream
deleted when a new epoch starts, since a stream left without its metadata is stale):

* metadata missing (first use, ``FLUSHALL``, a restart without persistence, an eviction):
  a new epoch, ``seq`` starts at 1, any stale stream is deleted;
* the stream missing while the metadata says entries were added (the stream alone was
  deleted or evicted): a new epoch, ``seq`` starts at 1;
* the stream holding ids at or past the next ``seq`` (metadata restored from an older
  state): a new epoch, the stream deleted.

Every epoch change is logged and counted (``epoch_changes``). Centrifuge's own keys
expire (history TTL), which is how its epoch and stream came to vanish separately; here
nothing expires, and :meth:`RedisLog.connect` warns when ``maxmemory-policy`` may evict
keys without a TTL (``allkeys-*``) or when Redis keeps no persistence.

Faults: while Redis cannot be reached the backend is ``degraded``: :meth:`RedisLog.append`
raises :class:`~gathering_lab.exceptions.BackendUnavailable` at once, and a task pings
Redis with exponential backoff (``backoff`` up to ``backoff_max`` seconds, with jitter)
until it answers. Connections use TCP keepalive, a connect timeout and a command timeout,
and redis-py's own retries are off (an append is not retried blindly: it might be added
twice). An append whose connection broke is retried once, and the script looks for the
first try's token before adding it again. A tail blocks in ``XREAD`` on its own
connection for at most ``block`` seconds; a read that does not answer within
``block + timeout + connect_timeout`` (checked by one watchdog timer per tail, every quarter
of that) is a stalled listener: it is logged, counted (``tail_stalls``) and
the tail reconnects and reads on from the last id it yielded, as it does after any lost
connection (``tail_reconnects``); either makes the node check Redis on its main
connection (and turn degraded if it does not answer).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ..exceptions import BackendUnavailable
from .base import (
    EventLog,
    Health,
    LogEntry,
    LogInfo,
    ReadResult,
    check_batch,
    check_payload,
    check_read_args,
    is_gap,
)
from .redis_tail import HiredisTailConnection, TailConnection, open_tail

__all__ = ["RedisLog"]

logger = logging.getLogger("gathering_lab.backends.redis")

DEFAULT_MAXLEN = 10_000
#: Entries a tail reads per round trip.
TAIL_CHUNK = 512

# Shared by both scripts: find the epoch and last seq, starting a new epoch when the log
# lost its data. Returns epoch, last seq.
_ENSURE = """
local stream, meta, new_epoch = KEYS[1], KEYS[2], ARGV[1]
local function ensure()
    local m = redis.call('hmget', meta, 'e', 's')
    local epoch, top = m[1], tonumber(m[2]) or 0
    if not epoch then
        -- no metadata: a new log, or Redis lost its data (FLUSHALL, restart without
        -- persistence, eviction). A stream left without its metadata is stale.
        redis.call('del', stream)
        epoch, top = new_epoch, 0
        redis.call('hset', meta, 'e', epoch, 's', 0)
    elseif top > 0 and redis.call('exists', stream) == 0 then
        -- the stream vanished while its metadata stayed: its entries are lost.
        epoch, top = new_epoch, 0
        redis.call('hset', meta, 'e', epoch, 's', 0)
    end
    return epoch, top
end
"""

# KEYS: stream, meta. ARGV: new epoch, maxlen, for a retry after a lost connection the last
# seq and epoch the node knew before the first try ('' otherwise), then a payload and a token
# for each entry. The entries get consecutive seqs. Returns {first seq, epoch, 1 if the
# first try had landed}.
APPEND_LUA = (
    _ENSURE
    + """
local epoch, top = ensure()
local maxlen, n = ARGV[2], (#ARGV - 4) / 2
if ARGV[3] ~= '' then
    -- a retry: did the first try land? Look for its first token after what was known then.
    local from = 0
    if ARGV[4] == epoch then from = tonumber(ARGV[3]) end
    local after = redis.call('xrange', stream, string.format('%d-0', from + 1), '+', 'COUNT', 1000)
    for _, item in ipairs(after) do
        local fields = item[2]
        for k = 1, #fields, 2 do
            if fields[k] == 'i' and fields[k + 1] == ARGV[6] then
                return {tonumber(string.match(item[1], '^(%d+)')), epoch, 1}
            end
        end
    end
    if #after == 1000 then
        return redis.error_reply('cannot tell whether the first try was appended')
    end
end
local seq = top + 1
local added = redis.pcall('xadd', stream, 'MAXLEN', '~', maxlen,
    string.format('%d-0', seq), 'd', ARGV[5], 'e', epoch, 'i', ARGV[6])
if type(added) == 'table' and added.err then
    -- the stream holds ids at or past seq: its metadata is older than it. Start over.
    redis.call('del', stream)
    epoch, seq = new_epoch, 1
    redis.call('hset', meta, 'e', epoch)
    redis.call('xadd', stream, 'MAXLEN', '~', maxlen, '1-0', 'd', ARGV[5], 'e', epoch,
        'i', ARGV[6])
end
for k = 2, n do
    redis.call('xadd', stream, 'MAXLEN', '~', maxlen, string.format('%d-0', seq + k - 1),
        'd', ARGV[3 + 2 * k], 'e', epoch, 'i', ARGV[4 + 2 * k])
end
redis.call('hset', meta, 's', seq + n - 1)
return {seq, epoch, 0}
"""
)

# KEYS: stream, meta. ARGV: new epoch, after seq, count, caller's epoch ('' if none).
# Returns {epoch, last seq, oldest seq, length, entries}.
READ_LUA = (
    _ENSURE
    + """
local epoch, top = ensure()
local after, count = tonumber(ARGV[2]), tonumber(ARGV[3])
if ARGV[4] ~= '' and ARGV[4] ~= epoch then
    after = 0
end
local oldest = top + 1
local first = redis.call('xrange', stream, '-', '+', 'COUNT', 1)
if #first > 0 then
    oldest = tonumber(string.match(first[1][1], '^(%d+)'))
end
local entries = {}
if count > 0 then
    entries = redis.call('xrange', stream, string.format('%d-0', after + 1), '+', 'COUNT', count)
end
return {epoch, top, oldest, redis.call('xlen', stream), entries}
"""
)

_DOWN_ERRORS: tuple[type[BaseException], ...] = (
    RedisConnectionError,
    RedisTimeoutError,
    OSError,
    asyncio.TimeoutError,
)


def _keepalive_options() -> dict[int, int]:
    """TCP keepalive: first probe after 10 s idle, then every 5 s, give up after 3."""
    options = {}
    for name, value in (("TCP_KEEPIDLE", 10), ("TCP_KEEPINTVL", 5), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, name):
            options[getattr(socket, name)] = value
    return options


def _where(url: str) -> str:
    """The URL without credentials, for messages."""
    parts = urlsplit(url)
    host = parts.hostname or "localhost"
    port = parts.port or 6379
    return f"{parts.scheme}://{host}:{port}{parts.path or ''}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _entry(raw: Any) -> LogEntry:
    """A LogEntry from one XRANGE/XREAD item: [id, [field, value, ...]] or (id, {field: value})."""
    entry_id, fields = raw[0], raw[1]
    if (
        type(fields) is list
        and len(fields) == 6
        and fields[0] == b"d"
        and fields[2] == b"e"
        and fields[4] == b"i"
    ):  # as the append script writes them
        seq = int(entry_id[: entry_id.index(b"-")])
        return LogEntry(seq, fields[3].decode(), fields[1], fields[5])
    if not isinstance(fields, dict):
        fields = dict(zip(fields[::2], fields[1::2], strict=True))
    seq = int(entry_id.split(b"-", 1)[0])
    return LogEntry(seq, fields[b"e"].decode(), bytes(fields[b"d"]), bytes(fields.get(b"i", b"")))


def _pack(*args: Any) -> bytes:
    """One command in RESP (the arguments as bulk strings)."""
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        if not isinstance(arg, bytes):
            arg = str(arg).encode()
        parts += (b"$%d\r\n" % len(arg), arg, b"\r\n")
    return b"".join(parts)


async def _call(conn: Any, *args: Any) -> Any:
    """Send one command on a held connection and read its reply as the parser gives it."""
    await conn.send_packed_command(_pack(*args), check_health=False)
    return await conn.read_response()


class _Watchdog:
    """Cancels a task whose read has been under way for ``limit`` seconds or more.

    One timer per tail, checked every ``limit / 4`` seconds, instead of a timer made and
    cancelled for every read (``asyncio.timeout``): a stalled read is found between
    ``limit`` and ``1.25 * limit`` after it began. Set :attr:`since` when a read begins and
    None when it ends; after a CancelledError, :meth:`expired` tells whether it was this
    watchdog's (and then takes the cancellation back, as ``asyncio.timeout`` does).
    """

    __slots__ = ("task", "limit", "since", "_fired", "_base", "_loop", "_handle")

    def __init__(self, task: asyncio.Task[Any], limit: float) -> None:
        self.task = task
        self.limit = limit
        self.since: float | None = None
        self._fired = False
        self._base = task.cancelling()
        self._loop = asyncio.get_running_loop()
        self._handle = self._loop.call_later(limit / 4, self._check)

    def _check(self) -> None:
        since = self.since
        if since is not None and not self._fired and self._loop.time() - since >= self.limit:
            self._fired = True
            self.task.cancel()
        self._handle = self._loop.call_later(self.limit / 4, self._check)

    def expired(self) -> bool:
        """Whether the CancelledError being handled is this watchdog's (then uncancelled)."""
        if not self._fired:
            return False
        self._fired = False
        return self.task.uncancel() <= self._base

    def close(self) -> None:
        """Stop checking."""
        self._handle.cancel()


class RedisLog(EventLog):
    """A log in a Redis stream, shared by every node opening the same URL and ``name``.

    ``maxlen`` caps the stream (approximately: ``MAXLEN ~`` trims whole nodes, so it may
    hold somewhat more). ``timeout`` bounds every command (and, beyond ``block``, a tail's
    read), ``connect_timeout`` a connection attempt; ``backoff``/``backoff_max`` pace the
    reconnection attempts while degraded. ``max_connections`` caps the connections appends
    and reads use at once (more concurrent calls wait for one); each tail has its own.
    """

    scheme = "redis"
    # One pool connection held for appends, used when no other append is under way.
    _held: Any = None
    _held_busy = False

    def __init__(
        self,
        url: str,
        *,
        name: str = "events",
        maxlen: int = DEFAULT_MAXLEN,
        timeout: float = 5.0,
        connect_timeout: float = 2.0,
        block: float = 2.0,
        backoff: float = 0.05,
        backoff_max: float = 2.0,
        max_connections: int = 16,
    ) -> None:
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ValueError(f"maxlen must be a positive integer, not {maxlen!r}")
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be a positive integer, not {max_connections!r}")
        if not isinstance(name, str) or not name or "{" in name or "}" in name:
            raise ValueError(f"name must be a non-empty string without braces, not {name!r}")
        for label, value in (
            ("timeout", timeout),
            ("connect_timeout", connect_timeout),
            ("block", block),
            ("backoff", backoff),
            ("backoff_max", backoff_max),
        ):
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{label} must be a positive number of seconds, not {value!r}")
        if backoff_max < backoff:
            raise ValueError(
                f"backoff_max ({backoff_max!r}) must be at least backoff ({backoff!r})"
            )
        # redis-py's own query options stay in the URL (checked here: a bad one would only
        # fail at connect, inside redis-py); gathering-lab's are read by bus_for_url().
        from .options import split_url

        _, own_log, own_bus = split_url(url)
        if own_log or own_bus:
            option, given = next(iter({**own_log, **own_bus}.items()))
            raise ValueError(
                f"bus url option {option}={given!r} is read by bus_for_url() (serve --bus, "
                f"gl.start(bus=...)); pass {option}= to RedisLog instead"
            )
        self.url = url
        self.where = _where(url)
        self.name = name
        self.maxlen = maxlen
        self.max_connections = max_connections
        self.keys = [f"{{gathering-lab:{name}}}:stream", f"{{gathering-lab:{name}}}:meta"]
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.block = block
        self.backoff = backoff
        self.backoff_max = backoff_max
        self._client: aioredis.Redis | None = None
        self._health: Health = "closed"
        self._reconnector: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._down_since = 0.0
        self._epoch = ""
        self._last = (0, 1, 0)  # last seq, oldest seq, length: the last figures seen
        self._stats: dict[str, Any] = {
            "appended": 0,
            "append_calls": 0,
            "append_batch_max": 0,
            "append_refused": 0,
            "append_retries": 0,
            "failures": 0,
            "reconnects": 0,
            "epoch_changes": 0,
            "tails": 0,
            "tail_reads": 0,
            "tail_entries": 0,
            "tail_batch_max": 0,
            "tail_reconnects": 0,
            "tail_stalls": 0,
            "tail_gaps": 0,
            "tail_errors": 0,
            "tail_reader": None,  # "hiredis" or "redis-py", once a tail started
            "maxmemory_policy": None,
            "persistence": None,
            # What it was opened with (bus URL options or keywords), for the stats.
            "options": {
                "name": name,
                "maxlen": maxlen,
                "timeout": timeout,
                "connect_timeout": connect_timeout,
                "block": block,
                "backoff": backoff,
                "backoff_max": backoff_max,
                "max_connections": max_connections,
            },
        }

    # -- connections -------------------------------------------------------------------

    def _new_client(self, client_name: str, max_connections: int) -> aioredis.Redis:
        # No socket_timeout (redis-py 8 defaults to 5 s; say None): with one, redis-py
        # sends through asyncio.wait_for, which on Python 3.11 can swallow a task's
        # cancellation (a tail that never ends), and costs a task per command. Every
        # call is bounded with asyncio.timeout here instead. A blocking pool makes a burst
        # of appends wait for a connection rather than fail with "Too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=max_connections,
            timeout=None,
            client_name=client_name,
            socket_timeout=None,
            socket_connect_timeout=self.connect_timeout,
            socket_keepalive=True,
            socket_keepalive_options=_keepalive_options(),
            health_check_interval=30,
            retry=Retry(NoBackoff(), 0),
            decode_responses=False,
            protocol=2,
        )
        client: aioredis.Redis = aioredis.Redis.from_pool(pool)
        return client

    async def connect(self) -> None:
        """Reach Redis and read the log's epoch; raise BackendUnavailable if it cannot."""
        if self._client is not None:
            return
        client = self._new_client(f"gathering-lab:{self.name}", self.max_connections)
        self._append_script = client.register_script(APPEND_LUA)
        self._read_script = client.register_script(READ_LUA)
        self._client = client
        try:
            async with asyncio.timeout(self.timeout + self.connect_timeout):
                await self._read_raw(client, 0, 0, None)
        except _DOWN_ERRORS + (RedisError,) as exc:
            self._client = None
            await client.aclose()
            raise BackendUnavailable(f"cannot reach redis at {self.where}: {exc}") from None
        self._health = "ok"
        await self._check_config(client)
        logger.info(
            "event log %r at %s: epoch %s, last seq %d", self.name, self.where, *self._epoch_seq()
        )

    def _epoch_seq(self) -> tuple[str, int]:
        return self._epoch, self._last[0]

    async def _check_config(self, client: aioredis.Redis) -> None:
        """Warn when Redis may evict the log's keys or lose them in a restart."""
        try:
            values = {}
            for name in ("maxmemory-policy", "appendonly", "save"):
                async with asyncio.timeout(self.timeout):
                    config: Any = await client.config_get(name)
                for key, value in config.items():  # str or bytes, by redis-py version
                    values[_text(key)] = _text(value)
        except _DOWN_ERRORS + (RedisError,) as exc:  # CONFIG may be disabled (managed Redis)
            logger.debug("cannot read redis config at %s: %s", self.where, exc)
            return
        policy = values.get("maxmemory-policy", "")
        self._stats["maxmemory_policy"] = policy
        if values.get("appendonly") == "yes":
            self._stats["persistence"] = "aof"
        else:
            self._stats["persistence"] = "rdb" if values.get("save") else "none"
        if policy.startswith("allkeys-"):
            logger.warning(
                "redis at %s has maxmemory-policy %s: it may evict the event log's keys "
                "(clients then resume with a gap); use noeviction or a volatile-* policy",
                self.where,
                policy,
            )
        if self._stats["persistence"] == "none":
            logger.warning(
                "redis at %s keeps no persistence: a restart loses the event log "
                "(a new epoch; clients resume with a gap)",
                self.where,
            )

    async def close(self) -> None:
        """Stop reconnecting and close the connections; open tails end within ``block``."""
        self._health = "closed"
        for task in (self._reconnector, self._prober):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._reconnector = self._prober = None
        client, self._client = self._client, None
        held, self._held = self._held, None
        if client is not None:
            if held is not None:
                await held.disconnect()
                await client.connection_pool.release(held)
            await client.aclose()

    def _require_client(self) -> aioredis.Redis:
        if self._client is None or self._health == "closed":
            raise RuntimeError(f"the redis log at {self.where} is closed; call connect() first")
        return self._client

    def _down(self, exc: BaseException) -> None:
        """Note that Redis did not answer; start reconnecting if not already."""
        self._stats["failures"] += 1
        if self._health != "ok":
            return
        self._health = "degraded"
        self._down_since = time.monotonic()
        logger.warning(
            "redis at %s is unreachable (%s: %s): degraded, reconnecting",
            self.where,
            type(exc).__name__,
            exc,
        )
        self._reconnector = asyncio.get_running_loop().create_task(
            self._reconnect(), name=f"gathering-lab redis reconnect {self.where}"
        )

    async def _reconnect(self) -> None:
        """Ping Redis with exponential backoff (and jitter) until it answers."""
        delay = self.backoff
        attempts = 0
        while self._health == "degraded" and self._client is not None:
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            attempts += 1
            try:
                async with asyncio.timeout(self.timeout + self.connect_timeout):
                    await self._read_raw(self._client, 0, 0, None)
            except _DOWN_ERRORS as exc:
                self._stats["failures"] += 1
                delay = min(delay * 2, self.backoff_max)
                logger.debug(
                    "redis at %s still unreachable (attempt %d): %s", self.where, attempts, exc
                )
                continue
            except RedisError as exc:  # answers, but not as expected: keep trying, loudly
                logger.error("redis at %s answers with an error: %s", self.where, exc)
                delay = min(delay * 2, self.backoff_max)
                continue
            self._health = "ok"
            self._stats["reconnects"] += 1
            logger.warning(
                "redis at %s is back after %.1fs (%d attempts): epoch %s, last seq %d",
                self.where,
                time.monotonic() - self._down_since,
                attempts,
                *self._epoch_seq(),
            )
        self._reconnector = None

    async def _drop_tail(self, tc: TailConnection) -> None:
        """Close a tail's connection (bounded: a stalled close must not stall the tail)."""
        try:
            async with asyncio.timeout(self.connect_timeout):
                await tc.drop()
        except _DOWN_ERRORS + (RedisError,) as exc:
            logger.debug("closing a tail connection to %s: %s", self.where, exc)

    def _probe(self) -> None:
        """Check Redis with the main connection (a tail's loss may be its own connection's)."""
        if self._health == "ok" and self._prober is None:
            self._prober = asyncio.get_running_loop().create_task(self._probe_once())

    async def _probe_once(self) -> None:
        try:
            await self.info()  # turns the backend degraded if Redis does not answer
        finally:
            self._prober = None

    def _unavailable(self) -> BackendUnavailable:
        return BackendUnavailable(
            f"redis at {self.where} is unreachable; reconnecting (down for "
            f"{time.monotonic() - self._down_since:.1f}s)"
        )

    def _saw_epoch(self, epoch: str) -> None:
        if self._epoch and epoch != self._epoch:
            self._stats["epoch_changes"] += 1
            logger.warning(
                "event log %r at %s lost its data: epoch %s -> %s (older resumes get a gap)",
                self.name,
                self.where,
                self._epoch,
                epoch,
            )
        self._epoch = epoch

    # -- the log -------------------------------------------------------------------------

    async def append(self, payload: bytes) -> tuple[int, str]:
        """Append one envelope atomically; return its cluster-wide ``(seq, epoch)``."""
        return (await self.append_many([check_payload(payload)]))[0]

    async def append_many(
        self, payloads: Sequence[bytes], tokens: Sequence[bytes] | None = None
    ) -> list[tuple[int, str]]:
        """Append envelopes in one script call: consecutive ``seq``, nothing else between.

        Returns each one's ``(seq, epoch)``; ``tokens`` come back with the entries
        (:attr:`~gathering_lab.backends.LogEntry.token`).
        """
        checked, tokens = check_batch(payloads, tokens)
        if not checked:
            return []
        client = self._require_client()
        if self._health != "ok":
            self._stats["append_refused"] += len(checked)
            raise self._unavailable()
        if tokens is None:
            tokens = [secrets.token_hex(8).encode() for _ in checked]
        known_seq, known_epoch = self._last[0], self._epoch
        args: list[Any] = [secrets.token_hex(6), self.maxlen, "", ""]
        for payload, token in zip(checked, tokens, strict=True):
            args += (payload, token)
        try:
            try:
                async with asyncio.timeout(self.timeout + self.connect_timeout):
                    seq, epoch, _ = await self._run_append(client, args)
            except RedisConnectionError:
                # The connection broke (e.g. closed by the server while idle in the pool):
                # try once more on a new one; the script finds the first try by its token
                # if it had landed, so the entries are in the log once either way.
                self._stats["append_retries"] += 1
                args[2:4] = [known_seq, known_epoch]
                async with asyncio.timeout(self.timeout + self.connect_timeout):
                    seq, epoch, _ = await self._run_append(client, args)
        except _DOWN_ERRORS as exc:
            self._down(exc)
            self._stats["append_refused"] += len(checked)
            raise self._unavailable() from exc
        except RedisError as exc:  # the retry could not tell: refuse rather than duplicate
            self._stats["append_refused"] += len(checked)
            raise BackendUnavailable(f"redis at {self.where}: {exc}") from exc
        epoch = epoch.decode()
        first = int(seq)
        last = first + len(checked) - 1
        if last > self._last[0] or epoch != self._epoch:
            self._last = (last, self._last[1], self._last[2])
        self._saw_epoch(epoch)
        stats = self._stats
        stats["appended"] += len(checked)
        stats["append_calls"] += 1
        if len(checked) > stats["append_batch_max"]:
            stats["append_batch_max"] = len(checked)
        return [(first + i, epoch) for i in range(len(checked))]

    async def _run_append(self, client: aioredis.Redis, args: list[Any]) -> Any:
        """One call of the append script: on the log's held connection if it is free
        (the bus's appender makes one call at a time), else on one from the pool."""
        if self._held_busy:
            return await self._append_script(keys=self.keys, args=args, client=client)
        self._held_busy = True
        try:
            conn = self._held
            if conn is None:
                conn = self._held = await client.connection_pool.get_connection()
            script = self._append_script
            try:
                return await _call(conn, "EVALSHA", script.sha, 2, *self.keys, *args)
            except NoScriptError:  # a restarted Redis without its scripts
                return await _call(conn, "EVAL", script.script, 2, *self.keys, *args)
        finally:
            self._held_busy = False

    async def _read_raw(
        self, client: aioredis.Redis, after_seq: int, count: int, epoch: str | None
    ) -> ReadResult:
        raw = await self._read_script(
            keys=self.keys,
            args=[secrets.token_hex(6), after_seq, count, epoch or ""],
            client=client,
        )
        return self._read_result(raw, after_seq, epoch)

    def _read_result(self, raw: Any, after_seq: int, epoch: str | None) -> ReadResult:
        log_epoch = raw[0].decode()
        last_seq, oldest, length = int(raw[1]), int(raw[2]), int(raw[3])
        self._saw_epoch(log_epoch)
        self._last = (last_seq, oldest, length)
        entries = [_entry(item) for item in raw[4]]
        gap = is_gap(after_seq, epoch, log_epoch, last_seq, oldest)
        return ReadResult(entries, log_epoch, last_seq, oldest, gap)

    async def read(self, after_seq: int, count: int, epoch: str | None = None) -> ReadResult:
        """Return at most ``count`` entries after ``after_seq`` (see :class:`ReadResult`)."""
        check_read_args(after_seq, count)
        client = self._require_client()
        if self._health != "ok":
            raise self._unavailable()
        try:
            async with asyncio.timeout(self.timeout + self.connect_timeout):
                return await self._read_raw(client, after_seq, count, epoch)
        except _DOWN_ERRORS as exc:
            self._down(exc)
            raise self._unavailable() from exc

    async def info(self) -> LogInfo:
        """Return what the log holds now; while degraded, the last figures seen."""
        if self._client is not None and self._health == "ok":
            try:
                async with asyncio.timeout(self.timeout + self.connect_timeout):
                    await self._read_raw(self._client, 0, 0, None)
            except _DOWN_ERRORS as exc:
                self._down(exc)
            except RedisError as exc:
                logger.error("redis at %s answers with an error: %s", self.where, exc)
        last_seq, oldest, length = self._last
        return LogInfo(last_seq, oldest, self._epoch, length, self._health, self.stats())

    def stats(self) -> dict[str, Any]:
        """This node's counters for the log."""
        return dict(self._stats)

    @property
    def health(self) -> Health:
        """``ok``, ``degraded`` (reconnecting) or ``closed``."""
        return self._health

    async def tail(
        self,
        after_seq: int,
        epoch: str | None = None,
        deliver: Callable[[LogEntry], None] | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Yield every entry after ``after_seq`` as it is appended, until the log is closed.

        Runs on its own connection. After a lost or stalled connection it reads again
        from the last entry it yielded; when the epoch changes (or ``epoch`` is not the
        log's) it goes on from the oldest entry of the log's epoch. With ``deliver`` (and
        hiredis), the entries of each ``XREAD`` that follows on from the last go to it
        straight from the connection's callback, not through this iterator.
        """
        check_read_args(after_seq, 1)
        self._require_client()
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("RedisLog.tail() must be iterated in a task")
        client = self._new_client(f"gathering-lab-tail:{self.name}", 1)
        # The tail holds its one connection and talks to it directly: no pool, retry or
        # reply-callback layers per read (a read per delivered batch is the hot path), and
        # with hiredis no stream reader or task switch either (redis_tail.py).
        tc = open_tail(await client.connection_pool.get_connection())
        self._stats["tail_reader"] = tc.kind
        read_script = self._read_script
        block_ms = int(self.block * 1000)
        stats = self._stats
        stream = self.keys[0]
        last = after_seq
        # Script mode reads a chunk atomically with the epoch: at the start, after a fault,
        # while catching up, and once per idle ``block`` (XREAD after "<last>-0" cannot see
        # a new epoch whose ids are still below it). XREAD mode blocks for new entries.
        use_script = True
        # XREAD COUNT n BLOCK ms STREAMS key <id>, packed but for the id; sent_after is
        # the id a request already on the connection reads after (-1: none).
        xread = _pack("XREAD", "COUNT", TAIL_CHUNK, "BLOCK", block_ms, "STREAMS", stream, "")
        xread = xread[: -len(b"$0\r\n\r\n")]

        def xread_after(seq: int) -> bytes:
            entry_id = b"%d-0" % seq
            return b"%s$%d\r\n%s\r\n" % (xread, len(entry_id), entry_id)

        sent_after = -1
        loop = asyncio.get_running_loop()
        watchdog = _Watchdog(task, self.block + self.timeout + self.connect_timeout)
        delay = self.backoff

        def counted(batch: list[LogEntry]) -> None:
            stats["tail_reads"] += 1
            stats["tail_entries"] += len(batch)
            if len(batch) > stats["tail_batch_max"]:
                stats["tail_batch_max"] = len(batch)

        def advance(entry: LogEntry) -> None:
            """Move ``last`` to ``entry`` (the next one yielded or delivered)."""
            nonlocal last
            if entry.seq > last + 1:
                stats["tail_gaps"] += 1
                logger.warning(
                    "event log tail on %s missed entries %d..%d (trimmed before read)",
                    self.where,
                    last + 1,
                    entry.seq - 1,
                )
            last = entry.seq

        def read_on(batch: list[LogEntry]) -> bool:
            """Ask for what follows ``batch`` if it goes on in this epoch (an entry of
            another epoch ends XREAD mode), before the batch is delivered: Redis takes the
            request while it is still awake from the reply, and the read is under way."""
            nonlocal sent_after
            if not batch or any(entry.epoch != epoch for entry in batch):
                return False
            tc.send(xread_after(batch[-1].seq))
            sent_after = batch[-1].seq
            return True

        def on_xread(reply: Any) -> bool:
            """Deliver an XREAD reply that follows on in this epoch, from the transport's
            callback; anything else (none, an error, a new epoch) is left to the loop."""
            if reply.__class__ is not list or self._health == "closed" or task.cancelling():
                return False
            try:
                batch = [_entry(item) for item in reply[0][1]]
            except (IndexError, KeyError, TypeError, ValueError):
                return False  # not an XREAD reply: the loop's parse raises it
            try:
                if not read_on(batch):
                    return False
            except RedisConnectionError:
                return False  # the loop finds the lost connection and reads on from last
            watchdog.since = loop.time()
            counted(batch)
            for entry in batch:
                advance(entry)
                deliver(entry)  # type: ignore[misc]  # set when on_xread is
            return True

        fast = on_xread if deliver is not None and isinstance(tc, HiredisTailConnection) else None
        self._stats["tails"] += 1
        try:
            while self._client is not None and self._health != "closed":
                try:
                    if use_script:
                        args = [secrets.token_hex(6), last, TAIL_CHUNK, epoch or ""]
                        async with asyncio.timeout(self.timeout + self.connect_timeout):
                            await tc.connect()
                            tc.send(_pack("EVALSHA", read_script.sha, 2, *self.keys, *args))
                            try:
                                raw = await tc.reply()
                            except NoScriptError:  # a restarted Redis without its scripts
                                tc.send(_pack("EVAL", read_script.script, 2, *self.keys, *args))
                                raw = await tc.reply()
                        chunk = self._read_result(raw, last, epoch)
                        if epoch is not None and chunk.epoch != epoch:
                            logger.warning(
                                "event log tail on %s: epoch %s -> %s after seq %d; "
                                "following the new epoch from its oldest entry",
                                self.where,
                                epoch,
                                chunk.epoch,
                                last,
                            )
                            last = 0
                        epoch = chunk.epoch
                        batch = chunk.entries
                        use_script = len(batch) == TAIL_CHUNK
                    else:
                        watchdog.since = loop.time()
                        try:
                            if sent_after != last:
                                tc.send(xread_after(last))
                                sent_after = last
                            tc.fast = fast
                            try:
                                reply: Any = await tc.reply()
                            finally:
                                tc.fast = None
                            sent_after = -1  # that reply answered the request in flight
                            batch = [_entry(item) for item in reply[0][1]] if reply else []
                            use_script = not batch
                            if read_on(batch):
                                await tc.flush()
                        except asyncio.CancelledError:
                            if watchdog.expired():
                                raise TimeoutError(
                                    f"no answer to XREAD within {watchdog.limit:g}s"
                                ) from None
                            raise
                        finally:
                            watchdog.since = None
                    if batch:
                        counted(batch)
                except _DOWN_ERRORS as exc:
                    sent_after = -1  # the connection is dropped with any request on it
                    await self._drop_tail(tc)
                    stalled = isinstance(exc, RedisTimeoutError | asyncio.TimeoutError)
                    self._stats["tail_stalls" if stalled else "tail_reconnects"] += 1
                    logger.warning(
                        "event log tail on %s %s after seq %d (%s: %s); reading on from there",
                        self.where,
                        "stalled" if stalled else "lost its connection",
                        last,
                        type(exc).__name__,
                        exc,
                    )
                    self._probe()
                    use_script = True
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff_max)
                    continue
                except RedisError as exc:
                    sent_after = -1
                    await self._drop_tail(tc)
                    self._stats["tail_errors"] += 1
                    logger.error("event log tail on %s failed: %s; retrying", self.where, exc)
                    use_script = True
                    await asyncio.sleep(delay * random.uniform(0.5, 1.0))
                    delay = min(delay * 2, self.backoff_max)
                    continue
                if task.cancelling():
                    # cancelled, but a library swallowed the CancelledError: end anyway
                    raise asyncio.CancelledError
                delay = self.backoff
                for entry in batch:
                    if entry.epoch != epoch:
                        use_script = True  # a newer epoch's entry reached XREAD
                        break
                    advance(entry)
                    yield entry
        finally:
            watchdog.close()
            self._stats["tails"] -= 1
            await self._drop_tail(tc)
            await client.connection_pool.release(tc.conn)
            await client.aclose()
