"""Token counts the budget can rely on: an upper bound of a request's prompt, and usage an upstream never reported.

The prompt is counted before a token is reserved, and the count must never be lower than what
the model will bill, or a user could reserve little and spend much. Every part of a body that
can reach the model is counted: each message's every field, every content part (an image at the
most a high-detail image costs), token arrays token for token, and any other field (tools,
functions, response_format, prediction, ...) as its JSON text. Text is counted with OpenAI's
cl100k_base BPE through tiktoken, from a local file (nothing is ever downloaded at run time),
with one token of margin per piece for the joins; without the file, one token per UTF-8 byte,
which no BPE exceeds. The same bound stands in for a usage the upstream never sent (a stream
cut off, a provider that omits it); the ledger record is then marked `estimated`.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import structlog

log = structlog.get_logger("proxy.tokens")

# The file tiktoken would download for cl100k_base, by the name its cache gives it; LiteLLM ships a copy.
CL100K_CACHE_NAME = "9b5ad71b2ce5302211f9c61530b329a4922fc6a4"
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"
CL100K_PATTERN = r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""  # noqa: E501 (tiktoken's regex, kept whole)

PRIMING = 3  # <|im_start|>assistant<|im_sep|> that starts every chat answer
MESSAGE_OVERHEAD = 4  # <|im_start|>, separators and <|im_end|> of one chat message, plus one of margin
# The most one image costs on OpenAI's GPT-4o-class models: high detail, 8 tiles of 512 px (85 + 8 x 170).
IMAGE_TOKENS = 1445
IMAGE_PARTS = frozenset({"image_url", "input_image"})
# Body fields that set how the model answers but never reach it as text.
NOT_PROMPT = frozenset(
    {
        "model",
        "user",
        "stream",
        "stream_options",
        "n",
        "best_of",
        "max_tokens",
        "max_completion_tokens",
        "temperature",
        "top_p",
        "top_k",
        "min_p",
        "frequency_penalty",
        "presence_penalty",
        "repetition_penalty",
        "seed",
        "logprobs",
        "top_logprobs",
        "echo",
        "logit_bias",
        "parallel_tool_calls",
        "service_tier",
        "store",
        "modalities",
        "reasoning_effort",
        "verbosity",
        "encoding_format",
        "dimensions",
        "include_reasoning",
        "prompt_cache_key",
        "safety_identifier",
    }
)

Count = Callable[[str], int]
_SHORT, _SHORT_CACHE = 64, 10_000


def _json(value: Any, count: Count) -> int:
    return count(orjson.dumps(value).decode()) + 1


def _text(value: str, count: Count) -> int:
    return count(value) + 1  # one of margin: pieces joined can tokenize across the join


def _content(content: Any, count: Count) -> int:
    if isinstance(content, str):
        return _text(content, count)
    if content is None:
        return 0
    if not isinstance(content, list):
        return _json(content, count)
    total = 0
    for part in content:
        if isinstance(part, str):
            total += _text(part, count)
        elif isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
            total += _text(part["text"], count)
        elif isinstance(part, dict) and part.get("type") in IMAGE_PARTS:
            total += IMAGE_TOKENS
        else:  # audio, files and parts not known yet: all of their text, data included
            total += _json(part, count)
    return total


def _messages(messages: Any, count: Count) -> int:
    if not isinstance(messages, list):
        return _json(messages, count)
    total = PRIMING
    for message in messages:
        if not isinstance(message, dict):
            total += _json(message, count)
            continue
        total += MESSAGE_OVERHEAD
        for key, value in message.items():
            if key == "content":
                total += _content(value, count)
            elif key == "images" and isinstance(value, list):  # an assistant's images, sent back as media
                total += IMAGE_TOKENS * len(value)
            elif isinstance(value, str):
                total += _text(value, count)  # role, name, tool_call_id, refusal
            elif value is not None:
                total += _json(value, count)  # tool_calls, function_call, audio, ...
    return total


def _inputs(value: Any, count: Count) -> int:
    """`prompt` or `input`: a string, strings, a token array or token arrays."""
    if isinstance(value, str):
        return _text(value, count)
    if isinstance(value, int):
        return 1
    if not isinstance(value, list):
        return _json(value, count)
    total = 0
    for item in value:
        if isinstance(item, str):
            total += _text(item, count)
        elif isinstance(item, int):
            total += 1  # a token id is one token
        elif isinstance(item, list):
            total += len(item)  # a token array: checked to hold token ids before it gets here
        else:
            total += _json(item, count)
    return total


def prompt_bound(payload: dict[str, Any], count: Count) -> int:
    """Tokens the prompt of a chat, completion or embedding body costs at most."""
    total = 0
    for key, value in payload.items():
        if key in NOT_PROMPT:
            continue
        if key == "messages":
            total += _messages(value, count)
        elif key in ("prompt", "input"):
            total += _inputs(value, count)
        elif value is not None:
            total += _json(value, count)  # tools, functions, response_format, prediction, suffix, stop, ...
    return max(total, 1)


def _bundled_bpe() -> Path | None:
    """LiteLLM's copy of the cl100k_base file, found without importing LiteLLM."""
    spec = importlib.util.find_spec("litellm")
    for root in (spec.submodule_search_locations or []) if spec else []:
        path = Path(root) / "litellm_core_utils" / "tokenizers" / CL100K_CACHE_NAME
        if path.is_file():
            return path
    return None


