"""`make bench`: the proxy's cost, measured against calling the upstream directly, in one run.

Targets, interleaved at each concurrency: (a) the mock upstream directly, (b) a bare aiohttp
forwarder (bench/forwarder.py), (c) the full proxy (JWT, Redis reserve/settle, ledger to
PostgreSQL), and (d) LiteLLM's own proxy on a mock model when LiteLLM is installed. The load
generator runs in its own process. Also runs the budget and ledger micro-benchmarks.
Results: bench/results/latest.json and latest.md.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import platform
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

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


def machine() -> dict[str, object]:
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "?",
    )
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def loadgen(url: str, token: str, concurrency: int, seconds: float, stream: bool) -> dict[str, object]:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "loadgen.py"),
        url,
        "--concurrency",
        str(concurrency),
        "--seconds",
        str(seconds),
    ]
    cmd += ["--token", token] if token else []
    cmd += ["--stream"] if stream else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=seconds * 4 + 60).stdout
    return orjson.loads(out)


def medians(results: list[dict[str, float]]) -> dict[str, float]:
    return {
        k: round(statistics.median(r[k] for r in results), 3)
        for k in results[0]
        if k not in ("requests", "sent", "errors")
    } | {"requests": sum(r["requests"] for r in results), "errors": sum(r["errors"] for r in results)}


def spawn(cmd: list[str], env: dict[str, str], health: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen(
        cmd, env={**os.environ, **env}, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    wait_http(health, 60, proc)
    return proc


def http_benchmark(seconds: float, concurrencies: list[int], with_litellm: bool, repeats: int) -> dict[str, object]:
    secret = secrets.token_hex(32)
    settings = Settings(
        jwt_secret=secret,
        database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
    )
    token = issue_token(settings, "bench-user", None, 3600)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        up_port, fw_port, px_port = free_port(), free_port(), free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(spawn([*UVICORN, "--port", str(up_port), "mock_upstream:app"], {}, f"{upstream}/health"))
        procs.append(
            spawn(
                [*UVICORN, "--port", str(fw_port), "forwarder:app"],
                {"UPSTREAM": upstream},
                f"http://127.0.0.1:{fw_port}/health",
            )
        )
        env = {
            "JWT_SECRET": secret,
            "LITELLM_BASE_URL": upstream,
            "LITELLM_MASTER_KEY": "sk-bench",
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "PROXY_PORT": str(px_port),
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
        proxy = spawn([sys.executable, "-m", "proxy", "serve"], env, f"http://127.0.0.1:{px_port}/healthz")
        procs.append(proxy)
        time.sleep(0.5)
        targets = {
            "direct": (f"{upstream}/v1/chat/completions", "", None),
            "bare_forwarder": (f"http://127.0.0.1:{fw_port}/v1/chat/completions", "", procs[1].pid),
            "proxy": (f"http://127.0.0.1:{px_port}/v1/chat/completions", token, proxy.pid),
        }
        if with_litellm:
            ll_port, key = free_port(), f"sk-{secrets.token_hex(24)}"
            config = Path(tempfile.mkdtemp()) / "litellm.yaml"
            config.write_text(
                "model_list:\n  - model_name: bench\n    litellm_params:\n      model: openai/bench\n"
                "      api_key: sk-mock\n      mock_response: 'word word word word word word word word word word'\n"
                "litellm_settings:\n  telemetry: false\n"
            )
            procs.append(start_litellm(ll_port, key, config=config))
            targets["litellm"] = (f"http://127.0.0.1:{ll_port}/v1/chat/completions", key, None)
        rows = []
        for stream in (False, True):
            for c in concurrencies:
                # Rounds interleave the targets, and each figure is the median over the rounds: this
                # VM drifts by ±20 % over minutes, which would otherwise favour whichever ran first.
                rounds: dict[str, list[dict[str, float]]] = {}
                for _ in range(repeats):
                    for name, (url, tok, pid) in targets.items():
                        if name == "litellm" and (stream or c > 16):
                            continue  # ~70 req/s per worker: only a point of comparison, not a load target
                        before = cpu_seconds(pid) if pid else 0.0
                        result = loadgen(url, tok, c, seconds, stream)
                        if pid:
                            result["cpu_us_per_request"] = round(
                                (cpu_seconds(pid) - before) / max(result["sent"], 1) * 1e6, 1
                            )  # type: ignore[operator]
                        rounds.setdefault(name, []).append(result)  # type: ignore[arg-type]
                        print(
                            f"  {'stream' if stream else 'json  '} c={c:<4} {name:<15} {result['rps']:>8} req/s"
                            f"  p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms",
                            flush=True,
                        )
                for name, results in rounds.items():
                    rows.append(
                        {"target": name, "stream": stream, "concurrency": c, "rounds": len(results), **medians(results)}
                    )
        return {"rows": rows}
    finally:
        for proc in procs:
            stop(proc)


def summarise(rows: list[dict[str, object]]) -> list[dict[str, object]]:
    by = {(r["target"], r["stream"], r["concurrency"]): r for r in rows}
    out = []
    for r in rows:
        direct, bare = (
            by[("direct", r["stream"], r["concurrency"])],
            by.get(("bare_forwarder", r["stream"], r["concurrency"])),
        )
        s = dict(r)
        s["added_p50_ms"] = round(r["p50_ms"] - direct["p50_ms"], 3)  # type: ignore[operator]
        s["added_p99_ms"] = round(r["p99_ms"] - direct["p99_ms"], 3)  # type: ignore[operator]
        if r["stream"]:
            s["added_ttft_p50_ms"] = round(r["ttft_p50_ms"] - direct["ttft_p50_ms"], 3)  # type: ignore[operator]
        if bare:
            s["rps_vs_bare"] = round(r["rps"] / bare["rps"], 3)  # type: ignore[operator]
        out.append(s)
    return out


def markdown(summary: list[dict[str, object]], extra: dict[str, object], info: dict[str, object]) -> str:
    lines = [
        f"Machine: {info['cpus']} cores ({info['cpu']}), Python {info['python']}, {info['date']}. "
        "Load generator, upstream and proxy share the cores. "
        f"Each figure is the median of {info['rounds']} interleaved rounds of {info['seconds']:g} s"
        " (after 2 s of warm-up).",
        "",
        "| mode | conc. | target | req/s | p50 ms | p99 ms | added p50 | added p99 | TTFT added p50 | vs bare"
        " | CPU µs/req |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {'stream' if s['stream'] else 'json'} | {s['concurrency']} | {s['target']} | {s['rps']:,} "
            f"| {s['p50_ms']:.2f} | "
            f"{s['p99_ms']:.2f} | {s['added_p50_ms']:+.2f} | {s['added_p99_ms']:+.2f} | "
            f"{s.get('added_ttft_p50_ms', '') if s['stream'] else ''} | {s.get('rps_vs_bare', '')} "
            f"| {s.get('cpu_us_per_request', '')} |"
        )
    for name, table in extra.items():
        lines += ["", f"{name}:", "", "| measure | value |", "| --- | ---: |"]
        lines += [f"| {k} | {v} |" for k, v in table.items()]  # type: ignore[union-attr]
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point, after 2 s of warm-up")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point; figures are medians")
    p.add_argument("--concurrency", default="1,16,128")
    p.add_argument("--no-litellm", action="store_true")
    a = p.parse_args()
    # Only whether it is installed: importing litellm would fetch its cost map from the network.
    with_litellm = not a.no_litellm and importlib.util.find_spec("litellm") is not None
    info = {**machine(), "rounds": a.rounds, "seconds": a.seconds}
    print(f"HTTP path ({a.rounds} interleaved rounds of {a.seconds:.0f} s per point):", flush=True)
    http = http_benchmark(a.seconds, [int(c) for c in a.concurrency.split(",")], with_litellm, a.rounds)
    summary = summarise(http["rows"])  # type: ignore[arg-type]
    from budget_bench import run as budget_run
    from ledger_bench import run as ledger_run

    extra = {
        "Budget round trip (one process, sequential)": asyncio.run(budget_run()),
        "Ledger (Redis Stream → PostgreSQL)": asyncio.run(ledger_run()),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_bytes(
        orjson.dumps({"machine": info, "http": summary, **extra}, option=orjson.OPT_INDENT_2)
    )
    table = markdown(summary, extra, info)
    (RESULTS / "latest.md").write_text(table)
    print("\n" + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
