"""The pages' foundation: templates with the reader's locale and escaping, the stylesheet served by the proxy
itself, the security headers; and the browser harness driving Debian's chromium."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator

import httpx
import pytest
from playwright.sync_api import Browser, Page
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy.config import Settings
from proxy.pages import Pages

from .browser import CHROMIUM, no_horizontal_scroll
from .helpers import serve

HOSTILE = "<script>alert(1)</script>"


def message_app(settings: Settings) -> Starlette:
    pages = Pages(settings)

    async def hello(request: Request) -> Response:
        return pages.message(request, request.query_params.get("title", "Hello"), HOSTILE, status=418)

    return Starlette(routes=[Route("/hello", hello), *pages.routes()])


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve(message_app(Settings(public_url="http://example.test/quota"))) as base:
        yield base


def test_a_page_escapes_what_it_is_given_and_carries_the_headers(url: str) -> None:
    r = httpx.get(f"{url}/hello", params={"title": HOSTILE}, headers={"Accept-Language": "pt-BR"})
    assert r.status_code == 418 and r.headers["content-type"].startswith("text/html")
    assert HOSTILE not in r.text and "&lt;script&gt;" in r.text
    assert '<html lang="pt-BR">' in r.text and "Pular para o conteúdo" in r.text
    assert r.headers["content-language"] == "pt-BR"
    assert "script-src" not in r.headers["content-security-policy"]  # default-src 'none': no script at all
    assert r.headers["referrer-policy"] == "same-origin" and r.headers["cache-control"] == "no-store"
    # PUBLIC_URL's path is the base of the pages' own links (behind a reverse proxy under /quota).
    assert 'href="/quota/static/style.css"' in r.text


def test_the_stylesheet_is_served_by_the_proxy(url: str) -> None:
    r = httpx.get(f"{url}/static/style.css")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/css") and ".gauge-box" in r.text
    assert httpx.get(f"{url}/static/../pages.py").status_code == 404


def test_the_browser_is_debians_chromium(browser: Browser) -> None:
    version = subprocess.run([CHROMIUM, "--version"], capture_output=True, text=True, timeout=60).stdout
    assert browser.version.split(".")[0] in version, (browser.version, version)


def test_the_browser_renders_a_page_with_its_stylesheet_and_nothing_from_outside(page: Page) -> None:
    requested: list[str] = []
    page.on("request", lambda req: requested.append(req.url))
    with serve(message_app(Settings())) as base:
        page.goto(f"{base}/hello?title=Hi")
        assert page.locator("h1").inner_text() == "Hi"
        assert page.locator("main#main").count() == 1 and page.locator("nav[aria-label]").count() == 1
        # The stylesheet applied: the header's background is the one style.css gives it.
        assert page.eval_on_selector("header.site", "e => getComputedStyle(e).backgroundColor") == "rgb(20, 36, 58)"
        page.set_viewport_size({"width": 390, "height": 844})
        assert no_horizontal_scroll(page)
    assert requested and all(u.startswith(base) for u in requested), requested
