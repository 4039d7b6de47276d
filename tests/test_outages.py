"""Redis dying under the proxy, in both fail modes. The tests start and kill a Redis of their own."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import RedisProcess, eventually, pg_row, serve, sql, token, uid

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """Persists every write (AOF, fsync always): a restart keeps the counters."""
    server = RedisProcess(str(tmp_path), appendonly=True).start()
    yield server
    server.kill()


def rows(dsn: str, user: str) -> int:
    return pg_row(dsn, "select count(*) from usage_records where user_id = $1", user)[0]


@contextlib.contextmanager
def served_then_redis_dies(
    base_settings: Settings, fake: FakeUpstream, redis: RedisProcess, fail_mode: str
) -> Iterator[tuple[httpx.Client, dict[str, str], str]]:
    """A proxy on `redis` that served one request (recorded in PostgreSQL), then lost its Redis."""
    settings = replace(base_settings, litellm_base_url=fake.url, redis_url=redis.url, fail_mode=fail_mode)
    user = uid()
    headers = {"Authorization": f"Bearer {token(user)}"}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 200
        eventually(lambda: rows(settings.database_url, user) == 1)
        redis.kill()
        yield client, headers, user


def test_closed_mode_refuses_with_503_then_recovers_from_postgres(
    base_settings: Settings, fake: FakeUpstream, volatile_redis: RedisProcess
) -> None:
    with served_then_redis_dies(base_settings, fake, volatile_redis, "closed") as (client, headers, _):
        sent = len(fake.requests)
        r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["message"].startswith("Budget service unavailable")
        assert len(fake.requests) == sent  # nothing went upstream unmetered
        assert client.get("/readyz").status_code == 503
        # Redis comes back empty (no persistence): the user's spend is rebuilt from PostgreSQL.
        volatile_redis.start()
        r = eventually(
            lambda: (
                (resp := client.post("/v1/chat/completions", headers=headers, json=CHAT)).status_code == 200 and resp
            )
        )
        assert r.headers["x-quota-used"] == "24"


def test_open_mode_serves_records_and_reconciles_when_redis_returns(
    base_settings: Settings, fake: FakeUpstream, private_redis: RedisProcess
) -> None:
    with served_then_redis_dies(base_settings, fake, private_redis, "open") as (client, headers, user):
        for _ in range(2):
            r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
            assert r.status_code == 200 and r.headers["x-quota-state"] == "unknown"
            assert "x-quota-used" not in r.headers and r.headers["x-quota-limit"] == "100000"
        assert client.get("/v1/models", headers=headers).headers["x-quota-state"] == "unknown"
        eventually(lambda: rows(base_settings.database_url, user) == 3)  # written to PostgreSQL directly
        # Redis restarts with its data (AOF): the counter says 12, the reconcile adds the 24 spent meanwhile.
        private_redis.start()
        eventually(lambda: client.get("/v1/quota", headers=headers).json()["budgets"][0]["used"] == 36)


def test_a_restarted_redis_keeps_its_counters_not_its_scripts_and_settles_still_land_at_once(
    base_settings: Settings, fake: FakeUpstream, private_redis: RedisProcess
) -> None:
    """A restart loses Redis's script cache, AOF or not. The first settles after it load the script and land
    at once: owed to the next reconcile, each reservation would hold the budget a second longer, and a user
    near their limit, asking again straight away, would be refused "taken by requests in progress"."""
    settings = replace(base_settings, litellm_base_url=fake.url, redis_url=private_redis.url)
    user = uid()
    sql(settings.database_url, "insert into budgets (subject_type, subject, token_limit) values ('user', $1, 60)", user)
    headers = {"Authorization": f"Bearer {token(user)}"}
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/v1/chat/completions", headers=headers, json=CHAT).status_code == 200
        eventually(lambda: client.get("/v1/quota", headers=headers).json()["budgets"][0]["used"] == 12)
        private_redis.kill()
        private_redis.start()
        eventually(lambda: client.get("/readyz").status_code == 200)
        # 12 tokens each; unsettled, two reservations (36, then 18 of what was left) would refuse the third.
        for used in (24, 36, 48):
            r = client.post("/v1/chat/completions", headers=headers, json=CHAT)
            assert r.status_code == 200, r.text
            assert r.headers["x-quota-used"] == str(used)
