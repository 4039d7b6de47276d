"""The reference: a bare Starlette forwarder on aiohttp, with no auth, budget or ledger."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

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
    yield
    await session.close()


async def health(request: Request) -> Response:
    return Response("ok")


app = Starlette(
    routes=[Route("/v1/chat/completions", forward, methods=["POST"]), Route("/health", health)], lifespan=lifespan
)
