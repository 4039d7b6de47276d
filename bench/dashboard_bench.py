"""The admin dashboard on real volumes: 1,000,000 usage_records rows of 10,000 users in a scratch database,
then the dashboard's queries timed, and its pages as a browser gets them (the proxy served in this process,
GET over HTTP with an admin token: query, template and all). Target: under 300 ms each.

    .venv/bin/python bench/dashboard_bench.py            # or: make bench-dashboard
    DATABASE_URL=postgresql://postgres@127.0.0.1:5432/postgres  (the server; the scratch database is made on it)

The scratch database `quota_dashboard_bench` is dropped and made again on every run (--keep reuses it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
import jwt  # noqa: E402
import uvicorn  # noqa: E402

from proxy import admin_events as events  # noqa: E402
from proxy import admin_params as p  # noqa: E402
from proxy import admin_queries as q  # noqa: E402
from proxy.app import create_app  # noqa: E402
from proxy.config import Settings  # noqa: E402
from proxy.db import migrate  # noqa: E402

SCRATCH = "quota_dashboard_bench"
ROWS = 1_000_000
USERS = 10_000
TENANTS = 40
MODELS = ("gpt-4o", "gpt-4o-mini", "claude-3-5-sonnet", "llama-3-70b", "mistral-large", "local-free")

# Rows spread over the current month so far (the worst case: every row in the period the pages sum), a tenth
# of the users with budgets of their own, statuses as a busy month has them.
SEED = """
insert into usage_records (request_id, created_at, user_id, tenant_id, model, served_model, endpoint,
                           prompt_tokens, completion_tokens, total_tokens, cost_usd, status, http_status, exempt)
select 'bench-' || g,
       $1::timestamptz + (($2::timestamptz - $1::timestamptz) * ((g::bigint * 7919) % $3) / $3),
       'user-' || (g % $4),
       case when (g % $4) % 5 = 0 then null else 'tenant-' || ((g % $4) % $5) end,
       ($6::text[])[1 + (g / 7) % array_length($6::text[], 1)],
       ($6::text[])[1 + (g / 7) % array_length($6::text[], 1)],
       'chat', 200 + g % 800, 50 + g % 300, 250 + g % 800 + g % 300,
       case when g % 3 = 0 then null else (g % 1000) / 100000.0 end,
       case when g % 50 = 0 then 'blocked' when g % 97 = 0 then 'upstream_error' else 'ok' end,
       case when g % 50 = 0 then 429 when g % 97 = 0 then 502 else 200 end,
       (g / 7) % array_length($6::text[], 1) = 5
