"""The ``gathering-lab`` command, run as real subprocesses against real servers.

Every wait is a condition with a deadline (scaled by GATHERING_LAB_TIMEOUT_FACTOR);
every subprocess is killed in a ``finally``. Network: 127.0.0.1 only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pty
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve

from gathering_lab import protocol
from gathering_lab.cli import main
from gathering_lab.connection import get_json
from gathering_lab.demo import demo_messages, run_demo
from gathering_lab.events import Event, EventBus
from gathering_lab.exceptions import ConnectionFailed
from gathering_lab.listen import event_matches, format_event, listen_messages
from gathering_lab.testing import free_port, recv_json, running_server, timeout, wait_for
from gathering_lab.websocket import Server

URL_LINE = re.compile(r"^\s+WebSocket\s+(ws://127\.0\.0\.1:(\d+)/ws/dashboard)\s*$")
EVENT_LINE = re.compile(
    r"^\d\d:\d\d:\d\d\.\d{3}  (?P<type>[a-z][a-z0-9_.]+) +seq=(?P<seq>\d+)( \w+=\S+)*  \{.*\}$"
)


# `python -m gathering_lab ARGS`, with SIGINT raising KeyboardInterrupt as in a terminal.
_WITH_CTRL_C = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'gathering-lab'; runpy.run_module('gathering_lab', run_name='__main__')"
)


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass
class Proc:
    """A ``gathering-lab`` subprocess whose output is collected line by line as it comes."""

    process: asyncio.subprocess.Process
    args: tuple[str, ...]
    out: list[str] = field(default_factory=list)
    err: list[str] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)

    async def wait_line(self, stream: str, pattern: str, wait: float = 10) -> re.Match[str]:
        """Wait for a line of ``stream`` ("out" or "err") matching ``pattern``; return the match."""
        lines = self.out if stream == "out" else self.err
        regex = re.compile(pattern)
        found: list[re.Match[str]] = []

        def seen() -> bool:
            found[:] = [m for m in map(regex.search, lines) if m]
            return bool(found) or self.process.returncode is not None

        try:
            await wait_for(seen, wait)
        except TimeoutError:
            raise AssertionError(f"{self.args}: no {pattern!r} in std{stream}: {lines}") from None
        if not found:
            await self.finish()
            raise AssertionError(
                f"{self.args} exited {self.process.returncode} before printing {pattern!r}\n"
                f"stdout: {self.out}\nstderr: {self.err}"
            )
        return found[0]

    async def finish(self, wait: float = 15) -> int:
        """Wait for the process to exit and its output to be read; return its exit status."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout(wait))
        except TimeoutError:
            raise AssertionError(
                f"{self.args} still running after {wait}s\nstdout: {self.out}\nstderr: {self.err}"
            ) from None
        await asyncio.wait_for(asyncio.gather(*self.readers), timeout(5))
        return code

    @property
    def stdout(self) -> str:
        return "".join(self.out)

    @property
    def stderr(self) -> str:
        return "".join(self.err)


async def _pump(stream: asyncio.StreamReader, lines: list[str]) -> None:
    while line := await stream.readline():
        lines.append(line.decode())


@contextlib.asynccontextmanager
async def cli(*args: str, env: dict[str, str] | None = None) -> AsyncIterator[Proc]:
    """Run ``python -m gathering_lab ARGS``; kill it on the way out if it is still running.

    The child gets Python's usual Ctrl+C handling even when this test run inherited an
    ignored SIGINT (a shell's background job does): a user's terminal behaves that way.
    """
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WITH_CTRL_C,
        *args,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**_env(), **(env or {})},
    )
    assert process.stdout is not None and process.stderr is not None
    proc = Proc(process, args)
    proc.readers = [
        asyncio.create_task(_pump(process.stdout, proc.out)),
        asyncio.create_task(_pump(process.stderr, proc.err)),
    ]
    try:
        yield proc
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
        for reader in proc.readers:
            reader.cancel()
        await asyncio.gather(*proc.readers, return_exceptions=True)


async def run(*args: str, wait: float = 20, env: dict[str, str] | None = None) -> Proc:
    """Run a command to completion."""
    async with cli(*args, env=env) as proc:
        await proc.finish(wait)
    return proc


@dataclass
class Served:
    proc: Proc
    port: int
    url: str


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    """``gathering-lab serve --port 0``, its port read from the URL line it prints."""
    async with cli("serve", "--port", "0") as proc:
        match = await proc.wait_line("out", URL_LINE.pattern)
        yield Served(proc, int(match.group(2)), match.group(1))


