"""EventFrame: a live pandas DataFrame of the events a client received.

Appending is cheap (amortised O(1), no pandas call): each message becomes one row tuple
(its fields taken in one C call), and rows move into per-column buffers in chunks of
``CHUNK_ROWS``, or as soon as the frame is read; nothing is converted until then. Reading
``.df`` builds the whole DataFrame with vectorised conversions and caches it until the next
change, so a renderer that polls ``version`` and reads ``tail()`` stays cheap on a fast
stream. With ``max_rows`` the oldest rows are evicted and counted in ``dropped``; nothing is
dropped silently.

Columns (``COLUMNS``), one row per message:

==================  ===================================================================
received_at         when this side received it, ``datetime64[us, UTC]``
type                the message ``type``
event_id            the server's ``event_id`` (missing for non-event messages)
seq                 the bus sequence number, nullable ``Int64`` (absent on old servers)
epoch               the server's history epoch (absent on old servers)
timestamp           the server's ``timestamp``, ``datetime64[us, UTC]`` (NaT if unparsable)
source_agent_id     nullable ``Int64``; ``object`` if any value is not an integer
circle_id           likewise
project_id          likewise
data                the ``data`` dict, as received (stored by reference, not copied)
latency_ms          ``received_at - timestamp`` in milliseconds, ``float64`` (NaN if unknown)
client_id           the frame's ``client_id`` at the time the row was appended
==================  ===================================================================

Text columns use pandas' default string dtype (``str`` on pandas 3, ``object`` before).
The index is the arrival number since the last ``clear()``: rows keep their label when older
rows are evicted, so ``df.index[0] == frame.dropped``.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import threading
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from enum import Enum
from itertools import count, islice
from operator import itemgetter
from os import PathLike
from time import time as _now
from typing import TYPE_CHECKING, Any, cast, overload

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["CHUNK_ROWS", "COLUMNS", "EventFrame", "read_csv", "read_parquet"]

logger = logging.getLogger(__name__)

COLUMNS: tuple[str, ...] = (
    "received_at",
    "type",
    "event_id",
    "seq",
    "epoch",
    "timestamp",
    "source_agent_id",
    "circle_id",
    "project_id",
    "data",
    "latency_ms",
    "client_id",
)

# Buffered fields, in storage order (latency_ms is derived on read).
_FIELDS: tuple[str, ...] = tuple(c for c in COLUMNS if c != "latency_ms")
# The fields a row takes from its message, in storage order (all but received_at, client_id).
_MESSAGE_FIELDS = _FIELDS[1:-1]
_TAKE = itemgetter(*_MESSAGE_FIELDS)
_TYPE, _EPOCH, _TIMESTAMP = (_MESSAGE_FIELDS.index(n) for n in ("type", "epoch", "timestamp"))
#: Rows appended one by one are moved into the column buffers this many at a time (and
#: whenever the frame is read): one transposition in C instead of eleven appends per row.
#: Few, so most row tuples are gone before the garbage collector's next young collection
#: (1,024 measured 0.1-0.2 us per event slower, all of it in the collector).
CHUNK_ROWS = 32
_ID_COLUMNS = ("seq", "source_agent_id", "circle_id", "project_id")
_TIME_COLUMNS = ("received_at", "timestamp")
_TEXT_COLUMNS = ("type", "event_id", "epoch", "client_id")

# Shared copies of repeated strings (types, epochs): one object instead of one per row.
_INTERNED: dict[str, str] = {}
_INTERN_LIMIT = 10_000


def _intern(value: Any) -> Any:
    if value.__class__ is not str:
        return value
    shared = _INTERNED.get(value)
    if shared is not None:
        return shared
    if len(_INTERNED) < _INTERN_LIMIT:
        _INTERNED[value] = value
    return value


def _short(value: Any, limit: int = 120) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_type(message: Any) -> str:
    """Return the message's type as a plain str, or raise naming the bad value."""
    if not isinstance(message, dict):
        raise TypeError(f"message must be a dict, got {type(message).__name__}: {_short(message)}")
    if "type" not in message:
        raise ValueError(f"message has no 'type': {_short(message)}")
    kind = message["type"]
    if isinstance(kind, Enum) and isinstance(kind.value, str):
        kind = kind.value
    if not isinstance(kind, str):
        raise TypeError(f"message type must be a str, got {type(kind).__name__}: {_short(kind)}")
    if not kind:
        raise ValueError(f"message type must not be empty: {_short(message)}")
    return _intern(str.__str__(kind))