class Tokenizer:
    """Counts tokens with cl100k_base when its file is at hand, else one per byte (never fewer than BPE)."""

    def __init__(self, encoding: Any = None) -> None:
        self._encoding = encoding
        # Roles, names and short prompts come back again and again; a lookup is a tenth of a BPE call.
        self._short: dict[str, int] = {}

    @property
    def exact(self) -> bool:
        return self._encoding is not None

    def count(self, text: str) -> int:
        if not text:
            return 0
        if self._encoding is None:
            return len(text.encode("utf-8", "surrogatepass"))  # no BPE token is shorter than one byte
        if len(text) > _SHORT:
            return len(self._encoding.encode_ordinary(text))
        known = self._short.get(text)
        if known is None:
            if len(self._short) >= _SHORT_CACHE:
                self._short.clear()
            known = self._short[text] = len(self._encoding.encode_ordinary(text))
        return known

    def prompt(self, payload: dict[str, Any]) -> int:
        """An upper bound of the body's prompt tokens (see the module's docstring)."""
        return prompt_bound(payload, self.count)

    @classmethod
    def load(cls, configured: str = "") -> Tokenizer:
        """From TOKENIZER_FILE, else LiteLLM's bundled copy. The file is checked against its known hash
        and read directly (tiktoken's own loader would fetch it, or delete a copy it does not trust)."""
        path = Path(configured) if configured else _bundled_bpe()
        if path is None:
            log.info("tokenizer", using="one token per byte", reason="no cl100k_base file; set TOKENIZER_FILE")
            return cls()
        try:
            return cls(_encoding(path, path.stat().st_mtime_ns))
        except (OSError, ValueError, ImportError) as exc:
            log.warning("tokenizer", using="one token per byte", file=str(path), error=str(exc))
            return cls()


# Building the encoding takes about half a second; every app a process starts (tests start dozens)
# shares one per file and version of it.
@functools.lru_cache(maxsize=4)
def _encoding(path: Path, mtime_ns: int) -> Any:
    import tiktoken

    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != CL100K_SHA256:
        raise ValueError("not the cl100k_base file (sha256 differs)")
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in data.splitlines() if line)}
    return tiktoken.Encoding(
        name="cl100k_base",
        pat_str=CL100K_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={
            "<|endoftext|>": 100257,
            "<|fim_prefix|>": 100258,
            "<|fim_middle|>": 100259,
            "<|fim_suffix|>": 100260,
            "<|endofprompt|>": 100276,
        },
    )
