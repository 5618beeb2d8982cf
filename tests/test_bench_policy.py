"""The QoS benchmark's generated policy (benchmarks/policy.py): `--interactive-quota` gives
each tenant that sends interactive and more a bucket of its own for interactive, and with
`excess` what is over it goes as the least important class, charged to its other bucket;
`--tenant-weights` writes each tenant's weight."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.policy import tenant_quotas, write_policy
from benchmarks.workload import ClassSpec, default_tenants
from sidecar.policy.loader import load_policy

CLASSES = {
    "interactive": ClassSpec("interactive", 0.225, 1),
    "standard": ClassSpec("standard", 1.8, 2),
    "batch": ClassSpec("batch", 18.0, 3),
}


def written(tmp_path: Path, interactive_quota: str) -> dict[str, dict[str, tuple[str, ...]]]:
    """Each tenant's buckets: name -> (classes..., excess class or '')."""
    tenants = default_tenants()
    path = write_policy(
        tmp_path, tenants, CLASSES, 60.0, variant="balanced", interactive_quota=interactive_quota
    )
    policy = load_policy([path])  # valid: every check of the loader passed
    quotas = tenant_quotas(path, tenants)
    for t in tenants:  # the quota the report reads is the tenant's rate either way
        assert quotas[t.name].rate_per_s == pytest.approx(t.quota_weight * 60.0, abs=1e-3)
    return {
        name: {
            b.name: (*sorted(b.classes), b.excess_class or "") for b in policy.tenants[name].buckets
        }
        for name in ("noisy", "t6", "t7")
    }


def test_by_default_nothing_of_a_tenants_own_bounds_its_interactive(tmp_path: Path) -> None:
    buckets = written(tmp_path, "none")
    assert buckets["noisy"] == {"requests": ("batch", "standard", "")}
    assert buckets["t7"] == {"requests": ("",)}  # batch alone: its one bucket covers it


def test_refuse_gives_interactive_a_bucket_of_its_own(tmp_path: Path) -> None:
    buckets = written(tmp_path, "refuse")
    assert buckets["noisy"] == {
        "requests": ("batch", "standard", ""),
        "interactive": ("interactive", ""),
    }
    assert buckets["t7"] == {"requests": ("",)}


def test_excess_moves_what_is_over_it_to_batch_charged_to_the_other_bucket(
    tmp_path: Path,
) -> None:
    buckets = written(tmp_path, "excess")
    assert buckets["noisy"] == {
        "requests": ("batch", "standard", ""),
        "interactive": ("interactive", "batch"),
    }
    # t6 sends interactive and standard only: its excess goes as batch, charged to its bucket.
    assert buckets["t6"] == {
        "requests": ("batch", "standard", ""),
        "interactive": ("interactive", "batch"),
    }


@pytest.mark.parametrize("weights", ["equal", "entitlement"])
def test_tenant_weights_are_one_each_or_each_tenants_bucket_rate(
    tmp_path: Path, weights: str
) -> None:
    tenants = default_tenants()
    path = write_policy(
        tmp_path, tenants, CLASSES, 60.0, variant="balanced", tenant_weights=weights
    )
    policy = load_policy([path])
    for t in tenants:
        expected = 1.0 if weights == "equal" else t.quota_weight * 60.0
        assert policy.tenants[t.name].weight == pytest.approx(expected, abs=1e-3)
