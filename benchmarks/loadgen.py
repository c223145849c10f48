"""Lean load generator for the fan-out benchmark: thin WebSocket subscribers plus one publisher.

Python ``websockets`` clients are too heavy to run 1000 subscribers next to the server on a
2-core machine, so each subscriber here is a raw :class:`asyncio.Protocol` that

* sends the HTTP/1.1 upgrade request itself and checks the ``101`` and ``Sec-WebSocket-Accept``;
* parses unmasked server frames minimally (2/4/10-byte headers, text/binary/continuation);
* answers ping frames with masked pong frames and close frames with a masked close frame;
* pulls ``bench_seq`` and ``sent_ns`` out of each event with one compiled regex over the frame
  bytes (no ``json.loads``), and timestamps a whole TCP chunk with a single ``time.time_ns()``;
* optionally (``deflate=True``) offers permessage-deflate and inflates compressed messages, so
  that a server's compression option can be measured too.

The publisher is a normal ``websockets`` client: ``await send()`` gives "as fast as the server
accepts" for free, and it drains what the server sends back (its own events, acks).

Latency is ``receive wall clock - sent_ns`` (same machine, same clock). Per subscriber, a
``bytearray`` of K flags counts duplicates; a running max counts out-of-order deliveries.

Standalone use against a server that is already running (no server-side metrics)::

    python benchmarks/loadgen.py --port 8000 --subscribers 100 --events 1000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import os
import re
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

WS_PATH = "/ws/dashboard"
WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
# Servers re-serialise the payload with or without spaces after separators; key order is kept.
EVENT_RE = re.compile(rb'"bench_seq":\s*(\d+),\s*"sent_ns":\s*(\d+)')
MAX_HANDSHAKE_BYTES = 16_384
DEFLATE_OFFER = b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
DEFLATE_TAIL = b"\x00\x00\xff\xff"
OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


# --------------------------------------------------------------------------------------------
# Frames (client side: every frame we send is masked)


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


# --------------------------------------------------------------------------------------------
# Shared state of one load run


@dataclass
class LoadState:
    """What all the thin subscribers of one run write into (single event loop, no locks)."""

    events: int
    subscribers: int
    deflate: bool = False
    latencies_ns: list[int] = field(default_factory=list)
    ready: int = 0
    failed: int = 0
    finished: int = 0
    close_codes: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    all_finished: asyncio.Event = field(default_factory=asyncio.Event)

    def error(self, text: str) -> None:
        """Record an error (bounded: only the first 20 are kept)."""
        if len(self.errors) < 20:
            self.errors.append(text)

    def subscriber_finished(self) -> None:
        """One subscriber got the last event or went away."""
        self.finished += 1
        if self.finished >= self.subscribers:
            self.all_finished.set()


class ThinSubscriber(asyncio.Protocol):
    """A minimal WebSocket client that only receives, counts and timestamps events."""

    def __init__(self, state: LoadState, client_id: str, host: str, port: int) -> None:
        self.state = state
        self.client_id = client_id
        self.host = host
        self.port = port
        self.transport: asyncio.Transport | None = None
        self.key = base64.b64encode(os.urandom(16))
        self.upgraded = False
        self.buf = b""
        self.fragments: list[bytes] | None = None
        self.fragments_compressed = False
        self.inflater: Any = None  # zlib decompressor once permessage-deflate is accepted
        self.ready_future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.done = False
        self.closed = False
        self.seen = bytearray(state.events)
        self.max_seq = -1
        self.received = 0
        self.duplicates = 0
        self.out_of_order = 0
        self.other_messages = 0
        self.pings = 0

    # asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(
            b"GET " + WS_PATH.encode() + b"?client_id=" + self.client_id.encode() + b" HTTP/1.1\r\n"
            b"Host: " + f"{self.host}:{self.port}".encode() + b"\r\n"
            b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: "
            + self.key
            + b"\r\n"
            + (DEFLATE_OFFER if self.state.deflate else b"")
            + b"Sec-WebSocket-Version: 13\r\n\r\n"
        )

    def data_received(self, data: bytes) -> None:
        if not self.upgraded:
            data = self._handshake(data)
            if not data:
                return
        buf = self.buf + data if self.buf else data
        now = time.time_ns()  # one clock read per TCP chunk
        # Hot path state in locals; written back after the loop.
        search, seen, last = EVENT_RE.search, self.seen, len(self.seen) - 1
        record = self.state.latencies_ns.append
        received = duplicates = out_of_order = 0
        max_seq, finished = self.max_seq, False
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
                    self._other_message()
                else:
                    seq = int(match[1])
                    if seq > last:
                        self.other_messages += 1
                    elif seen[seq]:
                        duplicates += 1
                    else:
                        seen[seq] = 1
                        received += 1
                        if seq < max_seq:
                            out_of_order += 1
                        else:
                            max_seq = seq
                        record(now - int(match[2]))
                        finished = finished or seq == last
            elif not self._frame(buf[pos], buf, start, end, now):
                break  # close frame: stop reading
            pos = end
        self.buf = buf[pos:] if pos < n else b""
        self.received += received
        self.duplicates += duplicates
        self.out_of_order += out_of_order
        self.max_seq = max_seq
        if finished:
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed:
            self.state.close_codes[1006] += 1
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
            self.state.close_codes[code] += 1
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

    def _other_message(self) -> None:
        """connection.established, acks, pongs ... The first one means "registered"."""
        self.other_messages += 1
        if not self.ready_future.done():
            self.state.ready += 1
            self.ready_future.set_result(True)

    def _reassembled(self, message: bytes, now: int) -> None:
        """Slow path for binary or fragmented messages (not expected from these servers)."""
        match = EVENT_RE.search(message)
        if match is None:
            self._other_message()
            return
        seq = int(match[1])
        if seq >= len(self.seen):
            self.other_messages += 1
        elif self.seen[seq]:
            self.duplicates += 1
        else:
            self.seen[seq] = 1
            self.received += 1
            if seq < self.max_seq:
                self.out_of_order += 1
            else:
                self.max_seq = seq
            self.state.latencies_ns.append(now - int(match[2]))
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
            self._fail(f"upgrade refused: {lines[0][:80]!r}")
            return b""
        expected = base64.b64encode(hashlib.sha1(self.key + WS_GUID).digest())
        headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(b":") for x in lines)}
        if headers.get(b"sec-websocket-accept") != expected:
            self._fail("bad Sec-WebSocket-Accept")
            return b""
        if b"permessage-deflate" in headers.get(b"sec-websocket-extensions", b""):
            if not self.state.deflate:
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
            self.state.subscriber_finished()

    def _gone(self) -> None:
        self.closed = True
        if not self.ready_future.done():
            self.state.failed += 1
            self.ready_future.set_result(False)
        self._finish()

    def _fail(self, reason: str) -> None:
        self.state.error(f"{self.client_id}: {reason}")
        self._gone()
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        """Send a normal close frame and close the TCP connection (no waiting)."""
        if self.transport is not None and not self.transport.is_closing():
            self.closed = True
            self._write(client_frame(OP_CLOSE, (1000).to_bytes(2, "big")))
            self.transport.close()


async def connect_subscribers(
    state: LoadState,
    host: str,
    port: int,
    count: int,
    *,
    concurrency: int = 50,
    timeout: float = 60.0,
) -> list[ThinSubscriber]:
    """Open ``count`` thin subscribers, at most ``concurrency`` handshakes in flight.

    Returns once every subscriber got its first message (``connection.established``) or failed;
    failures are counted in ``state.failed`` and ``state.errors``.
    """
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    subscribers: list[ThinSubscriber] = []

    async def open_one(index: int) -> None:
        async with gate:
            sub = ThinSubscriber(state, f"bench-sub-{index}", host, port)
            subscribers.append(sub)
            try:
                await loop.create_connection(lambda: sub, host, port)
            except OSError as exc:
                sub.state.error(f"{sub.client_id}: connect failed: {exc}")
                sub._gone()
                return
            await sub.ready_future

    try:
        async with asyncio.timeout(timeout):
            await asyncio.gather(*(open_one(i) for i in range(count)))
    except BaseException:
        for sub in subscribers:
            sub.close()
        raise
    return subscribers


# --------------------------------------------------------------------------------------------
# Publisher


def payload_template(size: int = 200) -> str:
    """A ``publish`` message whose inner ``data`` is ~``size`` bytes of JSON, with two %d slots.

    The slots are ``bench_seq`` then ``sent_ns``; formatting a template is cheaper than
    ``json.dumps`` per event and keeps the publisher's own CPU out of the way.
    """
    data: dict[str, Any] = {
        "bench_seq": 0,
        "sent_ns": 10**18,
        "task_id": 4242,
        "title": "fan-out benchmark task",
        "assignee": "agent-7",
        "pad": "",
    }
    base = len(json.dumps(data)) - 1 + 4  # "0" -> a 4-digit seq on average
    data["pad"] = "x" * max(0, size - base)
    message = {
        "type": "publish",
        "data": {
            "type": "task.created",
            "data": data,
            "source_agent_id": 7,
            "circle_id": 1,
            "project_id": 1,
        },
    }
    text = json.dumps(message).replace("%", "%%")
    text = text.replace('"bench_seq": 0', '"bench_seq": %d', 1)
    return text.replace(f'"sent_ns": {10**18}', '"sent_ns": %d', 1)


@dataclass
class Publisher:
    """One ``websockets`` client that publishes and drains everything it is sent."""

    ws: ClientConnection
    events: int
    received: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    acks: int = 0
    other_messages: int = 0
    sent: int = 0
    got_last: asyncio.Event = field(default_factory=asyncio.Event)
    _seen: bytearray = field(default_factory=bytearray)
    _max_seq: int = -1
    _drain_task: asyncio.Task[None] | None = None

    @classmethod
    async def open(
        cls, host: str, port: int, events: int, *, deflate: bool = False, timeout: float = 20.0
    ) -> Publisher:
        """Connect, wait for ``connection.established``, start draining."""
        uri = f"ws://{host}:{port}{WS_PATH}?client_id=bench-publisher"
        async with asyncio.timeout(timeout):
            ws = await connect(
                uri,
                compression="deflate" if deflate else None,
                ping_interval=None,
                max_size=2**20,
                open_timeout=timeout,
                close_timeout=2,
            )
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
                    if b'"published"' in frame[:40]:
                        self.acks += 1
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

    async def publish(self, rate: float | None = None, size: int = 200) -> None:
        """Send ``events`` messages, as fast as the server takes them or at ``rate`` per second."""
        template = payload_template(size)
        send = self.ws.send
        loop = asyncio.get_running_loop()
        start = loop.time()
        for seq in range(self.events):
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
# Summaries


def percentile(sorted_values: list[int], q: float) -> float:
    """Nearest-rank percentile of an already sorted list (``nan`` when empty)."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


