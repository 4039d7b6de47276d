"""One proxied request: authenticate, reserve, forward, then settle and record (written before the answer, never awaited)."""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import orjson
import structlog
from redis.exceptions import NoScriptError
from starlette.requests import Request
from starlette.responses import Response

from . import metrics
from .auth import Authenticator, Identity, Principal, charged_identity
from .budget import BudgetEngine
from .coalesce import Lane
from .config import Settings
from .errors import (
    BadRequest,
    PayloadTooLarge,
    ProxyError,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from .forward import StreamThrough, Upstream, pass_headers
from .ledger import Ledger, UsageRecord
from .quota import Reservation
from .sse import StreamMeter, answer_text, usage_totals
from .tokens import Tokenizer, completion_cap, estimate_prompt

log = structlog.get_logger("proxy.relay")

UPSTREAM_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}


async def read_json(request: Request, max_bytes: int) -> dict[str, Any]:
    """The request body as a JSON object, refusing oversized bodies before reading them whole."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit():
        if int(declared) > max_bytes:
            raise PayloadTooLarge(f"Request body is larger than the limit of {max_bytes:,} bytes.")
        body = await request.body()  # the server holds the body to its declared length
    else:  # chunked: count as it comes
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"Request body is larger than the limit of {max_bytes:,} bytes.")
            chunks.append(chunk)
        body = b"".join(chunks)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return payload


# Unique without a call to the OS random source per request (uuid4 cost ~28 µs here): a random
# prefix, the process id (read per call, so forked workers differ), then a counter.
_ID_PREFIX = os.urandom(6).hex()
_ID_COUNTER = itertools.count()


def request_id_of(request: Request) -> str:
    headers = request.headers
    # Asked before it is read: Headers.get raises and catches a KeyError for a header that is absent.
    given = headers["x-request-id"] if "x-request-id" in headers else ""
    if 0 < len(given) <= 128 and given.isprintable():
        return given
    return f"{_ID_PREFIX}{os.getpid():x}{next(_ID_COUNTER):08x}"


@dataclass(slots=True)
class Ticket:
    """What one request's ledger record needs, gathered as the request goes."""

    request_id: str
    identity: Identity
    endpoint: str
    model: str | None
    stream: bool
    wall_start: float
    perf_start: float

    def record(
        self,
        status: str,
        http_status: int | None,
        usage: tuple[int, int, int] | None = None,
        *,
        estimated: bool = False,
        served_model: str | None = None,
        cost: float | None = None,
        ttft_ms: float | None = None,
    ) -> UsageRecord:
        prompt, completion, total = usage or (0, 0, 0)
        return UsageRecord(
            request_id=self.request_id,
            created_at=self.wall_start,
            user_id=self.identity.user,
            tenant_id=self.identity.tenant,
            model=self.model,
            served_model=served_model,
            endpoint=self.endpoint,
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=total,
            cost_usd=cost,
            status=status,
            http_status=http_status,
            stream=self.stream,
            estimated=estimated,
            latency_ms=round((time.perf_counter() - self.perf_start) * 1000, 3),
            ttft_ms=ttft_ms,
            via=self.identity.via,
            user_email=self.identity.email,
        )


def _cost(headers: Any) -> float | None:
    raw = headers.get("x-litellm-response-cost")
    try:
        return float(raw) if raw is not None else None
    except ValueError:
        return None


def _served_model(body: bytes) -> tuple[dict[str, Any] | None, str | None]:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    model = obj.get("model")
    return obj, model if isinstance(model, str) else None


