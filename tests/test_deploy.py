"""Deployment as docs/deploy.md describes it: TLS on ``gathering-lab serve``, nginx in front.

The TLS test runs the real CLI with a throwaway self-signed certificate (made with
the ``openssl`` command). The nginx test runs ``docs/nginx/gathering-lab.conf`` — the
file docs/deploy.md shows — with only its ports, certificate paths swapped, in front
of a real server, and in front of two ``gathering-lab serve --bus redis://...`` nodes
(a real ``redis-server``) one of which is stopped under a connected client. Without
openssl or nginx these tests skip, except in CI (``CI`` set) where they fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import shutil
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import websockets
from websockets.exceptions import ConnectionClosedError, InvalidMessage

from gathering_lab.client import LabClient
from gathering_lab.events import Event
from gathering_lab.testing import (
    RedisServer,
    free_port,
    recv_json,
    recv_until,
    running_server,
    timeout,
    wait_for,
)

ROOT = Path(__file__).resolve().parent.parent
NGINX_CONF = ROOT / "docs" / "nginx" / "gathering-lab.conf"
DEPLOY_MD = ROOT / "docs" / "deploy.md"


def require(tool: str, install: str) -> str:
    """The path of ``tool``; skip (fail in CI) if it is not installed."""
    path = shutil.which(tool) or next(
        (p for p in (f"/usr/sbin/{tool}", f"/usr/bin/{tool}") if os.path.exists(p)), None
    )
    if path is None:
        message = f"{tool} is missing: {install}"
        if os.environ.get("CI"):
            pytest.fail(f"deployment tests cannot run in CI: {message}")
        pytest.skip(message)
    return path


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1, valid for a day."""
    import subprocess

    openssl = require("openssl", "apt-get install openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
        + ["-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"]
        + ["-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=timeout(60),
    )
    return cert, key


def trusting(cert: Path) -> ssl.SSLContext:
    """A client TLS context that trusts ``cert`` (and nothing else)."""
    return ssl.create_default_context(cafile=str(cert))


async def http_get(
    url_host: str,
    port: int,
    path: str,
    *,
    context: ssl.SSLContext | None = None,
    source: str | None = None,
) -> tuple[int, dict[str, str], bytes]:
    """GET without following redirects; ``source`` picks the client's loopback address."""

    def get() -> tuple[int, dict[str, str], bytes]:
        options: dict[str, Any] = {"timeout": timeout(10)}
        if source:
            options["source_address"] = (source, 0)
        connection: http.client.HTTPConnection
        if context is not None:
            connection = http.client.HTTPSConnection(url_host, port, context=context, **options)
        else:
            connection = http.client.HTTPConnection(url_host, port, **options)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), response.read()
        finally:
            connection.close()

    return await asyncio.to_thread(get)


# gathering-lab serve --certfile --keyfile


