"""proxy/relay.py and proxy/flight.py: request ids, how a request ended, its record, accounting done once."""

from __future__ import annotations

import asyncio
import re
import time
from types import SimpleNamespace
from typing import Any

import pytest
from redis.exceptions import NoScriptError
from starlette.requests import Request

from proxy.auth import Identity
from proxy.errors import (
    BadRequest,
    ClientClosed,
    Forbidden,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    RequestTimeout,
    ServiceUnavailable,
    Unauthorized,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.flight import Flight, RecordDraft, client_request_id, new_request_id, outcome_of
from proxy.records import UsageRecord
from proxy.relay import Relay, _served_model

pytestmark = pytest.mark.anyio


def request(*headers: tuple[bytes, bytes]) -> Request:
    return Request({"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": list(headers)})


# new_request_id and client_request_id


def test_new_request_ids_are_the_time_in_milliseconds_then_80_random_bits_in_hex() -> None:
    before = time.time_ns() // 1_000_000
    ids = [new_request_id() for _ in range(1000)]
    after = time.time_ns() // 1_000_000
    assert len(set(ids)) == 1000 and len({i[12:] for i in ids}) == 1000
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert all(before <= int(i[:12], 16) <= after for i in ids)
    time.sleep(0.002)
    assert new_request_id() > max(ids)  # the ledger's index takes them at its end, not on random pages


def test_no_x_request_id_is_none() -> None:
    assert client_request_id(request()) is None
    assert client_request_id(request((b"x-other", b"1"))) is None


@pytest.mark.parametrize("given", ["abc-123", "a", "x" * 128, "trace=1; span 2 ~!@#$%^&*()"])
def test_the_callers_x_request_id_is_kept_as_given(given: str) -> None:
    assert client_request_id(request((b"x-request-id", given.encode()))) == given


@pytest.mark.parametrize("raw", [b"", b"x" * 129, b"caf\xe9", b"tab\there", b"nul\x00", b"del\x7f"])
def test_an_x_request_id_that_is_not_short_printable_ascii_is_refused(raw: bytes) -> None:
    with pytest.raises(BadRequest) as caught:
        client_request_id(request((b"x-request-id", raw)))
    assert (caught.value.param, caught.value.status) == ("X-Request-Id", 400)
    assert caught.value.message == "'X-Request-Id' must be printable ASCII of 1 to 128 characters."


# outcome_of


@pytest.mark.parametrize(
    "exc, outcome",
    [
        (QuotaExceeded("over"), ("blocked", 429)),
        (RateLimited("slow down"), ("rate_limited", 429)),
        (UpstreamError("bad gateway"), ("upstream_error", 502)),
        (UpstreamTimeout("late"), ("upstream_error", 504)),
        (BadRequest("no"), ("invalid", 400)),
        (Unauthorized("who"), ("invalid", 401)),
        (Forbidden("no"), ("invalid", 403)),
        (RequestTimeout("slow body"), ("invalid", 408)),
        (PayloadTooLarge("big"), ("invalid", 413)),
        (ServiceUnavailable("down"), ("unavailable", 503)),
        (ClientClosed("gone"), ("cancelled", 499)),
        (asyncio.CancelledError(), ("cancelled", 499)),
        (RuntimeError("bug"), ("error", 500)),
        (KeyError("x"), ("error", 500)),
        (KeyboardInterrupt(), ("error", 500)),
    ],
)
def test_outcome_of_an_ending(exc: BaseException, outcome: tuple[str, int]) -> None:
    assert outcome_of(exc) == outcome


# RecordDraft


def draft(**kw: Any) -> RecordDraft:
    fields: dict[str, Any] = {
        "request_id": "r-1",
        "client_request_id": None,
        "identity": Identity("alice", "acme", via="librechat", email="alice@example.com"),
        "endpoint": "chat",
        "wall_start": 1_700_000_000.5,
        "perf_start": time.perf_counter(),
    }
    return RecordDraft(**{**fields, **kw})


def test_a_record_carries_what_the_draft_gathered() -> None:
    d = draft(client_request_id="mine", model="gpt-4o", stream=True, perf_start=time.perf_counter() - 0.25)
    record = d.record("ok", 200, (100, 20, 120), estimated=True, served_model="gpt-4o-x", cost=0.5, ttft_ms=12.5)
    latency = record.latency_ms
    assert latency is not None and 250 <= latency < 5000
    assert record == UsageRecord(
        request_id="r-1",
        created_at=1_700_000_000.5,
        user_id="alice",
        tenant_id="acme",
        model="gpt-4o",
        served_model="gpt-4o-x",
        endpoint="chat",
        prompt_tokens=100,
        completion_tokens=20,
        total_tokens=120,
        cost_usd=0.5,
        status="ok",
        http_status=200,
        stream=True,
        estimated=True,
        latency_ms=latency,
        ttft_ms=12.5,
        via="librechat",
        user_email="alice@example.com",
        client_request_id="mine",
    )


def test_a_record_without_usage_counts_nothing() -> None:
    record = draft(identity=Identity("bob")).record("blocked", 429)
    assert (record.prompt_tokens, record.completion_tokens, record.total_tokens) == (0, 0, 0)
    assert (record.status, record.http_status, record.model, record.stream, record.estimated) == (
        "blocked",
        429,
        None,
        False,
        False,
    )
    assert (record.tenant_id, record.via, record.user_email, record.served_model, record.cost_usd) == (None,) * 5


def test_latency_is_milliseconds_to_three_places() -> None:
    latency = draft().record("ok", 200).latency_ms
    assert latency is not None and 0 <= latency < 1000 and round(latency, 3) == latency


def test_the_echoed_id_is_the_callers_else_ours() -> None:
    assert draft(client_request_id="theirs").echo_id() == "theirs"
    assert draft().echo_id() == "r-1"


# Flight: the slot, the reservation and the record, each released once


class Accounting:
    """What Flight needs of the relay: the in-flight count, account() and tier()."""

    def __init__(self, in_flight: int = 0, group: str | None = None) -> None:
        self.in_flight = in_flight
        self.accounted: list[tuple[Any, UsageRecord]] = []
        self.group = group

    def account(self, reservation: Any, record: UsageRecord) -> None:
        self.accounted.append((reservation, record))

    def tier(self, identity: Any) -> str | None:
        return self.group


def flight(relay: Accounting, **kw: Any) -> Flight:
    return Flight(relay, draft(**kw))  # type: ignore[arg-type]


def test_a_slot_is_taken_below_the_limit_and_given_back_once() -> None:
    relay = Accounting(in_flight=2)
    f = flight(relay)
    f.take_slot(3)
    assert relay.in_flight == 3
    record = f.draft.record("ok", 200, (1, 2, 3))
    f.finish(record)
    f.finish(record)
    f.fail(RuntimeError("late"))
    assert relay.in_flight == 2
    assert relay.accounted == [(None, record)]


def test_at_the_limit_no_slot_is_taken() -> None:
    relay = Accounting(in_flight=1024)
    f = flight(relay)
    with pytest.raises(ServiceUnavailable) as caught:
        f.take_slot(1024)
    assert caught.value.message == "The proxy is at its limit of 1,024 concurrent requests; try again shortly."
    f.fail(caught.value)
    assert relay.in_flight == 1024  # the refused request gave back no slot it did not hold
    assert [(r.status, r.http_status) for _, r in relay.accounted] == [("unavailable", 503)]


def test_a_failure_is_recorded_once_with_its_outcome_and_the_reservation() -> None:
    relay = Accounting()
    f = flight(relay, model="m")
    f.take_slot(10)
    reservation = object()
    f.reservation = reservation  # type: ignore[assignment]
    f.fail(QuotaExceeded("over"))
    f.fail(UpstreamError("again"))
    f.finish(f.draft.record("ok", 200))
    assert relay.in_flight == 0
    assert len(relay.accounted) == 1
    held, record = relay.accounted[0]
    assert held is reservation
    assert (record.status, record.http_status, record.total_tokens, record.model) == ("blocked", 429, 0, "m")


def test_a_request_refused_before_reserving_records_the_tier_the_budget_rows_give() -> None:
    relay = Accounting(group="eng")
    flight(relay).fail(QuotaExceeded("over"))
    reserved = flight(relay, budget_group="support")  # a reservation's tier is the one it reserved under
    reserved.reservation = object()  # type: ignore[assignment]
    reserved.fail(UpstreamError("broke"))
    assert [r.encode().endswith(b',"budget_group":"eng"}') for _, r in relay.accounted] == [True, False]
    assert relay.accounted[1][1].encode().endswith(b',"budget_group":"support"}')


def test_a_flight_without_a_slot_finishes_without_touching_the_count() -> None:
    relay = Accounting(in_flight=5)
    f = flight(relay)
    f.fail(BadRequest("bad header"))
    assert relay.in_flight == 5
    assert [(r.status, r.http_status) for _, r in relay.accounted] == [("invalid", 400)]


def test_a_cancelled_request_is_recorded_as_cancelled() -> None:
    relay = Accounting()
    f = flight(relay)
    f.take_slot(1)
    f.fail(asyncio.CancelledError())
    assert relay.in_flight == 0
    assert [(r.status, r.http_status) for _, r in relay.accounted] == [("cancelled", 499)]


# _served_model


@pytest.mark.parametrize(
    "body, model",
    [
        (b'{"model": "gpt-4o-2024", "choices": []}', "gpt-4o-2024"),
        (b'{"choices": []}', None),
        (b'{"model": 5}', None),
    ],
)
def test_served_model_is_the_answers_model_string(body: bytes, model: str | None) -> None:
    obj, served = _served_model(body)
    assert obj is not None and served == model


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b""])
def test_an_answer_that_is_not_an_object_has_no_model(body: bytes) -> None:
    assert _served_model(body) == (None, None)


