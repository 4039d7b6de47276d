"""proxy/usage_history.py: a caller's records and totals from the real test PostgreSQL, paged; its parameters.

Records are written inside a transaction that is rolled back, and usage_history() is handed that
connection through a one-connection pool, so nothing is left behind and no other test's rows are seen.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from proxy.config import Settings
from proxy.errors import BadRequest, ServiceUnavailable
from proxy.usage_history import _cursor, _instant, usage_history

from .helpers import uid

pytestmark = pytest.mark.anyio

# The current month's partition exists (migrations create last month's to the month after next's).
MONTH = datetime.now(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
NOW = MONTH + timedelta(days=1, hours=12)


class OnePool:
    """A pool of the one connection holding the test's transaction."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.timeouts: list[float] = []

    @asynccontextmanager
    async def acquire(self, timeout: float | None = None) -> AsyncIterator[asyncpg.Connection]:
        self.timeouts.append(timeout or 0)
        yield self.conn


@pytest.fixture
async def conn(base_settings: Settings) -> AsyncIterator[asyncpg.Connection]:
    connection = await asyncpg.connect(base_settings.database_url)
    transaction = connection.transaction()
    await transaction.start()
    try:
        yield connection
    finally:
        await transaction.rollback()
        await connection.close()


async def add(
    conn: asyncpg.Connection,
    user: str,
    at: datetime,
    request_id: str | None = None,
    *,
    tokens: tuple[int, int] = (10, 5),
    cost: float | None = None,
    **columns: Any,
) -> str:
    request_id = request_id or uid("r")
    row = {
        "request_id": request_id,
        "created_at": at,
        "user_id": user,
        "model": "gpt-4o",
        "endpoint": "chat",
        "prompt_tokens": tokens[0],
        "completion_tokens": tokens[1],
        "total_tokens": sum(tokens),
        "cost_usd": cost,
        "status": "ok",
        "http_status": 200,
        **columns,
    }
    names = ", ".join(row)
    values = ", ".join(f"${i}" for i in range(1, len(row) + 1))
    await conn.execute(f"insert into usage_records ({names}) values ({values})", *row.values())
    return request_id


def iso(at: datetime) -> str:
    return at.isoformat().replace("+00:00", "Z")


