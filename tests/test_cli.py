"""proxy/cli.py: `main([...])` for migrate, token issue and budget set/show, its exit codes and messages.

The commands run against the test PostgreSQL, in a schema of their own (search_path in DATABASE_URL), so
the '*' rows `migrate` writes and the budgets set here never reach other tests' tables.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import fields
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import orjson
import pytest

from proxy.budget.rows import period_bounds
from proxy.cli import main
from proxy.config import Settings
from proxy.db import migrate, migration_files

from .devstack import free_port
from .helpers import JWT_SECRET, uid


def run_sql(dsn: str, *statements: str, args: tuple[Any, ...] = ()) -> Any:
    async def go() -> Any:
        conn = await asyncpg.connect(dsn)
        try:
            result = None
            for statement in statements:
                result = await conn.fetch(statement, *args) if args else await conn.fetch(statement)
            return result
        finally:
            await conn.close()

    return asyncio.run(go())


def new_schema(base_settings: Settings) -> tuple[str, str]:
    schema = f"cli_{secrets.token_hex(4)}"
    run_sql(base_settings.database_url, f"create schema {schema}")
    return schema, f"{base_settings.database_url}?search_path={schema}"


@pytest.fixture(scope="module")
def db(base_settings: Settings) -> Iterator[str]:
    """A migrated schema of this module's own: its DATABASE_URL."""
    schema, dsn = new_schema(base_settings)

    async def prepare() -> None:
        conn = await asyncpg.connect(dsn)
        try:
            await migrate(conn)
        finally:
            await conn.close()

    asyncio.run(prepare())
    yield dsn
    run_sql(base_settings.database_url, f"drop schema {schema} cascade")