from generate_series(1, $3) as g
"""
BUDGETS = """
insert into budgets (subject_type, subject, period, token_limit, warn_ratio)
select 'user', 'user-' || i, case when i % 7 = 0 then 'week' else 'month' end, 20000 + (i % 50) * 2000, 0.8
from generate_series(0, $1 - 1, 10) as i
on conflict do nothing
"""


def scratch_dsn(dsn: str) -> str:
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path=f"/{SCRATCH}"))


async def prepare(dsn: str, keep: bool) -> asyncpg.Pool:
    admin = await asyncpg.connect(dsn)
    try:
        exists = await admin.fetchval("select 1 from pg_database where datname = $1", SCRATCH)
        if exists and not keep:
            await admin.execute(f"drop database {SCRATCH}")
        if not exists or not keep:
            await admin.execute(f"create database {SCRATCH}")
    finally:
        await admin.close()
    pool = await asyncpg.create_pool(scratch_dsn(dsn), min_size=1, max_size=4)
    async with pool.acquire() as conn:
        await migrate(conn)
        if await conn.fetchval("select count(*) from usage_records") >= ROWS:
            return pool
        now = datetime.now(UTC)
        month = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        await conn.execute(
            "insert into budgets (subject_type, subject, period, token_limit, warn_ratio)"
            " values ('user', '*', 'month', 100000, 0.8), ('tenant', '*', 'month', 5000000, 0.8)"
            " on conflict do nothing"
        )
        started = time.perf_counter()
        await conn.execute(SEED, month, now, ROWS, USERS, TENANTS, list(MODELS))
        seeded = time.perf_counter() - started
        await conn.execute(BUDGETS, USERS)
        await conn.execute("analyze")
        print(f"seeded {ROWS:,} records of {USERS:,} users in {seeded:.1f} s (rollups kept by the triggers)")
    return pool


async def timed(name: str, call: Callable[[], Awaitable[Any]], runs: int) -> dict[str, Any]:
    await call()  # warm: plans cached, pages in the buffer cache
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append((time.perf_counter() - started) * 1000)
    result = {
        "name": name,
        "median_ms": round(statistics.median(samples), 1),
        "max_ms": round(max(samples), 1),
        "runs": runs,
    }
    print(f"{name:<34} median {result['median_ms']:>7.1f} ms   max {result['max_ms']:>7.1f} ms")
    return result


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    pool = await prepare(args.dsn, args.keep)
    now = datetime.now(UTC)
    results = []
    try:
        async with pool.acquire() as conn:
            counts = await conn.fetchrow(
                "select (select count(*) from usage_records) as records, (select count(*) from usage_users) as users,"
                " (select count(*) from usage_user_day) as user_days,"
                " (select count(*) from usage_model_day) as model_days"
            )
        print(", ".join(f"{k} {v:,}" for k, v in counts.items()))
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("overview (month)", lambda: q.overview(pool, "month", now)),
            ("users, sorted by used", lambda: q.users(pool, p.UserQuery(), now)),
            ("users, sorted by percent, page 40", lambda: q.users(pool, p.UserQuery(sort="percent", page=40), now)),
            ("users, search 'user-12'", lambda: q.users(pool, p.UserQuery(q="user-12"), now)),
            ("users, tenant filter", lambda: q.users(pool, p.UserQuery(tenant="tenant-3"), now)),
            ("users, state blocked", lambda: q.users(pool, p.UserQuery(state="blocked"), now)),
            ("one user's budget row", lambda: q.user_budget(pool, "user-42", now)),
            ("tenants (month)", lambda: q.tenants(pool, "month", now)),
            ("blocked requests, page 1", lambda: events.blocked(pool, "month", now, p.Paging())),
            ("users CSV (all 10,000)", lambda: q.all_users(pool, p.UserQuery(), now)),
        ]
        for name, call in cases:
            results.append(await timed(name, call, args.runs))
    finally:
        await pool.close()
    return results


def served(dsn: str, redis_url: str, secret: str, port: int) -> uvicorn.Server:
    """The proxy on the scratch database, in a thread of this process (its own event loop)."""
    settings = Settings(
        database_url=scratch_dsn(dsn),
        redis_url=redis_url,
        jwt_secret=secret,
        litellm_master_key="sk-unused",
        ledger_writer="off",
        budget_refresh_seconds=3600,
        log_level="warning",
    )
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True).start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the proxy did not start")
        time.sleep(0.05)
    return server


async def pages(args: argparse.Namespace) -> list[dict[str, Any]]:
    secret = secrets.token_hex(32)
    server = served(args.dsn, args.redis_url, secret, args.port)
    admin = jwt.encode({"sub": "bench-admin", "quota_admin": True, "exp": int(time.time()) + 3600}, secret)
    results = []
    try:
        base = f"http://127.0.0.1:{args.port}"
        async with httpx.AsyncClient(base_url=base, headers={"Authorization": f"Bearer {admin}"}, timeout=60) as c:

            def page(path: str, **params: str) -> Callable[[], Awaitable[Any]]:
                async def get() -> None:
                    r = await c.get(path, params=params)
                    assert r.status_code == 200 and "</html>" in r.text, (path, r.status_code)

                return get

            for name, call in (
                ("page: overview", page("/admin")),
                ("page: users, sorted by used", page("/admin/users")),
                ("page: users, by percent, page 40", page("/admin/users", sort="percent", page="40")),
                ("page: one user", page("/admin/user", id="user-42")),
                ("page: tenants", page("/admin/tenants")),
            ):
                results.append(await timed(name, call, args.runs))
    finally:
        server.should_exit = True
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--dsn", default=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    parser.add_argument("--keep", action="store_true", help="reuse the scratch database if it is seeded already")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/7", help="the served proxy's Redis")
    parser.add_argument("--port", type=int, default=18931, help="where the proxy is served for the page timings")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    args.keep = True
    results += asyncio.run(pages(args))
    load = os.getloadavg()[0]
    print(f"load average {load:.1f} on {os.cpu_count()} cores (others' work on a shared machine slows every figure)")
    slow = [r["name"] for r in results if r["median_ms"] >= 300]
    print("all under 300 ms" if not slow else f"over 300 ms: {', '.join(slow)}")


if __name__ == "__main__":
    main()
