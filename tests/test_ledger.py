"""The ledger: Redis Stream to PostgreSQL, exactly once."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis

from proxy.db import migrate, migration_files
from proxy.ledger import GROUP, READ_CHUNK, TRIM_CHUNK, Ledger
from proxy.records import UsageRecord, insert_records, insert_rows

from .helpers import uid

pytestmark = pytest.mark.anyio


def record(user: str, tokens: int = 30, at: float | None = None, **kw: object) -> UsageRecord:
    fields = dict(
        request_id=uid("req"),
        created_at=at or time.time(),
        user_id=user,
        tenant_id="acme",
        model="mock-gpt",
        served_model="mock-gpt",
        endpoint="chat",
        prompt_tokens=10,
        completion_tokens=tokens - 10,
        total_tokens=tokens,
        cost_usd=0.00012,
        status="ok",
        http_status=200,
        stream=True,
        estimated=False,
        latency_ms=12.5,
        ttft_ms=3.25,
    )
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


async def enqueue(client: aioredis.Redis, ledger: Ledger, records: list[UsageRecord]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for r in records:
            pipe.execute_command(*ledger.command(r))
        await pipe.execute()


@pytest.fixture
async def ledger(redis_client: aioredis.Redis, pg_pool: asyncpg.Pool) -> Ledger:
    led = Ledger(redis_client, pg_pool, stream=f"test:ledger:{uid()}", consumer="test-writer", batch_size=100)
    await led.ensure_group()
    return led


async def test_records_land_in_postgres_with_every_field(ledger, redis_client, pg_pool) -> None:
    user = uid()
    records = [record(user), record(user, 50, stream=False, ttft_ms=None, estimated=True)]
    await enqueue(redis_client, ledger, records)
    assert await ledger.drain_once(block=False) == 2
    rows = await pg_pool.fetch("select * from usage_records where user_id = $1 order by total_tokens", user)
    assert [(r["total_tokens"], r["stream"], r["estimated"], r["ttft_ms"]) for r in rows] == [
        (30, True, False, 3.25),
        (50, False, True, None),
    ]
    assert rows[0]["request_id"] == records[0].request_id and rows[0]["tenant_id"] == "acme"
    assert float(rows[0]["cost_usd"]) == pytest.approx(0.00012)
    assert abs(rows[0]["created_at"].timestamp() - records[0].created_at) < 1e-3
    assert await ledger.backlog() == 0  # acknowledged entries are deleted from the stream


async def test_redelivery_after_a_crash_before_ack_never_duplicates(ledger, redis_client, pg_pool) -> None:
    user = uid()
    records = [record(user) for _ in range(5)]
    await enqueue(redis_client, ledger, records)
    # A writer reads the batch and commits, then dies before XACK: the entries stay pending.
    await redis_client.xreadgroup(GROUP, "test-writer", {ledger.stream: ">"}, count=100)
    async with pg_pool.acquire() as conn:
        await insert_records(conn, [r.encode() for r in records[:3]], set())
    # The restarted writer re-reads its pending entries and writes them again.
    assert await ledger.drain_once(pending=True) == 5
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == 5
    assert await ledger.drain_once(pending=True) == 0


async def test_the_tier_is_written_only_when_there_is_one_and_older_records_still_load(
    ledger, redis_client, pg_pool
) -> None:
    user = uid()
    plain, tiered = record(user), record(user, 40, _budget_group='eng "core" ü')
    assert b"budget_group" not in plain.encode()  # most records carry no tier: not a byte more
    assert tiered.encode().endswith(',"exempt":false,"budget_group":"eng \\"core\\" ü"}'.encode())
    # Queued by older versions: without the tier, and without the fields added before it (sql/003-005).
    older = orjson.loads(record(user, 50).encode())
    oldest = {k: v for k, v in orjson.loads(record(user, 60).encode()).items() if k not in ("via", "exempt")}
    await enqueue(redis_client, ledger, [plain, tiered])
    await redis_client.xadd(ledger.stream, {"r": orjson.dumps(older)})
    await redis_client.xadd(ledger.stream, {"r": orjson.dumps(oldest)})
    assert await ledger.drain_once(block=False) == 4
    rows = await pg_pool.fetch(
        "select total_tokens, budget_group, exempt from usage_records where user_id = $1 order by total_tokens", user
    )
    assert [tuple(r) for r in rows] == [
        (30, None, False),
        (40, 'eng "core" ü', False),
        (50, None, False),
        (60, None, False),
    ]


async def test_a_batch_larger_than_a_trim_chunk_is_acknowledged_and_deleted_whole(redis_client, pg_pool) -> None:
    ledger = Ledger(redis_client, pg_pool, stream=f"test:ledger:{uid()}", consumer="test-writer", batch_size=1000)
    await ledger.ensure_group()
    user = uid()
    await enqueue(redis_client, ledger, [record(user) for _ in range(TRIM_CHUNK * 2 + 1)])
    assert await ledger.drain_once(block=False) == TRIM_CHUNK * 2 + 1
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == TRIM_CHUNK * 2 + 1
    assert await ledger.backlog() == 0
    assert (await redis_client.xpending(ledger.stream, GROUP))["pending"] == 0


async def test_a_batch_is_read_in_chunks_and_written_in_one_copy(redis_client, pg_pool, monkeypatch) -> None:
    """No read asks Redis for more than READ_CHUNK entries (a big read stalls every proxy's commands),
    yet a batch is whole: one COPY; and paging through pending entries neither repeats nor skips one."""
    ledger = Ledger(redis_client, pg_pool, stream=f"test:ledger:{uid()}", consumer="test-writer", batch_size=1000)
    await ledger.ensure_group()
    user = uid()
    total = READ_CHUNK * 3 + 7
    await enqueue(redis_client, ledger, [record(user) for _ in range(total)])
    asked: list[int] = []
    read = ledger._reader.xreadgroup

    async def counting(*args, **kwargs):
        asked.append(kwargs["count"])
        return await read(*args, **kwargs)

    monkeypatch.setattr(ledger._reader, "xreadgroup", counting)
    copies: list[int] = []
    real_insert = insert_rows

    async def counting_insert(conn, rows, months):
        copies.append(len(rows))
        return await real_insert(conn, rows, months)

    monkeypatch.setattr("proxy.ledger.insert_rows", counting_insert)
    # Delivered to this consumer and never acknowledged (a crash), some deleted meanwhile: the pending
    # pass pages through all of them, READ_CHUNK at a time.
    delivered = await redis_client.xreadgroup(GROUP, "test-writer", {ledger.stream: ">"}, count=total)
    await redis_client.xdel(ledger.stream, delivered[0][1][READ_CHUNK][0])
    assert await ledger.drain_once(pending=True) == total - 1
    assert copies == [total - 1] and max(asked) <= READ_CHUNK and len(asked) == 4
    assert await ledger.drain_once(pending=True) == 0
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == total - 1
    assert (await redis_client.xpending(ledger.stream, GROUP))["pending"] == 0


async def test_a_whole_batch_of_deleted_pending_entries_does_not_hide_the_live_ones_after_it(
    redis_client, pg_pool
) -> None:
    """Pending entries deleted since delivery (an XTRIM, an XDEL by hand) filling a whole batch: the pass over
    pending entries goes on past them, so a shutdown's flush moves the live ones behind them, not leaves them."""
    batch = READ_CHUNK
    ledger = Ledger(redis_client, pg_pool, stream=f"test:ledger:{uid()}", consumer="test-writer", batch_size=batch)
    await ledger.ensure_group()
    user = uid()
    await enqueue(redis_client, ledger, [record(user) for _ in range(batch + 5)])
    delivered = await redis_client.xreadgroup(GROUP, "test-writer", {ledger.stream: ">"}, count=batch + 5)
    await redis_client.xdel(ledger.stream, *[eid for eid, _ in delivered[0][1][:batch]])  # then the writer dies
    assert await ledger.flush(5) == 5
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == 5
    assert (await redis_client.xpending(ledger.stream, GROUP))["pending"] == 0
    assert await ledger.backlog() == 0


async def test_a_batch_is_all_or_nothing_and_counts_only_new_rows(pg_pool) -> None:
    user = uid()
    first, second, third = (record(user, tokens) for tokens in (10, 20, 30))
    async with pg_pool.acquire() as conn:
        assert await insert_records(conn, [first.encode(), second.encode()], set()) == 2  # the COPY route
        # Partly recorded (and one record twice in the batch): the staging route adds the one new row.
        assert await insert_records(conn, [first.encode(), third.encode(), third.encode(), second.encode()], set()) == 1
    rows = await pg_pool.fetch("select total_tokens from usage_records where user_id = $1 order by 1", user)
    assert [r["total_tokens"] for r in rows] == [10, 20, 30]


async def test_entries_of_a_dead_writer_are_claimed(redis_client, pg_pool) -> None:
    stream = f"test:ledger:{uid()}"
    dead = Ledger(redis_client, pg_pool, stream=stream, consumer="dead")
    alive = Ledger(redis_client, pg_pool, stream=stream, consumer="alive", claim_idle_seconds=0)
    await dead.ensure_group()
    user = uid()
    await enqueue(redis_client, dead, [record(user), record(user)])
    await redis_client.xreadgroup(GROUP, "dead", {stream: ">"}, count=10)  # then it dies
    assert await alive.drain_once(block=False) == 0  # nothing new
    assert await alive.claim_abandoned() == 2
    assert await alive.drain_once(pending=True) == 2
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == 2


async def test_a_record_in_a_month_without_partition_creates_it(ledger, redis_client, pg_pool) -> None:
    user = uid()
    far = datetime(2031, 7, 15, tzinfo=UTC).timestamp()
    await pg_pool.execute("drop table if exists usage_records_203107; drop table if exists usage_records_203106")
    await enqueue(redis_client, ledger, [record(user), record(user, at=far)])
    assert await ledger.drain_once(block=False) == 2
    assert await pg_pool.fetchval("select count(*) from usage_records_203107 where user_id = $1", user) == 1
    # Only the months a batch holds, not every month between them.
    assert await pg_pool.fetchval("select to_regclass('usage_records_203106')") is None


async def test_text_fields_arrive_exactly_and_a_nul_is_dropped(ledger, redis_client, pg_pool) -> None:
    user = uid()
    awkward = 'quote " back\\slash \\u0000 tab\t newline\n é 漢 \U0001f600'  # \\u0000 here is text, not a NUL
    records = [record(user, model=awkward), record(user, model="nul\x00inside", user_email="a\\\x00b@x")]
    await enqueue(redis_client, ledger, records)
    assert await ledger.drain_once(block=False) == 2
    rows = await pg_pool.fetch(
        "select model, user_email from usage_records where user_id = $1 order by total_tokens, model", user
    )
    assert sorted(r["model"] for r in rows) == sorted([awkward, "nulinside"])
    assert {r["user_email"] for r in rows} == {None, "a\\b@x"}


async def test_a_record_postgres_refuses_is_set_aside_and_the_rest_land(ledger, redis_client, pg_pool) -> None:
    user = uid()
    good = [record(user), record(user)]
    too_big = record(user, 10**12)  # no integer column holds it: PostgreSQL refuses this record forever
    await enqueue(redis_client, ledger, [good[0], too_big, good[1]])
    await redis_client.xadd(ledger.stream, {"r": b"{not json"})
    assert await ledger.drain_once(block=False) == 4
    assert await pg_pool.fetchval("select count(*) from usage_records where user_id = $1", user) == 2
    rejected = await redis_client.xrange(f"{ledger.stream}:rejected")
    assert len(rejected) == 2
    assert orjson.loads(rejected[0][1][b"r"])["request_id"] == too_big.request_id
    assert b"range" in rejected[0][1][b"error"]
    assert rejected[1][1][b"r"] == b"{not json"
    assert await ledger.backlog() == 0  # nothing left to hold up later records
    await redis_client.delete(f"{ledger.stream}:rejected")


async def test_direct_write_when_redis_is_unreachable(pg_pool) -> None:
    broken = aioredis.Redis.from_url("redis://127.0.0.1:1/0")
    led = Ledger(broken, pg_pool, stream="unused")
    r = record(uid())
    await led.write_direct(r)
    assert await pg_pool.fetchval("select total_tokens from usage_records where request_id = $1", r.request_id) == 30
    await broken.aclose()


async def test_views_report_what_the_records_say(ledger, redis_client, pg_pool) -> None:
    user = uid()
    await pg_pool.execute(
        "insert into budgets (subject_type, subject, period, token_limit, warn_ratio)"
        " values ('user', $1, 'month', 100, 0.8)",
        user,
    )
    await enqueue(
        redis_client,
        ledger,
        [record(user, 30), record(user, 55, model="other"), record(user, 0, status="blocked", http_status=429)],
    )
    await ledger.drain_once(block=False)
    daily = await pg_pool.fetch(
        "select model, requests, tokens from usage_daily where user_id = $1 order by model", user
    )
    assert [tuple(r) for r in daily] == [("mock-gpt", 2, 30), ("other", 1, 55)]
    status = await pg_pool.fetchrow("select * from budget_status where subject_type = 'user' and subject = $1", user)
    assert (status["token_limit"], status["used"], status["remaining"], status["state"]) == (100, 85, 15, "warn")
    assert float(status["percent"]) == 85.0
    top = await pg_pool.fetchrow("select * from top_users_month where user_id = $1", user)
    assert (top["requests"], top["tokens"], top["state"]) == (3, 85, "warn")
    assert await pg_pool.fetchval("select count(*) from blocked_requests where user_id = $1", user) == 1
    monthly = await pg_pool.fetchval("select sum(tokens) from usage_monthly where user_id = $1", user)
    by_model = await pg_pool.fetchval("select count(*) from usage_by_model where model = 'other'")
    assert monthly == 85 and by_model >= 1


async def test_migrate_is_idempotent_and_safe_to_run_concurrently(base_settings) -> None:
    conns = [await asyncpg.connect(base_settings.database_url) for _ in range(2)]
    try:
        results = await asyncio.gather(*(migrate(c) for c in conns))
        assert results == [[], []]  # already applied by the session fixture; both runs wait their turn
        versions = await conns[0].fetch("select version from schema_migrations order by version")
        assert [v["version"] for v in versions] == [p.name for p in migration_files()]
    finally:
        for c in conns:
            await c.close()


async def test_an_idle_stream_is_not_an_outage_whatever_the_flush_interval(pg_pool, base_settings) -> None:
    """The blocking read ends before the socket timeout even when LEDGER_FLUSH_SECONDS is longer."""
    client = aioredis.Redis.from_url(base_settings.redis_url, socket_timeout=0.5)
    led = Ledger(client, pg_pool, stream=f"test:ledger:{uid()}", flush_seconds=3.0, redis_timeout=0.5)
    try:
        await led.ensure_group()
        started = time.monotonic()
        assert await led.drain_once() == 0
        assert time.monotonic() - started < 0.5
    finally:
        await client.delete(led.stream)
        await client.aclose()
