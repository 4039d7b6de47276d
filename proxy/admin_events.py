"""The dashboard's lists of events, newest first: requests the budgets refused, and changes to budgets.
Read as admin_queries.py reads (its connection, its JSON rows), a page at a time or, for a CSV, through a cursor."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson

from .admin_params import Paging
from .admin_queries import fetch, jsonable, page_of, reading, window

_BLOCKED = (
    "select created_at, request_id, user_id, tenant_id, model, endpoint, http_status{total}"
    " from usage_records where status = 'blocked' and created_at >= $1 and created_at < $2"
    " order by created_at desc, request_id desc"
)


def _blocked_window(period: str, now: datetime) -> tuple[datetime, datetime]:
    span = window(period, now)
    return span.start, span.end or datetime(9000, 1, 1, tzinfo=UTC)


async def blocked(pool: asyncpg.Pool, period: str, now: datetime, paging: Paging) -> dict[str, Any]:
    """A page of the requests budgets refused in the window, newest first."""
    start, end = _blocked_window(period, now)
    sql = _BLOCKED.format(total=", count(*) over () as total") + " limit $3 offset $4"
    rows = await fetch(pool, sql, start, end, paging.per_page, (paging.page - 1) * paging.per_page)
    if rows:
        total = int(rows[0]["total"])
    else:
        counted = await fetch(
            pool,
            "select count(*) as n from usage_records where status = 'blocked' and created_at >= $1 and created_at < $2",
            start,
            end,
        )
        total = int(counted[0]["n"])
    return {"object": "list", "period": period, **page_of(rows, total, paging.page, paging.per_page)}


async def blocked_rows(pool: asyncpg.Pool, period: str, now: datetime) -> AsyncIterator[dict[str, Any]]:
    """Every request refused in the window, newest first, through a cursor: a user hammering the proxy
    while blocked leaves hundreds of thousands of them, which the CSV streams instead of holding."""
    start, end = _blocked_window(period, now)
    async with reading(pool) as conn:
        async for row in conn.cursor(_BLOCKED.format(total=""), start, end, prefetch=1000):
            yield jsonable(row)


async def changes(
    pool: asyncpg.Pool, subject_type: str | None, subject: str | None, paging: Paging | None
) -> dict[str, Any]:
    """Budget changes newest first: one subject's, or everyone's."""
    where, args = "", []
    if subject_type is not None and subject is not None:
        where, args = "where subject_type = $1 and subject = $2", [subject_type, subject]
    fields = "id, subject_type, subject, model, changed_by, changed_at, source, before, after, reason"
    order = "order by changed_at desc, id desc"
    if paging is None:
        rows = await fetch(pool, f"select {fields} from budget_changes {where} {order}", *args)
        return {"object": "list", "data": [_change(r) for r in rows]}
    n = len(args)
    rows = await fetch(
        pool,
        f"select {fields}, count(*) over () as total from budget_changes {where} {order}"
        f" limit ${n + 1} offset ${n + 2}",
        *args,
        paging.per_page,
        (paging.page - 1) * paging.per_page,
    )
    return page_of(rows, int(rows[0]["total"]) if rows else 0, paging.page, paging.per_page, _change)


def _change(record: Mapping[str, Any]) -> dict[str, Any]:
    row = jsonable(record)
    for key in ("before", "after"):  # asyncpg hands jsonb over as its text
        if isinstance(row[key], str):
            row[key] = orjson.loads(row[key])
    return row
