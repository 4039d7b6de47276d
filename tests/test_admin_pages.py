"""The admin dashboard `/admin` over HTTP, against the real test PostgreSQL and Redis: sign-in by form and by
one-time link, sessions and CSRF, who is refused, the budget form in force at once, every CSV and JSON twin,
and hostile parameters and names. (The browser walk and the screenshots: test_admin_browser.py.)
"""

from __future__ import annotations

import asyncio
import csv
import io
import re
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import httpx
import pytest
from starlette.requests import Request

from proxy.app import create_app
from proxy.auth import Authenticator
from proxy.cli import main
from proxy.config import Settings
from proxy.redis_batch import connect
from proxy.sessions import COOKIE, AdminSessions, Session

from .helpers import admin_token, copy_usage, serve, sql, token, uid

XSS_USER = '<script>alert("u")</script>'
XSS_MODEL = "<img src=x onerror=alert(1)>"
_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


def add_records(dsn: str, user: str, n: int, *, tokens: int = 100, model: str = "gpt-4o", **extra: Any) -> None:
    now = datetime.now(UTC)
    rows = [
        (
            uid("r"),
            now,
            user,
            extra.get("tenant"),
            model,
            "chat",
            tokens,
            extra.get("status", "ok"),
        )
        for _ in range(n)
    ]

    copy_usage(dsn, rows)


@pytest.fixture(scope="module")
def settings(base_settings: Settings) -> Settings:
    return replace(base_settings, budget_refresh_seconds=3600, ledger_stream=f"test:admin:{uid()}")


@pytest.fixture(scope="module")
def url(settings: Settings) -> Iterator[str]:
    with serve(create_app(settings)) as base:
        yield base


_OPEN: list[httpx.Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _OPEN:
        _OPEN.pop().close()


def new_client(base_url: str = "") -> httpx.Client:
    client = httpx.Client(base_url=base_url, timeout=20)
    _OPEN.append(client)
    return client


def signed_in(url: str, tok: str | None = None) -> httpx.Client:
    """A client with a dashboard session opened through the sign-in form."""
    client = new_client(url)
    form = client.get("/admin/sign-in")
    assert form.status_code == 200
    csrf = _CSRF.search(form.text)
    assert csrf is not None
    r = client.post("/admin/sign-in", data={"token": tok or admin_token(), "csrf": csrf.group(1)})
    assert r.status_code == 303, r.text
    assert r.headers["location"].endswith("/admin")
    return client


def csrf_of(client: httpx.Client, path: str) -> str:
    found = _CSRF.search(client.get(path).text)
    assert found is not None
    return found.group(1)


def test_an_admin_signs_in_with_a_token_and_the_cookie_is_strict(url: str) -> None:
    client = new_client(url)
    form = client.get("/admin/sign-in")
    csrf = _CSRF.search(form.text)
    assert csrf is not None
    r = client.post("/admin/sign-in", data={"token": admin_token("ops-ana"), "csrf": csrf.group(1)})
    assert r.status_code == 303
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(f"{COOKIE}="))
    low = cookie.lower()
    assert "httponly" in low and "samesite=strict" in low and "path=/admin" in low and "max-age=" in low
    assert "secure" not in low  # PUBLIC_URL is not https here
    page = client.get("/admin")
    assert page.status_code == 200
    assert "ops-ana" in page.text and "Overview" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")


def test_the_sign_in_form_needs_its_csrf_token_and_refuses_a_user_token(url: str) -> None:
    client = new_client(url)
    assert client.post("/admin/sign-in", data={"token": admin_token()}).status_code == 403
    csrf = _CSRF.search(client.get("/admin/sign-in").text)
    assert csrf is not None
    r = client.post("/admin/sign-in", data={"token": token(uid()), "csrf": csrf.group(1)})
    assert r.status_code == 403 and "admin" in r.text and f"{COOKIE}=" not in r.headers.get("set-cookie", "")
    r = client.post("/admin/sign-in", data={"token": "not-a-jwt", "csrf": csrf.group(1)})
    assert r.status_code == 401
    assert client.get("/admin").status_code == 401  # still nobody


