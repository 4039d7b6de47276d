"""The budget engine against real Redis and PostgreSQL."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from proxy.auth import Identity
from proxy.budget import BudgetEngine
from proxy.budget.rows import BudgetBook, period_bounds
from proxy.config import Settings
from proxy.errors import QuotaExceeded
from proxy.records import insert_records
from proxy.redis_wire import PipedRedis

from .helpers import uid

pytestmark = pytest.mark.anyio


def engine_for(client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings, **kw: object) -> BudgetEngine:
    return BudgetEngine(client, BudgetBook(settings), pool, **kw)  # type: ignore[arg-type]


def usage_row(user: str, tokens: int, at: float, tenant: str | None = None) -> bytes:
    """An encoded ledger record (without the fields added in sql/003, as an older version queued them)."""
    return orjson.dumps(
        {
            "request_id": uid("r"),
            "created_at": at,
            "user_id": user,
            "tenant_id": tenant,
            "model": "m",
            "served_model": None,
            "endpoint": "chat",
            "prompt_tokens": tokens,
            "completion_tokens": 0,
            "total_tokens": tokens,
            "cost_usd": None,
            "status": "ok",
            "http_status": 200,
            "stream": False,
            "estimated": False,
            "latency_ms": 1.0,
            "ttft_ms": None,
        }
    )


def test_period_bounds_are_utc_calendar_periods() -> None:
    at = datetime(2026, 12, 31, 23, 30, tzinfo=UTC).timestamp()  # a Thursday
    assert period_bounds("month", at) == (
        datetime(2026, 12, 1, tzinfo=UTC),
        datetime(2027, 1, 1, tzinfo=UTC),
    )
    assert period_bounds("day", at)[1] == datetime(2027, 1, 1, tzinfo=UTC)
    assert period_bounds("week", at) == (
        datetime(2026, 12, 28, tzinfo=UTC),
        datetime(2027, 1, 4, tzinfo=UTC),
    )
    assert period_bounds("total", at)[1] is None


async def test_reserve_then_settle_moves_used_by_exactly_the_real_usage(redis_client, pg_pool, base_settings) -> None:
    engine = engine_for(redis_client, pg_pool, base_settings)
    me = Identity(uid())
    r = await engine.reserve(me, "req-1", prompt=10, wanted=110)
    assert r.granted == 110
    assert (r.quotas[0].used, r.quotas[0].reserved) == (0, 110)
    assert await engine.settle(r, 37) == [37]
    (q,) = await engine.snapshot(me)
    assert (q.used, q.reserved, q.remaining, q.state) == (37, 0, 100_000 - 37, "ok")


# Fixed dates for the clock, in a year to come: the counters' keys expire a day after their period ends, by
# Redis's own clock, so a period already over would vanish as soon as it was written.
YEAR = datetime.now(UTC).year + 1


async def test_warn_and_blocked_states_and_the_readable_refusal(redis_client, pg_pool, base_settings) -> None:
    settings = replace(base_settings, default_token_budget=100_000)
    engine = engine_for(redis_client, pg_pool, settings, clock=lambda: datetime(YEAR, 11, 23, tzinfo=UTC).timestamp())
    me = Identity(uid())
    r = await engine.reserve(me, "a", 10, 20)
    await engine.settle(r, 80_000)
    assert (await engine.snapshot(me))[0].state == "warn"
    r = await engine.reserve(me, "b", 10, 20)
    await engine.settle(r, 20_000)
    with pytest.raises(QuotaExceeded) as info:
        await engine.reserve(me, "c", 10, 20)
    exc = info.value
    assert exc.status == 429 and exc.code == "insufficient_quota" and exc.type == "insufficient_quota"
    assert (
        exc.message == f"Monthly token budget used up: 100,000 of 100,000 tokens. It resets on {YEAR}-12-01 00:00 UTC."
    )
    assert exc.headers["x-should-retry"] == "false"
    assert exc.headers["X-Quota-State"] == "blocked" and exc.headers["X-Quota-Remaining"] == "0"


@pytest.mark.parametrize("sender", ["redis-py", "piped"])
async def test_fifty_concurrent_requests_never_overrun(redis_client, pg_pool, base_settings, sender) -> None:
    """Room for about 5 requests; the first requests of a never-seen user (no counter yet) included.
    Over both ways of sending commands: redis-py pipelines (Cluster, TLS) and the piped connection."""
    settings = replace(base_settings, default_token_budget=500)
    piped = PipedRedis(settings.redis_url, 2.0) if sender == "piped" else None
    engine = engine_for(redis_client, pg_pool, settings, sender=piped)
    me = Identity(uid())

    async def one(i: int) -> int:
        try:
            r = await engine.reserve(me, f"r{i}", prompt=10, wanted=110)
        except QuotaExceeded:
            return 0
        await asyncio.sleep(0.01)
        await engine.settle(r, r.granted)  # worst case: the model uses every token it was allowed
        return r.granted

    granted = await asyncio.gather(*(one(i) for i in range(50)))
    served = [g for g in granted if g]
    assert 4 <= len(served) <= 5
    (q,) = await engine.snapshot(me)
    assert q.used == sum(served) <= 500
    assert q.reserved == 0
    if piped is not None:
        await piped.close()


async def test_counter_lost_in_redis_is_rebuilt_from_postgres(redis_client, pg_pool, base_settings) -> None:
    engine = engine_for(redis_client, pg_pool, base_settings)
    me = Identity(uid())
    async with pg_pool.acquire() as conn:
        await insert_records(conn, [usage_row(me.user, 700, time.time()), usage_row(me.user, 300, time.time())], set())
    r = await engine.reserve(me, "x", 10, 20)
    assert r.quotas[0].used == 1000
    await engine.settle(r, 0)
    await redis_client.flushdb()  # Redis restarted without persistence
    (q,) = await engine.snapshot(me)
    assert q.used == 1000


async def test_new_period_starts_from_zero_and_old_usage_stays_in_its_period(
    redis_client, pg_pool, base_settings
) -> None:
    now = [datetime(YEAR, 11, 30, 23, 59, tzinfo=UTC).timestamp()]
    engine = engine_for(redis_client, pg_pool, replace(base_settings, default_token_budget=1000), clock=lambda: now[0])
    me = Identity(uid())
    async with pg_pool.acquire() as conn:
        await insert_records(conn, [usage_row(me.user, 990, now[0] - 60)], set())
    with pytest.raises(QuotaExceeded):
        await engine.reserve(me, "late-november", 10, 20)
    now[0] = datetime(YEAR, 12, 1, 0, 1, tzinfo=UTC).timestamp()
    r = await engine.reserve(me, "early-december", 10, 20)
    assert r.quotas[0].used == 0
    assert r.quotas[0].resets_at == datetime(YEAR + 1, 1, 1, tzinfo=UTC)


async def test_tenant_budget_blocks_a_user_who_still_has_room(redis_client, pg_pool, base_settings) -> None:
    settings = replace(base_settings, default_token_budget=10_000, default_tenant_budget=100)
    engine = engine_for(redis_client, pg_pool, settings)
    team = uid("team")
    spender, other = Identity(uid(), team), Identity(uid(), team)
    r = await engine.reserve(spender, "s", 10, 100)
    await engine.settle(r, 100)
    with pytest.raises(QuotaExceeded) as info:
        await engine.reserve(other, "o", 10, 20)
    assert info.value.message.startswith(f"Your team's ({team}) monthly token budget used up: 100 of 100 tokens.")
    # The headers still describe the caller's own budget, which is untouched.
    assert info.value.headers["X-Quota-Used"] == "0" and info.value.headers["X-Quota-Limit"] == "10000"
    assert [q.limit.subject_type for q in await engine.snapshot(other)] == ["user", "tenant"]


async def test_reservation_of_a_request_that_never_settles_lapses(redis_client, pg_pool, base_settings) -> None:
    now = [time.time()]
    settings = replace(base_settings, default_token_budget=100)
    engine = engine_for(redis_client, pg_pool, settings, reservation_ttl=0.2, clock=lambda: now[0])
    me = Identity(uid())
    await engine.reserve(me, "crashed", 10, 100)  # takes all the room and is never settled
    with pytest.raises(QuotaExceeded, match="fully taken by requests in progress"):
        await engine.reserve(me, "next", 10, 20)
    now[0] += 0.3
    r = await engine.reserve(me, "later", 10, 20)
    assert r.quotas[0].reserved == 20


async def test_grant_shrinks_to_the_room_left(redis_client, pg_pool, base_settings) -> None:
    engine = engine_for(redis_client, pg_pool, replace(base_settings, default_token_budget=100))
    me = Identity(uid())
    r = await engine.reserve(me, "big", prompt=10, wanted=4106)
    assert r.granted == 100


async def engine_with_limits(redis_client, pg_pool, settings, user: str, clock, **limits: int) -> BudgetEngine:  # type: ignore[no-untyped-def]
    from proxy.budget.rows import Limit, set_budget

    async with pg_pool.acquire() as conn:
        await set_budget(conn, Limit("user", user, "month", limits.pop("tokens", 100_000), 0.8, **limits))
    book = BudgetBook(settings)
    await book.load(pg_pool)
    return BudgetEngine(redis_client, book, pg_pool, clock=clock)


async def test_requests_per_minute_slide_over_the_last_minute(redis_client, pg_pool, base_settings) -> None:
    from proxy.errors import RateLimited

    me = Identity(uid())
    t0 = (int(time.time()) // 60 + 1) * 60  # the start of a minute
    now = [t0 + 30.0]
    engine = await engine_with_limits(redis_client, pg_pool, base_settings, me.user, lambda: now[0], rpm=3)
    for i in range(3):
        r = await engine.reserve(me, f"r{i}", 10, 20)
        await engine.settle(r, 15)
    assert r.headers()["X-RateLimit-Remaining-Requests"] == "0" and r.headers()["X-RateLimit-Limit-Requests"] == "3"
    with pytest.raises(RateLimited) as info:
        await engine.reserve(me, "r3", 10, 20)
    assert info.value.status == 429 and info.value.code == "rate_limit_exceeded"
    assert info.value.headers["Retry-After"] == "30"  # the current minute is full until it ends
    assert info.value.message == "Rate limit reached: 3 requests per minute. Try again in 30 s."
    now[0] = t0 + 61  # 59/60 of the previous minute's 3 requests still count
    with pytest.raises(RateLimited) as info:
        await engine.reserve(me, "r4", 10, 20)
    assert info.value.headers["Retry-After"] == "19"  # 3 * (1 - 20/60) + 1 = 3 fits at t0 + 80
    now[0] = t0 + 80
    await engine.reserve(me, "r5", 10, 20)


async def test_tokens_per_minute_count_settled_usage(redis_client, pg_pool, base_settings) -> None:
    from proxy.errors import RateLimited

    me = Identity(uid())
    t0 = (int(time.time()) // 60 + 1) * 60
    engine = await engine_with_limits(redis_client, pg_pool, base_settings, me.user, lambda: t0 + 10.0, tpm=100)
    r = await engine.reserve(me, "a", 10, 20)
    assert r.headers()["X-RateLimit-Remaining-Tokens"] == "100"
    await engine.settle(r, 100)
    with pytest.raises(RateLimited, match="100 tokens per minute"):
        await engine.reserve(me, "b", 10, 20)


async def test_reconcile_settles_each_owed_request_and_releases_its_reservation(
    redis_client, pg_pool, base_settings
) -> None:
    engine = engine_for(redis_client, pg_pool, base_settings)
    me = Identity(uid())
    first, second = await engine.reserve(me, "a", 10, 100), await engine.reserve(me, "b", 10, 100)
    engine.owe(first, 30)  # their settles could not reach Redis
    engine.owe(second, 20)
    await engine.reconcile()
    (q,) = await engine.snapshot(me)
    assert (q.used, q.reserved) == (50, 0)  # the tokens counted, the reservations released at once


async def test_an_owed_settle_redis_refuses_does_not_hold_up_the_others(redis_client, pg_pool, base_settings) -> None:
    engine = engine_for(redis_client, pg_pool, base_settings)
    me, other = Identity(uid()), Identity(uid())
    broken, fine = await engine.reserve(other, "a", 10, 100), await engine.reserve(me, "b", 10, 100)
    await redis_client.delete(broken.keys[0])
    await redis_client.set(broken.keys[0], "not a hash")  # every settle against it is refused (WRONGTYPE)
    engine.owe(broken, 30)
    engine.owe(fine, 20)
    await engine.reconcile()
    (q,) = await engine.snapshot(me)
    assert (q.used, q.reserved) == (20, 0)  # settled although the one owed before it never will be


async def test_an_owed_settle_skips_a_counter_rebuilt_after_its_record_went_into_postgresql(
    redis_client, pg_pool, base_settings
) -> None:
    # FAIL_MODE=open, Redis down: requests are served unmetered, their records go straight to PostgreSQL
    # (the first before Redis comes back empty and the counter is rebuilt, the second after), their settles
    # are owed, the first twice under its id (its reservation's release, then its usage), as the relay does.
    # The rebuild counted the first; only the second may be added. Both stamps are PostgreSQL's clock.
    engine = engine_for(redis_client, pg_pool, base_settings)
    me = Identity(uid())
    early, late = engine.unmetered(me, uid("early"), 100), engine.unmetered(me, uid("late"), 100)
    engine.owe(early, 0)

    async def write(tokens: int) -> int:
        async with pg_pool.acquire() as conn:
            await insert_records(conn, [usage_row(me.user, tokens, time.time())], set())
            return int(await conn.fetchval("select (extract(epoch from clock_timestamp()) * 1000)::bigint"))

    engine.owe(early, 30)
    engine.ledgered(early.request_id, await write(30))
    await asyncio.sleep(0.002)
    (q,) = await engine.snapshot(me)  # Redis is back, empty: the counter is rebuilt from PostgreSQL
    assert q.used == 30
    await asyncio.sleep(0.002)
    engine.owe(late, 20)
    engine.ledgered(late.request_id, await write(20))
    await engine.reconcile()
    (q,) = await engine.snapshot(me)
    assert q.used == 50  # as PostgreSQL has it: not 80


async def test_a_first_request_rebuilds_every_counter_it_needs(redis_client, pg_pool, base_settings) -> None:
    # A user, their tenant and two model caps, all missing after Redis came back empty: one rebuild a turn.
    from proxy.budget.rows import Limit, set_model_cap

    me = Identity(uid(), uid("t"))
    async with pg_pool.acquire() as conn:
        for glob in ("gpt-4o*", "gpt-4*"):
            await set_model_cap(conn, Limit("user", me.user, "month", 1000, 0.8, model=glob))
    book = BudgetBook(replace(base_settings, default_tenant_budget=10_000))
    await book.load(pg_pool)
    engine = BudgetEngine(redis_client, book, pg_pool)
    r = await engine.reserve(me, "r1", 10, 20, model="gpt-4o-mini")
    assert len(r.keys) == 4 and r.granted == 20


async def test_an_owed_settle_refused_for_a_passing_reason_is_kept(redis_client, pg_pool, base_settings) -> None:
    from redis.exceptions import OutOfMemoryError, ResponseError

    engine = engine_for(redis_client, pg_pool, base_settings)
    me = Identity(uid())
    owed = await engine.reserve(me, "a", 10, 100)
    engine.owe(owed, 30)

    refusals = [
        OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        ResponseError("NOREPLICAS Not enough good replicas to write. script: 0c77f9, on @user_script:20."),
        ResponseError("MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"),
        ResponseError("BUSY Redis is busy running a script."),
    ]

    async def refused(*_: object) -> list[int]:
        raise refusals.pop(0)

    engine.settle = refused  # type: ignore[method-assign]
    for _ in range(len(refusals)):
        with pytest.raises(ResponseError):
            await engine.reconcile()
    del engine.settle  # Redis takes writes again
    await engine.reconcile()
    (q,) = await engine.snapshot(me)
    assert (q.used, q.reserved) == (30, 0)
