"""A completion request's body: checked field by field, sized, and shaped for the upstream.

All of it happens before a token is reserved: a body that cannot be forwarded is refused with a
400 naming its field, and nothing is held for it. Only OpenAI's parameters (and the few provider
extras LiteLLM passes on, plus EXTRA_BODY_PARAMS) go upstream; LiteLLM's own control parameters
would run under the master key (another api_base, a mock answer, a caller's api_key) and are
refused whatever the configuration says.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
from starlette.requests import ClientDisconnect, Request

from .config import DEFAULT_SUBJECT
from .errors import BadRequest, ClientClosed, PayloadTooLarge, RequestTimeout
from .parts import bounded_image, bounded_part

# Parameters chat and completions share; then each endpoint's own (OpenAI's API reference).
_GENERATION = frozenset(
    "model stream stream_options n max_tokens temperature top_p frequency_penalty presence_penalty seed stop"
    " logit_bias logprobs user top_k min_p repetition_penalty".split()
)
_CHAT = _GENERATION | set(
    "messages max_completion_tokens top_logprobs tools tool_choice parallel_tool_calls functions function_call"
    " response_format modalities audio prediction reasoning_effort verbosity service_tier store prompt_cache_key"
    " safety_identifier"
    # Provider extras LibreChat sends through LiteLLM (Anthropic, OpenRouter).
    " thinking reasoning include_reasoning".split()
)
_COMPLETIONS = _GENERATION | {"prompt", "best_of", "echo", "suffix"}
_EMBEDDINGS = {"model", "input", "dimensions", "encoding_format", "user"}
OPENAI_PARAMS: dict[str, frozenset[str]] = {
    "chat": frozenset(_CHAT),
    "completions": frozenset(_COMPLETIONS),
    "embeddings": frozenset(_EMBEDDINGS),
}
# Not among them: web_search_options, whose search results the model is billed for as prompt tokens
# that no reservation can bound (EXTRA_BODY_PARAMS can allow it, outside the bound).
# LiteLLM reads these from a request body and acts on them with the proxy's master key.
LITELLM_CONTROL = frozenset(
    {
        "api_key",
        "api_base",
        "base_url",
        "api_version",
        "api_type",
        "organization",
        "user_config",
        "metadata",
        "mock_response",
        "mock_tool_calls",
        "mock_timeout",
        "fallbacks",
        "context_window_fallbacks",
        "content_policy_fallbacks",
        "num_retries",
        "max_retries",
        "timeout",
        "request_timeout",
        "caching",
        "cache",
        "no-log",
        "custom_llm_provider",
        "model_list",
        "deployment_id",
        "extra_headers",
        "extra_body",
        "headers",
        "input_cost_per_token",
        "output_cost_per_token",
        "input_cost_per_second",
        "output_cost_per_second",
        "region_name",
        "tags",
        "guardrails",
        "proxy_server_request",
        "secret_fields",
        "azure_ad_token",
    }
)
_CONTROL_PREFIXES = ("litellm", "aws_", "vertex_", "azure_", "mock_")

MAX_CHOICES = 128  # OpenAI's own limit on `n`
MAX_BEST_OF = 20
MAX_CAP = 10_000_000
MAX_TOKEN_ID = 2**31 - 1
MAX_INPUTS = 2048  # OpenAI's limit on the items of one embeddings or completions request
MAX_ID = 256


async def read_json(request: Request, max_bytes: int, timeout: float) -> tuple[dict[str, Any], int]:
    """The request body as a JSON object and its size, refusing oversized bodies before reading them whole
    and bodies that stall (408; the connection is then closed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"Request body is larger than the limit of {max_bytes:,} bytes.")
    chunks: list[bytes] = []
    size = 0
    # A timer of the loop's own: asyncio.timeout() costs several times more, on every request.
    task = asyncio.current_task()
    assert task is not None
    expired: list[bool] = []
    timer = asyncio.get_running_loop().call_later(timeout, _expire, task, expired)
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"Request body is larger than the limit of {max_bytes:,} bytes.")
            chunks.append(chunk)
    except ClientDisconnect:
        raise ClientClosed("The client closed the connection before its request body arrived.") from None
    except asyncio.CancelledError:
        if not expired:
            raise
        task.uncancel()
        raise RequestTimeout(
            f"The request body did not arrive within {timeout:g} s.", headers={"Connection": "close"}
        ) from None
    finally:
        timer.cancel()
    body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
    try:
        payload = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"Request body is not valid JSON: {exc}.", code="invalid_json") from None
    if not isinstance(payload, dict):
        raise BadRequest("Request body must be a JSON object.", code="invalid_json")
    return payload, size


