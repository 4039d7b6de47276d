"""The ledger through outages: PostgreSQL stopped mid-traffic, the proxy killed with records in flight.

These tests start their own PostgreSQL cluster (initdb/pg_ctl on a spare port) so the shared one stays up.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import asyncpg
import httpx
import pytest

from proxy.config import Settings
from proxy.db import migrate

from .devstack import alive, children, free_port, start_proxy, stop
from .fake_upstream import FakeUpstream
from .helpers import PostgresProcess, count_rows, eventually, send, settings_env, uid


@pytest.fixture
def private_pg() -> Iterator[PostgresProcess]:
    server = PostgresProcess().init()

    async def prepare() -> None:
        conn = await asyncpg.connect(server.url)
        await migrate(conn)
        await conn.close()

    asyncio.run(prepare())
    yield server
    server.remove()


def proxy_env(base: Settings, fake: FakeUpstream, pg: PostgresProcess) -> dict[str, str]:
    settings = replace(
        base,
        database_url=pg.url,
        litellm_base_url=fake.url,
        ledger_stream=f"test:durable:{uid()}",
        ledger_consumer=f"writer-{uid()}",
        ledger_flush_seconds=0.05,
        budget_refresh_seconds=0.5,
        ledger_writer="process",  # the default: the writer is the proxy's child
    )
    return settings_env(settings)


def test_postgres_down_for_a_while_loses_nothing(
    base_settings: Settings, fake: FakeUpstream, private_pg: PostgresProcess, tmp_path: Path
) -> None:
    env = proxy_env(base_settings, fake, private_pg)
    port = free_port()
    proc = start_proxy(env, port, tmp_path / "proxy.log")
    url = f"http://127.0.0.1:{port}"
    users = [uid() for _ in range(3)]
    try:
        before = send(url, users, 15)
        eventually(lambda: count_rows(private_pg.url, before) == 15)
        private_pg.stop()
        during = send(url, users, 30)  # served: the budget lives in Redis
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503
        assert ready.json()["checks"]["postgres"].startswith("error") and ready.json()["checks"]["ledger_backlog"] >= 30
        private_pg.start()
        eventually(lambda: count_rows(private_pg.url, before + during) == 45, timeout=20)
        eventually(lambda: httpx.get(f"{url}/readyz").json()["checks"]["ledger_backlog"] == 0)
    finally:
        stop(proc)


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_proxy_killed_with_records_in_flight_loses_none(
    base_settings: Settings, fake: FakeUpstream, private_pg: PostgresProcess, tmp_path: Path, stream: bool
) -> None:
    # Killed right after the client has its last answer: a record is written to Redis before the
    # answer (or, streamed, its [DONE]) is sent, so none of the answered requests can be lost.
    env = proxy_env(base_settings, fake, private_pg)
    port = free_port()
    proc = start_proxy(env, port, tmp_path / "proxy.log")
    users = [uid() for _ in range(2)]
    send(f"http://127.0.0.1:{port}", users, 2)  # counters seeded while PostgreSQL is up
    writers = children(proc.pid)
    assert writers, "the proxy runs its ledger writer as a child process"
    private_pg.stop()  # records now wait in the stream, some already delivered to this writer
    answered = send(f"http://127.0.0.1:{port}", users, 25, stream=stream)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Its orphaned writer notices within a second or two and exits, mid-batch or not.
    eventually(lambda: not any(alive(pid) for pid in writers), timeout=10)
    private_pg.start()
    restarted = start_proxy(env, free_port(), tmp_path / "proxy2.log")
    try:
        eventually(lambda: count_rows(private_pg.url, answered) == 25, timeout=20)
    finally:
        stop(restarted)
