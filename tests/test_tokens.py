from proxy.tokens import completion_cap, estimate_prompt


def test_chat_prompt_estimate_grows_with_text_and_counts_images() -> None:
    short = estimate_prompt({"messages": [{"role": "user", "content": "hi"}]})
    long = estimate_prompt({"messages": [{"role": "user", "content": "x" * 4000}]})
    image = estimate_prompt({"messages": [{"role": "user", "content": [
        {"type": "text", "text": "hi"}, {"type": "image_url", "image_url": {"url": "data:..."}}]}]})  # fmt: skip
    assert 0 < short < 20
    assert 1000 <= long <= 1020
    assert image > short + 500


def test_completion_and_embedding_inputs() -> None:
    assert estimate_prompt({"prompt": "a" * 400}) == 100
    assert estimate_prompt({"input": ["a" * 40, "b" * 40]}) == 20
    assert estimate_prompt({"input": [1, 2, 3]}) == 3
    assert estimate_prompt({}) == 1


def test_completion_cap_prefers_max_completion_tokens() -> None:
    assert completion_cap({"max_tokens": 50}) == ("max_tokens", 50)
    assert completion_cap({"max_completion_tokens": 70, "max_tokens": 50}) == ("max_completion_tokens", 70)
    assert completion_cap({"max_tokens": True}) == ("max_tokens", None)
    assert completion_cap({}) == ("max_tokens", None)
