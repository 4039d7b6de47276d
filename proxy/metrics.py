"""Prometheus metrics, served at /metrics."""

from __future__ import annotations

import functools
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


# Budget alerts (proxy/alerts.py, proxy/notifier.py). They run beside the ledger writer, in its process when
# it has one, and reach /metrics over the same pipe as the ledger's series (writer_samples).
NOTIFICATIONS_PENDING = Gauge(
    "quota_notifications_pending", "Alert deliveries waiting to be sent or retried", registry=REGISTRY
)
NOTIFICATIONS_FAILED = Counter(
    "quota_notifications_failed", "Alert delivery attempts that failed (retried)", ["channel"], registry=REGISTRY
)
NOTIFICATIONS_SENT = Counter("quota_notifications_sent", "Alert deliveries sent", ["channel"], registry=REGISTRY)
NOTIFICATIONS_RECORDED = Counter(
    "quota_notifications_recorded", "Budget threshold crossings written to the alert outbox", registry=REGISTRY
)
_ALERTS = (NOTIFICATIONS_PENDING, NOTIFICATIONS_FAILED, NOTIFICATIONS_SENT, NOTIFICATIONS_RECORDED)
_ALERT_COUNTERS: dict[str, Counter] = {
    "quota_notifications_failed_total": NOTIFICATIONS_FAILED,
    "quota_notifications_sent_total": NOTIFICATIONS_SENT,
    "quota_notifications_recorded_total": NOTIFICATIONS_RECORDED,
}


def writer_samples() -> Samples:
    """Everything a writer process reports: the ledger's series and the alerts'."""
    alerts = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in _ALERTS
        for family in metric.collect()
        for s in family.samples
        if not s.name.endswith("_created")
    }
    return {**ledger_samples(), **alerts}


def merge_writer_samples(samples: Samples, seen: Samples) -> None:
    """`merge_ledger_samples` for everything `writer_samples` sends."""
    ledger: Samples = {}
    for key, value in samples.items():
        name, labels = key
        counter = _ALERT_COUNTERS.get(name)
        if name == "quota_notifications_pending":
            NOTIFICATIONS_PENDING.set(value)
        elif counter is None:
            ledger[key] = value
        else:
            delta, seen[key] = value - seen.get(key, 0.0), value
            if delta > 0:
                (counter.labels(**dict(labels)) if labels else counter).inc(delta)
    merge_ledger_samples(ledger, seen)
