"""One pipelined Redis connection for the request path: RESP over an asyncio protocol.

redis-py spends many times more Python per command (pipeline objects, connection pool, retry
wrapper, per-command parsing) than Redis spends serving it. The budget's reserve/settle and the
ledger's XADD are three commands per request, so on this path commands are packed and
parsed by hiredis in C, written together (all commands of one event-loop turn leave in one
write), and their replies are matched to callers in order. No request waits on a timer.

Errors are redis-py's exception types, so callers handle both clients alike.
"""

from __future__ import annotations

import asyncio
import collections
from functools import partial
from typing import Any

import hiredis
import structlog
from redis._parsers.base import BaseParser
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError, InvalidResponse, ResponseError, TimeoutError

from .loop import OnLoop

log = structlog.get_logger("proxy.redis")

_INCOMPLETE = object()


def _preamble_done(what: tuple[Any, ...], future: asyncio.Future[Any]) -> None:
    error = None if future.cancelled() else future.exception()
    if isinstance(error, ResponseError):  # refused by Redis; a connection that failed says so elsewhere
        log.warning("redis_preamble_refused", command=" ".join(map(str, what)), error=str(error))


class _Link(asyncio.Protocol):
    """One TCP connection: writes commands, and answers their futures in order as replies arrive."""

    def __init__(self, owner: PipedRedis) -> None:
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(
            protocolError=InvalidResponse, replyError=BaseParser.parse_error, notEnoughData=_INCOMPLETE
        )
        # Futures waiting for a reply, with the loop time their command was written.
        self._sent: collections.deque[tuple[asyncio.Future[Any], float]] = collections.deque()
        self._watchdog: asyncio.TimerHandle | None = None

    @property
    def busy(self) -> bool:
        return bool(self._sent)

    def write(self, data: bytes, futures: list[asyncio.Future[Any]]) -> None:
        assert self._transport is not None
        loop = self._owner.loop
        now = loop.time()
        self._sent.extend((f, now) for f in futures)
        self._transport.write(data)
        if self._watchdog is None:
            self._watchdog = loop.call_at(now + self._owner.timeout, self._check_stalled)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        reader, sent = self._reader, self._sent
        reader.feed(data)
        while (reply := reader.gets()) is not _INCOMPLETE:
            if not sent:  # a reply to no command: the stream is out of step, start over
                self.close(InvalidResponse("Redis sent a reply to no command"))
                return
            future = sent.popleft()[0]
            if future.done():
                continue  # its caller was cancelled; the reply is still consumed, keeping the order
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.close(ConnectionError(f"Connection to Redis at {self._owner.address} lost"))

    def _check_stalled(self) -> None:
        self._watchdog = None
        if not self._sent:
            return
        loop = self._owner.loop
        deadline = self._sent[0][1] + self._owner.timeout
        if loop.time() >= deadline:
            self.close(TimeoutError(f"Redis at {self._owner.address} did not answer within {self._owner.timeout} s"))
        else:
            self._watchdog = loop.call_at(deadline, self._check_stalled)

    def close(self, error: Exception) -> None:
        """Drop the connection and fail every command written to it: their fate is unknown."""
        self._owner.lost(self)
        if self._transport is not None:
            self._transport.abort()
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        sent, self._sent = self._sent, collections.deque()
        for future, _ in sent:
            if not future.done():
                future.set_exception(error)


