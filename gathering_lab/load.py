"""Load tests: many thin WebSocket clients and a few publishers against one server.

``gathering-lab load`` and :func:`load_test` open N subscribers (in one or more worker
processes), publish at a fixed total rate for a while from a few publisher connections,
then report deliveries/s, loss, duplicates, reordering, latency and connect-time
percentiles, the server's RSS and CPU when it runs on this machine, and the load
generator's own CPU, so a saturated generator is never read as a slow server::

    df = gl.load_test("ws://127.0.0.1:8000/ws/dashboard", clients=1000, rate=100, duration=10)
    df.samples  # one row per delivery: client, seq, received_s, latency_ms
    pd.concat([df, other])  # one row per run: runs stack like any frames

Each subscriber is a raw :class:`asyncio.Protocol` (see :class:`ThinSubscriber`): it does the
HTTP upgrade itself, parses server frames minimally, answers pings and closes, and pulls
the ``load_seq`` and ``load_sent_ns`` fields out of each event with one regex over the frame
bytes (no ``json.loads``), so one process holds thousands of them. Latency is the receive
wall clock minus ``load_sent_ns`` (same machine, same clock). Publishers are ordinary
``websockets`` clients; publisher ``p`` of ``P`` sends the sequence numbers ``p, p+P, ...`` on
one shared schedule, so order is checked per publisher.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import math
import multiprocessing
import os
import re
import ssl
import threading
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from . import protocol
from .connection import DEFAULT_URL, check_url, connect_options, with_query
from .exceptions import ProtocolError

if TYPE_CHECKING:
    import pandas as pd

    class LoadTestFrame(pd.DataFrame):  # made at run time by _load_test_frame_class()
        _report: LoadReport | None

        @property
        def report(self) -> LoadReport: ...
        @property
        def samples(self) -> pd.DataFrame: ...
        @property
        def connects(self) -> pd.DataFrame: ...


__all__ = [
    "DEFAULT_PUBLISHER_RATE",
    "LOADGEN_BOUND_PCT",
    "LoadConfig",
    "LoadReport",
    "LoadTestFrame",
    "Publisher",
    "Swarm",
    "ThinSubscriber",
    "client_frame",
    "connect_swarm",
    "load_test",
    "load_test_async",
    "payload_template",
    "percentile",
    "raise_nofile_limit",
    "run_load",
    "server_pid",
]

logger = logging.getLogger("gathering_lab.load")

#: Events per second one publisher connection sends: under the server's default
#: ``--publish-rate`` of 500/s per connection, so its rate limit does not refuse them.
DEFAULT_PUBLISHER_RATE = 400.0
#: At or above this CPU (% of one core) a generator process limits the figures, not the server.
LOADGEN_BOUND_PCT = 90.0
#: Subscribers one worker process is given when ``processes`` is automatic.
CLIENTS_PER_PROCESS = 2500
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Servers re-serialise the payload with or without spaces after separators; key order is kept.
EVENT_RE = re.compile(rb'"load_seq":\s*(\d+),\s*"load_sent_ns":\s*(\d+)')
MAX_HANDSHAKE_BYTES = 16_384
DEFLATE_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})
_SAMPLE_SUFFIXES = (".parquet", ".csv")


# --------------------------------------------------------------------------------------------
# Frames (client side: every frame sent is masked)


def mask_bytes(payload: bytes, key: bytes) -> bytes:
    """XOR ``payload`` with the 4-byte masking ``key`` (RFC 6455 section 5.3)."""
    n = len(payload)
    if n == 0:
        return b""
    stream = (key * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "little") ^ int.from_bytes(stream, "little")).to_bytes(
        n, "little"
    )


def client_frame(opcode: int, payload: bytes) -> bytes:
    """Encode one final, masked client frame."""
    n = len(payload)
    if n < 126:
        header = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65_536:
        header = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    key = os.urandom(4)
    return header + key + mask_bytes(payload, key)


def percentile(sorted_values: Any, q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence or array (``nan`` when empty)."""
    if len(sorted_values) == 0:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


# --------------------------------------------------------------------------------------------
# Subscribers


@dataclass
class Target:
    """Where thin subscribers connect: parsed once from the WebSocket URL."""

    url: str
    host: str
    port: int
    tls: bool
    netloc: str

    @classmethod
    def parse(cls, url: str) -> Target:
        """Split a ``ws://`` / ``wss://`` URL (ValueError naming it if malformed)."""
        url = check_url(url)
        parts = urlsplit(url)
        tls = parts.scheme == "wss"
        port = parts.port or (443 if tls else 80)
        return cls(url, parts.hostname or "", port, tls, parts.netloc)

    def request_target(self, client_id: str) -> bytes:
        """The path and query of the upgrade request, with ``client_id`` set."""
        parts = urlsplit(with_query(self.url, client_id=client_id))
        return urlunsplit(("", "", parts.path or "/", parts.query, "")).encode()


@dataclass
class Swarm:
    """What the thin subscribers of one process share and write into (one loop, no locks).

    Per delivery it keeps the client index, ``seq``, the send and the receive time (ns);
    ``events`` is the number of sequence numbers the publishers will use, ``publishers``
    how many publishers interleave them.
    """

    target: Target
    events: int
    subscribers: int = 0
    publishers: int = 1
    types: tuple[str, ...] = ()
    token: str | None = None
    deflate: bool = False
    client_prefix: str = "load"
    ready: int = 0
    failed: int = 0
    delivered: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    finished: int = 0
    close_codes: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    sample_client: array[int] = field(default_factory=lambda: array("i"))
    sample_seq: array[int] = field(default_factory=lambda: array("q"))
    sample_sent: array[int] = field(default_factory=lambda: array("q"))
    sample_recv: array[int] = field(default_factory=lambda: array("q"))
    connect_ms: array[float] = field(default_factory=lambda: array("d"))
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)

    def error(self, text: str) -> None:
        """Count an error and keep its text (only the first 20 texts)."""
        self.error_count += 1
        if len(self.errors) < 20:
            self.errors.append(text)
        logger.debug("load: %s", text)

    def subscriber_finished(self) -> None:
        """One subscriber got the last sequence number or went away."""
        self.finished += 1
        if self.finished >= self.subscribers:
            self.all_finished.set()

    @property
    def latencies_ns(self) -> list[int]:
        """Every delivery's latency in nanoseconds, in arrival order."""
        return [r - s for r, s in zip(self.sample_recv, self.sample_sent, strict=True)]

    def result(self) -> dict[str, Any]:
        """Counts and samples, picklable, for the parent process."""
        return {
            "ready": self.ready,
            "failed": self.failed,
            "delivered": self.delivered,
            "duplicates": self.duplicates,
            "out_of_order": self.out_of_order,
            "close_codes": dict(self.close_codes),
            "errors": list(self.errors),
            "error_count": self.error_count,
            "client": self.sample_client.tobytes(),
            "seq": self.sample_seq.tobytes(),
            "sent": self.sample_sent.tobytes(),
            "recv": self.sample_recv.tobytes(),
            "connect_ms": self.connect_ms.tobytes(),
        }


