"""Replay recorded traffic: publish it again in order, keeping its relative timing.

::

    from gathering_lab.replay import replay

    result = await replay("trace.parquet", "ws://127.0.0.1:8000/ws/dashboard", speed=10)
    result = await replay(client.frame.df, url, speed=None)   # as fast as the server takes it
    await lab.replay("trace.parquet", speed=10)              # onto a lab's own bus

A source is a recording (:func:`~gathering_lab.record.read_recording`: ``.parquet`` or
``.jsonl``, rotated parts included), an :class:`~gathering_lab.frame.EventFrame`, or a
DataFrame with its columns (``type``, ``data``, the ids, ``received_at``). Each row's
``type``, ``data``, ``source_agent_id``, ``circle_id`` and ``project_id`` are published
again; the server gives them new ids, ``seq`` and timestamps. Rows the client wrote itself
(``lab.gap``, ``lab.server.restarted``) are skipped and counted. Row ``i`` is due
``(received_at[i] - received_at[0]) / speed`` seconds after the start (``timestamp`` where the
receive time is unknown); a late row goes at once, and the schedule never runs backwards.

Over WebSocket every publish is acknowledged before the replay counts it. A publish the
server refuses with ``rate_limited`` is sent again after a pause, never dropped, and
counted in ``retried``. To keep the order, the replay paces itself under the server's
``publish_rate`` when the stats endpoint tells it (its limits are public unless auth is on),
keeps at most ``window`` publishes unanswered, and after any refusal sends one at a time:
the order can only break if the server refuses while several publishes are in flight,
which is counted in ``reordered`` (and logged), never hidden. ``paced`` counts the
publishes the pace made wait, ``retried`` the refusals: ``held_back`` is their sum.

When the connection drops, the replay reconnects with backoff and goes on from the first
event it has no ``published`` ack for. An acknowledged event is never sent again; one sent
and not acknowledged may have been published just before the drop, so it is sent again and
listed in ``maybe_duplicated`` (and logged). :func:`~gathering_lab.demo.run_demo` uses the
same flow control.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from . import protocol
from .client import FINAL_CLOSE_CODES
from .connection import OPEN_TIMEOUT, closed_message, get_json, http_url, open_connection
from .exceptions import AuthError, ConnectionFailed, ProtocolError
from .frame import EventFrame

if TYPE_CHECKING:
    import pandas as pd

    from .events import EventBus

__all__ = ["ReplayResult", "load_events", "replay", "replay_on_bus"]

logger = logging.getLogger("gathering_lab.replay")

Payload = dict[str, Any]
Source = Any  # str | os.PathLike[str] | EventFrame | pandas.DataFrame
ProgressOption = bool | Callable[..., Any]

_ID_KEYS = ("source_agent_id", "circle_id", "project_id")
#: Pace at this share of the server's publish rate and burst, to stay clear of refusals.
_PACE_MARGIN = 0.9
_BURST_MARGIN = 0.5
#: Reconnect attempts in a row, and seconds per outage, before a replay gives up.
DEFAULT_MAX_RETRIES = 10
DEFAULT_RETRY_TIMEOUT = 60.0


@dataclass(slots=True)
class ReplayResult:
    """What a replay did."""

    #: Rows to publish (skipped rows not included).
    total: int = 0
    #: Publishes the server acknowledged (or sent, against a server without acks).
    published: int = 0
    #: Publish messages sent, resends included.
    sent: int = 0
    #: Times the server held the replay back: resends after a ``rate_limited`` refusal.
    retried: int = 0
    #: Events per second the replay paced itself at, under the server's publish rate
    #: (from its stats, or named by a refusal); None: not paced.
    paced_at: float | None = None
    #: Publishes that pace made wait.
    paced: int = 0
    #: Resends of events left unacknowledged by a dropped connection.
    resent: int = 0
    #: Connections opened (1 without a drop) and opened again after one.
    connections: int = 0
    reconnects: int = 0
    #: Event numbers (0-based, in replay order) sent and not acknowledged when the
    #: connection dropped: sent again, so the server may have published them twice.
    maybe_duplicated: list[int] = field(default_factory=list)
    #: Publishes refused for another reason (``forbidden``, ``invalid_message``, ...).
    failed: int = 0
    #: Client-side rows (``lab.*``) and control messages left out.
    skipped: int = 0
    #: Events published ahead of an earlier one that had to be resent.
    reordered: int = 0
    elapsed: float = 0.0
    #: The server's most recent refusal, other than ``rate_limited``.
    last_error: str | None = None
    #: False against a server that does not acknowledge publishes (the guide's original).
    acknowledged: bool = True

    @property
    def rate(self) -> float:
        """Events published per second: the effective rate, pauses included."""
        return self.published / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def held_back(self) -> int:
        """Times the server's publish rate held the replay back: paced, or refused and resent."""
        return self.paced + self.retried


