"""Exceptions raised by gathering_lab.

One tree, so ``except GatheringLabError`` catches everything the package raises
on purpose::

    GatheringLabError
    ├── ProtocolError          a message breaks the wire protocol (has .code)
    ├── AuthError              a token is missing, malformed, expired or lacks a role
    ├── ServerError
    │   └── PortInUseError     the requested port is already bound (also an OSError)
    ├── BackendUnavailable     the event log's backend (Redis) cannot be reached now
    └── ClientError
        └── ConnectionFailed   a client could not reach or keep its server

Bad arguments to the public API raise the built-in :class:`ValueError` or
:class:`TypeError`, as Python code expects.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthError",
    "BackendUnavailable",
    "ClientError",
    "ConnectionFailed",
    "GatheringLabError",
    "PortInUseError",
    "ProtocolError",
    "ServerError",
]


class GatheringLabError(Exception):
    """Base class of every exception gathering_lab raises on purpose."""


class ProtocolError(GatheringLabError):
    """A message that breaks the wire protocol; ``code`` is the error code sent back.

    ``request_id`` is the ``id`` of the client message it answers, if known (echoed).
    A ``message`` longer than :attr:`MAX_LENGTH` characters is cut there: it names the bad
    value, and a client must not be able to make the server echo a megabyte back.
    """

    MAX_LENGTH = 500

    def __init__(
        self,
        code: str,
        message: str,
        request_id: str | int | None = None,
        details: dict[str, Any] | None = None,
    ) -> None:
        if len(message) > self.MAX_LENGTH:
            message = message[: self.MAX_LENGTH - 3] + "..."
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        #: Machine-readable fields sent in the error's ``data`` beside ``code`` and ``message``
        #: (e.g. ``retry_after`` for ``rate_limited``); set by the server, never from input.
        self.details = details

    def __repr__(self) -> str:
        return f"ProtocolError({self.code!r}, {self.message!r})"


class AuthError(GatheringLabError):
    """A token is missing, malformed, expired, or does not grant what was asked."""


class ServerError(GatheringLabError):
    """The server could not start or run."""


class PortInUseError(ServerError, OSError):
    """The port the server was asked to bind is already in use."""

    def __init__(self, host: str, port: int) -> None:
        super().__init__(
            f"port {port} on {host} is already in use; "
            f"pick another (e.g. port={port + 1}) or port=0 for a free one"
        )
        self.host = host
        self.port = port


class BackendUnavailable(GatheringLabError):
    """The event log's backend (e.g. Redis) cannot be reached right now.

    Nothing was acknowledged: an append that raises this may be missing from the log
    (or, if the connection broke mid-command, be in it without an acknowledgement).
    The backend keeps reconnecting; a later call may succeed.
    """


class ClientError(GatheringLabError):
    """A client-side failure."""


class ConnectionFailed(ClientError):
    """The client could not reach its server, or lost it for good."""