class ThinSubscriber(asyncio.Protocol):
    """A minimal WebSocket client that only receives, counts and timestamps events."""

    def __init__(self, swarm: Swarm, index: int) -> None:
        self.swarm = swarm
        self.index = index
        self.client_id = f"{swarm.client_prefix}-{index}"
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.upgraded = False
        self.subscribing = False
        self.buf = b""
        self.fragments: list[bytes] | None = None
        self.fragments_compressed = False
        self.inflater: Any = None  # zlib decompressor once permessage-deflate is accepted
        self.ready_future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.done = False
        self.closed = False
        self.seen = bytearray(swarm.events)
        self.max_seq = [-1] * max(1, swarm.publishers)
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.other_messages = 0
        self.pings = 0

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        swarm = self.swarm
        auth = b"Authorization: Bearer " + swarm.token.encode() + b"\r\n" if swarm.token else b""
        transport.write(
            b"GET " + swarm.target.request_target(self.client_id) + b" HTTP/1.1\r\n"
            b"Host: " + swarm.target.netloc.encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + self.key + b"\r\n" + auth
            + (DEFLATE_OFFER if swarm.deflate else b"")
            + b"Sec-WebSocket-Version: 13\r\n\r\n"
        )  # fmt: skip

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            data = self._handshake(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        now = time.time_ns()  # one clock read per TCP chunk
        # Hot path state in locals; written back after the loop.
        swarm = self.swarm
        search, seen, events = EVENT_RE.search, self.seen, len(self.seen)
        maxes, npub, index = self.max_seq, len(self.max_seq), self.index
        add_client, add_seq = swarm.sample_client.append, swarm.sample_seq.append
        add_sent, add_recv = swarm.sample_sent.append, swarm.sample_recv.append
        received = duplicates = out_of_order = 0
        finished = False
        pos, n = 0, len(buf)
        while n - pos >= 2:  # each pass consumes one whole frame or stops
            length = buf[pos + 1]
            if length > 127:
                self._fail("server sent a masked frame")
                return
            if length < 126:
                start = pos + 2
            elif length == 126:
                if n - pos < 4:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 4], "big"), pos + 4
            else:
                if n - pos < 10:
                    break
                length, start = int.from_bytes(buf[pos + 2 : pos + 10], "big"), pos + 10
            end = start + length
            if end > n:
                break
            if buf[pos] == 0x81:  # FIN + text: events land here
                match = search(buf, start, end)
                if match is None:
                    self._other_message(buf[start:end])
                else:
                    seq = int(match[1])
                    if seq >= events:
                        self.other_messages += 1
                    elif seen[seq]:
                        duplicates += 1
                    else:
                        seen[seq] = 1
                        received += 1
                        p = seq % npub
                        if seq < maxes[p]:
                            out_of_order += 1
                        else:
                            maxes[p] = seq
                        add_client(index)
                        add_seq(seq)
                        add_sent(int(match[2]))
                        add_recv(now)
                        finished = finished or seq == events - 1
            elif not self._frame(buf[pos], buf, start, end, now):
                break  # close frame: stop reading
            pos = end
        self.buf = buf[pos:] if pos < n else b""
        self.received += received
        self.duplicates += duplicates
        self.out_of_order += out_of_order
        swarm.delivered += received
        swarm.duplicates += duplicates
        swarm.out_of_order += out_of_order
        if finished:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.swarm.close_codes[1006] += 1
        self._gone()

    # helpers -----------------------------------------------------------------------------

    def _frame(self, b0: int, buf: bytes, start: int, end: int, now: int) -> bool:
        """Handle every frame but a final text frame; return False after a close frame."""
        opcode, compressed = b0 & 0x0F, bool(b0 & 0x40)
        if opcode == OP_TEXT or opcode == OP_BINARY:
            if b0 & 0x80:
                payload = buf[start:end]
                self._reassembled(self._inflate(payload) if compressed else payload, now)
            else:
                self.fragments = [buf[start:end]]
                self.fragments_compressed = compressed
        elif opcode == OP_CONT and self.fragments is not None:
            self.fragments.append(buf[start:end])
            if b0 & 0x80:
                whole = b"".join(self.fragments)
                self.fragments = None
                self._reassembled(self._inflate(whole) if self.fragments_compressed else whole, now)
        elif opcode == OP_PING:
            self.pings += 1
            self._write(client_frame(OP_PONG, buf[start:end]))
        elif opcode == OP_CLOSE:
            code = int.from_bytes(buf[start : start + 2], "big") if end - start >= 2 else 1005
            self.swarm.close_codes[code] += 1
            if not self.ready_future.done():
                reason = buf[start + 2 : end].decode(errors="replace")
                self.swarm.error(f"{self.client_id}: closed with {code} {reason}".rstrip())
            self._write(client_frame(OP_CLOSE, buf[start : start + 2]))
            self._gone()
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    def _inflate(self, payload: bytes) -> bytes:
        """Undo permessage-deflate (RFC 7692); the decompressor keeps the sliding window."""
        if self.inflater is None:
            self._fail("compressed frame but permessage-deflate was not negotiated")
            return b""
        return bytes(self.inflater.decompress(payload + DEFLATE_TAIL))

    def _other_message(self, message: bytes) -> None:
        """connection.established, subscribed, errors ... The first one means "connected"."""
        self.other_messages += 1
        if self.ready_future.done():
            return
        head = message[:64]
        if b'"error"' in head:
            self._fail(f"refused: {message[:200].decode(errors='replace')}")
        elif not self.swarm.types:
            self._ready()
        elif self.subscribing:
            if b'"subscribed"' in head:
                self._ready()
        else:
            self.subscribing = True
            text = json.dumps({"type": "subscribe", "data": {"event_types": self.swarm.types}})
            self._write(client_frame(OP_TEXT, text.encode()))

    def _ready(self) -> None:
        self.swarm.ready += 1
        self.ready_future.set_result(True)

    def _reassembled(self, message: bytes, now: int) -> None:
        """Slow path for binary or fragmented messages (not expected from these servers)."""
        match = EVENT_RE.search(message)
        if match is None:
            self._other_message(message)
            return
        seq = int(match[1])
        if seq >= len(self.seen):
            self.other_messages += 1
        elif self.seen[seq]:
            self.duplicates += 1
            self.swarm.duplicates += 1
        else:
            self.seen[seq] = 1
            self.received += 1
            self.swarm.delivered += 1
            p = seq % len(self.max_seq)
            if seq < self.max_seq[p]:
                self.out_of_order += 1
                self.swarm.out_of_order += 1
            else:
                self.max_seq[p] = seq
            swarm = self.swarm
            swarm.sample_client.append(self.index)
            swarm.sample_seq.append(seq)
            swarm.sample_sent.append(int(match[2]))
            swarm.sample_recv.append(now)
            if seq == len(self.seen) - 1:
                self._finish()

    def _handshake(self, data: bytes) -> bytes:
        """Consume the HTTP response; return the bytes that follow it (first frames)."""
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HANDSHAKE_BYTES:
                self._fail("handshake response too long")
            return b""
        head, rest = self.buf[:end], self.buf[end + 4 :]
        self.buf = b""
        lines = head.split(b"\r\n")
        if not lines[0].startswith(b"HTTP/1.1 101"):
            self._fail(f"upgrade refused: {lines[0][:80].decode(errors='replace')}")
            return b""
        expected = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
        if headers.get(b"sec-websocket-accept") != expected:
            self._fail("bad Sec-WebSocket-Accept")
            return b""
        if b"permessage-deflate" in headers.get(b"sec-websocket-extensions", b""):
            if not self.swarm.deflate:
                self._fail("server accepted an extension that was not offered")
                return b""
            self.inflater = zlib.decompressobj(-15)
        self.upgraded = True
        return rest

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _finish(self) -> None:
        if not self.done:
            self.done = True
            self.swarm.subscriber_finished()

    def _gone(self) -> None:
        self.closed = True
        if not self.ready_future.done():
            self.swarm.failed += 1
            self.ready_future.set_result(False)
        self._finish()

    def _fail(self, reason: str) -> None:
        self.swarm.error(f"{self.client_id}: {reason}")
        self._gone()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send a normal close frame and close the TCP connection (no waiting)."""
        if self.transport is not None and not self.transport.is_closing():
            self.closed = True
            self._write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def connect_swarm(
    swarm: Swarm,
    count: int,
    *,
    first_index: int = 0,
    concurrency: int = 50,
    timeout: float = 60.0,
) -> list[ThinSubscriber]:
    """Open ``count`` thin subscribers, at most ``concurrency`` handshakes in flight.

    Returns once every subscriber is ready (``connection.established``, and ``subscribed``
    when the swarm has type filters) or failed; failures are counted in ``swarm.failed``.
    A subscriber's connect time (TCP connect to ready, not the wait for its turn) goes to
    ``swarm.connect_ms``.
    """
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    subscribers: list[ThinSubscriber] = []
    swarm.subscribers += count
    target = swarm.target
    context = ssl.create_default_context() if target.tls else None

    async def open_one(index: int) -> None:
        async with gate:
            sub = ThinSubscriber(swarm, index)
            subscribers.append(sub)
            started = time.perf_counter()
            try:
                await loop.create_connection(
                    lambda: sub,
                    target.host,
                    target.port,
                    ssl=context,
                    server_hostname=target.host if context else None,
                )
            except OSError as exc:
                swarm.error(f"{sub.client_id}: connect failed: {exc}")
                sub._gone()
                return
            if await sub.ready_future:
                swarm.connect_ms.append(1000 * (time.perf_counter() - started))

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(open_one(first_index + i) for i in range(count)))
    except TimeoutError:
        for sub in subscribers:
            if not sub.ready_future.done():
                sub._fail(f"not connected after {timeout:g} s")
    except BaseException:
        for sub in subscribers:
            sub.close()
        raise
    return subscribers


# --------------------------------------------------------------------------------------------
# Publisher


def payload_template(size: int = 200, event_type: str = "task.created") -> str:
    """A ``publish`` message whose inner ``data`` is ~``size`` bytes of JSON, with two %d slots.

    The slots are ``load_seq`` then ``load_sent_ns``; formatting a template is cheaper than
    ``json.dumps`` per event and keeps the publisher's own CPU out of the way.
    """
    data: dict[str, Any] = {
        "load_seq": 0,
        "load_sent_ns": 10**18,
        "task_id": 4242,
        "title": "load test task",
        "pad": "",
    }
    base = len(json.dumps(data)) - 1 + 4  # "0" -> a 4-digit seq on average
    data["pad"] = "x" * max(0, size - base)
    message = {
        "type": "publish",
        "data": {
            "type": event_type,
            "data": data,
            "source_agent_id": 7,
            "circle_id": 1,
            "project_id": 1,
        },
    }
    text = json.dumps(message).replace("%", "%%")
    text = text.replace('"load_seq": 0', '"load_seq": %d', 1)
    return text.replace(f'"load_sent_ns": {10**18}', '"load_sent_ns": %d', 1)


@dataclass
class Publisher:
    """One ``websockets`` client that publishes and drains everything it is sent.

    It counts the events it gets back (``received``, ``duplicates``, ``out_of_order``, for
    a single publisher), ``published`` acks, and ``error`` answers (``refused``, by code).
    """

    ws: ClientConnection
    events: int
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    acks: int = 0
    refused: int = 0
    refusals: Counter[str] = field(default_factory=Counter)
    last_refusal: str = ""
    other_messages: int = 0
    sent: int = 0
    got_last: asyncio.Event = field(default_factory=asyncio.Event)
    _seen: bytearray = field(default_factory=bytearray)
    _max_seq: int = -1
    _drain_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls,
        url: str,
        events: int,
        *,
        client_id: str = "load-publisher",
        token: str | None = None,
        deflate: bool = False,
        timeout: float = 20.0,
    ) -> Publisher:
        """Connect, wait for the server's first message, start draining."""
        options = connect_options(
            url,
            token=token,
            compression="deflate" if deflate else None,
            ping_interval=None,
            max_size=2**20,
            open_timeout=timeout,
            close_timeout=2,
        )
        async with asyncio.timeout(timeout):
            ws = await connect(with_query(url, client_id=client_id), **options)
            await ws.recv(decode=False)  # connection.established
        publisher = cls(ws, events, _seen=bytearray(events))
        publisher._drain_task = asyncio.create_task(publisher._drain())
        return publisher

    async def _drain(self) -> None:
        """Read until the connection closes; ends when :meth:`close` closes it."""
        try:
            while True:
                frame = await self.ws.recv(decode=False)
                if isinstance(frame, str):  # pragma: no cover - decode=False gives bytes
                    frame = frame.encode()
                match = EVENT_RE.search(frame)
                if match is None:
                    head = frame[:48]
                    if b'"published"' in head:
                        self.acks += 1
                    elif b'"error"' in head:
                        self._refused(frame)
                    else:
                        self.other_messages += 1
                    continue
                seq = int(match[1])
                if seq >= self.events:
                    continue
                if self._seen[seq]:
                    self.duplicates += 1
                    continue
                self._seen[seq] = 1
                self.received += 1
                if seq < self._max_seq:
                    self.out_of_order += 1
                else:
                    self._max_seq = seq
                if seq == self.events - 1:
                    self.got_last.set()
        except ConnectionClosed:
            self.got_last.set()

    def _refused(self, frame: bytes) -> None:
        self.refused += 1
        try:
            data = json.loads(frame).get("data") or {}
        except (ValueError, AttributeError):
            data = {}
        code = str(data.get("code", "error")) if isinstance(data, dict) else "error"
        self.refusals[code] += 1
        self.last_refusal = frame[:200].decode(errors="replace")

    async def publish(
        self,
        rate: float | None = None,
        size: int = 200,
        *,
        first: int = 0,
        stride: int = 1,
        event_type: str = "task.created",
        start: float | None = None,
    ) -> None:
        """Send sequence numbers ``first, first+stride, ...`` below ``events``.

        Sequence number ``s`` goes at ``start + s / rate`` (loop time), or as fast as the
        server takes them when ``rate`` is None.
        """
        template = payload_template(size, event_type)
        send = self.ws.send
        loop = asyncio.get_running_loop()
        start = loop.time() if start is None else start
        for seq in range(first, self.events, stride):
            if rate:
                delay = start + seq / rate - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
            await send(template % (seq, time.time_ns()))
            self.sent += 1

    async def close(self) -> None:
        """Close the connection and stop draining."""
        await self.ws.close()
        if self._drain_task is not None:
            self._drain_task.cancel()
            await asyncio.gather(self._drain_task, return_exceptions=True)


