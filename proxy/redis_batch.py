"""Cheap Redis round trips for the request path: concurrent requests share them.

redis-py spends far more CPU per command than Redis does, so under load the budget's
reserve/settle and the ledger's XADD cost more than the upstream call itself. A plain
redis:// server gets a PipedRedis (redis_wire.py): hiredis on a raw connection. Other clients
(Redis Cluster, TLS, unix sockets) get a BatchingRedis over redis-py: the first command goes
out at once (no added latency when idle); commands issued while it is in flight wait and
then leave together as one pipeline.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, Protocol

import hiredis
import redis.asyncio as redis
from redis.asyncio.connection import Connection

from .redis_wire import PipedRedis

Command = tuple[Any, ...]


class CommandSender(Protocol):
    """What the budget engine and the relay send their commands through."""

    def call(self, *command: Any) -> Awaitable[Any]: ...

    def submit(self, *command: Any) -> asyncio.Future[Any]: ...

    def on_connect(self, *command: Any) -> None: ...

    def written(self) -> Awaitable[None]: ...

    async def idle(self) -> None: ...

    async def close(self) -> None: ...


class _HiredisPacking(Connection):
    """redis-py's asyncio connection packs commands in Python; hiredis does it in C, for a third less
    per pipelined command."""

    def pack_command(self, *args: Any) -> list[bytes]:
        if isinstance(args[0], str) and " " in args[0]:  # "CLIENT SETINFO" and the like
            args = (*args[0].split(), *args[1:])
        return [hiredis.pack_command(args)]


def connect(url: str, timeout: float) -> redis.Redis:
    options: dict[str, Any] = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if url.startswith("redis://"):  # TLS (rediss://) and unix sockets keep redis-py's own classes
        options["connection_class"] = _HiredisPacking
    return redis.Redis.from_url(url, **options)


def command_sender(url: str, client: redis.Redis, timeout: float) -> CommandSender:
    """The cheapest way to send request-path commands to the Redis at `url`."""
    return PipedRedis(url, timeout) if url.startswith("redis://") else BatchingRedis(client)


class BatchingRedis:
    def __init__(self, client: redis.Redis, max_batch: int = 512) -> None:
        self._client = client
        self._max_batch = max_batch
        self._queue: list[tuple[Command, asyncio.Future[Any]]] = []
        self._busy = False
        self._drainer: asyncio.Task[None] | None = None

    async def call(self, *command: Any) -> Any:
        """Run one command; raises its error (a RedisError, or the command's own, e.g. NoScriptError)."""
        if not self._busy:
            self._busy = True
            try:
                return await self._client.execute_command(*command)  # type: ignore[no-untyped-call]
            finally:
                self._release()
        return await self.submit(*command)

    def submit(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a command without waiting for it; the future holds its result or error."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._queue.append((command, future))
        if not self._busy:
            # At once, not after a short wait: a record whose response is out must reach Redis
            # before anything else can happen to this process.
            self._busy = True
            self._release()
        return future

    def on_connect(self, *command: Any) -> None:
        """Nothing: redis-py's pool has no such hook (a cluster's nodes each have their own script cache);
        an EVALSHA answered NOSCRIPT loads the script and runs again (BudgetEngine, Relay)."""

    def written(self) -> Awaitable[None]:
        # Commands leave at once when no pipeline is in flight, else right after it; an answer does
        # not wait for that here (only the piped connection orders records before answers).
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    async def idle(self) -> None:
        """Wait until every queued command has been sent and answered (on shutdown)."""
        while self._busy or self._queue:
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        pass  # the client belongs to the caller

    def _release(self) -> None:
        if self._queue:
            self._drainer = asyncio.get_running_loop().create_task(self._drain())
        else:
            self._busy = False

    async def _drain(self) -> None:
        try:
            while self._queue:
                batch, self._queue = self._queue[: self._max_batch], self._queue[self._max_batch :]
                await self._send(batch)
        finally:
            self._busy = False
            if self._queue:  # arrived while the last batch was being resolved
                self._busy = True
                self._release()

    async def _send(self, batch: list[tuple[Command, asyncio.Future[Any]]]) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for command, _ in batch:
                    pipe.execute_command(*command)
                results = await pipe.execute(raise_on_error=False)
        except BaseException as exc:  # the connection failed: every command in the batch failed with it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc if isinstance(exc, Exception) else RuntimeError("cancelled"))
            if not isinstance(exc, Exception):
                raise
            return
        for (_, future), result in zip(batch, results, strict=True):
            if future.done():
                continue
            if isinstance(result, Exception):
                future.set_exception(result)
            else:
                future.set_result(result)
