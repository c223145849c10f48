"""EventFrame micro-benchmark: ingest rate, materialisation, memory, and the naive pattern.

Usage::

    python benchmarks/frame_bench.py            # 1,000,000 events, 5 repetitions (~2-3 min)
    python benchmarks/frame_bench.py --quick    # 100,000 events, 3 repetitions (~20 s)

Messages are built like the client builds them: ``json.loads`` of demo-like wire frames
(agent / task / circle / memory / conversation events with small data dicts), so every
message is a fresh dict with fresh strings, as it would be off the socket.

Each repetition: append N messages one by one (``received_at`` = now, as the client does),
extend another frame with the same messages in batches of 1,000, build ``.df`` of the first
frame cold, then the naive pattern (``df = pd.concat([df, one_row_df])`` per event) on 2,000
messages and EventFrame ``append`` on the same 2,000 — interleaved, so their ratio compares
like with like. Tables show the median of the repetitions and the range. Memory is measured
once with tracemalloc (deterministic). Raw numbers go to ``benchmarks/results/frame-*.json``.

Targets: ingest >= 200,000 events/s; ``.df`` of 1,000,000 events < 2 s; < 1 KiB retained per
stored event.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
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


def ingest(batch: list[dict[str, Any]]) -> tuple[EventFrame, float, float]:
    """Seconds per event for ``append`` one by one and for ``extend`` in batches of 1,000."""
    frame = EventFrame(client_id="bench")
    append = frame.append
    start = time.perf_counter()
    for message in batch:
        append(message)
    per_append = (time.perf_counter() - start) / len(batch)

    other = EventFrame(client_id="bench")
    start = time.perf_counter()
    for i in range(0, len(batch), 1000):
        other.extend(batch[i : i + 1000])
    per_extend = (time.perf_counter() - start) / len(batch)
    return frame, per_append, per_extend


def materialise(frame: EventFrame) -> tuple[float, float, float, float]:
    """Cold ``.df`` (wall and CPU seconds), cached ``.df`` and ``tail(100)`` (wall seconds)."""
    frame.append(json.loads(wire_frames(1, seed=99)[0]))  # invalidates any cache
    start, start_cpu = time.perf_counter(), time.process_time()
    df = frame.df
    wall, cpu = time.perf_counter() - start, time.process_time() - start_cpu
    assert len(df) == len(frame)
    start = time.perf_counter()
    frame.df  # noqa: B018
    warm = time.perf_counter() - start
    start = time.perf_counter()
    frame.tail(100)
    tail = time.perf_counter() - start
    return wall, cpu, warm, tail


def naive(batch: list[dict[str, Any]]) -> float:
    """Seconds per event for ``df = pd.concat([df, one_row_df])`` (the pattern to avoid)."""

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


def append_only(batch: list[dict[str, Any]]) -> float:
    """Seconds per event for EventFrame ``append`` on the naive pattern's messages."""
    frame = EventFrame(client_id="bench")
    start = time.perf_counter()
    for message in batch:
        frame.append(message)
    return (time.perf_counter() - start) / len(batch)


def memory(frames: list[str]) -> tuple[float, float]:
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


# -- environment ----------------------------------------------------------------------------


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
        f"{os.cpu_count()} CPUs, {model}, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}, pandas {pd.__version__}, numpy {np.__version__}"
        f"{arrow}"
    )


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "gathering_lab/frame.py", __file__],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return f"{head or 'unknown'}{' + uncommitted frame changes' if dirty else ''}"


