"""Budget round trip (reserve + settle) against plain INCRBY, sequential calls from one process,
both over the proxy's piped connection."""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis.asyncio as redis  # noqa: E402

from proxy.auth import Identity  # noqa: E402
from proxy.budget import BudgetEngine  # noqa: E402
from proxy.budget.rows import BudgetBook  # noqa: E402
from proxy.config import Settings  # noqa: E402
from proxy.redis_wire import PipedRedis  # noqa: E402

N = 5000


def stats(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return ordered[len(ordered) // 2] * 1e6, ordered[int(len(ordered) * 0.99)] * 1e6


async def run() -> dict[str, object]:
    url = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11")
    client = redis.Redis.from_url(url)
    sender = PipedRedis(url, 5.0)  # the proxy's own request-path connection, for the floor too
    engine = BudgetEngine(client, BudgetBook(Settings(default_token_budget=10**12)), None, sender=sender)
    me = Identity(f"bench-{uuid.uuid4().hex[:8]}")
    for scope in engine.scopes(me, time.time()):
        await client.hsetnx(scope.key, "used", 0)  # seeded: no PostgreSQL in this benchmark
    incr, reserve, settle, both = [], [], [], []
    for i in range(200):  # warm up, load the scripts
        await engine.settle(await engine.reserve(me, f"w{i}", 10, 100), 20)
    loop_start = time.perf_counter()
    for _ in range(N):
        t0 = time.perf_counter()
        await sender.call("INCRBY", "bench:floor", 1)
        incr.append(time.perf_counter() - t0)
    incr_rate = N / (time.perf_counter() - loop_start)
    loop_start = time.perf_counter()
    for i in range(N):
        t0 = time.perf_counter()
        r = await engine.reserve(me, f"r{i}", 10, 100)
        t1 = time.perf_counter()
        await engine.settle(r, 20)
        t2 = time.perf_counter()
        reserve.append(t1 - t0)
        settle.append(t2 - t1)
        both.append(t2 - t0)
    rate = N / (time.perf_counter() - loop_start)
    await sender.close()
    await client.aclose()
    (i50, i99), (r50, r99), (s50, s99), (b50, b99) = stats(incr), stats(reserve), stats(settle), stats(both)
    return {
        "INCRBY (floor) p50 / p99 µs": f"{i50:.0f} / {i99:.0f}",
        "reserve p50 / p99 µs": f"{r50:.0f} / {r99:.0f}",
        "settle p50 / p99 µs": f"{s50:.0f} / {s99:.0f}",
        "reserve + settle p50 / p99 µs": f"{b50:.0f} / {b99:.0f}",
        "INCRBY calls/s": f"{incr_rate:,.0f}",
        "reserve + settle round trips/s": f"{rate:,.0f}",
        "reserve p50 / INCRBY p50": f"{r50 / i50:.2f}x",
        "reserve + settle p50 / INCRBY p50": f"{b50 / i50:.2f}x",
    }


if __name__ == "__main__":
    for k, v in asyncio.run(run()).items():
        print(f"{k:40} {v}")
