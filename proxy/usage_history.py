"""`GET /v1/usage`: a caller's own usage records and totals, from PostgreSQL, paginated."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import asyncpg

from .db import PG_UNAVAILABLE
from .errors import BadRequest, history_down

MAX_LIMIT = 1000
_FIELDS = (
    "request_id, client_request_id, created_at, model, served_model, endpoint, prompt_tokens, completion_tokens, "
    "total_tokens, "
    "cost_usd, status, http_status, stream, estimated, latency_ms"
)


# PostgreSQL's timestamptz and Python's datetime agree on this range; asked for outside it, they fail.
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(9000, 1, 1, tzinfo=UTC)


def _instant(value: str, name: str) -> datetime:
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
        at = at if at.tzinfo else at.replace(tzinfo=UTC)
        at = at.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"'{name}' must be an ISO 8601 date or time, such as 2026-11-01.", param=name) from None
    if not _EARLIEST <= at <= _LATEST:
        raise BadRequest(f"'{name}' must lie between 1970 and 9000.", param=name)
    return at


def _cursor(value: str) -> tuple[datetime, str]:
    stamp, _, request_id = value.partition("~")
    try:
        at = datetime.fromtimestamp(int(stamp) / 1e6, UTC)
    except (ValueError, OverflowError, OSError):
        raise BadRequest("'cursor' is not one this API returned.", param="cursor") from None
    if not _EARLIEST <= at <= _LATEST or len(request_id) > 256 or not request_id.isprintable():
        raise BadRequest("'cursor' is not one this API returned.", param="cursor")
    return at, request_id


def _iso(at: datetime) -> str:
    return at.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def usage_history(pool: asyncpg.Pool, user: str, params: Mapping[str, str], now: datetime) -> dict[str, Any]:
    """Records newest first within [from, to), `limit` a page; `next_cursor` continues the list."""
    start = (
        _instant(params["from"], "from")
        if "from" in params
        else now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    )
    end = _instant(params["to"], "to") if "to" in params else now
    try:
        limit = int(params.get("limit", "100")[:10])
    except ValueError:
        raise BadRequest("'limit' must be a whole number.", param="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise BadRequest(f"'limit' must be between 1 and {MAX_LIMIT}.", param="limit")
    if end <= start:
        raise BadRequest("'to' must be after 'from'.", param="to")
    before_at, before_id = _cursor(params["cursor"]) if "cursor" in params else (end, "")
    try:
        async with pool.acquire(timeout=5) as conn:
            rows = await conn.fetch(
                f"select {_FIELDS} from usage_records where user_id = $1 and created_at >= $2 and created_at < $3"
                " and (created_at, request_id) < ($4, $5) order by created_at desc, request_id desc limit $6",
                user,
                start,
                end,
                before_at,
                before_id or "\uffff",
                limit + 1,
            )
            totals = await conn.fetchrow(
                "select count(*) as requests, coalesce(sum(prompt_tokens), 0) as prompt_tokens,"
                " coalesce(sum(completion_tokens), 0) as completion_tokens,"
                " coalesce(sum(total_tokens), 0) as total_tokens, sum(cost_usd) as cost_usd"
                " from usage_records where user_id = $1 and created_at >= $2 and created_at < $3",
                user,
                start,
                end,
            )
    except PG_UNAVAILABLE as exc:
        raise history_down() from exc
    page = rows[:limit]
    data = [
        {
            **dict(r),
            "created_at": _iso(r["created_at"]),
            "cost_usd": float(r["cost_usd"]) if r["cost_usd"] is not None else None,
        }
        for r in page
    ]
    last = page[-1] if len(rows) > limit else None
    return {
        "object": "list",
        "user": user,
        "from": _iso(start),
        "to": _iso(end),
        "totals": {**dict(totals), "cost_usd": float(totals["cost_usd"]) if totals["cost_usd"] is not None else None},
        "data": data,
        "has_more": last is not None,
        "next_cursor": f"{int(last['created_at'].timestamp() * 1e6)}~{last['request_id']}" if last else None,
    }


# The statement (`/me`) reads through this module too: the page, /v1/usage and the CSV are one set of queries.


async def daily_usage(pool: asyncpg.Pool, user: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
    """The user's usage in [start, end) per UTC day and model: day, model, requests, tokens in/out/total, cost."""
    try:
        async with pool.acquire(timeout=5) as conn:
            rows = await conn.fetch(
                "select (date_trunc('day', created_at at time zone 'UTC') at time zone 'UTC') as day,"
                " coalesce(model, '') as model, count(*) as requests,"
                " coalesce(sum(prompt_tokens), 0) as prompt_tokens,"
                " coalesce(sum(completion_tokens), 0) as completion_tokens,"
                " coalesce(sum(total_tokens), 0) as total_tokens, sum(cost_usd) as cost_usd"
                " from usage_records where user_id = $1 and created_at >= $2 and created_at < $3"
                " group by 1, 2 order by 1, 2",
                user,
                start,
                end,
            )
    except PG_UNAVAILABLE as exc:
        raise history_down() from exc
    return [{**dict(r), "cost_usd": float(r["cost_usd"]) if r["cost_usd"] is not None else None} for r in rows]


async def period_totals(
    pool: asyncpg.Pool, user: str, periods: list[tuple[datetime, datetime]]
) -> list[dict[str, Any]]:
    """The user's totals in each [start, end) of `periods`, in their order (zeros for a period without usage)."""
    if not periods:
        return []
    try:
        async with pool.acquire(timeout=5) as conn:
            rows = await conn.fetch(
                "select p.start, p.stop, count(u.request_id) as requests,"
                " coalesce(sum(u.total_tokens), 0) as total_tokens, sum(u.cost_usd) as cost_usd"
                " from unnest($2::timestamptz[], $3::timestamptz[]) as p(start, stop)"
                " left join usage_records u on u.user_id = $1 and u.created_at >= p.start and u.created_at < p.stop"
                " group by p.start, p.stop",
                user,
                [s for s, _ in periods],
                [e for _, e in periods],
            )
    except PG_UNAVAILABLE as exc:
        raise history_down() from exc
    found = {r["start"]: r for r in rows}
    out = []
    for start, end in periods:
        r = found[start]
        cost = float(r["cost_usd"]) if r["cost_usd"] is not None else None
        out.append(
            {"start": start, "end": end, "requests": r["requests"], "total_tokens": r["total_tokens"], "cost_usd": cost}
        )
    return out


def history_params(start: datetime, end: datetime, limit: int, cursor: str | None = None) -> dict[str, str]:
    """The query parameters of `usage_history` for a window, as the pages ask for it."""
    params = {"from": _iso(start), "to": _iso(end), "limit": str(limit)}
    if cursor:
        params["cursor"] = cursor
    return params
