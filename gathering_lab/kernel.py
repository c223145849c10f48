"""Run the bus and the WebSocket server inside a Jupyter kernel (or a plain script).

::

    import gathering_lab as gl
    lab = gl.start(port=8000)                # returns at once; serves between cells
    client = await lab.connect("notebook")
    lab.publish("agent.started", {"agent_id": 1})
    lab.stop()

In a kernel (or any running asyncio loop) the server runs on that loop: the
socket is bound synchronously, so a busy port fails in the cell, and ``serve()``
is scheduled as a task. With no running loop (a plain script), the lab runs its
own loop in a daemon thread, and the bus hands events published elsewhere to it.
"""

from __future__ import annotations

import asyncio
import html
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from .backends.bus import LogBus, bus_for_url
from .client import LabClient
from .events import Event, EventBus, EventType, event_bus
from .frame import EventFrame
from .websocket import ConnectionManager, Server, manager_for, serve
from .websocket.server import bind

_T = TypeVar("_T")

__all__ = ["Lab", "current", "start", "stop"]

logger = logging.getLogger("gathering_lab.kernel")

_lab: Lab | None = None


class Lab:
    """A server and bus running in this process, with a frame of everything published."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        bus: EventBus | str | None = None,
        manager: ConnectionManager | None = None,
        max_rows: int | None = 100_000,
        **serve_options: Any,
    ) -> None:
        self.host = host
        self.requested_port = port
        #: A bus this lab opened from a URL (``bus="redis://..."``): started and closed with it.
        self._owned_bus: LogBus | None = None
        bus_key: Any = bus
        if isinstance(bus, str):
            bus = bus_for_url(bus)  # ValueError for an unknown scheme
            if isinstance(bus, LogBus):
                self._owned_bus = bus
        else:
            bus_key = id(bus if bus is not None else event_bus)
        self.bus = bus if bus is not None else event_bus
        self.manager = manager if manager is not None else manager_for(self.bus)
        # In a kernel a long cell stalls the loop: keep pinging, but never time out.
        serve_options.setdefault("ping_timeout", None)
        self.serve_options = serve_options
        self.frame = EventFrame(max_rows, client_id="bus")
        self.clients: list[LabClient] = []
        self.server: Server | None = None
        self.status = "stopped"
        self.error: BaseException | None = None
        self.mode: str | None = None
        self.started_at: float | None = None
        manager_key = id(manager) if manager is not None else None
        self._key = (host, port, bus_key, manager_key, max_rows, _freeze(serve_options))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._ready: Future[None] = Future()
        self._frame_sub: str | None = None
        self._sock: Any = None
        self._serve_task: asyncio.Task[Any] | None = None
        self.port = port

    # Lifecycle

    def start(self) -> Lab:
        """Bind the port now and start serving on the running loop (or a thread of its own)."""
        if self.status in ("starting", "running"):
            return self
        sock = bind(self.host, self.port)  # PortInUseError here, in the caller's cell
        self.port = sock.getsockname()[1]
        self.status = "starting"
        self.error = None
        self._ready = Future()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            self.mode = "loop"
            self._loop = loop
            self.bus.bind_loop(loop)
            self._sock = sock
            self._serve_task = self._spawn(self._serve(sock))
        else:
            self.mode = "thread"
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(
                target=self._loop.run_forever, name="gathering-lab", daemon=True
            )
            self._thread.start()
            assert self._thread.ident is not None
            self.bus.bind_loop(self._loop, self._thread.ident)
            asyncio.run_coroutine_threadsafe(self._serve(sock), self._loop).result(timeout=30)
        return self

    async def _serve(self, sock: Any) -> None:
        try:
            if self._owned_bus is not None:
                await self._owned_bus.start()  # BackendUnavailable if its log is unreachable
            self.server = await serve(
                self.host,
                self.port,
                sock=sock,
                bus=self.bus,
                manager=self.manager,
                broadcast=True,
                **self.serve_options,
            )
        except asyncio.CancelledError:
            sock.close()
            self._ready.cancel()
            raise
        except BaseException as exc:
            sock.close()
            if self._owned_bus is not None:
                await self._owned_bus.close()
            self.status = f"failed: {exc}"
            self.error = exc
            self._ready.set_exception(exc)
            raise
        self._frame_sub = self.bus.subscribe("*", self._record, name="lab.frame")
        self.status = "running"
        self.started_at = time.time()
        self._ready.set_result(None)
        logger.info("lab serving on %s", self.server.url)

    def _record(self, event: Event) -> None:
        self.frame.append(event.to_dict(), time.time())

    async def wait_started(self, timeout: float = 10.0) -> Lab:
        """Wait until the server accepts connections (raises what made it fail)."""
        await asyncio.wait_for(asyncio.wrap_future(self._ready), timeout)
        return self

    def stop(self) -> None:
        """Close every client with 1001 and stop serving; the port is free on return."""
        if self.status == "stopped":
            return
        for client in self.clients:
            self._call(client.close)
        self.clients.clear()
        if self._frame_sub is not None:
            self.bus.unsubscribe(self._frame_sub)
            self._frame_sub = None
        server = self.server
        if server is None and self._serve_task is not None:
            # Stopped before serve() ran: release the bound port ourselves.
            self._serve_task.cancel()
            self._sock.close()
        if server is not None:
            if self.mode == "thread" and self._loop is not None:
                self._loop.call_soon_threadsafe(server.close)
                asyncio.run_coroutine_threadsafe(self._closed(server), self._loop).result(10)
            else:
                server.close()
                self._spawn(self._closed(server))
        if self.mode == "thread" and self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()
            self._thread = None
        self.status = "stopped"
        self.server = None
        global _lab
        if _lab is self:
            _lab = None
        logger.info("lab stopped")

    async def _closed(self, server: Server) -> None:
        await server.wait_closed()
        if self._owned_bus is not None:
            await self._owned_bus.close()

    def _call(self, coroutine_function: Callable[[], Any]) -> None:
        if self.mode == "thread" and self._loop is not None:
            asyncio.run_coroutine_threadsafe(coroutine_function(), self._loop)
        else:
            self._spawn(coroutine_function())

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            logger.error("lab task failed", exc_info=task.exception())

    # Using it

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{self._host_for_url}:{self.port}/ws/dashboard"

    @property
    def http_url(self) -> str:
        """The base HTTP URL (dashboard, stats, health)."""
        return f"http://{self._host_for_url}:{self.port}"

    @property
    def _host_for_url(self) -> str:
        host = "127.0.0.1" if self.host in ("", "0.0.0.0") else self.host
        return f"[{host}]" if ":" in host else host

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the server runs on (the kernel's, or the lab's own thread's)."""
        return self._loop

    @property
    def running(self) -> bool:
        """True while serving (or about to)."""
        return self.status in ("starting", "running")

    async def connect(self, client_id: str = "notebook", **options: Any) -> LabClient:
        """Connect a :class:`LabClient` to this lab; it is closed by :meth:`stop`."""
        if not self.running:
            raise RuntimeError("the lab is stopped: call gl.start() first")
        await self.wait_started()
        client = LabClient(self.url, client_id, **options)
        await client.connect()
        self.clients.append(client)

        def forget(status: str) -> None:
            if status == "closed" and client in self.clients:
                self.clients.remove(client)

        client.on_status(forget)
        return client

    def publish(
        self,
        type: EventType | str,  # noqa: A002 - the protocol's name
        data: dict[str, Any] | None = None,
        **ids: Any,
    ) -> Event:
        """Publish an event on the lab's bus from any thread; returns it (seq set when run)."""
        event = Event(type=type, data=data or {}, **ids)
        return self.bus.publish_nowait(event)

    async def replay(self, source: Any, speed: float | None = 1.0, *, progress: Any = True) -> Any:
        """Publish a recording (path, EventFrame or DataFrame) on this lab's bus again.

        Keeps the recorded order and relative timing divided by ``speed`` (None: as fast
        as possible), with a progress bar; returns a
        :class:`~gathering_lab.replay.ReplayResult`. See :mod:`gathering_lab.replay`.
        """
        from .replay import replay_on_bus

        if not self.running:
            raise RuntimeError("the lab is stopped: call gl.start() first")
        await self.wait_started()
        return await replay_on_bus(source, self.bus, speed=speed, progress=progress)

    def stats(self) -> dict[str, Any]:
        """The server's stats, as served at ``/admin/websocket/stats``."""
        if self.server is None:
            return {"status": self.status, "bus": self.bus.get_stats()}
        stats = self._on_loop(self.server.get_stats)
        stats["status"] = self.status
        return stats

    def _on_loop(self, function: Callable[[], _T], wait: float = 10.0) -> _T:
        """Call ``function`` on the lab's loop (its structures live there) and return its result.

        Called from another thread (a widget callback, the lab's own thread in a plain
        script), it waits for the loop to run it; on the loop itself it is called at once.
        """
        loop = self._loop
        if loop is None or not loop.is_running():
            return function()
        try:
            if asyncio.get_running_loop() is loop:
                return function()
        except RuntimeError:
            pass
        if self.mode == "loop" and threading.current_thread() is threading.main_thread():
            return function()  # the kernel's own thread, between cells: the loop is idle
        future: Future[_T] = Future()

        def run() -> None:
            try:
                future.set_result(function())
            except BaseException as exc:
                future.set_exception(exc)

        loop.call_soon_threadsafe(run)
        return future.result(wait)

    def __repr__(self) -> str:
        return (
            f"<Lab {self.url} {self.status} clients={self.manager.active_connections} "
            f"published={self.bus.get_stats()['events_published']}>"
        )

    def _repr_html_(self) -> str:
        colour = {"running": "#1a7f37", "starting": "#9a6700"}.get(self.status, "#cf222e")
        rows = [
            ("WebSocket", f"<code>{html.escape(self.url)}</code>"),
            ("Dashboard", f"<code>{html.escape(self.http_url)}/dashboard</code>"),
            ("Status", f'<b style="color:{colour}">{html.escape(self.status)}</b>'),
            ("Clients", str(self.manager.active_connections)),
            ("Events published", str(self.bus.get_stats()["events_published"])),
        ]
        body = "".join(
            f'<tr><th style="text-align:left;padding-right:1em">{k}</th><td>{v}</td></tr>'
            for k, v in rows
        )
        return f"<table><caption>gathering_lab</caption>{body}</table>"


def _freeze(options: dict[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, repr(v)) for k, v in options.items()))


def start(host: str = "127.0.0.1", port: int = 8000, **serve_options: Any) -> Lab:
    """Start (or return the running) lab: bus broadcasting plus the WebSocket server.

    Calling it again with the same options returns the running lab; with other
    options, it stops that one and starts anew. Raises PortInUseError at once if
    the port is taken.
    ``bus="redis://host:port/db"`` joins the lab to that shared log (the stream every
    server on it serves); ``bus="memory://"`` (the default) is this process's bus.
    """
    global _lab
    candidate = Lab(host, port, **serve_options)
    if _lab is not None and _lab.running:
        if _lab._key == candidate._key:
            return _lab
        _lab.stop()
    candidate.start()
    _lab = candidate
    return candidate


def current() -> Lab | None:
    """The lab :func:`start` returned, if it is still running."""
    return _lab if _lab is not None and _lab.running else None


def stop() -> None:
    """Stop the running lab, if any."""
    if _lab is not None:
        _lab.stop()
