"""The upstream (LiteLLM) client, and the response that streams its answer through.

The client is the proxy's own (http_wire.py) because it was measured: a forwarder on httpx's default
transport served a tenth of the requests, and aiohttp's client cost more CPU than the rest of the
proxy's work (docs/performance.md).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from starlette.types import Receive, Scope, Send

from .errors import ProxyError, UpstreamError, openai_error, shutting_down, upstream_failed
from .http_wire import Answer, HttpPool, WireError
from .sse import StreamMeter

# Upstream response headers a client may see. LiteLLM's own (x-litellm-key-spend is the master key's
# spend, i.e. everyone's; x-litellm-model-api-base names the provider's host), the provider's rate
# limits of the company's key, cookies and server details stay here.
CLIENT_HEADERS = frozenset(
    {"content-type", "retry-after", "openai-model", "openai-processing-ms", "openai-version", "x-litellm-response-cost"}
)
_SECRETS = re.compile(r"(?i)(bearer\s+)\S+|\bsk-[A-Za-z0-9_\-]{6,}")


def client_headers(headers: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in headers.items() if k.lower() in CLIENT_HEADERS and v.isascii()}


def redact(text: str, secret: str) -> str:
    """Text from the upstream with the master key, bearer tokens and sk- keys taken out."""
    if secret:
        text = text.replace(secret, "[redacted]")
    return _SECRETS.sub(lambda m: (m.group(1) or "") + "[redacted]", text)


def _short(value: Any, secret: str) -> str | None:
    return redact(value, secret)[:200] if isinstance(value, str) else None


def error_body(status: int, body: bytes, secret: str) -> bytes:
    """An upstream error as an OpenAI-shaped body rebuilt from its message, type, code and param only:
    whatever else it echoed (request headers, the master key, provider details) stays here."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        obj = None
    error = obj.get("error") if isinstance(obj, dict) else None
    if isinstance(error, str):
        error = {"message": error}
    if not isinstance(error, dict):
        error = {}
    message = error.get("message")
    text = (
        redact(message, secret)[:2000]
        if isinstance(message, str) and message
        else f"The model server answered HTTP {status}."
    )
    code = error.get("code")
    return orjson.dumps(
        openai_error(
            text,
            _short(error.get("type"), secret) or "api_error",
            str(code) if isinstance(code, int) else _short(code, secret),
            _short(error.get("param"), secret),
        )
    )


