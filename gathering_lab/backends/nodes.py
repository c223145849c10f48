"""The live nodes of a cluster and their figures, for the cluster-wide stats.

Each node on a Redis log reports its figures every ``interval`` seconds (default 2) into
a key with a TTL (``ttl``, default 3 intervals) in the log's hash-tagged key family::

    {gathering-lab:NAME}:node:<id>   JSON report (this node's figures and some clients), PX ttl
    {gathering-lab:NAME}:nodes       sorted set: node id -> time of its last report (ms,
                                     Redis's clock); trimmed by every report, PX ttl

A node that stops reporting (killed, or cut off from Redis) drops out when its key
expires; a node closed cleanly removes its key at once. Reporting runs in a background
task, never on the delivery path; the reports of the other nodes are read (at most
:data:`MAX_NODES`, within ``read_timeout``) when the stats are asked for, and once per
interval for :meth:`Nodes.cached`. With any other bus there is one node: this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

__all__ = [
    "GUIDE_SUMS",
    "MAX_NODES",
    "MAX_REPORTED_CLIENTS",
    "REPORT_INTERVAL",
    "Nodes",
    "RedisNodes",
    "check_timing",
    "cluster_stats",
    "node_entry",
    "node_id",
    "nodes_for",
]

logger = logging.getLogger("gathering_lab.backends.nodes")

#: Seconds between two reports of a node.
REPORT_INTERVAL = 2.0
#: A report lives this many intervals: a node that stops reporting drops out after it.
TTL_INTERVALS = 3
#: The shortest and longest report interval (and TTL) accepted, in seconds.
MIN_REPORT_INTERVAL = 0.05
MAX_REPORT_INTERVAL = 3600.0
#: At most this many nodes are read for the stats.
MAX_NODES = 256
#: A node's report carries at most this many of its clients (the rest are counted).
MAX_REPORTED_CLIENTS = 1000
#: The guide's figures that are summed over the live nodes.
GUIDE_SUMS = ("active_connections", "total_connections", "total_messages_sent", "total_broadcasts")

# KEYS: node key, index. ARGV: node id, report, ttl (ms). Returns Redis's time (ms).
REPORT_LUA = """
local t = redis.call('time')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[3])
redis.call('set', KEYS[1], ARGV[2], 'PX', ttl)
redis.call('zadd', KEYS[2], now, ARGV[1])
redis.call('zremrangebyscore', KEYS[2], '-inf', now - ttl)
redis.call('pexpire', KEYS[2], ttl)
return now
"""


def check_timing(
    interval: float = REPORT_INTERVAL, ttl: float | None = None
) -> tuple[float, float]:
    """The report interval and TTL in seconds (TTL default: :data:`TTL_INTERVALS` intervals).

    Raises ValueError naming the value when either is not a number from
    :data:`MIN_REPORT_INTERVAL` to :data:`MAX_REPORT_INTERVAL` seconds, or when the TTL
    does not exceed the interval (a live node's report would expire between two reports).
    """
    for label, value in (("report interval", interval), ("report ttl", ttl)):
        if value is None:
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise ValueError(f"node {label} must be a number of seconds, not {value!r}")
        if not MIN_REPORT_INTERVAL <= value <= MAX_REPORT_INTERVAL:
            raise ValueError(
                f"node {label} {value!r} is out of range: {MIN_REPORT_INTERVAL:g} to "
                f"{MAX_REPORT_INTERVAL:g} seconds"
            )
    interval = float(interval)
    ttl = float(ttl) if ttl is not None else interval * TTL_INTERVALS
    if ttl <= interval:
        raise ValueError(
            f"node report ttl {ttl:g}s must exceed the report interval {interval:g}s "
            "(a live node would drop out between two reports)"
        )
    return interval, ttl


def node_id(port: int) -> str:
    """A readable id for this process's server on ``port``: ``host-pid-port``."""
    return f"{socket.gethostname()}-{os.getpid()}-{port}"


def node_entry(node: str, address: str, stats: dict[str, Any]) -> dict[str, Any]:
    """One node's line in ``nodes``, from its local stats."""
    bus = stats.get("bus") or {}
    return {
        "id": node,
        "address": address,
        "connections": stats.get("active_connections", 0),
        "total_connections": stats.get("total_connections", 0),
        "messages_sent": stats.get("total_messages_sent", 0),
        "broadcasts": stats.get("total_broadcasts", 0),
        "drops": stats.get("messages_dropped", 0),
        "slow_consumers_closed": stats.get("slow_consumers_closed", 0),
        "rejected_connections": stats.get("rejected_connections", 0),
        "last_seq": bus.get("last_seq", 0),
        "health": bus.get("health", "ok"),
        "reported_at": time.time(),
    }


class Nodes:
    """This node alone (a bus not on a shared Redis log): the stats are this node's."""

    #: True when the figures are summed over several nodes.
    shared = False

    def __init__(
        self,
        node: str,
        address: str,
        figures: Callable[[], dict[str, Any]],
        *,
        interval: float = REPORT_INTERVAL,
        ttl: float | None = None,
    ) -> None:
        self.id = node
        self.address = address
        self.figures = figures
        self.interval, self.ttl = check_timing(interval, ttl)
        self.reports = 0
        self.report_failures = 0
        self.read_failures = 0
        #: Why the last report failed (None once one succeeds again).
        self.report_error: str | None = None
        self._cached: list[dict[str, Any]] = []

    async def start(self) -> None:
        """Start reporting (nothing to do for a single node)."""

    def stop(self) -> None:
        """Stop reporting (synchronous; :meth:`close` also removes this node's report)."""

    async def close(self) -> None:
        """Stop reporting and remove this node's report."""

    async def peers(self) -> list[dict[str, Any]]:
        """The other live nodes' reports (none for a single node)."""
        return []

    def cached(self) -> list[dict[str, Any]]:
        """The other nodes' reports as last read (at most one interval old)."""
        return list(self._cached)

    def info(self) -> dict[str, Any]:
        """How the reporting goes, for the stats' ``cluster`` key."""
        return {
            "shared": self.shared,
            "report_interval": self.interval,
            "report_ttl": self.ttl,
            "reports": self.reports,
            "report_failures": self.report_failures,
            "read_failures": self.read_failures,
            "report_error": self.report_error,
        }


class RedisNodes(Nodes):
    """This node and the others reporting to the same Redis log (see the module docstring).

    ``interval`` seconds between reports; a report lives ``ttl`` seconds (default three
    intervals); the others' reports are read within ``read_timeout`` seconds.
    """

    shared = True

    def __init__(
        self,
        url: str,
        name: str,
        node: str,
        address: str,
        figures: Callable[[], dict[str, Any]],
        *,
        interval: float = REPORT_INTERVAL,
        ttl: float | None = None,
        read_timeout: float = 1.0,
    ) -> None:
        super().__init__(node, address, figures, interval=interval, ttl=ttl)
        if (
            not isinstance(read_timeout, int | float)
            or isinstance(read_timeout, bool)
            or read_timeout <= 0
        ):
            raise ValueError(
                f"read_timeout must be a positive number of seconds, not {read_timeout!r}"
            )
        self.url = url
        self.read_timeout = read_timeout
        family = f"{{gathering-lab:{name}}}"
        self.prefix = f"{family}:node:"
        self.index = f"{family}:nodes"
        self._client: Any = None
        self._task: asyncio.Task[None] | None = None
        self._failing = False

    async def start(self) -> None:
        """Report once now (a failure is logged, not raised), then every ``interval``."""
        if self._task is not None:
            return
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        from .redis import _keepalive_options

        # No socket_timeout (see redis.py): every call is bounded with asyncio.timeout.
        pool = aioredis.BlockingConnectionPool.from_url(
            self.url,
            max_connections=4,
            timeout=None,
            client_name=f"gathering-lab-node:{self.id}",
            socket_connect_timeout=self.read_timeout * 2,
            socket_keepalive=True,
            socket_keepalive_options=_keepalive_options(),
            retry=Retry(NoBackoff(), 0),
            protocol=2,
        )
        self._client = aioredis.Redis.from_pool(pool)
        self._script = self._client.register_script(REPORT_LUA)
        await self._tick()
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name=f"gathering-lab node report {self.id}"
        )

    def stop(self) -> None:
        """Stop reporting: the report expires after ``ttl`` unless :meth:`close` removes it."""
        if self._task is not None:
            self._task.cancel()

    async def close(self) -> None:
        """Stop reporting, remove this node's report (bounded) and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        client, self._client = self._client, None
        if client is None:
            return
        try:
            async with asyncio.timeout(self.read_timeout):
                await client.delete(self.prefix + self.id)
                await client.zrem(self.index, self.id)
        except Exception as exc:  # noqa: BLE001 - Redis down: the report expires by itself
            logger.info("could not remove node %s's report (%s); it expires", self.id, exc)
        await client.aclose()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._tick()

    async def _tick(self) -> None:
        """Report, then refresh the cache of the others' reports."""
        await self.report()
        try:
            self._cached = await self.peers()
        except Exception:  # noqa: BLE001 - counted in read_failures; others unknown meanwhile
            self._cached = []

    async def report(self) -> None:
        """Write this node's report with its TTL; failures are logged (once) and counted."""
        stats = self.figures()
        clients = list(stats.get("clients", ()))
        entry = node_entry(self.id, self.address, stats)
        entry["clients_not_reported"] = max(0, len(clients) - MAX_REPORTED_CLIENTS)
        body = json.dumps(
            {"node": entry, "clients": clients[:MAX_REPORTED_CLIENTS]},
            separators=(",", ":"),
            default=str,
        )
        try:
            async with asyncio.timeout(self.read_timeout * 2):
                await self._script(
                    keys=[self.prefix + self.id, self.index],
                    args=[self.id, body, int(self.ttl * 1000)],
                    client=self._client,
                )
        except Exception as exc:  # noqa: BLE001 - any failure: counted, logged, retried
            self.report_failures += 1
            self.report_error = f"{type(exc).__name__}: {exc}"
            if not self._failing:
                logger.warning(
                    "node %s cannot report its figures to redis (%s); retrying every %gs",
                    self.id,
                    self.report_error,
                    self.interval,
                )
            self._failing = True
            return
        if self._failing:
            logger.warning("node %s reports its figures to redis again", self.id)
        self._failing = False
        self.report_error = None
        self.reports += 1

    async def peers(self) -> list[dict[str, Any]]:
        """The other live nodes' reports (at most MAX_NODES), read within ``read_timeout``.

        Raises what Redis raised (counted in ``read_failures``) if they cannot be read.
        """
        if self._client is None:
            return []
        try:
            async with asyncio.timeout(self.read_timeout):
                members = await self._client.zrevrange(
                    self.index, 0, MAX_NODES - 1, withscores=True
                )
                ids = [m.decode() if isinstance(m, bytes) else str(m) for m, _ in members]
                others = [
                    (i, score) for i, (_, score) in zip(ids, members, strict=True) if i != self.id
                ]
                keys = [self.prefix + i for i, _ in others]
                raws = await self._client.mget(keys) if keys else []
        except Exception:
            self.read_failures += 1
            raise
        reports = []
        for (_, score), raw in zip(others, raws, strict=True):
            if raw is None:  # expired: that node stopped reporting
                continue
            try:
                report = json.loads(raw)
                report["node"]["reported_at"] = score / 1000
            except (ValueError, TypeError, KeyError) as exc:
                self.read_failures += 1
                logger.warning("skipped a node report that is not valid: %s", exc)
                continue
            reports.append(report)
        return reports


