"""gathering_lab: watch, drive and analyse a live GatheRing event stream from a notebook."""

from __future__ import annotations

__version__ = "0.1.0"

from .client import LabClient, connect  # noqa: E402
from .events import Event, EventBus, EventType, event_bus  # noqa: E402
from .exceptions import (  # noqa: E402
    AuthError,
    ConnectionFailed,
    GatheringLabError,
    PortInUseError,
    ProtocolError,
)
from .frame import EventFrame  # noqa: E402
from .kernel import Lab, start, stop  # noqa: E402
from .websocket import ConnectionManager, Server, get_connection_manager, serve  # noqa: E402

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
    "serve",
    "start",
    "stop",
]
