"""The pages and the alerts against a hostile caller: a user with a valid token, a curious admin, someone who
got hold of a link. Each test is a finding that once failed (see the commit that fixed it).

A real proxy (the app served by uvicorn on a loopback port) against the test PostgreSQL and Redis; alerts
through the real notifier to a receiver on a loopback port.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis

from proxy.app import create_app
from proxy.config import Settings
from proxy.notifier import Notifier, slack_body
from proxy.sessions import COOKIE, NONCE_COOKIE
from proxy.statement_pages import COOKIE as STATEMENT_COOKIE

from .devstack import free_port
from .helpers import admin_token, serve, token, uid
from .test_alerts import Clock, Receiver, Writer, alert_settings, budget, rows, usage

_CSRF = re.compile(r'name="csrf" value="([^"]+)"')


@pytest.fixture(scope="module")
def settings(base_settings: Settings) -> Settings:
    return replace(base_settings, budget_refresh_seconds=3600, ledger_stream=f"test:hostile:{uid()}")


@pytest.fixture(scope="module")
def url(settings: Settings) -> Iterator[str]:
    with serve(create_app(settings)) as base:
        yield base


@contextmanager
def signed_in(url: str) -> Iterator[httpx.Client]:
    """A client with a dashboard session opened through the sign-in form."""
    with httpx.Client(base_url=url, timeout=20) as client:
        found = _CSRF.search(client.get("/admin/sign-in").text)
        assert found is not None
        r = client.post("/admin/sign-in", data={"token": admin_token(), "csrf": found.group(1)})
        assert r.status_code == 303, r.text
        yield client


def csrf_of(client: httpx.Client, path: str) -> str:
    found = _CSRF.search(client.get(path).text)
    assert found is not None
    return found.group(1)


# --- Signed values that are not ASCII: a 500 for anyone, without a token ---------------------------------------


def test_a_signed_value_with_non_ascii_characters_is_refused_not_a_crash(url: str) -> None:
    """hmac.compare_digest raises TypeError on str with non-ASCII characters: a link, a cookie or a CSRF field
    holding one made every signed value's check a 500."""
    bad = "eyJ1IjoiYm9iIn0.é"
    latin = "eyJ1IjoiYm9iIn0.\xe9".encode("latin-1")  # a cookie as a browser may send it: raw bytes
    with httpx.Client(base_url=url, timeout=20) as c:
        assert c.get("/me", params={"s": bad}).status_code == 403
        assert c.get("/me", headers={"Cookie": b"quota_statement=" + latin}).status_code == 200  # the sign-in form
        assert c.get("/me/usage.csv", headers={"Cookie": b"quota_statement=" + latin}).status_code == 401
        assert c.get("/admin", headers={"Cookie": b"quota_admin=" + latin}).status_code == 401
        assert c.get("/admin/users.json", headers={"Cookie": b"quota_admin=" + latin}).status_code == 401
        assert c.get("/admin/link", params={"t": bad}).status_code == 403
        assert c.post("/admin/link", data={"t": bad}).status_code == 403
        r = c.post("/admin/sign-in", data={"csrf": bad, "token": "x"}, headers={"Cookie": f"{NONCE_COOKIE}={'n' * 24}"})
        assert r.status_code == 403
    with signed_in(url) as admin:
        r = admin.post("/admin/user/budget", data={"csrf": bad, "id": uid(), "tokens": "5", "period": "month"})
        assert r.status_code == 403 and "CSRF" in r.text
        assert admin.post("/admin/sign-out", data={"csrf": bad}).status_code == 403
        assert admin.get("/admin").status_code == 200  # still signed in


# --- The budget form keeps what it does not show ----------------------------------------------------------------


def test_the_budget_form_keeps_the_rollover_and_alert_thresholds_it_does_not_show(url: str) -> None:
    """The form has no rollover nor alert-threshold fields, and saving it reset them to the defaults:
    an admin raising a limit silently turned off the user's carry-over and their own alerts."""
    user = uid()
    admin = {"Authorization": f"Bearer {admin_token()}"}
    body = {"tokens": 1000, "period": "month", "rollover": 0.5, "rollover_cap": 0.25, "alert_thresholds": [0.5, 0.9]}
    assert httpx.put(f"{url}/admin/budgets/{user}", json=body, headers=admin).status_code == 200
    with signed_in(url) as client:
        form = {"csrf": csrf_of(client, f"/admin/user?id={user}"), "id": user, "period": "week", "tokens": "2,000"}
        r = client.post("/admin/user/budget", data={**form, "rpm": "5", "tpm": "0", "warn": "70"})
        assert r.status_code == 303, r.text
    changes = httpx.get(f"{url}/admin/changes.json", params={"subject": user}, headers=admin).json()["data"]
    after = changes[0]["after"]
    assert (after["tokens"], after["period"], after["rpm"], after["warn_ratio"]) == (2000, "week", 5, 0.7)
    assert (after["rollover"], after["rollover_cap"], after["alert_thresholds"]) == (0.5, 0.25, [0.5, 0.9])


