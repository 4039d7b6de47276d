"""Budget integrity: the issue's findings 1-7, each over real HTTP against the fake upstream, and a failure
injected at every step of a request's path.

The fake upstream's `honest` models report the usage that was asked for (the prompt as sent, every answer
written to its cap), so a request that slips past the budget really costs what it could.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import random
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

import asyncpg
import httpx
import pytest
import redis
from redis.exceptions import TimeoutError as RedisTimeoutError

from proxy.app import create_app
from proxy.config import Settings
from proxy.errors import ServiceUnavailable, UpstreamError
from proxy.forward import Upstream, Upstreamed
from proxy.tokens import Tokenizer

from .fake_upstream import ECHOED_SK_KEY, LEAKY_HEADERS, FakeUpstream
from .helpers import count_rows, eventually, serve, token, uid

MASTER_KEY = f"sk-master-{secrets.token_hex(16)}"
BUDGET = 1000
TOKENS = Tokenizer.load()


@dataclass
class Proxy:
    """A proxy app served on loopback, kept so its live objects can be inspected and patched."""

    app: Any
    url: str
    client: httpx.Client
    settings: Settings
    fake: FakeUpstream

    @property
    def services(self) -> Any:
        return self.app.state.services

    @property
    def relay(self) -> Any:
        return self.services.relay

    @property
    def budget(self) -> Any:
        return self.services.budget

    def post(
        self,
        path: str,
        body: Any,
        user: str | None = None,
        headers: dict[str, str] | None = None,
        bearer: str | None = None,
    ) -> httpx.Response:
        sent = {"Authorization": f"Bearer {bearer or token(user or uid())}", **(headers or {})}
        kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
        return self.client.post(path, headers=sent, **kwargs)

    def quota(self, user: str, *, bearer: str | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
        r = self.client.get(
            "/v1/quota", headers={"Authorization": f"Bearer {bearer or token(user)}", **(headers or {})}
        )
        assert r.status_code == 200, r.text
        return r.json()["budgets"][0]

    def settled(self, user: str, timeout: float = 10) -> dict[str, Any]:
        """The user's budget once nothing is reserved any more, checked in Redis too."""
        try:
            eventually(lambda: self.quota(user)["reserved"] == 0 and not held(self.settings, user), timeout=timeout)
        except AssertionError:
            raise AssertionError(
                f"still reserved after {timeout} s: {self.quota(user)}, in Redis {held(self.settings, user)}"
            ) from None
        return self.quota(user)

    def sent(self, user: str) -> list[dict[str, Any]]:
        """The bodies that reached the upstream for `user` (the proxy sets `user` on each)."""
        return [r for r in list(self.fake.requests) if r.get("user") == user]


@contextmanager
def running(settings: Settings, fake: FakeUpstream) -> Iterator[Proxy]:
    app = create_app(settings)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    with serve(app) as url, httpx.Client(base_url=url, timeout=20, limits=limits) as client:
        yield Proxy(app, url, client, settings, fake)


@pytest.fixture(scope="module")
def proxy(base_settings: Settings, fake: FakeUpstream) -> Iterator[Proxy]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, litellm_master_key=MASTER_KEY, default_token_budget=BUDGET
    )
    with running(settings, fake) as p:
        yield p


def chat(model: str = "honest", content: str = "hello there", **fields: Any) -> dict[str, Any]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def held(settings: Settings, user: str) -> dict[str, Any]:
    """What Redis still holds reserved for a user without a tenant: the `reserved` field and any r:<id>."""
    client = redis.Redis.from_url(settings.redis_url)
    try:
        out: dict[str, Any] = {}
        for key in client.scan_iter(match=f"quota:{{u:{quote(user, safe='')}}}:user:*"):
            if key.endswith(b":exp"):
                if client.zcard(key):
                    out[key.decode()] = client.zrange(key, 0, -1)
                continue
            fields = client.hgetall(key)
            left = {k.decode(): v.decode() for k, v in fields.items() if k.startswith(b"r:")}
            if int(fields.get(b"reserved", 0)) or left:
                out[key.decode()] = {"reserved": fields.get(b"reserved"), **left}
        return out
    finally:
        client.close()


