"""Token accounting for LLM-style requests: what a request may cost, read from its body at
admission, and what it really cost, read from its response.

Rules:
1. Where a name is looked up. In a request, the model policy's names (`TokenPolicy`) are
   found, in this order, as a KServe v2 input tensor (`inputs[].name`, its `data`), as a
   top-level field (Triton's generate and generate_stream endpoints map top-level fields to
   inputs), or as an entry of `parameters`. In a response: an output tensor
   (`outputs[].name`) or a top-level field. A value is a number, a string or a (nested) list
   of them; every element counts (a batch of rows is that many sequences).
2. Counting. `*_tokens` names hold token counts: their numbers are summed (booleans and
   strings do not count). `*_text` names hold text: the characters of their strings, divided
   by `chars_per_token` and rounded up, estimate the tokens.
3. The estimate at admission = prompt_weight * prompt tokens + output_weight * max tokens
   (the request's own limit, else `default_max_tokens`). A body that is not a JSON object, or
   whose prompt cannot be found where the policy says, has no estimate: the model's
   `cost_per_request` is charged instead.
4. The real cost = prompt_weight * prompt tokens + output_weight * tokens generated.
   Generated tokens are read from the response: the whole JSON body, or every `data:` event of
   a generate_stream (server-sent events) response, summed. An error response (status 400 or
   more) generated nothing. A successful response whose usage cannot be found leaves the
   estimate standing: the tenant pays what it was charged, never less by accident.
5. Nothing here raises on what a client or Triton sent; sizes are bounded (`MAX_JSON_BYTES`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass

from sidecar.core.kserve import INFER_HEADER_LENGTH
from sidecar.policy.model import TokenPolicy

# The most JSON this module decodes from one body or one stream event. Envoy's buffer limit
# bounds bodies first (1 MiB by default); a larger body simply has no estimate or usage.
MAX_JSON_BYTES = 8 * 1024 * 1024
# Nested lists deeper than this are not counted (tensors have a few dimensions, not hundreds).
_MAX_DEPTH = 32


@dataclass(frozen=True, slots=True)
class TokenEstimate:
    """A request's cost as estimated at admission, and what it was made from."""

    prompt_tokens: int
    max_tokens: int
    cost: float
    why: str  # for the decision trace

    def actual_cost(self, policy: TokenPolicy, generated: int) -> float:
        """Rule 4: the cost of this request had it generated `generated` tokens."""
        return policy.prompt_weight * self.prompt_tokens + policy.output_weight * generated


def estimate(policy: TokenPolicy, headers: Mapping[str, str], body: bytes) -> TokenEstimate | str:
    """Rule 3 for one buffered request body; a string says why there is no estimate."""
    document = _json_object(body, headers.get(INFER_HEADER_LENGTH))
    if isinstance(document, str):
        return document
    prompt: int | None = 0
    if policy.prompt_tokens is not None:
        prompt = _count(_request_value(document, policy.prompt_tokens), None)
        where = policy.prompt_tokens
    elif policy.prompt_text is not None:
        prompt = _count(_request_value(document, policy.prompt_text), policy.chars_per_token)
        where = policy.prompt_text
    if prompt is None:
        return f"prompt {where!r} not found in the request"
    limit = None
    if policy.max_tokens is not None:
        limit = _count(_request_value(document, policy.max_tokens), None)
    max_tokens = policy.default_max_tokens if limit is None else limit
    cost = policy.prompt_weight * prompt + policy.output_weight * max_tokens
    limit_said = "default" if limit is None else "asked"
    return TokenEstimate(
        prompt,
        max_tokens,
        cost,
        f"estimated cost {cost:g}: {prompt} prompt tokens, {max_tokens} max tokens ({limit_said})",
    )