def _check_received_at(received_at: Any) -> float:
    if isinstance(received_at, bool) or not isinstance(received_at, int | float):
        raise TypeError(
            "received_at must be epoch seconds (int or float), got "
            f"{type(received_at).__name__}: {_short(received_at)}"
        )
    return float(received_at)


def _check_timestamp(timestamp: Any) -> str | None:
    """A non-str timestamp: a datetime becomes ISO text, anything else unknown (None)."""
    if isinstance(timestamp, datetime):
        return timestamp.isoformat()
    return str(timestamp) if isinstance(timestamp, str) else None


def _extract(message: Any, received_at: float, client_id: str | None) -> tuple[Any, ...]:
    """Split one wire message into the buffered fields, in ``_FIELDS`` order.

    ``EventFrame.append`` inlines the same steps; tests check that both agree.
    """
    kind = message.get("type") if message.__class__ is dict else None
    if kind.__class__ is not str or not kind:
        kind = _check_type(message)
    get = message.get
    timestamp = get("timestamp")
    if timestamp.__class__ is not str and timestamp is not None:
        timestamp = _check_timestamp(timestamp)
    return (
        received_at,
        _intern(kind),
        get("event_id"),
        get("seq"),
        _intern(get("epoch")),
        timestamp,
        get("source_agent_id"),
        get("circle_id"),
        get("project_id"),
        get("data"),
        client_id,
    )