def rows(dsn: str, where: str, *args: Any) -> list[Any]:
    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(f"select * from usage_records where {where} order by created_at", *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def one_row(dsn: str, client_id: str) -> Any:
    """The ledger row of one request, by the X-Request-Id its client sent; exactly one, and it stays one."""
    found = eventually(lambda: rows(dsn, "client_request_id = $1", client_id))
    time.sleep(0.1)
    assert count_rows(dsn, [client_id]) == 1
    return found[0]


def concurrently(n: int, work: Callable[[int], Any], workers: int | None = None) -> list[Any]:
    with concurrent.futures.ThreadPoolExecutor(workers or n) as pool:
        return list(pool.map(work, range(n)))


def noise(n_bytes: int, seed: int) -> str:
    """Base64 of random bytes: text that tokenizes badly (about a token for every 2-3 characters)."""
    return base64.b64encode(random.Random(seed).randbytes(n_bytes)).decode()


def nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {"type": "string"}
    for _ in range(depth):
        value = {"a": value}
    return value


# --- 1. Nested JSON that parses but cannot be re-encoded ----------------------------------------

DEEP = 300  # orjson parses 1,024 levels and encodes 255
DEEP_BODIES = {
    "response_format": chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": nested(DEEP)}}
    ),
    "tools": chat(tools=[{"type": "function", "function": {"name": "f", "parameters": nested(DEEP)}}]),
    "content part": {
        "model": "honest",
        "messages": [{"role": "user", "content": [{"type": "input_audio", "input_audio": nested(DEEP)}]}],
    },
    "message field": {
        "model": "honest",
        "messages": [{"role": "assistant", "content": None, "tool_calls": [nested(DEEP)]}],
    },
}


@pytest.fixture(scope="module")
def narrow(base_settings: Settings, fake: FakeUpstream) -> Iterator[Proxy]:
    """A proxy of 4 concurrent requests at most."""
    settings = replace(
        base_settings, litellm_base_url=fake.url, upstream_max_concurrency=4, default_token_budget=BUDGET
    )
    with running(settings, fake) as p:
        yield p


def send_deep(p: Proxy, bodies: list[dict[str, Any]], users: list[str], ids: list[str]) -> list[tuple[int, str]]:
    """Each body by its own user, 4 at a time (the proxy's limit): (status, error type) of each."""

    def send(i: int) -> tuple[int, str]:
        # A connection each: one the server closes (as it does after a crash) is never reused.
        headers = {
            "Authorization": f"Bearer {token(users[i])}",
            "X-Request-Id": ids[i],
            "Content-Type": "application/json",
        }
        r = httpx.post(
            f"{p.url}/v1/chat/completions", content=json.dumps(bodies[i]).encode(), headers=headers, timeout=20
        )
        return r.status_code, r.json()["error"]["type"]

    return concurrently(len(bodies), send, workers=4)


def test_1_deep_json_holds_no_slot_no_reservation_and_is_recorded_once(narrow: Proxy) -> None:
    """Old: each such body kept its in-flight slot and its reservation for good and wrote no record; past
    UPSTREAM_MAX_CONCURRENCY of them every user got 503 (and the user 429 until the reservation lapsed)."""
    p = narrow
    bodies = list(DEEP_BODIES.values()) * 3  # 12 requests, three times the proxy's concurrency
    users, ids = [uid("deep") for _ in bodies], [uid("req") for _ in bodies]
    answers = send_deep(p, bodies, users, ids)
    assert all(400 <= status < 600 and status != 503 for status, _ in answers), answers
    eventually(lambda: p.relay.in_flight == 0)
    for user, rid in zip(users, ids, strict=True):
        assert p.settled(user)["used"] == 0
        assert one_row(p.settings.database_url, rid)["total_tokens"] == 0
    assert not any(p.sent(u) for u in users)
    # Every slot and every reservation came back: the same users, and others, are served at once.
    again = concurrently(
        8, lambda i: p.post("/v1/chat/completions", chat(max_tokens=5), users[i] if i < 4 else uid()), workers=4
    )
    assert [r.status_code for r in again] == [200] * 8, [r.text for r in again]
    eventually(lambda: p.relay.in_flight == 0)


@pytest.mark.parametrize("body", DEEP_BODIES.values(), ids=DEEP_BODIES.keys())
def test_1_deep_json_is_a_400_naming_the_problem(narrow: Proxy, body: dict[str, Any]) -> None:
    """The body cannot be forwarded: the client's error (400, recorded `invalid`), not the proxy's (500)."""
    user, rid = uid("deep"), uid("req")
    assert send_deep(narrow, [body], [user], [rid]) == [(400, "invalid_request_error")]
    row = one_row(narrow.settings.database_url, rid)
    assert (row["status"], row["http_status"], row["total_tokens"]) == ("invalid", 400, 0)