# Sources


def load_events(source: Source) -> tuple[list[Payload], list[float], int]:
    """The publish payloads of ``source``, their times (epoch seconds) and the rows skipped.

    Raises FileNotFoundError for a missing file, ValueError for an unknown suffix or a
    frame without a ``type`` column, TypeError for anything else.
    """
    import pandas as pd

    if isinstance(source, str | os.PathLike):
        from .record import read_recording

        frame = read_recording(Path(source))
    elif isinstance(source, EventFrame):
        frame = source.df
    elif isinstance(source, pd.DataFrame):
        frame = source
    else:
        raise TypeError(
            "replay takes a recording's path, an EventFrame or a DataFrame, "
            f"not {type(source).__name__}"
        )
    if "type" not in frame.columns:
        raise ValueError(f"nothing to replay: no 'type' column in {list(frame.columns)[:12]}")
    size = len(frame)
    types = frame["type"].tolist()
    data = frame["data"].tolist() if "data" in frame.columns else [None] * size
    ids = {key: frame[key].tolist() if key in frame.columns else [None] * size for key in _ID_KEYS}
    times = _seconds(frame, "received_at")
    fallback = _seconds(frame, "timestamp")
    payloads: list[Payload] = []
    kept: list[float] = []
    skipped = 0
    for row in range(size):
        kind = types[row]
        if not isinstance(kind, str) or kind.startswith("lab.") or kind in protocol.CONTROL_TYPES:
            skipped += 1
            continue
        payload: Payload = {"type": kind, "data": _data(data[row], row)}
        for key in _ID_KEYS:
            payload[key] = _plain(ids[key][row])
        payloads.append(payload)
        when = times[row]
        kept.append(when if math.isfinite(when) else fallback[row])
    return payloads, kept, skipped


def _seconds(frame: pd.DataFrame, column: str) -> list[float]:
    import pandas as pd

    if column not in frame.columns:
        return [math.nan] * len(frame)
    stamps = pd.to_datetime(frame[column], utc=True, errors="coerce", format="ISO8601")
    seconds = (stamps - pd.Timestamp(0, tz="UTC")).dt.total_seconds()
    return [float(value) for value in seconds.tolist()]


def _plain(value: Any) -> Any:
    """A JSON-able id: None for pandas' missing values, int for numpy integers."""
    if value is None or value is _pd_na():
        return None
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item") and not isinstance(value, str | int):
        return value.item()
    return value


def _pd_na() -> Any:
    import pandas as pd

    return pd.NA


def _data(value: Any, row: int) -> dict[str, Any]:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"row {row}: data is not JSON: {exc.msg}") from None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"row {row}: data must be a dict, not {type(value).__name__}")
    return value


def _offsets(times: list[float]) -> list[float]:
    """Seconds after the first row each row is due: unknown times and steps back wait 0."""
    offsets: list[float] = []
    first = next((t for t in times if math.isfinite(t)), 0.0)
    latest = 0.0
    for when in times:
        if math.isfinite(when):
            latest = max(latest, when - first)
        offsets.append(latest)
    return offsets


