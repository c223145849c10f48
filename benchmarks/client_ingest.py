"""Client ingest benchmark: how many events/s one LabClient takes into its frame.

Three processes, all on 127.0.0.1:

* a server, ``python -m gathering_lab serve --port P --publish-rate 0 --message-rate 0``
  (no rate limit, ``--max-pending 1g`` so the client is never evicted as slow, history
  big enough to hold the run);
* a publisher (this script with ``--role publisher``): a raw websockets client that
  sends N ``publish`` messages as fast as the server takes them, subscribed to a type
  nothing publishes so it reads only its acks;
* this process: one :class:`~gathering_lab.client.LabClient` (``heartbeat=None``)
  counting the events into its frame.

The figure is (N - 1) / (the time between the first and the last event's ``received_at``
in the client's frame), plus the client process's CPU time per event
(``time.process_time()`` from before the publisher starts until the frame holds N rows:
the part the other processes and the box's noise change least).
``--mode replay`` measures the other way events arrive in bulk: N events are published
first, then the client connects with ``last_seq=0`` and the server replays them from
history as fast as the client reads.

Each run also prints the server's CPU split into user and kernel time, the publisher's
CPU (live), and how many frames the client's connection split itself
(``DispatchConnection.fast_frames``; None for a package without it). ``--profile`` runs
the client's phase under cProfile and prints the top functions by own time; ``--no-gc``
disables the garbage collector in the client's process, to measure its share. Every run
is repeated ``--reps`` times (a fresh server each time); the table gives min / median / max.

    PYTHONPATH=$PWD python benchmarks/client_ingest.py                  # 20,000 events x 5
    PYTHONPATH=$PWD python benchmarks/client_ingest.py --profile --reps 1
    PYTHONPATH=../before python benchmarks/client_ingest.py --label before  # same-run baseline

The package imported (server, publisher and client) is whichever ``PYTHONPATH`` names,
so the same script measures two checkouts back to back.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import gc
import io
import json
import os
import platform
import pstats
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def payload(size: int) -> dict[str, Any]:
    """Event data of about ``size`` bytes of JSON, like a small task event."""
    data: dict[str, Any] = {"task_id": 0, "title": "bench", "priority": 3, "tags": ["a", "b"]}
    pad = max(0, size - len(json.dumps(data)) - 12)
    data["note"] = "x" * pad
    return data


# Publisher (a separate process)


async def publish(url: str, events: int, size: int) -> None:
    """Send ``events`` publish messages as fast as the server takes them; read the acks."""
    from websockets.asyncio.client import connect

    data = payload(size)
    async with connect(url, max_size=None, compression=None, ping_interval=None) as ws:
        await ws.recv()  # greeting
        await ws.send(json.dumps({"type": "subscribe", "data": {"event_types": ["bench.none"]}}))
        acks = 0
        done = asyncio.Event()

        async def read() -> None:
            nonlocal acks
            async for raw in ws:
                if '"published"' in raw[:40]:
                    acks += 1
                    if acks >= events:
                        done.set()

        reader = asyncio.create_task(read())
        for i in range(events):
            data["task_id"] = i
            message = {"type": "publish", "data": {"type": "task.created", "data": data}}
            await ws.send(json.dumps(message, separators=(",", ":")))
        await asyncio.wait_for(done.wait(), 120)
        reader.cancel()


# Server


def start_server(port: int, history: int, extra: list[str]) -> subprocess.Popen[bytes]:
    """Start ``gathering-lab serve`` on ``port`` and wait until /health answers."""
    command = [
        sys.executable,
        "-m",
        "gathering_lab",
        "serve",
        "--port",
        str(port),
        "--publish-rate",
        "0",
        "--message-rate",
        "0",
        "--max-pending",
        "1g",
        "--history",
        str(history),
        "--log-level",
        "warning",
        *extra,
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as reply:
                if reply.status == 200:
                    return server
        except OSError:
            time.sleep(0.05)
    server.kill()
    raise RuntimeError("the server did not answer /health within 20 s")


def run_publisher(url: str, events: int, size: int) -> subprocess.Popen[bytes]:
    """Start the publisher process."""
    command = [sys.executable, __file__, "--role", "publisher", "--url", url]
    command += ["--events", str(events), "--payload-bytes", str(size)]
    return subprocess.Popen(command)


# The client (this process)


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(utime, stime) of process ``pid`` so far (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


async def wait_rows(client: Any, events: int, limit: float) -> None:
    """Poll (cheaply: no per-event waiter) until the client has ``events`` events."""
    deadline = time.monotonic() + limit
    while client.events_received < events:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{client.events_received} of {events} events after {limit:g} s")
        await asyncio.sleep(0.005)


async def one_run(args: argparse.Namespace, profiler: cProfile.Profile | None) -> dict[str, Any]:
    """One fresh server, one client, N events; return the figures."""
    from gathering_lab.client import LabClient

    port = free_port()
    url = f"ws://127.0.0.1:{port}/ws/dashboard"
    server = start_server(port, max(10_000, args.events + 10), args.server_arg)
    try:
        if args.mode == "replay":
            publisher = run_publisher(url, args.events, args.payload_bytes)
            if publisher.wait(120) != 0:
                raise RuntimeError("the publisher failed")
        client = LabClient(url, "ingest", heartbeat=None, base_delay=0.05)
        if args.mode == "replay":
            client.last_seq, client.epoch = 0, await _epoch(port)
        await client.connect()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        server_cpu0 = cpu_seconds(server.pid)
        if profiler is not None:
            profiler.enable()
        if args.mode == "live":
            publisher = run_publisher(url, args.events, args.payload_bytes)
        await wait_rows(client, args.events, 120)
        if profiler is not None:
            profiler.disable()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        server_user, server_sys = (
            now - then for now, then in zip(cpu_seconds(server.pid), server_cpu0, strict=True)
        )
        server_cpu = server_user + server_sys
        # Frames the client's connection split itself (None: a package without the splitter).
        split = getattr(client._ws, "fast_frames", None)
        rows, gaps = len(client.frame), client.gaps
        received = client.frame.df["received_at"]
        span = (received.max() - received.min()).total_seconds()
        await client.close()
        children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if args.mode == "live" and publisher.wait(60) != 0:
            raise RuntimeError("the publisher failed")
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        publisher_cpu = (children.ru_utime + children.ru_stime) - (
            children0.ru_utime + children0.ru_stime
        )
        return {
            "events": args.events,
            "rows": rows,
            "gaps": gaps,
            "wall_s": wall,
            "span_s": span,
            "events_per_s": (args.events - 1) / span,
            "client_cpu_us_per_event": cpu / args.events * 1e6,
            "client_cpu_pct": 100 * cpu / span,
            "server_cpu_us_per_event": server_cpu / args.events * 1e6,
            "server_cpu_pct": 100 * server_cpu / span,
            "server_kernel_pct": 100 * server_sys / server_cpu if server_cpu else 0.0,
            "split_frames": split,
            # Live only (the reaped publisher's CPU; replay publishes before the phase).
            "publisher_cpu_us_per_event": publisher_cpu / args.events * 1e6,
        }
    finally:
        server.terminate()
        server.wait(10)


async def _epoch(port: int) -> str:
    """The server's epoch, read from its greeting."""
    from websockets.asyncio.client import connect

    async with connect(f"ws://127.0.0.1:{port}/ws/dashboard") as ws:
        return str(json.loads(await ws.recv())["data"]["epoch"])


