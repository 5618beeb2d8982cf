"""The HTTP/2 server core (sidecar/envoy/h2_conn.py) and HPACK (header_block.py), no I/O.

The client side is written here from the RFC (frames) and by the `hpack` package's encoder
(header blocks as Envoy's nghttp2/oghttp2 would send them: Huffman strings, indexed fields),
so the server is checked against an independent implementation, not against itself.
"""

from __future__ import annotations

import struct

import hpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.envoy import h2_conn
from sidecar.envoy.h2_conn import (
    ACK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    GOAWAY,
    HEADERS,
    PING,
    RST_STREAM,
    SETTINGS,
    WINDOW_UPDATE,
    ConnectionEnded,
    DataReceived,
    H2Connection,
    RequestStarted,
    StreamReset,
    frame,
)
from sidecar.envoy.header_block import HeaderBlockError, HeaderDecoder, literal

REQUEST = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", "/envoy.service.auth.v3.Authorization/Check"),
    (":authority", "qos_sidecar"),
    ("content-type", "application/grpc"),
    ("te", "trailers"),
    ("grpc-timeout", "250m"),
]


def frames(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """(type, flags, stream id, payload) of each frame in `data`."""
    out, i = [], 0
    while i < len(data):
        length = int.from_bytes(data[i : i + 3], "big")
        kind, flags = data[i + 3], data[i + 4]
        stream_id = int.from_bytes(data[i + 5 : i + 9], "big") & 0x7FFFFFFF
        out.append((kind, flags, stream_id, bytes(data[i + 9 : i + 9 + length])))
        i += 9 + length
    assert i == len(data), "the outbox ends mid-frame"
    return out


def taken(conn: H2Connection) -> list[tuple[int, int, int, bytes]]:
    out = frames(bytes(conn.outbox))
    conn.outbox.clear()
    return out


def opened(client_settings: bytes = b"") -> tuple[H2Connection, hpack.Encoder]:
    conn = H2Connection()
    assert conn.receive(h2_conn.PREFACE + frame(SETTINGS, 0, 0, client_settings)) == []
    return conn, hpack.Encoder()


def test_the_server_speaks_first_and_acknowledges_the_clients_settings() -> None:
    conn, _ = opened()
    sent = taken(conn)
    kinds = [(k, f) for k, f, _, _ in sent]
    assert kinds == [(SETTINGS, 0), (WINDOW_UPDATE, 0), (SETTINGS, ACK)]
    settings_payload = dict(
        struct.unpack_from(">HI", sent[0][3], i) for i in range(0, len(sent[0][3]), 6)
    )
    assert settings_payload[4] == h2_conn.RECEIVE_WINDOW  # INITIAL_WINDOW_SIZE
    increment = int.from_bytes(sent[1][3], "big")
    assert increment == h2_conn.RECEIVE_WINDOW - h2_conn.DEFAULT_WINDOW


def test_a_request_arrives_as_headers_then_data_and_the_answer_goes_out_in_order() -> None:
    conn, encoder = opened()
    taken(conn)
    block = encoder.encode(REQUEST)
    events = conn.receive(
        frame(HEADERS, END_HEADERS, 1, block) + frame(DATA, END_STREAM, 1, b"\x00\x00\x00\x00\x01x")
    )
    assert isinstance(events[0], RequestStarted) and not events[0].ended
    assert dict(events[0].headers)[b":path"] == b"/envoy.service.auth.v3.Authorization/Check"
    assert events[1] == DataReceived(1, b"\x00\x00\x00\x00\x01x", True)
    conn.send_headers(1, b"\x88")
    conn.send_data(1, b"answer")
    conn.send_headers(1, literal(b"grpc-status", b"0"), end_stream=True)
    sent = taken(conn)
    assert [(k, f) for k, f, _, _ in sent] == [
        (HEADERS, END_HEADERS),
        (DATA, 0),
        (HEADERS, END_HEADERS | END_STREAM),
    ]
    assert HeaderDecoder().decode(sent[2][3]) == [(b"grpc-status", b"0")]
    assert conn.streams == {}  # both sides ended: no RST needed, nothing kept


def test_data_waits_for_window_and_trailers_never_overtake_it() -> None:
    # The client allows 10 octets per stream (SETTINGS_INITIAL_WINDOW_SIZE = 10).
    conn, encoder = opened(struct.pack(">HI", 4, 10))
    taken(conn)
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(REQUEST)))
    conn.send_headers(1, b"\x88")
    conn.send_data(1, b"x" * 25)
    conn.send_headers(1, literal(b"grpc-status", b"0"), end_stream=True)
    sent = taken(conn)
    assert [(k, len(p)) for k, _, _, p in sent] == [(HEADERS, 1), (DATA, 10)]
    conn.receive(frame(WINDOW_UPDATE, 0, 1, (8).to_bytes(4, "big")))
    assert [(k, len(p)) for k, _, _, p in taken(conn)] == [(DATA, 8)]
    conn.receive(frame(WINDOW_UPDATE, 0, 1, (100).to_bytes(4, "big")))
    rest = taken(conn)
    assert [(k, len(p)) for k, _, _, p in rest] == [(DATA, 7), (HEADERS, 15)]
    assert rest[1][1] & END_STREAM


