"""Token accounting for LLM-style requests: what a request may cost, read from its body at
admission, and what it really cost, read from its response.

Rules:
1. Where a name is looked up. In a request, the model policy's names (`TokenPolicy`) are
   found, in this order, as a KServe v2 input tensor (`inputs[].name`, its `data`, or its
   binary data), as a top-level field (Triton's generate and generate_stream endpoints map
   top-level fields to inputs), or as an entry of `parameters`. In a response: an output
   tensor (`outputs[].name`) or a top-level field. A value is a number, a string or a (nested)
   list of them; every element counts (a batch of rows is that many sequences).
2. Counting. `*_tokens` names hold token counts: their numbers are summed (booleans and
   strings do not count). `*_text` names hold text: the characters of their strings, divided
   by `chars_per_token` and rounded up, estimate the tokens.
3. Reading a body as Triton reads it (`core.kserve` rules 4 and 5): inflated per its
   Content-Encoding (at most `MAX_JSON_BYTES`), its JSON part split from its binary tensors,
   and those decoded. A JSON object with a duplicate key is read as Triton reads it: the
   first copy counts (Triton parses with rapidjson, whose FindMember returns the first
   member; test_e2e_tokens shows Triton running a duplicated parameter's first value).
4. The estimate at admission = prompt_weight * prompt tokens + output_weight * max tokens
   (the request's own limit, else `default_max_tokens`). A body that cannot be read (rule 3),
   or whose prompt is not where the policy says, is `Unreadable`; the model's
   `tokens.unreadable` then refuses it (core.decide) or charges it the most its buckets hold
   (`charge_max`: `CHARGE_MAX`, which core.decide turns into the tenant's smallest cost-bucket
   burst).
5. The real cost = prompt_weight * prompt tokens + output_weight * tokens generated.
   Generated tokens are read from the response: the whole JSON body, or every `data:` event of
   a generate_stream (server-sent events) response, summed. Prompt tokens are the response's
   own count where the policy names one (`response_prompt_tokens`; the largest seen in a
   stream), else the estimate's. A 4xx from Triton refused the request: nothing ran, the whole
   charge comes back. Another error response (5xx) generated nothing. A successful response
   whose usage cannot be found leaves the charge standing: the tenant pays what it was
   charged, never less by accident (`settlement`).
6. Nothing here raises on what a client or Triton sent; sizes are bounded (`MAX_JSON_BYTES`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping

from sidecar.core.kserve import (
    INFER_HEADER_LENGTH,
    Unreadable,
    binary_tensors,
    decode_body,
    decode_tensor,
)
from sidecar.core.record import record
from sidecar.policy.model import TokenPolicy, UnreadableBody

# The most this module decodes from one body or one stream event, and the most a compressed
# body may inflate to: 8x Envoy's default 1 MiB buffer limit, which bounds the bodies the
# sidecar is sent. A larger body is Unreadable; a zip bomb costs at most this much inflating.
MAX_JSON_BYTES = 8 * 1024 * 1024
# Rule 4, `charge_max`: a cost no bucket can hold, which core.decide lowers to what the
# tenant's cost buckets can.
CHARGE_MAX = math.inf
# Nested lists deeper than this are not counted (tensors have a few dimensions, not hundreds).
_MAX_DEPTH = 32


@record
class TokenEstimate:
    """A request's cost as estimated at admission, and what it was made from."""

    prompt_tokens: int
    max_tokens: int
    cost: float
    why: str  # for the decision trace
    readable: bool = True  # False: charged CHARGE_MAX, its prompt and max tokens unknown

    def actual_cost(self, policy: TokenPolicy, generated: int, prompt: int | None = None) -> float:
        """Rule 5: the cost of this request had it generated `generated` tokens from a prompt
        of `prompt` tokens (default: the estimate's)."""
        prompt = self.prompt_tokens if prompt is None else prompt
        return policy.prompt_weight * prompt + policy.output_weight * generated