class UsageMeter:
    """Counts the tokens a response generated (rule 4), fed the response body as it passes.

    For a generate_stream response every complete `data:` line is decoded as it arrives
    (events may be split across chunks; only the unfinished line is kept). Any other response
    is kept, up to `MAX_JSON_BYTES`, and decoded once at the end.
    """

    def __init__(self, policy: TokenPolicy, *, streamed: bool) -> None:
        self._policy = policy
        self._streamed = streamed
        self._pending = bytearray()
        self._generated = 0
        self._found = False  # usage was seen in at least one event or body
        self._too_large = False
        self.status: int | None = None  # the response's HTTP status, when known
        self._binary_length: str | None = None

    def on_headers(self, status: int | None, headers: Mapping[str, str]) -> None:
        self.status = status
        self._binary_length = headers.get(INFER_HEADER_LENGTH)

    def feed(self, chunk: bytes) -> None:
        if self._too_large:
            return
        self._pending += chunk
        if self._streamed:
            end = self._pending.rfind(b"\n")
            if end >= 0:
                lines = bytes(self._pending[: end + 1])
                del self._pending[: end + 1]
                for line in lines.splitlines():
                    self._event_line(line)
        if len(self._pending) > MAX_JSON_BYTES:
            self._too_large = True
            self._pending.clear()

    def generated(self) -> int | None:
        """Tokens generated so far: 0 for an error response, None while no usage was seen."""
        if self.status is not None and self.status >= 400:
            return 0
        return self._generated if self._found else None

    def finish(self) -> int | None:
        """The tokens generated, once the whole response has been fed."""
        if self._streamed:
            self._event_line(bytes(self._pending))
        elif not self._too_large:
            document = _json_object(bytes(self._pending), self._binary_length)
            if not isinstance(document, str):
                self._add(_response_value(document, self._usage_name()))
        self._pending.clear()
        return self.generated()

    def _event_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:` and `id:` lines
        document = _json_object(line[5:].strip(), None)
        if not isinstance(document, str):
            self._add(_response_value(document, self._usage_name()))

    def _usage_name(self) -> str | None:
        return self._policy.output_tokens or self._policy.output_text

    def _add(self, value: object) -> None:
        per_token = None if self._policy.output_tokens is not None else self._policy.chars_per_token
        counted = _count(value, per_token)
        if counted is not None:
            self._generated += counted
            self._found = True


def _json_object(body: bytes, binary_length: str | None) -> dict[str, object] | str:
    """The body's top-level JSON object (with binary tensors: the JSON header part), or why
    there is none."""
    if binary_length is not None:
        length = int(binary_length) if binary_length.strip().isdigit() else -1
        if not 0 < length <= len(body):
            return "inference-header-content-length does not fit the body"
        body = body[:length]
    if len(body) > MAX_JSON_BYTES:
        return f"body larger than {MAX_JSON_BYTES} bytes"
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurd nesting
        return "body is not JSON"
    if not isinstance(document, dict):
        return "body is not a JSON object"
    return document


def _request_value(document: dict[str, object], name: str) -> object:
    found = _tensor_data(document.get("inputs"), name)
    if found is not None:
        return found
    if name in document:
        return document[name]
    parameters = document.get("parameters")
    return parameters.get(name) if isinstance(parameters, dict) else None


def _response_value(document: dict[str, object], name: str | None) -> object:
    if name is None:
        return None
    found = _tensor_data(document.get("outputs"), name)
    return found if found is not None else document.get(name)


def _tensor_data(tensors: object, name: str) -> object:
    if not isinstance(tensors, list):
        return None
    for tensor in tensors:
        if isinstance(tensor, dict) and tensor.get("name") == name:
            return tensor.get("data")
    return None


def _count(value: object, chars_per_token: float | None) -> int | None:
    """Rule 2: the tokens `value` holds, or None when it holds nothing countable. Counts are
    whole tokens; negative counts count as 0 (Triton refuses such requests anyway)."""
    numbers: list[float] = []
    chars: list[int] = []
    _collect(value, numbers, chars, 0)
    if chars_per_token is None:
        finite = [n for n in numbers if math.isfinite(n)]
        return max(0, math.ceil(sum(finite))) if finite else None
    if not chars:
        return None
    return sum(math.ceil(c / chars_per_token) for c in chars)


def _collect(value: object, numbers: list[float], chars: list[int], depth: int) -> None:
    if isinstance(value, bool) or depth > _MAX_DEPTH:
        return
    if isinstance(value, int | float):
        numbers.append(float(value))
    elif isinstance(value, str):
        chars.append(len(value))
    elif isinstance(value, list):
        for item in value:
            _collect(item, numbers, chars, depth + 1)