def test_a_new_budget_row_from_the_form_inherits_the_defaults_alert_thresholds(url: str, settings: Settings) -> None:
    """A user on the default row gets an own row with no thresholds of its own (null: the defaults'),
    not a copy of the default row's, which would stop following them."""
    user = uid()
    with signed_in(url) as client:
        form = {"csrf": csrf_of(client, f"/admin/user?id={user}"), "id": user, "period": "month", "tokens": "300"}
        assert client.post("/admin/user/budget", data=form).status_code == 303
    admin = {"Authorization": f"Bearer {admin_token()}"}
    after = httpx.get(f"{url}/admin/changes.json", params={"subject": user}, headers=admin).json()["data"][0]["after"]
    assert (after["tokens"], after["rollover"], after["rollover_cap"], after["alert_thresholds"]) == (300, 0, 0.5, None)


# --- The statement's sign-in cookie lives no longer than the token -----------------------------------------------


def test_the_statement_cookie_of_a_sign_in_does_not_outlive_the_token(url: str) -> None:
    """A token about to expire (or a short-lived one handed out for a look) bought a 12-hour statement."""
    user = uid()
    r = httpx.post(f"{url}/me/sign-in", data={"token": token(user, ttl=120)})
    assert r.status_code == 303
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(f"{STATEMENT_COOKIE}="))
    max_age = int(re.search(r"max-age=(\d+)", cookie, re.I).group(1))  # type: ignore[union-attr]
    assert 0 < max_age <= 120
    value = cookie.split(";")[0].split("=", 1)[1]
    assert httpx.get(f"{url}/me", cookies={STATEMENT_COOKIE: value}).status_code == 200
    # A long-lived token still gets the usual 12 hours, not its own months.
    r = httpx.post(f"{url}/me/sign-in", data={"token": token(user, ttl=90 * 86400)})
    cookie = next(v for k, v in r.headers.multi_items() if k == "set-cookie" and v.startswith(f"{STATEMENT_COOKIE}="))
    assert int(re.search(r"max-age=(\d+)", cookie, re.I).group(1)) == 12 * 3600  # type: ignore[union-attr]
    assert COOKIE not in cookie


# --- Alerts: a user id is text in Slack, and one bad webhook URL stops no other alert ----------------------------


def test_a_user_id_reaches_slack_as_text_not_as_a_mention_or_a_link() -> None:
    """Slack reads `<!channel>`, `<@U123>` and `<https://…|label>` in mrkdwn: a user or tenant named so (an
    identity provider's username) pinged the whole channel, or showed a link of the user's choosing."""
    data = {
        "id": "k",
        "subject_type": "user",
        "subject": "<!channel> <https://evil.example|reset your password> & co",
        "threshold": 0.8,
        "period": "month",
        "resets_at": None,
        "token_limit": 1000,
        "used": 800,
        "percent": 80.0,
        "state": "warn",
    }
    body = slack_body(data)
    texts = [body["text"], body["blocks"][0]["text"]["text"]]
    for text in texts:
        assert "<!channel>" not in text and "<https://" not in text
        assert "&lt;!channel&gt; &lt;https://evil.example|reset your password&gt; &amp; co" in text


@pytest.mark.anyio
async def test_a_webhook_url_httpx_cannot_parse_fails_alone(
    base_settings: Settings, redis_client: aioredis.Redis, pg_pool: asyncpg.Pool
) -> None:
    """httpx.InvalidURL is not an httpx.HTTPError: a webhook URL with a bad port (which the settings let
    through) raised out of the whole batch, rolled it back, and no alert on any channel was ever sent."""
    await pg_pool.execute("truncate alert_outbox, alert_deliveries")
    rec = Receiver()
    with serve(rec.app) as good:
        settings = alert_settings(
            base_settings,
            good,
            alert_webhook_urls=(f"http://127.0.0.1:{free_port()}:1/hook",),
            alert_thresholds=("1.0",),
        )
        clock = Clock(time.time())
        user = uid()
        await budget(pg_pool, user, 10)
        await Writer(redis_client, pg_pool, settings, clock).write(usage(user, 10, clock.now))
        async with httpx.AsyncClient(timeout=5) as http:
            assert await Notifier(pg_pool, settings, clock=clock, client=http).send_due() == 2
    assert len(rec.bodies("slack")) == 1
    states = {r["channel"]: (r["state"], r["attempts"], r["last_error"]) for r in await rows(pg_pool, user)}
    assert states["slack"] == ("sent", 1, None)
    state, attempts, error = states["webhook"]
    assert (state, attempts) == ("pending", 1) and error.startswith("InvalidURL")