def charge_max(problem: Unreadable) -> TokenEstimate:
    """Rule 4 for `tokens.unreadable: charge_max`."""
    why = f"body unreadable ({problem.why}): charged the most its cost buckets hold"
    return TokenEstimate(0, 0, CHARGE_MAX, why, readable=False)


def priced(policy: TokenPolicy, found: TokenEstimate | Unreadable) -> TokenEstimate | Unreadable:
    """Rule 4's choice for what cannot be read: the estimate, `charge_max`'s, or the
    Unreadable to refuse (core.decide.refuse_unreadable)."""
    if isinstance(found, Unreadable) and policy.unreadable is UnreadableBody.CHARGE_MAX:
        return charge_max(found)
    return found


def estimate(
    policy: TokenPolicy, headers: Mapping[str, str], body: bytes
) -> TokenEstimate | Unreadable:
    """Rule 4 for one buffered request body."""
    read = _read(headers, body, "inputs")
    if isinstance(read, Unreadable):
        return read
    document, binary = read
    prompt: int | None = 0
    if policy.prompt_tokens is not None:
        prompt = _count(_request_value(document, binary, policy.prompt_tokens), None)
        where = policy.prompt_tokens
    elif policy.prompt_text is not None:
        value = _request_value(document, binary, policy.prompt_text)
        prompt = _count(value, policy.chars_per_token)
        where = policy.prompt_text
    if prompt is None:
        return Unreadable(f"prompt {where!r} not found in the request")
    limit = None
    if policy.max_tokens is not None:
        limit = _count(_request_value(document, binary, policy.max_tokens), None)
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
    """Counts the tokens a response generated (rule 5), fed the response body as it passes.

    For a generate_stream response every complete `data:` line is decoded as it arrives
    (events may be split across chunks; only the unfinished line is kept). Any other response
    is kept, up to `MAX_JSON_BYTES`, and decoded once at the end (inflated and with its binary
    outputs, as a request is read).
    """

    def __init__(self, policy: TokenPolicy, *, streamed: bool) -> None:
        self._policy = policy
        self._streamed = streamed
        self._pending = bytearray()
        self._generated = 0
        self._found = False  # usage was seen in at least one event or body
        self._prompt: int | None = None  # the largest prompt count the response reported
        self._too_large = False
        self.status: int | None = None  # the response's HTTP status, when known
        self._headers: Mapping[str, str] = {}

    def on_headers(self, status: int | None, headers: Mapping[str, str]) -> None:
        self.status = status
        self._headers = headers

    @property
    def rejected(self) -> bool:
        """Triton refused the request (4xx): it never ran."""
        return self.status is not None and 400 <= self.status < 500

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

    def prompt(self) -> int | None:
        """The prompt tokens the response reported (`response_prompt_tokens`), or None."""
        return self._prompt

    def finish(self) -> int | None:
        """The tokens generated, once the whole response has been fed."""
        if self._streamed:
            self._event_line(bytes(self._pending))
        elif not self._too_large:
            read = _read(self._headers, bytes(self._pending), "outputs")
            if not isinstance(read, Unreadable):
                self._add(*read)
        self._pending.clear()
        return self.generated()

    def _event_line(self, line: bytes) -> None:
        if not line.startswith(b"data:"):
            return  # blank separators, comments, `event:` and `id:` lines
        read = _read({}, line[5:].strip(), "outputs")
        if not isinstance(read, Unreadable):
            self._add(*read)

    def _add(self, document: dict[str, object], binary: dict[str, object]) -> None:
        policy = self._policy
        name = policy.output_tokens or policy.output_text
        per_token = None if policy.output_tokens is not None else policy.chars_per_token
        counted = (
            None if name is None else _count(_response_value(document, binary, name), per_token)
        )
        if counted is not None:
            self._generated += counted
            self._found = True
        if policy.response_prompt_tokens is not None:
            value = _response_value(document, binary, policy.response_prompt_tokens)
            prompt = _count(value, None)
            if prompt is not None:
                self._prompt = max(prompt, self._prompt or 0)


