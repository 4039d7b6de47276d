"""Hostile input over HTTP: a caller with a valid token (or a forged one) sends every wrong thing it can.

Every refusal must be a 4xx OpenAI-shaped JSON error naming the field, never a 5xx or a traceback,
and a refused completion body must never reach the upstream nor leave a reservation behind. Slow
bodies get 408 within BODY_READ_TIMEOUT and their connection closed, without stalling anyone else.

The upstream is the session's fake behind a Recorder, which sees every request reaching it (any path,
its query string); the proxies use Redis database 13, so a test session started meanwhile (its
conftest flushes database 9) cannot take their counters or ledger stream away mid-run.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

import httpx
import jwt
import pytest
import redis
from starlette.applications import Starlette

from proxy.app import create_app
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import JWT_SECRET, eventually, pg_row, serve, token, uid
from .keys import KeyPair

# --- the proxy under attack -------------------------------------------------------------------------


class Recorder:
    """The fake upstream behind a door that writes down every request reaching it (method, path, query),
    whatever the endpoint: fake.requests holds the bodies, this also sees GETs and query strings."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.hits: list[tuple[str, str, str]] = []
        self.url = ""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            self.hits.append((scope["method"], scope["path"], scope["query_string"].decode("latin-1")))
        await self.app(scope, receive, send)


@dataclass
class Proxy:
    url: str
    app: Starlette
    upstream: Recorder

    def relay(self) -> Any:
        return self.app.state.services.relay


MAX_BODY = 256 * 1024


@pytest.fixture(scope="module")
def upstream(fake: FakeUpstream) -> Iterator[Recorder]:
    recorder = Recorder(fake.app)
    with serve(recorder) as url:
        recorder.url = url
        yield recorder


@pytest.fixture(scope="module")
def own_settings(base_settings: Settings, upstream: Recorder) -> Iterator[Settings]:
    """The session's settings on a Redis database of this module's own (13): a test session started
    meanwhile flushes the shared one, and with it this module's counters, ledger stream and consumer group."""
    redis_url = urlsplit(base_settings.redis_url)._replace(path="/13").geturl()
    stream = f"test:hostile:{uuid.uuid4().hex[:8]}"
    yield replace(base_settings, litellm_base_url=upstream.url, redis_url=redis_url, ledger_stream=stream)
    client = redis.Redis.from_url(redis_url)
    client.delete(stream, f"{stream}:rejected")
    client.close()


@pytest.fixture(scope="module")
def proxy(own_settings: Settings, upstream: Recorder) -> Iterator[Proxy]:
    settings = replace(own_settings, max_body_bytes=MAX_BODY)
    app = create_app(settings)
    with serve(app) as url:
        yield Proxy(url, app, upstream)


_TLS = ssl.create_default_context()  # built once: httpx.Client() would build one each (~10 ms); nothing here uses TLS


@pytest.fixture
def client(proxy: Proxy) -> Iterator[httpx.Client]:
    """A client of its own for each test: one answer that closes its connection cannot fail the next test."""
    with httpx.Client(base_url=proxy.url, timeout=10, verify=_TLS) as c:
        yield c


# --- tokens -----------------------------------------------------------------------------------------


