"""The reference: a bare Starlette forwarder on aiohttp, with no auth, budget or ledger. Its garbage
collections are timed as the proxy's are (the same quota_gc_pause_seconds at /metrics), so `make bench`
can set the two side by side; nothing else of the proxy runs here."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from proxy.metrics import REGISTRY, watch_gc

UPSTREAM = os.environ["UPSTREAM"]
session: aiohttp.ClientSession | None = None


async def forward(request: Request) -> Response:
    assert session is not None
    body = await request.body()
    upstream = await session.post(
        f"{UPSTREAM}/v1/chat/completions", data=body, headers={"Content-Type": "application/json"}
    )
    if upstream.content_type == "text/event-stream":

        async def chunks():  # type: ignore[no-untyped-def]
            async for chunk in upstream.content.iter_any():
                yield chunk
            upstream.release()

        return StreamingResponse(chunks(), media_type="text/event-stream")
    data = await upstream.read()
    upstream.release()
    return Response(data, media_type="application/json")


@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    global session
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512))
    watch_gc()
    yield
    await session.close()


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