def describe() -> str:
    """Machine, versions and git revision of the imported package."""
    import gathering_lab

    try:
        import orjson

        has_orjson = f"orjson {orjson.__version__} installed"
    except ImportError:
        has_orjson = "no orjson"
    root = Path(gathering_lab.__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    load = os.getloadavg()[0]
    return (
        f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, {has_orjson}; package at {root} "
        f"({rev or 'no git'}); load average {load:.2f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per run (20000)")
    parser.add_argument("--reps", type=int, default=5, help="runs, each on a fresh server (5)")
    parser.add_argument("--payload-bytes", type=int, default=200, help="JSON size of data (200)")
    parser.add_argument("--mode", choices=["live", "replay"], default="live")
    parser.add_argument("--profile", action="store_true", help="cProfile the client's phase")
    parser.add_argument("--top", type=int, default=25, help="functions shown by --profile")
    parser.add_argument(
        "--no-gc",
        action="store_true",
        help="disable the garbage collector in the client process (to measure its share)",
    )
    parser.add_argument("--label", default="", help="name of this run in the output")
    parser.add_argument(
        "--server-arg", action="append", default=[], help="extra argument for serve"
    )
    parser.add_argument("--role", choices=["client", "publisher"], default="client")
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "publisher":
        asyncio.run(publish(args.url, args.events, args.payload_bytes))
        return
    print(f"# client ingest {args.label} ({args.mode}): {describe()}", flush=True)
    profiler = cProfile.Profile() if args.profile else None
    if args.no_gc:
        gc.disable()
    runs = []
    for rep in range(args.reps):
        result = asyncio.run(one_run(args, profiler))
        runs.append(result)
        print(
            f"run {rep + 1}: {result['events_per_s']:,.0f} events/s, "
            f"client CPU {result['client_cpu_us_per_event']:.1f} µs/event "
            f"({result['client_cpu_pct']:.0f} % of a core), server CPU "
            f"{result['server_cpu_us_per_event']:.1f} µs/event "
            f"({result['server_cpu_pct']:.0f} %, {result['server_kernel_pct']:.0f} % of it "
            f"in the kernel), rows {result['rows']}, gaps {result['gaps']}, "
            f"frames split by the client itself {result['split_frames']}"
            + (
                f", publisher CPU {result['publisher_cpu_us_per_event']:.1f} µs/event"
                if args.mode == "live"
                else ""
            ),
            flush=True,
        )
    rates = sorted(r["events_per_s"] for r in runs)
    cpus = sorted(r["client_cpu_us_per_event"] for r in runs)
    servers = sorted(r["server_cpu_us_per_event"] for r in runs)
    print(
        f"| {args.label or '-'} | {args.mode} | {args.events} x {args.reps} | "
        f"{rates[0]:,.0f} / {statistics.median(rates):,.0f} / {rates[-1]:,.0f} | "
        f"{cpus[0]:.1f} / {statistics.median(cpus):.1f} / {cpus[-1]:.1f} | "
        f"{servers[0]:.1f} / {statistics.median(servers):.1f} / {servers[-1]:.1f} |"
    )
    if profiler is not None:
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())


if __name__ == "__main__":
    main()