def summarize(
    state: LoadState, subscribers: list[ThinSubscriber], pub: Publisher
) -> dict[str, Any]:
    """Counts, loss, duplicates, order and latency percentiles of one run."""
    lat = sorted(state.latencies_ns)
    sub_received = sum(s.received for s in subscribers)
    expected = (state.subscribers + 1) * state.events
    deliveries = sub_received + pub.received
    return {
        "subscribers": state.subscribers,
        "events": state.events,
        "sent": pub.sent,
        "deliveries": deliveries,
        "expected_deliveries": expected,
        "lost": expected - deliveries,
        "duplicates": sum(s.duplicates for s in subscribers) + pub.duplicates,
        "out_of_order": sum(s.out_of_order for s in subscribers) + pub.out_of_order,
        "publisher_received": pub.received,
        "publisher_acks": pub.acks,
        "connect_failed": state.failed,
        "close_codes": dict(state.close_codes),
        "errors": list(state.errors),
        "p50_ms": percentile(lat, 0.50) / 1e6,
        "p99_ms": percentile(lat, 0.99) / 1e6,
        "max_ms": (lat[-1] / 1e6) if lat else float("nan"),
    }


async def run_standalone(args: argparse.Namespace) -> dict[str, Any]:
    """Connect, publish, wait for the last event (bounded), report."""
    state = LoadState(events=args.events, subscribers=args.subscribers, deflate=args.deflate)
    pub = await Publisher.open(args.host, args.port, args.events, deflate=args.deflate)
    subs = await connect_subscribers(state, args.host, args.port, args.subscribers)
    cpu0, t0 = time.process_time(), time.perf_counter()
    try:
        async with asyncio.timeout(args.timeout):
            await pub.publish(args.rate or None)
            await state.all_finished.wait()
            await pub.got_last.wait()
    except TimeoutError:
        state.error("timed out waiting for the last event")
    wall = time.perf_counter() - t0
    result = summarize(state, subs, pub)
    result["wall_s"] = wall
    result["deliveries_per_s"] = result["deliveries"] / wall
    result["loadgen_cpu_pct"] = 100 * (time.process_time() - cpu0) / wall
    for sub in subs:
        sub.close()
    await pub.close()
    return result


def main() -> None:
    """Command-line entry point for standalone runs."""
    parser = argparse.ArgumentParser(description="fan-out load generator (no server metrics)")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1",))
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = full speed")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    result = asyncio.run(run_standalone(parser.parse_args()))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
