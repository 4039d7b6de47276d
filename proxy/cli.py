"""`python -m proxy serve | migrate | ledger | token issue | budget set | grant | revoke | show`."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from dataclasses import replace

import asyncpg
import orjson

from .alerts import parse_thresholds
from .auth import issue_token, parse_ttl
from .budget.rows import (
    Limit,
    add_grant,
    change_budget,
    fetch_limit,
    period_bounds,
    revoke_grant,
    sync_defaults,
)
from .config import PERIODS, Settings
from .db import migrate


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m proxy", description="Token-budget sidecar proxy for LLM traffic.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy on PROXY_HOST:PROXY_PORT")
    serve.add_argument("--workers", type=int, help="server processes on the one port (default: PROXY_WORKERS)")
    sub.add_parser("migrate", help="apply sql/ to DATABASE_URL (idempotent)")
    sub.add_parser("ledger", help="move usage records from the Redis stream to PostgreSQL (for LEDGER_WRITER=off)")

    token = sub.add_parser("token", help="mint JWTs").add_subparsers(dest="action", required=True)
    issue = token.add_parser("issue", help="print a signed JWT for a user")
    issue.add_argument("--sub", required=True, help="user id")
    issue.add_argument("--tenant", help="tenant (team) id")
    issue.add_argument("--ttl", default="30d", help="lifetime: 90s, 15m, 12h, 30d (default 30d)")
    issue.add_argument("--admin", action="store_true", help="may call /admin/*")
    issue.add_argument("--delegate", action="store_true", help="a service token that names the end user (X-User-Id)")

    budget = sub.add_parser("budget", help="set or show budgets").add_subparsers(dest="action", required=True)
    bset = budget.add_parser("set", help="set a user's (or, with --tenant, a tenant's) token limit")
    bset.add_argument("subject", help="user id, tenant id with --tenant, or '*' for the default")
    bset.add_argument("tokens", type=int)
    bset.add_argument("--tenant", action="store_true", help="the subject is a tenant")
    bset.add_argument("--group", action="store_true", help="the subject is a group: a tier for its members")
    bset.add_argument("--model", help="a cap on the models matching this glob (gpt-4o*), inside the budget")
    bset.add_argument("--period", choices=PERIODS, help="default: BUDGET_PERIOD")
    bset.add_argument("--warn", type=float, help="warn ratio (default: WARN_RATIO)")
    bset.add_argument("--rpm", type=int, default=0, help="requests per minute (users only; 0 = no limit)")
    bset.add_argument("--tpm", type=int, default=0, help="tokens per minute (users only; 0 = no limit)")
    bset.add_argument(
        "--rollover", type=float, default=0.0, help="fraction of last period's unused budget carried over"
    )
    bset.add_argument("--rollover-cap", type=float, default=0.5, help="carried at most this fraction of the limit")
    bset.add_argument(
        "--alert-thresholds",
        help="fractions of the budget that send an alert, comma-separated (0.5,0.9); '' for none;"
        " default: ALERT_THRESHOLDS",
    )
    bset.add_argument("--by", default="cli", help="who changes it, for the history (budget_changes; default: cli)")
    bset.add_argument("--reason", help="why, for the history")
    bgrant = budget.add_parser("grant", help="add tokens to a budget for its current period only")
    bgrant.add_argument("subject", help="user id, or tenant id with --tenant")
    bgrant.add_argument("tokens", type=int)
    bgrant.add_argument("--reason", required=True, help="why, for the record (grants_this_period view)")
    bgrant.add_argument("--tenant", action="store_true", help="the subject is a tenant")
    bgrant.add_argument("--by", default="cli", help="who grants it (default: cli)")
    brevoke = budget.add_parser("revoke", help="take a grant back")
    brevoke.add_argument("grant_id", type=int)
    brevoke.add_argument("--by", default="cli", help="who revokes it (default: cli)")
    adm = sub.add_parser("admin", help="the admin dashboard").add_subparsers(dest="action", required=True)
    alink = adm.add_parser("link", help="print a one-time link that signs an admin in to /admin")
    alink.add_argument("--name", default="admin", help="who signs in with it, for the history (default: admin)")
    alink.add_argument("--ttl", default="15m", help="how long it works if unused: 90s, 15m, 12h (default 15m)")
    bshow = budget.add_parser("show", help="show a budget and what was used this period")
    bshow.add_argument("subject")
    bshow.add_argument("--tenant", action="store_true")
    bshow.add_argument("--group", action="store_true", help="the subject is a group")
    bshow.add_argument("--groups", default="", help="the user's groups, comma-separated: which tier applies")
    return p


async def _migrate(settings: Settings) -> None:
    conn = await asyncpg.connect(settings.database_url)
    try:
        applied = await migrate(conn)
        await sync_defaults(conn, settings)
    finally:
        await conn.close()
    print(f"migrated: {', '.join(applied) if applied else 'nothing new to apply'}")


async def _budget(settings: Settings, args: argparse.Namespace) -> None:
    kind = "tenant" if getattr(args, "tenant", False) else "group" if getattr(args, "group", False) else "user"
    conn = await asyncpg.connect(settings.database_url)
    try:
        if args.action == "grant":
            grant_id, start = await add_grant(conn, kind, args.subject, args.tokens, args.reason, args.by, time.time())
            print(
                f"grant {grant_id}: {args.tokens:,} tokens to {kind} {args.subject}"
                f" for the period from {start:%Y-%m-%d}"
            )
            return
        if args.action == "revoke":
            if not await revoke_grant(conn, args.grant_id, args.by):
                raise ValueError(f"no grant {args.grant_id} in force")
            print(f"grant {args.grant_id} revoked")
            return
        if args.action == "set":
            limit = Limit(
                kind,
                args.subject,
                args.period or settings.budget_period,
                args.tokens,
                args.warn if args.warn is not None else settings.warn_ratio,
                args.rpm,
                args.tpm,
                args.rollover,
                args.rollover_cap,
                alert_thresholds=None if args.alert_thresholds is None else parse_thresholds(args.alert_thresholds),
            )
            if args.model:
                await change_budget(conn, replace(limit, model=args.model), args.by, "cli", args.reason)
                print(f"{kind} {args.subject}: at most {args.tokens:,} tokens per {limit.period} on {args.model}")
                return
            await change_budget(conn, limit, args.by, "cli", args.reason)
            rates = "".join(f", {v:,} {k} per minute" for k, v in (("requests", limit.rpm), ("tokens", limit.tpm)) if v)
            print(
                f"{kind} {args.subject}: {args.tokens:,} tokens per {limit.period}"
                f" (warn at {limit.warn_ratio:.0%}){rates}{_alerts_text(limit.alert_thresholds)}"
            )
            return
        groups = tuple(sorted({g.strip() for g in args.groups.split(",")} - {""}))
        found = await fetch_limit(conn, kind, args.subject, groups)
        if found is None:
            print(f"{kind} {args.subject}: no budget")
            return
        start, end = period_bounds(found.period, time.time())
        if kind == "group":  # a tier: each member has their own counter against it, so nothing is used here
            print(f"group {args.subject}: {found.tokens:,} tokens per {found.period} for each member")
            return
        column = "user_id" if kind == "user" else "tenant_id"
        used = await conn.fetchval(
            f"select coalesce(sum(total_tokens), 0) from usage_records where {column} = $1 and not exempt"
            " and created_at >= $2",
            args.subject,
            start,
        )
        granted = await conn.fetchval(
            "select coalesce(sum(tokens), 0)::bigint from budget_grants where subject_type = $1 and subject = $2"
            " and period_start = $3 and revoked_at is null",
            kind,
            args.subject,
            start,
        )
    finally:
        await conn.close()
    print(
        orjson.dumps(
            {
                "subject_type": kind,
                "subject": args.subject,
                "budget_row": found.subject,  # the subject's own row, a group's ('--groups'), or '*'
                "period": found.period,
                "limit": found.tokens,
                "rpm": found.rpm,
                "tpm": found.tpm,
                "granted": granted,
                "effective_limit": found.tokens + granted,
                "used": used,
                "remaining": max(found.tokens + granted - used, 0),
                "warn_ratio": found.warn_ratio,
                "alert_thresholds": found.alert_thresholds,  # null: ALERT_THRESHOLDS
                "period_start": start.isoformat(),
                "resets_at": end.isoformat() if end else None,
            },
            option=orjson.OPT_INDENT_2,
        ).decode()
    )


def _alerts_text(thresholds: tuple[float, ...] | None) -> str:
    if thresholds is None:
        return ""
    return f", alerts at {', '.join(f'{t:.0%}' for t in thresholds)}" if thresholds else ", no alerts"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "serve" and args.workers is not None:
            settings = replace(settings, proxy_workers=args.workers)
            settings.validate()
    except ValueError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return _run(settings, args)
    except (ValueError, OSError, asyncpg.PostgresError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def _run(settings: Settings, args: argparse.Namespace) -> int:
    if args.command == "serve":
        from .workers import serve

        return serve(settings, settings.proxy_workers)
    elif args.command == "ledger":
        from . import writer

        try:
            writer.run(settings)
        except KeyboardInterrupt:
            pass  # a batch cut short stays pending in the stream and is written by the next writer
    elif args.command == "migrate":
        asyncio.run(_migrate(settings))
    elif args.command == "token":
        print(
            issue_token(settings, args.sub, args.tenant, parse_ttl(args.ttl), admin=args.admin, delegate=args.delegate)
        )
    elif args.command == "budget":
        asyncio.run(_budget(settings, args))
    elif args.command == "admin":
        print(_admin_link(settings, args.name, parse_ttl(args.ttl)))
    return 0


def _admin_link(settings: Settings, name: str, ttl: int) -> str:
    """A one-time sign-in link for the dashboard, signed with the secret the proxy's processes share."""
    from .auth import Authenticator
    from .sessions import AdminSessions

    if not settings.pages_secret and not settings.jwt_secret:
        raise ValueError("set PAGES_SECRET (or JWT_SECRET) so the proxy can check a link made by this command")
    if not name.strip() or len(name) > 256 or not name.isprintable():
        raise ValueError("--name is printable text of 1 to 256 characters")
    token = AdminSessions(settings, Authenticator(settings)).link_token(name, ttl)
    base = settings.public_url.rstrip("/") or f"http://{settings.proxy_host}:{settings.proxy_port}"
    return f"{base}/admin/link?t={token}"
