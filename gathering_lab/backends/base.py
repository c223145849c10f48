"""The interface of an event log backend, and the values it hands back.

An event log numbers every appended envelope with the next ``seq`` of its current
``epoch``, keeps the most recent ones, lets anyone read them back in bounded chunks, and
follows new ones as they arrive (:meth:`EventLog.tail`). Every node that opens the same
log sees the same entries in the same order with the same ``seq`` and ``epoch``.

``epoch`` names one run of the numbering: it changes only when the log lost its data
(for Redis: its data was flushed or lost in a restart without persistence, or the stream
vanished while its metadata stayed), and ``seq`` starts again at 1 in the new epoch.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

__all__ = ["EventLog", "Health", "LogEntry", "LogInfo", "ReadResult"]

#: ``ok``: the log answers; ``degraded``: it cannot be reached and the backend is
#: reconnecting (appends raise :class:`~gathering_lab.exceptions.BackendUnavailable`);
#: ``closed``: :meth:`EventLog.close` was called (or :meth:`EventLog.connect` never was).
Health = Literal["ok", "degraded", "closed"]


class LogEntry(NamedTuple):
    """One entry of the log: its ``seq``, the ``epoch`` it was numbered in, its payload.

    ``token`` is what the appender passed with it to :meth:`EventLog.append_many` (``b""``
    if nothing): how a node recognises its own entries when its tail delivers them.
    """

    seq: int
    epoch: str
    payload: bytes
    token: bytes = b""


@dataclass(frozen=True, slots=True)
class ReadResult:
    """A bounded chunk of the log read after some ``seq``, and the log's state at that moment.

    ``gap`` is true when entries after the asked ``seq`` are no longer in the log: the
    oldest kept entry is past ``after_seq + 1`` (trimmed), the caller's epoch is not the
    log's, or ``after_seq`` is beyond the log's last ``seq`` (the log lost its tail).
    ``entries`` then starts at the oldest entry kept.
    """

    entries: list[LogEntry]
    epoch: str
    last_seq: int
    oldest_seq: int
    gap: bool


@dataclass(frozen=True, slots=True)
class LogInfo:
    """What a log holds right now (``oldest_seq`` is ``last_seq + 1`` when it is empty).

    When the backend is ``degraded`` the figures are the last ones it knew, and
    ``stats`` holds its counters (appends, refusals, reconnects, listener stalls, ...).
    """

    last_seq: int
    oldest_seq: int
    epoch: str
    length: int
    health: Health
    stats: dict[str, Any]


class EventLog(abc.ABC):
    """A shared, numbered, bounded log of encoded events (see the module docstring).

    A backend is created unconnected; ``await log.connect()`` before use and
    ``await log.close()`` after (or ``async with log:``).
    """

    #: The URL scheme(s) this backend is opened for, e.g. ``"memory"``.
    scheme: str = ""

    @abc.abstractmethod
    async def connect(self) -> None:
        """Make the log reachable; raise BackendUnavailable if it cannot be reached."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop following the log and release its connections (idempotent)."""

    @abc.abstractmethod
    async def append(self, payload: bytes) -> tuple[int, str]:
        """Append one encoded envelope (without its ``seq``); return its ``(seq, epoch)``.

        Raises BackendUnavailable when the log cannot be reached: the entry is then
        not acknowledged (if the connection broke mid-command it may still be in the log).
        """

    @abc.abstractmethod
    async def append_many(
        self, payloads: Sequence[bytes], tokens: Sequence[bytes] | None = None
    ) -> list[tuple[int, str]]:
        """Append encoded envelopes in order, atomically; return each one's ``(seq, epoch)``.

        The entries get consecutive ``seq`` in one epoch, with nothing of another appender
        between them. ``tokens`` (one per payload, at most 64 bytes each) come back in
        :attr:`LogEntry.token`. Raises BackendUnavailable as :meth:`append` does: then none
        of them is acknowledged (if the connection broke mid-command, all of them may be
        in the log).
        """

    @abc.abstractmethod
    async def read(self, after_seq: int, count: int, epoch: str | None = None) -> ReadResult:
        """Return at most ``count`` entries after ``after_seq``, oldest first.

        ``epoch``, if given, is the epoch ``after_seq`` belongs to: a different one is a gap.
        """

    @abc.abstractmethod
    def tail(
        self,
        after_seq: int,
        epoch: str | None = None,
        deliver: Callable[[LogEntry], None] | None = None,
    ) -> AsyncIterator[LogEntry]:
        """Yield every entry appended after ``after_seq``, in ``seq`` order, as it arrives.

        ``epoch``, if given, is the epoch ``after_seq`` belongs to: if it is not the
        log's, the tail starts from the oldest entry of the log's epoch. With ``deliver``,
        a backend may pass some entries to it instead of yielding them, from its I/O
        callback as soon as they are read (one loop turn earlier, no task switch); the
        order is the same, and an exception from ``deliver`` ends the iterator with it.

        The iterator survives a short loss of the connection by reading again from the
        last entry it yielded. A jump in ``seq`` or a change of ``epoch`` between two
        yielded entries means the log lost entries meanwhile (logged and counted).
        Close it with ``aclose()`` (or ``contextlib.aclosing``).
        """

    @abc.abstractmethod
    async def info(self) -> LogInfo:
        """Return what the log holds now and this backend's health and counters."""

    @property
    @abc.abstractmethod
    def health(self) -> Health:
        """``ok``, ``degraded`` (reconnecting) or ``closed``."""

    async def __aenter__(self) -> EventLog:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def check_read_args(after_seq: Any, count: Any) -> None:
    """Raise ValueError naming the bad value if ``after_seq`` or ``count`` is not valid."""
    if not isinstance(after_seq, int) or isinstance(after_seq, bool) or after_seq < 0:
        raise ValueError(f"after_seq must be a non-negative integer, not {after_seq!r}")
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise ValueError(f"count must be a positive integer, not {count!r}")


def check_payload(payload: Any) -> bytes:
    """Return ``payload`` as bytes; raise TypeError if it is not bytes-like."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    raise TypeError(f"payload must be bytes, not {type(payload).__name__}")


def is_gap(after_seq: int, epoch: str | None, log_epoch: str, last_seq: int, oldest: int) -> bool:
    """Whether entries after ``after_seq`` (of ``epoch``) are missing from the log."""
    if epoch is not None and epoch != log_epoch:
        return True
    if after_seq > last_seq:
        return True
    return after_seq < last_seq and after_seq + 1 < oldest


#: The longest token :meth:`EventLog.append_many` takes with an entry.
MAX_TOKEN_BYTES = 64


def check_batch(
    payloads: Sequence[bytes], tokens: Sequence[bytes] | None
) -> tuple[list[bytes], list[bytes] | None]:
    """Return ``payloads`` and ``tokens`` as lists of bytes; ValueError/TypeError if unfit."""
    checked = [check_payload(p) for p in payloads]
    if tokens is None:
        return checked, None
    tokens = list(tokens)
    if len(tokens) != len(checked):
        raise ValueError(f"{len(tokens)} tokens for {len(checked)} payloads: give one each")
    for token in tokens:
        if not isinstance(token, bytes) or not 0 < len(token) <= MAX_TOKEN_BYTES:
            raise ValueError(f"a token must be 1 to {MAX_TOKEN_BYTES} bytes, not {token!r}")
    return checked, tokens
