"""What the sidecar knows about the KServe v2 / Triton protocol: which calls are inference,
which model they name, and the binary-tensor header. Every other module asks this one.

Rules:
1. Inference calls. Over HTTP: `/v2/models/{m}/infer`, `/v2/models/{m}/generate` and
   `/v2/models/{m}/generate_stream`, each optionally with `/versions/{v}` after the model.
   Over gRPC (HTTP/2 paths are the method's full name): `/inference.GRPCInferenceService/
   ModelInfer` and `/inference.GRPCInferenceService/ModelStreamInfer`. Nothing else is
   inference: health, metadata, config, statistics, repository and shared-memory calls are
   other paths.
2. The end of an HTTP path. The endpoint name must be followed by the end of the path or by
   `?` (a query string). So `/infer/`, `/infer2`, `/infer.json` and `/inference` are not
   inference calls: Triton routes on the whole path and serves none of them, so there is no
   model for admission to protect. Segments are `[^/?]+`, never empty; the version segment is
   not checked further (Triton answers a bad version itself).
3. The model of an HTTP call is its model segment, percent-decoded (`my%20model` is
   `my model`), the name policies and Triton's metrics use. A gRPC call names its model in
   the body: `ModelInferRequest.model_name` (field 1) of the first gRPC message. It is read
   only from an uncompressed, complete, well-formed message; anything else has no model
   (never an error).
4. Triton's binary-tensor extension: the JSON part of a body is its first
   `inference-header-content-length` bytes (`INFER_HEADER_LENGTH`); the rest is raw tensors,
   one after another in the order of the JSON's tensors that carry
   `"parameters": {"binary_data_size": N}` (`binary_tensors`). Numbers are little-endian; a
   BYTES tensor is its elements, each a 4-byte little-endian length and that many bytes
   (`decode_tensor`).
5. Content encodings. Triton's HTTP server inflates `Content-Encoding: gzip` and `deflate`
   bodies (both with zlib's windowBits 15|32, which takes a gzip or a zlib stream under
   either name: server src/data_compressor.h) and answers 415 to any other encoding but
   `identity`. `decode_body` does the same, stopping at a size cap so that a small body that
   inflates to gigabytes (a zip bomb) costs a bounded amount of work. That is the `infer`
   endpoint; `generate` and `generate_stream` accept `identity` only (seen here: 400 "only
   'identity' is supported"). Their compressed bodies are read all the same: Triton's 400
   then refunds what they were charged (core.tokens rule 5).

What happens for each kind of request:
- HTTP infer, generate, generate_stream: the model comes from the path, in every adapter
  (ext_authz HTTP and gRPC, ext_proc), so per-model overload admission and model policies
  (token costs) apply everywhere.
- gRPC ModelInfer, ModelStreamInfer: the model is only in the body. Only where the sidecar
  sees the body (ext_proc, which buffers it) can it be read with `grpc_model_name`. The
  ext_authz adapters do not read a body (Envoy sends none unless told to), so there the model
  is unknown and per-model overload admission and model policies do not apply: such a call
  is judged by quota alone.
- Every other path: no model, quota only.
"""

from __future__ import annotations

import enum
import functools
import re
import struct
import urllib.parse
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

INFER_HEADER_LENGTH = "inference-header-content-length"
CONTENT_ENCODING = "content-encoding"
INFLATED_ENCODINGS = frozenset({"gzip", "deflate"})  # rule 5
_IDENTITY = frozenset({"", "identity"})
_ZLIB_OR_GZIP = 15 | 32  # as Triton's inflateInit2: either header, detected
# Rule 4: datatype -> struct format of one element (FP16 and BF16 have no token meaning).
_ELEMENT = {
    "BOOL": "?",
    "INT8": "b",
    "INT16": "h",
    "INT32": "i",
    "INT64": "q",
    "UINT8": "B",
    "UINT16": "H",
    "UINT32": "I",
    "UINT64": "Q",
    "FP32": "f",
    "FP64": "d",
}
_BYTES_LENGTH = struct.Struct("<I")
GRPC_MODEL_INFER_PATH = "/inference.GRPCInferenceService/ModelInfer"
GRPC_MODEL_STREAM_INFER_PATH = "/inference.GRPCInferenceService/ModelStreamInfer"