# Relay.account: settle and record stand alone; what cannot be sent is owed or written directly


class Sender:
    def __init__(self, fail: dict[str, BaseException] | None = None) -> None:
        self.fail = fail or {}
        self.sent: list[tuple[Any, ...]] = []
        self.futures: list[asyncio.Future[Any]] = []

    def submit(self, *command: Any) -> asyncio.Future[Any]:
        if command[0] in self.fail:
            raise self.fail[command[0]]
        self.sent.append(command)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.futures.append(future)
        return future

    async def idle(self) -> None:
        pass


# A reservation as account() sees it: the keys its settle goes to.
RES = SimpleNamespace(keys=("quota:{u:x}:user:x:month:20261101",))


class Budget:
    def __init__(self) -> None:
        self.owed: list[tuple[Any, int]] = []
        self.settled: list[tuple[Any, int]] = []
        self.in_ledger: list[tuple[str, int]] = []
        self.fail: Exception | None = None

    async def settle(self, reservation: Any, tokens: int) -> list[int]:
        self.settled.append((reservation, tokens))
        if self.fail is not None:
            raise self.fail
        return [tokens]

    def settle_command(self, reservation: Any, tokens: int) -> tuple[Any, ...]:
        return ("EVALSHA", "sha", reservation, tokens)

    def owe(self, reservation: Any, tokens: int) -> None:
        self.owed.append((reservation, tokens))

    def ledgered(self, request_id: str, at_ms: int) -> None:
        self.in_ledger.append((request_id, at_ms))


