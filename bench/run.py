"""`make bench`: the proxy's cost, measured against calling the upstream directly, in one run.

Targets, interleaved at each concurrency: (a) the mock upstream directly, (b) a bare aiohttp
forwarder (bench/forwarder.py), the reference, and the same forwarder on the proxy's own upstream
client (`wire_forwarder`), (c) the full proxy (JWT, Redis reserve/settle, ledger to
PostgreSQL), (d) LiteLLM's own proxy on a mock model when LiteLLM is installed, and any proxy
variants asked for (`--variant NAME:ENV=VALUE;ENV=VALUE`, JSON only). The load generator runs in its
own process. Each round also reads the proxy's and the forwarder's /metrics: their garbage
collections, and the proxy's ledger writer batches. Then the low-noise tail at concurrency 1
(bench/tail.py, pinned), a soak with the proxy's memory before and after (BENCH_SOAK_SECONDS), and the
budget and ledger micro-benchmarks. Results: bench/results/latest.json and latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from loadgen import percentile  # noqa: E402  (bench/ is on the path when run)

from proxy.auth import issue_token  # noqa: E402
from proxy.config import Settings  # noqa: E402
from tests.devstack import children, free_port, start_litellm, stat_fields, stop, wait_http  # noqa: E402

RESULTS = ROOT / "bench" / "results"
UVICORN = [
    sys.executable,
    "-m",
    "uvicorn",
    "--app-dir",
    str(ROOT / "bench"),
    "--loop",
    "uvloop",
    "--http",
    "httptools",
    "--log-level",
    "warning",
    "--no-access-log",
]
WARMUP = 1.0  # seconds each round runs before it measures: pools, caches and the interpreter warm up
LATENCIES = ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "ttft_p50_ms", "ttft_p99_ms")


@dataclass
class Target:
    url: str
    token: str = ""
    proc: subprocess.Popen[bytes] | None = None  # a server of ours: its CPU time, memory and /metrics
    metrics: str = ""
    json_only: bool = False
    writer: bool = False  # a proxy: its ledger writer's batches are in its /metrics
    max_concurrency: int = 10**6
    rounds: dict[tuple[bool, int], list[dict[str, Any]]] = field(default_factory=dict)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process and of the children it runs (the proxy's ledger writer)."""
    total = 0
    for p in (pid, *children(pid)):
        try:
            fields = stat_fields(p)
        except OSError:
            continue  # a child that just ended
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mb(pid: int) -> dict[str, float]:
    """Resident memory of a process and of each of its children, in MB."""
    out = {}
    for p in (pid, *children(pid)):
        try:
            status = Path(f"/proc/{p}/status").read_text()
            name = Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        label = "proxy" if p == pid else ("writer" if b"multiprocessing.spawn" in b" ".join(name) else f"child {p}")
        if label.startswith("child") and b"resource_tracker" in b" ".join(name):
            label = "resource tracker"
        out[label] = round(kb / 1024, 1)
    return out


def machine() -> dict[str, object]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    load = os.getloadavg()
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "load_at_start": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


def loadgen(url: str, token: str, concurrency: int, seconds: float, stream: bool) -> dict[str, Any]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        url,
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
        "--warmup",
        str(WARMUP),
    ]
    cmd += ["--token", token] if token else []
    cmd += ["--stream"] if stream else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds * 4 + 60).stdout
    return orjson.loads(out)  # type: ignore[no-any-return]


# --- /metrics: garbage collections and ledger batches between two scrapes -------------------------

Scrape = list[tuple[str, dict[str, str], float]]


def scrape(url: str) -> Scrape:
    if not url:
        return []
    text = httpx.get(url, timeout=10).text
    return [(s.name, s.labels, s.value) for f in text_string_to_metric_families(text) for s in f.samples]


