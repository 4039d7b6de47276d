"""The routes of `/me`: who is reading (a statement link traded at once for an HttpOnly cookie, so the link
leaves the address bar and the history; an `Authorization: Bearer` token; the cookie; else a sign-in form that
takes an API token, POSTed, never in a URL), the page, and its CSV."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from . import i18n
from .auth import Identity, charged_identity, token_expiry
from .budget.rows import period_bounds
from .csv_export import csv_response
from .errors import ProxyError
from .links import MAX_TOKEN, StatementLinks
from .pages import SECURITY_HEADERS, Pages, locale_of
from .signing import BadSignature, Expired
from .statement import Sources, statement
from .usage_history import history_params, usage_history

COOKIE = "quota_statement"
SIGN_IN_SECONDS = 12 * 3600  # a statement opened with a pasted token stays open this long
CSV_FIELDS = (
    "created_at",
    "request_id",
    "client_request_id",
    "model",
    "served_model",
    "endpoint",
    "prompt_tokens",
    "completion_tokens",
    "total_tokens",
    "cost_usd",
    "status",
    "http_status",
    "stream",
    "estimated",
    "latency_ms",
)


class StatementPages:
    """The routes of `/me`."""

    def __init__(self, pages: Pages, links: StatementLinks, sources: Callable[[Request], Sources]) -> None:
        self.pages = pages
        self.links = links
        self.sources = sources

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/me", self.me, methods=["GET"]),
            Route("/me/sign-in", self.sign_in, methods=["POST"]),
            Route("/me/sign-out", self.sign_out, methods=["POST"]),
            Route("/me/usage.csv", self.csv, methods=["GET"]),
        ]

    # Who is reading -------------------------------------------------------------------------------------------

    def _cookie_path(self) -> str:
        return f"{self.pages.base}/me"

    def _with_cookie(self, response: Response, request: Request, token: str, max_age: int) -> Response:
        secure = self.links.settings.public_url.startswith("https://") or request.url.scheme == "https"
        response.set_cookie(
            COOKIE, token, max_age=max_age, path=self._cookie_path(), httponly=True, samesite="lax", secure=secure
        )
        return response

    def _home(self) -> str:
        return f"{self.pages.base}/me"

    async def _reader(self, request: Request) -> Identity | None:
        """The identity a Bearer token or the cookie names; None: nobody (the sign-in form)."""
        if request.headers.get("authorization"):
            sources = self.sources(request)
            principal = await sources.auth.authenticate(request.headers.get("authorization"))
            identity = charged_identity(principal, request.headers, required=False)
            await sources.budget.check_tenant(identity, bind=False)
            return identity
        cookie = request.cookies.get(COOKIE)
        if cookie:
            try:
                return self.links.read(cookie)[0]
            except BadSignature:
                return None
        return None

    def _link_refused(self, request: Request, exc: BadSignature) -> Response:
        locale = locale_of(request)
        expired = isinstance(exc, Expired)
        kind = "expired" if expired else "forged"
        return self.pages.render(
            request,
            "signin.html",
            {
                "title": i18n.text(locale, f"link.{kind}_title"),
                "text": i18n.text(locale, f"link.{kind}"),
                "error": None,
                "kind": kind,
            },
            status=410 if expired else 403,
        )

    def _sign_in_form(self, request: Request, *, error: str | None = None, status: int = 200) -> Response:
        locale = locale_of(request)
        context = {
            "title": i18n.text(locale, "signin.title"),
            "text": i18n.text(locale, "signin.intro"),
            "error": error,
            "kind": "signin",
        }
        response = self.pages.render(request, "signin.html", context, status=status)
        if request.cookies.get(COOKIE):
            response.delete_cookie(COOKIE, path=self._cookie_path())
        return response

    def _same_origin(self, request: Request) -> bool:
        """A form posted from another site is refused (a login CSRF would open someone else's statement)."""
        if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
            return False
        origin = request.headers.get("origin")
        if origin is None or origin == "null":
            return origin is None  # no Origin: not a browser's form (a script, curl), which CSRF cannot forge
        allowed = {f"{request.url.scheme}://{request.headers.get('host', '')}"}
        if self.links.settings.public_url:
            parts = urlsplit(self.links.settings.public_url)
            allowed.add(f"{parts.scheme}://{parts.netloc}")
        return origin in allowed

    # The routes ----------------------------------------------------------------------------------------------

    async def me(self, request: Request) -> Response:
        link = request.query_params.get("s")
        if link is not None:
            try:
                identity, expires = self.links.read(link)
            except BadSignature as exc:
                return self._link_refused(request, exc)
            # Traded for a cookie at once: the link leaves the address bar, the history and any Referer.
            response = RedirectResponse(self._home(), status_code=303, headers=SECURITY_HEADERS)
            return self._with_cookie(response, request, link, self.links.remaining(expires))
        try:
            identity_or_none = await self._reader(request)
        except ProxyError as exc:
            if exc.status in (401, 403):
                return self._sign_in_form(
                    request,
                    error=i18n.text(locale_of(request), "signin.bad_token", reason=exc.message),
                    status=exc.status,
                )
            raise
        if identity_or_none is None:
            return self._sign_in_form(request)
        locale = locale_of(request)
        st = await statement(self.sources(request), identity_or_none, locale, datetime.now(UTC))
        return self.pages.render(
            request, "statement.html", {"st": st, "signed_in": "authorization" not in request.headers}, locale=locale
        )

    async def sign_in(self, request: Request) -> Response:
        locale = locale_of(request)
        if not self._same_origin(request):
            return self._sign_in_form(
                request, error=i18n.text(locale, "signin.bad_token", reason="cross-site form"), status=403
            )
        form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_TOKEN)
        raw = form.get("token")
        token = raw.strip() if isinstance(raw, str) else ""
        token = token.removeprefix("Bearer ").strip()
        if not token or len(token) > MAX_TOKEN:
            return self._sign_in_form(request, error=i18n.text(locale, "signin.bad_token", reason="empty"), status=400)
        sources = self.sources(request)
        try:
            principal = await sources.auth.authenticate(f"Bearer {token}")
            await sources.budget.check_tenant(principal.identity, bind=False)
        except ProxyError as exc:
            status = exc.status if exc.status in (401, 403) else 503
            return self._sign_in_form(
                request, error=i18n.text(locale, "signin.bad_token", reason=exc.message), status=status
            )
        # Open SIGN_IN_SECONDS, and never after the token it was opened with.
        expires = token_expiry(token)
        ttl = SIGN_IN_SECONDS if expires is None else min(SIGN_IN_SECONDS, max(self.links.remaining(int(expires)), 1))
        session = self.links.token(principal.identity, ttl)
        response = RedirectResponse(self._home(), status_code=303, headers=SECURITY_HEADERS)
        return self._with_cookie(response, request, session, ttl)

    async def sign_out(self, request: Request) -> Response:
        response = RedirectResponse(self._home(), status_code=303, headers=SECURITY_HEADERS)
        if self._same_origin(request):
            response.delete_cookie(COOKIE, path=self._cookie_path())
        return response

    async def csv(self, request: Request) -> Response:
        try:
            identity = await self._reader(request)
        except ProxyError as exc:
            if exc.status in (401, 403):
                return self._sign_in_form(request, error=exc.message, status=exc.status)
            raise
        if identity is None:
            return self._sign_in_form(request, status=401)
        return await usage_csv(self.sources(request), identity, datetime.now(UTC))


async def usage_csv(sources: Sources, identity: Identity, now: datetime) -> Response:
    """Every record of the user's current period, newest first, as CSV (the statement's and the admin's)."""
    limit = sources.book.user(identity.user, identity.groups)
    start, _ = period_bounds(limit.period, now.timestamp())
    first = await usage_history(sources.pool, identity.user, history_params(start, now, 1000), now)

    async def rows() -> AsyncIterator[dict[str, Any]]:
        page: dict[str, Any] = first
        while True:
            for r in page["data"]:
                yield r
            if not page["has_more"]:
                return
            params = history_params(start, now, 1000, page["next_cursor"])
            page = await usage_history(sources.pool, identity.user, params, now)

    return csv_response(f"usage-{start:%Y-%m-%d}-to-{now:%Y-%m-%d}.csv", CSV_FIELDS, rows())
