"""A `lease_ms` that no request can use is named, not silently ignored: leased mode applies
only to requests that need no lease in their tenant's sets (`core.slices.applies`), so a
tenant with a concurrency limit, or an exact bucket or class limit on every class a leased
bucket covers, runs the bucket exactly. A class that counts its model's requests does not:
those requests' leases live in the model's set alone. `qos-sidecar validate` prints a note
(and still succeeds); a sidecar logs it when it loads the policy, and its admin `/v1/policy`
lists it under `notes`."""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from sidecar.admin.http import build_admin_app
from sidecar.cli import validate
from sidecar.core.slices import leases_without_effect
from sidecar.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.policy.reload import PolicyHolder
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore


def write(
    tmp_path: Path,
    *,
    overload: dict[str, Any] | None = None,
    enforce: bool = True,
    **tenant: Any,
) -> Path:
    standard: dict[str, Any] = {"rank": 2, "latency_objective_ms": 2000, "max_wait_ms": 0}
    standard["triton_priority"] = 2
    if overload is not None:
        standard["overload"] = overload
    if not enforce:  # the class's overload rules in shadow mode
        standard["enforce"] = False
    doc = {
        "identity": {"sources": [{"kind": "api_key", "header": "x-api-key"}]},
        "classes": {
            "interactive": {
                "rank": 1,
                "latency_objective_ms": 500,
                "max_wait_ms": 0,
                "triton_priority": 1,
            },
            "standard": standard,
        },
        "tenants": {
            "acme": {
                "match": {"api_key_sha256": ["a" * 64]},
                "allowed_classes": ["interactive", "standard"],
                "default_class": "standard",
                **tenant,
            }
        },
    }
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


LEASED = {"name": "req", "unit": "requests", "rate": 10, "burst": 20, "lease_ms": 100}
EXACT = {"name": "tok", "unit": "requests", "rate": 10, "burst": 20}


def notes(path: Path) -> list[str]:
    return leases_without_effect(load_policy([path]))


def test_a_leased_bucket_that_requests_can_spend_gets_no_note(tmp_path: Path) -> None:
    assert notes(write(tmp_path, buckets=[LEASED])) == []
    # An exact bucket for one class leaves the other class's requests to the slices.
    assert notes(write(tmp_path, buckets=[LEASED, {**EXACT, "classes": ["standard"]}])) == []
    # A class overload that does not read the model's count changes nothing.
    overload = {"admit_below": 4, "shed_above": 8}
    assert notes(write(tmp_path, overload=overload, buckets=[LEASED])) == []


def test_a_class_that_counts_its_model_leaves_leased_mode_in_effect(tmp_path: Path) -> None:
    # A counted request's lease is its model's entry alone: its bucket is spent from slices.
    for overload in (
        {"admit_below": 4, "shed_above": 8, "max_in_flight": 3},
        {"admit_below": 4, "shed_above": 8, "protect": "balanced"},
    ):
        assert notes(write(tmp_path, overload=overload, buckets=[LEASED])) == []


def test_a_tenant_concurrency_limit_or_an_exact_bucket_on_every_class(tmp_path: Path) -> None:
    (note,) = notes(write(tmp_path, buckets=[LEASED], max_concurrency=5))
    assert "max_concurrency" in note
    (note,) = notes(write(tmp_path, buckets=[LEASED, EXACT]))  # EXACT covers both classes
    assert "without lease_ms" in note
    # Per-class limits on both classes the bucket covers: none of its requests is leased.
    limits = {"interactive": 2, "standard": 2}
    assert len(notes(write(tmp_path, buckets=[LEASED], max_concurrency_per_class=limits))) == 1
    assert notes(write(tmp_path, buckets=[LEASED], max_concurrency_per_class={"standard": 2})) == []


def test_a_shadow_class_limit_leaves_leased_mode_in_effect(tmp_path: Path) -> None:
    # Requests are decided with the policy as enforced: a per-class limit of a class whose
    # rules are in shadow mode is taken out, so that class's requests spend the slices.
    limits = {"interactive": 2, "standard": 2}
    path = write(tmp_path, enforce=False, buckets=[LEASED], max_concurrency_per_class=limits)
    assert len(notes(path)) == 1  # as written, both classes take a lease in the store
    out, err = io.StringIO(), io.StringIO()
    assert validate([path], out=out, err=err) == 0
    assert err.getvalue() == ""


def test_validate_prints_the_note_and_succeeds(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    path = write(tmp_path, buckets=[LEASED], max_concurrency=5)
    assert validate([path], out=out, err=err) == 0
    assert out.getvalue().startswith("ok: 2 classes, 1 tenants")
    assert err.getvalue().startswith("note: tenant 'acme', bucket 'req': lease_ms 100")
    out, err = io.StringIO(), io.StringIO()
    assert validate([write(tmp_path, buckets=[LEASED])], out=out, err=err) == 0
    assert err.getvalue() == ""


def test_a_sidecar_logs_the_note_when_it_loads_the_policy(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = write(tmp_path, buckets=[LEASED], max_concurrency=5)
    with caplog.at_level(logging.WARNING, logger="sidecar.policy.reload"):
        holder = PolicyHolder([path])
    assert [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
    caplog.clear()
    write(tmp_path, buckets=[LEASED])  # fixed: the reload says nothing more
    with caplog.at_level(logging.WARNING, logger="sidecar.policy.reload"):
        assert holder.reload()
    assert not [r for r in caplog.records if "has no effect" in r.getMessage()]


def test_the_admin_policy_endpoint_lists_the_note(tmp_path: Path) -> None:
    path = write(tmp_path, buckets=[LEASED], max_concurrency=5)
    holder = PolicyHolder([path])
    service = AdmissionService(holder, MemoryQuotaStore(), Metrics(CollectorRegistry()))

    async def notes() -> Any:
        client: TestClient[Any, Any] = TestClient(TestServer(build_admin_app(service, holder)))
        await client.start_server()
        try:
            return (await (await client.get("/v1/policy")).json())["notes"]
        finally:
            await client.close()

    (note,) = asyncio.run(notes())
    assert note.startswith("tenant 'acme', bucket 'req': lease_ms 100 has no effect")
    write(tmp_path, buckets=[LEASED])
    assert holder.reload()  # the service reads the holder's current policy
    assert asyncio.run(notes()) == []
