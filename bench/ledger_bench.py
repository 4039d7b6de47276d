"""Ledger throughput (records/s from the Redis Stream to committed PostgreSQL rows), the CPU it costs the writer and
PostgreSQL per record, and the request path's enqueue cost."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import asyncpg  # noqa: E402
from budget_bench import stats  # noqa: E402  (bench/ is on the path when run)

from proxy.alerts import AlertDetector  # noqa: E402
from proxy.db import migrate  # noqa: E402
from proxy.ledger import Ledger  # noqa: E402
from proxy.records import UsageRecord  # noqa: E402
from proxy.redis_batch import connect  # noqa: E402
from proxy.redis_wire import PipedRedis  # noqa: E402
from tests.devstack import stat_fields  # noqa: E402

RECORDS = 50_000  # per batch size
BATCH_SIZES = (1000, 250, 100)
_WRITER_COMMANDS = ("xreadgroup", "xack", "xdel")


def record(user: str, i: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"{user}-{i}",
        created_at=time.time(),
        user_id=user,
        tenant_id="bench",
        model="bench",
        served_model="bench",
        endpoint="chat",
        prompt_tokens=12,
        completion_tokens=10,
        total_tokens=22,
        cost_usd=None,
        status="ok",
        http_status=200,
        stream=False,
        estimated=False,
        latency_ms=1.2,
        ttft_ms=None,
    )


async def redis_busy(client: Any) -> dict[str, tuple[float, int]]:
    """µs Redis has spent on each of the writer's commands since it started, and their calls (server-wide)."""
    stats = await client.info("commandstats")
    return {k: (float(v["usec"]), int(v["calls"])) for k, v in stats.items() if k.lower().endswith(_WRITER_COMMANDS)}


def busy_between(before: dict[str, tuple[float, int]], after: dict[str, tuple[float, int]]) -> tuple[float, float]:
    """Redis's µs on the writer's commands in all, and per call of the costliest kind: how long one of them
    keeps every proxy's command waiting."""
    spent = {k: (us - before.get(k, (0.0, 0))[0], n - before.get(k, (0.0, 0))[1]) for k, (us, n) in after.items()}
    return sum(us for us, _ in spent.values()), max((us / n for us, n in spent.values() if n), default=0.0)


def backend_cpu_seconds(pids: list[int]) -> float | None:
    """CPU time of these PostgreSQL backends, when PostgreSQL runs on this machine (None when it does not)."""
    try:
        return sum(sum(int(v) for v in stat_fields(pid)[11:13]) for pid in pids) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return None


async def run() -> dict[str, object]:
    dsn = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    redis_url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
    client = connect(redis_url, 5.0)  # the proxy's own client
    pool = await asyncpg.create_pool(
        dsn, min_size=2, max_size=2, server_settings={"application_name": "quota-ledger-bench"}
    )
    async with pool.acquire() as conn:
        await migrate(conn)
    user = f"ledger-bench-{uuid.uuid4().hex[:8]}"
    stream = f"bench:ledger:{user}"
    ledger = Ledger(client, pool, stream=stream, consumer="bench", batch_size=1000)
    await ledger.ensure_group()

    # What the request path pays: build the record and hand it over, not waiting for Redis; and the
    # XADD's round trip, which no request waits for (an answer waits only until it is written).
    sender = PipedRedis(redis_url, 5.0)
    handed, samples = [], []
    for i in range(4000):
        t0 = time.perf_counter()
        future = sender.submit(*ledger.command(record(user, i)))
        t1 = time.perf_counter()
        await future
        handed.append(t1 - t0)
        samples.append(time.perf_counter() - t0)
    await sender.close()
    await client.delete(stream)
    # Fill the stream, then time the writer draining it into PostgreSQL, at each batch size: what the
    # writer moves per second, and how long Redis is busy with each batch's read, acknowledgement and
    # deletion (its commandstats: time no proxy's command is served).
    drained = {}
    alerts = AlertDetector((0.8, 1.0), [])  # as the writer runs by default: a check after each batch
    for size in BATCH_SIZES:
        await client.delete(stream)
        ledger = Ledger(client, pool, stream=stream, consumer="bench", batch_size=size, alerts=alerts)
        await ledger.ensure_group()
        for start in range(0, RECORDS, 5000):
            async with client.pipeline(transaction=False) as pipe:
                for i in range(start, min(start + 5000, RECORDS)):
                    pipe.execute_command(*ledger.command(record(f"{user}-{size}", i)))
                await pipe.execute()
        busy_before = await redis_busy(client)
        backends = await pool.fetch("select pid from pg_stat_activity where application_name = 'quota-ledger-bench'")
        pg0 = backend_cpu_seconds([r["pid"] for r in backends])
        t0, cpu0 = time.perf_counter(), time.process_time()
        moved = batches = 0
        while n := await ledger.drain_once(block=False):
            moved += n
            batches += 1
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        pg = backend_cpu_seconds([r["pid"] for r in backends]) - pg0 if pg0 is not None else None
        busy, longest = busy_between(busy_before, await redis_busy(client))
        drained[size] = (moved, elapsed, cpu, pg, busy / max(batches, 1), longest)
    rows = await pool.fetchval("select count(*) from usage_records where user_id like $1", f"{user}-%")
    await pool.execute("delete from usage_records where user_id like $1", f"{user}-%")
    await client.delete(stream)
    await client.aclose()
    await pool.close()
    (h50, h99), (x50, x99) = stats(handed), stats(samples)
    total = sum(m for m, *_ in drained.values())
    out = {"records moved": f"{total:,} ({rows:,} rows committed)"}
    for size, (moved, elapsed, cpu, pg, busy, longest) in drained.items():
        key = (
            f"batches of {size:,}: records/s, CPU µs per record of the writer / PostgreSQL,"
            " Redis busy µs per batch / per command"
        )
        pg_cell = f"{pg / max(moved, 1) * 1e6:.1f}" if pg is not None else "n/a"
        out[key] = (
            f"{moved / elapsed:,.0f} / {cpu / max(moved, 1) * 1e6:.1f} / {pg_cell} / {busy:,.0f} / {longest:,.0f}"
        )
    out["request-path enqueue (build, encode, hand over) p50 / p99 µs"] = f"{h50:.1f} / {h99:.1f}"
    out["XADD round trip, not awaited by the request, p50 / p99 µs"] = f"{x50:.0f} / {x99:.0f}"
    return out


if __name__ == "__main__":
    for k, v in asyncio.run(run()).items():
        print(f"{k:45} {v}")
