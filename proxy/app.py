"""The Starlette application: routes, the one place errors become responses, and start-up wiring."""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
import redis.asyncio as redis
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from . import admin, metrics, probes
from .admin_pages import AdminPages
from .auth import Authenticator, Identity, Principal, charged_identity
from .budget import BudgetEngine
from .budget.rows import BudgetBook, sync_defaults
from .config import Settings
from .db import PG_UNAVAILABLE, create_pool
from .errors import ProxyError, error_for_status, error_response
from .forward import Upstream
from .host_metrics import HostMetrics
from .ledger import FLUSH_SECONDS, Ledger
from .lifecycle import Gate, Lifecycle
from .links import StatementLinks
from .logs import configure_logging
from .pages import Pages
from .redis_batch import CommandSender, command_sender, connect
from .relay import Relay
from .sessions import AdminSessions
from .statement_pages import StatementPages
from .tokens import Tokenizer
from .usage_history import usage_history
from .writer import WriterProcess, start_notifier

log = structlog.get_logger("proxy.app")


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


@dataclass(slots=True)
class Services:
    """Everything the routes need, built whole at start-up (`start`) and taken down by `stop`."""

    settings: Settings
    redis: redis.Redis
    pool: asyncpg.Pool
    sender: CommandSender
    book: BudgetBook
    auth: Authenticator
    budget: BudgetEngine
    ledger: Ledger
    upstream: Upstream
    relay: Relay
    writer: WriterProcess | None
    tasks: list[asyncio.Task[None]]

    @classmethod
    async def start(cls, s: Settings, auth: Authenticator, links: StatementLinks | None = None) -> Services:
        client = connect(s.redis_url, s.redis_timeout)
        # min_size=0: the proxy starts and serves while PostgreSQL is down; the pool connects on first use.
        pool = await create_pool(s.database_url, min_size=0, max_size=10)
        book = BudgetBook(s)
        try:
            async with pool.acquire(timeout=5) as conn:
                await sync_defaults(conn, s)
            await book.load(pool)
        except PG_UNAVAILABLE as exc:
            log.warning("postgres_unavailable_at_start", error=str(exc), using="environment defaults")
        sender = command_sender(s.redis_url, client, s.redis_timeout)
        budget = BudgetEngine(
            client,
            book,
            pool,
            reservation_ttl=s.reservation_ttl_seconds,
            sender=sender,
            holdback=s.holdback_tokens,
            locale=s.locale,
        )
        ledger = Ledger.for_settings(client, pool, s)
        upstream = Upstream(
            s.litellm_base_url,
            s.litellm_master_key,
            connect_timeout=s.upstream_connect_timeout,
            read_timeout=s.upstream_read_timeout,
            max_connections=s.upstream_max_connections,
        )
        tokenizer = await asyncio.to_thread(Tokenizer.load, s.tokenizer_file)  # reading the file takes a while
        relay = Relay(s, budget, ledger, upstream, sender, tokenizer, links)
        tasks = [
            asyncio.create_task(book.refresh_forever(pool), name="budget-refresh"),
            asyncio.create_task(budget.reconcile_forever(), name="budget-reconcile"),
        ]
        writer = WriterProcess(s) if s.ledger_writer == "process" else None
        if writer is not None:
            tasks.append(asyncio.create_task(writer.run(), name="ledger-writer-process"))
        elif s.ledger_writer == "inline":
            tasks.append(asyncio.create_task(ledger.run(), name="ledger-writer"))
            notifier = start_notifier(ledger, pool, s)
            if notifier is not None:
                tasks.append(notifier)
        return cls(s, client, pool, sender, book, auth, budget, ledger, upstream, relay, writer, tasks)

    async def stop(self) -> None:
        await self.relay.drain()  # every settle and record is in Redis before the writer is told to stop
        for task in self.tasks:
            task.cancel()  # a writer process drains the stream into PostgreSQL before it exits
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.settings.ledger_writer == "inline":
            await self.ledger.flush(FLUSH_SECONDS)
        await self.upstream.close()
        await self.pool.close()
        await self.sender.close()
        await self.redis.aclose()

    async def caller(self, request: Request) -> Principal:
        """Who holds the request's token: the one authentication step every route shares."""
        return await self.auth.authenticate(request.headers.get("authorization"))

    async def identify(self, request: Request) -> Identity:
        """The user a read is about: the token's, or the one a delegate names within its tenant."""
        identity = charged_identity(await self.caller(request), request.headers, required=False)
        await self.budget.check_tenant(identity, bind=False)
        return identity


Endpoint = Callable[[Request], Awaitable[Response]]
Handler = Callable[[Request, Exception], Awaitable[Response]]


class ProxyApp(Starlette):
    """Starlette, with the completion routes taken before its router and middleware stack.

    Those layers (the error middleware, the drain gate, the exception middleware, the router, the route's
    wrapper) each add a frame to every resumption of the request and a wrapper around `send`: ~13 µs of the
    proxy's ~220 µs per request at concurrency 16 (#19). The completion routes take the same exception
    handlers here; every other route, and every request once the process drains, goes through Starlette."""

    def __init__(self, *, fast: dict[str, Endpoint], lifecycle: Lifecycle, **options: Any) -> None:
        super().__init__(**options)
        self._fast = fast
        self._lifecycle = lifecycle
        self._handlers: dict[type[BaseException], Handler] = options["exception_handlers"]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        endpoint = self._fast.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        lifecycle = self._lifecycle
        if endpoint is None or lifecycle.since is not None:
            await super().__call__(scope, receive, send)
            return
        scope["app"] = self
        lifecycle.active += 1  # as the gate counts them: a stop waits for these too
        try:
            request = Request(scope, receive)
            try:
                response = await endpoint(request)
            except Exception as exc:
                response = await self._handler(exc)(request, exc)
            await response(scope, receive, send)
        finally:
            lifecycle.active -= 1

    def _handler(self, exc: Exception) -> Handler:
        return next(self._handlers[cls] for cls in type(exc).__mro__ if cls in self._handlers)