def micros(at: datetime) -> int:
    return (at - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(microseconds=1)


async def test_a_record_as_the_caller_sees_it(conn: asyncpg.Connection) -> None:
    me = uid()
    at = MONTH + timedelta(hours=1, microseconds=123_456)
    rid = await add(
        conn,
        me,
        at,
        tokens=(120, 30),
        cost=0.00125,
        client_request_id="mine-1",
        served_model="gpt-4o-2024-08-06",
        stream=True,
        estimated=True,
        latency_ms=812.5,
        via="librechat",
    )
    page = await usage_history(OnePool(conn), me, {}, NOW)  # type: ignore[arg-type]
    assert page["data"] == [
        {
            "request_id": rid,
            "client_request_id": "mine-1",
            "created_at": iso(at),
            "model": "gpt-4o",
            "served_model": "gpt-4o-2024-08-06",
            "endpoint": "chat",
            "prompt_tokens": 120,
            "completion_tokens": 30,
            "total_tokens": 150,
            "cost_usd": 0.00125,
            "status": "ok",
            "http_status": 200,
            "stream": True,
            "estimated": True,
            "latency_ms": 812.5,
        }
    ]
    assert page["data"][0]["created_at"].endswith(".123456Z")


async def test_the_default_window_is_this_month_up_to_now(conn: asyncpg.Connection) -> None:
    me = uid()
    first = await add(conn, me, MONTH)  # the month's first instant is in it
    last = await add(conn, me, NOW - timedelta(microseconds=1))
    await add(conn, me, NOW)  # `to` is exclusive
    await add(conn, me, NOW + timedelta(hours=1))
    await add(conn, me, MONTH - timedelta(microseconds=1))  # last month
    page = await usage_history(OnePool(conn), me, {}, NOW)  # type: ignore[arg-type]
    assert (page["object"], page["user"], page["from"], page["to"]) == ("list", me, iso(MONTH), iso(NOW))
    assert [r["request_id"] for r in page["data"]] == [last, first]
    assert page["totals"]["requests"] == 2


async def test_only_the_callers_own_records_are_listed(conn: asyncpg.Connection) -> None:
    me, other = uid(), uid()
    mine = await add(conn, me, MONTH + timedelta(hours=2))
    await add(conn, other, MONTH + timedelta(hours=3), tokens=(1000, 1000), cost=1.0)
    page = await usage_history(OnePool(conn), me, {}, NOW)  # type: ignore[arg-type]
    assert [r["request_id"] for r in page["data"]] == [mine]
    assert page["totals"] == {
        "requests": 1,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "total_tokens": 15,
        "cost_usd": None,
    }


async def test_pages_follow_newest_first_and_totals_cover_the_whole_window(conn: asyncpg.Connection) -> None:
    me = uid()
    base = MONTH + timedelta(hours=5)
    ids = [
        await add(conn, me, base + timedelta(minutes=i), tokens=(i, 2 * i), cost=0.25 if i % 2 else None)
        for i in range(1, 6)
    ]
    pool = OnePool(conn)
    params = {"from": iso(base), "to": iso(base + timedelta(hours=1)), "limit": "2"}
    pages = []
    cursor = None
    while True:
        page = await usage_history(pool, me, {**params, **({"cursor": cursor} if cursor else {})}, NOW)  # type: ignore[arg-type]
        pages.append(page)
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert [[r["request_id"] for r in p["data"]] for p in pages] == [ids[4:2:-1], ids[2:0:-1], ids[:1]]
    assert [p["has_more"] for p in pages] == [True, True, False]
    assert pages[0]["next_cursor"] == f"{micros(base + timedelta(minutes=4))}~{ids[3]}"
    assert pages[1]["next_cursor"] == f"{micros(base + timedelta(minutes=2))}~{ids[1]}"
    for page in pages:
        assert page["totals"] == {
            "requests": 5,
            "prompt_tokens": 15,
            "completion_tokens": 30,
            "total_tokens": 45,
            "cost_usd": 0.75,
        }
    assert pool.timeouts == [5, 5, 5]


async def test_a_page_exactly_full_has_no_more(conn: asyncpg.Connection) -> None:
    me = uid()
    for i in range(3):
        await add(conn, me, MONTH + timedelta(hours=1, seconds=i))
    page = await usage_history(OnePool(conn), me, {"limit": "3"}, NOW)  # type: ignore[arg-type]
    assert (len(page["data"]), page["has_more"], page["next_cursor"]) == (3, False, None)


async def test_records_of_the_same_instant_are_paged_by_request_id(conn: asyncpg.Connection) -> None:
    me = uid()
    at = MONTH + timedelta(hours=6, microseconds=7)
    for rid in ("req-b", "req-d", "req-a", "req-c"):
        await add(conn, me, at, f"{me}-{rid}")
    await add(conn, me, at - timedelta(microseconds=1), f"{me}-req-z")  # earlier, though its id sorts last
    seen: list[str] = []
    params: dict[str, str] = {"limit": "1"}
    for _ in range(10):
        page = await usage_history(OnePool(conn), me, params, NOW)  # type: ignore[arg-type]
        seen += [r["request_id"].removeprefix(f"{me}-") for r in page["data"]]
        if not page["has_more"]:
            break
        params = {"limit": "1", "cursor": page["next_cursor"]}
    assert seen == ["req-d", "req-c", "req-b", "req-a", "req-z"]


async def test_nothing_in_the_window_is_an_empty_list(conn: asyncpg.Connection) -> None:
    me = uid()
    await add(conn, me, MONTH + timedelta(hours=1))  # outside the window asked for
    page = await usage_history(OnePool(conn), me, {"from": "2026-01-01", "to": "2026-01-02"}, NOW)  # type: ignore[arg-type]
    assert page == {
        "object": "list",
        "user": me,
        "from": "2026-01-01T00:00:00Z",
        "to": "2026-01-02T00:00:00Z",
        "totals": {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "cost_usd": None},
        "data": [],
        "has_more": False,
        "next_cursor": None,
    }


# Parameters are checked before the database is asked (the pool here would fail if it were).


@pytest.mark.parametrize(
    "params, param, message",
    [
        ({"limit": "0"}, "limit", "'limit' must be between 1 and 1000."),
        ({"limit": "1001"}, "limit", "'limit' must be between 1 and 1000."),
        ({"limit": "-3"}, "limit", "'limit' must be between 1 and 1000."),
        ({"limit": "ten"}, "limit", "'limit' must be a whole number."),
        ({"limit": ""}, "limit", "'limit' must be a whole number."),
        ({"limit": "1" * 40}, "limit", "'limit' must be between 1 and 1000."),
        ({"from": "2026-11-10", "to": "2026-11-01"}, "to", "'to' must be after 'from'."),
        ({"from": "2026-11-10", "to": "2026-11-10"}, "to", "'to' must be after 'from'."),
        ({"from": "yesterday"}, "from", "'from' must be an ISO 8601 date or time, such as 2026-11-01."),
        ({"to": "1969-12-31"}, "to", "'to' must lie between 1970 and 9000."),
        ({"cursor": "bogus"}, "cursor", "'cursor' is not one this API returned."),
    ],
)
async def test_bad_parameters_are_refused_naming_them(params: dict[str, str], param: str, message: str) -> None:
    with pytest.raises(BadRequest) as caught:
        await usage_history(None, "me", params, NOW)  # type: ignore[arg-type]
    assert (caught.value.param, caught.value.message, caught.value.status) == (param, message, 400)


async def test_an_unreachable_database_is_a_503() -> None:
    class Down:
        def acquire(self, timeout: float | None = None) -> Any:
            raise ConnectionRefusedError("connection refused")

    with pytest.raises(ServiceUnavailable) as caught:
        await usage_history(Down(), "me", {}, NOW)  # type: ignore[arg-type]
    assert caught.value.message == "Usage history is unavailable right now (database unreachable); try again shortly."


# _instant


@pytest.mark.parametrize(
    "text, at",
    [
        ("2026-11-01", datetime(2026, 11, 1, tzinfo=UTC)),
        ("2026-11-01T10:30:00Z", datetime(2026, 11, 1, 10, 30, tzinfo=UTC)),
        ("2026-11-01T10:30:00", datetime(2026, 11, 1, 10, 30, tzinfo=UTC)),  # no zone: UTC
        ("2026-11-01T12:30:00+02:00", datetime(2026, 11, 1, 10, 30, tzinfo=UTC)),
        ("2026-11-01T00:00:00-05:00", datetime(2026, 11, 1, 5, tzinfo=UTC)),
        ("1970-01-01", datetime(1970, 1, 1, tzinfo=UTC)),
        ("9000-01-01T00:00:00Z", datetime(9000, 1, 1, tzinfo=UTC)),
    ],
)
def test_instant_reads_iso_dates_and_times_into_utc(text: str, at: datetime) -> None:
    parsed = _instant(text, "from")
    assert parsed == at and parsed.tzinfo is UTC


@pytest.mark.parametrize("text", ["", "tomorrow", "2026-13-01", "2026-11-01T25:00", "0001-01-01T00:00:00+01:00"])
def test_instant_refuses_what_is_not_an_iso_instant(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        _instant(text, "to")
    assert (caught.value.param, caught.value.message) == (
        "to",
        "'to' must be an ISO 8601 date or time, such as 2026-11-01.",
    )


@pytest.mark.parametrize(
    "text", ["1969-12-31T23:59:59Z", "1970-01-01T00:00:00+00:01", "9000-01-01T00:00:01Z", "9999-12-31"]
)
def test_instant_refuses_what_lies_outside_1970_to_9000(text: str) -> None:
    with pytest.raises(BadRequest) as caught:
        _instant(text, "from")
    assert (caught.value.param, caught.value.message) == ("from", "'from' must lie between 1970 and 9000.")


# _cursor


def test_cursor_reads_what_usage_history_writes() -> None:
    at = datetime(2026, 11, 29, 13, 41, 49, 212_908, tzinfo=UTC)
    assert _cursor(f"{micros(at)}~req-1") == (at, "req-1")
    assert _cursor(f"{micros(at)}~a~b") == (at, "a~b")  # only the first ~ separates
    assert _cursor("0~x") == (datetime(1970, 1, 1, tzinfo=UTC), "x")
    assert _cursor(f"{micros(at)}") == (at, "")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "~req",
        "abc~req",
        "1.5~req",
        "-1~req",
        f"{micros(datetime(9000, 1, 1, 0, 0, 1, tzinfo=UTC))}~req",
        "9" * 30 + "~req",
        "1700000000000000~" + "r" * 257,
        "1700000000000000~req\x00",
        "1700000000000000~req\n",
    ],
)
def test_cursor_refuses_what_this_api_did_not_return(cursor: str) -> None:
    with pytest.raises(BadRequest) as caught:
        _cursor(cursor)
    assert (caught.value.param, caught.value.message) == ("cursor", "'cursor' is not one this API returned.")
