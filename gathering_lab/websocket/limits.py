"""Admission control and rate limits, as plain bookkeeping (no sockets, no clock of their own).

The server feeds these classes what happens (a socket accepted, a request read, a WebSocket
upgrade asked for, a socket closed, a message received at time ``now``) and acts on their
answers (abort this socket, refuse with 503, answer ``rate_limited``, wait this long):

- :class:`Admission` counts TCP sockets from ``accept()``, total and per IP address, so
  half-sent handshakes are counted too. It caps WebSocket clients (``max_connections``,
  ``max_connections_per_ip``) and caps sockets a little above that (``headroom``) so that
  ``/health`` and the 503 answers always find a descriptor: at the socket cap, the oldest
  socket that has not sent a complete request yet (a slowloris) makes room for the new one.
- :class:`TokenBucket` paces one client's publishes (``take``: refuse the excess) and all of
  its messages (``reserve``: read the next one later).
- :class:`LogThrottle` turns a burst of identical warnings into one line per interval.
- :class:`TrustedProxies` says which peers are reverse proxies whose ``X-Forwarded-For``
  names the client; the per-IP limits then count that client, not the proxy.
"""

from __future__ import annotations

import ipaddress
import math
import os
import resource
from collections.abc import Hashable, Iterable
from typing import Any

__all__ = [
    "DEFAULT_MAX_CONNECTIONS_PER_IP",
    "DEFAULT_OPEN_TIMEOUT",
    "DEFAULT_PUBLISH_BURST",
    "DEFAULT_PUBLISH_RATE",
    "DESCRIPTOR_RESERVE",
    "MESSAGE_RATE_FACTOR",
    "Admission",
    "ClientLimits",
    "LogThrottle",
    "RateLimits",
    "TokenBucket",
    "TrustedProxies",
    "default_max_connections",
    "descriptor_limit",
    "open_descriptors",
    "socket_headroom",
]

#: WebSocket clients from one IP address. Loopback counts too: behind a reverse proxy every
#: client comes from the proxy's address, so name the proxy (``trusted_proxies``) or pass 0
#: (no per-IP limit) there.
DEFAULT_MAX_CONNECTIONS_PER_IP = 256
#: Sustained publishes per second per connection, and the burst allowed above it.
DEFAULT_PUBLISH_RATE = 500.0
DEFAULT_PUBLISH_BURST = 1000
#: All messages (publish, ping, subscribe, ...) are read at up to this many times the
#: publish rate and burst; past that the server reads the client's next message later.
MESSAGE_RATE_FACTOR = 2
#: Seconds a TCP connection may take to complete its WebSocket handshake (websockets' default).
DEFAULT_OPEN_TIMEOUT = 10.0
#: Descriptors kept for what is not a client socket: the listening sockets, stdio, log files,
#: the event loop's selector, a Redis connection pool, and whatever the process opens later.
DESCRIPTOR_RESERVE = 32
#: Bound on the default when the descriptor limit is unlimited.
_UNLIMITED_SOCKETS = 2**20

REASONS = ("max_connections", "max_connections_per_ip", "max_sockets")


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE of this process (a large number when unlimited)."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return _UNLIMITED_SOCKETS
    return int(soft)


def open_descriptors() -> int:
    """How many descriptors this process has open now (0 if the platform cannot tell)."""
    for path in ("/proc/self/fd", "/dev/fd"):
        try:
            return len(os.listdir(path))
        except OSError:
            continue
    return 0


