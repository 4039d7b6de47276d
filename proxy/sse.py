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
    """(prompt, completion, total) from an OpenAI `usage` object; None when it holds no usable counts.

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
    if min(prompt, completion) < 0 or total > MAX_COUNT:
        return None
    return prompt, completion, total


def answer_text(response: dict[str, Any]) -> str:
    """The answer text of a (non-streamed) completion, for counting when usage is missing."""
    parts = []
    for choice in response.get("choices") or ():
        if isinstance(choice, dict):
            message = choice.get("message")
            text = message.get("content") if isinstance(message, dict) else choice.get("text")
            if isinstance(text, str):
                parts.append(text)
    return "".join(parts)


class StreamMeter:
    """Feeds on upstream bytes and returns the bytes to send on, event by event.

    It records the usage chunk and the amount of text streamed (for an estimate when the
    stream ends without usage). When the proxy itself asked for `include_usage`, it hides
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
        self._parts: list[str] = []  # the answer text, for counting when no usage arrives
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
        for choice in obj.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta") or {}
                content = delta.get("content") if isinstance(delta, dict) else None
                text = content if isinstance(content, str) else choice.get("text")
                if isinstance(text, str):
                    self._parts.append(text)
        usage = obj.get("usage")
        if usage is None:
            return event
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
