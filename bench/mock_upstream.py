"""A minimal, fast OpenAI-shaped upstream (raw ASGI): chat completions, streamed or not, with usage."""

from __future__ import annotations

import orjson

USAGE = {"prompt_tokens": 12, "completion_tokens": 10, "total_tokens": 22}
COMPLETION = orjson.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 0,
        "model": "bench",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "word " * 10}, "finish_reason": "stop"}],
        "usage": USAGE,
    }
)
CHUNKS = [
    b"data: "
    + orjson.dumps(
        {
            "id": "c",
            "object": "chat.completion.chunk",
            "model": "bench",
            "choices": [{"index": 0, "delta": {"content": "word "}}],
        }
    )
    + b"\n\n"
    for _ in range(10)
]
USAGE_CHUNK = (
    b"data: " + orjson.dumps({"id": "c", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}) + b"\n\n"
)
JSON = [(b"content-type", b"application/json")]
SSE = [(b"content-type", b"text/event-stream")]


async def app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"].endswith("/models") or scope["path"].startswith("/health"):
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": b'{"object":"list","data":[{"id":"bench"}]}'})
        return
    if b'"stream":true' not in body.replace(b" ", b""):
        await send({"type": "http.response.start", "status": 200, "headers": JSON})
        await send({"type": "http.response.body", "body": COMPLETION})
        return
    await send({"type": "http.response.start", "status": 200, "headers": SSE})
    for chunk in CHUNKS:
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    if b'"include_usage":true' in body.replace(b" ", b""):
        await send({"type": "http.response.body", "body": USAGE_CHUNK, "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n"})