def histogram_growth(before: Scrape, after: Scrape, name: str, **labels: str) -> tuple[float, float, float]:
    """How a histogram grew between two scrapes: (count, sum, the smallest bucket bound that holds every
    new observation, i.e. the longest to within a bucket; 0 with no observation)."""

    def value(scrape: Scrape, sample: str, le: str | None = None) -> float:
        want = {**labels, **({"le": le} if le else {})}
        return sum(v for n, lab, v in scrape if n == sample and lab == want)

    count = value(after, f"{name}_count") - value(before, f"{name}_count")
    total = value(after, f"{name}_sum") - value(before, f"{name}_sum")
    if count <= 0:
        return 0.0, 0.0, 0.0
    bounds = sorted(
        {lab["le"] for n, lab, _ in after if n == f"{name}_bucket" and {**lab, "le": ""} == {**labels, "le": ""}},
        key=float,
    )
    longest = next(
        (float(b) for b in bounds if value(after, f"{name}_bucket", b) - value(before, f"{name}_bucket", b) >= count),
        math.inf,
    )
    return count, total, longest


def round_metrics(before: Scrape, after: Scrape, writer: bool) -> dict[str, float]:
    """Garbage collections (all, full) and, of a proxy, ledger batches of one round."""
    out: dict[str, float] = {}
    if not after:
        return out
    counts, longest = [], []
    for generation in "012":
        count, _, bound = histogram_growth(before, after, "quota_gc_pause_seconds", generation=generation)
        counts.append(count)
        longest.append(bound)
    out.update(gc_count=sum(counts), gc_full=counts[2], gc_longest_ms=max(longest) * 1000)
    out["gc_full_longest_ms"] = longest[2] * 1000
    batches, seconds, slowest = histogram_growth(before, after, "quota_ledger_batch_seconds")
    _, records, biggest = histogram_growth(before, after, "quota_ledger_batch_records")
    if writer:
        out.update(
            batches=batches,
            batch_records=records,
            batch_seconds=seconds,
            batch_longest_ms=slowest * 1000,
            batch_biggest=biggest,
        )
    return out


# --- figures over rounds ----------------------------------------------------------------------------


