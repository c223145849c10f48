"""The workbench: every panel in one widget, sharing one controller."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ipywidgets as widgets
from traitlets import dlink

from ..client import LabClient
from ..kernel import Lab
from .charts import EventGrid, RateChart
from .controller import Controller
from .export import ExportPanel
from .live import DEFAULT_NOTIFY, Notifications
from .panels import ConnectPanel, FilterPanel, PublishPanel, StatsPanel

__all__ = ["Workbench", "workbench"]


class Workbench(widgets.VBox):
    """Connect · notifications · (publish | filter | server stats) · chart · grid · export.

    The live part: events/s by type (``chart``, a :class:`RateChart`), the latest events in
    a sortable, filterable table (``grid``, an :class:`EventGrid`; both filtered like the
    Filter tab says) and buttons that export everything received to CSV or Parquet
    (``export``).

    ``close()`` stops the redraws and closes every panel (the lab keeps running).
    """

    def __init__(
        self,
        source: Lab | LabClient | Controller | None = None,
        *,
        client_id: str = "workbench",
        notify: list[str] | tuple[str, ...] = DEFAULT_NOTIFY,
        rows: int = 100,
        window: int = 60,
        export_dir: str | Path = ".",
        connect: bool = True,
        **kwargs: Any,
    ) -> None:
        self._links: list[dlink] | None = None
        super().__init__(**kwargs)
        self.controller = Controller.of(source)
        controller = self.controller
        self.connect_panel = ConnectPanel(controller, client_id=client_id)
        self.notifications = Notifications(controller, types=notify)
        self.publish_panel = PublishPanel(controller)
        self.filter_panel = FilterPanel(controller)
        self.stats_panel = StatsPanel(controller)
        self.chart = RateChart(controller, window=window)
        self.grid = EventGrid(controller, limit=rows)
        self.export = ExportPanel(controller, directory=export_dir)
        self._links = [
            dlink((self.filter_panel, "filters"), (self.chart, "filters")),
            dlink((self.filter_panel, "filters"), (self.grid, "filters")),
        ]
        self.tabs = widgets.Tab(
            children=[self.publish_panel, self.filter_panel, self.stats_panel],
            titles=("Publish", "Filter", "Server stats"),
        )
        self.title = widgets.HTML("<h3 style='margin:4px 0'>GatheRing workbench</h3>")
        self.live_title = widgets.HTML("<h4 style='margin:8px 0 2px'>Live events</h4>")
        self.children = [
            self.title,
            self.connect_panel,
            self.notifications,
            self.tabs,
            self.live_title,
            self.chart,
            self.grid,
            self.export,
        ]
        if connect and controller.client is None and controller.lab is not None:
            # Await-free: the connection is made on the lab's loop; the status label follows.
            self.connect_panel._connect_clicked()

    @property
    def panels(self) -> list[widgets.Widget]:
        """The panels, in display order."""
        return [
            self.connect_panel,
            self.notifications,
            self.publish_panel,
            self.filter_panel,
            self.stats_panel,
            self.chart,
            self.grid,
            self.export,
        ]

    def close(self) -> None:
        """Stop every redraw and close the panels (and the clients the workbench connected)."""
        links = getattr(self, "_links", None)
        if links is not None:  # fully built and not closed yet
            self._links = None
            for link in links:
                link.unlink()
            for panel in self.panels:
                panel.close()
            self.controller.close()
            for part in (self.tabs, self.title, self.live_title):
                part.close()
        super().close()


def workbench(lab_or_client: Lab | LabClient | None = None, **options: Any) -> Workbench:
    """Every panel in one widget: connect, notifications, publish, filter, stats, chart, grid,
    export.

    With a :class:`~gathering_lab.kernel.Lab` (default: the one ``gl.start()`` returned)
    it connects a client named ``workbench`` for you, on the lab's loop, without waiting.
    With a :class:`~gathering_lab.client.LabClient` it shows and drives that client.
    Options: ``client_id``, ``notify`` (type patterns), ``rows`` (how many of the latest
    events the grid shows, 1-1000), ``window`` (seconds the chart shows, 10-3600),
    ``export_dir`` (where the export buttons write), ``connect``.
    """
    return Workbench(lab_or_client, **options)
