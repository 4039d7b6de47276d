"""Admin API for tools: another user's usage, and setting budgets. Admins may equally use SQL."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg
from starlette.requests import Request

from .auth import Principal
from .body import printable_id, read_json
from .config import PERIODS, Settings
from .errors import BadRequest, Forbidden
from .limits import Limit, set_budget
from .usage_history import usage_history


def require_admin(principal: Principal) -> None:
    if not principal.admin:
        raise Forbidden("This needs an admin token.")


async def usage(pool: asyncpg.Pool, principal: Principal, request: Request) -> dict[str, object]:
    """GET /admin/usage?user=…: the statement of any user."""
    require_admin(principal)
    user = request.query_params.get("user")
    if not user:
        raise BadRequest("Name the user: /admin/usage?user=<id>.", param="user")
    printable_id(user, "user")
    return await usage_history(pool, user, request.query_params, datetime.now(UTC))


async def put_budget(
    pool: asyncpg.Pool, settings: Settings, principal: Principal, request: Request
) -> dict[str, object]:
    """PUT /admin/budgets/{subject} with
    {"tokens": …, "period"?, "warn_ratio"?, "rpm"?, "tpm"?, "type"?: "user"|"tenant"}."""
    require_admin(principal)
    subject = printable_id(request.path_params["subject"], "subject")
    body, _ = await read_json(request, 64 * 1024, settings.body_read_timeout)
    kind = body.get("type", "user")
    period = body.get("period", settings.budget_period)
    tokens, warn = body.get("tokens"), body.get("warn_ratio", settings.warn_ratio)
    rpm, tpm = body.get("rpm", 0), body.get("tpm", 0)
    if kind not in ("user", "tenant"):
        raise BadRequest("'type' is 'user' or 'tenant'.", param="type")
    if period not in PERIODS:
        raise BadRequest(f"'period' is one of {', '.join(PERIODS)}.", param="period")
    # The columns' ranges: bigint for tokens, integer for the per-minute rates.
    for name, value, most in (("tokens", tokens, 2**63 - 1), ("rpm", rpm, 2**31 - 1), ("tpm", tpm, 2**31 - 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
            raise BadRequest(f"'{name}' must be a whole number from 0 to {most:,}.", param=name)
    if isinstance(warn, bool) or not isinstance(warn, (int, float)) or not 0 < warn <= 1:
        raise BadRequest("'warn_ratio' must be above 0 and at most 1.", param="warn_ratio")
    limit = Limit(kind, subject, period, tokens, float(warn), rpm, tpm)  # type: ignore[arg-type]
    async with pool.acquire() as conn:
        await set_budget(conn, limit)
    return {
        "type": kind,
        "subject": subject,
        "period": period,
        "tokens": tokens,
        "warn_ratio": float(warn),
        "rpm": rpm,
        "tpm": tpm,
    }
