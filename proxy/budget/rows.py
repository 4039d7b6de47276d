"""Budgets as data: the `budgets` table, cached in memory and refreshed every few seconds."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

import asyncpg
import orjson
import structlog

from ..config import DEFAULT_SUBJECT, PERIODS, Settings
from ..db import PG_UNAVAILABLE

log = structlog.get_logger("proxy.budget")

DEFAULT = DEFAULT_SUBJECT


def period_bounds(period: str, now: float) -> tuple[datetime, datetime | None]:
    """[start, end) of the UTC period containing `now`; weeks start on Monday; 'total' never ends."""
    at = datetime.fromtimestamp(now, UTC)
    if period == "total":
        return datetime(1970, 1, 1, tzinfo=UTC), None
    if period == "day":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0)
        return start, start + timedelta(days=1)
    if period == "week":
        start = at.replace(hour=0, minute=0, second=0, microsecond=0) - timedelta(days=at.weekday())
        return start, start + timedelta(days=7)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start, end


@dataclass(frozen=True, slots=True)
class Limit:
    subject_type: str  # 'user' | 'tenant' | 'group' (a tier that users get through their groups)
    subject: str  # the row's subject: a user or tenant id, a group name, or the default '*'
    period: str
    tokens: int
    warn_ratio: float
    rpm: int = 0  # requests per minute, 0 = no limit
    tpm: int = 0  # tokens per minute, 0 = no limit
    rollover: float = 0.0  # the fraction of last period's unused budget carried into this one
    rollover_cap: float = 0.5  # ... at most this fraction of the limit
    model: str = ""  # a cap on the models matching this glob, inside the overall budget ('' = the budget)
    alert_thresholds: tuple[float, ...] | None = None  # the row's own (docs/alerts.md); None: ALERT_THRESHOLDS
    # A user's budget that a group tier set (BudgetBook.user): that group, which the ledger records carry so that
    # PostgreSQL judges the user by the same row. None for every row as stored.
    group: str | None = None


def env_defaults(settings: Settings) -> list[Limit]:
    defaults = [Limit("user", DEFAULT, settings.budget_period, settings.default_token_budget, settings.warn_ratio)]
    if settings.default_tenant_budget > 0:
        defaults.append(
            Limit("tenant", DEFAULT, settings.budget_period, settings.default_tenant_budget, settings.warn_ratio)
        )
    return defaults


_UPSERT = """
insert into budgets (subject_type, subject, period, token_limit, warn_ratio, rpm_limit, tpm_limit,
                     rollover_ratio, rollover_cap_ratio, alert_thresholds, updated_at)
values ($1, $2, $3, $4, $5, nullif($6, 0), nullif($7, 0), $8, $9, $10, now())
on conflict (subject_type, subject) do update
set period = excluded.period, token_limit = excluded.token_limit, warn_ratio = excluded.warn_ratio,
    rpm_limit = excluded.rpm_limit, tpm_limit = excluded.tpm_limit, rollover_ratio = excluded.rollover_ratio,
    rollover_cap_ratio = excluded.rollover_cap_ratio, alert_thresholds = excluded.alert_thresholds, updated_at = now()
"""


async def set_budget(conn: asyncpg.Connection, limit: Limit) -> None:
    if limit.period not in PERIODS:
        raise ValueError(f"period must be one of {', '.join(PERIODS)}")
    if min(limit.tokens, limit.rpm, limit.tpm) < 0:
        raise ValueError("tokens, rpm and tpm must be 0 or more")
    if not (0 <= limit.rollover <= 1 and 0 <= limit.rollover_cap <= 1):
        raise ValueError("rollover and its cap are fractions from 0 to 1")
    await conn.execute(
        _UPSERT,
        limit.subject_type,
        limit.subject,
        limit.period,
        limit.tokens,
        limit.warn_ratio,
        limit.rpm,
        limit.tpm,
        limit.rollover,
        limit.rollover_cap,
        None if limit.alert_thresholds is None else list(limit.alert_thresholds),
    )


async def set_model_cap(conn: asyncpg.Connection, limit: Limit) -> None:
    """A cap on the models matching `limit.model`, inside the subject's budget (`budget_model_caps`)."""
    if not limit.model or limit.period not in PERIODS or limit.tokens < 0:
        raise ValueError("a model cap needs a model glob, a period and 0 or more tokens")
    if "[" in limit.model or "]" in limit.model:  # '*' and '?' only: the rebuild from PostgreSQL reads them too
        raise ValueError("a model glob may use * and ?, not [...]")
    await conn.execute(
        "insert into budget_model_caps (subject_type, subject, model, period, token_limit) values ($1, $2, $3, $4, $5)"
        " on conflict (subject_type, subject, model) do update"
        " set period = excluded.period, token_limit = excluded.token_limit, updated_at = now()",
        limit.subject_type,
        limit.subject,
        limit.model,
        limit.period,
        limit.tokens,
    )


