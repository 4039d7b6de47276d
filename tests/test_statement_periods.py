"""The statement's earlier periods: listed back to the person's first request, not before it."""

from __future__ import annotations

import re
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx

from proxy.app import create_app
from proxy.config import Settings

from .helpers import pg_row, serve, token, uid


def test_earlier_periods_start_at_the_first_request(base_settings: Settings) -> None:
    settings = replace(base_settings, budget_period="month", budget_refresh_seconds=3600)
    now = datetime.now(UTC)
    this_month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    two_months_ago = (this_month - timedelta(days=40)).replace(day=15)
    newcomer, veteran = uid("new"), uid("old")
    pg_row(settings.database_url, "select quota_ensure_partition($1)", two_months_ago)
    for user, at in ((newcomer, now), (veteran, now), (veteran, two_months_ago)):
        pg_row(
            settings.database_url,
            "insert into usage_records (request_id, created_at, user_id, model, endpoint, total_tokens, status)"
            " values ($1, $2, $3, 'gpt-4o', 'chat', 10, 'ok') returning 1",
            uid("r"),
            at,
            user,
        )
    with serve(create_app(settings)) as url:

        def periods(user: str) -> list[str]:
            page = httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {token(user)}"})
            assert page.status_code == 200
            return re.findall(r'data-period="([0-9-]+)"', page.text)

        assert periods(newcomer) == []  # nothing before this month: no table of empty months
        # Last month (empty) is listed, since the person used the proxy before it; nothing before their first month.
        assert periods(veteran) == [
            (this_month - timedelta(days=1)).replace(day=1).date().isoformat(),
            two_months_ago.replace(day=1).date().isoformat(),
        ]
