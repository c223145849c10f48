"""Export the frame from the workbench: CSV and Parquet buttons that write a file and link to it."""

from __future__ import annotations

import asyncio
import concurrent.futures
import datetime as dt
import importlib.util
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ipywidgets as widgets
from traitlets import Int, Unicode

from ..frame import EventFrame
from .base import ERROR_COLOUR, OK_COLOUR, Panel, note

if TYPE_CHECKING:
    from IPython.display import FileLink

__all__ = ["EXPORT_FORMATS", "ExportPanel"]

logger = logging.getLogger("gathering_lab.widgets")

#: File formats the export buttons write (Parquet needs pyarrow).
EXPORT_FORMATS = ("csv", "parquet")


class ExportPanel(Panel):
    """Buttons that write the whole frame to a CSV or Parquet file and link to it.

    The file is written next to the notebook (the kernel's working directory, or
    ``directory``) in a worker thread, then a link to it (IPython's ``FileLink``) appears:
    the file stays for later analysis (``gathering_lab.frame.read_parquet``), whatever its
    size, and nothing of it goes through the widget state.
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
        await asyncio.to_thread(writer, path)  # frame.read_csv / read_parquet read it back
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