def over_rounds(results: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    """Medians of the rounds' figures, the spread of their p99s, and their GC and writer work summed."""
    out: dict[str, Any] = {k: round(statistics.median(r[k] for r in results), 3) for k in LATENCIES if k in results[0]}
    out["rps"] = round(statistics.median(r["rps"] for r in results), 1)
    p99s = [r["p99_ms"] for r in results]
    out["p99_spread_ms"] = [round(min(p99s), 3), round(max(p99s), 3)]
    if "cpu_us_per_request" in results[0]:
        out["cpu_us_per_request"] = round(statistics.median(r["cpu_us_per_request"] for r in results), 1)
    out["requests"] = sum(r["requests"] for r in results)
    out["errors"] = sum(r["errors"] for r in results)
    wall = (seconds + WARMUP) * len(results)  # the metrics cover each round's warm-up too
    if "gc_count" in results[0]:
        out["gc_per_10s"] = round(sum(r["gc_count"] for r in results) / wall * 10, 1)
        out["gc_full_per_10s"] = round(sum(r["gc_full"] for r in results) / wall * 10, 1)
        out["gc_longest_ms"] = max(r["gc_longest_ms"] for r in results)
        out["gc_full_longest_ms"] = max(r["gc_full_longest_ms"] for r in results)
    if "batches" in results[0]:
        batches = sum(r["batches"] for r in results)
        out["writer"] = {
            "batches_per_s": round(batches / wall, 1),
            "records_per_batch": round(sum(r["batch_records"] for r in results) / max(batches, 1), 1),
            "mean_ms": round(sum(r["batch_seconds"] for r in results) / max(batches, 1) * 1000, 2),
            "longest_ms_at_most": max(r["batch_longest_ms"] for r in results),
            "biggest_at_most": max(r["batch_biggest"] for r in results),
        }
    return out


def spawn(cmd: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_http(health, 60, proc)
    return proc


def parse_variant(spec: str) -> tuple[str, dict[str, str]]:
    """`NAME:ENV=VALUE;ENV=VALUE` (values may hold commas: GC_THRESHOLDS=10000,10,10)."""
    name, _, rest = spec.partition(":")
    env = dict(pair.split("=", 1) for pair in rest.split(";") if pair)
    if not name or not env:
        raise SystemExit(f"--variant {spec!r}: give NAME:ENV=VALUE[;ENV=VALUE...]")
    return f"proxy[{name}]", env


def measure_round(name: str, target: Target, c: int, seconds: float, stream: bool) -> dict[str, Any]:
    pid = target.proc.pid if target.proc else None
    before_metrics = scrape(target.metrics)
    before = cpu_seconds(pid) if pid else 0.0
    result = loadgen(target.url, target.token, c, seconds, stream)
    if pid:
        result["cpu_us_per_request"] = round((cpu_seconds(pid) - before) / max(result["sent"], 1) * 1e6, 1)
    result.update(round_metrics(before_metrics, scrape(target.metrics), target.writer))
    gc = f"  gc {result['gc_count']:.0f} (full {result['gc_full']:.0f})" if "gc_count" in result else ""
    print(
        f"  {'stream' if stream else 'json  '} c={c:<4} {name:<18} {result['rps']:>8} req/s"
        f"  p50 {result['p50_ms']:.3f}  p99 {result['p99_ms']:.3f}  p99.9 {result['p999_ms']:.3f} ms{gc}",
        flush=True,
    )
    return result


def pin(pid: int, cpus: set[int]) -> None:
    """Every thread of a process onto `cpus` (uvicorn's loop thread and asyncio's worker threads)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            os.sched_setaffinity(int(task.name), cpus)
        except OSError:
            continue  # a thread that just ended


def tail_rounds(targets: dict[str, Target], rounds: int, seconds: float) -> dict[str, Any]:
    """Concurrency 1 by the low-noise client: many short interleaved rounds; the server of each round
    pinned to one core and the client to another (the rest of the stack runs where it will)."""
    cpus = sorted(os.sched_getaffinity(0))
    server_cpu, client_cpu = ({cpus[0]}, cpus[-1]) if len(cpus) > 1 else (set(cpus), -1)
    per: dict[str, list[dict[str, Any]]] = {}
    pooled: dict[str, list[float]] = {}
    names = [n for n in targets if n != "litellm"]
    for i in range(rounds):
        for name in names[i % len(names) :] + names[: i % len(names)]:  # each round starts elsewhere
            target = targets[name]
            if target.proc:
                pin(target.proc.pid, server_cpu)
            try:
                before_metrics = scrape(target.metrics)
                cmd = [sys.executable, str(ROOT / "bench" / "tail.py"), target.url, "--seconds", str(seconds)]
                cmd += ["--cpu", str(client_cpu), "--raw"] + (["--token", target.token] if target.token else [])
                out = subprocess.run(cmd, check=True, capture_output=True, timeout=seconds * 4 + 60).stdout
                result = orjson.loads(out)
                result.update(round_metrics(before_metrics, scrape(target.metrics), target.writer))
            finally:
                if target.proc:
                    pin(target.proc.pid, set(cpus))
            pooled.setdefault(name, []).extend(result.pop("latencies_ms"))
            per.setdefault(name, []).append(result)
        print(
            f"  tail round {i + 1}/{rounds}: "
            + "  ".join(f"{n} p99 {per[n][-1]['p99_ms']:.3f}" for n in names if n in per),
            flush=True,
        )
    out = {}
    for name, results in per.items():
        summary = over_rounds(results, seconds)
        everything = pooled[name]
        summary["pooled_p99_ms"] = round(percentile(everything, 0.99), 3)
        summary["pooled_p999_ms"] = round(percentile(everything, 0.999), 3)
        out[name] = summary
    return {"rounds": rounds, "seconds": seconds, "server_cpu": sorted(server_cpu), "client_cpu": client_cpu} | {
        "targets": out
    }


def soak(target: Target, seconds: float) -> dict[str, Any]:
    """The proxy under JSON load at concurrency 16 for `seconds`: its memory sampled along the way."""
    assert target.proc is not None
    pid = target.proc.pid
    before_metrics = scrape(target.metrics)
    samples = [(0.0, rss_mb(pid))]
    cmd = [sys.executable, str(ROOT / "bench" / "loadgen.py"), target.url, "--concurrency", "16"]
    cmd += ["--seconds", str(seconds), "--warmup", str(WARMUP), "--token", target.token]
    started = time.monotonic()
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE)
    step = max(seconds / 6, 1.0)
    while gen.poll() is None:
        time.sleep(min(step, 0.5))
        now = time.monotonic() - started
        if now - samples[-1][0] >= step:
            samples.append((round(now, 1), rss_mb(pid)))
    out, _ = gen.communicate()
    result = orjson.loads(out)
    time.sleep(2)  # the writer catches up, and its last batches reach /metrics
    samples.append((round(time.monotonic() - started, 1), rss_mb(pid)))
    metrics = round_metrics(before_metrics, scrape(target.metrics), target.writer)
    return {
        "seconds": seconds,
        "requests": result["requests"],
        "rps": result["rps"],
        "p99_ms": result["p99_ms"],
        "p999_ms": result["p999_ms"],
        "rss_mb": samples,
        "gc": {k: v for k, v in metrics.items() if k.startswith("gc_")},
    }


def http_benchmark(a: argparse.Namespace, with_litellm: bool) -> dict[str, Any]:
    secret = secrets.token_hex(32)
    settings = Settings(
        jwt_secret=secret,
        database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
    )
    token = issue_token(settings, "bench-user", None, 3600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, fw_port = free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(spawn([*UVICORN, "--port", str(up_port), "mock_upstream:app"], {}, f"{upstream}/health"))
        fw = f"http://127.0.0.1:{fw_port}"
        forwarder = spawn([*UVICORN, "--port", str(fw_port), "forwarder:app"], {"UPSTREAM": upstream}, f"{fw}/health")
        procs.append(forwarder)
        wire_port = free_port()
        wf = f"http://127.0.0.1:{wire_port}"
        wire_forwarder = spawn(
            [*UVICORN, "--port", str(wire_port), "forwarder:app"],
            {"UPSTREAM": upstream, "FORWARDER_CLIENT": "wire"},
            f"{wf}/health",
        )
        procs.append(wire_forwarder)
        env = {
            "JWT_SECRET": secret,
            "LITELLM_BASE_URL": upstream,
            "LITELLM_MASTER_KEY": "sk-bench",
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "DEFAULT_TOKEN_BUDGET": str(10**12),
            "LOG_LEVEL": "warning",
            "LEDGER_STREAM": "bench:ledger",
        }
        subprocess.run(
            [sys.executable, "-m", "proxy", "migrate"],
            env={**os.environ, **env},
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
        targets = {
            "direct": Target(f"{upstream}/v1/chat/completions"),
            "bare_forwarder": Target(f"{fw}/v1/chat/completions", proc=forwarder, metrics=f"{fw}/metrics"),
            "wire_forwarder": Target(f"{wf}/v1/chat/completions", proc=wire_forwarder, metrics=f"{wf}/metrics"),
        }
        for name, overrides in [("proxy", {}), *(parse_variant(v) for v in a.variant)]:
            port = free_port()
            px = f"http://127.0.0.1:{port}"
            stream_key = "bench:ledger" if name == "proxy" else f"bench:ledger:{name}"
            variant_env = {**env, "PROXY_PORT": str(port), "LEDGER_STREAM": stream_key, **overrides}
            proc = spawn([sys.executable, "-m", "proxy", "serve"], variant_env, f"{px}/healthz")
            procs.append(proc)
            targets[name] = Target(
                f"{px}/v1/chat/completions", token, proc, f"{px}/metrics", json_only=name != "proxy", writer=True
            )
        time.sleep(0.5)
        if with_litellm:
            ll_port, key = free_port(), f"sk-{secrets.token_hex(24)}"
            config = Path(tempfile.mkdtemp()) / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
                "      api_key: sk-mock\n      mock_response: 'word word word word word word word word word word'\n"
                "litellm_settings:\n  telemetry: false\n"
            )
            procs.append(start_litellm(ll_port, key, config=config))
            # ~70 req/s per worker: only a point of comparison, not a load target
            targets["litellm"] = Target(
                f"http://127.0.0.1:{ll_port}/v1/chat/completions", key, json_only=True, max_concurrency=16
            )
        names = list(targets)
        modes = (False,) if a.json_only else (False, True)
        for stream in modes:
            for c in a.concurrency:
                # Rounds interleave the targets, each round in another order, and each figure is the
                # median over the rounds: this VM drifts by ±20 % over minutes.
                for i in range(a.rounds):
                    for name in names[i % len(names) :] + names[: i % len(names)]:
                        t = targets[name]
                        if (stream and t.json_only) or c > t.max_concurrency:
                            continue
                        t.rounds.setdefault((stream, c), []).append(measure_round(name, t, c, a.seconds, stream))
        rows = [
            {"target": name, "stream": stream, "concurrency": c, "rounds": len(results)}
            | over_rounds(results, a.seconds)
            for stream in (False, True)
            for c in a.concurrency
            for name, t in targets.items()
            if (results := t.rounds.get((stream, c)))
        ]
        out: dict[str, Any] = {"rows": rows}
        if a.tail_rounds:
            print(f"Tail at concurrency 1, low-noise client ({a.tail_rounds} rounds of {a.tail_seconds:g} s):")
            out["tail"] = tail_rounds(
                {n: t for n, t in targets.items() if n != "litellm"}, a.tail_rounds, a.tail_seconds
            )
        if a.soak:
            print(f"Soak: the proxy at concurrency 16 for {a.soak:g} s", flush=True)
            out["soak"] = soak(targets["proxy"], a.soak)
        return out
    finally:
        for proc in procs:
            stop(proc)


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    out = []
    for r in rows:
        direct, bare = (
            by[("direct", r["stream"], r["concurrency"])],
            by.get(("bare_forwarder", r["stream"], r["concurrency"])),
        )
        s = dict(r)
        s["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)
        s["added_p99_ms"] = round(r["p99_ms"] - direct["p99_ms"], 3)
        if r["stream"]:
            s["added_ttft_p50_ms"] = round(r["ttft_p50_ms"] - direct["ttft_p50_ms"], 3)
        if bare:
            s["rps_vs_bare"] = round(r["rps"] / bare["rps"], 3)
            s["bare_added_p99_ms"] = round(bare["p99_ms"] - direct["p99_ms"], 3)
        out.append(s)
    return out


def _at_most(bound: float) -> str:
    """A histogram bucket's bound as the tables show it (past the last bucket, the bound is inf)."""
    return "over the last bucket" if math.isinf(bound) else f"≤ {bound:g}"


def _gc_cell(s: dict[str, Any]) -> str:
    if "gc_per_10s" not in s:
        return ""
    if not s["gc_per_10s"]:
        return "0 / 0"
    return f"{s['gc_full_per_10s']:g} / {s['gc_per_10s']:g} ({_at_most(s['gc_longest_ms'])} ms)"


def markdown(summary: list[dict[str, Any]], http: dict[str, Any], extra: dict[str, Any], info: dict[str, Any]) -> str:
    lines = [
        f"Machine: {info['cpus']} cores ({info['cpu']}), Python {info['python']}, {info['date']}, load average at"
        f" start {info['load_at_start']}, at the end {info['load_at_end']}. Load generator, upstream, Redis,"
        f" PostgreSQL and the servers share the cores. Each figure is the median of {info['rounds']} interleaved"
        f" rounds of {info['seconds']:g} s"
        f" (after {WARMUP:g} s of warm-up); p99 spread is the lowest and highest round's p99. GC: full"
        " collections / all collections per 10 s of load, and the longest pause (to within a histogram bucket).",
        "",
        "| mode | conc. | target | req/s | p50 ms | p99 ms | p99 spread | p99.9 ms | added p50 | added p99"
        " | TTFT added p50 | vs bare | CPU µs/req | GC full / all per 10 s (longest) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lo, hi = s["p99_spread_ms"]
        lines.append(
            f"| {'stream' if s['stream'] else 'json'} | {s['concurrency']} | {s['target']} | {s['rps']:,} "
            f"| {s['p50_ms']:.2f} | {s['p99_ms']:.2f} | {lo:.2f}–{hi:.2f} | {s['p999_ms']:.2f} "
            f"| {s['added_p50_ms']:+.2f} | {s['added_p99_ms']:+.2f} | "
            f"{s.get('added_ttft_p50_ms', '') if s['stream'] else ''} | {s.get('rps_vs_bare', '')} "
            f"| {s.get('cpu_us_per_request', '')} | {_gc_cell(s)} |"
        )
    writers = [s for s in summary if "writer" in s]
    if writers:
        lines += [
            "",
            "Ledger writer batches during the rounds above (from the proxy's /metrics; the longest and the"
            " biggest to within a histogram bucket):",
            "",
            "| mode | conc. | target | batches/s | records per batch | mean ms | longest ms | biggest |",
            "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for s in writers:
            w = s["writer"]
            lines.append(
                f"| {'stream' if s['stream'] else 'json'} | {s['concurrency']} | {s['target']} | {w['batches_per_s']}"
                f" | {w['records_per_batch']} | {w['mean_ms']} | {_at_most(w['longest_ms_at_most'])}"
                f" | {_at_most(w['biggest_at_most'])} |"
            )
    if tail := http.get("tail"):
        direct = tail["targets"]["direct"]
        lines += [
            "",
            f"Tail at concurrency 1, low-noise client (bench/tail.py: one blocking keep-alive socket, pinned to"
            f" core {tail['client_cpu']}, the server of each round pinned to core {tail['server_cpu']}):"
            f" {tail['rounds']} interleaved rounds of {tail['seconds']:g} s (after 1 s of warm-up). p50 and p99"
            " are medians of the rounds; pooled p99 and p99.9 are over every round's requests together.",
            "",
            "| target | req/s | p50 ms | p99 ms | p99 spread | added p99 | pooled p99 | pooled p99.9"
            " | GC full / all per 10 s (longest) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, s in tail["targets"].items():
            lo, hi = s["p99_spread_ms"]
            lines.append(
                f"| {name} | {s['rps']:,} | {s['p50_ms']:.3f} | {s['p99_ms']:.3f} | {lo:.3f}–{hi:.3f} "
                f"| {s['p99_ms'] - direct['p99_ms']:+.3f} | {s['pooled_p99_ms']:.3f} | {s['pooled_p999_ms']:.3f} "
                f"| {_gc_cell(s)} |"
            )
        writers = {n: s["writer"] for n, s in tail["targets"].items() if "writer" in s}
        if writers:
            lines += ["", "| target (tail rounds) | writer batches/s | records per batch | mean ms | longest ms |"]
            lines += ["| --- | ---: | ---: | ---: | ---: |"]
            lines += [
                f"| {n} | {w['batches_per_s']} | {w['records_per_batch']} | {w['mean_ms']}"
                f" | {_at_most(w['longest_ms_at_most'])} |"
                for n, w in writers.items()
            ]
    if soaked := http.get("soak"):
        first, last = soaked["rss_mb"][0][1], soaked["rss_mb"][-1][1]
        lines += [
            "",
            f"Soak: the proxy under JSON load at concurrency 16 for {soaked['seconds']:g} s (BENCH_SOAK_SECONDS),"
            f" {soaked['requests']:,} requests, {soaked['rps']:,} req/s, p99 {soaked['p99_ms']:.2f} ms,"
            f" p99.9 {soaked['p999_ms']:.2f} ms; GC full / all per 10 s (longest): {_gc_cell(_gc_rate(soaked))}.",
            "",
            "| resident MB | " + " | ".join(first) + " |",
            "| --- | " + " | ".join("---:" for _ in first) + " |",
        ]
        lines += [
            f"| at {t:g} s | " + " | ".join(str(rss.get(k, "")) for k in first) + " |" for t, rss in soaked["rss_mb"]
        ]
        growth = {k: round(last.get(k, 0) - v, 1) for k, v in first.items()}
        lines += ["| growth | " + " | ".join(f"{v:+g}" for v in growth.values()) + " |"]
    for name, table in extra.items():
        lines += ["", f"{name}:", "", "| measure | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def _gc_rate(soaked: dict[str, Any]) -> dict[str, Any]:
    gc, wall = soaked["gc"], soaked["seconds"] + 2
    if not gc:
        return {}
    return {
        "gc_per_10s": round(gc["gc_count"] / wall * 10, 1),
        "gc_full_per_10s": round(gc["gc_full"] / wall * 10, 1),
        "gc_longest_ms": gc["gc_longest_ms"],
    }


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0, help=f"measured seconds per round, after {WARMUP:g} s")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds per point; figures are medians")
    p.add_argument("--concurrency", default="1,16,128", type=lambda v: [int(c) for c in v.split(",")])
    p.add_argument("--no-litellm", action="store_true")
    p.add_argument("--tail-rounds", type=int, default=15, help="low-noise rounds at concurrency 1 (0: none)")
    p.add_argument("--tail-seconds", type=float, default=2.0)
    p.add_argument(
        "--soak",
        type=float,
        default=float(os.environ.get("BENCH_SOAK_SECONDS", "60")),
        help="seconds of load for the memory soak (default BENCH_SOAK_SECONDS, else 60; 0: none)",
    )
    p.add_argument(
        "--variant",
        action="append",
        default=[],
        help="another proxy, JSON only: NAME:ENV=VALUE[;ENV=VALUE...], e.g. gc10k:GC_THRESHOLDS=10000,10,10",
    )
    p.add_argument("--json-only", action="store_true", help="leave out the streamed points")
    p.add_argument("--no-micro", action="store_true", help="leave out the budget and ledger micro-benchmarks")
    a = p.parse_args()
    # Only whether it is installed: importing litellm would fetch its cost map from the network.
    with_litellm = not a.no_litellm and importlib.util.find_spec("litellm") is not None
    info = {**machine(), "rounds": a.rounds, "seconds": a.seconds, "variants": a.variant}
    print(f"HTTP path ({a.rounds} interleaved rounds of {a.seconds:g} s per point):", flush=True)
    http = http_benchmark(a, with_litellm)
    summary = summarise(http["rows"])
    extra: dict[str, Any] = {}
    if not a.no_micro:
        from budget_bench import run as budget_run
        from ledger_bench import run as ledger_run

        extra = {
            "Budget round trip (one process, sequential)": asyncio.run(budget_run()),
            "Ledger (Redis Stream → PostgreSQL)": asyncio.run(ledger_run()),
        }
    RESULTS.mkdir(exist_ok=True)
    info["load_at_end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    (RESULTS / "latest.json").write_bytes(
        orjson.dumps(
            {"machine": info, "http": summary, "tail": http.get("tail"), "soak": http.get("soak"), **extra},
            option=orjson.OPT_INDENT_2,
        )
    )
    table = markdown(summary, http, extra, info)
    (RESULTS / "latest.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
