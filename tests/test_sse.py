import orjson
import pytest

from proxy.sse import StreamMeter
from proxy.usage import answer_text, usage_totals


def chunk(content: str | None = None, *, usage: dict | None = None, choices: list | None = None) -> bytes:
    body: dict = {"id": "c1", "object": "chat.completion.chunk"}
    body["choices"] = choices if choices is not None else [{"index": 0, "delta": {"content": content}}]
    if usage is not None:
        body["usage"] = usage
    return b"data: " + orjson.dumps(body) + b"\n\n"


USAGE = {"prompt_tokens": 8, "completion_tokens": 11, "total_tokens": 19}
STREAM = chunk("Hel") + chunk("lo") + chunk(choices=[{"index": 0, "delta": {}}], usage=USAGE) + b"data: [DONE]\n\n"


def events(data: bytes) -> list[bytes]:
    return [e for e in data.split(b"\n\n") if e]


def test_usage_chunk_is_read_and_hidden_when_the_proxy_asked_for_it() -> None:
    meter = StreamMeter(hide_usage=True)
    out = meter.feed(STREAM)
    assert meter.usage == USAGE
    assert b"usage" not in out
    assert events(out) == events(chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n")


def test_usage_chunk_passes_when_the_caller_asked_for_it() -> None:
    meter = StreamMeter(hide_usage=False)
    assert meter.feed(STREAM) == STREAM
    assert meter.usage == USAGE


def test_usage_riding_on_a_content_chunk_is_stripped_not_dropped() -> None:
    meter = StreamMeter(hide_usage=True)
    out = meter.feed(chunk("end", usage=USAGE))
    assert orjson.loads(out[6:]) == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "end"}}],
    }
    assert meter.usage == USAGE