# --- 2. The prompt estimate driven towards zero -------------------------------------------------


def test_2_token_arrays_count_token_for_token_under_concurrency(proxy: Proxy) -> None:
    """Old: ten concurrent embeddings of 10 x 5,000 token ids with a budget of 1,000 used 300,000."""
    user = uid()
    body = {"model": "honest", "input": [[1] * 5000] * 10}
    answers = concurrently(10, lambda i: proxy.post("/v1/embeddings", body, user))
    assert [r.status_code for r in answers] == [429] * 10, [r.text[:200] for r in answers]
    assert {r.json()["error"]["code"] for r in answers} == {"insufficient_quota"}
    # One /v1/completions prompt of 20,000 token ids (old: used 20,015 of 1,000).
    r = proxy.post("/v1/completions", {"model": "honest", "prompt": [[7] * 20000], "max_tokens": 5}, user)
    assert r.status_code == 429, r.text
    assert proxy.settled(user)["used"] == 0
    assert proxy.sent(user) == []
    eventually(lambda: len(rows(proxy.settings.database_url, "user_id = $1 and status = 'blocked'", user)) == 11)


def _schema(fields: int) -> dict[str, Any]:
    props = {f"field_{i}": {"type": "string", "description": noise(30, i)} for i in range(fields)}
    return {"type": "object", "properties": props, "required": list(props)}


HIDDEN_PROMPTS = {
    "audio part": {
        "messages": [
            {
                "role": "user",
                "content": [{"type": "input_audio", "input_audio": {"data": noise(3000, 1), "format": "wav"}}],
            }
        ]
    },
    "file part": {
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "sum up"},
                    {"type": "file", "file": {"file_data": "data:application/pdf;base64," + noise(3000, 2)}},
                ],
            }
        ]
    },
    "response_format": {
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": _schema(60)}},
    },
    "tools": {
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": f"f{i}", "description": noise(200, 10 + i)}} for i in range(12)
        ],
    },
    "tool call arguments": {
        "messages": [
            {"role": "user", "content": "hi"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": noise(3000, 4)}}
                ],
            },
            {"role": "tool", "tool_call_id": "c1", "content": "ok"},
        ]
    },
    "prediction": {
        "messages": [{"role": "user", "content": "hi"}],
        "prediction": {"type": "content", "content": noise(3000, 5)},
    },
}


@pytest.mark.parametrize("extra", HIDDEN_PROMPTS.values(), ids=HIDDEN_PROMPTS.keys())
def test_2_every_part_of_the_prompt_is_counted(proxy: Proxy, extra: dict[str, Any]) -> None:
    """Old: parts neither text nor image, response_format, tools and other fields counted nothing, so a
    prompt of thousands of tokens was let through a budget of 1,000."""
    user = uid()
    body = {"model": "honest", "max_tokens": 5, **extra}
    assert proxy.fake.honest_usage(body, "chat")["prompt_tokens"] > BUDGET  # what the prompt really costs
    r = proxy.post("/v1/chat/completions", body, user)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    assert proxy.settled(user)["used"] == 0 and proxy.sent(user) == []


# --- 3. n, best_of and prompt lists multiply the answer cap -------------------------------------

FANOUT = {
    "chat n=60": ("/v1/chat/completions", chat(n=60, max_tokens=50)),
    "chat stream n=8": ("/v1/chat/completions", chat(n=8, max_tokens=500, stream=True)),
    "completions best_of=20": (
        "/v1/completions",
        {"model": "honest", "prompt": "Say hi", "n": 2, "best_of": 20, "max_tokens": 50},
    ),
    "completions 8 prompts": (
        "/v1/completions",
        {"model": "honest", "prompt": [f"prompt {i}" for i in range(8)], "max_tokens": 200},
    ),
    "completions token arrays n=3": (
        "/v1/completions",
        {"model": "honest", "prompt": [[1, 2, 3]] * 5, "n": 3, "max_tokens": 100},
    ),
}


