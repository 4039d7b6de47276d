from pathlib import Path

import pytest

from proxy.config import Settings


def test_defaults_match_the_documented_contract() -> None:
    s = Settings.from_env({}, env_file=None)
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/postgres"
    assert s.redis_url == "redis://127.0.0.1:6379/0"
    assert s.litellm_base_url == "http://127.0.0.1:4000"
    assert (s.default_token_budget, s.budget_period, s.warn_ratio) == (100_000, "month", 0.8)
    assert (s.proxy_host, s.proxy_port) == ("127.0.0.1", 8080)


def test_environment_wins_over_env_file(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text("# comment\nJWT_SECRET=from-file\nDEFAULT_TOKEN_BUDGET=5\nexport WARN_RATIO='0.5'\n")
    s = Settings.from_env(
        {"DEFAULT_TOKEN_BUDGET": "7", "CLAMP_MAX_TOKENS": "false", "JWT_ALGORITHMS": "HS256, HS512"}, env_file
    )
    assert s.jwt_secret == "from-file"
    assert s.default_token_budget == 7
    assert s.warn_ratio == 0.5
    assert s.clamp_max_tokens is False
    assert s.jwt_algorithms == ("HS256", "HS512")


@pytest.mark.parametrize(
    "env, message",
    [
        ({"BUDGET_PERIOD": "year"}, "BUDGET_PERIOD"),
        ({"WARN_RATIO": "1.5"}, "WARN_RATIO"),
        ({"FAIL_MODE": "maybe"}, "FAIL_MODE"),
        ({"GC_THRESHOLDS": "10000,10"}, "GC_THRESHOLDS"),
        ({"GC_THRESHOLDS": "many,10,10"}, "GC_THRESHOLDS"),
        ({"GC_THRESHOLDS": "0,10,10"}, "GC_THRESHOLDS"),  # 0 would turn the collector off
    ],
)
def test_invalid_values_are_refused_with_the_variable_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Settings.from_env(env, env_file=None)


def test_gc_thresholds_are_three_numbers() -> None:
    assert Settings.from_env({"GC_THRESHOLDS": "10000, 20,30"}, env_file=None).gc_threshold_values() == (10000, 20, 30)