def create_app(settings: Settings | None = None, host_metrics: HostMetrics | None = None) -> Starlette:
    """The application; with `host_metrics` (a worker of several) its /metrics is the whole host's."""
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    auth = Authenticator(settings)  # a key misconfigured fails here, before the server starts
    lifecycle = Lifecycle(settings)
    pages = Pages(settings)
    links = StatementLinks(settings)  # one signer per process: a random PAGES_SECRET lives as long as it

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        app.state.services = await Services.start(settings, auth, links)
        # What start-up built (modules, the tokenizer's tables, settings) lives as long as the process:
        # frozen, every full collection stops rescanning it, which was the proxy's longest pause.
        gc.collect()
        gc.freeze()
        gc.set_threshold(*settings.gc_threshold_values())
        metrics.watch_gc()
        if host_metrics is not None:
            host_metrics.start()
        try:
            yield
        finally:
            await app.state.services.stop()
            if host_metrics is not None:
                await host_metrics.stop()  # after the drain: every request counted

    def services(request: Request) -> Services:
        return request.app.state.services  # type: ignore[no-any-return]

    def completions(endpoint: str) -> Endpoint:
        async def handler(request: Request) -> Response:
            s = services(request)
            return await s.relay.completion(request, await s.caller(request), endpoint)

        return handler

    async def models(request: Request) -> Response:
        s = services(request)
        return await s.relay.models(request, await s.identify(request))

    async def quota(request: Request) -> Response:
        s = services(request)
        identity = await s.identify(request)
        quotas = await s.budget.snapshot(identity, caps=True)
        body = {"user": identity.user, "tenant": identity.tenant, "budgets": [q.as_json() for q in quotas]}
        return json_response(body, headers=quotas[0].headers())

    async def usage(request: Request) -> Response:
        s = services(request)
        identity = await s.identify(request)
        body = await usage_history(s.pool, identity.user, request.query_params, datetime.now(UTC))
        try:
            body["budgets"] = [q.as_json() for q in await s.budget.snapshot(identity, caps=True)]
        except ProxyError:
            body["budgets"] = None  # Redis is down: the history still answers
        return json_response(body)

    async def admin_usage(request: Request) -> Response:
        s = services(request)
        return json_response(await admin.usage(s.pool, await s.caller(request), request))

    async def admin_budget(request: Request) -> Response:
        s = services(request)
        body = await admin.put_budget(s.pool, settings, await s.caller(request), request)
        await s.book.load(s.pool)  # in force at once here; other processes reload within BUDGET_REFRESH_SECONDS
        return json_response(body)

    async def admin_grant(request: Request) -> Response:
        s = services(request)
        return json_response(await admin.post_grant(s.pool, settings, await s.caller(request), request), 201)

    async def admin_revoke(request: Request) -> Response:
        s = services(request)
        return json_response(await admin.delete_grant(s.pool, await s.caller(request), request))

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        if lifecycle.draining:  # stopping (SIGTERM): balancers take this instance out at once
            return json_response({"status": "draining"}, 503)
        s = services(request)
        checks = await probes.check_all(s.ledger, s.pool, s.upstream)
        ready = all(v == "ok" for k, v in checks.items() if k != "ledger_backlog")
        return json_response({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)

    async def prometheus(request: Request) -> Response:
        s = services(request)
        await probes.check_all(s.ledger, s.pool, s.upstream)  # the dependency and ledger gauges, fresh
        body = await host_metrics.exposition() if host_metrics else generate_latest(metrics.REGISTRY)
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    # LibreChat and the SDKs put /v1 in the base URL; some clients do not.
    fast = {
        prefix + path: completions(endpoint)
        for endpoint, path in (
            ("chat", "/chat/completions"),
            ("completions", "/completions"),
            ("embeddings", "/embeddings"),
        )
        for prefix in ("/v1", "")
    }
    # Also routed by Starlette: the way in while draining, and a wrong method's 405.
    routes: list[BaseRoute] = [Route(path, endpoint, methods=["POST"]) for path, endpoint in fast.items()]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/quota", quota, methods=["GET"]),
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/admin/usage", admin_usage, methods=["GET"]),
        Route("/admin/budgets/{subject}", admin_budget, methods=["PUT"]),
        Route("/admin/grants", admin_grant, methods=["POST"]),
        Route("/admin/grants/{grant_id}", admin_revoke, methods=["DELETE"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]
    routes += pages.routes()
    routes += StatementPages(pages, links, services).routes()
    routes += AdminPages(pages, AdminSessions(settings, auth), settings, services).routes()

    async def proxy_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ProxyError)
        return error_response(exc)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        message = "Unknown route." if exc.status_code == 404 else str(exc.detail)
        return error_response(error_for_status(exc.status_code, f"{message} ({request.method} {request.url.path})"))

    async def crash(request: Request, exc: Exception) -> Response:
        log.exception("unhandled_error", path=request.url.path)
        return error_response(ProxyError("Internal error in the quota proxy; it has been logged."))

    app = ProxyApp(
        fast=fast,
        lifecycle=lifecycle,
        routes=routes,
        lifespan=lifespan,
        middleware=[Middleware(Gate, lifecycle=lifecycle)],
        exception_handlers={ProxyError: proxy_error, HTTPException: http_error, Exception: crash},
    )
    app.state.lifecycle = lifecycle  # `serve` hands it to the server, which drives it on SIGTERM
    return app
