"""The usage record: its fields, its encoding on the ledger's stream, and its rows in PostgreSQL.

A record is encoded once on the request path (orjson, straight from the dataclass) and decoded once by
the writer into a row in COLUMNS order, which goes in by one binary COPY (ledger.py moves the batches).
"""

from __future__ import annotations

import operator
from dataclasses import MISSING, dataclass, fields
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

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
