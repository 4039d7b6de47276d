"""`serve`: the proxy on PROXY_HOST:PROXY_PORT, in one process or in PROXY_WORKERS processes on one socket.

With several workers this process is their supervisor: it binds the socket, which every worker accepts
from; starts the workers and starts again any that dies; runs the host's one ledger writer
(LEDGER_WRITER=process), so the workers run none; and on SIGTERM or Ctrl-C passes the signal on, waits
for every worker to drain (lifecycle.py), and only then stops the writer, which first moves the
workers' last records to PostgreSQL. Budgets need nothing here: every worker reserves in the same Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import multiprocessing
import os
import secrets
import signal
import socket
import sys
from dataclasses import replace
from multiprocessing.process import BaseProcess

import structlog
import uvicorn
import uvloop
from uvicorn.config import STARTUP_FAILURE

from .config import Settings
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


def _serve(settings: Settings, sock: socket.socket | None) -> int:
    from .app import create_app  # the supervisor never imports the application
    from .lifecycle import DrainingServer

    app = create_app(settings)
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


def _worker(settings: Settings, sock: socket.socket) -> None:
    """A worker process's entry point."""
    name_process("quota-worker")
    sys.exit(_serve(settings, sock))


async def _supervise(settings: Settings, count: int) -> int:
    loop = asyncio.get_running_loop()
    context = multiprocessing.get_context("spawn")  # fresh interpreters: nothing of this loop is inherited
    sock = server_config(None, settings).bind_socket()
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
            target=_worker, args=(worker_settings(settings, index), sock), name=f"quota-worker-{index}"
        )
        process.start()
        return process

    writer = WriterProcess(settings) if settings.ledger_writer == "process" else None
    writer_task = asyncio.create_task(writer.run(), name="ledger-writer-process") if writer else None
    status = 0
    try:
        workers.extend([await asyncio.to_thread(start, i) for i in range(count)])
        log.info("proxy_workers_started", pids=[p.pid for p in workers], writer=settings.ledger_writer)
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
    return status


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
