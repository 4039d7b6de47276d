"""What an answer cost in tokens: the upstream's `usage`, checked, and the estimate when it has none.

An estimate counts every piece of output the client received (text, reasoning, tool calls, refusals) in
cl100k_base, on top of the prompt bound that was reserved, and never exceeds what was reserved for the
answers (docs/budgets.md, "The bound").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .tokens import Tokenizer

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
            elif isinstance(value, list):
                _content_parts(value, parts)
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


def _content_parts(content: list[Any], parts: list[str]) -> None:
    """Content as a list of parts, as some providers answer through LiteLLM: each part's `text` or
    `refusal`, and the text inside a `thinking` part (Mistral's reasoning models nest it as a list)."""
    for part in content:
        if isinstance(part, dict):
            for key in ("text", "refusal"):
                if isinstance(text := part.get(key), str):
                    parts.append(text)
            if isinstance(thinking := part.get("thinking"), list):
                _content_parts(thinking, parts)
            elif isinstance(thinking, str):
                parts.append(thinking)


def _call_parts(function: Any, parts: list[str]) -> None:
    """A function call's name and arguments (a stream sends the name once, then the arguments in pieces)."""
    if isinstance(function, dict):
        name, arguments = function.get("name"), function.get("arguments")
        if isinstance(name, str):
            parts.append(name)
        if isinstance(arguments, str):
            parts.append(arguments)


@dataclass(frozen=True, slots=True)
class Estimate:
    """What a request is charged when the upstream reports no usable usage: its prompt bound, as reserved,
    and its answer's output counted in cl100k_base, at most `most` tokens.

    `most` is what the upstream was allowed to write: the answers times each answer's cap as sent. With the
    proxy clamping answers (CLAMP_MAX_TOKENS, the default), prompt + most never exceeds the reservation, so
    an estimate cannot push any budget it was reserved against (the user's, the tenant's, a model cap's)
    past what it held for the request: cl100k may count an answer in the model's own tokens several times
    over (a character it spends 4 tokens on can be 1 of the model's). The upstream's own usage is never
    capped. None: the proxy capped no answer (CLAMP_MAX_TOKENS=false, an exempt model), so the answer's
    length is the model's own and nothing bounds it; the estimate then charges what was delivered, as the
    upstream's usage would, rather than letting a hang-up make the rest of a long answer free.
    """

    prompt: int
    most: int | None

    def of(self, answer: str, tokens: Tokenizer) -> tuple[int, int, int]:
        completion = tokens.count(answer)
        if self.most is not None and completion > self.most:
            completion = self.most
        return self.prompt, completion, self.prompt + completion
