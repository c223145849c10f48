"""Fan-out benchmark: one publisher, M subscribers, K events -- gathering_lab vs two baselines.

Servers (``--servers``, interleaved within every cell and rotated between repetitions):

* ``lab``     -- ``python -m gathering_lab serve`` (extra args with ``--lab-arg=...``);
* ``bare``    -- ``benchmarks/peers/bare_websockets.py``: websockets, serialise once, broadcast();
* ``fastapi`` -- ``benchmarks/peers/fastapi_manager.py``: FastAPI + uvicorn + the original
  ConnectionManager (``send_json`` per client under ``asyncio.gather``);
* ``fastapi-loop`` -- the same with a sequential ``for`` loop instead of ``gather`` (not run
  unless named: ``--servers lab,bare,fastapi,fastapi-loop``);
* ``lab-redis`` -- our server as a node of a Redis Streams log (``serve --bus redis://...``),
  with a fresh ``redis-server`` per run started by the harness (loopback, free port, temp dir,
  ``appendonly yes``, ``appendfsync everysec``); Redis's own CPU is measured apart;
* ``lab-2nodes`` -- two such nodes on one fresh Redis, M/2 subscribers on each, the publisher
  on the first; server CPU is the sum of both nodes;
* ``lab-wd`` -- ``lab`` with ``--write-delay`` (``--write-delay`` of this script, 20ms);
  ``lab-redis-wd`` and ``lab-2nodes-wd`` likewise;
* ``lab-whole``, ``lab-redis-whole`` -- ``lab`` and ``lab-redis`` with ``--flush-slice 0``: each
  flush written in one loop turn, as before flushes were sliced.

Each run starts a fresh server process, connects the publisher, reads the server's RSS,
connects M thin subscribers (``loadgen.py``), reads RSS again (idle cost per connection), then
publishes K events (full speed, or at ``rate`` events/s) and waits -- bounded -- until every
connection has received the last event. Over that publishing phase it measures the server's
CPU time (utime+stime, psutil) and the load generator's own CPU time; afterwards the server's
peak RSS (VmHWM). All traffic is to 127.0.0.1.

    python benchmarks/fanout.py --quick            # smoke test, < ~60 s
    python benchmarks/fanout.py                    # full run (see BENCHMARKS.md)
    python benchmarks/fanout.py --servers bare,fastapi --cells full:100:1000 --reps 5
    python benchmarks/fanout.py --lab-arg=--compression=deflate --client-deflate --label deflate

Writes ``benchmarks/results/fanout-<timestamp>[-label].{md,json}`` and prints the markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import resource
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import loadgen
import psutil

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"  # never anything else

FULL_CELLS = "full:10:4000,full:100:1000,full:1000:200,rate:100:1000:200"
QUICK_CELLS = "full:10:400,full:100:150,full:1000:25,rate:100:200:200"
LAB_NAMES = (
    "lab", "lab-wd", "lab-redis", "lab-redis-wd", "lab-2nodes", "lab-2nodes-wd",
    "lab-whole", "lab-redis-whole",
)  # fmt: skip
REDIS_NAMES = ("lab-redis", "lab-redis-wd", "lab-2nodes", "lab-2nodes-wd", "lab-redis-whole")
SERVER_NAMES = ("bare", "fastapi", "fastapi-loop", *LAB_NAMES)


@dataclass(frozen=True)
class Cell:
    """One load shape: M subscribers, K events, full speed (``rate`` None) or paced."""

    subscribers: int
    events: int
    rate: float | None = None

    @classmethod
    def parse(cls, spec: str) -> Cell:
        """``full:M:K`` or ``rate:M:K:R``."""
        parts = spec.strip().split(":")
        if parts[0] == "full" and len(parts) == 3:
            return cls(int(parts[1]), int(parts[2]))
        if parts[0] == "rate" and len(parts) == 4:
            return cls(int(parts[1]), int(parts[2]), float(parts[3]))
        raise argparse.ArgumentTypeError(f"bad cell {spec!r}: use full:M:K or rate:M:K:R")

    @property
    def label(self) -> str:
        speed = "full speed" if self.rate is None else f"{self.rate:g} ev/s"
        return f"M={self.subscribers} {speed} K={self.events}"

    def timeout(self, scale: float) -> float:
        """Bound on the publishing phase: generous, but everything stops by itself."""
        deliveries = (self.subscribers + 1) * self.events
        if self.rate is None:
            return scale * (30 + deliveries * 150e-6)
        return scale * (30 + self.events / self.rate + deliveries * 20e-6)


# --------------------------------------------------------------------------------------------
# Server processes


def free_port() -> int:
    """A port the kernel considers free on the loopback interface."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def server_command(
    name: str, port: int, args: argparse.Namespace, bus: str | None = None
) -> list[str]:
    """The command line that starts server ``name`` on ``port`` (a lab node on ``bus``)."""
    py = sys.executable
    if name in LAB_NAMES:
        extra = ["--bus", bus] if bus else []
        if name.endswith("-wd"):
            extra += [f"--write-delay={args.write_delay}"]
        if name.endswith("-whole"):
            extra += ["--flush-slice=0"]  # a flush written in one loop turn, as before slices
        return [
            py, "-m", "gathering_lab", "serve", "--host", HOST, "--port", str(port),
            "--log-level", "warning",
            # Every client is on loopback, and the publisher goes full speed: this measures
            # fan-out, not admission (the peers have no such limits either).
            "--max-connections-per-ip", "0", "--publish-rate", "0",
            *extra, *args.lab_arg,
        ]  # fmt: skip
    if name == "bare":
        script, extra = "bare_websockets.py", args.bare_arg
    else:
        script, extra = "fastapi_manager.py", args.fastapi_arg
        if name == "fastapi-loop":
            extra = ["--fanout", "loop", *extra]
    return [py, str(HERE / "peers" / script), "--host", HOST, "--port", str(port), *extra]


