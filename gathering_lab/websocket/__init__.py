"""The WebSocket side: the connection manager, the server and the bus integration."""

from __future__ import annotations

from .manager import ConnectionManager, Session, get_connection_manager, manager_for
from .server import Server, bind, serve

__all__ = [
    "ConnectionManager",
    "Server",
    "Session",
    "bind",
    "get_connection_manager",
    "manager_for",
    "serve",
]
