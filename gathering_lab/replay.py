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
which is counted in ``reordered`` (and logged), never hidden.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from . import protocol
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


@dataclass(slots=True)
class ReplayResult:
    """What a replay did."""

    #: Rows to publish (skipped rows not included).
    total: int = 0
    #: Publishes the server acknowledged (or sent, against a server without acks).
    published: int = 0
    #: Publish messages sent, resends included.
    sent: int = 0
    #: Resends after a ``rate_limited`` refusal.
    retried: int = 0
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
        """Events published per second."""
        return self.published / self.elapsed if self.elapsed > 0 else 0.0


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

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self.tokens = self.burst
        self.stamp = time.monotonic()

    async def take(self) -> None:
        while True:
            now = time.monotonic()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            if self.tokens >= 1:
                self.tokens -= 1
                return
            await asyncio.sleep((1 - self.tokens) / self.rate)


class _Publisher:
    """Sends publishes in order over one connection and settles them by their replies."""

    def __init__(
        self,
        ws: Any,
        result: ReplayResult,
        *,
        window: int,
        pacer: _Pacer | None,
        backoff: float,
        reply_timeout: float,
        bar: Any,
        url: str,
    ) -> None:
        self.ws = ws
        self.result = result
        self.window = window
        self.pacer = pacer
        self.base_backoff = self.backoff = backoff
        self.reply_timeout = reply_timeout
        self.bar = bar
        self.url = url
        self.pending: dict[int, Payload] = {}
        self.refused: dict[int, Payload] = {}
        self.changed = asyncio.Event()
        self.closed: BaseException | None = None

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
        number = message.get("id")
        if kind not in ("published", "error") or not isinstance(number, int):
            return  # our events coming back, or a reply to no publish of ours
        payload = self.pending.pop(number, None)
        if payload is None:
            return
        if kind == "published":
            self.result.published += 1
            if self.refused and number > min(self.refused):
                self.result.reordered += 1
            if self.bar is not None:
                self.bar.update(1)
        else:
            data = message.get("data") or {}
            code = data.get("code") if isinstance(data, dict) else None
            if code == "rate_limited":
                self.refused[number] = payload
            else:
                self.result.failed += 1
                self.result.last_error = f"{code}: {data.get('message')}"
                logger.warning("the server refused event %d: %s", number, self.result.last_error)
        self.changed.set()

    async def wait_change(self) -> None:
        if self.closed is not None:
            raise ConnectionFailed(self._closed_text())
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), self.reply_timeout)
        except TimeoutError:
            raise ConnectionFailed(
                f"{self.url} left {len(self.pending)} publishes unanswered for "
                f"{self.reply_timeout:g}s"
            ) from None
        if self.closed is not None and (self.pending or self.refused):
            raise ConnectionFailed(self._closed_text())

    def _closed_text(self) -> str:
        closed = self.closed
        if isinstance(closed, ConnectionClosed):
            return closed_message(self.url, closed)
        return f"{self.url} closed the connection"

    # Sending

    async def _send(self, number: int, payload: Payload) -> None:
        if self.pacer is not None:
            await self.pacer.take()
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
            raise ConnectionFailed(closed_message(self.url, exc)) from None

    async def publish(self, number: int, payload: Payload) -> None:
        """Send one publish once the window and the pace allow (after any resends)."""
        while True:
            if self.refused:
                await self.recover()
            if len(self.pending) < self.window:
                break
            await self.wait_change()
        await self._send(number, payload)

    async def recover(self) -> None:
        """Resend the refused publishes in order, one at a time, pausing between refusals."""
        while self.pending:
            await self.wait_change()
        if self.window > 1:
            logger.info("the server refused a publish (rate_limited): one at a time from now")
            self.window = 1
        while self.refused:
            number = min(self.refused)
            payload = self.refused.pop(number)
            await asyncio.sleep(self.backoff)
            self.result.retried += 1
            if self.bar is not None:
                self.bar.set_postfix(retried=self.result.retried, refresh=False)
            await self._send(number, payload)
            while number in self.pending:
                await self.wait_change()
            if number in self.refused:
                self.backoff = min(self.backoff * 2, 2.0)
            else:
                self.backoff = self.base_backoff

    async def finish(self) -> None:
        """Wait until every publish is answered (resending the refused ones)."""
        while self.pending or self.refused:
            if self.refused and not self.pending:
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
) -> ReplayResult:
    """Publish ``source``'s events to the server at ``url`` again, in order; return the counts.

    ``speed`` scales the recorded timing (10: ten times faster; None: as fast as the
    server takes them). ``progress`` shows a tqdm bar (a widget in a notebook), or is a
    tqdm-like class to use. Raises ConnectionFailed if the server cannot be reached,
    closes the connection, or leaves publishes unanswered for ``reply_timeout`` seconds.
    """
    speed = _check_speed(speed)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer, not {window!r}")
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
    async with open_connection(url, client_id=client_id, token=token) as ws:
        try:
            greeting = protocol.decode(await asyncio.wait_for(ws.recv(), OPEN_TIMEOUT))
        except (ConnectionClosed, TimeoutError, ProtocolError) as exc:
            raise ConnectionFailed(f"{url} did not greet like a GatheRing server: {exc}") from None
        data = greeting.get("data") or {}
        result.acknowledged = "epoch" in data
        bar = _bar(progress, result.total, "replay")
        publisher = _Publisher(
            ws,
            result,
            window=window,
            pacer=pacer,
            backoff=backoff,
            reply_timeout=reply_timeout,
            bar=bar,
            url=url,
        )
        reader = asyncio.create_task(publisher.read(), name="replay-replies")
        schedule = _Schedule(times, speed)
        try:
            for number, payload in enumerate(payloads):
                await schedule.wait(number)
                if not result.acknowledged:
                    await publisher._send(number, payload)
                    publisher.pending.clear()
                    result.published += 1
                    if bar is not None:
                        bar.update(1)
                    continue
                await publisher.publish(number, payload)
            await publisher.finish()
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
            result.elapsed = time.monotonic() - schedule.start
            if bar is not None:
                bar.close()
    if result.reordered:
        logger.warning(
            "%d events were published ahead of an earlier one the server refused",
            result.reordered,
        )
    return result


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