# serve, demo and listen together


async def test_demo_to_listen_through_serve(served: Served) -> None:
    async with cli("listen", served.url, "--count", "30") as listen:
        await listen.wait_line("err", r"^listen: connected to .* as listen-\d+")
        demo = await run("demo", "--url", served.url, "--count", "30", "--rate", "0")
        assert demo.process.returncode == 0, demo.stderr
        assert re.search(r"demo: 30 sent, 30 acked, 0 errors, [\d.]+ ev/s", demo.stderr)
        assert await listen.finish() == 0, listen.stderr
    lines = listen.stdout.splitlines()
    assert len(lines) == 30, lines
    matches = [EVENT_LINE.match(line) for line in lines]
    assert all(matches), [line for line, m in zip(lines, matches, strict=True) if not m]
    types = [m.group("type") for m in matches if m]
    assert types == [p["type"] for p in demo_messages(30)]
    seqs = [int(m.group("seq")) for m in matches if m]
    assert seqs == list(range(1, 31))
    assert all(len(line) <= 200 for line in lines)


async def test_demo_and_listen_take_the_url_the_same_way(served: Served) -> None:
    async with cli("listen", "--url", served.url, "--count", "3") as listen:
        await listen.wait_line("err", "^listen: connected to ")
        demo = await run("demo", served.url, "--count", "3", "--rate", "0")
        assert demo.process.returncode == 0, demo.stderr
        assert await listen.finish() == 0, listen.stderr
    assert len(listen.stdout.splitlines()) == 3
    helps = await asyncio.gather(run("demo", "--help"), run("listen", "--help"))
    url_help = [re.findall(r"^  (URL|--url URL) +(.*)$", p.stdout, re.MULTILINE) for p in helps]
    assert url_help[0] == url_help[1] and len(url_help[0]) == 2, url_help
    both = await run("listen", served.url, "--url", served.url.replace("127.0.0.1", "localhost"))
    assert both.process.returncode == 2
    assert "gathering-lab listen: error: argument --url: two different URLs" in both.stderr


async def test_listen_type_filter(served: Served) -> None:
    wanted = sum(p["type"].startswith("task.") for p in demo_messages(30))
    assert wanted >= 5
    async with cli("listen", served.url, "--type", "task.*", "--count", str(wanted)) as listen:
        await listen.wait_line("err", "^listen: connected")
        demo = await run("demo", "--url", served.url, "--count", "30", "--rate", "0")
        assert demo.process.returncode == 0, demo.stderr
        assert await listen.finish() == 0, listen.stderr
    lines = listen.stdout.splitlines()
    assert len(lines) == wanted
    assert all(" task." in line and re.match(r"^\S+  task\.", line) for line in lines), lines


async def test_listen_circle_and_type_filters_with_json(served: Served) -> None:
    story = list(demo_messages(400))
    wanted = [p for p in story if p["circle_id"] == 2 and p["type"].startswith("conversation.")]
    assert len(wanted) >= 3
    args = ["--circle", "2", "--type", "conversation.*", "--json", "--count", str(len(wanted))]
    async with cli("listen", served.url, *args) as listen:
        await listen.wait_line("err", "^listen: connected")
        demo = await run("demo", "--url", served.url, "--count", "400", "--rate", "0")
        assert demo.process.returncode == 0, demo.stderr
        assert await listen.finish() == 0, listen.stderr
    messages = [protocol.decode(line) for line in listen.stdout.splitlines()]
    assert messages[0]["type"] == "connection.established"
    events = [m for m in messages if "seq" in m]
    assert [m["type"] for m in events] == [p["type"] for p in wanted]
    assert [m["data"] for m in events] == [p["data"] for p in wanted]
    assert {m["type"] for m in messages} - {p["type"] for p in wanted} <= {
        "connection.established",
        "subscribed",
    }


async def test_listen_json_lines_parse(served: Served) -> None:
    async with cli("listen", served.url, "--json", "--count", "10") as listen:
        await listen.wait_line("err", "^listen: connected")
        demo = await run("demo", "--url", served.url, "--count", "10", "--rate", "0")
        assert demo.process.returncode == 0, demo.stderr
        assert await listen.finish() == 0, listen.stderr
    lines = listen.stdout.splitlines()
    assert len(lines) == 11
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["type"] == "connection.established"
    assert [m["seq"] for m in parsed[1:]] == list(range(1, 11))
    assert all(list(m)[0] == "type" for m in parsed)


