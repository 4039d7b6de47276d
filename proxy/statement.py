"""The statement: what a user's page `/me` shows of their budget and usage (its routes: statement_pages.py).

It reads through the same functions as /v1/usage and /v1/quota (usage_history.py and `BudgetEngine.snapshot`),
and shows the history when Redis is down (and says so). The admin's user page shows it too.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import asyncpg

from . import charts, i18n
from .auth import Authenticator, Identity
from .budget import BudgetEngine
from .budget.quota import Quota
from .budget.rows import BudgetBook, period_bounds
from .errors import ProxyError
from .usage_history import daily_usage, history_params, period_totals, usage_history

RECENT = 50
PREVIOUS = {"day": 7, "week": 8, "month": 6, "total": 0}  # how many earlier periods' totals the page lists


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
    chart, st["legend"] = charts.tokens_by_model(
        [d.date() for d in days], {m or "—": v for m, v in per_model.items()}, locale
    )
    st["chart"] = chart or None
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
