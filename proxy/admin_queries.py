"""What the admin dashboard and its JSON/CSV twins read: the overview, users, tenants, blocked requests and
budget changes. One copy of each query; the pages, `/admin/*.json` and `/admin/*.csv` all call these.

Sums come from the daily rollups (sql/010_admin.sql), which the ledger's own inserts keep exact, so a
period's figures cost thousands of rows, not the million records behind them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg

from .admin_params import USER_SORTS, UserQuery
from .budget.engine import like_pattern
from .budget.rows import DEFAULT, period_bounds
from .db import PG_UNAVAILABLE
from .errors import history_down

CHART_DAYS = 62  # the overview's chart shows at most this many days (the last ones of a long period)
TOP_USERS = 10

# Users: every user the ledger has seen (usage_users) and every user with a budget row of their own; each with
# the row that applies (their own; else the group tier of their latest record, while that group's row exists;
# else the default '*'), its period, and what they used in it (exempt requests left out, as the budgets do), the
# period's grants and the carry from last period. A tier keeps the default's period, as the proxy's does; the
# proxy learns a user's groups from each request, PostgreSQL from the records (sql/013_group_tiers.sql), so a
# change of groups shows once the user's next request is recorded.
# $1 is now; the filters are added where {where} is.
# The tokens added to a subject's limit this period: its grants in force and what rolled over into it.
# `lim` is the query's CTE of the subjects (`{key}`) with their period's start.
_ADDED = """added as (
    select a.{key}, sum(a.tokens)::bigint as tokens
    from (
        select g.subject as {key}, g.tokens
        from budget_grants g join lim on lim.{key} = g.subject and g.period_start = lim.period_start
        where g.subject_type = '{kind}' and g.revoked_at is null
        union all
        select c.subject, c.carried from budget_rollover c where c.subject_type = '{kind}'
    ) a
    group by a.{key}
),"""
_USER_ADDED = _ADDED.format(key="user_id", kind="user")
_TENANT_ADDED = _ADDED.format(key="tenant_id", kind="tenant")

_USERS = """
with u as (
    select user_id, tenant_id, budget_group as latest_group from usage_users
    union all
    select b.subject, '', null from budgets b
    where b.subject_type = 'user' and b.subject <> '*'
      and not exists (select 1 from usage_users x where x.user_id = b.subject)
),
periods as (
    select p as period, quota_period_start(p, $1) as period_start, quota_period_end(p, $1) as resets_at
    from unnest(array['day', 'week', 'month', 'total']) as p
),
lim as (
    select u.user_id, u.tenant_id,
           coalesce(b.period, d.period, g.period) as period,
           coalesce(b.token_limit, g.token_limit, d.token_limit) as base_limit,
           coalesce(b.warn_ratio, g.warn_ratio, d.warn_ratio) as warn_ratio,
           -- the rates of the row the proxy applies (BudgetBook.user): own, else the tier's, else the default's
           case when b.subject is not null then b.rpm_limit when g.subject is not null then g.rpm_limit
                else d.rpm_limit end as rpm,
           case when b.subject is not null then b.tpm_limit when g.subject is not null then g.tpm_limit
                else d.tpm_limit end as tpm,
           b.subject is not null as own_budget,
           p.period_start, p.resets_at,
           g.subject as budget_group
    from u
    left join budgets b on b.subject_type = 'user' and b.subject = u.user_id
    left join budgets g on b.subject is null and g.subject_type = 'group' and g.subject = u.latest_group
    left join budgets d on d.subject_type = 'user' and d.subject = '*'
    join periods p on p.period = coalesce(b.period, d.period, g.period, 'month')
    {where}
),
-- A month's use is its row in usage_user_month (a 'total' budget's, the sum of them); a day's or a week's,
-- its days in usage_user_day.
used as (
    select x.user_id, sum(x.counted)::bigint as used, sum(x.requests)::bigint as requests,
           sum(x.blocked)::bigint as blocked, sum(x.cost_usd) as cost_usd
    from (
        select m.user_id, m.counted, m.requests, m.blocked, m.cost_usd
        from usage_user_month m join lim on lim.user_id = m.user_id
        where lim.period in ('month', 'total') and m.month >= (lim.period_start at time zone 'UTC')::date
          and m.month >= (select min(period_start) at time zone 'UTC' from lim where period in ('month', 'total'))::date
        union all
        select d.user_id, d.counted, d.requests, d.blocked, d.cost_usd
        from usage_user_day d join lim on lim.user_id = d.user_id
        where lim.period in ('day', 'week') and d.day >= (lim.period_start at time zone 'UTC')::date
          and d.day >= (select min(period_start) at time zone 'UTC' from lim where period in ('day', 'week'))::date
    ) x
    group by x.user_id
),
{added}
rows as (
    select lim.*, coalesce(used.used, 0) as used, coalesce(used.requests, 0) as requests,
           coalesce(used.blocked, 0) as blocked, used.cost_usd,
           lim.base_limit + coalesce(added.tokens, 0) as token_limit
    from lim
    left join used on used.user_id = lim.user_id
    left join added on added.user_id = lim.user_id
)
select *,
       greatest(token_limit - used, 0) as remaining,
       case when token_limit > 0 then round(100.0 * used / token_limit, 1)
            when token_limit = 0 then 100.0 end as percent,
       case when token_limit is null then 'none'
            when used >= token_limit then 'blocked'
            when used >= warn_ratio * token_limit then 'warn'
            else 'ok' end as state
