"""What operators run beside the proxy: the alert rules (promtool's unit tests), the Grafana dashboard and the
rules against the metrics a live proxy really exports (and against Debian's Prometheus scraping one), the
compose file's `monitoring` profile, and the image's Dockerfile. Needs promtool and prometheus (Debian's
`prometheus` package) and docker-compose: `make test` installs them when run as root."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from proxy import metrics
from proxy.app import create_app
from proxy.config import Settings
from proxy.records import UsageRecord
from proxy.tokens import CL100K_SHA256, Tokenizer

from .devstack import free_port
from .fake_upstream import FakeUpstream
from .helpers import eventually, scrape, serve, token, uid

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
PROMETHEUS_DIR = DEPLOY / "prometheus"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "quota-sidecar.json"
# Labels Prometheus adds to every scraped series, and the histogram's bucket label.
TARGET_LABELS = frozenset({"job", "instance", "le"})
_METRIC = re.compile(r"\bquota_[a-zA-Z0-9_]+")
_SELECTOR = re.compile(r"\b(quota_[a-zA-Z0-9_]+)\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_BY = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def tool(name: str, package: str) -> str:
    found = shutil.which(name)
    assert found, (
        f"{name} is needed: install Debian's {package} package (apt-get install {package}); "
        "`make test` installs it when run as root"
    )
    return found


def grafana(expr: str, rate_interval: str = "1m") -> str:
    """A panel's query as Grafana sends it, with every variable at `All`."""
    return expr.replace("$__rate_interval", rate_interval).replace("$job", ".*").replace("$endpoint", ".*")


def dashboard_panels() -> list[dict[str, Any]]:
    board = json.loads(DASHBOARD.read_text())
    panels = []
    for panel in board["panels"]:
        panels += [panel, *panel.get("panels", [])]
    return [p for p in panels if p["type"] != "row"]


def dashboard_queries(rate_interval: str = "1m") -> list[tuple[str, str]]:
    return [
        (panel["title"], grafana(target["expr"], rate_interval))
        for panel in dashboard_panels()
        for target in panel["targets"]
    ]


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [rule for group in rules["groups"] for rule in group["rules"]]


def all_queries() -> list[tuple[str, str]]:
    return dashboard_queries() + [(f"alert {rule['alert']}", rule["expr"]) for rule in alert_rules()]