def budget_settings(limit: Limit) -> dict[str, object]:
    """A row's settings, not its subject: what budget_changes keeps, and what the admin API answers."""
    if limit.model:
        return {"period": limit.period, "tokens": limit.tokens}
    return {
        "period": limit.period,
        "tokens": limit.tokens,
        "warn_ratio": limit.warn_ratio,
        "rpm": limit.rpm,
        "tpm": limit.tpm,
        "rollover": limit.rollover,
        "rollover_cap": limit.rollover_cap,
        "alert_thresholds": None if limit.alert_thresholds is None else list(limit.alert_thresholds),
    }


async def change_budget(
    conn: asyncpg.Connection, limit: Limit, changed_by: str, source: str, reason: str | None = None
) -> tuple[dict[str, object] | None, dict[str, object]]:
    """Set a budget row (or, with `limit.model`, a model cap) and record who changed it from what to what
    in `budget_changes`: the one way the admin API, the dashboard and `budget set` change budgets.
    Returns (before, after); before is None when there was no row."""
    async with conn.transaction():
        # The row locked (or, for a new one, its key) so two changes at once record each other's results.
        await conn.execute("select pg_advisory_xact_lock(hashtext($1))", f"{limit.subject_type}:{limit.subject}")
        if limit.model:
            row = await conn.fetchrow(
                "select * from budget_model_caps where subject_type = $1 and subject = $2 and model = $3",
                limit.subject_type,
                limit.subject,
                limit.model,
            )
            before: dict[str, object] | None = {"period": row["period"], "tokens": row["token_limit"]} if row else None
            await set_model_cap(conn, limit)
        else:
            row = await conn.fetchrow(
                "select * from budgets where subject_type = $1 and subject = $2", limit.subject_type, limit.subject
            )
            before = budget_settings(_limit(row)) if row else None
            await set_budget(conn, limit)
        after = budget_settings(limit)
        await conn.execute(
            "insert into budget_changes (subject_type, subject, model, changed_by, source, before, after, reason)"
            " values ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)",
            limit.subject_type,
            limit.subject,
            limit.model,
            changed_by,
            source,
            orjson.dumps(before).decode() if before is not None else None,
            orjson.dumps(after).decode(),
            reason,
        )
    return before, after


async def sync_defaults(conn: asyncpg.Connection, settings: Settings) -> None:
    """The environment owns the '*' rows, so the admin views see the same defaults as the proxy."""
    for limit in env_defaults(settings):
        await set_budget(conn, limit)
    if settings.default_tenant_budget <= 0:
        await conn.execute("delete from budgets where subject_type = 'tenant' and subject = $1", DEFAULT)


async def fetch_limit(
    conn: asyncpg.Connection, subject_type: str, subject: str, groups: tuple[str, ...] = ()
) -> Limit | None:
    """The row that applies, with the same precedence as BudgetBook.user: the subject's own, else (for a
    user) the most generous of its groups', else the default '*'."""
    row = await conn.fetchrow(
        "select * from budgets where (subject_type = $1 and subject in ($2, $3))"
        " or (subject_type = 'group' and $1 = 'user' and subject = any($4::text[]))"
        " order by subject_type = $1 and subject = $2 desc, subject_type = 'group' desc, token_limit desc limit 1",
        subject_type,
        subject,
        DEFAULT,
        list(groups),
    )
    if row is None:
        return None
    limit = _limit(row)
    if limit.subject_type == "group" and subject_type == "user":  # a tier: the default's period (BudgetBook.user)
        default = await conn.fetchval(
            "select period from budgets where subject_type = 'user' and subject = $1", DEFAULT
        )
        return replace(limit, subject_type="user", period=default or limit.period, group=limit.subject)
    return limit


def _limit(row: asyncpg.Record) -> Limit:
    return Limit(
        row["subject_type"],
        row["subject"],
        row["period"],
        row["token_limit"],
        row["warn_ratio"],
        row["rpm_limit"] or 0,
        row["tpm_limit"] or 0,
        row["rollover_ratio"],
        row["rollover_cap_ratio"],
        alert_thresholds=None if row["alert_thresholds"] is None else tuple(row["alert_thresholds"]),
    )


async def add_grant(
    conn: asyncpg.Connection, subject_type: str, subject: str, tokens: int, reason: str, granted_by: str, now: float
) -> tuple[int, datetime]:
    """Add `tokens` to the subject's budget for its current period; returns the grant's id and that period's start."""
    if not 1 <= tokens <= MAX_GRANT:
        raise ValueError(f"a grant adds from 1 to {MAX_GRANT:,} tokens")
    if not reason.strip():
        raise ValueError("a grant needs a reason")
    limit = await fetch_limit(conn, subject_type, subject)
    if limit is None:
        raise ValueError(f"{subject_type} {subject} has no budget to add to")
    start = period_bounds(limit.period, now)[0]
    grant_id = await conn.fetchval(
        "insert into budget_grants (subject_type, subject, tokens, period_start, reason, granted_by)"
        " values ($1, $2, $3, $4, $5, $6) returning id",
        subject_type,
        subject,
        tokens,
        start,
        reason,
        granted_by,
    )
    return int(grant_id), start


