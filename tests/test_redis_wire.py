"""PipedRedis, the request path's Redis connection, against real servers: order, errors, outages."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ConnectionError, NoScriptError, ResponseError, TimeoutError

from proxy.redis_wire import PipedRedis

from .helpers import RedisProcess, uid

pytestmark = pytest.mark.anyio


@pytest.fixture
async def pipe(base_settings) -> AsyncIterator[PipedRedis]:  # type: ignore[no-untyped-def]
    piped = PipedRedis(base_settings.redis_url, timeout=2.0)
    yield piped
    await piped.close()


async def test_replies_reach_their_callers_in_order(pipe: PipedRedis, redis_client: aioredis.Redis) -> None:
    key = uid("counter")
    # One event-loop turn's commands leave in one write; each caller gets its own reply.
    futures = [pipe.submit("INCR", key) for _ in range(2000)]
    assert await asyncio.gather(*futures) == list(range(1, 2001))
    # The URL's database (/9) was selected: redis-py on the same URL sees the key.
    assert int(await redis_client.get(key)) == 2000
    assert await pipe.call("XADD", uid("stream"), "*", "r", b"\x00binary\xff") is not None


async def test_errors_are_redis_py_exceptions_and_the_connection_goes_on(pipe: PipedRedis) -> None:
    key = uid("k")
    await pipe.call("SET", key, "text")
    with pytest.raises(ResponseError, match="not an integer"):
        await pipe.call("INCR", key)
    with pytest.raises(NoScriptError):
        await pipe.call("EVALSHA", "0" * 40, 0)
    assert await pipe.call("GET", key) == b"text"


async def test_scripts_loaded_on_every_connection_and_a_refused_preamble_is_only_logged(
    volatile_redis: RedisProcess, capsys: pytest.CaptureFixture[str]
) -> None:
    """A restarted Redis has no scripts: each new connection loads them before its first command, so
    EVALSHA never meets NOSCRIPT there. A preamble Redis refuses (an ACL without SCRIPT) costs nothing."""
    body = "return redis.call('INCR', KEYS[1])"
    pipe = PipedRedis(volatile_redis.url, timeout=2.0)
    pipe.on_connect("SCRIPT", "LOAD", body)
    pipe.on_connect("NO-SUCH-COMMAND")
    admin = aioredis.Redis(port=volatile_redis.port)
    sha = await admin.script_load(body)
    await admin.aclose()
    try:
        assert await pipe.call("EVALSHA", sha, 1, "n") == 1
        volatile_redis.kill()
        volatile_redis.start()  # empty: no key, no script
        with pytest.raises(ConnectionError):
            await pipe.call("PING")  # the old connection's end
        assert await pipe.call("EVALSHA", sha, 1, "n") == 1
        assert capsys.readouterr().out.count("redis_preamble_refused") == 2  # once per connection
    finally:
        await pipe.close()


async def test_a_cancelled_caller_does_not_shift_the_replies(pipe: PipedRedis) -> None:
    key = uid("k")
    await pipe.call("SET", key, "1")
    slow = asyncio.ensure_future(pipe.call("GET", key))
    following = pipe.submit("INCR", key)
    await asyncio.sleep(0)
    slow.cancel()
    assert await following == 2
    assert await pipe.call("GET", key) == b"2"


async def test_password_and_database_from_the_url(volatile_redis: RedisProcess) -> None:
    admin = aioredis.Redis(port=volatile_redis.port)
    await admin.config_set("requirepass", "s3cret")
    await admin.aclose()
    good = PipedRedis(f"redis://:s3cret@127.0.0.1:{volatile_redis.port}/3", timeout=2.0)
    bad = PipedRedis(f"redis://:wrong@127.0.0.1:{volatile_redis.port}/3", timeout=2.0)
    try:
        await good.call("SET", "where", "db3")
        with pytest.raises(AuthenticationError):
            await bad.call("GET", "where")
        check = aioredis.Redis(port=volatile_redis.port, password="s3cret", db=3)
        assert await check.get("where") == b"db3"
        await check.aclose()
    finally:
        await good.close()
        await bad.close()


async def test_a_killed_server_fails_commands_and_a_restarted_one_is_reconnected(volatile_redis: RedisProcess) -> None:
    pipe = PipedRedis(volatile_redis.url, timeout=2.0)
    try:
        assert await pipe.call("PING") == b"PONG"
        volatile_redis.kill()
        started = time.monotonic()
        with pytest.raises(ConnectionError):
            await pipe.call("PING")
        assert time.monotonic() - started < 2.0  # refused at once, not after the timeout
        volatile_redis.start()
        assert await pipe.call("PING") == b"PONG"
    finally:
        await pipe.close()


async def test_a_stalled_server_times_out_commands_already_written(volatile_redis: RedisProcess) -> None:
    pipe = PipedRedis(volatile_redis.url, timeout=0.3)
    try:
        assert await pipe.call("PING") == b"PONG"
        os.kill(volatile_redis.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await pipe.call("PING")
        assert 0.25 < time.monotonic() - started < 1.5
        os.kill(volatile_redis.proc.pid, signal.SIGCONT)
        assert await pipe.call("PING") == b"PONG"  # a fresh connection
    finally:
        await pipe.close()


async def test_an_unreachable_server_fails_queued_commands(volatile_redis: RedisProcess) -> None:
    volatile_redis.kill()
    pipe = PipedRedis(volatile_redis.url, timeout=0.5)
    futures = [pipe.submit("PING") for _ in range(3)]
    for outcome in await asyncio.gather(*futures, return_exceptions=True):
        assert isinstance(outcome, ConnectionError)
    await pipe.idle()  # nothing left waiting


CRASH_AFTER_SUBMIT = """
import asyncio, os, sys
from proxy.redis_wire import PipedRedis

