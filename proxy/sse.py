"""Reading usage out of an OpenAI-style SSE stream while passing it through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

# The ledger's token columns are PostgreSQL integers. No real answer comes near this; a count outside
# 0..MAX_COUNT is a broken (or hostile) upstream, whose request is estimated like one without usage, so that
# a negative count hands nobody tokens back and a huge one neither breaks the record nor the counters.
MAX_COUNT = 2**31 - 1


def usage_totals(usage: Any) -> tuple[int, int, int] | None:
    """(prompt, completion, total) from an OpenAI `usage` object; None when it holds no usable counts
    (none at all, nulls or zeros: every request has a prompt).

    Some upstreams report total_tokens as 0 for embeddings while counting prompt tokens,
    so the total is never less than prompt + completion.
    """
    if not isinstance(usage, dict):
        return None
    try:
        prompt = int(usage.get("prompt_tokens") or 0)
        completion = int(usage.get("completion_tokens") or 0)
        total = max(int(usage.get("total_tokens") or 0), prompt + completion)
    except (TypeError, ValueError, OverflowError):
        return None  # not counts: the request is estimated instead
    if min(prompt, completion) < 0 or total > MAX_COUNT or total == 0:  # no request costs nothing: not counted
        return None
    return prompt, completion, total


def answer_text(response: dict[str, Any]) -> str:
    """Everything a (non-streamed) completion generated, for counting when usage is missing: each choice's
    message (its text, reasoning, refusal, tool and function calls; see `output_parts`), or its `text`."""
    parts: list[str] = []
    for choice in response.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            if isinstance(message, dict):
                output_parts(message, parts)
            elif isinstance(text := choice.get("text"), str):
                parts.append(text)
    return "".join(parts)


def output_parts(message: dict[str, Any], parts: list[str]) -> None:
    """Append to `parts` every string the model generated in a message or a stream's delta.

    An estimate counts what the client received, and an answer need not be text: a forced tool call
    streams its JSON in `tool_calls[].function.arguments` (legacy: `function_call`), reasoning models
    through LiteLLM stream their thinking in `reasoning_content` (OpenRouter: `reasoning`; one or the
    other, never both, as they carry the same text), a refusal comes in `refusal`, and an audio answer's
    words in `audio.transcript`. Left out on purpose: ids, roles and `thinking_blocks` (LiteLLM's copy of
    `reasoning_content`, with a signature).

    One pass over the message's few keys, skipping the nulls LiteLLM sends for every field it has
    (`tool_calls`, `function_call`, `audio`, ...), nothing serialised again: `StreamMeter` runs it on every
    chunk's delta (a call instead of the loop inlined measured +0.1 to +0.3 µs a chunk, bench/meter_bench.py).
    """
    for key, value in message.items():
        if value is None:
            continue
        if key == "content":
            if isinstance(value, str):
                parts.append(value)
        elif key != "role":
            _other_output(message, key, value, parts)


def _other_output(message: dict[str, Any], key: str, value: Any, parts: list[str]) -> None:
    """Output in a field other than `content` (unknown fields, `thinking_blocks` among them, are ignored)."""
    if isinstance(value, str):
        if key == "reasoning_content" or key == "refusal":
            parts.append(value)
        elif key == "reasoning" and not isinstance(message.get("reasoning_content"), str):
            parts.append(value)
    elif key == "tool_calls":
        for call in value if isinstance(value, list) else ():
            if isinstance(call, dict):
                _call_parts(call.get("function"), parts)
    elif key == "function_call":
        _call_parts(value, parts)
    elif key == "audio" and isinstance(value, dict) and isinstance(transcript := value.get("transcript"), str):
        parts.append(transcript)


def _call_parts(function: Any, parts: list[str]) -> None:
    """A function call's name and arguments (a stream sends the name once, then the arguments in pieces)."""
    if isinstance(function, dict):
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str):
            parts.append(name)
        if isinstance(arguments, str):
            parts.append(arguments)


class StreamMeter:
    """Feeds on upstream bytes and returns the bytes to send on, event by event.

    It records the usage chunk and everything the answer streamed (text, reasoning, tool calls: for an
    estimate when the stream ends without usage). When the proxy itself asked for `include_usage`, it hides
    that extra chunk so the client sees the stream shape it asked for.
    """

    __slots__ = ("hide_usage", "usage", "model", "done", "_parts", "_buf", "_on_usage", "_id", "_notice")

    def __init__(self, hide_usage: bool, on_usage: Callable[[dict[str, Any]], str | None] | None = None) -> None:
        self.hide_usage = hide_usage
        # Given the usage, may return text to add to the answer as a last content delta before [DONE].
        self._on_usage = on_usage
        self._id: str | None = None
        self._notice: bytes | None = None
        self.usage: dict[str, Any] | None = None
        self.model: str | None = None  # the model that served the stream, as the chunks name it
        self._parts: list[str] = []  # the answer's output, for counting when no usage arrives
        self.done = False  # [DONE] went through: the client has the whole answer
        self._buf = b""

    def feed(self, chunk: bytes) -> bytes:
        data = self._buf + chunk if self._buf else chunk
        if b"\r\n" in data:
            data = data.replace(b"\r\n", b"\n")
        end = data.rfind(b"\n\n")
        if end < 0:
            self._buf = data
            return b""
        self._buf = data[end + 2 :]
        events = data[: end + 2].split(b"\n\n")[:-1]
        out = [e for e in (self._event(e) for e in events) if e is not None]
        return b"\n\n".join(out) + b"\n\n" if out else b""

    def flush(self) -> bytes:
        """Whatever trailing bytes the upstream sent without a closing blank line."""
        rest, self._buf = self._buf, b""
        return rest

    @property
    def text(self) -> str:
        return "".join(self._parts)

    def _event(self, event: bytes) -> bytes | None:
        data_at = event.find(b"data:")
        if data_at < 0:
            return event
        payload = event[data_at + 5 :].strip()
        if not payload.startswith(b"{"):
            if payload == b"[DONE]":
                self.done = True
                if self._notice is not None:
                    event, self._notice = self._notice + b"\n\n" + event, None
            return event  # [DONE] or a comment
        try:
            obj = orjson.loads(payload)
        except orjson.JSONDecodeError:
            return event
        if not isinstance(obj, dict):
            return event
        if self.model is None and isinstance(obj.get("model"), str):
            self.model = obj["model"]
        if self._id is None and isinstance(obj.get("id"), str):
            self._id = obj["id"]
        parts = self._parts
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta")
                if isinstance(delta, dict):  # chat: every choice's generated output, not only its content
                    output_parts(delta, parts)
                elif isinstance(text := choice.get("text"), str):  # /v1/completions
                    parts.append(text)
        usage = obj.get("usage")
        if usage is None:
            return event
        if self.usage is None or usage_totals(usage) is not None:  # an empty one after counts changes nothing
            self.usage = usage
        if self._on_usage is not None and isinstance(usage, dict):
            text = self._on_usage(usage)
            if text:
                self._notice = self._content_chunk(text)
        if not self.hide_usage:
            return event
        if not obj.get("choices") or all(_empty_choice(c) for c in obj["choices"]):
            return None
        del obj["usage"]
        return event[:data_at] + b"data: " + orjson.dumps(obj)

    def _content_chunk(self, text: str) -> bytes:
        chunk = {
            "id": self._id or "quota-notice",
            "object": "chat.completion.chunk",
            "model": self.model,
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
        }
        return b"data: " + orjson.dumps(chunk)


def _empty_choice(choice: Any) -> bool:
    return isinstance(choice, dict) and not choice.get("delta") and choice.get("finish_reason") is None
