"""gathering_lab: watch, drive and analyse a live GatheRing event stream from a notebook."""

from __future__ import annotations

__version__ = "0.1.0"

from .events import Event, EventBus, EventType, event_bus  # noqa: E402
from .exceptions import (  # noqa: E402
    AuthError,
    ConnectionFailed,
    GatheringLabError,
    PortInUseError,
    ProtocolError,
)
from .websocket import ConnectionManager, Server, get_connection_manager, serve  # noqa: E402

__all__ = [
    "AuthError",
    "ConnectionFailed",
    "ConnectionManager",
    "Event",
    "EventBus",
    "EventType",
    "GatheringLabError",
    "PortInUseError",
    "ProtocolError",
    "Server",
    "__version__",
    "event_bus",
    "get_connection_manager",
    "serve",
]