from rows
"""


@dataclass(frozen=True, slots=True)
class Window:
    """The UTC days [start, end) a page sums over: a budget period containing `now`."""

    period: str
    start: datetime
    end: datetime | None

    @property
    def first_day(self) -> date:
        return self.start.date()

    @property
    def last_day(self) -> date:
        """The day after the last one summed."""
        return self.end.date() if self.end else date.max


def window(period: str, now: datetime) -> Window:
    start, end = period_bounds(period, now.timestamp())
    return Window(period, start, end)


def _users_sql(query: UserQuery) -> tuple[str, list[Any]]:
    """The users CTE with the query's filters; its arguments after $1 (now)."""
    where, args = [], []
    if query.q:
        args.append(like_pattern(f"*{query.q}*"))
        where.append(f"u.user_id ilike ${len(args) + 1} escape '\\'")
    if query.tenant:
        args.append(query.tenant)
        where.append(f"u.tenant_id = ${len(args) + 1}")
    sql = _USERS.format(where=("where " + " and ".join(where)) if where else "", added=_USER_ADDED)
    return sql, args


@asynccontextmanager
async def reading(pool: asyncpg.Pool) -> AsyncIterator[asyncpg.Connection]:
    """A connection for the dashboard's reads, with PostgreSQL's JIT off: these queries run in milliseconds,
    and their row estimates (CTEs of thousands of users) make it compile for seconds first."""
    try:
        async with pool.acquire(timeout=5) as conn, conn.transaction(readonly=True):
            await conn.execute("set local jit = off")
            yield conn
    except PG_UNAVAILABLE as exc:
        raise history_down() from exc


async def fetch(pool: asyncpg.Pool, sql: str, *args: Any) -> list[asyncpg.Record]:
    async with reading(pool) as conn:
        return list(await conn.fetch(sql, *args))


