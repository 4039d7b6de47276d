"""A clean stop on SIGTERM: not ready at once, new requests served a little longer, then refused, and
the requests in flight given until SHUTDOWN_GRACE_SECONDS to finish before the server exits.

uvicorn alone stops accepting connections the moment it is signalled, so a balancer that has not yet
noticed sends its next requests into refused connections; and it re-raises the signal once it has
stopped, so a clean stop would end with status 143. `DrainingServer` replaces both steps.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from types import FrameType

import structlog
import uvicorn
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .config import Settings
from .errors import error_response, shutting_down

log = structlog.get_logger("proxy.lifecycle")

# Still answered while the process drains: the balancer's probes and the scrape.
PROBES = frozenset({"/healthz", "/readyz", "/metrics"})
_CLOSE = (b"connection", b"close")


class Lifecycle:
    """Where the process is in its life, and how many requests it admitted that have not ended."""

    def __init__(self, settings: Settings) -> None:
        self._delay = settings.shutdown_delay_seconds
        self._grace = settings.shutdown_grace_seconds
        self.since: float | None = None  # time.monotonic() of the signal; None while serving
        self.refusing = False
        self.active = 0

    @property
    def draining(self) -> bool:
        return self.since is not None

    def drain(self) -> None:
        """Called from the signal handler: plain assignments only, the loop reads them on its next tick."""
        if self.since is None:
            self.since = time.monotonic()

    def remaining(self) -> float:
        """Seconds left of SHUTDOWN_GRACE_SECONDS."""
        return 0.0 if self.since is None else max(self.since + self._grace - time.monotonic(), 0.0)

    def finished(self) -> bool:
        """Whether the server may stop now: past the delay, once nothing admitted is in flight, or at the grace's end.
        Called on every tick of the server's loop (10 a second)."""
        if self.since is None:
            return False
        elapsed = time.monotonic() - self.since
        if elapsed < self._delay:
            return False
        if not self.refusing:
            self.refusing = True
            log.info("shutdown_refusing_new_requests", in_flight=self.active)
        return self.active == 0 or elapsed >= self._grace


class Gate:
    """ASGI middleware: counts the requests in flight, marks responses `Connection: close` once draining
    (clients reconnect through the balancer, to another instance), and refuses new requests once refusing."""

    def __init__(self, app: ASGIApp, lifecycle: Lifecycle) -> None:
        self._app = app
        self._lifecycle = lifecycle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        lifecycle = self._lifecycle
        if scope["type"] != "http" or scope["path"] in PROBES:
            await self._app(scope, receive, send)
            return
        if lifecycle.refusing:
            response = error_response(shutting_down(), {"Connection": "close", "Retry-After": "1"})
            await response(scope, receive, send)
            return
        lifecycle.active += 1
        try:
            if lifecycle.since is None:
                await self._app(scope, receive, send)
            else:
                await self._app(scope, receive, _closing(send))
        finally:
            lifecycle.active -= 1


def _closing(send: Send) -> Send:
    async def closing(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = [h for h in message.get("headers", []) if h[0].lower() != b"connection"]
            message = {**message, "headers": [*headers, _CLOSE]}
        await send(message)

    return closing


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the stop above: the first SIGTERM or SIGINT starts draining, a second SIGINT
    (Ctrl-C twice) stops at once, and a clean stop exits 0."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle) -> None:
        super().__init__(config)
        self.lifecycle = lifecycle
        self._announced = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Not recorded in _captured_signals: uvicorn would raise it again once stopped.
        if self.lifecycle.draining:
            if sig == signal.SIGINT:
                self.should_exit = self.force_exit = True
            return
        self.lifecycle.drain()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            log.info("proxy_worker_ready", pid=os.getpid())

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.lifecycle.draining and not self._announced:
            self._announced = True  # logged here: a signal handler must not write to stdout
            log.info("shutdown_draining", grace_seconds=round(self.lifecycle.remaining(), 1))
        if not self.lifecycle.finished():
            return False
        # uvicorn now closes the socket and idle connections, and waits for the rest up to this timeout;
        # requests still running then are cancelled (a stream is settled as estimated, its record written).
        self.config.timeout_graceful_shutdown = max(self.lifecycle.remaining(), 0.1)  # type: ignore[assignment]
        log.info("shutdown_stopping", in_flight=self.lifecycle.active, grace_left=round(self.lifecycle.remaining(), 1))
        return True
