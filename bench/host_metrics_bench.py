"""What one /metrics for several workers costs (proxy/host_metrics.py), and what prometheus_client's
multiprocess mode would have cost instead.

- multiprocess mode: every instrument call writes a memory-mapped file under a lock. Timed here on the
  three prometheus_client instruments metrics_bench.py calls "before #16", in a child process (the mode is
  chosen when prometheus_client is imported), against the same three without it.
- a snapshot: what a worker does once a second, on the event loop's thread (collect) and off it (the file).
- a scrape: one process's /metrics text, against the host's merged from N workers' snapshots.

The registry is filled as a busy proxy's: every endpoint's latencies and outcomes, for 5 models' token counters
and then for 100 (MODEL_LABELS, the most)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

N = 100_000
ROUNDS = 7


def instruments() -> float:
    """µs per request of three prometheus_client instruments, in whichever mode this process is in."""
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    requests = Counter("r", "r", ["endpoint", "status"], registry=registry).labels("chat", "ok")
    tokens = Counter("t", "t", ["endpoint"], registry=registry).labels("chat")
    latency = Histogram("l", "l", ["endpoint"], registry=registry).labels("chat")

    def request() -> None:
        requests.inc()
        tokens.inc(42)
        latency.observe(0.123)

    return min(timeit.repeat(request, number=N, repeat=ROUNDS)) / N * 1e6


def fill(models: int) -> None:
    from proxy import metrics
    from proxy.auth import Identity
    from proxy.flight import RecordDraft

    for i in range(models):
        for endpoint in metrics.ENDPOINTS:
            for stream in (False, True):
                now = time.perf_counter()
                draft = RecordDraft("id", None, Identity("a"), endpoint, time.time(), now, f"m{i}", stream)
                for status, code in (("ok", 200), ("rejected", 429), ("upstream_error", 502)):
                    metrics.observe(draft.record(status, code, (30, 12, 42)), 0.002, 0.4, 0.001)
        metrics.SETTLE_LATENCY.observe(0.001)


def best(seconds: list[float]) -> str:
    return f"{min(seconds) * 1e3:6.2f} ms"


async def host(workers: int, models: int) -> None:
    from prometheus_client import generate_latest

    from proxy import host_metrics, metrics
    from proxy.host_metrics import HostMetrics

    with tempfile.TemporaryDirectory() as directory:
        mine = HostMetrics(directory, "0")
        for i in range(1, workers):  # the others' files: the same samples, written by this process
            host_metrics.write(Path(directory) / f"{i}.json", host_metrics.dumps(mine.own()))
        collect, dump, write, plain, merged = [], [], [], [], []
        for _ in range(ROUNDS * 3):
            t0 = time.perf_counter()
            families = mine.own()
            t1 = time.perf_counter()
            data = host_metrics.dumps(families)
            t2 = time.perf_counter()
            host_metrics.write(mine.path, data)
            t3 = time.perf_counter()
            generate_latest(metrics.REGISTRY)
            t4 = time.perf_counter()
            await mine.exposition()
            t5 = time.perf_counter()
            collect.append(t1 - t0)
            dump.append(t2 - t1)
            write.append(t3 - t2)
            plain.append(t4 - t3)
            merged.append(t5 - t4)
        samples = sum(len(f.samples) for f in families.values())
        print(
            f"{workers} workers, {models} models: {samples} samples each, a snapshot {len(data) / 1024:.0f} KiB "
            f"(best of {ROUNDS * 3}):"
        )
        print(f"  snapshot on the loop's thread (collect)      {best(collect)}")
        print(f"  snapshot off it (JSON {best(dump)}, file {best(write)})")
        print(f"  scrape, one process (generate_latest)        {best(plain)}")
        print(f"  scrape, the host's (own snapshot + merge)    {best(merged)}")


if __name__ == "__main__":
    if sys.argv[1:] == ["--instruments"]:
        print(f"{instruments():.2f}")
        sys.exit(0)
    times = {}
    for mode in ("single-process", "multiprocess"):
        env = dict(os.environ)
        with tempfile.TemporaryDirectory() as directory:
            if mode == "multiprocess":
                env["PROMETHEUS_MULTIPROC_DIR"] = directory
            done = subprocess.run(
                [sys.executable, __file__, "--instruments"], env=env, capture_output=True, text=True, check=True
            )
        times[mode] = float(done.stdout)
    for mode, us in times.items():
        print(f"prometheus_client, {mode:15} 3 instruments: {us:5.2f} µs per request (best of {ROUNDS} rounds)")
    for models in (5, 100):  # a few models, and the most that get labels of their own (MODEL_LABELS)
        fill(models)
        for workers in (2, 8):
            asyncio.run(host(workers, models))