class Upstreamed:
    """An upstream answer, handed to the client only through what it may see."""

    __slots__ = ("response", "status", "_secret")

    def __init__(self, response: Answer, secret: str) -> None:
        self.response = response
        self.status = response.status
        self._secret = secret

    @property
    def ok_stream(self) -> bool:
        return self.status == 200 and self.response.content_type == "text/event-stream"

    @property
    def cost(self) -> float | None:
        raw = self.response.headers.get("x-litellm-response-cost")
        try:
            return float(raw) if raw is not None else None
        except ValueError:
            return None

    @property
    def secret(self) -> bytes:
        return self._secret.encode()

    def headers_for_client(self) -> dict[str, str]:
        return client_headers(self.response.headers)

    async def read_for_client(self) -> bytes:
        """The whole body: an error rebuilt (error_body), a success with the master key taken out."""
        try:
            body = await self.response.read()
        except WireError as exc:
            raise upstream_failed(exc, answering=True) from None
        finally:
            self.response.release()
        if not 200 <= self.status < 300:
            return error_body(self.status, body, self._secret)
        secret = self.secret
        return body.replace(secret, b"[redacted]") if secret and secret in body else body


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
        self._secret = master_key
        self._pool = HttpPool(
            base_url,
            {"Authorization": f"Bearer {master_key}", "Accept-Encoding": "identity", "User-Agent": "quota-sidecar"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_connections=max_connections,
        )

    async def close(self) -> None:
        await self._pool.close()

    async def send(
        self, method: str, path: str, *, body: bytes | None = None, query: str = "", request_id: str | None = None
    ) -> Upstreamed:
        headers = {}
        if body is not None:
            headers["Content-Type"] = "application/json"
        if request_id:
            headers["X-Request-Id"] = request_id
        try:
            response = await self._pool.request(method, f"{path}?{query}" if query else path, headers, body)
        except WireError as exc:
            raise upstream_failed(exc, answering=False) from None
        if response.status in (401, 403, 407):
            # The proxy's own key was refused: not the caller's fault, and not to be shown as theirs.
            response.release()
            raise UpstreamError(
                f"The model server refused the proxy's credentials (HTTP {response.status}); tell your administrator."
            )
        return Upstreamed(response, self._secret)


def stream_error_event(error: ProxyError) -> bytes:
    """An in-stream error the OpenAI SDKs raise as an APIError once the 200 headers are out."""
    return b"data: " + orjson.dumps(error.body()) + b"\n\n"


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
        upstream: Upstreamed,
        headers: Mapping[str, str],
        meter: StreamMeter,
        on_end: StreamEnd,
        recorded: Callable[[], Awaitable[None]],
    ) -> None:
        self._upstream = upstream.response
        self._status = upstream.status
        self._secret = upstream.secret
        self._recorded = recorded  # resolves once what on_end submitted is on its way
        self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]
        self._meter = meter
        self._on_end = on_end
        self._first_byte: float | None = None
        self._started = False  # the response's start is sent
        self._held: bytes | None = None  # the last events, waiting for their record to reach Redis
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
        except asyncio.CancelledError:
            # The server's stop cut the stream (past SHUTDOWN_GRACE_SECONDS): the client is told why, in
            # the stream, rather than seeing it end mid-answer. The stop asked for this task to end, and
            # it ends here, so uvicorn has no cancelled task to log.
            if pump.done() and not pump.cancelled() and pump.exception() is None:
                # The pump ended in the turn the stop cancelled this task: the response is complete, with its outcome.
                outcome = pump.result()
                return
            for task in (pump, watch):
                task.cancel()
            self._upstream.release()
            self._end(outcome)  # accounted first, while the stop still waits for it: the cut may not get through
            if watch.done():
                pass  # the client is gone
            elif self._held is not None:  # complete and recorded, its last events not yet out: they go now
                await self._last_words(send, self._held)
            elif not self._meter.done:
                await self._last_words(send, stream_error_event(shutting_down()))
        finally:
            for task in (pump, watch):
                task.cancel()
            self._upstream.release()
            self._end(outcome)

    async def _last_words(self, send: Send, body: bytes) -> None:
        """`body`, then the end of the response, from a task the stop cancelled."""
        current = asyncio.current_task()
        if current is not None:
            current.uncancel()  # the cancellation is taken: this task ends once these are out
        try:
            # A client that stopped reading would hold the send: it gets a second, then nothing.
            async with asyncio.timeout(1.0):
                if not self._started:
                    await send({"type": "http.response.start", "status": self._status, "headers": self._headers})
                await send({"type": "http.response.body", "body": body, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (TimeoutError, OSError):
            pass

    async def _pump(self, send: Send) -> str:
        await send({"type": "http.response.start", "status": self._status, "headers": self._headers})
        self._started = True
        meter, secret = self._meter, self._secret
        outcome = "ok"
        try:
            async for chunk in self._upstream.chunks():
                out = meter.feed(chunk)
                if secret and secret in out:  # events arrive whole from the meter, so a key cannot straddle two
                    out = out.replace(secret, b"[redacted]")
                if out:
                    if self._first_byte is None:
                        self._first_byte = time.perf_counter()
                    if meter.done and not self._ended:
                        self._end("ok")  # recorded before the client has [DONE]: a crash from here on loses nothing
                        self._held = out  # should the stop cut the stream while it waits, these still go out
                        await self._recorded()
                        self._held = None
                    await send({"type": "http.response.body", "body": out, "more_body": True})
            tail = meter.flush()
            if tail.strip():
                await send({"type": "http.response.body", "body": tail, "more_body": True})
        except WireError as exc:
            outcome = "upstream_error"
            event = stream_error_event(upstream_failed(exc, answering=True))
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        return outcome


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
