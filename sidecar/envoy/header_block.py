"""HPACK (RFC 7541) for the sidecar's own gRPC listener: Envoy's header blocks in, ours out.

Why not the `hpack` package's Decoder: it costs about 25 µs of CPU for a ten-field block that
is all table references, which is every block after a connection's first; this one costs a
few µs. The package still decodes Huffman strings (`decode_huffman`) and lends its static
table, so neither is written out again here.

Rules (no I/O):
1. One `HeaderDecoder` per connection, fed every header block of that connection in the order
   received, a refused stream's included: the peer's encoder assumes the dynamic table they
   build together (RFC 7541 2.3.2).
2. The dynamic table holds at most `max_size` octets, what this side advertised as
   SETTINGS_HEADER_TABLE_SIZE (4,096, the default). A size update above it, an index that
   names no entry, a truncated integer or string, or a Huffman string that does not decode is
   a `HeaderBlockError`: a connection error (COMPRESSION_ERROR), since the table can no
   longer be trusted.
3. Encoding never touches the peer's table: every field is a literal without indexing, name
   and value raw (no Huffman). The sidecar's blocks are a few fixed fields, built once.
"""

from __future__ import annotations

import collections

from hpack.huffman_table import decode_huffman
from hpack.table import HeaderTable

from sidecar.errors import SidecarError

_STATIC: tuple[tuple[bytes, bytes], ...] = tuple(HeaderTable.STATIC_TABLE)
_ENTRY_OVERHEAD = 32  # octets added to name + value (RFC 7541 4.1)
DEFAULT_TABLE_SIZE = 4096
STATUS_200 = b"\x88"  # ":status: 200", static entry 8


class HeaderBlockError(SidecarError):
    """A header block that cannot be decoded (rule 2)."""


def _integer(data: bytes, i: int, prefix_bits: int) -> tuple[int, int]:
    """The integer at `data[i]` with an N-bit prefix (RFC 7541 5.1), and the index after it."""
    mask = (1 << prefix_bits) - 1
    value = data[i] & mask
    i += 1
    if value < mask:
        return value, i
    shift = 0
    while i < len(data):
        byte = data[i]
        i += 1
        value += (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 28:
            break
    raise HeaderBlockError("header block: integer truncated or too large")


def _string(data: bytes, i: int) -> tuple[bytes, int]:
    if i >= len(data):
        raise HeaderBlockError("header block: string missing")
    huffman = data[i] & 0x80
    length, i = _integer(data, i, 7)
    end = i + length
    if end > len(data):
        raise HeaderBlockError("header block: string truncated")
    raw = data[i:end]
    if not huffman:
        return raw, end
    try:
        return bytes(decode_huffman(raw)), end
    except Exception as exc:  # hpack's HPACKDecodingError and friends
        raise HeaderBlockError(f"header block: bad Huffman string ({exc})") from exc


class HeaderDecoder:
    """Decodes one connection's header blocks (rules 1, 2)."""

    def __init__(self, max_size: int = DEFAULT_TABLE_SIZE) -> None:
        self.max_size = max_size
        self.limit = max_size  # the encoder may lower it with a size update
        self.size = 0
        self.table: collections.deque[tuple[bytes, bytes]] = collections.deque()  # newest first

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        """The block's fields, in order, names and values as bytes."""
        fields: list[tuple[bytes, bytes]] = []
        i, end = 0, len(block)
        while i < end:
            byte = block[i]
            if byte & 0x80:  # indexed field
                index, i = _integer(block, i, 7)
                fields.append(self._entry(index))
            elif byte & 0x40:  # literal, added to the table
                name, value, i = self._literal(block, i, 6)
                fields.append((name, value))
                self._add(name, value)
            elif byte & 0x20:  # table size update
                size, i = _integer(block, i, 5)
                if size > self.max_size:
                    raise HeaderBlockError(f"header block: table size {size} > {self.max_size}")
                self.limit = size
                self._evict(0)
            else:  # literal not indexed (0000xxxx) or never indexed (0001xxxx)
                name, value, i = self._literal(block, i, 4)
                fields.append((name, value))
        return fields

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        dynamic = index - len(_STATIC) - 1
        if index == 0 or dynamic >= len(self.table):
            raise HeaderBlockError(f"header block: no table entry {index}")
        return self.table[dynamic]

    def _literal(self, block: bytes, i: int, prefix_bits: int) -> tuple[bytes, bytes, int]:
        index, i = _integer(block, i, prefix_bits)
        if index:
            name = self._entry(index)[0]
        else:
            name, i = _string(block, i)
        value, i = _string(block, i)
        return name, value, i

    def _add(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value) + _ENTRY_OVERHEAD
        if size > self.limit:  # an entry larger than the table empties it (RFC 7541 4.4)
            self.table.clear()
            self.size = 0
            return
        self._evict(size)
        self.table.appendleft((name, value))
        self.size += size

    def _evict(self, room: int) -> None:
        while self.table and self.size + room > self.limit:
            name, value = self.table.pop()
            self.size -= len(name) + len(value) + _ENTRY_OVERHEAD


def _encode_integer(value: int, prefix_bits: int, first: int = 0) -> bytes:
    mask = (1 << prefix_bits) - 1
    if value < mask:
        return bytes([first | value])
    out = bytearray([first | mask])
    value -= mask
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes) -> bytes:
    """One field as a literal without indexing, new name, no Huffman (rule 3)."""
    return b"\x00" + _encode_integer(len(name), 7) + name + _encode_integer(len(value), 7) + value
