"""Writing the granted class's Triton priority into the inference request itself.

Triton reads a request's scheduling priority only from the request: the KServe v2 JSON body's
`"parameters": {"priority": N}` or the gRPC `ModelInferRequest.parameters["priority"]`, never
from an HTTP header (1 is the highest level; models without `dynamic_batching` ignore it). So in
ext_proc mode Envoy hands the sidecar the buffered body, and this module rewrites it.

Rules:
1. Only inference calls are rewritten: `/v2/models/{m}[/versions/{v}]/infer` over HTTP, and
   `/inference.GRPCInferenceService/ModelInfer` over gRPC. Triton passes the parameters of
   `generate` and `generate_stream` to the model instead of reading them as scheduling
   priority, so those (and every other path) are left alone. Paths are matched by
   `core/kserve.py`, the one reading of the protocol.
2. KServe v2 JSON (`application/json`, or no content type): the top-level object's
   `parameters.priority` is set, replacing any value the client sent. The new value is spliced
   into the original text, so every other byte stays exactly as sent (numbers keep their text;
   nothing is re-serialised). With Triton's binary-tensor extension the JSON is the first
   `inference-header-content-length` bytes of the body and only that part changes. Values
   are skipped by their structure, not decoded: a MiB of numbers costs about a millisecond,
   a MiB of dense structure (thousands of strings or objects) about 50 ms, all on the event
   loop, which is one reason Envoy's body buffer limit should stay modest.
3. gRPC (`application/grpc`): every length-prefixed message (1-byte compressed flag, 4-byte
   big-endian length) gets one `parameters` map entry `"priority" -> int64_param` appended.
   Protobuf parsers keep the last entry of a repeated map key, so this replaces any priority the
   client set, without decoding (or copying twice) the tensors in the message.
4. Anything else is passed unchanged, with the reason: another content type, a content
   encoding, a compressed gRPC message (`UNSUPPORTED`); JSON that is not an object, a
   `parameters` that is not an object, a key given twice, a broken frame (`MALFORMED`). Triton
   gives malformed requests their own error. Nothing here raises on what a client sent.
5. A rewrite names every request header that must change with the body: `content-length`
   always (Envoy fails a mutated body whose content-length disagrees) and, with binary tensors,
   `inference-header-content-length`.
6. A class with `triton_timeout_ms` also gets `parameters.timeout` (microseconds, the way
   Triton reads it), set the same way. Triton then rejects the request with 503 if it is still
   queued after that long, instead of running it for a client that has gone: Triton 2.51 runs
   a queued HTTP request whose client disconnected. Only models whose dynamic_batching queue
   policy sets `allow_timeout_override: true` (and a longer default timeout) honour it.
7. A request whose client states how long it waits (`grpc-timeout` or the policy's timeout
   header, `core/client_wait.py`) gets as its timeout what is left of that wait when its body
   goes to Triton, counted from when the sidecar saw its headers (the client started waiting
   no later), in whole milliseconds rounded up and at least 1, or the class's
   `triton_timeout_ms` where that is shorter (`queue_timeout_ms`). A request Triton would
   still have queued after its client has gone is then refused instead of run: GPU time goes
   to requests someone waits for.
"""

from __future__ import annotations

import enum
import json
import math
import re
from collections.abc import Mapping

from sidecar.core.kserve import (
    INFER_HEADER_LENGTH,
    Endpoint,
    encode_varint,
    parse_path,
    protobuf_fields,
)
from sidecar.core.record import record

# The request headers the rewrite reads besides the path: Envoy must forward them to the sidecar.
BODY_HEADERS = ("content-type", "content-encoding", INFER_HEADER_LENGTH)

_JSON_TYPES = frozenset({"", "application/json"})
_BINARY_TYPES = frozenset({"", "application/json", "application/octet-stream"})
_WHITESPACE = re.compile(rb"[ \t\n\r]*")
_SCALAR = re.compile(rb"-?(?:0|[1-9][0-9]*)(?:\.[0-9]+)?(?:[eE][+-]?[0-9]+)?|true|false|null")
# Structural characters the scanner steps through per value before handing the value to the
# C decoder: numbers cost nothing here, strings and brackets about a microsecond each.
_SCAN_STEPS = 5000
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_OPENERS = {ord("{"): ord("}"), ord("["): ord("]")}
_CLOSERS = frozenset(_OPENERS.values())
_STRUCTURAL = (b'"', b"{", b"}", b"[", b"]")