async def test_demo_with_a_rate_reports_progress(served: Served) -> None:
    demo = await run("demo", "--url", served.url, "--count", "8", "--rate", "20", "--seed", "3")
    assert demo.process.returncode == 0, demo.stderr
    assert "demo: connected to" in demo.stderr and "20 ev/s" in demo.stderr
    assert "\r" not in demo.stderr  # not a TTY: whole lines
    assert re.search(r"demo: 8 sent, 8 acked, 0 errors", demo.stderr.splitlines()[-1])


async def test_demo_progress_rewrites_one_line_on_a_tty(served: Served) -> None:
    master, slave = pty.openpty()
    try:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gathering_lab",
            *("demo", "--url", served.url, "--count", "12", "--rate", "10"),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=slave,
            env=_env(),
        )
        os.close(slave)
        slave = -1
        try:
            assert await asyncio.wait_for(process.wait(), timeout(15)) == 0
        finally:
            if process.returncode is None:
                process.kill()
                await process.wait()
        output = b""
        while True:  # the child is gone: what it wrote is buffered in the pty
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO once drained
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = output.decode().replace("\r\n", "\n")  # the tty turns \n into \r\n
    assert text.startswith("demo: connected to ")
    assert "\rdemo: " in text and "\x1b[K" in text
    assert text.count("\n") == 2  # the connected line, then the progress line, ended once
    last = text.rsplit("\r", 1)[-1]
    assert re.match(r"demo: 12 sent, 12 acked, 0 errors, [\d.]+ ev/s\x1b\[K\n$", last), repr(last)


async def test_ctrl_c_stops_demo_and_listen_with_130(served: Served) -> None:
    async with cli("listen", served.url) as listen, cli("demo", "--url", served.url) as demo:
        await listen.wait_line("err", "^listen: connected")
        await demo.wait_line("err", "^demo: connected")
        await listen.wait_line("out", EVENT_LINE.pattern)  # demo is publishing, listen printing
        for proc in (listen, demo):
            proc.process.send_signal(signal.SIGINT)
        assert await demo.finish() == 130, demo.stderr
        assert await listen.finish() == 130, listen.stderr
    assert "Traceback" not in demo.stderr + listen.stderr
    assert re.search(
        r"^demo: \d+ sent, \d+ acked, 0 errors, [\d.]+ ev/s; stopped by Ctrl\+C$",
        demo.stderr,
        re.MULTILINE,
    ), demo.stderr
    assert "listen: stopped after" in listen.stderr


async def test_ctrl_c_on_demo_says_how_often_the_publish_rate_held_it_back() -> None:
    args = ("serve", "--port", "0", "--publish-rate", "1", "--publish-burst", "1")
    async with cli(*args) as serve:
        url = (await serve.wait_line("out", URL_LINE.pattern)).group(1)
        async with cli("demo", "--url", url, "--rate", "50") as demo:
            await demo.wait_line("err", r"demo: [1-9]\d* sent, .*, 0 errors, .*held back [1-9]")
            demo.process.send_signal(signal.SIGINT)
            assert await demo.finish() == 130, demo.stderr
    last = demo.stderr.splitlines()[-2:]
    assert last[0].endswith("; stopped by Ctrl+C"), last
    assert re.match(
        r"^demo: held back [1-9]\d* times by the server's publish rate: [1-9]\d* paced at "
        r"0.9 ev/s, 0 refused",
        last[1],
    ), last
    assert "Traceback" not in demo.stderr


# serve: startup and shutdown


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
async def test_serve_stops_cleanly_on_signal(served: Served, sig: signal.Signals) -> None:
    async with (
        connect(f"{served.url}?client_id=py") as ws,
        cli("listen", served.url, "--no-reconnect") as listen,
        cli("demo", "--url", served.url, "--rate", "50") as demo,
    ):
        assert (await recv_json(ws))["type"] == "connection.established"
        received: list[str | bytes] = []

        async def drain() -> None:  # a client that keeps reading, as clients should
            async for frame in ws:
                received.append(frame)

        reader = asyncio.create_task(drain())
        await listen.wait_line("err", "^listen: connected")
        await demo.wait_line("err", "^demo: connected")
        await listen.wait_line("out", EVENT_LINE.pattern)  # the server is busy
        served.proc.process.send_signal(sig)
        assert await served.proc.finish() == 0, served.proc.stderr
        await asyncio.wait_for(reader, timeout(5))  # ends with the close frame
        assert ws.close_code == 1001
        assert received
        assert await listen.finish() == 1
        assert await demo.finish() == 1
    assert "shutting down" in served.proc.stdout
    assert "Traceback" not in served.proc.stderr
    for proc in (listen, demo):
        assert re.search(
            r"error: the server closed the connection to ws://\S+: code 1001", proc.stderr
        )


