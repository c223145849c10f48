"""EventFrame micro-benchmark: ingest rate, materialisation, memory, and the naive pattern.

Usage::

    python benchmarks/frame_bench.py            # 1,000,000 events (about a minute)
    python benchmarks/frame_bench.py --quick    # 100,000 events (a few seconds)

Messages are built like the client builds them: ``json.loads`` of demo-like wire frames
(agent / task / circle / memory / conversation events with small data dicts), so every
message is a fresh dict with fresh strings, as it would be off the socket.

Targets: ingest >= 200,000 events/s; ``.df`` of 1,000,000 events < 2 s; < 1 KiB retained per
stored event. The naive pattern (``pd.concat`` of a one-row DataFrame per event) runs on
2,000 events in the same run and is quoted per event and as a ratio.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from gathering_lab.frame import EventFrame  # noqa: E402

INGEST_TARGET = 200_000  # events/s
DF_TARGET = 2.0  # seconds for 1,000,000 events
MEMORY_TARGET = 1024  # bytes per stored event

_WORDS = "plan review deploy index refactor summarise triage research draft test".split()


def _payload(rng: random.Random, kind: str, seq: int) -> dict[str, Any]:
    agent = rng.randint(1, 12)
    task = rng.randint(1, 5000)
    if kind.startswith("agent.tool"):
        return {"agent_id": agent, "tool": rng.choice(_WORDS), "duration_ms": rng.random() * 50}
    if kind.startswith("agent."):
        return {"agent_id": agent, "name": f"agent-{agent}", "task_id": task}
    if kind.startswith("task."):
        return {
            "task_id": task,
            "title": f"{rng.choice(_WORDS)} {task}",
            "priority": rng.choice(["low", "normal", "high"]),
            "assignee": agent,
        }
    if kind.startswith("circle."):
        return {"circle_id": rng.randint(1, 4), "agent_id": agent, "role": "member"}
    if kind.startswith("memory."):
        return {"memory_id": seq, "agent_id": agent, "kind": "fact", "tags": ["demo"]}
    return {"agent_id": agent, "turn": seq % 40, "content": " ".join(rng.sample(_WORDS, 6))}


_TYPES = [
    "agent.started",
    "agent.stopped",
    "agent.task.assigned",
    "agent.task.completed",
    "agent.tool.executed",
    "task.created",
    "task.assigned",
    "task.started",
    "task.completed",
    "circle.member.added",
    "memory.created",
    "conversation.message",
]


def wire_frames(count: int, seed: int = 7) -> list[str]:
    """``count`` demo-like event frames, as JSON text (what the server sends)."""
    rng = random.Random(seed)
    base = time.time() - 60.0
    frames = []
    for seq in range(1, count + 1):
        kind = rng.choice(_TYPES)
        moment = base + seq * 1e-5
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(moment))
        stamp += f".{int(moment % 1 * 1e6):06d}Z"
        frames.append(
            json.dumps(
                {
                    "type": kind,
                    "data": _payload(rng, kind, seq),
                    "source_agent_id": rng.randint(1, 12),
                    "circle_id": rng.choice([None, 1, 2, 3]),
                    "project_id": rng.choice([None, 1, 2]),
                    "event_id": f"evt_{rng.getrandbits(96):024x}",
                    "timestamp": stamp,
                    "seq": seq,
                    "epoch": "3f9c2a71",
                }
            )
        )
    return frames


def messages(frames: list[str]) -> Iterator[dict[str, Any]]:
    for text in frames:
        yield json.loads(text)


def bench_ingest(frames: list[str], repeats: int = 3) -> tuple[EventFrame, float, float]:
    """Best-of-``repeats`` rates: one ``append`` per message (received_at=now), and ``extend``
    in batches of 1,000. Returns the last appended frame too."""
    batch = list(messages(frames))
    append_rates, extend_rates = [], []
    frame = EventFrame()
    for _ in range(repeats):
        del frame
        gc.collect()
        frame = EventFrame(client_id="bench")
        append = frame.append
        start = time.perf_counter()
        for message in batch:
            append(message)
        append_rates.append(len(batch) / (time.perf_counter() - start))

        other = EventFrame(client_id="bench")
        start = time.perf_counter()
        for i in range(0, len(batch), 1000):
            other.extend(batch[i : i + 1000])
        extend_rates.append(len(batch) / (time.perf_counter() - start))
        del other
    del batch
    gc.collect()
    return frame, max(append_rates), max(extend_rates)


def bench_df(frame: EventFrame, repeats: int = 3) -> tuple[float, float, float, float]:
    """Cold ``.df`` (best of ``repeats``, each after an append; wall and CPU seconds),
    cached ``.df``, ``tail(100)``."""
    extra = json.loads(wire_frames(1, seed=99)[0])
    walls, cpus = [], []
    for _ in range(repeats):
        frame.append(extra)  # invalidates the cache
        start, start_cpu = time.perf_counter(), time.process_time()
        df = frame.df
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - start_cpu)
    assert len(df) == len(frame)
    start = time.perf_counter()
    frame.df  # noqa: B018
    warm = time.perf_counter() - start
    start = time.perf_counter()
    frame.tail(100)
    tail = time.perf_counter() - start
    return min(walls), min(cpus), warm, tail


def bench_memory(frames: list[str]) -> tuple[float, float]:
    """Bytes retained per stored event (tracemalloc), messages decoded one at a time; and the
    part of it that is the ``data`` dicts themselves (kept by reference)."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    frame = EventFrame(client_id="bench")
    for message in messages(frames):
        frame.append(message)
    gc.collect()
    total = tracemalloc.get_traced_memory()[0] - before
    assert len(frame) == len(frames)
    del frame
    gc.collect()
    before = tracemalloc.get_traced_memory()[0]
    payloads = [message["data"] for message in messages(frames)]
    gc.collect()
    data_only = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    del payloads
    return total / len(frames), data_only / len(frames)


