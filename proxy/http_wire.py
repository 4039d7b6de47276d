"""One pooled HTTP/1.1 client for the model server: an asyncio protocol, answers parsed by httptools.

aiohttp's client cost the proxy more CPU per request than all of its own work (docs/performance.md).
The proxy needs little of a general client: it talks to one server, sends a body it already holds,
and passes the answer through or reads it whole. So here: keep-alive connections, a request written
in one call, the answer parsed in C by httptools (llhttp, the parser uvicorn serves with), its body
handed over as it arrives with back-pressure, and time-outs. No redirects, cookies, proxies or
decompression: the proxy follows none, keeps none, and asks for `identity`.

Failures are `WireError`s: `TimedOut` is also a TimeoutError, `ConnectFailed` and `Disconnected`
are also ConnectionErrors, so errors.upstream_failed tells them apart as it does the OS's own.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Mapping
from urllib.parse import urlsplit

import httptools

from .loop import OnLoop

# Past this many bytes of an answer not yet taken, the connection stops reading: a client that reads
# slowly slows its model server connection down instead of filling the proxy's memory.
HIGH_WATER = 256 * 1024
# An idle connection is closed after this, before servers close theirs (uvicorn, which serves LiteLLM,
# after 5 s) and before a load balancer silently forgets it: a request is never written into a
# connection that is going away.
KEEPALIVE_SECONDS = 4.0
_NO_BODY_STATUSES = frozenset({204, 304})


class WireError(Exception):
    """The exchange with the model server failed."""


class TimedOut(WireError, TimeoutError):
    """No connection, or no bytes of the answer, within the time allowed."""


class ConnectFailed(WireError, ConnectionError):
    """The model server could not be reached."""


class Disconnected(WireError, ConnectionError):
    """The connection ended before the answer did."""


class BadAnswer(WireError):
    """The answer is not HTTP/1.1 this client can read."""


class Answer:
    """One request's answer: status and headers once they are in, then the body as it arrives.

    `release()` ends it: the connection goes back to the pool when the answer came whole on a
    connection its server keeps open, and is closed otherwise (an answer given up half-read)."""

    def __init__(self, pool: HttpPool, link: _Link) -> None:
        self._pool = pool
        self._link: _Link | None = link
        self._parser: httptools.HttpResponseParser | None = httptools.HttpResponseParser(self)
        self.status = 0
        self.headers: dict[str, str] = {}  # names in lower case; repeated ones joined with ", "
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._whole = False  # read() wants the body whole: reading never pauses
        self._headed = False
        self._early = False  # the head came while the request was still being written
        self._complete = False
        self._reusable = False
        self._error: WireError | None = None
        self._waiter: asyncio.Future[None] | None = None

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").partition(";")[0].strip().lower()

    async def read(self) -> bytes:
        """The whole body: no back-pressure, it is wanted whole."""
        self._whole = True
        if self._paused and self._link is not None:
            self._paused = False
            self._link.resume()
        while not self._complete:
            if self._error is not None:
                raise self._error
            await self._wait()
        body, self._body = b"".join(self._body), []
        return body

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever has come in since the last chunk, joined."""
        while True:
            if self._body:
                body, self._body, self._buffered = self._body, [], 0
                if self._paused and self._link is not None:
                    self._paused = False
                    self._link.resume()
                yield body[0] if len(body) == 1 else b"".join(body)
            elif self._complete:
                return
            elif self._error is not None:
                raise self._error
            else:
                await self._wait()

    def release(self) -> None:
        link, self._link = self._link, None
        if link is None:
            return
        # The parser holds this answer for its callbacks: without it, the answer goes by reference counting
        # when its request ends, and the garbage collector never runs for it (#19).
        self._parser = None
        link.answer = None
        if self._complete and self._reusable:
            if self._paused:  # the answer ended in the read that stopped the reading: the next one needs it
                link.resume()
            self._pool.put_back(link)
        else:
            link.abort()
        self._pool.slot_free()

    # From the connection

    def feed(self, data: bytes) -> None:
        if self._parser is None:
            return
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadAnswer(f"Unreadable answer from the model server: {exc}"))
            if self._link is not None:
                self._link.abort()

    def lost(self, error: Exception | None) -> None:
        if self._complete or self._error is not None:
            return
        # A body that ends with its connection ends at a close, and a reset cuts it; except after an early
        # answer (a 413 to a body too big), where the server's kernel resets rather than closes, since our
        # bytes are still unread there.
        if self._headed and self._ends_at_close() and (error is None or self._early):
            self._complete = True
            self._wake()
        else:
            self._fail(Disconnected("The model server closed the connection before its answer ended"))

    # httptools' callbacks

    def on_message_begin(self) -> None:
        if self._complete:  # a second answer to one request: this connection cannot be trusted with another,
            self._reusable = False  # and none of it is this answer's: the parse stops here, the connection is closed
            raise httptools.HttpParserError("a second answer to one request")

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._headed:  # a chunked answer's trailer: read past, as aiohttp did, never taken for a header
            return
        key, text = name.decode("latin-1").lower(), value.decode("latin-1")
        known = self.headers.get(key)
        self.headers[key] = text if known is None else f"{known}, {text}"

    def on_headers_complete(self) -> None:
        parser = self._parser
        assert parser is not None  # called from feed(), which has one
        status = parser.get_status_code()
        if status < 200:  # an interim answer (103 Early Hints): the real one follows on the same connection
            self.headers = {}
            return
        self.status = status
        self._headed = True
        link = self._link
        self._early = link is not None and link.transport is not None and link.transport.get_write_buffer_size() > 0
        self._reusable = parser.should_keep_alive()  # known from the head, and forgotten at the message's end
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > HIGH_WATER and not (self._paused or self._whole) and self._link is not None:
            self._paused = True
            self._link.pause()
        self._wake()

    def on_message_complete(self) -> None:
        if self._headed:
            self._complete = True
            self._wake()

    # Waiting

    async def _headers(self) -> None:
        while not self._headed:
            if self._error is not None:
                raise self._error
            await self._wait()

    async def _wait(self) -> None:
        loop = self._pool.loop
        waiter = self._waiter = loop.create_future()
        # One timer per wait, not per byte: each wait ends when anything of the answer arrives.
        timer = loop.call_at(loop.time() + self._pool.read_timeout, self._time_out, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    def _time_out(self, waiter: asyncio.Future[None]) -> None:
        if waiter is self._waiter and not self._paused:
            self._fail(TimedOut(f"The model server sent nothing for {self._pool.read_timeout:g} s"))
            if self._link is not None:
                self._link.abort()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, error: WireError) -> None:
        if self._error is None and not self._complete:
            self._error = error
            self._wake()

    def _ends_at_close(self) -> bool:
        """An answer with neither a length nor chunks is delimited by the connection's end."""
        return (
            "content-length" not in self.headers
            and "chunked" not in self.headers.get("transfer-encoding", "").lower()
            and self.status not in _NO_BODY_STATUSES
        )


