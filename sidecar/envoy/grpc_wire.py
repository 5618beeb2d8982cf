"""The sidecar's own gRPC server for Envoy's calls, on `h2_conn` (the asyncio part).

It serves what grpc.aio served, to the same servicers: ext_authz `Check`, ext_proc
`Process`, the access-log stream and `grpc.health.v1.Health/Check` (`Method` table, built in
app.py). Why: see h2_conn.py; `--grpc-server grpcio` keeps grpc.aio.

Rules:
1. A call is a stream whose `:path` names a method of the table; `content-type` must start
   with `application/grpc`. A wrong content type gets HTTP 415 at once; an unknown path ends
   UNIMPLEMENTED (trailers-only) without reading the body.
2. With an auth token configured, a call without it (`x-qos-auth` metadata) ends
   UNAUTHENTICATED before its request is read (common.py rule 5); health is exempt (rule 6).
   Such refusals wait for the call's first DATA frame or its end, which they drop unread: a
   grpc-core client whose first write is still under way when the status comes reports
   INTERNAL (its write failed) instead of the status it was sent.
3. Messages carry the 5-octet gRPC prefix. A compressed one (this server never offers an
   encoding, so none should come) ends the call INTERNAL, one over `max_message_bytes`
   RESOURCE_EXHAUSTED, a unary call without exactly one message INTERNAL, a message that does
   not parse INTERNAL, as grpc does.
4. Each call runs in its own task. RST_STREAM from Envoy (its timeout, its client gone) or a
   lost connection cancels the task: the servicers release what they took (common.py rule 3),
   and `context.cancelled()` says so. grpc-timeout is not enforced here: Envoy enforces its
   own timeout and resets the stream.
5. An answer is response headers (`:status 200`, `content-type: application/grpc`) before the
   first message, the messages, then trailers (`grpc-status`, `grpc-message` percent-encoded)
   that end the stream. A handler that raises ends the call INTERNAL and is logged.
6. Writes are coalesced: whatever a loop tick produced for a connection goes out in one write.
7. `stop`: GOAWAY on every connection, `grace_s` for the calls in progress, then they are
   cancelled and the connections closed.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, cast

from sidecar.envoy import h2_conn
from sidecar.envoy.common import AUTH_HEADER, GRPC_HEALTH_METHOD, TokenCheck
from sidecar.envoy.header_block import STATUS_200, literal
from sidecar.envoy.listening import SocketListener

log = logging.getLogger(__name__)

OK, CANCELLED, INVALID_ARGUMENT, UNIMPLEMENTED, INTERNAL = 0, 1, 3, 12, 13
RESOURCE_EXHAUSTED, UNAUTHENTICATED = 8, 16
_RESPONSE_HEADERS = STATUS_200 + literal(b"content-type", b"application/grpc")
_OK_TRAILERS = literal(b"grpc-status", b"0")
_UNSUPPORTED_TYPE = literal(b":status", b"415")
_AUTH = AUTH_HEADER.encode()
_JOIN_BELOW = 64 * 1024


@dataclass(frozen=True, slots=True)
class Method:
    """One method: `streaming` requests come as an async iterator, else as one message;
    `handler(request_or_iterator, context)` returns the one response or None (a bidi stream
    writes with `context.write`)."""

    api: str  # the label of qos_unauthenticated_calls_total
    streaming: bool
    parse: Callable[[bytes], Any]
    serialize: Callable[[Any], bytes | tuple[bytes, ...]]  # a message, or it in parts
    handler: Callable[[Any, Any], Awaitable[Any]]


class CallError(Exception):
    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class CallContext:
    """What the servicers use of grpc.aio's ServicerContext."""

    __slots__ = ("_call",)

    def __init__(self, call: _Call) -> None:
        self._call = call

    def cancelled(self) -> bool:
        return self._call.cancelled

    async def write(self, message: Any) -> None:
        self._call.send_message(self._call.method.serialize(message))

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return tuple(
            (k.decode("latin-1"), v.decode("latin-1"))
            for k, v in self._call.headers
            if not k.startswith(b":")
        )


