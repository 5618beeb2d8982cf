"""The committed JSON Schema and reference doc are the generated ones; the schema agrees with
the loader."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.policy.reference import render_reference
from sidecar.policy.schema import render_schema, render_schema_text

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
CASES = Path(__file__).resolve().parent / "policy_cases"

# Broken cases whose every problem lies within the one file, so the schema must reject them
# too. The others need the whole policy (references, duplicates) or are not YAML at all.
SINGLE_FILE_CASES = [
    "unknown_key.yaml",
    "wrong_type.yaml",
    "bad_enum.yaml",
    "negative_rate.yaml",
    "burst_below_one.yaml",
    "out_of_range.yaml",
    "missing_required.yaml",
    "bad_sha.yaml",
    "identity_rules.yaml",
    "unknown_tenant_without_tenant.yaml",
    "unknown_tenant_reject_with_tenant.yaml",
    "top_level_list.yaml",
    "tokens_exclusive.yaml",
    "tokens_out_of_range.yaml",
    "tokens_wrong_type.yaml",
]


def test_committed_schema_is_the_generated_one() -> None:
    committed = (POLICIES / "schema.json").read_text()
    assert committed == render_schema_text(), (
        "policies/schema.json is stale: python -m sidecar.policy.schema > policies/schema.json"
    )


def test_committed_reference_is_the_generated_one() -> None:
    committed = (ROOT / "docs" / "policy-reference.md").read_text()
    assert committed == render_reference(), (
        "docs/policy-reference.md is stale: "
        "python -m sidecar.policy.reference > docs/policy-reference.md"
    )


@pytest.mark.parametrize(
    ("module", "render"),
    [("sidecar.policy.schema", render_schema_text), ("sidecar.policy.reference", render_reference)],
)
def test_module_prints_what_is_committed(module: str, render: Callable[[], str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", module],
        check=True,
        capture_output=True,
        text=True,
        cwd=ROOT,
    ).stdout
    assert out == render()


def test_reference_shows_every_key_and_its_default() -> None:
    reference = render_reference()
    assert "## `tenants.<tenant>.buckets[]`" in reference
    assert "| `max_queued` | integer ≥ 0 | `1024` |" in reference
    assert "| `rate` | number > 0 | required |" in reference
    assert "- Give at most one of `prompt_tokens` and `prompt_text`." in reference


def test_schema_shape() -> None:
    schema = render_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert set(schema["properties"]) == {
        "identity",
        "lease_ttl_s",
        "replicas",
        "enforce",
        "unknown_tenants",
        "classes",
        "models",
        "tenants",
    }
    # Every object refuses unknown keys, like the loader.
    for name, definition in schema["$defs"].items():
        assert definition["additionalProperties"] is False, name
    assert schema["$defs"]["class"]["required"] == [
        "rank",
        "latency_objective_ms",
        "max_wait_ms",
        "triton_priority",
    ]
    assert schema["$defs"]["bucket"]["properties"]["burst"]["minimum"] == 1


def _validator() -> Any:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((POLICIES / "schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


@pytest.mark.parametrize("name", sorted(p.name for p in POLICIES.glob("*.yaml")))
def test_examples_validate_against_the_schema(name: str) -> None:
    validator = _validator()
    document = yaml.safe_load((POLICIES / name).read_text())
    assert [e.message for e in validator.iter_errors(document)] == []


@pytest.mark.parametrize("name", SINGLE_FILE_CASES)
def test_schema_rejects_what_the_loader_rejects(name: str) -> None:
    validator = _validator()
    document = yaml.safe_load((CASES / name).read_text())
    assert list(validator.iter_errors(document)) != []


@pytest.mark.parametrize(
    ("tokens", "valid"),
    [
        ({"prompt_tokens": "P", "output_tokens": "O"}, True),
        ({"prompt_text": "p", "output_text": "o"}, True),
        ({}, True),
        ({"prompt_tokens": "P", "prompt_text": "p"}, False),
        ({"output_tokens": "O", "output_text": "o"}, False),
    ],
)
def test_schema_tokens_names_exclude_each_other(tokens: dict[str, str], valid: bool) -> None:
    validator = _validator()
    document = {"models": {"llm": {"tokens": tokens}}}
    assert validator.is_valid(document) is valid