@pytest.mark.parametrize(
    "path",
    [
        "/admin",
        "/admin/users",
        "/admin/user?id=x",
        "/admin/tenants",
        "/admin/blocked",
        "/admin/changes",
        "/admin/users.csv",
        "/admin/overview.csv",
        "/admin/tenants.csv",
        "/admin/blocked.csv",
        "/admin/changes.csv",
        "/admin/user.csv?id=x",
        "/admin/users.json",
        "/admin/overview.json",
        "/admin/tenants.json",
        "/admin/blocked.json",
        "/admin/changes.json",
    ],
)
def test_a_user_token_opens_no_admin_page_nor_csv_nor_json(url: str, path: str) -> None:
    user = {"Authorization": f"Bearer {token(uid())}"}
    r = httpx.get(url + path, headers=user)
    assert r.status_code == 403, r.text
    assert "admin" in r.text.lower()
    nobody = httpx.get(url + path)
    assert nobody.status_code == 401
    if path.endswith(".json"):
        assert nobody.json()["error"]["code"] == "missing_token"
    else:
        assert 'name="token"' in nobody.text  # the sign-in form
    assert httpx.get(url + path, headers={"Authorization": f"Bearer {admin_token()}"}).status_code == 200


def test_an_expired_or_forged_session_cookie_is_refused(url: str, settings: Settings) -> None:
    past = AdminSessions(settings, Authenticator(settings), clock=lambda: datetime.now(UTC).timestamp() - 9 * 3600)
    old, _ = past.open("ops", "token", 3600)
    r = httpx.get(f"{url}/admin", cookies={COOKIE: old})
    assert r.status_code == 401 and "session has ended" in r.text
    other = AdminSessions(settings, Authenticator(settings), secret=b"another proxy's secret")
    forged, _ = other.open("ops", "token", 3600)
    assert httpx.get(f"{url}/admin", cookies={COOKIE: forged}).status_code == 401
    good, _ = AdminSessions(settings, Authenticator(settings)).open("ops", "token", 3600)
    assert httpx.get(f"{url}/admin", cookies={COOKIE: good}).status_code == 200
    # A statement cookie or link of the same secret is no admin session.
    assert httpx.get(f"{url}/admin", cookies={"quota_statement": good}).status_code == 401


def test_an_admin_changes_a_budget_and_the_users_next_quota_shows_it(url: str, settings: Settings) -> None:
    user = uid()
    add_records(settings.database_url, user, 3, tokens=1000)
    mine = {"Authorization": f"Bearer {token(user)}"}
    before = httpx.get(f"{url}/v1/quota", headers=mine).json()["budgets"][0]
    assert before["limit"] == settings.default_token_budget and before["used"] == 3000
    client = signed_in(url, admin_token("ops-bia"))
    page = client.get("/admin/user", params={"id": user})
    assert page.status_code == 200 and user in page.text
    csrf = _CSRF.search(page.text)
    assert csrf is not None
    form = {"csrf": csrf.group(1), "id": user, "tokens": "4,000", "period": "week", "rpm": "7", "tpm": "0"}
    r = client.post("/admin/user/budget", data={**form, "warn": "50", "reason": "pilot <b>team</b>"})
    assert r.status_code == 303, r.text
    after = httpx.get(f"{url}/v1/quota", headers=mine)
    body = after.json()["budgets"][0]
    assert (body["limit"], body["period"], body["state"]) == (4000, "week", "warn")
    assert after.headers["x-quota-limit"] == "4000"
    shown = client.get(r.headers["location"])
    assert "Saved" in shown.text and "ops-bia" in shown.text and "pilot &lt;b&gt;team&lt;/b&gt;" in shown.text
    row = sql(
        settings.database_url,
        "select changed_by, source, before, after from budget_changes where subject = $1",
        user,
    )
    assert len(row) == 1 and (row[0]["changed_by"], row[0]["source"]) == ("ops-bia", "page")
    assert row[0]["before"] is None and '"tokens": 4000' in row[0]["after"] and '"rpm": 7' in row[0]["after"]
    # A model cap's change (no rates, no warn ratio) shows on the history pages too.
    cap = httpx.put(
        f"{url}/admin/budgets/{user}",
        json={"tokens": 900, "model": "gpt-4o*"},
        headers={"Authorization": f"Bearer {admin_token()}"},
    )
    assert cap.status_code == 200
    assert "gpt-4o*" in client.get("/admin/changes").text
    changes = httpx.get(
        f"{url}/admin/changes.json", params={"subject": user}, headers={"Authorization": f"Bearer {admin_token()}"}
    ).json()
    assert changes["data"][0]["model"] == "gpt-4o*"
    changes["data"] = changes["data"][1:]
    assert changes["data"][0]["after"]["period"] == "week" and changes["data"][0]["before"] is None


