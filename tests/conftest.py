"""Fixtures against the real services: PostgreSQL (database `test`), Redis (DB 9), a LiteLLM process."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy.config import Settings
from proxy.db import migrate

from .devstack import free_port, start_litellm, stop
from .fake_upstream import FakeUpstream
from .helpers import JWT_SECRET, RedisProcess, serve

pytest_plugins = ["tests.browser"]  # the browser, context and page fixtures

TEST_DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/test")
TEST_REDIS_URL = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/9")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="session")
def base_settings() -> Settings:
    """Settings for tests; nothing is read from the developer's environment or .env."""
    return Settings(
        database_url=TEST_DATABASE_URL,
        redis_url=TEST_REDIS_URL,
        jwt_secret=JWT_SECRET,
        litellm_master_key="sk-unused",
        litellm_base_url="http://127.0.0.1:9",
        ledger_stream=f"test:ledger:{secrets.token_hex(4)}",
        ledger_flush_seconds=0.05,
        # In the event loop of the app under test: a writer process per test app would cost ~1 s to
        # start. The process mode has tests of its own (test_writer.py, test_durability.py).
        ledger_writer="inline",
        log_level="warning",
    )


@pytest.fixture(scope="session", autouse=True)
def database(base_settings: Settings) -> None:
    """Migrate the test database once and start from empty tables."""

    async def prepare() -> None:
        conn = await asyncpg.connect(base_settings.database_url)
        try:
            await migrate(conn)
            await conn.execute(
                "truncate usage_records, budget_grants, budget_model_caps, alert_outbox, alert_deliveries;"
                " delete from budgets"
            )
        finally:
            await conn.close()
        client = aioredis.Redis.from_url(base_settings.redis_url)
        await client.flushdb()
        await client.aclose()

    asyncio.run(prepare())


@pytest.fixture
async def redis_client(base_settings: Settings) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(base_settings.redis_url)
    yield client
    await client.aclose()


@pytest.fixture
def volatile_redis(tmp_path: Path) -> Iterator[RedisProcess]:
    """A private Redis that keeps nothing (a restart starts empty), for tests that kill or stop it."""
    server = RedisProcess(str(tmp_path), appendonly=False).start()
    yield server
    server.kill()  # SIGKILL ends a stopped (SIGSTOP) server too


@pytest.fixture
async def pg_pool(base_settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    pool = await asyncpg.create_pool(base_settings.database_url, min_size=1, max_size=4)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def litellm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """One real LiteLLM process (mock models) for the whole session: (base URL, master key)."""
    key = f"sk-{secrets.token_hex(24)}"
    port = free_port()
    log = tmp_path_factory.mktemp("litellm") / "litellm.log"
    proc = start_litellm(port, key, log_path=log)
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def e2e_settings(base_settings: Settings, litellm: tuple[str, str]) -> Settings:
    url, key = litellm
    return replace(base_settings, litellm_base_url=url, litellm_master_key=key)


def read_log(path: Path) -> str:
    return path.read_text() if path.exists() else ""


@pytest.fixture(scope="session")
def fake() -> Iterator[FakeUpstream]:
    """An OpenAI-shaped upstream that misbehaves on request (tests/fake_upstream.py), served on loopback."""
    upstream = FakeUpstream()
    with serve(upstream.app) as url:
        upstream.url = url
        yield upstream
