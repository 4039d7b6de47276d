"""The ledger writer in a process of its own (LEDGER_WRITER=process, the default).

Moving records from the stream to PostgreSQL is batch work: reading, decoding, COPY, acknowledging.
In the proxy's event loop it took CPU from every request and its bursts showed in the p99 latency;
in a process of its own it runs on whichever core is free (docs/performance.md). `serve` starts it,
restarts it when it dies and stops it on the way out; it sends its metrics back over a pipe, so the
proxy's /metrics still shows them. `quota-sidecar ledger` runs one on its own, for proxies started
with LEDGER_WRITER=off.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import structlog
import uvloop

from . import metrics
from .config import Settings
from .db import create_pool
from .ledger import Ledger
from .logs import configure_logging
from .redis_batch import connect

log = structlog.get_logger("proxy.writer")

REPORT_SECONDS = 1.0


def run(settings: Settings, pipe: Connection | None = None) -> None:
    """The writer process: drain the stream into PostgreSQL until killed, or, with `pipe`, until the
    proxy at its other end is gone."""
    configure_logging(settings.log_level)
    if pipe is not None:
        # Ctrl-C reaches the whole process group; the proxy stops its writer itself.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Batch work beside the proxy on the same cores: it yields to the requests (#19's tail).
        os.nice(10)
    uvloop.run(_drain(settings, pipe))


async def _drain(settings: Settings, pipe: Connection | None) -> None:
    client = connect(settings.redis_url, settings.redis_timeout)
    if pipe is not None:
        metrics.keep_ledger_batches()
    pool = await create_pool(settings.database_url, min_size=0, max_size=2)
    writer = asyncio.create_task(Ledger.for_settings(client, pool, settings).run(), name="ledger-writer")
    try:
        while pipe is not None:
            done, _ = await asyncio.wait({writer}, timeout=REPORT_SECONDS)
            if done:
                break
            try:
                pipe.send((metrics.ledger_samples(), metrics.take_ledger_batches()))
            except OSError:
                log.warning("ledger_writer_orphaned")  # the proxy died without stopping us
                return
        await writer  # only ends by an error, which ends the process: the proxy starts a new one
    finally:
        # Stopped mid-batch, the batch's entries stay pending in the stream and are written again
        # by the next writer under the same consumer name; request_id keeps that from counting twice.
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
        await pool.close()
        await client.aclose()


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
                        metrics.merge_ledger_samples(samples, seen)
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
    process.terminate()
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