def test_a_budget_form_without_or_with_a_wrong_csrf_token_is_refused(url: str, settings: Settings) -> None:
    user = uid()
    client = signed_in(url)
    intruder = signed_in(url)
    theirs = csrf_of(intruder, "/admin/users")
    fields = {"id": user, "tokens": "1", "period": "month"}
    for data in (fields, {**fields, "csrf": ""}, {**fields, "csrf": theirs}, {**fields, "csrf": "x.y"}):
        r = client.post("/admin/user/budget", data=data)
        assert r.status_code == 403 and "CSRF" in r.text
    # Nor without a session at all, even with a good token of someone else's session.
    assert httpx.post(f"{url}/admin/user/budget", data={**fields, "csrf": theirs}).status_code == 401
    assert not sql(settings.database_url, "select 1 from budgets where subject = $1", user)
    # Sign-out is a form too.
    assert client.post("/admin/sign-out").status_code == 403
    r = client.post("/admin/sign-out", data={"csrf": csrf_of(client, "/admin")})
    assert r.status_code == 303
    assert client.get("/admin").status_code == 401


def test_a_signed_out_session_is_refused_wherever_its_cookie_was_copied(url: str, settings: Settings) -> None:
    client, other = signed_in(url), signed_in(url)  # the same admin, two sessions
    csrf = csrf_of(client, "/admin")
    copy = new_client(url)
    copy.cookies.set(COOKIE, client.cookies[COOKIE], path="/admin")
    assert copy.get("/admin").status_code == 200
    assert client.post("/admin/sign-out", data={"csrf": csrf}).status_code == 303
    assert copy.get("/admin").status_code == 401
    user = uid()
    fields = {"id": user, "tokens": "1", "period": "month", "csrf": csrf}
    assert copy.post("/admin/user/budget", data=fields).status_code == 401
    assert not sql(settings.database_url, "select 1 from budgets where subject = $1", user)
    assert other.get("/admin").status_code == 200  # only that session ended


def test_sessions_are_taken_while_redis_is_unreachable_and_signing_out_still_works(settings: Settings) -> None:
    """The dashboard is what admins need in an outage: a session is not refused because its sign-out
    record cannot be looked up, and signing out clears the cookie though it cannot be remembered."""
    sessions = AdminSessions(settings, Authenticator(settings))
    value, session = sessions.open("ops", "token", 3600)
    request = Request({"type": "http", "headers": [(b"cookie", f"{COOKIE}={value}".encode())]})

    async def check() -> tuple[Session | None, None]:
        down = connect("redis://127.0.0.1:1/0", 0.5)  # the proxy's own client, to a port nothing listens on
        try:
            return await sessions.current(request, down), await sessions.end(session, down)
        finally:
            await down.aclose()

    assert asyncio.run(check()) == (session, None)


def test_a_sign_out_is_remembered_though_the_proxys_clock_is_behind_redises(settings: Settings) -> None:
    """The record of a sign-out lasts as long as the session has left by the proxy's clock: with that clock
    two hours behind Redis's, an absolute expiry (EXAT) was already past for Redis, so nothing was kept
    and a copy of the cookie still worked."""
    behind = AdminSessions(settings, Authenticator(settings), clock=lambda: datetime.now(UTC).timestamp() - 7200)
    value, session = behind.open("ops", "token", 3600)
    request = Request({"type": "http", "headers": [(b"cookie", f"{COOKIE}={value}".encode())]})

    async def check() -> Session | None:
        client = connect(settings.redis_url, 2.0)
        try:
            await behind.end(session, client)
            return await behind.current(request, client)
        finally:
            await client.aclose()

    assert asyncio.run(check()) is None


def test_the_budget_form_says_which_field_is_wrong(url: str) -> None:
    client = signed_in(url)
    csrf = csrf_of(client, "/admin")
    for field, value in (("tokens", "-5"), ("tokens", "1.5e9"), ("period", "year"), ("rpm", "9" * 30), ("warn", "0")):
        data = {"csrf": csrf, "id": uid(), "tokens": "100", "period": "month", field: value}
        r = client.post("/admin/user/budget", data=data)
        assert r.status_code == 400, (field, value, r.text)
        assert f"&#39;{field}&#39;" in r.text


