"""The statement `/me`, end to end: a real proxy (`python -m proxy serve`) against the fake upstream, and
Debian's chromium following the link the proxy put in the chat.

A user past 80 % gets the inline notice with a link, follows it and sees the gauge in warn, the chart and
their last request; the CSV downloads and parses; expired and forged links get a friendly page; the page
speaks Portuguese to a Portuguese browser; hostile model names and user ids stay text.
"""

from __future__ import annotations

import csv
import io
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from playwright.sync_api import Browser, BrowserContext, Page

from proxy.auth import Identity
from proxy.budget.quota import Quota
from proxy.budget.rows import Limit
from proxy.config import Settings
from proxy.csv_export import safe_cell
from proxy.links import StatementLinks
from proxy.signing import BadSignature, Expired, Signer, pages_secret
from proxy.statement import forecast
from proxy.statement_pages import CSV_FIELDS

from .browser import DESKTOP, no_horizontal_scroll, shoot
from .fake_upstream import FakeUpstream
from .helpers import RedisProcess, eventually, proxy_process, settings_env, token, uid

LINK = re.compile(r"\[See your usage statement\]\((http://[^)\s]+/me\?s=[A-Za-z0-9_.-]+)\)")
HOSTILE_MODEL = "<img src=x onerror=alert(1)><script>alert(2)</script>"
LIBRECHAT_PREFIX = (  # what LibreChat puts before a 429's message; it shows 512 characters in all
    "Something went wrong. Here's the specific error message we encountered: "
    "An error occurred while processing the request: 429 "
)
ADMIN = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}
BUDGET = 50  # the fake upstream bills 12 tokens an answer: the fourth answer takes the user to 96 %


def mongo_id() -> str:
    """A LibreChat user id: a MongoDB ObjectId in hex."""
    return uid("")[1:].replace("-", "").ljust(24, "0")[:24]


# --- links, forecast, CSV cells: no server needed -----------------------------------------------------------


def test_a_link_names_the_user_and_reads_back_only_here_and_only_in_time(base_settings: Settings) -> None:
    now = [1_800_000_000.0]
    links = StatementLinks(replace(base_settings, public_url="https://quota.example/x/"), clock=lambda: now[0])
    who = Identity("u-1", "acme", groups=("eng",))
    url = links.url(who, "https://quota.example/x")
    assert url is not None and url.startswith("https://quota.example/x/me?s=")
    token_ = url.split("?s=")[1]
    assert links.read(token_) == (who, int(now[0] + 7 * 86400))
    now[0] += 7 * 86400 + 1
    with pytest.raises(Expired):
        links.read(token_)
    now[0] -= 10
    body, mac = token_.split(".")
    with pytest.raises(BadSignature):
        links.read(body + "." + mac[:-2] + ("AA" if mac[-2:] != "AA" else "BB"))
    # Signed with the same secret for another purpose (an admin session): not a statement link.
    admin = Signer(pages_secret(base_settings), "admin", lambda: now[0]).sign({"u": "u-1"}, 60)
    with pytest.raises(BadSignature):
        links.read(admin)
    with pytest.raises(BadSignature):
        links.read("x" * 100_000)
    assert StatementLinks(replace(base_settings, statement_link_ttl_days=0)).url(who, "http://h") is None


def test_the_forecast_reads_the_pace_of_the_period() -> None:
    start = datetime(2026, 12, 1, tzinfo=UTC)
    end = datetime(2027, 1, 1, tzinfo=UTC)
    limit = Limit("user", "*", "month", 1000, 0.8)
    ten_days = start + timedelta(days=10)
    # 400 tokens in ten days: 600 more take 15 days, the 16th of December.
    assert forecast(Quota(limit, 400, 0, end), start, ten_days).on == start + timedelta(days=25)
    assert forecast(Quota(limit, 100, 0, end), start, ten_days).key == "me.forecast_not"
    assert forecast(Quota(limit, 0, 0, end), start, ten_days).key == "me.forecast_none"
    assert forecast(Quota(limit, 1000, 0, end), start, ten_days).key == "me.forecast_reached"
    total = replace(limit, period="total")  # never resets: a date however far, or none past 400 years
    assert forecast(Quota(total, 500, 0, None), start, ten_days).on == start + timedelta(days=20)
    assert forecast(Quota(replace(total, tokens=10**18), 1, 0, None), start, ten_days).key == "me.forecast_not"


