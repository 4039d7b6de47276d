"""Reading usage out of an OpenAI-style SSE stream while passing it through."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from .usage import output_parts, usage_totals


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
