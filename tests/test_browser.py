"""The browser dashboard and gathering-ws.js, in headless Chromium against a real server.

Playwright's async API drives Debian's chromium (``/usr/bin/chromium``, or
``GATHERING_LAB_CHROMIUM``) on the test's own event loop, next to a server from
``running_server()``. Without chromium or playwright these tests skip, except in
CI (``CI`` set) where they fail. ``UPDATE_SCREENSHOTS=1`` rewrites
``docs/img/dashboard.png``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from gathering_lab.events import Event
from gathering_lab.testing import capture_events, running_server, timeout

pytestmark = pytest.mark.asyncio(loop_scope="module")

ROOT = Path(__file__).resolve().parent.parent
SCREENSHOT = ROOT / "docs" / "img" / "dashboard.png"
FOREIGN_HOST = "foreign.test"  # mapped to 127.0.0.1 inside the browser only
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-proxy-server",
    f"--host-resolver-rules=MAP {FOREIGN_HOST} 127.0.0.1",
]
ROWS = "[data-testid=event-row]"


def _chromium() -> str | None:
    explicit = os.environ.get("GATHERING_LAB_CHROMIUM")
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    for candidate in ("chromium", "chromium-browser"):
        found = shutil.which(candidate)
        if found:
            return found
    return "/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None


def _missing_browser() -> str | None:
    try:
        import playwright.async_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing: pip install -e '.[dev]'"
    if _chromium() is None:
        return "chromium is missing: apt-get install chromium (or set GATHERING_LAB_CHROMIUM)"
    return None


def ms(seconds: float) -> float:
    """A Playwright timeout in milliseconds, scaled like every other test timeout."""
    return timeout(seconds) * 1000


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def browser() -> AsyncIterator[Any]:
    problem = _missing_browser()
    if problem:
        if os.environ.get("CI"):
            pytest.fail(f"browser tests cannot run in CI: {problem}")
        pytest.skip(problem)
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(
            executable_path=_chromium(), args=CHROMIUM_ARGS, timeout=ms(30)
        )
        yield instance
        await instance.close()


@pytest_asyncio.fixture(loop_scope="module")
async def page(browser: Any) -> AsyncIterator[Any]:
    context = await browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(ms(10))
    page = await context.new_page()
    errors: list[Any] = []
    page.on("pageerror", lambda error: errors.append(error))
    yield page
    await context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


async def open_dashboard(page: Any, server: Any, query: str = "client_id=browser") -> None:
    from playwright.async_api import expect

    await page.goto(f"{server.http_url}/dashboard?{query}")
    await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "connected")


async def rows(page: Any) -> list[dict[str, str]]:
    """The event rows shown, top (newest) first: type, seq, data text."""
    result: list[dict[str, str]] = await page.eval_on_selector_all(
        ROWS,
        """els => els.map(e => ({type: e.dataset.type, seq: e.dataset.seq,
            data: e.querySelector('.event-data').textContent}))""",
    )
    return result


async def wait_rows(page: Any, count: int) -> None:
    await page.wait_for_function(
        f"document.querySelectorAll('{ROWS}').length >= {count}", timeout=ms(10)
    )


async def test_dashboard_loads_from_the_server_and_connects(page: Any) -> None:
    from playwright.async_api import expect

    requests: list[str] = []
    page.on("request", lambda request: requests.append(request.url))
    async with running_server() as server:
        await open_dashboard(page, server, "client_id=browser-1")

        await expect(page.get_by_test_id("status")).to_have_text("Connected as browser-1")
        greeting = page.locator("[data-testid=system-row][data-type='connection.established']")
        await expect(greeting).to_contain_text("Connected to GatheRing WebSocket")
        await expect(page.locator("#url")).to_have_value(server.url)
        # The stats panel polls /admin/websocket/stats and lists this page's client.
        await expect(page.locator("#stat-clients tr[data-client-id='browser-1']")).to_have_count(1)
        await expect(page.locator("#stat-active")).to_have_text("1")
        # Self-contained: everything the page loaded came from the server itself.
        foreign = [url for url in requests if not url.startswith((server.http_url, "data:"))]
        assert foreign == []
        assert f"{server.http_url}/static/gathering-ws.js" in requests

        await page.goto(server.http_url + "/")  # the root serves the same page
        await expect(page.get_by_test_id("status")).to_have_attribute("data-state", "connected")


async def test_events_published_from_python_appear_newest_first(page: Any) -> None:
    from playwright.async_api import expect

    async with running_server() as server:
        await open_dashboard(page, server)
        for n in range(20):
            await server.bus.publish(
                Event(type="task.created", data={"n": n}, source_agent_id=1, circle_id=2)
            )
        await server.bus.publish(
            Event(type="agent.started", data={"name": "<img src=x onerror=window.__xss=1>"})
        )
        await server.bus.publish(Event(type="task.failed", data={"task_id": 7, "error": "boom"}))
        await wait_rows(page, 22)

        shown = await rows(page)
        assert [int(r["seq"]) for r in shown] == list(range(22, 0, -1))
        assert [r["type"] for r in shown[:3]] == ["task.failed", "agent.started", "task.created"]
        assert json.loads(shown[2]["data"]) == {"n": 19}
        assert json.loads(shown[-1]["data"]) == {"n": 0}
        # Data is shown as text, never as HTML.
        assert "<img src=x onerror=window.__xss=1>" in shown[1]["data"]
        assert await page.evaluate("window.__xss") is None
        first = page.locator(ROWS).first
        await expect(first.locator("time")).to_have_text(re.compile(r"^\d\d:\d\d:\d\d\.\d{3}$"))
        assert (await first.locator("time").get_attribute("datetime")).endswith("Z")
        # task.failed is in the default notification list: a toast pops up.
        toast = page.locator("[data-testid=toast][data-type='task.failed']")
        await expect(toast).to_contain_text("boom")
        await expect(page.get_by_test_id("event-count")).to_have_text("22 received · showing 23")


async def test_a_fast_stream_keeps_the_dom_capped(page: Any) -> None:
    from playwright.async_api import expect

    async with running_server() as server:
        await open_dashboard(page, server, "client_id=fast&max=50")
        total = 3000
        for start in range(0, total, 250):
            for n in range(start, start + 250):
                server.bus.publish_nowait(Event(type="agent.tool.executed", data={"n": n}))
            await asyncio.sleep(0)  # let the batch go out, as a busy producer would
        await expect(page.get_by_test_id("event-count")).to_have_text(
            f"{total} received · showing 50", timeout=ms(20)
        )
        shown = await rows(page)
        assert len(shown) == 50  # 49 newest events + the greeting fell off the end
        assert json.loads(shown[0]["data"]) == {"n": total - 1}
        assert [int(r["seq"]) for r in shown] == list(range(total, total - 50, -1))


async def test_filters_are_applied_by_the_server(page: Any) -> None:
    from playwright.async_api import expect

    frames: list[str] = []
    page.on("websocket", lambda ws: ws.on("framereceived", lambda f: frames.append(f)))
    async with running_server() as server:
        await open_dashboard(page, server, "client_id=filtered")
        await page.get_by_label("Event types", exact=True).fill("task.*")
        await page.locator("#filter-circle").fill("1")
        await page.get_by_role("button", name="Apply").click()
        await expect(page.get_by_test_id("active-filters")).to_have_text(
            "Server filter: task.* · circle 1 · any project"
        )
        (session,) = server.manager.sessions
        assert session.filters.event_types == ("task.*",) and session.filters.circle_id == 1

        await server.bus.publish(Event(type="agent.started", data={"no": 1}, circle_id=1))
        await server.bus.publish(Event(type="task.created", data={"no": 2}, circle_id=2))
        await server.bus.publish(Event(type="task.created", data={"yes": 1}, circle_id=1))
        await server.bus.publish(Event(type="task.conflict.detected", data={"yes": 2}, circle_id=1))
        await wait_rows(page, 2)

        assert [(r["type"], json.loads(r["data"])) for r in await rows(page)] == [
            ("task.conflict.detected", {"yes": 2}),
            ("task.created", {"yes": 1}),
        ]
        # Server-side: the filtered-out events never reached the browser at all.
        events = [json.loads(f) for f in frames if '"seq"' in f and '"event_id"' in f]
        assert [e["data"] for e in events] == [{"yes": 1}, {"yes": 2}]

        await page.get_by_role("button", name="Show all").click()
        await expect(page.get_by_test_id("active-filters")).to_have_text(
            "Server filter: all types · any circle · any project"
        )
        await server.bus.publish(Event(type="agent.started", data={"now": "yes"}))
        await wait_rows(page, 3)


async def test_reconnects_and_replays_what_it_missed(page: Any) -> None:
    from playwright.async_api import expect

    status = page.get_by_test_id("status")
    async with running_server() as server:
        await open_dashboard(page, server, "client_id=resumer")
        await server.bus.publish(Event(type="task.created", data={"n": 1}))
        await wait_rows(page, 1)

        for session in server.manager.sessions:  # drop the connection, keep the server
            await session.connection.close(1012, "service restart")
        await expect(status).to_have_text(re.compile(r"Reconnecting in \d+ s \(attempt 1\)"))
        await server.bus.publish(Event(type="task.created", data={"n": 2}))
        await server.bus.publish(Event(type="task.created", data={"n": 3}))

        await expect(status).to_have_text("Connected as resumer", timeout=ms(10))
        await wait_rows(page, 3)
        resumed = page.locator("[data-testid=system-row][data-type='resumed']")
        await expect(resumed).to_contain_text("2 missed events replayed")
        await server.bus.publish(Event(type="task.created", data={"n": 4}))
        await wait_rows(page, 4)
        assert [json.loads(r["data"])["n"] for r in await rows(page)] == [4, 3, 2, 1]
        assert await page.get_by_test_id("notice").is_hidden()


async def test_reconnects_after_a_server_restart_and_says_so(page: Any) -> None:
    from playwright.async_api import expect

    status = page.get_by_test_id("status")
    async with running_server() as first:
        port = first.port
        await open_dashboard(page, first, "client_id=survivor")
        await first.bus.publish(Event(type="agent.started", data={"life": 1}))
        await wait_rows(page, 1)
    # The first server is gone: its clients got 1001 and the page starts backing off.
    await expect(status).to_have_text(re.compile(r"Reconnecting in \d+ s"))
    async with running_server(port=port) as second:
        await second.bus.publish(Event(type="agent.started", data={"life": 2}))
        await expect(status).to_have_text("Connected as survivor", timeout=ms(15))
        await expect(page.get_by_test_id("notice")).to_contain_text("The server restarted")
        restarted = page.locator("[data-testid=system-row][data-type='server.restarted']")
        await expect(restarted).to_have_count(1)
        await second.bus.publish(Event(type="agent.started", data={"life": 3}))
        await wait_rows(page, 3)
        # What the new server published before the page came back was replayed, in order.
        assert [json.loads(r["data"])["life"] for r in await rows(page)] == [3, 2, 1]


FOREIGN_PAGE = """<!doctype html><title>foreign</title><script>
window.result = null; window.messages = [];
const ws = new WebSocket(%s);
ws.onmessage = (e) => window.messages.push(e.data);
ws.onclose = (e) => { window.result = {code: e.code, reason: e.reason}; };
</script>"""


@pytest.fixture
def foreign_site() -> Iterator[tuple[ThreadingHTTPServer, dict[str, bytes]]]:
    pages: dict[str, bytes] = {}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            body = pages.get(self.path)
            self.send_response(200 if body else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.end_headers()
            self.wfile.write(body or b"not found")

        def log_message(self, *args: Any) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd, pages
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout(5))


async def test_a_foreign_origin_is_refused(
    page: Any, foreign_site: tuple[ThreadingHTTPServer, dict[str, bytes]]
) -> None:
    httpd, pages = foreign_site
    async with running_server() as server:
        pages["/"] = (FOREIGN_PAGE % json.dumps(server.url + "?client_id=intruder")).encode()
        origin = f"http://{FOREIGN_HOST}:{httpd.server_address[1]}"
        await page.goto(origin + "/")
        await page.wait_for_function("window.result !== null", timeout=ms(10))
        assert await page.evaluate("window.result") == {
            "code": 1008,
            "reason": "Unauthorized origin",
        }
        assert await page.evaluate("window.messages") == []  # closed before any data
        assert server.manager.rejected_connections == 1
        assert server.manager.total_connections == 0


async def test_the_publish_form_validates_and_publishes(page: Any) -> None:
    from playwright.async_api import expect

    async with running_server() as server:
        await open_dashboard(page, server, "client_id=publisher")
        with capture_events(server.bus) as captured:
            await page.get_by_label("Event type", exact=True).fill("deploy.finished")
            await page.get_by_label("Data (JSON object)").fill('{"version": "1.2",}')
            await expect(page.get_by_test_id("publish-error")).to_contain_text(
                "data is not valid JSON"
            )
            await page.get_by_role("button", name="Publish").click()
            await page.get_by_label("Data (JSON object)").fill("[1, 2]")
            await expect(page.get_by_test_id("publish-error")).to_contain_text(
                "data must be a JSON object"
            )
            await page.get_by_label("Event type", exact=True).fill("Deploy Finished")
            await expect(page.get_by_test_id("publish-error")).to_contain_text(
                "must be dotted lowercase words"
            )
            assert captured == []

            await page.get_by_label("Event type", exact=True).fill("deploy.finished")
            await page.get_by_label("Data (JSON object)").fill('{"version": "1.2", "ok": true}')
            await expect(page.get_by_test_id("publish-error")).to_be_empty()
            await page.get_by_label("Agent id").fill("7")
            await page.locator("#publish-circle").fill("1")
            await page.locator("#publish-project").fill("alpha")
            await page.get_by_role("button", name="Publish").click()
            await expect(page.get_by_test_id("publish-result")).to_have_text(
                re.compile(r"^Published evt_[0-9a-f]{24} \(seq 1\)$")
            )
        (event,) = captured
        assert event.type_name == "deploy.finished"
        assert event.data == {"version": "1.2", "ok": True}
        assert (event.source_agent_id, event.circle_id, event.project_id) == (7, 1, "alpha")
        # The page sees its own event like any other subscriber.
        await wait_rows(page, 1)
        assert (await rows(page))[0]["type"] == "deploy.finished"


async def test_the_dashboard_authenticates_with_a_token(page: Any) -> None:
    from playwright.async_api import expect

    auth = pytest.importorskip("gathering_lab.auth", reason="server-side auth is not in this tree")
    secret = "dashboard-test-secret-of-32-bytes!"
    status = page.get_by_test_id("status")
    async with running_server(auth=auth.JWTAuth(secret, timeout=timeout(0.5))) as server:
        await page.goto(f"{server.http_url}/dashboard?client_id=dash&autoconnect=0")
        await page.get_by_role("button", name="Connect", exact=True).click()
        # No token, no auth frame: refused with 1008, and not retried.
        await expect(status).to_have_text("Disconnected: 1008 authentication timeout")
        assert server.manager.total_connections == 0

        token = auth.mint_token(secret, "dash", roles=["subscribe", "publish", "admin"])
        await page.get_by_label("Token").fill(token)
        await page.get_by_role("button", name="Connect", exact=True).click()
        await expect(status).to_have_text("Connected as dash")
        assert token not in page.url
        # The stats need the admin role: the page sends the token as a Bearer header.
        await expect(page.locator("#stat-clients tr[data-client-id='dash']")).to_have_count(1)
        await server.bus.publish(Event(type="task.created", data={"authenticated": True}))
        await wait_rows(page, 1)


def demo_events() -> list[Event]:
    """What a small team of agents says while working (made now, so timestamps are now)."""
    return [
        Event(type="circle.created", data={"circle_id": 1, "name": "docs-team"}, circle_id=1),
        Event(
            type="agent.started",
            data={"agent_id": 1, "name": "Alice", "competencies": ["python", "react"]},
            source_agent_id=1,
            circle_id=1,
        ),
        Event(type="circle.member.added", data={"agent_id": 2, "name": "Bob"}, circle_id=1),
        Event(
            type="task.created",
            data={"task_id": 42, "title": "Write the deployment guide", "priority": "high"},
            circle_id=1,
            project_id=3,
        ),
        Event(type="task.assigned", data={"task_id": 42, "agent_id": 1}, source_agent_id=1),
        Event(
            type="conversation.message",
            data={"from": "Alice", "to": "Bob", "text": "Can you review the nginx part?"},
            source_agent_id=1,
            circle_id=1,
        ),
        Event(
            type="memory.shared",
            data={"memory_id": 9, "key": "nginx.timeouts", "with": [2]},
            source_agent_id=1,
        ),
        Event(
            type="task.failed",
            data={"task_id": 43, "error": "TimeoutError: review took longer than 300 s"},
            source_agent_id=2,
            circle_id=1,
            project_id=3,
        ),
        Event(
            type="task.completed",
            data={"task_id": 42, "result": "docs/deploy.md", "duration_s": 812.4},
            source_agent_id=1,
            circle_id=1,
            project_id=3,
        ),
    ]


async def test_screenshot_with_demo_events(page: Any, tmp_path: Path) -> None:
    from playwright.async_api import expect

    async with running_server() as server:
        await open_dashboard(page, server, "client_id=dashboard-demo")
        events = demo_events()
        for event in events:
            await server.bus.publish(event)
        await wait_rows(page, len(events))
        await expect(page.locator("[data-testid=toast]")).to_have_count(1)
        # The stats panel catches up with the server (it polls every 2 s).
        await expect(page.locator("#stat-broadcasts")).to_have_text(str(len(events)))
        cells = page.locator("#stat-clients tr[data-client-id='dashboard-demo'] td")
        await expect(cells).to_have_text(["dashboard-demo", str(len(events) + 1), "0"])
        target = tmp_path / "dashboard.png"
        await page.screenshot(path=str(target), full_page=True)
        assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert target.stat().st_size > 20_000  # a rendered page, not a blank one
        if os.environ.get("UPDATE_SCREENSHOTS"):
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(target, SCREENSHOT)


# gathering-ws.js on its own, against a scripted fake WebSocket (deterministic, no server)

FAKE_SOCKET = """
const m = await import('/static/gathering-ws.js');
class FakeWS {
  static all = [];
  constructor(url) { this.url = url; this.readyState = 0; this.sent = []; FakeWS.all.push(this); }
  send(data) { this.sent.push(JSON.parse(data)); }
  close(code, reason) { this.readyState = 3; this.closedWith = [code, reason]; }
  open() { this.readyState = 1; this.onopen?.({}); }
  receive(message) { this.onmessage?.({data: JSON.stringify(message)}); }
  drop(code = 1006, reason = '') {
    this.readyState = 3;
    this.onclose?.({code, reason, wasClean: false});
  }
}
const until = async (condition, ms = 5000) => {
  const end = Date.now() + ms;
  while (!condition()) {
    if (Date.now() > end) throw new Error('timed out: ' + condition);
    await new Promise((r) => setTimeout(r, 5));
  }
};
const hello = (epoch, seq, id = 'c1') =>
  ({type: 'connection.established', data: {client_id: id, epoch, seq}});
