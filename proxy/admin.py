"""Admin API for tools: another user's usage, and setting budgets. Admins may equally use SQL."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import asyncpg
from starlette.requests import Request

from .alerts import valid_thresholds
from .auth import Principal
from .body import printable_id, read_json, user_id
from .budget.rows import MAX_GRANT, Limit, add_grant, budget_settings, change_budget, revoke_grant
from .config import PERIODS, Settings
from .errors import BadRequest, Forbidden, NotFound
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
    user_id(user, "user")
    return await usage_history(pool, user, request.query_params, datetime.now(UTC))


def budget_from(body: Mapping[str, Any], settings: Settings, subject: str) -> Limit:
    """A budget row (or model cap) from an admin's request body, every field checked; the API's JSON and the
    dashboard's form both come through here. Missing fields take their defaults, not the row's old values."""
    kind = body.get("type", "user")
    period = body.get("period", settings.budget_period)
    tokens, warn = body.get("tokens"), body.get("warn_ratio", settings.warn_ratio)
    rpm, tpm = body.get("rpm", 0), body.get("tpm", 0)
    if kind not in ("user", "tenant", "group"):
        raise BadRequest("'type' is 'user', 'tenant' or 'group'.", param="type")
    if period not in PERIODS:
        raise BadRequest(f"'period' is one of {', '.join(PERIODS)}.", param="period")
    # The columns' ranges: bigint for tokens, integer for the per-minute rates.
    for name, value, most in (("tokens", tokens, 2**63 - 1), ("rpm", rpm, 2**31 - 1), ("tpm", tpm, 2**31 - 1)):
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= most:
            raise BadRequest(f"'{name}' must be a whole number from 0 to {most:,}.", param=name)
    if isinstance(warn, bool) or not isinstance(warn, (int, float)) or not 0 < warn <= 1:
        raise BadRequest("'warn_ratio' must be above 0 and at most 1.", param="warn_ratio")
    rollover, cap = body.get("rollover", 0.0), body.get("rollover_cap", 0.5)
    for name, value in (("rollover", rollover), ("rollover_cap", cap)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
            raise BadRequest(f"'{name}' must be a fraction from 0 to 1.", param=name)
    thresholds = body.get("alert_thresholds")
    alerts = None if thresholds is None else valid_thresholds(thresholds)
    if thresholds is not None and alerts is None:
        raise BadRequest(
            "'alert_thresholds' is a list of at most 10 fractions above 0 and at most 1, or null.",
            param="alert_thresholds",
        )
    limit = Limit(kind, subject, period, tokens, float(warn), rpm, tpm, float(rollover), float(cap))  # type: ignore[arg-type]
    limit = replace(limit, alert_thresholds=alerts)
    model = body.get("model")
    if model is not None:  # a cap on some models inside the budget, not the budget itself
        if kind == "group" or not isinstance(model, str) or not 0 < len(model) <= 256 or not model.isprintable():
            raise BadRequest("'model' is a glob on model names, for a user's or tenant's cap.", param="model")
        if "[" in model or "]" in model:
            raise BadRequest("'model' may use * and ?, not [...].", param="model")
        return replace(limit, model=model, alert_thresholds=None)
    return limit


def reason_from(body: Mapping[str, Any]) -> str | None:
    reason = body.get("reason")
    if reason is None or reason == "":
        return None
    if not isinstance(reason, str) or len(reason) > 1000 or "\x00" in reason:
        raise BadRequest("'reason' is text of at most 1,000 characters.", param="reason")
    return reason


async def put_budget(
    pool: asyncpg.Pool, settings: Settings, principal: Principal, request: Request
) -> dict[str, object]:
    """PUT /admin/budgets/{subject} with
    {"tokens": …, "period"?, "warn_ratio"?, "rpm"?, "tpm"?, "type"?: "user"|"tenant", "alert_thresholds"?: [0.5, …],
    "reason"?}."""
    require_admin(principal)
    subject = printable_id(request.path_params["subject"], "subject")
    body, _ = await read_json(request, 64 * 1024, settings.body_read_timeout)
    limit = budget_from(body, settings, subject)
    async with pool.acquire() as conn:
        await change_budget(conn, limit, principal.identity.user, "api", reason_from(body))
    model = {"model": limit.model} if limit.model else {}
    return {"type": limit.subject_type, "subject": subject, **model, **budget_settings(limit)}


async def post_grant(
    pool: asyncpg.Pool, settings: Settings, principal: Principal, request: Request
) -> dict[str, object]:
    """POST /admin/grants with {"subject", "tokens", "reason", "type"?: "user"|"tenant"}: tokens added to the
    subject's budget for its current period, recorded with the admin who granted them."""
    require_admin(principal)
    body, _ = await read_json(request, 64 * 1024, settings.body_read_timeout)
    kind = body.get("type", "user")
    if kind not in ("user", "tenant"):
        raise BadRequest("'type' is 'user' or 'tenant'.", param="type")
    subject = printable_id(body.get("subject"), "subject")
    tokens, reason = body.get("tokens"), body.get("reason")
    if not isinstance(tokens, int) or isinstance(tokens, bool) or not 1 <= tokens <= MAX_GRANT:
        raise BadRequest(f"'tokens' must be a whole number from 1 to {MAX_GRANT:,}.", param="tokens")
    if not isinstance(reason, str) or not reason.strip() or len(reason) > 1000 or "\x00" in reason:
        raise BadRequest("'reason' must say why, in at most 1,000 characters.", param="reason")
    async with pool.acquire() as conn:
        try:
            grant_id, start = await add_grant(conn, kind, subject, tokens, reason, principal.identity.user, time.time())
        except ValueError as exc:
            raise NotFound(f"{exc}.", param="subject") from None
    return {
        "id": grant_id,
        "type": kind,
        "subject": subject,
        "tokens": tokens,
        "reason": reason,
        "period_start": start.isoformat(),
    }


async def delete_grant(pool: asyncpg.Pool, principal: Principal, request: Request) -> dict[str, object]:
    """DELETE /admin/grants/{id}: the grant no longer adds to the budget."""
    require_admin(principal)
    raw = request.path_params["grant_id"]
    if not raw.isdigit() or len(raw) > 18:
        raise BadRequest("The grant id is a whole number.", param="id")
    async with pool.acquire() as conn:
        if not await revoke_grant(conn, int(raw), principal.identity.user):
            raise NotFound(f"No grant {raw} in force.", param="id")
    return {"id": int(raw), "revoked": True}
