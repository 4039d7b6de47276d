"""The ledger writer in its own process: started by the proxy, restarted when it dies, visible in
/metrics; and `python -m proxy ledger` for proxies that run none (LEDGER_WRITER=off)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import replace
from typing import Any

import httpx
from starlette.applications import Starlette

from proxy.app import create_app
from proxy.config import Settings

from .devstack import ROOT, alive
from .fake_upstream import FakeUpstream
from .helpers import count_rows, eventually, send, serve, settings_env, uid


def recorded(settings: Settings, ids: list[str]) -> int:
    return count_rows(settings.database_url, ids)


def written_metric(url: str, sample: str = "quota_ledger_written_total") -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[1])
    return 0.0


def writer_of(app: Starlette) -> Any:
    return app.state.services.writer


def test_a_writer_process_records_requests_and_reports_to_metrics(base_settings: Settings, fake: FakeUpstream) -> None:
    settings = replace(
        base_settings, litellm_base_url=fake.url, ledger_writer="process", ledger_stream=f"test:writer:{uid()}"
    )
    app = create_app(settings)
    with serve(app) as url:
        pid = eventually(lambda: writer_of(app).pid)  # spawned by a task that start-up does not wait for
        assert pid is not None and pid != os.getpid() and alive(pid)
        ids = send(url, [uid()], 12)
        eventually(lambda: recorded(settings, ids) == 12, timeout=20)
        # The child's counter reaches the parent's /metrics over the pipe.
        eventually(lambda: written_metric(url) >= 12, timeout=10)
        # And its batches: how many records, and how long each took.
        eventually(lambda: written_metric(url, "quota_ledger_batch_records_sum") >= 12, timeout=10)
        assert written_metric(url, "quota_ledger_batch_seconds_count") >= 1
        assert written_metric(url, "quota_ledger_batch_seconds_sum") > 0
    eventually(lambda: not alive(pid), timeout=10)  # stopped with the proxy


def test_a_writer_process_that_dies_is_restarted_and_loses_nothing(base_settings: Settings, fake: FakeUpstream) -> None:
    settings = replace(
        base_settings, litellm_base_url=fake.url, ledger_writer="process", ledger_stream=f"test:writer:{uid()}"
    )
    app = create_app(settings)
    with serve(app) as url:
        first = eventually(lambda: writer_of(app).pid)
        os.kill(first, signal.SIGKILL)
        ids = send(url, [uid()], 10)  # answered while no writer runs: the records wait in the stream
        eventually(lambda: writer_of(app).pid not in (None, first), timeout=15)
        eventually(lambda: recorded(settings, ids) == 10, timeout=20)


def test_the_ledger_command_drains_for_proxies_that_run_no_writer(base_settings: Settings, fake: FakeUpstream) -> None:
    settings = replace(
        base_settings, litellm_base_url=fake.url, ledger_writer="off", ledger_stream=f"test:writer:{uid()}"
    )
    app = create_app(settings)
    with serve(app) as url:
        ids = send(url, [uid()], 8)
        assert writer_of(app) is None
        eventually(lambda: httpx.get(f"{url}/readyz").json()["checks"]["ledger_backlog"] == 8)
        assert recorded(settings, ids) == 0
        writer = subprocess.Popen(
            [sys.executable, "-m", "proxy", "ledger"],
            env={**os.environ, **settings_env(settings)},
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            eventually(lambda: recorded(settings, ids) == 8, timeout=20)
            eventually(lambda: httpx.get(f"{url}/readyz").json()["checks"]["ledger_backlog"] == 0)
        finally:
            writer.send_signal(signal.SIGINT)
            _, err = writer.communicate(timeout=10)
        assert writer.returncode == 0, err.decode()
        assert b"Traceback" not in err