const ev = (seq, epoch = 'e1', type = 'task.created') =>
  ({type, data: {seq}, seq, epoch, event_id: 'evt_' + seq});
"""


async def run_js(page: Any, body: str) -> Any:
    """Run ``body`` (an async function body that may use FAKE_SOCKET's helpers) in the page."""
    return await page.evaluate(f"async () => {{ {FAKE_SOCKET}\n{body} }}")


@pytest_asyncio.fixture(loop_scope="module")
async def module_page(page: Any) -> AsyncIterator[Any]:
    """A page on a live server (to import /static/gathering-ws.js) that does not connect."""
    async with running_server() as server:
        await page.goto(f"{server.http_url}/dashboard?autoconnect=0&stats_ms=0")
        yield page


async def test_client_backoff_follows_the_guide(module_page: Any) -> None:
    delays = await run_js(module_page, "return [1, 2, 3, 4, 5, 6].map((r) => m.backoffDelay(r));")
    assert delays == [2000, 4000, 8000, 16000, 30000, 30000]


async def test_client_sends_auth_first_then_filters_then_resume(module_page: Any) -> None:
    result = await run_js(
        module_page,
        """
        const statuses = [];
        const s = new m.GatheringSocket({url: 'ws://h/ws/dashboard', clientId: 'me',
          token: async () => 'sekret', WebSocket: FakeWS, baseDelayMs: 5,
          filters: {event_types: ['task.*']}, onStatus: (x) => statuses.push(x.status)});
        await until(() => FakeWS.all.length === 1);
        const first = FakeWS.all[0];
        first.open();
        first.receive(hello('e1', 3));
        first.receive({type: 'error', data: {code: 'invalid_message', message: 'auth off'}});
        first.receive({type: 'subscribed', data: {}});
        first.drop(1001, 'going away');
        await until(() => FakeWS.all.length === 2);
        const second = FakeWS.all[1];
        second.open();
        second.receive(hello('e1', 5));
        s.close();
        return {url: first.url, sent1: first.sent.map((x) => x.type),
                token: first.sent[0].data.token, sent2: second.sent, statuses,
                retries: s.retries};
        """,
    )
    assert result["url"] == "ws://h/ws/dashboard?client_id=me"
    assert result["sent1"] == ["auth", "subscribe"]
    assert result["token"] == "sekret"
    assert [m["type"] for m in result["sent2"]] == ["auth", "subscribe", "resume"]
    assert result["sent2"][2]["data"] == {"since_seq": 3, "epoch": "e1"}
    assert result["statuses"] == [
        "connecting",
        "connected",
        "reconnecting",
        "connecting",
        "connected",
        "disconnected",
    ]
    assert result["retries"] == 0  # reset once connected


async def test_client_merges_replay_and_live_events_in_order(module_page: Any) -> None:
    result = await run_js(
        module_page,
        """
        const got = [], acks = [];
        const s = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS,
          baseDelayMs: 5, onEvent: (e) => got.push(e.seq), onResumed: (a) => acks.push(a)});
        await until(() => FakeWS.all.length === 1);
        const a = FakeWS.all[0];
        a.open(); a.receive(hello('e1', 9)); a.receive(ev(10)); a.receive(ev(10));
        a.drop();
        await until(() => FakeWS.all.length === 2);
        const b = FakeWS.all[1];
        b.open(); b.receive(hello('e1', 13));
        // Live events published after we joined come first, then the replay, then the ack.
        b.receive(ev(14)); b.receive(ev(11)); b.receive(ev(12)); b.receive(ev(13));
        b.receive({type: 'resumed', data: {count: 3, gap: false, seq: 13, epoch: 'e1'}});
        b.receive(ev(14)); b.receive(ev(15));
        s.close();
        return {got, acks: acks.length, resume: b.sent.find((x) => x.type === 'resume').data};
        """,
    )
    assert result["resume"] == {"since_seq": 10, "epoch": "e1"}
    assert result["got"] == [10, 11, 12, 13, 14, 15]  # once each, in seq order
    assert result["acks"] == 1


async def test_client_reports_a_restart_and_resumes_from_zero(module_page: Any) -> None:
    result = await run_js(
        module_page,
        """
        const restarts = [], got = [];
        const s = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS,
          baseDelayMs: 5, onRestart: (r) => restarts.push(r), onEvent: (e) => got.push(e.seq)});
        await until(() => FakeWS.all.length === 1);
        const a = FakeWS.all[0];
        a.open(); a.receive(hello('old', 0)); a.receive(ev(1, 'old')); a.receive(ev(2, 'old'));
        a.drop(1001);
        await until(() => FakeWS.all.length === 2);
        const b = FakeWS.all[1];
        b.open(); b.receive(hello('new', 1));
        b.receive(ev(1, 'new'));
        b.receive({type: 'resumed', data: {count: 1, gap: false, seq: 1, epoch: 'new'}});
        b.receive(ev(2, 'new'));
        s.close();
        const resume = b.sent.find((x) => x.type === 'resume').data;
        return {restarts, got, resume, epoch: s.epoch};
        """,
    )
    assert result["restarts"] == [{"previousEpoch": "old", "epoch": "new", "lastSeq": 2}]
    assert result["resume"] == {"since_seq": 0, "epoch": "new"}
    assert result["got"] == [1, 2, 1, 2]
    assert result["epoch"] == "new"


async def test_client_heartbeat_drops_a_dead_connection(module_page: Any) -> None:
    result = await run_js(
        module_page,
        """
        const closes = [];
        const s = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS,
          heartbeatMs: 30, pongTimeoutMs: 30, baseDelayMs: 5, onClose: (c) => closes.push(c)});
        await until(() => FakeWS.all.length === 1);
        const a = FakeWS.all[0];
        a.open(); a.receive(hello('e1', 0));
        await until(() => a.sent.some((x) => x.type === 'ping'));
        const ping = a.sent.find((x) => x.type === 'ping');
        a.receive({type: 'pong', id: ping.id});  // answered: still alive
        await until(() => FakeWS.all.length === 2);  // the next ping got no pong
        s.close();
        const pings = a.sent.filter((x) => x.type === 'ping').length;
        return {closes, closedWith: a.closedWith, pings};
        """,
    )
    assert result["closedWith"] == [4000, "heartbeat timeout"]
    assert result["closes"][0]["code"] == 4000 and result["closes"][0]["willRetry"] is True
    assert result["pings"] >= 2


async def test_client_gives_up_and_never_retries_a_policy_close(module_page: Any) -> None:
    result = await run_js(
        module_page,
        """
        const last = (list) => list[list.length - 1];
        const s1 = [];
        const a = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS,
          maxRetries: 2, baseDelayMs: 1, onStatus: (x) => s1.push(x)});
        await until(() => FakeWS.all.length === 1); FakeWS.all[0].drop();
        await until(() => FakeWS.all.length === 2); FakeWS.all[1].drop();
        await until(() => FakeWS.all.length === 3); FakeWS.all[2].drop();
        await until(() => a.status === 'disconnected');
        const s2 = [];
        const b = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS,
          baseDelayMs: 1, onStatus: (x) => s2.push(x)});
        await until(() => FakeWS.all.length === 4);
        FakeWS.all[3].open(); FakeWS.all[3].drop(1008, 'Unauthorized origin');
        await new Promise((r) => setTimeout(r, 50));
        const c = new m.GatheringSocket({url: 'ws://h/ws/dashboard', WebSocket: FakeWS});
        await until(() => FakeWS.all.length === 5);
        FakeWS.all[4].open(); FakeWS.all[4].receive(hello('e1', 0));
        c.close();
        await new Promise((r) => setTimeout(r, 50));
        let rejected = null;
        try { await c.publish({type: 'task.created'}); } catch (e) { rejected = e.code; }
        let invalid = null;
        try { await c.publish({type: 'Not A Type'}); } catch (e) { invalid = e.code; }
        return {gaveUp: last(s1).gaveUp, delays: s1.filter((x) => x.delayMs).map((x) => x.delayMs),
                policy: last(s2), sockets: FakeWS.all.length, rejected, invalid,
                closed: FakeWS.all[4].closedWith};
        """,
    )
    assert result["gaveUp"] is True
    assert result["delays"] == [2, 4]  # min(base * 2^retries, cap), retries counted from 1
    assert result["policy"]["status"] == "disconnected"
    assert (result["policy"]["code"], result["policy"]["reason"]) == (1008, "Unauthorized origin")
    assert result["sockets"] == 5  # a: 1 + 2 retries; b: 1, never retried; c: 1
    assert result["closed"] == [1000, "client closed"]
    assert result["rejected"] == "not_connected"
    assert result["invalid"] == "invalid_event_type"