def _check_speed(speed: float | None) -> float | None:
    if speed is None or speed == math.inf:
        return None
    if isinstance(speed, bool) or not isinstance(speed, int | float) or not speed > 0:
        raise ValueError(
            f"speed must be a number > 0 (or None: as fast as possible), not {speed!r}"
        )
    return float(speed)


class _Schedule:
    """When each row is due: its recorded offset divided by ``speed`` (None: at once)."""

    def __init__(self, times: list[float], speed: float | None) -> None:
        self.offsets = _offsets(times)
        self.speed = speed
        self.start = time.monotonic()

    async def wait(self, row: int) -> None:
        if self.speed is None:
            return
        delay = self.start + self.offsets[row] / self.speed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


def _bar(progress: ProgressOption, total: int, description: str) -> Any:
    """A tqdm bar (a widget in a notebook, text in a terminal), or None."""
    if progress is False:
        return None
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=description, unit="ev", leave=True)
    return progress(total=total, desc=description, unit="ev")


# Over WebSocket


class _Pacer:
    """A token bucket on the client's side: ``rate`` per second, ``burst`` at once."""

    def __init__(self, rate: float, burst: float, *, full: bool = True) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst if full else 0.0
        self.stamp = time.monotonic()
        #: Publishes this pace made wait.
        self.delayed = 0

    async def take(self) -> None:
        waited = False
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            if not waited:
                waited = True
                self.delayed += 1
            await asyncio.sleep((1 - self.tokens) / self.rate)


class _Lost(ConnectionFailed):
    """The connection dropped: it may be opened again. ``code`` is the close code, if any."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class _Unanswered(ConnectionFailed):
    """Publishes went unanswered for ``reply_timeout``: the server is not listening."""


def _refusal(data: Any) -> tuple[str | None, str]:
    """An ``error`` reply's code (None if it has none) and its ``code: message`` text."""
    if not isinstance(data, dict):
        data = {"message": data}
    code = data.get("code")
    text = ": ".join(str(data[key]) for key in ("code", "message") if data.get(key) is not None)
    return (code if isinstance(code, str) else None), text


def _rate_hint(data: Any) -> tuple[float | None, tuple[float, int] | None]:
    """What a ``rate_limited`` reply says about slowing down: a retry-after, the rate.

    Reads ``retry_after`` (seconds) and ``publish_rate``/``publish_burst`` when the
    server sends them, else the rate and burst its message names ("over 500 events/s
    (burst 1000)"); None for what it does not say.
    """
    if not isinstance(data, dict):
        return None, None
    retry_after = data.get("retry_after")
    wait = float(retry_after) if isinstance(retry_after, int | float) and retry_after > 0 else None
    rate, burst = data.get("publish_rate"), data.get("publish_burst")
    if isinstance(rate, int | float) and rate > 0:
        return wait, (float(rate), int(burst) if isinstance(burst, int) and burst > 0 else 1)
    found = _RATE_TEXT.search(str(data.get("message", "")))
    if found is None:
        return wait, None
    return wait, (float(found.group(1)), int(found.group(2)))


_RATE_TEXT = re.compile(r"over ([0-9]+(?:\.[0-9]+)?) events/s \(burst ([0-9]+)\)")


