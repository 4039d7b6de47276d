"""Budget tiers from groups: the user's own row, else the most generous of their groups' rows, else '*'."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.budget.rows import DEFAULT, BudgetBook, Limit
from proxy.cli import main
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import eventually, serve, sql, token, uid


def book(rows: list[Limit]) -> BudgetBook:
    b = BudgetBook(Settings(default_token_budget=100))
    b._rows.update({(r.subject_type, r.subject): r for r in rows})
    return b


PRECEDENCE = [
    # (the user's own row?, their groups, the row that applies, its tokens)
    (True, ("big", "small"), "me", 50),
    (False, ("big", "small"), "big", 5000),
    (False, ("small", "big"), "big", 5000),
    (False, ("small",), "small", 300),
    (False, ("unknown",), DEFAULT, 100),
    (False, (), DEFAULT, 100),
]


@pytest.mark.parametrize("own, groups, row, tokens", PRECEDENCE)
def test_precedence(own: bool, groups: tuple[str, ...], row: str, tokens: int) -> None:
    rows = [Limit("group", "big", "month", 5000, 0.8), Limit("group", "small", "day", 300, 0.5)]
    if own:
        rows.append(Limit("user", "me", "week", 50, 0.8))
    limit = book(rows).user("me", groups)
    assert (limit.subject, limit.tokens, limit.subject_type) == (row, tokens, "user")  # always a user's budget


@pytest.fixture(scope="module")
def proxy(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, budget_refresh_seconds=0.2)
    with serve(create_app(settings)) as url:
        yield url


ADMIN = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}


def set_row(url: str, subject: str, tokens: int, kind: str = "group", **rates: int) -> None:
    r = httpx.put(f"{url}/admin/budgets/{subject}", json={"tokens": tokens, "type": kind, **rates}, headers=ADMIN)
    assert r.status_code == 200, r.text


def quota(url: str, headers: dict[str, str]) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/quota", headers=headers)
    assert r.status_code == 200, r.text
    budget: dict[str, Any] = r.json()["budgets"][0]
    return budget


def test_a_token_s_groups_choose_the_most_generous_tier(proxy: str) -> None:
    eng, support = uid("eng"), uid("support")
    set_row(proxy, eng, 50_000)
    set_row(proxy, support, 20_000)
    me = {"Authorization": f"Bearer {token(uid(), groups=[support, eng])}"}
    eventually(lambda: quota(proxy, me)["limit"] == 50_000)
    assert quota(proxy, me)["budget_row"] == eng
    r = httpx.post(
        f"{proxy}/v1/chat/completions",
        json={"model": "fake", "messages": [{"role": "user", "content": "hi"}]},
        headers=me,
    )
    assert r.status_code == 200 and r.headers["x-quota-limit"] == "50000"
    set_row(proxy, eng, 70_000)  # a change to a group row reaches its members within BUDGET_REFRESH_SECONDS
    eventually(lambda: quota(proxy, me)["limit"] == 70_000)


def test_a_user_s_own_row_wins_over_their_groups(proxy: str) -> None:
    eng, me = uid("eng"), uid()
    set_row(proxy, eng, 50_000)
    set_row(proxy, me, 999, kind="user")
    headers = {"Authorization": f"Bearer {token(me, groups=[eng])}"}
    eventually(lambda: quota(proxy, headers)["limit"] == 999)


def test_a_delegate_names_the_user_s_groups_in_a_header(proxy: str) -> None:
    eng = uid("eng")
    set_row(proxy, eng, 40_000)
    headers = {
        "Authorization": f"Bearer {token(uid('svc'), quota_delegate=True)}",
        "X-User-Id": uid(),
        "X-User-Groups": f"{eng} , ,{{{{LIBRECHAT_USER_ROLE}}}}",
    }
    eventually(lambda: quota(proxy, headers)["limit"] == 40_000)


@pytest.mark.parametrize("groups", ["eng", [1, 2], ["ok", ""], [f"g{i}" for i in range(65)], ["a\x00b"]])
def test_a_groups_claim_that_is_not_a_list_of_names_is_refused(proxy: str, groups: object) -> None:
    r = httpx.get(f"{proxy}/v1/quota", headers={"Authorization": f"Bearer {token(uid(), groups=groups)}"})
    assert r.status_code == 401 and "groups" in r.json()["error"]["message"]


def test_the_cli_sets_a_tier_and_shows_which_row_applies(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("DATABASE_URL", base_settings.database_url)
    eng, small, me = uid("eng"), uid("small"), uid()
    assert main(["budget", "set", eng, "8000", "--group"]) == 0
    assert main(["budget", "set", small, "100", "--group"]) == 0
    capsys.readouterr()
    assert main(["budget", "show", me, "--groups", f"{small},{eng}"]) == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert (shown["subject_type"], shown["budget_row"], shown["limit"]) == ("user", eng, 8000)
    assert main(["budget", "show", eng, "--group"]) == 0
    assert capsys.readouterr().out.startswith(f"group {eng}: 8,000 tokens per month for each member")


def test_fifty_at_once_against_a_tier_with_a_grant_stay_within_it(proxy: str, base_settings: Settings) -> None:
    """Concurrency with the richer budgets: a group tier plus this period's grant bound 50 requests at once."""

    tier, me = uid("tier"), uid()
    set_row(proxy, tier, 1000)
    grant = httpx.post(f"{proxy}/admin/grants", json={"subject": me, "tokens": 500, "reason": "test"}, headers=ADMIN)
    assert grant.status_code == 201, grant.text
    headers = {"Authorization": f"Bearer {token(me, groups=[tier])}"}
    eventually(lambda: quota(proxy, headers)["limit"] == 1500)
    body = {"model": "honest-slow", "messages": [{"role": "user", "content": "tell me everything"}]}

    def one(_: int) -> int:
        return httpx.post(f"{proxy}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
    assert set(codes) <= {200, 429} and codes.count(200) >= 2
    after = quota(proxy, headers)
    assert after["reserved"] == 0 and after["used"] <= 1500


def test_a_tier_keeps_the_default_period_so_groups_never_choose_a_second_counter(proxy: str) -> None:
    daily = uid("daily")
    set_row(proxy, daily, 200)  # asked for with the default period; a tier's own period would not matter
    httpx.put(f"{proxy}/admin/budgets/{daily}", json={"tokens": 200, "type": "group", "period": "day"}, headers=ADMIN)
    me = uid()
    with_tier = {"Authorization": f"Bearer {token(me, groups=[daily])}"}
    without = {"Authorization": f"Bearer {token(me)}"}
    eventually(lambda: quota(proxy, with_tier)["limit"] == 200)
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    assert httpx.post(f"{proxy}/v1/chat/completions", json=body, headers=with_tier).status_code == 200
    assert quota(proxy, with_tier)["period"] == quota(proxy, without)["period"] == "month"
    assert quota(proxy, with_tier)["used"] == quota(proxy, without)["used"] == 12  # one counter


# What PostgreSQL makes of a tier (sql/013_group_tiers.sql): each record carries the group whose tier set the
# user's limit, and the users page, budget_status and the alerts judge the user by that group's row.


def chat(url: str, headers: dict[str, str]) -> httpx.Response:
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}  # 12 tokens
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers)