async def test_listen_reconnects_and_reports_a_server_restart() -> None:
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/dashboard"
    async with cli("serve", "--port", str(port)) as first:
        await first.wait_line("out", URL_LINE.pattern)
        async with cli("listen", url, "--count", "8") as listen:
            await listen.wait_line("err", "^listen: connected to ")
            demo = await run("demo", url, "--count", "5", "--rate", "0")
            assert demo.process.returncode == 0, demo.stderr
            await wait_for(lambda: len(listen.out) == 5)
            first.process.send_signal(signal.SIGTERM)
            assert await first.finish() == 0, first.stderr
            await listen.wait_line("err", r"code 1001 .*; reconnecting in 1s \(attempt 1\)$")
            async with cli("serve", "--port", str(port)) as second:
                await second.wait_line("out", URL_LINE.pattern)
                await listen.wait_line("err", f"^listen: reconnected to {re.escape(url)} as ", 20)
                await listen.wait_line("err", r"^listen: the server restarted \(epoch \w+ -> \w+\)")
                demo = await run("demo", url, "--count", "3", "--rate", "0")
                assert demo.process.returncode == 0, demo.stderr
                assert await listen.finish() == 0, listen.stderr
    seqs = [int(m.group("seq")) for m in map(EVENT_LINE.match, listen.out) if m]
    assert seqs == [1, 2, 3, 4, 5, 1, 2, 3], listen.stdout
    assert "last_seq=" not in listen.stderr  # the resume query stays out of the messages
    assert "Traceback" not in listen.stderr


async def test_listen_resumes_and_reports_a_gap() -> None:
    bus = EventBus(history_size=3)  # a server that keeps little history
    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/dashboard"
    async with cli("listen", url, "--count", "6") as listen:
        async with running_server(bus=bus, port=port):
            await listen.wait_line("err", "^listen: connected to ")
            for n in range(2):
                await bus.publish(Event(type="task.created", data={"n": n}))
            await wait_for(lambda: len(listen.out) == 2)
        await listen.wait_line("err", r"code 1001 .*; reconnecting in 1s \(attempt 1\)$")
        for n in range(2, 8):  # published while the listener is away: 3 to 5 fall out
            await bus.publish(Event(type="task.created", data={"n": n}))
        async with running_server(bus=bus, port=port):
            await listen.wait_line("err", "^listen: reconnected to ", 20)
            await listen.wait_line("err", "^listen: resumed: 3 missed events replayed$")
            await listen.wait_line("err", "^listen: gap: events after seq 2 are no longer in the")
            await bus.publish(Event(type="task.created", data={"n": 8}))
            assert await listen.finish() == 0, listen.stderr
    seqs = [int(m.group("seq")) for m in map(EVENT_LINE.match, listen.out) if m]
    assert seqs == [1, 2, 6, 7, 8, 9], listen.stdout
    assert "restarted" not in listen.stderr


async def _collect(feed: Any, into: list[tuple[str, dict[str, Any]]]) -> None:
    async with contextlib.aclosing(feed):
        async for item in feed:
            into.append(item)


