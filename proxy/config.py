"""Settings: read once from the environment (and `.env`) into one frozen object."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

from . import i18n

PERIODS = ("day", "week", "month", "total")
# The subject of the default budget rows (`budget set '*'`): never a user's or a tenant's id, or that one's
# own row would be everyone's default, and their admin page would change the default for everyone.
DEFAULT_SUBJECT = "*"


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
    # Few batches: each costs the shared cores wake-ups and a commit however small it is; 100 every 0.1 s
    # put the p99 at one client at 3.8 ms against 2.8 for these (#19; docs/performance.md).
    ledger_batch_size: int = 1000
    ledger_flush_seconds: float = 1.0
    ledger_consumer: str = ""
    ledger_backlog_warn: int = 100_000
    ledger_writer: str = (
        "process"  # process: a child of the proxy; inline: in its event loop; off: run `ledger` elsewhere
    )
    # The collector's thresholds once start-up's heap is frozen (#19; docs/performance.md): gen0, gen1, gen2.
    gc_thresholds: tuple[str, ...] = ("7000", "10", "10")
    pages_secret: str = ""  # signs statement links and admin sessions; default: derived from JWT_SECRET
    # Budget alerts (proxy/alerts.py finds crossings, proxy/notifier.py sends them; docs/alerts.md).
    alert_thresholds: tuple[str, ...] = ("0.8", "1.0")  # fractions of a budget; a budget row may set its own
    alert_webhook_urls: tuple[str, ...] = ()
    alert_webhook_secret: str = ""  # signs the webhooks' bodies (X-Quota-Signature)
    alert_slack_webhook_url: str = ""
    alert_timeout_seconds: float = 10.0
    alert_retry_seconds: float = 10.0  # the first retry's delay, doubling on each failure ...
    alert_retry_max_seconds: float = 600.0  # ... up to this
    alert_give_up_seconds: float = 86400.0  # a delivery still failing this long after its crossing is given up
    alert_poll_seconds: float = 2.0
    # The pages (issue 15): where people reach the proxy, how long a statement link lasts, the messages' language.
    public_url: str = ""  # the base of the links the proxy hands out; default: the address a request came to
    statement_link_ttl_days: float = 7.0  # 0: the inline notice and the 429 message carry no link
    locale: str = "en"  # the inline notice and the 429 message: en or pt-BR (pages follow Accept-Language)
    # The admin dashboard (issue 15): how long a session lasts (never longer than the token it was opened with).
    admin_session_ttl_seconds: int = 8 * 3600
    log_level: str = "info"
    proxy_host: str = "127.0.0.1"
    proxy_port: int = 8080
    # Stopping and scaling (docs/operations.md#stopping-cleanly and #more-than-one-core).
    shutdown_grace_seconds: float = 30.0  # from SIGTERM: how long requests and streams in flight may take
    shutdown_delay_seconds: float = 5.0  # from SIGTERM: new requests still served while balancers notice
    proxy_workers: int = 1  # server processes on PROXY_PORT (`serve --workers N`)

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
        if not 0 <= self.shutdown_delay_seconds <= self.shutdown_grace_seconds:
            raise ValueError("SHUTDOWN_DELAY_SECONDS must be between 0 and SHUTDOWN_GRACE_SECONDS")
        if self.proxy_workers < 1:
            raise ValueError("PROXY_WORKERS must be at least 1")
        i18n.check(self.locale)
        if self.statement_link_ttl_days < 0:
            raise ValueError("STATEMENT_LINK_TTL_DAYS must be 0 (no links) or more")
        if self.admin_session_ttl_seconds < 60:
            raise ValueError("ADMIN_SESSION_TTL_SECONDS must be at least 60")
        if self.public_url and not self.public_url.startswith(("http://", "https://")):
            raise ValueError("PUBLIC_URL must start with http:// or https://")
        try:
            thresholds = self.gc_threshold_values()
        except ValueError:
            thresholds = ()
        if len(thresholds) != 3 or min(thresholds) < 1:
            raise ValueError("GC_THRESHOLDS must be three whole numbers of 1 or more, e.g. 700,10,10")
        self._validate_alerts()

    def gc_threshold_values(self) -> tuple[int, ...]:
        return tuple(int(t) for t in self.gc_thresholds)

    def _validate_alerts(self) -> None:
        from .alerts import parse_thresholds  # the one parser, shared with the CLI and the admin API

        parse_thresholds(",".join(self.alert_thresholds), "ALERT_THRESHOLDS")
        for name, urls in (
            ("ALERT_WEBHOOK_URLS", self.alert_webhook_urls),
            ("ALERT_SLACK_WEBHOOK_URL", (self.alert_slack_webhook_url,)),
        ):
            for i, url in enumerate(urls, 1):
                if url and not url.startswith(("http://", "https://")):
                    # The URL itself is not repeated: a webhook's path is often its secret, and this goes to logs.
                    raise ValueError(f"{name}: URL number {i} must start with http:// or https://")
        if self.alert_webhook_urls and not self.alert_webhook_secret:
            raise ValueError("ALERT_WEBHOOK_SECRET must be set when ALERT_WEBHOOK_URLS is: receivers verify with it")
        if min(self.alert_timeout_seconds, self.alert_retry_seconds, self.alert_poll_seconds) <= 0:
            raise ValueError("ALERT_TIMEOUT_SECONDS, ALERT_RETRY_SECONDS and ALERT_POLL_SECONDS must be above 0")
        # A delivery's lease is twice this: nan, inf or a huge value would make it no date at all.
        if not 0 < self.alert_timeout_seconds <= 600:
            raise ValueError("ALERT_TIMEOUT_SECONDS must be above 0 and at most 600")