class _Call:
    """One stream: its request messages as they arrive, and its answer (rules 3-5)."""

    def __init__(
        self, conn: _Connection, stream_id: int, method: Method, headers: list[Any]
    ) -> None:
        self.conn = conn
        self.stream_id = stream_id
        self.method = method
        self.headers = headers
        self.buffer = bytearray()
        self.needed = 5  # octets of `buffer` that make its first message whole
        self.messages: collections.deque[bytes] = collections.deque()
        self.ended = False
        self.cancelled = False
        self.answered = False  # response headers sent
        self.waiter: asyncio.Future[None] | None = None
        self.task: asyncio.Task[None] | None = None
        self.error: CallError | None = None

    def feed(self, data: bytes, ended: bool) -> None:
        """One DATA frame's payload. The handler is woken only when a message is whole, the
        request ended or failed: a 1 MiB message comes in 64 frames."""
        self.buffer += data
        buffer, limit = self.buffer, self.conn.server.max_message_bytes
        if len(buffer) < self.needed and not ended:
            return  # the message under way is not whole yet
        messages = len(self.messages)
        while len(buffer) >= 5 and self.error is None:
            length = int.from_bytes(buffer[1:5], "big")
            if buffer[0]:
                self.error = CallError(INTERNAL, "compressed messages are not accepted")
            elif length > limit:
                self.error = CallError(RESOURCE_EXHAUSTED, f"message of {length} bytes > {limit}")
            elif len(buffer) >= 5 + length:
                with memoryview(buffer) as view:  # one copy, not a slice and a copy
                    self.messages.append(bytes(view[5 : 5 + length]))
                del buffer[: 5 + length]
            else:
                break
        self.needed = 5 + int.from_bytes(buffer[1:5], "big") if len(buffer) >= 5 else 5
        self.ended = self.ended or ended
        if self.error is not None:
            self.buffer.clear()
        if ended or self.error is not None or len(self.messages) > messages:
            self._wake()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def _more(self) -> None:
        self.waiter = asyncio.get_running_loop().create_future()
        await self.waiter
        self.waiter = None

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    async def one(self) -> Any:
        while not self.ended and self.error is None:
            await self._more()
        self._check()
        if len(self.messages) != 1 or self.buffer:
            raise CallError(INTERNAL, "a unary call takes exactly one request message")
        return self._parse(self.messages.popleft())

    async def requests(self) -> AsyncIterator[Any]:
        while True:
            self._check()
            if self.messages:
                yield self._parse(self.messages.popleft())
            elif self.ended:
                return
            else:
                await self._more()

    def _parse(self, data: bytes) -> Any:
        try:
            return self.method.parse(data)
        except Exception as exc:
            raise CallError(INTERNAL, f"request does not parse: {exc}") from exc

    def send_message(self, data: bytes | tuple[bytes, ...]) -> None:
        """One message, whole or in parts: small parts go joined with the prefix, a large
        one (a body) as it is, not copied again only to put a few octets before it."""
        conn = self.conn.h2
        if not self.answered:
            self.answered = True
            conn.send_headers(self.stream_id, _RESPONSE_HEADERS)
        parts = (data,) if isinstance(data, bytes) else data
        small = [sum(len(part) for part in parts).to_bytes(5, "big")]
        for part in parts:
            if len(part) < _JOIN_BELOW:
                small.append(part)
                continue
            conn.send_data(self.stream_id, b"".join(small))
            conn.send_data(self.stream_id, part)
            small = []
        if small:
            conn.send_data(self.stream_id, b"".join(small))
        self.conn.wrote()

    def finish(self, code: int, message: str = "") -> None:
        trailers = _OK_TRAILERS if code == OK else _status_block(code, message)
        if not self.answered:  # trailers-only
            trailers = _RESPONSE_HEADERS + trailers
        self.answered = True
        self.conn.h2.send_headers(self.stream_id, trailers, end_stream=True)
        self.conn.wrote()


