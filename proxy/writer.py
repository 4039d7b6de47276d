"""The ledger writer in a process of its own (LEDGER_WRITER=process, the default).

Moving records from the stream to PostgreSQL is batch work: reading, decoding, COPY, acknowledging.
In the proxy's event loop it took CPU from every request and its bursts showed in the p99 latency;
in a process of its own it runs on whichever core is free (docs/performance.md). `serve` starts it,
restarts it when it dies and stops it on the way out (SIGTERM: it first moves what the stream holds);
it sends its metrics back over a pipe, so the proxy's /metrics still shows them. `quota-sidecar ledger`
runs one on its own, for proxies started with LEDGER_WRITER=off; SIGTERM stops it the same way.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import asyncpg
import structlog
import uvloop

from . import metrics
from .alerts import channels
from .config import Settings
from .db import create_pool
from .ledger import FLUSH_SECONDS, Ledger
from .logs import configure_logging
from .notifier import Notifier
from .redis_batch import connect

log = structlog.get_logger("proxy.writer")

REPORT_SECONDS = 1.0


def run(settings: Settings, pipe: Connection | None = None) -> None:
    """The writer process: drain the stream into PostgreSQL until SIGTERM (then move what is left and exit),
    or, with `pipe`, until the proxy at its other end is gone."""
    configure_logging(settings.log_level)
    if pipe is not None:
        # Ctrl-C reaches the whole process group; the proxy stops its writer itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Batch work beside the proxy on the same cores: it yields to the requests (#19's tail).
        os.nice(10)
        name_process("quota-writer")
    uvloop.run(_drain(settings, pipe))


def name_process(name: str) -> None:
    """The name `ps -o comm` and `top` show (Linux), so the writer and the workers can be told apart."""
    try:
        with open("/proc/self/comm", "w") as comm:
            comm.write(name[:15])
    except OSError:
        pass  # not Linux: the name is only a convenience


async def _drain(settings: Settings, pipe: Connection | None) -> None:
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stopping.set)
    client = connect(settings.redis_url, settings.redis_timeout)
    if pipe is not None:
        metrics.keep_ledger_batches()
    pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    ledger = Ledger.for_settings(client, pool, settings)
    writer = asyncio.create_task(ledger.run(), name="ledger-writer")
    notifier = start_notifier(ledger, pool, settings)
    stop = asyncio.create_task(stopping.wait(), name="ledger-writer-stop")
    try:
        while True:
            done, _ = await asyncio.wait({writer, stop}, timeout=REPORT_SECONDS, return_when=asyncio.FIRST_COMPLETED)
            if writer in done:
                await writer  # only ends by an error, which ends the process: the proxy starts a new one
                return
            if stop in done:
                # Stopped mid-batch, the batch's entries stay pending and the flush writes them first;
                # request_id keeps that from counting twice.
                writer.cancel()
                await asyncio.gather(writer, return_exceptions=True)
                await ledger.flush(FLUSH_SECONDS)
                return
            if pipe is not None:
                try:
                    pipe.send((metrics.writer_samples(), metrics.take_ledger_batches()))
                except OSError:
                    log.warning("ledger_writer_orphaned")  # the proxy died without stopping us
                    return
    finally:
        tasks = [t for t in (writer, stop, notifier) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await pool.close()
        await client.aclose()


def start_notifier(ledger: Ledger, pool: asyncpg.Pool, settings: Settings) -> asyncio.Task[None] | None:
    """The alert notifier beside the writer, when a channel is configured; the writer wakes it on new alerts."""
    if not channels(settings):
        return None
    notifier = Notifier(pool, settings)
    if ledger.alerts is not None:
        ledger.alerts.on_new = notifier.wake
    return asyncio.create_task(notifier.run(), name="alert-notifier")


class WriterProcess:
    """The writer as the proxy's child: started with it, restarted when it dies, stopped with it."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        # A fresh interpreter: a forked child would inherit the proxy's event loop and sockets.
        self._context = multiprocessing.get_context("spawn")
        self.pid: int | None = None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        delay = 1.0
        while True:
            receiver, sender = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=run, args=(self._settings, sender), name="ledger-writer", daemon=True
            )
            await asyncio.to_thread(process.start)
            sender.close()
            seen: metrics.Samples = {}
            self.pid, started = process.pid, loop.time()
            try:
                while process.is_alive():
                    await asyncio.sleep(REPORT_SECONDS / 2)
                    while receiver.poll():
                        samples, batches = receiver.recv()
                        metrics.merge_writer_samples(samples, seen)
                        for records, seconds in batches:
                            metrics.observe_ledger_batch(records, seconds)
            except (EOFError, OSError):
                pass  # it died: its end of the pipe closed
            except asyncio.CancelledError:
                await asyncio.to_thread(_stop, process)
                raise
            finally:
                receiver.close()
            # Back off only when it keeps dying soon after starting.
            delay = 1.0 if loop.time() - started > 60 else min(delay * 2, 30.0)
            log.error("ledger_writer_exited", exitcode=process.exitcode, restart_in=delay)
            await asyncio.sleep(delay)


def _stop(process: BaseProcess) -> None:
    process.terminate()  # SIGTERM: it moves what the stream holds to PostgreSQL, then exits
    process.join(FLUSH_SECONDS + 5)
    if process.is_alive():
        process.kill()
        process.join()
