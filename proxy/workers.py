"""`serve`: the proxy on PROXY_HOST:PROXY_PORT, in one process or in PROXY_WORKERS processes on one socket.

With several workers this process is their supervisor: it binds the socket, which every worker accepts
from; starts the workers and starts again any that dies; runs the host's one ledger writer
(LEDGER_WRITER=process), so the workers run none; and on SIGTERM or Ctrl-C passes the signal on, waits
for every worker to drain (lifecycle.py), and only then stops the writer, which first moves the
workers' last records to PostgreSQL. Budgets need nothing here: every worker reserves in the same Redis.
A scrape of /metrics reaches one worker, which answers for the host from the snapshots each process
writes into a private directory this one makes (host_metrics.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from dataclasses import replace
from multiprocessing.process import BaseProcess
from pathlib import Path

import structlog
import uvicorn
import uvloop
from uvicorn.config import STARTUP_FAILURE

from . import host_metrics, metrics
from .config import Settings
from .host_metrics import HostMetrics
from .logs import configure_logging
from .writer import WriterProcess, name_process

log = structlog.get_logger("proxy.workers")

# Past SHUTDOWN_GRACE_SECONDS a worker still has its lifespan's shutdown to run (settles, records).
_STOP_MARGIN = 15.0


def server_config(app: object, settings: Settings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.proxy_host,
        port=settings.proxy_port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=settings.log_level,
        # Nothing here reads the client's address, so X-Forwarded-* is not parsed on every request;
        # and responses do not advertise the server's software.
        proxy_headers=False,
        server_header=False,
        # Slow or idle clients cannot pile up: past MAX_CONNECTIONS new requests get 503, and an idle
        # keep-alive connection is closed after 5 s (bodies have BODY_READ_TIMEOUT in the relay).
        limit_concurrency=settings.max_connections,
        timeout_keep_alive=5,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds),
    )


def serve(settings: Settings, workers: int) -> int:
    """Run until stopped; returns the exit status (0 after a clean stop)."""
    if workers <= 1:
        return _serve(settings, None)
    configure_logging(settings.log_level)
    if not settings.pages_secret and not settings.jwt_secret:
        # Else each worker would sign pages with a random secret of its own, and a link signed by one
        # would not open on the next (signing.py); this one lasts as long as the supervisor.
        settings = replace(settings, pages_secret=secrets.token_hex(32))
    return uvloop.run(_supervise(settings, workers))


def _serve(settings: Settings, sock: socket.socket | None, shared: HostMetrics | None = None) -> int:
    from .app import create_app  # the supervisor never imports the application
    from .lifecycle import DrainingServer

    app = create_app(settings, shared)
    server = DrainingServer(server_config(app, settings), app.state.lifecycle)
    server.run(sockets=[sock] if sock is not None else None)
    return 0 if server.started else STARTUP_FAILURE


def worker_settings(settings: Settings, index: int) -> Settings:
    """What worker `index` runs with: no writer of its own when the supervisor runs the host's, and with
    LEDGER_WRITER=inline (one writer per worker, configured so) a consumer name of its own that it keeps
    when restarted, so it finds the entries it left pending."""
    if settings.ledger_writer == "process":
        return replace(settings, ledger_writer="off")
    if settings.ledger_writer == "inline":
        base = settings.ledger_consumer or os.environ.get("HOSTNAME") or socket.gethostname()
        return replace(settings, ledger_consumer=f"{base}-{index}")
    return settings


def _worker(settings: Settings, sock: socket.socket, metrics_dir: str, index: int) -> None:
    """A worker process's entry point."""
    name_process("quota-worker")
    sys.exit(_serve(settings, sock, HostMetrics(metrics_dir, str(index))))


