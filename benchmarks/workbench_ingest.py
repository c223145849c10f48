"""Does an open workbench slow the kernel down? Events/s a client ingests with and without it.

Starts a real IPython kernel (jupyter_client) with a lab and a ``probe`` client, then times
bursts of N events published on the lab's bus until the probe has received them all, in
three conditions, interleaved, ``--reps`` times each:

- ``alone``: the lab and the probe only;
- ``client``: one more plain client connected (what the workbench's own client costs);
- ``workbench``: ``gl.workbench(lab)`` open (its client, the chart and the grid redrawn by
  the ticker; their comm messages go out on the kernel's iopub socket as with a browser).

It prints the median events/s per condition and the chart's and grid's updates per burst.

Usage: python benchmarks/workbench_ingest.py [--events 10000] [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import textwrap
from typing import Any

from jupyter_client.manager import AsyncKernelManager

SETUP = textwrap.dedent(
    """
    import asyncio, json, time
    import gathering_lab as gl
    lab = gl.start(port=0)
    await lab.wait_started()
    probe = await lab.connect("probe")
    KINDS = ("task.created", "agent.started", "memory.created")

    async def burst(n):
        target = probe.events_received + n
        t0 = time.perf_counter()
        for i in range(n):
            lab.publish(KINDS[i % 3], {"i": i}, circle_id=i % 3)
            if i % 200 == 199:
                await asyncio.sleep(0)
        await probe.wait_for_events(target, timeout=120)
        return n / (time.perf_counter() - t0)

    async def measure(condition, n):
        extra, updates = None, {}
        if condition == "client":
            extra = await lab.connect("other")
        elif condition == "workbench":
            extra = gl.workbench(lab)
            from gathering_lab.testing import wait_for
            await wait_for(lambda: extra.connect_panel.status == "connected")
            before = (extra.chart.updates, extra.grid.updates)
        rate = await burst(n)
        if condition == "workbench":
            await asyncio.sleep(1.2)  # the chart's last second completes
            updates = {"chart": extra.chart.updates - before[0],
                       "grid": extra.grid.updates - before[1]}
            extra.close()
        elif extra is not None:
            await extra.close()
        await asyncio.sleep(0.5)
        print(json.dumps({"condition": condition, "rate": rate, **updates}))
    """
)


async def run_cell(client: Any, code: str) -> list[str]:
    """Execute ``code``, return its stdout lines; raise on an error."""
    msg_id = client.execute(code)
    lines: list[str] = []
    while True:
        msg = await client.get_iopub_msg(timeout=300)
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            lines.extend(content["text"].splitlines())
        elif kind == "error":
            raise RuntimeError("\n".join(content["traceback"]))
        elif kind == "status" and content["execution_state"] == "idle":
            return lines


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    manager = AsyncKernelManager(kernel_name="python3")
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        await run_cell(client, SETUP)
        await run_cell(client, f"await burst({args.events})")  # warm-up
        results: list[dict[str, Any]] = []
        for _ in range(args.reps):
            for condition in ("alone", "client", "workbench"):
                lines = await run_cell(client, f"await measure({condition!r}, {args.events})")
                results.extend(json.loads(line) for line in lines if line.startswith("{"))
        await run_cell(client, "lab.stop()")
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)
    print(f"{args.events} events per burst, {args.reps} bursts per condition, interleaved")
    for condition in ("alone", "client", "workbench"):
        rates = [r["rate"] for r in results if r["condition"] == condition]
        line = (
            f"{condition:10s} median {statistics.median(rates):8.0f} ev/s  "
            f"(min {min(rates):.0f}, max {max(rates):.0f})"
        )
        if condition == "workbench":
            charts = [r["chart"] for r in results if r["condition"] == condition]
            grids = [r["grid"] for r in results if r["condition"] == condition]
            line += f"  updates per burst: chart {charts}, grid {grids}"
        print(line)


if __name__ == "__main__":
    asyncio.run(main())
