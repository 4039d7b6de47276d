"""What a request is charged when the upstream reports no usage: every piece of output the client received
(tool-call arguments, reasoning, not only text), and never more than was reserved for it, over real HTTP
against the fake upstream, with the counters in Redis and the records in PostgreSQL.

The models are fake_upstream.py's estimate models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import Any

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import Settings
from proxy.tokens import Tokenizer

from .fake_upstream import REASONING_ANSWER, REASONING_PIECES, TOOL_ARGUMENTS, TOOL_NAME, FakeUpstream
from .helpers import eventually, pg_row, serve, token, uid

TOKENS = Tokenizer.load()  # the proxy counts missing usage with the same cl100k_base file
SMALL = 1000  # the dense case's budget: the review's
TOOL_TOKENS = TOKENS.count(TOOL_NAME + TOOL_ARGUMENTS.decode())
REASONING_TOKENS = TOKENS.count("".join(REASONING_PIECES) + REASONING_ANSWER)


@pytest.fixture(scope="module")
def urls(base_settings: Settings, fake: FakeUpstream) -> Iterator[dict[str, str]]:
    """Proxies in front of the fake upstream: budgets of 100,000 (`roomy`) and 1,000 (`small`); a user budget
    of 100,000 in a team of 1,000 (`team`); and one that does not clamp answers (`unclamped`)."""
    settings = replace(base_settings, litellm_base_url=fake.url)
    with (
        serve(create_app(settings)) as roomy,
        serve(create_app(replace(settings, default_token_budget=SMALL))) as small,
        serve(create_app(replace(settings, default_tenant_budget=SMALL))) as team,
        serve(create_app(replace(settings, clamp_max_tokens=False))) as unclamped,
    ):
        yield {"roomy": roomy, "small": small, "team": team, "unclamped": unclamped}


class Call:
    """One chat request by a fresh user (of `tenant`, if given): the answer, its record and the budgets."""

    def __init__(self, url: str, dsn: str, model: str, *, tenant: str | None = None, **fields: Any) -> None:
        self.url, self.dsn, self.request_id = url, dsn, uid("req")
        self.headers = {"Authorization": f"Bearer {token(uid(), tenant=tenant)}", "X-Request-Id": self.request_id}
        self.body = {"model": model, "messages": [{"role": "user", "content": "write it"}], **fields}

    def run(self) -> httpx.Response:
        r = httpx.post(f"{self.url}/v1/chat/completions", headers=self.headers, json=self.body, timeout=20)
        assert r.status_code == 200, r.text
        return r

    def hang_up(self, when: Callable[[list[dict[str, Any]]], bool]) -> list[dict[str, Any]]:
        """Stream the answer and leave as soon as `when` holds for the events read so far."""
        events: list[dict[str, Any]] = []
        body = {**self.body, "stream": True}
        with httpx.stream("POST", f"{self.url}/v1/chat/completions", headers=self.headers, json=body, timeout=20) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    events.append(orjson.loads(line[6:]))
                    if when(events):
                        return events
        raise AssertionError(f"the stream ended before the client meant to leave ({len(events)} events)")

    def record(self) -> Any:
        query = "select * from usage_records where client_request_id = $1"
        return eventually(lambda: pg_row(self.dsn, query, self.request_id))

    def budgets(self) -> list[dict[str, Any]]:
        """The caller's budgets once nothing is reserved any more (as Redis holds them): the user's, then the team's."""
        read = lambda: httpx.get(f"{self.url}/v1/quota", headers=self.headers).json()["budgets"]  # noqa: E731
        eventually(lambda: all(b["reserved"] == 0 for b in read()))
        return list(read())

    def charged(self, *, status: str) -> Any:
        """The record, checked against the user's counter in Redis: the two agree."""
        row = self.record()
        assert row["status"] == status, dict(row)
        assert self.budgets()[0]["used"] == row["total_tokens"], (self.budgets(), dict(row))
        return row


def finished(events: list[dict[str, Any]]) -> bool:
    return any(c.get("finish_reason") for e in events for c in e.get("choices") or ())


# --- Everything the client received is counted --------------------------------------------------


