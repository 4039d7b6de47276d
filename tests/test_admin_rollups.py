"""The dashboard's rollups (sql/010_admin.sql) against the ledger they sum: written by the ledger's own
insert path (a redelivered batch too), rows deleted, a rebuild; and budget_changes written by `budget set`.
Each test's users are its own, and every figure is compared with a sum over usage_records."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from proxy.budget.rows import Limit, change_budget
from proxy.config import Settings
from proxy.records import UsageRecord, insert_records

from .helpers import uid

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(base_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(base_settings.database_url)
    yield connection
    await connection.close()


def record(user: str, at: datetime, tokens: int, **fields: object) -> bytes:
    base: dict[str, object] = {
        "request_id": uid("r"),
        "created_at": at.timestamp(),
        "user_id": user,
        "tenant_id": None,
        "model": "gpt-4o",
        "served_model": "gpt-4o",
        "endpoint": "chat",
        "prompt_tokens": tokens // 2,
        "completion_tokens": tokens - tokens // 2,
        "total_tokens": tokens,
        "cost_usd": None,
        "status": "ok",
        "http_status": 200,
        "stream": False,
        "estimated": False,
        "latency_ms": 1.0,
        "ttft_ms": None,
    }
    base.update(fields)
    return UsageRecord(**base).encode()  # type: ignore[arg-type]


async def rollup_matches_ledger(conn: asyncpg.Connection, users: list[str]) -> None:
    by_day = await conn.fetch(
        "select (created_at at time zone 'UTC')::date as day, user_id, coalesce(tenant_id, '') as tenant_id,"
        " count(*) as requests, count(*) filter (where status = 'blocked') as blocked,"
        " sum(total_tokens) as tokens, coalesce(sum(total_tokens) filter (where not exempt), 0) as counted,"
        " coalesce(sum(cost_usd), 0) as cost_usd"
        " from usage_records where user_id = any($1) group by 1, 2, 3 order by 1, 2, 3",
        users,
    )
    rolled = await conn.fetch(
        # A day whose costed records were all deleted keeps a cost of 0 where the ledger's sum is empty.
        "select day, user_id, tenant_id, requests, blocked, tokens, counted, coalesce(cost_usd, 0) from usage_user_day"
        " where user_id = any($1) and requests <> 0 order by 1, 2, 3",
        users,
    )
    assert [tuple(r) for r in rolled] == [tuple(r) for r in by_day]
    months = await conn.fetch(
        "select month, user_id, sum(requests) as requests, sum(counted) as counted from usage_user_month"
        " where user_id = any($1) and requests <> 0 group by 1, 2 order by 1, 2",
        users,
    )
    from_days = await conn.fetch(
        "select date_trunc('month', day)::date as month, user_id, sum(requests) as requests,"
        " sum(counted) as counted from usage_user_day where user_id = any($1) and requests <> 0"
        " group by 1, 2 order by 1, 2",
        users,
    )
    assert [tuple(r) for r in months] == [tuple(r) for r in from_days]


async def test_the_rollups_are_the_ledgers_sums_through_the_writer_redelivery_and_deletes(
    conn: asyncpg.Connection,
) -> None:
    alice, bob = uid("alice"), uid("bob")
    month = datetime.now(UTC).replace(day=1, hour=12, minute=0, second=0, microsecond=0)
    batch = [
        record(alice, month, 100, cost_usd=0.5),
        record(alice, month + timedelta(days=1), 40, tenant_id="acme"),
        record(alice, month, 0, status="blocked"),
        record(bob, month, 70, exempt=True),
        record(bob, month - timedelta(days=3), 30),  # last month
    ]
    known: set[datetime] = set()
    assert await insert_records(conn, batch, known) == 5
    # Redelivered after a crash, with one new record: the staging route inserts only the new one.
    again = [*batch, record(bob, month, 5)]
    assert await insert_records(conn, again, known) == 1
    await rollup_matches_ledger(conn, [alice, bob])
    counted = await conn.fetchval(
        "select sum(counted) from usage_user_month where user_id = $1 and month = $2", bob, month.date()
    )
    assert counted == 5  # the exempt 70 is recorded but not counted
    users = await conn.fetch(
        "select user_id, tenant_id, first_day from usage_users where user_id = any($1) order by 1", [alice, bob]
    )
    assert [(u["user_id"], u["tenant_id"]) for u in users] == [(alice, "acme"), (bob, "")]
    await conn.execute("delete from usage_records where user_id = $1 and total_tokens = 100", alice)
    await rollup_matches_ledger(conn, [alice, bob])
    # A repair: the rollups forget this month and are recomputed from the ledger, to the same sums.
    await conn.execute(
        "update usage_user_day set tokens = 0 where user_id = any($1) and day >= $2", [alice, bob], month.date()
    )
    await conn.execute("select quota_rollup_rebuild($1, $1)", month.date())
    await rollup_matches_ledger(conn, [alice, bob])


async def test_usage_users_keeps_the_tenant_and_tier_of_each_user_s_latest_record_whatever_the_order(
    conn: asyncpg.Connection,
) -> None:
    me = uid()
    noon = datetime.now(UTC).replace(hour=12, minute=0, second=0, microsecond=0)
    known: set[datetime] = set()

    async def held() -> tuple[object, ...]:
        row = await conn.fetchrow(
            "select tenant_id, budget_group, first_day, last_day from usage_users where user_id = $1", me
        )
        return tuple(row)

    latest = record(me, noon, 10, tenant_id="acme", _budget_group="eng")
    assert await insert_records(conn, [record(me, noon - timedelta(minutes=1), 10), latest], known) == 2
    assert await held() == ("acme", "eng", noon.date(), noon.date())
    # Written late (another writer's batch, a record sent straight to PostgreSQL): older, so it changes
    # neither the tenant nor the tier, nor the last day; it moves the first day back.
    await insert_records(conn, [record(me, noon - timedelta(days=1), 10, _budget_group="support")], known)
    assert await held() == ("acme", "eng", noon.date() - timedelta(days=1), noon.date())
    # Their groups changed: the next record has no tier, and from then on neither has the user.
    await insert_records(conn, [record(me, noon + timedelta(seconds=1), 10, tenant_id="acme")], known)
    assert (await held())[:2] == ("acme", None)
    # The batch with the tier redelivered after a crash: recorded already, so it changes nothing.
    assert await insert_records(conn, [latest, record(me, noon - timedelta(hours=1), 10)], known) == 1
    assert (await held())[:2] == ("acme", None)
    assert await conn.fetchval("select count(*) from usage_records where user_id = $1", me) == 5


async def test_the_rollup_triggers_run_the_statements_quota_rollup_sql_makes(conn: asyncpg.Connection) -> None:
    # sql/012_cached_plans.sql wrote them into the trigger functions, for plans kept per session: a change to
    # quota_rollup_sql that is not compiled again (select quota_rollup_compile()) would be silently ignored.
    for function, rows_table, sign in (
        ("quota_rollup_inserted", "quota_new_rows", 1),
        ("quota_rollup_deleted", "quota_old_rows", -1),
    ):
        body = await conn.fetchval("select prosrc from pg_proc where proname = $1", function)
        statements = [r[0] for r in await conn.fetch("select quota_rollup_sql($1, $2)", rows_table, sign)]
        assert len(statements) == (4 if sign > 0 else 3)
        assert all(statement in body for statement in statements) and "execute" not in body.lower()


async def test_change_budget_records_who_and_what_before_and_after(conn: asyncpg.Connection) -> None:
    me = uid()
    before, after = await change_budget(conn, Limit("user", me, "month", 1000, 0.8), "ops", "cli", "new hire")
    assert before is None and after["tokens"] == 1000
    before, after = await change_budget(conn, Limit("user", me, "week", 2000, 0.5, rpm=3), "ana", "api")
    assert before is not None and (before["tokens"], before["period"]) == (1000, "month")
    assert (after["tokens"], after["rpm"], after["warn_ratio"]) == (2000, 3, 0.5)
    await change_budget(conn, Limit("user", me, "month", 500, 0.8, model="gpt-4o*"), "ana", "api")
    rows = await conn.fetch(
        "select changed_by, source, model, before, after, reason from budget_changes where subject = $1 order by id",
        me,
    )
    assert [(r["changed_by"], r["source"], r["model"], r["reason"]) for r in rows] == [
        ("ops", "cli", "", "new hire"),
        ("ana", "api", "", None),
        ("ana", "api", "gpt-4o*", None),
    ]
    assert rows[2]["before"] is None and '"tokens": 500' in rows[2]["after"]
    row = await conn.fetchrow("select period, token_limit, rpm_limit from budgets where subject = $1", me)
    assert tuple(row) == ("week", 2000, 3)