class _Link(asyncio.Protocol):
    """One TCP connection, carrying one answer at a time."""

    def __init__(self, pool: HttpPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self.answer: Answer | None = None
        self.closed = False
        self.idle_until = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's transports are not asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if self.answer is None:  # bytes nobody asked for: this connection cannot carry another request
            self.abort()
            return
        self.answer.feed(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self.answer is not None:
            self.answer.lost(exc)

    def pause(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()


class HttpPool(OnLoop):
    """Keep-alive connections to one server (`base_url`, whose path prefixes every request's), at most
    `max_connections` of them in use at once; every request carries `headers`."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        max_connections: int,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Not an http(s):// URL: {base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._ssl = ssl.create_default_context() if parts.scheme == "https" else None
        self._prefix = parts.path.rstrip("/")
        fixed = {"Host": parts.netloc.rpartition("@")[2], **headers}
        self._fixed = "".join(f"{k}: {_safe(v)}\r\n" for k, v in fixed.items()).encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._slots = asyncio.Semaphore(max_connections)
        self._idle: list[_Link] = []
        self._closed = False

    async def request(self, method: str, target: str, headers: Mapping[str, str], body: bytes | None = None) -> Answer:
        """Send a request; returns once the answer's status and headers are in."""
        head = f"{method} {_safe(self._prefix + target, ' ')} HTTP/1.1\r\n".encode("latin-1") + self._fixed
        head += "".join(f"{k}: {_safe(v)}\r\n" for k, v in headers.items()).encode("latin-1")
        if body is not None:
            head += b"Content-Length: %d\r\n" % len(body)
        # As aiohttp's connect timeout: one deadline for a connection, waiting for one in use included.
        deadline = self.loop.time() + self.connect_timeout
        if not self._slots.locked():
            await self._slots.acquire()  # at once: no timer for the usual case
        else:
            try:
                async with asyncio.timeout_at(deadline):
                    await self._slots.acquire()
            except TimeoutError:
                raise TimedOut(f"No connection to the model server free within {self.connect_timeout:g} s") from None
        answer: Answer | None = None
        try:
            link = self._reuse() or await self._connect(deadline)
            answer = link.answer = Answer(self, link)
            assert link.transport is not None
            link.transport.write(head + b"\r\n" + body if body is not None else head + b"\r\n")
            await answer._headers()
        except BaseException:
            if answer is not None:
                answer.release()  # not whole: the connection is closed, and its slot freed
            else:
                self._slots.release()
            raise
        return answer

    def put_back(self, link: _Link) -> None:
        if self._closed:  # an answer released after close(): nothing would ever close its connection
            link.abort()
        elif not link.closed:
            link.idle_until = self.loop.time() + KEEPALIVE_SECONDS
            self._idle.append(link)

    def forget(self, link: _Link) -> None:
        if link in self._idle:
            self._idle.remove(link)

    def slot_free(self) -> None:
        self._slots.release()

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        for link in idle:
            link.abort()

    def _reuse(self) -> _Link | None:
        now = self.loop.time()
        while self._idle:
            link = self._idle.pop()  # the most recently used: the least likely to have gone away
            # is_closing: the server's end arrived, and connection_lost is still to come
            if not link.closed and now < link.idle_until and not (link.transport and link.transport.is_closing()):
                return link
            link.abort()
        return None

    async def _connect(self, deadline: float) -> _Link:
        try:
            async with asyncio.timeout_at(deadline):
                _, link = await self.loop.create_connection(
                    lambda: _Link(self),
                    self._host,
                    self._port,
                    ssl=self._ssl,
                    server_hostname=self._host if self._ssl is not None else None,
                )
        except TimeoutError:
            raise TimedOut(f"No connection to the model server within {self.connect_timeout:g} s") from None
        except OSError as exc:
            raise ConnectFailed(f"Cannot connect to the model server: {exc}") from None
        return link


def _safe(value: str, forbidden: str = "") -> str:
    """A request line or header value as given, or refused: a line break would start a header of its own."""
    if "\r" in value or "\n" in value or (forbidden and forbidden in value):
        raise ValueError(f"Refusing to send {value!r} in an HTTP request head")
    return value