def test_a_tool_call_cut_at_finish_reason_is_charged_its_arguments(
    urls: dict[str, str], base_settings: Settings
) -> None:
    """The review's repro: ~28 KB of tool-call arguments, the usage 1 s after finish_reason, and the client
    gone at finish_reason. It was charged the prompt alone (completion 0)."""
    call = Call(urls["roomy"], base_settings.database_url, "tool-args", max_tokens=10_000)
    events = call.hang_up(finished)
    assert events[0]["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == TOOL_NAME  # it came through
    row = call.charged(status="cancelled")
    assert row["estimated"] is True
    assert row["completion_tokens"] == TOOL_TOKENS > 6000  # the name and every piece of the arguments


def test_reasoning_cut_before_usage_is_charged_its_reasoning(urls: dict[str, str], base_settings: Settings) -> None:
    call = Call(urls["roomy"], base_settings.database_url, "reasoning", max_tokens=10_000)
    call.hang_up(finished)
    row = call.charged(status="cancelled")
    assert row["estimated"] is True
    # The reasoning and the answer, joined as they streamed (a token may span the join: within one)
    assert abs(row["completion_tokens"] - REASONING_TOKENS) <= 1 and REASONING_TOKENS > 4000


@pytest.mark.parametrize(
    "model, tokens",
    [("tool-args", TOOL_TOKENS), ("reasoning", REASONING_TOKENS)],
)
def test_an_answer_without_usage_is_charged_its_tool_call_or_reasoning(
    urls: dict[str, str], base_settings: Settings, model: str, tokens: int
) -> None:
    call = Call(urls["roomy"], base_settings.database_url, model, max_tokens=10_000)
    answer = call.run().json()
    assert answer["choices"][0]["message"]["tool_calls" if model == "tool-args" else "reasoning_content"]
    row = call.charged(status="ok")
    assert row["estimated"] is True
    assert abs(row["completion_tokens"] - tokens) <= 1


# --- An estimate never exceeds the reservation --------------------------------------------------

DENSE_CAP = 600  # the review's max_tokens: reserved at most the prompt + 600 of a 1,000 budget


def test_dense_tokens_cut_by_the_client_are_charged_no_more_than_was_reserved(
    urls: dict[str, str], base_settings: Settings
) -> None:
    """600 characters the model counts 1 each and cl100k 4 each; the client leaves after 590 of them. It was
    charged 2,371 against a budget of 1,000."""
    call = Call(urls["small"], base_settings.database_url, "dense", max_tokens=DENSE_CAP)
    call.hang_up(lambda events: len(events) >= 590)
    row = call.charged(status="cancelled")
    assert row["estimated"] is True
    assert row["completion_tokens"] == DENSE_CAP  # 590 x 4 counted, capped at what was reserved for the answer
    assert row["total_tokens"] == row["prompt_tokens"] + DENSE_CAP <= SMALL


@pytest.mark.parametrize("stream", [True, False])
def test_dense_tokens_without_usage_are_charged_no_more_than_was_reserved(
    urls: dict[str, str], base_settings: Settings, stream: bool
) -> None:
    call = Call(urls["small"], base_settings.database_url, "dense", max_tokens=DENSE_CAP, stream=stream)
    call.run()
    row = call.charged(status="ok")
    assert row["estimated"] is True
    assert (row["completion_tokens"], row["total_tokens"]) == (DENSE_CAP, row["prompt_tokens"] + DENSE_CAP)
    assert call.budgets()[0]["used"] <= SMALL


def test_capped_estimates_keep_a_shared_team_budget_within_its_limit(
    urls: dict[str, str], base_settings: Settings
) -> None:
    """Two people of one team of 1,000, each with room of their own: the second is granted what the team has
    left, its answer capped to it, and its estimate too."""
    team = uid("team")
    first, second = (
        Call(urls["team"], base_settings.database_url, "dense", tenant=team, max_tokens=DENSE_CAP, stream=True)
        for _ in range(2)
    )
    first.run()
    assert first.charged(status="ok")["completion_tokens"] == DENSE_CAP
    second.run()
    row = second.charged(status="ok")
    assert 0 < row["completion_tokens"] < DENSE_CAP  # the team's room, shared with a holdback
    user, tenant = second.budgets()
    assert (user["subject_type"], tenant["subject_type"]) == ("user", "tenant")
    assert tenant["used"] == first.record()["total_tokens"] + row["total_tokens"] <= SMALL


@pytest.mark.parametrize("stream", [True, False])
def test_usage_the_upstream_reports_above_the_reservation_is_charged_as_reported(
    urls: dict[str, str], base_settings: Settings, stream: bool
) -> None:
    """Only the proxy's own estimates are capped: the upstream's usage is the truth."""
    call = Call(urls["small"], base_settings.database_url, "over-report", max_tokens=DENSE_CAP, stream=stream)
    call.run()
    row = call.charged(status="ok")
    assert row["estimated"] is False
    assert (row["prompt_tokens"], row["completion_tokens"], row["total_tokens"]) == (20, 6000, 6020)
    assert call.budgets()[0]["used"] == 6020 > SMALL


def test_without_clamping_an_estimate_charges_what_was_delivered(urls: dict[str, str], base_settings: Settings) -> None:
    """CLAMP_MAX_TOKENS=false: the proxy caps no answer, so nothing bounds one, and a hang-up must not make
    the rest of it free: the estimate counts all that was delivered."""
    call = Call(urls["unclamped"], base_settings.database_url, "dense", max_tokens=50, stream=True)
    call.run()
    row = call.charged(status="ok")
    assert row["estimated"] is True and row["completion_tokens"] == 4 * 50