def nodes_for(
    bus: Any, port: int, host: str, figures: Callable[[], dict[str, Any]], **options: Any
) -> Nodes:
    """The :class:`Nodes` of a server on ``bus``: :class:`RedisNodes` when its bus is on a
    Redis log (``options`` go to it), else this node alone (``interval`` and ``ttl`` of
    ``options`` are then only checked and shown)."""
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    log = getattr(bus, "log", None)
    if log is not None and getattr(log, "scheme", "") == "redis":
        return RedisNodes(log.url, log.name, node_id(port), address, figures, **options)
    timing = {k: v for k, v in options.items() if k in ("interval", "ttl")}
    return Nodes(node_id(port), address, figures, **timing)


def cluster_stats(
    local: dict[str, Any], nodes: Nodes, peers: list[dict[str, Any]], error: str | None = None
) -> dict[str, Any]:
    """``local`` (this node's stats) with the guide's figures summed over ``peers`` too,
    ``nodes`` (one entry per live node, this one first), this node's under ``node`` and
    the reporting's state under ``cluster``."""
    own = node_entry(nodes.id, nodes.address, local)
    stats = dict(local)
    stats["node"] = own
    stats["nodes"] = [own] + [report["node"] for report in peers]
    if nodes.shared:
        fields = ("connections", "total_connections", "messages_sent", "broadcasts")
        for key, field in zip(GUIDE_SUMS, fields, strict=True):
            stats[key] = local.get(key, 0) + sum(int(r["node"].get(field, 0)) for r in peers)
        clients = [{**c, "node": nodes.id} for c in local.get("clients", ())]
        for report in peers:
            node = report["node"].get("id")
            clients.extend({**c, "node": node} for c in report.get("clients", ()))
        stats["clients"] = clients
    info = nodes.info()
    info["nodes_live"] = len(stats["nodes"])
    if error is not None:
        info["read_error"] = error
    stats["cluster"] = info
    return stats
