#!/usr/bin/env python
"""Attack harness for issue 8: each attack against a real ``gathering-lab serve`` subprocess.

Every attack starts its own server(s) with ``python -m gathering_lab serve --port 0`` (so it tests
whatever code ``PYTHONPATH`` points at), talks to it on 127.0.0.1 only, measures what happened
(server RSS with psutil, probe-client ping round trips, close codes, delivery counts, log lines)
and gives a verdict, ``held`` or ``failed``, with the reason. A harness problem is reported as
``error``. Every loop is bounded in count and time and every server is killed in a ``finally``.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/attacks.py --quick            # ~1-2 min
    PYTHONPATH=$PWD .venv/bin/python benchmarks/attacks.py --json out.json    # the issue's sizes
    ... --only poison,auth --server-arg=--max-connections=900 --server-arg=--publish-rate=500

``--server-arg`` flags are passed to every server; a flag this server's ``serve --help`` does not
list is dropped (and said so), so the same command runs before and after a fix.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import json
import os
import platform
import re
import resource
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psutil
import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

HOST = "127.0.0.1"
FILL = "bench.fill"
NO_MATCH = ["probe.none"]  # a subscription that matches nothing we publish
MiB = 1024 * 1024
SECRET = "attack-harness-secret-0123456789abcdef"  # >= 32 bytes, loopback only


# Results


@dataclass
class Result:
    """One attack variant: what was measured and whether the server held."""

    attack: str
    variant: str
    measured: dict[str, Any] = field(default_factory=dict)
    verdict: str = "error"
    reason: str = ""
    seconds: float = 0.0

    def judge(self, held: bool, reason_held: str, reason_failed: str) -> None:
        """Set the verdict from one boolean and the matching reason."""
        self.verdict = "held" if held else "failed"
        self.reason = reason_held if held else reason_failed


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def table(results: list[Result]) -> str:
    """The results as a markdown table."""
    lines = [
        "| attack | variant | measured | verdict | reason |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        measured = "; ".join(f"{k}={_fmt(v)}" for k, v in r.measured.items())
        reason = r.reason.replace("|", "\\|")
        lines.append(
            f"| {r.attack} | {r.variant} | {measured.replace('|', '/')} | **{r.verdict}** "
            f"| {reason} |"
        )
    return "\n".join(lines)


# The server under test


_SUPPORTED: set[str] | None = None


def supported_flags() -> set[str]:
    """Every ``--flag`` that this code's ``gathering-lab serve --help`` lists."""
    global _SUPPORTED
    if _SUPPORTED is None:
        out = subprocess.run(
            [sys.executable, "-m", "gathering_lab", "serve", "--help"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        ).stdout
        _SUPPORTED = set(re.findall(r"(--[a-z][a-z0-9-]*)", out))
    return _SUPPORTED


def filter_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Split extra server flags into (supported, dropped)."""
    known = supported_flags()
    kept: list[str] = []
    dropped: list[str] = []
    for arg in args:
        (kept if arg.split("=", 1)[0] in known else dropped).append(arg)
    return kept, dropped


class ServerProc:
    """``python -m gathering_lab serve`` in a subprocess, its output in temporary files."""

    def __init__(
        self,
        ctx: Context,
        *,
        args: list[str] | None = None,
        port: int = 0,
        log_level: str = "warning",
        nofile: int | None = None,
    ) -> None:
        self.ctx = ctx
        self.port = port
        self.log_level = log_level
        self.nofile = nofile
        self.args = list(args or [])
        self.process: subprocess.Popen[bytes] | None = None
        self.dir = Path(tempfile.mkdtemp(prefix="attacks-"))
        self.ps: psutil.Process | None = None

    def start(self, timeout: float = 20.0) -> ServerProc:
        """Start the server and wait until it prints its URL."""
        extra, _ = filter_args(self.ctx.server_args)
        cmd = [sys.executable, "-m", "gathering_lab", "serve", "--host", HOST]
        cmd += ["--port", str(self.port), "--log-level", self.log_level, *self.args, *extra]
        nofile = self.nofile

        def limit() -> None:
            if nofile is not None:
                hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
                resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, hard))

        self.out = open(self.dir / "stdout", "wb")  # noqa: SIM115 - closed in stop()
        self.err = open(self.dir / "stderr", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(
            cmd,
            stdout=self.out,
            stderr=self.err,
            stdin=subprocess.DEVNULL,
            preexec_fn=limit,
            start_new_session=True,
        )
        self.ctx.servers.append(self)
        deadline = time.monotonic() + timeout
        pattern = re.compile(r"WebSocket\s+wss?://[^:]+:(\d+)/ws/dashboard")
        while time.monotonic() < deadline:
            found = pattern.search((self.dir / "stdout").read_text(errors="replace"))
            if found:
                self.port = int(found.group(1))
                self.ps = psutil.Process(self.process.pid)
                return self
            if self.process.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"server did not start: {self.stderr()[-2000:]}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def rss(self) -> int:
        """Resident set size in bytes (0 once the process is gone)."""
        try:
            return self.ps.memory_info().rss if self.ps else 0
        except psutil.Error:
            return 0

    def hwm(self) -> int:
        """Peak resident set size (VmHWM) in bytes."""
        try:
            text = Path(f"/proc/{self.pid}/status").read_text()
        except OSError:
            return 0
        found = re.search(r"VmHWM:\s+(\d+) kB", text)
        return int(found.group(1)) * 1024 if found else 0

    def stderr(self) -> str:
        try:
            return (self.dir / "stderr").read_text(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 5.0) -> float | None:
        """SIGTERM, then SIGKILL after ``grace`` s; returns SIGTERM's exit time (None: killed)."""
        took: float | None = None
        if self.process is not None and self.process.poll() is None:
            start = time.monotonic()
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(grace)
                took = time.monotonic() - start
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        for f in (getattr(self, "out", None), getattr(self, "err", None)):
            if f is not None:
                f.close()
        return took

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(5)


@dataclass
class Context:
    """Options shared by every attack."""

    quick: bool
    server_args: list[str]
    rss_cap: int
    servers: list[ServerProc] = field(default_factory=list)

    def size(self, full: int, quick: int) -> int:
        return quick if self.quick else full

    def secs(self, full: float, quick: float) -> float:
        return quick if self.quick else full

    @contextlib.contextmanager
    def server(self, **options: Any) -> Iterator[ServerProc]:
        server = ServerProc(self, **options).start()
        try:
            yield server
        finally:
            server.stop()


# Client helpers


def url(port: int, query: str = "") -> str:
    return f"ws://{HOST}:{port}/ws/dashboard" + (f"?{query}" if query else "")


def strict_json(text: str | bytes) -> bool:
    """True if ``text`` is JSON without NaN/Infinity (what browsers' JSON.parse accepts)."""

    def refuse(name: str) -> Any:
        raise ValueError(name)

    try:
        json.loads(text, parse_constant=refuse)
    except (ValueError, RecursionError):
        return False
    return True


def publish_text(event_type: str, data_json: str) -> str:
    return f'{{"type":"publish","data":{{"type":"{event_type}","data":{data_json}}}}}'


async def open_client(
    port: int, query: str = "", *, types: list[str] | None = None, **options: Any
) -> ClientConnection:
    """A websockets client past ``connection.established`` (and subscribed to ``types``)."""
    options.setdefault("open_timeout", 10)
    # Unbounded receive queue: a client that does not read its acks must still close at once.
    options.setdefault("max_queue", None)
    ws = await connect(
        url(port, query), max_size=None, compression=None, ping_interval=None, **options
    )
    hello = json.loads(await asyncio.wait_for(ws.recv(), 10))
    assert hello["type"] == "connection.established", hello
    if types is not None:
        await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": types}}))
        while True:
            message = json.loads(await asyncio.wait_for(ws.recv(), 30))
            if message["type"] in ("subscribed", "error"):
                break
    return ws


async def collect(ws: ClientConnection, seconds: float) -> tuple[list[str], int | None]:
    """Every frame received within ``seconds`` (or until close) and the close code."""
    frames: list[str] = []
    deadline = time.monotonic() + seconds
    with contextlib.suppress(TimeoutError, ConnectionClosed):
        while (left := deadline - time.monotonic()) > 0:
            frame = await asyncio.wait_for(ws.recv(), left)
            frames.append(frame if isinstance(frame, str) else frame.decode(errors="replace"))
    return frames, ws.close_code


def kinds(frames: list[str]) -> list[str]:
    out = []
    for f in frames:
        try:
            out.append(str(json.loads(f).get("type")))
        except ValueError:
            out.append("<not json>")
    return out


async def publish_many(
    port: int, count: int, size: int, *, batch: int = 200, event_type: str = FILL
) -> dict[str, Any]:
    """Publish ``count`` events of ~``size`` bytes, pipelined in batches, and wait for the acks."""
    ws = await open_client(port, "client_id=loader", types=NO_MATCH)
    start = time.monotonic()
    acked = errors = 0
    pad = "x" * size
    try:
        sent = 0
        while sent < count:
            n = min(batch, count - sent)
            for i in range(n):
                data = json.dumps({"i": sent + i, "pad": pad})
                await ws.send(publish_text(event_type, data))
            sent += n
            got = 0
            while got < n:
                message = json.loads(await asyncio.wait_for(ws.recv(), 60))
                if message["type"] == "published":
                    acked += 1
                    got += 1
                elif message["type"] == "error":
                    errors += 1
                    got += 1
    except (ConnectionClosed, TimeoutError) as exc:
        return {"acked": acked, "errors": errors, "stopped": repr(exc)}
    finally:
        await ws.close()
    return {"acked": acked, "errors": errors, "seconds": time.monotonic() - start}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Probe:
    """A client that pings (application ``ping``) in a loop and records the round trips."""

    def __init__(self, port: int, interval: float = 0.05) -> None:
        self.port = port
        self.interval = interval
        self.rtts: list[float] = []
        self.error: str | None = None
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task[None] | None = None
        self._sent_at: float | None = None
        self._mark = 0

    async def start(self) -> Probe:
        self._ws = await open_client(self.port, "client_id=probe", types=NO_MATCH)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        assert self._ws is not None
        n = 0
        try:
            while True:
                n += 1
                self._sent_at = time.perf_counter()
                await self._ws.send(json.dumps({"type": "ping", "id": f"p{n}"}))
                while True:
                    message = json.loads(await self._ws.recv())
                    if message["type"] == "pong":
                        break
                self.rtts.append(time.perf_counter() - self._sent_at)
                self._sent_at = None
                await asyncio.sleep(self.interval)
        except ConnectionClosed as exc:
            self.error = f"probe closed: {exc.rcvd.code if exc.rcvd else None}"

    def mark(self) -> None:
        """Start a new measurement window."""
        self._mark = len(self.rtts)

    def window(self) -> dict[str, float]:
        """ms figures since the last mark; a ping still waiting counts as its time so far."""
        rtts = self.rtts[self._mark :]
        if self._sent_at is not None:
            rtts = [*rtts, time.perf_counter() - self._sent_at]
        ms = [r * 1000 for r in rtts]
        return {
            "pings": len(ms),
            "p50_ms": pct(ms, 0.5),
            "p99_ms": pct(ms, 0.99),
            "max_ms": max(ms) if ms else float("nan"),
        }

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._ws.close(), 2)


