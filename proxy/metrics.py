"""Prometheus metrics, served at /metrics.

Named by Prometheus's conventions: the `quota_` prefix, base units (`_seconds`), `_total` on counters. Every
label's values are bounded: never a user id, and a model name only among the first MODEL_LABELS models served
(`other` after), since the name comes from clients. A request costs one `observe` call, at its end.

The request path's counters and histograms are LoopCounter and LoopHistogram: every request is handled on
the event loop's one thread, and so is every scrape, so they need none of the lock prometheus_client's
instruments take for each value (with it, one request's instruments cost several microseconds; without,
well under one: bench/metrics_bench.py). Only the event loop's thread may update them.
"""

from __future__ import annotations

import functools
import gc
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from .records import UsageRecord

# The `_created` series would double the series Prometheus stores, for a start time nobody queries.
disable_created_metrics()  # type: ignore[no-untyped-call]
REGISTRY = CollectorRegistry(auto_describe=True)


class CounterValue:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1) -> None:
        self.value += amount


class HistogramValue:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # per bucket, not cumulative; the last is +Inf's
        self.total = 0.0

    def observe(self, amount: float) -> None:
        self.counts[bisect_left(self.bounds, amount)] += 1  # the first bound >= amount: Prometheus's `le`
        self.total += amount


class _LoopMetric(Collector):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str]) -> None:
        self.name, self.documentation, self.labelnames = name, documentation, list(labelnames)
        self._children: dict[tuple[str, ...], Any] = {}
        if not labelnames:
            self.labels()  # an unlabelled series exists from the start
        REGISTRY.register(self)

    def _new(self) -> Any:
        raise NotImplementedError

    def labels(self, *values: str) -> Any:
        child = self._children.get(values)
        if child is None:
            child = self._children[values] = self._new()
        return child

    def describe(self) -> Iterable[Metric]:
        return self.collect()


class LoopCounter(_LoopMetric):
    def _new(self) -> CounterValue:
        return CounterValue()

    def labels(self, *values: str) -> CounterValue:
        return super().labels(*values)  # type: ignore[no-any-return]

    def collect(self) -> Iterable[Metric]:
        family = CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            family.add_metric(values, child.value)
        yield family