def users_row(url: str, user: str) -> dict[str, Any]:
    """The user's row of the admin users page (its JSON twin); {} until the ledger has it."""
    r = httpx.get(f"{url}/admin/users.json", params={"q": user}, headers=ADMIN)
    assert r.status_code == 200, r.text
    return next((row for row in r.json()["data"] if row["user_id"] == user), {})


def budget_status(dsn: str, user: str) -> dict[str, Any]:
    rows = sql(dsn, "select * from budget_status where subject_type = 'user' and subject = $1", user)
    return dict(rows[0])


def default_limit(dsn: str) -> int:
    return int(sql(dsn, "select token_limit from budgets where subject_type = 'user' and subject = '*'")[0][0])


def test_a_user_on_a_stingy_tier_shows_it_on_the_users_page_and_in_budget_status(
    proxy: str, base_settings: Settings
) -> None:
    dsn, tier, me = base_settings.database_url, uid("tier"), uid()
    set_row(proxy, tier, 12, rpm=5, tpm=900)  # one answer uses it up; the default (100,000) would still be at 0 %
    headers = {"Authorization": f"Bearer {token(me, groups=[tier])}"}
    eventually(lambda: quota(proxy, headers)["limit"] == 12)
    answer = chat(proxy, headers)
    assert answer.status_code == 200
    assert (answer.headers["x-ratelimit-limit-requests"], answer.headers["x-ratelimit-limit-tokens"]) == ("5", "900")
    assert chat(proxy, headers).status_code == 429  # refused: its record carries the tier too

    row = eventually(lambda: users_row(proxy, me).get("requests") == 2 and users_row(proxy, me))
    assert (row["token_limit"], row["used"], row["state"], row["blocked"]) == (12, 12, "blocked", 1)
    assert (row["budget_group"], row["own_budget"], row["period"]) == (tier, False, "month")
    assert (row["rpm"], row["tpm"]) == (5, 900)  # the tier's rates, as the proxy applies them
    status = budget_status(dsn, me)
    assert (status["token_limit"], status["used"], status["state"]) == (12, 12, "blocked")
    assert (status["budget_group"], status["is_default"]) == (tier, False)
    recorded = sql(dsn, "select status, budget_group from usage_records where user_id = $1 order by status", me)
    assert [tuple(r) for r in recorded] == [("blocked", tier), ("ok", tier)]
    page = httpx.get(f"{proxy}/admin/user", params={"id": me}, headers=ADMIN)
    assert page.status_code == 200 and f"Budget of the group {tier}" in page.text


def test_a_user_whose_tier_goes_is_judged_by_the_default_again(proxy: str, base_settings: Settings) -> None:
    dsn, tier, me = base_settings.database_url, uid("tier"), uid()
    set_row(proxy, tier, 15)
    with_tier = {"Authorization": f"Bearer {token(me, groups=[tier])}"}
    eventually(lambda: quota(proxy, with_tier)["limit"] == 15)
    assert chat(proxy, with_tier).status_code == 200
    row = eventually(lambda: users_row(proxy, me).get("budget_group") == tier and users_row(proxy, me))
    assert (row["token_limit"], row["state"]) == (15, "warn")  # 12 of 15: past the tier's 80 %

    # The group's row is deleted: the default applies, in PostgreSQL as in the proxy.
    sql(dsn, "delete from budgets where subject_type = 'group' and subject = $1", tier)
    default = default_limit(dsn)
    row = users_row(proxy, me)
    assert (row["token_limit"], row["state"], row["budget_group"]) == (default, "ok", None)
    status = budget_status(dsn, me)
    assert (status["token_limit"], status["is_default"], status["budget_group"]) == (default, True, None)

    # The row is back, but the user's token no longer lists the group: their next record says so.
    set_row(proxy, tier, 15)
    assert users_row(proxy, me)["token_limit"] == 15  # their latest record still names it
    assert chat(proxy, {"Authorization": f"Bearer {token(me)}"}).status_code == 200
    row = eventually(lambda: users_row(proxy, me).get("requests") == 2 and users_row(proxy, me))
    assert (row["token_limit"], row["budget_group"], budget_status(dsn, me)["is_default"]) == (default, None, True)
