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


def test_missing_usage_is_counted_with_cl100k_from_a_local_file(tmp_path) -> None:
    from proxy.tokens import Tokenizer, _bundled_bpe

    bundled = _bundled_bpe()
    assert bundled is not None, "the dev install has LiteLLM, which ships the cl100k_base file"
    tok = Tokenizer.load()
    assert tok.exact
    assert tok.count("Hello world") == 2  # ['Hello', ' world'] in cl100k_base
    assert tok.count("") == 0
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}]}
    assert tok.prompt(chat) == tok.count("Be brief.\nHello world") + 3 + 2 * 4
    copy = tmp_path / "cl100k_base.tiktoken"
    copy.write_bytes(bundled.read_bytes())
    assert Tokenizer.load(str(copy)).count("Hello world") == 2


def test_a_wrong_or_missing_file_falls_back_to_the_rule_of_thumb(tmp_path) -> None:
    from proxy.tokens import Tokenizer

    bad = tmp_path / "bad.tiktoken"
    bad.write_bytes(b"aGVsbG8= 0\n")
    for path in (str(bad), str(tmp_path / "missing")):
        tok = Tokenizer.load(path)
        assert not tok.exact and tok.count("x" * 40) == 10
    assert bad.exists()  # never deleted, unlike tiktoken's own cache handling
