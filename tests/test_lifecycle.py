"""A real `python -m proxy serve` stopped with SIGTERM (streams in flight finish, are settled and recorded
before it exits 0), and run with two workers on one port (one budget, one ledger writer)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import orjson
import redis

from proxy import host_metrics
from proxy.config import Settings

from .devstack import alive, children, free_port, start_proxy, stop
from .fake_upstream import FakeUpstream
from .helpers import CHAT, count_rows, eventually, pg_row, scrape, settings_env, token, uid


def proxy_env(base: Settings, fake: FakeUpstream, **changes: Any) -> dict[str, str]:
    settings = replace(
        base,
        litellm_base_url=fake.url,
        ledger_stream=f"test:lifecycle:{uid()}",
        ledger_consumer="",
        ledger_writer="process",  # the default: stopped last, after it moved the stream's records
        **changes,
    )
    return settings_env(settings)


@contextmanager
def held(fake: FakeUpstream) -> Iterator[None]:
    """Streams of the model `held` wait after their first chunks until the block ends (or are released)."""
    fake.release.clear()
    try:
        yield
    finally:
        fake.release.set()


def stream_chat(url: str, user: str, request_id: str) -> str:
    """A streamed chat of the model `held`; what arrived, also when the proxy cut it."""
    text = ""
    headers = {"Authorization": f"Bearer {token(user)}", "X-Request-Id": request_id}
    body = {**CHAT, "model": "held", "stream": True}
    try:
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60) as r:
            assert r.status_code == 200, r.read()
            for piece in r.iter_text():
                text += piece
    except httpx.HTTPError:
        pass  # cut: the caller looks at what arrived
    return text


def chat(url: str, user: str) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/chat/completions", json=CHAT, headers={"Authorization": f"Bearer {token(user)}"}, timeout=30
    )


def reserved(redis_url: str, user: str) -> int:
    """Tokens still reserved in Redis for the user, over every counter of theirs, with reservations not yet
    settled (their r:<request id> fields) counted as one each."""
    client = redis.Redis.from_url(redis_url)
    try:
        total = 0
        for key in client.scan_iter(match=f"quota:*:user:{user}:*"):
            if client.type(key) == b"hash":
                fields = client.hgetall(key)
                total += int(fields.get(b"reserved", 0)) + sum(1 for f in fields if f.startswith(b"r:"))
        return total
    finally:
        client.close()


def process_tree(pid: int) -> list[int]:
    found = children(pid)
    return found + [p for child in found for p in process_tree(child)]


def comm(pid: int) -> str:
    return Path(f"/proc/{pid}/comm").read_text().strip()


def test_sigterm_lets_twenty_streams_finish_and_settles_everything(
    base_settings: Settings, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = proxy_env(base_settings, fake, shutdown_delay_seconds=3.0, shutdown_grace_seconds=30.0)
    url = f"http://127.0.0.1:{free_port()}"
    proc = start_proxy(env, int(url.rsplit(":", 1)[1]), tmp_path / "proxy.log")
    user, ids = uid(), [uid("req") for _ in range(20)]
    try:
        with held(fake), ThreadPoolExecutor(20) as pool:
            streams = [pool.submit(stream_chat, url, user, rid) for rid in ids]
            eventually(lambda: fake.holding == 20)
            writers = children(proc.pid)
            proc.send_signal(signal.SIGTERM)

            ready = eventually(lambda: (r := httpx.get(f"{url}/readyz")).status_code == 503 and r)
            assert ready.json()["status"] == "draining"
            # For SHUTDOWN_DELAY_SECONDS new requests are still served, told to close their connection ...
            late = chat(url, user)
            assert late.status_code == 200 and late.headers["connection"] == "close"
            # ... then refused, while the streams go on.
            refused = eventually(lambda: (r := chat(url, user)).status_code == 503 and r, timeout=20, interval=0.2)
            assert refused.json()["error"]["code"] == "shutting_down"
            assert refused.headers["connection"] == "close"
            assert proc.poll() is None
            assert httpx.get(f"{url}/healthz").status_code == 200

            fake.release.set()
            answers = [s.result(timeout=30) for s in streams]
        assert all(a.rstrip().endswith("data: [DONE]") for a in answers), answers
        assert proc.wait(timeout=30) == 0
        # Asked at once: the writer moved every record to PostgreSQL before the proxy exited.
        assert count_rows(base_settings.database_url, ids) == 20
        assert reserved(base_settings.redis_url, user) == 0
        assert not any(alive(pid) for pid in writers)
    finally:
        stop(proc)


def test_a_stream_past_the_grace_is_cut_and_settled_as_estimated(
    base_settings: Settings, fake: FakeUpstream, tmp_path: Path
) -> None:
    env = proxy_env(base_settings, fake, shutdown_delay_seconds=0.2, shutdown_grace_seconds=1.5)
    port = free_port()
    proc = start_proxy(env, port, tmp_path / "proxy.log")
    user, rid = uid(), uid("req")
    try:
        with held(fake), ThreadPoolExecutor(1) as pool:
            stream = pool.submit(stream_chat, f"http://127.0.0.1:{port}", user, rid)
            eventually(lambda: fake.holding == 1)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
            answer = stream.result(timeout=10)
        assert "part0" in answer and "[DONE]" not in answer
        # Told why, in the stream (the SDKs raise it as an APIError), and nothing in the log but the stop.
        last = orjson.loads(answer.strip().rsplit("data: ", 1)[1])
        assert last["error"]["code"] == "shutting_down", answer
        log = (tmp_path / "proxy.log").read_text()
        assert "Traceback" not in log and "Exception in ASGI application" not in log, log
        row = pg_row(
            base_settings.database_url,
            "select status, estimated, completion_tokens from usage_records where client_request_id = $1",
            rid,
        )
        assert row is not None and row["status"] == "cancelled" and row["estimated"]
        assert row["completion_tokens"] > 0  # the answer text that went out, counted
        assert reserved(base_settings.redis_url, user) == 0
    finally:
        stop(proc)


def chat_requests_counted(text: str) -> int:
    """quota_requests_total of chat, all outcomes, in a /metrics text."""
    return sum(
        int(float(v)) for v in re.findall(r'^quota_requests_total\{[^}]*endpoint="chat"[^}]*\} (\S+)$', text, re.M)
    )


def scraped(url: str) -> str:
    """/metrics on a new connection: the kernel hands it to either worker."""
    return httpx.get(f"{url}/metrics", headers={"Connection": "close"}).text


def snapshot(metrics_dir: Path, worker: int) -> tuple[int, int]:
    """Worker `worker`'s snapshot file: the pid that wrote it and the chat requests it counts."""
    path = metrics_dir / f"{worker}.json"
    if not path.exists():
        return 0, 0
    requests = host_metrics.read(path).get("quota_requests")
    counted = sum(v for (_, labels), v in requests.samples.items() if ("endpoint", "chat") in labels) if requests else 0
    return orjson.loads(path.read_bytes())["pid"], int(counted)


