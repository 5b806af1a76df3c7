"""Headless Chromium (Debian's ``chromium``) driven by Playwright's Python API.

We never run ``playwright install``: the browser is the system one, launched with the flags
this closed network needs (no background connections, no sandbox as root). Screenshots go to
``test-artifacts/screenshots`` so a human can look at the pages a test walked through.
"""
from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("MAILROOM_CHROMIUM", "/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "screenshots"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    """One Chromium per test file; each test gets its own context (cookies). Not one per
    session: Playwright's sync API keeps an asyncio loop running in the main thread while it
    is started, where ``asyncio.run`` (SMTP sending, the SMTP test server's client) refuses
    to run, in whatever test follows (tests/conftest.py only sorts browser tests last; under
    pytest-xdist any file may follow a browser file in the same process)."""
    if not shutil.which(CHROMIUM) and not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/install-test-deps (Debian package chromium)")
    # Playwright's sync API drives the browser from a greenlet with an event loop in this
    # thread; Django's ORM calls made by the test itself are still synchronous and safe.
    os.environ.setdefault("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS
        )
        yield browser
        browser.close()


@pytest.fixture
def page(browser, live_server):  # noqa: ANN001, ANN201
    """A fresh browser tab pointed at the live test server."""
    context = browser.new_context(base_url=live_server.url, viewport={"width": 1280, "height": 800})
    context.set_default_timeout(10_000)
    tab = context.new_page()
    # The pages run under a Content-Security-Policy (crm/security.py): anything it blocks
    # (an inline script, a style, an image from elsewhere) shows as a console error.
    blocked: list[str] = []
    tab.on("console", lambda message: blocked.append(message.text)
           if "Content Security Policy" in message.text else None)
    yield tab
    # Let the last navigation finish before the database is flushed behind the live server.
    tab.wait_for_load_state("networkidle")
    tab.goto("about:blank")
    context.close()
    assert not blocked, f"the page broke its Content-Security-Policy: {blocked[:3]}"


@pytest.fixture
def screenshot():  # noqa: ANN201
    """``screenshot(page, "name")`` saves a full-page PNG under test-artifacts/screenshots."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def take(tab, name: str) -> Path:  # noqa: ANN001
        path = ARTIFACTS / f"{name}.png"
        tab.screenshot(path=str(path), full_page=True)
        return path

    return take


@pytest.fixture
def login(page):  # noqa: ANN001, ANN201
    """``login(user, password)`` logs in through the real login form."""

    def do_login(user, password: str):  # noqa: ANN001, ANN202
        page.goto("/login/")
        page.get_by_label("Username").fill(user.username)
        page.get_by_label("Password").fill(password)
        page.get_by_role("button", name="Log in").click()
        page.wait_for_url(lambda url: "/login/" not in url)
        return page

    return do_login
