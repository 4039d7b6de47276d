"""LibreChat v0.8.8 as it is today, replayed byte for byte against the proxy and the real LiteLLM mock.

What LibreChat sends is in ../shared/fixtures/librechat-requests.md (section 0 overrides sections 2 to 4):
its chats streamed without `stream_options`, the title sent at the same moment as the chat (not streamed,
no cap, the prompt ending in `AI: `), `/models` with the yaml headers resolved (older LibreChat sends
`{{LIBRECHAT_USER_ID}}` literally), tool turns, image parts, `reasoning_effort`, `max_completion_tokens`,
and what a person reads when the proxy answers 429. Requests go out with raw httpx and LibreChat's own
headers; every user is a MongoDB ObjectId named by a LibreChat service (delegate) token, as in
docs/librechat.md mode 2. The older replays (a per-user key, OpenID) are in tests/test_e2e.py.

litellm_config.yaml has no `gpt-5…` model: `max_completion_tokens` (which LibreChat sends for `gpt-5…`
names) goes to `mock-gpt`. Every user and team gets its budget through /admin/budgets rather than from
DEFAULT_TOKEN_BUDGET: a proxy writes its defaults into the shared `budgets` rows '*', which every other
proxy on the same database then reads.
"""

from __future__ import annotations

import asyncio
import base64
import secrets
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import asyncpg
import httpx
import orjson
import pytest

from proxy.config import Settings

from .helpers import eventually, proxy_process, settings_env, token, uid

MOCK_TEXT = "Hello from the mock model. This answer is fixed so tests can rely on it."
SLOW_TEXT = "This answer took its time."
NODE = "v22.11.0"
TITLE_PROMPT = (
    "Provide a concise, 5-word-or-less title for the conversation, using title case conventions. "
    "Only return the title itself.\n\nConversation:\n"
)
# What LibreChat prints before the error's message, and what LangChain appends to it (MODEL_RATE_LIMIT).
SHOWN_PREFIX = "Something went wrong. Here's the specific error message we encountered: "
SHOWN_ERROR = "An error occurred while processing the request: "
LANGCHAIN_SUFFIX = "\n\nTroubleshooting URL: https://js.langchain.com/docs/troubleshooting/errors/MODEL_RATE_LIMIT/\n"
SHOWN_LIMIT = 512  # LibreChat cuts longer plain-text errors

# LibreChat v0.8.8 (@librechat/agents 3.6.x: @langchain/openai 1.5.8, openai 6.49.0) and v0.8.2 (agents 3.0.x,
# openai 5.8.2, the SDK's own User-Agent).
STACKS = {
    "v0.8.8": (f"langchainjs-openai/1.0.0 ((node/{NODE}; linux; x64))", "6.49.0"),
    "v0.8.2": ("CustomOpenAIClient/JS 5.8.2", "5.8.2"),
}


@pytest.fixture(scope="module")
def env(e2e_settings: Settings) -> dict[str, str]:
    return settings_env(replace(e2e_settings, budget_refresh_seconds=0.2, ledger_stream=f"test:lcreplay:{uid()}"))


