"""The upstream (LiteLLM) client, and the response that streams its answer through.

aiohttp is the client because it was measured: on this 2-core machine a forwarder on httpx's
default transport added 2.3 ms per request and fell to ~200 req/s at 16 concurrent clients,
while aiohttp added ~0.5 ms and served ~2,300 req/s (README, Performance).
"""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable, Mapping

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from .errors import ServiceUnavailable, UpstreamError, UpstreamTimeout
from .sse import StreamMeter

# Hop-by-hop and framing headers are the proxy's own business on each leg.
_DROP = frozenset(
    {
        "connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding", "date", "server",
        "proxy-authenticate", "proxy-authorization", "te", "trailer", "upgrade",
    }
)  # fmt: skip


def pass_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() not in _DROP}


class Upstream:
    """One pooled keep-alive session to LiteLLM for the life of the process."""

    def __init__(
        self,
        base_url: str,
        master_key: str,
        *,
        connect_timeout: float = 5.0,
        read_timeout: float = 600.0,
        max_connections: int = 512,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # Named here, so aiohttp adds no User-Agent of its own: its skip_auto_headers option
        # rebuilds a header multidict on every request (~3.5 µs each, measured under load).
        self._headers = {"Authorization": f"Bearer {master_key}", "Accept-Encoding": "identity", "User-Agent": "quota-sidecar"}
        self._timeout = aiohttp.ClientTimeout(total=None, connect=connect_timeout, sock_read=read_timeout)
        self._max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=self._max_connections, ttl_dns_cache=300, keepalive_timeout=60)
        # No cookie jar: one session serves every user, so a cookie the upstream set for one
        # request must not ride along on the next user's.
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(
        self, method: str, path: str, *, body: bytes | None = None, query: str = "", request_id: str | None = None
    ) -> aiohttp.ClientResponse:
        assert self._session is not None, "Upstream.start() was not awaited"
        headers = self._headers.copy()
        if body is not None:
            headers["Content-Type"] = "application/json"
        if request_id:
            headers["X-Request-Id"] = request_id
        url = f"{self.base_url}{path}?{query}" if query else f"{self.base_url}{path}"
        try:
            return await self._session.request(method, url, data=body, headers=headers)
        except asyncio.TimeoutError:
            raise UpstreamTimeout("The model server did not answer in time.") from None
        except aiohttp.ClientConnectionError as exc:
            raise ServiceUnavailable(f"The model server is unreachable ({exc.__class__.__name__}).") from None
        except aiohttp.ClientError as exc:
            raise UpstreamError(f"The model server request failed ({exc.__class__.__name__}).") from None


def stream_error_event(message: str, code: str = "upstream_error") -> bytes:
    """An in-stream error the OpenAI SDKs raise as an APIError once the 200 headers are out."""
    body = {"error": {"message": message, "type": "api_error", "code": code, "param": None}}
    return b"data: " + orjson.dumps(body) + b"\n\n"


# Called once with how the stream ended and the perf_counter() time of its first byte.
StreamEnd = Callable[[str, float | None], None]


class StreamThrough:
    """An ASGI response that passes an upstream SSE body to the client as it arrives.

    It watches for the client leaving, so the upstream request is closed at once rather
    than when the next chunk fails to send, and it always reports how the stream ended
    (ok, cancelled, upstream_error) and when its first byte went out, for accounting: once,
    as soon as the outcome is known, and for a complete answer before its [DONE] is sent.
    """

    def __init__(
        self,
        upstream: aiohttp.ClientResponse,
        headers: Mapping[str, str],
        meter: StreamMeter,
        on_end: StreamEnd,
        recorded: Callable[[], Awaitable[None]],
    ) -> None:
        self._upstream = upstream
        self._recorded = recorded  # resolves once what on_end submitted is on its way
        self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._meter = meter
        self._on_end = on_end
        self._first_byte: float | None = None
        self._ended = False

    def _end(self, outcome: str) -> None:
        if not self._ended:
            self._ended = True
            self._on_end(outcome, self._first_byte)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self._pump(send))
        watch = asyncio.ensure_future(_wait_disconnect(receive))
        outcome = "cancelled"
        try:
            await asyncio.wait((pump, watch), return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and not pump.cancelled() and pump.exception() is None:
                outcome = pump.result()
            elif self._meter.done:
                outcome = "ok"  # clients hang up once they read [DONE], sometimes before the body's end
        finally:
            for task in (pump, watch):
                task.cancel()
            self._upstream.close()
            self._end(outcome)

    async def _pump(self, send: Send) -> str:
        await send({"type": "http.response.start", "status": self._upstream.status, "headers": self._headers})
        meter = self._meter
        outcome = "ok"
        try:
            async for chunk in self._upstream.content.iter_any():
                out = meter.feed(chunk)
                if out:
                    if self._first_byte is None:
                        self._first_byte = time.perf_counter()
                    if meter.done and not self._ended:
                        self._end("ok")  # recorded before the client has [DONE]: a crash from here on loses nothing
                        await self._recorded()
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = meter.flush()
            if tail.strip():
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except asyncio.TimeoutError:
            outcome = "upstream_error"
            await send({"type": "http.response.body", "body": stream_error_event("The model server stopped responding mid-answer.", "upstream_timeout"), "more_body": True})  # fmt: skip
        except aiohttp.ClientError as exc:
            outcome = "upstream_error"
            message = f"The model server broke off the answer ({exc.__class__.__name__})."
            await send({"type": "http.response.body", "body": stream_error_event(message), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
