"""What a budget looks like to the caller: its period, its state, its headers and its messages."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime

from .. import i18n
from .rows import Limit


@functools.lru_cache(maxsize=64)
def rfc3339(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class Quota:
    """One budget as the caller sees it."""

    limit: Limit
    used: int
    reserved: int
    resets_at: datetime | None

    @property
    def remaining(self) -> int:
        return max(self.limit.tokens - self.used, 0)

    @property
    def state(self) -> str:
        if self.used >= self.limit.tokens:
            return "blocked"
        if self.used >= self.limit.warn_ratio * self.limit.tokens:
            return "warn"
        return "ok"

    def with_used(self, used: int) -> Quota:
        return Quota(self.limit, used, self.reserved, self.resets_at)

    def headers(self) -> dict[str, str]:
        h = {
            "X-Quota-Limit": str(self.limit.tokens),
            "X-Quota-Used": str(self.used),
            "X-Quota-Remaining": str(self.remaining),
            "X-Quota-State": self.state,
        }
        if self.resets_at is not None:
            h["X-Quota-Reset"] = rfc3339(self.resets_at)
        return h

    def as_json(self) -> dict[str, object]:
        tokens = self.limit.tokens
        return {
            "subject_type": self.limit.subject_type,
            "budget_row": self.limit.subject,  # which row set it: the subject's own, a group's, or the default
            "model": self.limit.model or None,  # a cap on the models matching this glob, inside the budget
            "period": self.limit.period,
            "limit": tokens,
            "used": self.used,
            "reserved": self.reserved,
            "remaining": self.remaining,
            "percent": round(100.0 * self.used / tokens, 1) if tokens else 100.0,
            "state": self.state,
            "resets_at": rfc3339(self.resets_at) if self.resets_at else None,
        }

    def notice(self, locale: str = "en") -> str | None:
        """The line added to a streamed answer once the user is past the warn ratio; the answer that uses
        the budget up says the next message will be refused, and until when."""
        state = self.state
        if state == "ok":
            return None
        period = i18n.text(locale, f"period.{self.limit.period}")
        used, limit = i18n.number(self.used, locale), i18n.number(self.limit.tokens, locale)
        if state == "blocked":
            until = (
                i18n.text(locale, "notice.until", at=i18n.moment(self.resets_at, locale))
                if self.resets_at
                else i18n.text(locale, "notice.until_admin")
            )
            return "\n\n> " + i18n.text(locale, "notice.blocked", period=period, used=used, limit=limit, until=until)
        percent = int(100 * self.used / self.limit.tokens)
        return "\n\n> " + i18n.text(locale, "notice.warn", percent=percent, period=period, used=used, limit=limit)

    def refusal(self, subject: str, locale: str = "en") -> str:
        """What a person reads in LibreChat when this budget stops a request."""
        t = functools.partial(i18n.text, locale)
        period = t(f"period.{self.limit.period}")
        team = self.limit.subject_type != "user"
        what = t("refusal.what_team", subject=subject, period=period) if team else t("refusal.what", period=period)
        what = what[0].upper() + what[1:]
        if self.limit.model:
            what = t("refusal.for_models", what=what, model=self.limit.model)
        resets = (
            t("refusal.resets", at=i18n.moment(self.resets_at, locale)) if self.resets_at else t("refusal.no_reset")
        )
        n = functools.partial(i18n.number, locale=locale)
        used, limit = n(self.used), n(self.limit.tokens)
        if self.used >= self.limit.tokens:
            return t("refusal.used_up", what=what, used=used, limit=limit, resets=resets)
        if self.reserved:
            return t("refusal.in_progress", what=what, used=used, limit=limit, reserved=n(self.reserved), resets=resets)
        if not self.used:
            key = "refusal.too_large_team" if team else "refusal.too_large"
            return t(key, subject=subject, period=period, limit=limit, resets=resets)
        # Nothing in flight, yet too little left for this request's prompt (a long conversation, say).
        left = n(self.limit.tokens - self.used)
        return t("refusal.nearly", what=what, used=used, limit=limit, left=left, resets=resets)


def unknown_quota_headers(quota: Quota) -> dict[str, str]:
    """While Redis is unreachable the limit is known, the spend is not."""
    h = quota.headers()
    del h["X-Quota-Used"], h["X-Quota-Remaining"]
    h["X-Quota-State"] = "unknown"
    return h


@dataclass(frozen=True, slots=True)
class Scope:
    """A budget that applies to a request, and where its counter lives in Redis."""

    limit: Limit
    subject: str
    key: str
    start: datetime
    end: datetime | None


@dataclass(frozen=True, slots=True)
class Rates:
    """The caller's per-minute limits and what the sliding window held before this request."""

    rpm: int
    tpm: int
    requests: int
    tokens: int
    reset_seconds: int

    def headers(self) -> dict[str, str]:
        h: dict[str, str] = {}
        if self.rpm:
            h["X-RateLimit-Limit-Requests"] = str(self.rpm)
            h["X-RateLimit-Remaining-Requests"] = str(max(self.rpm - self.requests - 1, 0))
            h["X-RateLimit-Reset-Requests"] = f"{self.reset_seconds}s"
        if self.tpm:
            h["X-RateLimit-Limit-Tokens"] = str(self.tpm)
            h["X-RateLimit-Remaining-Tokens"] = str(max(self.tpm - self.tokens, 0))
            h["X-RateLimit-Reset-Tokens"] = f"{self.reset_seconds}s"
        return h


@dataclass(slots=True)
class Reservation:
    request_id: str
    scopes: tuple[Scope, ...]
    keys: tuple[str, ...]  # the scopes' counters, then the rate hash when there are rate limits
    granted: int
    quotas: list[Quota]
    rates: Rates | None
    metered: bool = True  # False: let through while Redis was unreachable (FAIL_MODE=open), or exempt
    exempt: bool = False  # a request to one of EXEMPT_MODELS: nothing reserved, nothing to settle

    def headers(self, used: int | None = None) -> dict[str, str]:
        """Response headers: the user's budget (with `used` once the real usage is known), and rate limits."""
        if not self.metered:
            h = unknown_quota_headers(self.quotas[0])
            if self.exempt:
                h["X-Quota-State"] = "exempt"
            return h
        quota = self.quotas[0] if used is None else self.quotas[0].with_used(used)
        h = quota.headers()
        if self.rates is not None:
            h.update(self.rates.headers())
        return h