def test_a_large_message_is_cut_to_the_peers_frame_size() -> None:
    conn, encoder = opened()
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(REQUEST)))
    taken(conn)
    conn.send_data(1, b"y" * 40_000, end_stream=True)
    sizes = [(k, len(p), f & END_STREAM) for k, f, _, p in taken(conn)]
    assert sizes == [(DATA, 16_384, 0), (DATA, 16_384, 0), (DATA, 7_232, END_STREAM)]


def test_a_reset_stream_is_reported_and_its_later_frames_ignored() -> None:
    conn, encoder = opened()
    conn.receive(frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST)))
    events = conn.receive(frame(RST_STREAM, 0, 1, (8).to_bytes(4, "big")))
    assert events == [StreamReset(1, 8)]
    assert conn.receive(frame(DATA, END_STREAM, 1, b"late")) == []
    taken(conn)
    conn.send_data(1, b"nobody reads this", end_stream=True)
    assert taken(conn) == []


def test_the_server_ending_first_resets_the_stream_with_no_error() -> None:
    conn, encoder = opened()
    conn.receive(frame(HEADERS, END_HEADERS, 3, encoder.encode(REQUEST)))
    taken(conn)
    conn.send_headers(3, b"\x88" + literal(b"grpc-status", b"16"), end_stream=True)
    sent = taken(conn)
    assert [(k, s) for k, _, s, _ in sent] == [(HEADERS, 3), (RST_STREAM, 3)]
    assert sent[1][3] == (0).to_bytes(4, "big")
    assert conn.receive(frame(DATA, 0, 3, b"more")) == []


def test_headers_may_continue_and_pings_are_answered() -> None:
    conn, encoder = opened()
    taken(conn)
    block = encoder.encode(REQUEST)
    events = conn.receive(
        frame(HEADERS, END_STREAM, 1, block[:5])
        + frame(CONTINUATION, 0, 1, block[5:9])
        + frame(CONTINUATION, END_HEADERS, 1, block[9:])
        + frame(PING, 0, 0, b"12345678")
    )
    assert events == [RequestStarted(1, [(k.encode(), v.encode()) for k, v in REQUEST], True)]
    assert taken(conn) == [(PING, ACK, 0, b"12345678")]