# --------------------------------------------------------------------------------------------
# Machine: descriptors, the server's process


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (children inherit it); return both."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            logger.warning("could not raise the descriptor limit from %d: %s", soft, exc)
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def server_pid(url: str) -> int | None:
    """The pid of the local process listening on ``url``'s port, or None.

    None when the host is not this machine or the listener cannot be seen (psutil missing,
    another user's process).
    """
    target = Target.parse(url)
    if target.host not in _LOCAL_HOSTS:
        return None
    try:
        import psutil
    except ImportError:
        return None
    try:
        connections = psutil.net_connections(kind="tcp")
    except (psutil.Error, OSError):
        return None
    for conn in connections:
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == target.port:
            if conn.pid:
                return int(conn.pid)
    return None


# --------------------------------------------------------------------------------------------
# Configuration and report


@dataclass
class LoadConfig:
    """One load test: who connects where, how much is published, for how long."""

    url: str = DEFAULT_URL
    clients: int = 100
    rate: float = 0.0
    duration: float = 10.0
    payload_bytes: int = 200
    types: tuple[str, ...] = ()
    token: str | None = None
    processes: int | None = None
    publishers: int | None = None
    publisher_rate: float = DEFAULT_PUBLISHER_RATE
    event_type: str = "task.created"
    drain: float = 5.0
    connect_timeout: float = 60.0
    concurrency: int = 50

    def check(self) -> LoadConfig:
        """Return a checked copy with automatic values filled in; ValueError naming a bad one."""
        url = check_url(self.url)
        if not _is_int(self.clients) or not 1 <= self.clients <= 100_000:
            raise ValueError(f"invalid clients {self.clients!r}: expected 1 to 100000")
        if not _is_number(self.rate) or not 0 <= self.rate < math.inf:
            raise ValueError(f"invalid rate {self.rate!r}: events per second, >= 0 (0 = idle)")
        if not _is_number(self.duration) or not 0 < self.duration <= 86_400:
            raise ValueError(f"invalid duration {self.duration!r}: seconds, > 0")
        if not _is_int(self.payload_bytes) or not 0 <= self.payload_bytes <= 2**20:
            raise ValueError(f"invalid payload_bytes {self.payload_bytes!r}: expected 0 to 1048576")
        for name in ("drain", "connect_timeout", "publisher_rate"):
            value = getattr(self, name)
            if not _is_number(value) or not 0 < value < math.inf:
                raise ValueError(f"invalid {name} {value!r}: must be > 0")
        if isinstance(self.types, str):
            raise ValueError(f"invalid types {self.types!r}: expected a list of patterns")
        try:
            types = tuple(protocol.check_pattern(t) for t in self.types or ())
            event_type = protocol.check_event_type(self.event_type)
        except ProtocolError as exc:
            raise ValueError(exc.message) from None
        auto = max(1, min(os.cpu_count() or 1, math.ceil(self.clients / CLIENTS_PER_PROCESS)))
        processes = auto if self.processes is None else self.processes
        if not _is_int(processes) or not 1 <= processes <= min(64, self.clients):
            raise ValueError(
                f"invalid processes {processes!r}: expected 1 to {min(64, self.clients)}"
            )
        events = self.events()
        wanted = math.ceil(self.rate / self.publisher_rate) if events else 0
        publishers = wanted if self.publishers is None else self.publishers
        if not _is_int(publishers) or not 0 <= publishers <= 1000:
            raise ValueError(f"invalid publishers {publishers!r}: expected 0 to 1000")
        if events and not publishers:
            raise ValueError(f"invalid publishers 0: rate {self.rate:g} needs at least one")
        if not _is_int(self.concurrency) or self.concurrency < 1:
            raise ValueError(f"invalid concurrency {self.concurrency!r}: at least 1")
        return LoadConfig(
            **{
                **asdict(self),
                "url": url,
                "types": types,
                "event_type": event_type,
                "processes": processes,
                "publishers": publishers if events else 0,
            }
        )

    def events(self) -> int:
        """How many events the run publishes in all: ``rate * duration``, rounded."""
        return round(self.rate * self.duration)

    def expected_per_client(self, accepted: int) -> int:
        """Deliveries one subscriber should get when ``accepted`` events were published."""
        if self.types and not protocol.type_matches(frozenset(self.types), self.event_type):
            return 0
        return accepted


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


