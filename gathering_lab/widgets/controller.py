"""The Controller: what the panels share, and the one place they reach the event loop from.

Widget callbacks (button clicks, typing) may run on a kernel *subshell thread* with its
own loop (JupyterLab >= 4.4 with ipykernel 7), or on the kernel's main thread, or on any
thread that calls ``button.click()``. The lab and its clients live on one loop (the
kernel's, or the lab's own thread). So every panel goes through :meth:`Controller.submit`,
which hands a coroutine to that loop with :func:`asyncio.run_coroutine_threadsafe` and
never waits for it: results come back in done-callbacks, which set widget traits.

The controller also runs the *one* ticker task of its views: every ``interval`` seconds
(0.2 s, so at most 5 redraws a second) it asks each view to redraw if its data changed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from traitlets import Float, HasTraits, Instance, TraitError, Unicode, observe, validate

from .. import connection, kernel, protocol
from ..client import LabClient
from ..exceptions import ConnectionFailed
from ..frame import EventFrame
from ..kernel import Lab

__all__ = [
    "DEFAULT_URL",
    "Controller",
    "check_ws_url",
    "error_text",
    "parse_id",
    "same_server",
    "stats_url",
]

logger = logging.getLogger("gathering_lab.widgets")

DEFAULT_URL = connection.DEFAULT_URL
#: The fastest the views may redraw: every 0.2 s, i.e. 5 times a second.
MIN_INTERVAL = 0.2


class View(Protocol):
    """A panel that the controller's ticker redraws."""

    def _tick(self, now: float) -> None: ...


def parse_id(text: str, name: str = "id") -> int | str | None:
    """Read an id typed in a text box: empty is None, digits an int, anything else a str."""
    value = text.strip()
    if not value:
        return None
    if value.lstrip("-").isdigit():
        return int(value)
    if any(c.isspace() for c in value):
        raise ValueError(f"{name} must be an integer or a word without spaces, not {value!r}")
    return value


def stats_url(ws_url: str) -> str:
    """The ``/admin/websocket/stats`` URL of the server a WebSocket URL points at."""
    return connection.http_url(ws_url, "/admin/websocket/stats")


def check_ws_url(url: str) -> str:
    """Return ``url`` stripped, or raise ValueError if it is not ``ws://host...``/``wss://``."""
    try:
        return connection.check_url(url)
    except ValueError:
        raise ValueError(f"the URL must look like {DEFAULT_URL}, not {url.strip()!r}") from None


#: True if two WebSocket URLs point at the same endpoint (the query aside).
same_server = connection.same_endpoint
#: A one-line description of an exception for a label.
error_text = connection.error_text