def test_csv_cells_that_look_like_formulas_are_defused() -> None:
    assert [safe_cell(v) for v in ("=cmd|' /C calc'!A0", "+1", "@SUM(A1)", "-2", "gpt-4o", 12, None)] == [
        "'=cmd|' /C calc'!A0",
        "'+1",
        "'@SUM(A1)",
        "'-2",
        "gpt-4o",
        12,
        None,
    ]


def test_the_messages_in_portuguese() -> None:
    limit = Limit("user", "*", "month", 100_000, 0.8)
    at = datetime(2026, 12, 1, tzinfo=UTC)
    assert Quota(limit, 85_432, 0, at).notice("pt-BR") == (
        "\n\n> Você já usou 85 % do seu orçamento mensal de tokens (85.432 de 100.000)."
    )
    assert Quota(limit, 100_000, 0, at).refusal("u", "pt-BR") == (
        "Orçamento mensal de tokens esgotado: 100.000 de 100.000 tokens. Ele é renovado em 01/12/2026 00:00 UTC."
    )
    team = Limit("tenant", "acme", "day", 5000, 0.8)
    assert (
        Quota(team, 0, 0, at)
        .refusal("acme", "pt-BR")
        .startswith("Este pedido é maior que todo o orçamento diário de 5.000 tokens da sua equipe (acme)")
    )


# --- the real proxy ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def env(base_settings: Settings, fake: FakeUpstream) -> dict[str, str]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, budget_refresh_seconds=0.2, ledger_stream=f"test:me:{uid()}"
    )
    return settings_env(settings)


@pytest.fixture(scope="module")
def proxy_url(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with proxy_process(env, tmp_path_factory.mktemp("proxy")) as url:
        yield url


def set_budget(url: str, user: str, tokens: int) -> None:
    r = httpx.put(f"{url}/admin/budgets/{user}", json={"tokens": tokens, "period": "month"}, headers=ADMIN)
    assert r.status_code == 200, r.text
    bearer = {"Authorization": f"Bearer {token(user)}"}
    eventually(lambda: httpx.get(f"{url}/v1/quota", headers=bearer).json()["budgets"][0]["limit"] == tokens)


def chat(url: str, user: str, model: str) -> tuple[str, str]:
    """One streamed chat turn as LibreChat sends it; (the answer's text, the request id)."""
    with openai.OpenAI(base_url=f"{url}/v1", api_key=token(user), max_retries=0) as client:
        raw = client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": "hello"}], stream=True, user=user
        )
        text = "".join(c.choices[0].delta.content or "" for c in raw.parse() if c.choices)
    return text, raw.headers["x-request-id"]


def recorded(url: str, user: str, n: int) -> bool:
    """The user's records are in PostgreSQL (read over HTTP: `asyncio.run` cannot run beside the browser)."""
    r = httpx.get(f"{url}/v1/usage", headers={"Authorization": f"Bearer {token(user)}"})
    return r.status_code == 200 and r.json()["totals"]["requests"] >= n


def bring_near_limit(proxy_url: str, env: dict[str, str]) -> dict[str, str]:
    """A user at 96 % of their budget after four answers (one of them from a model with a hostile name)."""
    user = mongo_id()
    set_budget(proxy_url, user, BUDGET)
    answers = [chat(proxy_url, user, model) for model in ("gpt-4o", HOSTILE_MODEL, "gpt-4o", "gpt-4o-mini")]
    eventually(lambda: recorded(proxy_url, user, 4))
    notice = answers[-1][0]
    assert all(LINK.search(text) is None for text, _ in answers[:2])  # under 80 %: no notice, no link
    found = LINK.search(notice)
    assert found, notice
    assert notice.index("You have used 96 % of your monthly token budget") < found.start()
    return {"user": user, "link": found.group(1), "last_request": answers[-1][1]}


@pytest.fixture(scope="module")
def near_limit(proxy_url: str, env: dict[str, str]) -> dict[str, str]:
    return bring_near_limit(proxy_url, env)


