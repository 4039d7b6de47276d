"""proxy/forward.py: what of an upstream answer a client may see (headers, errors, keys), and read failures."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from multidict import CIMultiDict

from proxy.errors import ProxyError, ServiceUnavailable, UpstreamError, UpstreamTimeout, upstream_failed
from proxy.forward import CLIENT_HEADERS, Upstream, Upstreamed, client_headers, error_body, redact, stream_error_event
from proxy.http_wire import BadAnswer, ConnectFailed, Disconnected, TimedOut

pytestmark = pytest.mark.anyio

MASTER = "sk-master-0123456789abcdef"


# client_headers


def test_client_headers_keep_only_the_allow_list() -> None:
    upstream = {
        "Content-Type": "application/json",
        "Retry-After": "3",
        "openai-model": "gpt-4o-2024",
        "openai-processing-ms": "120",
        "openai-version": "2020-10-01",
        "x-litellm-response-cost": "0.0012",
        "x-litellm-key-spend": "1234.5",
        "x-litellm-model-api-base": "https://internal-provider.example",
        "x-ratelimit-remaining-tokens": "99",
        "set-cookie": "session=abc",
        "server": "uvicorn",
        "content-length": "42",
    }
    assert client_headers(upstream) == {
        "Content-Type": "application/json",
        "Retry-After": "3",
        "openai-model": "gpt-4o-2024",
        "openai-processing-ms": "120",
        "openai-version": "2020-10-01",
        "x-litellm-response-cost": "0.0012",
    }


def test_client_headers_match_names_in_any_case_and_drop_non_ascii_values() -> None:
    upstream = CIMultiDict([("CONTENT-TYPE", "text/event-stream"), ("OpenAI-Model", "modèle"), ("Retry-After", "1")])
    assert client_headers(upstream) == {"CONTENT-TYPE": "text/event-stream", "Retry-After": "1"}


def test_the_allow_list_has_no_litellm_spend_or_provider_header() -> None:
    assert CLIENT_HEADERS == {
        "content-type",
        "retry-after",
        "openai-model",
        "openai-processing-ms",
        "openai-version",
        "x-litellm-response-cost",
    }


# redact


@pytest.mark.parametrize(
    "text, secret, clean",
    [
        (f"key {MASTER} refused", MASTER, "key [redacted] refused"),
        ("Authorization: Bearer abc.def.ghi", "", "Authorization: Bearer [redacted]"),
        ("header bearer   eyJhbGciOi rest", "", "header bearer   [redacted] rest"),
        ("BEARER tok", "", "BEARER [redacted]"),
        ("key sk-abcdef and sk-proj_AB-12xyz.", "", "key [redacted] and [redacted]."),
        ("sk-abc is too short to be a key", "", "sk-abc is too short to be a key"),
        ("task-manager-123456 is a word", "", "task-manager-123456 is a word"),
        ("secret hunter2 here", "hunter2", "secret [redacted] here"),
        ("nothing to hide", "", "nothing to hide"),
    ],
)
def test_redact_takes_out_the_master_key_bearer_tokens_and_sk_keys(text: str, secret: str, clean: str) -> None:
    assert redact(text, secret) == clean


def test_redact_takes_out_every_occurrence() -> None:
    assert redact(f"{MASTER}/{MASTER}", MASTER) == "[redacted]/[redacted]"


# error_body


def rebuilt(status: int, body: Any, secret: str = MASTER) -> dict[str, Any]:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return orjson.loads(error_body(status, raw, secret))


def test_error_body_keeps_message_type_code_and_param_only() -> None:
    upstream = {
        "error": {
            "message": "max_tokens is too large",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "param": "max_tokens",
            "headers": {"authorization": f"Bearer {MASTER}"},
            "provider": "internal-provider",
        },
        "request": {"api_key": MASTER},
    }
    assert rebuilt(400, upstream) == {
        "error": {
            "message": "max_tokens is too large",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
            "param": "max_tokens",
        }
    }


def test_error_body_redacts_keys_in_every_field_kept() -> None:
    upstream = {
        "error": {
            "message": f"Incorrect API key provided: {MASTER}. Authorization: Bearer zzz",
            "type": f"auth {MASTER}",
            "code": "sk-another-key-123456",
            "param": f"Bearer {MASTER}",
        }
    }
    assert rebuilt(400, upstream) == {
        "error": {
            "message": "Incorrect API key provided: [redacted]. Authorization: Bearer [redacted]",
            "type": "auth [redacted]",
            "code": "[redacted]",
            "param": "Bearer [redacted]",
        }
    }


def test_error_body_takes_an_error_string_as_its_message() -> None:
    assert rebuilt(429, {"error": "Rate limit reached"}) == {
        "error": {"message": "Rate limit reached", "type": "api_error", "code": None, "param": None}
    }


@pytest.mark.parametrize(
    "body",
    [
        b"<html>502 Bad Gateway</html>",
        b"",
        [1, 2],
        {"detail": "nope"},
        {"error": None},
        {"error": 5},
        {"error": {"message": ""}},
        {"error": {"message": 42}},
    ],
)
def test_error_body_without_a_message_says_what_the_status_was(body: Any) -> None:
    assert rebuilt(502, body) == {
        "error": {"message": "The model server answered HTTP 502.", "type": "api_error", "code": None, "param": None}
    }


def test_error_body_codes_as_numbers_become_strings_and_other_kinds_are_dropped() -> None:
    assert rebuilt(429, {"error": {"message": "m", "code": 429}})["error"]["code"] == "429"
    assert rebuilt(429, {"error": {"message": "m", "code": {"x": 1}, "type": 7, "param": ["p"]}})["error"] == {
        "message": "m",
        "type": "api_error",
        "code": None,
        "param": None,
    }


def test_error_body_bounds_the_length_of_each_field() -> None:
    error = rebuilt(400, {"error": {"message": "m" * 5000, "type": "t" * 500, "code": "c" * 500, "param": "p" * 500}})
    assert error["error"] == {"message": "m" * 2000, "type": "t" * 200, "code": "c" * 200, "param": "p" * 200}


def test_error_body_redacts_a_key_before_cutting_the_message() -> None:
    message = "x" * 1990 + MASTER
    assert rebuilt(400, {"error": {"message": message}})["error"]["message"] == "x" * 1990 + "[redacted]"


# How the upstream failing reads (errors.upstream_failed, raised by Upstream.send and Upstreamed), and in a stream


@pytest.mark.parametrize(
    "exc, answering, kind, status, message",
    [
        (TimedOut("x"), True, UpstreamTimeout, 504, "The model server did not finish its answer in time."),
        (TimedOut("x"), False, UpstreamTimeout, 504, "The model server did not answer in time."),
        (TimeoutError(), False, UpstreamTimeout, 504, "The model server did not answer in time."),
        (Disconnected("x"), True, UpstreamError, 502, "The model server broke off its answer (Disconnected)."),
        (BadAnswer("x"), True, UpstreamError, 502, "The model server broke off its answer (BadAnswer)."),
        (ConnectFailed("x"), False, ServiceUnavailable, 503, "The model server is unreachable (ConnectFailed)."),
        (Disconnected("x"), False, ServiceUnavailable, 503, "The model server is unreachable (Disconnected)."),
        (
            ConnectionRefusedError(),
            False,
            ServiceUnavailable,
            503,
            "The model server is unreachable (ConnectionRefusedError).",
        ),
        (BadAnswer("x"), False, UpstreamError, 502, "The model server request failed (BadAnswer)."),
    ],
)
def test_an_upstream_failure_says_whether_the_answer_had_begun(
    exc: BaseException, answering: bool, kind: type[ProxyError], status: int, message: str
) -> None:
    failure = upstream_failed(exc, answering=answering)
    assert type(failure) is kind
    assert (failure.status, failure.message) == (status, message)


def test_stream_error_event_is_one_openai_shaped_sse_event() -> None:
    event = stream_error_event(UpstreamTimeout("gone"))
    assert event.startswith(b"data: ") and event.endswith(b"\n\n") and event.count(b"\n") == 2
    assert orjson.loads(event[6:]) == {
        "error": {"message": "gone", "type": "api_error", "code": "upstream_timeout", "param": None}
    }
    assert orjson.loads(stream_error_event(UpstreamError("x"))[6:])["error"]["code"] == "upstream_error"


# Upstreamed, over a stand-in for http_wire's Answer


class FakeResponse:
    def __init__(
        self,
        status: int,
        body: bytes = b"",
        headers: dict[str, str] | None = None,
        content_type: str = "application/json",
        fail: BaseException | None = None,
    ) -> None:
        self.status = status
        self.headers = {k.lower(): v for k, v in (headers or {}).items()}
        self.content_type = content_type
        self._body = body
        self._fail = fail
        self.released = 0

    async def read(self) -> bytes:
        if self._fail is not None:
            raise self._fail
        return self._body

    def release(self) -> None:
        self.released += 1


def upstreamed(response: FakeResponse) -> Upstreamed:
    return Upstreamed(response, MASTER)  # type: ignore[arg-type]


@pytest.mark.parametrize("raw, cost", [(None, None), ("0.0012", 0.0012), ("0", 0.0), ("n/a", None), ("", None)])
def test_cost_is_litellms_response_cost_header_when_it_is_a_number(raw: str | None, cost: float | None) -> None:
    headers = {} if raw is None else {"x-litellm-response-cost": raw}
    assert upstreamed(FakeResponse(200, headers=headers)).cost == cost


def test_only_a_200_event_stream_is_streamed_through() -> None:
    assert upstreamed(FakeResponse(200, content_type="text/event-stream")).ok_stream is True
    assert upstreamed(FakeResponse(200, content_type="application/json")).ok_stream is False
    assert upstreamed(FakeResponse(400, content_type="text/event-stream")).ok_stream is False


async def test_a_success_is_read_with_the_master_key_taken_out() -> None:
    response = FakeResponse(200, b'{"content": "the key is ' + MASTER.encode() + b'"}')
    assert await upstreamed(response).read_for_client() == b'{"content": "the key is [redacted]"}'
    assert response.released == 1


async def test_an_error_is_read_rebuilt() -> None:
    body = orjson.dumps({"error": {"message": f"bad key {MASTER}", "code": 400, "extra": "x"}})
    response = FakeResponse(400, body)
    assert orjson.loads(await upstreamed(response).read_for_client()) == {
        "error": {"message": "bad key [redacted]", "type": "api_error", "code": "400", "param": None}
    }
    assert response.released == 1


async def test_a_read_that_fails_is_released_and_raised_as_an_upstream_failure() -> None:
    response = FakeResponse(200, fail=Disconnected("cut"))
    with pytest.raises(UpstreamError) as caught:
        await upstreamed(response).read_for_client()
    assert caught.value.message == "The model server broke off its answer (Disconnected)."
    assert response.released == 1
    response = FakeResponse(200, fail=TimedOut("slow"))
    with pytest.raises(UpstreamTimeout) as timed_out:
        await upstreamed(response).read_for_client()
    assert timed_out.value.message == "The model server did not finish its answer in time."
    assert response.released == 1


def test_headers_for_client_are_the_allow_listed_ones() -> None:
    response = FakeResponse(200, headers={"Content-Type": "application/json", "x-litellm-key-spend": "9"})
    assert upstreamed(response).headers_for_client() == {"content-type": "application/json"}


# Upstream.send, against a loopback aiohttp server


@pytest.fixture
async def model_server() -> Any:
    from aiohttp import web
    from aiohttp.test_utils import TestServer

    seen: list[dict[str, Any]] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append({"path": request.path_qs, "headers": CIMultiDict(request.headers), "body": await request.read()})
        status = int(request.query.get("status", "200"))
        response = web.json_response({"ok": True}, status=status)
        response.set_cookie("session", "for-one-user-only")
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        # By name: aiohttp keeps no cookies of a bare IP address, so a cookie jar would go unnoticed there.
        yield f"http://localhost:{server.port}", seen
    finally:
        await server.close()


async def test_send_carries_the_master_key_and_our_request_id_only(model_server: Any) -> None:
    url, seen = model_server
    upstream = Upstream(url + "/", MASTER)
    try:
        answer = await upstream.send("POST", "/v1/chat/completions", body=b'{"model":"m"}', request_id="r-42")
        assert (answer.status, await answer.read_for_client()) == (200, b'{"ok": true}')
        await (await upstream.send("GET", "/v1/models", query="a=1")).read_for_client()
    finally:
        await upstream.close()
    first, second = seen
    assert (first["path"], first["body"]) == ("/v1/chat/completions", b'{"model":"m"}')
    assert {k: first["headers"][k] for k in ("Authorization", "Content-Type", "X-Request-Id", "User-Agent")} == {
        "Authorization": f"Bearer {MASTER}",
        "Content-Type": "application/json",
        "X-Request-Id": "r-42",
        "User-Agent": "quota-sidecar",
    }
    assert first["headers"]["Accept-Encoding"] == "identity"
    # A GET has no body type and no request id, and the first answer's cookie does not ride along.
    assert second["path"] == "/v1/models?a=1"
    assert [name for name in ("Content-Type", "X-Request-Id", "Cookie") if name in second["headers"]] == []


@pytest.mark.parametrize("status", [401, 403, 407])
async def test_the_proxys_own_key_refused_is_an_upstream_error_for_the_administrator(
    model_server: Any, status: int
) -> None:
    url, _ = model_server
    upstream = Upstream(url, MASTER)
    try:
        with pytest.raises(UpstreamError) as caught:
            await upstream.send("GET", "/v1/models", query=f"status={status}")
    finally:
        await upstream.close()
    assert caught.value.status == 502
    assert caught.value.message == (
        f"The model server refused the proxy's credentials (HTTP {status}); tell your administrator."
    )


async def test_other_error_statuses_are_handed_back_as_answers(model_server: Any) -> None:
    url, _ = model_server
    upstream = Upstream(url, MASTER)
    try:
        answer = await upstream.send("GET", "/x", query="status=429")
        assert answer.status == 429
        assert orjson.loads(await answer.read_for_client())["error"]["message"] == "The model server answered HTTP 429."
    finally:
        await upstream.close()


async def test_an_unreachable_model_server_is_a_503() -> None:
    from .devstack import free_port

    upstream = Upstream(f"http://127.0.0.1:{free_port()}", MASTER, connect_timeout=2)
    try:
        with pytest.raises(ServiceUnavailable) as caught:
            await upstream.send("GET", "/v1/models")
    finally:
        await upstream.close()
    assert caught.value.message == "The model server is unreachable (ConnectFailed)."


# StreamThrough cut by the stop


class FakeStream:
    """An upstream SSE body, for StreamThrough: its chunks, then its end."""

    def __init__(self, chunks: list[bytes]) -> None:
        self.status = 200
        self.headers = {"content-type": "text/event-stream"}
        self.content_type = "text/event-stream"
        self._chunks = chunks
        self.released = 0

    async def chunks(self) -> Any:
        for chunk in self._chunks:
            yield chunk

    def release(self) -> None:
        self.released += 1


CHUNK = b'data: {"id":"c1","model":"m","choices":[{"index":0,"delta":{"content":"hi"}}]}\n\n'


async def _never() -> dict[str, Any]:
    """A client that neither sends nor leaves."""
    await asyncio.Event().wait()
    return {}


def stream_task(chunks: list[bytes], send: Any, recorded: Any, ended: list[str]) -> asyncio.Future[None]:
    """A StreamThrough of `chunks` running as the server's task; `ended` gets its outcome."""
    from proxy.forward import StreamThrough
    from proxy.sse import StreamMeter

    stream = StreamThrough(
        upstreamed(FakeStream(chunks)),  # type: ignore[arg-type]
        {"content-type": "text/event-stream"},
        StreamMeter(False),
        lambda outcome, first: ended.append(outcome),
        recorded,
    )
    return asyncio.ensure_future(stream({"type": "http"}, _never, send))  # type: ignore[arg-type]


