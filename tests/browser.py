"""The browser harness: Playwright driving Debian's chromium (`/usr/bin/chromium`), never a downloaded build.

`make test` installs chromium when it is missing (as root) or says what to install; here a missing browser
fails the test with the same words: browser tests never skip. Each test gets a fresh context (no cookies,
no storage); `shoot` screenshots a page at desktop and phone width into tests/screenshots/ (git ignores it).

The browser lives as long as its test module: Playwright's sync API holds an asyncio event loop in the main
thread while it is open, so while it is, `asyncio.run` (tests/helpers.py `pg_row`) cannot run there. Browser
test modules read what they need over HTTP instead, and the modules after them are not affected.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, Page, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# Quiet and offline: nothing phones home, nothing updates, no first-run UI. Playwright gives the browser a
# fresh user-data-dir of its own for every launch.
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOTS = Path(__file__).resolve().parent / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
MISSING = (
    f"{CHROMIUM} is missing: the browser tests drive Debian's chromium. Install it with "
    "`apt-get install -y chromium` (as root; `make test` does it when run as root)."
)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(MISSING, pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    ctx = browser.new_context(viewport=DESKTOP, locale="en-US", accept_downloads=True)
    ctx.set_default_timeout(15_000)  # a loaded 2-core machine: generous, and still fails a hung page
    try:
        yield ctx
    finally:
        ctx.close()


@pytest.fixture
def page(context: BrowserContext) -> Page:
    return context.new_page()


def shoot(page: Page, name: str) -> list[Path]:
    """Screenshot the page's whole length at desktop and at phone width: tests/screenshots/NAME-{desktop,phone}.png."""
    SCREENSHOTS.mkdir(exist_ok=True)
    paths = []
    for label, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        path = SCREENSHOTS / f"{name}-{label}.png"
        page.screenshot(path=str(path), full_page=True)
        paths.append(path)
    page.set_viewport_size(DESKTOP)
    return paths


def no_horizontal_scroll(page: Page) -> bool:
    """True when nothing makes the page wider than the window (tables scroll inside their own box)."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))
