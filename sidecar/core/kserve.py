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
   `inference-header-content-length` bytes (`INFER_HEADER_LENGTH`); the rest is raw tensors.

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
import re
import urllib.parse

INFER_HEADER_LENGTH = "inference-header-content-length"
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


def protobuf_fields(message: bytes) -> list[tuple[int, int, int, int]] | None:
    """The top-level fields of a protobuf message as (field number, wire type, start, end),
    where `message[start:end]` is the value (for length-delimited fields, without the
    length); None when `message` is not a sequence of well-formed fields. Values are not
    decoded, so a message of large tensors costs a few steps per field."""
    fields: list[tuple[int, int, int, int]] = []
    i, end = 0, len(message)
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
