"""The proxy over real HTTP against a fake upstream: bad input, upstream errors, headers."""

from __future__ import annotations

import gc
import time
from collections.abc import Iterator
from dataclasses import replace

import httpx
import jwt
import pytest

from proxy.app import create_app
from proxy.config import Settings
from proxy.tokens import Tokenizer

from .fake_upstream import FakeUpstream
from .helpers import eventually, pg_row, scrape, serve, token, uid


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, max_body_bytes=64 * 1024)
    with serve(create_app(settings)) as url:
        yield url


@pytest.fixture
def client(proxy_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=proxy_url, timeout=10) as c:
        yield c


def auth(sub: str | None = None, **kw: object) -> dict[str, str]:
    return {"Authorization": f"Bearer {token(sub or uid(), **kw)}"}


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
NOW = int(time.time())
BAD_INPUT = {
    "no token": ("POST", "/v1/chat/completions", {}, CHAT, 401),
    "expired token": ("POST", "/v1/chat/completions", {"Authorization": f"Bearer {token('a', ttl=-100)}"}, CHAT, 401),
    "forged token": (
        "POST",
        "/v1/chat/completions",
        {"Authorization": f"Bearer {token('a', secret='x' * 40)}"},
        CHAT,
        401,
    ),
    "alg none": (
        "POST",
        "/v1/chat/completions",
        {"Authorization": "Bearer " + jwt.encode({"sub": "a", "exp": NOW + 60}, None, algorithm="none")},
        CHAT,
        401,
    ),
    "malformed json": ("POST", "/v1/chat/completions", auth(), b"{not json", 400),
    "json array": ("POST", "/v1/chat/completions", auth(), b"[1, 2]", 400),
    "no model": ("POST", "/v1/chat/completions", auth(), {"messages": []}, 400),
    "oversized body": (
        "POST",
        "/v1/chat/completions",
        auth(),
        {"model": "fake", "messages": [{"role": "user", "content": "x" * 70_000}]},
        413,
    ),
    "unknown route": ("GET", "/v1/nothing-here", auth(), None, 404),
    "wrong method": ("GET", "/v1/chat/completions", auth(), None, 405),
}


@pytest.mark.parametrize("method, path, headers, body, status", BAD_INPUT.values(), ids=BAD_INPUT.keys())
def test_bad_input_is_an_openai_shaped_error_and_never_reaches_upstream(
    client: httpx.Client, fake: FakeUpstream, method: str, path: str, headers: dict, body: object, status: int
) -> None:
    before = len(fake.requests)
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body} if body is not None else {}
    r = client.request(method, path, headers=headers, **kwargs)
    assert r.status_code == status
    assert r.headers["content-type"] == "application/json"
    error = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"} and error["message"]
    assert "Traceback" not in r.text
    assert len(fake.requests) == before


def test_upstream_gets_the_master_key_the_user_id_and_a_usage_request(client: httpx.Client, fake: FakeUpstream) -> None:
    user = uid()
    r = client.post("/v1/chat/completions", headers=auth(user), json={**CHAT, "stream": True, "user": "spoofed"})
    assert r.status_code == 200
    sent = fake.requests[-1]
    assert sent["_headers"]["authorization"] == "Bearer sk-unused"
    assert sent["user"] == user
    assert sent["stream_options"] == {"include_usage": True}
    assert b'"usage"' not in r.content  # hidden: the caller did not ask for it
    assert r.text.count("part") == 3 and r.text.endswith("data: [DONE]\n\n")


def test_quota_headers_and_request_id_on_every_response(client: httpx.Client) -> None:
    headers = auth()
    for r in (
        client.post("/v1/chat/completions", headers={**headers, "X-Request-Id": "my-id-1"}, json=CHAT),
        client.get("/v1/models", headers=headers),
        client.get("/v1/quota", headers=headers),
    ):
        assert r.status_code == 200, r.text
        assert {"x-quota-limit", "x-quota-used", "x-quota-remaining", "x-quota-reset", "x-quota-state"} <= set(
            r.headers
        )
    first = client.post("/v1/chat/completions", headers={**headers, "X-Request-Id": "my-id-2"}, json=CHAT)
    assert first.headers["x-request-id"] == "my-id-2"
    assert first.headers["x-quota-state"] == "ok"


