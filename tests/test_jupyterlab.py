"""The quick-start notebook in a real JupyterLab, driven by headless Chromium.

The widget tests (test_widgets.py) drive the panels from Python with a recording comm; this
one proves the whole path a person takes: Run All leaves a live workbench (the lab is not
stopped), and a click on its Publish button in the browser (delivered through JupyterLab's
comm, on ipykernel 7's subshell thread where it applies) publishes an event that comes back
in the live log.
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

import pytest

# The browser helpers live with the dashboard's browser tests (tests/ is on sys.path).
from test_browser import CHROMIUM_ARGS, _chromium, _missing_browser

from gathering_lab.testing import free_port, timeout

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "01_quickstart.ipynb"
SCREENSHOT = ROOT / "docs" / "img" / "workbench.png"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def jupyterlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """JupyterLab on a free loopback port, over a copy of 01_quickstart (outputs cleared);
    yields the notebook's URL with its token."""
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
    port, token = free_port(), secrets.token_hex(16)
    log = (folder / "jupyter.log").open("w")
    server = subprocess.Popen(
        [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root",
            "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
            f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={folder}",
            "--LabApp.news_url=", "--ServerApp.open_browser=False",
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
        yield f"http://127.0.0.1:{port}/lab/tree/{NOTEBOOK.name}?token={token}"
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
            page.goto(jupyterlab)
            # The kernel is started and idle (the status bar says so) before running cells.
            expect(page.get_by_text("Python 3 (ipykernel) | Idle")).to_be_visible(timeout=ms)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()

            # Every cell ran (Run All does not stop the lab), the last one after a few
            # seconds of traffic, and no cell failed.
            outputs = page.locator(".jp-OutputArea-output")
            expect(outputs.get_by_text("shown in the live log")).to_be_visible(timeout=ms)
            expect(outputs.get_by_text("published 60 events")).to_be_visible(timeout=ms)
            expect(
                page.locator(".jp-OutputArea-output .jp-RenderedText.jp-mod-error")
            ).to_have_count(0)

            # A person's click: type JSON into the Publish tab's editor, press Publish; the
            # event comes back in the live log.
            workbench = page.locator(".jp-OutputArea-output").filter(has_text="GatheRing workbench")
            editor = workbench.locator(".widget-textarea textarea").first
            editor.fill('{"title": "clicked in JupyterLab"}')
            workbench.get_by_role("button", name="Publish").click()
            expect(workbench.get_by_text("published task.created")).to_be_visible(timeout=ms)
            expect(workbench.get_by_text("clicked in JupyterLab").first).to_be_visible(timeout=ms)
            expect(workbench.get_by_role("button", name="Export CSV")).to_be_visible()
            if os.environ.get("UPDATE_SCREENSHOTS"):
                workbench.scroll_into_view_if_needed()
                workbench.screenshot(path=str(SCREENSHOT))
        finally:
            browser.close()
