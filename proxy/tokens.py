"""Token estimates: for sizing a reservation, and for requests whose upstream never reported usage.

Sizing a reservation happens on every request, so it uses the rule of thumb of four characters a
token (the reservation is settled later with the real usage). A usage the upstream never sent
(a stream cut off or stopped, a provider that omits it) is counted with OpenAI's cl100k_base BPE
through tiktoken, from a local file: nothing is ever downloaded at run time. Without the file the
rule of thumb stands in. Either way the ledger record is marked `estimated`.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger("proxy.tokens")

# The file tiktoken would download for cl100k_base, by the name its cache gives it; LiteLLM ships a copy.
CL100K_CACHE_NAME = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""

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


def prompt_text(payload: dict[str, Any]) -> tuple[str, int]:
    """The prompt's text, and the tokens its framing adds (per chat message, images)."""
    messages = payload.get("messages")
    if isinstance(messages, list):
        parts, extra = [], 3
        for m in messages:
            if not isinstance(m, dict):
                continue
            extra += MESSAGE_OVERHEAD
            content = m.get("content")
            if isinstance(content, str):
                parts.append(content)
            elif isinstance(content, list):
                for part in content:
                    if isinstance(part, dict) and part.get("type") == "text":
                        parts.append(str(part.get("text", "")))
                    elif isinstance(part, dict):
                        extra += IMAGE_TOKENS
        return "\n".join(parts), extra
    for field in ("prompt", "input"):
        value = payload.get(field)
        if isinstance(value, str):
            return value, 0
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            return "\n".join(value), 0
    return "", 1


def _bundled_bpe() -> Path | None:
    """LiteLLM's copy of the cl100k_base file, found without importing LiteLLM."""
    spec = importlib.util.find_spec("litellm")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "litellm_core_utils" / "tokenizers" / CL100K_CACHE_NAME
        if path.is_file():
            return path
    return None


class Tokenizer:
    """Counts tokens with cl100k_base when its file is at hand, else by the rule of thumb."""

    def __init__(self, encoding: Any = None) -> None:
        self._encoding = encoding

    @property
    def exact(self) -> bool:
        return self._encoding is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._encoding is None:
            return text_tokens(len(text))
        return len(self._encoding.encode_ordinary(text))

    def prompt(self, payload: dict[str, Any]) -> int:
        text, extra = prompt_text(payload)
        return self.count(text) + extra

    @classmethod
    def load(cls, configured: str = "") -> "Tokenizer":
        """From TOKENIZER_FILE, else LiteLLM's bundled copy. The file is checked against its known hash
        and read directly (tiktoken's own loader would fetch it, or delete a copy it does not trust)."""
        path = Path(configured) if configured else _bundled_bpe()
        if path is None:
            log.info("tokenizer", using="4 characters a token", reason="no cl100k_base file; set TOKENIZER_FILE")
            return cls()
        try:
            import tiktoken

            data = path.read_bytes()
            if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
                raise ValueError("not the cl100k_base file (sha256 differs)")
            ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
            encoding = tiktoken.Encoding(
                name="cl100k_base", pat_str=CL100K_PATTERN, mergeable_ranks=ranks,
                special_tokens={"<|endoftext|>": 100257, "<|fim_prefix|>": 100258, "<|fim_middle|>": 100259,
                                "<|fim_suffix|>": 100260, "<|endofprompt|>": 100276},
            )  # fmt: skip
        except (OSError, ValueError, ImportError) as exc:
            log.warning("tokenizer", using="4 characters a token", file=str(path), error=str(exc))
            return cls()
        return cls(encoding)
