"""The server side of one HTTP/2 connection (RFC 9113), for Envoy's gRPC calls, without I/O.

Why our own: grpc.aio's machinery costs about 0.16 ms of CPU per call on the benchmark host
before any work is done (its no-op server, `python -m benchmarks.overhead`, configuration E0),
and its threads slow the sidecar's own Python beside them; the calls Envoy makes are a narrow
dialect of HTTP/2 (h2c, prior knowledge, no push, no compression, small messages).

`H2Connection.receive(data)` returns what happened (`Event`s); the send methods append the
bytes to write to `outbox`, which the caller writes and empties (or takes, leaving a new one
in its place). Rules:
1. The client opens with the 24-octet preface and a SETTINGS frame; the server's SETTINGS
   go first in the outbox. Anything else first is a PROTOCOL_ERROR.
2. Flow control, receiving: the server advertises large windows (RECEIVE_WINDOW on the
   connection and on each stream) and tops each up once half is used, so a peer never waits
   on us for window; what it sends is bounded by the caller (message size limit, stream
   count). Sending: every DATA frame fits the peer's connection and stream windows and its
   MAX_FRAME_SIZE; what does not fit waits, in order, behind earlier frames of its stream
   (trailers included) until a WINDOW_UPDATE or SETTINGS makes room.
3. Streams: a HEADERS frame on a new odd id above every earlier one opens a stream
   (`RequestStarted`); HEADERS after it are trailers (the request's end). Header blocks are
   decoded in order, CONTINUATION frames included (header_block.py rule 1). More than
   MAX_STREAMS open at once: the new one is refused (RST_STREAM REFUSED_STREAM).
4. A stream ends when both sides have ended it, or at RST_STREAM from either. When the server
   ends its side first, it resets the stream with NO_ERROR so the client stops sending
   (RFC 9113 8.1). Frames for a stream that is gone are ignored (their DATA still counts
   against the connection's window).
5. PING is answered, PRIORITY and unknown frame types ignored. GOAWAY, from the client or
   from `goaway()`, lets the streams open finish and opens no new ones (`going_away`; the
   caller closes the connection once its streams are done). A frame that breaks the protocol
   (bad size, wrong stream id, a header block that does not decode) is a connection error:
   the server sends GOAWAY with the error code and `receive` returns `ConnectionEnded`.
"""

from __future__ import annotations

import collections
import struct
from dataclasses import dataclass, field

from sidecar.envoy.header_block import HeaderBlockError, HeaderDecoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE = range(9)
CONTINUATION = 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# Error codes (RFC 9113 7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR = 0, 1, 2, 3
FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = 6, 7, 8, 9
# Settings identifiers.
_HEADER_TABLE_SIZE, _MAX_CONCURRENT_STREAMS, _INITIAL_WINDOW_SIZE, _MAX_FRAME_SIZE = 1, 3, 4, 5

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
RECEIVE_WINDOW = 2**30  # rule 2
MAX_FRAME = 16_384  # what we accept: the default, so the peer needs no setting to know it
MAX_STREAMS = 4096  # rule 3
_HEADER = struct.Struct(">I B I")  # 3-octet length in a 4-octet int (shifted), type, flags, id


@dataclass(slots=True)
class RequestStarted:
    stream_id: int
    headers: list[tuple[bytes, bytes]]
    ended: bool  # END_STREAM on the HEADERS: no body


@dataclass(slots=True)
class DataReceived:
    stream_id: int
    data: bytes
    ended: bool


@dataclass(slots=True)
class StreamReset:
    stream_id: int
    error_code: int


@dataclass(slots=True)
class ConnectionEnded:
    error_code: int
    why: str


Event = RequestStarted | DataReceived | StreamReset | ConnectionEnded


class _ProtocolViolation(Exception):  # a connection error; never leaves this module
    def __init__(self, code: int, why: str) -> None:
        super().__init__(why)
        self.code = code


@dataclass(slots=True)
class _Stream:
    send_window: int
    receive_window: int = RECEIVE_WINDOW
    remote_ended: bool = False
    local_ended: bool = False
    sent: int = 0  # octets of the first waiting DATA payload already sent
    # Frames waiting for window (rule 2): (frame type, payload, end_stream).
    waiting: collections.deque[tuple[int, bytes, bool]] = field(default_factory=collections.deque)


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _HEADER.pack((len(payload) << 8) | kind, flags, stream_id) + payload


