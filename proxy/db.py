"""PostgreSQL: the connection pool and the numbered migrations in `sql/`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg

# What a query raises when PostgreSQL is down, restarting or unreachable.
PG_UNAVAILABLE = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, asyncio.TimeoutError)

# An installed wheel carries the migrations as proxy/sql; a source checkout has them at its top, in sql/.
_HERE = Path(__file__).resolve().parent
SQL_DIR = _HERE / "sql" if (_HERE / "sql").is_dir() else _HERE.parent / "sql"
# Any constant works; it only has to be the same for every instance running `migrate`.
_MIGRATE_LOCK = 0x51554F5441


async def create_pool(dsn: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    return await asyncpg.create_pool(dsn, min_size=min_size, max_size=max_size, command_timeout=30)


def migration_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted(p for p in sql_dir.glob("*.sql") if p.name[:3].isdigit())


async def migrate(conn: asyncpg.Connection, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply each numbered file once, in order. An advisory lock makes concurrent runs take turns."""
    applied: list[str] = []
    await conn.execute("select pg_advisory_lock($1)", _MIGRATE_LOCK)
    try:
        await conn.execute(
            "create table if not exists schema_migrations"
            " (version text primary key, applied_at timestamptz not null default now())"
        )
        done = {r["version"] for r in await conn.fetch("select version from schema_migrations")}
        for path in migration_files(sql_dir):
            if path.name in done:
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute("insert into schema_migrations (version) values ($1)", path.name)
            applied.append(path.name)
        # Partitions ahead of time, on every run: the writer also creates them on demand.
        await conn.execute(
            "select quota_ensure_partition(now() + make_interval(months => m)) from generate_series(-1, 2) as m"
        )
    finally:
        await conn.execute("select pg_advisory_unlock($1)", _MIGRATE_LOCK)
    return applied