class Endpoint(enum.Enum):
    INFER = "infer"
    GENERATE = "generate"
    GENERATE_STREAM = "generate_stream"
    GRPC_INFER = "grpc_infer"
    GRPC_STREAM_INFER = "grpc_stream_infer"


# Rule 2: `(?:\?|$)` is the one end-of-path rule. The alternation is anchored by it, so
# `generate` never matches the start of `generate_stream`.
_HTTP_PATH = re.compile(
    r"^/v2/models/(?P<model>[^/?]+)(?:/versions/[^/?]+)?"
    r"/(?P<endpoint>infer|generate|generate_stream)(?:\?|$)"
)
_GRPC_PATHS = {
    GRPC_MODEL_INFER_PATH: Endpoint.GRPC_INFER,
    GRPC_MODEL_STREAM_INFER_PATH: Endpoint.GRPC_STREAM_INFER,
}
_GRPC_PREFIX_BYTES = 5  # 1-byte compressed flag, 4-byte big-endian message length
_MODEL_NAME_FIELD = 1  # ModelInferRequest.model_name (tests check it against tritonclient)
_LENGTH_DELIMITED = 2


@functools.lru_cache(maxsize=4096)  # a decision reads its path three times; paths repeat
def parse_path(path: str) -> tuple[Endpoint, str | None] | None:
    """The endpoint `path` calls and, over HTTP, its model (rules 1 to 3); None for a path
    that is not an inference call. A gRPC call's model is in its body: None here."""
    grpc = _GRPC_PATHS.get(path)
    if grpc is not None:
        return grpc, None
    found = _HTTP_PATH.match(path)
    if found is None:
        return None
    return Endpoint(found["endpoint"]), urllib.parse.unquote(found["model"])


def model_of(path: str) -> str | None:
    """The model an HTTP inference path names, or None for other paths (and gRPC paths)."""
    parsed = parse_path(path)
    return parsed[1] if parsed is not None else None


def is_streamed(path: str) -> bool:
    """Whether `path` is Triton's generate_stream endpoint, whose answer is a stream of
    server-sent events."""
    parsed = parse_path(path)
    return parsed is not None and parsed[0] is Endpoint.GENERATE_STREAM


def grpc_model_name(body: bytes) -> str | None:
    """`model_name` of the first gRPC message in `body`, a `ModelInferRequest` (rule 3).

    None when the message is compressed, cut off or not protobuf, or names no model. Like
    protobuf parsers, the last `model_name` in the message counts.
    """
    if len(body) < _GRPC_PREFIX_BYTES or body[0] != 0:  # 1: compressed; others do not exist
        return None
    length = int.from_bytes(body[1:_GRPC_PREFIX_BYTES], "big")
    message = body[_GRPC_PREFIX_BYTES : _GRPC_PREFIX_BYTES + length]
    fields = protobuf_fields(message) if len(message) == length else None
    if fields is None:
        return None
    name = b""
    for number, wire_type, start, end in fields:
        # A field 1 of another wire type is an unknown field to protobuf parsers: skipped.
        if number == _MODEL_NAME_FIELD and wire_type == _LENGTH_DELIMITED:
            name = message[start:end]
    try:
        return name.decode() or None  # proto3 strings are UTF-8; parsers refuse the rest
    except UnicodeDecodeError:
        return None


# -- protobuf wire format ------------------------------------------------------------------------