def _refuse_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


# Strict JSON: NaN and Infinity are Python extensions that Triton's parser refuses.
_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)

# gRPC: ModelInferRequest.parameters is field 4, a map<string, InferParameter>; a map entry is
# a message with key = 1 and value = 2; InferParameter.int64_param is field 2 (varint). Wire
# tags are (field_number << 3) | wire_type, with wire type 2 = length-delimited, 0 = varint.
# tests/test_core_priority.py checks these numbers against tritonclient's descriptors.
_PARAMETERS_TAG = b"\x22"
_ENTRY_KEY_TAG = b"\x0a"
_ENTRY_VALUE_TAG = b"\x12"
_INT64_PARAM_TAG = b"\x10"
_GRPC_PREFIX_BYTES = 5


class RewriteResult(enum.Enum):
    REWRITTEN = "rewritten"
    NOT_INFERENCE = "not_inference"  # another path: nothing to rewrite
    UNSUPPORTED = "unsupported"  # content type, content encoding, compressed gRPC message
    MALFORMED = "malformed"  # not a KServe v2 request object, or broken gRPC framing


@record
class BodyRewrite:
    """What to do with a request body: `body` and `headers` are set only when REWRITTEN."""

    result: RewriteResult
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = ()  # request headers to set along with the body


def rewrite_body(
    path: str,
    headers: Mapping[str, str],
    body: bytes,
    priority: int,
    timeout_ms: int | None = None,
) -> BodyRewrite:
    """Rules 1 to 6 for one buffered request body. `headers` are lower-case request headers;
    `timeout_ms`: the Triton timeout to ask for too (rule 6), None for none."""
    params = _parameters(priority, timeout_ms)
    content_type = headers.get("content-type", "")
    grpc = _is_grpc(content_type)
    parsed = parse_path(path)
    endpoint = parsed[0] if parsed is not None else None
    if endpoint is not (Endpoint.GRPC_INFER if grpc else Endpoint.INFER):
        return BodyRewrite(RewriteResult.NOT_INFERENCE)
    if headers.get("content-encoding", "identity").strip().lower() not in ("", "identity"):
        return BodyRewrite(RewriteResult.UNSUPPORTED)
    binary_length = headers.get(INFER_HEADER_LENGTH)
    if binary_length is not None and not grpc:
        return _binary_with_priority(body, _media_type(content_type), binary_length, params)
    rewritten = _rewrite(body, content_type, params)
    if isinstance(rewritten, RewriteResult):
        return BodyRewrite(rewritten)
    return BodyRewrite(
        RewriteResult.REWRITTEN, rewritten, (("content-length", str(len(rewritten))),)
    )


def queue_timeout_ms(
    class_ms: int | None, client_wait_s: float | None, waited_s: float
) -> int | None:
    """Rule 7: the Triton timeout (ms) to ask for, None for none. `class_ms`: the class's
    `triton_timeout_ms`; `client_wait_s`: what the client said it waits; `waited_s`: how long
    ago the sidecar saw the request's headers."""
    if client_wait_s is None:
        return class_ms
    left_ms = max(1, math.ceil((client_wait_s - waited_s) * 1000.0))
    return left_ms if class_ms is None else min(class_ms, left_ms)


def with_triton_priority(body: bytes, content_type: str, priority: int) -> bytes | None:
    """`body` asking Triton for `priority`, or None when it is not something to rewrite.

    KServe v2 JSON (`application/json` or no content type, rule 2) or gRPC messages
    (`application/grpc`, rule 3). Never raises on the body's content.
    """
    rewritten = _rewrite(body, content_type, _parameters(priority, None))
    return None if isinstance(rewritten, RewriteResult) else rewritten


# The request parameters a rewrite sets, in order: (name, integer value).
_Params = tuple[tuple[bytes, int], ...]


def _parameters(priority: int, timeout_ms: int | None) -> _Params:
    if priority < 0:
        raise ValueError(f"Triton priority levels are not negative, got {priority}")
    if timeout_ms is None:
        return ((b"priority", priority),)
    if timeout_ms <= 0:
        raise ValueError(f"a Triton timeout is positive, got {timeout_ms} ms")
    return (b"priority", priority), (b"timeout", timeout_ms * 1000)  # Triton reads microseconds


