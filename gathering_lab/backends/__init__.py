"""Event log backends, picked by URL: where the bus numbers and keeps its events.

::

    from gathering_lab.backends import open_log

    async with open_log("redis://127.0.0.1:6379/0") as log:
        seq, epoch = await log.append(b'{"type": "agent.started", ...}')
        chunk = await log.read(after_seq=0, count=100)

``memory://`` (or ``memory://NAME`` to share one log between handles in this process)
needs nothing else; ``redis://host:port/db`` and ``rediss://`` (TLS) need the ``redis``
extra (``pip install 'gathering-lab[redis]'``), imported only when such a URL is opened.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from .base import EventLog, Health, LogEntry, LogInfo, ReadResult

__all__ = ["SCHEMES", "EventLog", "Health", "LogEntry", "LogInfo", "ReadResult", "open_log"]

#: The URL schemes :func:`open_log` knows.
SCHEMES = ("memory", "redis", "rediss")


def open_log(url: str, **options: Any) -> EventLog:
    """Return an unconnected event log backend for ``url`` (``options`` go to its class).

    Raises ValueError for a URL whose scheme is not one of :data:`SCHEMES`, and
    ImportError (with the install command) if the redis client is not installed.
    """
    if not isinstance(url, str):
        raise TypeError(f"url must be a string, not {type(url).__name__}")
    scheme = urlsplit(url).scheme.lower() if "://" in url else ""
    if scheme == "memory":
        from .memory import MemoryLog

        return MemoryLog(url.split("://", 1)[1].strip("/"), **options)
    if scheme in ("redis", "rediss"):
        try:
            from .redis import RedisLog
        except ImportError as exc:
            raise ImportError(
                f"the redis bus needs the redis client ({exc}); pip install 'gathering-lab[redis]'"
            ) from None
        return RedisLog(url, **options)
    raise ValueError(
        f"unknown bus url {url!r}: use memory://, redis://host:port/db or rediss://host:port/db"
    )