class H2Connection:
    """One server connection's protocol state (the module rules)."""

    def __init__(self) -> None:
        self.outbox = bytearray()
        self.streams: dict[int, _Stream] = {}
        self.decoder = HeaderDecoder()
        self.closed = False  # a connection error: nothing more is read or sent
        self.going_away = False  # GOAWAY either way: streams open go on, no new ones
        self._buffer = bytearray()
        self._preface_seen = False
        self._last_stream = 0
        self._peer_window = DEFAULT_WINDOW  # the peer's initial stream window
        self._peer_frame = MAX_FRAME
        self._send_window = DEFAULT_WINDOW  # connection
        self._receive_window = DEFAULT_WINDOW  # connection, until our update below
        self._partial: tuple[int, bytearray, bool] | None = None  # CONTINUATION pending
        settings = struct.pack(
            ">HIHIHI",
            _MAX_CONCURRENT_STREAMS, MAX_STREAMS,
            _INITIAL_WINDOW_SIZE, RECEIVE_WINDOW,
            _MAX_FRAME_SIZE, MAX_FRAME,
        )  # fmt: skip
        self.outbox += frame(SETTINGS, 0, 0, settings)
        self._top_up_connection()

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, data: bytes) -> list[Event]:
        if self.closed:
            return []
        self._buffer += data
        events: list[Event] = []
        try:
            if not self._preface_seen:
                if len(self._buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(self._buffer)):
                        raise _ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 preface")
                    return events
                if self._buffer[: len(PREFACE)] != PREFACE:
                    raise _ProtocolViolation(PROTOCOL_ERROR, "not an HTTP/2 preface")
                del self._buffer[: len(PREFACE)]
                self._preface_seen = True
            self._frames(events)
        except _ProtocolViolation as exc:
            events.append(self._fail(exc.code, str(exc)))
        return events

    def _frames(self, events: list[Event]) -> None:
        buffer = self._buffer
        offset = 0
        with memoryview(buffer) as view:  # a payload copied once, not sliced and copied
            while len(buffer) - offset >= 9:
                word, flags, stream_id = _HEADER.unpack_from(buffer, offset)
                length, kind = word >> 8, word & 0xFF
                stream_id &= MAX_WINDOW
                if length > MAX_FRAME:
                    raise _ProtocolViolation(FRAME_SIZE_ERROR, f"frame of {length} octets")
                if len(buffer) - offset - 9 < length:
                    break
                payload = bytes(view[offset + 9 : offset + 9 + length])
                offset += 9 + length
                self._frame(kind, flags, stream_id, payload, events)
                if self.closed:
                    break
        del buffer[:offset]

    def _frame(
        self, kind: int, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._partial is not None and kind != CONTINUATION:
            raise _ProtocolViolation(PROTOCOL_ERROR, "header block interrupted")
        if kind == DATA:
            self._on_data(flags, stream_id, payload, events)
        elif kind == HEADERS:
            self._on_headers(flags, stream_id, payload, events)
        elif kind == CONTINUATION:
            self._on_continuation(flags, stream_id, payload, events)
        elif kind == RST_STREAM:
            if stream_id == 0 or len(payload) != 4:
                raise _ProtocolViolation(PROTOCOL_ERROR, "bad RST_STREAM")
            if self.streams.pop(stream_id, None) is not None:
                events.append(StreamReset(stream_id, int.from_bytes(payload, "big")))
        elif kind == SETTINGS:
            self._on_settings(flags, stream_id, payload)
        elif kind == PING:
            if stream_id != 0 or len(payload) != 8:
                raise _ProtocolViolation(FRAME_SIZE_ERROR, "bad PING")
            if not flags & ACK:
                self.outbox += frame(PING, ACK, 0, payload)
        elif kind == GOAWAY:
            self.going_away = True  # the client opens no more streams; those open go on
        elif kind == WINDOW_UPDATE:
            self._on_window_update(stream_id, payload)
        elif kind == PUSH_PROMISE:
            raise _ProtocolViolation(PROTOCOL_ERROR, "a client may not push")
        elif kind == PRIORITY and len(payload) != 5:
            raise _ProtocolViolation(FRAME_SIZE_ERROR, "bad PRIORITY")

    def _on_data(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise _ProtocolViolation(PROTOCOL_ERROR, "DATA on stream 0")
        self._receive_window -= len(payload)
        if self._receive_window < 0:
            raise _ProtocolViolation(FLOW_CONTROL_ERROR, "the client overran the window")
        if self._receive_window < RECEIVE_WINDOW // 2:
            self._top_up_connection()
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_ended:
            return  # rule 4 (a stream already ended by the client is gone for our purposes)
        stream.receive_window -= len(payload)
        if stream.receive_window < RECEIVE_WINDOW // 2:
            self.outbox += frame(
                WINDOW_UPDATE, 0, stream_id, (RECEIVE_WINDOW - stream.receive_window).to_bytes(4)
            )
            stream.receive_window = RECEIVE_WINDOW
        data = _unpadded(flags, payload)
        ended = bool(flags & END_STREAM)
        if ended:
            self._remote_end(stream_id, stream)
        events.append(DataReceived(stream_id, data, ended))

    def _top_up_connection(self) -> None:
        self.outbox += frame(
            WINDOW_UPDATE, 0, 0, (RECEIVE_WINDOW - self._receive_window).to_bytes(4)
        )
        self._receive_window = RECEIVE_WINDOW

    def _on_headers(self, flags: int, stream_id: int, payload: bytes, events: list[Event]) -> None:
        if stream_id == 0:
            raise _ProtocolViolation(PROTOCOL_ERROR, "HEADERS on stream 0")
        block = _unpadded(flags, payload)
        if flags & PRIORITY_FLAG:
            block = block[5:]
        if flags & END_HEADERS:
            self._headers_done(stream_id, block, bool(flags & END_STREAM), events)
        else:
            self._partial = (stream_id, bytearray(block), bool(flags & END_STREAM))

    def _on_continuation(
        self, flags: int, stream_id: int, payload: bytes, events: list[Event]
    ) -> None:
        if self._partial is None or self._partial[0] != stream_id:
            raise _ProtocolViolation(PROTOCOL_ERROR, "CONTINUATION out of place")
        self._partial[1].extend(payload)
        if flags & END_HEADERS:
            _, block, ended = self._partial
            self._partial = None
            self._headers_done(stream_id, bytes(block), ended, events)

    def _headers_done(self, stream_id: int, block: bytes, ended: bool, events: list[Event]) -> None:
        try:
            headers = self.decoder.decode(block)  # always: header_block.py rule 1
        except HeaderBlockError as exc:
            raise _ProtocolViolation(COMPRESSION_ERROR, str(exc)) from exc
        stream = self.streams.get(stream_id)
        if stream is not None:  # trailers: the request's end
            if not ended:
                raise _ProtocolViolation(PROTOCOL_ERROR, "trailers without END_STREAM")
            self._remote_end(stream_id, stream)
            events.append(DataReceived(stream_id, b"", True))
            return
        if stream_id <= self._last_stream or self.going_away:
            return  # rule 4: a stream that is gone, or one opened after GOAWAY
        if stream_id % 2 == 0:
            raise _ProtocolViolation(PROTOCOL_ERROR, f"even stream id {stream_id}")
        self._last_stream = stream_id
        if len(self.streams) >= MAX_STREAMS:
            self.outbox += frame(RST_STREAM, 0, stream_id, REFUSED_STREAM.to_bytes(4))
            return
        stream = _Stream(send_window=self._peer_window)
        self.streams[stream_id] = stream
        if ended:
            stream.remote_ended = True
        events.append(RequestStarted(stream_id, headers, ended))

    def _on_settings(self, flags: int, stream_id: int, payload: bytes) -> None:
        if stream_id != 0 or len(payload) % 6 or (flags & ACK and payload):
            raise _ProtocolViolation(FRAME_SIZE_ERROR, "bad SETTINGS")
        if flags & ACK:
            return
        for offset in range(0, len(payload), 6):
            key, value = struct.unpack_from(">HI", payload, offset)
            if key == _INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ProtocolViolation(FLOW_CONTROL_ERROR, "initial window too large")
                delta, self._peer_window = value - self._peer_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == _MAX_FRAME_SIZE:
                if not MAX_FRAME <= value <= 2**24 - 1:
                    raise _ProtocolViolation(PROTOCOL_ERROR, "bad MAX_FRAME_SIZE")
                self._peer_frame = value
        self.outbox += frame(SETTINGS, ACK, 0)
        self._flush_all()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise _ProtocolViolation(FRAME_SIZE_ERROR, "bad WINDOW_UPDATE")
        increment = int.from_bytes(payload, "big") & MAX_WINDOW
        if stream_id == 0:
            if increment == 0 or self._send_window + increment > MAX_WINDOW:
                raise _ProtocolViolation(FLOW_CONTROL_ERROR, "bad connection window update")
            self._send_window += increment
            self._flush_all()
            return
        stream = self.streams.get(stream_id)
        if stream is not None:
            stream.send_window += increment
            self._flush(stream_id, stream)

    def _remote_end(self, stream_id: int, stream: _Stream) -> None:
        stream.remote_ended = True
        if stream.local_ended and not stream.waiting:
            del self.streams[stream_id]

    def _fail(self, code: int, why: str) -> ConnectionEnded:
        self.closed = True
        self.outbox += frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, code))
        return ConnectionEnded(code, why)

    # -- sending ------------------------------------------------------------------------------

    def send_headers(self, stream_id: int, block: bytes, *, end_stream: bool = False) -> None:
        """A header block (at most one frame: ours are small) after what the stream queued."""
        self._queue(stream_id, HEADERS, block, end_stream)

    def send_data(self, stream_id: int, data: bytes, *, end_stream: bool = False) -> None:
        self._queue(stream_id, DATA, data, end_stream)

    def reset(self, stream_id: int, code: int = CANCEL) -> None:
        if self.streams.pop(stream_id, None) is not None and not self.closed:
            self.outbox += frame(RST_STREAM, 0, stream_id, code.to_bytes(4))

    def goaway(self) -> None:
        """No new streams (their HEADERS are ignored); those open go on."""
        if not self.closed and not self.going_away:
            self.going_away = True
            self.outbox += frame(GOAWAY, 0, 0, struct.pack(">II", self._last_stream, NO_ERROR))

    def _queue(self, stream_id: int, kind: int, payload: bytes, end_stream: bool) -> None:
        stream = self.streams.get(stream_id)
        if stream is None or stream.local_ended or self.closed:
            return  # reset meanwhile: nobody reads it
        stream.waiting.append((kind, payload, end_stream))
        if end_stream:
            stream.local_ended = True
        self._flush(stream_id, stream)

    def _flush_all(self) -> None:
        for stream_id, stream in list(self.streams.items()):
            if stream.waiting:
                self._flush(stream_id, stream)

    def _flush(self, stream_id: int, stream: _Stream) -> None:
        """Rule 2: frames out in order, DATA as far as both windows allow. A large payload is
        sent from a view, a frame at a time, never re-sliced (that copied it once per frame)."""
        waiting, out = stream.waiting, self.outbox
        while waiting:
            kind, payload, end_stream = waiting[0]
            if kind != DATA:
                flags = END_HEADERS | (END_STREAM if end_stream else 0)
                out += frame(kind, flags, stream_id, payload)
                waiting.popleft()
                continue
            view, sent = memoryview(payload), stream.sent
            while True:
                size = min(self._send_window, stream.send_window, self._peer_frame)
                size = min(size, len(view) - sent)
                last = sent + size == len(view)
                if size <= 0 and not last:
                    stream.sent = sent
                    return
                self._send_window -= size
                stream.send_window -= size
                flags = END_STREAM if end_stream and last else 0
                out += _HEADER.pack((size << 8) | DATA, flags, stream_id)
                out += view[sent : sent + size]
                sent += size
                if last:
                    break
            stream.sent = 0
            waiting.popleft()
        if stream.local_ended:
            if not stream.remote_ended:  # rule 4
                self.outbox += frame(RST_STREAM, 0, stream_id, NO_ERROR.to_bytes(4))
            self.streams.pop(stream_id, None)


def _unpadded(flags: int, payload: bytes) -> bytes:
    if not flags & PADDED:
        return payload
    if not payload or payload[0] >= len(payload):
        raise _ProtocolViolation(PROTOCOL_ERROR, "bad padding")
    return payload[1 : len(payload) - payload[0]]
