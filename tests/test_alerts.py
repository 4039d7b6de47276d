"""Budget alerts: crossings found after ledger batches (proxy/alerts.py), sent by the notifier
(proxy/notifier.py) to a real HTTP receiver on a loopback port. Back-off is driven by injected clocks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest
import redis.asyncio as aioredis
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from proxy import metrics
from proxy.alerts import AlertDetector, channels, parse_thresholds
from proxy.budget.rows import Limit, set_budget
from proxy.config import Settings
from proxy.ledger import Ledger
from proxy.notifier import SIGNATURE_HEADER, Notifier, sign, verify
from proxy.records import UsageRecord, as_rows, insert_records, spent

from .devstack import free_port
from .helpers import serve, uid

pytestmark = pytest.mark.anyio

SECRET = "whsec-test-0123456789"
HOUR = 3600.0


@dataclass
class Receiver:
    """An HTTP receiver that keeps what it was sent; it answers `status`, after `delay` seconds."""

    received: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    status: int = 200
    delay: float = 0.0

    @property
    def app(self) -> Starlette:
        async def hook(request: Request) -> Response:
            body = await request.body()
            if self.delay:
                await asyncio.sleep(self.delay)
            self.received.append((request.path_params["name"], dict(request.headers), body))
            return Response("ok", status_code=self.status)

        return Starlette(routes=[Route("/{name}", hook, methods=["POST"])])

    def bodies(self, name: str) -> list[dict[str, Any]]:
        return [orjson.loads(body) for n, _, body in self.received if n == name]


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def clean(pg_pool: asyncpg.Pool) -> None:
    """Deliveries left by another test would be due for this one's notifier."""
    await pg_pool.execute("truncate alert_outbox, alert_deliveries")


def alert_settings(base: Settings, url: str, **kw: Any) -> Settings:
    values: dict[str, Any] = {
        "alert_webhook_urls": (f"{url}/webhook",),
        "alert_webhook_secret": SECRET,
        "alert_slack_webhook_url": f"{url}/slack",
        "alert_retry_seconds": 10.0,
        "alert_retry_max_seconds": 600.0,
    }
    return replace(base, **(values | kw))


def usage(user: str, tokens: int, at: float, tenant: str | None = None, **kw: Any) -> UsageRecord:
    return UsageRecord(
        request_id=uid("req"),
        created_at=at,
        user_id=user,
        tenant_id=tenant,
        model="mock-gpt",
        served_model="mock-gpt",
        endpoint="chat",
        prompt_tokens=0,
        completion_tokens=tokens,
        total_tokens=tokens,
        cost_usd=None,
        status="ok",
        http_status=200,
        stream=False,
        estimated=False,
        latency_ms=1.0,
        ttft_ms=None,
        **kw,
    )


