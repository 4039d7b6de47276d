"""End to end: openai client -> proxy (`python -m proxy serve`) -> real LiteLLM with mock models.

Checks what a user and an admin see: the answer, the quota headers, the ledger row in
PostgreSQL, the budget moving by exactly the reported tokens, and the readable 429.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace

import httpx
import openai
import orjson
import pytest

from proxy.config import Settings

from .devstack import ROOT, free_port, start_proxy, stop
from .helpers import eventually, pg_row, proxy_process, serve, settings_env, token, uid
from .keys import JwksServer, KeyPair

MOCK_TEXT = "Hello from the mock model. This answer is fixed so tests can rely on it."


@pytest.fixture(scope="module")
def env(e2e_settings: Settings) -> dict[str, str]:
    return settings_env(replace(e2e_settings, budget_refresh_seconds=0.2, ledger_stream=f"test:e2e:{uid()}"))


@pytest.fixture(scope="module")
def proxy_url(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with proxy_process(env, tmp_path_factory.mktemp("proxy")) as url:
        yield url


# The SDK clients a test made, closed when it ends: left to the garbage collector, a pooled socket could be
# finalised first and warn (an error here) in whichever later test happened to collect it.
_CLIENTS: list[openai.OpenAI] = []


@pytest.fixture(autouse=True)
def _close_clients() -> Iterator[None]:
    yield
    while _CLIENTS:
        _CLIENTS.pop().close()


def client_for(proxy_url: str, user: str, **kw: object) -> openai.OpenAI:
    client = openai.OpenAI(base_url=f"{proxy_url}/v1", api_key=token(user), **kw)  # type: ignore[arg-type]
    _CLIENTS.append(client)
    return client


def quota(proxy_url: str, user: str) -> dict:
    r = httpx.get(f"{proxy_url}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"})
    return r.json()["budgets"][0]


def ledger_row(env: dict[str, str], request_id: str) -> dict:
    return eventually(
        lambda: pg_row(env["DATABASE_URL"], "select * from usage_records where client_request_id = $1", request_id)
    )


def cli(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "proxy", *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_chat_completion(proxy_url: str, env: dict[str, str]) -> None:
    user = uid()
    raw = client_for(proxy_url, user).chat.completions.with_raw_response.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "Hello"}],
        extra_headers={"X-Request-Id": (rid := uid("req"))},
    )
    answer = raw.parse()
    assert answer.choices[0].message.content == MOCK_TEXT
    assert answer.usage is not None and answer.usage.total_tokens == 30
    h = raw.headers
    assert (h["x-quota-limit"], h["x-quota-used"], h["x-quota-remaining"], h["x-quota-state"]) == (
        "100000",
        "30",
        "99970",
        "ok",
    )
    assert h["x-quota-reset"].endswith("-01T00:00:00Z") and h["x-request-id"] == rid
    row = ledger_row(env, rid)
    assert (row["user_id"], row["model"], row["endpoint"], row["status"], row["http_status"]) == (
        user,
        "mock-gpt",
        "chat",
        "ok",
        200,
    )
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"], row["stream"], row["estimated"]) == (
        10,
        20,
        30,
        False,
        False,
    )
    assert quota(proxy_url, user)["used"] == 30


def test_exact_usage_moves_the_budget_by_exactly_that(proxy_url: str) -> None:
    user = uid()
    client = client_for(proxy_url, user)
    for _ in range(3):
        answer = client.chat.completions.create(model="mock-exact", messages=[{"role": "user", "content": "count me"}])
        assert answer.usage.total_tokens == 12
    eventually(lambda: quota(proxy_url, user)["used"] == 36)


def test_stream_passes_through_and_is_charged_its_reported_usage(proxy_url: str, env: dict[str, str]) -> None:
    user = uid()
    stream = client_for(proxy_url, user).chat.completions.create(
        model="mock-gpt",
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        extra_headers={"X-Request-Id": (rid := uid("req"))},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == MOCK_TEXT
    assert all(c.usage is None for c in chunks)  # the usage chunk the proxy asked for is not shown
    row = ledger_row(env, rid)
    assert row["stream"] is True and row["estimated"] is False and row["status"] == "ok"
    assert row["total_tokens"] == row["prompt_tokens"] + row["completion_tokens"] > 0
    assert row["ttft_ms"] is not None and row["ttft_ms"] <= row["latency_ms"]
    eventually(lambda: quota(proxy_url, user)["used"] == row["total_tokens"])


def test_stream_with_usage_requested_shows_it_and_charges_it(proxy_url: str) -> None:
    user = uid()
    chunks = list(
        client_for(proxy_url, user).chat.completions.create(
            model="mock-gpt",
            messages=[{"role": "user", "content": "Hi"}],
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    usage = chunks[-1].usage
    assert usage is not None and usage.total_tokens > 0
    eventually(lambda: quota(proxy_url, user)["used"] == usage.total_tokens)


def test_user_past_the_budget_gets_a_readable_429_without_retries(proxy_url: str, env: dict[str, str]) -> None:
    user = uid()
    assert "30 tokens per month" in cli(env, "budget", "set", user, "30")
    client = client_for(proxy_url, user)  # default max_retries=2: x-should-retry must stop them

    def first_request_allowed() -> bool:
        client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "Hello"}])
        return True

    eventually(lambda: quota(proxy_url, user)["limit"] == 30)  # the proxy sees it within BUDGET_REFRESH_SECONDS
    eventually(first_request_allowed)
    eventually(lambda: quota(proxy_url, user)["used"] == 30)
    with pytest.raises(openai.RateLimitError) as info:
        client.chat.completions.create(model="mock-gpt", messages=[{"role": "user", "content": "Again"}])
    err = info.value
    assert err.status_code == 429 and err.code == "insufficient_quota"
    assert err.body["message"].startswith("Monthly token budget used up: 30 of 30 tokens. It resets on ")  # type: ignore[index]
    sentence, _, link = err.body["message"].partition(" Your usage statement: ")  # type: ignore[index]
    assert sentence.endswith(" 00:00 UTC.") and link.startswith(f"{proxy_url}/me?s=")
    assert err.response.headers["x-quota-state"] == "blocked"
    blocked = "select count(*) from usage_records where user_id = $1 and status = 'blocked'"
    eventually(lambda: pg_row(env["DATABASE_URL"], blocked, user)[0] == 1)
    shown = orjson.loads(cli(env, "budget", "show", user))
    assert (shown["limit"], shown["used"], shown["remaining"]) == (30, 30, 0)


def test_embeddings_are_charged_and_models_are_not(proxy_url: str, env: dict[str, str]) -> None:
    user = uid()
    client = client_for(proxy_url, user)
    result = client.embeddings.create(model="mock-embed", input="hello world")
    assert result.data[0].embedding == [0.1, 0.2, 0.3]
    eventually(lambda: quota(proxy_url, user)["used"] == result.usage.prompt_tokens > 0)
    ids = {m.id for m in client.models.list()}
    assert {"mock-gpt", "mock-exact", "mock-embed"} <= ids
    assert quota(proxy_url, user)["used"] == result.usage.prompt_tokens


def test_legacy_completions_endpoint(proxy_url: str) -> None:
    user = uid()
    answer = client_for(proxy_url, user).completions.create(model="mock-gpt", prompt="Say hi")
    assert answer.choices[0].text == MOCK_TEXT
    eventually(lambda: quota(proxy_url, user)["used"] == answer.usage.total_tokens)


def test_token_cli_mints_a_token_the_proxy_accepts(proxy_url: str, env: dict[str, str]) -> None:
    minted = cli(env, "token", "issue", "--sub", user := uid(), "--tenant", "acme", "--ttl", "1h").strip()
    r = httpx.get(f"{proxy_url}/v1/quota", headers={"Authorization": f"Bearer {minted}"})
    assert r.status_code == 200 and r.json()["user"] == user and r.json()["tenant"] == "acme"


def test_readyz_sees_all_three_dependencies(proxy_url: str) -> None:
    r = httpx.get(f"{proxy_url}/readyz")
    assert r.status_code == 200
    assert {k: v for k, v in r.json()["checks"].items() if k != "ledger_backlog"} == {
        "redis": "ok",
        "postgres": "ok",
        "litellm": "ok",
    }


def test_user_stopping_a_long_answer_is_charged_what_was_streamed(proxy_url: str, env: dict[str, str]) -> None:
    user = uid()
    stream = client_for(proxy_url, user).chat.completions.create(
        model="mock-long",
        messages=[{"role": "user", "content": "Tell me a long story"}],
        stream=True,
        extra_headers={"X-Request-Id": (rid := uid("req"))},
    )
    first = next(iter(stream))
    assert first.choices[0].delta.content
    stream.close()  # the user presses "stop"
    row = ledger_row(env, rid)
    assert (row["status"], row["estimated"]) == ("cancelled", True)
    full_answer = 1000 // 4  # mock-long is about 1,000 characters
    assert 0 < row["completion_tokens"] < full_answer / 2
    eventually(
        lambda: quota(proxy_url, user)["used"] == row["total_tokens"] and quota(proxy_url, user)["reserved"] == 0
    )


# --- LibreChat, as its OpenAI client calls a custom endpoint (../shared/fixtures/librechat-requests.md) ---

MONGO_ID = "6650f1c2a9b8c7d6e5f40312"  # LibreChat user ids are MongoDB ObjectIds
LIBRECHAT_HEADERS = {
    "User-Agent": "langchainjs-openai/1.0.0 ((node/v22.11.0; linux; x64))",
    "X-Stainless-Retry-Count": "0",
}


def librechat_client(proxy_url: str, api_key: str, headers: dict[str, str] | None = None) -> openai.OpenAI:
    # LibreChat runs its client with maxRetries 0 and sends the yaml `headers` on every call.
    client = openai.OpenAI(
        base_url=f"{proxy_url}/v1",
        api_key=api_key,
        max_retries=0,
        default_headers={**LIBRECHAT_HEADERS, **(headers or {})},
    )
    _CLIENTS.append(client)
    return client


def librechat_chat(client: openai.OpenAI, request_id: str) -> str:
    """A normal message: streamed, no stream_options, `user` always in the body."""
    stream = client.chat.completions.create(
        model="mock-gpt",
        stream=True,
        user=MONGO_ID,
        extra_headers={"X-Request-Id": request_id},
        messages=[
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": "Explain TCP slow start"},
        ],
    )
    return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)


def librechat_title(client: openai.OpenAI, request_id: str) -> str:
    """The title call after the first exchange: not streamed."""
    answer = client.chat.completions.create(
        model="mock-gpt",
        stream=False,
        user=MONGO_ID,
        extra_headers={"X-Request-Id": request_id},
        messages=[
            {
                "role": "user",
                "content": "Provide a concise, 5-word-or-less title for the conversation, using title "
                "case conventions. Only return the title itself.\n\n"
                "Conversation:\nUser: Explain TCP slow start\nAI: ...",
            }
        ],
    )
    return answer.choices[0].message.content or ""


def test_librechat_per_user_key(proxy_url: str, env: dict[str, str]) -> None:
    """Mode 1: the admin mints a token per user, the user pastes it (apiKey: user_provided)."""
    user = uid()
    client = librechat_client(proxy_url, token(user))
    assert librechat_chat(client, rid := uid("req")) == MOCK_TEXT
    assert librechat_title(client, tid := uid("req")) == MOCK_TEXT
    for request_id in (rid, tid):
        row = ledger_row(env, request_id)
        assert row["user_id"] == user and row["via"] is None  # the body's `user` cannot re-assign the charge


def test_librechat_service_token_with_user_headers(proxy_url: str, env: dict[str, str]) -> None:
    """Mode 2: one service token with the delegation claim; LibreChat fills X-User-Id per request."""
    service = cli(env, "token", "issue", "--sub", "librechat", "--tenant", "acme", "--delegate").strip()
    end_user = f"{MONGO_ID[:-6]}{uid()[-6:]}"
    client = librechat_client(proxy_url, service, {"X-User-Id": end_user, "X-User-Email": "bob@acme.example"})
    assert librechat_chat(client, rid := uid("req")) == MOCK_TEXT
    assert librechat_title(client, tid := uid("req")) == MOCK_TEXT
    for request_id in (rid, tid):
        row = ledger_row(env, request_id)
        assert (row["user_id"], row["tenant_id"], row["via"], row["user_email"]) == (
            end_user,
            "acme",
            "librechat",
            "bob@acme.example",
        )
    # The model fetch goes out with the yaml headers unresolved (and ?user= with userIdQuery): it must work.
    raw = httpx.get(
        f"{proxy_url}/v1/models",
        params={"user": end_user},
        headers={
            "Authorization": f"Bearer {service}",
            "X-User-Id": "{{LIBRECHAT_USER_ID}}",
            "X-User-Email": "{{LIBRECHAT_USER_EMAIL}}",
            "User-Agent": "axios/1.7.7",
            "Accept": "application/json, text/plain, */*",
        },
    )
    assert raw.status_code == 200 and "mock-gpt" in [m["id"] for m in raw.json()["data"]]
    unresolved = librechat_client(proxy_url, service, {"X-User-Id": "{{LIBRECHAT_USER_ID}}"})
    assert {m.id for m in unresolved.models.list()} >= {"mock-gpt"}
    # A chat whose header is still a placeholder is charged to the body's user, never to "{{LIBRECHAT_USER_ID}}".
    librechat_chat(unresolved, pid := uid("req"))
    assert ledger_row(env, pid)["user_id"] == MONGO_ID


def test_librechat_openid_token_verified_through_jwks(e2e_settings, tmp_path_factory: pytest.TempPathFactory) -> None:  # type: ignore[no-untyped-def]
    """Mode 3: LibreChat forwards the user's identity-provider token; the proxy verifies it with the JWKS."""
    idp_key = KeyPair("RS256", "idp-1")
    idp = JwksServer(idp_key)
    with serve(idp.app) as idp_url:
        settings = replace(
            e2e_settings,
            jwt_secret="",
            jwt_jwks_url=f"{idp_url}/jwks",
            jwt_issuer="https://idp.acme.example/realms/acme",
            jwt_audience="librechat",
            jwt_user_claim="preferred_username",
            ledger_stream=f"test:oidc:{uid()}",
        )
        env = settings_env(settings)
        port = free_port()
        proc = start_proxy(env, port, tmp_path_factory.mktemp("oidc") / "proxy.log")
        try:
            user = uid("oidc")
            access_token = idp_key.token(
                "9c1e-uuid", preferred_username=user, iss="https://idp.acme.example/realms/acme", aud="librechat"
            )
            client = librechat_client(f"http://127.0.0.1:{port}", "unused", {"Authorization": f"Bearer {access_token}"})
            assert librechat_chat(client, rid := uid("req")) == MOCK_TEXT
            assert ledger_row(env, rid)["user_id"] == user
            wrong_audience = idp_key.token(
                "x", preferred_username=user, iss="https://idp.acme.example/realms/acme", aud="other"
            )
            with pytest.raises(openai.AuthenticationError):
                librechat_client(f"http://127.0.0.1:{port}", wrong_audience).models.list()
            assert idp.hits == 1
        finally:
            stop(proc)
