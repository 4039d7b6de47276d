"""EXEMPT_MODELS: a free model answers a user at 100 %, is recorded, and never counts against a budget."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest
import redis

from proxy.app import create_app
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import eventually, pg_row, serve, token, uid

BUDGET = 12  # the fake upstream bills 12 tokens an answer: one answer uses this budget up


# Every proxy writes its default budget into the shared `budgets` table at start-up; these proxies do not
# re-read it, so another proxy of the session cannot change their default under them.


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(
        base_settings,
        litellm_base_url=fake.url,
        default_token_budget=BUDGET,
        budget_refresh_seconds=3600,
        exempt_models=("fa*",),
    )
    with serve(create_app(settings)) as url:
        yield url


def ask(url: str, user: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token(user)}"})


def used(url: str, user: str) -> int:
    r = httpx.get(f"{url}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"})
    return int(r.json()["budgets"][0]["used"])


def test_an_exempt_model_answers_a_user_at_the_limit_and_costs_nothing(proxy_url: str, base_settings: Settings) -> None:
    user = uid()
    assert ask(proxy_url, user, "no-usage").status_code == 200  # not exempt: the estimate uses the budget up
    spent = used(proxy_url, user)
    assert spent >= BUDGET and ask(proxy_url, user, "no-usage").status_code == 429
    for stream in (False, True):
        r = ask(proxy_url, user, "fake", stream=stream)
        assert r.status_code == 200, r.text
        assert r.headers["x-quota-state"] == "exempt" and "x-quota-used" not in r.headers
        assert "You have used" not in r.text  # no budget notice on a free model's answer
    assert used(proxy_url, user) == spent
    rows = eventually(
        lambda: pg_row(
            base_settings.database_url,
            "select count(*) filter (where exempt) as exempt, sum(total_tokens) filter (where exempt) as tokens"
            " from usage_records where user_id = $1 having count(*) filter (where exempt) = 2",
            user,
        )
    )
    assert rows["tokens"] == 2 * 12  # recorded with their real usage
    status = pg_row(base_settings.database_url, "select used from budget_status where subject = $1", user)
    assert status["used"] == spent  # the admin view leaves exempt requests out too


def test_exempt_usage_stays_out_when_redis_loses_the_counters(proxy_url: str, base_settings: Settings) -> None:
    user = uid()
    assert ask(proxy_url, user, "fake").status_code == 200
    assert ask(proxy_url, user, "fake", stream=True).status_code == 200
    eventually(
        lambda: (
            pg_row(base_settings.database_url, "select count(*) from usage_records where user_id = $1", user)[0] == 2
        )
    )
    client = redis.Redis.from_url(base_settings.redis_url)
    try:
        for key in client.scan_iter(match=f"quota:*{user}*"):
            if b":tenant" not in key:
                client.delete(key)  # the counters go; the rebuild reads PostgreSQL
    finally:
        client.close()
    assert used(proxy_url, user) == 0


def test_a_model_that_is_not_exempt_is_budgeted(proxy_url: str) -> None:
    user = uid()
    assert ask(proxy_url, user, "no-usage").status_code == 200
    assert used(proxy_url, user) > 0


def test_an_exempt_request_answered_by_a_model_that_is_not_exempt_is_charged(
    base_settings: Settings, fake: FakeUpstream
) -> None:
    """A LiteLLM alias or fallback can answer an exempt name with a paid model: then the request counts."""
    settings = replace(
        base_settings,
        litellm_base_url=fake.url,
        exempt_models=("fake",),
        default_token_budget=1000,
        budget_refresh_seconds=3600,
    )
    user = uid()
    with serve(create_app(settings)) as url:
        assert ask(url, user, "fake").status_code == 200  # answered as "fake": exempt
        assert used(url, user) == 0
        assert ask(url, user, "fake", stream=True).status_code == 200  # its stream says "fake-served"
        eventually(lambda: used(url, user) == 12)
    row = eventually(
        lambda: pg_row(
            base_settings.database_url,
            "select exempt, served_model from usage_records where user_id = $1 and stream",
            user,
        )
    )
    assert (row["exempt"], row["served_model"]) == (False, "fake-served")