@contextlib.asynccontextmanager
async def cli_server(*args: str) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """Run ``gathering-lab serve --port 0 ARGS``; yield its WebSocket URL and process."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        "0",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    output: list[str] = []
    url: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    async def drain() -> None:
        assert process.stdout is not None
        async for raw in process.stdout:
            line = raw.decode(errors="replace").rstrip()
            output.append(line)
            if line.startswith("  WebSocket  ") and not url.done():
                url.set_result(line.split()[-1])
        if not url.done():
            url.set_exception(RuntimeError("server exited:\n" + "\n".join(output)))

    reader = asyncio.create_task(drain())
    try:
        yield await asyncio.wait_for(url, timeout(20)), process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # what systemd sends
            try:
                await asyncio.wait_for(process.wait(), timeout(10))
            except TimeoutError:
                process.kill()
                await process.wait()
        await asyncio.wait_for(reader, timeout(5))
        print("\n".join(output))  # shown by pytest when a test fails


async def test_serve_with_tls(tls_cert: tuple[Path, Path]) -> None:
    cert, key = tls_cert
    context = trusting(cert)
    async with cli_server("--certfile", str(cert), "--keyfile", str(key)) as (url, process):
        assert url.startswith("wss://127.0.0.1:") and url.endswith("/ws/dashboard")
        port = int(url.split(":")[2].split("/")[0])

        async with websockets.connect(url + "?client_id=tls-client", ssl=context) as ws:
            hello = await recv_json(ws)
            assert hello["type"] == "connection.established"
            assert hello["data"]["client_id"] == "tls-client"
            await ws.send(json.dumps({"type": "ping", "id": 1}))
            pong = await recv_json(ws)
            assert (pong["type"], pong["id"]) == ("pong", 1)
            await ws.send(
                json.dumps({"type": "publish", "data": {"type": "deploy.finished", "data": {}}})
            )
            received = await recv_until(ws, lambda m: m["type"] == "published")
            assert [m["type"] for m in received] == ["deploy.finished", "published"]

        status, _, body = await http_get("127.0.0.1", port, "/health", context=context)
        assert status == 200 and json.loads(body)["status"] == "ok"
        status, headers, _ = await http_get("127.0.0.1", port, "/dashboard", context=context)
        assert status == 200 and headers["Content-Type"].startswith("text/html")

        # What the troubleshooting section promises for the two usual TLS mistakes.
        with pytest.raises(ssl.SSLCertVerificationError, match="self-signed certificate"):
            await websockets.connect(url, open_timeout=timeout(5))
        with pytest.raises(InvalidMessage, match="did not receive a valid HTTP response"):
            await websockets.connect(url.replace("wss://", "ws://"), open_timeout=timeout(5))

    assert process.returncode == 0


async def test_a_tls_handshake_that_never_comes_is_cut_at_open_timeout(
    tls_cert: tuple[Path, Path],
) -> None:
    # A TLS handshake happens before the WebSocket one; websockets passes open_timeout on
    # as asyncio's ssl_handshake_timeout (whose own default is 60 s). Keep it that way.
    from gathering_lab.websocket import serve

    cert, key = tls_cert
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    server = await serve(port=0, ssl=context, open_timeout=timeout(1.0))
    try:
        port = urlsplit(server.url).port
        reader, writer = await asyncio.open_connection("127.0.0.1", port)  # plain TCP, silent
        started = time.monotonic()
        try:
            async with asyncio.timeout(timeout(1.0) + 10):
                assert await reader.read() == b"", "the server closed the connection"
        finally:
            writer.close()
        assert time.monotonic() - started < timeout(1.0) + 5
        # A client that does the handshake in time is served as before.
        url = f"wss://127.0.0.1:{port}/ws/dashboard?client_id=in-time"
        async with websockets.connect(url, ssl=trusting(cert)) as ws:
            assert json.loads(await ws.recv())["type"] == "connection.established"
    finally:
        server.close()
        await server.wait_closed()


async def test_serve_refuses_a_key_without_certificate(tls_cert: tuple[Path, Path]) -> None:
    _, key = tls_cert
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        "0",
        "--keyfile",
        str(key),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(process.communicate(), timeout(20))
    assert process.returncode != 0
    assert b"--certfile and --keyfile go together" in out


# nginx in front (docs/nginx/gathering-lab.conf)


def render_nginx_site(
    *, tls_port: int, http_port: int, backend_ports: tuple[int, int], cert: Path, key: Path
) -> str:
    """The shipped config with test ports and certificate; each swap must match exactly once.

    ``backend_ports`` replace the two upstream nodes (8000, 8001); a test with one server
    gives its port twice.
    """
    text = NGINX_CONF.read_text()
    swaps = {
        "/etc/letsencrypt/live/api.gathering.example.com/fullchain.pem": str(cert),
        "/etc/letsencrypt/live/api.gathering.example.com/privkey.pem": str(key),
        "listen 443 ssl;": f"listen 127.0.0.1:{tls_port} ssl;",
        "listen 80;": f"listen 127.0.0.1:{http_port};",
        "server 127.0.0.1:8000 ": f"server 127.0.0.1:{backend_ports[0]} ",
        "server 127.0.0.1:8001 ": f"server 127.0.0.1:{backend_ports[1]} ",
    }
    for old, new in swaps.items():
        assert text.count(old) == 1, f"{NGINX_CONF.name} should contain {old!r} once"
        text = text.replace(old, new)
    return text


def nginx_main_config(folder: Path) -> str:
    """A minimal nginx.conf keeping pid, logs and temp files in ``folder``."""
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {folder / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{user}worker_processes 1;
pid {folder / "nginx.pid"};
error_log {folder / "error.log"} info;
events {{
    worker_connections 256;
}}
http {{
    access_log {folder / "access.log"};
{temp}
    include {folder / "gathering-lab.conf"};
}}
"""


