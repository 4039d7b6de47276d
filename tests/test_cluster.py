"""The budget scripts unchanged on a 3-node Redis Cluster the test starts on loopback ports."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from proxy.auth import Identity
from proxy.budget import BudgetEngine
from proxy.budget.rows import BudgetBook
from proxy.config import Settings
from proxy.errors import QuotaExceeded

from .devstack import spawn
from .helpers import eventually, redis_server_executable, uid

pytestmark = pytest.mark.anyio


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def cluster_port() -> int:
    """A port whose cluster bus port (port + 10000) is free too, both below the ephemeral range
    (32768 and up on Linux), where an outgoing connection may be holding either."""
    for _ in range(500):
        port = random.randint(11000, 22000)
        if _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[int]]:
    exe = redis_server_executable()
    cli = shutil.which("redis-cli") or str(Path(exe).with_name("redis-cli"))
    ports = [cluster_port() for _ in range(3)]
    procs = []
    try:
        for port in ports:
            node = tmp_path_factory.mktemp(f"node{port}")
            args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes"]
            args += ["--cluster-config-file", str(node / "nodes.conf"), "--dir", str(node)]
            procs.append(spawn([*args, "--save", "", "--appendonly", "no"], node / "redis.log"))
        for port in ports:
            eventually(lambda port=port: redis.Redis(port=port).ping(), timeout=10)
        subprocess.run(
            [
                cli,
                "--cluster",
                "create",
                *(f"127.0.0.1:{p}" for p in ports),
                "--cluster-replicas",
                "0",
                "--cluster-yes",
            ],
            check=True,
            capture_output=True,
            timeout=30,
        )
        eventually(lambda: redis.Redis(port=ports[0]).cluster("info").get("cluster_state") == "ok", timeout=20)
        yield ports
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


async def test_budget_scripts_run_unchanged_on_a_cluster(cluster: list[int], pg_pool, base_settings: Settings) -> None:
    client = RedisCluster(host="127.0.0.1", port=cluster[0])
    try:
        settings = Settings(default_token_budget=1000, default_tenant_budget=500)
        engine = BudgetEngine(client, BudgetBook(settings), pg_pool)  # type: ignore[arg-type]
        team = uid("team")
        # Users of different tenants land on different nodes; each request's keys share one slot.
        users = [Identity(uid(), team), Identity(uid(), uid("other")), Identity(uid())]
        slots = {await client.cluster_keyslot(engine.scopes(u, time.time())[0].key) for u in users}
        assert len(slots) == 3
        for me in users:  # first use: each counter is seeded from PostgreSQL, then reserved and settled
            r = await engine.reserve(me, uid("req"), 10, 100)
            assert await engine.settle(r, 60) == [60] * len(r.scopes)
        # The tenant budget (500) is shared by its users and blocks them together.
        mate = Identity(uid(), team)
        r = await engine.reserve(mate, "big", 10, 1000)
        assert r.granted == 440
        await engine.settle(r, 440)
        with pytest.raises(QuotaExceeded, match="Your team's"):
            await engine.reserve(Identity(uid(), team), "x", 10, 20)
    finally:
        await client.aclose()