@dataclass
class LoadReport:
    """The outcome of one load test: a summary and every sample."""

    summary: dict[str, Any]
    client: Any  # numpy arrays, one entry per delivery
    seq: Any
    received_s: Any
    latency_ms: Any
    connect_ms: Any

    def samples(self) -> pd.DataFrame:
        """One row per delivery: ``client``, ``seq``, ``received_s``, ``latency_ms``."""
        import pandas as pd

        return pd.DataFrame(
            {
                "client": self.client,
                "seq": self.seq,
                "received_s": self.received_s,
                "latency_ms": self.latency_ms,
            }
        )

    def connects(self) -> pd.DataFrame:
        """One row per connected client: ``connect_ms``."""
        import pandas as pd

        return pd.DataFrame({"connect_ms": self.connect_ms})

    def frame(self) -> LoadTestFrame:
        """The summary as a one-row :class:`LoadTestFrame` (``.samples``, ``.connects``)."""
        df = _load_test_frame_class()([self.summary])
        df._report = self
        return df

    def write_samples(self, path: str) -> None:
        """Write every sample to ``path``: Parquet or CSV by its suffix."""
        check_samples_path(path)
        df = self.samples()
        if path.lower().endswith(".parquet"):
            df.to_parquet(path, index=False)
        else:
            df.to_csv(path, index=False)

    def table(self) -> str:
        """The summary as a two-column text table, with a warning if the generator saturated."""
        s = self.summary
        rows = [
            ("clients", f"{s['connected']} of {s['clients']} connected ({s['processes']} proc)"),
            ("publishing", f"{s['rate']:g} ev/s for {s['duration_s']:g} s "
             f"({s['publishers']} publishers, {s['payload_bytes']} B payload)"),
            ("events", f"{s['events_sent']} sent, {s['publish_refused']} refused"),
            ("deliveries", f"{s['deliveries']} of {s['expected_deliveries']}"),
            ("deliveries/s", f"{s['deliveries_per_s']:,.0f}"),
            ("lost", f"{s['lost']} ({s['loss_pct']:.2f} %) not delivered {s['drain_s']:g} s "
             "after publishing ended"),
            ("duplicates", str(s["duplicates"])),
            ("reordered", str(s["reordered"])),
            ("latency p50/p99/max", _ms(s, "latency")),
            ("connect p50/p99/max", _ms(s, "connect")),
            ("connect failures", str(s["connect_failed"])),
            ("server", _server_line(s)),
            ("generator CPU", f"{s['generator_cpu_pct']:.0f} % of a core (busiest process), "
             f"{s['generator_cpu_total_pct']:.0f} % in all"),
            ("machine CPU", f"{s['machine_cpu_pct']:.0f} % of {s['machine_cpus'] * 100} % "
             "(server, generator and everything else)"),
        ]  # fmt: skip
        if s["close_codes"]:
            rows.append(("close codes", s["close_codes"]))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        if s["generator_saturated"]:
            lines.append(
                f"warning: the load generator was saturated ({s['generator_cpu_pct']:.0f} % of "
                f"a core >= {LOADGEN_BOUND_PCT:.0f} %): these figures measure it, not the "
                "server; use more processes (--processes) or fewer clients"
            )
        if s["publish_refused"]:
            lines.append(
                f"warning: the server refused {s['publish_refused']} publishes "
                f"({s['refusals']}); lower the rate per publisher (more publishers) or start "
                "it with a higher --publish-rate"
            )
        if s["first_error"]:
            lines.append(f"first error ({s['errors']} in all): {s['first_error']}")
        return "\n".join(lines)