class EventFrame:
    """A growing (optionally bounded) table of received wire messages, read as a DataFrame.

    ``max_rows`` keeps only the most recent rows; the evicted ones are counted in
    ``dropped``. ``client_id`` fills the ``client_id`` column of the rows appended while it
    is set. All methods are thread-safe: the event loop may append while another thread reads.
    """

    def __init__(self, max_rows: int | None = None, *, client_id: str | None = None) -> None:
        if max_rows is not None:
            if isinstance(max_rows, bool) or not isinstance(max_rows, int):
                raise TypeError(
                    f"max_rows must be a positive int or None, got {type(max_rows).__name__}: "
                    f"{_short(max_rows)}"
                )
            if max_rows <= 0:
                raise ValueError(f"max_rows must be a positive int or None, got {max_rows}")
        self._max_rows = max_rows
        self._client_id = self._checked_client_id(client_id)
        self._lock = threading.Lock()
        self._versions = count(1)  # next() is atomic: appends need no lock
        self._version = 0
        self._dropped = 0
        self._cache: pd.DataFrame | None = None
        self._cache_version = -1
        self._flat_cache: tuple[int, int | None, pd.DataFrame] | None = None
        self._reset_buffers()

    @staticmethod
    def _checked_client_id(client_id: Any) -> str | None:
        if client_id is not None and not isinstance(client_id, str):
            raise TypeError(
                f"client_id must be a str or None, got {type(client_id).__name__}: "
                f"{_short(client_id)}"
            )
        return client_id

    def _reset_buffers(self) -> None:
        # Unbounded: append-only lists, so a reader can take (lists, length) under the lock and
        # slice outside it. Bounded: deques that evict on append, copied under the lock.
        self._columns: tuple[list[Any] | deque[Any], ...] = tuple(
            [] if self._max_rows is None else deque(maxlen=self._max_rows) for _ in _FIELDS
        )
        # Rows appended one by one, not yet in the columns: (received_at, the
        # _MESSAGE_FIELDS of the message, client_id). Bounded, at most max_rows of them.
        self._pending: list[tuple[float, tuple[Any, ...], str | None]] = []
        # Bounded: pending rows are at most an eighth of max_rows more kept.
        self._chunk = (
            CHUNK_ROWS if self._max_rows is None else min(CHUNK_ROWS, max(1, self._max_rows // 8))
        )

    def _settle(self) -> None:
        """Move the pending rows into the column buffers (the lock is held).

        ``append`` adds rows to the end of ``_pending`` without the lock while this runs:
        only the rows there now are taken, and removed from the front.
        """
        pending = self._pending
        taken = len(pending)
        if not taken:
            return
        rows = pending[:taken]
        del pending[:taken]
        received, values, clients = zip(*rows, strict=True)
        fields: list[Sequence[Any]] = list(zip(*values, strict=True))
        get = _INTERNED.get
        fields[_TYPE] = [get(kind) or _intern(kind) for kind in fields[_TYPE]]
        fields[_EPOCH] = [get(epoch) or _intern(epoch) for epoch in fields[_EPOCH]]
        if self._max_rows is not None:
            size = len(self._columns[-1]) + taken
            self._dropped += max(0, size - self._max_rows)
        for buffer, column in zip(self._columns, (received, *fields, clients), strict=True):
            buffer.extend(column)

    # -- properties -------------------------------------------------------------------------

    @property
    def max_rows(self) -> int | None:
        """The most rows kept (older ones are evicted), or None for no limit."""
        return self._max_rows

    @property
    def client_id(self) -> str | None:
        """The value written in the ``client_id`` column of rows appended from now on."""
        return self._client_id

    @client_id.setter
    def client_id(self, value: str | None) -> None:
        self._client_id = self._checked_client_id(value)

    @property
    def dropped(self) -> int:
        """How many rows ``max_rows`` evicted since the last ``clear()``."""
        with self._lock:
            self._settle()
            return self._dropped

    @property
    def version(self) -> int:
        """A counter that changes on every append, extend and clear (poll it to redraw)."""
        return self._version

    def __len__(self) -> int:
        with self._lock:
            self._settle()
            return len(self._columns[-1])

    def __repr__(self) -> str:
        return (
            f"<EventFrame rows={len(self)} max_rows={self._max_rows} dropped={self.dropped} "
            f"version={self._version} client_id={self._client_id!r}>"
        )

    def _repr_html_(self) -> str:
        from html import escape

        table: str = self.tail(10)._repr_html_()  # type: ignore[operator]
        return f"<p>{escape(repr(self))}</p>" + table

    # -- writing ----------------------------------------------------------------------------

    def append(self, message: Mapping[str, Any], received_at: float | None = None) -> None:
        """Add one wire message received at ``received_at`` (epoch seconds; default now).

        Any dict with a str ``"type"`` is accepted; missing fields become nulls.
        """
        # The hot path: one C call takes the fields of a complete envelope (every event our
        # server sends); anything else (missing keys, an Enum type, a datetime) takes _extract.
        if received_at is None:
            received_at = _now()
        elif received_at.__class__ is not float:
            received_at = _check_received_at(received_at)
        values: tuple[Any, ...] | None = None
        if message.__class__ is dict:
            try:
                values = _TAKE(message)
            except KeyError:
                pass
            else:
                kind = values[_TYPE]
                timestamp = values[_TIMESTAMP]
                if (
                    kind.__class__ is not str
                    or not kind
                    or (timestamp.__class__ is not str and timestamp is not None)
                ):
                    values = None
        if values is None:
            values = _extract(message, received_at, None)[1:-1]
        # No lock: list.append is atomic, and readers take only the first rows of _pending
        # (under the lock); a fresh number from the counter makes every change visible.
        pending = self._pending
        pending.append((received_at, values, self._client_id))
        if len(pending) >= self._chunk:
            with self._lock:
                self._settle()
        self._version = next(self._versions)

    def extend(
        self, messages: Iterable[Mapping[str, Any]], received_at: float | None = None
    ) -> None:
        """Add several messages, all received at ``received_at`` (default now).

        Either every message is added or, if one is invalid, none is.
        """
        if isinstance(messages, Mapping):
            raise TypeError(
                f"extend takes an iterable of messages, got one message: {_short(messages)}"
            )
        received = _now() if received_at is None else _check_received_at(received_at)
        client_id = self._client_id
        rows = [_extract(message, received, client_id) for message in messages]
        if not rows:
            return
        columns = list(zip(*rows, strict=True))
        with self._lock:
            self._settle()  # rows appended before these go first
            if self._max_rows is not None:
                self._dropped += max(0, len(self._columns[-1]) + len(rows) - self._max_rows)
            for buffer, values in zip(self._columns, columns, strict=True):
                buffer.extend(values)
            self._version = next(self._versions)

    def clear(self) -> None:
        """Remove every row and reset ``dropped``."""
        with self._lock:
            self._reset_buffers()
            self._dropped = 0
            self._version = next(self._versions)
            self._cache = None
            self._flat_cache = None
        logger.debug("event frame cleared")

    # -- reading ----------------------------------------------------------------------------

    @property
    def df(self) -> pd.DataFrame:
        """All kept rows as a DataFrame (cached until the next change; a cheap copy each read)."""
        with self._lock:
            if self._cache is not None and self._cache_version == self._version:
                return _for_reader(self._cache)
            self._settle()
            version = self._version
            start = self._dropped
            size = len(self._columns[-1])
            if self._max_rows is None:
                lists = cast("tuple[list[Any], ...]", self._columns)
                snapshot = None
            else:
                snapshot = [list(column) for column in self._columns]
        if snapshot is None:
            # Append-only lists: the first ``size`` rows never change, so copy them unlocked
            # (one slice is atomic under the GIL).
            snapshot = [column[:size] for column in lists]
        frame = _build(snapshot, start)
        with self._lock:
            if self._version == version:
                self._cache = frame
                self._cache_version = version
        return _for_reader(frame)

    @property
    def df_flat(self) -> pd.DataFrame:
        """``df`` plus one ``data.<key>`` column per key of the data dicts (nested keys dotted)."""
        return self.to_pandas(flatten=True)

    def to_pandas(self, flatten: bool = False, *, max_level: int | None = None) -> pd.DataFrame:
        """Return the rows as a DataFrame; with ``flatten``, add ``data.*`` columns.

        ``max_level`` limits how deep nested data dicts are flattened (None: all the way).
        """
        if not flatten:
            return self.df
        version = self._version
        cached = self._flat_cache
        if cached is not None and cached[0] == version and cached[1] == max_level:
            return _for_reader(cached[2])
        base = self.df
        flat = _flatten(base, max_level)
        self._flat_cache = (version, max_level, flat)
        return _for_reader(flat)

    def tail(self, n: int = 10) -> pd.DataFrame:
        """The last ``n`` rows, built without materialising the whole frame."""
        if isinstance(n, bool) or not isinstance(n, int):
            raise TypeError(f"n must be an int, got {type(n).__name__}: {_short(n)}")
        n = max(n, 0)
        with self._lock:
            self._settle()
            size = len(self._columns[-1])
            n = min(n, size)
            start = self._dropped + size - n
            if self._max_rows is None:
                lists = cast("tuple[list[Any], ...]", self._columns)
                snapshot = [column[size - n :] for column in lists]
            else:
                snapshot = [list(islice(reversed(column), n))[::-1] for column in self._columns]
        return _build(snapshot, start)

    # -- analysis ---------------------------------------------------------------------------

    def _source(self, columns: Iterable[str]) -> pd.DataFrame:
        """``df``, or ``df_flat`` when a ``data.*`` column is asked for; check the names."""
        names = list(columns)
        frame = self.df_flat if any(name.startswith("data.") for name in names) else self.df
        missing = [name for name in names if name not in frame.columns]
        if missing:
            raise KeyError(
                f"unknown column {missing[0]!r}; columns are {', '.join(map(str, frame.columns))}"
            )
        return frame

    def counts(self, by: str | Sequence[str] = "type") -> pd.Series:
        """How many rows per value of ``by`` (a column or a list of columns), most first.

        Nulls are counted as their own group. ``data.<key>`` columns may be used.
        """
        names = [by] if isinstance(by, str) else list(by)
        if not names:
            raise ValueError("by must name at least one column")
        if "data" in names:
            raise ValueError("cannot count by 'data' (dicts); use a 'data.<key>' column")
        frame = self._source(names)
        if len(names) == 1:
            result = frame[names[0]].value_counts(dropna=False)
        else:
            result = frame.value_counts(subset=names, dropna=False)
        return result.sort_values(ascending=False, kind="stable").astype("int64")

    def rate(
        self,
        freq: str = "1s",
        by: str | Sequence[str] | None = None,
        *,
        on: str = "received_at",
    ) -> pd.DataFrame:
        """Events per ``freq`` interval, indexed by interval start, empty intervals as 0.

        Time is ``received_at`` (when this side saw the event, always known) unless
        ``on="timestamp"`` (when the server stamped it; rows without one are skipped).
        With ``by``, one column per value (e.g. per type); without, a single ``events`` column.
        """
        import pandas as pd

        if on not in _TIME_COLUMNS:
            raise ValueError(f"on must be 'received_at' or 'timestamp', got {on!r}")
        names = [] if by is None else [by] if isinstance(by, str) else list(by)
        frame = self._source([on, *names])
        frame = frame[frame[on].notna()]
        grouper = pd.Grouper(key=on, freq=freq)
        if not names:
            counts = frame.groupby(grouper).size()
            result = counts.to_frame("events")
        else:
            counts = frame.groupby([grouper, *names], dropna=False).size()
            result = counts.unstack(names, fill_value=0)
            if len(result):
                result = result.asfreq(freq, fill_value=0)
        result.index.name = on
        return result.astype("int64")

    @overload
    def latency(self, percentiles: Sequence[float] = ..., by: None = None) -> pd.Series: ...
    @overload
    def latency(self, percentiles: Sequence[float], by: str | Sequence[str]) -> pd.DataFrame: ...
    @overload
    def latency(self, *, by: str | Sequence[str]) -> pd.DataFrame: ...

    def latency(
        self,
        percentiles: Sequence[float] = (50, 90, 99),
        by: str | Sequence[str] | None = None,
    ) -> pd.Series | pd.DataFrame:
        """Latency (``latency_ms``) summary: count, mean, the percentiles (``p50``...), max.

        Rows without a latency (no parsable timestamp) are left out. With ``by``, one row per
        group. Negative values mean the sender's clock is ahead of ours.
        """
        import pandas as pd

        points = [float(p) for p in percentiles]
        bad = [p for p in points if not 0 <= p <= 100]
        if bad:
            raise ValueError(f"percentiles must be between 0 and 100, got {bad[0]:g}")
        if by is None:
            return _latency_summary(self.df["latency_ms"], points)
        names = [by] if isinstance(by, str) else list(by)
        frame = self._source(names)
        rows = {
            key: _latency_summary(group["latency_ms"], points)
            for key, group in frame.groupby(names if len(names) > 1 else names[0], dropna=False)
        }
        result = pd.DataFrame.from_dict(rows, orient="index")
        if result.empty:
            empty = _latency_summary(pd.Series([], dtype="float64"), points)
            result = pd.DataFrame(columns=empty.index, dtype="float64")
        return result

    # -- export -----------------------------------------------------------------------------

    def to_parquet(self, path: str | PathLike[str], **kwargs: Any) -> None:
        """Write the rows to a Parquet file (``data`` as JSON text); see ``read_parquet``.

        Needs pyarrow (``pip install 'gathering-lab[parquet]'``).
        """
        try:
            import pyarrow  # noqa: F401
        except ImportError as exc:
            raise ImportError(
                "to_parquet needs pyarrow: pip install 'gathering-lab[parquet]' (or pyarrow)"
            ) from exc
        _for_export(self.df).to_parquet(path, engine="pyarrow", **kwargs)

    def to_csv(self, path: str | PathLike[str], **kwargs: Any) -> None:
        """Write the rows to a CSV file (``data`` as JSON text); see ``read_csv``."""
        _for_export(self.df).to_csv(path, **kwargs)


# -- building -------------------------------------------------------------------------------


_NAT = -(2**63)  # int64 value of NaT


@functools.cache
def _text_dtype() -> Any:
    """pandas' default string dtype (``str``), or None before pandas 3 (object columns)."""
    import pandas as pd

    if int(pd.__version__.split(".")[0]) < 3:
        return None
    return pd.Series([], dtype="str").dtype


@functools.cache
def _arrow() -> Any:
    """pyarrow if installed (used to build columns faster), else None."""
    try:
        import pyarrow
    except ImportError:
        return None
    return pyarrow


# The converters below take private lists: C code (pyarrow) may hold a pointer into a list's
# storage while it works, so it must never read a buffer another thread appends to.


def _string_array(values: list[Any]) -> Any:
    import pandas as pd

    dtype = _text_dtype()
    if dtype is None:
        return _object_array(values)
    size = len(values)
    first = values[0] if size else None
    if isinstance(first, str) and values[-1] == first and values.count(first) == size:
        # One repeated value (client_id, usually epoch): no per-element conversion.
        return pd.Series(first, index=pd.RangeIndex(size), dtype=dtype).array
    pa = _arrow()
    if pa is not None and getattr(dtype, "storage", None) == "pyarrow":
        try:
            arrow = pa.array(values, type=pa.large_string())
        except (pa.ArrowException, TypeError):
            pass  # not all str: let pandas convert
        else:
            return pd.array(arrow, dtype=dtype)
    return pd.array(values, dtype=dtype)


def _int_array(name: str, values: list[Any]) -> Any:
    """Nullable Int64 if every value is an int or None, else object (ids may be strings)."""
    import numpy as np
    import pandas as pd
    from pandas.api.types import infer_dtype

    objects = _object_array(values)
    kind = infer_dtype(objects, skipna=True)
    if kind in ("integer", "empty"):
        mask = pd.isna(objects)
        try:
            integers = np.where(mask, 0, objects).astype(np.int64)
        except (OverflowError, TypeError, ValueError):
            logger.debug("%s has integers beyond int64, kept as object", name)
        else:
            return pd.arrays.IntegerArray(integers, mask)
    else:
        logger.debug("%s holds %s values, kept as object", name, kind)
    return pd.array(objects, dtype=object)


def _object_array(values: list[Any]) -> Any:
    import numpy as np

    # fromiter, unlike np.array, never turns nested lists into extra dimensions.
    return np.fromiter(values, dtype=object, count=len(values))


def _timestamps_us(values: list[str | None]) -> Any:
    """Parse ISO-8601 texts to int64 microseconds since the epoch, UTC; NaT if unparsable."""
    import numpy as np
    import pandas as pd

    pa = _arrow()
    if pa is not None:
        try:
            parsed = pa.array(values, type=pa.string()).cast(pa.timestamp("us", tz="UTC"))
        except (pa.ArrowException, TypeError):
            pass  # something arrow will not parse (naive, nanoseconds, junk): pandas decides
        else:
            return np.array(parsed.cast(pa.int64()).fill_null(_NAT).to_numpy(), dtype=np.int64)
    stamped = pd.to_datetime(pd.Series(values), format="ISO8601", utc=True, errors="coerce")
    return np.array(pd.DatetimeIndex(stamped).as_unit("us").asi8, dtype=np.int64)


def _utc(microseconds: Any) -> Any:
    import pandas as pd

    return pd.DatetimeIndex(microseconds.view("M8[us]")).tz_localize("UTC").array


def _build(columns: Sequence[list[Any]], start: int) -> pd.DataFrame:
    """Turn private copies of the column buffers into the typed DataFrame described in the
    module docstring, its index starting at ``start``."""
    import numpy as np
    import pandas as pd

    fields = dict(zip(_FIELDS, columns, strict=True))
    size = len(fields["received_at"])

    seconds = np.array(fields["received_at"], dtype=np.float64)
    finite = np.isfinite(seconds)
    received = np.rint(np.where(finite, seconds, 0.0) * 1e6).astype(np.int64)
    received[~finite] = _NAT
    stamped = _timestamps_us(fields["timestamp"])
    latency = (received.astype(np.float64) - stamped.astype(np.float64)) / 1e3
    latency[(received == _NAT) | (stamped == _NAT)] = np.nan

    data = {
        "received_at": _utc(received),
        "type": _string_array(fields["type"]),
        "event_id": _string_array(fields["event_id"]),
        "seq": _int_array("seq", fields["seq"]),
        "epoch": _string_array(fields["epoch"]),
        "timestamp": _utc(stamped),
        "source_agent_id": _int_array("source_agent_id", fields["source_agent_id"]),
        "circle_id": _int_array("circle_id", fields["circle_id"]),
        "project_id": _int_array("project_id", fields["project_id"]),
        "data": _object_array(fields["data"]),
        "latency_ms": latency,
        "client_id": _string_array(fields["client_id"]),
    }
    index = pd.RangeIndex(start, start + size)
    return pd.DataFrame(data, index=index, columns=list(COLUMNS), copy=False)


def _for_reader(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy of the cached frame that the reader may change without changing the cache."""
    import pandas as pd

    if _text_dtype() is not None or pd.get_option("mode.copy_on_write") is True:
        return frame.copy(deep=False)  # copy-on-write: shares memory until someone writes
    return frame.copy()


def _flatten(base: pd.DataFrame, max_level: int | None) -> pd.DataFrame:
    import pandas as pd

    records = [value if isinstance(value, dict) else {} for value in base["data"].tolist()]
    flat = pd.json_normalize(records, sep=".", max_level=max_level)
    flat.columns = [f"data.{name}" for name in flat.columns]
    flat.index = base.index
    return pd.concat([base, flat], axis=1)


def _latency_summary(values: pd.Series, points: Sequence[float]) -> pd.Series:
    import numpy as np
    import pandas as pd

    known = values.dropna().to_numpy(dtype=np.float64)
    summary: dict[str, float] = {"count": float(known.size)}
    if known.size:
        summary["mean"] = float(known.mean())
        for point, value in zip(points, np.percentile(known, points), strict=True):
            summary[f"p{point:g}"] = float(value)
        summary["max"] = float(known.max())
    else:
        summary["mean"] = math.nan
        summary.update({f"p{point:g}": math.nan for point in points})
        summary["max"] = math.nan
    return pd.Series(summary, name="latency_ms", dtype="float64")


# -- export and import ----------------------------------------------------------------------


def _objects(values: list[Any]) -> Any:
    return _object_array(values)


def _to_json(value: Any) -> str | None:
    if value is None:
        return None
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)


def _from_json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else None


def _for_export(frame: pd.DataFrame) -> pd.DataFrame:
    """A copy a file format can hold: ``data``, and ids that are not all integers, as JSON."""
    out = frame.copy(deep=False)
    out["data"] = _objects([_to_json(value) for value in frame["data"].tolist()])
    for name in _ID_COLUMNS:
        if out[name].dtype == object:
            out[name] = _objects([_to_json(value) for value in out[name].tolist()])
    return out


def _from_export(frame: pd.DataFrame, *, ids_as_json: bool) -> pd.DataFrame:
    import pandas as pd

    frame["data"] = _objects([_from_json(value) for value in frame["data"].tolist()])
    for name in _TEXT_COLUMNS:
        values = [value if isinstance(value, str) else None for value in frame[name].tolist()]
        frame[name] = _string_array(values)
    for name in _TIME_COLUMNS:
        if not isinstance(frame[name].dtype, pd.DatetimeTZDtype):
            frame[name] = pd.to_datetime(frame[name], format="ISO8601", utc=True)
        frame[name] = frame[name].dt.as_unit("us")
    for name in _ID_COLUMNS:
        if ids_as_json or frame[name].dtype != "Int64":
            values = [_from_json(value) for value in frame[name].tolist()]
            frame[name] = _int_array(name, values)
    if len(frame):
        first = int(frame.index[0])
        arrival = pd.RangeIndex(first, first + len(frame))
        if frame.index.equals(arrival):
            frame.index = arrival
    return frame


def read_parquet(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a file written by ``EventFrame.to_parquet`` back into the same DataFrame."""
    import pandas as pd

    return _from_export(pd.read_parquet(path, engine="pyarrow"), ids_as_json=False)


def read_csv(path: str | PathLike[str]) -> pd.DataFrame:
    """Read a file written by ``EventFrame.to_csv`` back into the same DataFrame.

    CSV cannot tell an integer id from the same digits as text: ids that were strings in a
    column that also held integers come back as written, since they are stored as JSON.
    """
    import pandas as pd

    dtypes: dict[str, Any] = {name: object for name in (*_TEXT_COLUMNS, *_ID_COLUMNS, "data")}
    dtypes["latency_ms"] = "float64"
    frame = pd.read_csv(path, index_col=0, dtype=dtypes, keep_default_na=False, na_values=[""])
    frame.index.name = None
    return _from_export(frame, ids_as_json=True)
