"""`python bench/workers_bench.py`: the full proxy's throughput with 1 and with 2 workers (PROXY_WORKERS), in one run.

Both proxies run at once in front of the raw mock upstream (never LiteLLM), each with its own ledger
stream and writer process, and the rounds interleave them, as in run.py, so the VM's drift favours
neither. Results: bench/results/workers.json and workers.md.
"""

from __future__ import annotations

import argparse
import os
import secrets
import statistics
import subprocess
import sys
import time
from typing import Any

import orjson
from run import RESULTS, ROOT, UVICORN, cpu_seconds, loadgen, machine, spawn

from proxy.auth import issue_token
from proxy.config import Settings
from tests.devstack import free_port, stop


def medians(results: list[dict[str, Any]]) -> dict[str, Any]:
    """One point's rounds: the median of each figure, the totals of requests and errors."""
    counts = ("requests", "sent", "errors")
    figures = {k: round(statistics.median(r[k] for r in results), 3) for k in results[0] if k not in counts}
    return figures | {"requests": sum(r["requests"] for r in results), "errors": sum(r["errors"] for r in results)}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=3.0, help="measured seconds per point, after 2 s of warm-up")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per point; figures are medians")
    p.add_argument("--concurrency", default="16,128")
    a = p.parse_args()
    secret = secrets.token_hex(32)
    settings = Settings(
        jwt_secret=secret,
        database_url=os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
        redis_url=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/11"),
    )
    token = issue_token(settings, "bench-workers", None, 3600)
    procs: list[subprocess.Popen[bytes]] = []
    rows = []
    try:
        up_port = free_port()
        upstream = f"http://127.0.0.1:{up_port}"
        procs.append(spawn([*UVICORN, "--port", str(up_port), "mock_upstream:app"], {}, f"{upstream}/health"))
        env = {
            "JWT_SECRET": secret,
            "LITELLM_BASE_URL": upstream,
            "LITELLM_MASTER_KEY": "sk-bench",
            "DATABASE_URL": settings.database_url,
            "REDIS_URL": settings.redis_url,
            "DEFAULT_TOKEN_BUDGET": str(10**12),
            "LOG_LEVEL": "warning",
        }
        migrate = [sys.executable, "-m", "proxy", "migrate"]
        subprocess.run(migrate, env={**os.environ, **env}, cwd=ROOT, check=True, capture_output=True)
        targets = {}
        for workers in (1, 2):
            port = free_port()
            proxy = spawn(
                [sys.executable, "-m", "proxy", "serve"],
                {**env, "PROXY_PORT": str(port), "PROXY_WORKERS": str(workers), "LEDGER_STREAM": f"bench:w{workers}"},
                f"http://127.0.0.1:{port}/healthz",
            )
            procs.append(proxy)
            targets[f"{workers} worker{'s' if workers > 1 else ''}"] = (
                f"http://127.0.0.1:{port}/v1/chat/completions",
                proxy.pid,
            )
        time.sleep(3)  # the second worker may still be starting when the first answers /healthz
        for stream in (False, True):
            for c in [int(c) for c in a.concurrency.split(",")]:
                rounds: dict[str, list[dict[str, float]]] = {}
                for _ in range(a.rounds):
                    for name, (url, pid) in targets.items():
                        before = cpu_seconds(pid)
                        result = loadgen(url, token, c, a.seconds, stream)
                        result["cpu_us_per_request"] = round(
                            (cpu_seconds(pid) - before) / max(result["sent"], 1) * 1e6, 1
                        )  # type: ignore[operator]
                        rounds.setdefault(name, []).append(result)  # type: ignore[arg-type]
                        print(
                            f"  {'stream' if stream else 'json  '} c={c:<4} {name:<10} {result['rps']:>8} req/s"
                            f"  p50 {result['p50_ms']:.3f} ms  p99 {result['p99_ms']:.3f} ms",
                            flush=True,
                        )
                for name, results in rounds.items():
                    rows.append({"target": name, "stream": stream, "concurrency": c, **medians(results)})
    finally:
        for proc in reversed(procs):
            stop(proc, timeout=60)
    info = {**machine(), "rounds": a.rounds, "seconds": a.seconds}
    lines = [
        f"Machine: {info['cpus']} cores ({info['cpu']}), Python {info['python']}, {info['date']}. The load generator,"
        " the mock upstream, Redis, PostgreSQL and the proxy's processes share the cores."
        f" Each figure is the median of {a.rounds} interleaved rounds of {a.seconds:g} s (after 2 s of warm-up).",
        "",
        "| mode | conc. | proxy | req/s | p50 ms | p99 ms | CPU µs/req |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {'stream' if r['stream'] else 'json'} | {r['concurrency']} | {r['target']} | {r['rps']:,} "
            f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['cpu_us_per_request']} |"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "workers.json").write_bytes(orjson.dumps({"machine": info, "rows": rows}, option=orjson.OPT_INDENT_2))
    (RESULTS / "workers.md").write_text("\n".join(lines) + "\n")
    print("\n" + "\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
