"""The shape of one policy file, declared once, and the JSON Schema rendered from it.

Rules:
- `POLICY_FILE` below is the only description of which keys a policy file may hold, their
  types, allowed values, minimums, defaults and required keys. The loader walks YAML with it
  (`sidecar.policy.loader`) and `render_schema()` turns it into JSON Schema (draft 2020-12), so
  the schema editors use and the checks the sidecar runs cannot drift apart.
- Everything a single file can get wrong is in the tables: types, enums, ranges, patterns,
  unknown keys, keys required or forbidden depending on another key (`Rule`), and pairs of
  keys that exclude each other (`Exclusive`). What needs the whole set of files (a class
  defined in another file, one tenant per API key) is checked by the loader after merging, and
  cannot be expressed here.
- `python -m sidecar.policy.schema > policies/schema.json` regenerates the committed schema; a
  test fails when the committed copy is stale.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, TypeAlias

from sidecar.policy.model import (
    BucketUnit,
    DisallowedClassAction,
    FailMode,
    IdentitySourceKind,
    RoutePriority,
    StaleAction,
    UnknownTenantAction,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"


@dataclass(frozen=True, slots=True)
class Str:
    min_length: int = 0
    max_length: int | None = None
    # Matched with re.fullmatch by the loader. Kept to the subset of regex syntax that Python
    # and ECMA-262 (what JSON Schema validators use) read the same way.
    pattern: str | None = None
    pattern_hint: str = ""  # what a matching value looks like, for error messages
    lower: bool = False  # normalised to lower case once valid
    # Never echo the value in an error: someone may have pasted a plain API key where its
    # digest belongs, and errors end up in logs and CI output.
    secret: bool = False


@dataclass(frozen=True, slots=True)
class Int:
    minimum: int | None = None


@dataclass(frozen=True, slots=True)
class Num:
    """A finite int or float (YAML `.inf` and `.nan` are refused)."""

    minimum: float | None = None
    exclusive_minimum: float | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """One of a fixed set of strings; converted to a member of `enum` when one is given."""

    values: tuple[str, ...]
    enum: type[Enum] | None = None

    @classmethod
    def of(cls, enum_type: type[Enum]) -> Choice:
        return cls(tuple(str(m.value) for m in enum_type), enum_type)


@dataclass(frozen=True, slots=True)
class ListOf:
    item: Spec
    min_items: int = 0


@dataclass(frozen=True, slots=True)
class MapOf:
    """A mapping from names the user picks (class names, tenant names) to values."""

    key: Str
    value: Spec
    # What one entry is called in messages ("class", "tenant"). Named entries may be defined
    # once across all files; the loader reports a second definition with both places.
    entity: str


@dataclass(frozen=True, slots=True)
class Field:
    spec: Spec
    required: bool = False
    description: str = ""
    # The value used when the key is absent; None means "no value" (the field is optional and
    # the model has no default to show). Enum members are written as their value in the schema.
    default: object = None


@dataclass(frozen=True, slots=True)
class Rule:
    """When `when_key` holds one of `when_values`, `require` keys must and `forbid` keys must
    not be present."""

    when_key: str
    when_values: tuple[str, ...]
    require: tuple[str, ...] = ()
    forbid: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Exclusive:
    """The two `keys` must not both be present: they are two ways of giving the same thing."""

    keys: tuple[str, str]


@dataclass(frozen=True, slots=True)
class Obj:
    name: str  # the $defs name in the schema
    fields: Mapping[str, Field]
    description: str = ""
    rules: tuple[Rule | Exclusive, ...] = field(default=())

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(k for k, f in self.fields.items() if f.required)


Spec: TypeAlias = Str | Int | Num | Choice | ListOf | MapOf | Obj

# Names end up in HTTP headers, metric labels and log lines: any printable text, but no
# control characters or line separators (which would let a name forge a header or a log line).
NAME = Str(
    min_length=1,
    max_length=128,
    pattern=r"^[^\x00-\x1f\x7f-\x9f\u2028\u2029]+$",
    pattern_hint="free of control characters and line separators",
)
# Bucket names go into store keys and metric labels, so they stay short and plain.
BUCKET_NAME = Str(
    min_length=1,
    max_length=32,
    pattern=r"^[a-z0-9_-]{1,32}$",
    pattern_hint="1 to 32 of a-z, 0-9, '_' and '-'",
)
# RFC 9110 token characters. Envoy hands header names to the sidecar in lower case, so the
# loader lower-cases them too and a policy written `X-Api-Key` still matches.
HEADER_NAME = Str(
    min_length=1,
    pattern=r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$",
    pattern_hint="a header name (letters, digits and !#$%&'*+-.^_`|~)",
    lower=True,
)
SHA256_HEX = Str(
    min_length=64,
    max_length=64,
    pattern=r"^[0-9a-fA-F]{64}$",
    pattern_hint="64 hex digits (the SHA-256 digest of the key, not the key itself)",
    lower=True,
    secret=True,
)
NON_EMPTY = Str(min_length=1)

# How many seconds each `per` value spans; buckets are stored with their rate per second.
PER_SECONDS: Mapping[str, int] = {"second": 1, "minute": 60}

IDENTITY_SOURCE = Obj(
    "identitySource",
    {
        "kind": Field(
            Choice.of(IdentitySourceKind),
            required=True,
            description="api_key: a secret header matched by SHA-256 digest; principal: the "
            "mTLS peer principal Envoy verified; header: a header set by a trusted hop.",
        ),
        "header": Field(
            HEADER_NAME,
            description="The header to read, for api_key and header sources.",
        ),
    },
    description="One way to tell who the caller is.",
    rules=(
        Rule("kind", ("api_key", "header"), require=("header",)),
        Rule("kind", ("principal",), forbid=("header",)),
    ),
)

IDENTITY = Obj(
    "identity",
    {
        "sources": Field(
            ListOf(IDENTITY_SOURCE, min_items=1),
            description="Tried in order; the first source that yields a value decides, even "
            "if it matches no tenant. Default: one api_key source reading x-api-key.",
        ),
        "class_header": Field(
            HEADER_NAME,
            description="The header a client uses to ask for a class.",
            default="x-qos-class",
        ),
    },
    description="How callers are identified. At most one file may define it.",
)

UNKNOWN_TENANTS = Obj(
    "unknownTenants",
    {
        "action": Field(
            Choice.of(UnknownTenantAction),
            description="reject: 401; default: serve the caller as `tenant`.",
            default=UnknownTenantAction.REJECT,
        ),
        "tenant": Field(NAME, description="The tenant unknown callers become (action: default)."),
    },
    description="What happens to callers that match no tenant. At most one file may define it.",
    rules=(
        Rule("action", ("default",), require=("tenant",)),
        Rule("action", ("reject",), forbid=("tenant",)),
    ),
)

OVERLOAD = Obj(
    "overload",
    {
        "admit_below": Field(
            Int(minimum=0),
            required=True,
            description="Queue depth (requests waiting in Triton for the model) under which "
            "a request is admitted at once.",
        ),
        "shed_above": Field(
            Int(minimum=1),
            description="Queue depth from which the class is shed with 503 at once; without "
            "it the class is never shed by load.",
        ),
        "on_stale": Field(
            Choice.of(StaleAction),
            description="When Triton's load signals are stale or missing: saturated acts as "
            "if the queue were at shed_above, admit as if it were empty.",
            default=StaleAction.SATURATED,
        ),
        "max_in_flight": Field(
            Int(minimum=1),
            description="Admit at once only while the model has fewer requests in flight "
            "(admitted by any replica, not yet ended); above it requests are deferred as "
            "above admit_below. Exact between scrapes; keeps Triton's batches small.",
        ),
    },
    description="Backend-aware admission of a class.",
)

CLASS = Obj(
    "class",
    {
        "rank": Field(Int(minimum=1), required=True, description="1 is the most important."),
        "latency_objective_ms": Field(
            Int(minimum=1), required=True, description="The latency this class aims for."
        ),
        "max_wait_ms": Field(
            Int(minimum=0),
            required=True,
            description="How long a request may be held before it is served; 0: never held.",
        ),
        "triton_priority": Field(
            Int(minimum=1),
            required=True,
            description="Triton dynamic_batching priority level; 1 is the highest.",
        ),
        "on_state_error": Field(
            Choice.of(FailMode),
            description="When the shared quota store cannot answer: open admits without quota "
            "checks, closed sheds with 503.",
            default=FailMode.CLOSED,
        ),
        "concurrency_retry_after_ms": Field(
            Int(minimum=0),
            description="Retry-After for concurrency sheds, where no bucket says when room "
            "comes back.",
            default=1000,
        ),
        "overload": Field(
            OVERLOAD,
            description="Admission by Triton's queue depth for the model; without it, quotas "
            "alone decide.",
        ),
        "relegate_to": Field(
            NAME,
            description="A less important class that a request which cannot make its deadline "
            "is moved to, once, instead of being shed.",
        ),
        "max_queued": Field(
            Int(minimum=0),
            description="The most requests of this class held (deferred) at once per replica; "
            "beyond it they are relegated or shed.",
            default=256,
        ),
        "route_priority": Field(
            Choice.of(RoutePriority),
            description="Sent as x-qos-route-priority; the shipped Envoy config routes 'high' "
            "with route priority HIGH, which has its own circuit-breaker thresholds.",
            default=RoutePriority.DEFAULT,
        ),
    },
    description="A service class: how important a request is and how long it may wait.",
)

# Names of tensors and fields in request and response bodies, matched exactly. NAME keeps them
# printable: they can appear in log lines.
TOKENS = Obj(
    "tokens",
    {
        "prompt_tokens": Field(
            NAME,
            description="Request input (tensor, JSON field or parameter) that holds the prompt "
            "length in tokens.",
        ),
        "prompt_text": Field(
            NAME,
            description="Instead of prompt_tokens: request input that holds the prompt text, "
            "counted as characters / chars_per_token.",
        ),
        "max_tokens": Field(
            NAME,
            description="Request input that holds the most tokens the request may generate.",
        ),
        "default_max_tokens": Field(
            Int(minimum=1),
            description="Output tokens assumed at admission when the request has no max_tokens.",
            default=256,
        ),
        "output_tokens": Field(
            NAME,
            description="Response output (tensor or JSON field) that holds the tokens "
            "generated, summed over streamed responses.",
        ),
        "output_text": Field(
            NAME,
            description="Instead of output_tokens: response output that holds the generated "
            "text, counted as characters / chars_per_token and summed over streamed responses.",
        ),
        "chars_per_token": Field(
            Num(exclusive_minimum=0),
            description="Characters per token, to count prompt_text and output_text in tokens.",
            default=4.0,
        ),
        "prompt_weight": Field(
            Num(minimum=0), description="Cost units per prompt token.", default=1.0
        ),
        "output_weight": Field(
            Num(minimum=0),
            description="Cost units per output token: max tokens at admission, tokens "
            "generated once the response ends.",
            default=1.0,
        ),
    },
    description="Charge `cost` buckets by tokens: prompt_weight * prompt tokens + "
    "output_weight * output tokens. Needs the ext_proc mode; ext_authz modes never see bodies "
    "and charge cost_per_request.",
    rules=(
        Exclusive(("prompt_tokens", "prompt_text")),
        Exclusive(("output_tokens", "output_text")),
    ),
)

MODEL = Obj(
    "model",
    {
        "cost_per_request": Field(
            Num(exclusive_minimum=0),
            description="Cost units one request to this model takes from `cost` buckets when "
            "its cost cannot be estimated from its body (ext_authz modes, no `tokens`, a body "
            "that cannot be read).",
            default=1.0,
        ),
        "tokens": Field(
            TOKENS,
            description="Estimate each request's cost from its token counts (ext_proc mode "
            "only); without it every request costs cost_per_request.",
        ),
    },
    description="Per-model settings; models not listed cost 1 unit per request.",
)

TENANT_MATCH = Obj(
    "tenantMatch",
    {
        "api_key_sha256": Field(
            ListOf(SHA256_HEX),
            description="SHA-256 hex digests of the tenant's API keys (printf %s KEY | sha256sum).",
        ),
        "principals": Field(
            ListOf(NON_EMPTY), description="mTLS peer principals (URI SANs), exactly."
        ),
        "header_values": Field(
            ListOf(NON_EMPTY), description="Values of a `header` identity source, exactly."
        ),
    },
    description="How a caller is recognised as this tenant.",
)

BUCKET = Obj(
    "bucket",
    {
        "name": Field(
            BUCKET_NAME,
            description="Unique within the tenant; used in store keys and metrics. "
            "Default: the unit.",
        ),
        "unit": Field(
            Choice.of(BucketUnit),
            required=True,
            description="requests: 1 per request; cost: the request's cost (its model's "
            "token estimate in ext_proc mode, else its cost_per_request).",
        ),
        "rate": Field(
            Num(exclusive_minimum=0), required=True, description="Sustained units per `per`."
        ),
        "per": Field(
            Choice(tuple(PER_SECONDS)), description="The rate's period.", default="second"
        ),
        "burst": Field(
            Num(minimum=1), required=True, description="Units that may be used at once."
        ),
        "classes": Field(
            ListOf(NAME, min_items=1),
            description="Only requests of these classes draw on the bucket; default: all.",
        ),
    },
    description="A token bucket: `rate` units per `per` sustained, `burst` at once.",
)

TENANT = Obj(
    "tenant",
    {
        "match": Field(TENANT_MATCH, description="Without it only unknown_tenants reaches it."),
        "allowed_classes": Field(
            ListOf(NAME, min_items=1), required=True, description="Classes the tenant may use."
        ),
        "default_class": Field(
            NAME,
            required=True,
            description="The class of requests that ask for none; one of allowed_classes.",
        ),
        "on_disallowed_class": Field(
            Choice.of(DisallowedClassAction),
            description="When a request asks for a class it may not use: downgrade serves it "
            "in default_class, reject sheds it with 403.",
            default=DisallowedClassAction.DOWNGRADE,
        ),
        "buckets": Field(ListOf(BUCKET), description="Every bucket must have room to admit."),
        "max_concurrency": Field(
            Int(minimum=1), description="Requests in flight at once; absent: no limit."
        ),
        "max_concurrency_per_class": Field(
            MapOf(NAME, Int(minimum=1), entity="class"),
            description="Requests in flight at once, per allowed class.",
        ),
    },
    description="A caller of the service and its limits.",
)

POLICY_FILE = Obj(
    "policyFile",
    {
        "identity": Field(IDENTITY),
        "lease_ttl_s": Field(
            Num(exclusive_minimum=0),
            description="A lost completion frees its concurrency slot after this long at most. "
            "At most one file may set it.",
            default=300.0,
        ),
        "unknown_tenants": Field(UNKNOWN_TENANTS),
        "classes": Field(MapOf(NAME, CLASS, entity="class"), description="Service classes."),
        "models": Field(
            MapOf(NAME, MODEL, entity="model"), description="Per-model costs and token counting."
        ),
        "tenants": Field(MapOf(NAME, TENANT, entity="tenant"), description="Tenants."),
    },
    description="One qos-sidecar policy file. Several files are merged into one policy; each "
    "class, tenant and model is defined once across all of them.",
)


def render_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of one policy file."""
    defs: dict[str, Any] = {}
    root = _object_schema(POLICY_FILE, defs)
    return {
        "$schema": SCHEMA_DIALECT,
        "title": "qos-sidecar policy file",
        **root,
        "$defs": dict(sorted(defs.items())),
    }