def busy_seconds() -> float | None:
    """CPU seconds the whole machine spent busy so far (from /proc/stat), or None."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except (OSError, IndexError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


# -- report ---------------------------------------------------------------------------------


def spread(values: list[float], scale: float = 1.0, fmt: str = ",.0f") -> str:
    """``median (min–max)`` of ``values`` times ``scale``."""
    scaled = [value * scale for value in values]
    return f"{statistics.median(scaled):{fmt}} ({min(scaled):{fmt}}–{max(scaled):{fmt}})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100,000 events, 3 repetitions")
    parser.add_argument("--events", type=int, help="events per repetition (overrides --quick)")
    parser.add_argument("--reps", type=int, help="repetitions (default 5, --quick 3)")
    parser.add_argument("--no-save", action="store_true", help="do not write benchmarks/results")
    args = parser.parse_args(argv)
    count = args.events or (100_000 if args.quick else 1_000_000)
    reps = args.reps or (3 if args.quick else 5)
    naive_count = 500 if args.quick else 2_000
    memory_count = min(count, 200_000)
    command = "python benchmarks/frame_bench.py" + "".join(
        f" {arg}" for arg in (sys.argv[1:] if argv is None else argv)
    )

    started = time.strftime("%Y-%m-%d %H:%M")
    load_start = os.getloadavg()
    print(f"machine: {machine()}")
    print("load average at start: {:.2f} {:.2f} {:.2f}".format(*load_start), flush=True)
    frames = wire_frames(count)
    batch = list(messages(frames))
    small = list(messages(frames[:naive_count]))

    wall0, busy0, own0 = time.perf_counter(), busy_seconds(), time.process_time()
    raw: dict[str, list[float]] = {
        key: []
        for key in (
            "append_s",
            "extend_s",
            "df_wall_s",
            "df_cpu_s",
            "df_cached_s",
            "tail100_s",
            "naive_s",
            "append_small_s",
        )
    }
    for rep in range(reps):
        frame, per_append, per_extend = ingest(batch)
        raw["append_s"].append(per_append)
        raw["extend_s"].append(per_extend)
        for key, value in zip(
            ("df_wall_s", "df_cpu_s", "df_cached_s", "tail100_s"), materialise(frame), strict=True
        ):
            raw[key].append(value)
        del frame
        gc.collect()
        if rep % 2:  # alternate the order of the pair
            raw["append_small_s"].append(append_only(small))
            raw["naive_s"].append(naive(small))
        else:
            raw["naive_s"].append(naive(small))
            raw["append_small_s"].append(append_only(small))
        print(f"  repetition {rep + 1}/{reps} done", flush=True)
    wall = time.perf_counter() - wall0
    busy1, own1 = busy_seconds(), time.process_time()
    other = (
        None
        if busy0 is None or busy1 is None
        else max(0.0, (busy1 - busy0) - (own1 - own0)) / wall * 100
    )
    per_event_memory, data_memory = memory(frames[:memory_count])
    load_end = os.getloadavg()

    median = statistics.median
    append_rate = 1 / median(raw["append_s"])
    df_wall = median(raw["df_wall_s"])
    ratios_small = [n / a for n, a in zip(raw["naive_s"], raw["append_small_s"], strict=True)]
    full_size = count >= 1_000_000  # the .df target is for 1,000,000 events

    def status(ok: bool) -> str:
        return "PASS" if ok else "MISSED"

    rows = [
        (
            "ingest, `append()` one by one",
            f"{spread([1 / v for v in raw['append_s']])} events/s",
            f">= {INGEST_TARGET:,}/s",
            status(append_rate >= INGEST_TARGET),
        ),
        (
            "… per event",
            f"{spread(raw['append_s'], 1e6, '.2f')} µs",
            "",
            "",
        ),
        (
            "ingest, `extend()` in batches of 1,000",
            f"{spread([1 / v for v in raw['extend_s']])} events/s",
            "",
            "",
        ),
        (
            f"`.df` of {count:,} events, cold",
            f"{spread(raw['df_wall_s'], 1, '.3f')} s wall; "
            f"{spread(raw['df_cpu_s'], 1, '.3f')} s CPU",
            f"< {DF_TARGET:g} s at 1,000,000",
            status(df_wall < DF_TARGET) if full_size else "n/a",
        ),
        (
            f"`.df` again, cached ({count:,})",
            f"{spread(raw['df_cached_s'], 1e3, '.2f')} ms",
            "",
            "",
        ),
        (f"`tail(100)` of {count:,}", f"{spread(raw['tail100_s'], 1e3, '.2f')} ms", "", ""),
        (
            f"memory per stored event (tracemalloc, {memory_count:,} events)",
            f"{per_event_memory:,.0f} B",
            f"< {MEMORY_TARGET:,} B",
            status(per_event_memory < MEMORY_TARGET),
        ),
        ("… of which the `data` dicts themselves", f"{data_memory:,.0f} B", "", ""),
        (
            f"naive `pd.concat` per event ({naive_count:,} events)",
            f"{spread(raw['naive_s'], 1e6)} µs",
            "",
            "",
        ),
        (
            f"EventFrame `append()` on the same {naive_count:,}",
            f"{spread(raw['append_small_s'], 1e6, '.2f')} µs",
            "",
            "",
        ),
        ("naive ÷ EventFrame `append()`, same run", f"{spread(ratios_small)}×", "", ""),
        (
            f"naive ÷ EventFrame (`append()` + one `.df`), at {count:,}",
            f"{median(raw['naive_s']) / (median(raw['append_s']) + df_wall / count):,.0f}×",
            "",
            "",
        ),
    ]
    lines = [
        f"#### Run of {started} (git {git_revision()})",
        "",
        f"`{command}`",
        "",
        f"Machine: {machine()}; load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end"
        + ("" if other is None else f"; other processes used {other:.0f}% of one core")
        + f". {count:,} events × {reps} repetitions (median, with min–max).",
        "",
        "| measure | result | target | |",
        "|---|---|---|---|",
        *("| " + " | ".join(cells) + " |" for cells in rows),
        "",
        f"The naive cost per event grows with the frame (each concat copies it): the figure at "
        f"{naive_count:,} events understates it at {count:,}.",
    ]
    report = "\n".join(lines)
    print()
    print(report)

    if not args.no_save:
        results = Path(__file__).resolve().parent / "results"
        results.mkdir(exist_ok=True)
        stem = results / time.strftime("frame-%Y%m%d-%H%M%S")
        stem.with_suffix(".md").write_text(report + "\n", encoding="utf-8")
        stem.with_suffix(".json").write_text(
            json.dumps(
                {
                    "command": command,
                    "machine": machine(),
                    "git": git_revision(),
                    "events": count,
                    "repetitions": reps,
                    "naive_events": naive_count,
                    "memory_events": memory_count,
                    "load_average_start": load_start,
                    "load_average_end": load_end,
                    "other_cpu_percent": other,
                    "memory_bytes_per_event": per_event_memory,
                    "data_dict_bytes_per_event": data_memory,
                    "raw": raw,
                },
                indent=2,
            ),
            encoding="utf-8",
        )
        print(f"\nsaved {stem}.md and .json")
    return 0 if all(cells[3] != "MISSED" for cells in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
