"""The JSON Schema (draft 2020-12) of one policy file, rendered from the model's declarations.

Rules:
- Nothing here declares a key: each section's `Obj` table is derived from its model class
  (`sidecar.policy.model`, see `spec.py`). The loader walks YAML with the same tables, so the
  schema editors use and the checks the sidecar runs cannot drift apart.
- What needs the whole set of files (a class defined in another file, one tenant per API key)
  is checked by the loader after merging (`checks.py`) and cannot be expressed here.
- `python -m sidecar.policy.schema > policies/schema.json` regenerates the committed schema; a
  test fails when the committed copy is stale.
"""

from __future__ import annotations

import json
import math
from enum import Enum
from typing import Any

from sidecar.policy.model import (
    BucketPolicy,
    ClassPolicy,
    IdentityPolicy,
    IdentitySource,
    ModelPolicy,
    OverloadPolicy,
    Policy,
    TenantMatch,
    TenantPolicy,
    TokenPolicy,
    UnknownTenantPolicy,
)
from sidecar.policy.spec import (
    Bool,
    Choice,
    Exclusive,
    Int,
    ListOf,
    Num,
    Obj,
    Rule,
    Spec,
    Str,
    section_spec,
)

SCHEMA_DIALECT = "https://json-schema.org/draft/2020-12/schema"

# Each section of a policy file, by the name the schema's $defs give it.
POLICY_FILE = section_spec(Policy)
IDENTITY = section_spec(IdentityPolicy)
IDENTITY_SOURCE = section_spec(IdentitySource)
UNKNOWN_TENANTS = section_spec(UnknownTenantPolicy)
CLASS = section_spec(ClassPolicy)
OVERLOAD = section_spec(OverloadPolicy)
MODEL = section_spec(ModelPolicy)
TOKENS = section_spec(TokenPolicy)
TENANT = section_spec(TenantPolicy)
TENANT_MATCH = section_spec(TenantMatch)
BUCKET = section_spec(BucketPolicy)


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
        if spec.maximum is not None:
            out["maximum"] = spec.maximum
        return out
    if isinstance(spec, Choice):
        return {"type": "string", "enum": list(spec.values)}
    if isinstance(spec, Bool):
        return {"type": "boolean"}
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
            prop["default"] = jsonable(fld.default)
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


def jsonable(value: object) -> object:
    """A default as JSON (and the reference doc) writes it."""
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"default {value!r} has no JSON form")
    return value


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_schema_text())