def _rewrite(body: bytes, content_type: str, params: _Params) -> bytes | RewriteResult:
    if _is_grpc(content_type):
        return _grpc_with_priority(body, params)
    if _media_type(content_type) in _JSON_TYPES:
        return _json_with_priority(body, params)
    return RewriteResult.UNSUPPORTED


def _media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_grpc(content_type: str) -> bool:
    media = _media_type(content_type)
    return media == "application/grpc" or media.startswith("application/grpc+")


# -- KServe v2 JSON -----------------------------------------------------------------------------


def _binary_with_priority(
    body: bytes, media_type: str, json_length: str, params: _Params
) -> BodyRewrite:
    if media_type not in _BINARY_TYPES:
        return BodyRewrite(RewriteResult.UNSUPPORTED)
    length = int(json_length) if json_length.strip().isdigit() else -1
    if not 0 < length <= len(body):
        return BodyRewrite(RewriteResult.MALFORMED)
    header = _json_with_priority(body[:length], params)
    if isinstance(header, RewriteResult):
        return BodyRewrite(header)
    new_body = header + body[length:]
    return BodyRewrite(
        RewriteResult.REWRITTEN,
        new_body,
        (("content-length", str(len(new_body))), (INFER_HEADER_LENGTH, str(len(header)))),
    )


def _json_with_priority(body: bytes, params: _Params) -> bytes | RewriteResult:
    for name, value in params:  # one splice each: a rare second one scans the text again
        spliced = _json_with_parameter(body, name, value)
        if isinstance(spliced, RewriteResult):
            return spliced
        body = spliced
    return body


def _json_with_parameter(body: bytes, name: bytes, value: int) -> bytes | RewriteResult:
    try:
        scan = _JsonScanner(body)
        top = scan.object_at(scan.skip_space(0), b"parameters")
        if top is None or scan.skip_space(top.end) != len(body):
            return RewriteResult.MALFORMED
        if top.found is None:  # no parameters yet: add them as the first member
            member = b'"parameters":{"%s":%d}' % (name, value) + (b"," if top.size else b"")
            return _splice(body, top.start + 1, top.start + 1, member)
        parameters = scan.object_at(top.found[0], name)
        if parameters is None:
            return RewriteResult.MALFORMED  # KServe v2 parameters must be an object
        if parameters.found is None:
            member = b'"%s":%d' % (name, value) + (b"," if parameters.size else b"")
            return _splice(body, parameters.start + 1, parameters.start + 1, member)
        return _splice(body, *parameters.found, b"%d" % value)
    except (ValueError, RecursionError):  # not JSON, a key given twice, absurd nesting
        return RewriteResult.MALFORMED


def _splice(data: bytes, start: int, end: int, new: bytes) -> bytes:
    with memoryview(data) as view:  # one copy of a large body, not a slice and a join
        return b"".join((view[:start], new, view[end:]))


@record
class _Object:
    start: int  # index of "{"
    end: int  # index just past "}"
    size: int  # number of members
    found: tuple[int, int] | None  # where the looked-for key's value starts and ends