def started_dir(log: Path) -> str:
    """The metrics directory the supervisor logged at start."""
    started = next(json.loads(line) for line in log.read_text().splitlines() if "proxy_workers_started" in line)
    return str(started["metrics_dir"])


def test_two_workers_share_one_budget_and_one_writer(
    base_settings: Settings, fake: FakeUpstream, tmp_path: Path
) -> None:
    limit = 560  # room for about five of these requests
    env = proxy_env(
        base_settings,
        fake,
        proxy_workers=2,
        default_token_budget=limit,
        holdback_tokens=0,
        shutdown_delay_seconds=0,
        log_level="info",  # for the workers' proxy_worker_ready
    )
    # Left behind by supervisors SIGKILLed before their cleanup: one gone (removed at start), one alive (kept).
    env["TMPDIR"] = str(tmp_path)
    gone = subprocess.Popen(["true"])
    gone.wait()
    (tmp_path / f"quota-metrics-{gone.pid}-x1").mkdir()
    (tmp_path / f"quota-metrics-{gone.pid}-x1" / "0.json").write_text("{}")
    (tmp_path / f"quota-metrics-{os.getpid()}-x2").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "proxy.log"
    proc = start_proxy(env, port, log)
    user = uid()
    try:
        eventually(lambda: log.read_text().count('"proxy_worker_ready"') == 2, timeout=60)
        mine = Path(eventually(lambda: started_dir(log))).name
        assert mine.startswith(f"quota-metrics-{proc.pid}-")
        left = sorted(d.name for d in tmp_path.glob("quota-metrics-*"))
        assert left == sorted([f"quota-metrics-{os.getpid()}-x2", mine]), left
        names = [comm(pid) for pid in process_tree(proc.pid)]
        assert names.count("quota-worker") == 2 and names.count("quota-writer") == 1, names

        body = {**CHAT, "model": "honest-slow", "max_tokens": 100}  # billed its whole cap, after 0.3 s

        def one(_: int) -> int:
            with httpx.Client(timeout=30) as client:  # a connection each: the kernel hands them to either worker
                headers = {"Authorization": f"Bearer {token(user)}"}
                return client.post(f"{url}/v1/chat/completions", json=body, headers=headers).status_code

        assert one(0) == 200  # a first request on its own: 51 in all
        with ThreadPoolExecutor(50) as pool:
            statuses = list(pool.map(one, range(50)))
        assert set(statuses) <= {200, 429} and 200 in statuses and 429 in statuses, statuses

        # Both workers served, and every scrape, whichever worker answers it, counts all 51.
        metrics_dir = Path(started_dir(log))
        assert metrics_dir.stat().st_mode & 0o777 == 0o700

        def counts() -> list[int]:
            return [snapshot(metrics_dir, i)[1] for i in (0, 1)]

        eventually(lambda: sum(counts()) == 51, timeout=20)
        assert all(counts()), counts()
        assert [chat_requests_counted(scraped(url)) for _ in range(8)] == [51] * 8
        # The supervisor's ledger writer's series too.
        eventually(lambda: scrape(scraped(url)).get(("quota_ledger_written_total",)) == 51, timeout=20)
        # The writer's batches too, from the supervisor's file: every record in one batch or another.
        eventually(lambda: scrape(scraped(url)).get(("quota_ledger_batch_records_sum",)) == 51, timeout=20)

        # A worker killed and started again: no scrape shows fewer, then its successor counts on from its 51.
        killed = snapshot(metrics_dir, 0)[0]
        os.kill(killed, signal.SIGKILL)

        shown: list[int] = []

        def restarted() -> bool:
            shown.append(chat_requests_counted(scraped(url)))
            pid = snapshot(metrics_dir, 0)[0]
            return pid not in (killed, proc.pid) and comm(pid) == "quota-worker"

        eventually(restarted, timeout=60, interval=0.2)
        assert set(shown) == {51}, shown
        with ThreadPoolExecutor(10) as pool:
            statuses += list(pool.map(one, range(10)))
        eventually(lambda: sum(counts()) == 61, timeout=20)
        assert [chat_requests_counted(scraped(url)) for _ in range(8)] == [61] * 8

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        assert not metrics_dir.exists()  # a clean stop removes its own
        used, rows = pg_row(
            base_settings.database_url,
            "select coalesce(sum(total_tokens), 0), count(*) from usage_records where user_id = $1",
            user,
        )
        assert rows == 61  # refusals are recorded too; all written before the supervisor exited
        assert 0 < used <= limit
        assert reserved(base_settings.redis_url, user) == 0
    finally:
        stop(proc)
