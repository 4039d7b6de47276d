"""Grants: tokens added to one budget for the current period, by CLI or admin API, recorded with who and why."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import replace

import asyncpg
import httpx
import pytest

from proxy.app import create_app
from proxy.budget.rows import BudgetBook
from proxy.cli import main
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import eventually, pg_row, serve, token, uid

BUDGET = 12  # one answer of the fake upstream (12 tokens) uses it up


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, default_token_budget=BUDGET, budget_refresh_seconds=0.2
    )
    with serve(create_app(settings)) as url:
        yield url


def chat(url: str, user: str) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token(user)}"})


def limit(url: str, user: str) -> int:
    r = httpx.get(f"{url}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"})
    return int(r.json()["budgets"][0]["limit"])


def test_a_grant_by_the_cli_lets_a_user_at_the_limit_go_on_and_a_revoke_takes_it_back(
    proxy_url: str, base_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", base_settings.database_url)
    monkeypatch.setenv("JWT_SECRET", base_settings.jwt_secret)
    user = uid()
    assert chat(proxy_url, user).status_code == 200
    assert chat(proxy_url, user).status_code == 429
    assert main(["budget", "grant", user, "30", "--reason", "project deadline", "--by", "alice"]) == 0
    grant_id = int(capsys.readouterr().out.split()[1].rstrip(":"))
    eventually(lambda: limit(proxy_url, user) == BUDGET + 30)  # within BUDGET_REFRESH_SECONDS
    assert chat(proxy_url, user).status_code == 200
    row = pg_row(base_settings.database_url, "select * from grants_this_period where id = $1", grant_id)
    assert (row["subject"], row["tokens"], row["reason"], row["granted_by"]) == (user, 30, "project deadline", "alice")
    status = pg_row(base_settings.database_url, "select * from budget_status where subject = $1", user)
    assert (status["token_limit"], status["granted"]) == (BUDGET + 30, 30)
    assert main(["budget", "revoke", str(grant_id)]) == 0
    eventually(lambda: limit(proxy_url, user) == BUDGET)
    assert chat(proxy_url, user).status_code == 429
    assert main(["budget", "revoke", str(grant_id)]) == 1  # nothing in force any more


def test_a_grant_by_the_admin_api_names_who_granted_it(proxy_url: str, base_settings: Settings) -> None:
    user, admin = uid(), uid("admin")
    headers = {"Authorization": f"Bearer {token(admin, quota_admin=True)}"}
    r = httpx.post(
        f"{proxy_url}/admin/grants", json={"subject": user, "tokens": 100, "reason": "pilot"}, headers=headers
    )
    assert r.status_code == 201, r.text
    grant = r.json()
    assert (grant["subject"], grant["tokens"], grant["type"]) == (user, 100, "user")
    row = pg_row(
        base_settings.database_url, "select granted_by, period_start from budget_grants where id = $1", grant["id"]
    )
    assert row["granted_by"] == admin
    assert row["period_start"].isoformat() == grant["period_start"]
    eventually(lambda: limit(proxy_url, user) == BUDGET + 100)
    assert httpx.delete(f"{proxy_url}/admin/grants/{grant['id']}", headers=headers).json() == {
        "id": grant["id"],
        "revoked": True,
    }
    assert httpx.delete(f"{proxy_url}/admin/grants/{grant['id']}", headers=headers).status_code == 404


@pytest.mark.parametrize(
    "body, param",
    [
        ({"subject": "x", "tokens": 0, "reason": "r"}, "tokens"),
        ({"subject": "x", "tokens": True, "reason": "r"}, "tokens"),
        ({"subject": "x", "tokens": 5, "reason": " "}, "reason"),
        ({"subject": "x", "tokens": 5}, "reason"),
        ({"subject": "x\u0000", "tokens": 5, "reason": "r"}, "subject"),
        ({"subject": "x", "tokens": 5, "reason": "r", "type": "group"}, "type"),
    ],
)
def test_a_bad_grant_is_a_named_400(proxy_url: str, body: dict[str, object], param: str) -> None:
    headers = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}
    r = httpx.post(f"{proxy_url}/admin/grants", json=body, headers=headers)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_only_admins_grant(proxy_url: str) -> None:
    r = httpx.post(
        f"{proxy_url}/admin/grants",
        json={"subject": uid(), "tokens": 10**6, "reason": "me"},
        headers={"Authorization": f"Bearer {token(uid())}"},
    )
    assert r.status_code == 403


def test_a_grant_adds_to_the_period_it_was_made_in_only(proxy_url: str, base_settings: Settings) -> None:
    """Granted in an earlier period (written as the CLI would have then), it adds nothing now."""
    user = uid()
    pg_row(
        base_settings.database_url,
        "insert into budget_grants (subject_type, subject, tokens, period_start, reason, granted_by)"
        " values ('user', $1, 500, date_trunc('month', now() - interval '40 days'), 'old', 'x') returning id",
        user,
    )
    assert (
        pg_row(base_settings.database_url, "select count(*) from grants_this_period where subject = $1", user)[0] == 0
    )
    time.sleep(0.5)  # two of this proxy's budget refreshes (0.2 s): it has read the grant, and ignores it
    assert limit(proxy_url, user) == BUDGET


def test_a_grant_to_a_total_budget_takes_effect(proxy_url: str) -> None:
    user = uid()
    headers = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}
    r = httpx.put(f"{proxy_url}/admin/budgets/{user}", json={"tokens": 100, "period": "total"}, headers=headers)
    assert r.status_code == 200
    r = httpx.post(f"{proxy_url}/admin/grants", json={"subject": user, "tokens": 5000, "reason": "x"}, headers=headers)
    assert r.status_code == 201
    eventually(lambda: limit(proxy_url, user) == 5100)


def test_no_number_of_huge_grants_breaks_loading_the_budgets(base_settings: Settings) -> None:
    """Written straight into the table (the API caps one grant), their sum is clamped, not an overflow."""
    user = uid()
    for _ in range(2):
        pg_row(
            base_settings.database_url,
            "insert into budget_grants (subject_type, subject, tokens, period_start, reason, granted_by)"
            " values ('user', $1, 4611686018427387904, date_trunc('month', now()), 'huge', 'sql') returning id",
            user,
        )

    async def load() -> int:
        pool = await asyncpg.create_pool(base_settings.database_url, min_size=1, max_size=1)
        try:
            book = BudgetBook(base_settings)
            await book.load(pool)
            start = await pool.fetchval("select date_trunc('month', now())")
            return book.added("user", user, start)
        finally:
            await pool.close()

    assert asyncio.run(load()) == 2**50
    pg_row(base_settings.database_url, "delete from budget_grants where subject = $1 returning 1", user)