@pytest.mark.parametrize("path, body", FANOUT.values(), ids=FANOUT.keys())
def test_3_every_answer_is_reserved_and_capped(proxy: Proxy, path: str, body: dict[str, Any]) -> None:
    """Old: {"n": 60, "max_tokens": 50} with a budget of 1,000 used 3,010."""
    user, rid = uid(), uid("req")
    r = proxy.post(path, body, user, {"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    (upstream,) = proxy.sent(user)
    prompts = len(body["prompt"]) if isinstance(body.get("prompt"), list) else 1
    answers = max(body.get("n", 1), body.get("best_of", 1)) * prompts
    prompt = TOKENS.prompt(body)
    assert prompt + answers * upstream["max_tokens"] <= BUDGET  # each answer capped at its share
    row = one_row(proxy.settings.database_url, rid)
    quota = proxy.settled(user)
    assert quota["used"] == row["total_tokens"] <= BUDGET
    assert row["completion_tokens"] == answers * upstream["max_tokens"]  # the honest upstream wrote them all


def test_3_refused_without_room_for_one_token_per_answer(proxy: Proxy) -> None:
    body = chat(content=" hello" * 880, n=128)
    assert TOKENS.prompt(body) < BUDGET < TOKENS.prompt(body) + 127
    user = uid()
    r = proxy.post("/v1/chat/completions", body, user)
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota", r.text
    assert proxy.sent(user) == [] and proxy.settled(user)["used"] == 0
    assert proxy.post("/v1/chat/completions", {**body, "n": 1}, uid()).status_code == 200  # one answer fits


# --- 4. One person, one budget ------------------------------------------------------------------


def delegate(tenant: str) -> str:
    return token(uid(f"svc-{tenant}"), tenant=tenant, quota_delegate=True)


@pytest.fixture(scope="module")
def small(base_settings: Settings, fake: FakeUpstream) -> Iterator[Proxy]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, litellm_master_key=MASTER_KEY, default_token_budget=200
    )
    with running(settings, fake) as p:
        yield p


def tenant_key(user: str) -> str:
    return f"quota:{{u:{quote(user, safe='')}}}:tenant"


def test_4_a_user_spends_one_budget_whatever_token_sends_them(small: Proxy) -> None:
    """Old: zed (budget 200) spent 546 through a direct token, an acme delegate and a beta delegate."""
    zed, acme, beta = uid("zed"), uid("acme"), uid("beta")
    as_acme, as_beta = delegate(acme), delegate(beta)
    body = chat(max_tokens=150)
    assert small.post("/v1/chat/completions", body, zed).status_code == 200
    for bearer in (as_acme, as_beta):
        for named in ({"X-User-Id": zed}, {}):
            r = small.post(
                "/v1/chat/completions", body if named else {**body, "user": zed}, headers=named, bearer=bearer
            )
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_tenant", r.text
    used = small.settled(zed)["used"]
    assert 150 < used <= 200
    # Settled in Redis first; the writer brings the record to PostgreSQL a moment later.
    charged = eventually(lambda: rows(small.settings.database_url, "user_id = $1", zed))
    assert sum(r["total_tokens"] for r in charged) == used and {r["tenant_id"] for r in charged} == {None}
    client = redis.Redis.from_url(small.settings.redis_url)
    assert client.get(tenant_key(zed)) == b""  # bound to no tenant, the first it was charged under
    # The binding is rebuilt from the user's latest record when Redis and the proxy's memory lose it.
    client.delete(tenant_key(zed))
    small.budget._tenants.clear()
    r = small.post("/v1/chat/completions", body, headers={"X-User-Id": zed}, bearer=as_acme)
    assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_tenant", r.text
    assert client.get(tenant_key(zed)) == b""
    client.close()


def test_4_a_delegates_user_cannot_be_charged_by_a_direct_token_or_another_tenant(small: Proxy) -> None:
    mia, acme = uid("mia"), uid("acme")
    as_acme = delegate(acme)
    r = small.post("/v1/chat/completions", chat(max_tokens=150), headers={"X-User-Id": mia}, bearer=as_acme)
    assert r.status_code == 200, r.text
    for bearer in (token(mia), token(mia, tenant=uid("beta")), delegate(uid("beta"))):
        r = small.post("/v1/chat/completions", chat(max_tokens=150), headers={"X-User-Id": mia}, bearer=bearer)
        assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_tenant", r.text
    assert sum(r["total_tokens"] for r in rows(small.settings.database_url, "user_id = $1", mia)) <= 200


def test_4_a_delegate_reads_only_its_own_tenants_users(small: Proxy) -> None:
    """Old: a delegate read /v1/usage of any user id outside its tenant."""
    zed, mia, acme = uid("zed"), uid("mia"), uid("acme")
    as_acme, as_beta = delegate(acme), delegate(uid("beta"))
    assert small.post("/v1/chat/completions", chat(max_tokens=5), zed).status_code == 200
    assert (
        small.post("/v1/chat/completions", chat(max_tokens=5), headers={"X-User-Id": mia}, bearer=as_acme).status_code
        == 200
    )
    eventually(lambda: rows(small.settings.database_url, "user_id = any($1::text[])", [zed, mia]))
    for path in ("/v1/usage", "/v1/quota"):
        for bearer, user in ((as_beta, zed), (as_beta, mia), (as_acme, zed)):
            r = small.client.get(path, headers={"Authorization": f"Bearer {bearer}", "X-User-Id": user})
            assert r.status_code == 403 and r.json()["error"]["code"] == "wrong_tenant", (path, r.text)
        r = small.client.get(path, headers={"Authorization": f"Bearer {as_acme}", "X-User-Id": mia})
        assert r.status_code == 200 and r.json()["user"] == mia, r.text


def test_4_reading_a_users_quota_does_not_bind_them(small: Proxy) -> None:
    """A user is bound to the tenant of their first charge; a read (here by another tenant's delegate,
    before the user was ever charged) charges nothing and so must bind nothing."""
    newcomer = uid("new")
    as_beta, as_acme = delegate(uid("beta")), delegate(uid("acme"))
    small.client.get("/v1/quota", headers={"Authorization": f"Bearer {as_beta}", "X-User-Id": newcomer})
    r = small.post("/v1/chat/completions", chat(max_tokens=5), headers={"X-User-Id": newcomer}, bearer=as_acme)
    assert r.status_code == 200, r.text


# --- 5. Both caps clamped -----------------------------------------------------------------------

CAPS = {
    "max_completion_tokens small": {"max_completion_tokens": 1, "max_tokens": 100_000},
    "max_tokens small": {"max_tokens": 1, "max_completion_tokens": 100_000},
    "both large, streamed": {"max_tokens": 100_000, "max_completion_tokens": 90_000, "stream": True},
}


@pytest.mark.parametrize("caps", CAPS.values(), ids=CAPS.keys())
def test_5_every_cap_sent_upstream_fits_the_reservation(proxy: Proxy, caps: dict[str, Any]) -> None:
    """Old: {"max_completion_tokens": 1, "max_tokens": 100000} reserved prompt + 1 and sent max_tokens 100000."""
    user, rid = uid(), uid("req")
    body = chat(**caps)
    r = proxy.post("/v1/chat/completions", body, user, {"X-Request-Id": rid})
    assert r.status_code == 200, r.text
    (upstream,) = proxy.sent(user)
    prompt = TOKENS.prompt(body)
    asked = min(v for k, v in caps.items() if k.startswith("max_"))
    room = BUDGET - prompt
    # Asking for more than the room leaves half of it (at most HOLDBACK_TOKENS) for a concurrent request.
    fits = asked if asked <= room else room - min(room // 2, proxy.settings.holdback_tokens)
    assert upstream["max_tokens"] == upstream["max_completion_tokens"] == fits
    row = one_row(proxy.settings.database_url, rid)
    assert proxy.settled(user)["used"] == row["total_tokens"] <= BUDGET


# --- 6. Upstream headers and bodies filtered ----------------------------------------------------

LEAKY = [h for h in LEAKY_HEADERS if not h.startswith("openai-")]


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_6_internal_upstream_headers_stay_in_the_proxy(proxy: Proxy, stream: bool) -> None:
    """Old: clients received x-litellm-key-spend, x-litellm-model-api-base and set-cookie."""
    r = proxy.post("/v1/chat/completions", chat("leaky-headers", stream=stream))
    assert r.status_code == 200, r.text
    assert not [h for h in LEAKY if h in r.headers], dict(r.headers)
    assert "upstream-secret" not in str(r.headers) and "internal-provider" not in str(r.headers)
    assert r.headers["openai-model"] == "gpt-fake" and r.headers["x-litellm-response-cost"] == "0.00042"


@pytest.mark.parametrize(
    "path, body",
    [
        ("/v1/chat/completions", chat("echo-auth-error")),
        ("/v1/chat/completions", chat("echo-auth-error", stream=True)),
        ("/v1/embeddings", {"model": "echo-auth-error", "input": "hi"}),
    ],
    ids=["chat", "stream", "embeddings"],
)
def test_6_an_upstream_error_echoing_secrets_is_rebuilt_without_them(
    proxy: Proxy, path: str, body: dict[str, Any]
) -> None:
    """Old: an upstream error body echoing the Authorization header handed the master key to the client."""
    user, rid = uid(), uid("req")
    r = proxy.post(path, body, user, {"X-Request-Id": rid})
    assert r.status_code == 400, r.text
    assert MASTER_KEY not in r.text and MASTER_KEY[10:] not in r.text and ECHOED_SK_KEY not in r.text
    assert not re.search(r"(?i)bearer\s+(?!\[redacted\])", r.text) and "internal-provider" not in r.text
    error = r.json()["error"]
    assert set(r.json()) == {"error"} and set(error) == {"message", "type", "code", "param"}
    assert error["message"].startswith("Bad request.") and "[redacted]" in error["message"]
    assert error["type"] == "invalid_request_error"
    assert not [h for h in LEAKY if h in r.headers], dict(r.headers)
    row = one_row(proxy.settings.database_url, rid)
    assert (row["status"], row["http_status"], row["total_tokens"]) == ("upstream_error", 400, 0)
    assert proxy.settled(user)["used"] == 0


@pytest.mark.parametrize("stream", [False, True], ids=["answer", "stream"])
def test_6_the_master_key_never_reaches_a_client_in_an_answer(proxy: Proxy, stream: bool) -> None:
    r = proxy.post("/v1/chat/completions", chat("leak-master-key", stream=stream))
    assert r.status_code == 200, r.text
    assert MASTER_KEY not in r.text and "the key is [redacted]." in r.text
    assert (
        r.text.rstrip().endswith("data: [DONE]")
        if stream
        else r.json()["choices"][0]["message"]["content"] == "the key is [redacted]."
    )


def test_6_upstream_refusing_the_master_key_is_a_502_without_it(proxy: Proxy) -> None:
    user, rid = uid(), uid("req")
    r = proxy.post("/v1/chat/completions", chat("unauthorized"), user, {"X-Request-Id": rid})
    assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_error", r.text
    assert MASTER_KEY not in r.text and "invalid key passed" not in r.text
    row = one_row(proxy.settings.database_url, rid)
    assert (row["status"], row["http_status"]) == ("upstream_error", 502)
    assert proxy.settled(user)["used"] == 0


# --- 7. The client's X-Request-Id is a label, not the reservation's key --------------------------


def test_6_an_answer_far_larger_than_the_read_buffer_arrives_whole(proxy: Proxy) -> None:
    """Embeddings of many inputs: a JSON answer of ~1.3 MB, read whole past the upstream client's
    back-pressure mark (http_wire.HIGH_WATER, 256 KiB)."""
    user = uid()
    r = proxy.post("/v1/embeddings", {"model": "honest", "input": ["a"] * 100, "dimensions": 4000}, user)
    assert r.status_code == 200, r.text[:300]
    assert len(r.content) > 1_000_000
    assert [len(d["embedding"]) for d in r.json()["data"]] == [4000] * 100


def test_7_concurrent_requests_sharing_a_client_id_each_settle(proxy: Proxy) -> None:
    """Old: ten concurrent requests with one X-Request-Id left 117 tokens reserved for good."""
    user, rid = uid(), uid("req")
    answers = concurrently(
        10, lambda i: proxy.post("/v1/chat/completions", chat("honest-slow", max_tokens=5), user, {"X-Request-Id": rid})
    )
    assert [r.status_code for r in answers] == [200] * 10, [r.text for r in answers]
    assert {r.headers["x-request-id"] for r in answers} == {rid}
    recorded = eventually(
        lambda: (
            (found := rows(proxy.settings.database_url, "client_request_id = $1", rid)) and len(found) == 10 and found
        )
    )
    ids = {row["request_id"] for row in recorded}
    assert len(ids) == 10 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert {r["_headers"]["x-request-id"] for r in proxy.sent(user)} == ids  # the upstream sees the proxy's ids
    quota = proxy.settled(user)
    assert quota["used"] == sum(row["total_tokens"] for row in recorded)


# --- Fifty concurrent requests of one user never pass the budget --------------------------------


def mixed(i: int) -> tuple[str, dict[str, Any]]:
    kind = i % 4
    if kind == 0:
        return "/v1/chat/completions", chat("honest-slow", max_tokens=40)
    if kind == 1:
        return "/v1/chat/completions", chat("honest-slow", n=2, max_tokens=30, stream=True)
    if kind == 2:
        return "/v1/completions", {
            "model": "honest-slow",
            "prompt": ["one", "two"],
            "best_of": 3,
            "n": 2,
            "max_tokens": 20,
        }
    return "/v1/embeddings", {"model": "honest-slow", "input": [[5] * 60]}


def test_fifty_concurrent_requests_of_one_user_never_push_used_past_the_budget(proxy: Proxy) -> None:
    user = uid()
    samples: list[tuple[int, int]] = []
    stop = threading.Event()

    def sample() -> None:
        client = redis.Redis.from_url(proxy.settings.redis_url)
        while not stop.is_set():
            for key in client.scan_iter(match=f"quota:{{u:{user}}}:user:*"):
                if not key.endswith(b":exp"):
                    used, reserved = client.hmget(key, "used", "reserved")
                    samples.append((int(used or 0), int(reserved or 0)))
            time.sleep(0.005)
        client.close()

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        answers = concurrently(50, lambda i: proxy.post(*mixed(i), user))
    finally:
        stop.set()
        sampler.join()
    statuses = [r.status_code for r in answers]
    assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses
    assert samples and all(used + reserved <= BUDGET for used, reserved in samples), max(samples, key=sum)
    quota = proxy.settled(user)
    recorded = eventually(
        lambda: (found := rows(proxy.settings.database_url, "user_id = $1", user)) and len(found) == 50 and found
    )
    assert sorted(r["status"] for r in recorded) == sorted("ok" if s == 200 else "blocked" for s in statuses)
    assert quota["used"] == sum(r["total_tokens"] for r in recorded) <= BUDGET
    eventually(lambda: proxy.relay.in_flight == 0)


# --- A failure at every step of the path ---------------------------------------------------------


def _raise(exc: BaseException) -> Callable[..., Any]:
    def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


def _araise(exc: BaseException) -> Callable[..., Any]:
    async def fail(*args: Any, **kwargs: Any) -> Any:
        raise exc

    return fail


def _reply_lost(p: Proxy, mp: pytest.MonkeyPatch) -> None:
    """The reserve script ran in Redis, and then its reply was lost (the connection timed out)."""
    sender = p.budget._sender
    real = sender.call

    async def call(*command: Any) -> Any:
        result = await real(*command)
        if command[0] == "EVALSHA" and command[1] == p.budget._reserve.sha and result[0] == 1:
            raise RedisTimeoutError("injected: the reply to a granted reserve was lost")
        return result

    mp.setattr(sender, "call", call)


def _failing_submit(
    p: Proxy, mp: pytest.MonkeyPatch, matches: Callable[[tuple[Any, ...]], bool], *, at_once: bool
) -> None:
    """The relay's sender cannot send the settle (or the record): at once, or its reply is an error."""
    sender = p.relay._sender
    real = sender.submit

    def submit(*command: Any) -> Any:
        if not matches(command):
            return real(*command)
        if at_once:
            raise redis.ConnectionError("injected: Redis connection lost")
        future = asyncio.get_running_loop().create_future()
        future.set_exception(redis.ConnectionError("injected: Redis connection lost"))
        return future

    mp.setattr(sender, "submit", submit)


def _is_settle(p: Proxy) -> Callable[[tuple[Any, ...]], bool]:
    return lambda command: command[0] == "EVALSHA" and command[1] == p.budget._settle.sha


@dataclass(frozen=True)
class Step:
    inject: Callable[[Proxy, pytest.MonkeyPatch], None]
    status: str  # the ledger status the request ends with
    model: str = "fake"
    stream: bool = False
    hang_up: bool = False  # the client leaves after the first chunk


BOOM = RuntimeError("injected failure")
STEPS = {
    "parse": Step(lambda p, mp: mp.setattr("proxy.relay.read_json", _araise(BOOM)), "error"),
    "check": Step(lambda p, mp: mp.setattr("proxy.relay.check", _raise(BOOM)), "error"),
    "tenant": Step(
        lambda p, mp: mp.setattr(p.budget, "check_tenant", _araise(ServiceUnavailable("injected"))), "unavailable"
    ),
    "count": Step(lambda p, mp: mp.setattr(p.relay, "_count_prompt", _araise(BOOM)), "error"),
    "shape": Step(lambda p, mp: mp.setattr("proxy.relay.encode", _raise(BOOM)), "error"),
    "reserve": Step(
        lambda p, mp: mp.setattr(p.budget, "reserve", _araise(ServiceUnavailable("injected"))), "unavailable"
    ),
    "reserve reply lost": Step(_reply_lost, "unavailable"),
    "connect": Step(
        lambda p, mp: mp.setattr(p.services.upstream, "_pool", Upstream("http://127.0.0.1:9", "k")._pool), "unavailable"
    ),
    "first byte": Step(lambda p, mp: None, "upstream_error", model="honest-slow"),  # slower than the read timeout
    "first byte of a stream": Step(lambda p, mp: None, "upstream_error", model="slow-first-byte", stream=True),
    "answer read": Step(
        lambda p, mp: mp.setattr(Upstreamed, "read_for_client", _araise(UpstreamError("injected"))), "upstream_error"
    ),
    "mid-stream": Step(lambda p, mp: None, "upstream_error", model="cut-stream", stream=True),
    "client leaves mid-stream": Step(lambda p, mp: None, "cancelled", model="endless", stream=True, hang_up=True),
    "settle not sent": Step(lambda p, mp: _failing_submit(p, mp, _is_settle(p), at_once=True), "ok"),
    "settle failed": Step(lambda p, mp: _failing_submit(p, mp, _is_settle(p), at_once=False), "ok"),
    "settle command": Step(lambda p, mp: mp.setattr(p.budget, "settle_command", _raise(BOOM)), "ok"),
    "record not sent": Step(lambda p, mp: _failing_submit(p, mp, lambda c: c[0] == "XADD", at_once=True), "ok"),
}


@pytest.fixture(scope="module")
def fragile(base_settings: Settings, fake: FakeUpstream) -> Iterator[Proxy]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, litellm_master_key=MASTER_KEY, upstream_read_timeout=0.25
    )
    with running(settings, fake) as p:
        yield p


@pytest.mark.parametrize("step", STEPS.values(), ids=STEPS.keys())
def test_a_failure_at_any_step_releases_the_slot_settles_and_records_once(
    fragile: Proxy, monkeypatch: pytest.MonkeyPatch, step: Step
) -> None:
    p, user, rid = fragile, uid(), uid("req")
    eventually(lambda: p.relay.in_flight == 0)
    body = chat(step.model, max_tokens=20, stream=step.stream)
    headers = {"Authorization": f"Bearer {token(user)}", "X-Request-Id": rid}
    step.inject(p, monkeypatch)
    if step.hang_up:
        with p.client.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
            assert r.status_code == 200
            next(r.iter_raw())
    else:
        r = p.client.post("/v1/chat/completions", json=body, headers=headers)
        assert "Traceback" not in r.text
    monkeypatch.undo()  # the checks below go through the same objects
    eventually(lambda: p.relay.in_flight == 0)
    row = one_row(p.settings.database_url, rid)
    assert row["status"] == step.status and row["user_id"] == user
    quota = p.settled(
        user, timeout=4
    )  # nothing reserved, in the counter or as an r:<id> field (reconciled each second)
    assert quota["used"] == row["total_tokens"]  # settled with exactly what was recorded


def test_a_user_named_in_a_header_is_the_same_user_as_in_the_body(proxy: Proxy) -> None:
    """ASGI hands headers over as latin-1: a non-ASCII id sent as UTF-8 in X-User-Id must still be one user."""
    name = f"josé-{secrets.token_hex(3)}"
    service = {"Authorization": f"Bearer {token(uid('svc'), tenant=uid('t'), quota_delegate=True)}"}
    by_header = proxy.client.post(
        "/v1/chat/completions", json=chat("fake"), headers={**service, "X-User-Id": name.encode()}
    )
    by_body = proxy.client.post("/v1/chat/completions", json=chat("fake", user=name), headers=service)
    assert by_header.status_code == by_body.status_code == 200, (by_header.text, by_body.text)
    assert int(by_body.headers["x-quota-used"]) == 2 * 12  # both on one counter (the fake charges 12 each)


@pytest.mark.parametrize(
    "part",
    [
        {"type": "image_url", "image_url": {"url": "data:text/plain;base64,aGVsbG8="}},
        {"type": "image_url", "image_url": {"url": "data:application/pdf;base64,JVBERi0="}},
        {"type": "image_url", "image_url": {"url": "file:///etc/passwd"}},
        {"type": "file", "file": {"file_id": "file-abc123"}},
    ],
    ids=["text behind an image", "pdf behind an image", "file url", "file by id"],
)
def test_parts_whose_cost_no_reservation_can_bound_are_refused(proxy: Proxy, part: dict[str, Any]) -> None:
    body = {**chat("fake"), "messages": [{"role": "user", "content": [{"type": "text", "text": "read"}, part]}]}
    r = proxy.client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token(uid())}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0].content", r.text