@pytest.fixture(scope="module")
def proxy_url(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with proxy_process(env, tmp_path_factory.mktemp("lcreplay")) as url:
        yield url


class LibreChat:
    """One LibreChat server: a service token with the delegation claim, its yaml `headers` resolved per user."""

    def __init__(
        self, url: str, *, stack: str = "v0.8.8", team_tokens: int = 10_000_000, user_keys: bool = False
    ) -> None:
        self.url = url
        self.user_keys = user_keys  # mode 1 (`apiKey: user_provided`): each user's own token, no yaml headers
        self.service = uid("librechat")
        self.tenant = uid("acme")
        self.team_tokens = team_tokens
        self.api_key = token(self.service, tenant=self.tenant, quota_delegate=True)
        self.agent, self.sdk_version = STACKS[stack]

    def new_user(self, tokens: int = 100_000, **budget: Any) -> str:
        """A LibreChat user (a MongoDB ObjectId) with a budget of its own, and the team's, both in force.

        Explicit budgets, because the defaults are rows of the shared `budgets` table ('*') that any proxy
        started with another DEFAULT_TOKEN_BUDGET or DEFAULT_TENANT_BUDGET rewrites."""
        user = f"{int(time.time()):08x}{secrets.token_hex(8)}"  # a 4-byte timestamp, then random bytes
        admin = {"Authorization": f"Bearer {token(uid('admin'), quota_admin=True)}"}
        for subject, body in (
            (self.tenant, {"tokens": self.team_tokens, "type": "tenant"}),
            (user, {"tokens": tokens, **budget}),
        ):
            r = httpx.put(f"{self.url}/admin/budgets/{subject}", json=body, headers=admin)
            assert r.status_code == 200, r.text
        want = {"user": tokens, "tenant": self.team_tokens}
        eventually(lambda: {b["subject_type"]: b["limit"] for b in self.quota(user)["budgets"]} == want)
        return user

    def headers(self, user: str, conversation: str = "") -> dict[str, str]:
        """A chat's headers (fixture §2, example A): the SDK's, then the yaml `headers` resolved."""
        sdk = {
            "Accept": "application/json",
            "Content-Type": "application/json",
            "Authorization": f"Bearer {token(user, tenant=self.tenant) if self.user_keys else self.api_key}",
            "User-Agent": self.agent,
            "X-Stainless-Retry-Count": "0",
            "X-Stainless-Timeout": "600",
            "X-Stainless-Lang": "js",
            "X-Stainless-Package-Version": self.sdk_version,
            "X-Stainless-OS": "Linux",
            "X-Stainless-Arch": "x64",
            "X-Stainless-Runtime": "node",
            "X-Stainless-Runtime-Version": NODE,
        }
        if self.user_keys:
            return sdk
        return {
            **sdk,
            "X-User-Id": user,
            "X-User-Email": f"{user[:6]}@acme.example",
            "X-Conversation-Id": conversation,
        }

    def post(self, user: str, body: dict[str, Any], **headers: str) -> httpx.Response:
        with httpx.Client(base_url=self.url, timeout=30) as client:
            return client.post(
                "/v1/chat/completions", content=orjson.dumps(body), headers={**self.headers(user), **headers}
            )

    def models(self, user: str, **yaml_headers: str) -> httpx.Response:
        """`GET /models` through axios, `userIdQuery: true`: the yaml headers as this LibreChat sends them."""
        return httpx.get(
            f"{self.url}/v1/models",
            params={"user": user},
            headers={
                "Accept": "application/json, text/plain, */*",
                "Authorization": f"Bearer {self.api_key}",
                "User-Agent": "axios/1.8.2",
                "Accept-Encoding": "gzip, compress, deflate, br",
                **yaml_headers,
            },
        )

    def quota(self, user: str) -> dict[str, Any]:
        r = httpx.get(f"{self.url}/v1/quota", headers={"Authorization": f"Bearer {self.api_key}", "X-User-Id": user})
        assert r.status_code == 200, r.text
        return r.json()  # type: ignore[no-any-return]

    def budget(self, user: str, kind: str = "user") -> dict[str, Any]:
        """The user's own budget (`kind="user"`) or its team's, as /v1/quota shows it."""
        return next(b for b in self.quota(user)["budgets"] if b["subject_type"] == kind)


def chat_body(user: str, text: str = "Explain TCP slow start", model: str = "mock-gpt", **extra: Any) -> dict[str, Any]:
    """A chat turn: streamed, no stream_options, no sampling parameters, `user` always present."""
    return {
        "model": model,
        "user": user,
        "stream": True,
        **extra,
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! How can I help?"},
            {"role": "user", "content": text},
        ],
    }


def title_body(user: str, reply: str = "", model: str = "mock-gpt") -> dict[str, Any]:
    """The title call: `stream: false`, no cap. v0.8.8 sends it with the chat, so the AI part is empty."""
    convo = f"User: Explain TCP slow start\nAI: {reply}"
    return {
        "model": model,
        "user": user,
        "stream": False,
        "messages": [{"role": "user", "content": TITLE_PROMPT + convo}],
    }


