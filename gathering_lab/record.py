"""Record a server's traffic to Parquet or JSON lines, with each event's receive time.

::

    from gathering_lab.record import record, read_recording

    result = await record("ws://127.0.0.1:8000/ws/dashboard", "trace.parquet", count=1000)
    df = read_recording("trace.parquet")      # the columns of EventFrame.df, plus ``extra``

``gathering-lab record`` (in :mod:`gathering_lab.cli`) is the command-line face of
:func:`record`. Recording goes through a :class:`~gathering_lab.client.LabClient`, so a
dropped connection is resumed by ``seq`` and a loss is recorded as a row (``lab.gap``,
``lab.server.restarted``), never hidden.

File formats, chosen by the suffix:

- ``.jsonl``: one line per row, ``{"received_at": <epoch seconds>, "message": <envelope>}``,
  written and flushed line by line: the file is complete after any stop, even a kill.
- ``.parquet``: the columns of :meth:`EventFrame.to_parquet <gathering_lab.frame.EventFrame.
  to_parquet>` (``data`` and the ids as JSON text, so ``1`` and ``"1"`` stay apart) plus
  ``extra`` (JSON of envelope keys beyond those columns, usually null), written a row group
  at a time (every ``flush_rows`` rows or ``flush_interval`` seconds) with pyarrow's
  ``ParquetWriter`` and closed on every stop the process survives (end, Ctrl+C, SIGTERM).

With ``rotate_bytes`` the recording moves on to a new file once the current one reaches that
size: ``trace.parquet``, then ``trace.1.parquet``, ``trace.2.parquet``, ... (the suffix is
kept, so each part is a complete file of its own); :func:`read_recording` reads them all.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .frame import COLUMNS, EventFrame

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "FORMATS",
    "RecordResult",
    "Recorder",
    "read_recording",
    "record",
    "recording_format",
    "recording_parts",
    "write_demo_recording",
]

logger = logging.getLogger("gathering_lab.record")

#: Suffix -> format name.
FORMATS = {".parquet": "parquet", ".jsonl": "jsonl"}
#: Envelope keys stored in their own columns; the others go to ``extra``.
_ENVELOPE_KEYS = frozenset(
    {
        "type",
        "data",
        "event_id",
        "seq",
        "epoch",
        "timestamp",
        "source_agent_id",
        "circle_id",
        "project_id",
    }
)
_ID_COLUMNS = ("seq", "source_agent_id", "circle_id", "project_id")


def recording_format(path: str | os.PathLike[str]) -> str:
    """The format (``parquet`` or ``jsonl``) a file name asks for; ValueError if neither."""
    suffix = Path(path).suffix.lower()
    try:
        return FORMATS[suffix]
    except KeyError:
        raise ValueError(
            f"unknown recording format {suffix or '(no suffix)'!r} in {str(path)!r}: "
            "name the file *.parquet or *.jsonl"
        ) from None


def _part(path: Path, number: int) -> Path:
    return path if number == 0 else path.with_name(f"{path.stem}.{number}{path.suffix}")


def recording_parts(path: str | os.PathLike[str]) -> list[Path]:
    """The files of a recording, in order: ``path``, then ``stem.1.suffix``, ... that exist."""
    path = Path(path)
    parts = []
    number = 0
    while _part(path, number).exists():
        parts.append(_part(path, number))
        number += 1
    return parts


def _json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


class Recorder:
    """Writes wire messages with their receive time to a recording, rotating by size.

    ``write(message, received_at)`` takes one row; :meth:`close` (also on ``with`` exit)
    writes what is buffered and leaves every file complete. Refuses to overwrite an
    existing recording unless ``overwrite`` (which also removes its old numbered parts).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        rotate_bytes: int | None = None,
        flush_rows: int = 1000,
        flush_interval: float = 1.0,
        overwrite: bool = False,
        client_id: str | None = None,
    ) -> None:
        self.path = Path(path)
        self.format = self.check_path(self.path, overwrite=overwrite)
        if rotate_bytes is not None and (
            isinstance(rotate_bytes, bool) or not isinstance(rotate_bytes, int) or rotate_bytes < 1
        ):
            raise ValueError(
                f"rotate_bytes must be a positive integer or None, not {rotate_bytes!r}"
            )
        if isinstance(flush_rows, bool) or not isinstance(flush_rows, int) or flush_rows < 1:
            raise ValueError(f"flush_rows must be a positive integer, not {flush_rows!r}")
        if not (isinstance(flush_interval, int | float) and flush_interval > 0):
            raise ValueError(f"flush_interval must be a positive number, not {flush_interval!r}")
        for old in recording_parts(self.path):
            old.unlink()
        self.rotate_bytes = rotate_bytes
        self.flush_rows = flush_rows
        self.flush_interval = float(flush_interval)
        self.client_id = client_id
        #: Rows written (or buffered), files started, and row groups written.
        self.rows = 0
        self.files: list[Path] = []
        self.row_groups = 0
        self._buffer: list[tuple[float, dict[str, Any]]] = []
        self._last_flush = time.monotonic()
        self._file: Any = None  # the open text file (jsonl)
        self._writer: Any = None  # the open ParquetWriter
        self._closed = False
        self._open(0)

    @staticmethod
    def check_path(path: str | os.PathLike[str], *, overwrite: bool = False) -> str:
        """Check that a recording can be written at ``path``; return its format.

        Raises ValueError (unknown suffix), FileNotFoundError (no such directory),
        FileExistsError (it exists and not ``overwrite``), ImportError (Parquet without pyarrow).
        """
        path = Path(path)
        kind = recording_format(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"no such directory {str(path.parent)!r}")
        if recording_parts(path) and not overwrite:
            raise FileExistsError(
                f"{str(path)!r} exists: choose another name or overwrite it (--force)"
            )
        if kind == "parquet":
            _pyarrow()
        return kind

    # Files

    def _open(self, number: int) -> None:
        path = _part(self.path, number)
        if self.format == "jsonl":
            self._file = open(path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        else:
            pa, pq = _pyarrow()
            self._writer = pq.ParquetWriter(str(path), _schema(pa))
        self.files.append(path)
        logger.info("recording to %s", path)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    @property
    def current(self) -> Path:
        """The file being written."""
        return self.files[-1]

    def _size(self) -> int:
        if self._file is not None:
            return int(self._file.tell())
        return self.current.stat().st_size

    def _maybe_rotate(self) -> None:
        # The next part is opened by the next write: no empty part at the end.
        if self.rotate_bytes is not None and self._size() >= self.rotate_bytes:
            self._close_file()

    def _ensure_open(self) -> None:
        if self._file is None and self._writer is None:
            self._open(len(self.files))

    # Writing

    def write(self, message: dict[str, Any], received_at: float) -> None:
        """Record one message received at ``received_at`` (epoch seconds)."""
        if self._closed:
            raise ValueError(f"the recording {str(self.path)!r} is closed")
        self.rows += 1
        if self.format == "jsonl":
            self._ensure_open()
            line = json.dumps(
                {"received_at": received_at, "message": message},
                ensure_ascii=False,
                separators=(",", ":"),
                default=str,
            )
            self._file.write(line + "\n")
            self._file.flush()
            self._maybe_rotate()
            return
        self._buffer.append((received_at, message))
        if len(self._buffer) >= self.flush_rows:
            self.flush()

    def tick(self) -> None:
        """Write the buffered rows if ``flush_interval`` has passed since the last write."""
        if self._buffer and time.monotonic() - self._last_flush >= self.flush_interval:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows now (Parquet: one row group)."""
        self._last_flush = time.monotonic()
        if self._file is not None:
            self._file.flush()
            return
        if not self._buffer:
            return
        self._ensure_open()
        rows, self._buffer = self._buffer, []
        pa, _ = _pyarrow()
        self._writer.write_table(_table(pa, rows, self.client_id))
        self.row_groups += 1
        logger.info("wrote %d rows to %s (%d rows in all)", len(rows), self.current.name, self.rows)
        self._maybe_rotate()

    def close(self) -> None:
        """Write what is buffered and close the file; safe to call twice."""
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._close_file()

    def __enter__(self) -> Recorder:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<Recorder {self.path} {self.format} rows={self.rows} files={len(self.files)}>"


def _pyarrow() -> tuple[Any, Any]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise ImportError(
            "recording to Parquet needs pyarrow: pip install 'gathering-lab[parquet]' "
            "(or record to a .jsonl file)"
        ) from exc
    return pa, pq


def _schema(pa: Any) -> Any:
    utc = pa.timestamp("us", tz="UTC")
    types = {
        "received_at": utc,
        "timestamp": utc,
        "latency_ms": pa.float64(),
    }
    return pa.schema(
        [(name, types.get(name, pa.string())) for name in COLUMNS] + [("extra", pa.string())]
    )


def _table(pa: Any, rows: list[tuple[float, dict[str, Any]]], client_id: str | None) -> Any:
    """One row group: the schema's columns from (received_at, message) pairs."""
    import numpy as np

    from .frame import _NAT, _timestamps_us

    received = np.array([r for r, _ in rows], dtype=np.float64)
    received_us = np.rint(received * 1e6).astype(np.int64)
    messages = [m for _, m in rows]
    texts = [m.get("timestamp") if isinstance(m.get("timestamp"), str) else None for m in messages]
    stamped = _timestamps_us(texts)
    latency = (received_us - stamped) / 1e3
    latency = np.where(stamped == _NAT, np.nan, latency)
    utc = pa.timestamp("us", tz="UTC")

    def text(key: str) -> Any:
        return pa.array(
            [v if isinstance(v := m.get(key), str) else None for m in messages], pa.string()
        )

    def extra(message: dict[str, Any]) -> str | None:
        rest = {k: v for k, v in message.items() if k not in _ENVELOPE_KEYS}
        for key in ("event_id", "epoch", "timestamp", "type"):
            value = message.get(key)
            if value is not None and not isinstance(value, str):
                rest[key] = value  # kept as sent, not lost to the text column
        return _json(rest) if rest else None

    columns = {
        "received_at": pa.array(received_us, utc),
        "type": text("type"),
        "event_id": text("event_id"),
        "seq": pa.array([_json(m.get("seq")) for m in messages], pa.string()),
        "epoch": text("epoch"),
        "timestamp": pa.array(np.where(stamped == _NAT, 0, stamped), utc, mask=stamped == _NAT),
        "source_agent_id": pa.array([_json(m.get("source_agent_id")) for m in messages]),
        "circle_id": pa.array([_json(m.get("circle_id")) for m in messages], pa.string()),
        "project_id": pa.array([_json(m.get("project_id")) for m in messages], pa.string()),
        "data": pa.array([_json(m.get("data")) for m in messages], pa.string()),
        "latency_ms": pa.array(latency, pa.float64()),
        "client_id": pa.array([client_id] * len(messages), pa.string()),
        "extra": pa.array([extra(m) for m in messages], pa.string()),
    }
    columns["source_agent_id"] = columns["source_agent_id"].cast(pa.string())
    return pa.table(columns, schema=_schema(pa))


def write_demo_recording(
    path: str | os.PathLike[str],
    count: int = 200,
    *,
    seed: int = 0,
    rate: float = 20.0,
    start: float = 1_700_000_000.0,
    overwrite: bool = False,
) -> Path:
    """Write a recording of the seeded demo story (:mod:`gathering_lab.traffic`), no server.

    ``count`` events, one every ``1/rate`` seconds from ``start`` (epoch seconds), with
    ``seq`` 1, 2, ... and fixed ids, epoch and 2 ms of latency: the same arguments always
    give the same rows. Returns ``path``.
    """
    from .protocol import format_timestamp
    from .traffic import demo_messages

    if not rate > 0:
        raise ValueError(f"rate must be > 0 events per second, not {rate!r}")
    with Recorder(path, overwrite=overwrite, client_id="demo-recorder") as recorder:
        for number, payload in enumerate(demo_messages(count, seed=seed), 1):
            received_at = start + (number - 1) / rate
            sent_at = datetime.fromtimestamp(received_at - 0.002, tz=UTC)
            message = {
                **payload,
                "event_id": f"evt_{seed:04x}{number:012x}",
                "timestamp": format_timestamp(sent_at),
                "seq": number,
                "epoch": f"demo-{seed}",
            }
            recorder.write(message, received_at)
    return Path(path)


# Reading


def read_recording(path: str | os.PathLike[str]) -> pd.DataFrame:
    """Read a recording (all its rotated parts, in order) into a DataFrame.

    The columns are those of :attr:`EventFrame.df <gathering_lab.frame.EventFrame.df>` plus
    ``extra`` (a dict of envelope keys beyond them, or None); the index counts rows from 0.
    A ``.jsonl`` file may also hold plain envelopes, one per line (``listen --json``): their
    receive time is then unknown (NaT). Raises FileNotFoundError or ValueError naming the file.
    """
    import pandas as pd

    path = Path(path)
    kind = recording_format(path)
    parts = recording_parts(path)
    if not parts:
        raise FileNotFoundError(f"no such recording {str(path)!r}")
    frames = [_read_part(part, kind) for part in parts]
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame.index = pd.RangeIndex(len(frame))
    return frame


def _read_part(path: Path, kind: str) -> pd.DataFrame:
    if kind == "parquet":
        from .frame import read_parquet

        _pyarrow()
        try:
            frame = read_parquet(path)
        except Exception as exc:  # pyarrow raises several kinds for a damaged file
            raise ValueError(f"cannot read {str(path)!r} as Parquet: {exc}") from None
        if "extra" in frame.columns:
            frame["extra"] = [
                json.loads(v) if isinstance(v, str) else None for v in frame["extra"].tolist()
            ]
        return frame
    events = EventFrame()
    extras: list[Any] = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{str(path)!r} line {number}: not JSON ({exc.msg})") from None
            if isinstance(row, dict) and isinstance(row.get("message"), dict):
                message, received_at = row["message"], row.get("received_at")
            else:
                message, received_at = row, None
            if not isinstance(received_at, int | float) or isinstance(received_at, bool):
                received_at = math.nan
            try:
                events.append(message, received_at)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{str(path)!r} line {number}: {exc}") from None
            rest = {k: v for k, v in message.items() if k not in _ENVELOPE_KEYS}
            extras.append(rest or None)
    frame = events.df
    frame["extra"] = extras
    return frame


# Recording from a server


@dataclass(slots=True)
class RecordResult:
    """What :func:`record` did."""

    #: Events recorded (gap and restart rows not included).
    events: int = 0
    #: All rows written: events plus ``lab.gap`` / ``lab.server.restarted`` rows.
    rows: int = 0
    gaps: int = 0
    reconnects: int = 0
    elapsed: float = 0.0
    files: list[Path] = field(default_factory=list)
    #: Why it stopped: ``count``, ``duration``, ``stopped`` (Ctrl+C, SIGTERM) or ``closed``.
    reason: str = ""

    @property
    def rate(self) -> float:
        """Events recorded per second."""
        return self.events / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def bytes(self) -> int:
        """The size of the recording's files on disk."""
        return sum(path.stat().st_size for path in self.files if path.exists())


class _RecordingFrame(EventFrame):
    """A frame that keeps nothing: each row goes straight to a Recorder."""

    def __init__(self, recorder: Recorder, count: int | None, done: asyncio.Event) -> None:
        super().__init__(1)
        self.recorder = recorder
        self.count = count
        self.events = 0
        self.done = done

    def append(self, message: Any, received_at: float | None = None) -> None:
        if received_at is None:
            received_at = time.time()
        marker = str(message.get("type", "")).startswith("lab.")
        if not marker:
            if self.count is not None and self.events >= self.count:
                return  # past --count: arrived in the same read as the last one
            self.events += 1
        self.recorder.write(message, received_at)
        if self.count is not None and self.events >= self.count:
            self.done.set()

    def extend(self, messages: Iterable[Any], received_at: Any = None) -> None:
        for message in messages:
            self.append(message, received_at)


async def record(
    url: str,
    path: str | os.PathLike[str],
    *,
    count: int | None = None,
    duration: float | None = None,
    types: Sequence[str] | None = None,
    token: str | None = None,
    client_id: str | None = None,
    rotate_bytes: int | None = None,
    overwrite: bool = False,
    flush_rows: int = 1000,
    flush_interval: float = 1.0,
    stop: asyncio.Event | None = None,
    progress: Callable[[RecordResult], None] | None = None,
    progress_interval: float = 0.5,
) -> RecordResult:
    """Record ``url``'s events to ``path`` until ``count`` events, ``duration`` seconds, or
    ``stop`` is set (or the task is cancelled); return what was recorded.

    ``types`` subscribes to these patterns only (``task.*``). The file is complete on
    return, also when cancelled. Raises ConnectionFailed if the server cannot be reached
    at first; later losses are resumed by the client and recorded as rows.
    """
    from .client import LabClient

    if count is not None and (isinstance(count, bool) or not isinstance(count, int) or count < 1):
        raise ValueError(f"count must be a positive integer or None, not {count!r}")
    if duration is not None and not (isinstance(duration, int | float) and 0 < duration < math.inf):
        raise ValueError(f"duration must be a positive number of seconds, not {duration!r}")
    recorder = Recorder(
        path,
        rotate_bytes=rotate_bytes,
        overwrite=overwrite,
        flush_rows=flush_rows,
        flush_interval=flush_interval,
        client_id=client_id,
    )
    done = asyncio.Event()
    frame = _RecordingFrame(recorder, count, done)
    client = LabClient(url, client_id, frame=frame, token=token)
    result = RecordResult(files=recorder.files)
    started = time.monotonic()

    def update() -> None:
        result.events = frame.events
        result.rows = recorder.rows
        result.gaps = client.gaps
        result.reconnects = client.reconnects
        result.elapsed = time.monotonic() - started

    try:
        await client.connect()
        recorder.client_id = client.client_id
        if types:
            await client.subscribe(list(types))
        deadline = None if duration is None else time.monotonic() + duration
        stopper = stop if stop is not None else asyncio.Event()
        waiters = [asyncio.ensure_future(done.wait()), asyncio.ensure_future(stopper.wait())]
        try:
            while True:
                timeout = progress_interval
                if deadline is not None:
                    timeout = min(timeout, max(0.0, deadline - time.monotonic()))
                finished, _ = await asyncio.wait(
                    waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
                )
                recorder.tick()
                update()
                if done.is_set():
                    result.reason = "count"
                    break
                if stopper.is_set():
                    result.reason = "stopped"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    result.reason = "duration"
                    break
                if client.status.startswith(("closed", "disconnected")):
                    result.reason = "closed"
                    logger.error("recording ended: %s", client.status)
                    break
                if progress is not None:
                    progress(result)
        finally:
            for waiter in waiters:
                waiter.cancel()
    except asyncio.CancelledError:
        result.reason = "stopped"
        raise
    finally:
        try:
            await asyncio.shield(client.close())
        finally:
            recorder.close()
            update()
            logger.info(
                "recorded %d events (%d rows) to %s", result.events, result.rows, recorder.path
            )
    if progress is not None:
        progress(result)
    return result