class Ledger:
    def __init__(self) -> None:
        self.direct: list[UsageRecord] = []

    def command(self, record: UsageRecord) -> tuple[Any, ...]:
        return ("XADD", "stream", record.request_id)

    async def write_direct(self, record: UsageRecord) -> int | None:
        self.direct.append(record)
        return None if record.status == "lost" else 1_700_000_000_000  # a record PostgreSQL did not take either


def relay(base_settings: Any, sender: Sender) -> tuple[Relay, Budget, Ledger]:
    budget, ledger = Budget(), Ledger()
    r = Relay(
        settings=base_settings,
        budget=budget,  # type: ignore[arg-type]
        ledger=ledger,  # type: ignore[arg-type]
        upstream=None,  # type: ignore[arg-type]
        sender=sender,
        tokenizer=None,  # type: ignore[arg-type]
    )
    return r, budget, ledger


async def settle_callbacks() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


async def test_account_sends_the_settle_and_the_record(base_settings: Any) -> None:
    sender = Sender()
    r, budget, ledger = relay(base_settings, sender)
    record = draft().record("ok", 200, (5, 6, 11))
    r.account(RES, record)  # type: ignore[arg-type]
    assert sender.sent == [("EVALSHA", "sha", RES, 11), ("XADD", "stream", "r-1")]
    for future in sender.futures:
        future.set_result(1)
    await settle_callbacks()
    assert (budget.owed, ledger.direct) == ([], [])