def socket_headroom(max_connections: int) -> int:
    """Sockets allowed above ``max_connections``: room for ``/health`` and for 503 answers."""
    return max(8, min(64, max_connections // 16))


def default_max_connections(soft_limit: int, open_now: int) -> int:
    """The default ``max_connections`` for a descriptor limit and the descriptors open now.

    What is left after ``open_now`` and :data:`DESCRIPTOR_RESERVE`, less the socket headroom,
    so that WebSocket clients, half-open handshakes and ``/health`` together stay under the
    limit and ``accept()`` never fails with EMFILE. At least 1.
    """
    sockets = min(soft_limit, _UNLIMITED_SOCKETS) - open_now - DESCRIPTOR_RESERVE
    best = 1
    # The largest n with n + headroom(n) <= sockets (headroom grows with n: search).
    low, high = 1, max(1, sockets)
    while low <= high:
        mid = (low + high) // 2
        if mid + socket_headroom(mid) <= sockets:
            best, low = mid, mid + 1
        else:
            high = mid - 1
    return best


class TrustedProxies:
    """The reverse proxies whose ``X-Forwarded-For`` header is believed.

    ``proxies`` are IP addresses or networks (``127.0.0.1``, ``10.0.0.0/8``, ``::1``).
    From a peer among them, the client is the rightmost address of ``X-Forwarded-For``
    that is not itself a trusted proxy: the one the outermost trusted proxy saw, which a
    client cannot forge (what it sends itself ends up further left). From any other
    peer, or without a usable header, the client is the peer.
    """

    def __init__(self, proxies: Iterable[str] = ()) -> None:
        if isinstance(proxies, str):
            raise TypeError("trusted_proxies must be a list of addresses, not a string")
        networks = []
        for proxy in proxies:
            try:
                networks.append(ipaddress.ip_network(str(proxy).strip(), strict=False))
            except ValueError:
                raise ValueError(
                    f"trusted_proxies: {proxy!r} is not an IP address or network "
                    "(e.g. 127.0.0.1, 10.0.0.0/8, ::1)"
                ) from None
        self.networks = tuple(networks)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, ip: object) -> bool:
        if not self.networks or not isinstance(ip, str):
            return False
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:a.b.c.d on a dual-stack socket
        return any(a in n for n in self.networks for a in (address, mapped) if a is not None)

    def client(self, peer: str, forwarded_for: Iterable[str]) -> str:
        """The client's address for a connection from ``peer`` with these header values."""
        if peer not in self:
            return peer
        hops = [hop.strip() for value in forwarded_for for hop in value.split(",")]
        for hop in reversed(hops):
            try:
                address = str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # not an address where the proxy should have put one
            if address not in self:
                return address
        return peer

    def to_list(self) -> list[str]:
        """The proxies, as given (normalised), for the stats."""
        return [str(network) for network in self.networks]


class Admission:
    """Counts of sockets and WebSocket clients, total and per IP, and who may come in.

    Keys are opaque (the server uses its connection objects). Call :meth:`opened` at
    ``accept()``, :meth:`requested` when the socket's HTTP request is complete,
    :meth:`admit` for a WebSocket upgrade, and :meth:`closed` when the socket is gone.
    ``max_connections_per_ip=None`` means no per-IP limit.
    """

    def __init__(
        self,
        max_connections: int,
        max_connections_per_ip: int | None = DEFAULT_MAX_CONNECTIONS_PER_IP,
        headroom: int | None = None,
        trusted_proxies: TrustedProxies | None = None,
    ) -> None:
        if not isinstance(max_connections, int) or max_connections < 1:
            raise ValueError(f"max_connections must be an int >= 1, not {max_connections!r}")
        if max_connections_per_ip is not None and (
            not isinstance(max_connections_per_ip, int) or max_connections_per_ip < 1
        ):
            raise ValueError(
                "max_connections_per_ip must be an int >= 1 or None (no limit), "
                f"not {max_connections_per_ip!r}"
            )
        self.max_connections = max_connections
        self.max_connections_per_ip = max_connections_per_ip
        self.headroom = socket_headroom(max_connections) if headroom is None else headroom
        self.max_sockets = max_connections + self.headroom
        self.max_sockets_per_ip = (
            None if max_connections_per_ip is None else max_connections_per_ip + self.headroom
        )
        self.trusted_proxies = trusted_proxies if trusted_proxies is not None else TrustedProxies()
        self._ip: dict[Hashable, str] = {}  # every counted socket -> its address
        self._client_ip: dict[Hashable, str] = {}  # admitted WebSocket -> its client's address
        self._pending: dict[Hashable, None] = {}  # no complete request yet, oldest first
        self._pending_per_ip: dict[str, dict[Hashable, None]] = {}
        self._websockets: set[Hashable] = set()
        self._sockets_per_ip: dict[str, int] = {}
        self._websockets_per_ip: dict[str, int] = {}
        self.rejected: dict[str, int] = dict.fromkeys(REASONS, 0)
        self.handshakes_evicted = 0

    # Events

    def opened(self, key: Hashable, ip: str) -> tuple[bool, list[Hashable]]:
        """A socket was accepted: return (keep it?, older sockets to abort to make room).

        At a socket cap (total, or this IP's) the oldest socket still waiting for its
        request (of this IP, for the per-IP cap) is given up for the new one; when every
        socket has sent its request, the new one is refused instead (``max_sockets``).
        """
        victim: Hashable | None = None
        # A trusted proxy carries many clients: they are counted per client at admit().
        ip_cap = None if ip in self.trusted_proxies else self.max_sockets_per_ip
        if ip_cap is not None and self._sockets_per_ip.get(ip, 0) >= ip_cap:
            victim = next(iter(self._pending_per_ip.get(ip, ())), None)
        elif len(self._ip) >= self.max_sockets:
            victim = next(iter(self._pending), None)
        else:
            victim = key  # room: nobody is evicted
        if victim is None:
            self.rejected["max_sockets"] += 1
            return False, []
        evict: list[Hashable] = []
        if victim is not key:
            self._forget(victim)
            self.handshakes_evicted += 1
            evict.append(victim)
        self._ip[key] = ip
        self._pending[key] = None
        self._pending_per_ip.setdefault(ip, {})[key] = None
        self._sockets_per_ip[ip] = self._sockets_per_ip.get(ip, 0) + 1
        return True, evict

    def requested(self, key: Hashable) -> None:
        """The socket's HTTP request is complete: it is no longer a handshake to evict."""
        if self._pending.pop(key, 0) is None:
            self._unpend(key, self._ip[key])

    def _unpend(self, key: Hashable, ip: str) -> None:
        mine = self._pending_per_ip.get(ip)
        if mine is not None:
            mine.pop(key, None)
            if not mine:
                del self._pending_per_ip[ip]

    def admit(self, key: Hashable, client_ip: str | None = None) -> str | None:
        """A WebSocket upgrade: None if admitted (counted until :meth:`closed`), else why not.

        ``client_ip`` is the client's address when it differs from the socket's (a trusted
        proxy's ``X-Forwarded-For``): the per-IP limit counts it.
        """
        if key in self._websockets:
            return None
        ip = self._ip.get(key)
        if ip is None:  # refused at accept (counted there), or already closed
            return "max_sockets"
        client = client_ip or ip
        if len(self._websockets) >= self.max_connections:
            reason = "max_connections"
        elif (
            self.max_connections_per_ip is not None
            and self._websockets_per_ip.get(client, 0) >= self.max_connections_per_ip
        ):
            reason = "max_connections_per_ip"
        else:
            self.requested(key)
            self._websockets.add(key)
            self._client_ip[key] = client
            self._websockets_per_ip[client] = self._websockets_per_ip.get(client, 0) + 1
            return None
        self.rejected[reason] += 1
        return reason

    def closed(self, key: Hashable) -> None:
        """The socket is gone (idempotent; unknown keys are ignored)."""
        self._forget(key)

    def _forget(self, key: Hashable) -> None:
        ip = self._ip.pop(key, None)
        if ip is None:
            return
        if self._pending.pop(key, 0) is None:
            self._unpend(key, ip)
        _decrement(self._sockets_per_ip, ip)
        if key in self._websockets:
            self._websockets.discard(key)
            _decrement(self._websockets_per_ip, self._client_ip.pop(key, ip))

    # Figures

    @property
    def sockets(self) -> int:
        """Sockets counted now (WebSocket clients, handshakes, HTTP requests)."""
        return len(self._ip)

    @property
    def handshakes(self) -> int:
        """Sockets that have not sent a complete HTTP request yet."""
        return len(self._pending)

    @property
    def websockets(self) -> int:
        """Admitted WebSocket clients."""
        return len(self._websockets)

    def websockets_from(self, ip: str) -> int:
        """Admitted WebSocket clients from ``ip``."""
        return self._websockets_per_ip.get(ip, 0)

    def sockets_from(self, ip: str) -> int:
        """Sockets counted from ``ip``."""
        return self._sockets_per_ip.get(ip, 0)

    def to_dict(self) -> dict[str, Any]:
        """The admission figures for the stats."""
        return {
            "max_connections": self.max_connections,
            "max_connections_per_ip": self.max_connections_per_ip,
            "max_sockets": self.max_sockets,
            "sockets": self.sockets,
            "handshakes": self.handshakes,
            "websockets": self.websockets,
            "addresses": len(self._sockets_per_ip),
            "rejected": dict(self.rejected),
            "handshakes_evicted": self.handshakes_evicted,
            "trusted_proxies": self.trusted_proxies.to_list(),
        }


def _decrement(counts: dict[str, int], ip: str) -> None:
    left = counts.get(ip, 0) - 1
    if left > 0:
        counts[ip] = left
    else:
        counts.pop(ip, None)


class TokenBucket:
    """``rate`` tokens per second, at most ``burst`` saved up; starts full."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number > 0, not {rate!r}")
        if not (burst >= 1 and math.isfinite(burst)):
            raise ValueError(f"burst must be a finite number >= 1, not {burst!r}")
        self.rate = float(rate)
        self.burst = float(burst)
        self.tokens = float(burst)
        self.stamp = now

    def _refill(self, now: float) -> None:
        if now > self.stamp:
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False (nothing spent) if there is none."""
        self._refill(now)
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def wait(self, now: float) -> float:
        """Seconds until one token is there (0 if one is there now); nothing is spent."""
        self._refill(now)
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    def reserve(self, now: float) -> float:
        """Spend one token, in advance if need be: return the seconds to wait before using it."""
        self._refill(now)
        self.tokens -= 1
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class LogThrottle:
    """At most one report per ``interval`` seconds, with the count of the ones held back."""

    __slots__ = ("interval", "last", "suppressed")

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last: float | None = None
        self.suppressed = 0

    def ready(self, now: float) -> int | None:
        """None if this occurrence is held back, else how many were held back before it."""
        if self.last is not None and now - self.last < self.interval:
            self.suppressed += 1
            return None
        self.last = now
        held, self.suppressed = self.suppressed, 0
        return held


class ClientLimits:
    """One connection's rate limits and what they refused or delayed."""

    __slots__ = ("log", "messages", "messages_throttled", "publishes", "publishes_rate_limited")

    def __init__(
        self, publishes: TokenBucket | None, messages: TokenBucket | None, log_interval: float
    ) -> None:
        self.publishes = publishes
        self.messages = messages
        self.publishes_rate_limited = 0
        self.messages_throttled = 0
        self.log = LogThrottle(log_interval)

    def allow_publish(self, now: float) -> bool:
        """True if a publish may go out now; counts the refusals."""
        if self.publishes is None or self.publishes.take(now):
            return True
        self.publishes_rate_limited += 1
        return False

    def publish_wait(self, now: float) -> float:
        """Seconds until the next publish would be allowed (0 without a publish rate)."""
        return 0.0 if self.publishes is None else self.publishes.wait(now)

    def message_delay(self, now: float) -> float:
        """Seconds to wait before handling the message just received (0 under the rate)."""
        if self.messages is None:
            return 0.0
        delay = self.messages.reserve(now)
        if delay > 0:
            self.messages_throttled += 1
        return delay


class RateLimits:
    """A server's per-connection rates (0 = no limit); makes each client's buckets."""

    __slots__ = ("log_interval", "message_burst", "message_rate", "publish_burst", "publish_rate")

    def __init__(
        self,
        publish_rate: float = DEFAULT_PUBLISH_RATE,
        publish_burst: int = DEFAULT_PUBLISH_BURST,
        message_rate: float | None = None,
        message_burst: int | None = None,
        log_interval: float = 10.0,
    ) -> None:
        self.publish_rate = _rate("publish_rate", publish_rate)
        self.publish_burst = _count("publish_burst", publish_burst)
        self.message_rate = (
            MESSAGE_RATE_FACTOR * self.publish_rate
            if message_rate is None
            else _rate("message_rate", message_rate)
        )
        self.message_burst = (
            MESSAGE_RATE_FACTOR * self.publish_burst
            if message_burst is None
            else _count("message_burst", message_burst)
        )
        self.log_interval = log_interval

    def for_client(self, now: float) -> ClientLimits:
        """Fresh (full) buckets for a connection."""
        publishes = (
            TokenBucket(self.publish_rate, self.publish_burst, now) if self.publish_rate else None
        )
        messages = (
            TokenBucket(self.message_rate, self.message_burst, now) if self.message_rate else None
        )
        return ClientLimits(publishes, messages, self.log_interval)

    def to_dict(self) -> dict[str, Any]:
        """The rates for the stats."""
        return {
            "publish_rate": self.publish_rate,
            "publish_burst": self.publish_burst,
            "message_rate": self.message_rate,
            "message_burst": self.message_burst,
        }


def _rate(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < math.inf:
        raise ValueError(f"{name} must be a number >= 0 (0 = no limit), not {value!r}")
    return float(value)


def _count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, not {value!r}")
    return value