def test_the_default_budget_is_no_user_s_page(url: str, settings: Settings) -> None:
    """'*' names the default rows: a user's page and form for it would change everyone's budget."""
    client = signed_in(url)
    before = sql(settings.database_url, "select token_limit from budgets where subject_type = 'user' and subject = '*'")
    for path in ("/admin/user", "/admin/user.csv"):
        r = client.get(path, params={"id": "*"})
        assert r.status_code == 400 and "default budget" in r.text, (path, r.text)
    data = {"csrf": csrf_of(client, "/admin"), "id": "*", "tokens": "5", "period": "month"}
    r = client.post("/admin/user/budget", data=data)
    assert r.status_code == 400 and "default budget" in r.text
    after = sql(settings.database_url, "select token_limit from budgets where subject_type = 'user' and subject = '*'")
    assert after == before


def test_a_one_time_link_signs_in_once(url: str, settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    env = {"JWT_SECRET": settings.jwt_secret, "PUBLIC_URL": url, "DATABASE_URL": settings.database_url}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        assert main(["admin", "link", "--name", "ops-carla", "--ttl", "5m"]) == 0
    link = capsys.readouterr().out.strip()
    assert link.startswith(f"{url}/admin/link?t=")
    client = new_client()
    page = client.get(link)  # a preview of the link uses nothing: it shows a button
    assert page.status_code == 200 and "ops-carla" in page.text
    t = link.split("?t=")[1]
    r = client.post(f"{url}/admin/link", data={"t": t})
    assert r.status_code == 303
    assert "ops-carla" in client.get(f"{url}/admin").text
    again = httpx.post(f"{url}/admin/link", data={"t": t})
    assert again.status_code == 410 and "used already" in again.text
    assert httpx.post(f"{url}/admin/link", data={"t": t[:-3] + "AAA"}).status_code == 403
    assert httpx.get(f"{url}/admin/link", params={"t": "x" * 20_000}).status_code == 403


def test_the_cli_link_needs_a_shared_secret(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JWT_SECRET", "")
        mp.setenv("PAGES_SECRET", "")
        mp.setenv("JWT_PUBLIC_KEY", "-----BEGIN PUBLIC KEY-----")
        assert main(["admin", "link"]) == 1
    assert "PAGES_SECRET" in capsys.readouterr().err


def test_every_table_downloads_as_csv_that_parses(url: str, settings: Settings) -> None:
    user, team = uid(), uid("t")
    add_records(settings.database_url, user, 2, tokens=50, tenant=team)
    add_records(settings.database_url, user, 1, tokens=0, tenant=team, status="blocked", model="=HYPERLINK(1)")
    client = signed_in(url)
    expected = {
        "/admin/overview.csv": "model",
        "/admin/users.csv": "user_id",
        "/admin/tenants.csv": "tenant_id",
        "/admin/blocked.csv": "request_id",
        "/admin/changes.csv": "changed_by",
    }
    for path, column in expected.items():
        r = client.get(path)
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv"), path
        assert "attachment" in r.headers["content-disposition"]
        rows = list(csv.DictReader(io.StringIO(r.text)))
        assert rows and column in rows[0], path
    users = list(csv.DictReader(io.StringIO(client.get("/admin/users.csv", params={"q": user}).text)))
    assert [(u["user_id"], u["tenant_id"], u["used"]) for u in users] == [(user, team, "100")]
    blocked = list(csv.DictReader(io.StringIO(client.get("/admin/blocked.csv").text)))
    assert any(b["user_id"] == user and b["model"] == "'=HYPERLINK(1)" for b in blocked)  # defused
    tenants = list(csv.DictReader(io.StringIO(client.get("/admin/tenants.csv").text)))
    assert [(t["members"], t["tokens"]) for t in tenants if t["tenant_id"] == team] == [("1", "100")]
    mine = list(csv.DictReader(io.StringIO(client.get("/admin/user.csv", params={"id": user}).text)))
    assert len(mine) == 3 and {m["status"] for m in mine} == {"ok", "blocked"}


def test_the_blocked_csv_streams_every_refusal_of_the_period(url: str, settings: Settings) -> None:
    """A user hammering the proxy while blocked leaves many refusals: the CSV streams them through a cursor,
    in pieces (no Content-Length), and all of them arrive."""
    user = uid("flood")
    add_records(settings.database_url, user, 5000, tokens=0, status="blocked")
    with signed_in(url).stream("GET", "/admin/blocked.csv") as r:
        assert r.status_code == 200 and "content-length" not in r.headers
        pieces = list(r.iter_raw())
    assert len(pieces) > 1
    rows = list(csv.DictReader(io.StringIO(b"".join(pieces).decode())))
    assert sum(1 for row in rows if row["user_id"] == user) == 5000


def test_the_users_page_searches_filters_sorts_and_pages(url: str, settings: Settings) -> None:
    team = uid("t")
    users = [f"{team}-user-{i}" for i in range(5)]
    for i, user in enumerate(users):
        add_records(settings.database_url, user, i + 1, tokens=20_000, tenant=team)  # 20k to 100k of 100k
    client = signed_in(url)
    data = client.get("/admin/users.json", params={"tenant": team, "sort": "used", "per_page": 25}).json()
    assert [u["user_id"] for u in data["data"]] == users[::-1] and data["total"] == 5
    assert [u["state"] for u in data["data"]] == ["blocked", "warn", "ok", "ok", "ok"]
    assert [u["percent"] for u in data["data"]] == [100.0, 80.0, 60.0, 40.0, 20.0]
    least = client.get("/admin/users.json", params={"tenant": team, "sort": "-used"}).json()
    assert least["data"][0]["user_id"] == users[0]
    assert client.get("/admin/users.json", params={"q": f"{team}-user-3"}).json()["total"] == 1
    assert client.get("/admin/users.json", params={"q": f"{team}-user-?"}).json()["total"] == 5
    warn = client.get("/admin/users.json", params={"tenant": team, "state": "warn"}).json()
    assert [u["user_id"] for u in warn["data"]] == [users[3]]
    paged = client.get("/admin/users.json", params={"tenant": team, "sort": "percent", "per_page": 25, "page": 1})
    assert paged.json()["pages"] == 1
    page = client.get("/admin/users", params={"tenant": team, "sort": "user"})
    assert page.status_code == 200 and all(u in page.text for u in users)


@pytest.mark.parametrize(
    "params, param",
    [
        ({"sort": "used; drop table budgets"}, "sort"),
        ({"sort": "user_id"}, "sort"),
        ({"page": "-1"}, "page"),
        ({"page": "0"}, "page"),
        ({"page": str(10**30)}, "page"),
        ({"page": "1e3"}, "page"),
        ({"per_page": "7"}, "per_page"),
        ({"state": "evil"}, "state"),
        ({"q": "x" * 300}, "q"),
        ({"q": "a\x00b"}, "q"),
        ({"period": "year"}, "period"),
    ],
)
def test_hostile_parameters_get_a_4xx_naming_them(url: str, params: dict[str, str], param: str) -> None:
    admin = {"Authorization": f"Bearer {admin_token()}"}
    path = "/admin/tenants.json" if param == "period" else "/admin/users.json"
    r = httpx.get(url + path, params=params, headers=admin)
    assert r.status_code == 400 and r.json()["error"]["param"] == param
    page = httpx.get(url + path.removesuffix(".json"), params=params, headers=admin)
    assert page.status_code == 400 and param in page.text and "<form" not in page.text.split("<main")[1][:50]


def test_search_strings_are_text_not_sql_nor_like_patterns(url: str, settings: Settings) -> None:
    tag = uid("lk")
    literal = f"{tag}%_\\'\""
    add_records(settings.database_url, literal, 1)
    add_records(settings.database_url, f"{tag}XYZ", 1)
    admin = {"Authorization": f"Bearer {admin_token()}"}
    found = httpx.get(f"{url}/admin/users.json", params={"q": f"{tag}%"}, headers=admin).json()
    assert [u["user_id"] for u in found["data"]] == [literal]
    found = httpx.get(f"{url}/admin/users.json", params={"q": "' or 1=1 --"}, headers=admin).json()
    assert found["total"] == 0
    far = httpx.get(f"{url}/admin/users.json", params={"q": tag, "page": "99999"}, headers=admin).json()
    assert far["data"] == [] and far["total"] == 2 and far["pages"] == 1


def test_hostile_user_ids_and_model_names_stay_text(url: str, settings: Settings) -> None:
    add_records(settings.database_url, XSS_USER, 2, tokens=10, model=XSS_MODEL, status="blocked")
    client = signed_in(url)
    for path, params in (
        ("/admin", {}),
        ("/admin/users", {"q": "script"}),
        ("/admin/user", {"id": XSS_USER}),
        ("/admin/blocked", {}),
    ):
        r = client.get(path, params=params)
        assert r.status_code == 200, path
        assert "<script>alert" not in r.text and "<img src=x" not in r.text, path
    assert "&lt;script&gt;alert(&#34;u&#34;)&lt;/script&gt;" in client.get("/admin/users", params={"q": "script"}).text
