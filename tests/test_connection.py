"""The connection module: URL checks, query building, connecting and error text, in one place."""

from __future__ import annotations

import ast
import asyncio
import logging
from pathlib import Path

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
from gathering_lab.testing import free_port, recv_json
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
