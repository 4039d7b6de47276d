import orjson

from proxy.sse import StreamMeter, usage_totals


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