def _ms(s: dict[str, Any], name: str) -> str:
    values = [s[f"{name}_{q}_ms"] for q in ("p50", "p99", "max")]
    if any(math.isnan(v) for v in values):
        return "-"
    return " / ".join(f"{v:.2f}" for v in values) + " ms"


def _server_line(s: dict[str, Any]) -> str:
    if s["server_pid"] is None:
        return "not on this machine (or not visible): no RSS or CPU"
    return (
        f"pid {s['server_pid']}: RSS {s['server_rss_idle_mib']:.0f} MiB connected, "
        f"{s['server_rss_end_mib']:.0f} MiB at the end; CPU {s['server_cpu_pct']:.0f} % of a core"
    )


def check_samples_path(path: str) -> None:
    """ValueError unless ``path`` ends in .parquet or .csv and its folder exists."""
    if not isinstance(path, str) or not path.lower().endswith(_SAMPLE_SUFFIXES):
        raise ValueError(f"invalid output file {path!r}: expected a .parquet or .csv name")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"invalid output file {path!r}: no folder {folder!r}")
    if path.lower().endswith(".parquet"):
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ValueError(
                f"cannot write {path!r}: Parquet needs pyarrow (pip install pyarrow)"
            ) from None


# --------------------------------------------------------------------------------------------
# Worker processes


def _worker_main(conn: Any, config: dict[str, Any], first: int, count: int) -> None:
    """Entry point of one subscriber process: connect, report, hold until told to stop."""
    logging.basicConfig(level=logging.WARNING)
    raise_nofile_limit()
    try:
        asyncio.run(_worker(conn, config, first, count))
    except (BrokenPipeError, EOFError, KeyboardInterrupt):
        pass


