"""proxy/http_wire.py against a loopback server that answers byte for byte as each test scripts it."""

from __future__ import annotations

import asyncio
import datetime
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy import http_wire
from proxy.http_wire import BadAnswer, ConnectFailed, Disconnected, HttpPool, TimedOut

pytestmark = pytest.mark.anyio

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """A loopback server running `handler` for every connection; it counts the connections and keeps
    every request head it read."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.heads: list[bytes] = []
        self.url = ""

    async def __aenter__(self) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        """Read one request (head and Content-Length body); returns its body."""
        head = await reader.readuntil(b"\r\n\r\n")
        self.heads.append(head)
        length = next(
            (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")), 0
        )
        return await reader.readexactly(length)


def answer(body: bytes, status: str = "200 OK", extra: bytes = b"") -> bytes:
    return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s" % (
        status.encode(),
        len(body),
        extra,
        body,
    )


def pool(url: str, **options: Any) -> HttpPool:
    settings: dict[str, Any] = {"connect_timeout": 2.0, "read_timeout": 5.0, "max_connections": 8, **options}
    return HttpPool(url, {"Authorization": "Bearer sk-x"}, **settings)


async def echoed(wire: HttpPool, body: bytes) -> None:
    """One request whose answer is its own body (as the tests' servers answer), read whole and released."""
    got = await wire.request("POST", "/x", {}, body)
    assert await got.read() == body
    got.release()


async def cut(wire: HttpPool) -> None:
    """One GET whose answer the server cuts: reading it whole raises Disconnected."""
    got = await wire.request("GET", "/x", {})
    with pytest.raises(Disconnected):
        await got.read()
    got.release()


@pytest.fixture
async def client() -> AsyncIterator[list[HttpPool]]:
    """Pools made by a test, closed after it."""
    made: list[HttpPool] = []
    yield made
    for made_pool in made:
        await made_pool.close()


def keep(made: list[HttpPool], url: str, **options: Any) -> HttpPool:
    made.append(pool(url, **options))
    return made[-1]


async def test_a_request_head_is_written_once_with_the_fixed_headers_and_the_base_paths_prefix(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        writer.write(answer(body))

    async with Server(handler) as server:
        wire = keep(client, server.url + "/litellm/")
        got = await wire.request("POST", "/v1/chat/completions", {"X-Request-Id": "r-1"}, b'{"a":1}')
        assert (got.status, got.content_type, await got.read()) == (200, "application/json", b'{"a":1}')
        got.release()
    port = server.url.rsplit(":", 1)[1]
    assert server.heads == [
        b"POST /litellm/v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:" + port.encode() + b"\r\n"
        b"Authorization: Bearer sk-x\r\nX-Request-Id: r-1\r\nContent-Length: 7\r\n\r\n"
    ]


async def test_a_released_answer_is_freed_without_the_garbage_collector(client: Any) -> None:
    """No reference cycle is left per request: the collector, which the proxy holds off (GC_THRESHOLDS),
    never has requests' answers to find (#19)."""
    import gc
    import weakref

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(answer(await server.request(reader)))

    async with Server(handler) as server:
        wire = keep(client, server.url)
        gc.disable()
        try:
            got = await wire.request("POST", "/x", {}, b"1")
            assert await got.read() == b"1"
            got.release()
            gone = weakref.ref(got)
            del got
            assert gone() is None
        finally:
            gc.enable()


async def test_a_whole_answer_leaves_its_connection_for_the_next_request(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(answer(await server.request(reader)))

    async with Server(handler) as server:
        wire = keep(client, server.url)
        for i in range(5):
            await echoed(wire, b"%d" % i)
    assert server.connections == 1


@pytest.mark.parametrize(
    "raw",
    [answer(b"{}", extra=b"Connection: close\r\n"), answer(b"{}").replace(b"HTTP/1.1", b"HTTP/1.0")],
    ids=["connection-close", "http-1.0"],
)
async def test_an_answer_that_ends_its_connection_is_not_reused(client: Any, raw: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(raw)
        await reader.read()  # until the client closes

    async with Server(handler) as server:
        wire = keep(client, server.url)
        for _ in range(2):
            got = await wire.request("GET", "/x", {})
            assert await got.read() == b"{}"
            got.release()
    assert server.connections == 2


async def test_a_chunked_answer_arrives_chunk_by_chunk_not_at_its_end(client: Any) -> None:
    second = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"7\r\ndata: 1\r\n")
        await second.wait()
        writer.write(b"7\r\ndata: 2\r\n0\r\n\r\n")
        await reader.read()

    async with Server(handler) as server:
        wire = keep(client, server.url)
        got = await wire.request("POST", "/x", {}, b"{}")
        assert got.content_type == "text/event-stream"
        seen = []
        async for chunk in got.chunks():
            seen.append(chunk)
            second.set()  # the server sends its second chunk only once the first is here
        got.release()
    assert seen == [b"data: 1", b"data: 2"]
    assert list(wire._idle)  # the whole answer's connection is back in the pool


async def test_an_answer_with_neither_length_nor_chunks_ends_with_its_connection(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"all":')
        await asyncio.sleep(0.05)
        writer.write(b"true}")

    async with Server(handler) as server:
        wire = keep(client, server.url)
        got = await wire.request("GET", "/x", {})
        assert await got.read() == b'{"all":true}'
        got.release()
        assert wire._idle == []


async def test_an_answer_ending_with_its_connection_is_cut_not_complete_when_the_connection_is_reset(
    client: Any,
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"all":')
        await writer.drain()
        await asyncio.sleep(0.05)
        # A reset, not a close: the body ends with the connection only when the server closes it.
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    async with Server(handler) as server:
        await cut(keep(client, server.url))


async def test_an_early_answer_ending_with_its_connection_is_whole_though_the_server_resets_it(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")  # the head only: the body stays unread, so the close is a reset
        writer.write(b'HTTP/1.1 413 Payload Too Large\r\nConnection: close\r\n\r\n{"error":"too large"}')
        await writer.drain()
        await asyncio.sleep(0.05)

    async with Server(handler) as server:
        wire = keep(client, server.url)
        got = await wire.request("POST", "/x", {}, b"x" * 4_000_000)
        assert got.status == 413
        assert await got.read() == b'{"error":"too large"}'
        got.release()


async def test_a_connection_cut_mid_body_is_a_disconnect_not_a_short_answer(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)

    async with Server(handler) as server:
        wire = keep(client, server.url)
        await cut(wire)
        got = await wire.request("GET", "/x", {})
        with pytest.raises(Disconnected):
            async for _ in got.chunks():
                pass
        got.release()
    assert server.connections == 2


@pytest.mark.parametrize(
    "raw, error", [(b"", Disconnected), (b"SMTP ready\r\n\r\n", BadAnswer)], ids=["closed", "unreadable"]
)
async def test_no_answer_or_an_unreadable_one_fails_the_request(
    client: Any, raw: bytes, error: type[Exception]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        if raw:
            writer.write(raw)
            await reader.read()  # the client closes the connection

    async with Server(handler) as server:
        with pytest.raises(error):
            await keep(client, server.url).request("GET", "/x", {})


async def test_an_interim_answer_is_passed_over_for_the_real_one(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </x>\r\n\r\n" + answer(b"{}", "201 Created"))
        await reader.read()

    async with Server(handler) as server:
        got = await keep(client, server.url).request("GET", "/x", {})
        assert (got.status, "link" in got.headers, await got.read()) == (201, False, b"{}")
        got.release()


async def test_repeated_headers_are_joined_and_names_are_lower_case(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(answer(b"{}", extra=b"X-A: 1\r\nx-a: 2\r\nRetry-After: 3\r\n"))
        await reader.read()

    async with Server(handler) as server:
        got = await keep(client, server.url).request("GET", "/x", {})
        assert (got.headers["x-a"], got.headers["retry-after"]) == ("1, 2", "3")
        got.release()


async def test_the_trailer_of_a_chunked_answer_adds_nothing_to_its_headers(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\n{}\r\n0\r\nContent-Type: text/html\r\nX-Litellm-Response-Cost: 99\r\n\r\n"
        )
        await reader.read()

    async with Server(handler) as server:
        got = await keep(client, server.url).request("GET", "/x", {})
        assert await got.read() == b"{}"
        assert (got.content_type, got.headers.get("x-litellm-response-cost")) == ("application/json", None)
        got.release()


async def test_silence_past_the_read_timeout_times_out_before_and_after_the_headers(client: Any) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        if body == b"headers":
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n12345")
        await reader.read()

    async with Server(handler) as server:
        wire = keep(client, server.url, read_timeout=0.2)
        with pytest.raises(TimedOut):
            await wire.request("POST", "/x", {}, b"nothing")
        got = await wire.request("POST", "/x", {}, b"headers")
        with pytest.raises(TimedOut):
            await got.read()
        got.release()
        assert wire._idle == []


async def test_an_unreachable_server_fails_to_connect_and_frees_its_slot(client: Any) -> None:
    from .devstack import free_port

    wire = keep(client, f"http://127.0.0.1:{free_port()}", max_connections=1)
    for _ in range(2):  # the slot of the first failure is free for the second attempt
        with pytest.raises(ConnectFailed):
            await asyncio.wait_for(wire.request("GET", "/x", {}), 2)


async def test_a_connect_that_hangs_times_out(client: Any) -> None:
    import socket

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)  # never accepted: once its backlog is full, the kernel drops further handshakes
    port = listener.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
            fillers.append(filler)
        with pytest.raises(TimedOut):
            await keep(client, f"http://127.0.0.1:{port}", connect_timeout=0.3).request("GET", "/x", {})
    finally:
        for sock in [*fillers, listener]:
            sock.close()


async def test_a_slow_reader_stops_the_connection_reading_instead_of_buffering_the_answer(client: Any) -> None:
    size = 8 * 1024 * 1024
    drained = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size + b"x" * size)
        await writer.drain()
        drained.set()
        await reader.read()

    async with Server(handler) as server:
        got = await keep(client, server.url).request("GET", "/x", {})
        await asyncio.sleep(0.3)  # the client takes nothing meanwhile
        assert not drained.is_set() and got._buffered <= http_wire.HIGH_WATER + 1024 * 1024
        total = 0
        async for chunk in got.chunks():
            total += len(chunk)
        got.release()
        assert total == size
        await asyncio.wait_for(drained.wait(), 2)


async def test_an_answer_read_whole_is_read_whole_however_big(client: Any) -> None:
    """read() is for answers wanted whole (JSON): past the back-pressure mark it keeps reading."""
    size = 3 * http_wire.HIGH_WATER

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 4096):
            writer.write(b"y" * 4096)
            await writer.drain()
        await reader.read()

    async with Server(handler) as server:
        got = await keep(client, server.url, read_timeout=2).request("GET", "/x", {})
        await asyncio.sleep(0.2)  # more than the mark arrives before the read
        assert len(await asyncio.wait_for(got.read(), 3)) == size
        got.release()


async def test_a_request_cancelled_while_waiting_closes_its_connection_and_frees_its_slot(client: Any) -> None:
    ends: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        if body == b"slow":
            ends.append(await reader.read())  # b"": the client closed the connection
        else:
            writer.write(answer(body))
            await reader.read()

    async with Server(handler) as server:
        wire = keep(client, server.url, max_connections=1)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(wire.request("POST", "/x", {}, b"slow"), 0.2)
        got = await asyncio.wait_for(wire.request("POST", "/x", {}, b"next"), 2)
        assert await got.read() == b"next"
        got.release()
    assert ends == [b""] and server.connections == 2


async def test_a_wait_for_a_connection_in_use_times_out_with_the_connect_timeout(client: Any) -> None:
    """As aiohttp's connect timeout did: it bounds the wait for a free connection as well as the connect."""
    release = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        await release.wait()
        writer.write(answer(body))
        await reader.read()

    async with Server(handler) as server:
        wire = keep(client, server.url, max_connections=1, connect_timeout=0.3)
        first = asyncio.ensure_future(wire.request("POST", "/x", {}, b"first"))
        await asyncio.sleep(0.1)
        with pytest.raises(TimedOut):
            await asyncio.wait_for(wire.request("POST", "/x", {}, b"second"), 2)
        release.set()
        got = await first
        assert await got.read() == b"first"
        got.release()
    assert server.connections == 1


async def test_no_more_connections_than_allowed_are_in_use_at_once(client: Any) -> None:
    release = asyncio.Event()
    busy = 0
    most = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal busy, most
        while True:
            body = await server.request(reader)
            busy += 1
            most = max(most, busy)
            await release.wait()
            busy -= 1
            writer.write(answer(body))

    async def one(i: int) -> bytes:
        got = await wire.request("POST", "/x", {}, b"%d" % i)
        try:
            return await got.read()
        finally:
            got.release()

    async with Server(handler) as server:
        wire = keep(client, server.url, max_connections=2)
        calls = asyncio.gather(*(one(i) for i in range(6)))
        await asyncio.sleep(0.2)
        assert busy == 2
        release.set()
        assert await asyncio.wait_for(calls, 5) == [b"%d" % i for i in range(6)]
    assert most == 2 and server.connections == 2


async def test_an_answer_released_after_the_pool_closed_closes_its_connection(client: Any) -> None:
    ends: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        body = await server.request(reader)
        writer.write(answer(body))
        ends.append(await reader.read())  # b"": the client closed the connection

    async with Server(handler) as server:
        wire = keep(client, server.url)
        got = await wire.request("POST", "/x", {}, b"in flight")
        assert await got.read() == b"in flight"
        await wire.close()  # the shutdown, with this answer still held
        got.release()
        await asyncio.sleep(0.1)
        assert wire._idle == [] and ends == [b""]


async def test_an_idle_connection_is_not_reused_past_its_keepalive_or_once_its_server_closed_it(
    client: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.request(reader)
            writer.write(answer(body))
            if body == b"then-close":
                await writer.drain()
                return  # the server closes this idle connection

    async with Server(handler) as server:
        wire = keep(client, server.url)
        await echoed(wire, b"then-close")
        await asyncio.sleep(0.1)  # its close arrives while it is idle
        await echoed(wire, b"a")  # on a new connection, without error
        monkeypatch.setattr(http_wire, "KEEPALIVE_SECONDS", 0.05)
        await echoed(wire, b"b")  # the same connection as "a"; idle from now on for only 0.05 s
        await asyncio.sleep(0.1)
        await echoed(wire, b"c")
    assert server.connections == 3


async def test_an_idle_connection_closing_but_not_yet_lost_is_not_reused(client: Any) -> None:
    """Between the server's end arriving and connection_lost (a later loop turn) the transport is closing:
    a request in that window opens a new connection instead of writing into the closing one."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            writer.write(answer(await server.request(reader)))

    async with Server(handler) as server:
        wire = keep(client, server.url)
        for body in (b"1", b"2"):
            await echoed(wire, body)
            transport = wire._idle[-1].transport
            assert transport is not None
            transport.close()  # connection_lost comes in a later turn; the next request is sent before it
    assert server.connections == 2


@pytest.mark.parametrize(
    "extra", [b"HTTP/1.1 200 OK\r\n", b"garbage", answer(b"other")], ids=["a-head-begun", "garbage", "a-whole-answer"]
)
async def test_bytes_past_an_answer_retire_its_connection(client: Any, extra: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.request(reader)
            writer.write(answer(body) + extra)  # more than was asked for, in the same write

    async with Server(handler) as server:
        wire = keep(client, server.url)
        for body in (b"1", b"2"):
            await echoed(wire, body)
            await asyncio.sleep(0.05)
    assert server.connections == 2


@pytest.mark.parametrize(
    "target, headers",
    [("/x\r\nX-Evil: 1", {}), ("/x y", {}), ("/x", {"X-Request-Id": "r\nX-Evil: 1"})],
)
async def test_a_line_break_in_a_request_head_is_refused_before_anything_is_sent(
    client: Any, target: str, headers: dict[str, str]
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await server.request(reader)

    async with Server(handler) as server:
        with pytest.raises(ValueError):
            await keep(client, server.url).request("GET", target, headers)
        await asyncio.sleep(0.05)
    assert server.connections == 0


def test_only_http_urls_make_a_pool() -> None:
    with pytest.raises(ValueError):
        pool("unix:///tmp/litellm.sock")


async def test_https_verifies_the_server_against_the_trusted_authorities(
    client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key = _self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(answer(b'{"tls":true}'))
            await reader.read()
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=context)
    url = f"https://localhost:{server.sockets[0].getsockname()[1]}"
    try:
        with pytest.raises(ConnectFailed):  # not signed by anyone this machine trusts
            await keep(client, url).request("GET", "/x", {})
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # now it is
        got = await keep(client, url).request("GET", "/x", {})
        assert await got.read() == b'{"tls":true}'
        got.release()
    finally:
        server.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "cert.pem", folder / "key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


async def test_an_answer_read_whole_is_read_past_the_high_water_mark(client: Any) -> None:
    size = 4 * http_wire.HIGH_WATER  # an embeddings answer for a few dozen inputs

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            await server.request(reader)
            writer.write(answer(b"x" * size))

    async with Server(handler) as server:
        wire = keep(client, server.url, read_timeout=30.0)
        for _ in range(2):
            got = await wire.request("GET", "/x", {})
            assert len(await asyncio.wait_for(got.read(), 3)) == size
            got.release()
    assert server.connections == 1


async def test_an_answer_given_up_whole_but_unread_leaves_its_connection_reading(client: Any) -> None:
    size = http_wire.HIGH_WATER + 100  # its last bytes cross the mark in the read that ends the answer

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            body = await server.request(reader)
            writer.write(answer(b"x" * size) if body == b"big" else answer(body))

    async with Server(handler) as server:
        wire = keep(client, server.url, read_timeout=30.0)
        got = await wire.request("POST", "/x", {}, b"big")
        await asyncio.sleep(0.2)  # the whole answer is in; its reader (a client that hung up) takes none of it
        assert got._complete and got._paused
        got.release()
        got = await asyncio.wait_for(wire.request("POST", "/x", {}, b"next"), 3)
        assert await got.read() == b"next"
        got.release()
    assert server.connections == 1
