"""The pages people read (the statement `/me`, the admin dashboard): templates, the stylesheet, the locale.

Server-rendered with Jinja2 through Starlette's `Jinja2Templates`; one stylesheet served by the proxy itself;
charts are SVG drawn on the server (charts.py). Nothing is fetched at run time and no script runs in the
browser, so the pages work on an air-gapped host under a strict Content-Security-Policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jinja2
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from . import i18n
from .config import Settings

HERE = Path(__file__).resolve().parent
TEMPLATES = HERE / "templates"
STATIC = HERE / "static"

# No script, no third party: styles from this proxy only, images inline (the charts) or data: URLs.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self';"
    " frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    # Nothing to another site through Referer; same-origin, so a form posted here carries its real Origin
    # (under no-referrer Chrome sends `Origin: null`, and the forms' same-origin check could not pass).
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
    "Vary": "Accept-Language, Cookie, Authorization",
}


def locale_of(request: Request) -> str:
    return i18n.negotiate(request.headers.get("accept-language"))


def _filters(locale: str) -> dict[str, Any]:
    """What every template gets to write text, numbers and dates in the reader's language."""

    def num(value: float | None, decimals: int = 0) -> str:
        return "—" if value is None else i18n.number(value, locale, decimals)

    def when(value: datetime | None) -> str:
        return "—" if value is None else i18n.moment(value, locale)

    def day(value: datetime | None) -> str:
        return "—" if value is None else i18n.date(value, locale)

    return {"t": partial(i18n.text, locale), "num": num, "when": when, "day": day}


class Pages:
    """Renders a page: the template with the reader's locale, the site's base path and the security headers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        # The path PUBLIC_URL puts the proxy under (https://host/quota -> /quota), for the pages' own links.
        self.base = urlsplit(settings.public_url).path.rstrip("/") if settings.public_url else ""
        env = jinja2.Environment(
            loader=jinja2.FileSystemLoader(TEMPLATES),
            autoescape=True,  # every value is escaped unless a template says |safe (only the charts' SVG)
            undefined=jinja2.StrictUndefined,
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates = Jinja2Templates(env=env)

    def render(
        self,
        request: Request,
        template: str,
        context: Mapping[str, Any] | None = None,
        *,
        status: int = 200,
        locale: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Response:
        locale = locale or locale_of(request)
        full = {"locale": locale, "base": self.base, **_filters(locale), **(context or {})}
        return self.templates.TemplateResponse(
            request,
            template,
            full,
            status_code=status,
            headers={**SECURITY_HEADERS, "Content-Language": locale, **(headers or {})},
        )

    def message(self, request: Request, title: str, text: str, *, status: int, **context: Any) -> Response:
        """A friendly page saying what happened and what to do (never an error body a person cannot read)."""
        return self.render(request, "message.html", {"title": title, "text": text, **context}, status=status)

    @staticmethod
    def routes() -> list[BaseRoute]:
        return [Mount("/static", app=StaticFiles(directory=STATIC), name="static")]
