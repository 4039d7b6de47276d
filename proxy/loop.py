"""The event loop a connection belongs to, kept rather than asked for on every use."""

from __future__ import annotations

import asyncio


class OnLoop:
    """Base of the request path's own connections (redis_wire, http_wire): `loop` is the loop they first ran
    on. Kept, not asked for: on Python 3.11 each get_running_loop() is a getpid() system call, and a
    connection belongs to the loop that opened it anyway."""

    _loop: asyncio.AbstractEventLoop | None = None

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop
