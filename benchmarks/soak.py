"""Soak: a server under mixed abuse, checked for loss, memory growth and liveness.

One ``python -m gathering_lab serve --port 0`` subprocess (so its RSS is the server's
alone) and, in this process, for ``--minutes``:

* **subscribers** (``--clients``): well-behaved; read everything, check every frame is
  strict JSON, and track ``seq``. Half of them are cut every few seconds and come back
  with ``?last_seq=N&epoch=E``; one closed as a slow consumer (4008) resumes the same way.
  Each must end with every ``seq`` from its first to the last published, exactly once and
  in order -- or with the hole covered by a ``resumed`` ack that says ``"gap": true``.
* a **flooder** publishing ``--rate`` events/s of ``--payload`` bytes (acks pipelined);
* **churners** connecting, sending a subscribe or a ping, and leaving (some abort the TCP);
* **never-readers** connecting with ``?last_seq=0`` and never reading (the issue's
  unbounded-replay attack), reconnecting when dropped;
* **garbage** clients: not-JSON, unknown types, bad event types, NaN, lone surrogates, deep
  nesting, a huge subscription, binary and oversized frames, plus a valid publish now and then;
* a **/health** probe every 0.25 s, and the server's RSS (psutil) every 0.25 s.

Checks (:func:`check`): no loss/duplication/reordering for the subscribers beyond recorded
gaps; /health answered every time, within ``health_limit`` seconds; peak RSS growth within
``rss_budget`` (history + per-client pending caps + slack, see :func:`rss_budget`); no
traceback in the server's log. ``tests/test_soak.py`` runs it for ~30 s; this script runs it
longer and prints the figures:

    python benchmarks/soak.py --minutes 10 --clients 20 --rate 2000
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import tempfile
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

HOST = "127.0.0.1"  # never anything else
URL_LINE = re.compile(r"WebSocket\s+(ws://127\.0\.0\.1:(\d+)/ws/dashboard)")
MIB = 2**20
#: The server's history holds at most this many events (EventBus default, DESIGN.md 2).
HISTORY_EVENTS = 10_000


def _scale() -> float:
    return float(os.environ.get("GATHERING_LAB_TIMEOUT_FACTOR", "1"))


@dataclass
class SoakConfig:
    """How big and how long; the defaults are the CI size (tests/test_soak.py)."""

    seconds: float = 25.0
    subscribers: int = 4
    churners: int = 3
    never_readers: int = 12
    garbage: int = 2
    rate: float = 800.0  # flooder events/s
    payload: int = 512  # bytes of padding per flooder event
    max_pending: int = MIB  # --max-pending given to the server
    health_limit: float = 3.0  # seconds, scaled by GATHERING_LAB_TIMEOUT_FACTOR
    server_args: tuple[str, ...] = ()


def rss_budget(config: SoakConfig) -> int:
    """The peak RSS growth a sound server stays under, in bytes.

    * history: at most HISTORY_EVENTS events, each held as an Event, its parsed data and
      its encoded frame: 2 x the payload plus 1.5 KiB of envelope and object overhead
      (measured: 1.1 KiB per event for a 512-byte payload, Event + data + encoded bytes);
    * pending output: each connected client may hold up to ``max_pending`` unsent bytes
      before it is closed as a slow consumer; the never-readers do, the others nearly never;
    * slack: 32 MiB for the interpreter's arenas, websockets' buffers per connection
      (~100 KiB x a few dozen) and allocator fragmentation.

    At CI size that is ~75 MiB. A replay written whole into a stuck client's buffer costs
    the whole history (~8 MiB here) per never-reader, each time it reconnects; the issue
    measured 56 MB -> 2 GB for that attack with 200 sockets.
    """
    history = HISTORY_EVENTS * (2 * config.payload + 1536)
    pending = (config.never_readers + config.subscribers + config.garbage) * config.max_pending
    return history + pending + 32 * MIB


@dataclass
class Subscriber:
    client_id: str
    resumer: bool
    first_seq: int | None = None
    last_seq: int = 0
    epoch: str | None = None
    received: int = 0
    repeats: int = 0  # a seq at or below one already received: duplicate or out of order
    holes: list[tuple[int, int]] = field(default_factory=list)  # unexplained
    gaps: list[tuple[int, int]] = field(default_factory=list)  # announced with gap=true
    gap_pending: bool = False  # a resumed ack said gap=true before the hole showed
    resuming: bool = False  # reconnected, its resumed ack not yet seen
    provisional: list[tuple[int, int]] = field(default_factory=list)  # holes while resuming
    reconnects: int = 0
    evictions: int = 0
    not_strict: int = 0


@dataclass
class SoakReport:
    config: SoakConfig
    duration: float = 0.0
    published: int = 0  # events acked to the flooder and the garbage clients
    rate_limited: int = 0
    flood_errors: dict[str, int] = field(default_factory=dict)
    last_seq: int = 0
    subscribers: list[Subscriber] = field(default_factory=list)
    churn_cycles: int = 0
    churn_failures: int = 0
    never_reader_cycles: int = 0
    garbage_frames: int = 0
    garbage_closes: dict[str, int] = field(default_factory=dict)
    garbage_errors: dict[str, int] = field(default_factory=dict)
    health_ok: int = 0
    health_failed: list[str] = field(default_factory=list)
    health_max: float = 0.0
    health_p50: float = 0.0
    rss_start: int = 0
    rss_peak: int = 0
    rss_end: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    tracebacks: int = 0
    server_log_tail: str = ""
    budget: int = 0


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-JSON constant {name}")


def strict_json(raw: bytes | str) -> Any:
    """Parse a frame as strict JSON (UTF-8, no NaN/Infinity, no lone surrogates)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8")
    text = raw.decode("utf-8")
    if re.search(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", text):
        # an escaped surrogate: fine only as a high+low pair
        value = json.loads(text, parse_constant=_refuse_constant)
        json.dumps(value, ensure_ascii=False).encode("utf-8")  # raises on a lone one
        return value
    return json.loads(text, parse_constant=_refuse_constant)


class Soak:
    """The scenario; ``await Soak(config).run()`` returns a :class:`SoakReport`."""

    def __init__(self, config: SoakConfig) -> None:
        self.config = config
        self.report = SoakReport(config=config, budget=rss_budget(config))
        self.stop = asyncio.Event()  # the traffic phase is over
        self.done = asyncio.Event()  # every check has its data: everyone leaves
        self.url = ""
        self.port = 0
        self.process: asyncio.subprocess.Process | None = None
        self.log: Any = None
        self.connections: weakref.WeakSet[ClientConnection] = weakref.WeakSet()
        self.http_writers: set[asyncio.StreamWriter] = set()
        self.rng = random.Random(8)

    # The server

    async def start_server(self) -> None:
        self.log = tempfile.TemporaryFile()
        env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
        env["PYTHONUNBUFFERED"] = "1"
        args = [
            "serve",
            "--port",
            "0",
            "--log-level",
            "warning",
            "--max-pending",
            str(self.config.max_pending),
            *self.config.server_args,
        ]
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gathering_lab",
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=self.log,
            env=env,
        )
        assert self.process.stdout is not None
        deadline = time.monotonic() + 20 * _scale()
        while not self.url:
            left = deadline - time.monotonic()
            line = await asyncio.wait_for(self.process.stdout.readline(), max(left, 0.01))
            if not line:
                raise RuntimeError(f"the server exited: {self.server_log()}")
            match = URL_LINE.search(line.decode())
            if match:
                self.url, self.port = match.group(1), int(match.group(2))

    def server_log(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    async def stop_server(self) -> None:
        if self.process is None or self.process.returncode is not None:
            return
        self.process.terminate()
        try:
            await asyncio.wait_for(self.process.wait(), 10 * _scale())
        except TimeoutError:
            self.process.kill()
            await self.process.wait()

    # Probes

    async def health_once(self) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.http_writers.add(writer)
        try:
            writer.write(f"GET /health HTTP/1.1\r\nHost: {HOST}:{self.port}\r\n\r\n".encode())
            response = await reader.read()  # the server closes after the response
        finally:
            writer.close()
            self.http_writers.discard(writer)
        head, _, body = response.partition(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head[:80].decode(errors="replace"))
        result: dict[str, Any] = json.loads(body)
        return result

    async def health_probe(self) -> None:
        limit = self.config.health_limit * _scale()
        latencies: list[float] = []
        while not self.done.is_set():
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.health_once(), limit)
                self.report.health_ok += 1
                latencies.append(time.monotonic() - started)
            except Exception as exc:
                self.report.health_failed.append(f"{time.monotonic():.1f}: {exc!r}")
            await asyncio.sleep(0.25)
        if latencies:
            latencies.sort()
            self.report.health_max = latencies[-1]
            self.report.health_p50 = latencies[len(latencies) // 2]

    async def rss_probe(self) -> None:
        assert self.process is not None
        process = psutil.Process(self.process.pid)
        started = time.monotonic()
        while not self.done.is_set():
            with contextlib.suppress(psutil.Error):
                rss = process.memory_info().rss
                self.report.rss_samples.append((time.monotonic() - started, rss))
                self.report.rss_peak = max(self.report.rss_peak, rss)
            await asyncio.sleep(0.25)

    # Clients

    async def _connect(self, query: str = "", **kwargs: Any) -> ClientConnection:
        kwargs.setdefault("open_timeout", 10 * _scale())
        ws = await connect(f"{self.url}{query}", **kwargs)
        self.connections.add(ws)
        return ws

    async def subscriber(self, sub: Subscriber) -> None:
        """Read everything; resume by seq after a cut or an eviction."""
        cut_every = self.rng.uniform(2.0, 5.0) if sub.resumer else math.inf
        while not self.done.is_set():
            query = f"?client_id={sub.client_id}"
            if sub.first_seq is not None:
                query += f"&last_seq={sub.last_seq}&epoch={sub.epoch}"
                sub.reconnects += 1
                sub.holes += sub.provisional  # a replay cut short: no gap was announced
                sub.provisional = []
                sub.resuming = True
            try:
                ws = await self._connect(query)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.1)
                continue
            cut_at = time.monotonic() + cut_every
            try:
                while not self.done.is_set():
                    left = cut_at - time.monotonic()
                    if left <= 0 and not self.stop.is_set():
                        ws.transport.abort()  # a network blip: no close handshake
                        break
                    try:
                        raw = await asyncio.wait_for(ws.recv(decode=False), min(left, 0.5))
                    except TimeoutError:
                        continue
                    self._take(sub, raw)
            except ConnectionClosed as exc:
                if exc.rcvd is not None and exc.rcvd.code == 4008:
                    sub.evictions += 1
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(ws.close(), 2)

    def _take(self, sub: Subscriber, raw: bytes | str) -> None:
        try:
            message = strict_json(raw)
        except (ValueError, UnicodeError):
            sub.not_strict += 1
            return
        kind = message.get("type")
        if kind == "connection.established":
            if sub.epoch is None:
                sub.epoch = message["data"]["epoch"]
            if sub.first_seq is None:
                sub.first_seq = message["data"]["seq"] + 1
                sub.last_seq = message["data"]["seq"]
            return
        if kind == "resumed":
            gap = bool(message["data"].get("gap"))
            # The replay's hole shows before this ack (or after it, if the server answers
            # first): either way a hole is a gap only if this ack announced one.
            sub.gap_pending = gap and not sub.provisional
            (sub.gaps if gap else sub.holes).extend(sub.provisional)
            sub.provisional = []
            sub.resuming = False
            return
        if kind in ("pong", "error", "published", "subscribed", "authenticated"):
            return
        seq = message["seq"]
        sub.received += 1
        if seq <= sub.last_seq:
            sub.repeats += 1
            return
        if seq != sub.last_seq + 1:
            hole = (sub.last_seq + 1, seq - 1)
            if sub.gap_pending:
                sub.gaps.append(hole)
            elif sub.resuming:
                sub.provisional.append(hole)
            else:
                sub.holes.append(hole)
        sub.gap_pending = False
        sub.last_seq = seq

    async def flooder(self) -> None:
        """Publish at ``rate`` events/s, at most 64 unanswered; count acks and errors."""
        ws = await self._connect("?client_id=flooder", max_size=None)
        await ws.send('{"type":"subscribe","id":"s","data":{"event_types":["soak.none"]}}')
        window = asyncio.Semaphore(64)
        outstanding = [0]
        pad = "x" * self.config.payload

        async def read() -> None:
            async for raw in ws:
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "published":
                    self.report.published += 1
                    outstanding[0] -= 1
                    window.release()
                elif kind == "error":
                    code = message["data"]["code"]
                    if code == "rate_limited":
                        self.report.rate_limited += 1
                    else:
                        errors = self.report.flood_errors
                        errors[code] = errors.get(code, 0) + 1
                    outstanding[0] -= 1
                    window.release()

        reader = asyncio.create_task(read())
        interval = 1.0 / self.config.rate
        next_at = time.monotonic()
        n = 0
        try:
            while not self.stop.is_set():
                await window.acquire()
                outstanding[0] += 1
                n += 1
                event = {"type": "soak.flood", "data": {"n": n, "pad": pad}}
                await ws.send(json.dumps({"type": "publish", "id": n, "data": event}))
                next_at += interval
                delay = next_at - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -1.0:
                    next_at = time.monotonic()  # behind by a second: do not burst to catch up
            # wait (bounded) for the last answers
            deadline = time.monotonic() + 10 * _scale()
            while outstanding[0] > 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
        finally:
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
            await ws.close()

    async def churner(self, index: int) -> None:
        while not self.stop.is_set():
            try:
                query = f"?client_id=churn-{index}" if self.rng.random() < 0.5 else ""
                ws = await self._connect(query)
                hello = strict_json(await asyncio.wait_for(ws.recv(decode=False), 10 * _scale()))
                assert hello["type"] == "connection.established"
                if self.rng.random() < 0.5:
                    await ws.send('{"type":"subscribe","data":{"event_types":["task.*"]}}')
                else:
                    await ws.send('{"type":"ping","id":1}')
                if self.rng.random() < 0.3:
                    ws.transport.abort()
                else:
                    await ws.close()
                self.report.churn_cycles += 1
            except Exception:
                self.report.churn_failures += 1
                await asyncio.sleep(0.1)
            await asyncio.sleep(self.rng.uniform(0.0, 0.1))

    async def never_reader(self, index: int) -> None:
        """``?last_seq=0`` and never read (websockets stops reading past max_queue)."""
        while not self.stop.is_set():
            try:
                ws = await self._connect(f"?client_id=stuck-{index}&last_seq=0", max_queue=1)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.2)
                continue
            self.report.never_reader_cycles += 1
            closed = asyncio.ensure_future(ws.wait_closed())
            stopped = asyncio.ensure_future(self.stop.wait())
            await asyncio.wait(
                [closed, stopped],
                timeout=self.rng.uniform(2.0, 6.0),
                return_when=asyncio.FIRST_COMPLETED,
            )
            for waiter in (closed, stopped):
                waiter.cancel()
            ws.transport.abort()

    GARBAGE = (
        "not json",
        "[1, 2, 3]",
        '"just a string"',
        '{"type":"nope"}',
        '{"type":5}',
        '{"type":"publish","data":{"type":"Bad Type"}}',
        '{"type":"publish","data":{"type":"soak.poison","data":{"x":NaN}}}',
        '{"type":"publish","data":{"type":"soak.poison","data":{"x":Infinity}}}',
        '{"type":"publish","data":{"type":"soak.poison","data":{"x":"\\ud800"}}}',
        '{"type":"publish","data":{"type":"soak.poison","data":{"\\udfff":1}}}',
        '{"type":"publish","data":{"type":"soak.poison","data":{"x":'
        + "[" * 1500
        + "]" * 1500
        + "}}}",
        '{"type":"publish","data":{"type":"soak.poison","data":{"x":' + "[" * 100_000 + "}}}",
        '{"type":"resume","data":{"since_seq":-1}}',
        '{"type":"subscribe","data":{"event_types":"NOT A PATTERN"}}',
        '{"type":"auth","data":{"token":"x"}}',
        '{"type":"publish","data":{"type":"soak.garbage.ok","data":{"fine":true}}}',
    )

    async def garbage(self, index: int) -> None:
        huge = json.dumps(
            {"type": "subscribe", "data": {"event_types": [f"t{i}.x" for i in range(40_000)]}}
        )
        while not self.stop.is_set():
            try:
                ws = await self._connect(f"?client_id=garbage-{index}", max_size=None)
            except (OSError, InvalidHandshake, TimeoutError):
                await asyncio.sleep(0.2)
                continue

            async def read(ws: ClientConnection = ws) -> None:
                async for raw in ws:
                    message = json.loads(raw)
                    if message.get("type") == "published":
                        self.report.published += 1
                    elif message.get("type") == "error":
                        code = message["data"]["code"]
                        errors = self.report.garbage_errors
                        errors[code] = errors.get(code, 0) + 1

            reader = asyncio.create_task(read())
            try:
                for _ in range(40):
                    if self.stop.is_set():
                        break
                    roll = self.rng.random()
                    if roll < 0.02:
                        await ws.send(b"\x00binary")  # closes with 1003
                    elif roll < 0.04:
                        await ws.send("x" * (MIB + 10))  # closes with 1009
                    elif roll < 0.06:
                        await ws.send(huge)
                    else:
                        await ws.send(self.rng.choice(self.GARBAGE))
                    self.report.garbage_frames += 1
                    await asyncio.sleep(0.05)
                await ws.close()
            except ConnectionClosed:
                pass
            finally:
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(reader, 2)
                code = str(ws.close_code)
                self.report.garbage_closes[code] = self.report.garbage_closes.get(code, 0) + 1
                ws.transport.abort()

    # The whole run

    async def run(self) -> SoakReport:
        config = self.config
        report = self.report
        await self.start_server()
        assert self.process is not None
        tasks: list[asyncio.Task[Any]] = []
        try:
            await asyncio.sleep(0.5)  # the server's import-time allocations settle
            report.rss_start = psutil.Process(self.process.pid).memory_info().rss
            tasks.append(asyncio.create_task(self.health_probe()))
            tasks.append(asyncio.create_task(self.rss_probe()))
            subs = [Subscriber(f"sub-{i}", resumer=i % 2 == 1) for i in range(config.subscribers)]
            report.subscribers = subs
            sub_tasks = [asyncio.create_task(self.subscriber(s)) for s in subs]
            await self._wait(lambda: all(s.first_seq is not None for s in subs), 20)
            started = time.monotonic()
            traffic = [asyncio.create_task(self.flooder())]
            traffic += [asyncio.create_task(self.churner(i)) for i in range(config.churners)]
            traffic += [
                asyncio.create_task(self.never_reader(i)) for i in range(config.never_readers)
            ]
            traffic += [asyncio.create_task(self.garbage(i)) for i in range(config.garbage)]
            await asyncio.sleep(config.seconds)
            self.stop.set()
            report.duration = time.monotonic() - started
            # Clients finish what they are doing (a close handshake, the flooder's last
            # acks); one the server leaves hanging is cut rather than waited for.
            _, late = await asyncio.wait(traffic, timeout=10 * _scale())
            for task in late:
                task.cancel()
            await asyncio.gather(*traffic, return_exceptions=True)
            report.last_seq = (await asyncio.wait_for(self.health_once(), 10 * _scale()))["seq"]
            # Everyone must catch up with the last published seq (bounded wait).
            with contextlib.suppress(TimeoutError):
                await self._wait(lambda: all(s.last_seq >= report.last_seq for s in subs), 15)
            self.done.set()
            await asyncio.wait_for(asyncio.gather(*sub_tasks), 10 * _scale())
            await asyncio.sleep(1.0)  # aborted never-readers are reaped within a second
            report.rss_end = psutil.Process(self.process.pid).memory_info().rss
        finally:
            self.stop.set()
            self.done.set()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for ws in list(self.connections):
                ws.transport.abort()
            for writer in self.http_writers:
                writer.transport.abort()
            await asyncio.sleep(0)  # let the aborted transports close
            await self.stop_server()
            if self.log is not None:
                log = self.server_log()
                report.tracebacks = log.count("Traceback (most recent call last)")
                report.server_log_tail = log[-3000:]
                self.log.close()
        return report

    @staticmethod
    async def _wait(condition: Any, seconds: float) -> None:
        deadline = time.monotonic() + seconds * _scale()
        while not condition():
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {seconds}s")
            await asyncio.sleep(0.05)