class PipedRedis(OnLoop):
    """Commands in, replies out, in order; a lost connection is reopened by the next command."""

    def __init__(self, url: str, timeout: float) -> None:
        options = parse_url(url)
        if "host" not in options:
            raise ValueError(f"PipedRedis takes redis://host:port/db URLs, not {url!r}")
        self._host: str = options["host"]
        self._port: int = options.get("port", 6379)
        self.address = f"{self._host}:{self._port}"
        self.timeout = timeout
        self._handshake: list[tuple[Any, ...]] = []
        if "password" in options:
            self._handshake.append(("AUTH", *filter(None, (options.get("username"), options["password"]))))
        if options.get("db"):
            self._handshake.append(("SELECT", options["db"]))
        self._preamble: list[tuple[Any, ...]] = []
        self._link: _Link | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._unsent: list[bytes] = []
        self._unsent_futures: list[asyncio.Future[Any]] = []
        self._flush_scheduled = False
        self._waiters: list[asyncio.Future[None]] = []

    def on_connect(self, *command: Any) -> None:
        """Send `command` first on every new connection, ahead of what is queued: `SCRIPT LOAD`, so that a
        Redis restarted (no script cache survives it) never answers this connection's EVALSHA with NOSCRIPT.
        Best effort: refused (an ACL without SCRIPT), it is logged and the connection serves on."""
        self._preamble.append(command)

    def submit(self, *command: Any) -> asyncio.Future[Any]:
        """Queue a command without waiting; the future holds its reply or its error (a RedisError)."""
        loop = self.loop
        future = loop.create_future()
        self._unsent.append(hiredis.pack_command(command))
        self._unsent_futures.append(future)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._flush)
        return future

    def written(self) -> asyncio.Future[None]:
        """Resolves once every command queued so far is handed to the socket, or has failed.

        An answer waits for this before it goes out, so a crash after the client has it cannot lose
        its settle and record: the kernel still delivers what was written. The answer waits one loop
        turn for the turn's shared write, which costs about half of a write of its own."""
        waiter = self.loop.create_future()
        if self._unsent:
            self._waiters.append(waiter)  # one future each: a cancelled request cancels only its own
        else:
            waiter.set_result(None)
        return waiter

    call = submit  # awaiting the future is the call: no coroutine frame in between

    async def idle(self) -> None:
        """Wait until every queued command has been answered (on shutdown)."""
        while self._unsent or self._connecting is not None or (self._link is not None and self._link.busy):
            await asyncio.sleep(0.005)

    async def close(self) -> None:
        if self._connecting is not None:
            self._connecting.cancel()
        if self._link is not None:
            self._link.close(ConnectionError("Redis connection closed"))

    def lost(self, link: _Link) -> None:
        if self._link is link:
            self._link = None

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._unsent:
            if self._link is None:
                if self._connecting is None:
                    self._connecting = self.loop.create_task(self._connect())
                return  # _connect flushes once connected, or fails the queued commands
            data, futures = b"".join(self._unsent), self._unsent_futures
            self._unsent, self._unsent_futures = [], []
            self._link.write(data, futures)
        self._release_waiters()

    def _release_waiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def _connect(self) -> None:
        loop = self.loop
        link: _Link | None = None
        try:
            async with asyncio.timeout(self.timeout):
                _, link = await loop.create_connection(lambda: _Link(self), self._host, self._port)
                answers = [loop.create_future() for _ in self._handshake]
                preamble = [loop.create_future() for _ in self._preamble]
                for command, future in zip(self._preamble, preamble, strict=True):
                    future.add_done_callback(partial(_preamble_done, command[:2]))
                if answers or preamble:
                    commands = (*self._handshake, *self._preamble)
                    link.write(b"".join(hiredis.pack_command(c) for c in commands), answers + preamble)
                    await asyncio.gather(*answers)  # the preamble's replies come before the queued commands'
        except Exception as exc:  # unreachable, too slow, or AUTH/SELECT refused: the queued commands fail
            if link is not None:
                link.close(exc)
            if isinstance(exc, (OSError, asyncio.TimeoutError)):
                exc = ConnectionError(f"Redis at {self.address} is unreachable ({exc.__class__.__name__})")
            futures, self._unsent, self._unsent_futures = self._unsent_futures, [], []
            for future in futures:
                if not future.done():
                    future.set_exception(exc)
            self._release_waiters()  # their commands failed: nothing more to wait for
        else:
            self._link = link
            self._flush()
        finally:
            self._connecting = None