@pytest.mark.parametrize(
    "data, why",
    [
        (b"GET / HTTP/1.1\r\n\r\n" + b"x" * 10, "not an HTTP/2 preface"),
        (h2_conn.PREFACE + frame(DATA, 0, 0, b"x"), "DATA on stream 0"),
        (h2_conn.PREFACE + frame(HEADERS, END_HEADERS, 2, b"\x88"), "even stream id 2"),
        (h2_conn.PREFACE + frame(HEADERS, 0, 1, b"\x82") + frame(PING, 0, 0, b"1" * 8), "header"),
        (h2_conn.PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xff\xff"), "integer"),
        (h2_conn.PREFACE + frame(HEADERS, END_HEADERS, 1, b"\xbf"), "no table entry"),
        (h2_conn.PREFACE + frame(DATA, 0, 1, b"x" * 16_385), "frame of 16385 octets"),
    ],
)
def test_a_protocol_violation_ends_the_connection_with_goaway(data: bytes, why: str) -> None:
    conn = H2Connection()
    conn.outbox.clear()
    events = conn.receive(data)
    assert isinstance(events[-1], ConnectionEnded) and why in events[-1].why
    assert taken(conn)[-1][0] == GOAWAY
    assert conn.receive(frame(PING, 0, 0, b"12345678")) == []  # closed: nothing more


def test_streams_over_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(h2_conn, "MAX_STREAMS", 2)
    conn, encoder = opened()
    taken(conn)
    block = encoder.encode(REQUEST)
    events = conn.receive(b"".join(frame(HEADERS, END_HEADERS, i, block) for i in (1, 3, 5)))
    assert [e.stream_id for e in events if isinstance(e, RequestStarted)] == [1, 3]
    assert taken(conn) == [(RST_STREAM, 0, 5, h2_conn.REFUSED_STREAM.to_bytes(4, "big"))]


_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=12)
_value = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
_field = st.one_of(st.sampled_from(REQUEST), st.tuples(_name, _value))


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(_field, max_size=12), min_size=1, max_size=8), st.booleans())
def test_decoding_matches_the_hpack_package_over_a_connection(
    blocks: list[list[tuple[str, str]]], huffman: bool
) -> None:
    """Blocks decoded in order share one dynamic table (header_block.py rule 1), with Huffman
    strings or raw, and the table evicting at its 4,096 octets."""
    encoder, reference, ours = hpack.Encoder(), hpack.Decoder(), HeaderDecoder()
    for fields in blocks:
        block = encoder.encode(fields, huffman=huffman)
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        assert ours.decode(block) == expected
        assert ours.size == reference.header_table._current_size


def test_a_table_size_update_above_the_advertised_size_is_refused() -> None:
    with pytest.raises(HeaderBlockError, match="table size 8192"):
        HeaderDecoder().decode(b"\x3f\xe1\x3f")  # size update to 8192


def test_literal_encoding_round_trips_long_values() -> None:
    value = b"v" * 300  # a length past the 7-bit prefix
    assert HeaderDecoder().decode(literal(b"grpc-message", value)) == [(b"grpc-message", value)]


def test_after_goaway_open_streams_finish_and_new_ones_are_ignored() -> None:
    conn, encoder = opened()
    conn.receive(frame(HEADERS, END_HEADERS, 1, encoder.encode(REQUEST)))
    taken(conn)
    assert conn.receive(frame(GOAWAY, 0, 0, struct.pack(">II", 1, 0))) == []
    assert conn.going_away and not conn.closed
    block = encoder.encode(REQUEST)
    events = conn.receive(frame(HEADERS, END_HEADERS, 3, block) + frame(DATA, END_STREAM, 1, b"x"))
    assert events == [DataReceived(1, b"x", True)]
    conn.send_data(1, b"answer", end_stream=True)
    assert [(k, s) for k, _, s, _ in taken(conn)] == [(DATA, 1)]
    conn.goaway()  # ours after theirs: nothing more to say
    assert taken(conn) == []


def test_a_payload_sent_across_window_updates_arrives_whole_and_in_order() -> None:
    conn, encoder = opened(struct.pack(">HI", 4, 10_000))
    conn.receive(frame(HEADERS, END_HEADERS | END_STREAM, 1, encoder.encode(REQUEST)))
    taken(conn)
    payload = bytes(range(256)) * 160  # 40,960 octets
    conn.send_data(1, payload, end_stream=True)
    received = [taken(conn)]
    for _ in range(4):
        conn.receive(frame(WINDOW_UPDATE, 0, 1, (10_000).to_bytes(4, "big")))
        received.append(taken(conn))
    data = [f for batch in received for f in batch if f[0] == DATA]
    assert all(len(p) <= 10_000 for _, _, _, p in data)
    assert b"".join(p for _, _, _, p in data) == payload
    assert [f & END_STREAM for _, f, _, _ in data][-1] and conn.streams == {}