def test_the_429_carries_the_link_after_the_sentence_within_librechats_512(proxy_url: str, env: dict[str, str]) -> None:
    user = bring_near_limit(proxy_url, env)["user"]
    with (
        openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=token(user), max_retries=0) as client,
        pytest.raises(openai.RateLimitError) as info,
    ):
        client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hello " * 20}])
    message = info.value.body["message"]  # type: ignore[index]
    assert message.startswith("Monthly token budget is nearly used up: 48 of 50 tokens used")
    sentence, _, link = message.partition(" Your usage statement: ")
    assert sentence.endswith("UTC.") and link.startswith(f"{proxy_url}/me?s=")
    assert len(LIBRECHAT_PREFIX + message) <= 512, len(LIBRECHAT_PREFIX + message)
    assert httpx.get(link, follow_redirects=False).status_code == 303


def test_following_the_notice_link_shows_the_statement(
    page: Page, proxy_url: str, near_limit: dict[str, str], tmp_path: Path
) -> None:
    requested: list[str] = []
    page.on("request", lambda r: requested.append(r.url))
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(near_limit["link"])
    assert page.url == f"{proxy_url}/me"  # the link was traded for a cookie and left the address bar
    assert page.locator("h1").inner_text() == "Your usage statement"
    gauge = page.locator("section[aria-labelledby=budget-h] svg.gauge")
    assert gauge.get_attribute("data-state") == "warn"
    assert gauge.get_attribute("role") == "img" and "96 %" in (gauge.locator("title").text_content() or "")
    assert "48 of 50 tokens used (96.0 %)" in page.locator("#main").inner_text()
    assert page.locator(".forecast").inner_text().startswith("At this pace you")
    # The daily chart: today's bar stacked by the three models.
    segments = page.locator("svg.chart rect title").all_text_contents()
    assert len(segments) == 3 and any("gpt-4o: 24" in s for s in segments), segments
    # The last request, first in the table; the hostile model name is text, not markup.
    first = page.locator("table.recent tbody tr").first
    assert first.get_attribute("data-request-id") == near_limit["last_request"]
    assert "gpt-4o-mini" in first.inner_text() and "ok" in first.inner_text()
    assert page.locator("table.recent tbody tr").count() == 4
    assert HOSTILE_MODEL in page.locator("#main").inner_text()
    assert page.locator("main script, main img").count() == 0 and not dialogs
    assert all(u.startswith(proxy_url) for u in requested), requested  # nothing from anywhere else
    # The CSV of the period downloads and parses.
    with page.expect_download() as download:
        page.get_by_role("link", name="Download this period as CSV").click()
    saved = tmp_path / "usage.csv"
    download.value.save_as(saved)
    rows = list(csv.DictReader(io.StringIO(saved.read_text())))
    assert tuple(rows[0]) == CSV_FIELDS and len(rows) == 4
    assert rows[0]["request_id"] == near_limit["last_request"] and rows[0]["total_tokens"] == "12"
    assert sorted(r["model"] for r in rows) == sorted(["gpt-4o", "gpt-4o", "gpt-4o-mini", HOSTILE_MODEL])
    # It reads on a phone: nothing wider than the screen.
    page.set_viewport_size({"width": 390, "height": 844})
    assert no_horizontal_scroll(page)
    page.set_viewport_size(DESKTOP)
    shoot(page, "statement")


def test_a_portuguese_browser_reads_portuguese(browser: Browser, near_limit: dict[str, str]) -> None:
    context = browser.new_context(locale="pt-BR")
    try:
        page = context.new_page()
        page.goto(near_limit["link"])
        assert page.locator("h1").inner_text() == "Seu extrato de uso"
        text = page.locator("#main").inner_text()
        assert "48 de 50 tokens usados (96,0 %)" in text and "Últimos 4 pedidos" in text
        assert page.locator("html").get_attribute("lang") == "pt-BR"
        shoot(page, "statement-pt-BR")
    finally:
        context.close()


def test_an_expired_link_and_a_forged_one_get_a_friendly_page(
    context: BrowserContext, proxy_url: str, base_settings: Settings, near_limit: dict[str, str]
) -> None:
    week_ago = StatementLinks(base_settings, clock=lambda: time.time() - 8 * 86400)
    expired = week_ago.url(Identity(near_limit["user"]), proxy_url)
    assert expired is not None
    page = context.new_page()
    response = page.goto(expired)
    assert response is not None and response.status == 410
    assert response.headers["content-type"].startswith("text/html")
    assert page.locator("h1").inner_text() == "This link has expired"
    assert page.get_by_label("API token").count() == 1  # and a way in: the sign-in form
    shoot(page, "statement-expired")
    body, mac = near_limit["link"].split("?s=")[1].split(".")
    forged_body = body[:-4] + ("AAAA" if body[-4:] != "AAAA" else "BBBB")
    for forged in (f"{forged_body}.{mac}", "not-a-link", "x" * 20_000, "%00%ff"):
        response = page.goto(f"{proxy_url}/me?s={forged}")
        assert response is not None and response.status == 403, forged
        assert page.locator("h1").inner_text() == "This link is not valid"
    assert not [c for c in context.cookies() if c["name"] == "quota_statement"]


