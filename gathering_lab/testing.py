"""Helpers for testing code that uses gathering_lab (our own tests use them too).

::

    from gathering_lab.testing import running_server, recv_json

    async with running_server() as server:          # own bus and manager, free port
        async with websockets.connect(server.url) as ws:
            hello = await recv_json(ws)

Timeouts scale with the ``GATHERING_LAB_TIMEOUT_FACTOR`` environment variable
(e.g. ``3`` on a slow CI machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

from .events import Event, EventBus
from .websocket.manager import ConnectionManager
from .websocket.server import Server, serve

__all__ = [
    "RedisServer",
    "capture_events",
    "free_port",
    "recv_json",
    "recv_until",
    "running_redis",
    "running_server",
    "timeout",
    "wait_for",
]


def timeout(seconds: float) -> float:
    """Return ``seconds`` scaled by ``GATHERING_LAB_TIMEOUT_FACTOR`` (default 1)."""
    return seconds * float(os.environ.get("GATHERING_LAB_TIMEOUT_FACTOR", "1"))


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def running_server(**options: Any) -> AsyncIterator[Server]:
    """Run a server on a free loopback port with its own bus and manager, then close it."""
    options.setdefault("port", 0)
    options.setdefault("bus", EventBus())
    options.setdefault("manager", ConnectionManager())
    async with serve(**options) as server:
        yield server


@contextlib.contextmanager
def capture_events(bus: EventBus, pattern: str = "*") -> Iterator[list[Event]]:
    """Collect the events published on ``bus`` (matching ``pattern``) into a list."""
    captured: list[Event] = []
    sub_id = bus.subscribe(pattern, captured.append, name="capture_events")
    try:
        yield captured
    finally:
        bus.unsubscribe(sub_id)


async def recv_json(ws: Any, wait: float = 5.0) -> dict[str, Any]:
    """Receive one message from a websockets connection and parse it as JSON."""
    raw = await asyncio.wait_for(ws.recv(), timeout(wait))
    message: dict[str, Any] = json.loads(raw)
    return message


async def recv_until(
    ws: Any, predicate: Callable[[dict[str, Any]], bool], wait: float = 5.0
) -> list[dict[str, Any]]:
    """Receive messages until one satisfies ``predicate``; return all received, that one last."""
    deadline = time.monotonic() + timeout(wait)
    received: list[dict[str, Any]] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no matching message within {wait}s; got {received[-5:]}")
        message = json.loads(await asyncio.wait_for(ws.recv(), left))
        received.append(message)
        if predicate(message):
            return received


async def wait_for(
    condition: Callable[[], object | Awaitable[object]], wait: float = 5.0, interval: float = 0.01
) -> None:
    """Wait until ``condition()`` is true; raise TimeoutError after ``wait`` seconds."""
    deadline = time.monotonic() + timeout(wait)
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {wait}s")
        await asyncio.sleep(interval)


class RedisServer:
    """A ``redis-server`` process on a free loopback port, with its append-only file in ``dir``.

    :meth:`kill` (SIGKILL) and :meth:`start` again restart it on the same port with the
    same data; :meth:`pause`/:meth:`resume` (SIGSTOP/SIGCONT) make it hang.
    """

    def __init__(
        self,
        directory: Path,
        port: int | None = None,
        appendonly: bool = True,
        appendfsync: str = "always",
    ) -> None:
        if appendfsync not in ("always", "everysec", "no"):
            raise ValueError(f"appendfsync must be always, everysec or no, not {appendfsync!r}")
        executable = shutil.which("redis-server")
        if executable is None:
            raise FileNotFoundError("redis-server is not installed (apt-get install redis-server)")
        self.executable = executable
        self.dir = Path(directory)
        self.port = port or free_port()
        self.appendonly = appendonly
        self.appendfsync = appendfsync  # "always" in tests: every acknowledged append is on disk
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, wait: float = 10.0) -> None:
        """Start the server and wait until it answers PING (after loading its data)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        # fmt: off
        args = [
            self.executable, "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", self.appendfsync,
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
        ]
        # fmt: on
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout(wait)
        while not self.ping():
            if self.process.poll() is not None:
                log = (self.dir / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self.process.returncode}: {log}")
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} not ready within {wait}s")
            time.sleep(0.02)

    def ping(self) -> bool:
        """Whether the server answers PING now."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command (inline) and return the raw reply's first line."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout(5)) as sock:
            sock.sendall(" ".join(args).encode() + b"\r\n")
            return sock.recv(65536).split(b"\r\n", 1)[0]

    def kill(self) -> None:
        """SIGKILL the server and wait for it to die."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout(10))

    def pause(self) -> None:
        """SIGSTOP the server: it accepts nothing and answers nothing until :meth:`resume`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT the server after :meth:`pause`."""
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Stop the server (SIGCONT first in case it is paused, then SIGKILL)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
        self.kill()


@contextlib.contextmanager
def running_redis(directory: Path, appendonly: bool = True) -> Iterator[RedisServer]:
    """Run a ``redis-server`` on a free loopback port with its data in ``directory``."""
    server = RedisServer(directory, appendonly=appendonly)
    server.start()
    try:
        yield server
    finally:
        server.stop()
