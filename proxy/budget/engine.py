"""Token budgets in Redis: one atomic reserve before forwarding, one settle after.

Redis is a cache of PostgreSQL: a counter that is missing (restart without persistence,
eviction, FLUSHALL) is rebuilt from `usage_records` before it is checked, so nobody gets a
fresh budget by accident.
"""

from __future__ import annotations

import asyncio
import fnmatch
import math
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import asyncpg
import redis.asyncio as redis
import structlog
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisError, ResponseError

from .. import i18n
from ..auth import Identity
from ..db import PG_UNAVAILABLE
from ..errors import (
    Forbidden,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    budget_store_down,
    ledger_down_for_rebuild,
)
from ..redis_batch import BatchingRedis, CommandSender
from .quota import Quota, Rates, Reservation, Scope
from .rows import BudgetBook, Limit, period_bounds

_HERE = Path(__file__).resolve().parent
RESERVE_LUA = (_HERE / "reserve.lua").read_text()
SETTLE_LUA = (_HERE / "settle.lua").read_text()

log = structlog.get_logger("proxy.budget")


def _refused_for_good(exc: ResponseError) -> bool:
    """Redis refused the command itself (a plain ERR, such as a value out of range, or WRONGTYPE), not for
    now: every passing refusal has a code of its own (OOM, READONLY, NOREPLICAS, MISCONF, BUSY, ...), kept
    at the head of the message when redis-py has no class for it."""
    if type(exc) is not ResponseError:  # OutOfMemoryError, ReadOnlyError, ...: passing
        return False
    code = str(exc).split(" ", 1)[0]
    return code == "WRONGTYPE" or not code.isupper()


def like_pattern(glob: str) -> str:
    """A model glob (`gpt-4o*`, `claude-?`) as SQL LIKE, everything else taken literally."""
    out = []
    for ch in glob:
        if ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        elif ch in "%_\\":
            out.append("\\" + ch)
        else:
            out.append(ch)
    return "".join(out)


