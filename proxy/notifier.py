"""Budget alerts, sending them: the notifier beside the ledger writer delivers the outbox's rows.

Each notification has one row per channel in `alert_deliveries`, holding its state, attempts, next
attempt and last error, so a restart carries on where it stopped and one failing channel never makes
the others send again. A batch of due rows is claimed with `for update skip locked` and leased in the same
statement (their next attempt moved past any send's end), so two notifiers never send the same row and
no transaction stays open while receivers answer. A crash between a receiver's answer
and the outcome's write sends the row again once the lease ends, with the same idempotency key
(docs/alerts.md).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import orjson
import structlog

from . import i18n, metrics
from .alerts import Channel, channels
from .budget.quota import rfc3339
from .config import Settings
from .db import PG_UNAVAILABLE

log = structlog.get_logger("proxy.notifier")

SIGNATURE_HEADER = "X-Quota-Signature"
EVENT = "budget.threshold_crossed"
BATCH = 50

_CLAIM = """
with due as (
    select notification_id, channel, target from alert_deliveries
    where state = 'pending' and next_attempt_at <= $1
    order by next_attempt_at
    limit $2
    for update skip locked
), leased as (
    update alert_deliveries d set next_attempt_at = $3
    from due
    where d.notification_id = due.notification_id and d.channel = due.channel and d.target = due.target
    returning d.notification_id, d.channel, d.target, d.attempts
)
select d.notification_id, d.channel, d.target, d.attempts, o.key, o.subject_type, o.subject, o.threshold,
       o.period, o.period_start, o.resets_at, o.token_limit, o.used, o.created_at
from leased d join alert_outbox o on o.id = d.notification_id
"""
_SENT = """
update alert_deliveries set state = 'sent', attempts = attempts + 1, sent_at = $4, last_error = null
where notification_id = $1 and channel = $2 and target = $3 and next_attempt_at = $5
"""
_FAILED = """
update alert_deliveries set state = $4, attempts = attempts + 1, next_attempt_at = $5, last_error = $6
where notification_id = $1 and channel = $2 and target = $3 and next_attempt_at = $7
"""


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """The X-Quota-Signature value: `t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>." + body>`."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(secret: str, header: str, body: bytes, now: float, tolerance: float = 300.0) -> bool:
    """What a receiver does with X-Quota-Signature (docs/alerts.md has it for receivers to copy)."""
    parts = dict(p.split("=", 1) for p in header.split(",") if "=" in p)
    try:
        timestamp = int(parts["t"])
    except (KeyError, ValueError):
        return False
    expected = sign(secret, timestamp, body).rsplit("v1=", 1)[1]
    return abs(now - timestamp) <= tolerance and hmac.compare_digest(expected, parts.get("v1", ""))


def payload(row: asyncpg.Record) -> dict[str, Any]:
    """The generic webhook's JSON body."""
    limit, used = row["token_limit"], row["used"]
    return {
        "id": row["key"],
        "type": EVENT,
        "created_at": rfc3339(row["created_at"].astimezone(UTC)),
        "subject_type": row["subject_type"],
        "subject": row["subject"],
        "threshold": row["threshold"],
        "period": row["period"],
        "period_start": None if row["resets_at"] is None else rfc3339(row["period_start"].astimezone(UTC)),
        "resets_at": None if row["resets_at"] is None else rfc3339(row["resets_at"].astimezone(UTC)),
        "token_limit": limit,
        "used": used,
        "percent": round(100 * used / limit, 1),
        "state": "blocked" if used >= limit else "warn",
    }


def message(data: dict[str, Any]) -> str:
    """One line for people (operators: in English, whatever LOCALE says for the users' messages)."""
    period = i18n.text("en", f"period.{data['period']}")
    resets = f" It resets on {data['resets_at'][:16].replace('T', ' ')} UTC." if data["resets_at"] else ""
    return (
        f"{data['subject_type'].capitalize()} {data['subject']} has used {data['percent']:g} % of their {period}"
        f" token budget ({data['used']:,} of {data['token_limit']:,} tokens), past its {100 * data['threshold']:g} %"
        f" alert threshold.{resets}"
    )


def slack_text(text: str) -> str:
    """Text as Slack's mrkdwn shows it literally: `<!channel>`, `<@U…>` and `<url|label>` in a user's or a
    tenant's name must not ping a channel or show a link (Slack asks for &, < and > escaped so)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(data: dict[str, Any]) -> dict[str, Any]:
    """Slack's incoming-webhook format: `text` (shown in notifications) and the same as a block."""
    text = slack_text(message(data))
    icon = ":no_entry:" if data["state"] == "blocked" else ":warning:"
    return {
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"{icon} {text}"}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": f"quota-sidecar alert `{data['id']}`"}]},
        ],
    }