def lab_available() -> str | None:
    """None if ``python -m gathering_lab serve`` can be tried, else the reason it cannot."""
    probe = (
        "import importlib.util as u, sys\n"
        "ok = u.find_spec('gathering_lab.__main__') and u.find_spec('gathering_lab.cli')\n"
        "sys.exit(0 if ok else 3)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, timeout=60, check=False
    )
    if done.returncode == 0:
        return None
    return "gathering_lab has no __main__/cli module yet" + (
        f" ({done.stderr.decode(errors='replace').strip().splitlines()[-1]})" if done.stderr else ""
    )


def box_busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all CPUs, including steal)."""
    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq + getattr(t, "steal", 0.0)


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM (bytes) of ``pid`` from /proc."""
    out: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


#: With --pin: the CPUs for the servers and Redis (the load generator gets the rest).
SERVER_CPUS: list[int] = []
LOADGEN_CPUS: list[int] = []


def pin_servers(ps: psutil.Process) -> None:
    """Keep a server (or Redis) process off the load generator's CPU, with --pin."""
    if SERVER_CPUS:
        ps.cpu_affinity(SERVER_CPUS)


class ServerProcess:
    """A server child process: started, waited on until it listens, stopped (bounded)."""

    def __init__(self, name: str, cmd: list[str], port: int, log_path: Path) -> None:
        self.name = name
        self.port = port
        self.log = open(log_path, "ab")  # closed in stop()
        self.log.write(f"\n=== {datetime.now().isoformat()} {shlex.join(cmd)}\n".encode())
        self.log.flush()
        self.proc = subprocess.Popen(
            cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.ps = psutil.Process(self.proc.pid)
        pin_servers(self.ps)

    def wait_listening(self, timeout: float = 30.0) -> None:
        """Poll until a TCP connect succeeds; raise if the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} at startup")
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"{self.name} not listening on {self.port} after {timeout:.0f}s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s -- only this child, by its pid."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.log.close()


class Probe:
    """``loadgen.py --probe``: a few of the M subscribers in a process of their own.

    At M=1000 the load generator is CPU-bound, so the latency it measures is mostly its own
    receive backlog; the probe's clients see what a dashboard on another machine would.
    """

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(
        cls, ports: list[int], count: int, cell: Cell, args: argparse.Namespace
    ) -> Probe:
        """Start the probe process and wait (bounded) until its subscribers are connected."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, str(HERE / "loadgen.py"), "--probe",
            "--ports", ",".join(map(str, ports)), "--subscribers", str(count),
            "--events", str(cell.events), "--timeout", str(cell.timeout(args.timeout_scale)),
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        probe = cls(proc)
        assert proc.stdout is not None
        async with asyncio.timeout(60 * args.timeout_scale):
            line = await proc.stdout.readline()
        if line.strip() != b"ready":
            probe.stop()
            raise RuntimeError(f"latency probe did not start: {line!r}")
        return probe

    async def finish(self, timeout: float) -> dict[str, Any]:
        """The probe's report, once every probe has every event (bounded)."""
        assert self.proc.stdout is not None
        async with asyncio.timeout(timeout + 10):
            line = await self.proc.stdout.readline()
            await self.proc.wait()
        report: dict[str, Any] = json.loads(line)
        return report

    def stop(self) -> None:
        """Kill the probe if it is still running."""
        if self.proc.returncode is None:
            self.proc.kill()


@dataclass
class Deployment:
    """What one run measures: one or two server processes, and the Redis behind them."""

    nodes: list[ServerProcess]
    redis: Any = None  # a gathering_lab.testing.RedisServer for the Redis-bus servers

    def stop(self) -> None:
        """Stop the nodes first, then Redis."""
        for node in self.nodes:
            node.stop()
        if self.redis:
            self.redis.stop()


def cpu_seconds(procs: list[psutil.Process]) -> float:
    """utime + stime of ``procs``, summed."""
    total = 0.0
    for ps in procs:
        t = ps.cpu_times()
        total += t.user + t.system
    return total


# --------------------------------------------------------------------------------------------
# One run


async def measure(deploy: Deployment, cell: Cell, args: argparse.Namespace) -> dict[str, Any]:
    """Connect, publish, wait for the last event (bounded); return the run's metrics.

    With several nodes the publisher is on the first and the subscribers are split evenly
    between them (distinct client ids); deliveries are counted across all of them.
    """
    nodes = deploy.nodes
    pids = [n.proc.pid for n in nodes]
    server_ps = [n.ps for n in nodes]
    redis = deploy.redis
    redis_ps = [psutil.Process(redis.process.pid)] if redis and redis.process else []
    state = loadgen.LoadState(
        events=cell.events, subscribers=cell.subscribers, deflate=args.client_deflate
    )
    pub = await loadgen.Publisher.open(
        HOST, nodes[0].port, cell.events, deflate=args.client_deflate
    )
    subs: list[loadgen.ThinSubscriber] = []
    probes = args.probes if cell.subscribers >= 10 * args.probes else 0
    probe: Probe | None = None
    reader: loadgen.PolledReader | None = None
    try:
        await asyncio.sleep(0.3)
        rss_before = sum(proc_status(pid)["VmRSS"] for pid in pids)
        if probes:  # M - probes load subscribers + probes = M
            probe = await Probe.start([n.port for n in nodes], probes, cell, args)
        first = 0
        load_subscribers = cell.subscribers - probes
        for i, node in enumerate(nodes):
            count = load_subscribers // len(nodes) + (i < load_subscribers % len(nodes))
            subs += await loadgen.connect_subscribers(
                state, HOST, node.port, count, first_index=first,
                timeout=60 * args.timeout_scale,
            )  # fmt: skip
            first += count
        if args.read_every > 0:
            reader = loadgen.PolledReader(subs, args.read_every / 1000)
        await asyncio.sleep(0.5 if cell.subscribers < 500 else 1.0)
        rss_idle = sum(proc_status(pid)["VmRSS"] for pid in pids)

        box0 = box_busy_seconds()
        cpu0, redis0 = cpu_seconds(server_ps), cpu_seconds(redis_ps)
        lg0, t0 = time.process_time(), time.perf_counter()
        if args.loadgen_nice:
            os.setpriority(os.PRIO_PROCESS, 0, args.loadgen_nice)
        publishing = asyncio.create_task(pub.publish(cell.rate, args.payload_bytes))
        timed_out = False
        try:
            async with asyncio.timeout(cell.timeout(args.timeout_scale)):
                await publishing  # raises if the server drops the publisher
                await state.all_finished.wait()
                await pub.got_last.wait()
        except TimeoutError:
            timed_out = True
        except Exception as exc:  # the run is reported as failed, the benchmark goes on
            state.error(f"publisher: {exc!r}")
        wall = time.perf_counter() - t0
        if args.loadgen_nice:
            os.setpriority(os.PRIO_PROCESS, 0, 0)
        cpu1, redis1 = cpu_seconds(server_ps), cpu_seconds(redis_ps)
        lg1, box1 = time.process_time(), box_busy_seconds()
        statuses = [proc_status(pid) for pid in pids]
        if not publishing.done():
            publishing.cancel()
            await asyncio.gather(publishing, return_exceptions=True)
        probe_result = await probe.finish(cell.timeout(args.timeout_scale)) if probe else None
    finally:
        if reader is not None:
            await reader.stop()
        for sub in subs:
            sub.close()
        await pub.close()
        if probe:
            probe.stop()

    result = loadgen.summarize(state, subs, pub)
    nan = float("nan")
    result.update(probes=probes, probe_p50_ms=nan, probe_p99_ms=nan)
    if probe_result is not None:
        # The probes are M's last few subscribers: count their deliveries with the rest.
        result["subscribers"] += probe_result["subscribers"]
        result["deliveries"] += probe_result["received"]
        result["expected_deliveries"] += probe_result["subscribers"] * cell.events
        result["lost"] = result["expected_deliveries"] - result["deliveries"]
        result["duplicates"] += probe_result["duplicates"]
        result["out_of_order"] += probe_result["out_of_order"]
        result["connect_failed"] += probe_result["connect_failed"]
        result["errors"] += probe_result["errors"]
        result.update(probe_p50_ms=probe_result["p50_ms"], probe_p99_ms=probe_result["p99_ms"])
    server_cpu = cpu1 - cpu0
    redis_cpu = redis1 - redis0
    deliveries = max(result["deliveries"], 1)
    nan = float("nan")
    result.update(
        timed_out=timed_out,
        wall_s=wall,
        nodes=len(nodes),
        deliveries_per_s=result["deliveries"] / wall,
        server_cpu_s=server_cpu,
        cpu_us_per_delivery=1e6 * server_cpu / deliveries,
        server_cpu_pct=100 * server_cpu / wall,
        # Redis (when there is one): its CPU per published event, and nodes + Redis per delivery.
        redis_cpu_s=redis_cpu if redis_ps else nan,
        redis_us_per_event=1e6 * redis_cpu / max(result["sent"], 1) if redis_ps else nan,
        redis_cpu_pct=100 * redis_cpu / wall if redis_ps else nan,
        total_us_per_delivery=1e6 * (server_cpu + redis_cpu) / deliveries,
        loadgen_cpu_pct=100 * (lg1 - lg0) / wall,
        # Everything else on the box (other processes, kernel, steal): the noise indicator.
        other_cpu_pct=max(0.0, 100 * ((box1 - box0) - server_cpu - redis_cpu - (lg1 - lg0)) / wall),
        rss_before_mib=rss_before / 2**20,
        rss_end_mib=sum(s["VmRSS"] for s in statuses) / 2**20,
        peak_rss_mib=sum(s["VmHWM"] for s in statuses) / 2**20,
        idle_kib_per_conn=(rss_idle - rss_before) / 1024 / max(cell.subscribers, 1),
    )
    return result


def run_one(
    name: str, cell: Cell, rep: int, args: argparse.Namespace, logs: Path
) -> dict[str, Any]:
    """Start a fresh server, measure one cell against it, stop it."""
    base: dict[str, Any] = {"server": name, "cell": cell.label, "rep": rep, "ok": False}
    deploy = Deployment(nodes=[])
    try:
        bus = None
        if name in REDIS_NAMES:
            from gathering_lab.testing import RedisServer  # only for the Redis-bus servers

            # everysec: the production-like setting (tests use always: an fsync per append).
            redis_dir = Path(tempfile.mkdtemp(prefix="fanout-redis-", dir=logs))
            deploy.redis = RedisServer(redis_dir, appendfsync=args.redis_fsync)
            deploy.redis.start(wait=20)
            if deploy.redis.process is not None:
                redis_ps = psutil.Process(deploy.redis.process.pid)
                if args.pin and args.redis_with_loadgen:
                    redis_ps.cpu_affinity([LOADGEN_CPUS[0]])
                else:
                    pin_servers(redis_ps)
                if args.redis_nice:
                    redis_ps.nice(args.redis_nice)
                if args.redis_batch:
                    os.sched_setscheduler(redis_ps.pid, os.SCHED_BATCH, os.sched_param(0))
            bus = deploy.redis.url
        for _ in range(2 if name.startswith("lab-2nodes") else 1):
            port = free_port()
            cmd = server_command(name, port, args, bus)
            deploy.nodes.append(ServerProcess(name, cmd, port, logs / f"{name}.log"))
        for node in deploy.nodes:
            node.wait_listening()
        result = asyncio.run(measure(deploy, cell, args))
    except Exception as exc:  # keep benchmarking the other servers
        base["error"] = repr(exc)
        return base
    finally:
        deploy.stop()
    base.update(result)
    base["ok"] = not result["errors"] and not result["timed_out"]
    return base


# --------------------------------------------------------------------------------------------
# Summaries and report

MEDIAN_KEYS = (
    "deliveries_per_s", "cpu_us_per_delivery", "server_cpu_pct", "p50_ms", "p99_ms",
    "peak_rss_mib", "idle_kib_per_conn", "loadgen_cpu_pct", "other_cpu_pct",
    "redis_us_per_event", "redis_cpu_pct", "total_us_per_delivery", "probe_p50_ms",
    "probe_p99_ms",
)  # fmt: skip
LOADGEN_BOUND_PCT = 90.0  # at or above this, throughput is limited by the load generator
SUM_KEYS = ("lost", "duplicates", "out_of_order", "connect_failed")


def summarize_runs(runs: list[dict[str, Any]], cells: list[Cell], servers: list[str]) -> list[dict]:
    """Median of each metric over the repetitions of one (cell, server); counts are summed."""
    rows = []
    for cell in cells:
        for name in servers:
            mine = [r for r in runs if r["cell"] == cell.label and r["server"] == name]
            done = [r for r in mine if "deliveries" in r]
            row: dict[str, Any] = {"cell": cell.label, "server": name, "reps": len(done)}
            row["failed_runs"] = sum(1 for r in mine if not r["ok"])
            for key in MEDIAN_KEYS:
                values = [r[key] for r in done if not math.isnan(r.get(key, math.nan))]
                row[key] = statistics.median(values) if values else float("nan")
            for key in SUM_KEYS:
                row[key] = sum(r[key] for r in done)
            rows.append(row)
    return rows


def ratio(a: float, b: float) -> float:
    """a / b, nan when undefined."""
    if math.isnan(a) or math.isnan(b) or b == 0:
        return float("nan")
    return a / b


def compute_ratios(summary: list[dict], servers: list[str]) -> list[dict[str, Any]]:
    """lab÷bare, lab÷fastapi(-loop), bare÷fastapi of the medians, per cell and metric."""
    pairs = [
        ("lab", "bare"), ("lab", "fastapi"), ("lab", "fastapi-loop"), ("bare", "fastapi"),
        ("bare", "fastapi-loop"), ("lab-redis", "lab"), ("lab-2nodes", "lab"),
        ("lab-wd", "lab"), ("lab-wd", "bare"), ("lab-redis-wd", "lab-wd"),
        ("lab-redis-wd", "bare"),
    ]  # fmt: skip
    pairs = [(a, b) for a, b in pairs if a in servers and b in servers]
    out = []
    by_key = {(r["cell"], r["server"]): r for r in summary}
    for cell in dict.fromkeys(r["cell"] for r in summary):
        for metric in (
            "cpu_us_per_delivery", "total_us_per_delivery", "p99_ms", "peak_rss_mib",
            "idle_kib_per_conn",
        ):  # fmt: skip
            row: dict[str, Any] = {"cell": cell, "metric": metric}
            for a, b in pairs:
                row[f"{a}/{b}"] = ratio(by_key[(cell, a)][metric], by_key[(cell, b)][metric])
            out.append(row)
    return out


NOISY_OTHER_CPU_PCT = 50.0  # rest of the box busier than this: latency checks are not trustworthy


def paired(runs: list[dict[str, Any]] | None, cell: Cell, server: str, base: str, key: str) -> str:
    """`` [per-rep pairs: median m, lo–hi]`` of ``key``, server ÷ base; "" without runs.

    The servers of one rep run back to back, so a rep's pair shares the box's state.
    """
    values: dict[tuple[str, int], float] = {
        (r["server"], r["rep"]): r[key]
        for r in runs or []
        if r["cell"] == cell.label and r.get("ok") and key in r
    }
    pairs = [
        values[(server, rep)] / values[(base, rep)]
        for (name, rep) in values
        if name == server and values.get((base, rep))
    ]
    if not pairs:
        return ""
    return (
        f" [per-rep pairs: median {statistics.median(pairs):.2f}, "
        f"{min(pairs):.2f}–{max(pairs):.2f}]"
    )


def check_targets(
    summary: list[dict], cells: list[Cell], runs: list[dict[str, Any]] | None = None
) -> list[tuple[str, bool | None, str]]:
    """The issue's targets on this run's medians: (target, passed, evidence).

    "FastAPI" means every FastAPI variant measured in the run (``fastapi``, ``fastapi-loop``):
    a target passes only against the cheapest of them. With ``runs``, the Redis targets'
    evidence adds the ratios of each rep's pair (the servers of one rep run back to back).
    """
    by_key = {(r["cell"], r["server"]): r for r in summary}

    def row(cell: Cell | None, server: str) -> dict[str, Any] | None:
        found = by_key.get((cell.label, server)) if cell else None
        return found if found and found["reps"] else None

    def find(m: int, rate: float | None) -> Cell | None:
        return next((c for c in cells if c.subscribers == m and c.rate == rate), None)

    def versus(lab: dict, cell: Cell, metric: str, limit: float, *others: str) -> tuple[bool, str]:
        ok, text = True, []
        for other in others:
            ref = row(cell, other)
            if ref:
                r = ratio(lab[metric], ref[metric])
                ok = ok and r <= limit
                text.append(f"÷{other} {r:.2f}")
        return ok, ", ".join(text)

    def noise(cell: Cell, *servers: str) -> str:
        busy = max((r["other_cpu_pct"] for s in servers if (r := row(cell, s))), default=0.0)
        if busy > NOISY_OTHER_CPU_PCT:
            return f" — box busy (other CPU {busy:.0f}%): rerun on a quiet machine"
        return ""

    fastapis = ("fastapi", "fastapi-loop")
    checks: list[tuple[str, bool | None, str]] = []
    for m in (100, 1000):
        cell = find(m, None)
        name = f"CPU/delivery at M={m}: lab ≤ 0.6× FastAPI, ≤ 1.25× bare, zero loss"
        lab = row(cell, "lab")
        if not (cell and lab and row(cell, "bare") and any(row(cell, f) for f in fastapis)):
            checks.append((name, None, "not measured"))
            continue
        ok_f, txt_f = versus(lab, cell, "cpu_us_per_delivery", 0.6, *fastapis)
        ok_b, txt_b = versus(lab, cell, "cpu_us_per_delivery", 1.25, "bare")
        clean = lab["lost"] == 0 and lab["duplicates"] == 0 and lab["failed_runs"] == 0
        evidence = f"{txt_f}, {txt_b}, lost {lab['lost']}, dup {lab['duplicates']}"
        checks.append((name, ok_f and ok_b and clean, evidence))

    cell = find(100, 200.0)
    name = "p99 latency at M=100, 200 ev/s: lab ≤ 1.5× bare and ≤ FastAPI"
    lab = row(cell, "lab")
    if cell and lab and row(cell, "bare") and any(row(cell, f) for f in fastapis):
        ok_b, txt_b = versus(lab, cell, "p99_ms", 1.5, "bare")
        ok_f, txt_f = versus(lab, cell, "p99_ms", 1.0, *fastapis)
        evidence = f"{lab['p99_ms']:.2f} ms, {txt_b}, {txt_f}" + noise(cell, "lab", "bare")
        checks.append((name, ok_b and ok_f, evidence))
    else:
        checks.append((name, None, "not measured"))

    cell = find(1000, None) or next((c for c in cells if c.subscribers == 1000), None)
    name = "idle connection cost at M=1000: lab < 20 KiB each"
    lab = row(cell, "lab")
    if cell and lab:
        bare = row(cell, "bare")
        extra = f" (bare {bare['idle_kib_per_conn']:.1f})" if bare else ""
        kib = lab["idle_kib_per_conn"]
        checks.append((name, kib < 20, f"{kib:.1f} KiB{extra}"))
    else:
        checks.append((name, None, "not measured"))
    checks += check_scaling_targets(summary, cells, runs)
    return checks


def check_scaling_targets(
    summary: list[dict], cells: list[Cell], runs: list[dict[str, Any]] | None = None
) -> list[tuple[str, bool | None, str]]:
    """Issue 9's targets: the Redis bus, two nodes and the write delay, against this run."""
    by_key = {(r["cell"], r["server"]): r for r in summary}

    def row(cell: Cell | None, server: str) -> dict[str, Any] | None:
        found = by_key.get((cell.label, server)) if cell else None
        return found if found and found["reps"] else None

    def find(m: int, rate: float | None) -> Cell | None:
        return next((c for c in cells if c.subscribers == m and c.rate == rate), None)

    def clean(r: dict[str, Any]) -> str:
        return f"lost {r['lost']}, dup {r['duplicates']}, ooo {r['out_of_order']}"

    def is_clean(r: dict[str, Any]) -> bool:
        return r["lost"] == 0 and r["duplicates"] == 0 and r["out_of_order"] == 0

    checks: list[tuple[str, bool | None, str]] = []
    # CPU per delivery, same cell: the Redis node against the memory node (≤ 1.15×; the
    # issue's target is at M=1000) and two nodes with M/2 each against one (≤ 1.1×), with
    # and without the write delay, in every cell of this run.
    pairs = (
        ("lab-redis", "lab", 1.15, "lab-redis node ≤ 1.15× lab (memory bus)"),
        ("lab-2nodes", "lab-redis", 1.1, "2 nodes (M/2 each) ≤ 1.1× 1 node (lab-redis)"),
        ("lab-redis-wd", "lab-wd", 1.15, "lab-redis-wd node ≤ 1.15× lab-wd"),
        ("lab-2nodes-wd", "lab-redis-wd", 1.1, "2 nodes -wd ≤ 1.1× 1 node (lab-redis-wd)"),
    )
    for cell in cells:
        for server, base_name, limit, what in pairs:
            this, base = row(cell, server), row(cell, base_name)
            if not (this and base):
                continue
            r = ratio(this["cpu_us_per_delivery"], base["cpu_us_per_delivery"])
            rt = ratio(this["total_us_per_delivery"], base["total_us_per_delivery"])
            name = f"CPU/delivery at {cell.label}: {what}"
            text = f"{r:.2f} (with Redis's CPU {rt:.2f})"
            text += paired(runs, cell, server, base_name, "cpu_us_per_delivery")
            text += ", " + clean(this)
            checks.append((name, r <= limit and is_clean(this), text))
    if not checks:
        checks.append(("CPU/delivery: Redis bus and two nodes", None, "not measured"))
    for m in (100, 1000):
        cell = find(m, 200.0)
        lab, redis = row(cell, "lab"), row(cell, "lab-redis")
        name = f"p99 at M={m}, 200 ev/s: lab-redis ≤ lab's p99 + 2 ms"
        if cell and lab and redis:
            # The probes' p99 when measured (the load generator's own backlog is not the
            # server's latency once it is CPU-bound); the load generator's beside it.
            key = "probe_p99_ms" if not math.isnan(redis["probe_p99_ms"]) else "p99_ms"
            ok = redis[key] <= lab[key] + 2.0 and is_clean(redis)
            text = f"{redis[key]:.2f} vs {lab[key]:.2f} ms"
            if key == "probe_p99_ms":
                text = (
                    f"probes {text}; load generator {redis['p99_ms']:.2f} vs {lab['p99_ms']:.2f} ms"
                )
            text += ", " + clean(redis)
            busy = max(lab["other_cpu_pct"], redis["other_cpu_pct"])
            if busy > NOISY_OTHER_CPU_PCT:
                text += f" — box busy (other CPU {busy:.0f}%)"
            checks.append((name, ok, text))
        else:
            checks.append((name, None, "not measured"))
    cell = find(1000, 200.0)
    wd, bare = row(cell, "lab-wd"), row(cell, "bare")
    name = "write delay at M=1000, 200 ev/s: lab-wd CPU/delivery ≤ 0.3× bare, p99 ≤ delay + bare's"
    if cell and wd and bare:
        delay_ms = WRITE_DELAY_MS[0]
        r = ratio(wd["cpu_us_per_delivery"], bare["cpu_us_per_delivery"])
        ok = r <= 0.3 and wd["p99_ms"] <= delay_ms + bare["p99_ms"] and is_clean(wd)
        text = (
            f"÷bare {r:.2f}, p99 {wd['p99_ms']:.2f} ms vs {delay_ms:g} + "
            f"{bare['p99_ms']:.2f} ms, " + clean(wd)
        )
        checks.append((name, ok, text))
    else:
        checks.append((name, None, "not measured"))
    return checks


WRITE_DELAY_MS = [20.0]  # set from --write-delay in main()


def fmt(value: float, digits: int = 1) -> str:
    """Format a number for the table (``–`` for nan)."""
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int):
        return str(value)
    return f"{value:,.{digits}f}"


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    model = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {}
    for mod in ("websockets", "fastapi", "uvicorn", "starlette", "redis", "hiredis"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:
            versions[mod] = "n/a"  # hiredis: absent, or hidden (the servers inherit this env)
    commit = (
        subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, check=False
        )
        .stdout.decode()
        .strip()
    )
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_at_start": os.getloadavg(),
        "git": commit or "n/a",
        **versions,
    }