class BudgetEngine:
    def __init__(
        self,
        client: redis.Redis,
        book: BudgetBook,
        pool: asyncpg.Pool | None,
        *,
        reservation_ttl: float = 900,
        clock: Callable[[], float] = time.time,
        holdback: int = 0,
        sender: CommandSender | None = None,
        locale: str = "en",
    ) -> None:
        self._redis = client
        self._locale = locale  # the language of the refusals (LOCALE)
        self._sender: CommandSender = sender or BatchingRedis(client)
        self._book = book
        self._pool = pool
        self._ttl_ms = int(reservation_ttl * 1000)
        self._clock = clock
        self._holdback = holdback  # room kept back from a request that wants more than there is (reserve.lua)
        self._reserve = client.register_script(RESERVE_LUA)
        self._settle = client.register_script(SETTLE_LUA)
        for body in (RESERVE_LUA, SETTLE_LUA):
            self._sender.on_connect("SCRIPT", "LOAD", body)
        # Scopes per identity until the earliest of their periods ends or the budgets change.
        self._scopes: dict[tuple[Identity, str | None], tuple[tuple[Scope, ...], float, int]] = {}
        # Settles that could not reach Redis, applied once it answers again.
        self._owed: list[tuple[Reservation, int]] = []
        # When an owed request's record went straight into PostgreSQL (ms, by PostgreSQL's clock, as a
        # rebuild's `built` is: one clock for every proxy): a counter rebuilt after that counts it (settle.lua).
        self._ledgered: dict[str, int] = {}
        # Each user's tenant ("" for none), as bound in Redis; a binding never changes once made.
        self._tenants: dict[str, str] = {}

    async def check_tenant(self, identity: Identity, *, bind: bool = True) -> None:
        """One person, one budget: a user id belongs to one tenant (or to none), the first it was charged
        under. Their counter lives under that tenant's hash tag, so a request naming them under another
        tenant is refused rather than given a second counter. A read (`bind=False`) binds nobody, and
        while Redis is unreachable it asks PostgreSQL alone."""
        tenant = identity.tenant or ""
        bound = self._tenants.get(identity.user)
        if bound is None:
            bound = await self._bind_tenant(identity.user, tenant if bind else None)
        if bound is not None and bound != tenant:
            # The message does not name the user's tenant: a delegate of another tenant must not learn it.
            raise Forbidden(
                f"User {identity.user!r} is charged under another tenant than this token's; "
                "a user belongs to one tenant.",
                code="wrong_tenant",
            )

    async def _bind_tenant(self, user: str, tenant: str | None) -> str | None:
        """The user's tenant from Redis; when Redis has none, from the user's latest ledger record
        (PostgreSQL is the truth), else `tenant` (None: bind nothing). The first binding written wins."""
        key = f"quota:{{u:{quote(user, safe='')}}}:tenant"
        try:
            raw = await self._redis.get(key)
        except RedisError as exc:
            if tenant is None:  # a read: the ledger alone can say
                return await self._tenant_of_record(user)
            raise budget_store_down(exc) from exc
        if raw is None:
            bound = await self._tenant_of_record(user)
            if bound is None and tenant is None:
                return None
            try:
                await self._redis.set(key, bound if bound is not None else tenant or "", nx=True)
                raw = await self._redis.get(key)
            except RedisError as exc:
                raise budget_store_down(exc) from exc
            if raw is None:  # flushed between the two calls: decide again next time
                return bound if bound is not None else tenant
        value = raw.decode() if isinstance(raw, bytes) else str(raw)
        if len(self._tenants) >= 100_000:
            self._tenants.clear()
        self._tenants[user] = value
        return value

    async def _tenant_of_record(self, user: str) -> str | None:
        if self._pool is None:
            return None
        try:
            row = await self._pool.fetchrow(
                "select coalesce(tenant_id, '') as tenant from usage_records where user_id = $1"
                " order by created_at desc limit 1",
                user,
            )
        except PG_UNAVAILABLE as exc:
            raise ledger_down_for_rebuild() from exc
        return None if row is None else str(row["tenant"])

    @staticmethod
    def _tag(identity: Identity) -> str:
        # Every key of one request carries the same hash tag, so one Lua call may touch them all
        # on Redis Cluster too: the tenant's when there is one, else the user's.
        return f"t:{quote(identity.tenant, safe='')}" if identity.tenant else f"u:{quote(identity.user, safe='')}"

    def scopes(self, identity: Identity, now: float, model: str | None = None) -> tuple[Scope, ...]:
        """The budgets a request of `identity` to `model` is checked against: the user's, the tenant's,
        and the model caps of each that match `model` (None: the budgets alone)."""
        cached = self._scopes.get((identity, model))
        if cached is not None and now < cached[1] and cached[2] == self._book.version:
            return cached[0]
        scopes = self._make_scopes(identity, now, model)
        ends = [s.end.timestamp() for s in scopes if s.end is not None]
        if len(self._scopes) >= 100_000:
            self._scopes.clear()
        self._scopes[(identity, model)] = (scopes, min(ends, default=float("inf")), self._book.version)
        return scopes

    def tier(self, identity: Identity) -> str | None:
        """The group whose tier sets the user's limit; None when their own row or the default does."""
        return self._book.user(identity.user, identity.groups).group

    def _make_scopes(
        self, identity: Identity, now: float, model: str | None, *, every_cap: bool = False
    ) -> tuple[Scope, ...]:
        tag = self._tag(identity)
        book = self._book
        scopes = [self._scope(tag, book.user(identity.user, identity.groups), identity.user, now)]
        tenant_limit = book.tenant(identity.tenant)
        if tenant_limit is not None and identity.tenant is not None:
            scopes.append(self._scope(tag, tenant_limit, identity.tenant, now))
        if model is not None or every_cap:
            subjects = [("user", identity.user)] + ([("tenant", identity.tenant)] if identity.tenant else [])
            for kind, subject in subjects:
                for cap in book.caps(kind, subject):
                    if every_cap or (model is not None and fnmatch.fnmatchcase(model, cap.model)):
                        scopes.append(self._scope(tag, replace(cap, subject_type=kind), subject, now))
        return tuple(scopes)

    def _scope(self, tag: str, limit: Limit, subject: str, now: float) -> Scope:
        start, end = period_bounds(limit.period, now)
        kind = limit.subject_type if not limit.model else f"{limit.subject_type}:model:{quote(limit.model, safe='')}"
        key = f"quota:{{{tag}}}:{kind}:{quote(subject, safe='')}:{limit.period}:{start:%Y%m%d}"
        added = 0 if limit.model else self._book.added(limit.subject_type, subject, start)
        if added:  # the effective limit: the row's, plus what was granted for and carried into this period
            limit = replace(limit, tokens=limit.tokens + added)
        return Scope(limit, subject, key, start, end)

    async def reserve(
        self,
        identity: Identity,
        request_id: str,
        prompt: int,
        wanted: int,
        *,
        need: int | None = None,
        model: str | None = None,
    ) -> Reservation:
        """Reserve up to `wanted` tokens; refuse unless every budget has room for more than `need`
        (the prompt, by default; a request of n answers needs one token more for each further answer)."""
        now = self._clock()
        now_ms = int(now * 1000)
        scopes = self.scopes(identity, now, model)
        user = scopes[0].limit
        keys = [s.key for s in scopes]
        if user.rpm or user.tpm:
            keys.append(f"quota:{{{self._tag(identity)}}}:rate:{quote(identity.user, safe='')}")
        floor = max(prompt, need or 0)
        args: list[Any] = [request_id, now_ms, now_ms + self._ttl_ms, floor, max(wanted, floor + 1), len(scopes)]
        args += [s.limit.tokens for s in scopes]
        args += [self._key_expiry(s) for s in scopes]
        args += [user.rpm, user.tpm, self._holdback]
        for _ in range(len(scopes) + 2):  # each missing counter is rebuilt in a turn of its own
            try:
                result = await self._eval(self._reserve, keys, args)
            except (RedisError, asyncio.CancelledError) as exc:
                # The script may have run with its reply lost: release whatever it reserved once Redis answers.
                self.owe(Reservation(request_id, scopes, tuple(keys), 0, [], None), 0)
                if isinstance(exc, asyncio.CancelledError):
                    raise
                raise budget_store_down(exc) from exc
            if result[0] == 1:
                quotas = [
                    Quota(s.limit, int(result[4 + 2 * i]), int(result[5 + 2 * i]), s.end) for i, s in enumerate(scopes)
                ]
                reset = 60 - int(now) % 60
                rates = (
                    Rates(user.rpm, user.tpm, int(result[2]), int(result[3]), reset)
                    if len(keys) > len(scopes)
                    else None
                )
                return Reservation(request_id, scopes, tuple(keys), int(result[1]), quotas, rates)
            if result[0] == 2:
                raise self._rate_limited(user, int(result[1]), int(result[2]), self._locale)
            if result[0] == 0:
                scope = scopes[int(result[1]) - 1]
                quota = Quota(scope.limit, int(result[2]), int(result[3]), scope.end)
                user_quota = quota if scope is scopes[0] else await self._quota(scopes[0])
                raise QuotaExceeded(
                    quota.refusal(scope.subject, self._locale),
                    headers={"x-should-retry": "false", **user_quota.headers()},
                )
            await self.rebuild(scopes[int(result[1]) - 1])
        raise ServiceUnavailable("Budget counters keep disappearing from Redis; try again shortly.")

    def unmetered(self, identity: Identity, request_id: str, wanted: int, *, exempt: bool = False) -> Reservation:
        """A pass for one request with nothing reserved: while Redis is unreachable (FAIL_MODE=open), settled
        into the counters once Redis answers; or for an exempt model, never settled (no keys)."""
        scopes = self.scopes(identity, self._clock())
        quotas = [Quota(s.limit, 0, 0, s.end) for s in scopes]
        keys = () if exempt else tuple(s.key for s in scopes)
        return Reservation(request_id, scopes, keys, wanted, quotas, None, metered=False, exempt=exempt)

    def owe(self, reservation: Reservation, tokens: int) -> None:
        """Remember a settle that did not happen (Redis unreachable, or restarted without the script)."""
        self._owed.append((reservation, tokens))

    def ledgered(self, request_id: str, at_ms: int) -> None:
        """The record of a request whose settle may be owed went into PostgreSQL at `at_ms` (its clock)."""
        if self._owed:  # nothing owed, nothing to skip: a stream that alone is unreachable adds no stamps
            self._ledgered[request_id] = at_ms

    async def reconcile(self) -> None:
        """Apply the owed settles, each under its own request id so its reservation is released too.
        A counter Redis lost is skipped by the script, and so is one rebuilt from PostgreSQL after the
        request's record went in there: the rebuild counted it."""
        while self._owed:
            reservation, tokens = self._owed[0]
            try:
                # loads the script if Redis lost it
                await self.settle(reservation, tokens, self._ledgered.get(reservation.request_id, 0))
            except ResponseError as exc:
                if not _refused_for_good(exc):
                    raise  # Redis will take it later: tried again next time
                # Refused for what it is: it never will be taken, and must not hold up the settles owed after
                # it. Its reservation lapses by its expiry; its record is in the ledger.
                log.error("owed_settle_refused", request_id=reservation.request_id, tokens=tokens, error=str(exc))
            self._owed.pop(0)
        # Not before: a request can be owed twice under one id (its reservation's release, then its usage).
        self._ledgered.clear()

    async def reconcile_forever(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self._owed:
                try:
                    await self.reconcile()
                except RedisError:
                    pass  # still down: try again next time

    @staticmethod
    def _rate_limited(limit: Limit, kind: int, retry_after_ms: int, locale: str) -> RateLimited:
        key, per_minute = ("rate.requests", limit.rpm) if kind == 1 else ("rate.tokens", limit.tpm)
        seconds = max(math.ceil(retry_after_ms / 1000), 1)
        return RateLimited(
            i18n.text(locale, key, limit=i18n.number(per_minute, locale), seconds=seconds),
            headers={"Retry-After": str(seconds)},
        )

    async def _eval(self, script: AsyncScript, keys: list[str], args: list[Any]) -> Any:
        try:
            return await self._sender.call("EVALSHA", script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted Redis: redis-py's Script loads it and runs it
            return await script(keys=keys, args=args)

    def _settle_args(self, reservation: Reservation, tokens: int) -> list[object]:
        return [reservation.request_id, max(tokens, 0), len(reservation.scopes), int(self._clock() * 1000)]

    async def settle(self, reservation: Reservation, tokens: int, ledgered_ms: int = 0) -> list[int]:
        """`ledgered_ms`: when the request's record went into PostgreSQL, if it did (0: not known to be)."""
        args = self._settle_args(reservation, tokens) + ([ledgered_ms] if ledgered_ms else [])
        result = await self._eval(self._settle, list(reservation.keys), args)
        return [int(v) for v in result]

    def settle_command(self, reservation: Reservation, tokens: int) -> tuple[Any, ...]:
        """The settle as a raw command, for sending with other work after the response. If it fails
        with NoScriptError (Redis restarted), `settle` loads the script and runs it."""
        keys = reservation.keys
        return ("EVALSHA", self._settle.sha, len(keys), *keys, *self._settle_args(reservation, tokens))

    async def snapshot(self, identity: Identity, *, caps: bool = False) -> list[Quota]:
        """Current state of every budget that applies, without reserving anything; with `caps`, the model
        caps inside them too (for the caller's own view, /v1/quota and /v1/usage)."""
        now = self._clock()
        scopes = self._make_scopes(identity, now, None, every_cap=True) if caps else self.scopes(identity, now)
        return [await self._quota(s) for s in scopes]

    async def _quota(self, scope: Scope) -> Quota:
        try:
            used, reserved = await self._redis.hmget(scope.key, "used", "reserved")
            if used is None:
                await self.rebuild(scope)
                used, reserved = await self._redis.hmget(scope.key, "used", "reserved")
        except RedisError as exc:
            raise budget_store_down(exc) from exc
        return Quota(scope.limit, int(used or 0), int(reserved or 0), scope.end)

    async def rebuild(self, scope: Scope) -> int:
        """Seed a missing counter from the ledger in PostgreSQL (first writer wins)."""
        if self._pool is None:
            raise ServiceUnavailable("Budget counters are missing and PostgreSQL is not configured.")
        column = "user_id" if scope.limit.subject_type == "user" else "tenant_id"
        query = f"select coalesce(sum(total_tokens), 0) from usage_records where {column} = $1 and not exempt"
        args: list[Any] = [scope.subject, scope.start]
        query += " and created_at >= $2"
        if scope.end:
            args.append(scope.end)
            query += f" and created_at < ${len(args)}"
        if scope.limit.model:  # a model cap counts the requests to the models it names
            args.append(like_pattern(scope.limit.model))
            query += f" and model like ${len(args)} escape '\\'"
        # `built`: when the statement began, by PostgreSQL's clock; what was committed before it is counted.
        query = f"select ({query}), (extract(epoch from statement_timestamp()) * 1000)::bigint"
        try:
            used, built = await self._pool.fetchrow(query, *args)
        except PG_UNAVAILABLE as exc:
            raise ledger_down_for_rebuild() from exc
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hsetnx(scope.key, "used", int(used))
            pipe.hsetnx(scope.key, "built", built)
            pipe.expireat(scope.key, self._key_expiry(scope))
            await pipe.execute()
        return int(used)

    def _key_expiry(self, scope: Scope) -> int:
        # A day past the period's end keeps late settles of long streams from recreating nothing.
        end = scope.end.timestamp() if scope.end else self._clock() + 400 * 86400
        return int(end) + 86400
