"""proxy/budget/quota.py: budget periods, and what a budget looks like to the caller (state, headers, messages)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from proxy.budget.quota import Quota, Rates, Reservation, Scope, rfc3339, unknown_quota_headers
from proxy.budget.rows import Limit, period_bounds


def at(*parts: int) -> float:
    return datetime(*parts, tzinfo=UTC).timestamp()  # type: ignore[misc]


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)  # type: ignore[misc]


# period_bounds


@pytest.mark.parametrize(
    "now, bounds",
    [
        (at(2026, 11, 29, 13, 41), (utc(2026, 11, 1), utc(2026, 12, 1))),
        (at(2026, 12, 31, 23, 59, 59), (utc(2026, 12, 1), utc(2027, 1, 1))),  # the year's end
        (at(2027, 1, 1), (utc(2027, 1, 1), utc(2027, 2, 1))),  # a period's start is in it
        (at(2027, 1, 31, 12), (utc(2027, 1, 1), utc(2027, 2, 1))),
        (at(2028, 2, 29, 23), (utc(2028, 2, 1), utc(2028, 3, 1))),  # a leap year's February
        (at(2027, 2, 28, 23), (utc(2027, 2, 1), utc(2027, 3, 1))),
        (at(2026, 4, 30, 23, 59), (utc(2026, 4, 1), utc(2026, 5, 1))),
    ],
)
def test_month_periods_are_utc_calendar_months(now: float, bounds: tuple[datetime, datetime]) -> None:
    assert period_bounds("month", now) == bounds


@pytest.mark.parametrize(
    "now, start",
    [
        (at(2026, 11, 30), utc(2026, 11, 30)),  # a Monday, at midnight
        (at(2026, 11, 30, 23, 59), utc(2026, 11, 30)),
        (at(2026, 12, 6, 23, 59, 59), utc(2026, 11, 30)),  # the Sunday after
        (at(2026, 12, 2, 12), utc(2026, 11, 30)),  # a week across a month's end
        (at(2027, 1, 1, 8), utc(2026, 12, 28)),  # and across a year's
        (at(2026, 11, 29, 13), utc(2026, 11, 23)),  # a Sunday belongs to the week before
    ],
)
def test_weeks_start_on_monday(now: float, start: datetime) -> None:
    begin, end = period_bounds("week", now)
    assert (begin, end) == (start, start + timedelta(days=7))
    assert begin.weekday() == 0


@pytest.mark.parametrize(
    "now, bounds",
    [
        (at(2026, 11, 29, 13, 41, 7), (utc(2026, 11, 29), utc(2026, 11, 30))),
        (at(2026, 12, 31, 23, 59, 59), (utc(2026, 12, 31), utc(2027, 1, 1))),
        (at(2028, 2, 28, 0, 0, 1), (utc(2028, 2, 28), utc(2028, 2, 29))),
    ],
)
def test_day_periods_are_utc_days(now: float, bounds: tuple[datetime, datetime]) -> None:
    assert period_bounds("day", now) == bounds


def test_total_starts_at_the_epoch_and_never_ends() -> None:
    assert period_bounds("total", at(2026, 11, 29)) == (utc(1970, 1, 1), None)


def test_bounds_are_in_utc() -> None:
    start, end = period_bounds("day", at(2026, 6, 1, 23, 30))
    assert start.tzinfo is UTC and end is not None and end.tzinfo is UTC


def test_rfc3339_is_seconds_and_z() -> None:
    assert rfc3339(utc(2027, 1, 1)) == "2027-01-01T00:00:00Z"
    assert rfc3339(datetime(2026, 3, 4, 5, 6, 7, 890, tzinfo=UTC)) == "2026-03-04T05:06:07Z"


# Quota


def quota(
    used: int,
    tokens: int = 100_000,
    *,
    reserved: int = 0,
    period: str = "month",
    kind: str = "user",
    warn: float = 0.8,
    resets_at: datetime | None = None,
) -> Quota:
    if resets_at is None and period != "total":
        resets_at = utc(2026, 12, 1)
    return Quota(Limit(kind, "alice" if kind == "user" else "acme", period, tokens, warn), used, reserved, resets_at)


@pytest.mark.parametrize(
    "used, state",
    [(0, "ok"), (79_999, "ok"), (80_000, "warn"), (99_999, "warn"), (100_000, "blocked"), (250_000, "blocked")],
)
def test_state_is_ok_then_warn_from_the_ratio_then_blocked_at_the_limit(used: int, state: str) -> None:
    assert quota(used).state == state


def test_a_zero_budget_is_blocked_from_the_start() -> None:
    assert quota(0, tokens=0).state == "blocked"
    assert quota(0, tokens=0).as_json()["percent"] == 100.0


def test_a_warn_ratio_of_one_never_warns() -> None:
    assert [quota(used, warn=1.0).state for used in (99_999, 100_000)] == ["ok", "blocked"]


def test_remaining_never_goes_below_zero() -> None:
    assert quota(40_000).remaining == 60_000
    assert quota(120_000).remaining == 0


def test_headers_carry_limit_used_remaining_state_and_reset() -> None:
    assert quota(85_000).headers() == {
        "X-Quota-Limit": "100000",
        "X-Quota-Used": "85000",
        "X-Quota-Remaining": "15000",
        "X-Quota-State": "warn",
        "X-Quota-Reset": "2026-12-01T00:00:00Z",
    }


def test_a_total_budget_has_no_reset_header() -> None:
    assert quota(150, tokens=100, period="total").headers() == {
        "X-Quota-Limit": "100",
        "X-Quota-Used": "150",
        "X-Quota-Remaining": "0",
        "X-Quota-State": "blocked",
    }


def test_as_json() -> None:
    shown = quota(12_345, reserved=600).as_json()
    assert shown == {
        "subject_type": "user",
        "budget_row": "alice",  # the row that set the budget: here the user's own
        "model": None,  # not a model cap
        "period": "month",
        "limit": 100_000,
        "used": 12_345,
        "reserved": 600,
        "remaining": 87_655,
        "percent": 12.3,
        "state": "ok",
        "resets_at": "2026-12-01T00:00:00Z",
    }
    assert quota(1, tokens=3, period="total").as_json()["resets_at"] is None


def test_with_used_keeps_everything_else() -> None:
    before = quota(10, reserved=5)
    after = before.with_used(90_000)
    assert after == Quota(before.limit, 90_000, 5, before.resets_at)
    assert before.used == 10


def test_the_notice_warns_past_the_ratio_and_says_when_the_budget_is_used_up() -> None:
    assert quota(79_999).notice() is None
    assert quota(85_432).notice() == "\n\n> You have used 85 % of your monthly token budget (85,432 of 100,000)."
    assert quota(99_999).notice() == "\n\n> You have used 99 % of your monthly token budget (99,999 of 100,000)."
    blocked = quota(100_000).notice()
    assert blocked is not None and blocked.startswith(
        "\n\n> You have used all of your monthly token budget (100,000 of 100,000): your next message will be"
        " refused until "
    )
    assert blocked.endswith(" 00:00 UTC.")


@pytest.mark.parametrize("period, word", [("day", "daily"), ("week", "weekly"), ("total", "total")])
def test_the_notice_names_the_period(period: str, word: str) -> None:
    assert quota(900, tokens=1000, period=period).notice() == (
        f"\n\n> You have used 90 % of your {word} token budget (900 of 1,000)."
    )


def test_refusal_of_a_users_budget_used_up() -> None:
    assert quota(100_250).refusal("alice") == (
        "Monthly token budget used up: 100,250 of 100,000 tokens. It resets on 2026-12-01 00:00 UTC."
    )


def test_refusal_of_a_teams_budget_names_the_team() -> None:
    resets = utc(2026, 11, 30)
    assert quota(5000, tokens=5000, period="day", kind="tenant", resets_at=resets).refusal("acme") == (
        "Your team's (acme) daily token budget used up: 5,000 of 5,000 tokens. It resets on 2026-11-30 00:00 UTC."
    )


def test_refusal_of_a_budget_taken_by_requests_in_progress() -> None:
    assert quota(1_000, tokens=10_000, reserved=9_000, period="week", resets_at=utc(2026, 11, 30)).refusal("bob") == (
        "Weekly token budget is fully taken by requests in progress: 1,000 of 10,000 tokens used, 9,000 reserved."
        " Try again when they finish. It resets on 2026-11-30 00:00 UTC."
    )


def test_refusal_of_a_total_budget_says_it_does_not_reset() -> None:
    assert quota(2_000_000, tokens=2_000_000, period="total", kind="tenant").refusal("acme") == (
        "Your team's (acme) total token budget used up: 2,000,000 of 2,000,000 tokens."
        " It does not reset; ask your administrator for more."
    )


def test_unknown_quota_headers_keep_the_limit_and_reset_only() -> None:
    assert unknown_quota_headers(quota(50)) == {
        "X-Quota-Limit": "100000",
        "X-Quota-State": "unknown",
        "X-Quota-Reset": "2026-12-01T00:00:00Z",
    }


# Rates


def test_rates_headers_count_this_request_against_the_request_limit() -> None:
    assert Rates(rpm=10, tpm=5000, requests=3, tokens=1200, reset_seconds=42).headers() == {
        "X-RateLimit-Limit-Requests": "10",
        "X-RateLimit-Remaining-Requests": "6",
        "X-RateLimit-Reset-Requests": "42s",
        "X-RateLimit-Limit-Tokens": "5000",
        "X-RateLimit-Remaining-Tokens": "3800",
        "X-RateLimit-Reset-Tokens": "42s",
    }


def test_rates_headers_never_go_below_zero() -> None:
    h = Rates(rpm=5, tpm=100, requests=5, tokens=250, reset_seconds=1).headers()
    assert (h["X-RateLimit-Remaining-Requests"], h["X-RateLimit-Remaining-Tokens"]) == ("0", "0")
    assert Rates(rpm=5, tpm=0, requests=4, tokens=0, reset_seconds=1).headers()["X-RateLimit-Remaining-Requests"] == "0"


def test_rates_headers_only_for_the_limits_set() -> None:
    assert Rates(rpm=0, tpm=0, requests=9, tokens=9, reset_seconds=60).headers() == {}
    assert Rates(rpm=60, tpm=0, requests=0, tokens=0, reset_seconds=60).headers() == {
        "X-RateLimit-Limit-Requests": "60",
        "X-RateLimit-Remaining-Requests": "59",
        "X-RateLimit-Reset-Requests": "60s",
    }
    assert Rates(rpm=0, tpm=900, requests=0, tokens=100, reset_seconds=7).headers() == {
        "X-RateLimit-Limit-Tokens": "900",
        "X-RateLimit-Remaining-Tokens": "800",
        "X-RateLimit-Reset-Tokens": "7s",
    }


# Reservation


def reservation(used: int, rates: Rates | None = None, *, metered: bool = True) -> Reservation:
    q = quota(used, reserved=500)
    scope = Scope(q.limit, "alice", "quota:user:alice", utc(2026, 11, 1), utc(2026, 12, 1))
    return Reservation("r-1", (scope,), (scope.key,), 500, [q], rates, metered)


def test_reservation_headers_are_the_users_quota() -> None:
    assert reservation(1_000).headers() == quota(1_000).headers()


def test_reservation_headers_with_the_real_usage_once_known() -> None:
    h = reservation(1_000).headers(used=81_000)
    assert (h["X-Quota-Used"], h["X-Quota-Remaining"], h["X-Quota-State"]) == ("81000", "19000", "warn")


def test_reservation_headers_add_the_rate_limits() -> None:
    rates = Rates(rpm=10, tpm=0, requests=1, tokens=0, reset_seconds=30)
    assert reservation(0, rates).headers(used=10) == {
        "X-Quota-Limit": "100000",
        "X-Quota-Used": "10",
        "X-Quota-Remaining": "99990",
        "X-Quota-State": "ok",
        "X-Quota-Reset": "2026-12-01T00:00:00Z",
        "X-RateLimit-Limit-Requests": "10",
        "X-RateLimit-Remaining-Requests": "8",
        "X-RateLimit-Reset-Requests": "30s",
    }


def test_an_unmetered_reservation_shows_the_limit_and_an_unknown_state_only() -> None:
    rates = Rates(rpm=10, tpm=10, requests=1, tokens=1, reset_seconds=30)
    expected = {"X-Quota-Limit": "100000", "X-Quota-State": "unknown", "X-Quota-Reset": "2026-12-01T00:00:00Z"}
    assert reservation(0, rates, metered=False).headers() == expected
    assert reservation(0, rates, metered=False).headers(used=70) == expected


def test_refusal_of_a_prompt_too_long_for_what_is_left() -> None:
    assert quota(9_990, tokens=10_000, period="week", resets_at=utc(2026, 11, 30)).refusal("bob") == (
        "Weekly token budget is nearly used up: 9,990 of 10,000 tokens used, and the 10 left are too few for"
        " this request. It resets on 2026-11-30 00:00 UTC."
    )


def test_the_notice_of_a_total_budget_used_up_says_it_does_not_reset() -> None:
    assert quota(1_000, tokens=1_000, period="total", resets_at=None).notice() == (
        "\n\n> You have used all of your total token budget (1,000 of 1,000): your next message will be refused"
        " until your administrator adds more."
    )


def test_refusal_of_a_request_larger_than_the_whole_budget() -> None:
    assert quota(0, tokens=1_000, resets_at=utc(2026, 12, 1)).refusal("bob") == (
        "This request is larger than your whole monthly token budget of 1,000 tokens: shorten the conversation or"
        " the input. It resets on 2026-12-01 00:00 UTC."
    )
