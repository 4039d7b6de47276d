"""Load generator, run as its own process: N concurrent clients for a fixed time; prints JSON results."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time

import aiohttp
import orjson


def percentile(values: list[float], p: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(int(len(ordered) * p), len(ordered) - 1)]


async def run(
    url: str, token: str, concurrency: int, seconds: float, stream: bool, warmup: float = 2.0
) -> dict[str, object]:
    body = orjson.dumps(
        {"model": "bench", "stream": stream, "messages": [{"role": "user", "content": "Say ten words."}]}
    )
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    latencies: list[float] = []
    ttfts: list[float] = []
    errors = 0
    sent = 0  # every request, the warm-up's too: the proxy's CPU time covers them all
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker(deadline: float, record: bool) -> None:
            nonlocal errors, sent
            while time.perf_counter() < deadline:
                sent += 1
                start = time.perf_counter()
                async with session.post(url, data=body, headers=headers) as resp:
                    if stream:
                        first = await resp.content.readany()
                        ttft = time.perf_counter() - start
                        while await resp.content.readany():
                            pass
                    else:
                        first = await resp.read()
                        ttft = 0.0
                    ok = resp.status == 200 and bool(first)
                elapsed = time.perf_counter() - start
                if not record:
                    continue
                if ok:
                    latencies.append(elapsed * 1000)
                    ttfts.append(ttft * 1000)
                else:
                    errors += 1

        warm = time.perf_counter() + warmup  # pools, caches and the interpreter warm up first
        await asyncio.gather(*(worker(warm, False) for _ in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(worker(started + seconds, True) for _ in range(concurrency)))
        wall = time.perf_counter() - started
    result: dict[str, object] = {
        "requests": len(latencies),
        "sent": sent,
        "errors": errors,
        "rps": round(len(latencies) / wall, 1),
        "p50_ms": round(percentile(latencies, 0.50), 3),
        "p90_ms": round(percentile(latencies, 0.90), 3),
        "p99_ms": round(percentile(latencies, 0.99), 3),
        "p999_ms": round(percentile(latencies, 0.999), 3),
    }
    if stream:
        result.update(ttft_p50_ms=round(percentile(ttfts, 0.5), 3), ttft_p99_ms=round(percentile(ttfts, 0.99), 3))
    return result


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("url")
    p.add_argument("--token", default="")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before the measured ones")
    a = p.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    sys.stdout.write(
        orjson.dumps(asyncio.run(run(a.url, a.token, a.concurrency, a.seconds, a.stream, a.warmup))).decode() + "\n"
    )


if __name__ == "__main__":
    main()