def render(meta: dict[str, Any], summary: list[dict], ratios: list[dict], checks: list) -> str:
    """The markdown report."""
    m = meta["machine"]
    lines = [
        f"### Fan-out run {meta['started']}",
        "",
        f"`{meta['command']}`",
        "",
        f"Machine: {m['nproc']} CPUs, {m['cpu_model']}, Linux {m['kernel']}, "
        f"Python {m['python']}, websockets {m['websockets']}, fastapi {m['fastapi']}, "
        f"uvicorn {m['uvicorn']}, redis-py {m.get('redis', 'n/a')}, "
        f"hiredis {m.get('hiredis', 'n/a')}; load average {m['loadavg_at_start'][0]:.2f} at start, "
        f"{meta['loadavg_at_end'][0]:.2f} at end; "
        f"git {m['git']}. Reps per cell: {meta['reps']} (median shown; lost/dup/ooo summed "
        f"over reps). Payload ~{meta['payload_bytes']} B of JSON per event. "
        f"Wall time {meta['elapsed_s']:.0f} s.",
        "",
    ]
    if meta.get("notes"):
        lines += [f"Note: {n}" for n in meta["notes"]] + [""]
    lines += [
        "| cell | server | deliveries/s | server CPU µs/delivery | server CPU % | p50 ms "
        "| p99 ms | probe p50 / p99 ms | lost | dup | ooo | peak RSS MiB | idle KiB/conn "
        "| loadgen CPU % | other CPU % | Redis CPU µs/event | Redis CPU % "
        "| server+Redis µs/delivery |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in summary:
        failed = f" ({r['failed_runs']} failed)" if r["failed_runs"] else ""
        bound = " †" if r["loadgen_cpu_pct"] >= LOADGEN_BOUND_PCT else ""
        lines.append(
            f"| {r['cell']} | {r['server']}{failed} | {fmt(r['deliveries_per_s'], 0)}{bound} "
            f"| {fmt(r['cpu_us_per_delivery'])} | {fmt(r['server_cpu_pct'], 0)} "
            f"| {fmt(r['p50_ms'], 2)} | {fmt(r['p99_ms'], 2)} "
            f"| {fmt(r['probe_p50_ms'], 2)} / {fmt(r['probe_p99_ms'], 2)} "
            f"| {r['lost']} | {r['duplicates']} "
            f"| {r['out_of_order']} | {fmt(r['peak_rss_mib'])} | {fmt(r['idle_kib_per_conn'])} "
            f"| {fmt(r['loadgen_cpu_pct'], 0)} | {fmt(r['other_cpu_pct'], 0)} "
            f"| {fmt(r['redis_us_per_event'])} | {fmt(r['redis_cpu_pct'], 0)} "
            f"| {fmt(r['total_us_per_delivery'])} |"
        )
    lines += [
        "",
        "CPU % is of one core over the publishing phase. † = load generator at "
        f"≥{LOADGEN_BOUND_PCT:.0f}% CPU: that throughput is bounded by the client, not the server "
        "(CPU per delivery is still the server's own). Other CPU % = the rest of the box "
        "(other processes, kernel, steal) during the same phase: the noise indicator. "
        "lab-2nodes: CPU, RSS and idle KiB/conn summed over both nodes. Redis CPU µs/event: "
        "redis-server's CPU over the phase ÷ events published. Probe: of the M subscribers, "
        "a few (--probes) in a process of their own, whose latency is the server's as a "
        "dashboard on another machine would see it (p50/p99 above are the load generator's, "
        "which include its own receive backlog when it is CPU-bound).",
    ]
    if ratios:
        pair_keys = [k for k in ratios[0] if "/" in k]
        if pair_keys:
            header = " | ".join(k.replace("/", " ÷ ") for k in pair_keys)
            lines += ["", "Ratios of the medians (same run):", ""]
            lines += [f"| cell | metric | {header} |", "|---|---|" + "--:|" * len(pair_keys)]
            for r in ratios:
                cells_txt = " | ".join(fmt(r[k], 2) for k in pair_keys)
                lines.append(f"| {r['cell']} | {r['metric']} | {cells_txt} |")
    lines += ["", "Targets (from the issue), on this run:", ""]
    for name, passed, evidence in checks:
        mark = "n/a" if passed is None else ("PASS" if passed else "FAIL")
        lines.append(f"- **{mark}** {name} — {evidence}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small K, 1 rep: a smoke test")
    p.add_argument("--servers", default="lab,bare,fastapi", help=f"comma list of {SERVER_NAMES}")
    p.add_argument("--cells", help=f"comma list of full:M:K / rate:M:K:R (default {FULL_CELLS})")
    p.add_argument("--reps", type=int, help="repetitions per cell (default 5, quick 1)")
    p.add_argument("--payload-bytes", type=int, default=200, help="JSON size of event data")
    p.add_argument("--lab-arg", action="append", default=[], help="extra arg for our server")
    p.add_argument("--bare-arg", action="append", default=[], help="extra arg for bare peer")
    p.add_argument("--fastapi-arg", action="append", default=[], help="extra arg, fastapi peer")
    p.add_argument("--client-deflate", action="store_true", help="clients offer compression")
    p.add_argument("--write-delay", default="20ms", help="lab-wd's --write-delay (20ms)")
    p.add_argument(
        "--redis-fsync", default="everysec", choices=("everysec", "always", "no"),
        help="appendfsync of the harness's redis-server (everysec)",
    )  # fmt: skip
    p.add_argument(
        "--pin",
        action="store_true",
        help="load generator on the last CPU, servers and Redis on the others (as if the "
        "clients were on other machines; needs 2+ CPUs)",
    )
    p.add_argument(
        "--probes",
        type=int,
        default=4,
        help="of the M subscribers, this many in a latency probe process of their own, for "
        "cells with M >= 10x as many (0: none)",
    )
    p.add_argument(
        "--read-every",
        type=float,
        default=0.0,
        metavar="MS",
        help="the load generator reads its sockets every MS ms instead of on each arrival "
        "(loadgen.PolledReader: no wake-up per delivery, as with clients on other machines; "
        "its own latency then includes up to MS, the probes' does not). 0: on each arrival",
    )
    p.add_argument(
        "--redis-with-loadgen",
        action="store_true",
        help="with --pin: redis-server on the load generator's CPU, so that the nodes have "
        "theirs to themselves (with --loadgen-nice, Redis and the probes come first there)",
    )
    p.add_argument(
        "--loadgen-nice",
        type=int,
        default=0,
        help="nice value of the load generator (this process) while it publishes and "
        "receives, reset afterwards; the probes keep theirs: a diagnostic of how much the "
        "load generator's share of the box's CPUs adds to the servers' latency",
    )
    p.add_argument(
        "--redis-batch",
        action="store_true",
        help="run the harness's redis-server under SCHED_BATCH: its wake-ups do not preempt "
        "a running node (as if Redis had a core or a host of its own)",
    )
    p.add_argument(
        "--redis-nice",
        type=int,
        default=0,
        help="nice value for the harness's redis-server (negative needs root): a diagnostic "
        "of how much Redis waiting for a CPU on a saturated box adds to the latency",
    )
    p.add_argument("--timeout-scale", type=float, default=1.0, help="multiply all timeouts")
    p.add_argument("--label", default="", help="suffix for the result file names")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = p.parse_args(argv)
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    unknown = set(args.servers) - set(SERVER_NAMES)
    if unknown:
        p.error(f"unknown servers: {', '.join(sorted(unknown))}")
    args.cells = [
        Cell.parse(s)
        for s in (args.cells or (QUICK_CELLS if args.quick else FULL_CELLS)).split(",")
    ]
    args.reps = args.reps or (1 if args.quick else 5)
    delay = args.write_delay.strip().lower()
    try:
        WRITE_DELAY_MS[0] = float(delay[:-2]) if delay.endswith("ms") else 1000 * float(delay)
    except ValueError:
        p.error(f"bad --write-delay {args.write_delay!r}: use e.g. 20ms")
    return args


def raise_nofile_limit() -> tuple[int, int]:
    """Soft RLIMIT_NOFILE := hard (children inherit it); return the new limits."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    """Run every (cell, rep, server), write the report, print it."""
    args = parse_args(argv)
    soft, _ = raise_nofile_limit()
    need = max(c.subscribers for c in args.cells) + 64
    if soft < need:
        print(f"RLIMIT_NOFILE {soft} < {need}: raise the hard limit first", file=sys.stderr)
        return 2
    notes: list[str] = []
    if args.pin:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            print("--pin needs at least 2 CPUs", file=sys.stderr)
            return 2
        SERVER_CPUS[:] = cpus[:-1]
        LOADGEN_CPUS[:] = cpus[-1:]
        os.sched_setaffinity(0, {cpus[-1]})
        notes.append(
            f"pinned: load generator on CPU {cpus[-1]}, servers and Redis on CPUs {SERVER_CPUS}"
        )
    if args.read_every < 0:
        print("--read-every must be >= 0 (ms)", file=sys.stderr)
        return 2
    if args.read_every:
        notes.append(
            f"the load generator read its sockets every {args.read_every:g} ms "
            "(its own latency includes up to that; the probes' does not)"
        )
    if args.loadgen_nice:
        notes.append(f"load generator at nice {args.loadgen_nice} while publishing")
    if args.redis_with_loadgen:
        if not args.pin:
            print("--redis-with-loadgen needs --pin", file=sys.stderr)
            return 2
        notes.append("redis-server pinned to the load generator's CPU")
    if args.redis_batch:
        notes.append("redis-server under SCHED_BATCH (its wake-ups do not preempt a node)")
    servers = list(args.servers)
    if "lab" in servers and (why := lab_available()):
        notes.append(f"lab skipped: {why}")
        servers.remove("lab")
    if any(s in REDIS_NAMES for s in servers) and shutil.which("redis-server") is None:
        notes.append("lab-redis/lab-2nodes skipped: redis-server is not installed")
        servers = [s for s in servers if s not in REDIS_NAMES]
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    stem = f"fanout-{stamp}" + (f"-{args.label}" if args.label else "")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    logs = args.out_dir / f"{stem}-logs"
    logs.mkdir(exist_ok=True)

    started, t_start = datetime.now().isoformat(timespec="seconds"), time.monotonic()
    runs: list[dict[str, Any]] = []
    dead: set[str] = set()
    for cell in args.cells:
        for rep in range(args.reps):
            shift = rep % len(servers)
            for name in servers[shift:] + servers[:shift]:  # interleave, rotate the order
                if name in dead:
                    continue
                run = run_one(name, cell, rep, args, logs)
                runs.append(run)
                print(progress_line(run), file=sys.stderr, flush=True)
                if "exited" in run.get("error", "") or "not listening" in run.get("error", ""):
                    dead.add(name)
                    notes.append(f"{name} did not start ({run['error']}); see {logs.name}/")

    summary = summarize_runs(runs, args.cells, servers)
    ratios = compute_ratios(summary, servers)
    checks = check_targets(summary, args.cells, runs)
    meta = {
        "started": started,
        "elapsed_s": time.monotonic() - t_start,
        "loadavg_at_end": os.getloadavg(),
        "command": "python benchmarks/fanout.py "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": machine_info(),
        "reps": args.reps,
        "payload_bytes": args.payload_bytes,
        "cells": [c.label for c in args.cells],
        "servers": servers,
        "notes": notes,
        "lab_args": args.lab_arg,
        "write_delay": args.write_delay,
        "redis_fsync": args.redis_fsync,
        "redis_version": redis_version(),
    }
    report = render(meta, summary, ratios, checks)
    (args.out_dir / f"{stem}.md").write_text(report, encoding="utf-8")
    payload = {"meta": meta, "summary": summary, "ratios": ratios, "checks": checks, "runs": runs}
    (args.out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=2, default=str))
    print(report)
    print(f"saved {args.out_dir / stem}.md and .json", file=sys.stderr)
    return 0


def redis_version() -> str:
    """``redis-server --version``'s version, or ``n/a``."""
    exe = shutil.which("redis-server")
    if not exe:
        return "n/a"
    out = subprocess.run([exe, "--version"], capture_output=True, check=False).stdout.decode()
    return next((w[2:] for w in out.split() if w.startswith("v=")), out.strip() or "n/a")


def progress_line(run: dict[str, Any]) -> str:
    """One stderr line per run, so a long benchmark shows it is alive."""
    if "error" in run:
        return f"  {run['cell']:<28} {run['server']:<8} rep {run['rep']}: ERROR {run['error']}"
    return (
        f"  {run['cell']:<28} {run['server']:<10} rep {run['rep']}: "
        f"{run['deliveries_per_s']:>9,.0f} deliv/s  {run['cpu_us_per_delivery']:6.1f} µs/deliv  "
        f"p99 {run['p99_ms']:8.2f} ms (probes {run['probe_p99_ms']:6.2f})  lost {run['lost']}  "
        f"loadgen {run['loadgen_cpu_pct']:3.0f}%"
        + ("" if run["ok"] else f"  [{'timeout' if run['timed_out'] else run['errors'][:2]}]")
    )


if __name__ == "__main__":
    sys.exit(main())
