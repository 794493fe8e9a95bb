"""The demo inbox and the admin dashboard in a real headless Chromium (Playwright).

Needs Debian's ``chromium`` (``apt-get install chromium``; Playwright's own browser
download is not used) and the ``playwright`` package; without either the tests are
skipped with the reason. ``TIDINGS_CHROMIUM`` names another browser binary.
Screenshots go to ``$TIDINGS_SCREENSHOTS`` (e.g. ``docs/screenshots``) when set.

Every wait is a Playwright wait on the page's state (``expect(...)``,
``wait_for_function``), never a fixed sleep.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server import StartServer, TidingsServer

pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)
from playwright.sync_api import (  # after the skip: only imported when installed
    Browser,
    BrowserContext,
    Page,
    expect,
    sync_playwright,
)

CHROMIUM = os.environ.get("TIDINGS_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not Path(CHROMIUM).exists():
    pytest.skip(
        f"no Chromium at {CHROMIUM} (apt-get install chromium, or set TIDINGS_CHROMIUM)",
        allow_module_level=True,
    )

ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 20_000  # generous: reconnects back off with jitter
expect.set_options(timeout=WAIT_MS)
BACKOFF_CAP_MS = 30_000  # tidings.js' default backoff.max


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport={"width": 1100, "height": 720})
    ctx.set_default_timeout(WAIT_MS)
    yield ctx
    ctx.close()


@pytest.fixture
def dev(start_server: StartServer) -> TidingsServer:
    """A server in dev mode (no JWT secret configured): the demo is on."""
    return start_server(TIDINGS_JWT_SECRET=None)


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("TIDINGS_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))


def open_demo(context: BrowserContext, srv: TidingsServer, user: str, transport: str) -> Page:
    page = context.new_page()
    page.goto(f"{srv.url}/demo?user={user}&transport={transport}")
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    return page


def notify(srv: TidingsServer, user: str, title: str, content: str = "") -> dict[str, Any]:
    r = httpx.post(
        srv.url + "/api/v1/notifications",
        headers={"Authorization": f"Bearer {srv.api_key}"},
        json={
            "recipients": [user],
            "type": "comment",
            "title": title,
            "content": content,
            "sender": {"id": "u-bob", "username": "bob", "avatar": None},
        },
    )
    assert r.status_code == 201, r.text
    record: dict[str, Any] = r.json()["notifications"][0]
    return record


@pytest.mark.parametrize("transport", ["sse", "ws"])
def test_demo_page_shows_a_published_notification_as_a_toast(
    dev: TidingsServer, context: BrowserContext, transport: str, tmp_path: Path
) -> None:
    page = open_demo(context, dev, "alice", transport)
    expect(page.locator("#badge")).to_have_text("0")

    record = notify(dev, "alice", "Payroll sent", "¥ 4,200 for October")
    toast = page.locator(f'.toast[data-id="{record["id"]}"]')
    expect(toast).to_contain_text("bob: Payroll sent")
    expect(toast).to_contain_text("¥ 4,200 for October")
    expect(page.locator(f'#list li[data-id="{record["id"]}"]')).to_have_class("unread")
    expect(page.locator("#badge")).to_have_text("1")

    # The page's own "send test notification" button publishes with the demo token.
    page.fill("#title", "Build finished")
    page.click("#send")
    expect(page.locator(".toast", has_text="demo: Build finished")).to_be_visible()
    expect(page.locator("#badge")).to_have_text("2")
    if transport == "sse":
        notify(dev, "alice", "Record approved", "12 pieces, ¥ 36")
        expect(page.locator("#badge")).to_have_text("3")
        screenshot(page, "demo.png", tmp_path)


def test_two_tabs_of_one_user_stay_in_step(dev: TidingsServer, context: BrowserContext) -> None:
    a = open_demo(context, dev, "carol", "sse")
    b = open_demo(context, dev, "carol", "ws")
    first = notify(dev, "carol", "First")
    notify(dev, "carol", "Second")
    for page in (a, b):
        expect(page.locator("#badge")).to_have_text("2")
        expect(page.locator("#list li")).to_have_count(2)

    a.locator(f'#list li[data-id="{first["id"]}"] button.mark').click()
    expect(a.locator("#badge")).to_have_text("1")
    expect(b.locator("#badge")).to_have_text("1")
    expect(b.locator(f'#list li[data-id="{first["id"]}"]')).to_have_class("read")

    b.click("#markall")
    expect(b.locator("#badge")).to_have_text("0")
    expect(a.locator("#badge")).to_have_text("0")
    expect(a.locator("#list li.unread")).to_have_count(0)


def test_page_recovers_what_was_published_while_it_was_away(
    dev: TidingsServer, context: BrowserContext
) -> None:
    page = open_demo(context, dev, "dave", "sse")
    before = notify(dev, "dave", "Before the restart")
    expect(page.locator(f'#list li[data-id="{before["id"]}"]')).to_be_visible()

    # Hold the page's stream off while the server restarts and a notification is
    # published, so it can only come back through the resume: the restarted server
    # has lost its in-memory history, says `reset`, and the page refetches the inbox.
    page.route("**/api/v1/stream**", lambda route: route.abort())
    dev.restart()
    expect(page.locator("#status")).not_to_have_attribute("data-state", "open")
    meanwhile = notify(dev, "dave", "Published while away")
    assert page.evaluate("window.tidingsResets || 0") == 0
    page.unroute("**/api/v1/stream**")

    # The next attempt comes after a jittered backoff: at most its 30 s cap.
    page.wait_for_function("window.tidingsResets >= 1", timeout=BACKOFF_CAP_MS + WAIT_MS)
    expect(page.locator("#status")).to_have_attribute("data-state", "open")
    expect(page.locator(f'#list li[data-id="{meanwhile["id"]}"]')).to_be_visible()
    expect(page.locator(f'#list li[data-id="{before["id"]}"]')).to_be_visible()
    expect(page.locator("#badge")).to_have_text("2")

    # and it is live again
    after = notify(dev, "dave", "After")
    expect(page.locator(f'.toast[data-id="{after["id"]}"]')).to_be_visible()
    expect(page.locator("#badge")).to_have_text("3")


def test_admin_page_shows_the_connection_count_rising(
    dev: TidingsServer, context: BrowserContext, tmp_path: Path
) -> None:
    admin = context.new_page()
    admin.goto(dev.url + "/admin")
    admin.fill("#key", dev.api_key)
    admin.click("button[type=submit]")
    expect(admin.locator("#connections")).to_have_text("0")
    expect(admin.locator("#users-count")).to_have_text("0")

    open_demo(context, dev, "erin", "sse")
    expect(admin.locator("#connections")).to_have_text("1")
    open_demo(context, dev, "frank", "ws")
    expect(admin.locator("#connections")).to_have_text("2")
    expect(admin.locator("#users-count")).to_have_text("2")
    expect(admin.locator("#users")).to_contain_text("erin")
    expect(admin.locator("#events")).to_contain_text("frank came online")

    for i in range(3):
        notify(dev, "erin", f"note {i}")
    expect(admin.locator("#tenant-rows td").nth(3)).to_have_text("3")  # published, default tenant
    admin.wait_for_function("window.tidingsAdminSamples.length >= 4")  # a few points of chart
    screenshot(admin, "admin.png", tmp_path)

    # The key is kept for the tab's session only, and a reload starts watching again.
    assert admin.evaluate("sessionStorage.getItem('tidings.admin.key')") == dev.api_key
    admin.reload()
    expect(admin.locator("#connections")).to_have_text("2")
    expect(admin.locator("#events li")).not_to_have_count(0)
