"""Time from a fresh Jupyter kernel to the first event a notebook client receives.

Starts a real IPython kernel (jupyter_client), then in one cell: import gathering_lab,
``gl.start(port=0)``, ``await lab.connect()``, publish one event, await it. The cell
measures itself with ``time.perf_counter()``; the kernel's own start-up is reported
apart. The baseline in the same run is a cell that only imports pandas and
websockets: the floor any notebook pays to get a DataFrame off a WebSocket.

Usage: python benchmarks/kernel_start.py [--reps 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import textwrap
import time
from typing import Any

from jupyter_client.manager import AsyncKernelManager

CELL = textwrap.dedent(
    """
    import time, json
    t0 = time.perf_counter()
    import gathering_lab as gl
    t_import = time.perf_counter()
    lab = gl.start(port=0)
    client = await lab.connect("bench")
    t_connected = time.perf_counter()
    await gl.event_bus.publish(gl.Event(type="agent.started", data={"agent_id": 1}))
    await client.wait_for_events(1)
    t_event = time.perf_counter()
    assert len(client.frame.df) == 1  # first look at the DataFrame: imports pandas
    t_df = time.perf_counter()
    lab.stop()
    print(json.dumps({"import": t_import - t0, "start_connect": t_connected - t_import,
                      "first_event": t_event - t_connected, "total": t_event - t0,
                      "df": t_df - t_event, "total_df": t_df - t0}))
    """
)
BASELINE = textwrap.dedent(
    """
    import time, json
    t0 = time.perf_counter()
    import pandas, websockets.asyncio.client
    print(json.dumps({"total": time.perf_counter() - t0}))
    """
)


async def run_cell(code: str) -> dict[str, Any]:
    manager = AsyncKernelManager(kernel_name="python3")
    started = time.perf_counter()
    await manager.start_kernel()
    client = manager.client()
    client.start_channels()
    try:
        await client.wait_for_ready(timeout=60)
        kernel_ready = time.perf_counter() - started
        lines: list[str] = []

        def hook(message: dict[str, Any]) -> None:
            if message["msg_type"] == "stream":
                lines.append(message["content"]["text"])
            elif message["msg_type"] == "error":
                lines.append("\n".join(message["content"]["traceback"]))

        reply = await client.execute_interactive(code, output_hook=hook, timeout=60)
        if reply["content"]["status"] != "ok":
            raise RuntimeError("".join(lines))
        result: dict[str, Any] = json.loads("".join(lines).strip().splitlines()[-1])
        result["kernel_ready"] = kernel_ready
        return result
    finally:
        client.stop_channels()
        await manager.shutdown_kernel(now=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="fresh kernels per variant (5)")
    args = parser.parse_args()
    if not 1 <= args.reps <= 50:
        parser.error("--reps must be from 1 to 50")
    ours: list[dict[str, Any]] = []
    floor: list[dict[str, Any]] = []
    for _ in range(args.reps):  # interleaved: noise hits both alike
        ours.append(await run_cell(CELL))
        floor.append(await run_cell(BASELINE))

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return statistics.median(r[key] for r in rows) * 1000

    print(
        f"Machine: {os.cpu_count()} CPUs, {platform.platform()}, Python {platform.python_version()}"
    )
    print(f"Reps: {args.reps} fresh kernels per variant, medians in ms\n")
    print("| step | median ms | max ms |")
    print("|---|--:|--:|")
    for key, label in (
        ("kernel_ready", "kernel start (not ours, for scale)"),
        ("import", "import gathering_lab"),
        ("start_connect", "gl.start() + lab.connect()"),
        ("first_event", "publish → first event received"),
        ("total", "**import + start + connect + first event**"),
        ("df", "first `client.frame.df` (imports pandas)"),
        ("total_df", "cell total, with the DataFrame"),
    ):
        print(f"| {label} | {med(ours, key):.1f} | {max(r[key] for r in ours) * 1000:.1f} |")
    base = med(floor, "total")
    print(
        f"| baseline cell: import pandas + websockets only | {base:.1f} | "
        f"{max(r['total'] for r in floor) * 1000:.1f} |"
    )
    print(f"\nRatio (cell total with the DataFrame) ÷ baseline: {med(ours, 'total_df') / base:.2f}")


if __name__ == "__main__":
    asyncio.run(main())
