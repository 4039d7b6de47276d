"""Per-model caps inside a budget: "100k a month, of which at most N on gpt-4o*"."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest
import redis

from proxy.app import create_app
from proxy.budget.engine import like_pattern
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import eventually, serve, token, uid

REFRESHED = 0.5  # seconds: two of the proxy's budget refreshes (0.2 s) and then some
ADMIN = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}


@pytest.fixture(scope="module")
def proxy(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, budget_refresh_seconds=0.2)
    with serve(create_app(settings)) as url:
        yield url


def cap(url: str, user: str, model: str, tokens: int) -> None:
    r = httpx.put(f"{url}/admin/budgets/{user}", json={"tokens": tokens, "model": model}, headers=ADMIN)
    assert r.status_code == 200, r.text


def ask(url: str, user: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token(user)}"})


def used(url: str, user: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"})
    budget: dict[str, Any] = r.json()["budgets"][0]
    return budget


def test_a_cap_stops_its_models_and_names_them_while_others_go_on(proxy: str) -> None:
    user = uid()
    cap(proxy, user, "fa*", 12)  # one answer of the fake upstream (12 tokens)
    time.sleep(REFRESHED)  # the proxy has read the cap
    assert ask(proxy, user, "fake").status_code == 200
    refused = ask(proxy, user, "fake")
    assert refused.status_code == 429
    message = refused.json()["error"]["message"]
    assert message.startswith("Monthly token budget for fa* models used up: 12 of 12 tokens.")
    assert refused.headers["x-quota-limit"] == "100000"  # the headers are the overall budget's
    assert ask(proxy, user, "no-usage").status_code == 200  # another model: the overall budget still has room
    assert used(proxy, user)["used"] > 12


def test_a_cap_counter_lost_in_redis_is_rebuilt_from_its_models_records(proxy: str, base_settings: Settings) -> None:
    user = uid()
    cap(proxy, user, "fake", 30)
    time.sleep(REFRESHED)  # the proxy has read the cap
    assert ask(proxy, user, "fake").status_code == 200
    assert ask(proxy, user, "no-usage").status_code == 200  # not the capped model: not in its counter
    client = redis.Redis.from_url(base_settings.redis_url)
    try:
        eventually(lambda: client.xlen(base_settings.ledger_stream) == 0)  # the records are in PostgreSQL
        for key in client.scan_iter(match=f"quota:*model*{user}*"):
            client.delete(key)
    finally:
        client.close()
    assert ask(proxy, user, "fake").status_code == 200  # rebuilt: 12 of 30 used
    assert ask(proxy, user, "fake").status_code == 429  # 24 of 30: no room for another prompt and answer


def test_fifty_at_once_against_a_cap_stay_within_it(proxy: str, base_settings: Settings) -> None:
    user = uid()
    cap(proxy, user, "honest*", 500)
    time.sleep(REFRESHED)  # the proxy has read the cap
    assert ask(proxy, user, "honest").status_code == 200
    body = {"model": "honest-slow", "messages": [{"role": "user", "content": "tell me"}]}

    def one(_: int) -> int:
        headers = {"Authorization": f"Bearer {token(user)}"}
        return httpx.post(f"{proxy}/v1/chat/completions", json=body, headers=headers, timeout=30).status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(one, range(50)))
    assert set(codes) <= {200, 429} and 429 in codes
    assert used(proxy, user)["reserved"] == 0
    client = redis.Redis.from_url(base_settings.redis_url)
    try:
        (key,) = list(client.scan_iter(match=f"quota:*model*{user}*[0-9]"))
        assert 0 < int(client.hget(key, "used") or 0) <= 500 and int(client.hget(key, "reserved") or 0) == 0
    finally:
        client.close()


@pytest.mark.parametrize(
    "body", [{"tokens": 5, "model": "gpt-[45]"}, {"tokens": 5, "model": ""}, {"tokens": 5, "model": 4}]
)
def test_a_bad_cap_is_a_named_400(proxy: str, body: dict[str, object]) -> None:
    r = httpx.put(f"{proxy}/admin/budgets/{uid()}", json=body, headers=ADMIN)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_globs_become_like_patterns_with_the_rest_literal() -> None:
    assert like_pattern("gpt-4o*") == "gpt-4o%"
    assert like_pattern("claude-?") == "claude-_"
    assert like_pattern("a_b%c\\d") == "a\\_b\\%c\\\\d"


def test_the_caller_sees_its_caps_in_v1_quota(proxy: str) -> None:
    user = uid()
    cap(proxy, user, "gpt-4o*", 20_000)
    time.sleep(REFRESHED)
    budgets = httpx.get(f"{proxy}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"}).json()["budgets"]
    assert [(b["model"], b["limit"]) for b in budgets] == [(None, 100_000), ("gpt-4o*", 20_000)]