async def test_without_a_reservation_only_the_record_is_sent(base_settings: Any) -> None:
    sender = Sender()
    r, budget, _ = relay(base_settings, sender)
    r.account(None, draft().record("invalid", 400))
    assert sender.sent == [("XADD", "stream", "r-1")]
    sender.futures[0].set_result(1)
    await settle_callbacks()
    assert budget.owed == []


async def test_a_settle_that_cannot_be_sent_is_owed_and_the_record_still_sent(base_settings: Any) -> None:
    sender = Sender(fail={"EVALSHA": ConnectionError("redis down")})
    r, budget, ledger = relay(base_settings, sender)
    r.account(RES, draft().record("ok", 200, (1, 1, 2)))  # type: ignore[arg-type]
    assert budget.owed == [(RES, 2)]
    assert sender.sent == [("XADD", "stream", "r-1")]
    sender.futures[0].set_result(1)
    await settle_callbacks()
    assert ledger.direct == []


async def test_a_settle_that_fails_once_sent_is_owed(base_settings: Any) -> None:
    sender = Sender()
    r, budget, ledger = relay(base_settings, sender)
    r.account(RES, draft().record("ok", 200, (3, 4, 7)))  # type: ignore[arg-type]
    settled, recorded = sender.futures
    settled.set_exception(ConnectionError("reset"))
    recorded.set_result(1)
    await settle_callbacks()
    assert budget.owed == [(RES, 7)]
    assert ledger.direct == []


@pytest.mark.parametrize("again", [None, ConnectionError("gone again")])
async def test_a_settle_redis_has_no_script_for_is_settled_at_once_else_owed(
    base_settings: Any, again: Exception | None
) -> None:
    """Redis restarted: the script is loaded and the settle run at once (not a second later by the
    reconcile, its reservation meanwhile refusing the user's next requests); owed if that fails too."""
    sender = Sender()
    r, budget, _ = relay(base_settings, sender)
    budget.fail = again
    r.account(RES, draft().record("ok", 200, (3, 4, 7)))  # type: ignore[arg-type]
    settled, recorded = sender.futures
    settled.set_exception(NoScriptError("NOSCRIPT"))
    recorded.set_result(1)
    await settle_callbacks()
    await r.drain()
    assert budget.settled == [(RES, 7)]
    assert budget.owed == ([] if again is None else [(RES, 7)])


async def test_a_record_that_cannot_be_queued_goes_straight_to_postgresql(base_settings: Any) -> None:
    sender = Sender(fail={"XADD": ConnectionError("redis down")})
    r, budget, ledger = relay(base_settings, sender)
    record = draft().record("ok", 200, (3, 4, 7))
    r.account(RES, record)  # type: ignore[arg-type]
    sender.futures[0].set_exception(ConnectionError("redis down"))
    await r.drain()
    assert ledger.direct == [record]
    assert budget.owed == [(RES, 7)]
    assert budget.in_ledger == [("r-1", 1_700_000_000_000)]  # a counter rebuilt after this counts it already


async def test_a_record_postgresql_did_not_take_is_not_said_to_be_in_the_ledger(base_settings: Any) -> None:
    sender = Sender(fail={"XADD": ConnectionError("redis down")})
    r, budget, ledger = relay(base_settings, sender)
    r.account(RES, draft().record("lost", 200, (3, 4, 7)))  # type: ignore[arg-type]
    sender.futures[0].set_exception(ConnectionError("redis down"))
    await r.drain()
    assert len(ledger.direct) == 1 and budget.owed == [(RES, 7)] and budget.in_ledger == []


async def test_a_record_lost_on_the_way_goes_straight_to_postgresql(base_settings: Any) -> None:
    sender = Sender()
    r, budget, ledger = relay(base_settings, sender)
    record = draft().record("upstream_error", 502)
    r.account(None, record)
    sender.futures[0].set_exception(ConnectionError("reset"))
    await settle_callbacks()
    await r.drain()
    assert ledger.direct == [record]
    assert budget.owed == []
