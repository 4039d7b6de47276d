"""The host's one /metrics from the snapshots of several processes (proxy/host_metrics.py): how counters,
histograms and each gauge add up, a restarted worker carrying on from its predecessor, a broken snapshot.
Each "process" here is a HostMetrics over a registry of its own, in one directory; tests/test_lifecycle.py
runs the real thing with two worker processes."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from proxy import host_metrics, metrics
from proxy.host_metrics import GAUGES, HostMetrics

from .helpers import scrape

pytestmark = pytest.mark.anyio


class Process:
    """The instruments of one worker (or of the supervisor), as the proxy names them."""

    def __init__(self, directory: Path, name: str) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("quota_requests", "Requests", ["endpoint", "code"], registry=r)
        self.latency = Histogram("quota_added_latency_seconds", "Latency", ["endpoint"], buckets=(0.1, 1), registry=r)
        self.in_flight = Gauge("quota_reservations_in_flight", "In flight", registry=r)
        self.fail_open = Gauge("quota_fail_open_active", "Fail open", registry=r)
        self.up = Gauge("quota_dependency_up", "Up", ["dependency"], registry=r)
        self.written = Counter("quota_ledger_written", "Written", registry=r)
        self.host = HostMetrics(str(directory), name, (r,))


async def test_counters_and_histograms_are_summed_and_each_gauge_goes_by_its_rule(tmp_path: Path) -> None:
    one, two, writer = Process(tmp_path, "0"), Process(tmp_path, "1"), Process(tmp_path, host_metrics.WRITER)
    one.requests.labels("chat", "200").inc(3)
    two.requests.labels("chat", "200").inc(4)
    two.requests.labels("embeddings", "429").inc()  # a series only the other worker has
    one.latency.labels("chat").observe(0.05)
    two.latency.labels("chat").observe(0.5)
    two.latency.labels("chat").observe(5)
    one.in_flight.set(2)
    two.in_flight.set(3)
    two.fail_open.set(1)
    one.up.labels("redis").set(1)
    two.up.labels("redis").set(0)  # its last probe, long ago
    writer.written.inc(7)
    await two.host.write()
    await writer.host.write()

    seen = scrape((await one.host.exposition()).decode())

    assert seen[("quota_requests_total", ("code", "200"), ("endpoint", "chat"))] == 7
    assert seen[("quota_requests_total", ("code", "429"), ("endpoint", "embeddings"))] == 1
    chat = ("endpoint", "chat")
    assert seen[("quota_added_latency_seconds_bucket", chat, ("le", "0.1"))] == 1
    assert seen[("quota_added_latency_seconds_bucket", chat, ("le", "1.0"))] == 2
    assert seen[("quota_added_latency_seconds_bucket", chat, ("le", "+Inf"))] == 3
    assert seen[("quota_added_latency_seconds_count", chat)] == 3
    assert seen[("quota_added_latency_seconds_sum", chat)] == pytest.approx(5.55)
    assert seen[("quota_reservations_in_flight",)] == 5
    assert seen[("quota_fail_open_active",)] == 1
    assert seen[("quota_dependency_up", ("dependency", "redis"))] == 1  # the answering worker's own probe
    assert seen[("quota_ledger_written_total",)] == 7
    # The answering worker wrote what it showed, so the other worker shows the same.
    assert scrape((await two.host.exposition()).decode())[("quota_requests_total", ("code", "200"), chat)] == 7


async def test_a_restarted_worker_carries_on_from_its_predecessors_counts(tmp_path: Path) -> None:
    one, dead = Process(tmp_path, "0"), Process(tmp_path, "1")
    one.requests.labels("chat", "200").inc(3)
    dead.requests.labels("chat", "200").inc(10)
    dead.latency.labels("chat").observe(0.05)
    dead.in_flight.set(4)
    dead.fail_open.set(1)
    await one.host.write()
    await dead.host.write()
    key = ("quota_requests_total", ("code", "200"), ("endpoint", "chat"))
    assert scrape((await one.host.exposition()).decode())[key] == 13

    host_metrics.retire(dead.host.path)  # what the supervisor does when worker 1 has died
    seen = scrape((await one.host.exposition()).decode())
    assert seen[key] == 13  # its counts stay ...
    assert seen[("quota_reservations_in_flight",)] == 0 and seen[("quota_fail_open_active",)] == 0  # ... not gauges

    successor = Process(tmp_path, "1")
    successor.requests.labels("chat", "200").inc(2)
    seen = scrape((await successor.host.exposition()).decode())
    assert seen[key] == 15
    assert seen[("quota_added_latency_seconds_count", ("endpoint", "chat"))] == 1
    assert scrape((await one.host.exposition()).decode())[key] == 15
    # Its file, written each second, carries its predecessor's 10 besides its own 3.
    successor.requests.labels("chat", "200").inc()
    await successor.host.write()
    file_key = ("quota_requests_total", (("code", "200"), ("endpoint", "chat")))
    assert host_metrics.read(successor.host.path)["quota_requests"].samples[file_key] == 13


async def test_an_unreadable_snapshot_is_left_out(tmp_path: Path) -> None:
    one, two = Process(tmp_path, "0"), Process(tmp_path, "1")
    one.requests.labels("chat", "200").inc(3)
    two.requests.labels("chat", "200").inc(4)
    await two.host.write()
    (tmp_path / "2.json").write_bytes(b'{"families": {"quota_requests": {"type": "counter", "samples": [["x"')
    (tmp_path / "3.json").write_bytes(orjson.dumps({"families": {"quota_requests": {"type": "counter"}}}))
    seen = scrape((await one.host.exposition()).decode())
    assert seen[("quota_requests_total", ("code", "200"), ("endpoint", "chat"))] == 7


def test_every_gauge_the_proxy_exports_has_a_rule() -> None:
    gauges = {m.name for m in metrics.REGISTRY.collect() if m.type == "gauge"}
    assert gauges == set(GAUGES)


async def test_the_proxys_registry_comes_out_whole_and_adds_up(tmp_path: Path) -> None:
    metrics.REQUESTS.labels("chat", "ok", "200").inc()
    metrics.DEPENDENCY_UP.labels("redis").set(1)
    alone = scrape(generate_latest(metrics.REGISTRY).decode())
    worker = HostMetrics(str(tmp_path), "0")
    assert scrape((await worker.exposition()).decode()).keys() == alone.keys()  # no other process yet

    host_metrics.write(tmp_path / "1.json", host_metrics.dumps(worker.own()))  # another worker, the same counts
    both = scrape((await worker.exposition()).decode())
    assert both.keys() == alone.keys()
    key = ("quota_requests_total", ("code", "200"), ("endpoint", "chat"), ("state", "ok"))
    assert both[key] == 2 * alone[key]
    assert both[("quota_reserve_seconds_count",)] == 2 * alone[("quota_reserve_seconds_count",)]
    assert both[("quota_dependency_up", ("dependency", "redis"))] == 1
