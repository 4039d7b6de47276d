"""The usage ledger: records go to a Redis Stream on the request path, a writer moves them to PostgreSQL.

The stream is the durable hand-off: an entry is acknowledged (XACK) and deleted only after
its PostgreSQL transaction commits, entries a dead instance left pending are claimed
(XAUTOCLAIM), and `(request_id, created_at)` is the primary key, so redelivery never double-counts.
"""

from __future__ import annotations

import asyncio
import operator
import os
import socket
import time
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, datetime
from typing import Any, cast

import asyncpg
import orjson
import redis.asyncio as redis
import structlog
from redis.exceptions import RedisError, ResponseError

from . import metrics
from .alerts import AlertDetector
from .config import Settings
from .db import PG_UNAVAILABLE

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


_GROUP_KEY = b',"budget_group":'


@dataclass(slots=True)
class UsageRecord:
    request_id: str
    created_at: float  # unix seconds
    user_id: str
    tenant_id: str | None
    model: str | None
    served_model: str | None
    endpoint: str
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None
    status: str
    http_status: int | None
    stream: bool
    estimated: bool
    latency_ms: float | None
    ttft_ms: float | None
    via: str | None = None
    user_email: str | None = None
    client_request_id: str | None = None  # the caller's X-Request-Id, a label; request_id is ours
    exempt: bool = False  # a request to one of EXEMPT_MODELS: recorded, never counted against a budget
    # The group whose tier set the user's limit; None when their own row or the default did. Most records have
    # none, so it is written only when there is one: orjson leaves out fields named with a leading underscore
    # (documented since orjson 3.0.2), and `encode` adds it as "budget_group". Last: it is the last column.
    _budget_group: str | None = None

    def encode(self) -> bytes:
        data = orjson.dumps(self)  # orjson serialises dataclasses natively, ~20x faster than asdict
        group = self._budget_group
        if group is None:
            return data
        return b"".join((data[:-1], _GROUP_KEY, orjson.dumps(group), b"}"))  # one copy, not three of `+`


_FIELDS = fields(UsageRecord)
COLUMNS = [f.name.lstrip("_") for f in _FIELDS]  # the field `_budget_group` is the column budget_group
_DEFAULTS = {c: f.default for c, f in zip(COLUMNS, _FIELDS, strict=True) if f.default is not MISSING}
# A batch arrives by one binary COPY straight into the table. A batch written before (redelivered
# after a crash between commit and XACK) fails that COPY on the primary key, and is then staged in a
# session-local table and moved over in one statement that skips the request ids already recorded.
# (The staging route for every batch cost PostgreSQL far more CPU than the COPY alone, and that burst
# on shared cores showed in the proxy's p99. Letting PostgreSQL parse the JSON instead moved the work
# to PostgreSQL and the ledger moved fewer records; docs/performance.md.)
_STAGE = "create temp table if not exists usage_staging (like usage_records including defaults) on commit delete rows"
_MOVE = "insert into usage_records select * from usage_staging on conflict do nothing"
_ROW = operator.itemgetter(*COLUMNS)
_UNENCODABLE = (TypeError, ValueError, OverflowError)


def as_row(data: bytes) -> tuple[Any, ...]:
    """An encoded record as a row in COLUMNS order."""
    record = orjson.loads(data)
    if b"\\u0000" in data:  # PostgreSQL text cannot hold NUL: drop it rather than refuse the record
        record = {k: v.replace("\x00", "") if isinstance(v, str) else v for k, v in record.items()}
    record["created_at"] = datetime.fromtimestamp(record["created_at"], UTC)
    if "budget_group" not in record:  # no tier (or an older version's record): not the slow way below for that
        record["budget_group"] = None
    try:
        return _ROW(record)  # type: ignore[no-any-return]
    except KeyError:  # queued by an older version, without the newer fields: they take their defaults
        return tuple(record.get(c, _DEFAULTS.get(c)) for c in COLUMNS)


def as_rows(records: list[bytes]) -> list[tuple[Any, ...]]:
    """Encoded records as rows; raises asyncpg.DataError if one of them is not a record."""
    try:
        return [as_row(r) for r in records]
    except (orjson.JSONDecodeError, *_UNENCODABLE, KeyError, AttributeError, OSError) as exc:
        raise asyncpg.DataError(f"not a usage record: {exc}") from None


_USER, _TENANT, _TOKENS, _EXEMPT = (COLUMNS.index(c) for c in ("user_id", "tenant_id", "total_tokens", "exempt"))


def spent(rows: list[tuple[Any, ...]]) -> set[tuple[str, str]]:
    """The budget subjects, (type, subject), whose tokens a batch of rows spent: the alert check's input.
    Exempt records and records without tokens change no budget."""
    found: set[tuple[str, str]] = set()
    for row in rows:
        if row[_EXEMPT] or not row[_TOKENS] > 0:
            continue
        found.add(("user", str(row[_USER])))
        if row[_TENANT] is not None:
            found.add(("tenant", str(row[_TENANT])))
    return found


async def insert_records(conn: asyncpg.Connection, records: list[bytes], known_months: set[datetime]) -> int:
    """Insert a batch of encoded records in one transaction; duplicates are skipped. Returns the rows added.
    Raises asyncpg.DataError for a record PostgreSQL will not take (or one that is not a record)."""
    return await insert_rows(conn, as_rows(records), known_months)


async def insert_rows(conn: asyncpg.Connection, rows: list[tuple[Any, ...]], known_months: set[datetime]) -> int:
    """insert_records for records already decoded (as_rows)."""
    months = {datetime(y, m, 1, tzinfo=UTC) for y, m in {(row[1].year, row[1].month) for row in rows}}
    for month in months - known_months:
        await conn.execute("select quota_ensure_partition($1)", month)
        known_months.add(month)
    try:
        await _copy(conn, "usage_records", rows)  # one statement, so one transaction: all or nothing
        return len(rows)
    except asyncpg.UniqueViolationError:
        pass  # some of the batch is recorded already
    async with conn.transaction():
        await conn.execute(_STAGE)
        await _copy(conn, "usage_staging", rows)
        status = await conn.execute(_MOVE)
    return int(status.rsplit(" ", 1)[-1])


async def _copy(conn: asyncpg.Connection, table: str, rows: list[tuple[Any, ...]]) -> None:
    try:
        await conn.copy_records_to_table(table, records=rows, columns=COLUMNS)
    except _UNENCODABLE as exc:  # asyncpg's encoders refuse before PostgreSQL sees the value
        raise asyncpg.DataError(f"a field PostgreSQL cannot hold: {exc}") from None


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
