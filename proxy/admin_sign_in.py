"""Signing in to the admin dashboard: an admin token pasted into a form, or a one-time link printed by
`python -m proxy admin link` (it opens a page with a button, so a link preview uses nothing); and signing out.
Sessions and CSRF tokens are proxy/sessions.py's."""

from __future__ import annotations

from collections.abc import Callable

import redis.asyncio as redis
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from . import i18n
from .errors import ProxyError
from .pages import SECURITY_HEADERS, Pages, locale_of
from .sessions import AdminSessions, LinkUsed
from .signing import BadSignature, Expired

MAX_FORM = 16 * 1024


class AdminSignIn:
    def __init__(self, pages: Pages, sessions: AdminSessions, redis: Callable[[Request], redis.Redis]) -> None:
        self.pages = pages
        self.sessions = sessions
        self.redis = redis  # where a one-time link is remembered as used

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/admin/sign-in", self.sign_in_page, methods=["GET"]),
            Route("/admin/sign-in", self.sign_in, methods=["POST"]),
            Route("/admin/link", self.link_page, methods=["GET"]),
            Route("/admin/link", self.link_redeem, methods=["POST"]),
            Route("/admin/sign-out", self.sign_out, methods=["POST"]),
        ]

    def form(self, request: Request, *, error: str | None = None, status: int = 200) -> Response:
        nonce = self.sessions.sign_in_nonce(request)
        response = self.pages.render(
            request,
            "admin_signin.html",
            {"error": error, "csrf": self.sessions.sign_in_csrf(nonce)},
            status=status,
        )
        return self.sessions.set_nonce(response, nonce)

    async def sign_in_page(self, request: Request) -> Response:
        return self.form(request)

    async def sign_in(self, request: Request) -> Response:
        locale = locale_of(request)
        form = await request.form(max_files=0, max_fields=8, max_part_size=MAX_FORM)
        if not self.sessions.sign_in_csrf_ok(request, form.get("csrf")):
            return self.form(request, error=i18n.text(locale, "admin.csrf_failed"), status=403)
        raw = form.get("token")
        token = raw.strip().removeprefix("Bearer ").strip() if isinstance(raw, str) else ""
        if not token or len(token) > MAX_FORM:
            return self.form(request, error=i18n.text(locale, "admin.token_empty"), status=400)
        try:
            value, session = await self.sessions.sign_in_with_token(token)
        except ProxyError as exc:
            return self.form(
                request, error=i18n.text(locale, "admin.token_refused", reason=exc.message), status=exc.status
            )
        response = RedirectResponse(f"{self.pages.base}/admin", status_code=303, headers=SECURITY_HEADERS)
        return self.sessions.set_cookie(response, value, session)

    async def link_page(self, request: Request) -> Response:
        """A one-time link opens a page with a button: a link preview or a mail scanner fetching it uses nothing."""
        locale = locale_of(request)
        token = request.query_params.get("t", "")
        try:
            data = self.sessions.read_link(token)
        except BadSignature as exc:
            return self._link_refused(request, exc)
        return self.pages.render(
            request,
            "admin_link.html",
            {"title": i18n.text(locale, "admin.link_title"), "name": data["a"], "token": token},
        )

    async def link_redeem(self, request: Request) -> Response:
        form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_FORM)
        token = form.get("t")
        try:
            value, session = await self.sessions.redeem_link(
                token if isinstance(token, str) else "", self.redis(request)
            )
        except BadSignature as exc:
            return self._link_refused(request, exc)
        except ProxyError as exc:
            return self.pages.message(request, i18n.text(locale_of(request), "error.title"), exc.message, status=503)
        response = RedirectResponse(f"{self.pages.base}/admin", status_code=303, headers=SECURITY_HEADERS)
        return self.sessions.set_cookie(response, value, session)

    def _link_refused(self, request: Request, exc: BadSignature) -> Response:
        locale = locale_of(request)
        kind = "used" if isinstance(exc, LinkUsed) else "expired" if isinstance(exc, Expired) else "forged"
        status = 410 if kind in ("used", "expired") else 403
        return self.form(request, error=i18n.text(locale, f"admin.link_{kind}"), status=status)

    async def sign_out(self, request: Request) -> Response:
        session = self.sessions.read(request)
        form = await request.form(max_files=0, max_fields=4, max_part_size=MAX_FORM)
        if session is None or not self.sessions.csrf_ok(session, form.get("csrf")):
            return self.pages.message(
                request, i18n.text(locale_of(request), "admin.refused"), "CSRF token missing or wrong.", status=403
            )
        await self.sessions.end(session, self.redis(request))
        response = RedirectResponse(f"{self.pages.base}/admin/sign-in", status_code=303, headers=SECURITY_HEADERS)
        return self.sessions.clear_cookie(response)
