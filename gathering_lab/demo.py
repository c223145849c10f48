"""Demo traffic on the wire: what the guide's ``test_websocket_integration.py server`` does.

The story itself (agents, circles, tasks; seeded, no I/O) is
:mod:`gathering_lab.traffic`; connecting is :mod:`gathering_lab.connection`.
This module paces the story's payloads onto an in-process bus or sends them to
a server as ``publish`` messages and counts the replies.

::

    from gathering_lab.demo import demo_messages, publish_demo, run_demo

    kinds = [p["type"] for p in demo_messages(5)]   # publish payloads, no I/O

    await publish_demo(bus, 100)              # onto an in-process EventBus
    result = await run_demo("ws://127.0.0.1:8000/ws/dashboard", count=100, rate=0)

``gathering-lab demo`` (in :mod:`gathering_lab.cli`) is the command-line face of :func:`run_demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Any

from websockets.exceptions import ConnectionClosed

from . import protocol
from .connection import (
    DEFAULT_URL,
    OPEN_TIMEOUT,
    TOKEN_ENV,
    check_url,
    closed_message,
    open_connection,
    with_client_id,
)
from .events import Event, EventBus
from .exceptions import ConnectionFailed, ProtocolError
from .traffic import Payload, demo_messages

__all__ = [
    "DEFAULT_URL",
    "TOKEN_ENV",
    "DemoResult",
    "closed_message",
    "demo_messages",
    "open_connection",
    "publish_demo",
    "publish_message",
    "run_demo",
    "with_client_id",
    "ws_url",
]

logger = logging.getLogger("gathering_lab.demo")


def ws_url(text: str) -> str:
    """Check a WebSocket URL (``ws://`` or ``wss://`` with a host); argparse-friendly."""
    try:
        return check_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


class _Pacer:
    """A monotonic schedule of ``rate`` ticks per second (0: no pacing) that does not drift."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next = time.monotonic()

    async def wait(self) -> None:
        if not self.interval:
            return
        delay = self.next - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -1.0:  # far behind (suspended laptop, stalled loop): do not burst
            self.next = time.monotonic()
        self.next += self.interval


def _check_rate_count(rate: float | None, count: int | None) -> None:
    if rate is not None and not rate >= 0:
        raise ValueError(f"rate must be >= 0 events per second, not {rate!r}")
    if count is not None and (not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer or None, not {count!r}")


async def publish_demo(
    bus: EventBus, count: int | None, *, rate: float | None = None, seed: int = 0
) -> int:
    """Publish ``count`` demo events (None: until cancelled) on ``bus``; return how many.

    ``rate`` paces publishing in events per second (None or 0: as fast as the
    bus's handlers allow). Use it in a notebook to feed an in-process server.
    """
    _check_rate_count(rate, count)
    pacer = _Pacer(rate)
    published = 0
    for payload in demo_messages(count, seed=seed):
        await pacer.wait()
        await bus.publish(Event(**payload))
        published += 1
    return published


# Publishing over WebSocket


@dataclass(slots=True)
class DemoResult:
    """What :func:`run_demo` did: publishes sent, acknowledged, refused, and how long it took."""

    sent: int = 0
    acked: int = 0
    errors: int = 0
    elapsed: float = 0.0
    #: The ``data`` of the server's ``connection.established`` greeting.
    greeting: dict[str, Any] = field(default_factory=dict)
    #: The message of the most recent ``error`` reply, if any.
    last_error: str | None = None
    #: The ``error`` reply (``code: message``) that made :func:`run_demo` stop early, if any.
    stopped_by: str | None = None
    #: Times the server's publish rate held the demo back: publishes refused with
    #: ``rate_limited`` and sent again (not counted in ``errors``).
    retried: int = 0
    #: Events per second the demo paced itself at under the server's publish rate (from
    #: its stats, or named by a refusal); None: not paced by the server.
    paced_at: float | None = None
    #: Publishes that pace made wait.
    paced: int = 0

    @property
    def rate(self) -> float:
        """Average events sent per second."""
        return self.sent / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def held_back(self) -> int:
        """Times the server's publish rate held the demo back: paced, or refused and resent."""
        return self.paced + self.retried

    @property
    def effective_rate(self) -> float:
        """Events published (acknowledged) per second, pauses included."""
        return self.acked / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def unanswered(self) -> int:
        """Publishes the server has not answered (yet)."""
        return self.sent - self.acked - self.errors


def publish_message(payload: Payload) -> bytes:
    """Return the text frame (UTF-8 JSON) of a ``publish`` message carrying ``payload``."""
    return protocol.encode(protocol.Publish(**payload).to_message())


async def run_demo(
    url: str = DEFAULT_URL,
    *,
    count: int | None = None,
    rate: float = 5.0,
    client_id: str | None = "demo",
    seed: int = 0,
    token: str | None = None,
    progress: Callable[[DemoResult], None] | None = None,
    progress_interval: float = 1.0,
    max_in_flight: int = 256,
    reply_timeout: float = 10.0,
    stop_on: Collection[str] = ("forbidden",),
) -> DemoResult:
    """Publish demo traffic to a GatheRing server over WebSocket and return the counts.

    Connects to ``url`` (with ``?client_id=client_id``; None keeps the URL's;
    ``token``, if any, goes in a Bearer header), reads ``connection.established``,
    then sends ``count`` publish messages (None: until cancelled) at ``rate``
    events per second on a monotonic schedule (0: as fast as the server answers,
    at most ``max_in_flight`` unanswered). ``progress`` is called with the
    running :class:`DemoResult` after connecting, about every
    ``progress_interval`` seconds, and at the end.

    A publish the server refuses with ``rate_limited`` (over its ``--publish-rate``)
    is sent again after a pause, in order, and from then on the demo paces itself under
    the rate the refusal names: nothing is lost, and :attr:`DemoResult.retried` counts
    the times it was held back.

    Raises :class:`~gathering_lab.exceptions.ConnectionFailed` if the server
    cannot be reached, is not a WebSocket server, closes the connection, or
    leaves publishes unanswered for ``reply_timeout`` seconds. An ``error`` reply
    whose code is in ``stop_on`` (by default ``forbidden``: this client may not
    publish, so no later publish can succeed) stops it early: no more publishes are
    sent, and :attr:`DemoResult.stopped_by` says why.
    """
    # The flow control replay uses: acks by id, rate_limited resent in order, a pace.
    from .replay import (
        _BURST_MARGIN,
        _PACE_MARGIN,
        ReplayResult,
        _Publisher,
        _server_rates,
        _Unanswered,
    )
    from .replay import _Pacer as _Bucket

    _check_rate_count(rate, count)
    if max_in_flight < 1:
        raise ValueError(f"max_in_flight must be >= 1, not {max_in_flight!r}")
    result = DemoResult()
    # Under the server's publish rate when its stats say it (they are public unless auth
    # is on): paced, the demo is not refused and its order cannot break.
    rates = await _server_rates(url, token)
    server_pacer = None
    if rates is not None and rates[0] > 0 and (rate == 0 or rate > rates[0] * _PACE_MARGIN):
        server_pacer = _Bucket(rates[0] * _PACE_MARGIN, rates[1] * _BURST_MARGIN)
    async with open_connection(url, client_id=client_id, token=token) as ws:
        try:
            greeting = protocol.decode(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
        except ConnectionClosed as exc:
            raise ConnectionFailed(closed_message(url, exc)) from None
        except TimeoutError:
            raise ConnectionFailed(f"{url} sent no greeting within {OPEN_TIMEOUT:g}s") from None
        except ProtocolError as exc:
            raise ConnectionFailed(f"{url} is not a GatheRing server: {exc}") from None
        if greeting["type"] != "connection.established":
            raise ConnectionFailed(
                f"{url} is not a GatheRing server: it greeted with {greeting['type']!r}"
            )
        result.greeting = dict(greeting.get("data") or {})
        logger.info("connected to %s as %s", url, result.greeting.get("client_id"))
        started = time.monotonic()
        # The first publish is answered before more are sent (for up to a second: a
        # server that never answers is not waited on each time), so a refusal (no
        # publish role) stops the demo after one, even at rate 0.
        tally = ReplayResult()
        publisher = _Publisher(
            tally,
            window=1,
            pacer=server_pacer,
            backoff=0.02,
            reply_timeout=reply_timeout,
            bar=None,
            url=url,
            stop_on=frozenset(stop_on),
        )
        publisher.attach(ws)
        ticker: asyncio.Task[None] | None = None

        def report() -> None:
            result.elapsed = time.monotonic() - started
            result.sent = tally.sent - tally.retried  # events, not resends
            result.acked = tally.published
            result.errors = tally.failed
            result.retried = tally.retried
            result.last_error = tally.last_error
            result.paced_at = tally.paced_at
            result.paced = tally.paced
            result.stopped_by = publisher.stopped_by
            if progress is not None:
                progress(result)

        async def tick() -> None:
            while True:
                await asyncio.sleep(progress_interval)
                report()

        report()
        if progress is not None:
            ticker = asyncio.create_task(tick(), name="demo-progress")
        try:
            pacer = _Pacer(rate)
            for number, payload in enumerate(demo_messages(count, seed=seed)):
                await pacer.wait()
                if number == 1:
                    answered = True
                    try:
                        await asyncio.wait_for(publisher.settle(), min(reply_timeout, 1.0))
                    except (TimeoutError, _Unanswered):
                        answered = False
                    # Several in flight when the server's rate is known (paced: never
                    # refused) or it does not answer at all; else one at a time, so a
                    # refusal cannot let a later event overtake the refused one.
                    if (rates is not None or not answered) and not tally.retried:
                        publisher.window = max_in_flight
                if publisher.stopped_by is not None:
                    logger.info("stopped: the server refused a publish: %s", publisher.stopped_by)
                    break
                await publisher.publish(number, payload)
            try:
                await publisher.finish()
            except _Unanswered:
                logger.warning(
                    "%d publish messages unanswered after %gs",
                    len(publisher.pending),
                    reply_timeout,
                )
        finally:
            if ticker is not None:
                ticker.cancel()
                await asyncio.gather(ticker, return_exceptions=True)
            await publisher.detach()
            result.elapsed = time.monotonic() - started
        report()
    return result
