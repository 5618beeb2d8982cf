"""A small HTTP/1.1 server for the one caller of the ext_authz HTTP listener: Envoy.

Why not aiohttp: the listener answers one request per inference request, and aiohttp's
request, router, middleware and response objects cost more than the decision they carry
(about 28 µs of CPU per request for aiohttp's no-op server on the benchmark host, 8 µs for a
bare protocol; `python -m benchmarks.overhead`). Envoy's ext_authz client sends a narrow
dialect of HTTP/1.1, so this module reads that dialect strictly and refuses the rest.

Rules (the parser, `parse_head`, does no I/O; `WireListener` below is the asyncio part):
1. A request is a request line, `METHOD SP target SP HTTP/1.1` (or `HTTP/1.0`), and header
   lines `name: value` up to an empty line. The method and the names are RFC 9110 tokens,
   the target is ASCII, a value holds no control character but tab; a line that starts with
   white space (obsolete folding) or breaks any of this is refused (400). Names are lower
   case; the values are text decoded as UTF-8 with surrogate escapes, so that a value that
   is not UTF-8 reaches the adapter, which answers it with its own JSON 400 (`utf8` says
   whether the whole head was UTF-8, so that the adapter need not look otherwise).
2. Limits: the header section is at most MAX_HEAD_BYTES and MAX_FIELDS lines. Envoy never
   sends more (60 KiB of request headers in all, `max_request_headers_kb`); a longer one is
   refused (400) and the connection closed.
3. Bodies: `Content-Length` only (Envoy's ext_authz client always sets it). Its bytes are
   skipped, never kept: the check decides on the headers. `Transfer-Encoding` is refused
   (400), and so are two different lengths or one that is not a number.
4. One request at a time per connection, answered in order; bytes that arrive meanwhile wait
   in the buffer (reading pauses past MAX_BUFFERED_BYTES). `Connection: close`, and HTTP/1.0
   without `keep-alive`, close the connection after the answer. Every refusal closes it too:
   after a malformed request the stream's framing cannot be trusted.
5. When the peer goes away while a request is being answered, that request's task is
   cancelled (what aiohttp's `handler_cancellation` did): a decision nobody waits for stops,
   and the adapter releases any lease it took (`common.py`, rule 3).
6. Answers carry `content-length` (but 1xx, 204 and 304, which may not); a header name or
   value with CR or LF is a bug, never sent: like an exception of the handler, it is
   answered by the listener's `failure` (the adapter's JSON 500).
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import re
from collections.abc import Awaitable, Callable
from typing import cast

from sidecar.core.record import record
from sidecar.envoy.listening import SocketListener

MAX_HEAD_BYTES = 96 * 1024
MAX_FIELDS = 256
MAX_BUFFERED_BYTES = 256 * 1024
_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_REQUEST_LINE = re.compile(r"(" + _TOKEN + r") ([\x21-\x7e]+) HTTP/1\.([01])")
# The names joined by ":", which no name holds (each ends at its line's first colon): one
# match for them all, not one a line (rule 1).
_NAMES = re.compile(r"(?:" + _TOKEN + r":)*" + _TOKEN)
# A value, its white space stripped: any character but the control characters (tab allowed
# inside). The head is read as text decoded with surrogate escapes, so a byte above 0x7f is a
# character outside every ASCII class here, as it was a byte outside them.
_VALUE = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f]*")
_FRAMING = frozenset(("content-length", "transfer-encoding", "connection"))
_PHRASES = {status.value: status.phrase for status in http.HTTPStatus}
_OVERSIZE = f"header section over {MAX_HEAD_BYTES} bytes"


class WireError(Exception):
    """A request this server refuses: `detail` says why (for the 400's JSON body)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


@record
class WireRequest:
    method: str
    target: str  # as sent: path and query
    headers: tuple[tuple[str, str], ...]  # (lower-case name, value), in order, repeats kept
    content_length: int
    keep_alive: bool
    utf8: bool  # the whole head was UTF-8: no value holds a surrogate escape


@record
class WireResponse:
    status: int
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


def parse_head(head: bytes) -> WireRequest:
    """Rule 1-3: the request whose header section (without its final CRLF CRLF) is `head`.
    Raises WireError."""
    if len(head) > MAX_HEAD_BYTES:
        raise WireError(_OVERSIZE)
    try:
        text, utf8 = head.decode("utf-8"), True
    except UnicodeDecodeError:
        text, utf8 = head.decode("utf-8", "surrogateescape"), False
    lines = text.split("\r\n")
    if len(lines) > MAX_FIELDS + 1:
        raise WireError(f"more than {MAX_FIELDS} header lines")
    start = _REQUEST_LINE.fullmatch(lines[0])
    if start is None:
        raise WireError("request line is not `METHOD target HTTP/1.x` with an ASCII target")
    method, target, minor = start.groups()
    headers: list[tuple[str, str]] = []
    names: list[str] = []
    framing: list[tuple[str, str]] = []  # the fields rules 3-4 read, seen in the same pass
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        value = value.strip(" \t")
        # isprintable: no control character at all, the common case, without a regex call.
        if not colon or not (value.isprintable() or _VALUE.fullmatch(value)):
            raise WireError("malformed header line")
        names.append(name)
        field = (name.lower(), value)
        headers.append(field)
        if field[0] in _FRAMING:
            framing.append(field)
    if names and _NAMES.fullmatch(":".join(names)) is None:
        raise WireError("malformed header line")
    length, keep_alive = _framing(framing, minor == "1")
    return WireRequest(method, target, tuple(headers), length, keep_alive, utf8)


def _framing(fields: list[tuple[str, str]], keep_alive: bool) -> tuple[int, bool]:
    """Rules 3-4: the body's length and whether the connection stays open, from the head's
    content-length, transfer-encoding and connection fields."""
    lengths: set[str] = set()
    for name, value in fields:
        if name == "content-length":
            lengths.add(value)
        elif name == "transfer-encoding":
            raise WireError("transfer-encoding is not accepted; send content-length")
        else:
            # ASCII only, as the bytes were read: "\u212a".lower() is "k".
            tokens = {t.strip(" \t").lower() for t in value.split(",") if t.isascii()}
            keep_alive = "close" not in tokens and (keep_alive or "keep-alive" in tokens)
    return _length(lengths), keep_alive


def _length(values: set[str]) -> int:
    if not values:
        return 0
    if len(values) > 1:
        raise WireError("conflicting content-length headers")
    (value,) = values
    # ASCII digits only: str.isdigit also takes digits like "²", which int() refuses.
    if not (value.isascii() and value.isdigit()) or len(value) > 12:
        raise WireError("content-length is not a number of bytes")
    return int(value)


def encode_response(response: WireResponse, *, close: bool) -> bytes:
    """Rule 6: the answer's bytes. Raises ValueError for a CR or LF in a header."""
    lines = [f"HTTP/1.1 {response.status} {_PHRASES.get(response.status, 'Unknown')}"]
    for name, value in response.headers:
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r}: CR or LF in an answer's header")
        lines.append(f"{name}: {value}")
    if response.status >= 200 and response.status not in (204, 304):
        lines.append(f"content-length: {len(response.body)}")
    elif response.body:
        raise ValueError(f"a {response.status} answer has no body")
    if close:
        lines.append("connection: close")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8") + response.body