def _expire(task: asyncio.Task[Any], expired: list[bool]) -> None:
    expired.append(True)
    task.cancel()


def is_control(name: str) -> bool:
    return name in LITELLM_CONTROL or name.startswith(_CONTROL_PREFIXES)


def allowed_params(endpoint: str, extra: tuple[str, ...]) -> frozenset[str]:
    """The body fields that pass upstream for an endpoint; EXTRA_BODY_PARAMS never opens a control parameter."""
    return OPENAI_PARAMS[endpoint] | {name for name in extra if not is_control(name)}


def printable_id(value: Any, name: str, *, limit: int = MAX_ID) -> str:
    """A user, tenant or request id as it may be stored and shown: printable, without NUL, of bounded length."""
    if not isinstance(value, str) or not value or len(value) > limit or not value.isprintable():
        raise BadRequest(f"'{name}' must be printable text of 1 to {limit} characters.", param=name)
    return value


def user_id(value: Any, name: str) -> str:
    """A user an admin names: a printable id, never '*' (the default budget's, changed with `budget set '*'`)."""
    user = printable_id(value, name)
    if user == DEFAULT_SUBJECT:
        raise BadRequest(f"'{name}' is '*', the default budget's name, not a user.", param=name)
    return user


def _int(payload: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise BadRequest(f"'{name}' must be a whole number from {low:,} to {high:,}.", param=name)
    return value


def _number(payload: dict[str, Any], name: str) -> None:
    value = payload.get(name)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ):
        raise BadRequest(f"'{name}' must be a number.", param=name)


def _kind(payload: dict[str, Any], name: str, kinds: tuple[type, ...], what: str) -> None:
    value = payload.get(name)
    if value is not None and not isinstance(value, kinds):
        raise BadRequest(f"'{name}' must be {what}.", param=name)


def _stream_options(payload: dict[str, Any], name: str) -> None:
    options = payload[name]
    if options is not None and (
        not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool)
    ):
        raise BadRequest("'stream_options' must be an object; its 'include_usage' true or false.", param=name)


def _strings(payload: dict[str, Any], name: str) -> None:
    value = payload[name]
    if value is not None and not isinstance(value, str):
        if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
            raise BadRequest(f"'{name}' must be a string or a list of strings.", param=name)


def _objects(payload: dict[str, Any], name: str) -> None:
    value = payload[name]
    if value is not None and (not isinstance(value, list) or not all(isinstance(t, dict) for t in value)):
        raise BadRequest(f"'{name}' must be a list of objects.", param=name)


def _object(payload: dict[str, Any], name: str) -> None:
    _kind(payload, name, (dict,), "an object")


def _ranged(low: int, high: int) -> Callable[[dict[str, Any], str], object]:
    return lambda payload, name: _int(payload, name, low, high)


# Checked when present; `model`, `stream`, the caps, `n`, `best_of` and the prompt are checked below.
_FIELD_CHECKS: dict[str, Callable[[dict[str, Any], str], object]] = {
    **dict.fromkeys(
        ("temperature", "top_p", "frequency_penalty", "presence_penalty", "min_p", "repetition_penalty"), _number
    ),
    "seed": _ranged(-(2**63), 2**63 - 1),
    "top_k": _ranged(0, 1_000_000),
    "dimensions": _ranged(1, 1_000_000),
    "stream_options": _stream_options,
    "tools": _objects,
    "functions": _objects,
    "response_format": _object,
    "logit_bias": _object,
    "stop": _strings,
}


def _token_ids(items: list[Any], name: str) -> None:
    for token in items:
        if not isinstance(token, int) or isinstance(token, bool) or not 0 <= token <= MAX_TOKEN_ID:
            raise BadRequest(f"'{name}' token arrays must hold token ids (whole numbers from 0).", param=name)


def _inputs(payload: dict[str, Any], name: str) -> int:
    """Check a `prompt` or `input`: a string, strings, a token array or token arrays. Returns how many inputs."""
    value = payload.get(name)
    what = f"'{name}' must be a string, a list of strings, a token array or a list of token arrays."
    if isinstance(value, str):
        return 1
    if not isinstance(value, list) or not value:
        raise BadRequest(what, param=name)
    if len(value) > MAX_INPUTS:
        raise BadRequest(f"'{name}' may hold at most {MAX_INPUTS:,} items.", param=name)
    if all(isinstance(v, str) for v in value):
        return len(value)
    if all(isinstance(v, list) for v in value):
        for item in value:
            if not item:
                raise BadRequest(what, param=name)
            _token_ids(item, name)
        return len(value)
    _token_ids(value, name)  # one token array
    return 1


