"""``gathering-lab serve --workers N``: N server processes on one port, one shared log.

A small supervisor. It binds the port once with SO_REUSEPORT (not listening: it only
reserves the port and picks one for ``--port 0``), starts N children (``python -m
gathering_lab serve ... --worker INDEX,READY_FD,PARENT_FD``) that each bind the same port
with SO_REUSEPORT and serve it as a node of the shared log, waits until every child says it
is serving, then lets the port go. The kernel spreads new connections over the children.

The supervisor forwards SIGINT/SIGTERM to the children as SIGTERM (they close their clients
with 1001) and waits for them; it restarts a child that dies on its own after a bounded,
growing delay, and stops everything when one child keeps dying soon after it starts. Each
child watches a pipe from the supervisor and stops when the supervisor is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .exceptions import PortInUseError

__all__ = ["MAX_WORKERS", "RestartPolicy", "Supervisor", "probe_socket", "worker_argument"]

logger = logging.getLogger("gathering_lab.workers")

#: The most workers ``--workers`` accepts.
MAX_WORKERS = 256
#: Seconds a child gets to say it is serving (its bus start-up is bounded at 20 s).
READY_TIMEOUT = 60.0
#: Seconds the children get to close their clients after SIGTERM before SIGKILL.
STOP_TIMEOUT = 20.0


@dataclass(frozen=True)
class RestartPolicy:
    """When to restart a child that died: a growing delay, and when to give up.

    A death within ``stable_after`` seconds of the child's start counts as a failure in a
    row; a child that ran longer starts the count again. The delay before restart ``k`` in
    a row is ``base * 2**(k-1)`` seconds, at most ``cap``; after ``max_failures`` in a row
    the supervisor gives up.
    """

    base: float = 0.25
    cap: float = 8.0
    max_failures: int = 5
    stable_after: float = 30.0

    def failures(self, previous: int, lived: float) -> int:
        """The failures in a row after a death ``lived`` seconds after the child's start."""
        return 1 if lived >= self.stable_after else previous + 1

    def delay(self, failures: int) -> float | None:
        """Seconds to wait before restarting after ``failures`` in a row; None: give up."""
        if failures > self.max_failures:
            return None
        return min(self.cap, self.base * 2 ** (failures - 1))


def worker_argument(text: str) -> tuple[int, int, int]:
    """Parse the hidden ``--worker INDEX,READY_FD,PARENT_FD`` a supervisor gives a child."""
    parts = text.split(",")
    if len(parts) != 3 or not all(p.isdigit() for p in parts):
        raise ValueError(f"invalid --worker {text!r}: expected INDEX,READY_FD,PARENT_FD")
    index, ready, parent = (int(p) for p in parts)
    return index, ready, parent


