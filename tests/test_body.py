"""proxy/body.py: a completion body checked field by field, what it may cost, and its shaping for the upstream."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.body import (
    LITELLM_CONTROL,
    MAX_INPUTS,
    OPENAI_PARAMS,
    Completion,
    allowed_params,
    cap_answers,
    check,
    encode,
    is_control,
)
from proxy.errors import BadRequest

CHAT = OPENAI_PARAMS["chat"]
COMPLETIONS = OPENAI_PARAMS["completions"]
EMBEDDINGS = OPENAI_PARAMS["embeddings"]


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}], **fields}


def completions(**fields: Any) -> dict[str, Any]:
    return {"model": "davinci", "prompt": "Once upon a time", **fields}


def refused(payload: dict[str, Any], endpoint: str = "chat", allowed: frozenset[str] | None = None) -> BadRequest:
    allowed = OPENAI_PARAMS[endpoint] if allowed is None else allowed
    with pytest.raises(BadRequest) as caught:
        check(payload, endpoint, allowed)
    return caught.value


# check: the minimal bodies of each endpoint


def test_a_plain_chat_body_passes_unchanged_with_one_choice_and_no_cap() -> None:
    payload = chat()
    completion = check(payload, "chat", CHAT)
    assert completion == Completion("chat", payload, "gpt-4o", False, 1, None, False)
    assert payload == chat()


def test_a_plain_completions_body_has_one_choice() -> None:
    completion = check(completions(), "completions", COMPLETIONS)
    assert (completion.endpoint, completion.model, completion.choices, completion.cap) == (
        "completions",
        "davinci",
        1,
        None,
    )


def test_embeddings_have_one_choice_whatever_the_number_of_inputs() -> None:
    payload = {"model": "text-embedding-3-small", "input": ["a", "b", "c", "d"]}
    completion = check(payload, "embeddings", EMBEDDINGS)
    assert (completion.choices, completion.stream, completion.cap, completion.hide_usage) == (1, False, None, False)


# check: choices from n, best_of and prompt lists


@pytest.mark.parametrize("n, choices", [(None, 1), (1, 1), (3, 3), (128, 128)])
def test_chat_choices_are_n(n: int | None, choices: int) -> None:
    assert check(chat(n=n), "chat", CHAT).choices == choices


@pytest.mark.parametrize("n", [0, -1, 129, True, 2.0, "3"])
def test_n_outside_1_to_128_or_not_a_whole_number_is_refused(n: Any) -> None:
    error = refused(chat(n=n))
    assert (error.message, error.param, error.status) == ("'n' must be a whole number from 1 to 128.", "n", 400)


@pytest.mark.parametrize(
    "fields, choices",
    [
        ({}, 1),
        ({"n": 2}, 2),
        ({"best_of": 5}, 5),
        ({"n": 2, "best_of": 5}, 5),
        ({"n": 3, "best_of": 3}, 3),
        ({"prompt": ["a", "b", "c"]}, 3),
        ({"n": 2, "best_of": 5, "prompt": ["a", "b", "c"]}, 15),
        ({"n": 2, "prompt": [[1, 2], [3], [4, 5, 6]]}, 6),
        ({"n": 4, "prompt": [1, 2, 3]}, 4),  # one token array is one prompt
        ({"prompt": ""}, 1),
    ],
)
def test_completions_choices_are_the_larger_of_n_and_best_of_per_prompt(fields: dict[str, Any], choices: int) -> None:
    assert check(completions(**fields), "completions", COMPLETIONS).choices == choices


def test_best_of_below_n_is_refused() -> None:
    error = refused(completions(n=4, best_of=3), "completions")
    assert (error.message, error.param) == ("'best_of' must be at least 'n'.", "best_of")


def test_best_of_above_20_is_refused() -> None:
    error = refused(completions(best_of=21), "completions")
    assert (error.message, error.param) == ("'best_of' must be a whole number from 1 to 20.", "best_of")


@pytest.mark.parametrize(
    "prompt",
    [None, [], 7, {"text": "x"}, ["a", 1], [[1], []], [[1], ["a"]], [1, -2], [1, 2**31], [True]],
)
def test_prompts_that_are_not_strings_or_token_arrays_are_refused(prompt: Any) -> None:
    error = refused(completions(prompt=prompt), "completions")
    assert error.param == "prompt"
    assert error.message in (
        "'prompt' must be a string, a list of strings, a token array or a list of token arrays.",
        "'prompt' token arrays must hold token ids (whole numbers from 0).",
    )


def test_a_prompt_list_is_limited_to_2048_items() -> None:
    assert check(completions(prompt=["x"] * MAX_INPUTS), "completions", COMPLETIONS).choices == MAX_INPUTS
    error = refused(completions(prompt=["x"] * (MAX_INPUTS + 1)), "completions")
    assert (error.message, error.param) == ("'prompt' may hold at most 2,048 items.", "prompt")


def test_embeddings_input_is_checked_like_a_prompt() -> None:
    error = refused({"model": "e", "input": []}, "embeddings")
    assert error.param == "input"
    assert error.message == "'input' must be a string, a list of strings, a token array or a list of token arrays."


def test_embeddings_are_not_streamed() -> None:
    # `stream` is not an embeddings parameter; allowed through EXTRA_BODY_PARAMS it is still refused.
    assert refused({"model": "e", "input": "x", "stream": True}, "embeddings").message == (
        "Unknown field(s) for this endpoint: stream."
    )
    error = refused(
        {"model": "e", "input": "x", "stream": True}, "embeddings", allowed_params("embeddings", ("stream",))
    )
    assert (error.message, error.param) == ("Embeddings are not streamed: leave 'stream' out.", "stream")


# check: caps


@pytest.mark.parametrize(
    "fields, cap",
    [
        ({}, None),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 70}, 70),
        ({"max_tokens": 100, "max_completion_tokens": 50}, 50),
        ({"max_tokens": 30, "max_completion_tokens": 50}, 30),
        ({"max_tokens": None, "max_completion_tokens": 9}, 9),
        ({"max_tokens": 10_000_000}, 10_000_000),
    ],
)
def test_the_cap_is_the_smaller_of_the_callers_caps(fields: dict[str, Any], cap: int | None) -> None:
    assert check(chat(**fields), "chat", CHAT).cap == cap


@pytest.mark.parametrize("value", [0, -5, 10_000_001, 1.5, "100", False])
def test_caps_outside_1_to_10_million_are_refused(value: Any) -> None:
    error = refused(chat(max_tokens=value))
    assert (error.message, error.param) == ("'max_tokens' must be a whole number from 1 to 10,000,000.", "max_tokens")


# check: stream and stream_options


def test_a_stream_gets_the_usage_chunk_asked_for_and_hidden_from_the_caller() -> None:
    payload = chat(stream=True)
    completion = check(payload, "chat", CHAT)
    assert (completion.stream, completion.hide_usage) == (True, True)
    assert payload["stream_options"] == {"include_usage": True}


def test_a_stream_whose_caller_asked_for_usage_shows_it() -> None:
    payload = chat(stream=True, stream_options={"include_usage": True})
    completion = check(payload, "chat", CHAT)
    assert completion.hide_usage is False
    assert payload["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize(
    "options, sent",
    [
        (None, {"include_usage": True}),
        ({}, {"include_usage": True}),
        ({"include_usage": False}, {"include_usage": True}),
        ({"continuous_usage_stats": True}, {"continuous_usage_stats": True, "include_usage": True}),
    ],
)
def test_stream_options_without_usage_are_completed_keeping_the_callers_other_options(
    options: dict[str, Any] | None, sent: dict[str, Any]
) -> None:
    payload = completions(stream=True, stream_options=options)
    assert check(payload, "completions", COMPLETIONS).hide_usage is True
    assert payload["stream_options"] == sent


def test_a_body_that_does_not_stream_is_left_without_stream_options() -> None:
    for stream in (False, None):
        payload = chat(stream=stream)
        completion = check(payload, "chat", CHAT)
        assert (completion.stream, completion.hide_usage) == (False, False)
        assert "stream_options" not in payload


@pytest.mark.parametrize("stream", ["true", 1, 0, []])
def test_stream_must_be_a_boolean(stream: Any) -> None:
    error = refused(chat(stream=stream))
    assert (error.message, error.param) == ("'stream' must be true or false.", "stream")


@pytest.mark.parametrize("options", ["yes", [], {"include_usage": "true"}, {"include_usage": 1}])
def test_malformed_stream_options_are_refused(options: Any) -> None:
    error = refused(chat(stream=True, stream_options=options))
    assert error.param == "stream_options"
    assert error.message == "'stream_options' must be an object; its 'include_usage' true or false."


# check: fields, model and messages


def test_an_unknown_field_is_refused_by_name() -> None:
    error = refused(chat(zeta=1, alpha=2))
    assert error.message == "Unknown field(s) for this endpoint: alpha, zeta."
    assert (error.param, error.code) == ("alpha", "unsupported_parameter")


def test_a_chat_only_field_is_unknown_to_embeddings() -> None:
    error = refused({"model": "e", "input": "x", "messages": []}, "embeddings")
    assert error.message == "Unknown field(s) for this endpoint: messages."


@pytest.mark.parametrize("name", ["api_base", "mock_response", "litellm_params", "aws_region_name", "azure_ad_token"])
def test_gateway_settings_are_refused_as_such(name: str) -> None:
    error = refused(chat(**{name: "x", "other": 1}))
    assert error.message == f"Field(s) {name} are gateway settings the proxy does not pass on."
    assert (error.param, error.code) == (name, "unsupported_parameter")


@pytest.mark.parametrize("model", [None, "", 5, ["gpt"]])
def test_a_model_string_is_required(model: Any) -> None:
    payload = chat(model=model)
    if model is None:
        del payload["model"]
    error = refused(payload)
    assert (error.message, error.param, error.code) == (
        "Request body needs a 'model' string.",
        "model",
        "missing_model",
    )


@pytest.mark.parametrize("model", ["gpt\n4", "m\x00", "m" * 257])
def test_a_model_must_be_printable_and_bounded(model: str) -> None:
    error = refused(chat(model=model))
    assert (error.message, error.param) == ("'model' must be printable text of 1 to 256 characters.", "model")


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("temperature", "hot", "'temperature' must be a number."),
        ("top_p", True, "'top_p' must be a number."),
        ("presence_penalty", float("inf"), "'presence_penalty' must be a number."),
        ("seed", 2**63, f"'seed' must be a whole number from {-(2**63):,} to {2**63 - 1:,}."),
        ("top_k", -1, "'top_k' must be a whole number from 0 to 1,000,000."),
        ("stop", ["a", 1], "'stop' must be a string or a list of strings."),
        ("tools", [{"type": "function"}, "x"], "'tools' must be a list of objects."),
        ("response_format", "json", "'response_format' must be an object."),
        ("logit_bias", [1], "'logit_bias' must be an object."),
    ],
)
def test_fields_present_are_checked_by_type(field: str, value: Any, message: str) -> None:
    error = refused(chat(**{field: value}))
    assert (error.message, error.param) == (message, field)


def test_well_typed_optional_fields_pass() -> None:
    payload = chat(temperature=0, top_p=0.5, seed=-1, stop="\n", tools=[], response_format={"type": "text"}, top_k=0)
    assert check(payload, "chat", CHAT).choices == 1


@pytest.mark.parametrize(
    "messages, param",
    [
        ([], "messages"),
        ("hi", "messages"),
        ([{"content": "no role"}], "messages[0]"),
        ([{"role": "user", "content": "ok"}, {"role": "user", "content": 5}], "messages[1].content"),
        ([{"role": "user", "content": [{"type": "text"}]}], "messages[0].content"),
        (
            [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "file:///etc"}}]}],
            "messages[0].content",
        ),
        ([{"role": "user", "content": [{"type": "file", "file": {"file_id": "file-1"}}]}], "messages[0].content"),
        ([{"role": "assistant", "tool_calls": {"id": "x"}}], "messages[0].tool_calls"),
    ],
)
def test_malformed_messages_are_refused_naming_the_message(messages: Any, param: str) -> None:
    assert refused(chat(messages=messages)).param == param


def test_image_file_and_audio_parts_with_data_pass() -> None:
    content = [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"},
        {"type": "file", "file": {"file_data": "data:application/pdf;base64,AAAA", "filename": "a.pdf"}},
        {"type": "file", "file": {"file_data": "JVBERi0xLjQK"}},  # raw base64
        {"type": "image_url", "image_url": {"url": "https://example.com/a", "format": "image/png"}},
        {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}},
    ]
    assert check(chat(messages=[{"role": "user", "content": content}]), "chat", CHAT).choices == 1
    image = {"image_url": {"url": "data:image/png;base64,AAAA", "mime_type": "image/png"}, "index": 0}
    assert check(chat(messages=[{"role": "assistant", "content": "", "images": [image]}]), "chat", CHAT).choices == 1
    refusal = [{"type": "refusal", "refusal": "I can't."}]
    assert check(chat(messages=[{"role": "assistant", "content": refusal}]), "chat", CHAT).choices == 1


# allowed_params


def test_allowed_params_adds_extra_body_params_but_never_a_control_parameter() -> None:
    extra = ("web_search_options", "api_base", "litellm_logging", "mock_response", "vertex_project", "aws_x", "tags")
    allowed = allowed_params("chat", extra)
    assert allowed == CHAT | {"web_search_options"}
    assert allowed_params("embeddings", ()) == EMBEDDINGS


def test_every_litellm_control_parameter_stays_closed() -> None:
    assert all(is_control(name) for name in LITELLM_CONTROL)
    for endpoint in OPENAI_PARAMS:
        assert not allowed_params(endpoint, tuple(LITELLM_CONTROL)) & LITELLM_CONTROL
        assert not OPENAI_PARAMS[endpoint] & LITELLM_CONTROL


def test_a_control_parameter_named_in_extra_body_params_is_still_refused() -> None:
    allowed = allowed_params("chat", ("api_base", "web_search_options"))
    assert check(chat(web_search_options={}), "chat", allowed).choices == 1
    error = refused(chat(api_base="http://evil"), "chat", allowed)
    assert error.message == "Field(s) api_base are gateway settings the proxy does not pass on."


# cap_answers


def capped(fields: dict[str, Any], per_answer: int) -> dict[str, Any]:
    completion = check(chat(**fields), "chat", CHAT)
    cap_answers(completion, per_answer)
    return {k: v for k, v in completion.payload.items() if k in ("max_tokens", "max_completion_tokens")}


@pytest.mark.parametrize(
    "fields, per_answer, caps",
    [
        ({}, 4096, {"max_tokens": 4096}),
        ({"max_tokens": None}, 300, {"max_tokens": 300}),
        ({"max_tokens": 100}, 4096, {"max_tokens": 100}),
        ({"max_tokens": 5000}, 4096, {"max_tokens": 4096}),
        ({"max_completion_tokens": 9000}, 4096, {"max_completion_tokens": 4096}),
        ({"max_completion_tokens": 10}, 4096, {"max_completion_tokens": 10}),
        ({"max_tokens": 5000, "max_completion_tokens": 20}, 64, {"max_tokens": 64, "max_completion_tokens": 20}),
        ({"max_tokens": None, "max_completion_tokens": 800}, 64, {"max_tokens": None, "max_completion_tokens": 64}),
    ],
)
def test_cap_answers_caps_each_field_the_caller_set_else_max_tokens(
    fields: dict[str, Any], per_answer: int, caps: dict[str, Any]
) -> None:
    assert capped(fields, per_answer) == caps


# encode


def test_encode_is_the_json_body() -> None:
    assert encode({"model": "m", "n": 2}) == b'{"model":"m","n":2}'


def test_a_body_json_cannot_carry_is_refused_before_anything_is_reserved() -> None:
    deep: Any = []
    for _ in range(300):
        deep = [deep]
    with pytest.raises(BadRequest) as caught:
        encode({"model": "m", "x": deep})
    assert caught.value.message.startswith("Request body cannot be forwarded: ")
    with pytest.raises(BadRequest):
        encode({"model": "m", "seed": 2**64})