def _messages(payload: dict[str, Any]) -> None:
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list of messages.", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"'messages[{i}]' must be an object with a 'role' string.", param=f"messages[{i}]")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise BadRequest(
                f"'messages[{i}].content' must be a string or a list of parts.", param=f"messages[{i}].content"
            )
        if isinstance(content, list) and not all(bounded_part(p) for p in content):
            raise BadRequest(
                f"'messages[{i}].content' parts must be text (a 'text' string), image_url (an http(s) or"
                " data:image/ URL, an image format if any), file or input_audio (with their data inline, not a"
                " file_id or a URL) or refusal parts.",
                param=f"messages[{i}].content",
            )
        images = message.get("images")  # LiteLLM's field for generated images, sent back as media on Gemini
        if images is not None and not (
            isinstance(images, list) and all(isinstance(m, dict) and bounded_image(m.get("image_url")) for m in images)
        ):
            raise BadRequest(
                f"'messages[{i}].images' must be a list of objects whose 'image_url' is an http(s) or data:image/ URL.",
                param=f"messages[{i}].images",
            )
        if message.get("tool_calls") is not None and not isinstance(message["tool_calls"], list):
            raise BadRequest(f"'messages[{i}].tool_calls' must be a list.", param=f"messages[{i}].tool_calls")


@dataclass(slots=True)
class Completion:
    """A checked request: what it may cost, and its upstream body."""

    endpoint: str
    payload: dict[str, Any]
    model: str
    stream: bool
    choices: int  # answers the upstream writes (n, best_of, and one per prompt): each up to the cap
    cap: int | None  # the caller's own cap on each answer, if any
    hide_usage: bool  # the proxy asked for the stream's usage chunk, so the caller does not see it


def check(payload: dict[str, Any], endpoint: str, allowed: frozenset[str]) -> Completion:
    """Refuse a body that is not a well-formed OpenAI request for `endpoint` (400 naming the field)."""
    unknown = [name for name in payload if name not in allowed]
    if unknown:
        control = [name for name in unknown if is_control(name)]
        if control:
            raise BadRequest(
                f"Field(s) {', '.join(sorted(control))} are gateway settings the proxy does not pass on.",
                param=sorted(control)[0],
                code="unsupported_parameter",
            )
        raise BadRequest(
            f"Unknown field(s) for this endpoint: {', '.join(sorted(unknown)[:10])}.",
            param=sorted(unknown)[0],
            code="unsupported_parameter",
        )
    for name in payload:  # only the fields present: most bodies carry three or four
        field_check = _FIELD_CHECKS.get(name)
        if field_check is not None:
            field_check(payload, name)
    model = payload.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("Request body needs a 'model' string.", param="model", code="missing_model")
    printable_id(model, "model")
    stream = payload.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise BadRequest("'stream' must be true or false.", param="stream")
    options = payload.get("stream_options")

    choices = _int(payload, "n", 1, MAX_CHOICES) or 1
    if endpoint == "chat":
        _messages(payload)
    elif endpoint == "completions":
        best_of = _int(payload, "best_of", 1, MAX_BEST_OF)
        if best_of is not None and best_of < choices:
            raise BadRequest("'best_of' must be at least 'n'.", param="best_of")
        # Every prompt of a list gets its own answers, and best_of of them are written, n returned.
        choices = max(choices, best_of or 1) * _inputs(payload, "prompt")
    else:
        _inputs(payload, "input")
        if stream:
            raise BadRequest("Embeddings are not streamed: leave 'stream' out.", param="stream")
    caps = [c for c in (_int(payload, f, 1, MAX_CAP) for f in ("max_tokens", "max_completion_tokens")) if c]
    hide_usage = False
    if stream and not (isinstance(options, dict) and options.get("include_usage") is True):
        # The usage chunk is how a stream's cost is known: ask for it, and hide it from a caller who did not.
        payload["stream_options"] = {**(options or {}), "include_usage": True}
        hide_usage = True
    return Completion(endpoint, payload, model, stream, choices, min(caps) if caps else None, hide_usage)


def cap_answers(completion: Completion, per_answer: int) -> None:
    """Cap every answer at `per_answer` tokens: each cap field the caller set, else `max_tokens`."""
    payload = completion.payload
    present = [f for f in ("max_tokens", "max_completion_tokens") if payload.get(f) is not None]
    for field in present or ["max_tokens"]:
        payload[field] = min(payload.get(field) or per_answer, per_answer)


def encode(payload: dict[str, Any]) -> bytes:
    """The upstream body; refused here, before any reservation, when JSON cannot carry it."""
    try:
        return orjson.dumps(payload)
    except orjson.JSONEncodeError as exc:
        raise BadRequest(
            f"Request body cannot be forwarded: {exc} (nested too deep, or a number out of range)."
        ) from None