@contextlib.asynccontextmanager
async def run_nginx(site: str, folder: Path, port: int) -> AsyncIterator[None]:
    nginx = require("nginx", "apt-get install nginx")
    (folder / "gathering-lab.conf").write_text(site)
    (folder / "nginx.conf").write_text(nginx_main_config(folder))
    base = [
        nginx,
        "-p",
        str(folder),
        "-c",
        str(folder / "nginx.conf"),
        "-e",
        str(folder / "error.log"),
    ]
    check = await asyncio.create_subprocess_exec(
        *base, "-t", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await asyncio.wait_for(check.communicate(), timeout(20))
    assert check.returncode == 0, f"nginx -t rejected the config:\n{out.decode()}"
    process = await asyncio.create_subprocess_exec(*base, "-g", "daemon off;")

    def log() -> str:
        path = folder / "error.log"
        return path.read_text() if path.exists() else "(no error.log)"

    try:
        deadline = asyncio.get_running_loop().time() + timeout(10)
        while True:  # ready when it accepts connections on its port
            assert process.returncode is None, f"nginx exited:\n{log()}"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    raise TimeoutError(f"nginx did not listen on {port}:\n{log()}") from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            await writer.wait_closed()
            break
        yield
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)  # fast shutdown, drops open WebSockets
            try:
                await asyncio.wait_for(process.wait(), timeout(10))
            except TimeoutError:
                process.kill()
                await process.wait()


def test_deploy_doc_shows_the_tested_nginx_config() -> None:
    assert NGINX_CONF.read_text() in DEPLOY_MD.read_text(), (
        "docs/deploy.md must include docs/nginx/gathering-lab.conf verbatim"
    )


async def test_nginx_proxies_websocket_and_http(
    tls_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    cert, key = tls_cert
    context = trusting(cert)
    tls_port, http_port = free_port(), free_port()
    async with running_server() as backend:
        site = render_nginx_site(
            tls_port=tls_port,
            http_port=http_port,
            backend_ports=(backend.port, backend.port),
            cert=cert,
            key=key,
        )
        async with run_nginx(site, tmp_path, tls_port):
            ws_url = f"wss://127.0.0.1:{tls_port}/ws/dashboard"
            async with websockets.connect(ws_url + "?client_id=via-nginx", ssl=context) as ws:
                hello = await recv_json(ws)
                assert hello["type"] == "connection.established"
                assert hello["data"]["client_id"] == "via-nginx"
                await ws.send(json.dumps({"type": "ping", "id": "hb"}))
                pong = await recv_json(ws)
                assert (pong["type"], pong["id"]) == ("pong", "hb")

                await backend.bus.publish(Event(type="task.completed", data={"task_id": 42}))
                event = await recv_json(ws)
                assert (event["type"], event["data"], event["seq"]) == (
                    "task.completed",
                    {"task_id": 42},
                    1,
                )
                await ws.send(
                    json.dumps({"type": "publish", "data": {"type": "task.created", "data": {}}})
                )
                received = await recv_until(ws, lambda m: m["type"] == "published")
                assert [m["type"] for m in received] == ["task.created", "published"]

                status, headers, body = await http_get(
                    "127.0.0.1", tls_port, "/admin/websocket/stats", context=context
                )
                assert status == 200 and headers["Content-Type"] == "application/json"
                stats = json.loads(body)
                assert stats["active_connections"] == 1
                assert [c["client_id"] for c in stats["clients"]] == ["via-nginx"]

            # The dashboard and its script come through the same proxy.
            status, headers, body = await http_get(
                "127.0.0.1", tls_port, "/dashboard", context=context
            )
            assert status == 200 and headers["Content-Type"].startswith("text/html")
            assert b'src="/static/dashboard.js"' in body
            status, headers, body = await http_get(
                "127.0.0.1", tls_port, "/static/gathering-ws.js", context=context
            )
            assert status == 200 and headers["Content-Type"].startswith("text/javascript")
            assert b"export class GatheringSocket" in body

            # Plain HTTP is redirected to https.
            status, headers, _ = await http_get("127.0.0.1", http_port, "/dashboard")
            assert status == 301 and headers["Location"].startswith("https://")

            # /admin/ is for the machine itself: another address gets 403, /health stays open.
            status, _, _ = await http_get(
                "127.0.0.1", tls_port, "/admin/websocket/stats", context=context, source="127.0.0.2"
            )
            assert status == 403
            status, _, _ = await http_get(
                "127.0.0.1", tls_port, "/health", context=context, source="127.0.0.2"
            )
            assert status == 200

            # nginx passes the browser's Origin on: a foreign one is still refused.
            async with websockets.connect(
                ws_url, ssl=context, origin=websockets.Origin("https://evil.example")
            ) as ws:
                with pytest.raises(ConnectionClosedError) as closed:
                    await recv_json(ws)
            assert closed.value.rcvd is not None
            assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
                1008,
                "Unauthorized origin",
            )