@pytest.mark.parametrize("history", [100, 3], ids=["resume", "gap"])
async def test_listen_messages_resumes_by_seq_across_a_reconnect(history: int) -> None:
    bus = EventBus(history_size=history)
    port = free_port()
    got: list[tuple[str, dict[str, Any]]] = []

    def events() -> list[int]:
        return [m["seq"] for kind, m in got if kind == "event"]

    collector: asyncio.Task[None] | None = None
    try:
        async with running_server(bus=bus, port=port) as server:
            feed = listen_messages(server.url, reconnect=True, base_delay=0.05, max_delay=0.2)
            collector = asyncio.create_task(_collect(feed, got))
            await wait_for(lambda: [kind for kind, _ in got] == ["connected"])
            for n in range(2):
                await bus.publish(Event(type="task.created", data={"n": n}))
            await wait_for(lambda: events() == [1, 2])
        # The server closed (1001); the bus goes on while the listener is away.
        await wait_for(lambda: any(kind == "reconnecting" for kind, _ in got))
        for n in range(2, 8):
            await bus.publish(Event(type="task.created", data={"n": n}))
        async with running_server(bus=bus, port=port):
            await wait_for(lambda: any(kind == "resumed" for kind, _ in got))
            await bus.publish(Event(type="task.created", data={"n": 8}))
            await wait_for(lambda: events()[-1:] == [9])
    finally:
        if collector is not None:
            collector.cancel()
            await asyncio.gather(collector, return_exceptions=True)
    kinds = [kind for kind, _ in got]
    assert kinds.count("connected") == 2 and "restarted" not in kinds
    resumed = next(m["data"] for kind, m in got if kind == "resumed")
    assert resumed["since_seq"] == 2
    if history == 100:
        assert events() == list(range(1, 10))  # every event once, in order
        assert resumed["count"] == 6 and "gap" not in kinds
    else:
        assert events() == [1, 2, 6, 7, 8, 9]  # 3 to 5 fell out of a 3-event history
        gap = next(m for kind, m in got if kind == "gap")
        assert gap["gap"] is True and gap["since_seq"] == 2


async def test_health_answers_what_the_readme_says(served: Served) -> None:
    health = await asyncio.to_thread(
        get_json, f"http://127.0.0.1:{served.port}/health", None, timeout(5)
    )
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    documented = re.search(r"`GET /health` answers 200 with `(\{.*?\})`", readme, re.DOTALL)
    assert documented, "README.md does not document GET /health"
    keys = re.findall(r'"(\w+)":', documented.group(1))
    assert keys == list(health), (keys, health)
    assert health["status"] == "ok"


async def test_serve_on_a_busy_port_fails_naming_it() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await run("serve", "--port", str(port))
    assert proc.process.returncode == 1
    assert proc.stderr.strip() == (
        f"gathering-lab serve: error: port {port} on 127.0.0.1 is already in use; "
        f"pick another (e.g. --port {port + 1}) or --port 0 for a free one"
    )


@pytest.mark.parametrize(
    ("host", "says"),
    [
        # An idna-invalid name (a 64-character label) fails before any DNS query is sent.
        ("a" * 64 + ".invalid", "cannot resolve --host 'aaa"),
        ("a..b", "cannot resolve --host 'a..b'"),
        ("192.0.2.1", "cannot bind --host 192.0.2.1: not an address of this machine"),  # TEST-NET-1
    ],
    ids=["long-label", "empty-label", "foreign"],
)
async def test_serve_on_a_bad_host_is_one_line(host: str, says: str) -> None:
    proc = await run("serve", "--host", host, "--port", "0")
    assert proc.process.returncode == 1
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"gathering-lab serve: error: {says}"), lines
    assert "--host 127.0.0.1" in lines[0]


async def test_serve_logs_how_to_accept_a_refused_origin(served: Served) -> None:
    async with connect(served.url, origin="http://evil.example") as ws:  # type: ignore[arg-type]
        with contextlib.suppress(Exception):
            await ws.recv()
    assert ws.close_code == 1008 and ws.close_reason == "Unauthorized origin"
    line = await served.proc.wait_line("err", r"refused a client from .*Unauthorized origin")
    assert "'http://evil.example'" in line.string
    assert "--allowed-origin" in line.string


async def test_demo_and_listen_with_tokens() -> None:
    secret = {"GATHERING_LAB_JWT_SECRET": "s" * 32}
    async with cli("serve", "--port", "0", "--auth-timeout", "0.5", env=secret) as serve:
        url = (await serve.wait_line("out", URL_LINE.pattern)).group(1)
        minted = await asyncio.gather(
            run("token", "--sub", "bot", "--roles", "subscribe,publish", env=secret),
            run("token", "--sub", "watcher", env=secret),
        )
        assert [p.process.returncode for p in minted] == [0, 0], [p.stderr for p in minted]
        bot, watcher = (p.stdout.strip() for p in minted)
        async with cli("listen", url, "--count", "3", "--token", watcher) as listen:
            await listen.wait_line("err", "^listen: connected to .* as watcher ")
            demo = await run(
                "demo",
                "--url",
                url,
                "--count",
                "3",
                "--rate",
                "0",
                env={"GATHERING_LAB_TOKEN": bot},
            )
            assert demo.process.returncode == 0, demo.stderr
            assert "as bot " in demo.stderr
            assert await listen.finish() == 0, listen.stderr
        assert len(listen.stdout.splitlines()) == 3
        assert bot not in demo.stderr + listen.stderr + serve.stdout + serve.stderr

        refused, anonymous = await asyncio.gather(
            run("demo", "--url", url, "--rate", "0", "--token", watcher),  # no --count
            run("listen", url),
        )
    assert refused.process.returncode == 1
    assert "demo: 1 sent, 0 acked, 1 errors" in refused.stderr  # stopped at the first refusal
    assert refused.stderr.splitlines()[-1] == (
        "demo: stopped: the server refused to publish: forbidden: publish needs the "
        "'publish' role; this token has: subscribe"
    )
    assert anonymous.process.returncode == 1
    assert "code 1008" in anonymous.stderr and "--token or $GATHERING_LAB_TOKEN" in anonymous.stderr