class Controller(HasTraits):
    """The lab and/or client the panels drive, and the event loop both run on.

    ``Controller.of(source)`` accepts a Controller (shared by several panels), a
    :class:`~gathering_lab.kernel.Lab`, a :class:`~gathering_lab.client.LabClient`, or None
    (the lab ``gl.start()`` returned, if one runs).
    """

    client = Instance(
        LabClient,
        allow_none=True,
        help="the client the panels read events from and send requests through",
    )
    status = Unicode("not connected", help="the client's status (LabClient.status) or an error")
    interval = Float(
        MIN_INTERVAL, help="seconds between two redraws of the views (>= 0.2: at most 5 per second)"
    )

    def __init__(
        self,
        lab: Lab | None = None,
        client: LabClient | None = None,
        *,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__()
        self.lab = lab
        self.loop = loop or self._find_loop(lab, client)
        self.closed = False
        self._futures: set[concurrent.futures.Future[Any]] = set()
        self._views: list[View] = []
        self._ticker: concurrent.futures.Future[None] | None = None
        self._stop_listening: Callable[[], None] | None = None
        self._owned: list[LabClient] = []
        if client is not None:
            self.client = client

    @classmethod
    def of(cls, source: Controller | Lab | LabClient | None = None) -> Controller:
        """The controller for ``source`` (itself if it is one)."""
        if isinstance(source, Controller):
            return source
        if isinstance(source, Lab):
            return cls(lab=source)
        if isinstance(source, LabClient):
            return cls(client=source)
        if source is None:
            return cls(lab=kernel.current())
        raise TypeError(
            f"expected a Lab, a LabClient, a Controller or None, not {type(source).__name__}"
        )

    @staticmethod
    def _find_loop(lab: Lab | None, client: LabClient | None) -> asyncio.AbstractEventLoop:
        loop = lab.loop if lab is not None else None
        if loop is None and client is not None:
            loop = client.loop
        if loop is None:
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                raise RuntimeError(
                    "the widgets need an event loop: use them in a Jupyter kernel, "
                    "or give them a started Lab"
                ) from None
        return loop

    @validate("interval")
    def _check_interval(self, proposal: Any) -> float:
        value = float(proposal["value"])
        if not MIN_INTERVAL <= value <= 60:
            raise TraitError(f"interval must be between {MIN_INTERVAL} and 60 seconds, not {value}")
        return value

    @observe("client")
    def _on_client(self, change: Any) -> None:
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        client: LabClient | None = change["new"]
        if client is not None:
            self._stop_listening = client.on_status(self._set_status)
            self.status = client.status

    def _set_status(self, status: str) -> None:
        self.status = status

    # What the views read

    @property
    def frame(self) -> EventFrame | None:
        """The frame the views show: the client's, else the lab's (everything published)."""
        if self.client is not None:
            return self.client.frame
        if self.lab is not None:
            return self.lab.frame
        return None

    @property
    def default_url(self) -> str:
        """The URL to offer in the connect panel."""
        if self.client is not None:
            return self.client.url
        if self.lab is not None:
            return self.lab.url
        return DEFAULT_URL

    # Handing work to the loop

    def submit(
        self,
        coro: Coroutine[Any, Any, Any],
        on_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Run ``coro`` on the controller's loop, from any thread; never waits for it.

        ``on_done(future)`` runs when it finishes (on the loop's thread) and is expected to
        show the outcome; without it, a failure is logged. The future is kept referenced
        until then.
        """
        if self.loop.is_closed():
            coro.close()
            raise RuntimeError("the event loop of these widgets is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        self._futures.add(future)
        future.add_done_callback(lambda done: self._finished(done, on_done))
        return future

    def _finished(
        self,
        future: concurrent.futures.Future[Any],
        on_done: Callable[[concurrent.futures.Future[Any]], None] | None,
    ) -> None:
        self._futures.discard(future)
        if on_done is not None:
            try:
                on_done(future)
            except Exception:
                logger.exception("widget callback %r failed", on_done)
        elif not future.cancelled() and future.exception() is not None:
            logger.error("widget task failed", exc_info=future.exception())

    def call_soon(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run ``callback(*args)`` on the controller's loop, from any thread."""
        self.loop.call_soon_threadsafe(callback, *args)

    # Requests (each returns a concurrent future; pass on_done to see the outcome)

    def connect(
        self,
        url: str | None = None,
        client_id: str = "workbench",
        on_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
        *,
        token: str | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Connect a client to ``url`` (default: the lab's) and make it the panels' client.

        ``token`` is a JWT for a server with authentication.
        """
        return self.submit(self._connect(url or self.default_url, client_id, token), on_done)

    async def _connect(self, url: str, client_id: str, token: str | None = None) -> LabClient:
        url = check_ws_url(url)
        old = self.client
        if (
            old is not None
            and same_server(old.url, url)
            and old.client_id == client_id
            and old.token == token
        ):
            if not old.connected:
                self.status = "connecting"
                await old.connect()
            return old
        if old is not None and old in self._owned:
            self._owned.remove(old)
            await old.close()  # one we connected; a client given to us stays as it is
        self.status = "connecting"
        try:
            if self.lab is not None and self.lab.running and same_server(url, self.lab.url):
                client = await self.lab.connect(client_id, token=token)  # closed by lab.stop()
            else:
                client = LabClient(url, client_id, token=token, reconnect=True)
                await client.connect()
        except Exception as exc:
            self.status = f"failed: {error_text(exc)}"
            raise
        self._owned.append(client)
        self.client = client
        return client

    def disconnect(
        self, on_done: Callable[[concurrent.futures.Future[Any]], None] | None = None
    ) -> concurrent.futures.Future[Any]:
        """Close the panels' client (its frame keeps what it received)."""
        return self.submit(self._disconnect(), on_done)

    async def _disconnect(self) -> None:
        if self.client is not None:
            await self.client.close()

    def publish(
        self,
        type: str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        *,
        on_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
        **ids: Any,
    ) -> concurrent.futures.Future[Any]:
        """Publish through the connected client (server ack) or else on the lab's bus.

        The future's result is a dict with ``type``, ``event_id``, ``seq`` and ``via``.
        """
        return self.submit(self._publish(type, data or {}, ids), on_done)

    async def _publish(self, type_name: str, data: dict[str, Any], ids: dict[str, Any]) -> Any:
        client = self.client
        if client is not None and client.connected:
            ack = await client.publish(type_name, data, **ids)
            return {"type": type_name, "via": "client", **(ack or {})}
        if self.lab is not None and self.lab.running:
            # On the lab's loop publish_nowait runs now, so seq is set on return.
            event = self.lab.publish(type_name, data, **ids)
            return {"type": type_name, "via": "lab", "event_id": event.id, "seq": event.seq}
        raise ConnectionFailed("not connected: connect a client (or start a lab) first")

    def subscribe(
        self,
        filters: protocol.Filters | None,
        on_done: Callable[[concurrent.futures.Future[Any]], None] | None = None,
    ) -> concurrent.futures.Future[Any]:
        """Ask the server to send the client only what ``filters`` match (None: everything)."""
        return self.submit(self._subscribe(filters), on_done)

    async def _subscribe(self, filters: protocol.Filters | None) -> Any:
        client = self.client
        if client is None or not client.connected:
            raise ConnectionFailed("not connected: connect a client first")
        if filters is None:
            return await client.unsubscribe()
        types = None if filters.event_types == ("*",) else list(filters.event_types)
        return await client.subscribe(
            types, circle_id=filters.circle_id, project_id=filters.project_id
        )

    # The ticker

    def add_view(self, view: View) -> None:
        """Redraw ``view`` from the ticker (started on the first view)."""
        self._views.append(view)
        if self._ticker is None and not self.closed:
            self._ticker = self.submit(self._tick_forever())

    def remove_view(self, view: View) -> None:
        """Stop redrawing ``view``."""
        if view in self._views:
            self._views.remove(view)

    async def _tick_forever(self) -> None:
        while not self.closed:
            self.tick()
            await asyncio.sleep(self.interval)

    def tick(self) -> None:
        """Let every view redraw if its data changed (runs on the loop's thread)."""
        now = time.monotonic()
        for view in list(self._views):
            try:
                view._tick(now)
            except Exception:
                logger.exception("redrawing %s failed", type(view).__name__)

    def close(self) -> None:
        """Stop the ticker and close the clients this controller connected (not one given)."""
        if self.closed:
            return
        self.closed = True
        self._views.clear()
        if self._ticker is not None:
            self._ticker.cancel()
            self._ticker = None
        if self._stop_listening is not None:
            self._stop_listening()
            self._stop_listening = None
        if not self.loop.is_closed():
            for client in self._owned:
                self.submit(client.close())
        self._owned.clear()

    def __repr__(self) -> str:
        return f"<Controller lab={self.lab!r} client={self.client!r} status={self.status!r}>"