async def _supervise(settings: Settings, count: int) -> int:
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing of this loop is inherited
    sock = server_config(None, settings).bind_socket()
    metrics_dir = _metrics_dir()
    shared = HostMetrics(metrics_dir, host_metrics.WRITER, metrics.WRITER_METRICS)
    stopping = asyncio.Event()
    workers: list[BaseProcess] = []

    def on_signal(sig: int) -> None:
        if stopping.is_set():
            if sig == signal.SIGINT:  # Ctrl-C twice: the workers stop at once
                _signal_all(workers, signal.SIGINT)
            return
        log.info("shutdown_draining", workers=len(workers))
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal, sig)

    def start(index: int) -> BaseProcess:
        process = context.Process(
            target=_worker,
            args=(worker_settings(settings, index), sock, metrics_dir, index),
            name=f"quota-worker-{index}",
        )
        process.start()
        return process

    writer = WriterProcess(settings) if settings.ledger_writer == "process" else None
    writer_task = asyncio.create_task(writer.run(), name="ledger-writer-process") if writer else None
    shared.start()
    status = 0
    try:
        workers.extend([await asyncio.to_thread(start, i) for i in range(count)])
        log.info(
            "proxy_workers_started",
            pids=[p.pid for p in workers],
            writer=settings.ledger_writer,
            metrics_dir=metrics_dir,
        )
        delays, started = [0.5] * count, [loop.time()] * count
        while not stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stopping.wait(), 0.5)
            for i, process in enumerate(workers):
                if process.is_alive() or stopping.is_set():
                    continue
                if process.exitcode == STARTUP_FAILURE:
                    # Its start-up failed (configuration, tokenizer file): every other would fail the same way.
                    log.error("proxy_worker_failed_to_start", pid=process.pid)
                    status = STARTUP_FAILURE
                    stopping.set()
                    break
                # Back off only when it keeps dying soon after starting.
                delays[i] = 1.0 if loop.time() - started[i] > 60 else min(delays[i] * 2, 30.0)
                log.error("proxy_worker_exited", pid=process.pid, exitcode=process.exitcode, restart_in=delays[i])
                # Its gauges go; its counts stay, for the next worker `i` to carry on from.
                await asyncio.to_thread(host_metrics.retire, shared.directory / f"{i}.json")
                await asyncio.sleep(delays[i])
                workers[i], started[i] = await asyncio.to_thread(start, i), loop.time()
        _signal_all(workers, signal.SIGTERM)
        deadline = settings.shutdown_grace_seconds + _STOP_MARGIN
        await asyncio.gather(*(asyncio.to_thread(_join, p, deadline) for p in workers))
        log.info("proxy_workers_stopped")
    finally:
        sock.close()
        if writer_task is not None:
            writer_task.cancel()  # the writer moves the workers' last records, then exits
            await asyncio.gather(writer_task, return_exceptions=True)
        await shared.stop()
        shutil.rmtree(metrics_dir, ignore_errors=True)
    return status


_METRICS_PREFIX = "quota-metrics-"


def _metrics_dir() -> str:
    """The workers' snapshot directory: mode 700 (only this user's processes read it), named for this
    supervisor. A supervisor that died without its cleanup (SIGKILL, the OOM killer) left one behind,
    and a crash loop one a restart: those whose supervisor is gone are removed first."""
    for stale in Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*-*"):
        pid = stale.name.removeprefix(_METRICS_PREFIX).partition("-")[0]
        with contextlib.suppress(OSError):
            if pid.isdigit() and stale.stat().st_uid == os.getuid() and not _alive(int(pid)):
                shutil.rmtree(stale)
    return tempfile.mkdtemp(prefix=f"{_METRICS_PREFIX}{os.getpid()}-")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _signal_all(workers: list[BaseProcess], sig: int) -> None:
    for process in workers:
        if process.pid is not None and process.exitcode is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, sig)


def _join(process: BaseProcess, timeout: float) -> None:
    process.join(timeout)
    if process.is_alive():
        log.error("proxy_worker_killed", pid=process.pid, after_seconds=timeout)
        process.kill()
        process.join()