class Notifier:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self._pool = pool
        self._settings = settings
        self._channels = {(c.kind, c.target): c for c in channels(settings)}
        self._clock = clock
        self._client = client or httpx.AsyncClient(
            timeout=settings.alert_timeout_seconds, headers={"User-Agent": "quota-sidecar-alerts"}
        )
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """New rows are in the outbox: send them now rather than at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Send what is due, forever; PostgreSQL unreachable only delays it."""
        try:
            while True:
                sent = 0
                try:
                    sent = await self.send_due()
                    metrics.NOTIFICATIONS_PENDING.set(await self.pending())
                except PG_UNAVAILABLE as exc:
                    log.warning("alert_delivery_paused", error=str(exc) or exc.__class__.__name__)
                except Exception:  # never let one bad row stop every alert: log it, and try again later
                    log.exception("alert_delivery_error")
                if sent < BATCH:  # a full batch: there may be more due at once
                    try:
                        await asyncio.wait_for(self._wake.wait(), self._settings.alert_poll_seconds)
                    except TimeoutError:
                        pass
                    self._wake.clear()
        finally:
            await self._client.aclose()

    async def pending(self) -> int:
        return int(await self._pool.fetchval("select count(*) from alert_deliveries where state = 'pending'"))

    async def send_due(self) -> int:
        """Claim the deliveries due now, send them, and write down each outcome; returns how many were tried."""
        s, now = self._settings, self._clock()
        at = datetime.fromtimestamp(now, UTC)
        # Claimed and leased in one statement, committed before anything is sent: a slow receiver holds
        # no transaction and no connection. Every send ends within ALERT_TIMEOUT_SECONDS, well inside the
        # lease; a notifier that dies mid-send leaves its rows to be sent again when the lease ends.
        lease = at + timedelta(seconds=2 * s.alert_timeout_seconds + 60)
        rows = await self._pool.fetch(_CLAIM, at, BATCH, lease)
        if not rows:
            return 0
        errors = await asyncio.gather(*(self._deliver(row, now) for row in rows))
        async with self._pool.acquire() as conn:
            for row, error in zip(rows, errors, strict=True):
                # Written only while the lease is still this notifier's: once it ended, another may have
                # leased the row again, and its outcome is the one to keep.
                pk = (row["notification_id"], row["channel"], row["target"])
                if error is None:
                    metrics.NOTIFICATIONS_SENT.labels(row["channel"]).inc()
                    await conn.execute(_SENT, *pk, at, lease)
                    continue
                metrics.NOTIFICATIONS_FAILED.labels(row["channel"]).inc()
                attempts = row["attempts"] + 1
                delay = min(s.alert_retry_seconds * 2 ** min(attempts - 1, 30), s.alert_retry_max_seconds)
                give_up = (at - row["created_at"]).total_seconds() >= s.alert_give_up_seconds
                state = "failed" if give_up or error.startswith("not configured") else "pending"
                await conn.execute(_FAILED, *pk, state, at + timedelta(seconds=delay), error[:1000], lease)
                log.warning(
                    "alert_delivery_failed",
                    key=row["key"],
                    channel=row["channel"],
                    attempts=attempts,
                    error=error,
                    state=state,
                    retry_in=delay if state == "pending" else None,
                )
        return len(rows)

    async def _deliver(self, row: asyncpg.Record, now: float) -> str | None:
        """Send one delivery; None when the receiver took it, else what went wrong."""
        channel = self._channels.get((row["channel"], row["target"]))
        if channel is None:  # ALERT_WEBHOOK_URLS changed since the crossing: nowhere to send it
            return "not configured any more"
        data = payload(row)
        try:
            # httpx's timeout bounds each phase (connect, write, read); this bounds the attempt, inside the lease.
            async with asyncio.timeout(self._settings.alert_timeout_seconds):
                response = await self._post(channel, data, now)
        except TimeoutError:
            return f"no answer within {self._settings.alert_timeout_seconds:g} s"
        except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL is no HTTPError: a URL httpx cannot parse
            return f"{exc.__class__.__name__}: {exc}".rstrip(": ")
        if response.is_success:
            return None
        return f"HTTP {response.status_code}: {response.text[:200]}"

    async def _post(self, channel: Channel, data: dict[str, Any], now: float) -> httpx.Response:
        headers = {"Content-Type": "application/json", "Idempotency-Key": data["id"]}
        if channel.kind == "slack":
            return await self._client.post(channel.url, content=orjson.dumps(slack_body(data)), headers=headers)
        body = orjson.dumps(data)
        headers[SIGNATURE_HEADER] = sign(self._settings.alert_webhook_secret, int(now), body)
        return await self._client.post(channel.url, content=body, headers=headers)