def render_schema_text() -> str:
    """The schema as committed in policies/schema.json: stable key order, trailing newline."""
    return json.dumps(render_schema(), indent=2, ensure_ascii=False) + "\n"


def _spec_schema(spec: Spec, defs: dict[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Obj):
        if spec.name not in defs:
            defs[spec.name] = {}  # reserve the name first, so recursion would terminate
            defs[spec.name] = _object_schema(spec, defs)
        return {"$ref": f"#/$defs/{spec.name}"}
    if isinstance(spec, Str):
        out: dict[str, Any] = {"type": "string"}
        if spec.min_length:
            out["minLength"] = spec.min_length
        if spec.max_length is not None:
            out["maxLength"] = spec.max_length
        if spec.pattern is not None:
            out["pattern"] = spec.pattern
        return out
    if isinstance(spec, Int):
        out = {"type": "integer"}
        if spec.minimum is not None:
            out["minimum"] = spec.minimum
        return out
    if isinstance(spec, Num):
        out = {"type": "number"}
        if spec.minimum is not None:
            out["minimum"] = spec.minimum
        if spec.exclusive_minimum is not None:
            out["exclusiveMinimum"] = spec.exclusive_minimum
        return out
    if isinstance(spec, Choice):
        return {"type": "string", "enum": list(spec.values)}
    if isinstance(spec, ListOf):
        out = {"type": "array", "items": _spec_schema(spec.item, defs)}
        if spec.min_items:
            out["minItems"] = spec.min_items
        return out
    # MapOf: the keys are the user's names, the values all share one shape.
    return {
        "type": "object",
        "propertyNames": _spec_schema(spec.key, defs),
        "additionalProperties": _spec_schema(spec.value, defs),
    }


def _object_schema(obj: Obj, defs: dict[str, Any]) -> dict[str, Any]:
    properties: dict[str, Any] = {}
    for key, fld in obj.fields.items():
        prop = _spec_schema(fld.spec, defs)
        if fld.description:
            prop["description"] = fld.description
        if fld.default is not None:
            prop["default"] = _jsonable(fld.default)
        properties[key] = prop
    out: dict[str, Any] = {"type": "object"}
    if obj.description:
        out["description"] = obj.description
    out["properties"] = properties
    if obj.required:
        out["required"] = list(obj.required)
    out["additionalProperties"] = False
    if obj.rules:
        out["allOf"] = [_rule_schema(rule) for rule in obj.rules]
    return out


def _rule_schema(rule: Rule | Exclusive) -> dict[str, Any]:
    if isinstance(rule, Exclusive):
        return {"not": {"required": list(rule.keys)}}
    then: dict[str, Any] = {}
    if rule.require:
        then["required"] = list(rule.require)
    if rule.forbid:
        then["not"] = {"anyOf": [{"required": [key]} for key in rule.forbid]}
    return {
        "if": {
            "properties": {rule.when_key: {"enum": list(rule.when_values)}},
            "required": [rule.when_key],
        },
        "then": then,
    }


def _jsonable(value: object) -> object:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"default {value!r} has no JSON form")
    return value


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_schema_text())