Handler = Callable[[WireRequest, asyncio.Transport], Awaitable[WireResponse]]
Refusal = Callable[[WireError], WireResponse]
Failure = Callable[[Exception], WireResponse]


class _Connection(asyncio.Protocol):
    """Rules 2-5 for one connection."""

    def __init__(self, listener: WireListener) -> None:
        self._listener = listener
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._skip = 0  # body bytes of the current request still to drop (rule 3)
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports have the methods, not the class: no isinstance here.
        self._transport = cast(asyncio.Transport, transport)
        self._listener.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._listener.connections.discard(self)
        self._closing = True
        if self._task is not None:
            self._task.cancel()  # rule 5

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._buffer += data
        if self._task is None:
            self._next()
        elif len(self._buffer) > MAX_BUFFERED_BYTES and self._transport is not None:
            self._transport.pause_reading()
            self._paused = True

    def close(self) -> asyncio.Task[None] | None:
        """Close the connection; its answer in progress, if any, is cancelled (rule 5) and
        returned, for the caller to wait on."""
        self._closing = True
        if self._transport is not None:
            self._transport.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    def _next(self) -> None:
        """Start answering the next complete request in the buffer, if there is one."""
        if self._skip:
            dropped = min(self._skip, len(self._buffer))
            del self._buffer[:dropped]
            self._skip -= dropped
            if self._skip:
                return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(self._buffer) > MAX_HEAD_BYTES:  # no end in sight: refused now
                self._refuse(WireError(_OVERSIZE))
            return
        head = bytes(self._buffer[:end])
        del self._buffer[: end + 4]
        try:
            request = parse_head(head)
        except WireError as error:
            self._refuse(error)
            return
        self._skip = request.content_length
        self._task = asyncio.ensure_future(self._answer(request))

    async def _answer(self, request: WireRequest) -> None:
        transport = self._transport
        assert transport is not None
        keep = request.keep_alive
        try:
            response = await self._listener.handler(request, transport)
            answer = encode_response(response, close=not keep)
        except Exception as error:  # rule 6; CancelledError (rule 5) is not caught
            answer = encode_response(self._listener.failure(error), close=not keep)
        self._task = None
        if self._closing:
            return
        transport.write(answer)
        if not keep:
            self._closing = True
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buffer:
            self._next()

    def _refuse(self, error: WireError) -> None:
        """Rule 4: a refusal is answered and the connection closed."""
        self._closing = True
        if self._transport is not None:
            answer = self._listener.refusal(error)
            self._transport.write(encode_response(answer, close=True))
            self._transport.close()


class WireListener(SocketListener):
    """The listening socket and its connections: `handler` answers each request, `refusal`
    each WireError (rule 1-3), `failure` whatever the handler raised or answered that cannot
    be sent (rule 6)."""

    def __init__(self, handler: Handler, refusal: Refusal, failure: Failure) -> None:
        self.handler = handler
        self.refusal = refusal
        self.failure = failure
        self.connections: set[_Connection] = set()

    def connection(self) -> asyncio.Protocol:
        return _Connection(self)

    async def close(self) -> None:
        """Stop listening and close every connection (their answers in progress are
        cancelled, rule 5)."""
        if self._server is not None:
            self._server.close()
        answers = [t for c in list(self.connections) if (t := c.close()) is not None]
        if answers:  # their cleanup (a lease taken is given back) runs before we return
            await asyncio.wait(answers, timeout=1.0)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
