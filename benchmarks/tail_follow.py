"""What a node pays to follow a Redis log: CPU per event of a follower, by tail connection.

A node that serves no publisher still reads every event of the cluster through its tail,
so its cost per event is the fixed cost of one more node (issue 9's "2 nodes ≤ 1.1× one").
This measures it alone, with no WebSocket clients: a fresh ``redis-server`` (loopback, free
port, temp dir, ``appendonly yes``, ``appendfsync everysec``); a publisher process with a
``LogBus`` publishing ``--events`` events at ``--rate`` ev/s; a follower process with a
``LogBus`` and one ``"*"`` handler, whose utime+stime from its first event to its last ÷
events is the figure. Modes, alternated in each of ``--rounds`` rounds:

* ``floor`` -- no Redis: an asyncio protocol woken by one 300-byte TCP message per event at
  the same rate, doing nothing else (what any wake-up costs on this machine);
* ``redis-py`` -- the tail reads through redis-py's connection (its stream reader, its
  parser, a task switch per reply): the code before the tail's own protocol;
* ``hiredis`` -- the tail's own protocol (``redis_tail.HiredisTailConnection``).

    python benchmarks/tail_follow.py                       # 1,000 events at 200 ev/s, 5 rounds
    python benchmarks/tail_follow.py --rate 1000 --events 5000

Writes ``benchmarks/results/tail-follow-<timestamp>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import socket
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from fanout import HERE, HOST, redis_version

from gathering_lab.backends import redis_tail
from gathering_lab.backends.bus import LogBus
from gathering_lab.events import Event
from gathering_lab.testing import RedisServer

MODES = ("floor", "redis-py", "hiredis")


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _paced(events: int, rate: float) -> Any:
    """Yield ``events`` times, ``1/rate`` s apart (sleeping, never spinning)."""
    due = time.monotonic()
    for i in range(events):
        due += 1 / rate
        yield i, due - time.monotonic()


def publish(url: str, events: int, rate: float, go: Any) -> None:
    """Publish ``events`` events at ``rate`` through a LogBus (its own process)."""

    async def main() -> None:
        bus = await LogBus(url).start()
        go.wait(30)
        for i, wait in _paced(events, rate):
            if wait > 0:
                await asyncio.sleep(wait)
            await bus.publish(Event("agent.started", {"agent_id": f"agent-{i}", "i": i}))
        await bus.close()

    asyncio.run(main())


def follow(url: str, mode: str, events: int, out: Any) -> None:
    """Follow the log with a LogBus; put this process's CPU µs per event on ``out``."""
    redis_tail.USE_HIREDIS = mode == "hiredis"

    async def main() -> float:
        bus = await LogBus(url).start()
        seen = [0, 0.0]
        done = asyncio.get_running_loop().create_future()

        def handler(event: Event) -> None:
            if seen[0] == 0:
                seen[1] = _cpu()
            seen[0] += 1
            if seen[0] == events and not done.done():
                done.set_result(_cpu() - seen[1])

        bus.subscribe("*", handler)
        async with asyncio.timeout(30):  # until the tail has its connection
            while (reader := bus.log.stats().get("tail_reader")) is None:
                await asyncio.sleep(0.01)
        out.put(("ready", reader))
        async with asyncio.timeout(events / 10 + 60):
            spent: float = await done
        await bus.close()
        return spent

    out.put(("cpu", 1e6 * asyncio.run(main()) / (events - 1)))