class _Publisher:
    """Sends publishes in order and settles them by their replies, across connections.

    A publish refused with ``rate_limited`` is sent again after a pause, one at a time,
    paced under the rate the refusal names; one that was in flight when the connection
    dropped is sent again on the next connection (and noted: it may be published twice).
    """

    def __init__(
        self,
        result: ReplayResult,
        *,
        window: int,
        pacer: _Pacer | None,
        backoff: float,
        reply_timeout: float,
        bar: Any,
        url: str,
        stop_on: frozenset[str] = frozenset(),
    ) -> None:
        self.ws: Any = None
        self.result = result
        self.window = window
        self.pacer = pacer
        self.base_backoff = self.backoff = backoff
        self.retry_after: float | None = None
        self.reply_timeout = reply_timeout
        self.bar = bar
        self.url = url
        self.stop_on = stop_on
        #: The ``code: message`` of the first refusal whose code is in ``stop_on``.
        self.stopped_by: str | None = None
        #: Sent and not answered yet, by number (the ``id`` of the publish).
        self.pending: dict[int, Payload] = {}
        #: Refused with ``rate_limited``: to send again after a pause.
        self.refused: dict[int, Payload] = {}
        #: Not known to be published when the connection dropped: to send again.
        self.lost: dict[int, Payload] = {}
        #: The next event never sent.
        self.position = 0
        self.changed = asyncio.Event()
        self.closed: BaseException | None = None
        self._reader: asyncio.Task[None] | None = None
        if pacer is not None:
            result.paced_at = pacer.rate

    # The connection

    def attach(self, ws: Any) -> None:
        """Publish over ``ws`` from now on (a new connection)."""
        self.ws = ws
        self.closed = None
        self.changed = asyncio.Event()
        self._reader = asyncio.create_task(self.read(), name="publisher-replies")

    async def detach(self) -> None:
        """Stop reading the current connection's replies."""
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
            self._reader = None

    def connection_lost(self) -> list[int]:
        """Take back what the dropped connection left unanswered; return the uncertain ones.

        Those were sent and not acknowledged: the server may have published them. Each
        is sent again on the next connection, so it may end up published twice.
        """
        uncertain = sorted(self.pending)
        self.lost.update(self.pending)
        self.lost.update(self.refused)  # refused: certainly not published, sent again too
        self.pending.clear()
        self.refused.clear()
        return uncertain

    # Replies

    async def read(self) -> None:
        try:
            async for raw in self.ws:
                self.handle(raw)
        except ConnectionClosed as exc:
            self.closed = exc
        else:
            self.closed = ConnectionClosed(self.ws.protocol.close_rcvd, self.ws.protocol.close_sent)
        self.changed.set()

    def handle(self, raw: str | bytes) -> None:
        try:
            message = protocol.decode(raw)
        except ProtocolError as exc:
            logger.warning("ignoring a message from the server: %s", exc)
            return
        kind = message["type"]
        if kind not in ("published", "error"):
            return  # our events coming back, pongs, ...
        number = message.get("id")
        if number is None and self.pending:
            number = min(self.pending)  # a server that echoes no id answers in order
        if not isinstance(number, int):
            return
        payload = self.pending.pop(number, None)
        if payload is None:
            return  # a reply to no publish of ours
        if kind == "published":
            self.result.published += 1
            if (self.refused and number > min(self.refused)) or (
                self.lost and number > min(self.lost)
            ):
                self.result.reordered += 1
            if self.bar is not None:
                self.bar.update(1)
        else:
            data = message.get("data")
            code, text = _refusal(data)
            if code == "rate_limited":
                self.refused[number] = payload
                self._slow_down(data)
            else:
                self.result.failed += 1
                self.result.last_error = text
                logger.warning("the server refused event %d: %s", number, text)
                if code in self.stop_on and self.stopped_by is None:
                    self.stopped_by = text
        self.changed.set()

    def _slow_down(self, data: Any) -> None:
        """After a ``rate_limited``: pace under the rate it names, wait what it asks."""
        wait, rates = _rate_hint(data)
        self.retry_after = wait
        if rates is None:
            return
        rate = rates[0] * _PACE_MARGIN
        if self.pacer is None or self.pacer.rate > rate:
            logger.info("the server's publish rate is %g/s: pacing at %g/s", rates[0], rate)
            self.pacer = _Pacer(rate, rates[1] * _BURST_MARGIN, full=False)
            self.result.paced_at = rate
            self.base_backoff = self.backoff = max(self.base_backoff, 1.0 / rates[0])

    async def wait_change(self) -> None:
        if self.closed is not None:
            raise self._lost()
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), self.reply_timeout)
        except TimeoutError:
            raise _Unanswered(
                f"{self.url} left {len(self.pending)} publish messages unanswered for "
                f"{self.reply_timeout:g}s; does it accept 'publish'?"
            ) from None
        if self.closed is not None and (self.pending or self.refused):
            raise self._lost()

    def _lost(self) -> _Lost:
        closed = self.closed
        if isinstance(closed, ConnectionClosed):
            code = closed.rcvd.code if closed.rcvd is not None else None
            return _Lost(closed_message(self.url, closed), code)
        return _Lost(f"{self.url} closed the connection")

    # Sending

    async def send(self, number: int, payload: Payload) -> None:
        """Send one publish now (after the pace allows), numbered ``number``."""
        if self.pacer is not None:
            before = self.pacer.delayed
            await self.pacer.take()
            self.result.paced += self.pacer.delayed - before
        try:
            message = protocol.Publish(**payload).to_message()
        except ProtocolError as exc:
            self.result.failed += 1
            self.result.last_error = f"{exc.code}: {exc.message}"
            logger.warning("cannot publish event %d: %s", number, exc.message)
            return
        message["id"] = number
        self.pending[number] = payload
        self.result.sent += 1
        try:
            await self.ws.send(protocol.encode(message).decode())
        except ConnectionClosed as exc:
            # Never written: certainly not published. Sent again on the next connection.
            self.lost[number] = self.pending.pop(number)
            self.result.sent -= 1
            self.closed = exc
            raise self._lost() from None

    async def publish(self, number: int, payload: Payload) -> None:
        """Send one publish once the window and the pace allow (after any resends)."""
        while True:
            if self.refused or self.lost:
                await self.recover()
            if len(self.pending) < self.window:
                break
            await self.wait_change()
        self.position = number + 1  # handed over: from now on pending, or lost
        await self.send(number, payload)

    async def recover(self) -> None:
        """Resend the refused and lost publishes in order, one at a time."""
        while self.pending:
            await self.wait_change()
        if self.refused and self.window > 1:
            logger.info("the server refused a publish (rate_limited): one at a time from now")
            self.window = 1
        while self.refused or self.lost:
            number = min(self.refused.keys() | self.lost.keys())
            refused = number in self.refused
            payload = self.refused.pop(number) if refused else self.lost.pop(number)
            if refused:
                await asyncio.sleep(self.retry_after or self.backoff)
                self.result.retried += 1
                if self.bar is not None:
                    self.bar.set_postfix(held_back=self.result.retried, refresh=False)
            else:
                self.result.resent += 1
            await self.send(number, payload)
            while number in self.pending:
                await self.wait_change()
            if number in self.refused:
                self.backoff = min(self.backoff * 2, 2.0)
            else:
                self.backoff = self.base_backoff

    async def settle(self) -> None:
        """Wait until every publish sent is answered (the refused ones wait to be resent)."""
        while self.pending:
            await self.wait_change()

    async def finish(self) -> None:
        """Wait until every publish is answered (resending the refused and lost ones)."""
        while self.pending or self.refused or self.lost:
            if (self.refused or self.lost) and not self.pending:
                await self.recover()
            else:
                await self.wait_change()


