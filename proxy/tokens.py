"""Token estimates for the reservation and for requests whose upstream never reported usage.

The estimate only sizes a reservation (settled later with the real usage) or fills in for a
usage the upstream never sent, in which case the record is marked `estimated`. Four characters
a token is the usual rule of thumb for English text with OpenAI's tokenizers; it needs no
tokenizer files, so nothing is downloaded at run time.
"""

from __future__ import annotations

from typing import Any

CHARS_PER_TOKEN = 4
MESSAGE_OVERHEAD = 4  # role and separators, per chat message
IMAGE_TOKENS = 765  # a high-detail 1024x1024 image on OpenAI's vision models


def text_tokens(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


def _content_tokens(content: Any) -> int:
    if isinstance(content, str):
        return text_tokens(len(content))
    if isinstance(content, list):
        total = 0
        for part in content:
            if isinstance(part, dict):
                if part.get("type") == "text":
                    total += text_tokens(len(str(part.get("text", ""))))
                elif part.get("type") in ("image_url", "input_image"):
                    total += IMAGE_TOKENS
            elif isinstance(part, str):
                total += text_tokens(len(part))
        return total
    if content is None:
        return 0
    return text_tokens(len(str(content)))


def estimate_prompt(payload: dict[str, Any]) -> int:
    """Prompt tokens of a chat, completion or embedding request body."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        total = 3
        for m in messages:
            if isinstance(m, dict):
                total += MESSAGE_OVERHEAD + _content_tokens(m.get("content"))
                if m.get("tool_calls"):
                    total += text_tokens(len(str(m["tool_calls"])))
        if payload.get("tools"):
            total += text_tokens(len(str(payload["tools"])))
        return total
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, list):
            return max(1, sum(_content_tokens(v) if not isinstance(v, int) else 1 for v in value))
        if value is not None:
            return max(1, _content_tokens(value))
    return 1


def completion_cap(payload: dict[str, Any]) -> tuple[str, int | None]:
    """The field that caps the answer's length, and its value if the caller set one."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = payload.get(field)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return field, value
    return "max_tokens", None
