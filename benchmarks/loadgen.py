"""Lean load generator for the fan-out benchmark: thin WebSocket subscribers plus one publisher.

The generator itself now lives in the package, :mod:`gathering_lab.load` (``gathering-lab
load``, ``gl.load_test``): raw :class:`asyncio.Protocol` subscribers that do the HTTP upgrade
themselves, parse server frames minimally, answer pings and closes, pull ``load_seq`` and
``load_sent_ns`` out of each event with one regex (no ``json.loads``), timestamp a whole TCP
chunk with one clock read, and optionally (``deflate=True``) inflate permessage-deflate
messages; and a ``websockets`` publisher that drains what it is sent. This module keeps the
small API ``fanout.py`` uses (``LoadState``, ``connect_subscribers``, ``Publisher.open(host,
port, ...)``, ``summarize``) on top of it.

Latency is ``receive wall clock - sent_ns`` (same machine, same clock). Per subscriber, a
``bytearray`` of K flags counts duplicates; a running max counts out-of-order deliveries.

Standalone use against a server that is already running (no server-side metrics)::

    python benchmarks/loadgen.py --port 8000 --subscribers 100 --events 1000 --rate 200
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import time
from typing import Any

from gathering_lab import load
from gathering_lab.load import (  # noqa: F401 - re-exported for the benchmarks
    EVENT_RE,
    Swarm,
    Target,
    ThinSubscriber,
    client_frame,
    mask_bytes,
    payload_template,
    percentile,
)

WS_PATH = "/ws/dashboard"
PROBE_FIRST_INDEX = 1_000_000


def LoadState(events: int, subscribers: int, deflate: bool = False) -> Swarm:  # noqa: N802
    """The shared state of one run's subscribers (``subscribers`` grows as they connect)."""
    del subscribers  # counted by connect_subscribers, so all_finished fires at the right count
    return Swarm(Target.parse(f"ws://127.0.0.1:1{WS_PATH}"), events, deflate=deflate)


async def connect_subscribers(
    state: Swarm,
    host: str,
    port: int,
    count: int,
    *,
    first_index: int = 0,
    concurrency: int = 50,
    timeout: float = 60.0,
) -> list[ThinSubscriber]:
    """Open ``count`` thin subscribers to ``host:port``; see :func:`load.connect_swarm`.

    Called once per node with the same ``state`` (and ``first_index`` past the previous
    call's), it spreads one run's subscribers over several nodes, counted together.
    """
    state.target = Target.parse(f"ws://{host}:{port}{WS_PATH}")
    state.client_prefix = "bench-sub"
    return await load.connect_swarm(
        state, count, first_index=first_index, concurrency=concurrency, timeout=timeout
    )


class Publisher(load.Publisher):
    """The package's publisher, opened by host and port as ``fanout.py`` does."""

    @classmethod
    async def open(  # type: ignore[override]
        cls, host: str, port: int, events: int, *, deflate: bool = False, timeout: float = 20.0
    ) -> Publisher:
        """Connect as ``bench-publisher``, wait for ``connection.established``, drain."""
        pub = await load.Publisher.open(
            f"ws://{host}:{port}{WS_PATH}",
            events,
            client_id="bench-publisher",
            deflate=deflate,
            timeout=timeout,
        )
        pub.__class__ = cls
        return pub  # type: ignore[return-value]