def protobuf_fields(
    message: bytes, begin: int = 0, end: int | None = None
) -> list[tuple[int, int, int, int]] | None:
    """The top-level fields of a protobuf message as (field number, wire type, start, end),
    where `message[start:end]` is the value (for length-delimited fields, without the
    length); None when `message` is not a sequence of well-formed fields. Values are not
    decoded, so a message of large tensors costs a few steps per field. `begin` and `end`:
    the message is `message[begin:end]` (an embedded one, read in place), indices stay
    those of `message`."""
    fields: list[tuple[int, int, int, int]] = []
    i, end = begin, len(message) if end is None else end
    while i < end:
        tag, i = read_varint(message, i)
        number, wire_type = tag >> 3, tag & 7
        if number == 0 or i < 0:
            return None
        start = i
        if wire_type == 0:
            _, i = read_varint(message, i)
        elif wire_type == 1:
            i += 8
        elif wire_type == 2:
            length, start = read_varint(message, i)
            i = start + length if start >= 0 else -1
        elif wire_type == 5:
            i += 4
        else:  # groups (3, 4) do not occur in Triton's messages; 6 and 7 do not exist
            return None
        if i < 0 or i > end:
            return None
        fields.append((number, wire_type, start, i))
    return fields


def read_varint(data: bytes, i: int) -> tuple[int, int]:
    """(value, index after it), or (0, -1) when the varint is cut off or longer than 10 bytes."""
    value = 0
    for shift in range(0, 70, 7):
        if i >= len(data):
            return 0, -1
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
    return 0, -1


def encode_varint(value: int) -> bytes:
    """`value` (not negative) as a protobuf varint."""
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        if not value:
            out.append(low)
            return bytes(out)
        out.append(low | 0x80)


# -- what Triton reads from an HTTP body (rules 4 and 5) --------------------------------------


@dataclass(frozen=True, slots=True)
class Unreadable:
    """Why a body could not be read as Triton would read it."""

    why: str
    unsupported_encoding: bool = False  # an encoding Triton answers 415 to, not a bad body


def decode_body(headers: Mapping[str, str], body: bytes, max_bytes: int) -> bytes | Unreadable:
    """The body as Triton reads it, inflated per its Content-Encoding (rule 5), at most
    `max_bytes` of it: more than that is Unreadable, and inflating stops there."""
    encoding = headers.get(CONTENT_ENCODING, "").strip().lower()
    if encoding in _IDENTITY:
        return body
    if encoding not in INFLATED_ENCODINGS:
        return Unreadable(f"content-encoding {encoding[:40]!r} is not one Triton reads", True)
    inflater = zlib.decompressobj(wbits=_ZLIB_OR_GZIP)
    try:
        inflated = inflater.decompress(body, max_bytes + 1)
    except zlib.error:
        return Unreadable(f"body is not valid {encoding}")
    if len(inflated) > max_bytes:
        return Unreadable(f"{encoding} body inflates to more than {max_bytes} bytes")
    return inflated


def binary_tensors(tensors: object, data: bytes) -> dict[str, bytes] | Unreadable:
    """Each binary tensor's raw bytes by name (rule 4): `tensors` is the JSON's `inputs` or
    `outputs`, `data` the body after its JSON part. The first tensor of a name counts."""
    found: dict[str, bytes] = {}
    offset = 0
    for tensor in tensors if isinstance(tensors, list) else ():
        parameters = tensor.get("parameters") if isinstance(tensor, dict) else None
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is None:
            continue
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            return Unreadable("binary_data_size is not a size")
        if offset + size > len(data):
            return Unreadable("binary tensors are larger than the body")
        name = tensor.get("name")
        if isinstance(name, str):
            found.setdefault(name, data[offset : offset + size])
        offset += size
    return found


def decode_tensor(datatype: object, raw: bytes) -> list[object] | None:
    """The elements of a binary tensor (rule 4), flat: numbers, or text for BYTES (decoded as
    UTF-8, a bad byte counting as one character); None when `raw` does not fit `datatype`."""
    if datatype == "BYTES":
        elements: list[object] = []
        i = 0
        while i < len(raw):
            if i + 4 > len(raw):
                return None
            (length,) = _BYTES_LENGTH.unpack_from(raw, i)
            i += 4
            if i + length > len(raw):
                return None
            elements.append(raw[i : i + length].decode(errors="replace"))
            i += length
        return elements
    element = _ELEMENT.get(datatype) if isinstance(datatype, str) else None
    if element is None or len(raw) % struct.calcsize(element):
        return None
    return [value for (value,) in struct.iter_unpack("<" + element, raw)]