async def _server_rates(url: str, token: str | None) -> tuple[float, int] | None:
    """The server's ``publish_rate`` and ``publish_burst`` from its stats, if it says."""
    try:
        stats = await asyncio.to_thread(
            get_json, http_url(url, "/admin/websocket/stats"), token, 5.0
        )
        rates = stats["rate_limits"]
        return float(rates["publish_rate"]), int(rates["publish_burst"])
    except (AuthError, ConnectionFailed, KeyError, TypeError, ValueError) as exc:
        logger.info("the server's publish rate is unknown (%s): one publish at a time", exc)
        return None


def _check_reconnect(max_retries: int, base_delay: float, max_delay: float, timeout: float) -> None:
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise ValueError(f"max_retries must be an integer >= 0, not {max_retries!r}")
    for name, value in (("base_delay", base_delay), ("max_delay", max_delay)):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise ValueError(f"{name} must be a number > 0, not {value!r}")
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
        raise ValueError(f"retry_timeout must be a number > 0, not {timeout!r}")


async def replay(
    source: Source,
    url: str,
    *,
    speed: float | None = 1.0,
    token: str | None = None,
    client_id: str | None = "replay",
    progress: ProgressOption = True,
    window: int = 256,
    reply_timeout: float = 10.0,
    reconnect: bool = True,
    max_retries: int = DEFAULT_MAX_RETRIES,
    retry_timeout: float = DEFAULT_RETRY_TIMEOUT,
    base_delay: float = 0.5,
    max_delay: float = 5.0,
) -> ReplayResult:
    """Publish ``source``'s events to the server at ``url`` again, in order; return the counts.

    ``speed`` scales the recorded timing (10: ten times faster; None: as fast as the
    server takes them). ``progress`` shows a tqdm bar (a widget in a notebook), or is a
    tqdm-like class to use.

    With ``reconnect`` (the default) a connection that drops after its greeting is opened
    again with backoff (``min(base_delay * 2**attempt, max_delay)`` seconds, as
    :class:`~gathering_lab.client.LabClient` does), at most ``max_retries`` times in a row
    and for at most ``retry_timeout`` seconds per outage, and the replay goes on from the
    first event it has no ``published`` ack for. Events sent but not acknowledged when it
    dropped may have been published: they are sent again and listed in
    :attr:`ReplayResult.maybe_duplicated`.

    Raises ConnectionFailed if the server cannot be reached, closes the connection for
    good (or with ``reconnect=False``), or leaves publishes unanswered for
    ``reply_timeout`` seconds.
    """
    speed = _check_speed(speed)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, not {window!r}")
    _check_reconnect(max_retries, base_delay, max_delay, retry_timeout)
    payloads, times, skipped = load_events(source)
    result = ReplayResult(total=len(payloads), skipped=skipped)
    rates = await _server_rates(url, token)
    pacer: _Pacer | None = None
    backoff = 0.02
    if rates is None:
        window = 1
    elif rates[0] > 0:
        pacer = _Pacer(rates[0] * _PACE_MARGIN, rates[1] * _BURST_MARGIN)
        backoff = max(0.005, 1.0 / rates[0])
    bar = _bar(progress, result.total, "replay")
    publisher = _Publisher(
        result,
        window=window,
        pacer=pacer,
        backoff=backoff,
        reply_timeout=reply_timeout,
        bar=bar,
        url=url,
    )
    schedule = _Schedule(times, speed)
    attempt = 0
    lost_at = 0.0
    greeted = 0  # connections greeted before the last drop
    try:
        while True:
            try:
                await _replay_session(url, client_id, token, publisher, payloads, schedule)
                break
            except _Unanswered:
                raise
            except ConnectionFailed as exc:
                # Only a connection that was greeted is retried: a wrong URL or a refused
                # token fails at once. A close code a retry cannot fix ends it too.
                code = exc.code if isinstance(exc, _Lost) else None
                now = time.monotonic()
                if result.connections != greeted:  # a session ran: a new outage
                    greeted = result.connections
                    attempt = 0
                    lost_at = now
                if (
                    not reconnect
                    or not result.connections
                    or code in FINAL_CLOSE_CODES
                    or attempt >= max_retries
                    or now - lost_at > retry_timeout
                ):
                    _note_uncertain(result, publisher, payloads)
                    if result.connections and reconnect and code not in FINAL_CLOSE_CODES:
                        raise ConnectionFailed(
                            f"{exc}; gave up after {attempt} reconnect attempts in "
                            f"{now - lost_at:.1f}s ({result.published} of {result.total} "
                            "events published)"
                        ) from None
                    raise
                _note_uncertain(result, publisher, payloads)
                delay = min(base_delay * 2**attempt, max_delay)
                attempt += 1
                logger.warning("%s; reconnecting in %gs (attempt %d)", exc, delay, attempt)
                if bar is not None:
                    bar.set_postfix(reconnecting=attempt, refresh=True)
                await asyncio.sleep(delay)
                continue
            finally:
                await publisher.detach()
    finally:
        result.elapsed = time.monotonic() - schedule.start
        if bar is not None:
            bar.close()
    if result.reordered:
        logger.warning(
            "%d events were published ahead of an earlier one that had to be sent again",
            result.reordered,
        )
    if result.maybe_duplicated:
        logger.warning(
            "%d events may have been published twice (sent, no ack, connection lost): %s",
            len(result.maybe_duplicated),
            describe_numbers(result.maybe_duplicated),
        )
    return result