# Errors


@pytest.mark.parametrize("command", ["demo", "listen"])
async def test_unreachable_server(command: str) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    args = ("demo", "--url", url, "--count", "1") if command == "demo" else ("listen", url)
    proc = await run(*args)
    assert proc.process.returncode == 1
    assert proc.stderr.strip() == (
        f"gathering-lab {command}: error: cannot reach {url}: "
        "connection refused — is `gathering-lab serve` running?"
    )


@pytest.mark.parametrize("path", ["/health", "/dashboard"])
async def test_not_a_websocket_endpoint(served: Served, path: str) -> None:
    url = served.url.replace("/ws/dashboard", path)
    demo, listen = await asyncio.gather(
        run("demo", "--url", url, "--count", "1"), run("listen", url)
    )
    for proc in (demo, listen):
        assert proc.process.returncode == 1
        assert f"{url} is not a WebSocket endpoint: the server answered HTTP 200" in proc.stderr


BAD_ARGUMENTS = [
    ("demo", "--rate", "-1"),
    ("listen", "--type", "Task.Created"),
    ("demo", "--rate", "fast"),
    ("demo", "--count", "0"),
    ("demo", "--url", "http://127.0.0.1:8000/ws/dashboard"),
    ("demo", "--url", "127.0.0.1:8000"),
    ("listen", "--count", "-3"),
    ("listen", "--circle", ""),
    ("listen", "https://example.com/ws"),
    ("serve", "--port", "70000"),
    ("serve", "--history", "0"),
    ("serve", "--history-bytes", "lots"),
    ("serve", "--max-patterns", "-1"),
]


async def test_serve_history_and_pattern_limits() -> None:
    args = ("--port", "0", "--history", "5", "--history-bytes", "1MiB", "--max-patterns", "3")
    async with cli("serve", *args) as proc:
        url = (await proc.wait_line("out", URL_LINE.pattern)).group(1)
        async with connect(url) as ws:
            await recv_json(ws)
            patterns = ["a.b", "a.c", "a.d", "a.e"]
            await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": patterns}}))
            reply = await recv_json(ws)
            assert reply["data"]["code"] == "too_large" and "limit is 3" in reply["data"]["message"]
            for _ in range(8):
                await ws.send(json.dumps({"type": "publish", "data": {"type": "a.b", "data": {}}}))
            received = [await recv_json(ws) for _ in range(16)]
            assert sum(m["type"] == "published" for m in received) == 8
        async with connect(url + "?last_seq=0") as late:
            await recv_json(late)
            replayed = [await recv_json(late) for _ in range(6)]
        assert [m.get("seq") for m in replayed[:5]] == [4, 5, 6, 7, 8]
        assert replayed[5]["type"] == "resumed" and replayed[5]["data"]["gap"] is True


