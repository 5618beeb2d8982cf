"""`RedisPipe`: one pipelined connection to one Redis server, the `single` mode's hot path.

Every decision sends at least one script call, so what the client costs per call is paid per
decision. redis-py's asyncio pipeline took about 160 us of the sidecar's CPU per call on the
2-core benchmark machine (a pipeline object, a pooled connection checked out and back with a
health-check read, replies through its parser layers); this connection takes about 26 us for
the same EVALSHA (`benchmarks/overhead.py` shows what it changes per decision).

Rules:
- One connection (TCP, or a Unix socket), opened on first use and again after it was lost or
  dropped. Every caller writes its commands whole, in one write, and the server answers in the
  order it read them (RESP), so each reply belongs to the oldest caller still waiting: one
  FIFO of futures, no pool. Concurrent callers share the socket (implicit pipelining); the
  store's batcher already puts one event-loop tick's calls in one `execute`.
- Replies are parsed by hiredis (bulk strings as bytes, as redis-py returns them). An error
  reply is a value, not raised (redis-py's `raise_on_error=False`): redis-py's
  `ResponseError`, or `NoScriptError` for NOSCRIPT, so the store treats the replies of both
  clients alike.
- A connection that fails (refused, reset, closed by the server) fails every caller waiting
  on it with redis-py's `ConnectionError`, which the store retries once on a fresh connection
  (redis_store.py module rules).
- A caller cancelled while its replies are outstanding (its deadline passed) leaves them owed:
  they are read and thrown away when they come, and the callers after it get their own. A
  deadline passes on a slow server, but also on an event loop running late, when the answers
  are already in the socket: dropping the connection then would fail every caller sharing it
  (measured: a quarter of a maximum-rate run's decisions). Only once more than MAX_ABANDONED
  replies are owed to callers that left (a server that stopped answering) is the connection
  dropped: the callers still waiting fail at once with ConnectionError, and the next call
  connects afresh.
- Used for `redis://` and `unix://` URLs in `single` mode only; TLS (`rediss://`), Cluster and
  Sentinel stay on redis-py (`RedisPipe.for_url` says None for them). `AUTH` (user and
  password from the URL) and `SELECT` (its db) are sent first on every new connection.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Sequence
from typing import Any, cast

import hiredis
from redis.asyncio.connection import parse_url
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

Command = Sequence[str | bytes | int | float]
MAX_ABANDONED = 256  # replies owed to callers that left, before the connection is dropped


class _Replies(asyncio.Protocol):
    """One connection: what it reads goes, reply by reply, to the oldest waiting future."""

    def __init__(self) -> None:
        self.reader = hiredis.Reader(replyError=ResponseError)
        self.waiting: collections.deque[asyncio.Future[Any]] = collections.deque()
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.abandoned = 0  # futures in `waiting` whose callers left (cancelled)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both have write/close.
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while True:
            try:
                reply = self.reader.gets()
            except hiredis.ProtocolError as exc:
                self.close(f"unreadable reply: {exc}")
                return
            if reply is False:
                return
            if not self.waiting:  # a reply nobody asked for: the stream is out of step
                self.close("a reply with no command waiting for it")
                return
            future = self.waiting.popleft()
            if future.done():  # a caller that left: its reply is thrown away
                self.abandoned -= 1
            else:
                future.set_result(_error_kind(reply))

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(f"connection lost: {exc or 'closed by the server'}")

    def send(self, packed: bytes, futures: list[asyncio.Future[Any]]) -> None:
        assert self.transport is not None
        self.waiting.extend(futures)
        self.transport.write(packed)

    def left(self, futures: list[asyncio.Future[Any]]) -> None:
        """A caller gave up on `futures` (module rules): their replies are owed."""
        for future in futures:  # the awaited one was cancelled with its caller already
            if future.cancelled() or future.cancel():
                self.abandoned += 1
        if self.abandoned > MAX_ABANDONED:
            self.close(f"{self.abandoned} replies owed to callers that left: not answering")

    def close(self, why: str) -> None:
        if self.transport is not None:
            self.transport.close()
        self._fail(why)

    def _fail(self, why: str) -> None:
        self.closed = True
        while self.waiting:
            future = self.waiting.popleft()
            if not future.done():
                future.set_exception(RedisConnectionError(why))


def _error_kind(reply: Any) -> Any:
    if isinstance(reply, ResponseError) and str(reply).startswith("NOSCRIPT"):
        return NoScriptError(str(reply))
    return reply


def _pack(command: Command) -> bytes:
    # hiredis's stub types the argument as a 1-tuple; it takes any number of parts.
    return bytes(hiredis.pack_command(cast("Any", tuple(command))))


class RedisPipe:
    def __init__(
        self,
        *,
        host: str = "localhost",
        port: int = 6379,
        path: str | None = None,
        username: str | None = None,
        password: str | None = None,
        db: int = 0,
    ) -> None:
        self._address = (host, port)
        self._path = path
        self._handshake: list[Command] = []
        if password is not None:
            auth: Command = ("AUTH", username, password) if username else ("AUTH", password)
            self._handshake.append(auth)
        if db:
            self._handshake.append(("SELECT", db))
        self._replies: _Replies | None = None
        self._connecting: asyncio.Lock | None = None

    @classmethod
    def for_url(cls, url: str) -> RedisPipe | None:
        """A pipe to the server `url` names; None for a URL it does not serve (module
        rules): TLS, or options this connection does not apply."""
        options = parse_url(url)
        if options.get("connection_class") is not None and "path" not in options:
            return None  # rediss://: redis-py's TLS connection
        if set(options) - {
            "connection_class",
            "host",
            "port",
            "path",
            "username",
            "password",
            "db",
        }:
            return None
        return cls(
            host=str(options.get("host", "localhost")),
            port=int(options.get("port", 6379)),
            path=options.get("path"),
            username=options.get("username"),
            password=options.get("password"),
            db=int(options.get("db", 0)),
        )

    async def execute(self, commands: Sequence[Command]) -> list[Any]:
        """Each command's reply, in order; an error reply as its exception value. Raises
        redis-py's ConnectionError when the connection fails."""
        if not commands:
            return []
        replies = await self._connected()
        packed = b"".join(_pack(command) for command in commands)
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in commands]
        replies.send(packed, futures)
        try:
            await futures[-1]  # replies come in order: the last one answered, all were
        except asyncio.CancelledError:
            replies.left(futures)
            raise
        except RedisConnectionError:
            for future in futures[:-1]:  # the same error: retrieved, so asyncio logs none
                future.exception()
            raise
        return [future.result() for future in futures]

    def drop(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._replies is not None:
            self._replies.close("dropped")
            self._replies = None

    async def aclose(self) -> None:
        self.drop()

    async def _connected(self) -> _Replies:
        replies = self._replies
        if replies is not None and not replies.closed:
            return replies
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            replies = self._replies
            if replies is None or replies.closed:
                replies = self._replies = await self._connect()
        return replies

    async def _connect(self) -> _Replies:
        loop = asyncio.get_running_loop()
        try:
            if self._path is not None:
                transport, replies = await loop.create_unix_connection(_Replies, self._path)
            else:
                transport, replies = await loop.create_connection(_Replies, *self._address)
        except OSError as exc:
            raise RedisConnectionError(f"cannot connect: {exc}") from exc
        replies.connection_made(transport)  # uvloop returns before it calls it
        if self._handshake:
            futures = [loop.create_future() for _ in self._handshake]
            replies.send(b"".join(_pack(c) for c in self._handshake), futures)
            try:
                answers = [await future for future in futures]
            except asyncio.CancelledError:
                replies.close("cancelled while connecting")
                raise
            refused = [a for a in answers if isinstance(a, ResponseError)]
            if refused:
                replies.close(f"handshake refused: {refused[0]}")
                raise RedisConnectionError(f"AUTH/SELECT refused: {refused[0]}")
        return replies
