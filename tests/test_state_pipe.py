"""The single-server store's own pipelined connection (`sidecar/state/redis_pipe.py`), on a
real Valkey: replies reach their own callers however many share the socket, error replies are
values, a stalled server's late replies never reach a later caller, and a restarted server or
a URL's user, password and db are handled as redis-py would."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import uvloop
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from devstack.procs import ValkeyProcess
from sidecar.core.types import BucketCheck, QuotaCheck
from sidecar.errors import StateUnavailable
from sidecar.state import redis_pipe
from sidecar.state.redis_pipe import RedisPipe
from sidecar.state.redis_store import RedisQuotaStore
from tests.fixtures_valkey import ValkeyServer

pytestmark = pytest.mark.stack


@pytest.fixture(scope="module")
def valkey() -> Iterator[ValkeyServer]:
    with ValkeyServer() as server:
        yield server


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, None]], None]:
    """Run a test's coroutine on each event loop: the sidecar runs on uvloop, whose
    transports differ from asyncio's (it returns a connection before `connection_made`)."""
    return uvloop.run if request.param == "uvloop" else asyncio.run


@contextlib.asynccontextmanager
async def open_pipe(server: ValkeyProcess) -> AsyncIterator[RedisPipe]:
    pipe = RedisPipe.for_url(server.url)
    assert pipe is not None
    try:
        yield pipe
    finally:
        await pipe.aclose()


def test_urls_it_serves_and_those_it_leaves_to_redis_py() -> None:
    assert RedisPipe.for_url("rediss://127.0.0.1:6380/0") is None  # TLS: redis-py
    assert RedisPipe.for_url("redis://127.0.0.1:6380/0?ssl_cert_reqs=none") is None
    assert RedisPipe.for_url("redis://u:p@127.0.0.1:6380/2") is not None
    assert RedisPipe.for_url("unix:///tmp/valkey.sock?db=1") is not None


def test_concurrent_callers_each_get_their_own_replies(
    valkey: ValkeyServer, run: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    async def main() -> None:
        async with open_pipe(valkey) as pipe:

            async def one(i: int) -> None:
                commands = [("ECHO", f"c{i}-{j}") for j in range(i % 5 + 1)]
                replies = await pipe.execute(commands)
                assert replies == [f"c{i}-{j}".encode() for j in range(i % 5 + 1)]

            await asyncio.gather(*(one(i) for i in range(300)))

    run(main())


def test_error_replies_are_values_beside_the_others(
    valkey: ValkeyServer, run: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    async def main() -> None:
        async with open_pipe(valkey) as pipe:
            replies = await pipe.execute(
                [
                    ("SET", "pipe:text", "x"),
                    ("INCR", "pipe:text"),
                    ("EVALSHA", "0" * 40, 0),
                    ("EVAL", "return {1, 2, 'three'}", 0),
                ]
            )
        assert replies[0] == b"OK"
        assert isinstance(replies[1], ResponseError) and "not an integer" in str(replies[1])
        assert isinstance(replies[2], NoScriptError)
        assert replies[3] == [1, 2, b"three"]

    run(main())


def test_a_stalled_servers_late_replies_never_reach_a_later_caller(
    valkey: ValkeyServer, run: Callable[[Coroutine[Any, Any, None]], None]
) -> None:
    async def main() -> None:
        async with open_pipe(valkey) as pipe:
            assert await pipe.execute([("SET", "pipe:n", "1")]) == [b"OK"]
            valkey.pause()
            try:
                for command in (("GET", "pipe:n"), ("ECHO", "given up")):
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.2):
                            await pipe.execute([command])
            finally:
                valkey.resume()
            # The same connection: the two replies owed to callers that left are read and
            # thrown away, and each later caller gets its own.
            assert await pipe.execute([("ECHO", "mine")]) == [b"mine"]
            assert await pipe.execute([("GET", "pipe:n"), ("ECHO", "x")]) == [b"1", b"x"]

    run(main())


def test_a_server_owing_too_many_replies_is_dropped(
    valkey: ValkeyServer,
    run: Callable[[Coroutine[Any, Any, None]], None],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(redis_pipe, "MAX_ABANDONED", 2)

    async def main() -> None:
        async with open_pipe(valkey) as pipe:
            assert await pipe.execute([("PING",)]) == [b"PONG"]
            valkey.pause()
            try:
                waiting = asyncio.ensure_future(pipe.execute([("ECHO", "still here")]))
                for _ in range(3):  # the third caller to leave makes three owed: dropped
                    with pytest.raises(TimeoutError):
                        async with asyncio.timeout(0.1):
                            await pipe.execute([("PING",)])
                # The caller still waiting fails at once instead of waiting for a server
                # that does not answer.
                with pytest.raises(RedisConnectionError):
                    await asyncio.wait_for(waiting, 1.0)
            finally:
                valkey.resume()
            assert await pipe.execute([("ECHO", "fresh")]) == [b"fresh"]

    run(main())


def test_a_restarted_server_costs_the_store_no_failed_call(tmp_path: Path) -> None:
    server = ValkeyProcess(tmp_path)
    server.start()
    bucket = BucketCheck("requests", rate_per_s=1.0, burst=10.0, cost=1.0)

    async def main() -> None:
        store = RedisQuotaStore(server.url, timeout_s=2.0)
        try:
            assert (await store.acquire(QuotaCheck("acme", "c", (bucket,), 4, None, 10.0))).allowed
            await asyncio.to_thread(server.restart)
            # The pipe's connection died with the old server: the store's one retry on a
            # fresh connection answers (state is gone with the restart, as it should be).
            assert (await store.acquire(QuotaCheck("acme", "c", (bucket,), 4, None, 10.0))).allowed
            assert await store.in_flight("acme", None) == 1
        finally:
            await store.close()

    try:
        asyncio.run(main())
    finally:
        server.stop()


def test_user_password_and_db_from_the_url(tmp_path: Path) -> None:
    acl = ["--user", "default", "on", "nopass", "~*", "&*", "+@all"]
    acl += ["--user", "alice", "on", ">s3cret", "~*", "&*", "+@all"]
    server = ValkeyProcess(tmp_path, extra_args=acl)
    server.start()
    base = f"127.0.0.1:{server.port}"

    async def main() -> None:
        pipe = RedisPipe.for_url(f"redis://alice:s3cret@{base}/3")
        assert pipe is not None
        try:
            assert await pipe.execute([("ACL", "WHOAMI"), ("SET", "k", "v")]) == [b"alice", b"OK"]
        finally:
            await pipe.aclose()
        wrong = RedisQuotaStore(f"redis://alice:nope@{base}/3", timeout_s=1.0)
        try:
            with pytest.raises(StateUnavailable, match="refused"):
                await wrong.ping()
        finally:
            await wrong.close()

    try:
        asyncio.run(main())
        with redis.Redis(host="127.0.0.1", port=server.port, db=3) as client:
            assert client.get("k") == b"v"
        with redis.Redis(host="127.0.0.1", port=server.port, db=0) as client:
            assert client.get("k") is None
    finally:
        server.stop()