def test_upstream_4xx_passes_through_and_charges_nothing(client: httpx.Client) -> None:
    headers = auth()
    r = client.post("/v1/chat/completions", headers=headers, json={**CHAT, "model": "bad-request"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "context too long"
    quota = lambda: client.get("/v1/quota", headers=headers).json()["budgets"][0]  # noqa: E731
    eventually(lambda: (quota()["used"], quota()["reserved"]) == (0, 0))


def test_missing_usage_is_estimated_and_marked(client: httpx.Client, base_settings: Settings) -> None:
    r = client.post(
        "/v1/chat/completions",
        headers={**auth(), "X-Request-Id": (rid := uid("req"))},
        json={**CHAT, "model": "no-usage"},
    )
    assert r.status_code == 200
    row = eventually(
        lambda: pg_row(base_settings.database_url, "select * from usage_records where client_request_id = $1", rid)
    )
    assert row["estimated"] is True and row["status"] == "ok"
    assert row["completion_tokens"] == Tokenizer.load().count("four score and seven")  # the answer text, in cl100k_base
    assert row["total_tokens"] == int(r.headers["x-quota-used"]) > 0


@pytest.mark.parametrize("model", ["huge-usage", "negative-usage"])
def test_usage_out_of_range_is_estimated_and_recorded(
    client: httpx.Client, base_settings: Settings, model: str
) -> None:
    headers = {**auth(user := uid()), "X-Request-Id": (rid := uid("req"))}
    r = client.post("/v1/chat/completions", headers=headers, json={**CHAT, "model": model})
    assert r.status_code == 200
    row = eventually(
        lambda: pg_row(base_settings.database_url, "select * from usage_records where client_request_id = $1", rid)
    )
    assert row["estimated"] is True and row["status"] == "ok"
    assert row["completion_tokens"] == Tokenizer.load().count("four score and seven")
    assert 0 < row["total_tokens"] == int(r.headers["x-quota-used"])
    quota = lambda: client.get("/v1/quota", headers=auth(user)).json()["budgets"][0]  # noqa: E731
    eventually(lambda: (quota()["used"], quota()["reserved"]) == (row["total_tokens"], 0))  # the settle went in


def test_unreachable_upstream_is_503_and_releases_the_reservation(base_settings: Settings) -> None:
    settings = replace(base_settings, litellm_base_url="http://127.0.0.1:9")  # nothing listens on the discard port
    user = uid()
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as c:
        r = c.post("/v1/chat/completions", headers=auth(user), json=CHAT)
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "api_error" and "unreachable" in r.json()["error"]["message"]
        quota = lambda: c.get("/v1/quota", headers=auth(user)).json()["budgets"][0]  # noqa: E731
        eventually(lambda: quota()["reserved"] == 0 and quota()["used"] == 0)


def test_a_bug_on_the_completion_path_is_an_openai_shaped_500_and_is_logged(
    base_settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The completion routes skip Starlette's middleware (proxy.app.ProxyApp): an error nobody expected
    still takes the one crash handler, on both spellings of the path, and the next request is served."""
    from proxy.relay import Relay

    async def broken(self: Relay, *args: object) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(Relay, "_complete", broken)
    with serve(create_app(base_settings)) as url, httpx.Client(base_url=url, timeout=10) as c:
        for path in ("/v1/chat/completions", "/embeddings"):
            r = c.post(path, headers=auth(), json=CHAT)
            assert r.status_code == 500, r.text
            assert r.json()["error"]["type"] == "server_error"
            assert "Internal error in the quota proxy" in r.json()["error"]["message"]
        assert c.get("/healthz").status_code == 200
    assert capsys.readouterr().out.count("unhandled_error") == 2


def test_health_and_metrics(client: httpx.Client) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["redis"] == "ok" and ready.json()["checks"]["postgres"] == "ok"
    client.post("/v1/chat/completions", headers=auth(), json=CHAT)
    assert scrape(client.get("/metrics").text)[
        "quota_requests_total", ("code", "200"), ("endpoint", "chat"), ("state", "ok")
    ]


def metric(client: httpx.Client, sample: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


def test_gc_thresholds_are_set_after_start_up_and_collections_are_timed(
    base_settings: Settings, fake: FakeUpstream
) -> None:
    before = gc.get_threshold()
    settings = replace(base_settings, litellm_base_url=fake.url, gc_thresholds=("1000", "11", "12"))
    try:
        with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as client:
            assert gc.get_threshold() == (1000, 11, 12)
            full = 'quota_gc_pause_seconds_count{generation="2"}'
            counted = metric(client, full)
            gc.collect()  # this process is the proxy's: its collections are the ones timed
            assert metric(client, full) == counted + 1
            assert metric(client, 'quota_gc_pause_seconds_sum{generation="2"}') > 0
    finally:
        gc.set_threshold(*before)


def test_fifty_concurrent_requests_through_the_proxy_never_overrun(base_settings: Settings, fake: FakeUpstream) -> None:
    import concurrent.futures

    # Room for about 5 requests of 12 tokens; each asks for at most 2 tokens of answer.
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=60)
    user = uid()
    headers = auth(user)
    body = {**CHAT, "max_tokens": 2}
    with (
        serve(create_app(settings)) as url,
        httpx.Client(base_url=url, timeout=30, limits=httpx.Limits(max_connections=50)) as c,
    ):
        with concurrent.futures.ThreadPoolExecutor(50) as pool:
            statuses = list(
                pool.map(lambda _: c.post("/v1/chat/completions", headers=headers, json=body).status_code, range(50))
            )
        quota = lambda: c.get("/v1/quota", headers=headers).json()["budgets"][0]  # noqa: E731
        eventually(lambda: quota()["reserved"] == 0)
        served = statuses.count(200)
        assert statuses.count(429) == 50 - served and served >= 1
        granted = 8 + 2  # each reserves its prompt estimate and its max_tokens
        assert served * granted <= 60  # reservations never exceed the budget
        # The fake reports 12 tokens whatever max_tokens says: the overrun is at most the estimation error
        # of the requests in flight, the bound the README documents.
        assert quota()["used"] == 12 * served and quota()["used"] - 60 <= served * (12 - granted)


def test_max_tokens_is_clamped_to_what_the_budget_has_left(base_settings: Settings, fake: FakeUpstream) -> None:
    # Without a holdback (tested in test_integrity.py), the whole room left is the cap.
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=100, holdback_tokens=0)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=10) as c:
        prompt = Tokenizer.load().prompt(CHAT)  # the bound for one message "hi"
        assert c.post("/v1/chat/completions", headers=auth(), json=CHAT).status_code == 200
        assert fake.requests[-1]["max_tokens"] == 100 - prompt  # no cap asked, the budget is the cap
        c.post("/v1/chat/completions", headers=auth(), json={**CHAT, "max_completion_tokens": 500})
        assert fake.requests[-1]["max_completion_tokens"] == 100 - prompt
        c.post("/v1/chat/completions", headers=auth(), json={**CHAT, "max_tokens": 50})
        assert fake.requests[-1]["max_tokens"] == 50  # a cap that fits is left alone
    roomy = replace(base_settings, litellm_base_url=fake.url, default_token_budget=1_000_000)
    with serve(create_app(roomy)) as url, httpx.Client(base_url=url, timeout=10) as c:
        c.post("/v1/chat/completions", headers=auth(), json=CHAT)
        # Plenty of room: the answer is still capped at what was reserved for it, COMPLETION_ALLOWANCE.
        assert fake.requests[-1]["max_tokens"] == roomy.completion_allowance
        c.post("/v1/chat/completions", headers=auth(), json={**CHAT, "max_tokens": 50, "max_completion_tokens": 9000})
        assert fake.requests[-1]["max_tokens"] == 50 and fake.requests[-1]["max_completion_tokens"] == 50


def test_usage_statement_is_the_callers_own_and_pages(client: httpx.Client, base_settings: Settings) -> None:
    me, other = uid(), uid()
    for _ in range(5):
        assert client.post("/v1/chat/completions", headers=auth(me), json=CHAT).status_code == 200
    client.post("/v1/chat/completions", headers=auth(other), json=CHAT)
    eventually(lambda: client.get("/v1/usage", headers=auth(me)).json()["totals"]["requests"] == 5)
    first = client.get("/v1/usage", headers=auth(me), params={"limit": 2}).json()
    assert first["user"] == me and first["totals"]["total_tokens"] == 60
    assert len(first["data"]) == 2 and first["has_more"] is True
    seen = [r["request_id"] for r in first["data"]]
    cursor = first["next_cursor"]
    while cursor:
        page = client.get("/v1/usage", headers=auth(me), params={"limit": 2, "cursor": cursor}).json()
        seen += [r["request_id"] for r in page["data"]]
        cursor = page["next_cursor"]
    assert len(seen) == len(set(seen)) == 5
    assert first["budgets"][0]["used"] == 60
    # Another user's token sees only their own records; there is no parameter to ask for someone else's.
    theirs = client.get("/v1/usage", headers=auth(other), params={"user": me}).json()
    assert theirs["user"] == other and theirs["totals"]["requests"] == 1


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"limit": "x"},
        {"from": "yesterday"},
        {"cursor": "bogus"},
        {"from": "2026-11-10", "to": "2026-11-01"},
    ],
)
def test_usage_statement_rejects_bad_parameters(client: httpx.Client, params: dict[str, str]) -> None:
    r = client.get("/v1/usage", headers=auth(), params=params)
    assert r.status_code == 400 and r.json()["error"]["param"] in {"limit", "from", "to", "cursor"}


def test_admin_views_agree_with_the_redis_counters(client: httpx.Client, base_settings: Settings) -> None:
    users = [uid() for _ in range(3)]
    for i, user in enumerate(users):
        for _ in range(i + 1):
            client.post("/v1/chat/completions", headers=auth(user), json=CHAT)
    view = lambda u: pg_row(base_settings.database_url, "select used from budget_status where subject = $1", u)["used"]  # noqa: E731
    counter = lambda u: client.get("/v1/quota", headers=auth(u)).json()["budgets"][0]["used"]  # noqa: E731
    eventually(lambda: [view(u) for u in users] == [counter(u) for u in users] == [12, 24, 36])


def test_litellm_cost_header_lands_in_the_ledger(client: httpx.Client, base_settings: Settings) -> None:
    for stream in (False, True):
        rid = uid("req")
        client.post("/v1/chat/completions", headers={**auth(), "X-Request-Id": rid}, json={**CHAT, "stream": stream})
        row = eventually(
            lambda rid=rid: pg_row(
                base_settings.database_url, "select * from usage_records where client_request_id = $1", rid
            )
        )
        assert float(row["cost_usd"]) == pytest.approx(0.00042)