def exported(text: str) -> dict[str, set[str]]:
    """Each sample name of a /metrics text, with the label names its samples carry."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def chat(client: httpx.Client, user: str, model: str = "fake", *, stream: bool = False) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    return client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {token(user)}"})


@pytest.fixture(scope="module")
def live_proxy(base_settings: Settings, fake: FakeUpstream) -> Iterator[str]:
    """A proxy that has answered JSON and streams, refused a user over budget and met an upstream error."""
    settings = replace(base_settings, litellm_base_url=fake.url, default_token_budget=30)
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        user = uid()
        assert chat(client, uid(), stream=True).status_code == 200
        assert chat(client, uid(), "server-error").status_code == 500
        codes = [chat(client, user).status_code for _ in range(6)]  # 12 tokens each against 30
        assert 200 in codes and 429 in codes, codes
        # The settles' latency is observed when Redis answers, after the response.
        eventually(lambda: scrape(client.get("/metrics").text)[("quota_settle_seconds_count",)] >= 3)
        yield url


# --- alert rules --------------------------------------------------------------------------------------


def test_the_alert_rules_pass_their_promtool_unit_tests() -> None:
    promtool = tool("promtool", "prometheus")
    done = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    tested = set(re.findall(r"alertname:\s*(\w+)", (PROMETHEUS_DIR / "alerts_test.yml").read_text()))
    assert tested == {rule["alert"] for rule in alert_rules()}, "every alert has a unit test"


def test_the_prometheus_config_and_its_rules_are_valid() -> None:
    promtool = tool("promtool", "prometheus")
    done = subprocess.run(
        [promtool, "check", "config", "prometheus.yml"], cwd=PROMETHEUS_DIR, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 rule files found" in done.stdout


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    promtool = tool("promtool", "prometheus")
    queries = dashboard_queries()
    assert len(queries) >= 20
    rules = {
        "groups": [{"name": "dashboard", "rules": [{"record": f"q{i}", "expr": q} for i, (_, q) in enumerate(queries)]}]
    }
    (tmp_path / "dashboard.yml").write_text(yaml.safe_dump(rules))
    done = subprocess.run(
        [promtool, "check", "rules", "dashboard.yml"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr


# --- queries against what a live proxy exports --------------------------------------------------------


def test_every_metric_and_label_the_dashboard_and_rules_use_is_exported(live_proxy: str) -> None:
    names = exported(httpx.get(f"{live_proxy}/metrics").text)
    for where, query in all_queries():
        used = set(_METRIC.findall(query))
        assert used or query.startswith("up{"), f"{where}: {query} uses no quota_ metric (nor Prometheus's up)"
        for name in used:
            assert name in names, f"{where}: {name} is not in the proxy's /metrics"
        for name, matchers in _SELECTOR.findall(query):
            for label in set(_MATCHER.findall(matchers)) - TARGET_LABELS:
                assert label in names[name], f"{where}: {name} has no label {label!r}"
        labels = set().union(*(names.get(name, set()) for name in used)) | TARGET_LABELS
        for group in _BY.findall(query):
            for label in (part.strip() for part in group.split(",")):
                assert label in labels, f"{where}: no metric of {query} has {label!r}"


def test_no_user_id_or_unbounded_value_is_a_label(live_proxy: str) -> None:
    allowed = {"endpoint", "state", "code", "model", "kind", "stream", "dependency", "stage", "step", "channel", "le"}
    allowed.add("generation")  # quota_gc_pause_seconds: 0, 1 or 2
    for name, labels in exported(httpx.get(f"{live_proxy}/metrics").text).items():
        if name.startswith("quota_"):
            assert labels <= allowed, f"{name} has labels {labels - allowed}"


def prometheus_query(base: str, query: str) -> list[Any]:
    answer = httpx.get(f"{base}/api/v1/query", params={"query": query}, timeout=10).json()
    assert answer["status"] == "success", f"{query}: {answer}"
    return answer["data"]["result"]  # type: ignore[no-any-return]


def test_every_dashboard_query_returns_data_from_prometheus_scraping_the_proxy(live_proxy: str, tmp_path: Path) -> None:
    """Debian's Prometheus scrapes the live proxy every second, with the alert rules loaded; then each
    panel's query, as Grafana would send it, must answer with series."""
    prometheus = tool("prometheus", "prometheus")
    port, target = free_port(), live_proxy.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
        "scrape_configs": [{"job_name": "quota-sidecar", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    server = subprocess.Popen(
        [
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        scraped = 'count_over_time(up{job="quota-sidecar"}[1m])'
        eventually(lambda: float(prometheus_query(base, scraped)[0]["value"][1]) >= 3, timeout=30, interval=0.5)
        assert prometheus_query(base, 'min_over_time(up{job="quota-sidecar"}[1m])')[0]["value"][1] == "1"
        empty = [
            f"{title}: {query}"
            for title, query in dashboard_queries(rate_interval="1m")
            if not prometheus_query(base, query)
        ]
        assert not empty, "queries without data:\n" + "\n".join(empty)
        # Every alert rule evaluates without error against the live series.
        rules = eventually(
            lambda: [
                r
                for g in httpx.get(f"{base}/api/v1/rules", timeout=10).json()["data"]["groups"]
                for r in g["rules"]
                if r.get("lastEvaluation", "").startswith("2") or r.get("evaluationTime")
            ],
            timeout=10,
        )
        assert {r["name"] for r in rules} == {rule["alert"] for rule in alert_rules()}
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


# --- the instruments -----------------------------------------------------------------------------------


def sample(url: str, *key: Any) -> float:
    return scrape(httpx.get(f"{url}/metrics").text).get(key, 0.0)


def test_a_slow_upstream_shows_in_time_to_first_byte_not_in_the_proxys_added_latency(
    base_settings: Settings, fake: FakeUpstream
) -> None:
    settings = replace(base_settings, litellm_base_url=fake.url)
    ttfb = ("quota_upstream_ttfb_seconds_sum", ("endpoint", "chat"), ("stream", "true"))
    added = ("quota_added_latency_seconds_sum", ("endpoint", "chat"))
    counted = ("quota_added_latency_seconds_count", ("endpoint", "chat"))
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        before = {key: sample(url, *key) for key in (ttfb, added, counted)}
        r = chat(client, uid(), "slow-first-byte", stream=True)  # the fake waits 0.5 s before its first event
        assert r.status_code == 200 and r.text.rstrip().endswith("[DONE]")
        after = {key: sample(url, *key) for key in (ttfb, added, counted)}
    assert after[counted] - before[counted] == 1
    assert after[ttfb] - before[ttfb] >= 0.5
    assert after[added] - before[added] < 0.5  # the proxy's own part: milliseconds, the wait is the upstream's


def test_loop_histograms_expose_prometheus_buckets(live_proxy: str) -> None:
    # Prometheus's `le` is inclusive: an amount equal to a bound counts in that bound's bucket.
    histogram = metrics.LoopHistogram("quota_test_histogram_seconds", "test", ["endpoint"], [0.01, 0.1])
    try:
        child = histogram.labels("chat")
        for amount in (0.01, 0.05, 0.1, 3.0):
            child.observe(amount)
        samples = scrape(httpx.get(f"{live_proxy}/metrics").text)
    finally:
        metrics.REGISTRY.unregister(histogram)
    bucket = "quota_test_histogram_seconds_bucket"
    assert samples[bucket, ("endpoint", "chat"), ("le", "0.01")] == 1
    assert samples[bucket, ("endpoint", "chat"), ("le", "0.1")] == 3
    assert samples[bucket, ("endpoint", "chat"), ("le", "+Inf")] == 4
    assert samples["quota_test_histogram_seconds_count", ("endpoint", "chat")] == 4
    assert samples["quota_test_histogram_seconds_sum", ("endpoint", "chat")] == pytest.approx(3.16)


def record(model: str | None, tokens: int) -> UsageRecord:
    return UsageRecord(
        request_id=uid(),
        created_at=time.time(),
        user_id="someone",
        tenant_id=None,
        model=model,
        served_model=None,
        endpoint="chat",
        prompt_tokens=tokens,
        completion_tokens=tokens,
        total_tokens=2 * tokens,
        cost_usd=None,
        status="ok" if tokens else "upstream_error",
        http_status=200 if tokens else 404,
        stream=False,
        estimated=False,
        latency_ms=1.0,
        ttft_ms=None,
    )


def token_samples() -> dict[tuple[Any, ...], float]:
    return {k: v for k, v in scrape(metrics_text()).items() if k[0] == "quota_tokens_total"}


def metrics_text() -> str:
    from prometheus_client import generate_latest

    return generate_latest(metrics.REGISTRY).decode()


def test_model_labels_are_bounded_and_only_answered_models_take_a_place(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(metrics, "MODEL_LABELS", len(metrics._models) + 2)
    invented = [uid("invented") for _ in range(5)]
    for name in invented:  # refused upstream: no tokens, no place
        metrics.observe(record(name, 0), None, None, None)
    first, second, third = uid("model"), uid("model"), uid("model")
    for name in (first, second, third, first):
        metrics.observe(record(name, 5), None, None, None)
    samples = token_samples()
    assert samples["quota_tokens_total", ("kind", "prompt"), ("model", first)] == 10
    assert samples["quota_tokens_total", ("kind", "completion"), ("model", second)] == 5
    assert not [k for k in samples if ("model", third) in k or any(("model", n) in k for n in invented)]
    assert samples["quota_tokens_total", ("kind", "prompt"), ("model", "other")] >= 5


def test_fail_open_and_the_redis_gauge_follow_an_outage_and_its_end(
    base_settings: Settings, fake: FakeUpstream, volatile_redis: Any
) -> None:
    settings = replace(base_settings, litellm_base_url=fake.url, redis_url=volatile_redis.url, fail_mode="open")
    active, redis_up = ("quota_fail_open_active",), ("quota_dependency_up", ("dependency", "redis"))
    let_through = ("quota_fail_open_requests_total", ("endpoint", "chat"))
    user = uid()
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        assert chat(client, user).status_code == 200
        assert sample(url, *active) == 0 and sample(url, *redis_up) == 1
        before = sample(url, *let_through)
        volatile_redis.kill()
        assert chat(client, user).headers["x-quota-state"] == "unknown"  # through, unmetered
        assert sample(url, *active) == 1 and sample(url, *redis_up) == 0
        assert sample(url, *let_through) == before + 1
        volatile_redis.start()
        eventually(lambda: chat(client, user).headers["x-quota-state"] != "unknown")
        assert sample(url, *active) == 0 and sample(url, *redis_up) == 1


def test_the_ledger_lag_is_the_age_of_the_oldest_waiting_record(base_settings: Settings, fake: FakeUpstream) -> None:
    # No writer: records stay in the stream, and the oldest ages.
    settings = replace(base_settings, litellm_base_url=fake.url, ledger_writer="off", ledger_stream=f"test:lag:{uid()}")
    with serve(create_app(settings)) as url, httpx.Client(base_url=url, timeout=20) as client:
        assert sample(url, "quota_ledger_lag_seconds") == 0 and sample(url, "quota_ledger_backlog") == 0
        for _ in range(3):
            assert chat(client, uid()).status_code == 200
        eventually(lambda: sample(url, "quota_ledger_backlog") == 3)
        first = sample(url, "quota_ledger_lag_seconds")
        eventually(lambda: sample(url, "quota_ledger_lag_seconds") >= first + 0.3, timeout=10)
        assert client.get("/readyz").json()["checks"]["ledger_backlog"] == 3


# --- compose and the image -----------------------------------------------------------------------------


def test_the_compose_files_monitoring_profile_is_valid_and_wired_together(tmp_path: Path) -> None:
    compose = tool("docker-compose", "docker-compose")
    env = {**os.environ, "LITELLM_MASTER_KEY": "sk-x", "JWT_SECRET": "x" * 32}
    done = subprocess.run(
        [compose, "--project-directory", str(ROOT), "-f", str(ROOT / "docker-compose.yml")]
        + ["--profile", "monitoring", "config"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name in ("prometheus", "alertmanager", "grafana"):
        assert services[name].get("profiles") == ["monitoring"], name
    for name in ("postgres", "redis", "litellm", "proxy"):
        assert "profiles" not in services[name], f"{name} must run without the profile"

    def mounts(service: str) -> dict[str, Path]:
        found = {}
        for volume in services[service]["volumes"]:
            source, target = (volume["source"], volume["target"]) if isinstance(volume, dict) else volume.split(":")[:2]
            if source.startswith("/"):
                found[target] = Path(source)
        return found

    prometheus = mounts("prometheus")["/etc/prometheus"]
    assert prometheus == PROMETHEUS_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in services["prometheus"]["command"]
    scraped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    target = scraped["scrape_configs"][0]["static_configs"][0]["targets"][0]
    assert target == "proxy:8080" and scraped["scrape_configs"][0]["job_name"] == "quota-sidecar"
    alerting = scraped["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"][0]
    assert alerting.split(":")[0] == "alertmanager"
    assert mounts("alertmanager")["/etc/alertmanager"] == DEPLOY / "alertmanager"
    routes = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    assert routes["route"]["receiver"] in {r["name"] for r in routes["receivers"]}

    grafana_mounts = mounts("grafana")
    provisioning = grafana_mounts["/etc/grafana/provisioning"]
    assert provisioning == DEPLOY / "grafana" / "provisioning"
    providers = yaml.safe_load((provisioning / "dashboards" / "quota-sidecar.yml").read_text())["providers"]
    board_dir = providers[0]["options"]["path"]
    assert grafana_mounts[board_dir] == DASHBOARD.parent
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())["datasources"]
    assert sources[0]["url"] == "http://prometheus:9090" and sources[0]["type"] == "prometheus"
    board = json.loads(DASHBOARD.read_text())
    datasource = next(v for v in board["templating"]["list"] if v["name"] == "datasource")
    assert datasource["current"]["value"] == sources[0]["uid"]
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{board_dir}/{DASHBOARD.name}"


def dockerfile_stages() -> list[list[tuple[str, str]]]:
    """The Dockerfile's stages as (instruction, arguments) lines, continuations joined."""
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    stages: list[list[tuple[str, str]]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, arguments = line.partition(" ")
        if instruction.upper() == "FROM":
            stages.append([])
        stages[-1].append((instruction.upper(), arguments.strip()))
    return stages


def test_the_image_is_built_from_the_wheel_runs_as_non_root_and_ships_the_tokenizer() -> None:
    build, final = dockerfile_stages()
    # The first stage builds the wheel from what tests/test_package.py builds it from.
    copied = {src for instruction, args in build if instruction == "COPY" for src in args.split()[:-1]}
    assert copied == {"pyproject.toml", "README.md", "proxy", "sql"}
    assert any(i == "RUN" and "pip wheel" in a and "--no-deps" in a for i, a in build)
    # The image installs that wheel, not the sources.
    assert ("COPY", "--from=wheel /wheels /wheels") in final
    assert any(i == "RUN" and "pip install" in a and "/wheels/quota_sidecar-" in a for i, a in final)
    assert not any(i == "COPY" and a.split()[0] in ("proxy", ".") for i, a in final)
    users = [a for i, a in final if i == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), "the last USER must not be root"
    assert users[-1].split(":")[0].isdigit(), "a numeric USER, which runAsNonRoot can check"
    # The tokenizer file: the real cl100k_base, where TOKENIZER_FILE points.
    copy = next(a.split() for i, a in final if i == "COPY" and "tiktoken" in a)
    source, target = ROOT / copy[0], copy[1]
    assert hashlib.sha256(source.read_bytes()).hexdigest() == CL100K_SHA256
    assert f"TOKENIZER_FILE={target}" in " ".join(a for i, a in final if i == "ENV")
    assert Tokenizer.load(str(source)).count("hello world") == 2  # BPE, not one token per byte
    # What the COPYs need is in the build context .dockerignore leaves.
    allowed = {line[1:].rstrip("/") for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] == "!"}
    sources = [
        src for stage in (build, final) for i, a in stage if i == "COPY" and "--from" not in a for src in a.split()[:-1]
    ]
    for src in sources:
        assert any(src == a or src.startswith(a + "/") for a in allowed), f"{src} is left out by .dockerignore"


def healthcheck() -> list[str]:
    _, final = dockerfile_stages()
    check = next(a for i, a in final if i == "HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert isinstance(command, list) and command[0] == "python" and "urllib" in command[-1]
    return [sys.executable, *command[1:]]


def test_the_images_healthcheck_passes_against_a_serving_proxy_and_fails_without_one(
    base_settings: Settings, fake: FakeUpstream
) -> None:
    command = healthcheck()
    with serve(create_app(replace(base_settings, litellm_base_url=fake.url))) as url:
        port = url.rsplit(":", 1)[1]
        done = subprocess.run(command, env={**os.environ, "PROXY_PORT": port}, capture_output=True, timeout=30)
        assert done.returncode == 0, done.stderr
    closed = subprocess.run(
        command, env={**os.environ, "PROXY_PORT": str(free_port())}, capture_output=True, timeout=30
    )
    assert closed.returncode != 0
