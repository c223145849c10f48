"""Replay throughput and recording overhead (issue 10, item 2).

    PYTHONPATH=. python benchmarks/record_replay.py [--events 20000]

1. Replay: a Parquet recording of the seeded demo story published with
   ``--as-fast-as-possible`` into a ``gathering-lab serve --publish-rate 0`` subprocess.
2. Recording, writer only: rows/s ``Recorder.write`` takes (Parquet, JSON lines): the
   ceiling the writing side puts on a recorder.
3. Recording, end to end: a ``record`` client (LabClient + Parquet) and a plain LabClient
   (frame only) receive the same replay; events/s each kept up with.
Loopback only; the server runs in its own process.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gathering_lab.client import LabClient
from gathering_lab.record import Recorder, record, write_demo_recording
from gathering_lab.replay import replay
from gathering_lab.traffic import demo_messages


def start_server() -> tuple[subprocess.Popen[str], str]:
    process = subprocess.Popen(
        [sys.executable, "-m", "gathering_lab", "serve", "--port", "0", "--publish-rate", "0"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        match = re.search(r"WebSocket\s+(ws://\S+)", line)
        if match:
            return process, match.group(1)
    process.kill()
    raise SystemExit("the server did not start")


def writer_rate(path: Path, count: int) -> float:
    messages = [
        {**p, "event_id": f"evt_{i:012x}", "seq": i, "epoch": "e", "timestamp": None}
        for i, p in enumerate(demo_messages(count), 1)
    ]
    started = time.perf_counter()
    with Recorder(path, overwrite=True) as recorder:
        now = time.time()
        for message in messages:
            recorder.write(message, now)
    return count / (time.perf_counter() - started)


async def end_to_end(url: str, trace: Path, out: Path, count: int) -> tuple[float, float, float]:
    plain = LabClient(url, "plain", max_rows=count + 10)
    await plain.connect()
    recording = asyncio.create_task(record(url, out, count=count, overwrite=True))
    while not recording.done():
        stats = await plain.fetch_stats()
        if stats["active_connections"] >= 2:
            break
        await asyncio.sleep(0.05)
    result = await replay(trace, url, speed=None, progress=False)
    started = time.monotonic() - result.elapsed
    await plain.wait_for_events(count, timeout=120)
    plain_rate = count / (time.monotonic() - started)
    recorded = await recording
    record_rate = count / (time.monotonic() - started)
    await plain.close()
    assert recorded.events == count
    return result.rate, plain_rate, record_rate


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    args = parser.parse_args()
    count = args.events
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        trace = write_demo_recording(folder / "trace.parquet", count, rate=1000.0)
        for suffix in ("parquet", "jsonl"):
            rate = writer_rate(folder / f"writer.{suffix}", count)
            print(f"Recorder.write ({suffix}): {rate:,.0f} rows/s")
        process, url = start_server()
        try:
            result = await replay(trace, url, speed=None, progress=False)
            print(
                f"replay --as-fast-as-possible, Parquet -> server (--publish-rate 0): "
                f"{result.rate:,.0f} events/s ({result.published} in {result.elapsed:.2f} s, "
                f"{result.retried} retried)"
            )
            replay_rate, plain_rate, record_rate = await end_to_end(
                url, trace, folder / "rec.parquet", count
            )
            print(f"replay with two receivers: {replay_rate:,.0f} events/s published")
            print(f"  plain LabClient kept up with {plain_rate:,.0f} events/s")
            print(f"  recording LabClient (Parquet) kept up with {record_rate:,.0f} events/s")
        finally:
            process.terminate()
            process.wait(10)


if __name__ == "__main__":
    asyncio.run(main())
