"""The Starlette application: routes, the one place errors become responses, and start-up wiring."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import orjson
import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import admin, metrics
from .auth import Authenticator
from .budget import BudgetEngine
from .config import Settings
from .db import PG_UNAVAILABLE, create_pool
from .errors import ProxyError, error_for_status, error_response
from .forward import Upstream
from .ledger import Ledger
from .limits import BudgetBook, sync_defaults
from .logs import configure_logging
from .redis_batch import CommandSender, command_sender, connect
from .relay import Relay
from .tokens import Tokenizer
from .usage_history import usage_history
from .writer import WriterProcess

log = structlog.get_logger("proxy.app")


def json_response(data: object, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(data), status_code=status, headers=headers, media_type="application/json")


class Services:
    """Everything the routes need, built once at start-up."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.redis = connect(settings.redis_url, settings.redis_timeout)
        self.pool: asyncpg.Pool | None = None
        self.book = BudgetBook(settings)
        self.upstream = Upstream(
            settings.litellm_base_url,
            settings.litellm_master_key,
            connect_timeout=settings.upstream_connect_timeout,
            read_timeout=settings.upstream_read_timeout,
            max_connections=settings.upstream_max_connections,
        )
        self.auth = Authenticator(settings)
        self.ledger: Ledger | None = None
        self.budget: BudgetEngine | None = None
        self.relay: Relay | None = None
        self.sender: CommandSender | None = None
        self.writer: WriterProcess | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def start(self) -> None:
        s = self.settings
        # min_size=0: the proxy starts and serves while PostgreSQL is down; the pool connects on first use.
        self.pool = await create_pool(s.database_url, min_size=0, max_size=10)
        try:
            async with self.pool.acquire(timeout=5) as conn:
                await sync_defaults(conn, s)
            await self.book.load(self.pool)
        except PG_UNAVAILABLE as exc:
            log.warning("postgres_unavailable_at_start", error=str(exc), using="environment defaults")
        self.sender = command_sender(s.redis_url, self.redis, s.redis_timeout)
        self.budget = BudgetEngine(
            self.redis, self.book, self.pool, reservation_ttl=s.reservation_ttl_seconds, sender=self.sender
        )
        self.ledger = Ledger.for_settings(self.redis, self.pool, s)
        await self.upstream.start()
        tokenizer = await asyncio.to_thread(Tokenizer.load, s.tokenizer_file)  # ~0.5 s, off the event loop
        self.relay = Relay(s, self.auth, self.budget, self.ledger, self.upstream, self.sender, tokenizer)
        self._tasks = [
            asyncio.create_task(self.book.refresh_forever(self.pool), name="budget-refresh"),
            asyncio.create_task(self.budget.reconcile_forever(), name="budget-reconcile"),
        ]
        if s.ledger_writer == "process":
            self.writer = WriterProcess(s)
            self._tasks.append(asyncio.create_task(self.writer.run(), name="ledger-writer-process"))
        elif s.ledger_writer == "inline":
            self._tasks.append(asyncio.create_task(self.ledger.run(), name="ledger-writer"))

    async def stop(self) -> None:
        if self.relay is not None:
            await self.relay.drain()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.upstream.close()
        if self.pool is not None:
            await self.pool.close()
        if self.sender is not None:
            await self.sender.close()
        await self.redis.aclose()


def create_app(settings: Settings | None = None) -> Starlette:
    settings = settings or Settings.from_env()
    configure_logging(settings.log_level)
    services = Services(settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await services.start()
        app.state.services = services
        try:
            yield
        finally:
            await services.stop()

    def relay() -> Relay:
        assert services.relay is not None
        return services.relay

    def completions(endpoint: str):  # type: ignore[no-untyped-def]
        async def handler(request: Request) -> Response:
            return await relay().completion(request, endpoint)

        return handler

    async def models(request: Request) -> Response:
        return await relay().models(request)

    async def quota(request: Request) -> Response:
        identity = await relay().identify(request)
        assert services.budget is not None
        quotas = await services.budget.snapshot(identity)
        body = {"user": identity.user, "tenant": identity.tenant, "budgets": [q.as_json() for q in quotas]}
        return json_response(body, headers=quotas[0].headers())

    async def usage(request: Request) -> Response:
        identity = await relay().identify(request)
        assert services.pool is not None and services.budget is not None
        body = await usage_history(services.pool, identity.user, request.query_params, datetime.now(UTC))
        try:
            body["budgets"] = [q.as_json() for q in await services.budget.snapshot(identity)]
        except ProxyError:
            body["budgets"] = None  # Redis is down: the history still answers
        return json_response(body)

    async def admin_usage(request: Request) -> Response:
        assert services.pool is not None
        return json_response(await admin.usage(services.pool, await relay().principal(request), request))

    async def admin_budget(request: Request) -> Response:
        assert services.pool is not None
        principal = await relay().principal(request)
        return json_response(await admin.put_budget(services.pool, settings, principal, request))

    async def healthz(request: Request) -> Response:
        return json_response({"status": "ok"})

    async def readyz(request: Request) -> Response:
        checks: dict[str, object] = {}
        try:
            await asyncio.wait_for(services.redis.ping(), 2)
            checks["redis"] = "ok"
            assert services.ledger is not None
            checks["ledger_backlog"] = await services.ledger.backlog()
        except (TimeoutError, RedisError, OSError) as exc:
            checks["redis"] = f"error: {exc.__class__.__name__}"
        try:
            assert services.pool is not None
            await asyncio.wait_for(services.pool.fetchval("select 1"), 2)
            checks["postgres"] = "ok"
        except PG_UNAVAILABLE as exc:
            checks["postgres"] = f"error: {exc.__class__.__name__}"
        try:
            up = await asyncio.wait_for(services.upstream.send("GET", "/health/liveliness"), 2)
            up.response.release()
            checks["litellm"] = "ok" if up.status == 200 else f"error: HTTP {up.status}"
        except (TimeoutError, ProxyError) as exc:
            checks["litellm"] = f"error: {exc}"
        ready = all(v == "ok" for k, v in checks.items() if k != "ledger_backlog")
        return json_response({"status": "ready" if ready else "not ready", "checks": checks}, 200 if ready else 503)

    async def prometheus(request: Request) -> Response:
        return Response(generate_latest(metrics.REGISTRY), media_type=CONTENT_TYPE_LATEST)

    routes = []
    for endpoint, path in (
        ("chat", "/chat/completions"),
        ("completions", "/completions"),
        ("embeddings", "/embeddings"),
    ):
        # LibreChat and the SDKs put /v1 in the base URL; some clients do not.
        routes += [
            Route(f"/v1{path}", completions(endpoint), methods=["POST"]),
            Route(path, completions(endpoint), methods=["POST"]),
        ]
    routes += [
        Route("/v1/models", models, methods=["GET"]),
        Route("/models", models, methods=["GET"]),
        Route("/v1/quota", quota, methods=["GET"]),
        Route("/v1/usage", usage, methods=["GET"]),
        Route("/admin/usage", admin_usage, methods=["GET"]),
        Route("/admin/budgets/{subject}", admin_budget, methods=["PUT"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ]

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

    return Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={ProxyError: proxy_error, HTTPException: http_error, Exception: crash},
    )