@pytest.fixture
def fresh_db(base_settings: Settings) -> Iterator[str]:
    """An empty schema: its DATABASE_URL."""
    schema, dsn = new_schema(base_settings)
    yield dsn
    run_sql(base_settings.database_url, f"drop schema {schema} cascade")


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """Nothing from the developer's environment or a .env: each test sets what it needs."""
    for f in fields(Settings):
        monkeypatch.delenv(f.name.upper(), raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("JWT_SECRET", JWT_SECRET)
    return monkeypatch


def cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# migrate


def test_migrate_applies_every_migration_once_and_writes_the_default_rows(
    env: pytest.MonkeyPatch, fresh_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", fresh_db)
    env.setenv("DEFAULT_TOKEN_BUDGET", "2500")
    env.setenv("BUDGET_PERIOD", "week")
    names = [p.name for p in migration_files()]
    assert names[:4] == ["001_schema.sql", "002_views.sql", "003_identity.sql", "004_request_labels.sql"]
    assert cli(capsys, "migrate") == (0, f"migrated: {', '.join(names)}\n", "")
    assert cli(capsys, "migrate") == (0, "migrated: nothing new to apply\n", "")
    rows = run_sql(fresh_db, "select subject_type, subject, period, token_limit, warn_ratio from budgets")
    assert [tuple(r) for r in rows] == [("user", "*", "week", 2500, 0.8)]
    # The environment owns the '*' rows: a tenant default appears when set, and goes when unset.
    env.setenv("DEFAULT_TENANT_BUDGET", "40000")
    assert cli(capsys, "migrate")[0] == 0
    rows = run_sql(fresh_db, "select subject_type, token_limit from budgets where subject = '*' order by 1")
    assert [tuple(r) for r in rows] == [("tenant", 40_000), ("user", 2500)]
    env.delenv("DEFAULT_TENANT_BUDGET")
    assert cli(capsys, "migrate")[0] == 0
    rows = run_sql(fresh_db, "select subject_type from budgets")
    assert [r[0] for r in rows] == ["user"]


def test_an_unreachable_database_is_exit_1_with_the_error(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")
    for argv in (["migrate"], ["budget", "show", "alice"], ["budget", "set", "alice", "5"]):
        code, out, err = cli(capsys, *argv)
        assert (code, out) == (1, "")
        assert err.startswith("error: ") and err.endswith("\n") and len(err.splitlines()) == 1


# token issue


def test_token_issue_prints_a_token_signed_with_jwt_secret(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "token", "issue", "--sub", "alice", "--tenant", "acme", "--ttl", "2h", "--admin")
    assert (code, err) == (0, "")
    claims = jwt.decode(out.strip(), JWT_SECRET, algorithms=["HS256"])
    assert claims["exp"] - claims["iat"] == 7200
    assert abs(claims["iat"] - time.time()) < 60
    assert {k: v for k, v in claims.items() if k not in ("iat", "exp")} == {
        "sub": "alice",
        "tenant": "acme",
        "quota_admin": True,
    }


def test_token_issue_defaults_to_30_days_without_tenant_or_roles(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("JWT_ISSUER", "https://idp.example")
    env.setenv("JWT_AUDIENCE", "quota")
    code, out, _ = cli(capsys, "token", "issue", "--sub", "svc", "--delegate")
    assert code == 0
    claims = jwt.decode(out.strip(), JWT_SECRET, algorithms=["HS256"], audience="quota")
    assert claims["exp"] - claims["iat"] == 30 * 86400
    assert {k: v for k, v in claims.items() if k not in ("iat", "exp")} == {
        "sub": "svc",
        "quota_delegate": True,
        "iss": "https://idp.example",
        "aud": "quota",
    }


def test_token_issue_without_jwt_secret_is_exit_1(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    env.delenv("JWT_SECRET")
    assert cli(capsys, "token", "issue", "--sub", "alice") == (
        1,
        "",
        "error: JWT_SECRET is not set (token issue mints HMAC tokens; tokens of an identity provider come from it)\n",
    )


def test_token_issue_with_a_bad_ttl_is_exit_1(env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(capsys, "token", "issue", "--sub", "alice", "--ttl", "soon") == (
        1,
        "",
        "error: invalid literal for int() with base 10: 'soon'\n",
    )


def test_token_issue_for_the_default_s_name_is_exit_1(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for argv in (["--sub", "*"], ["--sub", "alice", "--tenant", "*"]):
        code, out, err = cli(capsys, "token", "issue", *argv)
        assert (code, out) == (1, "") and "default budget" in err


# configuration errors


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("BUDGET_PERIOD", "year", "BUDGET_PERIOD must be one of day, week, month, total, not 'year'"),
        ("WARN_RATIO", "0", "WARN_RATIO must be in (0, 1]"),
        ("WARN_RATIO", "1.5", "WARN_RATIO must be in (0, 1]"),
        ("FAIL_MODE", "maybe", "FAIL_MODE must be 'closed' or 'open'"),
        ("QUOTA_NOTICE", "loud", "QUOTA_NOTICE must be 'inline' or 'off'"),
        ("LEDGER_WRITER", "thread", "LEDGER_WRITER must be 'process', 'inline' or 'off'"),
        ("DEFAULT_TOKEN_BUDGET", "lots", "invalid literal for int() with base 10: 'lots'"),
        ("WARN_RATIO", "high", "could not convert string to float: 'high'"),
        ("PROXY_WORKERS", "0", "PROXY_WORKERS must be at least 1"),
        ("SHUTDOWN_DELAY_SECONDS", "60", "SHUTDOWN_DELAY_SECONDS must be between 0 and SHUTDOWN_GRACE_SECONDS"),
    ],
)
def test_a_configuration_error_is_exit_2_before_anything_runs(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], name: str, value: str, message: str
) -> None:
    env.setenv(name, value)
    env.setenv("DATABASE_URL", f"postgresql://postgres@127.0.0.1:{free_port()}/test")  # never reached
    for argv in (["migrate"], ["token", "issue", "--sub", "a"], ["budget", "show", "a"]):
        assert cli(capsys, *argv) == (2, "", f"configuration error: {message}\n")


def test_serve_workers_below_one_is_a_configuration_error(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(capsys, "serve", "--workers", "0") == (2, "", "configuration error: PROXY_WORKERS must be at least 1\n")


def test_the_env_file_is_read_and_the_environment_wins_over_it(
    env: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / ".env").write_text("# settings\nexport BUDGET_PERIOD='year'\n")
    assert cli(capsys, "token", "issue", "--sub", "a")[::2] == (
        2,
        "configuration error: BUDGET_PERIOD must be one of day, week, month, total, not 'year'\n",
    )
    env.setenv("BUDGET_PERIOD", "day")
    assert cli(capsys, "token", "issue", "--sub", "a")[0] == 0


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["token"],
        ["token", "issue"],
        ["budget", "set", "alice"],
        ["budget", "set", "alice", "many"],
        ["budget", "set", "alice", "5", "--period", "year"],
        ["budget", "show"],
        ["frobnicate"],
    ],
)
def test_a_bad_command_line_is_argparses_exit_2(
    env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    assert "usage: python -m proxy" in capsys.readouterr().err


# budget set and budget show


def budget_row(dsn: str, kind: str, subject: str) -> tuple[Any, ...] | None:
    rows = run_sql(
        dsn,
        "select period, token_limit, warn_ratio, rpm_limit, tpm_limit from budgets"
        " where subject_type = $1 and subject = $2",
        args=(kind, subject),
    )
    return tuple(rows[0]) if rows else None


def test_budget_set_writes_the_row_and_says_what_it_set(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    me = uid()
    argv = ["budget", "set", me, "1500000", "--period", "day", "--warn", "0.75", "--rpm", "30", "--tpm", "20000"]
    assert cli(capsys, *argv) == (
        0,
        f"user {me}: 1,500,000 tokens per day (warn at 75%), 30 requests per minute, 20,000 tokens per minute\n",
        "",
    )
    assert budget_row(db, "user", me) == ("day", 1_500_000, 0.75, 30, 20_000)


def test_budget_set_takes_period_and_warn_from_the_environment(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    env.setenv("BUDGET_PERIOD", "week")
    env.setenv("WARN_RATIO", "0.5")
    team = uid("t")
    assert cli(capsys, "budget", "set", team, "0", "--tenant") == (
        0,
        f"tenant {team}: 0 tokens per week (warn at 50%)\n",
        "",
    )
    assert budget_row(db, "tenant", team) == ("week", 0, 0.5, None, None)
    assert budget_row(db, "user", team) is None


def test_budget_set_again_replaces_the_budget(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    me = uid()
    assert cli(capsys, "budget", "set", me, "10", "--rpm", "5")[0] == 0
    assert cli(capsys, "budget", "set", me, "20", "--period", "total")[0] == 0
    assert budget_row(db, "user", me) == ("total", 20, 0.8, None, None)


@pytest.mark.parametrize(
    "argv, says",
    [
        (["-5"], "error: tokens, rpm and tpm must be 0 or more"),
        (["5", "--rpm", "-1"], "error: tokens, rpm and tpm must be 0 or more"),
        (["5", "--warn", "1.5"], 'error: new row for relation "budgets" violates check constraint'),
        (["5", "--warn", "-0.2"], 'error: new row for relation "budgets" violates check constraint'),
    ],
)
def test_budget_set_refused_is_exit_1_and_writes_nothing(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str], argv: list[str], says: str
) -> None:
    env.setenv("DATABASE_URL", db)
    me = uid()
    code, out, err = cli(capsys, "budget", "set", me, *argv)
    assert (code, out) == (1, "")
    assert err.startswith(says)
    assert budget_row(db, "user", me) is None


def test_budget_set_with_a_warn_ratio_of_zero_is_refused(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """WARN_RATIO must be in (0, 1]; `--warn 0` asks for what the table refuses, and must not be quietly
    replaced by the default ratio."""
    env.setenv("DATABASE_URL", db)
    me = uid()
    code, out, _ = cli(capsys, "budget", "set", me, "100", "--warn", "0")
    assert code != 0 and "warn at 80%" not in out
    assert budget_row(db, "user", me) is None


def insert_usage(dsn: str, user: str, tenant: str | None, at: datetime, tokens: int) -> None:
    run_sql(
        dsn,
        "insert into usage_records (request_id, created_at, user_id, tenant_id, endpoint, total_tokens, status)"
        " values ($1, $2, $3, $4, 'chat', $5, 'ok')",
        args=(uid("r"), at, user, tenant, tokens),
    )


def test_budget_show_reports_the_budget_and_this_periods_use(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    me, team, other = uid(), uid("t"), uid()
    assert cli(capsys, "budget", "set", me, "1000", "--period", "month", "--warn", "0.9", "--rpm", "7")[0] == 0
    start, end = period_bounds("month", time.time())
    now = datetime.now(UTC)
    insert_usage(db, me, team, now - timedelta(seconds=1), 300)
    insert_usage(db, me, None, start, 150)  # the period's first instant counts
    insert_usage(db, me, team, start - timedelta(microseconds=1), 5000)  # last month's does not
    insert_usage(db, other, team, now - timedelta(seconds=1), 77)
    code, out, err = cli(capsys, "budget", "show", me)
    assert (code, err) == (0, "")
    assert out.startswith('{\n  "subject_type": "user",\n')
    assert orjson.loads(out) == {
        "subject_type": "user",
        "subject": me,
        "budget_row": me,
        "period": "month",
        "limit": 1000,
        "rpm": 7,
        "tpm": 0,
        "granted": 0,
        "effective_limit": 1000,
        "used": 450,
        "remaining": 550,
        "warn_ratio": 0.9,
        "alert_thresholds": None,  # ALERT_THRESHOLDS
        "period_start": start.isoformat(),
        "resets_at": end.isoformat() if end else None,
    }


def test_budget_show_of_a_tenant_sums_its_members_and_falls_back_to_the_default(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    team = uid("t")
    run_sql(db, "delete from budgets where subject_type = 'tenant' and subject = '*'")
    assert cli(capsys, "budget", "show", team, "--tenant") == (0, f"tenant {team}: no budget\n", "")
    assert cli(capsys, "budget", "set", "*", "500", "--tenant", "--period", "total")[0] == 0
    insert_usage(db, uid(), team, datetime.now(UTC), 400)
    insert_usage(db, uid(), team, datetime.now(UTC), 250)
    code, out, _ = cli(capsys, "budget", "show", team, "--tenant")
    assert code == 0
    shown = orjson.loads(out)
    assert {k: shown[k] for k in ("subject_type", "subject", "budget_row", "period", "limit", "used", "remaining")} == {
        "subject_type": "tenant",
        "subject": team,
        "budget_row": "*",
        "period": "total",
        "limit": 500,
        "used": 650,
        "remaining": 0,
    }
    assert (shown["period_start"], shown["resets_at"]) == ("1970-01-01T00:00:00+00:00", None)
    run_sql(db, "delete from budgets where subject_type = 'tenant' and subject = '*'")


def test_budget_show_of_a_user_without_a_row_is_the_default_budget(
    env: pytest.MonkeyPatch, db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    env.setenv("DATABASE_URL", db)
    env.setenv("DEFAULT_TOKEN_BUDGET", "4321")
    env.setenv("BUDGET_PERIOD", "day")
    assert cli(capsys, "migrate") == (0, "migrated: nothing new to apply\n", "")
    me = uid()
    code, out, _ = cli(capsys, "budget", "show", me)
    shown = orjson.loads(out)
    assert code == 0
    assert (shown["budget_row"], shown["limit"], shown["period"], shown["used"], shown["remaining"]) == (
        "*",
        4321,
        "day",
        0,
        4321,
    )
