"""See, not read: a live chart of events per second by type and a grid of the latest events.

Both are `anywidget <https://anywidget.dev>`_ widgets whose front end ships in the package
(``gathering_lab/static``: our ``rate_chart.js`` and ``event_grid.js``, and uPlot, MIT, for the
chart), so nothing is fetched from a CDN and a saved notebook shows them again without a
kernel. Like the live log they are redrawn by the controller's ticker (at most 5 times a
second, only when the frame changed) and each redraw reads only the rows appended since the
previous one; what is sent is small and bounded however fast events arrive: the chart's
window of per-second counts (``window`` bins per type) and the grid's latest ``limit`` rows.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Iterator
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

import anywidget
from traitlets import Bool, Instance, Int, List, TraitError, Unicode, observe, validate

from ..frame import EventFrame
from ..protocol import Filters
from .base import Cursor, apply_filters, check_patterns, describe_filters, short_json
from .controller import Controller

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["GRID_COLUMNS", "EventGrid", "RateChart", "arrange"]

logger = logging.getLogger("gathering_lab.widgets")

#: The grid's columns, in display order.
GRID_COLUMNS: tuple[str, ...] = ("seq", "received", "type", "agent", "circle", "project", "data")
_SOURCE_COLUMNS = [
    "seq", "received_at", "type", "source_agent_id", "circle_id", "project_id", "data"
]  # fmt: skip
#: The chart's series for the types beyond ``max_types``, added up.
OTHER = "other"


@cache
def _static(*names: str) -> str:
    """The text of files in gathering_lab/static, joined by newlines."""
    folder = resources.files("gathering_lab") / "static"
    return "\n".join(folder.joinpath(name).read_text(encoding="utf-8") for name in names)


class _FrameView(anywidget.AnyWidget):
    """An anywidget that the controller's ticker redraws from a frame (a Panel's lifecycle)."""

    filters = Instance(
        Filters, allow_none=True, help="show only the events these filters match (None: all)"
    )
    updates = Int(0, help="how many times new data was sent to the front end")

    def __init__(
        self, source: Any = None, *, frame: EventFrame | None = None, **kwargs: Any
    ) -> None:
        self._closed = True  # until fully built
        self._own_controller = not isinstance(source, Controller)
        self.controller = Controller.of(source)  # a bad source fails before a comm opens
        super().__init__(**kwargs)
        self.frame = frame
        self._cursor = Cursor()
        self._dirty = True
        self._closed = False
        self.controller.add_view(self)

    @property
    def shown_frame(self) -> EventFrame | None:
        """The frame this view shows (the one given, else the controller's)."""
        return self.frame if self.frame is not None else self.controller.frame

    @validate("filters")
    def _check_filters(self, proposal: Any) -> Filters | None:
        filters: Filters | None = proposal["value"]
        if filters is not None:
            try:
                check_patterns(filters.event_types)
            except ValueError as exc:
                raise TraitError(str(exc)) from None
        return filters

    def _tick(self, now: float) -> None:
        frame = self.shown_frame
        if self._dirty or not self._cursor.follows(frame):
            self._dirty = False
            self._reset()
            df = self._cursor.reset(frame)
            self._take(apply_filters(df, self.filters) if df is not None else None)
            self._push(now)
            return
        if self._cursor.changed():
            rows = self._cursor.new_rows()
            if rows is None:  # the frame was cleared
                self._dirty = True
                return
            self._take(apply_filters(rows, self.filters))
        self._push(now)

    def _reset(self) -> None:
        raise NotImplementedError

    def _take(self, df: pd.DataFrame | None) -> None:
        raise NotImplementedError

    def _push(self, now: float) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Stop redrawing and close the widget (and its controller if it made one)."""
        if not getattr(self, "_closed", True):
            self._closed = True
            self.controller.remove_view(self)
            if self._own_controller:
                self.controller.close()
        super().close()


class RateChart(_FrameView):
    """Events per second by type over the last ``window`` seconds, as a live line chart.

    ``RateChart(lab_or_client)`` follows the controller's frame; ``RateChart(frame=f)`` one
    frame. Counts are binned by receive time in whole seconds; the chart shows complete
    seconds only (the current one is still filling), so it moves once a second while events
    arrive. At most ``max_types`` types get their own line, the rest are added up as
    ``other`` (their number is ``other_types``).
    """

    _esm = Unicode().tag(sync=True)
    _css = Unicode().tag(sync=True)
    times: List[int] = List(help="the start of each one-second bin (epoch seconds)").tag(sync=True)
    names = List(Unicode(), help="the series drawn (event types), in legend order").tag(sync=True)
    values: List[list[int]] = List(help="events/s of each series, aligned with times").tag(
        sync=True
    )
    title = Unicode("events/s by type").tag(sync=True)
    height = Int(220, help="the plot's height in pixels (100-1000)").tag(sync=True)
    window = Int(60, help="how many seconds the chart shows (10-3600)")
    max_types = Int(8, help="how many types get their own line (1-20); the rest are 'other'")
    other_types = Int(0, help="types added up as 'other' because max_types was reached")

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        window: int = 60,
        max_types: int = 8,
        height: int = 220,
        **kwargs: Any,
    ) -> None:
        self._bins: dict[int, Counter[str]] = {}
        self._order: dict[str, None] = {}  # types by first appearance
        self._others: set[str] = set()
        self._sent_key: tuple[Any, ...] | None = None
        super().__init__(
            source,
            frame=frame,
            window=window,
            max_types=max_types,
            height=height,
            _esm=_static("uplot/uPlot.iife.min.js", "rate_chart.js"),
            _css=_static("uplot/uPlot.min.css", "rate_chart.css"),
            **kwargs,
        )

    @validate("window")
    def _check_window(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 10 <= value <= 3600:
            raise TraitError(f"window must be between 10 and 3600 seconds, not {value}")
        return int(value)

    @validate("max_types")
    def _check_max_types(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 20:
            raise TraitError(f"max_types must be between 1 and 20, not {value}")
        return int(value)

    @validate("height")
    def _check_height(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 100 <= value <= 1000:
            raise TraitError(f"height must be between 100 and 1000 pixels, not {value}")
        return int(value)

    @observe("window", "max_types", "filters")
    def _on_settings(self, change: Any) -> None:
        self._dirty = True  # the ticker rebuilds on the loop's thread

    def _reset(self) -> None:
        self._bins.clear()
        self._order.clear()
        self._others.clear()
        self._sent_key = None

    def _series_of(self, kind: str) -> str:
        if kind in self._order:
            return kind
        if len(self._order) < self.max_types:
            self._order[kind] = None
            return kind
        if kind not in self._others:
            self._others.add(kind)
            self.other_types = len(self._others)
            logger.info("rate chart: %r added up as %r (max_types=%d)", kind, OTHER, self.max_types)
        return OTHER

    def _take(self, df: pd.DataFrame | None) -> None:
        if df is None or not len(df):
            return
        oldest = math.floor(time.time()) - self.window
        seconds = df["received_at"].dt.as_unit("us").astype("int64").to_numpy() // 1_000_000
        recent = seconds >= oldest  # a whole frame on a rebuild: count only the window
        kinds = df["type"].to_numpy()[recent]
        counts = Counter(zip(seconds[recent].tolist(), kinds.tolist(), strict=True))
        series: dict[str, str] = {}
        for (second, kind), count in counts.items():  # dicts keep the rows' order
            if kind not in series:
                series[kind] = self._series_of(str(kind))
            self._bins.setdefault(second, Counter())[series[kind]] += count

    def _push(self, now: float) -> None:
        current = math.floor(time.time())  # the second still filling, not shown
        first = current - self.window
        for second in [s for s in self._bins if s < first]:
            del self._bins[second]
        names = list(self._order) + ([OTHER] if self._others else [])
        # A new message only when a complete second changed or one more second completed.
        shown = [s for s in self._bins if s < current]
        counts = (sorted(self._bins[s].items()) for s in shown)
        key = (current if shown else None, tuple(names), *counts)
        if key == self._sent_key:
            return
        self._sent_key = key
        times = list(range(first, current))
        values = [[self._bins[s][name] if s in self._bins else 0 for s in times] for name in names]
        with self.hold_sync():
            self.times = times
            self.names = names
            self.values = values
        self.updates += 1

    def rates(self) -> dict[str, float]:
        """Events/s of each type in the last complete second, as the chart shows it."""
        if not self.times:
            return {}
        pairs = zip(self.names, self.values, strict=True)
        return {name: float(series[-1]) for name, series in pairs}


def _cell(value: Any) -> Any:
    """A JSON-safe grid cell: int, float, str or None."""
    if value is None or value.__class__.__name__ in ("NAType", "NaTType"):
        return None
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return None if math.isnan(value) else value
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):  # numpy scalars
        return _cell(value.item())
    return str(value)


def _sort_key(value: Any) -> tuple[int, Any]:
    return (0, value) if isinstance(value, (int, float)) else (1, str(value))


def _matches(row: list[Any], needle: str) -> bool:
    return any(cell is not None and needle in str(cell).lower() for cell in row)


def arrange(
    rows: list[list[Any]],
    columns: tuple[str, ...] | list[str],
    sort_by: str = "",
    descending: bool = False,
    filter_text: str = "",
) -> list[list[Any]]:
    """``rows`` filtered and sorted as the grid shows them (same rules as event_grid.js).

    Filter: case-insensitive substring of any cell. Sort: numbers before text, empty cells
    last in either direction, ties keep their order.
    """
    needle = filter_text.strip().lower()
    shown = [row for row in rows if _matches(row, needle)] if needle else list(rows)
    if sort_by in columns:
        at = list(columns).index(sort_by)
        full = [row for row in shown if row[at] not in (None, "")]
        empty = [row for row in shown if row[at] in (None, "")]
        full.sort(key=lambda row: _sort_key(row[at]), reverse=descending)
        shown = full + empty
    return shown


def _format(df: pd.DataFrame) -> Iterator[list[Any]]:
    """Grid rows of ``df``, newest first."""
    for seq, received, kind, agent, circle, project, data in (
        df[_SOURCE_COLUMNS].iloc[::-1].itertuples(index=False, name=None)
    ):
        when = received.strftime("%H:%M:%S.%f")[:-3] if hasattr(received, "strftime") else None
        yield [
            _cell(seq),
            when,
            _cell(kind),
            _cell(agent),
            _cell(circle),
            _cell(project),
            short_json(data, 120) if data is not None else None,
        ]


class EventGrid(_FrameView):
    """The latest ``limit`` events as a table: click a header to sort, type to filter.

    ``EventGrid(lab_or_client)`` follows the controller's frame; ``EventGrid(frame=f)`` one
    frame. ``filter_text`` (the box above the table) keeps the rows with that text in any
    column, searched in the whole frame, newest first, until ``limit`` are found; ``filters``
    (type patterns and ids, linked to the workbench's Filter tab) narrows first. ``sort_by``
    (a column of ``GRID_COLUMNS``, or ``""`` for newest first) and ``descending`` order them.
    The browser applies the same sort and filter at once while the kernel catches up.
    """

    _esm = Unicode().tag(sync=True)
    _css = Unicode().tag(sync=True)
    columns = List(Unicode(), help="the column names").tag(sync=True)
    rows: List[list[Any]] = List(help="the rows shown (lists of cells), in order").tag(sync=True)
    sort_by = Unicode("", help="the column rows are sorted by ('' : newest first)").tag(sync=True)
    descending = Bool(False, help="sort from the largest value").tag(sync=True)
    filter_text = Unicode("", help="show only rows with this text in a cell").tag(sync=True)
    status = Unicode("", help="a line about what is shown").tag(sync=True)
    limit = Int(100, help="how many of the latest matching events are shown (1-1000)")
    search_limit = Int(
        20_000, help="the most events one redraw searches for filter_text (1,000-1,000,000)"
    )
    scanned = Int(0, help="events searched for filter_text since the last rebuild")
    skipped = Int(0, help="older events not searched because of search_limit")

    #: The longest filter text accepted (characters).
    MAX_FILTER = 200

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        limit: int = 100,
        sort_by: str = "",
        descending: bool = False,
        filter_text: str = "",
        search_limit: int = 20_000,
        **kwargs: Any,
    ) -> None:
        self._latest: list[list[Any]] = []  # newest first, at most limit
        self._received = 0
        self._resend = True
        super().__init__(
            source,
            frame=frame,
            columns=list(GRID_COLUMNS),
            limit=limit,
            sort_by=sort_by,
            descending=descending,
            filter_text=filter_text,
            search_limit=search_limit,
            _esm=_static("event_grid.js"),
            _css=_static("event_grid.css"),
            **kwargs,
        )

    @validate("limit")
    def _check_limit(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 1000:
            raise TraitError(f"limit must be between 1 and 1000 rows, not {value}")
        return int(value)

    @validate("search_limit")
    def _check_search_limit(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1_000 <= value <= 1_000_000:
            raise TraitError(f"search_limit must be between 1000 and 1000000, not {value}")
        return int(value)

    @validate("sort_by")
    def _check_sort_by(self, proposal: Any) -> str:
        value = proposal["value"]
        if value and value not in GRID_COLUMNS:
            raise TraitError(
                f"sort_by must be '' or one of {', '.join(GRID_COLUMNS)}, not {value!r}"
            )
        return str(value)

    @validate("filter_text")
    def _check_filter_text(self, proposal: Any) -> str:
        value = proposal["value"]
        if len(value) > self.MAX_FILTER:
            raise TraitError(
                f"filter_text must be at most {self.MAX_FILTER} characters, not {len(value)}"
            )
        return str(value)

    @observe("limit", "filter_text", "filters", "search_limit")
    def _on_settings(self, change: Any) -> None:
        self._dirty = True  # the ticker rebuilds on the loop's thread

    @observe("sort_by", "descending")
    def _on_sort(self, change: Any) -> None:
        self._resend = True

    def _reset(self) -> None:
        self._latest = []
        self._received = 0
        self.scanned = self.skipped = 0
        self._resend = True

    def _take(self, df: pd.DataFrame | None) -> None:
        if df is None or not len(df):
            return
        self._received += len(df)
        needle = self.filter_text.strip().lower()
        found: list[list[Any]] = []
        # Newest first, in chunks, until limit rows match: without a filter text that is
        # the last `limit` rows whatever the size of df; with one, at most search_limit rows.
        step = self.limit if not needle else max(self.limit, 500)
        end = len(df)
        oldest = 0 if not needle else max(len(df) - self.search_limit, 0)
        while end > oldest and len(found) < self.limit:
            start = max(end - step, oldest)
            chunk = df.iloc[start:end]
            if needle:
                self.scanned += len(chunk)
            for row in _format(chunk):
                if not needle or _matches(row, needle):
                    found.append(row)
                    if len(found) == self.limit:
                        break
            end = start
        if oldest and len(found) < self.limit:
            if not self.skipped:  # logged once per filter; `skipped` counts them all
                logger.info(
                    "event grid: %d older events not searched for %r (search_limit=%d)",
                    oldest,
                    needle,
                    self.search_limit,
                )
            self.skipped += oldest
        if found:
            self._latest = (found + self._latest)[: self.limit]
        self._resend = True  # the count in the status line changed at least

    def _push(self, now: float) -> None:
        if not self._resend:
            return
        self._resend = False
        rows = arrange(self._latest, GRID_COLUMNS, self.sort_by, self.descending)
        what = describe_filters(self.filters)
        if self.filter_text.strip():
            what += f" · containing {self.filter_text.strip()!r}"
        if self.skipped:
            what += f" · {self.skipped} older not searched"
        status = (
            f"{self._received} events ({what}); latest {len(rows)} shown"
            if self._cursor.frame is not None
            else "no events yet (connect, then publish)"
        )
        with self.hold_sync():
            self.rows = rows
            self.status = status
        self.updates += 1
