"""Compression benchmark: permessage-deflate off vs on, demo traffic, 100 clients.

Each run starts a fresh ``python -m gathering_lab serve --port P --compression MODE`` process,
connects N subscribers and one publisher (all offering permessage-deflate when MODE is
``deflate``, none when ``off``), then publishes K events of the demo story
(``gathering_lab.demo.demo_messages``) at R events/s and waits until every subscriber has all K.
Modes are interleaved and every cell repeated; medians are reported.

Over the publishing phase it measures:

* **wire bytes** -- the bytes the subscribers' sockets delivered to their WebSocket
  connections (counted in ``data_received``): WebSocket frame headers plus (compressed)
  payloads, i.e. the TCP payload; TCP/IP headers and ACKs are not included;
* **TCP bytes** -- a cross-check from the kernel: each subscriber socket's ``TCP_INFO``
  (``tcpi_bytes_received``, ``tcpi_segs_in``); payload plus 52 bytes of IPv4+TCP headers
  (with timestamps) per segment received. The ACKs the clients send back are not counted.
  (The loopback interface's counters would include every other process on the machine.)
* **server CPU** -- utime+stime of the server process (psutil), and its RSS per idle connection.

All traffic is to 127.0.0.1.

    python benchmarks/compression.py                 # 100 clients, 2000 events at 200/s, 3 reps
    python benchmarks/compression.py --quick         # smoke test, ~15 s

Writes ``benchmarks/results/compression-<timestamp>.{json,md}`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import socket
import statistics
import struct
import subprocess
import sys
import time
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from websockets.asyncio.client import ClientConnection, connect

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"  # never anything else
sys.path.insert(0, str(ROOT))

from gathering_lab.demo import demo_messages, publish_message  # noqa: E402


class CountingConnection(ClientConnection):
    """A client connection that counts the bytes its socket delivers (the TCP payload)."""

    wire_bytes = 0

    def data_received(self, data: bytes) -> None:
        self.wire_bytes += len(data)
        super().data_received(data)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


#: IPv4 (20) + TCP (20) + timestamps option (12) bytes per segment on loopback.
HEADER_BYTES = 52


def tcp_received(ws: ClientConnection) -> tuple[int, int]:
    """(payload bytes, segments) the kernel received on this connection (Linux TCP_INFO)."""
    sock = ws.transport.get_extra_info("socket")
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    # struct tcp_info: tcpi_bytes_received is a u64 at offset 128, tcpi_segs_in a u32 at 140.
    bytes_received = struct.unpack_from("=Q", info, 128)[0]
    segs_in = struct.unpack_from("=I", info, 140)[0]
    return int(bytes_received), int(segs_in)


def tcp_totals(subscribers: list[CountingConnection]) -> tuple[int, int]:
    totals = [tcp_received(ws) for ws in subscribers]
    return sum(t[0] for t in totals), sum(t[1] for t in totals)


def cpu_seconds(process: psutil.Process) -> float:
    times = process.cpu_times()
    return float(times.user + times.system)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = psutil.virtual_memory().total / 2**30
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {memory:.0f} GiB RAM, Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


async def start_server(mode: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    command = [
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        str(port),
        "--compression",
        mode,
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return server, port
        except OSError:
            if server.poll() is not None:
                output = server.stdout.read().decode() if server.stdout else ""
                raise RuntimeError(f"server exited: {output}") from None
            await asyncio.sleep(0.05)
    server.kill()
    raise RuntimeError("server did not start within 30 s")


def stats(port: int) -> dict[str, Any]:
    url = f"http://{HOST}:{port}/admin/websocket/stats"
    with urllib.request.urlopen(url, timeout=10) as response:
        result: dict[str, Any] = json.loads(response.read())
        return result


async def run_once(mode: str, clients: int, events: int, rate: float) -> dict[str, Any]:
    server, port = await start_server(mode)
    ps = psutil.Process(server.pid)
    url = f"ws://{HOST}:{port}/ws/dashboard"
    offer = "deflate" if mode == "deflate" else None
    payloads = [publish_message(p).decode() for p in demo_messages(events, seed=1)]
    subscribers: list[CountingConnection] = []
    try:
        rss_before = ps.memory_info().rss

        async def join(i: int) -> CountingConnection:
            ws = await connect(
                f"{url}?client_id=sub-{i}",
                create_connection=CountingConnection,
                compression=offer,
                max_size=None,
                open_timeout=30,
            )
            assert isinstance(ws, CountingConnection)
            hello = json.loads(await asyncio.wait_for(ws.recv(), 30))
            assert hello["type"] == "connection.established", hello
            return ws

        for start in range(0, clients, 20):
            subscribers += await asyncio.gather(
                *(join(i) for i in range(start, min(start + 20, clients)))
            )
        publisher = await connect(f"{url}?client_id=publisher", compression=offer, max_size=None)
        await publisher.recv()
        negotiated = all(bool(ws.protocol.extensions) for ws in subscribers)
        await asyncio.sleep(0.5)  # let the server settle before reading its RSS
        rss_idle = ps.memory_info().rss

        received = [0] * clients
        done = asyncio.Event()
        remaining = [clients]

        async def read(index: int, ws: CountingConnection) -> None:
            async for _ in ws:
                received[index] += 1
                if received[index] == events:
                    remaining[0] -= 1
                    if not remaining[0]:
                        done.set()

        async def drain() -> None:
            async for _ in publisher:
                pass

        readers = [asyncio.create_task(read(i, ws)) for i, ws in enumerate(subscribers)]
        drainer = asyncio.create_task(drain())
        bytes_before = sum(ws.wire_bytes for ws in subscribers)
        tcp_before = tcp_totals(subscribers)
        cpu_before = cpu_seconds(ps)
        own = psutil.Process()
        own_before = cpu_seconds(own)
        started = time.monotonic()
        interval = 1.0 / rate
        for i, frame in enumerate(payloads):
            delay = started + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await publisher.send(frame)
        try:
            await asyncio.wait_for(done.wait(), events / rate + 120)
        except TimeoutError:
            pass
        elapsed = time.monotonic() - started
        cpu = cpu_seconds(ps) - cpu_before
        own_cpu = cpu_seconds(own) - own_before
        wire = sum(ws.wire_bytes for ws in subscribers) - bytes_before
        tcp_after = tcp_totals(subscribers)
        tcp_payload = tcp_after[0] - tcp_before[0]
        segments = tcp_after[1] - tcp_before[1]
        server_stats = await asyncio.to_thread(stats, port)
        deliveries = sum(received)
        for task in [*readers, drainer]:
            task.cancel()
        return {
            "mode": mode,
            "negotiated": negotiated,
            "clients": clients,
            "events": events,
            "rate": rate,
            "deliveries": deliveries,
            "lost": clients * events - deliveries,
            "slow_consumers_closed": server_stats["slow_consumers_closed"],
            "wire_bytes": wire,
            "wire_bytes_per_delivery": wire / max(deliveries, 1),
            "tcp_payload_bytes": tcp_payload,
            "tcp_segments": segments,
            "tcp_bytes_with_headers": tcp_payload + HEADER_BYTES * segments,
            "server_cpu_s": cpu,
            "server_cpu_us_per_delivery": cpu / max(deliveries, 1) * 1e6,
            "server_cpu_percent": cpu / elapsed * 100,
            "clients_cpu_s": own_cpu,
            "idle_kib_per_connection": (rss_idle - rss_before) / 1024 / (clients + 1),
            "elapsed_s": elapsed,
        }
    finally:
        for ws in subscribers:
            ws.transport.abort()
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def median(runs: list[dict[str, Any]], key: str) -> float:
    return float(statistics.median(r[key] for r in runs))


def report(results: list[dict[str, Any]], args: argparse.Namespace, command: str) -> str:
    by_mode = {m: [r for r in results if r["mode"] == m] for m in ("off", "deflate")}
    rows = [
        ("wire bytes to the subscribers, MB", "wire_bytes", 1e-6, "{:.2f}"),
        ("wire bytes per delivered event", "wire_bytes_per_delivery", 1, "{:.0f}"),
        ("TCP payload (kernel TCP_INFO, cross-check), MB", "tcp_payload_bytes", 1e-6, "{:.2f}"),
        ("TCP segments to the subscribers", "tcp_segments", 1, "{:.0f}"),
        ("bytes with IPv4+TCP headers, MB", "tcp_bytes_with_headers", 1e-6, "{:.2f}"),
        ("server CPU over the run (utime+stime), s", "server_cpu_s", 1, "{:.2f}"),
        ("server CPU per delivery, µs", "server_cpu_us_per_delivery", 1, "{:.1f}"),
        ("wall time of the publishing phase, s", "elapsed_s", 1, "{:.1f}"),
        ("server RSS per idle connection, KiB", "idle_kib_per_connection", 1, "{:.0f}"),
        ("client process CPU (100 clients), s", "clients_cpu_s", 1, "{:.2f}"),
    ]
    lines = [
        f"Command: `{command}`  ",
        f"Machine: {machine()}  ",
        f"Load: {args.clients} subscribers + 1 publisher, {args.events} demo events "
        f"(`demo_messages(seed=1)`) at {args.rate:g} events/s, {args.reps} runs per mode, "
        "interleaved; medians.",
        "",
        "| | off | deflate | deflate / off |",
        "|---|---:|---:|---:|",
    ]
    for label, key, scale, fmt in rows:
        off, on = median(by_mode["off"], key), median(by_mode["deflate"], key)
        ratio = f"{on / off:.2f}×" if off else "—"
        lines.append(
            f"| {label} | {fmt.format(off * scale)} | {fmt.format(on * scale)} | {ratio} |"
        )
    lost = sum(r["lost"] for r in results)
    evicted = sum(r["slow_consumers_closed"] for r in results)
    negotiated = all(r["negotiated"] for r in by_mode["deflate"]) and not any(
        r["negotiated"] for r in by_mode["off"]
    )
    lines += [
        "",
        f"Lost deliveries over all runs: {lost}; slow consumers closed: {evicted}; "
        f"permessage-deflate negotiated exactly in the deflate runs: {negotiated}.",
    ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> int:
    results: list[dict[str, Any]] = []
    for rep in range(args.reps):
        modes = ("off", "deflate") if rep % 2 == 0 else ("deflate", "off")
        for mode in modes:
            result = await run_once(mode, args.clients, args.events, args.rate)
            results.append(result)
            print(
                f"run {rep + 1}/{args.reps} {mode:7}: {result['wire_bytes'] / 1e6:.2f} MB, "
                f"server {result['server_cpu_s']:.2f} s CPU, lost {result['lost']}",
                file=sys.stderr,
                flush=True,
            )
    command = "python benchmarks/compression.py " + " ".join(args.argv)
    markdown = report(results, args, command.strip())
    print(markdown)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    (out / f"compression-{stamp}.json").write_text(json.dumps(results, indent=2))
    (out / f"compression-{stamp}.md").write_text(markdown + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=100, help="subscribers (100)")
    parser.add_argument("--events", type=int, default=2000, help="demo events per run (2000)")
    parser.add_argument("--rate", type=float, default=200.0, help="events per second (200)")
    parser.add_argument("--reps", type=int, default=3, help="runs per mode (3)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 300 events, 1 run")
    raw = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(raw)
    args.argv = raw
    if args.quick:
        args.events, args.reps = 300, 1
    if not re.fullmatch(r"\d+", str(args.clients)) or args.clients < 1:
        parser.error("--clients must be >= 1")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
