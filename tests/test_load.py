"""``gathering-lab load`` and ``gl.load_test``, against real servers on 127.0.0.1 (no mocks).

Each server is a ``gathering-lab serve`` subprocess on a free loopback port, so the load
test finds its pid from the port and reports its RSS and CPU; the subscribers run in
worker processes of their own, as they do for a user.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

import gathering_lab as gl
from gathering_lab.pytest_plugin import GatheringServer
from gathering_lab.testing import free_port, timeout

ROOT = Path(__file__).resolve().parent.parent


def _serve(*extra: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "gathering_lab", "serve", "--port", str(port), "--log-level",
         "warning", *extra],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout(20)
        while True:
            assert process.poll() is None, "the server exited at start-up"
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                    break
            except OSError:
                assert time.monotonic() < deadline, "the server did not listen in time"
                time.sleep(0.05)
        yield f"ws://127.0.0.1:{port}/ws/dashboard", process
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@pytest.fixture(scope="module")
def lab() -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """Our server, with the admission limits off as a load test needs."""
    yield from _serve("--max-connections-per-ip", "0", "--publish-rate", "0")


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gathering_lab", "load", *args],
        capture_output=True,
        text=True,
        timeout=timeout(60),
        check=False,
    )


def test_load_test_100_clients_every_event_once_in_order(
    lab: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, server = lab
    out = tmp_path / "samples.parquet"
    df = gl.load_test(url, clients=100, rate=40, duration=1, progress=False, out=str(out))
    assert isinstance(df, pd.DataFrame) and len(df) == 1
    s = df.iloc[0]
    assert s["connected"] == 100 and s["connect_failed"] == 0
    assert s["events_sent"] == 40 and s["publish_refused"] == 0
    assert s["deliveries"] == s["expected_deliveries"] == 100 * 40
    assert s["lost"] == 0 and s["duplicates"] == 0 and s["reordered"] == 0
    assert 0 < s["latency_p50_ms"] <= s["latency_p99_ms"] <= s["latency_max_ms"]
    assert 0 < s["connect_p50_ms"] <= s["connect_p99_ms"] <= s["connect_max_ms"]
    assert s["deliveries_per_s"] > 0
    # The server is local: found from its port, measured.
    assert s["server_pid"] == server.pid
    assert s["server_rss_idle_mib"] > 1 and s["server_cpu_pct"] >= 0
    assert 0 <= s["generator_cpu_pct"] <= s["generator_cpu_total_pct"]
    assert not s["generator_saturated"]
    # Every sample: each client got each seq exactly once.
    samples = df.samples
    assert len(samples) == 4000
    per_client = samples.groupby("client")["seq"].agg(["count", "nunique", "min", "max"])
    assert len(per_client) == 100
    assert (per_client["count"] == 40).all() and (per_client["nunique"] == 40).all()
    assert (per_client["min"] == 0).all() and (per_client["max"] == 39).all()
    assert (samples["latency_ms"] > 0).all()
    assert len(df.connects) == 100
    written = pd.read_parquet(out)
    assert list(written.columns) == ["client", "seq", "received_s", "latency_ms"]
    assert len(written) == 4000
    # The summary table flags a saturated generator (this run's figures, as if it were).
    from gathering_lab.load import LoadReport

    saturated = {**s.to_dict(), "generator_saturated": True, "generator_cpu_pct": 97.0}
    table = LoadReport(saturated, [], [], [], [], []).table()
    assert "warning: the load generator was saturated (97 % of a core >= 90 %)" in table
    assert "warning" not in LoadReport(s.to_dict(), [], [], [], [], []).table()


def test_cli_two_processes_csv_and_summary(
    lab: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    url, _ = lab
    out = tmp_path / "samples.csv"
    done = _cli(
        "--url", url, "--clients", "100", "--rate", "30", "--duration", "1",
        "--processes", "2", "--out", str(out),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    table = done.stdout
    assert "100 of 100 connected (2 proc)" in table
    assert "deliveries           3000 of 3000" in table
    assert "lost                 0 (0.00 %) not delivered 5 s after" in table
    assert "generator CPU" in table and "server               pid" in table
    samples = pd.read_csv(out)
    assert len(samples) == 3000
    assert sorted(samples["client"].unique()) == list(range(100))  # both processes' clients


def test_filters_decide_what_is_expected(lab: tuple[str, subprocess.Popen[bytes]]) -> None:
    url, _ = lab
    other = gl.load_test(
        url, clients=20, rate=20, duration=0.5, types=["agent.*"], drain=1, progress=False
    )
    assert other.iloc[0]["connected"] == 20
    assert other.iloc[0]["events_sent"] == 10
    assert other.iloc[0]["expected_deliveries"] == 0 and other.iloc[0]["deliveries"] == 0
    mine = gl.load_test(url, clients=20, rate=20, duration=0.5, types="task.*", progress=False)
    assert mine.iloc[0]["deliveries"] == mine.iloc[0]["expected_deliveries"] == 200


def test_several_runs_stack_with_pd_concat_and_keep_their_samples(
    lab: tuple[str, subprocess.Popen[bytes]],
) -> None:
    # The latency-against-clients pattern of notebook 06: one run per client count.
    url, _ = lab
    runs = [gl.load_test(url, clients=n, rate=20, duration=0.5, progress=False) for n in (5, 10)]
    sweep = pd.concat(runs, ignore_index=True)  # pandas compares the runs' attrs here
    assert list(sweep["clients"]) == [5, 10]
    assert list(sweep["deliveries"]) == [5 * 10, 10 * 10]
    assert {"generator_cpu_pct", "generator_saturated", "latency_p99_ms"} <= set(sweep.columns)
    assert sweep.set_index("clients").loc[10, "lost"] == 0
    # Each run keeps its samples and connect times, outside attrs.
    for n, run in zip((5, 10), runs, strict=True):
        assert len(run.samples) == n * 10 and sorted(run.samples["client"].unique()) == list(
            range(n)
        )
        assert len(run.connects) == n
        assert run.report.summary["clients"] == n
        json.dumps(run.attrs)  # plain values only, if any
    # A frame derived from a run is a plain DataFrame, without the samples.
    derived = runs[0][["clients", "latency_p50_ms"]].round(1)
    assert type(derived) is pd.DataFrame and not derived.attrs
    assert type(sweep) is pd.DataFrame


def test_refused_publishes_are_reported_not_counted_as_loss() -> None:
    for url, _ in _serve("--publish-rate", "20", "--publish-burst", "5"):
        done = _cli("--url", url, "--clients", "10", "--rate", "100", "--duration", "0.5")
        assert done.returncode == 1, done.stdout + done.stderr
        assert "warning: the server refused" in done.stdout
        assert "rate_limited" in done.stdout and "--publish-rate" in done.stdout
        assert "lost                 0 (0.00 %)" in done.stdout


def test_no_server_counts_every_client_as_failed() -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    df = gl.load_test(url, clients=5, duration=0.2, progress=False)
    s = df.iloc[0]
    assert s["connected"] == 0 and s["connect_failed"] == 5
    assert "connect failed" in s["first_error"]
    assert s["server_pid"] is None or pd.isna(s["server_pid"])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--clients", "0"], "invalid count 0"),
        (["--rate", "-1"], "invalid rate '-1'"),
        (["--duration", "0"], "duration must be positive, not '0'"),
        (["--url", "http://127.0.0.1:1/"], "http://127.0.0.1:1/"),
        (["--type", "Task"], "invalid event type pattern 'Task'"),
        (["--out", "samples.txt"], "invalid output file 'samples.txt'"),
        (["--processes", "5", "--clients", "2"], "invalid processes 5"),
    ],
)
def test_cli_bad_arguments_are_one_line(args: list[str], message: str) -> None:
    done = _cli("--url", f"ws://127.0.0.1:{free_port()}/ws/dashboard", *args)
    assert done.returncode == 2
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert message in lines[-1], done.stderr
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"clients": 0}, "invalid clients 0"),
        ({"clients": True}, "invalid clients True"),
        ({"rate": float("nan")}, "invalid rate nan"),
        ({"duration": -1}, "invalid duration -1"),
        ({"types": ["no spaces"]}, "invalid event type pattern 'no spaces'"),
        ({"out": "x.json"}, "invalid output file 'x.json'"),
    ],
)
def test_load_test_bad_arguments_raise_before_connecting(
    options: dict[str, object], message: str
) -> None:
    url = f"ws://127.0.0.1:{free_port()}/ws/dashboard"
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        gl.load_test(url, progress=False, **options)  # type: ignore[arg-type]


def test_load_test_is_exported_lazily() -> None:
    code = "import sys, gathering_lab as gl; gl.load_test; print('pandas' in sys.modules)"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert "load_test" in gl.__all__ and "load_test_async" in gl.__all__
    assert done.stdout.strip() == "False"  # loading the tool does not load pandas yet


class TestInProcessServer:
    @pytest.fixture
    def gathering_server_options(self) -> dict[str, object]:
        return {"max_connections_per_ip": None, "publish_rate": 0}

    def test_a_sync_test_runs_load_test_against_the_fixture_server(
        self, gathering_server: GatheringServer
    ) -> None:
        # The fixture's server has a thread of its own: the blocking load_test can reach it.
        df = gl.load_test(gathering_server.url, clients=10, rate=20, duration=0.5, progress=False)
        s = df.iloc[0]
        assert s["server_pid"] == os.getpid()
        assert s["deliveries"] == s["expected_deliveries"] == 10 * 10 and s["lost"] == 0
        assert len(gathering_server.events) == s["events_sent"] == 10


async def test_a_server_on_the_callers_loop_needs_the_awaitable(tmp_path: Path) -> None:
    # A lab started in a kernel serves on the kernel's loop: load_test would block it.
    from gathering_lab.testing import running_server

    async with running_server() as server:
        with pytest.raises(RuntimeError, match="load_test_async"):
            gl.load_test(server.url, clients=1, duration=0.1, progress=False)
        df = await gl.load_test_async(server.url, clients=50, rate=20, duration=0.5, progress=False)
    s = df.iloc[0]
    assert s["server_pid"] == os.getpid()
    assert s["deliveries"] == s["expected_deliveries"] == 50 * 10 and s["lost"] == 0


async def test_a_token_is_sent_by_every_client() -> None:
    from gathering_lab.auth import JWTAuth, mint_token
    from gathering_lab.testing import running_server

    secret = "load-test-secret-0123456789-abcdefghijklmnopqrstuvwxyz"
    async with running_server(auth=JWTAuth(secret, timeout=timeout(0.5))) as server:
        granted = mint_token(secret, "load", ["subscribe", "publish"])
        df = await gl.load_test_async(
            server.url, clients=20, rate=20, duration=0.5, token=granted, progress=False
        )
        assert df.iloc[0]["deliveries"] == df.iloc[0]["expected_deliveries"] == 20 * 10
        refused = await gl.load_test_async(server.url, clients=5, duration=0.2, progress=False)
    assert refused.iloc[0]["connected"] == 0 and refused.iloc[0]["connect_failed"] == 5
    assert "closed with 1008" in refused.iloc[0]["first_error"]


WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
WIDGET_STATE = "application/vnd.jupyter.widget-state+json"


def _cell_outputs(cell: Any) -> tuple[list[str], str]:
    """The widget model ids a cell displayed, and its stream text."""
    views = [
        o["data"][WIDGET_VIEW]["model_id"] for o in cell.outputs if WIDGET_VIEW in o.get("data", {})
    ]
    text = "".join(o.get("text", "") for o in cell.outputs if o["output_type"] == "stream")
    return views, text


@pytest.mark.slow
def test_in_a_notebook_the_progress_bars_are_widgets(
    lab: tuple[str, subprocess.Popen[bytes]],
) -> None:
    # A real kernel runs a tiny notebook (nbclient): load_test_async on the kernel's own lab,
    # the blocking load_test against another server (it runs in a thread), lab.replay.
    import nbformat
    from nbclient import NotebookClient

    url, _ = lab
    trace = ROOT / "notebooks" / "data" / "demo_trace.parquet"
    cells = [
        "import gathering_lab as gl\nlab = gl.start(port=0)",
        "run = await gl.load_test_async(lab.url, clients=3, rate=10, duration=0.3, drain=1)",
        f"other = gl.load_test({url!r}, clients=3, rate=10, duration=0.3, drain=1)",
        f"result = await lab.replay({str(trace)!r}, speed=None)",
        "print(int(run.at[0, 'deliveries']), int(other.at[0, 'deliveries']), result.published)",
        "lab.stop()",
    ]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    client = NotebookClient(
        nb, timeout=int(timeout(120)), kernel_name="python3", store_widget_state=True
    )
    client.execute()
    state = nb.metadata["widgets"][WIDGET_STATE]["state"]

    def bars(cell: Any) -> list[str]:
        """The descriptions of the tqdm widget bars a cell displayed (HBox: label, bar, text)."""
        views, text = _cell_outputs(cell)
        assert "it/s]" not in text and "%|" not in text, text  # no text bar instead
        found = []
        for model_id in views:
            box = state[model_id]
            assert box["model_name"] == "HBoxModel", box
            children = [state[c.removeprefix("IPY_MODEL_")] for c in box["state"]["children"]]
            assert [c["model_name"] for c in children] == [
                "HTMLModel",
                "FloatProgressModel",
                "HTMLModel",
            ]
            found.append(children[0]["state"]["value"])
        return found

    assert any("connect" in b for b in bars(nb.cells[1])), bars(nb.cells[1])
    assert any("connect" in b for b in bars(nb.cells[2])), bars(nb.cells[2])
    assert any("replay" in b for b in bars(nb.cells[3])), bars(nb.cells[3])
    delivered, other, published = _cell_outputs(nb.cells[4])[1].split()
    assert int(delivered) == int(other) == 3 * 3 and int(published) > 0


def _run_with_stderr(args: list[str], tty: bool) -> tuple[int, str, str]:
    """Run ``python -m gathering_lab ARGS`` with stderr on a pseudo-terminal or a pipe."""
    import fcntl
    import pty
    import struct
    import termios
    import threading

    command = [sys.executable, "-m", "gathering_lab", *args]
    if not tty:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=timeout(60), check=False
        )
        return done.returncode, done.stdout, done.stderr
    master, slave = pty.openpty()
    # A terminal of 100 columns (a fresh pty has 0, where tqdm draws an empty bar).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    process = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave
    )
    os.close(slave)
    reader.start()
    try:
        out, _ = process.communicate(timeout=timeout(60))
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        reader.join(timeout(10))
        os.close(master)
    return process.returncode, out.decode(), b"".join(chunks).decode(errors="replace")


@pytest.mark.parametrize("tty", [True, False], ids=["tty", "pipe"])
def test_cli_bars_on_a_terminal_only(lab: tuple[str, subprocess.Popen[bytes]], tty: bool) -> None:
    url, _ = lab
    trace = str(ROOT / "notebooks" / "data" / "demo_trace.parquet")
    load = ["load", "--url", url, "--clients", "5", "--rate", "10", "--duration", "0.5"]
    replay = ["replay", trace, "--url", url, "--as-fast-as-possible"]
    # load prints its summary table on stdout, replay one summary line on stderr.
    for args, bar, summary in ((load, "connect:", "deliveries"), (replay, "replay:", "published")):
        code, out, err = _run_with_stderr(args, tty)
        assert code == 0, out + err
        assert summary in out + err
        if tty:  # a terminal bar, redrawn in place, on stderr
            assert bar in err and "\r" in err and "100%|" in err, err
            assert "%|" not in out, out
        else:  # no bar at all: no carriage returns or bar glyphs in a log file
            assert "\r" not in err and "%|" not in err, err
            assert "%|" not in out and "\r" not in out, out
