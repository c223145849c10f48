"""Several publishes in flight per connection on a shared log, answered in order.

On the in-process bus a publish is done when ``await bus.publish()`` returns, within the
loop turn the message was read in, so the server answers each publish before it reads the
next message and a burst of them still goes out in one write per client. On a shared log
(:class:`~gathering_lab.backends.bus.LogBus`) a publish is done only once the log took
the event and this node's tail delivered it, a round trip or two later; answering one
before reading the next would leave one event in flight per connection (each its own
write to every client). A :class:`PublishWindow` lets a connection have up to ``limit``
publishes in flight: each is submitted to the bus as it is read (so the bus appends them
together, in order), and the answers go out in the order the publishes came, each right
after this node delivered its event (in the same write as the event). Anything else the
client sends waits until its publishes in flight are answered, so every answer keeps its
place among the client's requests.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Any

from ..events import Event
from .policy import PublishEvent

__all__ = ["DEFAULT_MAX_PUBLISHES_IN_FLIGHT", "PublishWindow", "check_max_publishes_in_flight"]

#: Publishes one connection may have in flight on a shared log before its next message waits.
DEFAULT_MAX_PUBLISHES_IN_FLIGHT = 256

_WAITING = object()


def check_max_publishes_in_flight(value: Any) -> int:
    """Return ``value`` as a window size (a positive int); ValueError naming it if not."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"max_publishes_in_flight must be a positive integer, not {value!r}")
    return value


class PublishWindow:
    """One connection's publishes in flight on a shared log; answers sent in order.

    ``submit(event, done)`` is the bus's :meth:`~gathering_lab.backends.bus.LogBus.submit`;
    ``answer(action, failure)`` sends the client its answer to ``action`` (``failure`` is
    None, a ValueError or a BackendUnavailable).
    """

    __slots__ = ("_submit", "_answer", "limit", "_entries", "_waiter", "held")

    def __init__(
        self,
        submit: Callable[[Event, Callable[[Event, BaseException | None], None]], None],
        answer: Callable[[PublishEvent, BaseException | None], None],
        limit: int = DEFAULT_MAX_PUBLISHES_IN_FLIGHT,
    ) -> None:
        self._submit = submit
        self._answer = answer
        self.limit = check_max_publishes_in_flight(limit)
        self._entries: deque[list[Any]] = deque()  # [action, _WAITING or failure]
        self._waiter: asyncio.Future[None] | None = None
        #: How many times this connection's next message waited for room in the window.
        self.held = 0

    @property
    def in_flight(self) -> int:
        """Publishes submitted and not answered yet."""
        return len(self._entries)

    async def publish(self, action: PublishEvent) -> None:
        """Submit ``action``'s event once the window has room; its answer comes in order."""
        if len(self._entries) >= self.limit:
            self.held += 1
            while len(self._entries) >= self.limit:
                await self._wait()
        entry: list[Any] = [action, _WAITING]
        self._entries.append(entry)
        try:
            self._submit(action.event, lambda _event, exc: self._done(entry, exc))
        except ValueError as exc:  # cannot be sent: refused before it was numbered
            self._done(entry, exc)
        except BaseException:
            self._entries.remove(entry)
            raise

    async def settle(self) -> None:
        """Wait until every publish in flight is answered."""
        while self._entries:
            await self._wait()

    def _done(self, entry: list[Any], failure: BaseException | None) -> None:
        entry[1] = failure
        entries = self._entries
        while entries and entries[0][1] is not _WAITING:
            action, failure = entries.popleft()
            self._answer(action, failure)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self) -> None:
        waiter = self._waiter
        if waiter is None or waiter.done():
            waiter = self._waiter = asyncio.get_running_loop().create_future()
        await waiter