def sse(response: httpx.Response) -> list[dict[str, Any]]:
    """The JSON chunks of a streamed answer, which must end with `data: [DONE]`."""
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.text.rstrip().endswith("data: [DONE]"), response.text[-300:]
    events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    return [orjson.loads(e) for e in events if e != "[DONE]"]


def answer_text(chunks: list[dict[str, Any]]) -> str:
    return "".join((c["choices"][0].get("delta") or {}).get("content") or "" for c in chunks if c.get("choices"))


def usage_chunks(chunks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["usage"] for c in chunks if c.get("usage")]


def ledger(env: dict[str, str], user: str, count: int) -> list[asyncpg.Record]:
    """The user's `usage_records` rows, once `count` of them are written (then exactly that many)."""

    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            return await conn.fetch("select * from usage_records where user_id = $1 order by created_at", user)
        finally:
            await conn.close()

    rows = eventually(lambda: (found := asyncio.run(fetch())) and len(found) >= count and found)
    time.sleep(0.1)
    rows = asyncio.run(fetch())
    assert len(rows) == count, [dict(r) for r in rows]
    return rows


def charged_by(env: dict[str, str], service: str) -> dict[str, int]:
    """How many ledger rows each user has that this service token sent."""

    async def fetch() -> list[asyncpg.Record]:
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            return await conn.fetch("select user_id, count(*) from usage_records where via = $1 group by 1", service)
        finally:
            await conn.close()

    return {r["user_id"]: r["count"] for r in asyncio.run(fetch())}


def spend(lc: LibreChat, user: str) -> None:
    """A short non-streamed message: mock-gpt reports 30 tokens."""
    body = {"model": "mock-gpt", "user": user, "stream": False, "messages": [{"role": "user", "content": "Hi"}]}
    r = lc.post(user, body)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 30