async def revoke_grant(conn: asyncpg.Connection, grant_id: int, revoked_by: str) -> bool:
    """Take a grant back; False when there is no such grant in force."""
    status = await conn.execute(
        "update budget_grants set revoked_at = now(), revoked_by = $2 where id = $1 and revoked_at is null",
        grant_id,
        revoked_by,
    )
    return bool(status.endswith(" 1"))


# All grants in force, `total` budgets' too (their period starts in 1970); the sum is clamped so that no
# number of grants can overflow bigint, or Lua's exact integers once the row's limit is added.
_GRANTS = """
select subject_type, subject, period_start, least(sum(tokens), $1)::bigint as tokens from budget_grants
where revoked_at is null group by 1, 2, 3
"""
MAX_GRANT = 10**12  # tokens one grant may add
_MAX_GRANTED = 2**50


class BudgetBook:
    """Every budget row in memory: the request path never waits on PostgreSQL for a limit.

    Changes made with `budget set` or plain SQL take effect within BUDGET_REFRESH_SECONDS.
    If PostgreSQL is unreachable the last loaded rows (or the environment defaults) stay in force.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._rows: dict[tuple[str, str], Limit] = {(d.subject_type, d.subject): d for d in env_defaults(settings)}
        self._grants: dict[tuple[str, str, datetime], int] = {}  # (type, subject, period start) -> tokens
        self._carried: dict[tuple[str, str, datetime], int] = {}  # the same, carried over from last period
        self._caps: dict[tuple[str, str], tuple[Limit, ...]] = {}  # (type, subject) -> its model caps
        self.version = 0  # changes whenever the rows do, so derived caches know to drop

    def user(self, user: str, groups: tuple[str, ...] = ()) -> Limit:
        """The user's own row; else the most generous of their groups' rows; else the default."""
        rows = self._rows
        own = rows.get(("user", user))
        if own is not None:
            return own
        tiers = [limit for g in groups if (limit := rows.get(("group", g))) is not None]
        if tiers:
            # A user's budget all the same (its counter, rebuild and messages are the user's); `subject` and
            # `group` keep the name of the group row that set it. And the default's period: the counter's key
            # holds the period, and a person's groups (which their token or a delegate names) must not choose
            # between two counters.
            default = rows[("user", DEFAULT)]
            tier = max(tiers, key=lambda limit: limit.tokens)
            return replace(tier, subject_type="user", period=default.period, group=tier.subject)
        return rows[("user", DEFAULT)]

    def tenant(self, tenant: str | None) -> Limit | None:
        if tenant is None:
            return None
        return self._rows.get(("tenant", tenant)) or self._rows.get(("tenant", DEFAULT))

    def caps(self, subject_type: str, subject: str) -> tuple[Limit, ...]:
        """The subject's model caps: its own, else those of the '*' default."""
        caps = self._caps
        if not caps:
            return ()
        return caps.get((subject_type, subject)) or caps.get((subject_type, DEFAULT), ())

    def added(self, subject_type: str, subject: str, period_start: datetime) -> int:
        """Tokens granted to this subject for the period starting at `period_start`, and carried into it."""
        key = (subject_type, subject, period_start)
        return (self._grants.get(key, 0) if self._grants else 0) + (self._carried.get(key, 0) if self._carried else 0)

    async def load(self, pool: asyncpg.Pool) -> None:
        rows = {(d.subject_type, d.subject): d for d in env_defaults(self._settings)}
        for record in await pool.fetch("select * from budgets"):
            limit = _limit(record)
            rows[(limit.subject_type, limit.subject)] = limit
        grants = {
            (r["subject_type"], r["subject"], r["period_start"]): r["tokens"]
            for r in await pool.fetch(_GRANTS, _MAX_GRANTED)
        }
        carried = {
            (r["subject_type"], r["subject"], r["period_start"]): r["carried"]
            for r in await pool.fetch("select subject_type, subject, period_start, carried from budget_rollover")
        }
        caps: dict[tuple[str, str], tuple[Limit, ...]] = {}
        for r in await pool.fetch("select * from budget_model_caps order by model"):
            cap = Limit(
                r["subject_type"],
                r["subject"],
                r["period"],
                r["token_limit"],
                self._settings.warn_ratio,
                model=r["model"],
            )
            caps[(cap.subject_type, cap.subject)] = (*caps.get((cap.subject_type, cap.subject), ()), cap)
        if rows != self._rows or grants != self._grants or carried != self._carried or caps != self._caps:
            self._rows, self._grants, self._carried, self._caps = rows, grants, carried, caps
            self.version += 1

    async def refresh_forever(self, pool: asyncpg.Pool) -> None:
        while True:
            await asyncio.sleep(self._settings.budget_refresh_seconds)
            try:
                await self.load(pool)
            except PG_UNAVAILABLE as exc:
                log.warning("budget_refresh_failed", error=str(exc))