def probe_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening: it holds the port.

    Raises PortInUseError when a process that does not share the port holds it, ValueError
    when ``host`` does not resolve, OSError otherwise.
    """
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ValueError(f"cannot resolve host {host!r}: {exc.strerror}") from None
    family, type_, proto, _, address = infos[0]
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise PortInUseError(host, port) from None
        raise
    return sock


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    failures: int = 0
    restarts: int = 0


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"status {code}"


class Supervisor:
    """Run ``count`` copies of ``command`` serving one port; see the module docstring.

    ``command`` is the child's command line without ``--port`` and ``--worker``, which
    the supervisor appends. ``restarts`` counts the children restarted.
    """

    def __init__(
        self,
        command: Sequence[str],
        count: int,
        sock: socket.socket,
        *,
        policy: RestartPolicy | None = None,
    ) -> None:
        if not 1 <= count <= MAX_WORKERS:
            raise ValueError(f"count must be from 1 to {MAX_WORKERS}, not {count!r}")
        self.command = list(command)
        self.count = count
        self.port: int = sock.getsockname()[1]
        self._probe: socket.socket | None = sock
        self.policy = policy or RestartPolicy()
        self.workers = [_Worker(i) for i in range(count)]
        self.restarts = 0
        #: Why the supervisor stopped on its own (a child failed), or None.
        self.failure: str | None = None
        self._stopping = asyncio.Event()
        self._parent_read, self._parent_write = os.pipe()  # children see EOF when we are gone
        os.set_inheritable(self._parent_read, False)
        os.set_inheritable(self._parent_write, False)

    def stop(self) -> None:
        """Ask the supervisor to stop its children and return."""
        self._stopping.set()

    async def run(self, on_ready: Callable[[Supervisor], None]) -> int:
        """Start the children, call ``on_ready`` once all serve, keep them up until stopped.

        Returns 0 after a stop (signal or :meth:`stop`), else the exit status of a child
        that failed before serving, or 1 when a child kept dying.
        """
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal, sig)
        try:
            started = await self._start_all()
            if self._probe is not None:
                self._probe.close()  # the children hold the port now
                self._probe = None
            if started is not None:
                return started
            if self._stopping.is_set():
                return 0
            on_ready(self)
            keepers = [asyncio.create_task(self._keep(w)) for w in self.workers]
            await self._stopping.wait()
            for keeper in keepers:
                keeper.cancel()
            await asyncio.gather(*keepers, return_exceptions=True)
            return 1 if self.failure is not None else 0
        finally:
            await self._stop_all()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            for fd in (self._parent_read, self._parent_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
            if self._probe is not None:
                self._probe.close()
            logger.info("stopped %d workers (%d restarts)", self.count, self.restarts)

    def _on_signal(self, sig: signal.Signals) -> None:
        logger.info("%s: stopping %d workers", sig.name, self.count)
        self._stopping.set()

    async def _start_all(self) -> int | None:
        """Start every child; None when all serve, else the exit status to return."""
        starting = asyncio.gather(*(self._spawn(w) for w in self.workers))
        stopping = asyncio.create_task(self._stopping.wait())
        pending: set[asyncio.Future[Any]] = {starting, stopping}
        await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not starting.done():  # a signal while starting: _stop_all ends the children
            starting.cancel()
            await asyncio.gather(starting, return_exceptions=True)
            return None
        results = starting.result()
        for worker, ready in zip(self.workers, results, strict=True):
            if not ready and not self._stopping.is_set():
                assert worker.process is not None
                code = worker.process.returncode
                self.failure = (
                    f"worker {worker.index} did not start serving "
                    f"({'no answer' if code is None else _describe(code)})"
                )
                logger.error("%s: stopping the others", self.failure)
                return code if code is not None and code > 0 else 1
        return None

    async def _spawn(self, worker: _Worker) -> bool:
        """Start ``worker``'s child and wait until it serves; False if it did not."""
        ready_read, ready_write = os.pipe()
        try:
            worker.process = await asyncio.create_subprocess_exec(
                *self.command,
                "--port",
                str(self.port),
                "--worker",
                f"{worker.index},{ready_write},{self._parent_read}",
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(ready_write, self._parent_read),
                # Its own session: a terminal's Ctrl+C reaches the supervisor only, which
                # forwards it, so a child never looks as if it died on its own.
                start_new_session=True,
            )
        finally:
            os.close(ready_write)
        worker.started_at = asyncio.get_running_loop().time()
        logger.info("worker %d started: pid %d", worker.index, worker.process.pid)
        try:
            # EOF (b"") if the child exits first; the thread ends when the child does.
            answer = await asyncio.wait_for(
                asyncio.to_thread(os.read, ready_read, 64), READY_TIMEOUT
            )
        except TimeoutError:
            logger.error(
                "worker %d (pid %d) did not serve within %gs: killing it",
                worker.index,
                worker.process.pid,
                READY_TIMEOUT,
            )
            worker.process.kill()
            await worker.process.wait()
            answer = b""
        finally:
            with contextlib.suppress(OSError):
                os.close(ready_read)
        if answer:
            return True
        await worker.process.wait()
        return False

    async def _keep(self, worker: _Worker) -> None:
        """Restart ``worker`` whenever it dies, until the supervisor stops or gives up."""
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            assert worker.process is not None
            code = await worker.process.wait()
            if self._stopping.is_set():
                return
            lived = loop.time() - worker.started_at
            worker.failures = self.policy.failures(worker.failures, lived)
            delay = self.policy.delay(worker.failures)
            if delay is None:
                self.failure = (
                    f"worker {worker.index} died {worker.failures} times in a row, each within "
                    f"{self.policy.stable_after:g}s of starting (last: {_describe(code)})"
                )
                logger.error("%s: stopping", self.failure)
                self._stopping.set()
                return
            self.restarts += 1
            worker.restarts += 1
            logger.warning(
                "worker %d (pid %d) exited with %s after %.1fs; restarting it in %.2gs "
                "(failure %d in a row; %d restarts in all)",
                worker.index,
                worker.process.pid,
                _describe(code),
                lived,
                delay,
                worker.failures,
                self.restarts,
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
                return
            if await self._spawn(worker):
                logger.info("worker %d serving again: pid %d", worker.index, worker.process.pid)

    async def _stop_all(self) -> None:
        """SIGTERM every running child, wait for them, SIGKILL the ones still running."""
        running = [w.process for w in self.workers if w.process and w.process.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_TIMEOUT)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    logger.warning("worker pid %d still running: SIGKILL", process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
            await asyncio.gather(*(p.wait() for p in running))


def child_command(argv: Sequence[str]) -> list[str]:
    """The command line a child runs: this Python, ``-m gathering_lab`` and ``argv``."""
    return [sys.executable, "-m", "gathering_lab", *argv]