def tiny_png() -> bytes:
    """A valid 1x1 PNG."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)  # 1x1, 8-bit RGB
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00\xff\x80\x00"))
        + chunk(b"IEND", b"")
    )


# --- 1. A new conversation near the limit: the chat and, 5 ms later, its title ---


def test_new_conversation_chat_and_title_sent_together_near_the_limit(proxy_url: str, env: dict[str, str]) -> None:
    lc = LibreChat(proxy_url)
    user = lc.new_user(1530, warn_ratio=0.01)
    spend(lc, user)  # 30 of 1,530 used: 1,500 tokens of room, and past the warn ratio
    before = lc.budget(user)
    assert (before["remaining"], before["state"]) == (1500, "warn")

    # mock-slow answers after 2 s, so the two reservations overlap as they do in front of a real model.
    bodies = [chat_body(user, model="mock-slow"), title_body(user, model="mock-slow")]
    results: list[httpx.Response | None] = [None, None]

    def send(i: int) -> None:
        results[i] = lc.post(user, bodies[i])

    threads = [threading.Thread(target=send, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
        time.sleep(0.005)
    for thread in threads:
        thread.join()
    chat, title = results
    assert chat is not None and title is not None
    assert (chat.status_code, title.status_code) == (200, 200), (chat.text, title.text)

    streamed = answer_text(sse(chat))
    assert streamed.startswith(SLOW_TEXT)
    assert "of your monthly token budget" in streamed  # the warn notice, under the streamed answer only
    completion = title.json()
    assert title.headers["content-type"].startswith("application/json")
    assert completion["object"] == "chat.completion"
    message = completion["choices"][0]["message"]
    assert (message["role"], message["content"]) == ("assistant", SLOW_TEXT)  # the title: no notice in it
    assert completion["usage"]["total_tokens"] > 0

    rows = ledger(env, user, 3)
    served = {r["stream"]: r for r in rows[1:]}
    assert set(served) == {True, False}
    for row in served.values():
        assert (row["status"], row["http_status"], row["endpoint"], row["via"], row["tenant_id"]) == (
            "ok",
            200,
            "chat",
            lc.service,
            lc.tenant,
        )
        assert row["model"] == "mock-slow" and row["total_tokens"] > 0
    assert served[False]["total_tokens"] == completion["usage"]["total_tokens"]
    first, second = sorted(served.values(), key=lambda r: r["created_at"])
    assert (second["created_at"] - first["created_at"]).total_seconds() * 1000 < first["latency_ms"]  # side by side
    after = eventually(lambda: (b := lc.budget(user))["reserved"] == 0 and b)
    assert after["used"] == sum(r["total_tokens"] for r in rows) <= 1530


# --- 2. The model list: placeholders resolved (v0.8.8), and sent literally (older LibreChat) ---


def test_models_with_resolved_and_with_literal_placeholders(proxy_url: str, env: dict[str, str]) -> None:
    lc = LibreChat(proxy_url)
    user = lc.new_user()
    exact = {"model": "mock-exact", "user": user, "stream": False, "messages": [{"role": "user", "content": "count"}]}
    assert lc.post(user, exact).json()["usage"]["total_tokens"] == 12
    eventually(lambda: lc.budget(user)["used"] == 12)

    # v0.8.8: the yaml headers resolved; body placeholders and unknown values stripped to "".
    resolved = lc.models(
        user, **{"X-User-Id": user, "X-User-Email": f"{user[:6]}@acme.example", "X-Conversation-Id": ""}
    )
    assert resolved.status_code == 200, resolved.text
    assert {"mock-gpt", "mock-exact", "mock-slow"} <= {m["id"] for m in resolved.json()["data"]}
    assert (resolved.headers["x-quota-used"], resolved.headers["x-quota-limit"]) == ("12", "100000")  # the user's

    # Older LibreChat: the same headers, unresolved. Still a list, and nobody named "{{LIBRECHAT_USER_ID}}".
    literal = lc.models(
        user,
        **{
            "X-User-Id": "{{LIBRECHAT_USER_ID}}",
            "X-User-Email": "{{LIBRECHAT_USER_EMAIL}}",
            "X-Conversation-Id": "{{LIBRECHAT_BODY_CONVERSATIONID}}",
        },
    )
    assert literal.status_code == 200, literal.text
    assert {"mock-gpt", "mock-exact"} <= {m["id"] for m in literal.json()["data"]}
    assert literal.headers["x-quota-used"] == "0"  # the service's own quota: not the user's, nobody's bogus one
    r = httpx.get(
        f"{proxy_url}/v1/quota",
        headers={"Authorization": f"Bearer {lc.api_key}", "X-User-Id": "{{LIBRECHAT_USER_ID}}"},
    )
    assert r.status_code == 200 and r.json()["user"] == lc.service

    # Listing models is never charged, and only the one chat is in the ledger, for the user.
    assert lc.budget(user)["used"] == 12
    rows = ledger(env, user, 1)
    assert charged_by(env, lc.service) == {user: 1}
    assert (rows[0]["model"], rows[0]["total_tokens"], rows[0]["via"]) == ("mock-exact", 12, lc.service)


# --- 3. A tools turn (agents and MCP tools) ---

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Get the current weather for a city.",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
        },
    }
]


def test_tools_turn_then_the_tool_result(proxy_url: str, env: dict[str, str]) -> None:
    lc = LibreChat(proxy_url)
    user = lc.new_user()
    asked = [
        {"role": "system", "content": "You are a helpful assistant with tools."},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    first = {
        "model": "mock-gpt",
        "user": user,
        "stream": True,
        "tools": TOOLS,
        "tool_choice": "auto",
        "messages": asked,
    }
    assert answer_text(sse(lc.post(user, first))) == MOCK_TEXT

    call = {
        "id": "call_9f2c1a",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
    }
    second = {
        **first,
        "messages": [
            *asked,
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "content": "18 °C, clear sky", "tool_call_id": "call_9f2c1a"},
        ],
    }
    chunks = sse(lc.post(user, second))
    assert answer_text(chunks) == MOCK_TEXT

    rows = ledger(env, user, 2)
    assert [(r["status"], r["http_status"], r["stream"], r["estimated"]) for r in rows] == [
        ("ok", 200, True, False)
    ] * 2
    assert all(r["total_tokens"] > 0 for r in rows)
    assert rows[1]["prompt_tokens"] > rows[0]["prompt_tokens"]  # the tool call and its result are part of the prompt


# --- 4. An image part ---


def test_image_part(proxy_url: str, env: dict[str, str]) -> None:
    lc = LibreChat(proxy_url)
    user = lc.new_user()
    image = "data:image/png;base64," + base64.b64encode(tiny_png()).decode()
    body = {
        "model": "mock-gpt",
        "user": user,
        "stream": True,
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is in this picture?"},
                    {"type": "image_url", "image_url": {"url": image}},
                ],
            }
        ],
    }
    assert answer_text(sse(lc.post(user, body))) == MOCK_TEXT
    [row] = ledger(env, user, 1)
    assert (row["status"], row["http_status"]) == ("ok", 200) and row["total_tokens"] > 0


# --- 5. reasoning_effort, and max_completion_tokens as LibreChat sends it for gpt-5… names ---


@pytest.mark.parametrize(
    "extra, system_role",
    [
        ({"reasoning_effort": "low"}, "system"),
        # For gpt-5… names LibreChat turns max tokens into max_completion_tokens and the system role into
        # `developer`; no gpt-5… model is configured, so mock-gpt gets them.
        ({"max_completion_tokens": 200}, "developer"),
        ({"max_completion_tokens": 200, "reasoning_effort": "low"}, "developer"),
    ],
    ids=["reasoning_effort", "max_completion_tokens", "both"],
)
def test_reasoning_effort_and_max_completion_tokens(
    proxy_url: str, env: dict[str, str], extra: dict[str, Any], system_role: str
) -> None:
    lc = LibreChat(proxy_url)
    user = lc.new_user()
    body = chat_body(user, **extra)
    body["messages"].insert(0, {"role": system_role, "content": "Answer briefly."})
    chunks = sse(lc.post(user, body))
    assert answer_text(chunks) == MOCK_TEXT
    [row] = ledger(env, user, 1)
    assert (row["status"], row["http_status"]) == ("ok", 200) and row["total_tokens"] > 0


# --- 6. The 429, as the person reads it in LibreChat ---


def shown_in_librechat(response: httpx.Response) -> str:
    """The plain text LibreChat shows: its prefix, the openai SDK's `<status> <error.message>`, LangChain's URL."""
    return f"{SHOWN_PREFIX}{SHOWN_ERROR}{response.status_code} {response.json()['error']['message']}{LANGCHAIN_SUFFIX}"


@pytest.mark.parametrize(
    "whose, limit, words",
    [("user", 30, 4), ("team", 30, 4), ("team", 60, 60)],
    ids=["user budget used up", "team budget used up", "team budget nearly used up, long conversation"],
)
def test_used_up_budget_gets_a_429_librechat_shows_whole(
    proxy_url: str, env: dict[str, str], whose: str, limit: int, words: int
) -> None:
    lc = LibreChat(proxy_url, team_tokens=limit if whose == "team" else 10_000_000)
    user = lc.new_user(limit if whose == "user" else 100_000)
    spend(lc, user)  # 30 tokens
    eventually(lambda: min(b["remaining"] for b in lc.quota(user)["budgets"]) == limit - 30)

    refused = lc.post(user, chat_body(user, text=" ".join(["Explain TCP slow start"] * (words // 4))))
    assert refused.status_code == 429, refused.text
    assert refused.headers["content-type"].startswith("application/json")
    error = refused.json()["error"]
    assert error["code"] == "insufficient_quota"  # LangChain does not retry it
    assert error["type"] != "token_balance"  # LibreChat would replace the message with its own
    assert refused.headers["x-should-retry"] == "false"
    retry_after = refused.headers.get("retry-after")
    assert retry_after is None or int(retry_after) > 60  # LangChain 1.2.8 retries a Retry-After of 60 s or less

    message = error["message"]
    reset = refused.headers["x-quota-reset"]  # e.g. 2026-09-01T00:00:00Z
    when = f"{reset[:10]} {reset[11:16]} UTC"
    owner = "Monthly token budget" if whose == "user" else f"Your team's ({lc.tenant}) monthly token budget"
    # The sentence a person reads first, then the link to their statement (plain text: they copy it).
    sentence, _, link = message.partition(" Your usage statement: ")
    if limit == 30:
        assert sentence == f"{owner} used up: 30 of 30 tokens. It resets on {when}."
    else:
        assert sentence == (
            f"{owner} is nearly used up: 30 of {limit} tokens used, and the {limit - 30} left are too few for this "
            f"request. It resets on {when}."
        )
    assert link.startswith("http://") and "/me?s=" in link
    shown = shown_in_librechat(refused)
    # Whole up to the link's end; past the cut there is at most LangChain's own troubleshooting URL.
    assert shown[:SHOWN_LIMIT].index(link) + len(link) <= SHOWN_LIMIT, (len(shown), shown)

    # The title call sent with it is refused too (LibreChat only logs that); neither reaches the model.
    title = lc.post(user, title_body(user))
    assert title.status_code == 429 and title.json()["error"]["code"] == "insufficient_quota"
    rows = ledger(env, user, 3)
    assert [(r["status"], r["http_status"]) for r in rows] == [("ok", 200), ("blocked", 429), ("blocked", 429)]
    assert {b["subject_type"]: b["used"] for b in lc.quota(user)["budgets"]} == {"user": 30, "tenant": 30}


# --- 7. The usage chunk reaches LibreChat's own token counter ---


@pytest.mark.parametrize("stack", list(STACKS))
@pytest.mark.parametrize("user_keys", [False, True], ids=["service token", "per-user key"])
def test_stream_carries_the_usage_chunk_for_librechat(
    proxy_url: str, env: dict[str, str], stack: str, user_keys: bool
) -> None:
    """Delegate tokens get it whatever their User-Agent; a per-user key gets it for LibreChat's User-Agents."""
    lc = LibreChat(proxy_url, stack=stack, user_keys=user_keys)
    user = lc.new_user()
    chunks = sse(lc.post(user, chat_body(user)))
    assert answer_text(chunks) == MOCK_TEXT
    [usage] = usage_chunks(chunks)
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    [row] = ledger(env, user, 1)
    assert row["via"] == (None if user_keys else lc.service)
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["total_tokens"],
    )