def floor_sender(port: int, events: int, rate: float, go: Any) -> None:
    """Send one 300-byte message per event at ``rate``."""
    sock = socket.create_connection((HOST, port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    go.wait(30)
    for _, wait in _paced(events, rate):
        if wait > 0:
            time.sleep(wait)
        sock.sendall(b"x" * 300)
    sock.close()


def floor_receiver(events: int, rate: float, out: Any) -> None:
    """Receive the floor sender's messages in an asyncio protocol; CPU µs per message."""

    async def main() -> float:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        state = {"bytes": 0, "cpu0": 0.0}

        class Receiver(asyncio.Protocol):
            def data_received(self, data: bytes) -> None:
                if state["bytes"] == 0:
                    state["cpu0"] = _cpu()
                state["bytes"] += len(data)
                if state["bytes"] >= 300 * events and not done.done():
                    done.set_result(_cpu() - state["cpu0"])

        server = await loop.create_server(Receiver, HOST, 0)
        port = server.sockets[0].getsockname()[1]
        go = mp.Event()
        sender = mp.Process(target=floor_sender, args=(port, events, rate, go))
        sender.start()
        out.put(("ready", "floor"))
        go.set()
        async with asyncio.timeout(events / rate + 60):
            spent: float = await done
        sender.join()
        server.close()
        return spent

    out.put(("cpu", 1e6 * asyncio.run(main()) / (events - 1)))


def run_once(url: str, mode: str, events: int, rate: float) -> float:
    """One follower run of ``mode``; its CPU µs per event."""
    out: Any = mp.Queue()
    go = mp.Event()
    if mode == "floor":
        proc = mp.Process(target=floor_receiver, args=(events, rate, out))
        proc.start()
        pub = None
    else:
        proc = mp.Process(target=follow, args=(url, mode, events, out))
        proc.start()
        kind, reader = out.get(timeout=60)
        if (kind, reader) != ("ready", mode):
            raise RuntimeError(f"the follower reads through {reader!r}, not {mode!r}")
        pub = mp.Process(target=publish, args=(url, events, rate, go))
        pub.start()
        go.set()
    try:
        while True:
            kind, value = out.get(timeout=events / rate + 120)
            if kind == "cpu":
                return float(value)
    finally:
        for p in (proc, pub):
            if p is not None:
                p.join(30)
                if p.is_alive():
                    p.kill()


def main(argv: list[str] | None = None) -> int:
    """Alternate the modes for ``--rounds`` rounds; print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--rate", type=float, default=200.0, help="events per second")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if bad := [m for m in modes if m not in MODES]:
        p.error(f"unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}")
    if args.events < 2 or args.rate <= 0 or args.rounds < 1:
        p.error("--events must be at least 2, --rate positive, --rounds at least 1")
    results: dict[str, list[float]] = {m: [] for m in modes}
    with tempfile.TemporaryDirectory(prefix="tail-follow-") as tmp:
        redis = RedisServer(Path(tmp), appendfsync="everysec")
        redis.start()
        try:
            for r in range(args.rounds):
                for mode in modes:
                    cpu = run_once(redis.url, mode, args.events, args.rate)
                    results[mode].append(cpu)
                    print(f"round {r + 1} {mode}: {cpu:.0f} µs/event", file=sys.stderr)
        finally:
            redis.stop()
    load = os.getloadavg()
    lines = [
        f"`python benchmarks/tail_follow.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f" — redis {redis_version()}, {args.events:,} events at {args.rate:g} ev/s, "
        f"{args.rounds} rounds, load average {load[0]:.2f}",
        "",
        "| mode | follower CPU µs/event, median | min–max | rounds |",
        "|---|--:|--:|--:|",
    ]
    for mode, values in results.items():
        lines.append(
            f"| {mode} | {statistics.median(values):.0f} | {min(values):.0f}–{max(values):.0f} "
            f"| {', '.join(f'{v:.0f}' for v in values)} |"
        )
    if "redis-py" in results and "hiredis" in results:
        ratios = [h / r for h, r in zip(results["hiredis"], results["redis-py"], strict=True)]
        lines += [
            "",
            f"hiredis ÷ redis-py, per round: {', '.join(f'{x:.2f}' for x in ratios)} "
            f"(median {statistics.median(ratios):.2f})",
        ]
    report = "\n".join(lines) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    out = args.out_dir / f"tail-follow-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
