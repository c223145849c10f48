"""Live views you see rather than read: a rate chart, a sortable grid, and an export button.

Both views are Perspective widgets (``perspective-python``: a prebuilt JupyterLab
extension, no CDN) over Perspective tables that live in this kernel. The controller's
ticker feeds them (at most 5 times a second): each tick reads only the rows the frame
received since the previous tick and makes *one* ``table.update()``, however many events
arrived, so a fast stream costs the kernel one batched update per tick and the browser one
redraw. Sorting and filtering in the grid happen in the kernel's Perspective engine, on
the request of the grid's header menus and settings panel (or of ``grid.sort`` /
``grid.filter`` from Python); ``filters`` (the workbench links it to the Filter tab)
choose which events the grid keeps, as in the text log.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import importlib.util
import logging
import math
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
import pandas as pd
import perspective
import perspective.widget
from perspective.widget import PerspectiveWidget
from traitlets import Instance, Int, TraitError, Unicode, observe, validate

from ..frame import EventFrame
from ..protocol import Filters
from .base import ERROR_COLOUR, OK_COLOUR, Cursor, Panel, apply_filters, note, short_json

if TYPE_CHECKING:
    from IPython.display import FileLink

__all__ = ["EXPORT_FORMATS", "ExportPanel", "LiveGrid", "RateChart"]

logger = logging.getLogger("gathering_lab.widgets")

#: The columns of the grid, in order (ids as text: they may be ints or words).
GRID_SCHEMA: dict[str, str] = {
    "seq": "integer",
    "received_at": "datetime",
    "type": "string",
    "source_agent_id": "string",
    "circle_id": "string",
    "project_id": "string",
    "data": "string",
    "latency_ms": "float",
    "event_id": "string",
}
_RATE_SCHEMA = {"key": "string", "second": "datetime", "type": "string", "events": "integer"}
_EPOCH = pd.Timestamp(0, tz="UTC")
#: File formats the export button writes (Parquet needs pyarrow).
EXPORT_FORMATS = ("csv", "parquet")


# anywidget imports a widget's ES module once per widget (from a blob URL, never cached), and
# Perspective's bundle defines custom elements (``regular-layout``) without checking that they
# exist: a second Perspective widget on the page then fails to render. Defining an element
# that is already defined is made a no-op (same name, same behaviour) before the bundle runs.
_DEFINE_ONCE = """\
if (!customElements.__gatheringDefineOnce) {
  const define = customElements.define.bind(customElements);
  customElements.define = (name, ctor, options) =>
    customElements.get(name) ? undefined : define(name, ctor, options);
  customElements.__gatheringDefineOnce = true;
}
"""


_BUNDLE = Path(perspective.widget.__file__).parent / "static"


class _Widget(PerspectiveWidget):
    """PerspectiveWidget whose bundle can be loaded several times on one page."""

    _esm = _DEFINE_ONCE + (_BUNDLE / "perspective-anywidget.js").read_text(encoding="utf-8")

    def __init__(self, table: Any, *, loop: asyncio.AbstractEventLoop, **config: Any) -> None:
        self._loop = loop
        super().__init__(table, **config)

    def handle_message(self, widget: Any, content: Any, buffers: Any) -> None:
        """Answer the viewer's requests on the lab's loop (comm messages may arrive on a
        kernel subshell thread, where Perspective's own ``create_task`` would not run)."""
        if isinstance(content, dict) and content.get("type") == "binary_msg":
            session = self._sessions.get(content.get("client_id"))
            if session is None:
                logger.error("perspective: no session for %r", content.get("client_id"))
                return
            message = bytes(buffers[0])
            self._loop.call_soon_threadsafe(session.handle_request, message)
            return
        super().handle_message(widget, content, buffers)


def _server() -> Any:
    """A Perspective client on a server of its own (not the process-wide one)."""
    return perspective.Server().new_local_client()


def _text(value: Any) -> str | None:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return None
    return str(value)


def grid_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The frame's rows in the grid's columns and types (``data`` as short JSON text)."""
    rows = pd.DataFrame(
        {
            "seq": pd.to_numeric(df["seq"], errors="coerce").astype("Int64"),
            "received_at": df["received_at"],
            "type": df["type"].astype(object),
            "source_agent_id": [_text(v) for v in df["source_agent_id"].tolist()],
            "circle_id": [_text(v) for v in df["circle_id"].tolist()],
            "project_id": [_text(v) for v in df["project_id"].tolist()],
            "data": [short_json(v, 200) for v in df["data"].tolist()],
            "latency_ms": pd.to_numeric(df["latency_ms"], errors="coerce").astype("float64"),
            "event_id": [_text(v) for v in df["event_id"].tolist()],
        }
    )
    return rows.reset_index(drop=True)


class _PerspectivePanel(Panel):
    """A panel around one Perspective widget whose table the ticker feeds."""

    renders = Int(0, help="how many times the table was updated (one per tick with new rows)")

    def _make_widget(self, table: Any, height: str, **config: Any) -> _Widget:
        widget = _Widget(table, loop=self.controller.loop, settings=False, **config)
        widget.layout.min_height = height
        self._own(widget)
        return widget

    def _close_table(self, table: Any) -> None:
        try:
            table.delete(force=True)
        except Exception:  # views of a front end may still hold it; the server goes with us
            logger.debug("could not delete a perspective table", exc_info=True)


class LiveGrid(_PerspectivePanel):
    """A sortable, filterable grid of the latest events (newest first).

    ``LiveGrid(lab_or_client)`` follows the controller's frame; ``LiveGrid(frame=f)`` one
    frame. ``rows`` is how many of the latest matching events it keeps; ``filters``
    narrows them (like LiveLog). Click a column header to sort, open the settings
    (the ⚙ button) to filter by any column; ``grid.sort`` and ``grid.filter`` set the same
    from Python, and :meth:`shown` returns what the grid shows.
    """

    rows = Int(500, help="how many of the latest events the grid keeps (1-100,000)").tag(sync=True)
    filters = Instance(
        Filters, allow_none=True, help="keep only the events these filters match (None: all)"
    )
    total = Int(0, help="events in the frame that match the filters")

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        rows: int = 500,
        filters: Filters | None = None,
        height: str = "340px",
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.frame = frame
        self.rows = rows
        self.filters = filters
        self._client = _server()
        self.table = self._client.table(GRID_SCHEMA, limit=self.rows, name="events")
        self.grid = self._make_widget(
            self.table, height, sort=[["seq", "desc"]], title="latest events"
        )
        self.children = [self.grid]
        self._cursor = Cursor()
        self._dirty = True
        self.controller.add_view(self)

    @validate("rows")
    def _check_rows(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 1 <= value <= 100_000:
            raise TraitError(f"rows must be between 1 and 100000, not {value}")
        return int(value)

    @observe("rows", "filters")
    def _on_settings(self, change: Any) -> None:
        self._dirty = True  # the ticker rebuilds on the loop's thread

    @property
    def shown_frame(self) -> EventFrame | None:
        """The frame this grid shows."""
        return self.frame if self.frame is not None else self.controller.frame

    def _tick(self, now: float) -> None:
        frame = self.shown_frame
        if self._dirty or not self._cursor.follows(frame):
            self._rebuild(frame)
        elif self._cursor.changed():
            rows = self._cursor.new_rows()
            if rows is None:  # cleared
                self._rebuild(frame)
            else:
                self._take(rows)

    def _rebuild(self, frame: EventFrame | None) -> None:
        self._dirty = False
        df = self._cursor.reset(frame)
        if self.table.get_limit() != self.rows:
            old = self.table
            self.table = self._client.table(GRID_SCHEMA, limit=self.rows)
            self.grid.load(self.table)
            self.grid.restore(sort=[["seq", "desc"]], columns=list(GRID_SCHEMA))
            self._close_table(old)
        else:
            self.table.clear()
        self.total = 0
        if df is not None:
            self._take(df, force=True)
        self.renders += 1

    def _take(self, df: pd.DataFrame, *, force: bool = False) -> None:
        matching = apply_filters(df, self.filters)
        if not len(matching):
            return
        self.total += len(matching)
        self.table.update(grid_rows(matching.tail(self.rows)))
        if not force:
            self.renders += 1

    def shown(self) -> pd.DataFrame:
        """The rows the grid shows now, with its current sort and filter."""
        view = self.table.view(sort=self.grid.sort, filter=self.grid.filter)
        try:
            records = view.to_records()
        finally:
            view.delete()
        df = pd.DataFrame.from_records(records, columns=list(GRID_SCHEMA))
        df["received_at"] = pd.to_datetime(df["received_at"], unit="ms", utc=True)
        return df

    def close(self) -> None:
        table = getattr(self, "table", None)
        super().close()
        if table is not None:
            self._close_table(table)


class RateChart(_PerspectivePanel):
    """Events per second by type, over the last ``window`` seconds, as a live line chart.

    Counts are kept per second of receive time; each tick adds the new rows' counts
    and sends only the seconds that changed (and removes those that left the window).
    """

    window = Int(60, help="how many seconds the chart shows (5-3600)").tag(sync=True)

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        window: int = 60,
        height: str = "260px",
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.frame = frame
        self.window = window
        self.table = _server().table(_RATE_SCHEMA, index="key", name="rate")
        self.chart = self._make_widget(
            self.table,
            height,
            plugin="Y Line",
            group_by=["second"],
            split_by=["type"],
            columns=["events"],
            aggregates={"events": "sum"},
            title="events/s by type",
        )
        self.children = [self.chart]
        self._cursor = Cursor()
        self._counts: Counter[tuple[int, str]] = Counter()
        self.controller.add_view(self)

    @validate("window")
    def _check_window(self, proposal: Any) -> int:
        value = proposal["value"]
        if not 5 <= value <= 3600:
            raise TraitError(f"window must be between 5 and 3600 seconds, not {value}")
        return int(value)

    @property
    def shown_frame(self) -> EventFrame | None:
        """The frame this chart counts."""
        return self.frame if self.frame is not None else self.controller.frame

    def _tick(self, now: float) -> None:
        frame = self.shown_frame
        if not self._cursor.follows(frame):
            self._counts.clear()
            self.table.clear()
            df = self._cursor.reset(frame)
            if df is not None:
                self._take(df)
        elif self._cursor.changed():
            rows = self._cursor.new_rows()
            if rows is None:  # cleared
                self._cursor.frame = None
                self._tick(now)
            else:
                self._take(rows)

    def _take(self, df: pd.DataFrame) -> None:
        if not len(df):
            return
        seconds = (df["received_at"] - _EPOCH) // pd.Timedelta(seconds=1)
        changed = Counter(zip(seconds.tolist(), df["type"].astype(str).tolist(), strict=True))
        self._counts.update(changed)
        latest = max(second for second, _ in self._counts)
        old = [key for key in self._counts if key[0] <= latest - self.window]
        for key in old:
            del self._counts[key]
        if old:
            self.table.remove([f"{second}|{kind}" for second, kind in old])
        keys = [key for key in changed if key in self._counts]
        if keys:
            self.table.update(
                pd.DataFrame(
                    {
                        "key": [f"{second}|{kind}" for second, kind in keys],
                        "second": pd.to_datetime([s for s, _ in keys], unit="s", utc=True),
                        "type": [kind for _, kind in keys],
                        "events": [self._counts[key] for key in keys],
                    }
                )
            )
        self.renders += 1

    def rates(self) -> pd.DataFrame:
        """Events per second by type as the chart has them (seconds as rows, types as columns)."""
        if not self._counts:
            return pd.DataFrame()
        series = pd.Series(self._counts)
        table = series.unstack(fill_value=0).sort_index()
        table.index = pd.to_datetime(table.index, unit="s", utc=True)
        return table

    def close(self) -> None:
        table = getattr(self, "table", None)
        super().close()
        if table is not None:
            self._close_table(table)


class ExportPanel(Panel):
    """Buttons that write the whole frame to a CSV or Parquet file and link to it.

    The file is written next to the notebook (the kernel's working directory, or
    ``directory``) in a worker thread, then a link to it (IPython's ``FileLink``) appears:
    the file stays for later analysis (``gl.read_parquet``), whatever its size, and
    nothing of it goes through the widget state.
    """

    directory = Unicode(".", help="the folder the exports are written to")
    last_export = Unicode("", help="the path of the last file written (empty: none yet)")
    error = Unicode("", help="why the last export failed (empty if it worked)")
    exports = Int(0, help="how many files were written")

    def __init__(
        self,
        source: Any = None,
        *,
        frame: EventFrame | None = None,
        directory: str | Path = ".",
        **kwargs: Any,
    ) -> None:
        super().__init__(source, **kwargs)
        self.frame = frame
        self.directory = str(directory)
        self.csv_button = widgets.Button(description="Export CSV", icon="download")
        self.parquet_button = widgets.Button(description="Export Parquet", icon="download")
        if importlib.util.find_spec("pyarrow") is None:
            self.parquet_button.disabled = True
            self.parquet_button.tooltip = "needs pyarrow: pip install 'gathering-lab[parquet]'"
        self.csv_button.on_click(lambda _: self.export("csv"))
        self.parquet_button.on_click(lambda _: self.export("parquet"))
        self.result_label = widgets.HTML()
        self.link = widgets.Output()
        buttons = widgets.HBox([self.csv_button, self.parquet_button, self.result_label])
        self._own(self.csv_button, self.parquet_button, self.result_label, self.link, buttons)
        self.children = [buttons, self.link]

    @property
    def shown_frame(self) -> EventFrame | None:
        """The frame this panel exports."""
        return self.frame if self.frame is not None else self.controller.frame

    def export(self, fmt: str = "csv") -> concurrent.futures.Future[Any]:
        """Write the frame to ``events-<client>-<time>.<fmt>`` (from any thread)."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"format must be one of {', '.join(EXPORT_FORMATS)}, not {fmt!r}")
        frame = self.shown_frame
        self.result_label.value = note(f"writing {fmt}…")
        return self.controller.submit(self._write(frame, fmt), self._written)

    async def _write(self, frame: EventFrame | None, fmt: str) -> Path:
        if frame is None:
            raise RuntimeError("nothing to export: connect a client first")
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-%f")
        name = f"events-{frame.client_id or 'frame'}-{stamp}.{fmt}"
        path = Path(self.directory) / name
        path.parent.mkdir(parents=True, exist_ok=True)
        writer = frame.to_csv if fmt == "csv" else frame.to_parquet
        await asyncio.to_thread(writer, path)  # gl.read_csv / gl.read_parquet read it back
        logger.info("exported %d events to %s", len(frame), path)
        return path

    def _written(self, future: concurrent.futures.Future[Any]) -> None:
        try:
            path = future.result()
        except Exception as exc:
            self.error = str(exc) or type(exc).__name__
            self.result_label.value = note(f"not exported: {self.error}", ERROR_COLOUR)
            return
        self.error = ""
        self.exports += 1
        self.last_export = str(path)
        self.result_label.value = note(f"wrote {path}", OK_COLOUR)
        self.link.outputs = ()
        self.link.append_display_data(_file_link(path))


def _file_link(path: Path) -> FileLink:
    """A link JupyterLab resolves against the notebook's folder (so: relative to the cwd)."""
    from IPython.display import FileLink

    try:
        shown = path.resolve().relative_to(Path.cwd().resolve())
    except ValueError:  # outside the notebook's folder: the path is still shown
        shown = path
    return FileLink(str(shown), result_html_prefix="download: ")
