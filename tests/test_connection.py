"""The connection module: URL checks, query building, connecting and error text, in one place."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.frames import Close

import gathering_lab
from gathering_lab import connection
from gathering_lab.client import LabClient
from gathering_lab.connection import (
    check_url,
    closed_message,
    connect_error,
    connect_options,
    describe,
    error_text,
    http_url,
    open_connection,
    query_param,
    same_endpoint,
    with_query,
)
from gathering_lab.exceptions import ConnectionFailed, ProtocolError
from gathering_lab.testing import free_port, recv_json, timeout, wait_for
from gathering_lab.websocket import Server

PACKAGE = Path(gathering_lab.__file__).parent


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h/ws", "the scheme must be ws:// or wss://"),
        ("ws:///ws", "no host"),
        ("ws://h:99999/ws", "invalid URL 'ws://h:99999/ws'"),
        ("localhost:8000", "the scheme must be"),
        (None, "not None"),
    ],
)
def test_check_url_refuses_with_the_url_named(url: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_url(url)


def test_check_url_accepts_and_strips() -> None:
    assert check_url(" wss://example.org/ws/dashboard ") == "wss://example.org/ws/dashboard"
    assert check_url("ws://[::1]:8000/ws/dashboard?client_id=a") == (
        "ws://[::1]:8000/ws/dashboard?client_id=a"
    )


def test_every_entry_point_checks_urls_the_same_way() -> None:
    from gathering_lab.demo import ws_url
    from gathering_lab.widgets.controller import check_ws_url

    bad = "http://127.0.0.1:8000/ws/dashboard"
    with pytest.raises(ValueError, match="scheme must be ws:// or wss://"):
        LabClient(bad)
    with pytest.raises(Exception, match="scheme must be ws:// or wss://"):
        ws_url(bad)
    with pytest.raises(ValueError, match="the URL must look like"):
        check_ws_url(bad)


def test_with_query_sets_replaces_and_keeps() -> None:
    url = "ws://h/ws/dashboard?client_id=old&x=1&empty="
    assert with_query(url, client_id="new", last_seq=4, epoch=None) == (
        "ws://h/ws/dashboard?x=1&empty=&client_id=new&last_seq=4"
    )
    assert with_query(url, client_id=None) == url  # None keeps the URL's own
    assert query_param(url, "client_id") == "old"
    assert query_param(url, "empty") == ""
    assert query_param(url, "nope") is None


def test_http_url_and_same_endpoint() -> None:
    assert http_url("wss://h:1/ws/dashboard?x=1", "/health") == "https://h:1/health"
    with pytest.raises(ValueError, match="not a WebSocket URL"):
        http_url("http://h/")
    assert same_endpoint("ws://h/ws/dashboard?client_id=a", "ws://h/ws/dashboard/")
    assert not same_endpoint("ws://h/ws/dashboard", "wss://h/ws/dashboard")


def test_connect_options_keep_tokens_out_of_urls_and_logs() -> None:
    log = logging.getLogger("test.connection")
    options = connect_options("ws://localhost:1/ws", token="secret-token", logger=log)
    assert options["additional_headers"] == {"Authorization": "Bearer secret-token"}
    assert options["proxy"] is None and options["compression"] is None
    assert options["logger"] is log and log.filters  # redaction installed
    assert "proxy" not in connect_options("ws://example.org/ws")


def test_error_text_for_exceptions_and_server_errors() -> None:
    assert error_text(ProtocolError("forbidden", "no")) == "forbidden: no"
    assert error_text(TimeoutError()) == "timed out"
    assert error_text(ValueError()) == "ValueError"
    message = {"type": "error", "data": {"code": "rate_limited", "message": "slow down"}}
    assert error_text(message) == "rate_limited: slow down"
    assert describe(ConnectionRefusedError()) == "connection refused (is the server running?)"
    closed = ConnectionClosed(Close(1008, "token expired"), None)
    assert describe(closed) == "closed by server: 1008 token expired"
    assert closed_message("ws://h/ws", closed).endswith(
        "(pass a token with --token or $GATHERING_LAB_TOKEN)"
    )
    assert "within 3s" in str(connect_error("ws://h/ws", TimeoutError(), 3))


async def test_open_connection_names_the_client_and_fails_clearly(server: Server) -> None:
    async with open_connection(server.url, client_id="one") as ws:
        assert (await recv_json(ws))["data"]["client_id"] == "one"
    with pytest.raises(ConnectionFailed, match="connection refused"):
        async with open_connection(f"ws://127.0.0.1:{free_port()}/ws/dashboard"):
            pass
    # The same text for the notebook client's first attempt.
    with pytest.raises(ConnectionFailed, match="connection refused"):
        await LabClient(f"ws://127.0.0.1:{free_port()}/ws/dashboard").connect()
    await asyncio.sleep(0)


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add("." * node.level + (node.module or ""))
    return names


def test_one_module_connects() -> None:
    # URL parsing, query building and Bearer headers live in connection.py only.
    for name in ("client.py", "demo.py", "listen.py", "widgets/controller.py"):
        source = (PACKAGE / name).read_text()
        assert "urllib.parse" not in source, name
        assert "Bearer {" not in source, name  # building the header
    assert connection.__all__


def test_the_traffic_model_is_pure() -> None:
    # No I/O: only the standard library's pure modules and the event types.
    allowed = {
        "__future__", "heapq", "itertools", "random", "collections.abc", "dataclasses",
        "typing", ".events",
    }  # fmt: skip
    assert _imports(PACKAGE / "traffic.py") <= allowed


# DispatchConnection: splitting frames itself (the client's ingest path)


def _frame(first: int, payload: bytes, mask: bytes | None = None) -> bytes:
    """One WebSocket frame as a server writes it (unmasked unless ``mask`` is given)."""
    size = len(payload)
    bit = 0x80 if mask is not None else 0
    if size < 126:
        head = bytes((first, bit | size))
    elif size < 65536:
        head = bytes((first, bit | 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((first, bit | 127)) + size.to_bytes(8, "big")
    if mask is not None:
        payload = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        head += mask
    return head + payload


def _event(seq: int, pad: int = 0) -> bytes:
    return json.dumps({"type": "t.e", "seq": seq, "epoch": "e1", "data": {"p": "x" * pad}}).encode()


@contextlib.asynccontextmanager
async def _silent_server() -> AsyncIterator[str]:
    """A websockets server that greets like ours (seq 0, epoch e1), then only waits."""
    from websockets.asyncio.server import serve as ws_serve

    from gathering_lab import protocol

    async def handler(ws: Any) -> None:
        greeting = protocol.connection_established("c", seq=0, epoch="e1", request_ids=True)
        await ws.send(protocol.encode(greeting).decode())
        await ws.wait_closed()

    async with ws_serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        yield f"ws://127.0.0.1:{port}/ws/dashboard"


def _dispatch(client: LabClient) -> connection.DispatchConnection:
    ws = client._ws
    assert isinstance(ws, connection.DispatchConnection)
    return ws


async def test_frames_split_at_any_byte_reach_the_frame_in_order() -> None:
    """The transport may cut the stream anywhere: inside a header, its extended length,
    a payload, a big frame left to websockets, or between the fragments of a message.
    Bytes are fed to the client's real connection in pieces of 1, 2, 3... bytes, as the
    event loop would after reads of those sizes; every event arrives once, in order."""
    async with _silent_server() as url:
        client = await LabClient(url, "split", heartbeat=None, reconnect=False).connect()
        try:
            ws = _dispatch(client)
            seq = 0
            for piece in (1, 2, 3, 7, 100, 4096, 1 << 20):
                burst = b""
                for pad in (0, 300, 70_000, 0):  # 7-bit, 16-bit and 64-bit lengths
                    seq += 1
                    burst += _frame(0x81, _event(seq, pad))
                seq += 1
                text = _event(seq, 50)
                # One message in three fragments (websockets' queue), a ping, then more.
                burst += _frame(0x01, text[:5]) + _frame(0x00, text[5:9]) + _frame(0x80, text[9:])
                burst += _frame(0x89, b"hi")
                for pad in (10, 200):
                    seq += 1
                    burst += _frame(0x81, _event(seq, pad))
                fast_before = ws.fast_frames
                for start in range(0, len(burst), piece):
                    ws.data_received(burst[start : start + piece])
                await client.wait_for_events(seq, timeout(5))
                # Those before the fragmented message were split here (the big one too,
                # when it came whole); those after it waited in websockets' queue behind it.
                assert ws.fast_frames - fast_before >= 3, piece
                assert ws._partial == b"" and ws._owed == 0
            assert list(client.frame.df["seq"]) == list(range(1, seq + 1))
            assert client.frame.df["data"].iloc[2] == {"p": "x" * 70_000}
            assert client.duplicates == 0 and client.gaps == 0 and client.connected
        finally:
            await client.close()


async def test_splitting_waits_while_websockets_holds_part_of_a_frame(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """If websockets' parser has read a frame's header (its buffer empty again), the next
    bytes are that frame's payload, not a header: they must go to websockets. Here the
    payload of a binary frame looks like a text frame of its own (seq 9)."""
    async with _silent_server() as url:
        client = await LabClient(url, "held", heartbeat=None, reconnect=False).connect()
        try:
            ws = _dispatch(client)
            binary = _frame(0x82, _frame(0x81, _event(9)))
            ws.protocol.receive_data(binary[:2])  # as if the handshake's read ended there
            assert not ws.protocol.reader.buffer
            fast = ws.fast_frames
            ws.data_received(binary[2:])  # the rest of it: websockets completes the frame
            assert ws.fast_frames == fast
            # The binary message goes through the queue (and is logged as not JSON).
            await wait_for(lambda: ws._queued == 0, timeout(5))
            ws.data_received(_frame(0x81, _event(2)))  # between frames again: split here
            assert ws.fast_frames == fast + 1
            await client.wait_for_events(1, timeout(5))
            assert list(client.frame.df["seq"]) == [2]
            assert "ignoring a bad message from the server" in caplog.text
        finally:
            await client.close()


async def test_a_close_frame_in_a_burst_ends_delivery_there() -> None:
    async with _silent_server() as url:
        client = await LabClient(url, "closed", heartbeat=None, reconnect=False).connect()
        try:
            ws = _dispatch(client)
            close = _frame(0x88, (4000).to_bytes(2, "big") + b"bye")
            ws.data_received(_frame(0x81, _event(1)) + close + _frame(0x81, _event(2)))
            await client.wait_for_status("disconnected", timeout(5))
            assert client.close_code == 4000 and client.close_reason == "bye"
            assert list(client.frame.df["seq"]) == [1]
        finally:
            await client.close()


async def test_a_masked_frame_from_the_server_still_fails_with_1002() -> None:
    async with _silent_server() as url:
        client = await LabClient(url, "masked", heartbeat=None, reconnect=False).connect()
        try:
            ws = _dispatch(client)
            ws.data_received(_frame(0x81, _event(1)) + _frame(0x81, _event(2), b"abcd"))
            await client.wait_for_status("disconnected", timeout(5))
            assert ws.protocol.close_sent is not None and ws.protocol.close_sent.code == 1002
            assert list(client.frame.df["seq"]) == [1]
        finally:
            await client.close()


async def test_a_real_servers_events_take_the_split_path(server: Server) -> None:
    from gathering_lab.events import Event

    client = await LabClient(server.url, "real", heartbeat=None).connect()
    try:
        for n in range(200):
            await server.bus.publish(Event(type="task.created", data={"n": n}))
        await client.wait_for_events(200, timeout(5))
        assert _dispatch(client).fast_frames >= 200
        assert [row["n"] for row in client.frame.df["data"]] == list(range(200))
    finally:
        await client.close()


async def test_frames_in_the_handshakes_read_do_not_stop_the_splitting() -> None:
    """A server whose writes never end on a frame boundary, the first one holding the HTTP
    response, the greeting and half an event: websockets is given the response alone, so
    the frames after it are still split here (else websockets' parser would hold part of a
    frame after every read, and take every frame)."""
    import base64
    import hashlib

    from gathering_lab import protocol

    greeting = protocol.connection_established("c", seq=0, epoch="e1", request_ids=True)
    frames = [_frame(0x81, protocol.encode(greeting))]
    frames += [_frame(0x81, _event(seq, 40)) for seq in range(1, 41)]
    stream = b"".join(frames)
    cuts = [len(frames[0]) + 30, *range(len(frames[0]) + 400, len(stream), 377), len(stream)]
    ping = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.readuntil(b"\r\n\r\n")
        key = next(
            line.split(b":", 1)[1].strip()
            for line in request.split(b"\r\n")
            if line.lower().startswith(b"sec-websocket-key:")
        )
        accept = base64.b64encode(
            hashlib.sha1(key + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()  # noqa: S324
        )
        response = (
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: " + accept + b"\r\n\r\n"
        )
        writer.write(response + stream[: cuts[0]])  # one write: response, greeting, half
        await writer.drain()
        await ping  # the client is in its read loop: on_text is set
        start = cuts[0]
        for cut in cuts[1:]:
            writer.write(stream[start:cut])
            await writer.drain()
            await asyncio.sleep(0.001)  # separate reads, mostly; each ends inside a frame
            start = cut
        await reader.read(1)  # the client's close frame: answer it, close the connection
        writer.write(b"\x88\x02\x03\xe8")
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        client = LabClient(f"ws://127.0.0.1:{port}/ws/dashboard", "hs", heartbeat=None)
        client.reconnect = False
        await client.connect()
        try:
            ws = _dispatch(client)
            ping.set_result(None)
            await client.wait_for_events(40, timeout(5))
            assert list(client.frame.df["seq"]) == list(range(1, 41))
            assert ws.fast_frames >= 39  # all but (at most) the one split before on_text
        finally:
            await client.close()
