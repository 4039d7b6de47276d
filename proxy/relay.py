"""One proxied request: authenticate, check, reserve, forward, then settle and record (written before the answer)."""

from __future__ import annotations

import asyncio
import fnmatch
import time
from collections.abc import Callable
from typing import Any

import orjson
import structlog
from redis.exceptions import NoScriptError
from starlette.requests import Request
from starlette.responses import Response

from . import i18n, metrics
from .auth import Identity, Principal, charged_identity
from .body import Completion, allowed_params, cap_answers, check, encode, read_json
from .budget import BudgetEngine
from .budget.quota import Reservation
from .config import Settings
from .errors import (
    ProxyError,
    QuotaExceeded,
    ServiceUnavailable,
)
from .flight import Flight, RecordDraft, client_request_id, new_request_id
from .forward import StreamThrough, Upstream, Upstreamed
from .ledger import Ledger
from .links import StatementLinks
from .records import UsageRecord
from .redis_batch import CommandSender
from .sse import StreamMeter
from .tokens import Tokenizer
from .usage import Estimate, answer_text, usage_totals

log = structlog.get_logger("proxy.relay")

UPSTREAM_PATHS = {
    "chat": "/v1/chat/completions",
    "completions": "/v1/completions",
    "embeddings": "/v1/embeddings",
}
# Bodies larger than this are counted in a worker thread, so one long prompt does not stall everyone's.
_COUNT_IN_THREAD = 64 * 1024
# User-Agents of the OpenAI clients inside LibreChat: LangChain's (agents 3.6 and later), and LibreChat's
# own subclass of the openai SDK (earlier agents). Both take usage from any stream chunk that has it.
_USAGE_READERS = ("langchainjs-openai/", "CustomOpenAIClient/")


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
        budget: BudgetEngine,
        ledger: Ledger,
        upstream: Upstream,
        sender: CommandSender,
        tokenizer: Tokenizer,
        links: StatementLinks | None = None,
    ) -> None:
        self._settings = settings
        self._links = links  # the statement links the notice and the 429 message carry
        self._budget = budget
        self._ledger = ledger
        self._upstream = upstream
        self._sender = sender
        self._tokens = tokenizer
        self._allowed = {e: allowed_params(e, settings.extra_body_params) for e in UPSTREAM_PATHS}
        self._tasks: set[asyncio.Task[None]] = set()
        self._exempt: dict[str, bool] = {}  # model name -> matches EXEMPT_MODELS
        self.in_flight = 0  # requests holding a slot: checked, reserving, upstream or streaming
        self._failing_open = False  # the last reservation failed and its request went through unmetered
        metrics.RESERVATIONS_IN_FLIGHT.set_function(lambda: self.in_flight)

    async def completion(self, request: Request, principal: Principal, endpoint: str) -> Response:
        """POST /v1/chat/completions, /v1/completions and /v1/embeddings, for an authenticated caller
        (one that could not be authenticated is not recorded: there is nobody to record it for)."""
        perf_start, wall_start = time.perf_counter(), time.time()
        # Until the user charged is known and checked, a refusal is recorded under the token's own subject.
        draft = RecordDraft(new_request_id(), None, principal.identity, endpoint, wall_start, perf_start)
        flight = Flight(self, draft)
        try:
            return await self._complete(request, endpoint, principal, flight)
        except BaseException as exc:
            flight.fail(exc)
            if isinstance(exc, ProxyError):
                exc.headers["X-Request-Id"] = draft.echo_id()
            raise

    async def _complete(self, request: Request, endpoint: str, principal: Principal, flight: Flight) -> Response:
        settings, draft = self._settings, flight.draft
        draft.client_request_id = client_request_id(request)
        payload, size = await read_json(request, settings.max_body_bytes, settings.body_read_timeout)
        draft.body_in = time.perf_counter()
        completion = check(payload, endpoint, self._allowed[endpoint])
        if completion.hide_usage and self._shows_usage(request, principal):
            completion.hide_usage = False
        identity = charged_identity(principal, request.headers, payload.get("user"))
        try:
            await self._budget.check_tenant(identity)
        except ServiceUnavailable:
            if settings.fail_mode != "open":
                raise  # open: the request goes through unmetered below, its tenant unchecked
        draft.identity, draft.model, draft.stream = identity, completion.model, completion.stream
        draft.exempt = exempt = self._is_exempt(completion.model)
        payload["user"] = identity.user
        chat_like = endpoint != "embeddings"
        per_answer = (completion.cap or settings.completion_allowance) if chat_like else 0
        clamp = chat_like and settings.clamp_max_tokens and not exempt
        if clamp:
            cap_answers(completion, per_answer)
        # Each answer's cap as the upstream is told it (embeddings write none); None when the proxy caps nothing.
        answer_cap: int | None = per_answer if clamp or not chat_like else None
        body = encode(payload)  # refused here, before anything is counted or reserved
        # The slot is taken once the body is in: clients slow to send one cannot hold the proxy's capacity.
        flight.take_slot(settings.upstream_max_concurrency)
        prompt = await self._count_prompt(payload, size)
        if exempt:
            reservation = self._budget.unmetered(identity, draft.request_id, 0, exempt=True)
        else:
            reserving = time.perf_counter()
            try:
                reservation = await self._budget.reserve(
                    identity,
                    draft.request_id,
                    prompt,
                    prompt + completion.choices * per_answer,
                    need=prompt + (completion.choices - 1 if chat_like else 0),
                    model=completion.model,
                )
            except QuotaExceeded as exc:
                url = self._statement_url(request, identity)
                if url:  # after the sentence a person reads: LibreChat cuts the message at 512 characters
                    exc.message += " " + i18n.text(settings.locale, "refusal.link", url=url)
                raise
            except ServiceUnavailable:
                if settings.fail_mode != "open":
                    raise
                wanted = prompt + completion.choices * per_answer
                reservation = self._budget.unmetered(identity, draft.request_id, wanted)
                self._failing_open = True
                metrics.FAIL_OPEN_ACTIVE.set(1)
                metrics.FAIL_OPEN_REQUESTS.labels(endpoint).inc()
            finally:
                draft.reserve_seconds = time.perf_counter() - reserving
            if self._failing_open and reservation.metered:
                self._failing_open = False
                metrics.FAIL_OPEN_ACTIVE.set(0)
        flight.reservation = reservation
        draft.budget_group = reservation.scopes[0].limit.group  # the user's budget is always the first
        if clamp and reservation.metered:
            granted = (reservation.granted - prompt) // completion.choices
            if granted < per_answer:  # the room left is smaller than asked: cap each answer to its share
                cap_answers(completion, granted)
                body = encode(payload)
                answer_cap = granted
        estimate = Estimate(prompt, completion.choices * answer_cap if answer_cap is not None else None)
        draft.upstream_sent = time.perf_counter()
        upstream = await self._upstream.send("POST", UPSTREAM_PATHS[endpoint], body=body, request_id=draft.request_id)
        draft.upstream_first = time.perf_counter()  # a JSON answer's headers; a stream's first event replaces it
        try:
            if completion.stream and upstream.ok_stream:
                link = lambda: self._statement_url(request, identity)  # noqa: E731 - signed only if a notice is due
                return self._stream(upstream, completion, flight, link, estimate)  # the response owns the upstream
            return await self._answer(upstream, completion, flight, estimate)
        except BaseException:
            upstream.response.release()  # unread: its connection is closed
            raise

    async def _count_prompt(self, payload: dict[str, Any], size: int) -> int:
        if size > _COUNT_IN_THREAD:
            return await asyncio.to_thread(self._tokens.prompt, payload)
        return self._tokens.prompt(payload)

    def _statement_url(self, request: Request, identity: Identity) -> str | None:
        return self._links.url(identity, self._links.base(request)) if self._links is not None else None

    def _stream(
        self,
        upstream: Upstreamed,
        completion: Completion,
        flight: Flight,
        link: Callable[[], str | None],
        estimate: Estimate,
    ) -> Response:
        draft, reservation = flight.draft, flight.reservation
        assert reservation is not None
        headers = upstream.headers_for_client()
        headers["X-Request-Id"] = draft.echo_id()
        headers.update(reservation.headers())
        notice = self._notice_hook(reservation, link) if completion.endpoint == "chat" else None
        meter = StreamMeter(completion.hide_usage, notice)
        cost = upstream.cost
        perf_start = draft.perf_start

        def on_end(outcome: str, first_byte: float | None) -> None:
            draft.upstream_first = first_byte
            ttft_ms = round((first_byte - perf_start) * 1000, 3) if first_byte is not None else None
            usage = usage_totals(meter.usage)
            estimated = usage is None
            if usage is None:
                usage = estimate.of(meter.text, self._tokens)
            self._check_exempt(flight, meter.model)
            flight.finish(
                draft.record(
                    outcome, 200, usage, estimated=estimated, served_model=meter.model, cost=cost, ttft_ms=ttft_ms
                )
            )

        return StreamThrough(upstream, headers, meter, on_end, self._sender.written)  # type: ignore[return-value]

    async def _answer(
        self, upstream: Upstreamed, completion: Completion, flight: Flight, estimate: Estimate
    ) -> Response:
        draft, reservation = flight.draft, flight.reservation
        assert reservation is not None
        body = await upstream.read_for_client()
        draft.upstream_end = time.perf_counter()
        ok = 200 <= upstream.status < 300
        obj, served = _served_model(body) if ok else (None, None)
        usage = usage_totals(obj.get("usage")) if obj else None
        estimated = ok and usage is None
        if estimated:
            usage = estimate.of(answer_text(obj) if obj else "", self._tokens)
        self._check_exempt(flight, served)
        flight.finish(
            draft.record(
                "ok" if ok else "upstream_error",
                upstream.status,
                usage,
                estimated=estimated,
                served_model=served,
                cost=upstream.cost,
            )
        )
        headers = upstream.headers_for_client()
        headers["X-Request-Id"] = draft.echo_id()
        headers.update(reservation.headers(used=reservation.quotas[0].used + usage[2] if usage else None))
        await self._sender.written()  # the settle and record reach Redis's socket before the answer goes out
        return Response(body, status_code=upstream.status, headers=headers)

    def _check_exempt(self, flight: Flight, served: str | None) -> None:
        """An exempt request answered by a model that is not exempt (a LiteLLM alias or fallback to a paid
        model) is charged after all: its usage goes into the counters, and its record is not marked exempt."""
        draft = flight.draft
        if draft.exempt and served is not None and not self._is_exempt(served):
            draft.exempt = False
            flight.reservation = self._budget.unmetered(draft.identity, draft.request_id, 0)
            log.warning("exempt_model_served_by_another", model=draft.model, served_model=served)

    def _is_exempt(self, model: str) -> bool:
        patterns = self._settings.exempt_models
        if not patterns:
            return False
        known = self._exempt.get(model)
        if known is None:
            if len(self._exempt) >= 10_000:
                self._exempt.clear()
            known = self._exempt[model] = any(fnmatch.fnmatchcase(model, p) for p in patterns)
        return known

    def _shows_usage(self, request: Request, principal: Principal) -> bool:
        """Whether a stream's usage chunk, which the caller did not ask for, reaches it all the same.
        `auto`: for LibreChat (its delegate token, or LangChain's and its own OpenAI client's User-Agent),
        whose token counter reads a usage chunk wherever it finds one; never for other clients, since
        strict OpenAI clients can break on a chunk with no choices."""
        mode = self._settings.stream_usage_to_client
        if mode != "auto":
            return mode == "always"
        agent = request.headers.get("user-agent", "")
        return principal.delegate or agent.startswith(_USAGE_READERS)

    def _notice_hook(
        self, reservation: Reservation, link: Callable[[], str | None]
    ) -> Callable[[dict[str, Any]], str | None] | None:
        if self._settings.quota_notice != "inline" or reservation.exempt:
            return None
        quota = reservation.quotas[0]
        locale = self._settings.locale

        def notice(usage: dict[str, Any]) -> str | None:
            totals = usage_totals(usage)
            text = quota.with_used(quota.used + totals[2]).notice(locale) if totals else None
            url = link() if text else None
            # Markdown: LibreChat renders the link in the answer, one click away.
            return f"{text} {i18n.text(locale, 'notice.link', url=url)}" if text and url else text

        return notice

    async def models(self, request: Request, identity: Identity) -> Response:
        """GET /v1/models: the upstream's list (the caller's query is not passed on), never charged,
        with the caller's quota headers."""
        echo = client_request_id(request) or new_request_id()
        try:
            quota_headers = (await self._budget.snapshot(identity))[0].headers()
        except ServiceUnavailable:
            if self._settings.fail_mode != "open":
                raise
            quota_headers = self._budget.unmetered(identity, echo, 0).headers()
        upstream = await self._upstream.send("GET", "/v1/models")
        body = await upstream.read_for_client()
        headers = upstream.headers_for_client()
        headers["X-Request-Id"] = echo
        headers.update(quota_headers)
        return Response(body, status_code=upstream.status, headers=headers)

    def tier(self, identity: Identity) -> str | None:
        """The group whose tier sets `identity`'s limit, for a request refused before it reserved anything."""
        return self._budget.tier(identity)

    # Accounting is submitted to Redis and never awaited; an answer waits only until it is written.

    def account(self, reservation: Reservation | None, record: UsageRecord) -> None:
        """Settle the reservation and hand the record to the ledger, without the request waiting.
        Each step stands alone: a settle that cannot be sent is owed, a record that cannot be queued goes
        straight to PostgreSQL."""
        settled: asyncio.Future[Any] | None = None
        if reservation is not None and reservation.keys:  # unmetered too: a Redis back by now counts it
            try:
                settled = self._sender.submit(*self._budget.settle_command(reservation, record.total_tokens))
            except Exception as exc:
                self._settle_failed(reservation, record, exc)
        try:
            recorded = self._sender.submit(*self._ledger.command(record))
        except Exception as exc:
            self._record_failed(record, exc)
            if settled is not None:
                settled.add_done_callback(lambda done: self._settled(reservation, record, done))
            return
        submitted = time.perf_counter()
        recorded.add_done_callback(lambda done: self._accounted(reservation, record, settled, done, submitted))

    def _settle_failed(self, reservation: Reservation, record: UsageRecord, exc: BaseException) -> None:
        if isinstance(exc, NoScriptError):
            # Redis restarted (no script cache survives that, AOF or not): load the script and settle now.
            # Owed to the next reconcile instead, the reservation would hold the budget for up to a second,
            # refusing a user's next requests as "taken by requests in progress".
            self._spawn(self._settle_now(reservation, record))
            return
        self._owe(reservation, record, exc)

    def _owe(self, reservation: Reservation, record: UsageRecord, exc: BaseException) -> None:
        # Redis unreachable: the reconcile task settles it once Redis answers.
        self._budget.owe(reservation, record.total_tokens)
        metrics.ACCOUNTING_ERRORS.labels("settle").inc()
        log.warning("settle_failed", request_id=record.request_id, error=str(exc) or exc.__class__.__name__)

    async def _settle_now(self, reservation: Reservation, record: UsageRecord) -> None:
        try:
            await self._budget.settle(reservation, record.total_tokens)
        except Exception as exc:  # Redis went away meanwhile: owed, as above
            self._owe(reservation, record, exc)

    def _record_failed(self, record: UsageRecord, exc: BaseException) -> None:
        self._spawn(self._write_direct(record))  # the stream is unreachable: straight to PostgreSQL
        metrics.ACCOUNTING_ERRORS.labels("record").inc()
        log.warning("record_failed", request_id=record.request_id, error=str(exc) or exc.__class__.__name__)

    def _settled(self, reservation: Reservation | None, record: UsageRecord, settled: asyncio.Future[Any]) -> None:
        error = None if settled.cancelled() else settled.exception()
        if error is not None and reservation is not None:
            self._settle_failed(reservation, record, error)

    def _accounted(
        self,
        reservation: Reservation | None,
        record: UsageRecord,
        settled: asyncio.Future[Any] | None,
        recorded: asyncio.Future[Any],
        submitted: float,
    ) -> None:
        if settled is not None:
            self._settled(reservation, record, settled)
            if not settled.cancelled() and settled.exception() is None:
                metrics.SETTLE_LATENCY.observe(time.perf_counter() - submitted)
        error = None if recorded.cancelled() else recorded.exception()
        if error is not None:
            self._record_failed(record, error)

    async def _write_direct(self, record: UsageRecord) -> None:
        at = await self._ledger.write_direct(record)
        if at is not None:
            self._budget.ledgered(record.request_id, at)  # a counter rebuilt from now on counts it

    def _spawn(self, work: Any) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self) -> None:
        """Wait for accounting still in flight (on shutdown)."""
        await self._sender.idle()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
