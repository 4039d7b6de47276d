"""Settings: read once from the environment (and `.env`) into one frozen object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

PERIODS = ("day", "week", "month", "total")


def read_env_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """Parse a `.env` file of KEY=VALUE lines; missing file means no values."""
    values: dict[str, str] = {}
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return values
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        values[key.strip().removeprefix("export ").strip()] = value.strip().strip("'\"")
    return values


def _bool(value: str) -> bool:
    return value.strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True, slots=True)
class Settings:
    database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_timeout: float = 2.0
    litellm_base_url: str = "http://127.0.0.1:4000"
    litellm_master_key: str = ""
    jwt_secret: str = ""
    jwt_public_key: str = ""
    jwt_jwks_url: str = ""
    jwt_algorithms: tuple[str, ...] = ()  # empty: HS256 with a secret, else RS256, ES256, EdDSA
    jwt_issuer: str = ""
    jwt_audience: str = ""
    jwt_user_claim: str = "sub"
    jwt_tenant_claim: str = "tenant"
    jwt_admin_claim: str = "quota_admin"
    jwt_delegate_claim: str = "quota_delegate"
    jwt_groups_claim: str = "groups"  # a list of group names: budget tiers (`budget set GROUP N --group`)
    jwt_leeway_seconds: int = 30
    default_token_budget: int = 100_000
    default_tenant_budget: int = 0  # 0: tenants have no budget unless one is set
    budget_period: str = "month"
    warn_ratio: float = 0.8
    tokenizer_file: str = ""  # a cl100k_base.tiktoken file; default: the copy LiteLLM ships, if installed
    exempt_models: tuple[str, ...] = ()  # globs: requests to these models are recorded but never budgeted
    completion_allowance: int = 4096
    holdback_tokens: int = 1024  # room kept for a concurrent request when one wants more than is left
    clamp_max_tokens: bool = True
    quota_notice: str = "inline"
    stream_usage_to_client: str = "auto"  # the usage chunk the proxy asked for: auto, always or never shown
    reservation_ttl_seconds: int = 900
    budget_refresh_seconds: float = 5.0
    fail_mode: str = "closed"
    max_body_bytes: int = 8 * 1024 * 1024
    body_read_timeout: float = 30.0  # a request body that has not fully arrived by then gets 408
    max_connections: int = 4096  # open connections and requests; past it new requests get 503
    extra_body_params: tuple[str, ...] = ()  # body fields passed upstream beyond OpenAI's (never LiteLLM's own)
    upstream_connect_timeout: float = 5.0
    upstream_read_timeout: float = 600.0
    upstream_max_connections: int = 512
    upstream_max_concurrency: int = 1024
    ledger_stream: str = "quota:ledger"
    # Small, frequent batches: a batch of 1,000 kept Redis busy ~2.5 ms and PostgreSQL in one burst (#19).
    ledger_batch_size: int = 100
    ledger_flush_seconds: float = 0.1
    ledger_consumer: str = ""
    ledger_backlog_warn: int = 100_000
    ledger_writer: str = (
        "process"  # process: a child of the proxy; inline: in its event loop; off: run `ledger` elsewhere
    )
    # The collector's thresholds once start-up's heap is frozen (#19; docs/performance.md): gen0, gen1, gen2.
    gc_thresholds: tuple[str, ...] = ("7000", "10", "10")
    pages_secret: str = ""  # signs statement links and admin sessions; default: derived from JWT_SECRET
    log_level: str = "info"
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, env_file: str | os.PathLike[str] | None = ".env"
    ) -> Settings:
        """Environment variables win over `.env`; every field is its upper-cased name."""
        source: dict[str, str] = read_env_file(env_file) if env_file else {}
        source.update(os.environ if environ is None else environ)
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = source.get(f.name.upper())
            if raw is None or raw == "":
                continue
            default = f.default
            if isinstance(default, bool):
                values[f.name] = _bool(raw)
            elif isinstance(default, int):
                values[f.name] = int(raw)
            elif isinstance(default, float):
                values[f.name] = float(raw)
            elif isinstance(default, tuple):
                values[f.name] = tuple(a.strip() for a in raw.split(",") if a.strip())
            else:
                values[f.name] = raw.replace("\\n", "\n") if f.name == "jwt_public_key" else raw
        settings = cls(**values)  # type: ignore[arg-type]
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.budget_period not in PERIODS:
            raise ValueError(f"BUDGET_PERIOD must be one of {', '.join(PERIODS)}, not {self.budget_period!r}")
        if not 0 < self.warn_ratio <= 1:
            raise ValueError("WARN_RATIO must be in (0, 1]")
        if self.quota_notice not in ("inline", "off"):
            raise ValueError("QUOTA_NOTICE must be 'inline' or 'off'")
        if self.stream_usage_to_client not in ("auto", "always", "never"):
            raise ValueError("STREAM_USAGE_TO_CLIENT must be 'auto', 'always' or 'never'")
        if self.fail_mode not in ("closed", "open"):
            raise ValueError("FAIL_MODE must be 'closed' or 'open'")
        if self.holdback_tokens < 0 or self.completion_allowance < 1:
            raise ValueError("HOLDBACK_TOKENS must be 0 or more and COMPLETION_ALLOWANCE at least 1")
        if self.ledger_writer not in ("process", "inline", "off"):
            raise ValueError("LEDGER_WRITER must be 'process', 'inline' or 'off'")
        try:
            thresholds = self.gc_threshold_values()
        except ValueError:
            thresholds = ()
        if len(thresholds) != 3 or min(thresholds) < 1:
            raise ValueError("GC_THRESHOLDS must be three whole numbers of 1 or more, e.g. 700,10,10")

    def gc_threshold_values(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self.gc_thresholds)