def bench_naive(frames: list[str]) -> float:
    """Seconds per event for ``df = pd.concat([df, one_row_df])`` (the pattern to avoid)."""
    batch = list(messages(frames))

    def row(message: dict[str, Any]) -> pd.DataFrame:
        received = time.time()
        stamp = pd.Timestamp(message["timestamp"])
        return pd.DataFrame(
            [
                {
                    "received_at": pd.Timestamp(received, unit="s", tz="UTC"),
                    "type": message["type"],
                    "event_id": message.get("event_id"),
                    "seq": message.get("seq"),
                    "epoch": message.get("epoch"),
                    "timestamp": stamp,
                    "source_agent_id": message.get("source_agent_id"),
                    "circle_id": message.get("circle_id"),
                    "project_id": message.get("project_id"),
                    "data": message.get("data"),
                    "latency_ms": (received - stamp.timestamp()) * 1e3,
                    "client_id": "bench",
                }
            ]
        )

    start = time.perf_counter()
    df = row(batch[0])
    for message in batch[1:]:
        df = pd.concat([df, row(message)], ignore_index=True)
    elapsed = time.perf_counter() - start
    assert len(df) == len(batch)
    return elapsed / len(batch)


def machine() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import pyarrow

        arrow = f", pyarrow {pyarrow.__version__}"
    except ImportError:
        arrow = ""
    return (
        f"{os.cpu_count()} CPUs ({model}), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, pandas {pd.__version__}, numpy {np.__version__}"
        f"{arrow}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 events instead of 1,000,000")
    parser.add_argument("--events", type=int, help="number of events (overrides --quick)")
    args = parser.parse_args(argv)
    count = args.events or (100_000 if args.quick else 1_000_000)
    memory_count = min(count, 200_000)
    naive_count = 2_000

    print(f"machine: {machine()}")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(f"generating {count:,} demo-like wire frames...", flush=True)
    frames = wire_frames(count)

    frame, append_rate, extend_rate = bench_ingest(frames)
    cold, cold_cpu, warm, tail = bench_df(frame)
    del frame
    gc.collect()
    per_event_memory, data_memory = bench_memory(frames[:memory_count])
    naive = bench_naive(frames[:naive_count])

    append_cost = 1 / append_rate
    amortised = append_cost + cold / count  # append, plus one full .df at the end
    full_size = count >= 1_000_000  # the .df target is for 1,000,000 events

    def status(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    rows = [
        (
            "ingest, `append()` per message (best of 3)",
            f"{append_rate:,.0f} events/s ({append_cost * 1e6:.2f} µs/event)",
            f">= {INGEST_TARGET:,}/s",
            status(append_rate >= INGEST_TARGET),
        ),
        (
            "ingest, `extend()` batches of 1,000 (best of 3)",
            f"{extend_rate:,.0f} events/s",
            "",
            "",
        ),
        (
            f"`.df` of {count:,} events (cold, best of 3)",
            f"{cold:.3f} s wall ({cold_cpu:.3f} s CPU)",
            f"< {DF_TARGET:g} s at 1,000,000",
            status(cold < DF_TARGET) if full_size else "n/a",
        ),
        (f"`.df` again (cached, {count:,})", f"{warm * 1e3:.2f} ms", "", ""),
        (f"`tail(100)` of {count:,}", f"{tail * 1e3:.2f} ms", "", ""),
        (
            f"memory per stored event (tracemalloc, {memory_count:,} events)",
            f"{per_event_memory:,.0f} B",
            f"< {MEMORY_TARGET} B",
            status(per_event_memory < MEMORY_TARGET),
        ),
        (
            "… of which the `data` dicts themselves",
            f"{data_memory:,.0f} B",
            "",
            "",
        ),
        (
            f"naive `pd.concat` per event ({naive_count:,} events)",
            f"{naive * 1e6:,.0f} µs/event",
            "",
            "",
        ),
        (
            "naive ÷ EventFrame `append()`",
            f"{naive / append_cost:,.0f}×",
            "",
            "",
        ),
        (
            "naive ÷ EventFrame (`append()` + one `.df` at the end)",
            f"{naive / amortised:,.0f}×",
            "",
            "",
        ),
    ]
    print()
    print("| measure | result | target | |")
    print("|---|---|---|---|")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")
    print()
    print("load average at end: {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()))
    print(
        f"note: the naive cost grows with the frame (each concat copies it), so its per-event "
        f"figure at {naive_count:,} events understates it at {count:,}."
    )
    return 0 if all(cells[3] != "MISSED" for cells in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
