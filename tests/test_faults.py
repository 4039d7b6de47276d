"""Every way a request can end, against an upstream that misbehaves on purpose.

Each test checks what the client saw, what the ledger recorded, and what the budget moved.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace

import httpx
import orjson
import pytest

from proxy.app import create_app
from proxy.config import Settings
from proxy.tokens import Tokenizer

from .fake_upstream import USAGE, FakeUpstream
from .helpers import eventually, pg_row, serve, token, uid


@pytest.fixture(scope="module")
def proxy_url(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    settings = replace(base_settings, litellm_base_url=fake.url, upstream_read_timeout=1.0)
    with serve(create_app(settings)) as url:
        yield url


class Call:
    """One streamed chat request by a fresh user; what came back, and what was recorded."""

    def __init__(self, proxy_url: str, model: str, dsn: str) -> None:
        self.user, self.request_id, self.dsn, self.proxy_url = uid(), uid("req"), dsn, proxy_url
        self.headers = {"Authorization": f"Bearer {token(self.user)}", "X-Request-Id": self.request_id}
        self.body = {"model": model, "stream": True, "messages": [{"role": "user", "content": "hello there"}]}

    def run(self) -> httpx.Response:
        return httpx.post(f"{self.proxy_url}/v1/chat/completions", headers=self.headers, json=self.body, timeout=10)

    def record(self):  # type: ignore[no-untyped-def]
        return eventually(
            lambda: pg_row(self.dsn, "select * from usage_records where client_request_id = $1", self.request_id)
        )

    def quota(self) -> dict:
        r = httpx.get(f"{self.proxy_url}/v1/quota", headers=self.headers)
        return r.json()["budgets"][0]

    def settled(self, used: int) -> None:
        eventually(lambda: (self.quota()["used"], self.quota()["reserved"]) == (used, 0))


TOKENS = Tokenizer.load()  # the proxy counts missing usage with the same cl100k_base file


def data_events(text: str) -> list[str]:
    return [e[6:] for e in text.split("\n\n") if e.startswith("data: ")]


def test_complete_stream_is_charged_its_usage(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "fake", base_settings.database_url)
    r = call.run()
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert data_events(r.text)[-1] == "[DONE]"
    row = call.record()
    assert (row["status"], row["total_tokens"], row["estimated"], row["served_model"]) == (
        "ok",
        USAGE["total_tokens"],
        False,
        "fake-served",
    )
    call.settled(USAGE["total_tokens"])


def test_stream_without_usage_is_estimated_from_what_was_streamed(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "no-usage-stream", base_settings.database_url)
    assert call.run().status_code == 200
    row = call.record()
    assert row["status"] == "ok" and row["estimated"] is True
    assert row["completion_tokens"] == TOKENS.count("part0 part1 part2 ")  # exactly what was streamed
    call.settled(row["total_tokens"])


def test_upstream_dropping_the_connection_mid_stream(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "cut-stream", base_settings.database_url)
    r = call.run()
    assert r.status_code == 200  # the headers were out before the upstream broke
    events = data_events(r.text)
    assert [orjson.loads(e)["choices"][0]["delta"]["content"] for e in events[:3]] == ["part0 ", "part1 ", "part2 "]
    error = orjson.loads(events[-1])["error"]
    assert error["code"] == "upstream_error" and "broke off" in error["message"]
    row = call.record()
    assert (row["status"], row["estimated"]) == ("upstream_error", True)
    assert row["completion_tokens"] == TOKENS.count("part0 part1 part2 ")
    call.settled(row["total_tokens"])  # only what was delivered


def test_upstream_stalling_mid_stream_hits_the_read_timeout(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "stall", base_settings.database_url)
    started = time.monotonic()
    r = call.run()
    assert time.monotonic() - started < 5
    error = orjson.loads(data_events(r.text)[-1])["error"]
    assert error["code"] == "upstream_timeout"
    row = call.record()
    assert row["status"] == "upstream_error" and row["estimated"] is True
    call.settled(row["total_tokens"])


def test_malformed_sse_line_passes_through_and_the_rest_is_counted(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "malformed", base_settings.database_url)
    r = call.run()
    assert data_events(r.text)[0] == "{this is not json"
    assert call.record()["total_tokens"] == USAGE["total_tokens"]


def test_slow_first_byte_is_waited_for_and_measured(proxy_url: str, base_settings: Settings) -> None:
    call = Call(proxy_url, "slow-first-byte", base_settings.database_url)
    assert call.run().status_code == 200
    row = call.record()
    assert row["status"] == "ok" and 500 <= row["ttft_ms"] < 1500


def test_upstream_errors_before_streaming_pass_through_with_their_status(
    proxy_url: str, base_settings: Settings
) -> None:
    for model, status in (("bad-request", 400), ("server-error", 500)):
        call = Call(proxy_url, model, base_settings.database_url)
        r = call.run()
        assert r.status_code == status and "error" in r.json()
        row = call.record()
        assert (row["status"], row["http_status"], row["total_tokens"]) == ("upstream_error", status, 0)
        call.settled(0)


def test_client_hanging_up_cancels_the_upstream_and_charges_what_was_streamed(
    proxy_url: str, fake: FakeUpstream, base_settings: Settings
) -> None:
    call = Call(proxy_url, "endless", base_settings.database_url)
    with httpx.stream(
        "POST", f"{proxy_url}/v1/chat/completions", headers=call.headers, json=call.body, timeout=10
    ) as r:
        seen = b""
        for part in r.iter_bytes():
            seen += part
            if seen.count(b"part") >= 2:
                break
    hung_up = time.monotonic()
    eventually(lambda: "endless" in fake.cancelled, timeout=5)
    assert time.monotonic() - hung_up < 2  # the upstream request was closed promptly
    row = call.record()
    assert (row["status"], row["estimated"]) == ("cancelled", True)
    # two or three "partN " deltas, not the endless rest
    assert row["completion_tokens"] in (TOKENS.count("part0 part1 "), TOKENS.count("part0 part1 part2 "))
    call.settled(row["total_tokens"])


def test_concurrency_cap_answers_503_when_saturated(base_settings: Settings, fake: FakeUpstream) -> None:
    settings = replace(base_settings, litellm_base_url=fake.url, upstream_max_concurrency=2)
    with serve(create_app(settings)) as url:
        # Endless streams hold both slots: in flight once their headers are back, until the client hangs up
        # (streams that end on their own could end, under load, before the third request comes).
        with ExitStack() as streams:
            results = [
                streams.enter_context(
                    httpx.stream("POST", f"{url}/v1/chat/completions", headers=c.headers, json=c.body, timeout=10)
                ).status_code
                for c in (Call(url, "endless", base_settings.database_url) for _ in range(2))
            ]
            r = Call(url, "fake", base_settings.database_url).run()
            assert r.status_code == 503 and "concurrent requests" in r.json()["error"]["message"]
        assert results == [200, 200]
        # Capacity is given back: a hung-up stream's once the proxy notices, an answered one's before its end.
        eventually(lambda: Call(url, "fake", base_settings.database_url).run().status_code == 200, timeout=5)
        for _ in range(2):
            assert Call(url, "fake", base_settings.database_url).run().status_code == 200


def test_streamed_answer_past_the_warn_ratio_ends_with_a_notice(base_settings: Settings, fake: FakeUpstream) -> None:
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=75)
    with serve(create_app(settings)) as url:
        call = Call(url, "fake", base_settings.database_url)
        for used in (12, 24, 36, 48):  # up to 64 %: no notice
            assert "budget" not in call.run().text
            call.settled(used)
        r = call.run()  # 60 of 75: 80 %
        deltas = [orjson.loads(e)["choices"][0]["delta"].get("content") for e in data_events(r.text)[:-1]]
        notice, _, link = deltas[-1].partition(" [See your usage statement](")
        assert notice == "\n\n> You have used 80 % of your monthly token budget (60 of 75)."
        assert link.startswith(f"{url}/me?s=") and link.endswith(")")  # a markdown link: one click in LibreChat
        assert r.headers["x-quota-state"] == "ok"  # the headers went out before the usage was known
        call.settled(60)
        plain = httpx.post(f"{url}/v1/chat/completions", headers=call.headers, json={**call.body, "stream": False})
        assert plain.json()["choices"][0]["message"]["content"] == "ok"  # non-streamed bodies are never altered
        assert plain.headers["x-quota-state"] == "warn"  # 72 of 75


def test_no_notice_below_the_warn_ratio_or_when_off(base_settings: Settings, fake: FakeUpstream) -> None:
    for budget, notice in ((1000, "inline"), (14, "off")):
        settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=budget, quota_notice=notice)
        with serve(create_app(settings)) as url:
            r = Call(url, "fake", base_settings.database_url).run()
            assert "budget" not in r.text