async def _worker(conn: Any, config: dict[str, Any], first: int, count: int) -> None:
    cfg = LoadConfig(**config)
    swarm = Swarm(
        Target.parse(cfg.url),
        cfg.events(),
        publishers=max(1, cfg.publishers or 1),
        types=cfg.types,
        token=cfg.token,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_message() -> None:
        try:
            conn.recv()
        except (EOFError, OSError):
            pass
        stop.set()
        loop.remove_reader(conn.fileno())

    loop.add_reader(conn.fileno(), on_message)

    async def report() -> None:
        while True:
            conn.send(("progress", swarm.ready, swarm.failed, swarm.delivered))
            await asyncio.sleep(0.2)

    reporter = asyncio.create_task(report())
    subs: list[ThinSubscriber] = []
    try:
        connecting = asyncio.create_task(
            connect_swarm(
                swarm,
                count,
                first_index=first,
                concurrency=cfg.concurrency,
                timeout=cfg.connect_timeout,
            )
        )
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait((connecting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not connecting.done():
            connecting.cancel()
        else:
            subs = connecting.result()
            conn.send(("ready", swarm.ready, swarm.failed, swarm.delivered))
        await stopping
    finally:
        reporter.cancel()
        for sub in subs:
            sub.close()
        await asyncio.sleep(0)
    conn.send(("result", swarm.result()))


class _Worker:
    """The parent's handle on one subscriber process."""

    def __init__(self, ctx: Any, cfg: LoadConfig, first: int, count: int) -> None:
        self.count = count
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(
            target=_worker_main,
            args=(child, asdict(cfg), first, count),
            name=f"gathering-lab-load-{first}",
            daemon=True,
        )
        self.process.start()
        child.close()
        self.ready = self.failed = self.delivered = 0
        self.connected = False
        self.result: dict[str, Any] | None = None
        self.cpu0 = 0.0

    def poll(self) -> None:
        """Read every message waiting from the process."""
        while self.result is None and self.conn.poll():
            try:
                message = self.conn.recv()
            except (EOFError, OSError):
                self.connected = True
                self.result = {}
                return
            kind = message[0]
            if kind == "result":
                self.result = message[1]
            else:
                self.ready, self.failed, self.delivered = message[1:4]
                self.connected = self.connected or kind == "ready"

    def alive(self) -> bool:
        return bool(self.process.is_alive())

    def cpu(self) -> float:
        """CPU seconds the process used so far (0 if it is gone)."""
        try:
            import psutil

            times = psutil.Process(self.process.pid).cpu_times()
            return float(times.user + times.system)
        except Exception:  # noqa: BLE001 - psutil missing or the process ended
            return 0.0

    def stop(self) -> None:
        with _suppress_broken():
            self.conn.send(("stop",))

    async def collect(self, timeout: float) -> dict[str, Any]:
        """Wait (bounded) for the process's result, then for it to exit."""
        deadline = time.monotonic() + timeout
        while self.result is None and time.monotonic() < deadline:
            if not self.conn.poll():
                if not self.alive():
                    self.poll()
                    break
                await asyncio.sleep(0.02)
                continue
            if self.conn.poll():
                message = await asyncio.to_thread(self.conn.recv)
                if message[0] == "result":
                    self.result = message[1]
        await asyncio.to_thread(self.process.join, 5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(5)
        self.conn.close()
        return self.result or {}


class _suppress_broken:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> bool:
        return exc[0] is not None and issubclass(exc[0], (BrokenPipeError, EOFError, OSError))


# --------------------------------------------------------------------------------------------
# The run


def _bar(progress: Callable[..., Any] | None, **options: Any) -> Any:
    return progress(**options) if progress is not None else None


async def run_load(config: LoadConfig, *, progress: Callable[..., Any] | None = None) -> LoadReport:
    """Run one load test and return its report.

    ``progress`` is a tqdm-like factory (called with ``desc``, ``total``, ``unit``) for the
    connect and load bars, or None for no bar. Raises ValueError for a bad configuration,
    before anything connects.
    """
    import numpy as np

    cfg = config.check()
    assert cfg.processes is not None and cfg.publishers is not None
    soft, _hard = raise_nofile_limit()
    share = math.ceil(cfg.clients / cfg.processes)
    if share + 64 > soft:
        raise ValueError(
            f"invalid clients {cfg.clients}: {share} per process need about {share + 64} file "
            f"descriptors, the limit is {soft}; use more processes or raise ulimit -n"
        )
    pid = server_pid(cfg.url)
    server = _process(pid)
    events = cfg.events()
    ctx = multiprocessing.get_context("spawn")
    workers: list[_Worker] = []
    publishers: list[Publisher] = []
    tasks: list[asyncio.Task[None]] = []
    results: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    in_thread = threading.current_thread() is not threading.main_thread()
    clock = time.thread_time if in_thread or pid == os.getpid() else time.process_time
    try:
        first = 0
        for index in range(cfg.processes):
            count = cfg.clients // cfg.processes + (index < cfg.clients % cfg.processes)
            workers.append(_Worker(ctx, cfg, first, count))
            first += count

        # Phase 1: connect every subscriber.
        bar = _bar(progress, desc="connect", total=cfg.clients, unit="client")
        deadline = time.monotonic() + cfg.connect_timeout + 30
        try:
            while not all(w.connected for w in workers):
                for w in workers:
                    w.poll()
                    if not w.connected and not w.alive():
                        raise RuntimeError(
                            f"load worker {w.process.name} exited with {w.process.exitcode} "
                            "while connecting"
                        )
                if bar is not None:
                    bar.update(sum(w.ready + w.failed for w in workers) - bar.n)
                if time.monotonic() > deadline:
                    raise RuntimeError("load workers did not finish connecting in time")
                await asyncio.sleep(0.05)
            if bar is not None:
                bar.update(sum(w.ready + w.failed for w in workers) - bar.n)
        finally:
            if bar is not None:
                bar.close()
        connected = sum(w.ready for w in workers)
        for index in range(cfg.publishers):
            publishers.append(
                await Publisher.open(
                    cfg.url,
                    events,
                    client_id=f"load-publisher-{index}",
                    token=cfg.token,
                    timeout=cfg.connect_timeout,
                )
            )
        await asyncio.sleep(0.2)  # let the connect burst settle before measuring
        rss_idle = _rss(server)

        # Phase 2: publish for `duration` seconds (or hold the connections idle).
        cpu_server0 = _cpu(server)
        for w in workers:
            w.cpu0 = w.cpu()
        box0 = _box_busy()
        own0, t0, t0_ns = clock(), time.perf_counter(), time.time_ns()
        start = loop.time() + 0.05
        for index, pub in enumerate(publishers):
            tasks.append(
                asyncio.create_task(
                    pub.publish(
                        cfg.rate,
                        cfg.payload_bytes,
                        first=index,
                        stride=cfg.publishers,
                        event_type=cfg.event_type,
                        start=start,
                    )
                )
            )
        bar = _bar(
            progress,
            desc="load",
            total=cfg.duration,
            unit="s",
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:g} s {postfix}",
        )
        last_delivered, last_t = 0, t0
        try:
            while True:
                now = time.perf_counter()
                elapsed = now - t0
                for w in workers:
                    w.poll()
                delivered = sum(w.delivered for w in workers)
                if bar is not None:
                    bar.n = min(elapsed, cfg.duration)
                    bar.refresh()
                    if now - last_t >= 0.5:
                        rate_now = (delivered - last_delivered) / (now - last_t)
                        bar.set_postfix_str(f"{rate_now:,.0f} deliveries/s", refresh=False)
                        last_delivered, last_t = delivered, now
                for task in tasks:
                    if task.done() and task.exception() is not None:
                        raise RuntimeError(f"a publisher failed: {task.exception()!r}")
                if elapsed >= cfg.duration and all(t.done() for t in tasks):
                    break
                await asyncio.sleep(0.1)
        finally:
            if bar is not None:
                bar.close()
        publish_end = time.perf_counter()
        sent = sum(p.sent for p in publishers)
        # Wait (bounded) for what is still in flight: every delivery, and the refusals.
        drain_end = publish_end + cfg.drain
        while time.perf_counter() < drain_end:
            for w in workers:
                w.poll()
            refused = sum(p.refused for p in publishers)
            expected = connected * cfg.expected_per_client(sent - refused)
            if sum(w.delivered for w in workers) >= expected and (events == 0 or expected):
                break
            await asyncio.sleep(0.05)
        if events and publishers:
            await asyncio.sleep(0.1)  # a last refusal or duplicate
        t1 = time.perf_counter()
        own = clock() - own0
        box1 = _box_busy()
        cpu_server = _cpu(server) - cpu_server0
        worker_cpu = [w.cpu() - w.cpu0 for w in workers]
        rss_end = _rss(server)
        for w in workers:
            w.stop()
        for w in workers:
            results.append(await w.collect(timeout=30))
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for pub in publishers:
            with _suppress_broken():
                await pub.close()
        for w in workers:
            if w.process.is_alive():
                w.stop()
                await asyncio.to_thread(w.process.join, 5)
                if w.process.is_alive():
                    w.process.kill()

    def join(key: str, dtype: Any) -> Any:
        return np.concatenate([np.frombuffer(r.get(key, b""), dtype=dtype) for r in results])

    client, seq = join("client", np.int32), join("seq", np.int64)
    sent_ns, recv_ns = join("sent", np.int64), join("recv", np.int64)
    connect_ms = join("connect_ms", np.float64)
    latency_ms = (recv_ns - sent_ns) / 1e6
    received_s = (recv_ns - t0_ns) / 1e9
    refused = sum(p.refused for p in publishers)
    accepted = sent - refused
    expected = connected * cfg.expected_per_client(accepted)
    deliveries = int(sum(r.get("delivered", 0) for r in results))
    window = max(float(received_s.max()), publish_end - t0) if len(received_s) else t1 - t0
    lat = np.sort(latency_ms)
    con = np.sort(connect_ms)
    close_codes: Counter[int] = Counter()
    errors: list[str] = []
    for r in results:
        close_codes.update(r.get("close_codes", {}))
        errors.extend(r.get("errors", []))
    error_count = sum(r.get("error_count", 0) for r in results)
    refusals: Counter[str] = Counter()
    for p in publishers:
        refusals.update(p.refusals)
    wall = t1 - t0
    busiest = 100 * max(worker_cpu) / wall if worker_cpu else 0.0
    summary: dict[str, Any] = {
        "url": cfg.url,
        "clients": cfg.clients,
        "connected": connected,
        "connect_failed": cfg.clients - connected,
        "processes": cfg.processes,
        "publishers": cfg.publishers,
        "rate": float(cfg.rate),
        "duration_s": float(cfg.duration),
        "payload_bytes": cfg.payload_bytes,
        "types": ",".join(cfg.types),
        "events_sent": sent,
        "publish_refused": refused,
        "refusals": dict(refusals),
        "expected_deliveries": expected,
        "deliveries": deliveries,
        "lost": max(0, expected - deliveries),
        "loss_pct": 100 * max(0, expected - deliveries) / expected if expected else 0.0,
        "duplicates": int(sum(r.get("duplicates", 0) for r in results)),
        "reordered": int(sum(r.get("out_of_order", 0) for r in results)),
        "deliveries_per_s": deliveries / window if window > 0 else 0.0,
        "latency_p50_ms": percentile(lat, 0.50),
        "latency_p99_ms": percentile(lat, 0.99),
        "latency_max_ms": float(lat[-1]) if len(lat) else float("nan"),
        "connect_p50_ms": percentile(con, 0.50),
        "connect_p99_ms": percentile(con, 0.99),
        "connect_max_ms": float(con[-1]) if len(con) else float("nan"),
        "server_pid": pid,
        "server_rss_idle_mib": rss_idle / 2**20 if rss_idle is not None else float("nan"),
        "server_rss_end_mib": rss_end / 2**20 if rss_end is not None else float("nan"),
        "server_cpu_pct": 100 * cpu_server / wall if server is not None else float("nan"),
        "generator_cpu_pct": busiest,
        "generator_cpu_total_pct": 100 * (sum(worker_cpu) + own) / wall,
        "generator_saturated": busiest >= LOADGEN_BOUND_PCT,
        "machine_cpu_pct": 100 * (box1 - box0) / wall if box0 >= 0 else float("nan"),
        "machine_cpus": os.cpu_count() or 1,
        "close_codes": ", ".join(f"{k}: {v}" for k, v in sorted(close_codes.items())),
        "errors": error_count,
        "first_error": errors[0] if errors else "",
        "drain_s": float(cfg.drain),
        "wall_s": wall,
    }
    if summary["generator_saturated"]:
        logger.warning("load generator saturated: %.0f %% of a core", busiest)
    return LoadReport(summary, client, seq, received_s, latency_ms, connect_ms)


def _box_busy() -> float:
    """CPU seconds the whole machine has been busy (all CPUs), or -1 without psutil."""
    try:
        import psutil
    except ImportError:
        return -1.0
    t = psutil.cpu_times()
    return float(
        t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)
        + getattr(t, "steal", 0.0)
    )  # fmt: skip


def _process(pid: int | None) -> Any:
    if pid is None:
        return None
    try:
        import psutil

        return psutil.Process(pid)
    except Exception:  # noqa: BLE001 - psutil missing or the process ended
        return None


def _cpu(process: Any) -> float:
    if process is None:
        return 0.0
    try:
        times = process.cpu_times()
        return float(times.user + times.system)
    except Exception:  # noqa: BLE001
        return 0.0


def _rss(process: Any) -> int | None:
    if process is None:
        return None
    try:
        return int(process.memory_info().rss)
    except Exception:  # noqa: BLE001
        return None


# --------------------------------------------------------------------------------------------
# Notebook entry points

_frame_class: Any = None


def _load_test_frame_class() -> Any:
    """The :class:`LoadTestFrame` class, made on first use (pandas is imported only then)."""
    global _frame_class
    if _frame_class is not None:
        return _frame_class
    import pandas as pd

    class LoadTestFrame(pd.DataFrame):
        """A load test's summary: a one-row DataFrame, plus its samples as properties.

        ``.samples`` has one row per delivery (``client``, ``seq``, ``received_s``,
        ``latency_ms``), ``.connects`` one per connected client (``connect_ms``) and
        ``.report`` the :class:`LoadReport`. They are kept on this object, not in
        ``attrs``, so runs stack with ``pd.concat`` (which compares ``attrs``) and
        derived frames do not copy every sample; a derived or concatenated frame is a
        plain DataFrame without them.
        """

        _metadata = ["_report"]
        _report: LoadReport | None = None

        @property
        def report(self) -> LoadReport:
            """The :class:`LoadReport` this frame summarises."""
            if self._report is None:
                raise ValueError(
                    "this frame carries no load test report (it was not returned by load_test)"
                )
            return self._report

        @property
        def samples(self) -> pd.DataFrame:
            """One row per delivery: ``client``, ``seq``, ``received_s``, ``latency_ms``."""
            return self.report.samples()

        @property
        def connects(self) -> pd.DataFrame:
            """One row per connected client: ``connect_ms``."""
            return self.report.connects()

    LoadTestFrame.__module__ = __name__
    LoadTestFrame.__qualname__ = "LoadTestFrame"
    _frame_class = LoadTestFrame
    return LoadTestFrame


def __getattr__(name: str) -> Any:
    # ``LoadTestFrame`` is made on first use, so importing this module needs no pandas.
    if name == "LoadTestFrame":
        return _load_test_frame_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config(url: str, **options: Any) -> LoadConfig:
    types = options.pop("types", None)
    if isinstance(types, str):
        types = (types,)
    return LoadConfig(url=url, types=tuple(types or ()), **options)


def _progress(progress: Any) -> Callable[..., Any] | None:
    if progress is True:
        from tqdm.auto import tqdm

        return tqdm
    if progress is False or progress is None:
        return None
    if callable(progress):
        return progress
    raise ValueError(f"invalid progress {progress!r}: expected True, False or a tqdm factory")


async def load_test_async(
    url: str = DEFAULT_URL,
    *,
    clients: int = 100,
    rate: float = 0.0,
    duration: float = 10.0,
    payload_bytes: int = 200,
    types: Sequence[str] | str | None = None,
    token: str | None = None,
    processes: int | None = None,
    publishers: int | None = None,
    out: str | None = None,
    progress: Any = True,
    **options: Any,
) -> LoadTestFrame:
    """Awaitable :func:`load_test`, for a server that runs on the caller's own event loop.

    In a notebook whose kernel serves the lab (``gl.start()``), ``await
    gl.load_test_async(...)`` keeps that server running while the test waits.
    """
    config = _config(
        url,
        clients=clients,
        rate=rate,
        duration=duration,
        payload_bytes=payload_bytes,
        types=types,
        token=token,
        processes=processes,
        publishers=publishers,
        **options,
    )
    if out is not None:
        check_samples_path(out)
    report = await run_load(config, progress=_progress(progress))
    if out is not None:
        report.write_samples(out)
    return report.frame()


def load_test(
    url: str = DEFAULT_URL,
    *,
    clients: int = 100,
    rate: float = 0.0,
    duration: float = 10.0,
    payload_bytes: int = 200,
    types: Sequence[str] | str | None = None,
    token: str | None = None,
    processes: int | None = None,
    publishers: int | None = None,
    out: str | None = None,
    progress: Any = True,
    **options: Any,
) -> LoadTestFrame:
    """Load-test the server at ``url``; return the summary as a one-row DataFrame.

    ``clients`` subscribers connect (from ``processes`` worker processes, automatic by
    default); then ``publishers`` connections (default: one per 400 ev/s, under the
    server's default 500/s per connection) publish ``rate`` events per second in all, of
    ``payload_bytes`` each, for ``duration`` seconds (``rate=0``: the clients stay idle).
    ``types`` subscribes every client to these patterns; ``token`` is sent as a Bearer
    header. ``out`` writes every sample (.parquet or .csv). Columns: deliveries/s, lost,
    duplicates, reordered, latency and connect percentiles, server RSS and CPU (local
    servers), ``generator_cpu_pct`` and ``generator_saturated``. The result is a
    :class:`LoadTestFrame`: ``df.samples`` has one row per delivery and ``df.connects``
    one per connected client; several runs stack with ``pd.concat([run1, run2, ...])``.

    Raises ValueError naming a bad argument. When the server runs on the caller's own
    running loop (a lab started in this kernel), use ``await load_test_async(...)``. The
    subscribers run in spawned processes, so a script calls this under
    ``if __name__ == "__main__":`` (notebooks and the CLI need nothing).
    """
    kwargs = dict(
        clients=clients,
        rate=rate,
        duration=duration,
        payload_bytes=payload_bytes,
        types=types,
        token=token,
        processes=processes,
        publishers=publishers,
        out=out,
        progress=progress,
        **options,
    )
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(load_test_async(url, **kwargs))
    if server_pid(url) == os.getpid():
        raise RuntimeError(
            "the server runs in this process, on the loop this call would block: "
            "use `await gl.load_test_async(...)` instead"
        )
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["value"] = asyncio.run(load_test_async(url, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, name="gathering-lab-load", daemon=True)
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]