def settlement(
    policy: TokenPolicy,
    estimate: TokenEstimate,
    charged: float,
    meter: UsageMeter,
    *,
    ended: bool,
) -> tuple[float | None, str]:
    """Rule 5: what to charge (refund, negative) on top of `charged`, the cost units the admit
    took, once its response ended (`ended`) or was cut short; None to leave the charge standing.
    With it, why (the `qos_token_accounting_total` result)."""
    if meter.rejected:
        return -charged, "refunded_rejected"
    generated = meter.finish() if ended else meter.generated()
    if generated is None:
        return None, "no_usage" if ended else "unfinished"
    prompt = meter.prompt()
    if prompt is None and not estimate.readable:
        return None, "no_usage"  # no prompt count to make a charge_max good with
    return estimate.actual_cost(policy, generated, prompt) - charged, "reconciled"


def _read(
    headers: Mapping[str, str], body: bytes, tensors: str
) -> tuple[dict[str, object], dict[str, object]] | Unreadable:
    """Rule 3: the body's top-level JSON object and its binary `tensors` (inputs or outputs)
    decoded, by name."""
    decoded = decode_body(headers, body, MAX_JSON_BYTES)
    if isinstance(decoded, Unreadable):
        return decoded
    binary_length = headers.get(INFER_HEADER_LENGTH)
    rest = b""
    if binary_length is not None:
        length = int(binary_length) if binary_length.strip().isdigit() else -1
        if not 0 < length <= len(decoded):
            return Unreadable("inference-header-content-length does not fit the body")
        decoded, rest = decoded[:length], decoded[length:]
    document = _json_object(decoded)
    if isinstance(document, Unreadable):
        return document
    raw = binary_tensors(document.get(tensors), rest) if binary_length is not None else {}
    if isinstance(raw, Unreadable):
        return raw
    types = {
        t.get("name"): t.get("datatype")
        for t in reversed(_as_list(document.get(tensors)))
        if isinstance(t, dict)
    }
    binary: dict[str, object] = {
        name: decode_tensor(types.get(name), data) for name, data in raw.items()
    }
    return document, binary


def _first_copy(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Rule 3: of keys given twice, the first copy counts, as in Triton."""
    document: dict[str, object] = {}
    for key, value in pairs:
        document.setdefault(key, value)
    return document


def _json_object(body: bytes) -> dict[str, object] | Unreadable:
    """The body's top-level JSON object, or why there is none."""
    if len(body) > MAX_JSON_BYTES:
        return Unreadable(f"body larger than {MAX_JSON_BYTES} bytes")
    try:
        document = json.loads(body, object_pairs_hook=_first_copy)
    except (ValueError, RecursionError):  # not JSON, not UTF-8, absurd nesting
        return Unreadable("body is not JSON")
    if not isinstance(document, dict):
        return Unreadable("body is not a JSON object")
    return document


def _as_list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def _request_value(document: dict[str, object], binary: dict[str, object], name: str) -> object:
    found = _tensor_data(document.get("inputs"), binary, name)
    if found is not None:
        return found
    if name in document:
        return document[name]
    parameters = document.get("parameters")
    return parameters.get(name) if isinstance(parameters, dict) else None


def _response_value(document: dict[str, object], binary: dict[str, object], name: str) -> object:
    found = _tensor_data(document.get("outputs"), binary, name)
    return found if found is not None else document.get(name)


def _tensor_data(tensors: object, binary: dict[str, object], name: str) -> object:
    for tensor in _as_list(tensors):
        if isinstance(tensor, dict) and tensor.get("name") == name:
            # The first tensor of a name, as binary_tensors; its binary data if it has some.
            return binary.get(name) if name in binary else tensor.get("data")
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
