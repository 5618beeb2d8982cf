"""A class that none of a tenant's limits bound is named (core/policy_notes.py rule 2): the
load rules judge the class, not the tenant, so such a tenant's requests of that class are
bounded by nothing of its own. A note, not an error: `qos-sidecar validate` still succeeds."""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.cli import validate
from sidecar.core.policy_notes import policy_notes, unbounded_classes, weights_without_effect
from sidecar.policy.loader import load_policy
from sidecar.policy.reload import PolicyHolder
from tests.test_leases_without_effect import EXACT, LEASED, write

STANDARD_ONLY = {**EXACT, "classes": ["standard"]}


def unbounded(tmp_path: Path, **tenant: Any) -> list[str]:
    return unbounded_classes(load_policy([write(tmp_path, **tenant)]))


def test_a_class_left_out_of_every_bucket_is_named(tmp_path: Path) -> None:
    (note,) = unbounded(tmp_path, buckets=[STANDARD_ONLY])
    assert note == (
        "tenant 'acme', class 'interactive': in none of its buckets and under no concurrency"
        " limit, so only the load bounds its requests of that class"
    )


@pytest.mark.parametrize(
    "tenant",
    [
        {},  # no limit at all: unlimited on purpose
        {"buckets": [EXACT]},  # a bucket without classes covers every class
        {"buckets": [STANDARD_ONLY, {**EXACT, "name": "i", "classes": ["interactive"]}]},
        {"buckets": [STANDARD_ONLY], "max_concurrency": 4},  # the tenant's, every class
        {"buckets": [STANDARD_ONLY], "max_concurrency_per_class": {"interactive": 2}},
    ],
)
def test_a_class_some_limit_bounds_gets_no_note(tmp_path: Path, tenant: dict[str, Any]) -> None:
    assert unbounded(tmp_path, **tenant) == []


def test_a_per_class_concurrency_limit_alone_bounds_only_its_class(tmp_path: Path) -> None:
    (note,) = unbounded(tmp_path, max_concurrency_per_class={"standard": 2})
    assert note.startswith("tenant 'acme', class 'interactive':")


def test_an_excess_class_no_limit_bounds_is_named_though_not_allowed(tmp_path: Path) -> None:
    """What is over the interactive bucket goes as standard, which no bucket covers: bounded
    by the load alone, as a class the tenant may ask for would be."""
    bucket = {**EXACT, "name": "i", "classes": ["interactive"], "excess_class": "standard"}
    only = {"allowed_classes": ["interactive"], "default_class": "interactive"}
    (note,) = unbounded(tmp_path, buckets=[bucket], **only)
    assert note.startswith("tenant 'acme', class 'standard':")
    assert unbounded(tmp_path, buckets=[bucket, STANDARD_ONLY], **only) == []


def test_the_leased_notes_come_first_and_validate_prints_both(tmp_path: Path) -> None:
    path = write(tmp_path, buckets=[{**LEASED, "classes": ["standard"]}, STANDARD_ONLY])
    leased, open_class = policy_notes(load_policy([path]))
    assert "lease_ms 100 has no effect" in leased
    assert "class 'interactive'" in open_class
    out, err = io.StringIO(), io.StringIO()
    assert validate([path], out=out, err=err) == 0
    assert err.getvalue().splitlines() == [f"note: {leased}", f"note: {open_class}"]


def test_a_sidecar_logs_it_when_it_loads_the_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="sidecar.policy.reload"):
        PolicyHolder([write(tmp_path, buckets=[STANDARD_ONLY])])
    assert [r for r in caplog.records if "only the load bounds" in r.getMessage()]


def test_a_weight_where_no_class_of_the_tenant_holds_is_named(tmp_path: Path) -> None:
    """Weights order held requests only: in a policy whose classes never hold (max_wait_ms 0
    here, with overload rules or without), a tenant's weight changes nothing."""
    for overload in (None, {"admit_below": 2, "shed_above": 8}):
        policy = load_policy([write(tmp_path, overload=overload, weight=3)])
        (note,) = weights_without_effect(policy)
        assert note.startswith("tenant 'acme': its weight 3 changes nothing")
        assert note in policy_notes(policy)
    assert weights_without_effect(load_policy([write(tmp_path, weight=1)])) == []


def test_a_weight_is_not_named_where_a_class_it_can_reach_holds(tmp_path: Path) -> None:
    """Standard may hold; the tenant reaches it by asking, or only by relegation."""
    path = write(tmp_path, overload={"admit_below": 2, "shed_above": 8}, weight=3)
    doc = yaml.safe_load(path.read_text())
    doc["classes"]["standard"]["max_wait_ms"] = 500
    path.write_text(yaml.safe_dump(doc))
    assert weights_without_effect(load_policy([path])) == []
    doc["tenants"]["acme"] |= {"allowed_classes": ["interactive"], "default_class": "interactive"}
    doc["classes"]["interactive"]["relegate_to"] = "standard"
    path.write_text(yaml.safe_dump(doc))
    assert weights_without_effect(load_policy([path])) == []
    del doc["classes"]["interactive"]["relegate_to"]
    path.write_text(yaml.safe_dump(doc))
    assert len(weights_without_effect(load_policy([path]))) == 1
