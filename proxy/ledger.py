"""The usage ledger: records go to a Redis Stream on the request path, a writer moves them to PostgreSQL.

The stream is the durable hand-off: an entry is acknowledged (XACK) and deleted only after
its PostgreSQL transaction commits, entries a dead instance left pending are claimed
(XAUTOCLAIM), and `(request_id, created_at)` is the primary key, so redelivery never double-counts.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from datetime import datetime
from typing import Any, cast

import asyncpg
import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError, ResponseError

from . import metrics
from .alerts import AlertDetector
from .config import Settings
from .db import PG_UNAVAILABLE
from .records import UsageRecord, as_rows, insert_records, insert_rows, spent

log = structlog.get_logger("proxy.ledger")

GROUP = "ledger-writers"
# Entries read, and acknowledged and deleted, per round trip. Redis serves no one else while it runs a
# command: one XREADGROUP of 1,000 entries kept it busy ~1.4 ms and one XACK + XDEL of 1,000 ids ~1.5 ms,
# which every request waiting on it paid; 100 at a time, ~0.1 ms (#19). A batch is still one COPY.
READ_CHUNK = 100
TRIM_CHUNK = 100
# On the way out, a writer moves what the stream holds for at most this long (PostgreSQL may be down):
# what is left stays in the stream for the next writer.
FLUSH_SECONDS = 10.0
# What PostgreSQL says of a record it will never take, however often it is retried.
_REJECTED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError)


def _raw(reply: Any, **options: Any) -> Any:
    return reply


def _entries(reply: Any) -> list[Any]:
    """The entries of a one-stream XREADGROUP reply, RESP2 [[stream, entries]] or RESP3 {stream: entries}.
    Each is [id, [b"r", record]]; one deleted since it was delivered comes back without fields."""
    if not reply:
        return []
    return list(next(iter(reply.values())) if isinstance(reply, dict) else reply[0][1])


class Ledger:
    def __init__(
        self,
        client: redis.Redis,
        pool: asyncpg.Pool | None,
        *,
        stream: str = "quota:ledger",
        consumer: str = "",
        batch_size: int = 1000,
        flush_seconds: float = 1.0,
        redis_timeout: float = 2.0,
        claim_idle_seconds: float = 60.0,
        backlog_warn: int = 100_000,
        alerts: AlertDetector | None = None,
    ) -> None:
        self._redis = client
        # The writer takes XREADGROUP replies as hiredis parsed them: redis-py's per-entry tuples
        # and dicts cost more than the PostgreSQL write.
        self._reader = redis.Redis(connection_pool=client.connection_pool)
        self._reader.set_response_callback("XREADGROUP", cast(Any, _raw))
        self._pool = pool
        self.stream = stream
        # Stable across restarts, so a restarted instance finds its own unacknowledged entries at once.
        self._consumer = consumer or os.environ.get("HOSTNAME") or socket.gethostname()
        self._batch = batch_size
        # The blocking read must end well before the client's socket timeout, or an idle stream reads as an outage.
        self._block_ms = max(int(min(flush_seconds, redis_timeout / 2) * 1000), 1)
        self._linger = flush_seconds / 2  # with the blocking read, records reach PostgreSQL within flush_seconds
        self._claim_idle_ms = int(claim_idle_seconds * 1000)
        self._backlog_warn = backlog_warn
        self._months: set[datetime] = set()
        self.alerts = alerts  # budget thresholds the batch's subjects crossed, found after each commit

    @classmethod
    def for_settings(cls, client: redis.Redis, pool: asyncpg.Pool | None, settings: Settings) -> Ledger:
        return cls(
            client,
            pool,
            stream=settings.ledger_stream,
            consumer=settings.ledger_consumer,
            batch_size=settings.ledger_batch_size,
            flush_seconds=settings.ledger_flush_seconds,
            redis_timeout=settings.redis_timeout,
            backlog_warn=settings.ledger_backlog_warn,
            alerts=AlertDetector.for_settings(settings),
        )

    def command(self, record: UsageRecord) -> tuple[Any, ...]:
        """The XADD that hands a record to the writer."""
        return ("XADD", self.stream, "*", "r", record.encode())

    async def write_direct(self, record: UsageRecord) -> int | None:
        """Straight to PostgreSQL, for when the stream itself is unreachable. Returns when it was in, by
        PostgreSQL's clock, in ms (a counter rebuilt later counts it); None if it did not go in."""
        if self._pool is None:
            log.error("usage_record_lost", request_id=record.request_id, reason="no redis and no postgres")
            return None
        try:
            async with self._pool.acquire() as conn:
                await insert_records(conn, [record.encode()], self._months)
                return int(await conn.fetchval("select (extract(epoch from clock_timestamp()) * 1000)::bigint"))
        except PG_UNAVAILABLE as exc:
            log.error(
                "usage_record_lost", request_id=record.request_id, error=str(exc), record=record.encode().decode()
            )
            return None

    async def backlog(self) -> int:
        return int(await self._redis.xlen(self.stream))

    async def backlog_and_lag(self) -> tuple[int, float]:
        """Records waiting for PostgreSQL, and the age in seconds of the oldest of them by Redis's clock
        (its entry id is the time Redis added it; acknowledged entries are deleted), in one round trip."""
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xrange(self.stream, count=1)
            pipe.time()
            length, oldest, (seconds, micros) = await pipe.execute()
        if not oldest:
            return int(length), 0.0
        entry_id = oldest[0][0]
        added_ms = int((entry_id.decode() if isinstance(entry_id, bytes) else entry_id).split("-")[0])
        return int(length), max(seconds + micros / 1e6 - added_ms / 1000, 0.0)

    async def ensure_group(self) -> None:
        try:
            await self._redis.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def drain_once(self, *, pending: bool = False, block: bool = True) -> int:
        """Move one batch to PostgreSQL. `pending` re-reads entries delivered to us but not acknowledged."""
        assert self._pool is not None, "the writer needs PostgreSQL"
        while True:
            read = await self._read(pending, block)
            entries = [entry for entry in read if entry[1]]
            if entries:
                break
            await self._acknowledge([eid for eid, _ in read])  # deleted since delivered: only the PEL holds them
            if not (pending and read):  # a batch of only those: the pending entries after them are read next
                return 0
        started = time.perf_counter()
        async with self._pool.acquire() as conn:
            try:
                rows = as_rows([fields[1] for _, fields in entries])
                await insert_rows(conn, rows, self._months)
            except _REJECTED:
                rows = await self._insert_one_by_one(conn, entries)
            if self.alerts is not None:  # before the XACK: a check PostgreSQL failed is retried with the batch
                await self.alerts.check(conn, spent(rows))
        await self._acknowledge([eid for eid, _ in read])
        metrics.LEDGER_WRITTEN.inc(len(entries))
        metrics.observe_ledger_batch(len(entries), time.perf_counter() - started)
        return len(entries)

    async def _acknowledge(self, ids: list[Any]) -> None:
        for at in range(0, len(ids), TRIM_CHUNK):
            chunk = ids[at : at + TRIM_CHUNK]
            async with self._redis.pipeline(transaction=False) as pipe:
                pipe.xack(self.stream, GROUP, *chunk)
                pipe.xdel(self.stream, *chunk)
                await pipe.execute()

    async def _read(self, pending: bool, block: bool) -> list[Any]:
        """Up to a batch of entries, READ_CHUNK per round trip; only the first read waits for new ones.
        `pending` pages through the entries delivered to us and not acknowledged (those deleted since
        come back without fields)."""
        entries: list[Any] = []
        start: Any = "0" if pending else ">"
        while len(entries) < self._batch:
            count = min(READ_CHUNK, self._batch - len(entries))
            wait = None if pending or not block or entries else self._block_ms
            reply = await self._reader.xreadgroup(GROUP, self._consumer, {self.stream: start}, count=count, block=wait)
            chunk = _entries(reply)
            entries += chunk
            if len(chunk) < count:
                break
            if pending:
                start = chunk[-1][0]
        return entries

    async def _insert_one_by_one(self, conn: asyncpg.Connection, entries: list[Any]) -> list[tuple[Any, ...]]:
        """A batch PostgreSQL refused for its data: insert its records alone, and set aside (in the
        stream `<LEDGER_STREAM>:rejected`, with the error) the ones it will never take, so one bad
        record cannot hold up everyone's. Returns the rows of the records it took."""
        taken: list[tuple[Any, ...]] = []
        for entry_id, entry in entries:
            try:
                one = as_rows([entry[1]])
                await insert_rows(conn, one, self._months)
                taken += one
            except _REJECTED as exc:
                await self._redis.xadd(f"{self.stream}:rejected", {"r": entry[1], "error": str(exc), "id": entry_id})
                metrics.LEDGER_ERRORS.labels("rejected").inc()
                log.error(
                    "usage_record_rejected",
                    entry=entry_id.decode(),
                    error=str(exc),
                    record=entry[1].decode(errors="replace"),
                )
        return taken

    async def claim_abandoned(self) -> int:
        """Take over entries another (dead) writer left unacknowledged for too long."""
        reply = await self._redis.xautoclaim(
            self.stream, GROUP, self._consumer, self._claim_idle_ms, "0-0", count=self._batch, justid=True
        )
        return len(reply)  # with justid, redis-py returns just the claimed ids

    async def run(self) -> None:
        """The writer task: drain forever; on any failure keep the entries and retry with back-off."""
        loop = asyncio.get_running_loop()
        delay = 0.1
        pending = True  # after a restart our own unacknowledged entries come first
        last_claim = last_report = float("-inf")
        while True:
            try:
                if last_claim + 30 < loop.time():
                    await self.ensure_group()
                    pending = await self.claim_abandoned() > 0 or pending
                    last_claim = loop.time()
                moved = await self.drain_once(pending=pending)
                if pending and moved == 0:
                    pending = False
                if last_report + 1 < loop.time():
                    await self._report_backlog()
                    last_report = loop.time()
                delay = 0.1
                if 0 < moved < self._batch and not pending:
                    # A partial batch: let records gather rather than pay a transaction for each one.
                    await asyncio.sleep(self._linger)
            except asyncio.CancelledError:
                raise
            except (RedisError, *PG_UNAVAILABLE) as exc:
                stage = "redis" if isinstance(exc, RedisError) else "postgres"
                metrics.LEDGER_ERRORS.labels(stage).inc()
                log.warning(
                    "ledger_write_failed", stage=stage, error=str(exc) or exc.__class__.__name__, retry_in=delay
                )
                pending = True
                if "NOGROUP" in str(exc):  # Redis restarted empty or was flushed: make the group again at once
                    last_claim = float("-inf")
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                try:
                    await self._report_backlog()
                except RedisError:
                    pass

    async def flush(self, timeout: float) -> int:
        """Move what the stream holds now, without waiting for more (on shutdown, after the proxy's last records
        went in): first the entries delivered to this consumer and not acknowledged, then the rest.
        Returns how many were moved; gives up at `timeout`, leaving the others pending."""
        moved = 0
        try:
            async with asyncio.timeout(timeout):
                await self.ensure_group()
                for pending in (True, False):
                    while batch := await self.drain_once(pending=pending, block=False):
                        moved += batch
        except (TimeoutError, RedisError, *PG_UNAVAILABLE) as exc:
            log.warning("ledger_flush_incomplete", moved=moved, error=str(exc) or exc.__class__.__name__)
        log.info("ledger_flushed", moved=moved)
        return moved

    async def _report_backlog(self) -> None:
        # The gauges quota_ledger_backlog and quota_ledger_lag_seconds are the proxy's probes (proxy/probes.py).
        backlog = await self.backlog()
        if backlog > self._backlog_warn:
            log.error("ledger_backlog_high", backlog=backlog, bound=self._backlog_warn)
