"""Rollover: part of last period's unused budget carried into this one, from PostgreSQL."""

from __future__ import annotations

import time
from datetime import timedelta

import asyncpg
import pytest
import redis.asyncio as aioredis

from proxy.auth import Identity
from proxy.budget import BudgetEngine
from proxy.budget.rows import BudgetBook, Limit, period_bounds, set_budget
from proxy.config import Settings
from proxy.records import insert_records

from .helpers import uid
from .test_budget_engine import usage_row

pytestmark = pytest.mark.anyio


async def engine_with(pool: asyncpg.Pool, client: aioredis.Redis, base_settings: Settings) -> BudgetEngine:
    book = BudgetBook(base_settings)
    await book.load(pool)
    return BudgetEngine(client, book, pool)


@pytest.mark.parametrize(
    "used_before, rollover, cap, carried",
    [
        (400, 0.5, 0.5, 300),  # half of the 600 unused
        (0, 1.0, 0.25, 250),  # all 1,000 unused, capped at a quarter of the limit
        (1200, 0.5, 0.5, 0),  # overspent last period: nothing to carry
        (400, 0.0, 0.5, 0),  # no rollover on the row
    ],
)
async def test_unused_budget_is_carried_into_the_next_period(
    pg_pool: asyncpg.Pool,
    redis_client: aioredis.Redis,
    base_settings: Settings,
    used_before: int,
    rollover: float,
    cap: float,
    carried: int,
) -> None:
    user = uid()
    start, _ = period_bounds("month", time.time())
    last_period = (start - timedelta(days=3)).timestamp()
    async with pg_pool.acquire() as conn:
        await set_budget(conn, Limit("user", user, "month", 1000, 0.8, rollover=rollover, rollover_cap=cap))
        if used_before:
            await insert_records(conn, [usage_row(user, used_before, last_period)], set())
    engine = await engine_with(pg_pool, redis_client, base_settings)
    (quota,) = await engine.snapshot(Identity(user))
    assert quota.limit.tokens == 1000 + carried
    status = await pg_pool.fetchval("select token_limit from budget_status where subject = $1", user)
    assert status == 1000 + carried  # the admin view agrees


async def test_the_carry_survives_redis_losing_the_counter(
    pg_pool: asyncpg.Pool, redis_client: aioredis.Redis, base_settings: Settings
) -> None:
    user = uid()
    start, _ = period_bounds("month", time.time())
    async with pg_pool.acquire() as conn:
        await set_budget(conn, Limit("user", user, "month", 1000, 0.8, rollover=1.0, rollover_cap=0.5))
        await insert_records(conn, [usage_row(user, 800, (start - timedelta(days=1)).timestamp())], set())
        await insert_records(conn, [usage_row(user, 100, time.time() - 1)], set())
    engine = await engine_with(pg_pool, redis_client, base_settings)
    (before,) = await engine.snapshot(Identity(user))
    async for key in redis_client.scan_iter(match=f"quota:*{user}*"):
        await redis_client.delete(key)
    (after,) = await engine.snapshot(Identity(user))
    assert (before.limit.tokens, before.used) == (after.limit.tokens, after.used) == (1200, 100)