def _note_uncertain(result: ReplayResult, publisher: _Publisher, payloads: list[Payload]) -> None:
    uncertain = publisher.connection_lost()
    if uncertain:
        logger.warning(
            "the connection dropped with %d events sent and not acknowledged (%s): "
            "they are sent again and may be published twice",
            len(uncertain),
            describe_numbers(uncertain),
        )
    result.maybe_duplicated.extend(uncertain)


def describe_numbers(numbers: list[int], shown: int = 10) -> str:
    """``#3, #4, #9`` for event numbers (0-based, in replay order): the first ``shown``."""
    text = ", ".join(f"#{n}" for n in numbers[:shown])
    return text + (f" and {len(numbers) - shown} more" if len(numbers) > shown else "")


async def _replay_session(
    url: str,
    client_id: str | None,
    token: str | None,
    publisher: _Publisher,
    payloads: list[Payload],
    schedule: _Schedule,
) -> None:
    """One connection of :func:`replay`: publish from ``publisher.position`` to the end."""
    result = publisher.result
    async with open_connection(url, client_id=client_id, token=token) as ws:
        try:
            greeting = protocol.decode(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
        except ConnectionClosed as exc:
            code = exc.rcvd.code if exc.rcvd is not None else None
            raise _Lost(closed_message(url, exc), code) from None
        except (TimeoutError, ProtocolError) as exc:
            raise ConnectionFailed(f"{url} did not greet like a GatheRing server: {exc}") from None
        data = greeting.get("data") or {}
        result.acknowledged = "epoch" in data
        result.connections += 1
        if result.connections > 1:
            result.reconnects += 1
            first = min(publisher.lost, default=publisher.position)
            logger.warning("reconnected to %s: replaying from event #%d", url, first)
        publisher.attach(ws)
        if not result.acknowledged:  # a server without acks: sent counts as published
            for number in sorted(publisher.lost):
                await _send_unacknowledged(publisher, number, publisher.lost.pop(number))
        while (position := publisher.position) < len(payloads):
            await schedule.wait(position)
            if result.acknowledged:
                await publisher.publish(position, payloads[position])
            else:
                publisher.position = position + 1
                await _send_unacknowledged(publisher, position, payloads[position])
        if result.acknowledged:
            await publisher.finish()


async def _send_unacknowledged(publisher: _Publisher, number: int, payload: Payload) -> None:
    await publisher.send(number, payload)
    publisher.pending.clear()
    publisher.result.published += 1
    if publisher.bar is not None:
        publisher.bar.update(1)


# Onto a bus in this process


async def replay_on_bus(
    source: Source,
    bus: EventBus,
    *,
    speed: float | None = 1.0,
    progress: ProgressOption = True,
) -> ReplayResult:
    """Publish ``source``'s events on ``bus`` again, in order, keeping their timing.

    No rate limit applies (this is the bus itself, not a client of its server). An event
    the bus refuses is counted in ``failed``; ``progress`` is as for :func:`replay`.
    """
    from .events import Event

    speed = _check_speed(speed)
    payloads, times, skipped = load_events(source)
    result = ReplayResult(total=len(payloads), skipped=skipped)
    bar = _bar(progress, result.total, "replay")
    schedule = _Schedule(times, speed)
    try:
        for number, payload in enumerate(payloads):
            await schedule.wait(number)
            result.sent += 1
            try:
                await bus.publish(Event(**payload))
            except (ValueError, TypeError) as exc:
                result.failed += 1
                result.last_error = str(exc)
                logger.warning("the bus refused event %d: %s", number, exc)
                continue
            result.published += 1
            if bar is not None:
                bar.update(1)
    finally:
        result.elapsed = time.monotonic() - schedule.start
        if bar is not None:
            bar.close()
    return result