class Writer:
    """A ledger writer with alert detection on its own stream, driven batch by batch."""

    def __init__(self, client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings, clock: Clock) -> None:
        self.clock = clock
        detector = AlertDetector(parse_thresholds(",".join(settings.alert_thresholds)), channels(settings), clock=clock)
        self.ledger = Ledger(client, pool, stream=f"test:alerts:{uid()}", consumer="alerts", alerts=detector)
        self.client = client

    async def write(self, *records: UsageRecord) -> None:
        await self.ledger.ensure_group()
        for r in records:
            await self.client.execute_command(*self.ledger.command(r))
        assert await self.ledger.drain_once(block=False) == len(records)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The notifiers' HTTP client, closed after the test (a notifier's `run` closes its own)."""
    async with httpx.AsyncClient(timeout=5) as client:
        yield client


@pytest.fixture
async def receiver() -> AsyncIterator[tuple[Receiver, str]]:
    rec = Receiver()
    with serve(rec.app) as url:
        yield rec, url


async def budget(pool: asyncpg.Pool, user: str, tokens: int, **kw: Any) -> None:
    async with pool.acquire() as conn:
        await set_budget(conn, Limit("user", user, "month", tokens, 0.8, **kw))


async def rows(pool: asyncpg.Pool, subject: str) -> list[asyncpg.Record]:
    return await pool.fetch("select * from alert_notifications where subject = $1 order by threshold, channel", subject)


def counter(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


async def crossed(client: aioredis.Redis, pool: asyncpg.Pool, settings: Settings, limit: int) -> tuple[Clock, str]:
    """A new user with a budget of `limit` tokens who has just used all of it, recorded by a writer: the clock
    the writer saw it by, and the user."""
    clock, user = Clock(time.time()), uid()
    await budget(pool, user, limit)
    await Writer(client, pool, settings, clock).write(usage(user, limit, clock.now))
    return clock, user


async def test_crossing_80_then_100_percent_sends_two_signed_notifications_to_each_channel(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    settings = alert_settings(base_settings, url)
    clock = Clock(time.time())
    writer, notifier = (
        Writer(redis_client, pg_pool, settings, clock),
        Notifier(pg_pool, settings, clock=clock, client=http),
    )
    user = uid()
    await budget(pg_pool, user, 1000)
    sent_before = counter("quota_notifications_sent_total", channel="webhook")

    await writer.write(usage(user, 500, clock.now), usage(user, 299, clock.now))  # 79.9 %
    assert await rows(pg_pool, user) == []
    await writer.write(usage(user, 1, clock.now))  # 80 %
    assert await notifier.send_due() == 2
    await writer.write(usage(user, 150, clock.now))  # 95 %: no threshold
    assert await notifier.send_due() == 0
    await writer.write(usage(user, 60, clock.now))  # 101 %
    assert await notifier.send_due() == 2

    hooks = rec.bodies("webhook")
    assert [(h["threshold"], h["used"], h["token_limit"], h["state"]) for h in hooks] == [
        (0.8, 800, 1000, "warn"),
        (1.0, 1010, 1000, "blocked"),
    ]
    first = hooks[0]
    assert first["type"] == "budget.threshold_crossed" and first["subject"] == user and first["percent"] == 80.0
    assert first["subject_type"] == "user" and first["period"] == "month" and first["resets_at"].endswith("Z")
    assert hooks[0]["id"] != hooks[1]["id"]
    for name, headers, body in rec.received:
        if name == "webhook":
            assert headers["idempotency-key"] == orjson.loads(body)["id"]
            assert verify(SECRET, headers[SIGNATURE_HEADER.lower()], body, clock.now)
            assert not verify("another-secret", headers[SIGNATURE_HEADER.lower()], body, clock.now)
            assert not verify(SECRET, headers[SIGNATURE_HEADER.lower()], body.replace(b"1000", b"9000"), clock.now)
    slack = rec.bodies("slack")
    assert len(slack) == 2 and set(slack[0]) == {"text", "blocks"}
    assert slack[0]["text"].startswith(f"User {user} has used 80 % of their monthly token budget (800 of 1,000")
    assert slack[0]["blocks"][0]["type"] == "section" and slack[1]["blocks"][0]["text"]["type"] == "mrkdwn"
    assert [h["idempotency-key"] for n, h, _ in rec.received if n == "slack"] == [h["id"] for h in hooks]

    history = await rows(pg_pool, user)
    assert [(r["threshold"], r["channel"], r["state"], r["attempts"]) for r in history] == [
        (0.8, "slack", "sent", 1),
        (0.8, "webhook", "sent", 1),
        (1.0, "slack", "sent", 1),
        (1.0, "webhook", "sent", 1),
    ]
    assert counter("quota_notifications_sent_total", channel="webhook") == sent_before + 2
    assert await notifier.pending() == 0


async def test_a_receiver_down_for_an_hour_gets_them_late_and_once(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None, http: httpx.AsyncClient
) -> None:
    rec, port = Receiver(), free_port()
    settings = alert_settings(base_settings, f"http://127.0.0.1:{port}", alert_slack_webhook_url="")
    clock = Clock(time.time())
    writer, notifier = (
        Writer(redis_client, pg_pool, settings, clock),
        Notifier(pg_pool, settings, clock=clock, client=http),
    )
    user = uid()
    await budget(pg_pool, user, 100)
    failed_before = counter("quota_notifications_failed_total", channel="webhook")

    await writer.write(usage(user, 100, clock.now))  # 80 % and 100 % at once: two notifications
    attempts_at: list[float] = []
    while len(attempts_at) < 6:  # down: connection refused
        if await notifier.send_due():
            attempts_at.append(clock.now)
        clock.now += 5
    gaps = [round(b - a) for a, b in zip(attempts_at, attempts_at[1:], strict=False)]
    assert gaps == [10, 20, 40, 80, 160]  # back-off doubling from ALERT_RETRY_SECONDS
    history = await rows(pg_pool, user)
    assert {r["state"] for r in history} == {"pending"} and history[0]["attempts"] == len(attempts_at)
    assert "ConnectError" in history[0]["last_error"]
    assert await notifier.pending() == 2
    assert counter("quota_notifications_failed_total", channel="webhook") == failed_before + 2 * len(attempts_at)

    with serve(rec.app, port=port):
        clock.now += HOUR
        assert await notifier.send_due() == 2
        for _ in range(3):
            clock.now += HOUR
            assert await notifier.send_due() == 0
    assert sorted(h["threshold"] for h in rec.bodies("webhook")) == [0.8, 1.0]  # once each
    assert {r["state"] for r in await rows(pg_pool, user)} == {"sent"}


async def test_a_notifier_restarted_mid_retry_sends_once(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    settings = alert_settings(base_settings, url, alert_thresholds=("1.0",))
    clock, user = await crossed(redis_client, pg_pool, settings, 100)
    rec.status = 503  # the receiver refuses the first attempts
    first = Notifier(pg_pool, settings, clock=clock, client=http)
    assert await first.send_due() == 2
    del first  # the notifier's process dies: what it knew is in PostgreSQL

    rec.status = 200
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as other_pool:
        restarted = Notifier(other_pool, settings, clock=clock, client=http)
        assert await restarted.send_due() == 0  # the back-off survived the restart: not due yet
        clock.now += 10
        assert await restarted.send_due() == 2
        clock.now += HOUR
        assert await restarted.send_due() == 0
    assert [(n, orjson.loads(b).get("threshold")) for n, _, b in rec.received if n == "webhook"] == [
        ("webhook", 1.0),
        ("webhook", 1.0),
    ]  # the refused attempt and the one that was taken
    history = await rows(pg_pool, user)
    assert [(r["channel"], r["state"], r["attempts"], r["last_error"]) for r in history] == [
        ("slack", "sent", 2, None),
        ("webhook", "sent", 2, None),
    ]


async def test_two_notifiers_at_once_send_each_delivery_once(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    rec.delay = 0.2  # the first notifier holds its rows while the second looks for work
    settings = alert_settings(base_settings, url, alert_thresholds=("1.0",))
    clock = Clock(time.time())
    writer = Writer(redis_client, pg_pool, settings, clock)
    users = [uid() for _ in range(6)]
    for user in users:
        await budget(pg_pool, user, 10)
    await writer.write(*(usage(user, 10, clock.now) for user in users))
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as other_pool:
        one, two = (
            Notifier(pg_pool, settings, clock=clock, client=http),
            Notifier(other_pool, settings, clock=clock, client=http),
        )
        tried = await asyncio.gather(one.send_due(), two.send_due(), one.send_due(), two.send_due())
    assert sum(tried) == 12
    keys = [(n, h["idempotency-key"]) for n, h, _ in rec.received]
    assert len(keys) == len(set(keys)) == 12
    assert sorted(h["subject"] for h in rec.bodies("webhook")) == sorted(users)


async def test_a_slow_receiver_holds_no_transaction_and_a_notifier_dying_mid_send_is_replaced_after_its_lease(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    rec.delay = 1.0
    settings = alert_settings(base_settings, url, alert_thresholds=("1.0",), alert_timeout_seconds=5.0)
    clock, user = await crossed(redis_client, pg_pool, settings, 10)
    async with asyncpg.create_pool(settings.database_url, min_size=1, max_size=2) as other_pool:
        first, second = (
            Notifier(pg_pool, settings, clock=clock, client=http),
            Notifier(other_pool, settings, clock=clock, client=http),
        )
        sending = asyncio.create_task(first.send_due())
        await asyncio.sleep(0.4)  # the receivers are still thinking
        open_transactions = await other_pool.fetchval(
            "select count(*) from pg_stat_activity where datname = current_database()"
            " and state like 'idle in transaction%'"
        )
        assert open_transactions == 0
        assert await second.send_due() == 0  # leased: not sent twice meanwhile
        sending.cancel()  # the notifier dies mid-send: nothing about these rows is written
        with pytest.raises(asyncio.CancelledError):
            await sending
        clock.now += 60
        assert await second.send_due() == 0  # still inside the lease (2 x ALERT_TIMEOUT_SECONDS + 60 s)
        clock.now += 11
        rec.delay = 0.0
        assert await second.send_due() == 2
    history = await rows(pg_pool, user)
    sent = [("slack", "sent", 1), ("webhook", "sent", 1)]
    assert [(r["channel"], r["state"], r["attempts"]) for r in history] == sent
    # At least once: the receivers that were answering when the first died got it again, with the same key.
    keys = [h["idempotency-key"] for n, h, _ in rec.received if n == "webhook"]
    assert len(set(keys)) == 1 and 1 <= len(keys) <= 2


async def test_an_attempt_is_bounded_by_the_alert_timeout(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    rec.delay = 3.0  # slower than the attempt may take, though each phase of httpx's own timeout (5 s) allows it
    settings = alert_settings(base_settings, url, alert_thresholds=("1.0",), alert_timeout_seconds=0.5)
    clock, user = await crossed(redis_client, pg_pool, settings, 10)
    started = time.monotonic()
    assert await Notifier(pg_pool, settings, clock=clock, client=http).send_due() == 2
    assert time.monotonic() - started < 2.0
    history = await rows(pg_pool, user)
    assert [(r["state"], r["attempts"], r["last_error"]) for r in history] == [
        ("pending", 1, "no answer within 0.5 s"),
        ("pending", 1, "no answer within 0.5 s"),
    ]


async def test_a_crossing_seen_again_makes_no_second_row(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None
) -> None:
    settings = alert_settings(base_settings, "http://127.0.0.1:9")
    clock = Clock(time.time())
    user = uid()
    await budget(pg_pool, user, 100)
    record = usage(user, 90, clock.now)
    await Writer(redis_client, pg_pool, settings, clock).write(record)
    # The batch replayed (a writer died before its XACK), checked by two writers at once.
    detector = AlertDetector((0.8, 1.0), channels(settings), clock=clock)
    async with pg_pool.acquire() as a, pg_pool.acquire() as b:
        assert await insert_records(a, [record.encode()], set()) == 0  # already recorded
        subjects = spent(as_rows([record.encode()]))
        found = await asyncio.gather(detector.check(a, subjects), detector.check(b, subjects))
    assert found == [0, 0]
    history = await rows(pg_pool, user)
    assert [(r["threshold"], r["channel"], r["used"]) for r in history] == [(0.8, "slack", 90), (0.8, "webhook", 90)]
    # The per-day sums the check reads counted the record once, however often it was inserted.
    assert await pg_pool.fetchval("select sum(counted) from usage_user_day where user_id = $1", user) == 90


async def test_two_writers_finding_the_same_crossing_at_once_write_one_row(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None
) -> None:
    settings = alert_settings(base_settings, "http://127.0.0.1:9", alert_thresholds=("0.5",))
    clock = Clock(time.time())
    user = uid()
    await budget(pg_pool, user, 100)
    one, two = Writer(redis_client, pg_pool, settings, clock), Writer(redis_client, pg_pool, settings, clock)
    await asyncio.gather(one.write(usage(user, 30, clock.now)), two.write(usage(user, 30, clock.now)))
    assert [r["threshold"] for r in await rows(pg_pool, user)] == [0.5, 0.5]  # one notification, two channels
    assert len({r["id"] for r in await rows(pg_pool, user)}) == 1


async def test_thresholds_of_a_budget_row_tenants_exempt_requests_and_a_new_period(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None
) -> None:
    settings = replace(base_settings, alert_thresholds=("0.8", "1.0"))
    clock = Clock(time.time())
    writer = Writer(redis_client, pg_pool, settings, clock)
    own, silent, tenant = uid(), uid(), uid("t")
    await budget(pg_pool, own, 100, alert_thresholds=(0.25, 0.5))
    await budget(pg_pool, silent, 100, alert_thresholds=())
    async with pg_pool.acquire() as conn:
        await set_budget(conn, Limit("tenant", tenant, "day", 200, 0.8))
    await writer.write(
        usage(own, 60, clock.now, tenant=tenant),
        usage(own, 500, clock.now, exempt=True),  # exempt: recorded, never counted
        usage(silent, 100, clock.now, tenant=tenant),
    )
    assert [r["threshold"] for r in await rows(pg_pool, own)] == [0.25, 0.5]  # its own, not 0.8 (60 %)
    assert await rows(pg_pool, silent) == []
    tenant_rows = await rows(pg_pool, tenant)
    assert [(r["subject_type"], r["threshold"], r["used"], r["state"]) for r in tenant_rows] == [
        ("tenant", 0.8, 160, "recorded")  # no channel configured: recorded for the view only
    ]
    clock.now += 86400  # the tenant's next day: its budget starts again, and so do its alerts
    await writer.write(usage(uid(), 170, clock.now, tenant=tenant))
    assert [r["period_start"].timestamp() for r in await rows(pg_pool, tenant)] == sorted(
        {tenant_rows[0]["period_start"].timestamp(), tenant_rows[0]["period_start"].timestamp() + 86400}
    )


async def test_a_user_on_a_group_tier_is_judged_by_the_tier_and_by_the_default_once_it_goes(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None
) -> None:
    settings = replace(base_settings, alert_thresholds=("0.8", "1.0"))
    clock = Clock(time.time())
    writer = Writer(redis_client, pg_pool, settings, clock)
    stingy, generous, small, big = uid("stingy"), uid("generous"), uid(), uid()
    async with pg_pool.acquire() as conn:
        await set_budget(conn, Limit("user", "*", "month", 100_000, 0.8))  # the default, as the environment has it
        await set_budget(conn, Limit("group", stingy, "month", 1000, 0.8, alert_thresholds=(0.5,)))
        await set_budget(conn, Limit("group", generous, "month", 1_000_000, 0.8))
    await writer.write(
        usage(small, 400, clock.now, _budget_group=stingy),  # 40 % of the tier
        usage(big, 85_000, clock.now, _budget_group=generous),  # 8.5 % of the tier, 85 % of the default
    )
    assert await rows(pg_pool, small) == [] and await rows(pg_pool, big) == []
    await writer.write(usage(small, 100, clock.now, _budget_group=stingy))  # the tier's own threshold, 50 %
    assert [(r["threshold"], r["token_limit"], r["used"]) for r in await rows(pg_pool, small)] == [(0.5, 1000, 500)]
    # The generous tier's row is deleted: the default judges big again, from their next batch on.
    await pg_pool.execute("delete from budgets where subject_type = 'group' and subject = $1", generous)
    await writer.write(usage(big, 1, clock.now, _budget_group=generous))
    assert [(r["threshold"], r["token_limit"], r["used"]) for r in await rows(pg_pool, big)] == [(0.8, 100_000, 85_001)]


async def test_a_batch_with_a_record_postgresql_refuses_still_alerts_for_the_others(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool, clean: None
) -> None:
    settings = replace(base_settings, alert_thresholds=("0.8",))
    clock = Clock(time.time())
    writer = Writer(redis_client, pg_pool, settings, clock)
    crossing, refused = uid(), uid()
    await budget(pg_pool, crossing, 100)
    await budget(pg_pool, refused, 100)
    await writer.ledger.ensure_group()
    bad = usage(refused, 95, clock.now)
    bad.prompt_tokens = 2**40  # past PostgreSQL's integer: the batch is retried record by record
    for r in (usage(crossing, 90, clock.now), bad):
        await redis_client.execute_command(*writer.ledger.command(r))
    await redis_client.xadd(writer.ledger.stream, {"r": b"not a record"})
    assert await writer.ledger.drain_once(block=False) == 3
    assert [r["threshold"] for r in await rows(pg_pool, crossing)] == [0.8]
    assert await rows(pg_pool, refused) == []  # never recorded, so never counted
    assert await redis_client.xlen(f"{writer.ledger.stream}:rejected") == 2


async def test_a_delivery_failing_past_the_give_up_time_is_marked_failed(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    rec.status = 410
    settings = alert_settings(base_settings, url, alert_slack_webhook_url="", alert_give_up_seconds=HOUR)
    clock = Clock(time.time())
    writer, notifier = (
        Writer(redis_client, pg_pool, settings, clock),
        Notifier(pg_pool, settings, clock=clock, client=http),
    )
    user = uid()
    await budget(pg_pool, user, 10, alert_thresholds=(1.0,))
    await writer.write(usage(user, 10, clock.now))
    while await notifier.pending():
        await notifier.send_due()
        clock.now += 60
    [row] = await rows(pg_pool, user)
    assert row["state"] == "failed" and row["last_error"].startswith("HTTP 410")
    assert 10 <= row["attempts"] <= 14  # back-off: 10, 20, 40 ... 600 s over the hour, not one a minute


async def test_a_webhook_removed_from_the_configuration_is_not_sent(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    rec, url = receiver
    old = alert_settings(base_settings, url, alert_slack_webhook_url="", alert_thresholds=("1.0",))
    clock = Clock(time.time())
    user = uid()
    await budget(pg_pool, user, 10)
    await Writer(redis_client, pg_pool, old, clock).write(usage(user, 10, clock.now))
    new = replace(old, alert_webhook_urls=(f"{url}/other",))
    assert await Notifier(pg_pool, new, clock=clock, client=http).send_due() == 1
    assert rec.received == []
    [row] = await rows(pg_pool, user)
    assert (row["state"], row["last_error"]) == ("failed", "not configured any more")


def test_signature_format_and_replay_window() -> None:
    body = b'{"id":"x"}'
    header = sign(SECRET, 1_700_000_000, body)
    assert header.startswith("t=1700000000,v1=") and len(header.split("v1=")[1]) == 64
    assert verify(SECRET, header, body, 1_700_000_100)
    assert not verify(SECRET, header, body, 1_700_000_000 + 301)  # too old: a replay
    assert not verify(SECRET, header.replace("t=1700000000", "t=1700000100"), body, 1_700_000_100)
    assert not verify(SECRET, "v1=abc", body, 1_700_000_000)


@pytest.mark.parametrize(
    "env, error",
    [
        ({"ALERT_THRESHOLDS": "0.8,1.5"}, "at most 1"),
        ({"ALERT_THRESHOLDS": "eighty"}, "fractions"),
        ({"ALERT_WEBHOOK_URLS": "https://hooks.example/a"}, "ALERT_WEBHOOK_SECRET"),
        ({"ALERT_SLACK_WEBHOOK_URL": "hooks.slack.com/services/T0/B0/s3cr3t"}, "ALERT_SLACK_WEBHOOK_URL"),
        ({"ALERT_WEBHOOK_URLS": "https://a.example/h, b.example/s3cr3t", "ALERT_WEBHOOK_SECRET": "x"}, "number 2"),
        ({"ALERT_TIMEOUT_SECONDS": "inf"}, "at most 600"),
        ({"ALERT_TIMEOUT_SECONDS": "nan"}, "ALERT_TIMEOUT_SECONDS"),
        ({"ALERT_TIMEOUT_SECONDS": "3600"}, "at most 600"),
    ],
)
def test_settings_refuse_wrong_alert_values(env: dict[str, str], error: str) -> None:
    with pytest.raises(ValueError, match=error) as refused:
        Settings.from_env(env, env_file=None)
    assert "s3cr3t" not in str(refused.value)  # a webhook's path is its secret: never echoed to logs


def test_settings_read_alert_values() -> None:
    s = Settings.from_env(
        {"ALERT_THRESHOLDS": "1, 0.5", "ALERT_WEBHOOK_URLS": "https://a.example/h, https://b.example/h"}
        | {"ALERT_WEBHOOK_SECRET": "s", "ALERT_SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T/B/x"},
        env_file=None,
    )
    assert parse_thresholds(",".join(s.alert_thresholds)) == (0.5, 1.0)
    assert [(c.kind, c.target.split("#")[0]) for c in channels(s)] == [
        ("webhook", "a.example"),
        ("webhook", "b.example"),
        ("slack", ""),
    ]
    assert "services" not in "".join(c.target for c in channels(s))  # the secret part of a URL is not stored


@pytest.fixture
def admin_app(base_settings: Settings) -> Iterator[str]:
    from proxy.app import create_app

    with serve(create_app(base_settings)) as url:
        yield url


def test_thresholds_by_admin_api_and_command_line(
    admin_app: str, base_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    from .helpers import pg_row, token

    admin = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}
    user = uid()
    r = httpx.put(
        f"{admin_app}/admin/budgets/{user}", json={"tokens": 10, "alert_thresholds": [0.9, 0.5]}, headers=admin
    )
    assert r.status_code == 200 and r.json()["alert_thresholds"] == [0.5, 0.9]
    row = pg_row(base_settings.database_url, "select alert_thresholds from budgets where subject = $1", user)
    assert row["alert_thresholds"] == [0.5, 0.9]
    for bad in ([0], [1.5], "0.5", [True], [0.1] * 11):
        r = httpx.put(f"{admin_app}/admin/budgets/{user}", json={"tokens": 10, "alert_thresholds": bad}, headers=admin)
        assert r.status_code == 400 and r.json()["error"]["param"] == "alert_thresholds", r.text

    monkeypatch.setenv("DATABASE_URL", base_settings.database_url)
    monkeypatch.chdir("/")
    assert main(["budget", "set", user, "100", "--alert-thresholds", "0.9,0.6"]) == 0
    assert "alerts at 60%, 90%" in capsys.readouterr().out
    row = pg_row(base_settings.database_url, "select alert_thresholds from budgets where subject = $1", user)
    assert row["alert_thresholds"] == [0.6, 0.9]
    assert main(["budget", "set", user, "100", "--alert-thresholds", "2"]) == 1
    assert "at most 1" in capsys.readouterr().err
    assert main(["budget", "set", user, "100"]) == 0  # no flag: back to ALERT_THRESHOLDS
    row = pg_row(base_settings.database_url, "select alert_thresholds from budgets where subject = $1", user)
    assert row["alert_thresholds"] is None


def test_the_writer_process_sends_alerts_and_a_kill_mid_retry_sends_once(base_settings: Settings, fake: Any) -> None:
    """The whole way: requests, the ledger writer's own process finding the crossing, its notifier retrying
    while the receiver is down, the process killed and restarted, the receiver up: one delivery each."""
    import os
    import signal

    from proxy.app import create_app

    from .devstack import alive
    from .helpers import eventually, pg_row, send

    rec, port = Receiver(), free_port()
    settings = alert_settings(
        replace(base_settings, litellm_base_url=fake.url, ledger_writer="process", ledger_stream=f"test:al:{uid()}"),
        f"http://127.0.0.1:{port}",
        alert_thresholds=("0.5",),
        alert_retry_seconds=0.2,
        alert_retry_max_seconds=3.0,
        alert_poll_seconds=0.2,
    )
    user = uid()

    async def set_row() -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            await set_budget(conn, Limit("user", user, "month", 60, 0.8))
        finally:
            await conn.close()

    asyncio.run(set_row())
    pg_row(settings.database_url, "truncate alert_outbox, alert_deliveries")

    def attempts() -> int:
        row = pg_row(settings.database_url, "select min(attempts) from alert_notifications where subject = $1", user)
        return int(row[0] or 0)

    def backing_off(at_least: float = -60.0) -> bool:
        """Both deliveries failed and wait out a back-off (at most ALERT_RETRY_MAX_SECONDS), not a send's lease
        (a minute or more): a kill inside a lease is delivered only once the lease ends, tested elsewhere."""
        row = pg_row(
            settings.database_url,
            "select count(*) filter (where next_attempt_at >= now() + make_interval(secs => $2)"
            " and next_attempt_at <= now() + make_interval(secs => $3)) from alert_notifications where subject = $1",
            user,
            at_least,
            settings.alert_retry_max_seconds + 1,
        )
        return int(row[0]) == 2

    app = create_app(settings)
    failed, sent = (
        counter(f"quota_notifications_{k}_total", channel=c) for k, c in (("failed", "webhook"), ("sent", "slack"))
    )
    with serve(app) as url:
        send(url, [user], 3)  # 36 of 60 tokens: past 50 %
        eventually(lambda: attempts() >= 2, timeout=30)  # both channels tried, and retried, while down
        # The writer's series reach the proxy's /metrics over its pipe (the counters add to this process's own).
        eventually(lambda: metric(url, "quota_notifications_pending") == 2)
        eventually(lambda: metric(url, 'quota_notifications_failed_total{channel="webhook"}') >= failed + 2)
        # Killed between two tries, with a second to spare before the next one claims the rows.
        eventually(lambda: backing_off(1.0), timeout=30)
        first = app.state.services.writer.pid
        os.kill(first, signal.SIGKILL)
        eventually(lambda: not alive(first))
        assert backing_off(), "the kill came inside a send's lease"
        with serve(rec.app, port=port):
            eventually(lambda: len(rec.received) == 2, timeout=30)
            eventually(lambda: app.state.services.writer.pid not in (None, first))
            time.sleep(1.0)  # five more polls: nothing more comes
            eventually(lambda: metric(url, 'quota_notifications_sent_total{channel="slack"}') == sent + 1)
    assert sorted(name for name, _, _ in rec.received) == ["slack", "webhook"]
    state = pg_row(
        settings.database_url, "select array_agg(distinct state) from alert_notifications where subject = $1", user
    )
    assert state[0] == ["sent"]


def metric(url: str, series: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return 0.0


async def test_an_outcome_written_after_the_lease_ended_does_not_undo_the_next_notifiers(
    base_settings: Settings,
    redis_client: aioredis.Redis,
    pg_pool: asyncpg.Pool,
    receiver: Any,
    clean: None,
    http: httpx.AsyncClient,
) -> None:
    """A notifier whose outcome write comes after its lease (its pool or PostgreSQL stalled) must not overwrite
    what the notifier that leased the rows next wrote: a delivery sent stays sent, not pending again."""
    rec, url = receiver
    settings = alert_settings(base_settings, url, alert_thresholds=("1.0",), alert_timeout_seconds=1.0)
    clock, user = await crossed(redis_client, pg_pool, settings, 10)
    first, second = (
        Notifier(pg_pool, settings, clock=clock, client=http),
        Notifier(pg_pool, settings, clock=clock, client=http),
    )
    answered = asyncio.Event()

    async def late(row: Any, now: float) -> str | None:
        await answered.wait()
        return "HTTP 500: busy"

    first._deliver = late  # type: ignore[method-assign]
    sending = asyncio.create_task(first.send_due())
    await asyncio.sleep(0.2)
    clock.now += 2 * 1.0 + 61  # the first one's lease is over
    assert await second.send_due() == 2
    answered.set()
    assert await sending == 2
    history = await rows(pg_pool, user)
    sent = [("slack", "sent", 1), ("webhook", "sent", 1)]
    assert [(r["channel"], r["state"], r["attempts"]) for r in history] == sent
