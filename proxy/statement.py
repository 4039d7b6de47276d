"""The statement `/me`: a user's budget and usage on one page, reached from the chat by a signed link.

How a reader is known, in order: a statement link (`/me?s=...`, signed by the proxy, read-only, short-lived,
naming the user), traded at once for an HttpOnly cookie so the link leaves the address bar and the history;
an `Authorization: Bearer` token; the cookie; else a sign-in form that takes an API token (POSTed, never in
a URL). The page reads through the same functions as /v1/usage and /v1/quota (usage_history.py and
`BudgetEngine.snapshot`), and shows the history when Redis is down (and says so).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol
from urllib.parse import urlsplit

import asyncpg
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from . import charts, i18n
from .auth import Authenticator, Identity, charged_identity
from .budget import BudgetEngine
from .budget.quota import Quota
from .budget.rows import BudgetBook, period_bounds
from .config import Settings
from .errors import ProxyError
from .pages import SECURITY_HEADERS, Pages, locale_of
from .signing import BadSignature, Expired, Signer, pages_secret
from .usage_history import daily_usage, history_params, period_totals, usage_history

COOKIE = "quota_statement"
SIGN_IN_SECONDS = 12 * 3600  # a statement opened with a pasted token stays open this long
RECENT = 50
PREVIOUS = {"day": 7, "week": 8, "month": 6, "total": 0}  # how many earlier periods' totals the page lists
_MAX_TOKEN = 8192  # longer is no token this proxy made, nor an API token worth reading
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


class Sources(Protocol):
    """What the statement reads (the app's Services)."""

    @property
    def pool(self) -> asyncpg.Pool: ...
    @property
    def budget(self) -> BudgetEngine: ...
    @property
    def book(self) -> BudgetBook: ...
    @property
    def auth(self) -> Authenticator: ...


class StatementLinks:
    """Signs and reads the statement links (and the cookie a link or a sign-in is traded for)."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.signer = Signer(pages_secret(settings), "statement", clock)
        self.ttl = settings.statement_link_ttl_days * 86400
        self._clock = clock

    def token(self, identity: Identity, ttl: float) -> str:
        data: dict[str, Any] = {"u": identity.user}
        if identity.tenant:
            data["t"] = identity.tenant
        if identity.groups:
            data["g"] = list(identity.groups)
        return self.signer.sign(data, ttl)

    def read(self, token: str) -> tuple[Identity, int]:
        """The identity a token names and when it expires; BadSignature (or Expired) otherwise."""
        if len(token) > _MAX_TOKEN:
            raise BadSignature("too long")
        data = self.signer.verify(token)
        user, tenant, groups = data.get("u"), data.get("t"), data.get("g", [])
        if not isinstance(user, str) or not isinstance(tenant, str | None) or not isinstance(groups, list):
            raise BadSignature("malformed")
        return Identity(user, tenant, groups=tuple(str(g) for g in groups)), int(data["exp"])

    def base(self, request: Request) -> str:
        """Where people reach the proxy: PUBLIC_URL, else the address this request came to."""
        if self.settings.public_url:
            return self.settings.public_url.rstrip("/")
        return str(request.base_url).rstrip("/")

    def url(self, identity: Identity, base: str) -> str | None:
        """The statement link for `identity`, or None when links are off (STATEMENT_LINK_TTL_DAYS=0)."""
        if self.ttl <= 0:
            return None
        return f"{base}/me?s={self.token(identity, self.ttl)}"

    def remaining(self, expires: int) -> int:
        return max(int(expires - self._clock()), 0)


@dataclass(frozen=True, slots=True)
class Forecast:
    key: str  # an i18n key: me.forecast_reach, _not, _reached, _none
    on: datetime | None = None


def forecast(quota: Quota, start: datetime, now: datetime) -> Forecast:
    """When the user reaches the limit at the pace of this period so far (used / time elapsed)."""
    if quota.used >= quota.limit.tokens:
        return Forecast("me.forecast_reached")
    elapsed = (now - start).total_seconds()
    if quota.used <= 0 or elapsed <= 0:
        return Forecast("me.forecast_none")
    seconds = (quota.limit.tokens - quota.used) * elapsed / quota.used
    if seconds > 400 * 365 * 86400:  # beyond any date worth printing (and any datetime)
        return Forecast("me.forecast_not")
    at = now + timedelta(seconds=seconds)
    if quota.resets_at is not None and at >= quota.resets_at:
        return Forecast("me.forecast_not")
    return Forecast("me.forecast_reach", at)


def previous_periods(period: str, start: datetime, count: int) -> list[tuple[datetime, datetime]]:
    out = []
    for _ in range(count):
        before, _end = period_bounds(period, start.timestamp() - 1)
        out.append((before, start))
        start = before
    return out


def period_label(period: str, start: datetime, end: datetime, locale: str) -> str:
    if period == "month":
        return i18n.month(start, locale)
    if period == "day":
        return i18n.date(start, locale)
    return f"{i18n.date(start, locale)} – {i18n.date(end - timedelta(days=1), locale)}"


def chart_window(period: str, start: datetime, end: datetime | None, now: datetime) -> tuple[datetime, datetime]:
    """The days the chart shows: the whole week or month; the last two weeks for a daily or total budget."""
    if period in ("week", "month") and end is not None:
        return start, end
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    return today - timedelta(days=13), today + timedelta(days=1)


def _days(start: datetime, end: datetime) -> list[datetime]:
    out: list[datetime] = []
    day = start
    while day < end and len(out) < 62:
        out.append(day)
        day += timedelta(days=1)
    return out


def safe_cell(value: object) -> object:
    """A CSV cell a spreadsheet will not run: text starting like a formula gets a leading quote."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def status_key(record: dict[str, Any]) -> str:
    status = str(record.get("status") or "error")
    return status if f"status.{status}" in i18n.keys("en") else "error"


async def statement(sources: Sources, identity: Identity, locale: str, now: datetime) -> dict[str, Any]:
    """Everything the statement shows, for the template (`_statement.html`); the admin's user page reuses it."""

    def t(key: str, **values: object) -> str:
        return i18n.text(locale, key, **values)

    def num(value: float) -> str:
        return i18n.number(value, locale)

    live_down = history_down = False
    quotas: list[Quota] = []
    try:
        quotas = await sources.budget.snapshot(identity, caps=True)
    except ProxyError:
        live_down = True  # Redis is down: the limit is known (the budgets' rows), the spend is not
    limit = quotas[0].limit if quotas else sources.book.user(identity.user, identity.groups)
    start, end = period_bounds(limit.period, now.timestamp())
    st: dict[str, Any] = {
        "identity": identity,
        "period": limit.period,
        "start": start,
        "end": end,
        "last_day": end - timedelta(days=1) if end else None,  # the period's last day, as people count
        "limit": limit.tokens,
        "live_down": live_down,
        "now": now,
    }
    if quotas:
        user = quotas[0]
        st["user"] = _quota_view(user, locale, "gauge")
        st["forecast"] = forecast(user, start, now)
        if user.resets_at is not None:
            left = user.resets_at - now
            whole, rest = divmod(max(int(left.total_seconds()), 0), 86400)
            hours, minutes = rest // 3600, rest % 3600 // 60
            st["time_left"] = (
                t("me.resets_in", days=whole, hours=hours)
                if whole
                else t("me.resets_in_hours", hours=hours, minutes=minutes)
            )
        team = [q for q in quotas[1:] if q.limit.subject_type == "tenant" and not q.limit.model]
        st["team"] = _quota_view(team[0], locale, "team-gauge") if team else None
        st["caps"] = [
            {**_quota_view(q, locale, f"cap-{i}"), "model": q.limit.model, "whose": q.limit.subject_type}
            for i, q in enumerate(quotas)
            if q.limit.model
        ]
    else:
        st["user"] = st["team"] = st["forecast"] = None
        st["caps"] = []
        st["unknown_gauge"] = charts.gauge(
            0, limit.tokens, "unknown", title=t("chart.gauge_title"), caption="?", ident="gauge"
        )
    try:
        history = await usage_history(sources.pool, identity.user, history_params(start, now, RECENT), now)
        window = chart_window(limit.period, start, end, now)
        daily = await daily_usage(sources.pool, identity.user, *window)
        in_period = daily if window == (start, end) else await daily_usage(sources.pool, identity.user, start, now)
        earlier = await period_totals(
            sources.pool, identity.user, previous_periods(limit.period, start, PREVIOUS[limit.period])
        )
    except ProxyError:
        history_down = True
        history, daily, in_period, earlier, window = {"data": [], "totals": None}, [], [], [], (start, now)
    st["history_down"] = history_down
    st["recent"] = [
        {
            **r,
            "at": datetime.fromisoformat(r["created_at"].replace("Z", "+00:00")),
            "status_key": status_key(r),
        }
        for r in history["data"]
    ]
    st["totals"] = history["totals"]
    st["by_model"] = _by_model(in_period)
    while earlier and not earlier[-1]["requests"]:  # newest first: periods from before the person's first request
        earlier.pop()
    st["previous"] = [{**p, "label": period_label(limit.period, p["start"], p["end"], locale)} for p in earlier]
    days = _days(*window)
    models = sorted({r["model"] for r in daily})
    per_model = {m: [0] * len(days) for m in models}
    index = {d.date(): i for i, d in enumerate(days)}
    for r in daily:
        i = index.get(r["day"].astimezone(UTC).date())
        if i is not None:
            per_model[r["model"]][i] += int(r["total_tokens"])
    series = charts.top_series([(m or "—", v) for m, v in per_model.items()], 7, t("chart.other"))
    total = sum(sum(v) for _, v in series)
    st["chart"] = (
        charts.daily_bars(
            [d.date() for d in days],
            series,
            title=t("chart.daily_title"),
            desc=t("chart.daily_desc", total=num(total)),
            fmt=num,
            day_label=lambda d: i18n.short_date(datetime(d.year, d.month, d.day), locale),
        )
        if total
        else None
    )
    st["legend"] = charts.legend([name for name, _ in series]) if total else ""
    return st


def _quota_view(q: Quota, locale: str, ident: str) -> dict[str, Any]:
    percent = 100.0 * q.used / q.limit.tokens if q.limit.tokens else 100.0
    caption = f"{i18n.number(min(percent, 999), locale)} %"
    title = i18n.text(locale, "chart.gauge_title")
    return {
        "quota": q,
        "state": q.state,
        "percent": percent,
        "gauge": charts.gauge(q.used, q.limit.tokens, q.state, title=title, caption=caption, ident=ident),
    }


def _by_model(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    models: dict[str, dict[str, Any]] = {}
    for r in rows:
        m = models.setdefault(
            r["model"],
            {"model": r["model"], "requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        )
        for k in ("requests", "prompt_tokens", "completion_tokens", "total_tokens"):
            m[k] += int(r[k])
        if r["cost_usd"] is not None:
            m["cost_usd"] = m.get("cost_usd", 0.0) + r["cost_usd"]
    return sorted(models.values(), key=lambda m: (-m["total_tokens"], m["model"]))


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
        form = await request.form(max_files=0, max_fields=4, max_part_size=_MAX_TOKEN)
        raw = form.get("token")
        token = raw.strip() if isinstance(raw, str) else ""
        token = token.removeprefix("Bearer ").strip()
        if not token or len(token) > _MAX_TOKEN:
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
        session = self.links.token(principal.identity, SIGN_IN_SECONDS)
        response = RedirectResponse(self._home(), status_code=303, headers=SECURITY_HEADERS)
        return self._with_cookie(response, request, session, SIGN_IN_SECONDS)

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


async def usage_csv(sources: Sources, identity: Identity, now: datetime) -> StreamingResponse:
    """Every record of the user's current period, newest first, as CSV (the statement's and the admin's)."""
    limit = sources.book.user(identity.user, identity.groups)
    start, _ = period_bounds(limit.period, now.timestamp())
    first = await usage_history(sources.pool, identity.user, history_params(start, now, 1000), now)

    async def rows() -> AsyncIterator[str]:
        page: dict[str, Any] = first
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(CSV_FIELDS)
        while True:
            for r in page["data"]:
                writer.writerow([safe_cell(r[f]) for f in CSV_FIELDS])
            yield out.getvalue()
            out.seek(0)
            out.truncate()
            if not page["has_more"]:
                return
            params = history_params(start, now, 1000, page["next_cursor"])
            page = await usage_history(sources.pool, identity.user, params, now)

    name = f"usage-{start:%Y-%m-%d}-to-{now:%Y-%m-%d}.csv"
    headers = {**SECURITY_HEADERS, "Content-Disposition": f'attachment; filename="{name}"'}
    return StreamingResponse(rows(), media_type="text/csv; charset=utf-8", headers=headers)
