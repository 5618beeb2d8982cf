"""The benchmark policy: tenant quotas as shares of the measured capacity C.

``write_policy`` renders one policy file for the sidecar once C is known: every benchmark
tenant, matched by the SHA-256 of its key ``bench-key-<tenant>``, gets a request bucket of
``quota_weight * C * oversubscription`` requests/s (burst: ``burst_s`` seconds of it) and its
classes as ``allowed_classes``. The classes carry the scaled deadlines as their latency
objectives and the Triton priorities 1/2/3.

``tenant_quotas`` reads any policy directory (the generated one or a user's own) back into
requests/s per benchmark tenant, so the local-ratelimit baseline enforces the same quotas as
the sidecar and the report can put each tenant's admitted rate against its quota.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from benchmarks.workload import ClassSpec, TenantSpec
from sidecar.policy.loader import load_policy
from sidecar.policy.model import BucketUnit

# How the generated policy uses the sidecar's backend-aware admission (issue 4):
#   quota   - quotas only (the sidecar before backend awareness)
#   static  - per-class overload thresholds, deferral, relegation of standard to batch, and
#             standard and batch capped at MAX_IN_FLIGHT batches in flight (--max-in-flight),
#             a number measured on the default workload
#   latency, balanced, throughput - static's thresholds, deferral and relegation, with the
#             standard and batch caps adaptive instead (overload.protect with that preset);
#             their floor is --preset-floor (default none: a cap of 1), so that nothing in
#             them is tuned on this workload
#   share-X - the default preset with overload.protect_share X (0 < X <= 1) on standard and
#             batch: the knob between and beyond the presets, for the frontier's curve
#   nodefer - the default, but nothing is held (max_wait_ms 0): admit, relegate or shed at once
#   norelegate - the default, without relegation
# DEFAULT is what the sidecar rows run (sidecar-http, -grpc, -extproc): issue 12 asks for
# thresholds the sidecar derives from what it observes. Measured against static in
# benchmarks/README.md ("Policy").
PRESETS = ("latency", "balanced", "throughput")
DEFAULT = "balanced"
POLICY_VARIANTS = ("quota", "static", "nodefer", "norelegate", *PRESETS)
SHARE_PREFIX = "share-"
SHARE_ROW = f"sidecar-http-{SHARE_PREFIX}"  # the system that runs a share-X variant


def share_of(variant: str) -> float | None:
    """The protect_share of a `share-X` variant (None for any other variant)."""
    if not variant.startswith(SHARE_PREFIX):
        return None
    try:
        share = float(variant[len(SHARE_PREFIX) :])
    except ValueError:
        share = math.nan
    if not 0 < share <= 1:
        raise ValueError(f"policy variant {variant!r}: the share must be a number in (0, 1]")
    return share


# Triton queue depth (requests waiting for the model) thresholds per class, in units of the
# model's batch: interactive goes to Triton while one batch waits, batch only while almost
# nothing does. Sheddable classes are shed at once from shed_above.
OVERLOAD_BATCHES = {
    "interactive": (1.0, 4.0),
    "standard": (0.5, 3.0),
    "batch": (0.25, 2.0),
}
# The non-interactive classes are also admitted at once only while the model has fewer than
# MAX_IN_FLIGHT batches of requests in flight (queued or running in Triton; --max-in-flight,
# 0 for no cap). Static batches run until their longest sequence is done and cannot be
# preempted, so an interactive request waits for the batch in progress: keeping lower classes
# to a few requests keeps that wait short. Measured (20 s points, C = 43.3): interactive
# missed 17-21% at 2x C without a cap, 4-6% at 0.5 batch, 1.0-1.2% at 0.25 batch, for SLO-met
# throughput 1.5x, 1.5x and 1.2x C; at C = 47.5: 5.5% / 3.5% / 2.8% at 0.5 / 0.375 / 0.25,
# and 0.25 already shed lower classes at 1x. 0.375 is the balance.
CAPPED_CLASSES = ("standard", "batch")
MAX_IN_FLIGHT = 0.375
# How long each class may be held, as a share of its deadline. Standard and batch work that
# can still make its deadline is held rather than shed (issue 12): for its whole deadline,
# which the sidecar cuts to what the class's recent time in Triton leaves of it
# (sidecar/core/signals.py, hold_budget), so nothing in the share is this workload's. Half
# the deadline (until 2026-12-03) shed batch work at the end of a hold that still had time
# to run: see benchmarks/README.md, "Batch holds". Each transport cuts the hold to what Envoy waits
# (sidecar/core/holds.py: 29.5 s on ext_authz and on ext_proc), so the policy states the
# intent and needs no cap of its own. Standard was held for 30% of its deadline until
# 2026-12-07, then relegated to batch and shed there without room: a quiet tenant's standard
# request, first in the tenant-fair order, was shed while the noisy tenant's interactive work
# filled the model ("Standard holds", benchmarks/README.md).
MAX_WAIT_SHARE = {"interactive": 0.4, "standard": 1.0, "batch": 1.0}
# --interactive-quota: what bounds a tenant's interactive requests in the sidecar variants.
#   none    - nothing of the tenant's own (its bucket covers its other classes): the load alone
#   refuse  - a bucket of its own for interactive, at the tenant's rate: 429 beyond it
#   excess  - the same bucket with the least important class as its excess_class: beyond it,
#             interactive requests are served as that class, charged to the tenant's other
#             bucket (sidecar/core/relegation.py)
INTERACTIVE_QUOTAS = ("none", "refuse", "excess")
# --tenant-weights: each tenant's `weight`, its share of the turns among held requests.
#   equal        - none written: every tenant 1, equal turns (the sidecar's default)
#   entitlement  - its bucket's rate: turns in proportion to what it is entitled to
TENANT_WEIGHTS = ("equal", "entitlement")


@dataclass(frozen=True, slots=True)
class Quota:
    rate_per_s: float | None  # None: no request bucket
    burst: float | None


def write_policy(
    directory: Path,
    tenants: Sequence[TenantSpec],
    classes: Mapping[str, ClassSpec],
    capacity_rps: float,
    *,
    oversubscription: float = 1.0,
    burst_s: float = 2.0,
    variant: str = "quota",
    batch_size: int = 16,
    overload_scale: float = 1.0,
    max_in_flight: float = MAX_IN_FLIGHT,
    protect: str = "none",
    triton_timeout: bool = True,
    preset_floor: float = 0.0,
    model: str | None = None,
    infeasible: str = "admit",
    interactive_quota: str = "none",
    tenant_weights: str = "equal",
) -> Path:
    share = share_of(variant)
    if variant not in POLICY_VARIANTS and share is None:
        raise ValueError(f"policy variant {variant!r}: expected one of {POLICY_VARIANTS}")
    if variant in PRESETS:
        protect, max_in_flight = variant, preset_floor
    elif variant in ("nodefer", "norelegate") or share is not None:  # the default, one change
        protect, max_in_flight = DEFAULT, preset_floor
    directory.mkdir(parents=True, exist_ok=True)
    doc: dict[str, object] = {
        "identity": {"sources": [{"kind": "api_key", "header": "x-api-key"}]},
        "unknown_tenants": {"action": "reject"},
        "lease_ttl_s": 120,
        "classes": {
            c.name: _class_doc(
                c,
                classes,
                variant,
                batch_size * overload_scale,
                batch_size,
                max_in_flight,
                protect,
                share,
            )
            | (
                {"triton_timeout_ms": _deadline_ms(c)}
                if triton_timeout and variant != "quota"
                else {}
            )
            for c in classes.values()
        },
        "tenants": {},
    }
    tenant_docs: dict[str, object] = {}
    least = max(classes.values(), key=lambda c: c.priority).name
    for t in tenants:
        rate = float(t.quota_weight * capacity_rps * oversubscription)
        bucket = {
            "name": "requests",
            "unit": "requests",
            "rate": round(rate, 3),
            "per": "second",
            "burst": max(3.0, round(rate * burst_s, 3)),
        }
        scope = _bucket_scope(t, variant)
        buckets = [bucket | scope]
        if scope and interactive_quota != "none":  # the tenant sends interactive and more
            own = bucket | {"name": "interactive", "classes": ["interactive"]}
            if interactive_quota == "excess":
                own["excess_class"] = least
                buckets[0]["classes"] = sorted({*scope["classes"], least})  # charged there
            buckets.append(own)
        tenant_docs[t.name] = {
            "match": {"api_key_sha256": [t.api_key_sha256]},
            "allowed_classes": list(t.classes),
            "default_class": t.classes[0],
            "on_disallowed_class": "reject",
            "buckets": buckets,
        } | ({"weight": bucket["rate"]} if tenant_weights == "entitlement" else {})
    doc["tenants"] = tenant_docs
    if model is not None and infeasible != "admit" and variant != "quota":
        # The simulated LLMs' token fields; only ext_proc reads bodies (core/pace.py).
        tokens = {"prompt_tokens": "PROMPT_TOKENS", "max_tokens": "OUTPUT_TOKENS"}
        tokens |= {"output_tokens": "OUT_TOKENS", "infeasible": infeasible}
        doc["models"] = {model: {"tokens": tokens}}
    path = directory / "bench.yaml"
    header = (
        "# Generated by benchmarks/policy.py for one benchmark run: per-tenant request quotas as\n"
        f"# shares of the measured capacity C = {capacity_rps:.2f} requests/s.\n"
    )
    path.write_text(header + yaml.safe_dump(doc, sort_keys=False))
    return directory


def _bucket_scope(t: TenantSpec, variant: str) -> dict[str, list[str]]:
    """With backend-aware admission, the tenant's request budget covers its non-interactive
    classes only: interactive traffic is governed by Triton's load (deferral, priority) and
    the noisy tenant's batch work can no longer use up its own interactive requests' quota."""
    if variant == "quota":
        return {}
    scoped = [c for c in t.classes if c != "interactive"]
    return {"classes": scoped} if scoped and len(scoped) < len(t.classes) else {}


def _class_doc(
    c: ClassSpec,
    classes: Mapping[str, ClassSpec],
    variant: str,
    threshold_unit: float,
    batch_size: int,
    max_in_flight: float,
    protect: str = "none",
    share: float | None = None,
) -> dict[str, object]:
    doc: dict[str, object] = {
        "rank": c.priority,
        "latency_objective_ms": _deadline_ms(c),
        "max_wait_ms": 0,
        "triton_priority": c.priority,
        "on_state_error": "open",
    }
    if variant == "quota" or c.name not in OVERLOAD_BATCHES:
        return doc
    admit, shed = OVERLOAD_BATCHES[c.name]
    overload: dict[str, object] = {
        "admit_below": max(1, round(admit * threshold_unit)),
        "shed_above": max(2, round(shed * threshold_unit)),
    }
    if max_in_flight > 0 and c.name in CAPPED_CLASSES:
        overload["max_in_flight"] = max(1, round(max_in_flight * batch_size))
    if protect != "none" and c.name in CAPPED_CLASSES:
        overload["protect"] = protect  # adaptive, max_in_flight its floor (core/protect.py)
        if share is not None:
            overload["protect_share"] = share
    doc["overload"] = overload
    if variant != "nodefer":
        doc["max_wait_ms"] = round(MAX_WAIT_SHARE[c.name] * c.deadline_s * 1000)
    if variant != "norelegate" and c.name == "standard" and "batch" in classes:
        doc["relegate_to"] = "batch"
    return doc


def _deadline_ms(c: ClassSpec) -> int:
    """The class's deadline as its latency objective; also its Triton queue timeout (ext_proc
    mode: a request still queued in Triton past its deadline has missed it, and is not run)."""
    return max(1, round(c.deadline_s * 1000))


def tenant_quotas(policy_path: Path, tenants: Sequence[TenantSpec]) -> dict[str, Quota]:
    """Requests/s (and burst) of each benchmark tenant's ``unit: requests`` bucket in the
    policy at ``policy_path``; the tightest one when there are several."""
    policy = load_policy([policy_path])
    by_digest = {digest: tp for tp in policy.tenants.values() for digest in tp.match.api_key_sha256}
    out: dict[str, Quota] = {}
    for t in tenants:
        tp = by_digest.get(t.api_key_sha256)
        buckets = [b for b in (tp.buckets if tp else ()) if b.unit is BucketUnit.REQUESTS]
        if not buckets:
            out[t.name] = Quota(None, None)
            continue
        tight = min(buckets, key=lambda b: b.rate_per_s)
        out[t.name] = Quota(tight.rate_per_s, tight.burst)
    return out