class _JsonScanner:
    """Finds the members of JSON objects in UTF-8 bytes without decoding the values.

    Keys are decoded strictly; values are skipped by their structure: strings, brackets and
    scalars. A tensor of a million numbers is skipped with a few `bytes.find` calls (memchr)
    instead of a million Python floats. What is inside a skipped value is not validated further:
    Triton rejects a malformed request itself. Structural characters are ASCII and never occur
    inside a multi-byte UTF-8 sequence, so scanning bytes is exact.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        # For each structural character: where the last search started and where it found the
        # character (len(data): nowhere). Valid for any position in between, so each character
        # is searched again only once passed and a scan stays linear however values are shaped.
        self._next = dict.fromkeys(_STRUCTURAL, (0, -1))

    def skip_space(self, i: int) -> int:
        found = _WHITESPACE.match(self.data, i)
        return found.end() if found else i

    def object_at(self, start: int, key: bytes) -> _Object | None:
        """The object at `start` and where `key`'s value is in it; None when the value at
        `start` is not an object. Raises ValueError when the text there is not JSON, or when
        `key` appears twice (parsers disagree on which copy counts)."""
        data = self.data
        if not data.startswith(b"{", start):
            return None
        wanted = key.decode()
        found: tuple[int, int] | None = None
        size = 0
        i = self.skip_space(start + 1)
        if data.startswith(b"}", i):
            return _Object(start, i + 1, size, found)
        while True:
            if not data.startswith(b'"', i):
                raise ValueError(f"expected a key at {i}")
            key_end = self.string_end(i)
            name = json.loads(data[i:key_end])
            i = self.skip_space(key_end)
            if not data.startswith(b":", i):
                raise ValueError(f"expected ':' at {i}")
            value_start = self.skip_space(i + 1)
            value_end = self.skip_value(value_start)
            size += 1
            if name == wanted:
                if found is not None:
                    raise ValueError(f"{wanted!r} given twice")
                found = (value_start, value_end)
            i = self.skip_space(value_end)
            if data.startswith(b",", i):
                i = self.skip_space(i + 1)
            elif data.startswith(b"}", i):
                return _Object(start, i + 1, size, found)
            else:
                raise ValueError(f"expected ',' or '}}' at {i}")

    def skip_value(self, i: int) -> int:
        """The index just past the JSON value at `i`; ValueError when none is there."""
        data = self.data
        scalar = _SCALAR.match(data, i)
        if scalar:
            return scalar.end()
        start = i
        closers: list[int] = []
        for _ in range(_SCAN_STEPS):
            char = data[i] if i < len(data) else -1
            if char == _QUOTE:
                i = self.string_end(i)
            elif char in _OPENERS:
                closers.append(_OPENERS[char])
                i += 1
            elif char in _CLOSERS:
                if not closers or closers.pop() != char:
                    raise ValueError(f"unbalanced {chr(char)!r} at {i}")
                i += 1
            else:
                raise ValueError(f"expected a JSON value at {i}")
            if not closers:
                return i
            i = self._next_structural(i)
        # Dense structure (many strings or objects): the C decoder is faster from here on.
        text = data[start:].decode("utf-8")
        _, end = _DECODER.raw_decode(text)
        return start + (end if text.isascii() else len(text[:end].encode("utf-8")))

    def string_end(self, i: int) -> int:
        """The index just past the string whose opening quote is at `i`."""
        data = self.data
        end = i + 1
        while True:
            end = data.find(b'"', end)
            if end < 0:
                raise ValueError(f"unterminated string at {i}")
            escape = end - 1
            while escape > i and data[escape] == _BACKSLASH:
                escape -= 1
            end += 1
            if (end - 2 - escape) % 2 == 0:  # an odd number of backslashes escapes the quote
                return end

    def _next_structural(self, i: int) -> int:
        best = len(self.data)
        for char, (searched_from, at) in self._next.items():
            if not searched_from <= i <= at:  # passed it, or scanning an earlier part again
                at = self.data.find(char, i)
                at = len(self.data) if at < 0 else at
                self._next[char] = (i, at)
            best = min(best, at)
        return best


# -- gRPC ---------------------------------------------------------------------------------------


def _grpc_with_priority(body: bytes, params: _Params) -> bytes | RewriteResult:
    entry = b"".join(_parameter_entry(name, value) for name, value in params)
    frames: list[bytes] = []
    i = 0
    while i < len(body) or not frames:
        if len(body) - i < _GRPC_PREFIX_BYTES:
            return RewriteResult.MALFORMED
        flag = body[i]
        length = int.from_bytes(body[i + 1 : i + _GRPC_PREFIX_BYTES], "big")
        message = body[i + _GRPC_PREFIX_BYTES : i + _GRPC_PREFIX_BYTES + length]
        if flag == 1:
            return RewriteResult.UNSUPPORTED  # compressed with the call's grpc-encoding
        if flag != 0 or len(message) != length or not _is_protobuf_message(message):
            return RewriteResult.MALFORMED
        frames.append(b"\x00" + (length + len(entry)).to_bytes(4, "big") + message + entry)
        i += _GRPC_PREFIX_BYTES + length
    return b"".join(frames)


def _parameter_entry(key: bytes, number: int) -> bytes:
    value = _INT64_PARAM_TAG + encode_varint(number)
    entry = (
        _ENTRY_KEY_TAG
        + encode_varint(len(key))
        + key
        + _ENTRY_VALUE_TAG
        + encode_varint(len(value))
        + value
    )
    return _PARAMETERS_TAG + encode_varint(len(entry)) + entry


def _is_protobuf_message(data: bytes) -> bool:
    """Whether `data` is a sequence of well-formed protobuf fields (top level only)."""
    return protobuf_fields(data) is not None
