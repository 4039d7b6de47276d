"""The prompt bound: never below what cl100k_base counts for the same prompt, whatever the body's shape."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.tokens import IMAGE_TOKENS, Tokenizer, _bundled_bpe

TOKENIZER = Tokenizer.load()
ENC = TOKENIZER._encoding  # the same cl100k_base, used directly as the reference
# Hypothesis draws bodies; each is counted twice, so a few hundred examples take a second or two.
PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# cl100k_base has no <|im_start|> or <|im_end|>; its <|endoftext|> is one special token that stands in for both.
START = END = "<|endoftext|>"


def reference_chat(body: dict[str, Any]) -> int:
    """What OpenAI bills for a chat prompt: the messages rendered in ChatML and encoded as one text,
    images at a high-detail image's usual cost, tools and schemas as their JSON text."""
    text = ""
    images = 0
    for m in body["messages"]:
        content = m.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part["type"] == "text":
                    parts.append(part["text"])
                elif part["type"] == "image_url":
                    images += 1
                else:
                    parts.append(orjson.dumps(part).decode())
            content = "".join(parts)
        rest = "".join(
            v if isinstance(v, str) else orjson.dumps(v).decode() for k, v in m.items() if k not in ("role", "content")
        )
        text += f"{START}{m['role']}\n{content or ''}{rest}{END}\n"
    text += f"{START}assistant\n"
    extra = sum(
        len(ENC.encode_ordinary(orjson.dumps(body[k]).decode())) for k in ("tools", "response_format") if k in body
    )
    return len(ENC.encode(text, allowed_special="all")) + images * 765 + extra


def reference_inputs(value: Any) -> int:
    """A completion's prompt(s) or an embedding's input(s): each billed on its own."""
    if isinstance(value, str):
        return len(ENC.encode_ordinary(value))
    if all(isinstance(v, int) for v in value):
        return len(value)
    return sum(reference_inputs(v) for v in value)


text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=300)
words = st.lists(
    st.sampled_from(["hello", " world", "\n", "  ", "123", "naïve", "日本語", "🙂", "'s", "<|im_end|>", "\t"]),
    max_size=40,
).map("".join)
any_text = st.one_of(text, words)
part = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, any_text),
    st.just({"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 2000}}),
    st.builds(lambda d: {"type": "input_audio", "input_audio": {"data": d, "format": "wav"}}, any_text),
    st.builds(lambda t: {"type": "file", "file": {"file_data": t}}, any_text),
    st.builds(lambda t: {"type": "refusal", "refusal": t}, any_text),
)
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
        "content": st.one_of(any_text, st.lists(part, max_size=4), st.none()),
    },
    optional={
        "name": st.text(st.characters(min_codepoint=97, max_codepoint=122), min_size=1, max_size=20),
        "tool_calls": st.lists(
            st.fixed_dictionaries(
                {
                    "id": any_text,
                    "type": st.just("function"),
                    "function": st.fixed_dictionaries({"name": any_text, "arguments": any_text}),
                }
            ),
            max_size=2,
        ),
        "tool_call_id": any_text,
    },
)
json_value = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-(10**6), 10**6), any_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(any_text, inner, max_size=4)),
    max_leaves=20,
)
chat = st.fixed_dictionaries(
    {"model": st.just("m"), "messages": st.lists(message, min_size=1, max_size=6)},
    optional={
        "tools": st.lists(st.fixed_dictionaries({"type": st.just("function"), "function": json_value}), max_size=3),
        "response_format": st.fixed_dictionaries({"type": st.just("json_schema"), "json_schema": json_value}),
    },
)
token_array = st.lists(st.integers(0, 100_000), min_size=1, max_size=300)
inputs = st.one_of(
    any_text, st.lists(any_text, min_size=1, max_size=5), token_array, st.lists(token_array, min_size=1, max_size=5)
)


@PROPERTY
@given(chat)
def test_the_chat_bound_is_at_least_cl100ks_count(body: dict[str, Any]) -> None:
    assert TOKENIZER.prompt(body) >= reference_chat(body)


@PROPERTY
@given(inputs, st.sampled_from(["prompt", "input"]))
def test_the_completion_and_embedding_bound_is_at_least_cl100ks_count(value: Any, field: str) -> None:
    assert TOKENIZER.prompt({"model": "m", field: value}) >= reference_inputs(value)


@PROPERTY
@given(chat)
def test_without_the_tokenizer_file_the_byte_count_still_bounds_it(body: dict[str, Any]) -> None:
    assert Tokenizer().prompt(body) >= reference_chat(body)


def test_shapes_that_once_counted_as_nearly_nothing() -> None:
    # Token arrays are token for token; lists of them add up; unknown parts and other fields count.
    assert TOKENIZER.prompt({"input": [[1] * 5000] * 10}) == 50_000
    assert TOKENIZER.prompt({"prompt": [[7] * 20000]}) == 20_000
    assert TOKENIZER.prompt({"prompt": [7] * 300}) == 300
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR" * 2000, "format": "wav"}}
    assert TOKENIZER.prompt({"messages": [{"role": "user", "content": [audio]}]}) > 1000
    schema = {"type": "json_schema", "json_schema": {"schema": {"description": "word " * 3000}}}
    plain = {"messages": [{"role": "user", "content": "hi"}]}
    assert TOKENIZER.prompt({**plain, "response_format": schema}) > TOKENIZER.prompt(plain) + 3000
    image = {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}
    assert TOKENIZER.prompt({"messages": [{"role": "user", "content": [image]}]}) >= IMAGE_TOKENS
    shown = {"role": "assistant", "content": "", "images": [{"image_url": image["image_url"]}] * 100}
    assert TOKENIZER.prompt({"messages": [shown]}) >= 100 * IMAGE_TOKENS  # sent back as media (Gemini)
    # Controls that never reach the model as text cost nothing.
    assert TOKENIZER.prompt({**plain, "temperature": 0.5, "n": 3, "max_tokens": 99}) == TOKENIZER.prompt(plain)


def test_missing_usage_is_counted_with_cl100k_from_a_local_file(tmp_path) -> None:
    bundled = _bundled_bpe()
    assert bundled is not None, "the dev install has LiteLLM, which ships the cl100k_base file"
    assert TOKENIZER.exact
    assert TOKENIZER.count("Hello world") == 2  # ['Hello', ' world'] in cl100k_base
    assert TOKENIZER.count("") == 0
    copy = tmp_path / "cl100k_base.tiktoken"
    copy.write_bytes(bundled.read_bytes())
    assert Tokenizer.load(str(copy)).count("Hello world") == 2


@pytest.mark.parametrize("content", [b"aGVsbG8= 0\n", None])
def test_a_wrong_or_missing_file_falls_back_to_one_token_a_byte(tmp_path, content: bytes | None) -> None:
    path = tmp_path / "cl100k.tiktoken"
    if content is not None:
        path.write_bytes(content)
    tok = Tokenizer.load(str(path))
    assert not tok.exact and tok.count("x" * 40) == 40 and tok.count("日本") == 6
    assert content is None or path.exists()  # never deleted, unlike tiktoken's own cache handling
