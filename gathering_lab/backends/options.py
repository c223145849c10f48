"""The options a bus URL carries in its query string.

::

    redis://127.0.0.1:6379/0?maxlen=100000&delivery_timeout=5&name=orders

:func:`split_url` takes gathering-lab's own options out of the URL (:data:`LOG_OPTIONS`
go to the log backend, :data:`BUS_OPTIONS` to the :class:`~gathering_lab.backends.bus.LogBus`),
typed and range-checked, and leaves redis-py's own query options (``db``,
``health_check_interval``, ``client_name``, ``ssl_cert_reqs``, ...) in the URL for
:func:`redis.asyncio.ConnectionPool.from_url`, after checking them too. The options
gathering-lab sets itself for its guarantees (``socket_timeout``, ``retry_on_timeout``,
``protocol``, ...) are refused with the option to use instead. Every problem is a
ValueError with one lowercase line naming the option and its value.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qsl, quote, urlsplit, urlunsplit

__all__ = ["BUS_OPTIONS", "LOG_OPTIONS", "option_names", "split_url"]

#: Bounds of an option given in seconds.
MAX_SECONDS = 3600.0
#: Bounds of ``maxlen`` (entries the stream keeps).
MAX_MAXLEN = 1_000_000_000
#: Bounds of ``max_connections``.
MAX_CONNECTIONS = 10_000

_SECONDS = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m)?\s*$", re.IGNORECASE)
_SCALE = {None: 1.0, "s": 1.0, "ms": 1e-3, "m": 60.0}
_NAME = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")


def _seconds(name: str, text: str) -> float:
    match = _SECONDS.match(text)
    if match is None:
        raise ValueError(
            f"bus url option {name}={text!r} is not a number of seconds (e.g. 5, 2.5s, 500ms)"
        )
    value = float(match.group(1)) * _SCALE[match.group(2) and match.group(2).lower()]
    if not 0 < value <= MAX_SECONDS or not math.isfinite(value):
        raise ValueError(
            f"bus url option {name}={text!r} is out of range: more than 0, at most "
            f"{MAX_SECONDS:g} seconds"
        )
    return value


def _count(high: int) -> Callable[[str, str], int]:
    def parse(name: str, text: str) -> int:
        try:
            value = int(text.strip().replace("_", ""))
        except ValueError:
            raise ValueError(f"bus url option {name}={text!r} is not an integer") from None
        if not 1 <= value <= high:
            raise ValueError(f"bus url option {name}={text!r} is out of range: 1 to {high:,}")
        return value

    return parse


def _name(name: str, text: str) -> str:
    if _NAME.match(text) is None:
        raise ValueError(
            f"bus url option {name}={text!r} is not a valid log name: 1 to 100 letters, "
            "digits, '_', '.', ':' or '-'"
        )
    return text


#: The log backend's options (keywords of :class:`~gathering_lab.backends.redis.RedisLog`).
LOG_OPTIONS: dict[str, Callable[[str, str], Any]] = {
    "name": _name,
    "maxlen": _count(MAX_MAXLEN),
    "timeout": _seconds,
    "connect_timeout": _seconds,
    "block": _seconds,
    "backoff": _seconds,
    "backoff_max": _seconds,
    "max_connections": _count(MAX_CONNECTIONS),
}
#: The bus's options (keywords of :class:`~gathering_lab.backends.bus.LogBus`).
BUS_OPTIONS: dict[str, Callable[[str, str], Any]] = {"delivery_timeout": _seconds}

# redis-py query options gathering-lab sets itself: refused, with what to use instead.
_REFUSED = {
    "socket_timeout": "use timeout= (seconds per command; every call is bounded)",
    "socket_connect_timeout": "use connect_timeout=",
    "socket_keepalive": "tcp keepalive is always on",
    "retry_on_timeout": "appends are never retried blindly (one might land twice)",
    "protocol": "the log speaks resp2",
    "decode_responses": "the log reads raw replies",
    "legacy_responses": "the log reads raw replies",
}
# redis-py's string-valued connection options worth passing through (if this version has them).
_PASSED_STRINGS = (
    "username",
    "password",
    "client_name",
    "lib_name",
    "lib_version",
    "ssl_keyfile",
    "ssl_certfile",
    "ssl_cert_reqs",
    "ssl_ca_certs",
    "ssl_ca_data",
    "ssl_ca_path",
    "ssl_ciphers",
    "ssl_password",
)


def option_names() -> list[str]:
    """gathering-lab's own bus URL options, sorted."""
    return sorted({*LOG_OPTIONS, *BUS_OPTIONS})


def _redis_options(scheme: str) -> dict[str, Callable[[Any], Any] | None]:
    """redis-py's query options this URL may pass through: name -> its parser (None: a string)."""
    from redis.asyncio import connection

    classes = [connection.AbstractConnection, connection.Connection]
    if scheme == "rediss":
        classes.append(connection.SSLConnection)
    accepted: set[str] = set()
    for cls in classes:
        accepted.update(inspect.signature(cls.__init__).parameters)
    parsers = getattr(connection, "URL_QUERY_ARGUMENT_PARSERS", {})
    passed: dict[str, Callable[[Any], Any] | None] = {
        name: parser for name, parser in parsers.items() if name in accepted
    }
    passed.update({name: None for name in _PASSED_STRINGS if name in accepted})
    return passed


def split_url(url: str) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``url`` without gathering-lab's query options, the log's options and the bus's.

    redis-py's own query options stay in the URL once checked. Raises ValueError (one
    line naming the option and value) for an unknown option, one given twice, a value
    that is not a number or out of range, or one gathering-lab sets itself.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    log: dict[str, Any] = {}
    bus: dict[str, Any] = {}
    kept: list[tuple[str, str]] = []
    if not parts.query:
        return url, log, bus
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise ValueError(
            f"bus url query {parts.query!r} is not name=value pairs joined by '&'"
        ) from None
    redis_options = _redis_options(scheme) if scheme in ("redis", "rediss") else {}
    seen: set[str] = set()
    for name, value in pairs:
        if name in seen:
            raise ValueError(f"bus url option {name} is given twice")
        seen.add(name)
        if name in LOG_OPTIONS:
            log[name] = LOG_OPTIONS[name](name, value)
        elif name in BUS_OPTIONS:
            bus[name] = BUS_OPTIONS[name](name, value)
        elif name in _REFUSED:
            raise ValueError(
                f"bus url option {name}={value!r} is set by gathering-lab: " + _REFUSED[name]
            )
        elif name in redis_options:
            parser = redis_options[name]
            if parser is not None:
                try:
                    parser(value)
                except (TypeError, ValueError):
                    raise ValueError(
                        f"bus url option {name}={value!r} is not valid for redis-py"
                    ) from None
            kept.append((name, value))
        elif name.startswith("ssl_") and scheme == "redis":
            raise ValueError(f"bus url option {name}={value!r} needs a rediss:// (tls) url")
        else:
            passed = sorted(set(redis_options) - set(_REFUSED))
            hint = f"; or redis-py's {', '.join(passed)}" if passed else ""
            raise ValueError(
                f"unknown bus url option {name!r}: use {', '.join(option_names())}{hint}"
            )
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in kept)
    clean = urlunsplit((parts.scheme, parts.netloc, parts.path, query, parts.fragment))
    return clean, log, bus
