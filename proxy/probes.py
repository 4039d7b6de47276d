"""Checks of the proxy's dependencies, for /readyz and for each /metrics scrape: each sets its
`quota_dependency_up` gauge, and the Redis check also the ledger's backlog and lag gauges.

Probed when asked rather than by a task of their own: the gauges are fresh at every scrape and cost
nothing between scrapes."""

from __future__ import annotations

import asyncio

import asyncpg
from redis.exceptions import RedisError

from . import metrics
from .db import PG_UNAVAILABLE
from .errors import ProxyError
from .forward import Upstream
from .ledger import Ledger

TIMEOUT = 2.0


def _mark(dependency: str, result: str) -> str:
    metrics.DEPENDENCY_UP.labels(dependency).set(1 if result == "ok" else 0)
    return result


async def redis_check(ledger: Ledger, timeout: float = TIMEOUT) -> tuple[str, int | None]:
    """ "ok" and the ledger's backlog, or "error: ..." and None."""
    try:
        backlog, lag = await asyncio.wait_for(ledger.backlog_and_lag(), timeout)
    except (TimeoutError, RedisError, OSError) as exc:
        return _mark("redis", f"error: {exc.__class__.__name__}"), None
    metrics.LEDGER_BACKLOG.set(backlog)
    metrics.LEDGER_LAG.set(lag)
    return _mark("redis", "ok"), backlog


async def postgres_check(pool: asyncpg.Pool, timeout: float = TIMEOUT) -> str:
    try:
        await asyncio.wait_for(pool.fetchval("select 1"), timeout)
    except PG_UNAVAILABLE as exc:
        return _mark("postgres", f"error: {exc.__class__.__name__}")
    return _mark("postgres", "ok")


async def upstream_check(upstream: Upstream, timeout: float = TIMEOUT) -> str:
    try:
        answer = await asyncio.wait_for(upstream.send("GET", "/health/liveliness"), timeout)
    except (TimeoutError, ProxyError) as exc:
        return _mark("litellm", f"error: {exc}")
    answer.response.release()
    return _mark("litellm", "ok" if answer.status == 200 else f"error: HTTP {answer.status}")


async def check_all(ledger: Ledger, pool: asyncpg.Pool, upstream: Upstream) -> dict[str, object]:
    """Every dependency at once: /readyz's checks, in its order."""
    (redis, backlog), postgres, litellm = await asyncio.gather(
        redis_check(ledger), postgres_check(pool), upstream_check(upstream)
    )
    checks: dict[str, object] = {"redis": redis}
    if backlog is not None:
        checks["ledger_backlog"] = backlog
    checks.update(postgres=postgres, litellm=litellm)
    return checks
