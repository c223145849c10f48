"""gathering_lab: watch, drive and analyse a live GatheRing event stream from a notebook.

The bus, the protocol and the server import only the standard library and
websockets; the notebook side (EventFrame, LabClient, start, workbench) brings
in pandas and ipywidgets, so it is imported on first use. A standalone server
(``gathering-lab serve``) never loads them.
"""

from __future__ import annotations

__version__ = "0.1.0"

import importlib  # noqa: E402
from typing import TYPE_CHECKING, Any  # noqa: E402

from .events import Event, EventBus, EventType, event_bus  # noqa: E402
from .exceptions import (  # noqa: E402
    AuthError,
    ConnectionFailed,
    GatheringLabError,
    PortInUseError,
    ProtocolError,
)
from .websocket import ConnectionManager, Server, get_connection_manager, serve  # noqa: E402

if TYPE_CHECKING:
    from .client import LabClient, connect
    from .frame import EventFrame
    from .kernel import Lab, start, stop
    from .load import load_test, load_test_async
    from .widgets.workbench import workbench

_LAZY = {
    "EventFrame": "frame",
    "LabClient": "client",
    "connect": "client",
    "Lab": "kernel",
    "start": "kernel",
    "stop": "kernel",
    "workbench": "widgets",
    "load_test": "load",
    "load_test_async": "load",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'gathering_lab' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AuthError",
    "ConnectionFailed",
    "ConnectionManager",
    "Event",
    "EventBus",
    "EventFrame",
    "EventType",
    "GatheringLabError",
    "Lab",
    "LabClient",
    "PortInUseError",
    "ProtocolError",
    "Server",
    "__version__",
    "connect",
    "event_bus",
    "get_connection_manager",
    "load_test",
    "load_test_async",
    "serve",
    "start",
    "stop",
    "workbench",
]
