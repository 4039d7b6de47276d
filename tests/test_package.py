"""The package as an operator installs it: a wheel built from the repository, in a fresh virtualenv."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import asyncpg
import httpx
import pytest

from .conftest import TEST_DATABASE_URL
from .devstack import free_port
from .helpers import JWT_SECRET, eventually

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the repository tracks, so no build/ left over from an earlier build leaks in.
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in ("proxy", "sql"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return next(out.glob("quota_sidecar-*.whl"))


def test_the_wheel_holds_the_migrations_and_no_development_harness(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    shipped = sorted(n.removeprefix("proxy/sql/") for n in names if n.startswith("proxy/sql/") and n.endswith(".sql"))
    assert shipped == sorted(p.name for p in (ROOT / "sql").glob("*.sql"))
    assert "proxy/budget/reserve.lua" in names and "proxy/budget/settle.lua" in names
    assert "proxy/templates/base.html" in names and "proxy/static/style.css" in names  # the pages
    assert not [n for n in names if "devstack" in n or n.startswith("tests/")]


def test_installed_wheel_migrates_an_empty_database_and_serves(wheel: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The dependencies come from the development environment (no download); the package only from the wheel.
    site = Path(sysconfig.get_paths(vars={"base": str(venv), "platbase": str(venv)})["purelib"])
    (site / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", str(wheel)], check=True, timeout=120)
    found = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import proxy, pathlib; print(pathlib.Path(proxy.__file__).parent)"],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout.strip()
    assert found.startswith(str(venv)), f"proxy imported from {found}, not the wheel"

    database = f"pkg_{secrets.token_hex(4)}"
    admin_url = TEST_DATABASE_URL.rsplit("/", 1)[0] + "/postgres"
    _sql(admin_url, f"create database {database}")
    try:
        env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_", "REDIS_", "LEDGER_"))},
            "DATABASE_URL": TEST_DATABASE_URL.rsplit("/", 1)[0] + f"/{database}",
            "REDIS_URL": "redis://127.0.0.1:6379/12",
            "JWT_SECRET": JWT_SECRET,
            "LITELLM_MASTER_KEY": "sk-unused",
            "LITELLM_BASE_URL": "http://127.0.0.1:9",
            "LEDGER_WRITER": "off",
            "PROXY_PORT": str(free_port()),
        }
        cli = str(venv / "bin" / "quota-sidecar")
        migrated = subprocess.run([cli, "migrate"], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert migrated.returncode == 0, migrated.stderr
        assert "004_request_labels.sql" in migrated.stdout
        server = subprocess.Popen([cli, "serve"], env=env, cwd=tmp_path, stderr=subprocess.PIPE)
        try:
            url = f"http://127.0.0.1:{env['PROXY_PORT']}/healthz"
            eventually(lambda: httpx.get(url, timeout=1).json()["status"] == "ok", timeout=30)
        finally:
            server.terminate()
            server.communicate(timeout=20)
    finally:
        time.sleep(0.2)  # the server's pool lets go of the database
        _sql(admin_url, f"drop database if exists {database} with (force)")


def _sql(dsn: str, statement: str) -> None:
    import asyncio

    async def run() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())