class PolledReader:
    """Reads the load subscribers' sockets every ``interval`` seconds, not on each arrival.

    On one box the server's write to a client whose process sleeps in ``epoll_wait`` pays
    that client's wake-up (on this VM an inter-processor interrupt), and the load generator
    pays one event-loop callback per TCP segment: at M=1000 and 200 ev/s it needs a whole
    core. Dashboards on other machines cost the server neither. With a reader, the load
    subscribers' sockets leave the event loop (``pause_reading``) and one task reads every
    ready socket each ``interval`` from an epoll of its own, so a read brings several events
    and nothing on the box waits on these sockets. Every byte is still parsed and every
    event counted; the latency these subscribers measure includes up to ``interval``, so
    latency is read from the probes (``fanout.py --probes``).
    """

    def __init__(self, subscribers: list[ThinSubscriber], interval: float) -> None:
        if interval <= 0:
            raise ValueError(f"interval must be > 0, not {interval!r}")
        self.interval = interval
        self.epoll = select.epoll()
        self.by_fd: dict[int, ThinSubscriber] = {}
        for sub in subscribers:
            transport = sub.transport
            if transport is None or transport.is_closing() or sub.closed:
                continue
            transport.pause_reading()
            fd = transport.get_extra_info("socket").fileno()
            self.epoll.register(fd, select.EPOLLIN | select.EPOLLRDHUP)
            self.by_fd[fd] = sub
        self.task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        read, poll, by_fd = os.read, self.epoll.poll, self.by_fd
        while by_fd:
            await asyncio.sleep(self.interval)
            for fd, _ in poll(0, len(by_fd) + 1):
                sub = by_fd[fd]
                try:
                    data = read(fd, 1 << 18)
                except BlockingIOError:
                    continue
                except OSError as exc:
                    self._drop(fd)
                    sub.connection_lost(exc)
                    continue
                if data:
                    sub.data_received(data)
                if not data or sub.closed:
                    self._drop(fd)
                    if not data:
                        sub.connection_lost(None)

    def _drop(self, fd: int) -> None:
        self.epoll.unregister(fd)
        del self.by_fd[fd]

    async def stop(self) -> None:
        """Stop reading (the sockets stay open; close the subscribers afterwards)."""
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)
        self.epoll.close()


# --------------------------------------------------------------------------------------------
# Summaries


def summarize(state: Swarm, subscribers: list[ThinSubscriber], pub: Publisher) -> dict[str, Any]:
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


async def run_probe(args: argparse.Namespace) -> dict[str, Any]:
    """Latency probe: a few subscribers in their own process, spread over ``--ports``.

    ``fanout.py`` runs one beside its load generator, which at M=1000 is itself CPU-bound
    (its receive backlog is most of the latency it measures); the probe's few clients see
    the server's latency as a dashboard on another machine would. Prints ``ready`` once
    connected, then one JSON line when every probe has all ``--events`` (or at the timeout).
    """
    ports = [int(p) for p in args.ports.split(",")]
    state = LoadState(events=args.events, subscribers=args.subscribers)
    subs: list[ThinSubscriber] = []
    first = PROBE_FIRST_INDEX  # client ids bench-sub-1000000...: none of the load's
    for i, port in enumerate(ports):
        count = args.subscribers // len(ports) + (i < args.subscribers % len(ports))
        subs += await connect_subscribers(state, args.host, port, count, first_index=first)
        first += count
    print("ready", flush=True)
    try:
        async with asyncio.timeout(args.timeout):
            await state.all_finished.wait()
    except TimeoutError:
        state.error("probe: timed out waiting for the last event")
    lat = sorted(state.latencies_ns)
    result = {
        "subscribers": state.subscribers,
        "received": sum(s.received for s in subs),
        "duplicates": sum(s.duplicates for s in subs),
        "out_of_order": sum(s.out_of_order for s in subs),
        "connect_failed": state.failed,
        "errors": list(state.errors),
        "p50_ms": percentile(lat, 0.50) / 1e6,
        "p99_ms": percentile(lat, 0.99) / 1e6,
    }
    for sub in subs:
        sub.close()
    return result


def main() -> None:
    """Command-line entry point for standalone runs."""
    parser = argparse.ArgumentParser(description="fan-out load generator (no server metrics)")
    parser.add_argument("--host", default="127.0.0.1", choices=("127.0.0.1",))
    parser.add_argument("--port", type=int, help="the server's port (not with --probe)")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument("--rate", type=float, default=0.0, help="events/s; 0 = full speed")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--deflate", action="store_true", help="offer permessage-deflate")
    parser.add_argument(
        "--probe", action="store_true", help="only subscribe (fanout.py's latency probe)"
    )
    parser.add_argument("--ports", help="with --probe: the nodes' ports, comma-separated")
    args = parser.parse_args()
    if (args.port is None) == (args.ports is None) or args.probe != (args.ports is not None):
        parser.error("give --port, or --probe with --ports")
    if args.probe:
        print(json.dumps(asyncio.run(run_probe(args))), flush=True)
        return
    result = asyncio.run(run_standalone(args))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
