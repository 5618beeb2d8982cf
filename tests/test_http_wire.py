"""The ext_authz HTTP listener's wire (sidecar/envoy/http_wire.py): what it reads, what it
refuses, and how a connection behaves, on real sockets under asyncio and uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import uvloop
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.envoy.http_wire import (
    MAX_FIELDS,
    MAX_HEAD_BYTES,
    WireError,
    WireListener,
    WireRequest,
    WireResponse,
    encode_response,
    parse_head,
)


def test_a_request_reads_as_sent_with_names_in_lower_case_and_repeats_kept() -> None:
    request = parse_head(
        b"POST /authz/v2/models/m/infer?x=1 HTTP/1.1\r\nX-Api-Key:  k1 \r\n"
        b"x-b: one\r\nX-B: two\r\ncontent-length: 12\r\nx-empty:\r\nx-tab: a\tb"
    )
    assert request.method == "POST"
    assert request.target == "/authz/v2/models/m/infer?x=1"
    assert request.headers == (
        ("x-api-key", "k1"),
        ("x-b", "one"),
        ("x-b", "two"),
        ("content-length", "12"),
        ("x-empty", ""),
        ("x-tab", "a\tb"),
    )
    assert request.content_length == 12
    assert request.keep_alive


@pytest.mark.parametrize(
    ("head", "keep_alive"),
    [
        (b"GET / HTTP/1.1", True),
        (b"GET / HTTP/1.1\r\nConnection: close", False),
        (b"GET / HTTP/1.1\r\nconnection: Keep-Alive, Close", False),
        (b"GET / HTTP/1.0", False),
        (b"GET / HTTP/1.0\r\nConnection: keep-alive", True),
        # Tokens are read as ASCII: the Kelvin sign lower-cases to "k" in Python, not in HTTP.
        (b"GET / HTTP/1.0\r\nConnection: \xe2\x84\xaaeep-alive", False),
        (b"GET / HTTP/1.1\r\nConnection: \xe2\x80\xa8close", True),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_header(
    head: bytes, keep_alive: bool
) -> None:
    assert parse_head(head).keep_alive is keep_alive


def test_a_value_that_is_not_utf8_reaches_the_adapter_as_surrogate_escapes() -> None:
    request = parse_head(b"GET / HTTP/1.1\r\nx-api-key: \xff\xfe")
    assert request.headers == (("x-api-key", "\udcff\udcfe"),)
    assert not request.utf8  # the adapter looks for the header (authz_http.not_text)
    assert parse_head(b"GET / HTTP/1.1\r\nx-api-key: caf\xc3\xa9").utf8


@pytest.mark.parametrize(
    ("head", "detail"),
    [
        (b"GET /\r\n", "request line"),
        (b"GET / HTTP/2.0", "request line"),
        (b"GET /caf\xc3\xa9 HTTP/1.1", "request line"),
        (b"G(T / HTTP/1.1", "request line"),
        (b"GET  / HTTP/1.1", "request line"),
        (b"GET / HTTP/1.1\r\nx-a : b", "malformed header line"),
        (b"GET / HTTP/1.1\r\nx-a: b\r\n folded", "malformed header line"),
        (b"GET / HTTP/1.1\r\nx-a: b\x00c", "malformed header line"),
        (b"GET / HTTP/1.1\r\nx-a: b\nc", "malformed header line"),
        (b"GET / HTTP/1.1\r\nx-a\nx-b: c", "malformed header line"),
        (b"GET / HTTP/1.1\r\nx a: c", "malformed header line"),
        (b"GET / HTTP/1.1\r\nno colon", "malformed header line"),
        (b"GET / HTTP/1.1\r\n: empty name", "malformed header line"),
        (b"POST / HTTP/1.1\r\ntransfer-encoding: chunked", "transfer-encoding"),
        (b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2", "conflicting"),
        (b"POST / HTTP/1.1\r\ncontent-length: -1", "not a number"),
        (b"POST / HTTP/1.1\r\ncontent-length: 1e3", "not a number"),
        (b"GET / HTTP/1.1" + b"\r\nx: y" * (MAX_FIELDS + 1), "header lines"),
        (b"GET / HTTP/1.1\r\nx: " + b"y" * MAX_HEAD_BYTES, "header section over"),
    ],
)
def test_what_envoy_never_sends_is_refused_with_a_reason(head: bytes, detail: str) -> None:
    with pytest.raises(WireError, match=detail):
        parse_head(head)


def test_the_same_length_twice_is_one_length() -> None:
    head = b"POST / HTTP/1.1\r\ncontent-length: 3\r\nContent-Length: 3"
    assert parse_head(head).content_length == 3


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_wire_error_and_nothing_else(head: bytes) -> None:
    try:
        request = parse_head(b"GET / HTTP/1.1\r\n" + head)
    except WireError:
        return
    for name, value in request.headers:
        assert name == name.lower() and "\r" not in value and "\n" not in value


def test_answers_carry_their_length_and_no_crlf_in_a_header_is_ever_sent() -> None:
    assert encode_response(WireResponse(200, (("x-a", "b"),), b"{}"), close=False) == (
        b"HTTP/1.1 200 OK\r\nx-a: b\r\ncontent-length: 2\r\n\r\n{}"
    )
    assert encode_response(WireResponse(204), close=True) == (
        b"HTTP/1.1 204 No Content\r\nconnection: close\r\n\r\n"
    )
    assert encode_response(WireResponse(430), close=False).startswith(b"HTTP/1.1 430 Unknown\r\n")
    for headers in ((("x-a", "b\r\nx-injected: 1"),), (("x-a\n", "b"),)):
        with pytest.raises(ValueError, match="CR or LF"):
            encode_response(WireResponse(200, headers), close=False)
    with pytest.raises(ValueError, match="no body"):
        encode_response(WireResponse(204, (), b"x"), close=False)


# --- a listener on a real socket -------------------------------------------------------------

Body = Callable[[asyncio.StreamReader, asyncio.StreamWriter, list[str]], Awaitable[None]]


async def _serve(handler_gate: asyncio.Event | None, body: Body) -> list[str]:
    """A listener whose handler answers 200 with the target (after `handler_gate`, when
    given) or raises for `/boom`; `events` records what the handler saw."""
    events: list[str] = []

    async def handler(request: WireRequest, transport: asyncio.Transport) -> WireResponse:
        events.append(f"start {request.target}")
        if request.target == "/boom":
            raise RuntimeError("a bug")
        try:
            if handler_gate is not None:
                await handler_gate.wait()
        except asyncio.CancelledError:
            events.append(f"cancelled {request.target}")
            raise
        return WireResponse(200, (("x-target", request.target),))

    listener = WireListener(
        handler,
        lambda error: WireResponse(400, (), error.detail.encode()),
        lambda error: WireResponse(500, (), repr(error).encode()),
    )
    await listener.start_tcp("127.0.0.1", 0, reuse_port=False)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        try:
            await body(reader, writer, events)
        finally:
            writer.close()
    finally:
        await listener.close()
    return events


async def _answer(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    status, *lines = head[:-4].split(b"\r\n")
    headers = dict(line.split(b": ", 1) for line in lines)
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return status, headers, body


LOOPS = {"asyncio": asyncio.run, "uvloop": uvloop.run}


@pytest.mark.parametrize("loop", list(LOOPS))
def test_pipelined_requests_are_answered_in_order_and_bodies_skipped(loop: str) -> None:
    async def body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[str]
    ) -> None:
        # Two requests in one write, the first with a body split over three writes (a body
        # left in the buffer would read as a malformed request line).
        writer.write(b'POST /a HTTP/1.1\r\ncontent-length: 12\r\n\r\n{"k":')
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b' "v')
        await writer.drain()
        await asyncio.sleep(0.02)
        writer.write(b'"}\r\nGET /b HTTP/1.1\r\n\r\nGET /c HTTP/1.1\r\nconnection: close\r\n\r\n')
        await writer.drain()
        targets = []
        for _ in range(3):
            status, headers, _ = await _answer(reader)
            assert status == b"HTTP/1.1 200 OK"
            targets.append(headers[b"x-target"])
        assert targets == [b"/a", b"/b", b"/c"]
        assert headers[b"connection"] == b"close"
        assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after /c

    assert LOOPS[loop](_serve(None, body)) == ["start /a", "start /b", "start /c"]


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_refusal_is_answered_and_closes_the_connection(loop: str) -> None:
    async def body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[str]
    ) -> None:
        writer.write(b"GET /a HTTP/1.1\r\nbad header: x\r\n\r\nGET /b HTTP/1.1\r\n\r\n")
        await writer.drain()
        status, headers, text = await _answer(reader)
        assert (status, text) == (b"HTTP/1.1 400 Bad Request", b"malformed header line")
        assert headers[b"connection"] == b"close"
        assert await asyncio.wait_for(reader.read(), 5) == b""

    assert LOOPS[loop](_serve(None, body)) == []  # the handler never saw either request


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_header_section_that_never_ends_is_refused_at_the_limit(loop: str) -> None:
    async def body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[str]
    ) -> None:
        writer.write(b"GET /a HTTP/1.1\r\nx: " + b"y" * (MAX_HEAD_BYTES + 10))
        await writer.drain()
        _, _, text = await _answer(reader)
        assert b"header section over" in text

    assert LOOPS[loop](_serve(None, body)) == []


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_handler_that_raises_is_answered_by_failure_and_the_connection_lives(
    loop: str,
) -> None:
    async def body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[str]
    ) -> None:
        writer.write(b"GET /boom HTTP/1.1\r\n\r\nGET /after HTTP/1.1\r\n\r\n")
        await writer.drain()
        status, _, text = await _answer(reader)
        assert status == b"HTTP/1.1 500 Internal Server Error" and b"a bug" in text
        status, headers, _ = await _answer(reader)
        assert status == b"HTTP/1.1 200 OK" and headers[b"x-target"] == b"/after"

    assert LOOPS[loop](_serve(None, body)) == ["start /boom", "start /after"]


@pytest.mark.parametrize("loop", list(LOOPS))
def test_a_peer_that_hangs_up_cancels_the_answer_in_progress(loop: str) -> None:
    async def body(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter, events: list[str]
    ) -> None:
        writer.write(b"GET /held HTTP/1.1\r\n\r\n")
        await writer.drain()
        for _ in range(100):
            if events:
                break
            await asyncio.sleep(0.01)
        writer.close()
        for _ in range(100):
            if len(events) == 2:
                break
            await asyncio.sleep(0.01)
        # Cancelled by the hang-up, while the listener still runs.
        assert events == ["start /held", "cancelled /held"]

    LOOPS[loop](_serve(asyncio.Event(), body))


@pytest.mark.parametrize("loop", list(LOOPS))
def test_closing_the_listener_closes_its_idle_connections(loop: str) -> None:
    async def main() -> bytes:
        listener = WireListener(
            lambda request, transport: asyncio.sleep(0, WireResponse(200)),
            lambda error: WireResponse(400),
            lambda error: WireResponse(500),
        )
        await listener.start_tcp("127.0.0.1", 0, reuse_port=False)
        reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET /a HTTP/1.1\r\n\r\n")
        status, _, _ = await _answer(reader)
        assert status == b"HTTP/1.1 200 OK"
        await listener.close()
        rest = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return rest

    assert LOOPS[loop](main()) == b""


@pytest.mark.parametrize("loop", list(LOOPS))
def test_closing_the_listener_cancels_an_answer_in_progress_before_it_returns(
    loop: str,
) -> None:
    async def main() -> list[str]:
        events: list[str] = []
        started = asyncio.Event()

        async def held(request: WireRequest, transport: asyncio.Transport) -> WireResponse:
            started.set()
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                await asyncio.sleep(0.05)  # cleanup that waits, as giving back a lease does
                events.append("cleaned up")
                raise
            return WireResponse(200)

        listener = WireListener(held, lambda e: WireResponse(400), lambda e: WireResponse(500))
        await listener.start_tcp("127.0.0.1", 0, reuse_port=False)
        _, writer = await asyncio.open_connection("127.0.0.1", listener.port)
        writer.write(b"GET /held HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(started.wait(), 5)
        await listener.close()
        seen = list(events)  # what had happened when close returned
        writer.close()
        return seen

    assert LOOPS[loop](main()) == ["cleaned up"]
