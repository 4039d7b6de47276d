"""STREAM_USAGE_TO_CLIENT: the usage chunk the proxy asked for reaches LibreChat, and no client it would break."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import serve, token, uid

LANGCHAIN = "langchainjs-openai/1.0.0 ((node/v22.11.0; linux; x64))"  # LibreChat with agents 3.6 and later
LIBRECHAT_SDK = "CustomOpenAIClient/JS 5.8.2"  # LibreChat with earlier agents
OPENAI_PYTHON = "OpenAI/Python 1.54.0"
BODY = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture(scope="module")
def urls(base_settings: Settings, fake: FakeUpstream) -> Iterator[dict[str, str]]:
    made = {}
    with (
        serve(create_app(replace(base_settings, litellm_base_url=fake.url))) as auto,
        serve(create_app(replace(base_settings, litellm_base_url=fake.url, stream_usage_to_client="always"))) as always,
        serve(create_app(replace(base_settings, litellm_base_url=fake.url, stream_usage_to_client="never"))) as never,
    ):
        made.update(auto=auto, always=always, never=never)
        yield made


def stream(url: str, agent: str, *, delegate: bool = False, **extra: object) -> str:
    bearer = token(uid("svc"), quota_delegate=True) if delegate else token(uid())
    headers = {"Authorization": f"Bearer {bearer}", "User-Agent": agent}
    if delegate:
        headers["X-User-Id"] = uid()
    r = httpx.post(f"{url}/v1/chat/completions", json={**BODY, **extra}, headers=headers, timeout=10)
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n"), r.text
    return r.text


@pytest.mark.parametrize(
    "mode, agent, delegate, shown",
    [
        ("auto", LANGCHAIN, False, True),
        ("auto", LIBRECHAT_SDK, False, True),
        ("auto", OPENAI_PYTHON, True, True),  # LibreChat's service token names its users
        ("auto", OPENAI_PYTHON, False, False),
        ("auto", "curl/8.5.0", False, False),
        ("always", OPENAI_PYTHON, False, True),
        ("never", LANGCHAIN, False, False),
        ("never", LANGCHAIN, True, False),
    ],
)
def test_the_usage_chunk_reaches_the_clients_that_read_it(
    urls: dict[str, str], mode: str, agent: str, delegate: bool, shown: bool
) -> None:
    text = stream(urls[mode], agent, delegate=delegate)
    assert ('"usage"' in text) is shown
    assert text.count("part") == 3  # the answer itself is whole either way


@pytest.mark.parametrize("mode", ["auto", "never"])
def test_a_client_that_asked_for_usage_always_gets_it(urls: dict[str, str], mode: str) -> None:
    assert '"usage"' in stream(urls[mode], OPENAI_PYTHON, stream_options={"include_usage": True})
