"""The admin dashboard in Debian's chromium: an admin signs in (the form, and a one-time link that works once),
walks every page, changes a user's budget with the form, and the user's next /v1/quota shows it. Every page
is screenshotted at desktop and phone width into tests/screenshots/admin-*.png.

The data is written before the browser starts (see tests/browser.py: no asyncio.run while it is open).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import httpx
import pytest
from playwright.sync_api import Browser, Page

from proxy.app import create_app
from proxy.auth import Authenticator
from proxy.config import Settings
from proxy.sessions import AdminSessions

from .browser import DESKTOP, no_horizontal_scroll, shoot
from .helpers import copy_usage, serve, sql, token, uid

TEAM = uid("acme")
USERS = [f"{TEAM}-{name}" for name in ("ana", "bruno", "carla", "davi")]
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet")
TIER = uid("research")


@pytest.fixture(scope="module")
def settings(base_settings: Settings) -> Settings:
    return replace(base_settings, budget_refresh_seconds=3600, ledger_stream=f"test:admin-ui:{uid()}")


@pytest.fixture(scope="module")
def seeded(settings: Settings) -> None:
    """A few days of use by four users of one team (one near its limit, one over), and a blocked request."""
    now = datetime.now(UTC)
    rows = []
    for i, user in enumerate(USERS):
        for d in range(min(now.day, 6)):
            for m, model in enumerate(MODELS):
                rows.append(
                    (uid("r"), now - timedelta(days=d, minutes=m), user, TEAM, model, "chat", 1500 * (i + 1), "ok")
                )
    rows.append((uid("r"), now, USERS[3], TEAM, MODELS[0], "chat", 0, "blocked"))

    copy_usage(settings.database_url, rows)
    # bruno's requests come with a group whose tier sets his budget (the records would carry it)
    sql(
        settings.database_url,
        "insert into budgets (subject_type, subject, period, token_limit) values ('group', $1, 'month', 500000)"
        " on conflict (subject_type, subject) do update set token_limit = excluded.token_limit",
        TIER,
    )
    sql(settings.database_url, "update usage_users set budget_group = $1 where user_id = $2", TIER, USERS[1])


@pytest.fixture(scope="module")
def url(settings: Settings, seeded: None) -> Iterator[str]:
    with serve(create_app(settings)) as base:
        yield base


def sign_in(page: Page, url: str, name: str) -> None:
    page.goto(f"{url}/admin")
    assert page.get_by_label("Admin token").is_visible()
    page.get_by_label("Admin token").fill(token(name, quota_admin=True))
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url(f"{url}/admin")


def test_an_admin_walks_the_dashboard_and_changes_a_budget(url: str, browser: Browser) -> None:
    ctx = browser.new_context(viewport=DESKTOP, locale="en-US", accept_downloads=True)
    try:
        page = ctx.new_page()
        page.goto(f"{url}/admin")
        shoot(page, "admin-sign-in")
        sign_in(page, url, "ops-ana")
        assert page.get_by_role("heading", name="Overview").is_visible()
        assert page.locator("svg.chart").count() == 1
        assert page.locator("[data-stat=blocked-requests]").inner_text() != "0"
        shoot(page, "admin-overview")
        assert no_horizontal_scroll(page)

        page.get_by_role("link", name="Users", exact=True).first.click()
        page.get_by_label("Tenant").fill(TEAM)
        page.get_by_role("button", name="Show").click()
        assert page.locator("tr[data-user]").count() == len(USERS)
        assert page.locator("tr[data-user]").first.get_attribute("data-user") == USERS[-1]  # most used first
        shoot(page, "admin-users")

        page.get_by_role("link", name=USERS[1]).click()  # on a group's tier: judged by the group's row
        assert page.get_by_text(f"Budget of the group {TIER}").is_visible()
        assert "500,000" in page.locator("main").inner_text()
        shoot(page, "admin-user-tier")
        page.go_back()

        target = USERS[0]
        page.get_by_role("link", name=target).click()
        assert page.get_by_role("heading", name=target).is_visible()
        assert page.locator("svg.gauge").count() >= 1
        page.get_by_label("Limit (tokens)").fill("20,000")
        page.get_by_label("Period", exact=True).select_option("week")
        page.get_by_label("Requests per minute").fill("30")
        page.get_by_label("Reason (for the history)").fill("pilot")
        page.get_by_role("button", name="Save").click()
        assert page.get_by_role("status").filter(has_text="Saved").is_visible()
        history = page.locator("table.changes tbody tr")
        assert history.count() == 1 and "ops-ana" in history.inner_text() and "pilot" in history.inner_text()
        shoot(page, "admin-user")
        quota = httpx.get(f"{url}/v1/quota", headers={"Authorization": f"Bearer {token(target, tenant=TEAM)}"})
        user_budget = quota.json()["budgets"][0]
        assert (user_budget["limit"], user_budget["period"]) == (20_000, "week")

        for name, shot in (("Tenants", "admin-tenants"), ("Blocked requests", "admin-blocked")):
            page.get_by_role("link", name=name, exact=True).click()
            assert page.get_by_role("heading", name=name).is_visible()
            shoot(page, shot)
        assert USERS[3] in page.locator("main table").inner_text()
        page.get_by_role("link", name="Budget changes", exact=True).click()
        assert target in page.locator("table.changes").inner_text()
        shoot(page, "admin-changes")

        with page.expect_download() as download:
            page.get_by_role("link", name="Download as CSV").click()
        assert download.value.suggested_filename.startswith("changes-")

        page.get_by_role("button", name="Sign out (ops-ana)").click()
        page.wait_for_url(f"{url}/admin/sign-in")
        page.goto(f"{url}/admin/users")
        assert page.get_by_label("Admin token").is_visible()  # signed out for real
    finally:
        ctx.close()


def test_a_one_time_link_in_the_browser_works_once(url: str, browser: Browser, settings: Settings) -> None:
    link = AdminSessions(settings, Authenticator(settings)).link_token("ops-link", 300)
    ctx = browser.new_context(viewport=DESKTOP, locale="pt-BR")
    try:
        page = ctx.new_page()
        page.goto(f"{url}/admin/link?t={link}")
        assert "ops-link" in page.locator("main").inner_text()
        shoot(page, "admin-link")
        page.get_by_role("button", name="Entrar").click()
        page.wait_for_url(f"{url}/admin")
        assert page.get_by_role("heading", name="Visão geral").is_visible()  # Portuguese for a Portuguese browser
        shoot(page, "admin-overview-pt")
        page.goto(f"{url}/admin/link?t={link}")
        page.get_by_role("button", name="Entrar").click()
        assert "já foi usado" in page.locator("main").inner_text()
    finally:
        ctx.close()


def test_a_user_token_cannot_open_the_dashboard_in_the_browser(url: str, browser: Browser) -> None:
    ctx = browser.new_context(viewport=DESKTOP, locale="en-US")
    try:
        page = ctx.new_page()
        page.goto(f"{url}/admin")
        page.get_by_label("Admin token").fill(token(uid()))
        page.get_by_role("button", name="Sign in").click()
        assert page.get_by_role("alert").filter(has_text="not an admin").is_visible()
        response = page.goto(f"{url}/admin/users")
        assert response is not None and response.status == 401
    finally:
        ctx.close()
