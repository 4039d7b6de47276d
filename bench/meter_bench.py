"""What metering a stream costs: a 200-chunk answer fed through StreamMeter, as OpenAI sends it and as
LiteLLM sends it (every delta field present, most of them null), one network read per event. Also a
stream of tool-call arguments and one of reasoning text, the answers an estimate must count too.

Run from the repository root: `python bench/meter_bench.py` (µs per stream and per chunk, best of rounds).
"""

from __future__ import annotations

import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402

from proxy.sse import StreamMeter  # noqa: E402

CHUNKS = 200
ROUNDS = 15  # the best of each kept: the machine's other load only ever adds
NUMBER = 200
WORDS = "the quick brown fox jumps over a lazy dog while we count tokens".split()


def _event(delta: dict[str, object], litellm: bool) -> bytes:
    choice: dict[str, object] = {"index": 0, "delta": delta}
    body: dict[str, object] = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "gpt-4o"}
    if litellm:  # LiteLLM's ModelResponseStream, as it serialises a content delta
        delta = {"provider_specific_fields": None, **delta, "role": "assistant"}
        delta.update(function_call=None, tool_calls=None, audio=None)
        choice = {"finish_reason": None, "index": 0, "delta": delta, "logprobs": None}
        body.update(system_fingerprint=None, provider_specific_fields=None)
    body["choices"] = [choice]
    return b"data: " + orjson.dumps(body) + b"\n\n"


def stream(kind: str, litellm: bool = False) -> list[bytes]:
    reads = []
    for i in range(CHUNKS):
        word = WORDS[i % len(WORDS)] + " "
        if kind == "content":
            delta: dict[str, object] = {"content": word}
        elif kind == "reasoning":
            delta = {"content": None, "reasoning_content": word}
        else:
            call = {"index": 0, "function": {"arguments": orjson.dumps(word).decode()}}
            delta = {"content": None, "tool_calls": [call]}
        reads.append(_event(delta, litellm))
    usage = {"prompt_tokens": 10, "completion_tokens": CHUNKS, "total_tokens": CHUNKS + 10}
    reads.append(b"data: " + orjson.dumps({"id": "chatcmpl-1", "choices": [], "usage": usage}) + b"\n\n")
    reads.append(b"data: [DONE]\n\n")
    return reads


def run(reads: list[bytes]) -> None:
    meter = StreamMeter(hide_usage=True)
    for read in reads:
        meter.feed(read)
    assert meter.usage is not None


if __name__ == "__main__":
    cases = {
        "content, OpenAI-shaped": stream("content"),
        "content, LiteLLM-shaped": stream("content", litellm=True),
        "tool-call arguments, LiteLLM-shaped": stream("tools", litellm=True),
        "reasoning_content, LiteLLM-shaped": stream("reasoning", litellm=True),
    }
    for name, reads in cases.items():
        best = min(timeit.repeat(lambda r=reads: run(r), number=NUMBER, repeat=ROUNDS)) / NUMBER  # type: ignore[misc]
        print(f"{name:40s} {best * 1e6:8.1f} µs per {CHUNKS}-chunk stream, {best * 1e6 / CHUNKS:5.2f} µs per chunk")