async def run_soak(config: SoakConfig) -> SoakReport:
    """Run the soak scenario once and return its figures."""
    return await Soak(config).run()


def check(report: SoakReport) -> list[str]:
    """What the run got wrong, one line per problem (empty: it held up)."""
    problems: list[str] = []
    if report.published == 0:
        problems.append("nothing was published")
    for sub in report.subscribers:
        name = sub.client_id
        if sub.last_seq < report.last_seq:
            problems.append(f"{name} stopped at seq {sub.last_seq} of {report.last_seq}")
        if sub.holes:
            lost = sum(b - a + 1 for a, b in sub.holes)
            problems.append(f"{name} lost {lost} events with no gap announced: {sub.holes[:5]}")
        if sub.repeats:
            problems.append(f"{name}: {sub.repeats} events duplicated or out of order")
        if sub.not_strict:
            problems.append(f"{name} got {sub.not_strict} frames that are not strict JSON")
    if report.health_failed:
        problems.append(
            f"/health failed {len(report.health_failed)} times: {report.health_failed[:3]}"
        )
    growth = report.rss_peak - report.rss_start
    if growth > report.budget:
        problems.append(
            f"server RSS grew {growth / MIB:.0f} MiB (start {report.rss_start / MIB:.0f}, "
            f"peak {report.rss_peak / MIB:.0f}); budget {report.budget / MIB:.0f} MiB"
        )
    if report.tracebacks:
        problems.append(
            f"{report.tracebacks} tracebacks in the server's log; tail:\n"
            + report.server_log_tail[-1500:]
        )
    return problems