# --- The older LibreChat (v0.8.2): title after the reply, placeholders sent literally on /models ---


def test_older_librechat_request_shapes_still_work(proxy_url: str, env: dict[str, str]) -> None:
    lc = LibreChat(proxy_url, stack="v0.8.2")
    user = lc.new_user()
    literal = {"X-User-Id": "{{LIBRECHAT_USER_ID}}", "X-User-Email": "{{LIBRECHAT_USER_EMAIL}}"}
    models = lc.models(user, **literal)
    assert models.status_code == 200 and "mock-gpt" in {m["id"] for m in models.json()["data"]}
    reply = answer_text(sse(lc.post(user, chat_body(user))))
    assert reply == MOCK_TEXT
    # The title after the reply; older copies resolved only the body placeholders for it, so the user
    # headers are still literal and the body's `user` names who is charged.
    title = lc.post(user, title_body(user, reply=reply), **literal)
    assert title.status_code == 200 and title.json()["choices"][0]["message"]["content"] == MOCK_TEXT
    rows = ledger(env, user, 2)
    assert charged_by(env, lc.service) == {user: 2}  # nothing to a user named "{{LIBRECHAT_USER_ID}}"
    assert [(r["stream"], r["status"], r["via"], r["user_email"]) for r in rows] == [
        (True, "ok", lc.service, f"{user[:6]}@acme.example"),
        (False, "ok", lc.service, None),
    ]
