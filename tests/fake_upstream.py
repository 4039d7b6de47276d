"""A small OpenAI-shaped upstream for tests: counts what reaches it and misbehaves on request.

The model name picks the behaviour, so one server covers every case. Models of the budget-integrity
tests (test_integrity.py), on every endpoint:

- honest, honest-slow: usage is what was asked: the prompt as sent (token arrays token for token, text in
  cl100k_base) and every answer written to its cap (n x max_tokens; completions: max(n, best_of) x prompts),
  so an overrun attempt costs what it could. honest-slow answers after 0.3 s.
- leaky-headers: answers with LiteLLM's and the provider's internal headers and a cookie.
- echo-auth-error: a 400 whose body echoes the request's Authorization header and an sk- key.
- leak-master-key: the master key (the bearer token the proxy sent) in a success body and a stream event.
- unauthorized: 401, as LiteLLM answers a master key it does not accept.
- huge-usage, negative-usage: counts past 64 bits, or below zero.

Models of the estimate tests (test_estimates.py), chat only; their answers are not text, or not cl100k's:

- tool-args: a forced tool call, ~28 KB of arguments streamed, then finish_reason, and the usage only 1 s
  later (a client that hangs up at finish_reason leaves before it); not streamed: the call and no usage.
- reasoning: the same with LiteLLM's `reasoning_content` deltas, then a short answer.
- dense: max_tokens events of one character cl100k counts as 4 tokens (one of the model's own), then a
  pause and [DONE] without usage; not streamed: the same text, no usage.
- over-report: the usage reported is far above what was reserved (10 x max_tokens answer tokens).
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ECHOED_SK_KEY = "sk-live-0123456789abcdefghij"  # an sk- key an upstream error body may echo
LEAKY_HEADERS = {
    "x-litellm-key-spend": "1234.5",
    "x-litellm-model-api-base": "https://internal-provider.example/v1",
    "set-cookie": "session=upstream-secret; Path=/",
    "x-ratelimit-remaining-requests": "42",
    "llm_provider-foo": "bar",
    "openai-model": "gpt-fake",
    "openai-processing-ms": "7",
}
INTEGRITY_MODELS = frozenset(
    {"honest", "honest-slow", "leaky-headers", "echo-auth-error", "leak-master-key", "unauthorized"}
)

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


OUT_OF_RANGE_USAGE: dict[str, dict[str, int]] = {
    "huge-usage": {"prompt_tokens": 10**30, "completion_tokens": 5, "total_tokens": 10**30 + 5},
    "negative-usage": {"prompt_tokens": 10, "completion_tokens": -500_000, "total_tokens": -499_990},
}


def completion(content: str = "ok", usage: dict[str, int] | None = USAGE) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake",
        "object": "chat.completion",
        "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }
    if usage is not None:
        body["usage"] = usage
    return body


# The tool call of the estimate tests: ~28 KB of JSON arguments, streamed 200 bytes at a time.
TOOL_NAME = "save_document"
TOOL_ARGUMENTS = orjson.dumps({"title": "Notes", "body": " ".join(f"line {i} of the document" for i in range(1100))})
TOOL_PIECES = [TOOL_ARGUMENTS[i : i + 200].decode() for i in range(0, len(TOOL_ARGUMENTS), 200)]
REASONING_PIECES = [f"Step {i}: weigh the options once more before answering. " for i in range(400)]
REASONING_ANSWER = "Done."
DENSE = "\U00013000"  # an Egyptian hieroglyph: 4 tokens in cl100k_base, 1 of the fake model's
ESTIMATE_MODELS = frozenset({"tool-args", "reasoning", "dense", "over-report"})


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(content: str) -> bytes:
    return sse({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]})


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[str] = []  # models whose stream the proxy abandoned
        # Streams of the model `held` stop after their first chunk while this is clear (tests of shutdown)
        self.release = threading.Event()
        self.release.set()
        self.holding = 0  # `held` streams waiting for it
        self.url = ""  # set once it is served
        self._tokenizer: Any = None
        self.app = Starlette(
            routes=[
                Route("/v1/chat/completions", self.chat, methods=["POST"]),
                Route("/v1/completions", self.other, methods=["POST"]),
                Route("/v1/embeddings", self.other, methods=["POST"]),
                Route("/v1/models", self.models),
                Route("/health/liveliness", self.models),
            ]
        )

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        body["_headers"] = dict(request.headers)
        self.requests.append(body)
        model = body.get("model")
        if model in INTEGRITY_MODELS:
            return await self.integrity(request, body, "chat")
        if model in ESTIMATE_MODELS:
            return self.estimate_answer(body)
        if model == "bad-request":
            return JSONResponse(
                {"error": {"message": "context too long", "type": "invalid_request_error", "code": "400"}}, 400
            )
        if model == "server-error":
            return JSONResponse({"error": {"message": "boom", "type": "api_error"}}, 500)
        if model == "no-usage":
            return JSONResponse(completion("four score and seven", usage=None))
        if model in OUT_OF_RANGE_USAGE:  # a broken upstream's counts: estimated instead
            return JSONResponse(completion("four score and seven", usage=OUT_OF_RANGE_USAGE[model]))
        cost = {"x-litellm-response-cost": "0.00042"}  # as LiteLLM sends it when it knows the price
        if body.get("stream"):
            return StreamingResponse(self.stream(model), media_type="text/event-stream", headers=cost)
        return JSONResponse(completion(), headers=cost)

    async def stream(self, model: str):  # type: ignore[no-untyped-def]
        try:
            if model == "slow-first-byte":
                await asyncio.sleep(0.5)
            if model == "malformed":
                yield b"data: {this is not json\n\n"
            for i in range(3):
                yield chunk(f"part{i} ")
                if model in ("slow-stream", "endless"):
                    await asyncio.sleep(0.3)
            if model == "endless":
                for i in range(1000):
                    yield chunk(f"more{i} ")
                    await asyncio.sleep(0.3)
            if model == "stall":
                await asyncio.sleep(30)
            if model == "held":
                self.holding += 1
                try:
                    while not self.release.is_set():
                        await asyncio.sleep(0.02)
                finally:
                    self.holding -= 1
            if model == "cut-stream":
                raise RuntimeError("upstream dies mid-stream")
            if model != "no-usage-stream":
                yield sse(
                    {
                        "id": "c",
                        "object": "chat.completion.chunk",
                        "model": "fake-served",
                        "choices": [],
                        "usage": USAGE,
                    }
                )
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(model)
            raise

    # --- models of the estimate tests ------------------------------------------------------------

    def estimate_answer(self, body: dict[str, Any]) -> Response:
        model, cap = body["model"], body.get("max_tokens") or 16
        if model == "over-report":
            usage = {"prompt_tokens": 20, "completion_tokens": 10 * cap, "total_tokens": 20 + 10 * cap}
            if body.get("stream"):
                return StreamingResponse(self.integrity_stream("ok", usage), media_type="text/event-stream")
            return JSONResponse(completion("ok", usage))
        if body.get("stream"):
            events = {"tool-args": self.tool_stream, "reasoning": self.reasoning_stream, "dense": self.dense_stream}
            return StreamingResponse(events[model](cap), media_type="text/event-stream")
        answer = completion(DENSE * cap if model == "dense" else None, usage=None)
        message = answer["choices"][0]["message"]
        if model == "tool-args":
            call = {
                "id": "call_1",
                "type": "function",
                "function": {"name": TOOL_NAME, "arguments": TOOL_ARGUMENTS.decode()},
            }
            message["tool_calls"] = [call]
            answer["choices"][0]["finish_reason"] = "tool_calls"
        elif model == "reasoning":
            message.update(content=REASONING_ANSWER, reasoning_content="".join(REASONING_PIECES))
        return JSONResponse(answer)

    @staticmethod
    def delta(delta: dict[str, Any], finish: str | None = None) -> bytes:
        """A chunk as LiteLLM streams it: every field of the delta present, those without a value null."""
        fields = {"content": None, "role": "assistant", "function_call": None, "tool_calls": None, "audio": None}
        choice = {"finish_reason": finish, "index": 0, "delta": {**fields, **delta}, "logprobs": None}
        return sse({"id": "c", "object": "chat.completion.chunk", "model": "fake-served", "choices": [choice]})

    async def late_usage(self, completion_tokens: int):  # type: ignore[no-untyped-def]
        await asyncio.sleep(1.0)  # a client leaving at finish_reason is gone before this
        usage = {"prompt_tokens": 11, "completion_tokens": completion_tokens, "total_tokens": 11 + completion_tokens}
        yield sse({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    async def tool_stream(self, cap: int):  # type: ignore[no-untyped-def]
        call = {"index": 0, "id": "call_1", "type": "function", "function": {"name": TOOL_NAME, "arguments": ""}}
        yield self.delta({"tool_calls": [call]})
        for piece in TOOL_PIECES:
            yield self.delta({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        yield self.delta({}, "tool_calls")
        async for event in self.late_usage(self.count(TOOL_NAME + TOOL_ARGUMENTS.decode())):
            yield event

    async def reasoning_stream(self, cap: int):  # type: ignore[no-untyped-def]
        for piece in REASONING_PIECES:
            yield self.delta({"reasoning_content": piece})
        yield self.delta({"content": REASONING_ANSWER})
        yield self.delta({}, "stop")
        async for event in self.late_usage(self.count("".join(REASONING_PIECES) + REASONING_ANSWER)):
            yield event

    async def dense_stream(self, cap: int):  # type: ignore[no-untyped-def]
        for _ in range(cap):  # max_tokens honoured, in the model's own tokens
            yield chunk(DENSE)
        await asyncio.sleep(0.5)  # a client that stops reading early is gone before the end
        yield b"data: [DONE]\n\n"

    # --- models of the budget-integrity tests ---------------------------------------------------

    async def other(self, request: Request) -> Response:
        """/v1/completions and /v1/embeddings: the integrity models only."""
        body = await request.json()
        body["_headers"] = dict(request.headers)
        self.requests.append(body)
        endpoint = "completions" if request.url.path.endswith("/completions") else "embeddings"
        if body.get("model") not in INTEGRITY_MODELS:
            return JSONResponse({"error": {"message": "unknown model", "type": "invalid_request_error"}}, 404)
        return await self.integrity(request, body, endpoint)

    async def integrity(self, request: Request, body: dict[str, Any], endpoint: str) -> Response:
        model = body["model"]
        authorization = request.headers.get("authorization", "")
        master = authorization.removeprefix("Bearer ")
        if model == "unauthorized":
            message = f"Authentication Error, invalid key passed: {master}"
            return JSONResponse({"error": {"message": message, "type": "auth_error", "code": "401"}}, 401)
        if model == "echo-auth-error":
            error = {
                "message": f"Bad request. Received headers: authorization={authorization}; key {ECHOED_SK_KEY}",
                "type": "invalid_request_error",
                "code": "400",
                "param": None,
                "headers": dict(request.headers),
                "api_base": "https://internal-provider.example/v1",
            }
            return JSONResponse({"error": error, "litellm_params": {"api_key": master}}, 400, headers=LEAKY_HEADERS)
        if model == "honest-slow":
            await asyncio.sleep(0.3)
        usage = self.honest_usage(body, endpoint)
        headers = {"x-litellm-response-cost": "0.00042"}
        if model == "leaky-headers":
            headers.update(LEAKY_HEADERS)
        content = f"the key is {master}." if model == "leak-master-key" else "ok"
        if body.get("stream"):
            stream = self.integrity_stream(content, usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers=headers)
        if endpoint == "embeddings":
            value = body["input"]
            count = len(value) if isinstance(value, list) and isinstance(value[0], (str, list)) else 1
            vector = [0.5] * body["dimensions"] if body.get("dimensions") else [0.0, 1.0]
            data = [{"object": "embedding", "index": i, "embedding": vector} for i in range(count)]
            return JSONResponse({"object": "list", "data": data, "model": model, "usage": usage}, headers=headers)
        if endpoint == "completions":
            choices = [{"index": i, "text": content, "finish_reason": "length"} for i in range(answers(body, endpoint))]
            return JSONResponse(
                {"id": "cmpl-fake", "object": "text_completion", "model": model, "choices": choices, "usage": usage},
                headers=headers,
            )
        answer = completion(content, usage)
        answer["choices"] = [{**answer["choices"][0], "index": i} for i in range(answers(body, endpoint))]
        return JSONResponse(answer, headers=headers)

    async def integrity_stream(self, content: str, usage: dict[str, int]):  # type: ignore[no-untyped-def]
        yield chunk("the answer ")
        yield chunk(content)
        yield sse({"id": "c", "object": "chat.completion.chunk", "model": "fake-served", "choices": [], "usage": usage})
        yield b"data: [DONE]\n\n"

    def count(self, text: str) -> int:
        if self._tokenizer is None:
            from proxy.tokens import Tokenizer

            self._tokenizer = Tokenizer.load()
        return int(self._tokenizer.count(text))

    def honest_usage(self, body: dict[str, Any], endpoint: str) -> dict[str, int]:
        """What a model billing exactly what was asked would report: the prompt as sent, each answer to its cap."""
        prompt = 0
        if endpoint == "chat":
            prompt = 3  # the priming of the answer
            for message in body.get("messages") or []:
                prompt += 3 + self.count(str(message.get("role", "")))
                content = message.get("content")
                if isinstance(content, str):
                    prompt += self.count(content)
                for part in content if isinstance(content, list) else []:
                    if part.get("type") == "text":
                        prompt += self.count(part.get("text", ""))
                    elif part.get("type") in ("image_url", "input_image"):
                        prompt += 1445
                    else:
                        prompt += self.count(orjson.dumps(part).decode())
                for key, value in message.items():  # name, tool_calls, tool_call_id, ...
                    if key not in ("role", "content") and value is not None:
                        prompt += self.count(value if isinstance(value, str) else orjson.dumps(value).decode())
            for field in ("tools", "functions", "response_format", "prediction"):
                if body.get(field) is not None:
                    prompt += self.count(orjson.dumps(body[field]).decode())
        else:
            value = body.get("prompt" if endpoint == "completions" else "input")
            items = value if isinstance(value, list) and value and isinstance(value[0], (str, list)) else [value]
            for item in items:
                prompt += len(item) if isinstance(item, list) else self.count(str(item))
        caps = [body[f] for f in ("max_tokens", "max_completion_tokens") if isinstance(body.get(f), int)]
        written = 0 if endpoint == "embeddings" else answers(body, endpoint) * (max(caps) if caps else 16)
        return {"prompt_tokens": prompt, "completion_tokens": written, "total_tokens": prompt + written}


def answers(body: dict[str, Any], endpoint: str) -> int:
    """How many answers the upstream writes: n; for completions max(n, best_of) for each prompt."""
    n = body.get("n") or 1
    if endpoint != "completions":
        return int(n)
    value = body.get("prompt")
    prompts = len(value) if isinstance(value, list) and value and isinstance(value[0], (str, list)) else 1
    return int(max(n, body.get("best_of") or 1) * prompts)