def bearer(tok: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {tok}"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def signed(payload: bytes, header: bytes = b'{"alg":"HS256","typ":"JWT"}', digest: Any = hashlib.sha256) -> str:
    """A token signed with the right secret around any bytes at all (PyJWT would refuse to write most of these)."""
    signing_input = f"{_b64(header)}.{_b64(payload)}"
    signature = hmac.new(JWT_SECRET.encode(), signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


NOW = int(time.time())
HOSTILE_USER = uid("hostile")  # every refused request of the table is this user's: nothing may stick to them
TOLERATED_USER = uid("odd")  # odd bodies that may pass: whatever they cost, nothing may stay reserved
AUTH = bearer(token(HOSTILE_USER))
ADMIN = bearer(token(uid("admin"), quota_admin=True))
NOT_ADMIN = bearer(token(uid("admin"), quota_admin=False))
DELEGATE = bearer(token(uid("svc"), quota_delegate=True))
ES256_TOKEN = jwt.encode({"sub": "a", "exp": NOW + 600}, KeyPair("ES256", "k").private, algorithm="ES256")

# --- bodies -----------------------------------------------------------------------------------------

CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
PROMPT = {"model": "fake", "prompt": "hi"}
EMBED = {"model": "fake", "input": "hi"}
DROP = object()  # a field left out


def body(base: dict[str, Any], **fields: Any) -> dict[str, Any]:
    merged = {**base, **fields}
    return {k: v for k, v in merged.items() if v is not DROP}


def chat(**fields: Any) -> dict[str, Any]:
    return body(CHAT, **fields)


def say(content: Any, **message: Any) -> dict[str, Any]:
    """A chat body of one user message with this content (and other message fields)."""
    return chat(messages=[{"role": "user", "content": content, **message}])


def deep(levels: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(levels):
        value = {"a": value}
    return value


def raw(text: str | bytes) -> bytes:
    return text.encode() if isinstance(text, str) else text


# --- the table --------------------------------------------------------------------------------------


@dataclass
class Case:
    body: Any = None  # a dict (sent as JSON), bytes (sent as is) or None (no body)
    path: str = "/v1/chat/completions"
    method: str = "POST"
    headers: dict[str, Any] = field(default_factory=lambda: dict(AUTH))
    status: int = 400
    param: str | None = None  # the error's `param`, exactly, when the contract names the field there
    says: str | None = None  # a piece of the message (case-insensitive), when it names the field there
    code: str | None = None


def c(body: Any = None, **kw: Any) -> Case:
    return Case(body, **kw)


def p(param: str, body: Any, **kw: Any) -> Case:
    """A body refused with 400 naming `param`."""
    return Case(body, param=param, **kw)


def unsupported(name: str, base: dict[str, Any] = CHAT, path: str = "/v1/chat/completions") -> Case:
    return Case(body(base, **{name: "http://attacker.example"}), path=path, param=name, code="unsupported_parameter")


def auth401(tok: str | None = None, *, authorization: str | bytes | None = None, says: str | None = None) -> Case:
    value: str | bytes = authorization if authorization is not None else f"Bearer {tok}"
    return Case(CHAT, headers={"Authorization": value}, status=401, says=says)


def rid(value: Any) -> Case:
    return Case(CHAT, headers={**AUTH, "X-Request-Id": value}, param="X-Request-Id")


def delegate(headers: dict[str, Any] | None = None, **fields: Any) -> Case:
    return Case(chat(**fields), headers={**DELEGATE, **(headers or {})}, code="missing_user", says="X-User-Id")


def usage(query: str, param: str, headers: dict[str, str] = AUTH) -> Case:
    return Case(None, path=f"/v1/usage?{query}", method="GET", headers=dict(headers), param=param)


def admin_usage(query: str, param: str) -> Case:
    return Case(None, path=f"/admin/usage?{query}", method="GET", headers=dict(ADMIN), param=param)


def put_budget(payload: Any, param: str | None = None, *, subject: str = "budget-target", **kw: Any) -> Case:
    return Case(payload, path=f"/admin/budgets/{subject}", method="PUT", headers=dict(ADMIN), param=param, **kw)


HOSTILE: dict[str, Case] = {
    # LiteLLM's control parameters would run under the master key; unknown fields are refused too.
    **{
        f"control {n}": unsupported(n)
        for n in (
            "api_base",
            "base_url",
            "api_key",
            "user_config",
            "mock_response",
            "metadata",
            "litellm_params",
            "litellm_call_id",
            "aws_region_name",
            "vertex_credentials",
            "azure_ad_token",
            "extra_body",
            "extra_headers",
            "fallbacks",
            "num_retries",
            "timeout",
            "caching",
            "custom_llm_provider",
            "no-log",
            "mock_tool_calls",
        )
    },
    "control api_base on completions": unsupported("api_base", PROMPT, "/v1/completions"),
    "control mock_response on embeddings": unsupported("mock_response", EMBED, "/v1/embeddings"),
    "control field on the unversioned path": unsupported("api_key", CHAT, "/chat/completions"),
    "unknown field": p("foo", chat(foo=1), code="unsupported_parameter"),
    "empty field name": p("", chat(**{"": 1}), code="unsupported_parameter"),
    "field name with NUL": p("model\x00", chat(**{"model\x00": "x"}), code="unsupported_parameter"),
    "Litellm_ in other case": p("LiteLLM_params", chat(LiteLLM_params={}), code="unsupported_parameter"),
    "prompt on chat": p("prompt", chat(prompt="hi")),
    "best_of on chat": p("best_of", chat(best_of=2)),
    "messages on completions": p("messages", body(PROMPT, messages=CHAT["messages"]), path="/v1/completions"),
    "tools on completions": p("tools", body(PROMPT, tools=[]), path="/v1/completions"),
    # model
    "model missing": p("model", chat(model=DROP)),
    "model number": p("model", chat(model=5)),
    "model empty": p("model", chat(model="")),
    "model null": p("model", chat(model=None)),
    "model list": p("model", chat(model=["fake"])),
    "model with NUL": p("model", chat(model="fa\x00ke")),
    "model with RTL override": p("model", chat(model="fake\u202e")),
    "model with line separator": p("model", chat(model="fake\u2028")),
    "model of 257 chars": p("model", chat(model="m" * 257)),
    # messages
    "messages missing": p("messages", chat(messages=DROP)),
    "messages empty": p("messages", chat(messages=[])),
    "messages object": p("messages", chat(messages={"role": "user", "content": "hi"})),
    "messages string": p("messages", chat(messages="hi")),
    "messages null": p("messages", chat(messages=None)),
    "message number": p("messages[0]", chat(messages=[1])),
    "message null": p("messages[0]", chat(messages=[None])),
    "message without role": p("messages[0]", chat(messages=[{"content": "hi"}])),
    "message role number": p("messages[0]", chat(messages=[{"role": 5, "content": "hi"}])),
    "message role null": p("messages[0]", chat(messages=[{"role": None, "content": "hi"}])),
    "second message a string": p("messages[1]", chat(messages=[{"role": "user", "content": "hi"}, "oops"])),
    "content number": p("messages[0].content", say(5)),
    "content bool": p("messages[0].content", say(True)),
    "content object": p("messages[0].content", say({"text": "hi"})),
    "content part number": p("messages[0].content", say([1])),
    "content part null": p("messages[0].content", say([None])),
    # parts that make LiteLLM fetch a document the prompt bound never saw
    "file part with a URL for data": p(
        "messages[0].content", say([{"type": "file", "file": {"file_data": "https://attacker.example/100-pages.pdf"}}])
    ),
    "file part with a gs:// URL": p(
        "messages[0].content", say([{"type": "file", "file": {"file_data": "gs://bucket/100-pages.pdf"}}])
    ),
    "file part without data": p("messages[0].content", say([{"type": "file", "file": {"filename": "a.pdf"}}])),
    "document part by URL": p(
        "messages[0].content",
        say([{"type": "document", "source": {"type": "url", "url": "https://attacker.example/x.pdf"}}]),
    ),
    "image part as a PDF by format": p(
        "messages[0].content",
        say([{"type": "image_url", "image_url": {"url": "https://a.example/x.pdf", "format": "application/pdf"}}]),
    ),
    "image part as a PDF by mime_type": p(
        "messages[0].content",
        say(
            [{"type": "image_url", "image_url": {"url": "data:image/png;base64,JVBER", "mime_type": "application/pdf"}}]
        ),
    ),
    "image part as a PDF by content_type": p(
        "messages[0].content",
        say([{"type": "image_url", "image_url": {"url": "https://a.example/r", "content_type": "application/pdf"}}]),
    ),
    "assistant images by gs:// URL": p(
        "messages[0].images",
        chat(messages=[{"role": "assistant", "content": "here", "images": [{"image_url": {"url": "gs://b/v.mp4"}}]}]),
    ),
    "assistant images not a list": p(
        "messages[0].images", chat(messages=[{"role": "assistant", "content": "here", "images": "x"}])
    ),
    "video part": p("messages[0].content", say([{"type": "video_url", "video_url": {"url": "https://a.example/v"}}])),
    "audio part by URL": p(
        "messages[0].content", say([{"type": "input_audio", "input_audio": {"data": "https://a.example/a.wav"}}])
    ),
    "content part of unknown type": p("messages[0].content", say([{"type": "hologram", "data": {"x": [1, 2, 3]}}])),
    "content part string": p("messages[0].content", say(["plain"])),
    "content part without type": p("messages[0].content", say([{"text": "hi"}])),
    "content part type number": p("messages[0].content", say([{"type": 5, "text": "hi"}])),
    "content part type null": p("messages[0].content", say([{"type": None}])),
    # stream
    "stream string": p("stream", chat(stream="true")),
    "stream 1": p("stream", chat(stream=1)),
    "stream 0": p("stream", chat(stream=0)),
    "stream list": p("stream", chat(stream=[])),
    "stream object": p("stream", chat(stream={})),
    "stream_options string": p("stream_options", chat(stream=True, stream_options="yes")),
    "stream_options include_usage string": p(
        "stream_options", chat(stream=True, stream_options={"include_usage": "yes"})
    ),
    "stream_options list": p("stream_options", chat(stream_options=[])),
    # n
    "n 0": p("n", chat(n=0)),
    "n 129": p("n", chat(n=129)),
    "n true": p("n", chat(n=True)),
    "n 1.5": p("n", chat(n=1.5)),
    "n 2.0": p("n", chat(n=2.0)),
    "n string": p("n", chat(n="2")),
    "n negative": p("n", chat(n=-1)),
    "n 2**63": p("n", chat(n=2**63)),
    "n list": p("n", chat(n=[1] * 1000)),
    # answer caps
    "max_tokens 0": p("max_tokens", chat(max_tokens=0)),
    "max_tokens negative": p("max_tokens", chat(max_tokens=-1)),
    "max_tokens 10,000,001": p("max_tokens", chat(max_tokens=10_000_001)),
    "max_tokens 1.0": p("max_tokens", chat(max_tokens=1.0)),
    "max_tokens true": p("max_tokens", chat(max_tokens=True)),
    "max_tokens string": p("max_tokens", chat(max_tokens="100")),
    "max_tokens u64 max": p("max_tokens", chat(max_tokens=2**64 - 1)),
    "max_tokens 2**64": p("max_tokens", chat(max_tokens=2**64)),
    "max_tokens -2**63": p("max_tokens", chat(max_tokens=-(2**63))),
    "max_completion_tokens 0": p("max_completion_tokens", chat(max_completion_tokens=0)),
    "max_completion_tokens negative": p("max_completion_tokens", chat(max_completion_tokens=-5)),
    "max_completion_tokens object": p("max_completion_tokens", chat(max_completion_tokens={"a": 1})),
    # numbers
    "temperature string": p("temperature", chat(temperature="hot")),
    "temperature bool": p("temperature", chat(temperature=True)),
    "temperature 1e309": c(
        raw('{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":1e309}'), code="invalid_json"
    ),
    "temperature -1e309": c(
        raw('{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":-1e309}'), code="invalid_json"
    ),
    "temperature NaN literal": c(
        raw('{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":NaN}'), code="invalid_json"
    ),
    "top_p list": p("top_p", chat(top_p=[])),
    "frequency_penalty object": p("frequency_penalty", chat(frequency_penalty={})),
    "presence_penalty string": p("presence_penalty", chat(presence_penalty="0")),
    "min_p bool": p("min_p", chat(min_p=False)),
    "repetition_penalty string": p("repetition_penalty", chat(repetition_penalty="1")),
    "seed 2**64": p("seed", chat(seed=2**64)),
    "seed 2**63": p("seed", chat(seed=2**63)),
    "seed below -2**63": p("seed", chat(seed=-(2**63) - 1)),
    "seed 1.5": p("seed", chat(seed=1.5)),
    "seed string": p("seed", chat(seed="42")),
    "top_k negative": p("top_k", chat(top_k=-1)),
    "top_k float": p("top_k", chat(top_k=1.5)),
    # shapes
    "tools string": p("tools", chat(tools="x")),
    "tools object": p("tools", chat(tools={"type": "function"})),
    "functions string": p("functions", chat(functions="f")),
    "response_format string": p("response_format", chat(response_format="json_object")),
    "response_format list": p("response_format", chat(response_format=[{"type": "text"}])),
    "logit_bias list": p("logit_bias", chat(logit_bias=[])),
    "logit_bias string": p("logit_bias", chat(logit_bias="50256:-100")),
    "stop number": p("stop", chat(stop=5)),
    "stop object": p("stop", chat(stop={"a": 1})),
    # nested past what JSON re-encoding carries: refused before anything is reserved
    "response_format 300 deep": c(chat(response_format=deep(300)), says="nested"),
    "tools 300 deep": c(chat(tools=[deep(300)]), says="nested"),
    "prediction 300 deep": c(chat(prediction=deep(300)), says="nested"),
    "content part 300 deep": c(say([{"type": "text", "text": deep(300)}]), param="messages[0].content"),
    "audio part 300 deep": c(
        say([{"type": "input_audio", "input_audio": {"data": "UklGR", "format": deep(300)}}]), says="nested"
    ),
    "tool_calls 300 deep": c(
        chat(messages=[{"role": "assistant", "content": None, "tool_calls": [deep(300)]}]), says="nested"
    ),
    "message name 300 deep": c(say("hi", name=deep(300)), says="nested"),
    "logit_bias 300 deep": c(chat(logit_bias=deep(300)), says="nested"),
    "stop list 300 deep": c(chat(stop=[deep(300)]), param="stop"),
    "nested past the parser (1100)": c(
        raw('{"model":"fake","messages":' + "[" * 1100 + "]" * 1100 + "}"), code="invalid_json"
    ),
    # the whole body
    "body null": c(raw("null"), code="invalid_json"),
    "body string": c(raw('"hello"'), code="invalid_json"),
    "body number": c(raw("123"), code="invalid_json"),
    "body empty": c(raw(""), code="invalid_json"),
    "body with BOM": c(raw(b"\xef\xbb\xbf" + json.dumps(CHAT).encode()), code="invalid_json"),
    "body invalid UTF-8": c(
        raw(b'{"model":"fake","messages":[{"role":"user","content":"\xff\xfe"}]}'), code="invalid_json"
    ),
    "body lone surrogate": c(
        raw('{"model":"fake","messages":[{"role":"user","content":"\\ud800"}]}'), code="invalid_json"
    ),
    "body truncated": c(raw('{"model":"fake","messages":[{"role":"user","content":"hi"}'), code="invalid_json"),
    "body duplicate key, last a number": p(
        "model", raw('{"model":"fake","model":5,"messages":[{"role":"user","content":"hi"}]}')
    ),
    "body too large": c(say("x" * (MAX_BODY + 10)), status=413),
    # budget-draining shapes: refused by the budget before the upstream is asked
    # 2048 prompts of ~30 tokens, 20 answers each: even at one token an answer it needs more than the budget.
    "completions n x best_of x 2048 prompts": c(
        body(PROMPT, n=20, best_of=20, prompt=[" a" * 30] * 2048),
        path="/v1/completions",
        status=429,
        code="insufficient_quota",
    ),
    # X-Request-Id
    "X-Request-Id empty": rid(""),
    "X-Request-Id 129 chars": rid("r" * 129),
    "X-Request-Id UTF-8": rid("réq".encode()),
    "X-Request-Id latin-1 byte": rid(b"req-\xff"),
    "X-Request-Id with tab": rid("a\tb"),
    "X-Request-Id 4 KB": rid("r" * 4096),
    "X-Request-Id on /v1/models": Case(
        None, path="/v1/models", method="GET", headers={**AUTH, "X-Request-Id": "x" * 200}, param="X-Request-Id"
    ),
    # Authorization
    "no Authorization": auth401(authorization=""),
    "Basic scheme": auth401(authorization="Basic dXNlcjpwYXNz"),
    "Token scheme": auth401(authorization=f"Token {token('a')}"),
    "Bearer alone": auth401(authorization="Bearer"),
    "Bearer then tab": auth401(authorization=f"Bearer\t{token('a')}"),
    "token with trailing words": auth401(f"{token('a')} extra"),
    "token tampered": auth401(token("a")[:-2] + "xx"),
    "token not a JWT": auth401("not.a.jwt"),
    "token of 17 KB": auth401("a" * 17_000, says="too large"),
    "token non-ASCII": auth401(authorization="Bearer \u00e9\u00e9.\u00e9.\u00e9".encode()),
    "ES256 token to an HS256 verifier": auth401(ES256_TOKEN),
    "HS512 token when HS256 is configured": auth401(
        signed(f'{{"sub":"a","exp":{NOW + 600}}}'.encode(), b'{"alg":"HS512","typ":"JWT"}', hashlib.sha512)
    ),
    "token without exp": auth401(jwt.encode({"sub": "a"}, JWT_SECRET, algorithm="HS256")),
    "exp string": auth401(token("a", exp=str(NOW + 600))),
    "exp 10**400": auth401(token("a", exp=10**400)),
    "exp 5000 digits": auth401(signed(b'{"sub":"a","exp":' + b"9" * 5000 + b"}")),
    "exp Infinity": auth401(signed(b'{"sub":"a","exp":Infinity}')),
    "exp NaN": auth401(signed(b'{"sub":"a","exp":NaN}')),
    "exp 1e400": auth401(signed(b'{"sub":"a","exp":1e400}')),
    "exp true": auth401(token("a", exp=True)),
    "exp list": auth401(token("a", exp=[NOW + 600])),
    "nbf string": auth401(token("a", nbf="0")),
    "nbf in the future": auth401(token("a", nbf=NOW + 3600)),
    "nbf -2**60": auth401(token("a", nbf=-(2**60))),
    "iat in the future": auth401(token("a", iat=NOW + 3600)),
    "iat list": auth401(token("a", iat=[])),
    "iat 2**64": auth401(token("a", iat=2**64)),
    "quota_admin 'yes'": auth401(token("a", quota_admin="yes")),
    "quota_admin 1": auth401(token("a", quota_admin=1)),
    "quota_admin null": auth401(token("a", quota_admin=None)),
    "quota_delegate 'true'": auth401(token("a", quota_delegate="true")),
    "sub with NUL": auth401(token("a\x00b")),
    "sub of 257 chars": auth401(token("s" * 257)),
    "sub number": auth401(signed(f'{{"sub":5,"exp":{NOW + 600}}}'.encode())),
    "sub empty": auth401(signed(f'{{"sub":"","exp":{NOW + 600}}}'.encode())),
    "sub missing": auth401(signed(f'{{"exp":{NOW + 600}}}'.encode())),
    "sub with RTL override": auth401(token("user\u202e")),
    "sub with newline": auth401(token("user\nadmin")),
    "sub a no-break space": auth401(token("\u00a0")),
    "tenant list": auth401(signed(f'{{"sub":"a","exp":{NOW + 600},"tenant":["t"]}}'.encode())),
    "tenant with newline": auth401(token("a", tenant="t\n")),
    "payload a list": auth401(signed(b"[1, 2]")),
    "payload not JSON": auth401(signed(b"{not json")),
    "payload invalid UTF-8": auth401(signed(b'{"sub":"\xff","exp":99999999999}')),
    "payload nested 5000 deep": auth401(
        signed(b'{"sub":"a","exp":99999999999,"x":' + b"[" * 5000 + b"]" * 5000 + b"}")
    ),
    "header nested 5000 deep": auth401(
        signed(b'{"sub":"a","exp":99999999999}', b'{"alg":"HS256","x":' + b"[" * 5000 + b"]" * 5000 + b"}")
    ),
    "header alg none, signed": auth401(signed(f'{{"sub":"a","exp":{NOW + 600}}}'.encode(), b'{"alg":"none"}')),
    "quota with a forged token": Case(
        None, path="/v1/quota", method="GET", headers={"Authorization": "Bearer x.y.z"}, status=401
    ),
    "usage with an expired token": Case(
        None, path="/v1/usage", method="GET", headers=bearer(token("a", ttl=-600)), status=401
    ),
    # delegating service tokens must name a real end user
    "delegate without a user": delegate(),
    "delegate X-User-Id empty": delegate({"X-User-Id": ""}),
    "delegate X-User-Id placeholder": delegate({"X-User-Id": "{{LIBRECHAT_USER_ID}}"}),
    "delegate X-User-Id half placeholder": delegate({"X-User-Id": "user-{{id"}),
    "delegate X-User-Id no-break space": delegate({"X-User-Id": b"\xa0"}),
    "delegate X-User-Id 257 chars": delegate({"X-User-Id": "u" * 257}),
    "delegate X-User-Id with tab": delegate({"X-User-Id": "a\tb"}),
    "delegate X-User-Id latin-1 control": delegate({"X-User-Id": b"a\x85b"}),
    "delegate body user placeholder": delegate(user="{{LIBRECHAT_USER_ID}}"),
    "delegate body user number": delegate(user=5),
    "delegate body user empty": delegate(user=""),
    "delegate body user object": delegate(user={"id": "victim"}),
    "delegate body user with NUL": delegate(user="vic\x00tim"),
    "delegate both placeholders": delegate({"X-User-Id": "{{a}}"}, user="{{b}}"),
    # admin endpoints
    "admin usage, ordinary token": Case(None, path="/admin/usage?user=x", method="GET", status=403),
    "admin usage, quota_admin false": Case(
        None, path="/admin/usage?user=x", method="GET", headers=dict(NOT_ADMIN), status=403
    ),
    "admin usage, delegate token": Case(
        None, path="/admin/usage?user=x", method="GET", headers=dict(DELEGATE), status=403
    ),
    "admin usage, no token": Case(None, path="/admin/usage?user=x", method="GET", headers={}, status=401),
    "admin budget, ordinary token": Case(
        {"tokens": 10**9}, path=f"/admin/budgets/{HOSTILE_USER}", method="PUT", status=403
    ),
    "admin budget, quota_admin false": Case(
        {"tokens": 10**9}, path=f"/admin/budgets/{HOSTILE_USER}", method="PUT", headers=dict(NOT_ADMIN), status=403
    ),
    "admin budget, wrong method": Case(None, path="/admin/budgets/x", method="DELETE", headers=dict(ADMIN), status=405),
    "admin usage without user": admin_usage("limit=5", "user"),
    "admin usage user NUL": admin_usage("user=%00", "user"),
    "admin usage user newline": admin_usage("user=a%0Ab", "user"),
    "admin usage user 257 chars": admin_usage("user=" + "u" * 257, "user"),
    "admin usage bad to": admin_usage("user=x&to=9999-12-31T23:59:59-12:00", "to"),
    "admin usage bad cursor": admin_usage("user=x&cursor=1~%00", "cursor"),
    "admin usage limit 0": admin_usage("user=x&limit=0", "limit"),
    "admin budget subject NUL": put_budget({"tokens": 1}, "subject", subject="%00"),
    "admin budget subject newline": put_budget({"tokens": 1}, "subject", subject="a%0Ab"),
    "admin budget subject RTL override": put_budget({"tokens": 1}, "subject", subject="%E2%80%AE"),
    "admin budget subject 257 chars": put_budget({"tokens": 1}, "subject", subject="s" * 257),
    "admin budget body not JSON": put_budget(raw("{tokens: 1"), code="invalid_json"),
    "admin budget body empty": put_budget(raw(""), code="invalid_json"),
    "admin budget body list": put_budget([{"tokens": 1}], code="invalid_json"),
    "admin budget body 1e309": put_budget(raw('{"tokens": 1e309}'), code="invalid_json"),
    "admin budget body too large": put_budget(
        {"tokens": 1, "note": "x" * (MAX_BODY + 10)}, subject=uid("budget"), status=413
    ),
    "admin budget tokens missing": put_budget({}, "tokens"),
    "admin budget tokens negative": put_budget({"tokens": -1}, "tokens"),
    "admin budget tokens string": put_budget({"tokens": "100"}, "tokens"),
    "admin budget tokens float": put_budget({"tokens": 1.5}, "tokens"),
    "admin budget tokens true": put_budget({"tokens": True}, "tokens"),
    "admin budget tokens 2**63": put_budget({"tokens": 2**63}, "tokens"),
    "admin budget tokens 2**64": put_budget({"tokens": 2**64}, "tokens"),
    "admin budget rpm 9999999999": put_budget({"tokens": 1, "rpm": 9999999999}, "rpm"),
    "admin budget tpm negative": put_budget({"tokens": 1, "tpm": -1}, "tpm"),
    "admin budget rpm null": put_budget({"tokens": 1, "rpm": None}, "rpm"),
    "admin budget warn_ratio 0": put_budget({"tokens": 1, "warn_ratio": 0}, "warn_ratio"),
    "admin budget warn_ratio 1.5": put_budget({"tokens": 1, "warn_ratio": 1.5}, "warn_ratio"),
    "admin budget warn_ratio string": put_budget({"tokens": 1, "warn_ratio": "0.5"}, "warn_ratio"),
    "admin budget warn_ratio true": put_budget({"tokens": 1, "warn_ratio": True}, "warn_ratio"),
    "admin budget type admin": put_budget({"tokens": 1, "type": "admin"}, "type"),
    "admin budget type null": put_budget({"tokens": 1, "type": None}, "type"),
    "admin budget type list": put_budget({"tokens": 1, "type": ["user"]}, "type"),
    "admin budget period year": put_budget({"tokens": 1, "period": "year"}, "period"),
    "admin budget period object": put_budget({"tokens": 1, "period": {"day": 1}}, "period"),
    # GET /v1/usage query strings
    "usage to in year 10000 after UTC": usage("to=9999-12-31T23:59:59-12:00", "to"),
    "usage from year 1": usage("from=0001-01-01", "from"),
    "usage from year 10000": usage("from=10000-01-01", "from"),
    "usage from month 13": usage("from=2026-13-01", "from"),
    "usage from NUL": usage("from=%00", "from"),
    "usage from offset +25:00": usage("from=2026-01-01T00:00:00%2B25:00", "from"),
    "usage from 'now'": usage("from=now", "from"),
    "usage from before 1970 after UTC": usage("from=1970-01-01T00:00:00%2B14:00", "from"),
    "usage to after 9000 after UTC": usage("to=9000-01-01T00:00:00-00:01", "to"),
    "usage to before from": usage("from=2026-11-10&to=2026-11-01", "to"),
    "usage cursor 23 digits": usage("cursor=99999999999999999999999~x", "cursor"),
    "usage cursor NUL id": usage("cursor=1~%00", "cursor"),
    "usage cursor negative": usage("cursor=-99999999999999999~x", "cursor"),
    "usage cursor only tilde": usage("cursor=~", "cursor"),
    "usage cursor exponent": usage("cursor=1e5~x", "cursor"),
    "usage cursor id 300 chars": usage("cursor=1~" + "i" * 300, "cursor"),
    "usage cursor 5000 digits": usage("cursor=" + "9" * 5000 + "~x", "cursor"),
    "usage limit 0": usage("limit=0", "limit"),
    "usage limit 1001": usage("limit=1001", "limit"),
    "usage limit negative": usage("limit=-1", "limit"),
    "usage limit float": usage("limit=1.5", "limit"),
    "usage limit empty": usage("limit=", "limit"),
    "usage limit NUL": usage("limit=%00", "limit"),
    "usage limit 20 digits": usage("limit=99999999999999999999", "limit"),
    # completions
    "prompt missing": p("prompt", body(PROMPT, prompt=DROP), path="/v1/completions"),
    "prompt null": p("prompt", body(PROMPT, prompt=None), path="/v1/completions"),
    "prompt number": p("prompt", body(PROMPT, prompt=5), path="/v1/completions"),
    "prompt object": p("prompt", body(PROMPT, prompt={"text": "hi"}), path="/v1/completions"),
    "prompt empty list": p("prompt", body(PROMPT, prompt=[]), path="/v1/completions"),
    "prompt [[]]": p("prompt", body(PROMPT, prompt=[[]]), path="/v1/completions"),
    "prompt [[-1]]": p("prompt", body(PROMPT, prompt=[[-1]]), path="/v1/completions"),
    "prompt [-1]": p("prompt", body(PROMPT, prompt=[-1]), path="/v1/completions"),
    "prompt [1.5]": p("prompt", body(PROMPT, prompt=[1.5]), path="/v1/completions"),
    "prompt [true]": p("prompt", body(PROMPT, prompt=[True]), path="/v1/completions"),
    "prompt [null]": p("prompt", body(PROMPT, prompt=[None]), path="/v1/completions"),
    "prompt [2**31]": p("prompt", body(PROMPT, prompt=[2**31]), path="/v1/completions"),
    "prompt [[2**64]]": p("prompt", body(PROMPT, prompt=[[2**64]]), path="/v1/completions"),
    "prompt string and number": p("prompt", body(PROMPT, prompt=["a", 1]), path="/v1/completions"),
    "prompt token array and string": p("prompt", body(PROMPT, prompt=[[1], "a"]), path="/v1/completions"),
    "prompt [['a']]": p("prompt", body(PROMPT, prompt=[["a"]]), path="/v1/completions"),
    "prompt [[[1]]]": p("prompt", body(PROMPT, prompt=[[[1]]]), path="/v1/completions"),
    "prompt 2049 strings": p("prompt", body(PROMPT, prompt=["x"] * 2049), path="/v1/completions"),
    "prompt 2049 token arrays": p("prompt", body(PROMPT, prompt=[[1]] * 2049), path="/v1/completions"),
    "best_of 0": p("best_of", body(PROMPT, best_of=0), path="/v1/completions"),
    "best_of 21": p("best_of", body(PROMPT, best_of=21), path="/v1/completions"),
    "best_of below n": p("best_of", body(PROMPT, n=3, best_of=2), path="/v1/completions"),
    "best_of true": p("best_of", body(PROMPT, best_of=True), path="/v1/completions"),
    "best_of string": p("best_of", body(PROMPT, best_of="5"), path="/v1/completions"),
    "completions n 129": p("n", body(PROMPT, n=129), path="/v1/completions"),
    "completions max_tokens 0": p("max_tokens", body(PROMPT, max_tokens=0), path="/v1/completions"),
    "completions stream 'yes'": p("stream", body(PROMPT, stream="yes"), path="/v1/completions"),
    "completions max_completion_tokens": p(
        "max_completion_tokens", body(PROMPT, max_completion_tokens=5), path="/v1/completions"
    ),
    # embeddings
    "input missing": p("input", body(EMBED, input=DROP), path="/v1/embeddings"),
    "input empty list": p("input", body(EMBED, input=[]), path="/v1/embeddings"),
    "input [[]]": p("input", body(EMBED, input=[[]]), path="/v1/embeddings"),
    "input [[-1]]": p("input", body(EMBED, input=[[-1]]), path="/v1/embeddings"),
    "input [null]": p("input", body(EMBED, input=[None]), path="/v1/embeddings"),
    "input object": p("input", body(EMBED, input={"a": "b"}), path="/v1/embeddings"),
    "input 2049 strings": p("input", body(EMBED, input=["x"] * 2049), path="/v1/embeddings"),
    "embeddings stream true": p("stream", body(EMBED, stream=True), path="/v1/embeddings"),
    "embeddings stream 'true'": p("stream", body(EMBED, stream="true"), path="/v1/embeddings"),
    "embeddings dimensions 0": p("dimensions", body(EMBED, dimensions=0), path="/v1/embeddings"),
    "embeddings dimensions float": p("dimensions", body(EMBED, dimensions=1.5), path="/v1/embeddings"),
    "embeddings n": p("n", body(EMBED, n=2), path="/v1/embeddings"),
    "embeddings max_tokens": p("max_tokens", body(EMBED, max_tokens=5), path="/v1/embeddings"),
    "embeddings messages": p("messages", body(EMBED, messages=CHAT["messages"]), path="/v1/embeddings"),
    # routes and methods
    "POST /v1/models": Case(None, path="/v1/models", method="POST", status=405),
    "PUT /v1/chat/completions": Case(CHAT, method="PUT", status=405),
    "GET /admin/budgets/x": Case(None, path="/admin/budgets/x", method="GET", headers=dict(ADMIN), status=405),
}


def send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if isinstance(case.body, bytes):
        headers.setdefault("Content-Type", "application/json")
        return client.request(case.method, case.path, headers=headers, content=case.body)
    if case.body is not None:
        headers.setdefault("Content-Type", "application/json")
        return client.request(case.method, case.path, headers=headers, content=json.dumps(case.body).encode())
    return client.request(case.method, case.path, headers=headers)


def assert_openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text[:500]
    assert "Traceback" not in r.text and 'File "' not in r.text
    assert r.headers["content-type"] == "application/json"
    error: dict[str, Any] = r.json()["error"]
    assert set(error) == {"message", "type", "code", "param"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str) and error["type"]
    assert error["code"] is None or isinstance(error["code"], str)
    assert error["param"] is None or isinstance(error["param"], str)
    return error


def quota(client: httpx.Client, user: str) -> dict[str, Any]:
    """The user's first budget as GET /v1/quota shows it (used, reserved, ...)."""
    budget: dict[str, Any] = client.get("/v1/quota", headers=bearer(token(user))).json()["budgets"][0]
    return budget


def test_the_table_is_large_enough() -> None:
    assert len(HOSTILE) >= 45


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_request_is_a_named_4xx_and_never_reaches_upstream(
    client: httpx.Client, fake: FakeUpstream, proxy: Proxy, case: Case
) -> None:
    bodies, hits = len(fake.requests), len(proxy.upstream.hits)
    r = send(client, case)
    error = assert_openai_error(r, case.status)
    if case.param is not None:
        assert error["param"] == case.param, error
    if case.says is not None:
        assert case.says.lower() in error["message"].lower(), error
    if case.code is not None:
        assert error["code"] == case.code, error
    assert len(fake.requests) == bodies, fake.requests[bodies:]
    assert proxy.upstream.hits[hits:] == []
    assert "sk-unused" not in r.text  # the master key never shows


# --- odd bodies that may pass: never a 5xx, and whatever they cost is settled --------------------------

TOLERATED_AUTH = bearer(token(TOLERATED_USER))
ODD: dict[str, Any] = {
    "image part with a number for url": say([{"type": "image_url", "image_url": 5}]),
    "text part with a number": say([{"type": "text", "text": 5}]),
    "text part with a list": say([{"type": "text", "text": ["a", {"b": None}]}]),
    "tool_calls a string": chat(
        messages=[{"role": "assistant", "tool_calls": "call me"}, {"role": "user", "content": "hi"}]
    ),
    "tool_calls numbers": chat(
        messages=[{"role": "assistant", "tool_calls": [1, None, True]}, {"role": "user", "content": "x"}]
    ),
    "tool message without id": chat(messages=[{"role": "tool", "content": "42"}]),
    "role empty": chat(messages=[{"role": "", "content": "hi"}]),
    "role of 10,000 chars": chat(messages=[{"role": "r" * 10_000, "content": "hi"}]),
    "content with NUL and controls": say("a\x00b\x01c\u202e\u2028\ufeff"),
    "content null": say(None),
    "stream null": chat(stream=None),
    "temperature underflows to 0": raw(
        '{"model":"fake","messages":[{"role":"user","content":"hi"}],"temperature":1e-400}'
    ),
    "seed -2**63": chat(seed=-(2**63)),
    "stop numbers": chat(stop=[1, 2]),
    "user number on an ordinary token": chat(user=5),
    "user 250 deep on an ordinary token": chat(user=deep(250)),
    "n 128 with the largest cap": chat(n=128, max_tokens=10_000_000),
    "5,000 messages": chat(messages=[{"role": "user", "content": "x"}] * 5000),
    "plain body (the query string names api_base)": chat(),
}


@pytest.mark.parametrize("payload", ODD.values(), ids=ODD.keys())
def test_odd_but_wellformed_bodies_never_crash_the_proxy(
    client: httpx.Client, fake: FakeUpstream, proxy: Proxy, payload: Any
) -> None:
    bodies, hits = len(fake.requests), len(proxy.upstream.hits)
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    r = client.post(
        "/v1/chat/completions?api_base=http://attacker.example&api_key=sk-x",
        content=content,
        headers={**TOLERATED_AUTH, "Content-Type": "application/json"},
    )
    assert r.status_code < 500, r.text[:500]
    assert "Traceback" not in r.text
    if r.status_code >= 400:
        assert_openai_error(r, r.status_code)
        assert len(fake.requests) == bodies and proxy.upstream.hits[hits:] == []
    else:
        assert len(fake.requests) == bodies + 1
        sent = fake.requests[-1]
        assert sent["user"] == TOLERATED_USER  # the caller's `user` is replaced by whom the token names
        assert proxy.upstream.hits[hits:] == [("POST", "/v1/chat/completions", "")]  # the query is not passed on


# --- identities that are not the caller's ------------------------------------------------------------


def test_x_user_id_from_an_ordinary_token_is_ignored(
    client: httpx.Client, fake: FakeUpstream, base_settings: Settings
) -> None:
    me, victim = uid("me"), uid("victim")
    rid_ = uid("req")
    r = client.post(
        "/v1/chat/completions",
        json=chat(user=victim),
        headers={**bearer(token(me)), "X-User-Id": victim, "X-User-Email": "ceo@example.com", "X-Request-Id": rid_},
    )
    assert r.status_code == 200, r.text
    assert fake.requests[-1]["user"] == me
    row = eventually(
        lambda: pg_row(
            base_settings.database_url,
            "select user_id, via, user_email from usage_records where client_request_id = $1",
            rid_,
        )
    )
    assert (row["user_id"], row["via"], row["user_email"]) == (me, None, None)
    theirs = quota(client, victim)
    assert (theirs["used"], theirs["reserved"]) == (0, 0)


def test_a_delegate_cannot_name_a_user_of_another_tenant(client: httpx.Client, fake: FakeUpstream) -> None:
    user = uid("bound")
    assert (
        client.post("/v1/chat/completions", json=CHAT, headers=bearer(token(user, tenant="tenant-a"))).status_code
        == 200
    )
    other = bearer(token(uid("svc"), tenant="tenant-b", quota_delegate=True))
    bodies = len(fake.requests)
    r = client.post("/v1/chat/completions", json=CHAT, headers={**other, "X-User-Id": user})
    assert assert_openai_error(r, 403)["code"] == "wrong_tenant"
    r = client.post("/v1/chat/completions", json=chat(user=user), headers=other)
    assert assert_openai_error(r, 403)["code"] == "wrong_tenant"
    assert len(fake.requests) == bodies


def test_models_does_not_forward_the_query_string(client: httpx.Client, proxy: Proxy) -> None:
    hits = len(proxy.upstream.hits)
    r = client.get("/v1/models?api_key=sk-attacker&api_base=http://attacker.example&x=%00", headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["data"][0]["id"] == "fake"
    assert proxy.upstream.hits[hits:] == [("GET", "/v1/models", "")]


# --- after all that -----------------------------------------------------------------------------------


def test_refused_requests_are_recorded_as_refused_at_no_cost(proxy: Proxy, own_settings: Settings) -> None:
    """The hostile user's ledger: every record but the health check's chats a refusal (invalid, or blocked by
    the budget), none a server error, none charged. (Runs after the table; alone it checks an empty ledger.)"""
    eventually(lambda: proxy.relay().in_flight == 0, timeout=5)
    query = (
        "select count(*) filter (where status not in ('invalid', 'blocked') or total_tokens <> 0 or http_status >= 500)"
        " as bad, array_agg(distinct status) as statuses from usage_records where user_id = $1"
        " and status <> 'ok'"  # the health check's own chats
    )
    backlog = redis.Redis.from_url(own_settings.redis_url)
    try:  # the writer deletes what it has written from the stream
        eventually(lambda: backlog.xlen(own_settings.ledger_stream) == 0, timeout=5)
    finally:
        backlog.close()
    row = pg_row(own_settings.database_url, query, HOSTILE_USER)
    assert row["bad"] == 0, row["statuses"]


def test_the_proxy_is_healthy_after_the_hostile_requests(client: httpx.Client, proxy: Proxy) -> None:
    relay = proxy.relay()
    eventually(lambda: relay.in_flight == 0, timeout=5)
    for user in (HOSTILE_USER, TOLERATED_USER):
        eventually(lambda u=user: quota(client, u)["reserved"] == 0, timeout=5)
    assert quota(client, HOSTILE_USER)["used"] == 0  # nothing refused was charged
    r = client.post("/v1/chat/completions", json=CHAT, headers={**AUTH, "X-Request-Id": "after-the-storm"})
    assert r.status_code == 200, r.text
    assert r.headers["x-request-id"] == "after-the-storm"
    assert r.json()["choices"][0]["message"]["content"] == "ok"
    streamed = client.post("/v1/chat/completions", json=chat(stream=True), headers=AUTH)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")
    eventually(lambda: relay.in_flight == 0, timeout=5)
    eventually(
        lambda: (quota(client, HOSTILE_USER)["used"], quota(client, HOSTILE_USER)["reserved"]) == (24, 0), timeout=5
    )
    assert client.get("/readyz").status_code == 200


# --- slow bodies ------------------------------------------------------------------------------------

BODY_READ_TIMEOUT = 1.0


@pytest.fixture(scope="module")
def slow_proxy(own_settings: Settings, upstream: Recorder) -> Iterator[Proxy]:
    settings = replace(own_settings, body_read_timeout=BODY_READ_TIMEOUT)
    app = create_app(settings)
    with serve(app) as url:
        yield Proxy(url, app, upstream)


STALLER = uid("staller")


def open_request(url: str, head: str, first: bytes) -> socket.socket:
    parts = urlsplit(url)
    sock = socket.create_connection((parts.hostname, parts.port), timeout=10)
    request = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {token(STALLER)}\r\n"
        f"Content-Type: application/json\r\n{head}\r\n"
    )
    sock.sendall(request.encode() + first)
    return sock


def stalled(url: str) -> socket.socket:
    """A request declaring 100,000 bytes of body and sending one."""
    return open_request(url, "Content-Length: 100000\r\n", b"{")


def read_until_closed(sock: socket.socket, deadline: float) -> tuple[bytes, bool]:
    """Everything the server sends, and whether it closed the connection before the deadline."""
    data = b""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return data, False
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            return data, False
        except ConnectionResetError:
            return data, True
        if not chunk:
            return data, True
        data += chunk


def assert_408(data: bytes, closed: bool) -> None:
    assert data.startswith(b"HTTP/1.1 408"), data[:300]
    head, _, payload = data.partition(b"\r\n\r\n")
    assert b"content-type: application/json" in head.lower()
    error = json.loads(payload)["error"]
    assert error["code"] == "request_timeout" and error["message"]
    assert closed, "the connection was left open after the 408"


def test_a_stalled_body_gets_408_and_its_connection_closed(slow_proxy: Proxy, fake: FakeUpstream) -> None:
    bodies = len(fake.requests)
    start = time.monotonic()
    with stalled(slow_proxy.url) as sock:
        data, closed = read_until_closed(sock, start + BODY_READ_TIMEOUT + 3)
    elapsed = time.monotonic() - start
    assert_408(data, closed)
    assert BODY_READ_TIMEOUT * 0.9 <= elapsed < BODY_READ_TIMEOUT + 2
    assert len(fake.requests) == bodies
    eventually(lambda: slow_proxy.relay().in_flight == 0, timeout=3)


def test_a_stalled_admin_body_gets_408_too(slow_proxy: Proxy) -> None:
    """BODY_READ_TIMEOUT holds for every body the proxy reads, the admin API's included."""
    parts = urlsplit(slow_proxy.url)
    start = time.monotonic()
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"PUT /admin/budgets/{uid('budget')} HTTP/1.1\r\nHost: {parts.hostname}\r\n"
            f"Authorization: {ADMIN['Authorization']}\r\nContent-Length: 1000\r\n\r\n{{".encode()
        )
        data, closed = read_until_closed(sock, start + BODY_READ_TIMEOUT + 1.5)
    assert_408(data, closed)


def test_a_client_leaving_mid_body_is_recorded_as_gone_not_as_a_crash(
    slow_proxy: Proxy, own_settings: Settings
) -> None:
    """A caller hanging up halfway through its body is no internal error: no 5xx record, no reservation."""
    user = uid("gone")
    parts = urlsplit(slow_proxy.url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.hostname}\r\nAuthorization: Bearer {token(user)}\r\n"
            'Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{"model": "fake"'.encode()
        )
        time.sleep(0.1)
    query = "select status, http_status, total_tokens from usage_records where user_id = $1"
    row = eventually(lambda: pg_row(own_settings.database_url, query, user), timeout=5)
    assert row["status"] in ("cancelled", "invalid") and row["http_status"] < 500, dict(row)
    assert row["total_tokens"] == 0
    eventually(lambda: slow_proxy.relay().in_flight == 0, timeout=3)
    with httpx.Client(base_url=slow_proxy.url, timeout=10, verify=_TLS) as c:
        assert quota(c, user)["reserved"] == 0


def trickling(url: str, stop: threading.Event) -> socket.socket:
    """A request sending a byte of its body every 0.2 s, forever: the timeout is on the whole body, not per byte."""
    sock = open_request(url, "Content-Length: 100000\r\n", b"{")

    def trickle() -> None:
        while not stop.wait(0.2):
            try:
                sock.send(b" ")
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    return sock


def test_fifty_stalled_bodies_at_once_all_get_408_and_others_are_served(slow_proxy: Proxy, fake: FakeUpstream) -> None:
    """48 bodies stalled after one byte of the 100,000 declared, one chunked body stalled after its first
    chunk, one trickling forever: all answered 408 and closed together, while an honest request is served."""
    bodies = len(fake.requests)
    stop = threading.Event()
    start = time.monotonic()
    socks = [stalled(slow_proxy.url) for _ in range(48)]
    socks.append(open_request(slow_proxy.url, "Transfer-Encoding: chunked\r\n", b"1\r\n{\r\n"))
    socks.append(trickling(slow_proxy.url, stop))
    try:
        with httpx.Client(base_url=slow_proxy.url, timeout=10, verify=_TLS) as c:
            time.sleep(BODY_READ_TIMEOUT * 0.3)  # the fifty are in their body reads by now...
            assert slow_proxy.relay().in_flight == 0  # ...and hold none of the proxy's concurrency slots
            t0 = time.monotonic()
            r = c.post("/v1/chat/completions", json=CHAT, headers=bearer(token(uid())))
            assert r.status_code == 200, r.text
            assert time.monotonic() - t0 < BODY_READ_TIMEOUT  # served while the fifty still stall
            results = [read_until_closed(s, start + BODY_READ_TIMEOUT + 3) for s in socks]
            for data, closed in results:
                assert_408(data, closed)
            assert len(fake.requests) == bodies + 1  # only the honest request reached the upstream
            eventually(lambda: slow_proxy.relay().in_flight == 0, timeout=3)
            after = c.post("/v1/chat/completions", json=CHAT, headers=bearer(token(uid())))
            assert after.status_code == 200, after.text
            eventually(lambda: (quota(c, STALLER)["used"], quota(c, STALLER)["reserved"]) == (0, 0), timeout=3)
    finally:
        stop.set()
        for s in socks:
            s.close()
