"""What the metrics cost one request: every instrument call a request makes, timed in a loop, against the
three the proxy made before #16 (a request counter, a token counter, one latency histogram)."""

from __future__ import annotations

import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from prometheus_client import CollectorRegistry, Counter, Histogram  # noqa: E402

from proxy import metrics  # noqa: E402
from proxy.auth import Identity  # noqa: E402
from proxy.flight import RecordDraft  # noqa: E402

N = 100_000
ROUNDS = 15  # interleaved, the best of each kept: the machine's other load only ever adds


def before() -> Callable[[], None]:
    registry = CollectorRegistry()
    requests = Counter("r", "r", ["endpoint", "status"], registry=registry).labels("chat", "ok")
    tokens = Counter("t", "t", ["endpoint"], registry=registry).labels("chat")
    latency = Histogram("l", "l", ["endpoint"], registry=registry).labels("chat")

    def request() -> None:  # metrics.observe before #16, children cached as it cached them
        requests.inc()
        tokens.inc(42)
        latency.observe(0.123)

    return request


def after() -> Callable[[], None]:
    draft = RecordDraft("id", None, Identity("alice"), "chat", time.time(), time.perf_counter(), model="gpt-4o")
    record = draft.record("ok", 200, (30, 12, 42))
    now = time.perf_counter

    def request() -> None:  # every metrics call of one metered JSON request, with its perf_counter() reads
        draft.body_in = now()
        reserving = now()
        draft.reserve_seconds = now() - reserving
        draft.upstream_sent = now()
        draft.upstream_first = now()
        draft.upstream_end = now()
        metrics.observe(record, *draft.timings())
        submitted = now()
        metrics.SETTLE_LATENCY.observe(now() - submitted)

    return request


if __name__ == "__main__":
    runs = {"before #16: 3 instruments": before(), "now: 7 instruments + 9 clock reads": after()}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(ROUNDS):
        for name, request in runs.items():
            best[name] = min(best[name], timeit.timeit(request, number=N) / N)
    for name, seconds in best.items():
        print(f"{name:40} {seconds * 1e6:6.2f} µs per request (best of {ROUNDS} interleaved rounds of {N:,})")