@pytest.mark.parametrize("args", BAD_ARGUMENTS, ids=" ".join)
def test_bad_arguments_exit_2(args: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(list(args))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"gathering-lab {args[0]}: error: argument" in err, err


async def test_bad_arguments_exit_2_from_the_command_line() -> None:
    procs = await asyncio.gather(*(run(*args) for args in BAD_ARGUMENTS[:2]))
    for proc in procs:
        assert proc.process.returncode == 2, proc.stderr
        assert "error: argument" in proc.stderr and "Traceback" not in proc.stderr


# A server that speaks only the guide's original protocol


@dataclass
class GuideServer:
    """The seed's FastAPI endpoint, reduced: greeting, ping/pong, broadcast; no subscribe."""

    answer_unknown: bool
    clients: set[ServerConnection] = field(default_factory=set)
    received: list[Any] = field(default_factory=list)
    url: str = ""

    async def handler(self, ws: ServerConnection) -> None:
        self.clients.add(ws)
        greeting = {
            "type": "connection.established",
            "data": {"client_id": "guide", "message": protocol.CONNECTED_MESSAGE},
            "timestamp": "2024-01-15T10:30:00Z",
        }
        await ws.send(protocol.encode(greeting), text=True)
        try:
            async for raw in ws:
                message = protocol.decode(raw)
                self.received.append(message)
                if message["type"] == "ping":
                    await ws.send(protocol.encode(protocol.pong()), text=True)
                elif self.answer_unknown:
                    reply = {"type": "error", "data": {"message": "Unknown message type"}}
                    await ws.send(protocol.encode(reply), text=True)
        finally:
            self.clients.discard(ws)

    async def broadcast(self, **fields: Any) -> None:
        envelope = Event(**fields).to_dict()
        for key in ("seq", "epoch"):
            del envelope[key]
        for ws in list(self.clients):
            await ws.send(protocol.encode(envelope), text=True)


@pytest.fixture(params=[True, False], ids=["subscribe-error", "subscribe-ignored"])
async def guide_server(request: pytest.FixtureRequest) -> AsyncIterator[GuideServer]:
    guide = GuideServer(answer_unknown=request.param)
    async with ws_serve(guide.handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        guide.url = f"ws://127.0.0.1:{port}/ws/dashboard"
        yield guide


async def publish_mixed(guide: GuideServer) -> None:
    await guide.broadcast(type="agent.started", data={"agent_id": 1}, source_agent_id=1)
    await guide.broadcast(type="task.created", data={"task_id": 1}, circle_id=1, project_id=1)
    await guide.broadcast(type="task.created", data={"task_id": 2}, circle_id=2, project_id=2)
    await guide.broadcast(type="circle.started", data={}, circle_id=1, project_id=1)
    # Ids compare exactly (protocol.Filters): circle "1" is not circle 1.
    await guide.broadcast(type="task.completed", data={"task_id": 3}, circle_id="1")
    await guide.broadcast(type="task.completed", data={"task_id": 1}, circle_id=1)


async def test_listen_filters_locally_against_the_guide_protocol(guide_server: GuideServer) -> None:
    args = ("--type", "task.*", "--circle", "1", "--count", "2")
    async with cli("listen", guide_server.url, *args) as listen:
        await listen.wait_line("err", "^listen: connected")
        await wait_for(lambda: bool(guide_server.received))
        assert guide_server.received[0] == {
            "type": "subscribe",
            "data": {"event_types": ["task.*"], "circle_id": 1, "project_id": None},
        }
        if guide_server.answer_unknown:
            await listen.wait_line("err", "does not support subscribe.*filtering locally")
        await publish_mixed(guide_server)
        assert await listen.finish() == 0, listen.stderr
    lines = listen.stdout.splitlines()
    assert len(lines) == 2
    assert "task.created" in lines[0] and '"task_id": 1' in lines[0]
    assert "task.completed" in lines[1] and "circle=1" in lines[1]
    assert "seq=" not in lines[0]
    assert "Traceback" not in listen.stderr


async def test_listen_messages_against_the_guide_protocol(guide_server: GuideServer) -> None:
    filters = protocol.Filters(("task.*",), 1)
    kinds: list[str] = []
    events: list[dict[str, Any]] = []
    feed = listen_messages(guide_server.url, filters=filters, client_id="lib")
    async with contextlib.aclosing(feed):
        async for kind, message in feed:
            kinds.append(kind)
            if kind == "connected":
                await wait_for(lambda: bool(guide_server.received))
                await publish_mixed(guide_server)
            if kind == "event":
                events.append(message)
                if len(events) == 2:
                    break
    assert kinds[0] == "connected"
    assert ("subscribe_refused" in kinds) is guide_server.answer_unknown
    assert [e["data"]["task_id"] for e in events] == [1, 1]
    assert [e["type"] for e in events] == ["task.created", "task.completed"]


async def test_demo_against_the_guide_protocol(guide_server: GuideServer) -> None:
    if guide_server.answer_unknown:  # every publish is answered with an error: exit 1
        demo = await run("demo", "--url", guide_server.url, "--count", "3", "--rate", "0")
        assert demo.process.returncode == 1
        assert "demo: 3 sent, 0 acked, 3 errors" in demo.stderr
        assert "refused 3 of 3 publishes (last: Unknown message type)" in demo.stderr
    else:  # publishes are silently dropped: the demo says they went unanswered
        result = await run_demo(guide_server.url, count=3, rate=0, reply_timeout=0.2)
        assert (result.sent, result.acked, result.errors, result.unanswered) == (3, 0, 0, 3)
        with pytest.raises(ConnectionFailed, match="unanswered.*does it accept 'publish'"):
            await run_demo(guide_server.url, count=5, rate=0, max_in_flight=2, reply_timeout=0.2)
    assert [m["type"] for m in guide_server.received][:3] == ["publish"] * 3


# listen as a library


async def test_listen_messages_with_server_side_filters(server: Server) -> None:
    filters = protocol.Filters(("agent.*",), None, 1)
    seen: list[tuple[str, dict[str, Any]]] = []
    feed = listen_messages(server.url, filters=filters, client_id="lib")
    async with contextlib.aclosing(feed):
        async for kind, message in feed:
            seen.append((kind, message))
            if kind == "subscribed":
                await server.bus.publish(Event(type="task.created", circle_id=1, project_id=1))
                await server.bus.publish(Event(type="agent.started", source_agent_id=4))
                await server.bus.publish(Event(type="agent.tool.executed", project_id=1))
            if kind == "event":
                break
    assert [kind for kind, _ in seen] == ["connected", "subscribed", "event"]
    assert seen[0][1]["data"]["client_id"] == "lib"
    assert seen[2][1]["type"] == "agent.tool.executed"
    stats = server.manager.get_stats()
    assert stats["active_connections"] <= 1  # closing after aclose


async def test_listen_messages_raises_when_the_server_goes_away(server: Server) -> None:
    feed = listen_messages(server.url)
    with pytest.raises(ConnectionFailed, match="code 1001"):
        async with contextlib.aclosing(feed):
            async for kind, _ in feed:
                if kind == "connected":
                    server.close()


def test_format_event() -> None:
    event = Event(
        type="task.created",
        data={"task_id": 7, "title": "x" * 400},
        source_agent_id=3,
        circle_id=1,
        project_id=2,
    )
    event.seq = 12
    line = format_event(event.to_dict())
    head = r"^\d\d:\d\d:\d\d\.\d{3}  task\.created {11}seq=12 circle=1 project=2 agent=3  "
    assert re.match(head + r'\{"task_id": 7, "title": "xxx', line)
    assert len(line) == 200 and line.endswith("...")
    short = format_event({"type": "system.warning", "data": {"n": 1}}, width=80)
    assert short.endswith('system.warning           {"n": 1}')


@pytest.mark.parametrize(
    ("filters", "message", "expected"),
    [
        (protocol.Filters(), {"type": "a.b"}, True),
        (protocol.Filters(("task.*",)), {"type": "task.conflict.detected"}, True),
        (protocol.Filters(("task.*",)), {"type": "agent.task.assigned"}, False),
        (protocol.Filters(("task.created",)), {"type": "task.created"}, True),
        (protocol.Filters(circle_id=1), {"type": "a.b", "circle_id": 1}, True),
        (protocol.Filters(circle_id=1), {"type": "a.b", "circle_id": "1"}, False),
        (protocol.Filters(circle_id="1"), {"type": "a.b", "circle_id": 1}, False),
        (protocol.Filters(circle_id=1), {"type": "a.b", "circle_id": True}, False),
        (protocol.Filters(circle_id=1), {"type": "a.b", "circle_id": None}, False),
        (protocol.Filters(project_id="p"), {"type": "a.b", "project_id": "q"}, False),
    ],
)
def test_event_matches(filters: protocol.Filters, message: dict[str, Any], expected: bool) -> None:
    assert event_matches(filters, message) is expected


@pytest.mark.parametrize(
    ("text", "seconds"), [("20ms", 0.02), ("0.02s", 0.02), ("5", 0.005), ("0", 0.0)]
)
def test_write_delay_values(text: str, seconds: float) -> None:
    from gathering_lab.cli import _milliseconds

    assert _milliseconds(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["2s", "-1ms", "soon", "1500ms"])
def test_bad_write_delay_is_one_line(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", f"--write-delay={text}"])
    assert exited.value.code == 2
    assert "invalid delay" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["-1", "many", "1.5"])
def test_bad_flush_slice_is_one_line(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["serve", "--port", "0", f"--flush-slice={text}"])
    assert exited.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("gathering-lab serve: error: argument --flush-slice: invalid count")