class LoopHistogram(_LoopMetric):
    def __init__(self, name: str, documentation: str, labelnames: Sequence[str], buckets: Sequence[float]) -> None:
        self.buckets = tuple(float(b) for b in buckets)
        self._les = [str(b) for b in self.buckets] + ["+Inf"]
        super().__init__(name, documentation, labelnames)

    def _new(self) -> HistogramValue:
        return HistogramValue(self.buckets)

    def labels(self, *values: str) -> HistogramValue:
        return super().labels(*values)  # type: ignore[no-any-return]

    def observe(self, amount: float) -> None:
        self.labels().observe(amount)

    def collect(self) -> Iterable[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)
        for values, child in list(self._children.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(child.counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric(list(values), buckets, child.total)
        yield family


ENDPOINTS = ("chat", "completions", "embeddings")
# Milliseconds matter for the proxy's own time; an upstream's first byte can take a minute.
_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)
_SLOW = (0.05, 0.1, 0.25, 0.5, 1, 2, 3, 5, 7.5, 10, 15, 20, 30, 60, 120)

REQUESTS = LoopCounter(
    "quota_requests",
    "Requests to the completion endpoints by how they ended (state: the ledger record's status) and HTTP status",
    ["endpoint", "state", "code"],
)
TOKENS = LoopCounter(
    "quota_tokens", "Tokens of answered requests by requested model and kind (prompt, completion)", ["model", "kind"]
)
ADDED_LATENCY = LoopHistogram(
    "quota_added_latency_seconds",
    "Time a request spent in the proxy itself: from its body being in to its answer, less the upstream's part "
    "(from sending to the upstream to the upstream's last byte)",
    ["endpoint"],
    _FAST,
)
UPSTREAM_TTFB = LoopHistogram(
    "quota_upstream_ttfb_seconds",
    "From sending a request upstream to its first byte: a stream's first event, a JSON answer's headers",
    ["endpoint", "stream"],
    _SLOW,
)
RESERVE_LATENCY = LoopHistogram(
    "quota_reserve_seconds",
    "The budget reservation before forwarding (Redis round trip, a lost counter's rebuild included)",
    [],
    _FAST,
)
SETTLE_LATENCY = LoopHistogram(
    "quota_settle_seconds", "From submitting a request's settle and ledger record to Redis's reply", [], _FAST
)
RESERVATIONS_IN_FLIGHT = Gauge(
    "quota_reservations_in_flight",
    "Requests holding a concurrency slot: each takes its reservation just after the slot and settles it at its end",
    registry=REGISTRY,
)
FAIL_OPEN_ACTIVE = Gauge(
    "quota_fail_open_active",
    "1 from a request let through unmetered (FAIL_MODE=open, budgets unreachable) until a reservation succeeds again",
    registry=REGISTRY,
)
FAIL_OPEN_REQUESTS = LoopCounter(
    "quota_fail_open_requests", "Requests let through unmetered (FAIL_MODE=open)", ["endpoint"]
)
DEPENDENCY_UP = Gauge(
    "quota_dependency_up",
    "1 when the last probe (each scrape, each /readyz) reached the dependency",
    ["dependency"],
    registry=REGISTRY,
)
LEDGER_BACKLOG = Gauge(
    "quota_ledger_backlog", "Usage records waiting in the stream for PostgreSQL (at the last probe)", registry=REGISTRY
)
LEDGER_LAG = Gauge(
    "quota_ledger_lag_seconds",
    "Age of the oldest usage record waiting for PostgreSQL, by Redis's clock (0 when none waits)",
    registry=REGISTRY,
)
LEDGER_WRITTEN = Counter("quota_ledger_written", "Usage records committed to PostgreSQL", registry=REGISTRY)
LEDGER_ERRORS = Counter("quota_ledger_errors", "Failed ledger writes (retried)", ["stage"], registry=REGISTRY)
ACCOUNTING_ERRORS = LoopCounter(
    "quota_accounting_errors",
    "Settles (settle) or ledger records (record) that could not be sent to Redis after the response",
    ["step"],
)

# The tail (#19): what the garbage collector and the ledger writer's batches stop for, and how long. Loop
# histograms too: a collection's callbacks may run on another thread (one that allocated), but CPython never
# runs two collections at once, so GC_PAUSE has one writer at a time; the batches are observed on a loop.
GC_PAUSE = LoopHistogram(
    "quota_gc_pause_seconds",
    "Garbage collections of the proxy process, by generation (2 is a full collection)",
    ["generation"],
    (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
LEDGER_BATCH_SECONDS = LoopHistogram(
    "quota_ledger_batch_seconds",
    "Ledger writer batches, from the stream read's reply to the last acknowledgement",
    [],
    (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
LEDGER_BATCH_RECORDS = LoopHistogram(
    "quota_ledger_batch_records", "Records per ledger writer batch", [], (1, 5, 10, 25, 50, 100, 250, 500, 1000, 5000)
)

# Known label values start at 0, so `increase()` sees the first one (a series born at 1 shows no increase).
for _endpoint in ENDPOINTS:
    FAIL_OPEN_REQUESTS.labels(_endpoint)
for _stage in ("redis", "postgres", "rejected"):
    LEDGER_ERRORS.labels(_stage)
for _step in ("settle", "record"):
    ACCOUNTING_ERRORS.labels(_step)
for _dependency in ("redis", "postgres", "litellm"):
    DEPENDENCY_UP.labels(_dependency)
for _generation in "012":
    GC_PAUSE.labels(_generation)

MODEL_LABELS = 100
_models: dict[str, tuple[CounterValue, CounterValue]] = {}  # model name -> its (prompt, completion) counters
_OTHER = (TOKENS.labels("other", "prompt"), TOKENS.labels("other", "completion"))


def _token_counters(model: str | None) -> tuple[CounterValue, CounterValue]:
    """A model's counters: its own among the first MODEL_LABELS models, else `other`'s. Only answered
    requests get here, so a client inventing model names cannot take the places of the real ones."""
    if not model:
        return _OTHER
    counters = _models.get(model)
    if counters is None:
        if len(_models) >= MODEL_LABELS or len(model) > 200:
            return _OTHER
        counters = _models[model] = (TOKENS.labels(model, "prompt"), TOKENS.labels(model, "completion"))
    return counters


@functools.lru_cache(maxsize=512)
def _request_counter(endpoint: str, state: str, code: int | None) -> CounterValue:
    return REQUESTS.labels(endpoint, state, str(code or 0))


@functools.lru_cache(maxsize=16)
def _latencies(endpoint: str, stream: bool) -> tuple[HistogramValue, HistogramValue]:
    return ADDED_LATENCY.labels(endpoint), UPSTREAM_TTFB.labels(endpoint, "true" if stream else "false")


def observe(record: UsageRecord, added: float | None, ttfb: float | None, reserve: float | None) -> None:
    """Count one finished request (on the event loop's thread)."""
    _request_counter(record.endpoint, record.status, record.http_status).inc()
    if record.total_tokens:
        prompt, completion = _token_counters(record.model)
        prompt.inc(record.prompt_tokens)
        completion.inc(record.completion_tokens)
    added_histogram, ttfb_histogram = _latencies(record.endpoint, record.stream)
    if added is not None:
        added_histogram.observe(added)
    if ttfb is not None:
        ttfb_histogram.observe(ttfb)
    if reserve is not None:
        RESERVE_LATENCY.observe(reserve)


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


_LEDGER = (LEDGER_WRITTEN, LEDGER_ERRORS)
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
    """Apply a writer process's counters here, by how far they moved since `seen`."""
    for key, value in samples.items():
        name, labels = key
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
for _channel in ("webhook", "slack"):  # at 0 from the start: increase() then sees the first failure
    NOTIFICATIONS_FAILED.labels(_channel)
    NOTIFICATIONS_SENT.labels(_channel)
_ALERTS = (NOTIFICATIONS_PENDING, NOTIFICATIONS_FAILED, NOTIFICATIONS_SENT, NOTIFICATIONS_RECORDED)
WRITER_METRICS = (*_LEDGER, *_ALERTS, LEDGER_BATCH_SECONDS, LEDGER_BATCH_RECORDS)  # a writer's series: host_metrics
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