def test_events_split_across_reads_are_reassembled_byte_by_byte() -> None:
    meter = StreamMeter(hide_usage=True)
    out = b"".join(meter.feed(STREAM[i : i + 1]) for i in range(len(STREAM)))
    assert meter.usage == USAGE
    assert events(out) == events(chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n")
    assert meter.text == "Hello"


def test_crlf_framing_and_malformed_lines_pass_through() -> None:
    meter = StreamMeter(hide_usage=True)
    out = meter.feed(b": keep-alive\r\n\r\ndata: {not json\r\n\r\n" + chunk("x").replace(b"\n", b"\r\n"))
    assert events(out) == [b": keep-alive", b"data: {not json", chunk("x")[:-2]]
    assert meter.usage is None


def test_trailing_bytes_without_a_blank_line_are_flushed() -> None:
    meter = StreamMeter(hide_usage=False)
    assert meter.feed(b"data: [DONE]") == b""
    assert meter.flush() == b"data: [DONE]"


def test_usage_totals_never_below_prompt_plus_completion() -> None:
    # LiteLLM reports embeddings as prompt_tokens=10, total_tokens=0.
    assert usage_totals({"prompt_tokens": 10, "completion_tokens": 0, "total_tokens": 0}) == (10, 0, 10)
    assert usage_totals({"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}) == (7, 5, 12)
    assert usage_totals(None) is None


def test_usage_that_is_not_counts_is_treated_as_missing() -> None:
    # The request is then estimated (and marked so) rather than failing with a 500.
    assert usage_totals({"prompt_tokens": "many", "completion_tokens": 3}) is None
    assert usage_totals({"prompt_tokens": [1], "completion_tokens": 3}) is None
    assert usage_totals({"prompt_tokens": float("inf")}) is None


def test_usage_out_of_range_is_treated_as_missing() -> None:
    # A negative count would hand tokens back (PostgreSQL rebuilds counters from the records); one past the
    # ledger's integer columns, or past 64 bits, would lose the record and jam the settle.
    assert usage_totals({"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": -500_000}) == (10, 5, 15)
    assert usage_totals({"prompt_tokens": -1, "completion_tokens": 5}) is None
    assert usage_totals({"prompt_tokens": 5, "completion_tokens": -(10**6), "total_tokens": 5}) is None
    assert usage_totals({"prompt_tokens": 3_000_000_001}) is None
    assert usage_totals({"prompt_tokens": 10**30}) is None
    assert usage_totals({"prompt_tokens": 1, "total_tokens": 2**31}) is None
    assert usage_totals({"prompt_tokens": 2**31 - 1}) == (2**31 - 1, 0, 2**31 - 1)


def test_usage_without_counts_is_treated_as_missing() -> None:
    assert usage_totals({}) is None
    assert usage_totals({"prompt_tokens": None, "completion_tokens": None, "total_tokens": None}) is None
    assert usage_totals({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}) is None


def test_a_stream_keeps_the_usage_with_counts_when_an_empty_one_follows() -> None:
    meter = StreamMeter(hide_usage=False)
    counted = {"prompt_tokens": 7, "completion_tokens": 5, "total_tokens": 12}
    meter.feed(b'data: {"choices": [{"delta": {"content": "hi"}}], "usage": ' + orjson.dumps(counted) + b"}\n\n")
    meter.feed(b'data: {"choices": [], "usage": {}}\n\ndata: [DONE]\n\n')
    assert usage_totals(meter.usage) == (7, 5, 12)


def test_notice_is_added_as_a_last_delta_before_done() -> None:
    seen = []

    def on_usage(usage: dict) -> str:
        seen.append(usage)
        return "\n\n> You have used 83 % of your monthly token budget (83,000 of 100,000)."

    meter = StreamMeter(hide_usage=True, on_usage=on_usage)
    out = events(meter.feed(STREAM))
    assert seen == [USAGE]
    assert out[-1] == b"data: [DONE]"
    notice = orjson.loads(out[-2][6:])
    assert notice["id"] == "c1" and notice["object"] == "chat.completion.chunk"
    assert notice["choices"][0]["delta"]["content"].endswith("(83,000 of 100,000).")


def test_no_notice_when_the_hook_has_nothing_to_say() -> None:
    meter = StreamMeter(hide_usage=True, on_usage=lambda usage: None)
    assert events(meter.feed(STREAM)) == events(chunk("Hel") + chunk("lo") + b"data: [DONE]\n\n")


def test_done_marks_a_complete_stream() -> None:
    meter = StreamMeter(hide_usage=True)
    meter.feed(STREAM[:-16])
    assert not meter.done
    meter.feed(STREAM[-16:])
    assert meter.done


# --- What an estimate counts: every piece of output, whichever field carries it ----------------------

NULLS = {"content": None, "role": "assistant", "function_call": None, "tool_calls": None, "audio": None}


def delta_chunk(*deltas: dict) -> bytes:
    """One chunk with a choice per delta, every field LiteLLM has present and null unless given."""
    return chunk(choices=[{"index": i, "delta": {**NULLS, **d}, "finish_reason": None} for i, d in enumerate(deltas)])


def streamed(*chunks: bytes) -> str:
    meter = StreamMeter(hide_usage=True)
    meter.feed(b"".join(chunks) + b"data: [DONE]\n\n")
    return meter.text


def call_delta(**function: str) -> dict:
    return {"tool_calls": [{"index": 0, "function": function}]}


def test_streamed_tool_call_arguments_are_counted_with_the_function_name() -> None:
    first = {
        "tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "save", "arguments": ""}}]
    }
    text = streamed(
        delta_chunk(first), delta_chunk(call_delta(arguments='{"a": ')), delta_chunk(call_delta(arguments="1}"))
    )
    assert text == 'save{"a": 1}'  # not the call's id nor its type: the model did not write them


def test_streamed_reasoning_refusal_legacy_calls_and_audio_transcripts_are_counted() -> None:
    assert streamed(delta_chunk({"reasoning_content": "think "}), delta_chunk({"content": "say"})) == "think say"
    assert streamed(delta_chunk({"reasoning": "openrouter's"})) == "openrouter's"
    assert streamed(delta_chunk({"refusal": "I can't."})) == "I can't."
    assert streamed(delta_chunk({"function_call": {"name": "f", "arguments": "{}"}})) == "f{}"
    assert streamed(delta_chunk({"audio": {"id": "a1", "data": "UklGR", "transcript": "hello"}})) == "hello"


def test_reasoning_carried_twice_is_counted_once() -> None:
    # OpenRouter through LiteLLM can carry the same thinking as `reasoning` and `reasoning_content`, and
    # Anthropic's comes again in `thinking_blocks` with a signature.
    both = {
        "reasoning_content": "deep",
        "reasoning": "deep",
        "thinking_blocks": [{"thinking": "deep", "signature": "s"}],
    }
    assert streamed(delta_chunk(both)) == "deep"


def test_every_choice_of_a_stream_is_counted() -> None:
    assert (
        streamed(delta_chunk({"content": "one "}, call_delta(arguments="{}"), {"reasoning_content": "r"})) == "one {}r"
    )


def test_completions_stream_text_is_counted() -> None:
    assert streamed(chunk(choices=[{"index": 0, "text": "legacy"}])) == "legacy"


def test_an_answer_is_counted_whole_tool_calls_reasoning_refusal_and_every_choice() -> None:
    call = {"id": "call_1", "type": "function", "function": {"name": "save", "arguments": '{"a": 1}'}}
    response = {
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]}},
            {"index": 1, "message": {"role": "assistant", "content": "ok", "reasoning_content": "hm "}},
            {"index": 2, "message": {"role": "assistant", "content": None, "refusal": "no"}},
            {"index": 3, "message": {"role": "assistant", "function_call": {"name": "f", "arguments": "{}"}}},
        ]
    }
    assert answer_text(response) == 'save{"a": 1}okhm nof{}'
    assert answer_text({"choices": [{"index": 0, "text": "legacy"}]}) == "legacy"
    # Content as parts (some providers through LiteLLM), reasoning nested in a thinking part or not
    parts = [
        {"type": "thinking", "thinking": [{"type": "text", "text": "first "}]},
        {"type": "thinking", "thinking": "then "},
        {"type": "text", "text": "answer"},
        {"type": "image_url", "image_url": {"url": "data:..."}},
        "stray",
    ]
    assert answer_text({"choices": [{"message": {"role": "assistant", "content": parts}}]}) == "first then answer"


@pytest.mark.parametrize(
    "message",
    [
        {"content": "plain"},
        {
            "content": None,
            "tool_calls": [{"id": "c", "type": "function", "function": {"name": "n", "arguments": "{}"}}],
        },
        {"content": "after", "reasoning_content": "before", "thinking_blocks": [{"thinking": "before"}]},
        {"reasoning": "or", "refusal": "no", "audio": {"data": "AAAA", "transcript": "said"}},
        {"function_call": {"name": "f", "arguments": "{}"}, "provider_specific_fields": {"citations": ["x"]}},
        {"content": [{"type": "text", "text": "as parts"}, {"type": "refusal", "refusal": "no"}]},
        {
            "content": [
                {"type": "thinking", "thinking": [{"type": "text", "text": "hm"}]},
                {"type": "text", "text": "."},
            ]
        },
    ],
)
def test_a_stream_and_an_answer_count_the_same_output(message: dict) -> None:
    """A stream and a whole answer are counted alike, whatever fields their output comes in."""
    assert streamed(delta_chunk(message)) == answer_text({"choices": [{"message": {**NULLS, **message}}]})
