"""The admin dashboard `/admin`: overview, users, a user's page with their budget form, tenants, blocked
requests and the history of budget changes; each table also as CSV (`/admin/users.csv`) and JSON
(`/admin/users.json`). Everything reads through admin_queries.py (and a user's statement through
statement.py), so the pages, the CSV and the JSON are one copy of the queries.

Who may read: a dashboard session (sessions.py) or an `Authorization: Bearer` admin token (for scripts);
anyone else gets the sign-in page (HTML, CSV) or a 401/403 (JSON). What changes something is a form POSTed
with the session's CSRF token.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlencode

import asyncpg
import orjson
import redis.asyncio as redis
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import BaseRoute, Route

from . import admin_events as events
from . import admin_params as p
from . import admin_queries as q
from . import charts, i18n
from .admin import budget_from, reason_from
from .admin_sign_in import MAX_FORM, AdminSignIn
from .auth import Identity
from .body import printable_id, user_id
from .budget.rows import DEFAULT, change_budget, fetch_limit
from .config import PERIODS, Settings
from .csv_export import Rows, csv_response
from .errors import BadRequest, Forbidden, ProxyError, Unauthorized
from .pages import SECURITY_HEADERS, Pages, locale_of
from .sessions import COOKIE, AdminSessions, Session
from .statement import Sources, statement
from .statement_pages import usage_csv


class AdminSources(Sources, Protocol):
    @property
    def redis(self) -> redis.Redis: ...


@dataclass(frozen=True, slots=True)
class Viewer:
    admin: str
    session: Session | None  # None: a Bearer token (no forms)


def identity_of(user: str, row: Mapping[str, Any] | None) -> Identity:
    """A user as the dashboard shows them: the tenant and the group tier of their latest record (their users
    row), so that their statement shows the budget the proxy applied to it."""
    if row is None:
        return Identity(user)
    group = row.get("budget_group")
    return Identity(user, row["tenant_id"] or None, groups=(group,) if group else ())


def _json(data: object, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json", headers=SECURITY_HEADERS)


class AdminPages:
    def __init__(
        self,
        pages: Pages,
        sessions: AdminSessions,
        settings: Settings,
        sources: Callable[[Request], AdminSources],
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self.pages = pages
        self.sessions = sessions
        self.settings = settings
        self.sources = sources
        self.now = clock
        self.signing_in = AdminSignIn(pages, sessions, lambda request: sources(request).redis)

    def routes(self) -> list[BaseRoute]:
        routes: list[BaseRoute] = [
            Route("/admin", self._html(self.overview), methods=["GET"]),
            Route("/admin/users", self._html(self.users), methods=["GET"]),
            Route("/admin/user", self._html(self.user), methods=["GET"]),
            Route("/admin/tenants", self._html(self.tenants), methods=["GET"]),
            Route("/admin/blocked", self._html(self.blocked), methods=["GET"]),
            Route("/admin/changes", self._html(self.changes), methods=["GET"]),
            Route("/admin/user/budget", self.save_budget, methods=["POST"]),
            *self.signing_in.routes(),
            Route("/admin/user.csv", self._html(self.user_csv), methods=["GET"]),
        ]
        for name, data, table in (
            ("overview", self._overview_data, self._overview_table),
            ("users", self._users_data, self._users_table),
            ("tenants", self._tenants_data, self._tenants_table),
            ("blocked", self._blocked_data, self._blocked_table),
            ("changes", self._changes_data, self._changes_table),
        ):
            routes.append(Route(f"/admin/{name}.json", self._api(data), methods=["GET"]))
            routes.append(Route(f"/admin/{name}.csv", self._html(self._csv_of(name, table)), methods=["GET"]))
        return routes

    # Who is reading ------------------------------------------------------------------------------------------

    async def _viewer(self, request: Request) -> Viewer | None:
        """The admin reading: by Bearer token (Unauthorized, Forbidden) or session; None: nobody signed in."""
        header = request.headers.get("authorization")
        if header:
            principal = await self.sources(request).auth.authenticate(header)
            if not principal.admin:
                raise Forbidden("This needs an admin token.")
            return Viewer(principal.identity.user, None)
        session = await self.sessions.current(request, self.sources(request).redis)
        return Viewer(session.admin, session) if session else None

    def _html(
        self, handler: Callable[[Request, Viewer], Awaitable[Response]]
    ) -> Callable[[Request], Awaitable[Response]]:
        """A page (or a CSV): the sign-in page for nobody, a readable page for every error."""

        async def page(request: Request) -> Response:
            locale = locale_of(request)
            try:
                viewer = await self._viewer(request)
                if viewer is None:
                    expired = COOKIE in request.cookies
                    return self.signing_in.form(
                        request, error=i18n.text(locale, "admin.session_expired") if expired else None, status=401
                    )
                return await handler(request, viewer)
            except ProxyError as exc:
                title = i18n.text(locale, "admin.refused" if exc.status in (401, 403) else "error.title")
                return self.pages.message(request, title, exc.message, status=exc.status)

        return page

    def _api(self, data: Callable[[Request], Awaitable[Any]]) -> Callable[[Request], Awaitable[Response]]:
        """JSON for scripts and the same reader rules; errors are the API's (OpenAI-shaped, from app.py)."""

        async def api(request: Request) -> Response:
            if await self._viewer(request) is None:
                raise Unauthorized("Sign in to the dashboard or send an admin token.", code="missing_token")
            return _json(await data(request))

        return api

    def _render(self, request: Request, template: str, viewer: Viewer, context: dict[str, Any]) -> Response:
        csrf = self.sessions.csrf_token(viewer.session) if viewer.session else ""
        return self.pages.render(request, template, {"admin": viewer.admin, "csrf": csrf, **context})

    # The data, shared by the pages, the CSV and the JSON --------------------------------------------------------

    async def _period(self, request: Request) -> str:
        default = await q.default_period(self.sources(request).pool, self.settings.budget_period)
        return p.period_param(request.query_params, default)

    async def _overview_data(self, request: Request) -> dict[str, Any]:
        return await q.overview(self.sources(request).pool, await self._period(request), self.now())

    async def _users_data(self, request: Request) -> dict[str, Any]:
        query = p.UserQuery.from_params(request.query_params)
        return await q.users(self.sources(request).pool, query, self.now())

    async def _tenants_data(self, request: Request) -> dict[str, Any]:
        return await q.tenants(self.sources(request).pool, await self._period(request), self.now())

    async def _blocked_data(self, request: Request) -> dict[str, Any]:
        paging = p.Paging.from_params(request.query_params)
        return await events.blocked(self.sources(request).pool, await self._period(request), self.now(), paging)

    async def _changes_data(self, request: Request) -> dict[str, Any]:
        kind, subject = self._subject(request.query_params)
        return await events.changes(
            self.sources(request).pool, kind, subject, p.Paging.from_params(request.query_params)
        )

    @staticmethod
    def _subject(params: Mapping[str, str]) -> tuple[str | None, str | None]:
        subject = params.get("subject")
        if subject is None:
            return None, None
        kind = params.get("type", "user")
        if kind not in ("user", "tenant", "group"):
            raise BadRequest("'type' is 'user', 'tenant' or 'group'.", param="type")
        return kind, printable_id(subject, "subject")

    # The CSV: every row of a table, not one page ---------------------------------------------------------------

    async def _overview_table(self, request: Request) -> tuple[list[str], list[dict[str, Any]]]:
        data = await self._overview_data(request)
        return ["day", "model", "requests", "tokens"], data["daily"]

    async def _users_table(self, request: Request) -> tuple[list[str], list[dict[str, Any]]]:
        query = p.UserQuery.from_params(request.query_params)
        rows = await q.all_users(self.sources(request).pool, query, self.now())
        columns = ["user_id", "tenant_id", "state", "used", "token_limit", "percent", "remaining", "period"]
        columns += ["period_start", "resets_at", "requests", "blocked", "cost_usd", "own_budget", "budget_group"]
        return columns, rows

    async def _tenants_table(self, request: Request) -> tuple[list[str], list[dict[str, Any]]]:
        data = await self._tenants_data(request)
        columns = ["tenant_id", "members", "active_users", "requests", "tokens", "cost_usd", "state", "used"]
        return columns + ["token_limit", "percent", "period", "period_start", "resets_at"], data["data"]

    async def _blocked_table(self, request: Request) -> tuple[list[str], Rows]:
        rows = events.blocked_rows(self.sources(request).pool, await self._period(request), self.now())
        return ["created_at", "request_id", "user_id", "tenant_id", "model", "endpoint", "http_status"], rows

    async def _changes_table(self, request: Request) -> tuple[list[str], list[dict[str, Any]]]:
        kind, subject = self._subject(request.query_params)
        data = await events.changes(self.sources(request).pool, kind, subject, None)
        columns = ["changed_at", "subject_type", "subject", "model", "changed_by", "source", "before", "after"]
        return columns + ["reason"], data["data"]

    def _csv_of(
        self, name: str, table: Callable[[Request], Awaitable[tuple[list[str], Rows]]]
    ) -> Callable[[Request, Viewer], Awaitable[Response]]:
        async def download(request: Request, viewer: Viewer) -> Response:
            columns, rows = await table(request)
            return csv_response(f"{name}-{self.now():%Y-%m-%d}.csv", columns, rows)

        return download

    async def user_csv(self, request: Request, viewer: Viewer) -> Response:
        user = user_id(request.query_params.get("id"), "id")
        return await usage_csv(self.sources(request), await self._identity(request, user), self.now())

    # The pages ---------------------------------------------------------------------------------------------

    @staticmethod
    def _chart(daily: list[dict[str, Any]], first: date, last: date, locale: str) -> tuple[str, str]:
        days = [first + timedelta(days=i) for i in range(max((last - first).days, 0))]
        index = {d: i for i, d in enumerate(days)}
        per_model: dict[str, list[int]] = {}
        for r in daily:
            i = index.get(date.fromisoformat(r["day"]))
            if i is not None:
                per_model.setdefault(r["model"] or "—", [0] * len(days))[i] += int(r["tokens"])
        return charts.tokens_by_model(days, per_model, locale)

    async def overview(self, request: Request, viewer: Viewer) -> Response:
        data = await self._overview_data(request)
        now = self.now()
        span = q.window(data["period"], now)
        # A week or a month whole (the days to come empty); a day or all time up to today, 62 days at most.
        last = span.last_day if data["period"] in ("week", "month") else (now + timedelta(days=1)).date()
        first = max(span.first_day, last - timedelta(days=q.CHART_DAYS))
        chart, legend = self._chart(data["daily"], first, last, locale_of(request))
        return self._render(
            request,
            "admin_overview.html",
            viewer,
            {"nav": "overview", "o": data, "chart": chart, "legend": legend, "periods": PERIODS},
        )

    async def users(self, request: Request, viewer: Viewer) -> Response:
        query = p.UserQuery.from_params(request.query_params)
        data = await q.users(self.sources(request).pool, query, self.now())
        return self._render(
            request,
            "admin_users.html",
            viewer,
            {
                "nav": "users",
                "query": query,
                "data": data,
                "sorts": list(p.USER_SORTS),
                "states": p.STATES,
                "sizes": p.PAGE_SIZES,
                "link": lambda **changes: "?" + urlencode(query.params(**changes)),
                "csv_query": urlencode({k: v for k, v in query.params().items() if k not in ("page", "per_page")}),
            },
        )

    async def _identity(self, request: Request, user: str) -> Identity:
        return identity_of(user, await q.user_budget(self.sources(request).pool, user, self.now()))

    async def user(self, request: Request, viewer: Viewer) -> Response:
        user = user_id(request.query_params.get("id"), "id")
        sources = self.sources(request)
        locale = locale_of(request)
        now = self.now()
        row = await q.user_budget(sources.pool, user, now)
        identity = identity_of(user, row)
        st = await statement(sources, identity, locale, now)
        st["csv_url"] = f"{self.pages.base}/admin/user.csv?{urlencode({'id': user})}"
        history = await events.changes(sources.pool, "user", user, p.Paging(1, 50))
        limit = sources.book.user(user, identity.groups)
        form = {
            "tokens": limit.tokens,
            "period": limit.period,
            "rpm": limit.rpm,
            "tpm": limit.tpm,
            "warn": round(limit.warn_ratio * 100),
            "own": limit.subject != DEFAULT and limit.group is None,
            "group": limit.group,
        }
        return self._render(
            request,
            "admin_user.html",
            viewer,
            {
                "nav": "users",
                "user": user,
                "st": st,
                "row": row,
                "form": form,
                "periods": PERIODS,
                "history": history["data"],
                "saved": request.query_params.get("saved") == "1",
            },
        )

    async def save_budget(self, request: Request) -> Response:
        """The user page's form: their budget row, in force at once (this process reloads its budgets now;
        other processes within BUDGET_REFRESH_SECONDS), and recorded in the history."""
        locale = locale_of(request)
        session = await self.sessions.current(request, self.sources(request).redis)
        if session is None:
            return self.signing_in.form(request, error=i18n.text(locale, "admin.session_expired"), status=401)
        form = await request.form(max_files=0, max_fields=16, max_part_size=MAX_FORM)
        if not self.sessions.csrf_ok(session, form.get("csrf")):
            return self.pages.message(
                request, i18n.text(locale, "admin.refused"), i18n.text(locale, "admin.csrf_failed"), status=403
            )
        try:
            user = user_id(form.get("id"), "id")
            warn = p.whole_field(form, "warn", 80)
            if not 1 <= warn <= 100:
                raise BadRequest("'warn' is a percentage from 1 to 100.", param="warn")
            body = {
                "type": "user",
                "tokens": p.whole_field(form, "tokens", -1),
                "period": form.get("period"),
                "rpm": p.whole_field(form, "rpm"),
                "tpm": p.whole_field(form, "tpm"),
                "warn_ratio": warn / 100,
                "reason": form.get("reason") or None,
            }
            limit = budget_from(body, self.settings, user)
            reason = reason_from(body)
        except ProxyError as exc:
            return self.pages.message(request, i18n.text(locale, "error.title"), exc.message, status=exc.status)
        sources = self.sources(request)
        try:
            async with sources.pool.acquire(timeout=5) as conn:
                # What the form does not show stays as the user's own row has it (a new row: the defaults).
                own = await fetch_limit(conn, "user", user)
                if own is not None and own.subject == user:
                    limit = replace(
                        limit,
                        rollover=own.rollover,
                        rollover_cap=own.rollover_cap,
                        alert_thresholds=own.alert_thresholds,
                    )
                await change_budget(conn, limit, session.admin, "page", reason)
            await sources.book.load(sources.pool)
        except (OSError, asyncpg.PostgresError, TimeoutError) as exc:
            return self.pages.message(request, i18n.text(locale, "error.title"), str(exc), status=503)
        target = f"{self.pages.base}/admin/user?{urlencode({'id': user, 'saved': '1'})}"
        return RedirectResponse(target, status_code=303, headers=SECURITY_HEADERS)

    async def tenants(self, request: Request, viewer: Viewer) -> Response:
        data = await self._tenants_data(request)
        return self._render(request, "admin_tenants.html", viewer, {"nav": "tenants", "data": data, "periods": PERIODS})

    async def blocked(self, request: Request, viewer: Viewer) -> Response:
        data = await self._blocked_data(request)
        period = data["period"]
        return self._render(
            request,
            "admin_blocked.html",
            viewer,
            {
                "nav": "blocked",
                "data": data,
                "periods": PERIODS,
                "link": lambda **changes: "?" + urlencode({"period": period, "per_page": data["per_page"], **changes}),
            },
        )

    async def changes(self, request: Request, viewer: Viewer) -> Response:
        data = await self._changes_data(request)
        return self._render(
            request,
            "admin_changes.html",
            viewer,
            {
                "nav": "changes",
                "data": data,
                "link": lambda **changes: "?" + urlencode({"per_page": data["per_page"], **changes}),
            },
        )
