"""An event log held in this process (``memory://``): the zero-set-up default.

``memory://`` opens a private log; ``memory://NAME`` opens the log called NAME in this
process, shared by every backend opened with that name while one of them is alive (so
two servers in one process, e.g. in tests, can share one log like two nodes share Redis).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

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

__all__ = ["MemoryLog"]

logger = logging.getLogger("gathering_lab.backends.memory")

DEFAULT_MAXLEN = 10_000


class _Store:
    """The entries and numbering one or more :class:`MemoryLog` handles share."""

    def __init__(self, maxlen: int) -> None:
        self.entries: deque[LogEntry] = deque(maxlen=maxlen)
        self.epoch = secrets.token_hex(6)
        self.last_seq = 0
        self.changed = asyncio.Condition()

    def oldest_seq(self) -> int:
        return self.entries[0].seq if self.entries else self.last_seq + 1


_named: weakref.WeakValueDictionary[str, _Store] = weakref.WeakValueDictionary()


class MemoryLog(EventLog):
    """A bounded log in this process, keeping the last ``maxlen`` entries."""

    scheme = "memory"

    def __init__(self, name: str = "", *, maxlen: int = DEFAULT_MAXLEN) -> None:
        if not isinstance(maxlen, int) or isinstance(maxlen, bool) or maxlen < 1:
            raise ValueError(f"maxlen must be a positive integer, not {maxlen!r}")
        self.name = name
        store = _named.get(name) if name else None
        if store is None:
            store = _Store(maxlen)
            if name:
                _named[name] = store
        self._store = store
        self._open = False
        self._appended = 0
        self._tail_gaps = 0
        self._tails = 0

    async def connect(self) -> None:
        """Open the log (nothing to reach)."""
        self._open = True

    async def close(self) -> None:
        """Close this handle; tails end at their next wake-up."""
        self._open = False
        async with self._store.changed:
            self._store.changed.notify_all()

    def _check_open(self) -> None:
        if not self._open:
            raise RuntimeError("the memory log is closed; call connect() first")

    async def append(self, payload: bytes) -> tuple[int, str]:
        """Append one envelope; return its ``(seq, epoch)``."""
        return (await self.append_many([check_payload(payload)]))[0]

    async def append_many(
        self, payloads: Sequence[bytes], tokens: Sequence[bytes] | None = None
    ) -> list[tuple[int, str]]:
        """Append envelopes in order, with consecutive ``seq``; return each ``(seq, epoch)``."""
        checked, tokens = check_batch(payloads, tokens)
        self._check_open()
        store = self._store
        numbered = []
        for index, payload in enumerate(checked):
            store.last_seq += 1
            token = tokens[index] if tokens is not None else b""
            store.entries.append(LogEntry(store.last_seq, store.epoch, payload, token))
            numbered.append((store.last_seq, store.epoch))
        self._appended += len(checked)
        if checked:
            async with store.changed:
                store.changed.notify_all()
        return numbered

    async def read(self, after_seq: int, count: int, epoch: str | None = None) -> ReadResult:
        """Return at most ``count`` entries after ``after_seq`` (see :class:`ReadResult`)."""
        check_read_args(after_seq, count)
        self._check_open()
        store = self._store
        oldest = store.oldest_seq()
        gap = is_gap(after_seq, epoch, store.epoch, store.last_seq, oldest)
        if epoch is not None and epoch != store.epoch:
            after_seq = 0
        start = max(0, after_seq + 1 - oldest)
        entries = [store.entries[i] for i in range(start, min(len(store.entries), start + count))]
        return ReadResult(entries, store.epoch, store.last_seq, oldest, gap)

    async def tail(
        self,
        after_seq: int,
        epoch: str | None = None,
        deliver: Callable[[LogEntry], None] | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Yield every entry after ``after_seq`` as it is appended, until the log is closed.

        ``deliver`` is accepted for the interface and not used: every entry is yielded.
        """
        del deliver
        check_read_args(after_seq, 1)
        self._check_open()
        store = self._store
        last = after_seq if epoch in (None, store.epoch) else 0
        self._tails += 1
        try:
            while self._open:
                chunk = await self.read(last, 512)
                if chunk.entries:
                    if chunk.entries[0].seq > last + 1:
                        self._tail_gaps += 1
                        logger.warning(
                            "memory log tail fell behind: entries %d..%d were trimmed",
                            last + 1,
                            chunk.entries[0].seq - 1,
                        )
                    for entry in chunk.entries:
                        last = entry.seq
                        yield entry
                    continue
                async with store.changed:
                    if store.last_seq <= last and self._open:
                        await store.changed.wait()
        finally:
            self._tails -= 1

    async def info(self) -> LogInfo:
        """Return what the log holds and this handle's counters."""
        store = self._store
        return LogInfo(
            last_seq=store.last_seq,
            oldest_seq=store.oldest_seq(),
            epoch=store.epoch,
            length=len(store.entries),
            health=self.health,
            stats=self.stats(),
        )

    def stats(self) -> dict[str, Any]:
        """This handle's counters."""
        return {"appended": self._appended, "tails": self._tails, "tail_gaps": self._tail_gaps}

    @property
    def health(self) -> Health:
        """``ok`` while open, else ``closed``."""
        return "ok" if self._open else "closed"

    def __repr__(self) -> str:
        name = f" {self.name!r}" if self.name else ""
        return f"<MemoryLog{name} epoch={self._store.epoch} seq={self._store.last_seq}>"