def test_the_sign_in_form_takes_a_token_and_bearer_works_too(
    context: BrowserContext, proxy_url: str, near_limit: dict[str, str]
) -> None:
    user = near_limit["user"]
    page = context.new_page()
    page.goto(f"{proxy_url}/me?lang=xx&page=-1&<script>=1")  # unknown parameters are ignored
    assert page.locator("h1").inner_text() == "Open your usage statement"
    page.get_by_label("API token").fill("not a token")
    page.get_by_role("button", name="Open my statement").click()
    assert page.locator("[role=alert]").inner_text().startswith("That token was not accepted")
    page.get_by_label("API token").fill(token(user))
    page.get_by_role("button", name="Open my statement").click()
    page.wait_for_url(f"{proxy_url}/me")  # the token went in a POST body, never into a URL
    assert page.locator("h1").inner_text() == "Your usage statement"
    assert user in page.locator(".sub").inner_text()
    page.get_by_role("button", name="Sign out").click()
    page.wait_for_selector("text=Open your usage statement")
    assert not [c for c in context.cookies() if c["name"] == "quota_statement"]
    # Bearer, as a script would read it.
    r = httpx.get(f"{proxy_url}/me", headers={"Authorization": f"Bearer {token(user)}"})
    assert r.status_code == 200 and "48 of 50 tokens used" in r.text
    assert HOSTILE_MODEL not in r.text and "&lt;script&gt;" in r.text
    r = httpx.get(f"{proxy_url}/me/usage.csv", headers={"Authorization": f"Bearer {token(user)}"})
    assert r.status_code == 200 and r.headers["content-disposition"].startswith("attachment")
    assert len(list(csv.DictReader(io.StringIO(r.text)))) == 4
    # A form posted from another site does not sign anyone in.
    r = httpx.post(f"{proxy_url}/me/sign-in", data={"token": token(user)}, headers={"Origin": "https://evil.example"})
    assert r.status_code == 403 and "set-cookie" not in r.headers


def test_hostile_user_ids_and_bad_tokens(proxy_url: str, base_settings: Settings) -> None:
    longest = "u" * 200 + "<script>alert(1)</script>" + "é" * 31  # as long as a user id may be
    r = httpx.get(f"{proxy_url}/me", headers={"Authorization": f"Bearer {token(longest)}"})
    assert r.status_code == 200 and "<script>alert(1)" not in r.text and "&lt;script&gt;alert(1)" in r.text
    link = StatementLinks(base_settings).url(Identity(longest), proxy_url)
    assert link is not None
    with httpx.Client(base_url=proxy_url) as client:
        assert client.get(link).status_code == 303
        assert client.get("/me").status_code == 200
    too_long = "u" * 5000
    r = httpx.get(f"{proxy_url}/me", headers={"Authorization": f"Bearer {token(too_long)}"})
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    r = httpx.get(f"{proxy_url}/me/usage.csv")
    assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
    r = httpx.post(
        f"{proxy_url}/me/sign-in",
        content=b"token=" + b"A" * 100_000,
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert r.status_code in (400, 413) and "set-cookie" not in r.headers


def test_the_statement_shows_the_history_while_redis_is_down(
    env: dict[str, str], volatile_redis: RedisProcess, tmp_path: Path
) -> None:
    user = uid()
    with proxy_process({**env, "REDIS_URL": volatile_redis.url, "LEDGER_STREAM": f"test:me:{uid()}"}, tmp_path) as url:
        for _ in range(2):
            chat(url, user, "gpt-4o")
        eventually(lambda: recorded(url, user, 2))
        volatile_redis.kill()
        r = httpx.get(f"{url}/me", headers={"Authorization": f"Bearer {token(user)}"}, timeout=30)
    assert r.status_code == 200, r.text
    assert "The live budget counters cannot be read right now" in r.text
    assert r.text.count("<tr data-request-id=") == 2 and 'data-state="unknown"' in r.text