class Relay:
    def __init__(
        self,
        settings: Settings,
        auth: Authenticator,
        budget: BudgetEngine,
        ledger: Ledger,
        upstream: Upstream,
        lane: Lane,
        tokenizer: Tokenizer,
    ) -> None:
        self._settings = settings
        self._auth = auth
        self._budget = budget
        self._ledger = ledger
        self._upstream = upstream
        self._lane = lane
        self._tokens = tokenizer
        self._tasks: set[asyncio.Task[None]] = set()
        self._in_flight = 0  # requests holding a reservation, i.e. on their way upstream or streaming

    async def identify(self, request: Request, body_user: Any = None, *, required: bool = False) -> Identity:
        """The user charged: the token's, or the end user a delegating service token names."""
        return charged_identity(await self.principal(request), request.headers, body_user, required=required)

    async def principal(self, request: Request) -> Principal:
        return await self._auth.authenticate(request.headers.get("authorization"))

    async def completion(self, request: Request, endpoint: str) -> Response:
        """POST /v1/chat/completions, /v1/completions and /v1/embeddings."""
        perf_start, wall_start = time.perf_counter(), time.time()
        principal = await self.principal(request)
        request_id = request_id_of(request)
        payload = await read_json(request, self._settings.max_body_bytes)
        identity = charged_identity(principal, request.headers, payload.get("user"))
        model = payload.get("model")
        if not isinstance(model, str) or not model:
            raise BadRequest("Request body needs a 'model' string.", param="model", code="missing_model")
        stream = endpoint != "embeddings" and payload.get("stream") is True
        prompt = estimate_prompt(payload)
        ticket = Ticket(request_id, identity, endpoint, model, stream, wall_start, perf_start)

        if self._in_flight >= self._settings.upstream_max_concurrency:
            raise ServiceUnavailable(
                f"The proxy is at its limit of {self._settings.upstream_max_concurrency:,} concurrent requests; try again shortly."
            )
        cap_field, cap = completion_cap(payload)
        allowance = 0 if endpoint == "embeddings" else (cap or self._settings.completion_allowance)
        try:
            reservation = await self._budget.reserve(identity, request_id, prompt, prompt + allowance)
        except ServiceUnavailable:
            if self._settings.fail_mode != "open":
                raise
            reservation = self._budget.unmetered(identity, request_id, prompt + allowance)
        except (QuotaExceeded, RateLimited) as exc:
            self._account(None, ticket.record("blocked" if isinstance(exc, QuotaExceeded) else "rate_limited", exc.status))
            exc.headers["X-Request-Id"] = request_id
            raise
        self._in_flight += 1
        self._shape(payload, reservation.granted - prompt, cap_field, cap, endpoint, identity)
        hide_usage = stream and self._ask_usage(payload)

        try:
            upstream = await self._upstream.send(
                "POST", UPSTREAM_PATHS[endpoint], body=orjson.dumps(payload), request_id=request_id
            )
        except ProxyError as exc:
            self._account(reservation, ticket.record("upstream_error", exc.status))
            exc.headers["X-Request-Id"] = request_id
            raise

        headers = pass_headers(upstream.headers)
        headers["X-Request-Id"] = request_id
        if stream and upstream.status == 200 and upstream.content_type == "text/event-stream":
            headers.update(reservation.headers())
            meter = StreamMeter(hide_usage, self._notice_hook(reservation) if endpoint == "chat" else None)
            cost = _cost(upstream.headers)

            def on_end(outcome: str, first_byte: float | None) -> None:
                ttft_ms = round((first_byte - perf_start) * 1000, 3) if first_byte is not None else None
                usage = usage_totals(meter.usage)
                estimated = usage is None
                if usage is None:
                    usage = self._estimate(payload, meter.text)
                record = ticket.record(
                    outcome, 200, usage, estimated=estimated, served_model=meter.model, cost=cost, ttft_ms=ttft_ms
                )
                self._account(reservation, record)

            return StreamThrough(upstream, headers, meter, on_end, self._lane.written)  # type: ignore[return-value]

        try:
            body = await upstream.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            failure = _read_failure(exc)
            self._account(reservation, ticket.record("upstream_error", failure.status))
            raise failure from None
        finally:
            upstream.release()
        obj, served = _served_model(body)
        usage = usage_totals(obj.get("usage")) if obj else None
        ok = 200 <= upstream.status < 300
        estimated = ok and usage is None
        if estimated:
            usage = self._estimate(payload, answer_text(obj) if obj else "")
        self._account(
            reservation,
            ticket.record(
                "ok" if ok else "upstream_error", upstream.status, usage,
                estimated=estimated, served_model=served, cost=_cost(upstream.headers),
            ),
        )  # fmt: skip
        headers.update(reservation.headers(used=reservation.quotas[0].used + usage[2] if usage else None))
        await self._lane.written()  # the settle and record reach Redis's socket before the answer goes out
        return Response(body, status_code=upstream.status, headers=headers)

    def _estimate(self, payload: dict[str, Any], answer: str) -> tuple[int, int, int]:
        """Usage the upstream did not report, counted from the request and the answer text."""
        prompt, completion = self._tokens.prompt(payload), self._tokens.count(answer)
        return prompt, completion, prompt + completion

    def _shape(
        self, payload: dict[str, Any], room: int, cap_field: str, cap: int | None, endpoint: str, identity: Identity
    ) -> None:
        """Make the upstream body: our user id, and an answer cap that fits the reservation."""
        payload["user"] = identity.user
        if endpoint == "embeddings" or not self._settings.clamp_max_tokens:
            return
        if (cap is not None and cap > room) or (cap is None and room < self._settings.completion_allowance):
            payload[cap_field] = max(room, 1)

    def _notice_hook(self, reservation: Reservation) -> Callable[[dict[str, Any]], str | None] | None:
        if self._settings.quota_notice != "inline":
            return None
        quota = reservation.quotas[0]

        def notice(usage: dict[str, Any]) -> str | None:
            totals = usage_totals(usage)
            return quota.with_used(quota.used + totals[2]).notice() if totals else None

        return notice

    @staticmethod
    def _ask_usage(payload: dict[str, Any]) -> bool:
        """Ask the upstream for the usage chunk; True when the caller did not ask (so we hide it)."""
        options = payload.get("stream_options")
        if isinstance(options, dict) and options.get("include_usage") is True:
            return False
        payload["stream_options"] = {**(options if isinstance(options, dict) else {}), "include_usage": True}
        return True

    async def passthrough_get(self, request: Request, path: str) -> Response:
        """GET /v1/models: forwarded as is, never charged, with the caller's quota headers."""
        identity = await self.identify(request, request.query_params.get("user"))
        request_id = request_id_of(request)
        try:
            quota_headers = (await self._budget.snapshot(identity))[0].headers()
        except ServiceUnavailable:
            if self._settings.fail_mode != "open":
                raise
            quota_headers = self._budget.unmetered(identity, request_id, 0).headers()
        upstream = await self._upstream.send("GET", path, query=request.url.query, request_id=request_id)
        try:
            body = await upstream.read()
        finally:
            upstream.release()
        headers = pass_headers(upstream.headers)
        headers["X-Request-Id"] = request_id
        headers.update(quota_headers)
        return Response(body, status_code=upstream.status, headers=headers)

    # Accounting is submitted to Redis and never awaited; an answer waits only until it is written.

    def _account(self, reservation: Reservation | None, record: UsageRecord) -> None:
        """Settle the reservation and hand the record to the ledger, without the request waiting."""
        if reservation is not None:
            self._in_flight -= 1
        metrics.observe(record.endpoint, record.status, record.total_tokens, (record.latency_ms or 0) / 1000)
        settled = self._lane.submit(*self._budget.settle_command(reservation, record.total_tokens)) if reservation else None
        recorded = self._lane.submit(*self._ledger.command(record))
        recorded.add_done_callback(lambda done: self._accounted(reservation, record, settled, done))

    def _accounted(
        self,
        reservation: Reservation | None,
        record: UsageRecord,
        settled: asyncio.Future[Any] | None,
        recorded: asyncio.Future[Any],
    ) -> None:
        settle_error = settled.exception() if settled is not None else None
        record_error = recorded.exception()
        if settle_error is not None and reservation is not None:
            # Redis unreachable, or restarted without the script: the reconcile task settles it later.
            self._budget.owe(reservation, record.total_tokens)
        if record_error is not None:
            self._spawn(self._ledger.write_direct(record))  # the stream is unreachable: straight to PostgreSQL
        error = record_error or (settle_error if not isinstance(settle_error, NoScriptError) else None)
        if error is not None:
            metrics.BACKGROUND_ERRORS.inc()
            log.warning("settle_failed", request_id=record.request_id, error=str(error) or error.__class__.__name__)

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for accounting still in flight (on shutdown)."""
        await self._lane.idle()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)


def _read_failure(exc: BaseException) -> ProxyError:
    if isinstance(exc, asyncio.TimeoutError):
        return UpstreamTimeout("The model server did not finish its answer in time.")
    return UpstreamError(f"The model server broke off its answer ({exc.__class__.__name__}).")
