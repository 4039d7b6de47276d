"""Budget alerts, finding them: after each ledger batch, which of its subjects crossed a threshold this period.

Nothing of this runs on the request path. The ledger writer calls `AlertDetector.check` once a batch is
in PostgreSQL and before it is acknowledged, so a failed check is retried with the batch. The check is
level-triggered (used >= threshold x limit, judged in PostgreSQL as `budget_status` judges) and the
outbox's unique key keeps each (subject, threshold, period) to one row, so a replayed batch, a second
writer or a check missed once cannot send anything twice or lose it. proxy/notifier.py sends the rows.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import urlsplit

import asyncpg
import structlog

from . import metrics
from .config import Settings

log = structlog.get_logger("proxy.alerts")

MAX_THRESHOLDS = 10


def parse_thresholds(text: str, name: str = "alert thresholds") -> tuple[float, ...]:
    """'0.8,1.0' as (0.8, 1.0): fractions above 0 and at most 1, sorted, without repeats; '' is none."""
    try:
        values = sorted({float(v) for v in text.split(",") if v.strip()})
    except ValueError:
        raise ValueError(f"{name} are fractions, comma-separated (0.8,1.0), not {text[:40]!r}") from None
    if len(values) > MAX_THRESHOLDS or not all(0 < v <= 1 for v in values):
        raise ValueError(f"{name} are at most {MAX_THRESHOLDS} fractions above 0 and at most 1 (0.8,1.0)")
    return tuple(values)


def valid_thresholds(values: object) -> tuple[float, ...] | None:
    """A JSON list of thresholds (the admin API's `alert_thresholds`) checked, or None if it is not one."""
    if not isinstance(values, list) or len(values) > MAX_THRESHOLDS:
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v <= 1 for v in values):
        return None
    return tuple(sorted({float(v) for v in values}))


@dataclass(frozen=True, slots=True)
class Channel:
    kind: str  # 'webhook' | 'slack'
    target: str  # tells apart the webhook URLs in alert_deliveries, without the URL (it may hold a secret)
    url: str


def channels(settings: Settings) -> list[Channel]:
    """The configured channels, each of which gets one delivery per notification."""
    found = [Channel("webhook", webhook_target(url), url) for url in dict.fromkeys(settings.alert_webhook_urls)]
    if settings.alert_slack_webhook_url:
        found.append(Channel("slack", "", settings.alert_slack_webhook_url))
    return found


def webhook_target(url: str) -> str:
    return f"{urlsplit(url).hostname or '?'}#{hashlib.sha256(url.encode()).hexdigest()[:12]}"


# Errors of the check itself rather than of PostgreSQL's availability: a schema not migrated yet, a value
# it refuses. They are logged and the batch goes on, so alerts can never hold up the ledger.
_CHECK_FAILED = (asyncpg.DataError, asyncpg.SyntaxOrAccessError, asyncpg.IntegrityConstraintViolationError)


class AlertDetector:
    def __init__(
        self,
        thresholds: tuple[float, ...],
        channels: list[Channel],
        *,
        clock: Callable[[], float] = time.time,
        on_new: Callable[[], None] | None = None,
    ) -> None:
        self._thresholds = list(thresholds)
        self._channels = [c.kind for c in channels]
        self._targets = [c.target for c in channels]
        self._clock = clock
        self.on_new = on_new  # the notifier in the same process, woken at once rather than at its next poll

    @classmethod
    def for_settings(cls, settings: Settings) -> AlertDetector:
        return cls(parse_thresholds(",".join(settings.alert_thresholds)), channels(settings))

    async def check(self, conn: asyncpg.Connection, spent: set[tuple[str, str]]) -> int:
        """Write the crossings of the (type, subject) pairs a batch spent tokens of to the outbox; returns how
        many were new. Raises PostgreSQL's unavailability, so that the writer retries the batch."""
        types, subjects = [t for t, _ in spent], [s for _, s in spent]
        if not types:
            return 0
        try:
            found = await conn.fetchval(
                "select quota_alert_detect($1, $2, $3, $4, $5, $6)",
                types,
                subjects,
                self._thresholds,
                datetime.fromtimestamp(self._clock(), UTC),
                self._channels,
                self._targets,
            )
        except _CHECK_FAILED as exc:
            log.error("alert_check_failed", error=str(exc), subjects=len(types))
            return 0
        if found:
            metrics.NOTIFICATIONS_RECORDED.inc(found)
            log.info("alert_thresholds_crossed", notifications=found)
            if self.on_new is not None:
                self.on_new()
        return int(found)