class RssSampler:
    """Samples a server's RSS every 0.1 s; kills it past the safety cap."""

    def __init__(self, server: ServerProc, cap: int) -> None:
        self.server = server
        self.cap = cap
        self.peak = server.rss()
        self.capped = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        while self.server.alive():
            rss = self.server.rss()
            self.peak = max(self.peak, rss)
            if rss > self.cap:
                self.capped = True
                self.server.kill()
                return
            await asyncio.sleep(0.1)

    async def stop(self) -> int:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.peak


def mb(n: int) -> float:
    return round(n / MiB, 1)


def send_handshake(port: int, query: str, rcvbuf: int = 4096, timeout: float = 10) -> socket.socket:
    """A TCP socket (small receive buffer) that sent a WebSocket upgrade request."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    try:
        sock.connect((HOST, port))
        request = (
            f"GET /ws/dashboard?{query} HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        sock.sendall(request.encode())
    except OSError:
        sock.close()
        raise
    return sock


def read_handshake(sock: socket.socket) -> socket.socket:
    """Read the 101 response's head, and nothing more ever after."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = sock.recv(1024)
        if not chunk:
            break
        head += chunk
    if not head.startswith(b"HTTP/1.1 101"):
        sock.close()
        raise ConnectionError(head[:80].decode(errors="replace"))
    return sock