async def test_a_stream_that_ended_as_the_stop_cancelled_it_keeps_its_outcome_and_sends_nothing_after_its_end() -> None:
    """The pump finished (an answer without [DONE]) in the loop turn where uvicorn's stop cancelled the task:
    the response is complete, so no cut may follow it (uvicorn raises on a body after the end), and its
    outcome is the pump's, not `cancelled`."""
    ended: list[str] = []
    sent: list[dict[str, Any]] = []
    complete = False

    async def send(message: dict[str, Any]) -> None:
        nonlocal complete
        if complete:  # as uvicorn does
            raise RuntimeError("Unexpected ASGI message 'http.response.body' sent, after response already completed.")
        sent.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete = True
            task.cancel()  # the stop's cancellation, in the same turn as the pump's end

    async def recorded() -> None:
        pass

    task = stream_task([CHUNK], send, recorded, ended)
    await asyncio.wait([task])
    assert task.exception() is None
    assert ended == ["ok"]
    assert [m.get("body") for m in sent[1:]] == [CHUNK, b""]


async def test_a_stream_cut_while_its_record_is_written_still_gets_its_last_events() -> None:
    """The answer is complete and recorded; its last events ([DONE]) wait for the record to reach Redis's
    socket when the stop cancels the task: they still go out, then the end, and it stays `ok`."""
    ended: list[str] = []
    sent: list[dict[str, Any]] = []
    waiting = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def recorded() -> None:
        waiting.set()
        await asyncio.Event().wait()  # the write never comes before the stop

    task = stream_task([CHUNK + b"data: [DONE]\n\n"], send, recorded, ended)
    await waiting.wait()
    task.cancel()  # the stop, past its grace
    await asyncio.wait([task])
    assert task.exception() is None
    assert ended == ["ok"]
    bodies = [m.get("body") for m in sent[1:]]
    assert bodies[-1] == b"" and bodies[-2].endswith(b"data: [DONE]\n\n") and b"shutting_down" not in b"".join(bodies)