def summary(report: SoakReport) -> str:
    """The figures of a run, as text."""
    subs = report.subscribers
    rate = report.published / max(report.duration, 1e-9)
    lines = [
        f"duration            {report.duration:.1f} s",
        f"published (acked)   {report.published}  ({rate:.0f}/s)"
        f"  rate_limited={report.rate_limited} errors={report.flood_errors}",
        f"last seq            {report.last_seq}",
        "subscribers         "
        + ", ".join(
            f"{s.client_id}: {s.received} recv, {s.reconnects} resumes, {s.evictions} evicted, "
            f"{len(s.gaps)} gaps, {len(s.holes)} holes"
            for s in subs
        ),
        f"churn               {report.churn_cycles} cycles, {report.churn_failures} failures",
        f"never-readers       {report.never_reader_cycles} connections",
        f"garbage             {report.garbage_frames} frames; closes {report.garbage_closes};"
        f" errors {report.garbage_errors}",
        f"/health             {report.health_ok} ok, {len(report.health_failed)} failed, "
        f"p50 {report.health_p50 * 1000:.1f} ms, max {report.health_max * 1000:.0f} ms",
        f"server RSS          start {report.rss_start / MIB:.1f} MiB, peak "
        f"{report.rss_peak / MIB:.1f} MiB, end {report.rss_end / MIB:.1f} MiB "
        f"(budget +{report.budget / MIB:.0f} MiB)",
        f"server tracebacks   {report.tracebacks}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=5.0, help="traffic phase (5)")
    parser.add_argument("--clients", type=int, default=8, help="well-behaved subscribers (8)")
    parser.add_argument("--churners", type=int, default=6)
    parser.add_argument("--never-readers", type=int, default=12)
    parser.add_argument("--garbage", type=int, default=4)
    parser.add_argument("--rate", type=float, default=1000.0, help="flooder events/s (1000)")
    parser.add_argument("--payload", type=int, default=512, help="flooder padding bytes (512)")
    parser.add_argument("--max-pending", type=int, default=MIB, help="server --max-pending")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra serve argument (--opt=value)"
    )
    args = parser.parse_args(argv)
    config = SoakConfig(
        seconds=args.minutes * 60,
        subscribers=args.clients,
        churners=args.churners,
        never_readers=args.never_readers,
        garbage=args.garbage,
        rate=args.rate,
        payload=args.payload,
        max_pending=args.max_pending,
        server_args=tuple(args.server_arg),
    )
    report = asyncio.run(run_soak(config))
    print(summary(report))
    problems = check(report)
    for problem in problems:
        print("PROBLEM:", problem)
    print("held up" if not problems else f"{len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