# Two nodes on one log behind nginx: a client whose node stops goes on at the other


def port_of(url: str) -> int:
    """The port of ``ws://127.0.0.1:PORT/...``."""
    port = urlsplit(url).port
    assert port is not None, url
    return port


async def clients_on(port: int) -> list[str]:
    """The client ids a node lists in its own stats (read on its loopback port)."""
    status, _, body = await http_get("127.0.0.1", port, "/admin/websocket/stats")
    assert status == 200, body
    return [client["client_id"] for client in json.loads(body)["clients"]]


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
async def test_nginx_moves_a_stopped_nodes_client_to_the_other_without_loss(
    stop: signal.Signals,
    redis_server: RedisServer,
    tls_cert: tuple[Path, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cert, key = tls_cert
    # LabClient opens wss:// with the default trust store: make it trust the test certificate.
    monkeypatch.setenv("SSL_CERT_FILE", str(cert))
    node = ("--bus", redis_server.url, "--trusted-proxy", "127.0.0.1")  # as deploy.md says
    tls_port = free_port()
    async with cli_server(*node) as (url_a, node_a), cli_server(*node) as (url_b, node_b):
        nodes = {port_of(url_a): node_a, port_of(url_b): node_b}
        site = render_nginx_site(
            tls_port=tls_port,
            http_port=free_port(),
            backend_ports=(port_of(url_a), port_of(url_b)),
            cert=cert,
            key=key,
        )
        received: list[dict[str, Any]] = []
        statuses: list[str] = []
        # The first reconnect waits 2 s (scaled): long enough to publish while it is away.
        client = LabClient(
            f"wss://127.0.0.1:{tls_port}/ws/dashboard",
            "mover",
            base_delay=timeout(2),
            max_delay=timeout(2),
            open_timeout=timeout(10),
        )
        client.on_event(received.append)
        client.on_status(statuses.append)
        async with run_nginx(site, tmp_path, tls_port), client:
            # Which node nginx picked: each node lists only its own clients.
            on = [port for port in nodes if "mover" in await clients_on(port)]
            assert len(on) == 1, on
            (first,) = on
            (other,) = set(nodes) - {first}
            # One more request through nginx: its round robin (one worker, equal weights)
            # gave it to the other node, so the client's reconnect is first sent to the
            # stopped node and must be passed on (proxy_next_upstream).
            status, _, _ = await http_get("127.0.0.1", tls_port, "/health", context=trusting(cert))
            assert status == 200

            # Events are published through the other node, directly (not through nginx).
            async with websockets.connect(
                f"ws://127.0.0.1:{other}/ws/dashboard?client_id=publisher"
            ) as publisher:
                await recv_json(publisher)

                async def publish(i: int) -> int:
                    message = {"type": "publish", "data": {"type": "load.test", "data": {"i": i}}}
                    await publisher.send(json.dumps(message))
                    got = await recv_until(publisher, lambda m: m["type"] == "published", 10)
                    return int(got[-1]["data"]["seq"])

                acked = [await publish(i) for i in range(5)]
                await client.wait_for_events(5, timeout(10))

                nodes[first].send_signal(stop)
                await asyncio.wait_for(nodes[first].wait(), timeout(10))
                await wait_for(lambda: not client.connected, 10)
                acked += [await publish(i) for i in range(5, 15)]
                assert not client.connected, "the events were meant to be published meanwhile"

                await client.wait_for_status("connected", timeout(20))
                assert sorted(await clients_on(other)) == ["mover", "publisher"]
                acked += [await publish(i) for i in range(15, 20)]
                await client.wait_for_events(20, timeout(10))

            retried = [
                line
                for line in (tmp_path / "error.log").read_text().splitlines()
                if "connect() failed (111: Connection refused) while connecting to upstream" in line
            ]
            assert len(retried) == 1 and f"127.0.0.1:{first}/ws/dashboard" in retried[0], retried

        # Every event exactly once, in order, no gap: the ten published while the client
        # was away were replayed by the other node (resume by seq through nginx).
        assert [m["data"]["i"] for m in received] == list(range(20))
        assert [m["seq"] for m in received] == acked == list(range(acked[0], acked[0] + 20))
        assert len({m["epoch"] for m in received}) == 1
        assert (client.duplicates, client.gaps, client.restarts) == (0, 0, 0)
        assert client.reconnects >= 1
        assert statuses.count("connected") == 2, statuses
        # One reconnect did it: nginx passed the handshake on instead of answering 502.
        assert len([s for s in statuses if s.startswith("reconnecting in")]) == 1, statuses


# The whole story: the dashboard in a browser, through nginx, over https and wss


def require_browser() -> str:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        require("playwright", "pip install -e '.[dev]'")  # skips, or fails in CI
    explicit = os.environ.get("GATHERING_LAB_CHROMIUM")
    if explicit and os.access(explicit, os.X_OK):
        return explicit
    return require("chromium", "apt-get install chromium (or set GATHERING_LAB_CHROMIUM)")


async def test_dashboard_through_nginx_needs_its_origin_allowed(
    tls_cert: tuple[Path, Path], tmp_path: Path
) -> None:
    chromium = require_browser()
    from playwright.async_api import async_playwright, expect

    cert, key = tls_cert
    host = "api.gathering.example.com"  # resolved to 127.0.0.1 inside the browser only
    tls_port, backend_port = free_port(), free_port()
    origin = f"https://{host}:{tls_port}"
    site = render_nginx_site(
        tls_port=tls_port,
        http_port=free_port(),
        backend_ports=(backend_port, backend_port),
        cert=cert,
        key=key,
    )
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run"]
    args += ["--disable-background-networking", "--disable-component-update", "--disable-sync"]
    args += ["--no-proxy-server", f"--host-resolver-rules=MAP {host} 127.0.0.1"]
    async with run_nginx(site, tmp_path, tls_port), async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=chromium, args=args)
        try:
            context = await browser.new_context(ignore_https_errors=True)  # self-signed
            context.set_default_timeout(timeout(10) * 1000)
            page = await context.new_page()
            status = page.get_by_test_id("status")

            # Only loopback origins are allowed by default: the page is refused...
            async with running_server(port=backend_port):
                await page.goto(f"{origin}/dashboard?client_id=behind-nginx")
                await expect(status).to_have_text("Disconnected: 1008 Unauthorized origin")

            # ...until the server is told its public origin (--allowed-origin).
            async with running_server(port=backend_port, allowed_origins=[origin]) as backend:
                await page.reload()
                await expect(status).to_have_text("Connected as behind-nginx")
                assert await page.locator("#url").input_value() == (
                    f"wss://{host}:{tls_port}/ws/dashboard"
                )
                await backend.bus.publish(Event(type="task.completed", data={"via": "nginx"}))
                row = page.locator("[data-testid=event-row][data-type='task.completed']")
                await expect(row).to_contain_text('"via": "nginx"')
                clients = page.locator("#stat-clients tr[data-client-id='behind-nginx']")
                await expect(clients).to_have_count(1)  # stats fetched through nginx too
        finally:
            await browser.close()
