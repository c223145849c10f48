"""How many appends per second one Redis takes through ``RedisLog.append`` (issue 9's log).

Starts a fresh ``redis-server`` (loopback, free port, temp dir, ``appendonly yes``, fsync
``--fsync``, everysec by default) for each mode, then appends ``--events`` payloads of
``--payload-bytes`` from this one Python process:

* ``sequential`` -- one ``await log.append()`` after another (one publisher's path);
* ``concurrent`` -- ``--concurrency`` tasks appending at once (several publishers, or nodes);
* ``batched`` -- one task, ``--batch`` payloads per ``RedisLog.append_many`` call (one script
  call each, as the bus's appender sends what its publishers queued meanwhile).

Reports appends/s, the client's (this process's) CPU µs per append and redis-server's CPU µs
per append (psutil on its pid), so the capacity model can tell which side saturates first.

    python benchmarks/redis_appends.py                      # 20,000 appends, everysec
    python benchmarks/redis_appends.py --fsync always --events 5000
    python benchmarks/redis_appends.py --batch 64,512         # the batched mode's sizes

Writes ``benchmarks/results/redis-appends-<timestamp>.json`` and prints a markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from fanout import HERE, box_busy_seconds, cpu_seconds, redis_version

from gathering_lab.backends import open_log
from gathering_lab.testing import RedisServer


async def run_mode(
    url: str, redis_ps: Any, events: int, concurrency: int, payload: bytes, batch: int = 1
) -> dict[str, Any]:
    """Append ``events`` payloads with ``concurrency`` tasks, ``batch`` per call; the figures."""
    log = open_log(url, max_connections=max(16, concurrency))
    await log.connect()
    try:
        for _ in range(200):  # warm up: scripts loaded, pool filled
            await log.append(payload)
        per_task = events // concurrency // batch * batch
        payloads = [payload] * batch

        async def worker() -> None:
            for _ in range(per_task // batch):
                if batch == 1:
                    await log.append(payload)
                else:
                    await log.append_many(payloads)

        box0, r0 = box_busy_seconds(), cpu_seconds([redis_ps])
        c0, t0 = time.process_time(), time.perf_counter()
        async with asyncio.timeout(300):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        c1, r1, box1 = time.process_time(), cpu_seconds([redis_ps]), box_busy_seconds()
    finally:
        await log.close()
    done = per_task * concurrency
    return {
        "concurrency": concurrency,
        "batch": batch,
        "appends": done,
        "wall_s": wall,
        "appends_per_s": done / wall,
        "client_us_per_append": 1e6 * (c1 - c0) / done,
        "redis_us_per_append": 1e6 * (r1 - r0) / done,
        "redis_cpu_pct": 100 * (r1 - r0) / wall,
        "other_cpu_pct": max(0.0, 100 * ((box1 - box0) - (c1 - c0) - (r1 - r0)) / wall),
    }


def main(argv: list[str] | None = None) -> int:
    """Run both modes (fresh Redis each), print and save the table."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--payload-bytes", type=int, default=300)
    p.add_argument("--fsync", default="everysec", choices=("everysec", "always", "no"))
    p.add_argument("--batch", default="64,512", help="batched mode: payloads per call")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    payload = json.dumps({"type": "bench", "data": {"x": "y" * args.payload_bytes}}).encode()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    rows = []
    modes = [(1, 1), (args.concurrency, 1)]
    modes += [(1, int(b)) for b in str(args.batch).split(",") if b.strip()]
    for concurrency, batch in modes:
        with tempfile.TemporaryDirectory(prefix="redis-appends-") as tmp:
            redis = RedisServer(Path(tmp), appendfsync=args.fsync)
            redis.start()
            try:
                assert redis.process is not None
                ps = psutil.Process(redis.process.pid)
                result = run_mode(redis.url, ps, args.events, concurrency, payload, batch)
                rows.append(asyncio.run(result))
            finally:
                redis.stop()
    load = os.getloadavg()
    lines = [
        f"`python benchmarks/redis_appends.py {' '.join(sys.argv[1:] if argv is None else argv)}`"
        f" — redis {redis_version()}, appendfsync {args.fsync}, payload {len(payload)} B, "
        f"load average {load[0]:.2f}",
        "",
        "| tasks | per call | appends | appends/s | client CPU µs/append | Redis CPU µs/append "
        "| Redis CPU % | other CPU % |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['batch']} | {r['appends']:,} | {r['appends_per_s']:,.0f} "
            f"| {r['client_us_per_append']:.1f} | {r['redis_us_per_append']:.1f} "
            f"| {r['redis_cpu_pct']:.0f} | {r['other_cpu_pct']:.0f} |"
        )
    report = "\n".join(lines) + "\n"
    out = args.out_dir / f"redis-appends-{stamp}.json"
    out.write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2, default=str))
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
