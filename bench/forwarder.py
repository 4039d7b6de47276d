"""The reference: a bare Starlette forwarder on aiohttp, with no auth, budget or ledger. Its garbage
collections are timed as the proxy's are (the same quota_gc_pause_seconds at /metrics), so `make bench`
can set the two side by side; nothing else of the proxy runs here.

With FORWARDER_CLIENT=wire it forwards through the proxy's own client (proxy/http_wire.py) instead:
the same forwarder, so what the proxy costs beyond forwarding stays in sight now that its client is
cheaper than aiohttp's."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.http_wire import HttpPool
from proxy.metrics import REGISTRY, watch_gc

UPSTREAM = os.environ["UPSTREAM"]
WIRE = os.environ.get("FORWARDER_CLIENT", "aiohttp") == "wire"
session: aiohttp.ClientSession | None = None
pool = HttpPool(UPSTREAM, {}, connect_timeout=5, read_timeout=600, max_connections=512)


async def forward(request: Request) -> Response:
    body = await request.body()
    if WIRE:
        answer = await pool.request("POST", "/v1/chat/completions", {"Content-Type": "application/json"}, body)
        return await respond(answer.content_type, answer.chunks, answer.read, answer.release)
    assert session is not None
    upstream = await session.post(
        f"{UPSTREAM}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    return await respond(upstream.content_type, upstream.content.iter_any, upstream.read, upstream.release)


async def respond(
    content_type: str,
    chunks: Callable[[], AsyncIterator[bytes]],
    read: Callable[[], Awaitable[bytes]],
    release: Callable[[], None],
) -> Response:
    if content_type == "text/event-stream":

        async def stream() -> AsyncIterator[bytes]:
            async for chunk in chunks():
                yield chunk
            release()

        return StreamingResponse(stream(), media_type="text/event-stream")
    data = await read()
    release()
    return Response(data, media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    watch_gc()
    yield
    await session.close()
    await pool.close()


async def health(request: Request) -> Response:
    return Response("ok")


async def prometheus(request: Request) -> Response:
    return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


app = Starlette(
    routes=[
        Route("/v1/chat/completions", forward, methods=["POST"]),
        Route("/health", health),
        Route("/metrics", prometheus),
    ],
    lifespan=lifespan,
)
