"""ipywidgets panels over a Lab or a LabClient, and :func:`workbench` that lays them out.

::

    import gathering_lab as gl
    lab = gl.start()
    wb = gl.workbench(lab)      # connect · notifications · publish | filter | stats
                                # · events/s chart · grid · export (CSV / Parquet)
    wb.close()                  # stops its redraws

Widgets are thin views: requests go through a :class:`Controller`, which hands them to
the lab's event loop from whatever thread a widget callback runs on, and views are
redrawn by one ticker at most 5 times a second.
"""

from __future__ import annotations

from .charts import EventGrid, RateChart
from .controller import Controller
from .export import ExportPanel
from .live import DEFAULT_NOTIFY, LiveLog, Notifications
from .panels import ConnectPanel, FilterPanel, PublishPanel, StatsPanel
from .workbench import Workbench, workbench

__all__ = [
    "DEFAULT_NOTIFY",
    "ConnectPanel",
    "Controller",
    "EventGrid",
    "ExportPanel",
    "FilterPanel",
    "LiveLog",
    "Notifications",
    "PublishPanel",
    "RateChart",
    "StatsPanel",
    "Workbench",
    "workbench",
]