async def main():
    pipe = PipedRedis(sys.argv[1], timeout=2.0)
    await pipe.call("PING")  # connected
    pipe.submit("XADD", sys.argv[2], "*", "r", "record")
    if sys.argv[3] == "wait":
        await pipe.written()
    os._exit(0)  # a crash: no loop turn, no cleanup

asyncio.run(main())
"""


@pytest.mark.parametrize("wait", [True, False], ids=["written", "not-waited"])
async def test_what_written_waited_for_survives_a_crash(
    base_settings, redis_client: aioredis.Redis, wait: bool
) -> None:  # type: ignore[no-untyped-def]
    stream = uid("crash")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CRASH_AFTER_SUBMIT, base_settings.redis_url, stream, "wait" if wait else "go"
    )
    assert await proc.wait() == 0
    # Handed to the socket before the crash, the command still reaches Redis; queued only, it is gone.
    deadline = time.monotonic() + (5 if wait else 0.3)
    while time.monotonic() < deadline and await redis_client.xlen(stream) == 0:
        await asyncio.sleep(0.02)
    assert await redis_client.xlen(stream) == (1 if wait else 0)


async def test_a_cancelled_waiter_leaves_the_others_waiting(pipe: PipedRedis) -> None:
    await pipe.call("PING")
    ping = pipe.submit("PING")
    first, second = asyncio.ensure_future(pipe.written()), asyncio.ensure_future(pipe.written())
    await asyncio.sleep(0)
    first.cancel()
    await asyncio.wait_for(second, 1)
    assert await asyncio.wait_for(pipe.written(), 1) is None  # nothing queued: at once
    # Its reply, before the fixture closes the connection: an unanswered command fails then, and an
    # exception nobody retrieved fails the test's teardown on a slow machine.
    assert await asyncio.wait_for(ping, 1) == b"PONG"


async def test_written_does_not_hang_on_an_unreachable_redis() -> None:
    piped = PipedRedis("redis://127.0.0.1:9/0", timeout=0.5)
    command = piped.submit("PING")
    await asyncio.wait_for(piped.written(), 2)
    with pytest.raises(ConnectionError):
        await command
