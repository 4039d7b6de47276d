"""LibreChat near a user's limit: its chat and its title call arrive together, and both must be served.

LibreChat v0.8.8 sends the title request at the same moment as the chat (`titleTiming: immediate`), both
without a cap on the answer. The upstream here bills every answer to its cap ("honest-slow", after 0.3 s,
so the requests overlap), which is the most they could cost.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import httpx
import pytest

from proxy.app import create_app
from proxy.config import Settings

from .fake_upstream import FakeUpstream
from .helpers import serve, token, uid

ROOM = 1500
ROOMIER = 4000  # still below COMPLETION_ALLOWANCE, so every request wants more than the room
HISTORY = "You are a helpful assistant. Answer briefly."
TITLE_PROMPT = (
    "Please generate a concise, 5-word-or-less title for the conversation, using its same language, with no "
    "punctuation. Apply title case conventions appropriate for the language. Never directly mention the "
    'language name or the word "title". Only return the title itself.\n\nConversation:\nUser: Explain TCP '
    "slow start\nAI: "
)


def chat_body(user: str) -> dict[str, Any]:
    """A LibreChat chat turn as section 0 of the fixture describes it: streamed, no cap, the user's id."""
    return {
        "model": "honest-slow",
        "user": user,
        "stream": True,
        "messages": [{"role": "system", "content": HISTORY}, {"role": "user", "content": "Explain TCP slow start"}],
    }


def title_body(user: str) -> dict[str, Any]:
    """LibreChat's title call: not streamed, no cap (maxTokens is stripped), the prompt ending in 'AI: '."""
    return {
        "model": "honest-slow",
        "user": user,
        "stream": False,
        "messages": [{"role": "user", "content": TITLE_PROMPT}],
    }


# Every proxy writes its default budget into the shared `budgets` table at start-up; these proxies do not
# re-read it, so another proxy of the session cannot change their default under them.


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=ROOM, budget_refresh_seconds=3600)
    with serve(create_app(settings)) as url:
        yield url


def send_together(url: str, user: str, bodies: list[dict[str, Any]], gap: float = 0.005) -> list[httpx.Response]:
    """Each body from its own thread, `gap` seconds apart, as LibreChat fires them."""
    headers = {"Authorization": f"Bearer {token(user)}"}
    results: list[httpx.Response | None] = [None] * len(bodies)

    def send(i: int) -> None:
        with httpx.Client(base_url=url, timeout=20) as client:
            results[i] = client.post("/v1/chat/completions", json=bodies[i], headers=headers)

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
    for thread in threads:
        thread.start()
        time.sleep(gap)
    for thread in threads:
        thread.join()
    return [r for r in results if r is not None]


def quota(url: str, user: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/v1/quota", headers={"Authorization": f"Bearer {token(user)}"})
    budget: dict[str, Any] = r.json()["budgets"][0]
    return budget


@pytest.mark.parametrize("chat_first", [True, False], ids=["chat then title", "title then chat"])
def test_a_chat_and_its_title_sent_together_are_both_served(proxy_url: str, chat_first: bool) -> None:
    user = uid()
    bodies = [chat_body(user), title_body(user)]
    responses = send_together(proxy_url, user, bodies if chat_first else bodies[::-1])
    assert [r.status_code for r in responses] == [200, 200], [r.text for r in responses]
    after = quota(proxy_url, user)
    assert after["reserved"] == 0 and 0 < after["used"] <= ROOM  # the hard bound


@pytest.fixture(scope="module")
def roomier_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(
        base_settings, litellm_base_url=fake.url, default_token_budget=ROOMIER, budget_refresh_seconds=3600
    )
    with serve(create_app(settings)) as url:
        yield url


# Each request that wants more than the room leaves half of what it could take for the next, so the k-th
# at once finds about 1/2^(k-1) of the room: two or three fit in 1,500 tokens, four or five in 4,000.
@pytest.mark.parametrize("count", [2, 3, 4, 5])
def test_a_few_requests_at_once_near_the_limit_are_all_served_within_it(
    proxy_url: str, roomier_url: str, count: int
) -> None:
    url, room = (proxy_url, ROOM) if count <= 3 else (roomier_url, ROOMIER)
    user = uid()
    bodies = [chat_body(user) if i % 2 == 0 else title_body(user) for i in range(count)]
    responses = send_together(url, user, bodies, gap=0.002)
    assert [r.status_code for r in responses] == [200] * count, [r.text for r in responses]
    after = quota(url, user)
    assert after["reserved"] == 0 and after["used"] <= room


def test_a_prompt_that_cannot_fit_is_still_refused(proxy_url: str) -> None:
    user = uid()
    huge = {**title_body(user), "messages": [{"role": "user", "content": "word " * 2000}]}
    r = send_together(proxy_url, user, [huge])[0]
    assert r.status_code == 429 and r.json()["error"]["code"] == "insufficient_quota"
    assert quota(proxy_url, user)["used"] == 0


def test_the_answer_that_uses_the_budget_up_says_the_next_message_will_be_refused(
    base_settings: Settings, fake: FakeUpstream
) -> None:
    # The fake upstream bills every answer 12 tokens: a budget of 12 is used up by one short answer.
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=12, budget_refresh_seconds=3600)
    user = uid()
    short = {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    with serve(create_app(settings)) as url:
        r = send_together(url, user, [short])[0]
        assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
        assert "You have used all of your monthly token budget (12 of 12): your next message will be refused" in r.text
        nxt = send_together(url, user, [short])[0]
        assert nxt.status_code == 429 and "used up: 12 of 12 tokens" in nxt.json()["error"]["message"]