def page_of(
    rows: list[Any],
    total: int,
    page: int,
    per_page: int,
    shape: Callable[[Mapping[str, Any]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """A page of a list as the admin API answers it: its rows (`shape`d, jsonable by default; without the
    window's `total` column), and where the page stands."""
    shaped = shape or jsonable
    return {
        "object": "list",
        "data": [shaped({k: v for k, v in r.items() if k != "total"}) for r in rows],
        "total": total,
        "page": page,
        "pages": max(-(-total // per_page), 1),
        "per_page": per_page,
    }


def jsonable(record: Mapping[str, Any]) -> dict[str, Any]:
    """A row for JSON and templates: numerics as floats, instants as ISO 8601 UTC, days as dates."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, datetime):
            value = None if value.year in (1, 9999) else value.astimezone(UTC).isoformat().replace("+00:00", "Z")
        elif isinstance(value, date):
            value = value.isoformat()
        elif value is not None and not isinstance(value, (int, float, str, bool, dict, list)):
            value = float(value)  # Decimal
        out[key] = value
    return out


async def users(pool: asyncpg.Pool, query: UserQuery, now: datetime) -> dict[str, Any]:
    """One page of users with their budget state; `total` counts all that match."""
    sql, args = _users_sql(query)
    state = ""
    if query.state:
        args.append(query.state)
        state = f" where state = ${len(args) + 1}"
    args += [query.per_page, (query.page - 1) * query.per_page]
    rows = await fetch(
        pool,
        f"select *, count(*) over () as total from ({sql}) s{state} order by {USER_SORTS[query.sort]}"
        f" limit ${len(args)} offset ${len(args) + 1}",
        now,
        *args,
    )
    total = int(rows[0]["total"]) if rows else await _count_users(pool, sql, args[:-2], state, now)
    return page_of(rows, total, query.page, query.per_page)


async def _count_users(pool: asyncpg.Pool, sql: str, args: list[Any], state: str, now: datetime) -> int:
    """How many match, for a page past the last (its rows are empty, so they cannot say)."""
    rows = await fetch(pool, f"select count(*) as n from ({sql}) s{state}", now, *args)
    return int(rows[0]["n"])


async def all_users(pool: asyncpg.Pool, query: UserQuery, now: datetime) -> list[dict[str, Any]]:
    """Every user matching the query's filters, in its order (the CSV)."""
    sql, args = _users_sql(query)
    state = ""
    if query.state:
        args.append(query.state)
        state = f" where state = ${len(args) + 1}"
    rows = await fetch(pool, f"select * from ({sql}) s{state} order by {USER_SORTS[query.sort]}", now, *args)
    return [jsonable(r) for r in rows]


async def overview(pool: asyncpg.Pool, period: str, now: datetime) -> dict[str, Any]:
    """The period's totals, how many users are in warn and blocked, the daily tokens by model and the top users."""
    span = window(period, now)
    first, last = span.first_day, span.last_day
    # Active users: of the months' rows for a month or all time, of the days' for a day or a week.
    table, column = ("usage_user_month", "month") if period in ("month", "total") else ("usage_user_day", "day")
    sql, args = _users_sql(UserQuery())
    async with reading(pool) as conn:
        totals = await conn.fetchrow(
            "select coalesce(sum(requests), 0)::bigint as requests, coalesce(sum(tokens), 0)::bigint as tokens,"
            " coalesce(sum(prompt_tokens), 0)::bigint as prompt_tokens,"
            " coalesce(sum(completion_tokens), 0)::bigint as completion_tokens,"
            " coalesce(sum(blocked), 0)::bigint as blocked_requests, sum(cost_usd) as cost_usd"
            " from usage_model_day where day >= $1 and day < $2",
            first,
            last,
        )
        active = await conn.fetchval(
            f"select count(distinct user_id) from {table} where {column} >= $1 and {column} < $2 and requests > 0",
            first,
            last,
        )
        # The top users and the counts of every user's states in one pass over the users.
        top = await conn.fetch(
            "select *, count(*) over () as n_users, count(*) filter (where state = 'warn') over () as n_warn,"
            f" count(*) filter (where state = 'blocked') over () as n_blocked from ({sql}) s"
            f" order by used desc, user_id limit {TOP_USERS}",
            now,
            *args,
        )
        daily = await conn.fetch(
            "select day, model, tokens, requests from usage_model_day where day >= $1 and day < $2"
            " and requests <> 0 order by day, model",
            max(first, (now - timedelta(days=CHART_DAYS - 1)).date()),
            last,
        )
    return {
        "period": period,
        "from": jsonable({"at": span.start})["at"] if span.start.year > 1970 else None,
        "to": jsonable({"at": span.end})["at"] if span.end else None,
        "totals": {**jsonable(totals), "active_users": int(active)},
        "users": {
            "total": int(top[0]["n_users"]) if top else 0,
            "warn": int(top[0]["n_warn"]) if top else 0,
            "blocked": int(top[0]["n_blocked"]) if top else 0,
        },
        "daily": [jsonable(r) for r in daily],
        "top_users": [jsonable({k: v for k, v in r.items() if not k.startswith("n_")}) for r in top],
    }


async def default_period(pool: asyncpg.Pool, fallback: str) -> str:
    """The default user budget's period (BUDGET_PERIOD, as `migrate` and the proxy write it)."""
    rows = await fetch(pool, "select period from budgets where subject_type = 'user' and subject = $1", DEFAULT)
    return str(rows[0]["period"]) if rows else fallback


# Tenants: every tenant with users in the ledger or a budget row of its own; its members, its use in the
# window, and its budget (own row, else the tenant default '*', else none) with what it used in that budget's
# period (from the rollups, as for users). $1 now, $2/$3 the window's first and after-last day (or month).
_TENANTS = """
with t as (
    select tenant_id, count(*) as members from usage_users where tenant_id <> '' group by tenant_id
    union all
    select b.subject, 0 from budgets b
    where b.subject_type = 'tenant' and b.subject <> '*'
      and not exists (select 1 from usage_users x where x.tenant_id = b.subject)
),
lim as (
    select t.tenant_id, t.members, coalesce(b.period, d.period) as period,
           coalesce(b.token_limit, d.token_limit) as base_limit, coalesce(b.warn_ratio, d.warn_ratio) as warn_ratio,
           quota_period_start(coalesce(b.period, d.period, 'month'), $1) as period_start,
           quota_period_end(coalesce(b.period, d.period, 'month'), $1) as resets_at
    from t
    left join budgets b on b.subject_type = 'tenant' and b.subject = t.tenant_id
    left join budgets d on d.subject_type = 'tenant' and d.subject = '*'
),
used as (
    select x.tenant_id, sum(x.counted)::bigint as used
    from (
        select m.tenant_id, m.counted from usage_user_month m join lim on lim.tenant_id = m.tenant_id
        where lim.period in ('month', 'total') and m.month >= (lim.period_start at time zone 'UTC')::date
        union all
        select d.tenant_id, d.counted from usage_user_day d join lim on lim.tenant_id = d.tenant_id
        where lim.period in ('day', 'week') and d.day >= (lim.period_start at time zone 'UTC')::date
    ) x
    group by x.tenant_id
),
spent as (
    select r.tenant_id, sum(r.requests)::bigint as requests, sum(r.tokens)::bigint as tokens,
           sum(r.cost_usd) as cost_usd, count(distinct r.user_id) filter (where r.requests > 0) as active_users
    from {table} r where r.tenant_id <> '' and r.{column} >= $2 and r.{column} < $3
    group by r.tenant_id
),
{added}
rows as (
    select lim.*, coalesce(used.used, 0) as used, coalesce(spent.requests, 0) as requests,
           coalesce(spent.tokens, 0) as tokens, spent.cost_usd, coalesce(spent.active_users, 0) as active_users,
           lim.base_limit + coalesce(added.tokens, 0) as token_limit
    from lim
    left join used on used.tenant_id = lim.tenant_id
    left join spent on spent.tenant_id = lim.tenant_id
    left join added on added.tenant_id = lim.tenant_id
)
select *,
       case when token_limit > 0 then round(100.0 * used / token_limit, 1)
            when token_limit = 0 then 100.0 end as percent,
       case when token_limit is null then 'none'
            when used >= token_limit then 'blocked'
            when used >= warn_ratio * token_limit then 'warn'
            else 'ok' end as state
from rows
order by tokens desc, tenant_id
"""


async def tenants(pool: asyncpg.Pool, period: str, now: datetime) -> dict[str, Any]:
    """Every tenant with its members, its use in the window of `period` and its budget's state."""
    span = window(period, now)
    if period in ("month", "total"):
        sql = _TENANTS.format(table="usage_user_month", column="month", added=_TENANT_ADDED)
    else:
        sql = _TENANTS.format(table="usage_user_day", column="day", added=_TENANT_ADDED)
    rows = await fetch(pool, sql, now, span.first_day, span.last_day)
    return {"object": "list", "period": period, "data": [jsonable(r) for r in rows]}


async def user_budget(pool: asyncpg.Pool, user: str, now: datetime) -> dict[str, Any] | None:
    """One user's row of the users page (None: neither in the ledger nor with a budget row)."""
    sql = _USERS.format(where="where u.user_id = $2", added=_USER_ADDED)
    rows = await fetch(pool, f"select * from ({sql}) s", now, user)
    return jsonable(rows[0]) if rows else None