def _status_block(code: int, message: str) -> bytes:
    block = literal(b"grpc-status", str(code).encode())
    if message:
        quoted = urllib.parse.quote(message, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")
        block += literal(b"grpc-message", quoted.encode())
    return block


class _Connection(asyncio.Protocol):
    def __init__(self, server: GrpcWireServer) -> None:
        self.server = server
        self.h2 = h2_conn.H2Connection()
        self.calls: dict[int, _Call] = {}
        self.refusing: dict[int, tuple[int, str]] = {}  # rules 1, 2: the client sends first
        self.transport: asyncio.Transport | None = None
        self._write_scheduled = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)
        self.server.connections.add(self)
        self.wrote()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        self.transport = None
        for call in list(self.calls.values()):
            self._cancel(call)

    def data_received(self, data: bytes) -> None:
        for event in self.h2.receive(data):
            if isinstance(event, h2_conn.DataReceived):
                call = self.calls.get(event.stream_id)
                if call is not None:
                    call.feed(event.data, event.ended)
                elif event.stream_id in self.refusing:
                    self._refuse(event.stream_id, *self.refusing.pop(event.stream_id))
            elif isinstance(event, h2_conn.RequestStarted):
                self._start(event)
            elif isinstance(event, h2_conn.StreamReset):
                self.refusing.pop(event.stream_id, None)
                call = self.calls.get(event.stream_id)
                if call is not None:
                    self._cancel(call)
            else:
                log.info("grpc connection ended: %s (code %d)", event.why, event.error_code)
                for call in list(self.calls.values()):
                    self._cancel(call)
        if self.h2.outbox or self.h2.going_away or self.h2.closed:
            self.wrote()

    def _start(self, event: h2_conn.RequestStarted) -> None:
        headers = event.headers
        path = content_type = presented = None
        for name, value in headers:
            if name == b":path":
                path = value
            elif name == b"content-type":
                content_type = value
            elif name == _AUTH:
                presented = value
        if content_type is None or not content_type.startswith(b"application/grpc"):
            self.h2.send_headers(event.stream_id, _UNSUPPORTED_TYPE, end_stream=True)
            return
        method_name = (path or b"").decode("latin-1")
        method = self.server.methods.get(method_name)
        if method is None:
            self._refuse_when_sent(event, UNIMPLEMENTED, f"unknown method {method_name}")
            return
        if method_name != GRPC_HEALTH_METHOD and not self.server.auth.admits(presented, method.api):
            self._refuse_when_sent(event, UNAUTHENTICATED, self.server.unauthenticated_reason)
            return
        call = _Call(self, event.stream_id, method, headers)
        self.calls[event.stream_id] = call
        if event.ended:
            call.ended = True
        call.task = asyncio.ensure_future(self._run(call))

    def _refuse_when_sent(self, event: h2_conn.RequestStarted, code: int, message: str) -> None:
        """Rules 1, 2: refuse at the request's first DATA frame or its end."""
        if event.ended:
            self._refuse(event.stream_id, code, message)
        else:
            self.refusing[event.stream_id] = (code, message)

    def _refuse(self, stream_id: int, code: int, message: str) -> None:
        """Trailers-only, before the request is read (rules 1, 2)."""
        block = _RESPONSE_HEADERS + _status_block(code, message)
        self.h2.send_headers(stream_id, block, end_stream=True)

    async def _run(self, call: _Call) -> None:
        method = call.method
        context = CallContext(call)
        try:
            if method.streaming:
                response = await method.handler(call.requests(), context)
            else:
                response = await method.handler(await call.one(), context)
            if response is not None:
                call.send_message(method.serialize(response))
            call.finish(OK)
        except asyncio.CancelledError:
            if not call.cancelled:  # the server is closing, not the peer: say so
                self.h2.reset(call.stream_id)
                self.wrote()
        except CallError as exc:
            call.finish(exc.code, str(exc))
        except Exception as exc:
            log.exception("grpc call on stream %d failed", call.stream_id)
            call.finish(INTERNAL, f"Unexpected {type(exc).__name__}: {exc}")
        finally:
            self.calls.pop(call.stream_id, None)

    def _cancel(self, call: _Call) -> None:
        call.cancelled = True
        if call.task is not None:
            call.task.cancel()

    def wrote(self) -> None:
        """Rule 6: one write per loop tick."""
        if not self._write_scheduled:
            self._write_scheduled = True
            asyncio.get_running_loop().call_soon(self._write)

    def _write(self) -> None:
        self._write_scheduled = False
        out = self.h2.outbox
        if out and self.transport is not None:
            self.h2.outbox = bytearray()  # given to the transport as it is, not copied
            self.transport.write(out)
        else:
            out.clear()
        done = self.h2.closed or (self.h2.going_away and not self.calls and not self.refusing)
        if done and self.transport is not None:
            self.transport.close()


class GrpcWireServer(SocketListener):
    """The listening socket and its connections (rule 7 for `stop`)."""

    def __init__(
        self,
        methods: dict[str, Method],
        auth: TokenCheck,
        *,
        max_message_bytes: int,
        unauthenticated_reason: str,
    ) -> None:
        self.methods = methods
        self.auth = auth
        self.max_message_bytes = max_message_bytes
        self.unauthenticated_reason = unauthenticated_reason
        self.connections: set[_Connection] = set()

    def connection(self) -> asyncio.Protocol:
        return _Connection(self)

    async def stop(self, grace: float = 1.0) -> None:
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            conn.h2.goaway()
            conn.wrote()
        tasks = [c.task for conn in self.connections for c in conn.calls.values() if c.task]
        if tasks:
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn._write()
                conn.transport.close()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
