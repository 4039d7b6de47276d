"""One request's life: its ids, the ledger record it gathers, and the Flight that owns its slot,
reservation and record so that each is released exactly once, whatever raises where."""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from starlette.requests import Request

from . import metrics
from .auth import Identity
from .budget.quota import Reservation
from .errors import (
    BadRequest,
    ClientClosed,
    ProxyError,
    QuotaExceeded,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from .records import UsageRecord

if TYPE_CHECKING:
    from .relay import Relay

_CLIENT_ID_MAX = 128


def new_request_id() -> str:
    """The key of a request's reservation and ledger record, never the client's: 32 hex digits, the time in
    milliseconds (48 bits) and then 80 random bits, as a UUIDv7 orders them.

    The ledger's primary key is an index on it: random ids land on random pages of an index much larger
    than PostgreSQL's cache once a month holds a few million records, and time-ordered ones on its last
    pages (PostgreSQL's CPU per record with 2.5 million this month: 14-19 µs random, 7 µs ordered)."""
    return (time.time_ns() // 1_000_000).to_bytes(6, "big").hex() + os.urandom(10).hex()


def client_request_id(request: Request) -> str | None:
    """The caller's own X-Request-Id, kept as a label and echoed; printable ASCII, at most 128 characters."""
    headers = request.headers
    if "x-request-id" not in headers:  # asked first: Headers.get raises and catches a KeyError when absent
        return None
    given = headers["x-request-id"]
    if not given or len(given) > _CLIENT_ID_MAX or not given.isascii() or not given.isprintable():
        raise BadRequest(
            f"'X-Request-Id' must be printable ASCII of 1 to {_CLIENT_ID_MAX} characters.", param="X-Request-Id"
        )
    return given


@dataclass(slots=True)
class RecordDraft:
    """What one request's ledger record needs, gathered as the request goes."""

    request_id: str
    client_request_id: str | None
    identity: Identity
    endpoint: str
    wall_start: float
    perf_start: float
    model: str | None = None
    stream: bool = False
    exempt: bool = False
    # The group whose tier set the user's limit (None: their own row or the default), so that PostgreSQL judges
    # them by the same row: from the reservation, or for a request refused before one, from the budget rows.
    budget_group: str | None = None
    # perf_counter() times for the metrics: the body in, the upstream sent, its first byte, its last (JSON
    # answers; a stream's upstream lasts until the stream ends); and the reservation's duration.
    body_in: float | None = None
    upstream_sent: float | None = None
    upstream_first: float | None = None
    upstream_end: float | None = None
    reserve_seconds: float | None = None

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
            client_request_id=self.client_request_id,
            exempt=self.exempt,
            _budget_group=self.budget_group,
        )

    def echo_id(self) -> str:
        return self.client_request_id or self.request_id

    def timings(self) -> tuple[float | None, float | None, float | None]:
        """Seconds of the proxy's own time (from the body being in, less the upstream's part), of the
        upstream's first byte, and of the reservation; None for what the request never reached."""
        added = ttfb = None
        if self.body_in is not None:
            end = time.perf_counter()
            sent = self.upstream_sent
            added = end - self.body_in - ((self.upstream_end or end) - sent if sent is not None else 0.0)
            if sent is not None and self.upstream_first is not None:
                ttfb = self.upstream_first - sent
        return added, ttfb, self.reserve_seconds


def outcome_of(exc: BaseException) -> tuple[str, int]:
    """The ledger status and HTTP status of a request that ended with `exc`."""
    if isinstance(exc, QuotaExceeded):
        return "blocked", exc.status
    if isinstance(exc, RateLimited):
        return "rate_limited", exc.status
    if isinstance(exc, (UpstreamError, UpstreamTimeout)):
        return "upstream_error", exc.status
    if isinstance(exc, ProxyError) and not isinstance(exc, ClientClosed):
        return ("invalid" if exc.status < 500 else "unavailable"), exc.status
    if isinstance(exc, (asyncio.CancelledError, ClientClosed)):
        return "cancelled", 499
    return "error", 500


class Flight:
    """One request's life: its in-flight slot, its reservation and its accounting, each released once.

    Whatever raises wherever, the request ends in exactly one `finish`: the slot is given back, the
    reservation settled with what was used, and one ledger record written.
    """

    __slots__ = ("_relay", "draft", "reservation", "_slot", "_done")

    def __init__(self, relay: Relay, draft: RecordDraft) -> None:
        self._relay = relay
        self.draft = draft
        self.reservation: Reservation | None = None
        self._slot = False
        self._done = False

    def take_slot(self, limit: int) -> None:
        if self._relay.in_flight >= limit:
            raise ServiceUnavailable(f"The proxy is at its limit of {limit:,} concurrent requests; try again shortly.")
        self._relay.in_flight += 1
        self._slot = True

    def finish(self, record: UsageRecord) -> None:
        if self._done:
            return
        self._done = True
        if self._slot:
            self._slot = False
            self._relay.in_flight -= 1
        metrics.observe(record, *self.draft.timings())
        self._relay.account(self.reservation, record)

    def fail(self, exc: BaseException) -> None:
        status, http = outcome_of(exc)
        if self.reservation is None and not self._done:
            # Refused before a reservation (over budget, a bad body, ...): the tier as the budget rows have it,
            # so that even a user who is only refused shows in PostgreSQL under the row that refused them.
            self.draft.budget_group = self._relay.tier(self.draft.identity)
        self.finish(self.draft.record(status, http))