def open_all(
    port: int, count: int, query: str, socks: list[socket.socket], failures: list[str]
) -> None:
    """``count`` raw handshakes with ``query``: all requests sent first, then the 101s read."""
    sent = []
    for i in range(count):
        try:
            sent.append(send_handshake(port, f"client_id=r{i}&{query}"))
        except OSError as exc:
            failures.append(str(exc)[:60])
    for sock in sent:
        try:
            socks.append(read_handshake(sock))
        except (OSError, ConnectionError) as exc:
            failures.append(str(exc)[:60])


def http_get(port: int, path: str, headers: list[tuple[str, str]] | None = None) -> int | str:
    """Status of a GET (or the error's text)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=5)
    try:
        conn.putrequest("GET", path)
        for name, value in headers or []:
            conn.putheader(name, value)
        conn.endheaders()
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return f"{type(exc).__name__}: {exc}"[:80]
    finally:
        conn.close()


# 1. Poison


POISONS = {
    "lone surrogate": '{"x":"\\ud800"}',
    "nesting 980": '{"x":' + "[" * 980 + "]" * 980 + "}",
    "NaN": '{"x":NaN}',
    "Infinity": '{"x":Infinity}',
    "-Infinity": '{"x":-Infinity}',
}


async def attack_poison(ctx: Context) -> list[Result]:
    """Publish data that cannot be strict JSON; does it break the publisher, live or replay?"""
    results = []
    wait = ctx.secs(2.0, 0.6)
    for variant, data in POISONS.items():
        r = Result("1 poison", variant)
        start = time.monotonic()
        with ctx.server() as server:
            port = server.port
            listener = await open_client(port, "client_id=listener")
            publisher = await open_client(port, "client_id=publisher", types=NO_MATCH)
            await publisher.send(publish_text("bench.good", '{"n":1}'))
            await collect(publisher, 0.3)
            await publisher.send(publish_text("bench.poison", data))
            frames, close = await collect(publisher, wait)
            reply = [k for k in kinds(frames)]
            error_codes = [
                json.loads(f)["data"].get("code") for f in frames if '"type":"error"' in f
            ]
            if publisher.close_code is None:
                await publisher.send(publish_text("bench.good", '{"n":2}'))
                await collect(publisher, 0.3)
            live, live_close = await collect(listener, 0.5)
            with contextlib.suppress(Exception):
                await publisher.close()
                await listener.close()
            fresh = await open_client(port, "client_id=fresh&last_seq=0")
            replay, fresh_close = await collect(fresh, wait)
            with contextlib.suppress(Exception):
                await fresh.close()
            replay_kinds = kinds(replay)
            frames_all = live + replay
            strict = all(strict_json(f) for f in frames_all)
            r.measured = {
                "publisher_reply": ",".join(reply) or "none",
                "error_code": ",".join(map(str, error_codes)) or "-",
                "publisher_close": close,
                "listener_events": sum(k.startswith("bench.") for k in kinds(live)),
                "listener_close": live_close,
                "replay_close": fresh_close,
                "replay_events": sum(k.startswith("bench.") for k in replay_kinds),
                "resumed_ack": "resumed" in replay_kinds,
                "strict_json": strict,
            }
            broken = [c for c in (close, live_close, fresh_close) if c == 1011]
            refused = "invalid_message" in error_codes
            ok = not broken and strict and "resumed" in replay_kinds and fresh_close is None
            r.judge(
                ok,
                "refused with invalid_message; replay intact"
                if refused
                else "accepted, and every frame is strict JSON; replay intact",
                f"closes with 1011 ({len(broken)} connections)"
                if broken
                else ("non-strict JSON broadcast" if not strict else "replay did not complete"),
            )
        r.seconds = time.monotonic() - start
        results.append(r)
    return results


# 2. Replay flood


async def attack_replay(ctx: Context) -> list[Result]:
    """Big history, then many sockets that ask for a full replay and never read."""
    results = []
    events = ctx.size(10_000, 6_000)
    sockets = ctx.size(200, 40)
    hold = ctx.secs(8.0, 3.0)
    after = ctx.secs(5.0, 2.0)
    for variant, query in (
        ("last_seq=0", "last_seq=0"),
        ("stale epoch", "last_seq=0&epoch=bogus"),
    ):
        r = Result("2 replay flood", f"{variant}: {events} x 1.2 KB, {sockets} sockets")
        start = time.monotonic()
        with ctx.server() as server:
            loaded = await publish_many(server.port, events, 1150)
            base = server.rss()
            probe = await Probe(server.port).start()
            sampler = RssSampler(server, ctx.rss_cap)
            probe.mark()
            socks: list[socket.socket] = []
            failures: list[str] = []

            try:
                await asyncio.wait_for(
                    asyncio.to_thread(open_all, server.port, sockets, query, socks, failures),
                    hold * 6 + 30,
                )
                await asyncio.sleep(hold)
            finally:
                for s in socks:
                    s.close()
            during = probe.window()
            peak = await sampler.stop()
            await asyncio.sleep(after)
            rss_after = server.rss()
            await probe.stop()
            r.measured = {
                "acked": loaded["acked"],
                "handshakes": len(socks),
                "rss_before_MB": mb(base),
                "rss_peak_MB": mb(max(peak, server.hwm() if not sampler.capped else peak)),
                f"rss_{after:g}s_after_MB": mb(rss_after),
                "probe_p99_ms": during["p99_ms"],
                "probe_max_ms": during["max_ms"],
                "capped": sampler.capped,
            }
            growth = peak - base
            per_socket = growth / max(1, len(socks))
            r.measured["MB_per_socket"] = mb(int(per_socket))
            # Each stalled socket may hold the pending cap (4 MiB by default), not a whole replay.
            ok = per_socket <= 4 * MiB and during["max_ms"] < 1000 and not sampler.capped
            r.judge(
                ok,
                f"RSS +{mb(growth)} MB ({mb(int(per_socket))} per socket), "
                f"probe max {during['max_ms']:.0f} ms",
                f"RSS +{mb(growth)} MB ({mb(int(per_socket))} per socket; budget 4), "
                f"probe max {during['max_ms']:.0f} ms (budget 1000)"
                + (" - killed at the RSS cap" if sampler.capped else ""),
            )
        r.seconds = time.monotonic() - start
        results.append(r)
    return results


# 3. History bytes


async def attack_history(ctx: Context) -> list[Result]:
    """Many 1 MB publishes: is history bounded in bytes?"""
    n = ctx.size(1200, 400)
    r = Result("3 history bytes", f"{n} x 1 MB")
    start = time.monotonic()
    with ctx.server() as server:
        base = server.rss()
        sampler = RssSampler(server, ctx.rss_cap)
        loaded = await publish_many(server.port, n, 1_000_000, batch=4)
        peak = await sampler.stop()
        r.measured = {
            "acked": loaded["acked"],
            "errors": loaded["errors"],
            "rss_before_MB": mb(base),
            "rss_peak_MB": mb(peak),
            "rss_end_MB": mb(server.rss()),
            "capped": sampler.capped,
        }
        growth = peak - base
        budget = 768 * MiB
        r.judge(
            growth < budget and not sampler.capped,
            f"RSS +{mb(growth)} MB for {n} MB published",
            f"RSS +{mb(growth)} MB for {n} MB published (budget {mb(budget):.0f})",
        )
    r.seconds = time.monotonic() - start
    return [r]


# 4. Huge subscriptions


async def time_delivery(port: int, receiver: ClientConnection, count: int) -> float:
    """Seconds from the first publish until ``receiver`` has all ``count`` events."""
    publisher = await open_client(port, "client_id=timer-pub", types=NO_MATCH)
    marker = f"t{time.monotonic_ns()}"
    start = time.perf_counter()
    try:

        async def send() -> None:
            for i in range(count):
                await publisher.send(publish_text("bench.tick", f'{{"m":"{marker}","i":{i}}}'))

        sender = asyncio.create_task(send())
        got = 0
        while got < count:
            frame = await asyncio.wait_for(receiver.recv(), 120)
            if marker in frame:
                got += 1
        await sender
        return time.perf_counter() - start
    finally:
        await publisher.close()


async def drain(ws: ClientConnection, counter: list[int]) -> None:
    with contextlib.suppress(ConnectionClosed):
        async for _ in ws:
            counter[0] += 1


async def latency_series(port: int, receiver: ClientConnection, count: int) -> list[float]:
    """Publish one event at a time; ms from send until ``receiver`` has it."""
    publisher = await open_client(port, "client_id=lat-pub", types=NO_MATCH)
    out = []
    try:
        for i in range(count):
            marker = f"L{i}-{time.monotonic_ns()}"
            t0 = time.perf_counter()
            await publisher.send(publish_text("bench.tick", f'{{"m":"{marker}"}}'))
            while marker not in await asyncio.wait_for(receiver.recv(), 30):
                pass
            out.append((time.perf_counter() - t0) * 1000)
    finally:
        await publisher.close()
    return out


async def attack_subscriptions(ctx: Context) -> list[Result]:
    """One subscription with 75,000 patterns; a resume through it; 1,000 distinct small filters."""
    results = []
    patterns = [f"p{i}.*" for i in range(75_000)]
    subscribe = json.dumps({"type": "subscribe", "data": {"event_types": patterns}})
    n_events = ctx.size(200, 50)
    history = ctx.size(2000, 300)

    r = Result("4 huge subscription", f"75,000 patterns ({len(subscribe) / 1024:.0f} KiB)")
    r2 = Result("4 huge subscription", f"100-byte resume over {history} events")
    start = time.monotonic()
    with ctx.server() as server:
        port = server.port
        await publish_many(port, history, 100)
        receiver = await open_client(port, "client_id=receiver", types=["bench.*"])
        t_base = await time_delivery(port, receiver, n_events)
        huge = await open_client(port, "client_id=huge")
        rss0 = server.rss()
        t0 = time.perf_counter()
        await huge.send(subscribe)
        ack = await asyncio.wait_for(huge.recv(decode=True), 120)
        ack_s = time.perf_counter() - t0
        ack_kind = kinds([ack])[0]
        code = json.loads(ack)["data"].get("code") if ack_kind == "error" else None
        rss1 = server.rss()
        counter = [0]
        drainer = asyncio.create_task(drain(huge, counter))
        t_huge = await time_delivery(port, receiver, n_events)
        per_event = (t_huge - t_base) / n_events * 1000
        r.measured = {
            "reply": ack_kind + (f" {code}" if code else ""),
            "ack_bytes": len(ack),
            "subscribe_s": ack_s,
            "rss_per_client_MB": mb(rss1 - rss0),
            f"{n_events}_events_s_without": t_base,
            f"{n_events}_events_s_with": t_huge,
            "added_ms_per_event": per_event,
        }
        r.judge(
            per_event < 1.0 and len(ack) < 64 * 1024,
            f"{per_event:.2f} ms per event added, ack {len(ack)} bytes",
            f"{per_event:.2f} ms per event added (budget 1), ack {len(ack)} bytes (budget 64 KiB)",
        )
        # The resume: the huge client asks for the last `history` events again.
        health = json.loads(await asyncio.to_thread(_health_body, port))
        since = max(0, int(health["seq"]) - history)
        probe = await Probe(port, interval=0.02).start()
        await asyncio.sleep(0.3)
        probe.mark()
        resume = json.dumps({"type": "resume", "data": {"since_seq": since}})
        await huge.send(resume)
        bound = ctx.secs(90.0, 45.0)
        deadline = time.monotonic() + bound
        blocked = 0.0
        while time.monotonic() < deadline:
            await asyncio.sleep(0.2)
            w = probe.window()
            blocked = w["max_ms"]
            # done once the probe answers again quickly after any stall
            if probe.rtts[-1:] and probe._sent_at is None and len(probe.rtts) > probe._mark + 5:
                recent = probe.rtts[-3:]
                if max(recent) < 0.05:
                    break
        w = probe.window()
        await probe.stop()
        # Once more, and SIGTERM while the loop works through it.
        await huge.send(resume)
        await asyncio.sleep(0.5)
        grace = ctx.secs(10.0, 5.0)
        term_s = await asyncio.to_thread(server.stop, grace)
        drainer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drainer
        r2.measured = {
            "resume_bytes": len(resume),
            "probe_blocked_max_ms": w["max_ms"],
            "probe_p99_ms": w["p99_ms"],
            "huge_client_frames": counter[0],
        }
        r2.judge(
            blocked < 500,
            f"probe never blocked over {blocked:.0f} ms",
            f"the loop blocked {blocked / 1000:.1f} s (budget 0.5 s)",
        )
        r2.measured["sigterm_exit_s"] = term_s if term_s is not None else f"over {grace:g}"
        for ws in (huge, receiver):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)
    r.seconds = r2.seconds = time.monotonic() - start
    results += [r, r2]

    # Many clients with distinct small filters.
    clients = ctx.size(1000, 100)
    samples = ctx.size(200, 30)
    r3 = Result("4 huge subscription", f"{clients} clients, distinct small filters")
    start = time.monotonic()
    with ctx.server() as server:
        port = server.port
        receiver = await open_client(port, "client_id=receiver", types=["bench.*"])
        base = await latency_series(port, receiver, samples)
        gate = asyncio.Semaphore(50)
        conns: list[ClientConnection] = []

        async def one(i: int) -> None:
            async with gate:
                ws = await open_client(
                    port, f"client_id=f{i}", types=[f"grp{i}.*", f"other{i}.event"]
                )
                conns.append(ws)

        try:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(clients))), 180)
            loaded = await latency_series(port, receiver, samples)
        finally:
            await asyncio.gather(
                *(asyncio.wait_for(c.close(), 5) for c in conns), return_exceptions=True
            )
        added = statistics.median(loaded) - statistics.median(base)
        r3.measured = {
            "connected": len(conns),
            "p50_ms_without": statistics.median(base),
            "p50_ms_with": statistics.median(loaded),
            "p99_ms_with": pct(loaded, 0.99),
            "added_ms_per_event": added,
        }
        r3.judge(
            added < 1.0,
            f"{added:.2f} ms added per event",
            f"{added:.2f} ms added per event (budget 1)",
        )
        with contextlib.suppress(Exception):
            await receiver.close()
    r3.seconds = time.monotonic() - start
    results.append(r3)
    return results


def _health_body(port: int) -> str:
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().read().decode()
    finally:
        conn.close()


# 5. Admission


def open_idle(port: int, count: int, half_sent: bool) -> list[socket.socket]:
    """``count`` non-blocking TCP connections; with ``half_sent``, each sends half a handshake."""
    socks = []
    for i in range(count):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.connect_ex((HOST, port))
        socks.append(s)
        if i % 50 == 49:
            # Paced so the accept queue never overflows: with SYN cookies, a connection
            # whose final ACK was dropped only reaches the server once it sends data.
            time.sleep(0.05)
    if half_sent:
        sel = selectors.DefaultSelector()
        for s in socks:
            sel.register(s, selectors.EVENT_WRITE)
        partial = f"GET /ws/dashboard HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\n"
        pending = len(socks)
        deadline = time.monotonic() + 3
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(0.2):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                with contextlib.suppress(OSError):
                    sock.send(partial.encode())
                sel.unregister(sock)
                pending -= 1
        sel.close()
    return socks


async def newcomer(port: int) -> str:
    try:
        ws = await open_client(port, "client_id=newcomer", open_timeout=3)
    except (OSError, TimeoutError, InvalidStatus, ConnectionClosed, AssertionError) as exc:
        return f"refused: {type(exc).__name__}"
    await ws.close()
    return "ok"


async def attack_admission(ctx: Context) -> list[Result]:
    """Descriptor exhaustion under a 1,024 limit; a publish flood against a probe."""
    results = []
    count = 1100
    for variant, half in (("idle TCP", False), ("half-sent handshakes", True)):
        r = Result("5 admission", f"{count} {variant}, RLIMIT_NOFILE 1024")
        start = time.monotonic()
        with ctx.server(nofile=1024) as server:
            socks = await asyncio.to_thread(open_idle, server.port, count, half)
            try:
                await asyncio.sleep(1.0)
                newcomer_result, health = await asyncio.gather(
                    newcomer(server.port), asyncio.to_thread(http_get, server.port, "/health")
                )
                fds = server.ps.num_fds() if server.ps else 0
            finally:
                for s in socks:
                    s.close()
            err = server.stderr()
            r.measured = {
                "server_fds": fds,
                "newcomer": newcomer_result,
                "health": health,
                "tracebacks": err.count("Traceback"),
                "emfile_lines": err.count("Too many open files"),
                "stderr_KB": round(len(err) / 1024, 1),
            }
            ok = newcomer_result == "ok" and health == 200 and err.count("Traceback") <= 1
            r.judge(
                ok,
                "newcomer and /health served, log quiet",
                f"newcomer {newcomer_result}, /health {health}, "
                f"{err.count('Traceback')} tracebacks",
            )
        r.seconds = time.monotonic() - start
        results.append(r)

    seconds = ctx.secs(5.0, 2.0)
    r = Result("5 admission", f"publish flood {seconds:g} s vs probe")
    start = time.monotonic()
    with ctx.server() as server:
        probe = await Probe(server.port, interval=0.02).start()
        await asyncio.sleep(seconds)
        quiet = probe.window()
        probe.mark()
        flood = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--flood-port",
            str(server.port),
            "--flood-seconds",
            str(seconds),
            stdout=asyncio.subprocess.PIPE,
        )
        try:
            out, _ = await asyncio.wait_for(flood.communicate(), seconds + 60)
        finally:
            if flood.returncode is None:
                flood.kill()
                await flood.wait()
        loud = probe.window()
        await probe.stop()
        report = json.loads(out.decode() or "{}")
        r.measured = {
            "flood_sent_per_s": report.get("sent", 0) / seconds,
            "acked": report.get("published", 0),
            "rate_limited": report.get("rate_limited", 0),
            "flood_close": report.get("close"),
            "probe_p50_ms_quiet": quiet["p50_ms"],
            "probe_p99_ms_quiet": quiet["p99_ms"],
            "probe_p50_ms_flood": loud["p50_ms"],
            "probe_p99_ms_flood": loud["p99_ms"],
        }
        ok = loud["p99_ms"] < 50 and loud["p50_ms"] < 10
        r.judge(
            ok,
            f"probe p50/p99 {loud['p50_ms']:.1f}/{loud['p99_ms']:.1f} ms under flood",
            f"probe p50/p99 {loud['p50_ms']:.1f}/{loud['p99_ms']:.1f} ms under flood "
            f"(quiet {quiet['p50_ms']:.1f}/{quiet['p99_ms']:.1f}; budget 10/50)",
        )
    r.seconds = time.monotonic() - start
    results.append(r)
    return results


async def flood(port: int, seconds: float) -> dict[str, Any]:
    """One client publishing as fast as it can (run in its own process by the harness)."""
    ws = await open_client(port, "client_id=flooder", types=NO_MATCH)
    counts = {"sent": 0, "published": 0, "rate_limited": 0, "other_errors": 0}

    async def read() -> None:
        with contextlib.suppress(ConnectionClosed):
            async for frame in ws:
                if '"published"' in frame:
                    counts["published"] += 1
                elif "rate_limited" in frame:
                    counts["rate_limited"] += 1
                elif '"error"' in frame:
                    counts["other_errors"] += 1

    reader = asyncio.create_task(read())
    message = publish_text("bench.flood", '{"n":1}')
    deadline = time.monotonic() + seconds
    with contextlib.suppress(ConnectionClosed):
        while time.monotonic() < deadline:
            for _ in range(50):
                await ws.send(message)
            counts["sent"] += 50
            await asyncio.sleep(0)
    await asyncio.sleep(1.0)
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    result: dict[str, Any] = dict(counts)
    result["close"] = ws.close_code
    with contextlib.suppress(Exception):
        await asyncio.wait_for(ws.close(), 3)
    return result


# 6. Auth


def quote_all(text: str) -> str:
    """Every character percent-encoded (still the same value once decoded)."""
    return "".join(f"%{b:02X}" for b in text.encode())


def mint(claims: dict[str, Any]) -> str:
    import jwt

    return jwt.encode(claims, SECRET, algorithm="HS256")


async def try_connect(port: int, query: str, headers: Any = None) -> tuple[str, int | None]:
    """('established' | 'http NNN' | error, close code after 0.5 s)."""
    try:
        ws = await connect(
            url(port, query),
            additional_headers=headers,
            open_timeout=5,
            ping_interval=None,
            compression=None,
        )
    except InvalidStatus as exc:
        return f"http {exc.response.status_code}", None
    except (OSError, TimeoutError) as exc:
        return type(exc).__name__, None
    try:
        first = json.loads(await asyncio.wait_for(ws.recv(), 5))
        state = str(first.get("type"))
    except ConnectionClosed:
        state = "closed"
    except TimeoutError:
        state = "silent"
    _, code = await collect(ws, 0.5)
    with contextlib.suppress(Exception):
        await ws.close()
    return state, code


def leaked(token: str, log: str) -> list[str]:
    """The secret parts of ``token`` (claims, signature) in ``log``, as written or decoded.

    The header (``eyJhbGciOi...``) is the same in every HS256 token: not a secret, not counted.
    """
    decoded = unquote(log)
    return [p for p in token.split(".")[1:] if len(p) >= 12 and (p in log or p in decoded)]


async def attack_auth(ctx: Context) -> list[Result]:
    """Token claim types, token leaks into the debug log, duplicate Authorization headers."""
    results = []
    secret_env = {"--jwt-secret": SECRET}
    args = [f"{k}={v}" for k, v in secret_env.items()]
    now = int(time.time())

    r = Result("6 auth", 'exp as a string of digits ("now+2")')
    start = time.monotonic()
    with ctx.server(args=args) as server:
        token = mint({"sub": "stringy", "roles": ["subscribe"], "exp": str(now + 2)})
        state = "?"
        closed_at: float | None = None
        try:
            ws = await connect(
                url(server.port),
                additional_headers={"Authorization": f"Bearer {token}"},
                open_timeout=5,
                ping_interval=None,
            )
            first = json.loads(await asyncio.wait_for(ws.recv(), 5))
            state = str(first["type"])
            if state == "connection.established":
                t0 = time.monotonic()
                _, code = await collect(ws, 5.0)
                closed_at = time.monotonic() - t0 if code is not None else None
            await ws.close()
        except InvalidStatus as exc:
            state = f"http {exc.response.status_code}"
        except ConnectionClosed as exc:
            state = f"closed {exc.rcvd.code if exc.rcvd else None}"
        accepted = state == "connection.established"
        r.measured = {
            "reply": state,
            "expired_after_s": closed_at
            if closed_at is not None
            else ("never" if accepted else "-"),
        }
        r.judge(
            not accepted,
            "refused",
            "accepted" + ("; not expired 5 s later" if not closed_at else ""),
        )
    r.seconds = time.monotonic() - start
    results.append(r)

    with ctx.server(args=args, log_level="debug") as server:
        port = server.port
        token = mint({"sub": "leaky", "roles": ["subscribe"], "exp": now + 600})
        for variant, value in (
            ("?%74oken=eyJ... (percent-encoded key)", token),
            ("?%74oken=%65%79... (key and value percent-encoded)", quote_all(token)),
        ):
            r = Result("6 auth", variant + ", debug log")
            state, _ = await try_connect(port, f"client_id=leaky&%74oken={value}")
            await asyncio.sleep(0.3)
            found = leaked(token, server.stderr())
            r.measured = {"reply": state, "token_parts_in_log": len(found)}
            r.judge(not found, "token not in the log", f"{len(found)} token parts logged in clear")
            results.append(r)

        r = Result("6 auth", "?token= (plain), debug log")
        token2 = mint({"sub": "plain", "roles": ["subscribe"], "exp": now + 600})
        state, _ = await try_connect(port, f"client_id=plain&token={token2}")
        await asyncio.sleep(0.3)
        found = leaked(token2, server.stderr())
        r.measured = {"reply": state, "token_parts_in_log": len(found)}
        r.judge(not found, "token not in the log", f"{len(found)} token parts logged in clear")
        results.append(r)

        r = Result("6 auth", "first auth frame sent in fragments, debug log")
        token3 = mint({"sub": "frag", "roles": ["subscribe"], "exp": now + 600})
        size = len(token3) // 4 + 1
        pieces = [token3[i : i + size] for i in range(0, len(token3), size)]
        fragments = ['{"type":"auth","data":{"token":"', *pieces, '"}}']
        reply = "?"
        try:
            ws = await connect(url(port, "client_id=frag"), open_timeout=5, ping_interval=None)
            await ws.send(iter(fragments))
            frames, _ = await collect(ws, 1.0)
            reply = ",".join(kinds(frames)) or "none"
            await ws.close()
        except (OSError, ConnectionClosed, InvalidStatus) as exc:
            reply = type(exc).__name__
        await asyncio.sleep(0.3)
        log = server.stderr()
        found = [p for p in pieces if p in log or p in unquote(log)]
        r.measured = {
            "fragments": len(fragments),
            "reply": reply,
            "token_pieces_in_log": f"{len(found)}/{len(pieces)}",
        }
        r.judge(
            not found,
            "no piece of the token logged",
            f"{len(found)} of {len(pieces)} pieces of the token logged",
        )
        results.append(r)

        admin = mint({"sub": "admin", "roles": ["subscribe", "admin"], "exp": now + 600})
        r = Result("6 auth", "two Authorization headers")
        two = [("Authorization", f"Bearer {admin}"), ("Authorization", f"Bearer {admin}")]
        state, code = await try_connect(port, "client_id=twice", headers=two)
        stats = await asyncio.to_thread(http_get, port, "/admin/websocket/stats", two)
        log = server.stderr()
        r.measured = {
            "ws": state + (f" close {code}" if code else ""),
            "stats_status": stats,
            "tracebacks": log.count("Traceback"),
        }
        ok = state.startswith("http 4") and isinstance(stats, int) and 400 <= stats < 500
        r.judge(
            ok,
            "refused with a 4xx",
            f"websocket: {state} (close {code}), stats: {stats}",
        )
        results.append(r)
    return results


# 7. LabClient silent loss


class Proxy:
    """A TCP relay whose connections can be cut and whose door can be shut (a network blip)."""

    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.open = True
        self.pipes: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Proxy:
        self.server = await asyncio.start_server(self._accept, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.backend)
        except OSError:
            writer.close()
            return
        self.pipes |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.pipes -= {writer, up_writer}

    def cut(self) -> None:
        for w in list(self.pipes):
            transport = w.transport
            if transport is not None:
                transport.abort()

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


async def wait_until(predicate: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.05)
    return predicate()


async def attack_labclient(ctx: Context) -> list[Result]:
    """Restart the server into an empty run, then a network blip while events are published."""
    from gathering_lab.client import LabClient

    r = Result("7 LabClient loss", "restart (no events), blip, 5 publishes")
    start = time.monotonic()
    first = ServerProc(ctx).start()
    port = first.port
    proxy = await Proxy(port).start()
    client = LabClient(
        f"ws://{HOST}:{proxy.port}/ws/dashboard",
        "victim",
        base_delay=0.1,
        max_delay=0.3,
        heartbeat=None,
        open_timeout=3,
    )
    second: ServerProc | None = None
    try:
        await client.connect()
        first.stop()
        second = ServerProc(ctx, port=port).start()
        restarted = await wait_until(lambda: client.restarts >= 1 and client.connected, 15)
        last_seq_after_restart = client.last_seq
        gaps_before = client.gaps  # the restart itself is reported as a gap: not counted
        proxy.open = False
        proxy.cut()
        await wait_until(lambda: not client.connected, 5)
        publisher = await open_client(port, "client_id=pub", types=NO_MATCH)
        for i in range(5):
            await publisher.send(publish_text("bench.missed", f'{{"i":{i}}}'))
        await collect(publisher, 0.5)
        await publisher.close()
        proxy.open = True
        reconnected = await wait_until(lambda: client.connected, 10)
        await wait_until(lambda: client.events_received >= 5 or client.gaps > gaps_before, 3)
        rows = client.frame.df
        gap_rows = int((rows["type"] == "lab.gap").sum()) if len(rows) else 0
        blip_gaps = client.gaps - gaps_before
        r.measured = {
            "restart_seen": restarted,
            "last_seq_after_restart": last_seq_after_restart,
            "reconnected": reconnected,
            "events_received": client.events_received,
            "gaps_at_restart": gaps_before,
            "gaps_at_blip": blip_gaps,
            "lab.gap_rows": gap_rows,
        }
        ok = client.events_received >= 5 or blip_gaps > 0
        r.judge(
            ok,
            "every event received" if client.events_received >= 5 else "the loss is recorded",
            f"{5 - client.events_received} of 5 events lost, no gap recorded",
        )
    finally:
        await client.close()
        await proxy.close()
        first.stop()
        if second is not None:
            second.stop()
    r.seconds = time.monotonic() - start
    return [r]


# Running


ATTACKS: dict[str, Callable[[Context], Awaitable[list[Result]]]] = {
    "poison": attack_poison,
    "replay": attack_replay,
    "history": attack_history,
    "subscriptions": attack_subscriptions,
    "admission": attack_admission,
    "auth": attack_auth,
    "labclient": attack_labclient,
}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import gathering_lab

    source = Path(gathering_lab.__file__).resolve().parent
    commit = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    branch = subprocess.run(
        ["git", "-C", str(source), "rev-parse", "--abbrev-ref", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
        "nproc": os.cpu_count(),
        "memory_GB": round(psutil.virtual_memory().total / 1024**3, 1),
        "loadavg": [round(x, 2) for x in os.getloadavg()],
        "python": platform.python_version(),
        "websockets": websockets.__version__,
        "gathering_lab": f"{gathering_lab.__version__} from {source} ({branch} {commit})",
        "platform": platform.platform(),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    ctx = Context(quick=args.quick, server_args=args.server_arg, rss_cap=args.rss_cap * MiB)
    kept, dropped = filter_args(args.server_arg)
    header = machine()
    header["server_args"] = kept
    header["server_args_dropped"] = dropped
    header["mode"] = "quick" if args.quick else "default"
    results: list[Result] = []
    names = [n.strip() for n in args.only.split(",")] if args.only else list(ATTACKS)
    for name in names:
        attack = ATTACKS[name]
        bound = args.bound * (0.5 if args.quick else 1)
        start = time.monotonic()
        print(f"attacks: {name} ...", file=sys.stderr, flush=True)
        try:
            got = await asyncio.wait_for(attack(ctx), bound)
        except TimeoutError:
            got = [Result(name, "all", verdict="failed", reason=f"did not finish in {bound:g} s")]
        except Exception as exc:  # a harness problem: report it, go on
            got = [Result(name, "all", verdict="error", reason=f"{type(exc).__name__}: {exc}")]
        finally:
            for server in ctx.servers:
                server.kill()
            ctx.servers.clear()
        for r in got:
            print(f"  {r.variant}: {r.verdict} - {r.reason}", file=sys.stderr, flush=True)
        print(f"  ({time.monotonic() - start:.1f} s)", file=sys.stderr, flush=True)
        results += got
    header["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    return {"machine": header, "results": [r.__dict__ for r in results], "_results": results}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI-sized run (about a minute)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--only", help=f"comma-separated subset of: {','.join(ATTACKS)}")
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra flag for every server, e.g. --server-arg=--max-connections=900 (repeatable)",
    )
    parser.add_argument(
        "--rss-cap", type=int, default=8192, help="kill a server past this RSS, MiB (8192)"
    )
    parser.add_argument(
        "--bound", type=float, default=240, help="seconds each attack may take (240; quick: half)"
    )
    parser.add_argument("--flood-port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--flood-seconds", type=float, default=5.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.flood_port:
        print(json.dumps(asyncio.run(flood(args.flood_port, args.flood_seconds))))
        return 0
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    report = asyncio.run(run(args))
    results = report.pop("_results")
    head = report["machine"]
    print(f"# Attacks (issue 8), {head['mode']} run, {head['date']}\n")
    for key, value in head.items():
        print(f"- {key}: {value}")
    print()
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return 0 if all(r.verdict == "held" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
