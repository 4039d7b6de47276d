"""A small OpenAI-shaped upstream for tests: counts what reaches it and misbehaves on request.

The model name picks the behaviour, so one server covers every case.
"""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

USAGE = {"prompt_tokens": 9, "completion_tokens": 3, "total_tokens": 12}


def completion(content: str = "ok", usage: dict[str, int] | None = USAGE) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": "chatcmpl-fake", "object": "chat.completion", "model": "fake",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
    }  # fmt: skip
    if usage is not None:
        body["usage"] = usage
    return body


def sse(obj: Any) -> bytes:
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def chunk(content: str) -> bytes:
    return sse({"id": "c", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": content}}]})


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.cancelled: list[str] = []  # models whose stream the proxy abandoned
        self.url = ""  # set once it is served
        self.app = Starlette(routes=[Route("/v1/chat/completions", self.chat, methods=["POST"]),
                                     Route("/v1/models", self.models), Route("/health/liveliness", self.models)])  # fmt: skip

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

    async def chat(self, request: Request) -> Response:
        body = await request.json()
        body["_headers"] = dict(request.headers)
        self.requests.append(body)
        model = body.get("model")
        if model == "bad-request":
            return JSONResponse({"error": {"message": "context too long", "type": "invalid_request_error", "code": "400"}}, 400)
        if model == "server-error":
            return JSONResponse({"error": {"message": "boom", "type": "api_error"}}, 500)
        if model == "no-usage":
            return JSONResponse(completion("four score and seven", usage=None))
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
            if model == "cut-stream":
                raise RuntimeError("upstream dies mid-stream")
            if model != "no-usage-stream":
                yield sse({"id": "c", "object": "chat.completion.chunk", "model": "fake-served", "choices": [], "usage": USAGE})
            yield b"data: [DONE]\n\n"
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled.append(model)
            raise
