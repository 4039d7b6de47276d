"""One /metrics for the host when `serve --workers N` runs several worker processes.

A scrape of PROXY_PORT reaches whichever worker accepts it; each worker counts only what it served, and the
ledger writer's series live in the supervisor. So the supervisor makes a private directory (mode 700), and
each worker writes a snapshot of its samples there as `<worker number>.json` once a second, when it answers
a scrape and when it stops; the supervisor writes its writer's series as `writer.json`. The worker that
answers a scrape adds everyone else's snapshot to its own live samples: counters and histograms are summed,
gauges go by what they mean (GAUGES).

Counters never go backwards, which Prometheus would take for a restart of the whole host. The worker
answering a scrape writes what it shows before it answers, so any count a scrape showed is in a file; a
file only grows, because a restarted worker starts from its predecessor's last counts (the supervisor first
drops the dead worker's gauges from it: `retire`). Counts a killed worker made after its last snapshot were
never shown, and are lost.

Nothing here runs in one process (the default), and none of it on a request's path: snapshots are taken on
the event loop's thread (LoopCounter's rule) between requests, and the files are written from a thread.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import orjson
import structlog
from prometheus_client import generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from . import metrics

log = structlog.get_logger("proxy.host_metrics")

SNAPSHOT_SECONDS = 1.0
WRITER = "writer"  # the supervisor's file, beside the workers' numbered ones

SampleKey = tuple[str, tuple[tuple[str, str], ...]]  # sample name, sorted labels


class Family:
    __slots__ = ("documentation", "samples", "type")

    def __init__(self, type_: str, documentation: str, samples: dict[SampleKey, float]) -> None:
        self.type, self.documentation, self.samples = type_, documentation, samples


Families = dict[str, Family]

# How the workers' values of a gauge make the host's. A gauge missing here is a mistake (tests/test_host_metrics.py).
SUM, MAX, OWN = "sum", "max", "own"
GAUGES = {
    "quota_reservations_in_flight": SUM,
    "quota_fail_open_active": MAX,  # 1 when any worker is letting requests through unmetered
    "quota_notifications_pending": MAX,  # a count of the one outbox, whichever notifier read it last
    # Probed by the worker answering, at this very scrape; another worker's are from its last probe, maybe long ago.
    "quota_dependency_up": OWN,
    "quota_ledger_backlog": OWN,
    "quota_ledger_lag_seconds": OWN,
}
_SUMMED = ("counter", "histogram")


def _rule(family: Family, name: str) -> str:
    return SUM if family.type in _SUMMED else GAUGES.get(name, OWN)


def collect(collectors: Iterable[Collector]) -> Families:
    """The collectors' samples now (on the event loop's thread)."""
    return {
        metric.name: Family(
            metric.type,
            metric.documentation,
            {(s.name, tuple(sorted(s.labels.items()))): s.value for s in metric.samples},
        )
        for collector in collectors
        for metric in collector.collect()
    }


def merge(into: Families, others: Iterable[Families]) -> Families:
    """`into` with the others' samples added by each family's rule; families `into` lacks are left out."""
    for other in others:
        for name, family in other.items():
            mine = into.get(name)
            if mine is None:
                continue
            rule = _rule(mine, name)
            if rule == OWN:
                continue
            samples = mine.samples
            for key, value in family.samples.items():
                old = samples.get(key)
                samples[key] = value if old is None else old + value if rule == SUM else max(old, value)
    return into


def counts(families: Families) -> Families:
    """Only the counters and histograms: what outlives a process."""
    return {name: family for name, family in families.items() if family.type in _SUMMED}


def dumps(families: Families) -> bytes:
    return orjson.dumps(
        {
            "pid": os.getpid(),
            "families": {
                name: {"type": f.type, "samples": [[n, dict(labels), v] for (n, labels), v in f.samples.items()]}
                for name, f in families.items()
            },
        }
    )


def read(path: Path) -> Families:
    """A snapshot file's families; none when it is missing or unreadable (logged)."""
    try:
        data = orjson.loads(path.read_bytes())
        return {
            name: Family(
                family["type"],
                "",
                {(n, tuple(sorted(labels.items()))): float(v) for n, labels, v in family["samples"]},
            )
            for name, family in data["families"].items()
        }
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("metrics_snapshot_unreadable", path=str(path), error=repr(exc))
        return {}


def write(path: Path, data: bytes) -> None:
    """Whole or not at all: readers never see half a file."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def retire(path: Path) -> None:
    """A dead worker's file keeps its counts, for its successor to carry on from, and loses its gauges."""
    families = read(path)
    if families:
        write(path, dumps(counts(families)))


class _Exposition(Collector):
    def __init__(self, families: Families) -> None:
        self._families = families

    def collect(self) -> Iterable[Metric]:
        for name, family in self._families.items():
            metric = Metric(name, family.documentation, family.type)
            for (sample, labels), value in family.samples.items():
                metric.add_sample(sample, dict(labels), value)
            yield metric


class HostMetrics:
    """This process's share of the host's /metrics, in `directory` as `<name>.json`: a worker's (its number)
    or the supervisor's (WRITER, only the collectors given: the writer's)."""

    def __init__(self, directory: str, name: str, collectors: Sequence[Collector] = (metrics.REGISTRY,)) -> None:
        self.directory = Path(directory)
        self.path = self.directory / f"{name}.json"
        self._collectors = collectors
        self._base = counts(read(self.path))  # a restarted worker's predecessor's counts (retired)
        self._lock = asyncio.Lock()  # one write at a time: an older snapshot never replaces a newer one
        self._task: asyncio.Task[None] | None = None

    def own(self) -> Families:
        """This process's samples now, its predecessor's counts added."""
        return merge(collect(self._collectors), [self._base])

    async def write(self) -> Families:
        """Write this process's snapshot; returns it."""
        async with self._lock:
            families = self.own()
            await asyncio.to_thread(write, self.path, dumps(families))
        return families

    async def exposition(self) -> bytes:
        """The host's /metrics text: this process's samples and every other snapshot's."""
        families = await self.write()
        others = await asyncio.to_thread(self._others)
        return generate_latest(_Exposition(merge(families, others)))

    def _others(self) -> list[Families]:
        return [read(path) for path in sorted(self.directory.glob("*.json")) if path != self.path]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="metrics-snapshots")

    async def stop(self) -> None:
        """The last snapshot, with everything this process counted."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._write_logged()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(SNAPSHOT_SECONDS)
            await self._write_logged()

    async def _write_logged(self) -> None:
        try:
            await self.write()
        except OSError as exc:  # a full disk: the next second tries again; scrapes show what they can
            log.warning("metrics_snapshot_failed", path=str(self.path), error=repr(exc))
