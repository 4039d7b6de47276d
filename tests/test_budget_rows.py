"""proxy/budget/rows.py: budgets as data, against the real test PostgreSQL.

Each test works inside one transaction that is rolled back, so the '*' rows it writes or deletes are never
seen by tests running at the same time (and their rows, under REPEATABLE READ, never by it).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace

import asyncpg
import pytest

from proxy.budget.rows import DEFAULT, BudgetBook, Limit, env_defaults, fetch_limit, set_budget, sync_defaults
from proxy.config import Settings

from .helpers import uid

pytestmark = pytest.mark.anyio


@pytest.fixture
async def conn(base_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(base_settings.database_url)
    transaction = connection.transaction(isolation="repeatable_read")
    await transaction.start()
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()


async def row(conn: asyncpg.Connection, subject_type: str, subject: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "select period, token_limit, warn_ratio, rpm_limit, tpm_limit from budgets"
        " where subject_type = $1 and subject = $2",
        subject_type,
        subject,
    )


# env_defaults


def test_env_defaults_are_the_default_user_budget() -> None:
    settings = Settings(default_token_budget=5000, budget_period="week", warn_ratio=0.5)
    assert env_defaults(settings) == [Limit("user", "*", "week", 5000, 0.5)]


def test_env_defaults_add_a_tenant_budget_only_when_one_is_set() -> None:
    settings = Settings(default_token_budget=5000, default_tenant_budget=20_000, budget_period="day", warn_ratio=0.9)
    assert env_defaults(settings) == [Limit("user", "*", "day", 5000, 0.9), Limit("tenant", "*", "day", 20_000, 0.9)]
    assert env_defaults(replace(settings, default_tenant_budget=-1)) == [Limit("user", "*", "day", 5000, 0.9)]


# set_budget and fetch_limit


async def test_set_budget_writes_a_row_that_fetch_limit_reads_back(conn: asyncpg.Connection) -> None:
    me = uid()
    await set_budget(conn, Limit("user", me, "day", 2500, 0.75, rpm=30, tpm=9000))
    assert await fetch_limit(conn, "user", me) == Limit("user", me, "day", 2500, 0.75, 30, 9000)
    stored = await row(conn, "user", me)
    assert stored is not None and tuple(stored) == ("day", 2500, 0.75, 30, 9000)


async def test_no_rate_limit_is_stored_as_null_and_read_as_zero(conn: asyncpg.Connection) -> None:
    me = uid()
    await set_budget(conn, Limit("user", me, "month", 100, 0.8))
    stored = await row(conn, "user", me)
    assert stored is not None and (stored["rpm_limit"], stored["tpm_limit"]) == (None, None)
    found = await fetch_limit(conn, "user", me)
    assert found is not None and (found.rpm, found.tpm) == (0, 0)


async def test_set_budget_again_replaces_the_row(conn: asyncpg.Connection) -> None:
    team = uid("t")
    await set_budget(conn, Limit("tenant", team, "month", 100, 0.8, rpm=5))
    await set_budget(conn, Limit("tenant", team, "total", 7, 1.0))
    assert await fetch_limit(conn, "tenant", team) == Limit("tenant", team, "total", 7, 1.0, 0, 0)
    count = await conn.fetchval("select count(*) from budgets where subject_type = 'tenant' and subject = $1", team)
    assert count == 1


async def test_set_budget_refuses_an_unknown_period_before_writing(conn: asyncpg.Connection) -> None:
    me = uid()
    with pytest.raises(ValueError, match=r"^period must be one of day, week, month, total$"):
        await set_budget(conn, Limit("user", me, "year", 100, 0.8))
    assert await row(conn, "user", me) is None


async def test_set_budget_refuses_negative_numbers_and_leaves_other_checks_to_the_table(
    conn: asyncpg.Connection,
) -> None:
    with pytest.raises(ValueError, match="0 or more"):
        await set_budget(conn, Limit("user", uid(), "day", -1, 0.8))
    with pytest.raises(ValueError, match="0 or more"):
        await set_budget(conn, Limit("user", uid(), "day", 10, 0.8, rpm=-1))
    with pytest.raises(asyncpg.CheckViolationError):
        await set_budget(conn, Limit("user", uid(), "day", 10, 1.5))


async def test_fetch_limit_prefers_the_subjects_own_row_over_the_default(conn: asyncpg.Connection) -> None:
    me, other = uid(), uid()
    await set_budget(conn, Limit("user", DEFAULT, "month", 111, 0.8))
    await set_budget(conn, Limit("user", me, "day", 222, 0.6))
    assert await fetch_limit(conn, "user", me) == Limit("user", me, "day", 222, 0.6)
    assert await fetch_limit(conn, "user", other) == Limit("user", DEFAULT, "month", 111, 0.8)


async def test_fetch_limit_does_not_mix_subject_types(conn: asyncpg.Connection) -> None:
    name = uid("both")
    await conn.execute("delete from budgets where subject_type = 'tenant' and subject = $1", DEFAULT)
    await set_budget(conn, Limit("user", name, "day", 5, 0.8))
    assert await fetch_limit(conn, "tenant", name) is None
    await set_budget(conn, Limit("tenant", DEFAULT, "week", 50, 0.9))
    assert await fetch_limit(conn, "tenant", name) == Limit("tenant", DEFAULT, "week", 50, 0.9)


# sync_defaults


async def test_sync_defaults_writes_the_environments_default_rows(conn: asyncpg.Connection) -> None:
    settings = Settings(default_token_budget=4321, default_tenant_budget=98_765, budget_period="week", warn_ratio=0.6)
    await sync_defaults(conn, settings)
    assert await fetch_limit(conn, "user", uid()) == Limit("user", DEFAULT, "week", 4321, 0.6)
    assert await fetch_limit(conn, "tenant", uid("t")) == Limit("tenant", DEFAULT, "week", 98_765, 0.6)


async def test_sync_defaults_removes_the_default_tenant_row_when_tenants_have_no_budget(
    conn: asyncpg.Connection,
) -> None:
    await set_budget(conn, Limit("tenant", DEFAULT, "month", 1000, 0.8))
    await sync_defaults(conn, Settings(default_token_budget=77, default_tenant_budget=0))
    assert await row(conn, "tenant", DEFAULT) is None
    stored = await row(conn, "user", DEFAULT)
    assert stored is not None and tuple(stored) == ("month", 77, 0.8, None, None)


async def test_sync_defaults_leaves_other_subjects_rows(conn: asyncpg.Connection) -> None:
    me, team = uid(), uid("t")
    await set_budget(conn, Limit("user", me, "day", 9, 0.8))
    await set_budget(conn, Limit("tenant", team, "day", 99, 0.8))
    await sync_defaults(conn, Settings(default_token_budget=1))
    assert await fetch_limit(conn, "user", me) == Limit("user", me, "day", 9, 0.8)
    assert await fetch_limit(conn, "tenant", team) == Limit("tenant", team, "day", 99, 0.8)


# BudgetBook


def test_a_new_book_holds_the_environment_defaults() -> None:
    book = BudgetBook(Settings(default_token_budget=500, budget_period="day", warn_ratio=0.5))
    assert book.user("anyone") == Limit("user", DEFAULT, "day", 500, 0.5)
    assert book.tenant("acme") is None
    assert book.tenant(None) is None
    assert book.version == 0


def test_a_book_with_a_default_tenant_budget_falls_back_to_it() -> None:
    book = BudgetBook(Settings(default_tenant_budget=40_000))
    assert book.tenant("acme") == Limit("tenant", DEFAULT, "month", 40_000, 0.8)
    assert book.tenant(None) is None  # no tenant: no tenant budget, even with a default


async def test_load_reads_every_row_and_falls_back_to_the_defaults(conn: asyncpg.Connection) -> None:
    me, team = uid(), uid("t")
    await conn.execute("delete from budgets")
    await set_budget(conn, Limit("user", me, "week", 123, 0.7, rpm=3))
    await set_budget(conn, Limit("tenant", team, "day", 456, 0.9, tpm=10))
    book = BudgetBook(Settings(default_token_budget=1000))
    await book.load(conn)  # type: ignore[arg-type]  # a connection answers fetch() like a pool
    assert book.user(me) == Limit("user", me, "week", 123, 0.7, 3, 0)
    assert book.user(uid()) == Limit("user", DEFAULT, "month", 1000, 0.8)
    assert book.tenant(team) == Limit("tenant", team, "day", 456, 0.9, 0, 10)
    assert book.tenant(uid("t")) is None


async def test_rows_in_the_database_override_the_environment_defaults(conn: asyncpg.Connection) -> None:
    await conn.execute("delete from budgets")
    await set_budget(conn, Limit("user", DEFAULT, "total", 5, 1.0))
    await set_budget(conn, Limit("tenant", DEFAULT, "week", 6, 0.5))
    book = BudgetBook(Settings(default_token_budget=1000, default_tenant_budget=2000))
    await book.load(conn)  # type: ignore[arg-type]
    assert book.user(uid()) == Limit("user", DEFAULT, "total", 5, 1.0)
    assert book.tenant(uid("t")) == Limit("tenant", DEFAULT, "week", 6, 0.5)


async def test_load_bumps_the_version_only_when_the_rows_change(conn: asyncpg.Connection) -> None:
    me = uid()
    settings = Settings(default_token_budget=1000)
    await conn.execute("delete from budgets; delete from budget_grants; delete from budget_model_caps")
    book = BudgetBook(settings)
    await book.load(conn)  # type: ignore[arg-type]
    assert book.version == 0  # an empty table: the environment defaults, as before
    await sync_defaults(conn, settings)
    await book.load(conn)  # type: ignore[arg-type]
    assert book.version == 0  # the '*' row written from the same environment is the same limit
    await set_budget(conn, Limit("user", me, "day", 10, 0.8))
    await book.load(conn)  # type: ignore[arg-type]
    assert (book.version, book.user(me).tokens) == (1, 10)
    await book.load(conn)  # type: ignore[arg-type]
    assert book.version == 1
    await set_budget(conn, Limit("user", me, "day", 11, 0.8))
    await book.load(conn)  # type: ignore[arg-type]
    assert (book.version, book.user(me).tokens) == (2, 11)
    await conn.execute("delete from budgets where subject = $1", me)
    await book.load(conn)  # type: ignore[arg-type]
    assert (book.version, book.user(me)) == (3, Limit("user", DEFAULT, "month", 1000, 0.8))
