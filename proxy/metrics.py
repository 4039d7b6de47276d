"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

import functools
import gc
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

REQUESTS = Counter(
    "quota_requests", "Proxied requests by endpoint and outcome", ["endpoint", "status"], registry=REGISTRY
)
TOKENS = Counter("quota_tokens", "Tokens charged to budgets", ["endpoint"], registry=REGISTRY)
LATENCY = Histogram(
    "quota_request_seconds",
    "Time from request received to last byte sent",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
    registry=REGISTRY,
)
LEDGER_BACKLOG = Gauge("quota_ledger_backlog", "Usage records waiting in the stream for PostgreSQL", registry=REGISTRY)
LEDGER_WRITTEN = Counter("quota_ledger_written", "Usage records committed to PostgreSQL", registry=REGISTRY)
LEDGER_ERRORS = Counter("quota_ledger_errors", "Failed ledger writes (retried)", ["stage"], registry=REGISTRY)
BACKGROUND_ERRORS = Counter(
    "quota_settle_errors", "Settles or enqueues that failed after the response", registry=REGISTRY
)
# The tail of #19: what the garbage collector and the ledger writer's batches stop for, and how long.
_PAUSE_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
GC_PAUSE = Histogram(
    "quota_gc_pause_seconds",
    "Garbage collections of the proxy process, by generation (2 is a full collection)",
    ["generation"],
    buckets=_PAUSE_BUCKETS,
    registry=REGISTRY,
)
LEDGER_BATCH_SECONDS = Histogram(
    "quota_ledger_batch_seconds",
    "Ledger writer batches, from the stream read's reply to the last acknowledgement",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
    registry=REGISTRY,
)
LEDGER_BATCH_RECORDS = Histogram(
    "quota_ledger_batch_records",
    "Records per ledger writer batch",
    buckets=(1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
    registry=REGISTRY,
)


@functools.lru_cache(maxsize=256)
def _children(endpoint: str, status: str) -> tuple[Any, Any, Any]:
    return REQUESTS.labels(endpoint, status), TOKENS.labels(endpoint), LATENCY.labels(endpoint)


def observe(endpoint: str, status: str, tokens: int, seconds: float) -> None:
    """Count one finished request (label lookups cached: they cost more than the increments)."""
    requests, token_counter, latency = _children(endpoint, status)
    requests.inc()
    if tokens:
        token_counter.inc(tokens)
    latency.observe(seconds)


_watching_gc = False


def watch_gc() -> None:
    """Time every garbage collection of this process into GC_PAUSE (~1 µs each, from gc.callbacks)."""
    global _watching_gc
    if _watching_gc:
        return  # one callback per process, however many apps it builds (the tests build many)
    _watching_gc = True
    pauses = [GC_PAUSE.labels(str(generation)) for generation in range(3)]
    started = 0.0

    def callback(phase: str, info: dict[str, int]) -> None:
        nonlocal started
        if phase == "start":
            started = time.perf_counter()
        else:
            pauses[info["generation"]].observe(time.perf_counter() - started)

    gc.callbacks.append(callback)


# A writer process keeps its batches here until it sends them to the proxy that serves /metrics.
_unsent_batches: list[tuple[int, float]] | None = None


def observe_ledger_batch(records: int, seconds: float) -> None:
    LEDGER_BATCH_RECORDS.observe(records)
    LEDGER_BATCH_SECONDS.observe(seconds)
    if _unsent_batches is not None:
        _unsent_batches.append((records, seconds))


def keep_ledger_batches() -> None:
    """In a writer process: keep each batch's figures for `take_ledger_batches`."""
    global _unsent_batches
    _unsent_batches = []


def take_ledger_batches() -> list[tuple[int, float]]:
    """The batches observed since the last call, for the proxy to observe in turn (`observe_ledger_batch`)."""
    global _unsent_batches
    if _unsent_batches is None:
        return []
    batches, _unsent_batches = _unsent_batches, []
    return batches


_LEDGER = (LEDGER_WRITTEN, LEDGER_ERRORS, LEDGER_BACKLOG)
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def ledger_samples() -> Samples:
    """The ledger writer's series, as a writer process sends them to the proxy that serves /metrics."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in _LEDGER
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }


def merge_ledger_samples(samples: Samples, seen: Samples) -> None:
    """Apply a writer process's series here: counters by how far they moved since `seen`, the gauge as is."""
    for key, value in samples.items():
        name, labels = key
        if name == "quota_ledger_backlog":
            LEDGER_BACKLOG.set(value)
            continue
        delta, seen[key] = value - seen.get(key, 0.0), value
        if delta > 0:
            (LEDGER_ERRORS.labels(**dict(labels)) if labels else LEDGER_WRITTEN).inc(delta)
