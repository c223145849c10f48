"""The quick-start notebook in a real JupyterLab, driven by headless Chromium.

The widget tests (test_widgets.py) drive the panels from Python with a recording comm; these
prove the whole path a person takes:

- Run All (of a copy without outputs or widget state) leaves a live workbench (the lab is
  not stopped) whose chart draws events/s and whose grid shows rows that a header click
  sorts and typing filters, and a click on its Publish button in the browser (delivered
  through JupyterLab's comm, on ipykernel 7's subshell thread where it applies) publishes
  an event that comes back in the grid;
- the notebook as saved, opened without running anything, shows the widgets from its saved
  widget state (not their text reprs).

Skips like the other browser tests when chromium is missing, except in CI where it fails.
``UPDATE_SCREENSHOTS=1`` rewrites ``docs/img/workbench.png``.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbformat.sign import NotebookNotary

# The browser helpers live with the dashboard's browser tests (tests/ is on sys.path).
from test_browser import CHROMIUM_ARGS, _chromium, _missing_browser

from gathering_lab.testing import free_port, timeout

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
SCREENSHOT = ROOT / "docs" / "img" / "workbench.png"
pytestmark = pytest.mark.slow


#: The series colours of rate_chart.js, as RGB.
CHART_COLOURS = [(0x09, 0x69, 0xDA), (0x1A, 0x7F, 0x37), (0xCF, 0x22, 0x2E), (0x9A, 0x67, 0x00)]
# How many pixels of the chart's canvas have a series colour (the lines drawn).
COUNT_LINE_PIXELS = """([canvas, colours]) => {
  const { data } = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height);
  let count = 0;
  for (let i = 0; i < data.length; i += 4) {
    if (data[i + 3] < 128) continue;
    if (colours.some(([r, g, b]) => Math.abs(data[i] - r) + Math.abs(data[i + 1] - g)
                                    + Math.abs(data[i + 2] - b) < 60)) count++;
  }
  return count;
}"""


def _line_pixels(page: Any, chart: Any) -> int:
    canvas = chart.locator("canvas").first.element_handle()
    return int(page.evaluate(COUNT_LINE_PIXELS, [canvas, CHART_COLOURS]))


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """JupyterLab on a free loopback port over two copies of 01_quickstart: one with outputs
    and widget state cleared (to Run All), one as saved (``saved/``, to open). Yields the
    URL of a notebook with ``{path}`` to fill in (``url.format(path=...)``)."""
    problem = _missing_browser()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"the JupyterLab test cannot run in CI: {problem}")
        pytest.skip(problem)
    folder = tmp_path_factory.mktemp("lab")
    notebook = json.loads(NOTEBOOK.read_text())
    notebook["metadata"].pop("widgets", None)
    for cell in notebook["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    (folder / NOTEBOOK.name).write_text(json.dumps(notebook))
    # The saved copy is trusted, as `jupyter trust` does (JupyterLab renders widget outputs
    # only in a trusted notebook: one you ran or trusted); the signatures stay in `folder`.
    notary = [f"--NotebookNotary.{name}={folder / name}" for name in ("db_file", "secret_file")]
    signer = NotebookNotary(
        db_file=str(folder / "db_file"), secret_file=str(folder / "secret_file")
    )
    saved = nbformat.read(NOTEBOOK, as_version=4)
    signer.sign(saved)
    (folder / "saved").mkdir()
    (folder / "saved" / NOTEBOOK.name).write_bytes(NOTEBOOK.read_bytes())
    port, token = free_port(), secrets.token_hex(16)
    log = (folder / "jupyter.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
            "--LabApp.news_url=", "--ServerApp.open_browser=False", *notary,
            f"--LabApp.workspaces_dir={folder / 'workspaces'}",
        ],
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + timeout(60)
        while True:  # bounded: until the port answers or the deadline
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"JupyterLab did not start: {(folder / 'jupyter.log').read_text()}")
                time.sleep(0.1)
        # ?reset: each page opens only its notebook, not the ones of a previous test.
        yield f"http://127.0.0.1:{port}/lab/tree/{{path}}?reset&token={token}"
    finally:
        server.terminate()
        server.wait(timeout(20))
        log.close()


def test_the_workbench_works_in_jupyterlab(jupyterlab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ms = timeout(60) * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(jupyterlab.format(path=NOTEBOOK.name))
            # The kernel is started and idle (the status bar says so) before running cells.
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=ms)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            # Every cell ran (Run All does not stop the lab), the last one after a few
            # seconds of traffic, and no cell failed.
            outputs = page.locator(".jp-OutputArea-output")
            expect(outputs.get_by_text("shown in the grid")).to_be_visible(timeout=ms)
            expect(outputs.get_by_text("published 60 events")).to_be_visible(timeout=ms)
            expect(
                page.locator(".jp-OutputArea-output .jp-RenderedText.jp-mod-error")
            ).to_have_count(0)
            workbench = page.locator(".jp-OutputArea-output").filter(has_text="GatheRing workbench")

            # The chart: a line per type, drawn on its canvas, and the latest rates as text.
            chart = workbench.locator(".gl-rate-chart")
            for kind in ("task.created", "agent.started", "memory.created"):
                expect(chart.locator(f'.gl-rate-value[data-type="{kind}"]')).to_be_visible()
            assert int(chart.get_attribute("data-points") or 0) >= 10
            assert _line_pixels(page, chart) > 100  # lines drawn, not an empty frame

            # The grid: rows, newest first; a header click sorts, typing filters.
            grid = workbench.locator(".gl-grid")
            rows = grid.locator("tbody tr")
            expect(rows).to_have_count(61, timeout=ms)  # 61 events, fewer than the 100 shown
            seq = grid.locator("tbody tr td:nth-child(1)")

            def seqs() -> list[int]:
                return [int(text) for text in seq.all_inner_texts()]

            newest_first = seqs()
            assert newest_first == sorted(newest_first, reverse=True)
            header = grid.locator('th[data-column="seq"]')
            header.click()
            expect(header).to_have_attribute("aria-sort", "ascending")
            assert seqs() == sorted(newest_first)
            header.click()
            expect(header).to_have_attribute("aria-sort", "descending")
            assert seqs() == newest_first
            grid.locator('th[data-column="type"]').click()
            kinds = grid.locator("tbody tr td:nth-child(3)")
            assert kinds.all_inner_texts() == sorted(kinds.all_inner_texts())

            grid.get_by_role("searchbox", name="filter rows").fill("agent.started")
            expect(rows).to_have_count(20)  # agent.started: every third of the 60
            assert set(kinds.all_inner_texts()) == {"agent.started"}
            expect(grid.locator(".gl-grid-status")).to_contain_text(
                "containing 'agent.started'", timeout=ms
            )  # the kernel searched the frame too
            grid.get_by_role("searchbox", name="filter rows").fill("")
            expect(rows).to_have_count(61)

            # A person's click: type JSON into the Publish tab's editor, press Publish; the
            # event comes back in the grid.
            editor = workbench.locator(".widget-textarea textarea").first
            editor.fill('{"title": "clicked in JupyterLab"}')
            workbench.get_by_role("button", name="Publish").click()
            expect(workbench.get_by_text("published task.created")).to_be_visible(timeout=ms)
            expect(grid.get_by_text("clicked in JupyterLab").first).to_be_visible(timeout=ms)
            expect(rows).to_have_count(62)
            expect(workbench.get_by_role("button", name="Export CSV")).to_be_visible()
            if os.environ.get("UPDATE_SCREENSHOTS"):
                grid.locator('th[data-column="seq"]').click()  # newest first again
                grid.locator('th[data-column="seq"]').click()
                news = page.get_by_role("button", name="No", exact=True)
                if news.count():  # "Would you like to get notified about Jupyter news?"
                    news.click()
                page.set_viewport_size({"width": 1500, "height": 2000})  # all of it at once
                workbench.scroll_into_view_if_needed()
                workbench.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()


def test_the_saved_notebook_shows_its_widgets_without_running(jupyterlab: str) -> None:
    from playwright.sync_api import expect, sync_playwright

    ms = timeout(60) * 1000
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=_chromium(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(jupyterlab.format(path=f"saved/{NOTEBOOK.name}"))
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=ms)
            workbench = page.locator(".jp-OutputArea-output:has(.gl-grid)")
            expect(workbench).to_have_count(1, timeout=ms)
            workbench.scroll_into_view_if_needed()
            expect(workbench.get_by_text("GatheRing workbench")).to_be_visible()
            # The grid and the chart as they were at the end of the saved run.
            expect(workbench.locator(".gl-grid tbody tr")).to_have_count(61, timeout=ms)
            chart = workbench.locator(".gl-rate-chart")
            expect(chart.locator('.gl-rate-value[data-type="task.created"]')).to_be_visible()
            assert _line_pixels(page, chart) > 100
            expect(workbench.get_by_role("button", name="Publish")).to_be_visible()
            # Widgets, not their text reprs or an error.
            page_text = page.locator(".jp-Notebook").inner_text()
            for text in ("Error displaying widget", "Loading widget", "Workbench(children"):
                assert text not in page_text, text
            assert "VBox(children" not in page_text
            # The outputs are the saved ones (nothing ran them again).
            outputs = page.locator(".jp-OutputArea-output")
            expect(outputs.get_by_text("published 60 events")).to_be_visible()
        finally:
            browser.close()
