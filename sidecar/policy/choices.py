"""The policy's closed vocabularies: every enum a policy field chooses from.

`sidecar.policy.model` re-exports each of them; code imports them from there.
"""

from __future__ import annotations

import enum


class FailMode(enum.Enum):
    """What a class gets when the shared quota store cannot answer."""

    LOCAL_SHARE = "local_share"  # each replica enforces limit / live replicas, in memory
    OPEN = "open"  # admit without quota checks (counted in a metric)
    CLOSED = "closed"  # shed with 503


class BucketUnit(enum.Enum):
    REQUESTS = "requests"  # each request costs 1
    COST = "cost"  # each request costs its estimated cost units (e.g. LLM tokens)


class DisallowedClassAction(enum.Enum):
    DOWNGRADE = "downgrade"  # serve it in the tenant's default class
    REJECT = "reject"  # shed with 403


class UnknownTenantAction(enum.Enum):
    REJECT = "reject"  # shed with 401
    DEFAULT = "default"  # treat as the named default tenant


class StaleAction(enum.Enum):
    """What a class does when Triton's load signals are stale or missing."""

    SATURATED = "saturated"  # act as if the queue were at shed_above (defer, relegate or shed)
    ADMIT = "admit"  # act as if the queue were empty


class Protect(enum.Enum):
    """How hard a class's adaptive cap protects better-ranked classes (core/protect.py)."""

    LATENCY = "latency"  # 95% of their latency under 45% of their objective: smallest batches
    BALANCED = "balanced"  # under 80% of it
    THROUGHPUT = "throughput"  # under all of it: fullest batches, least margin


class RoutePriority(enum.Enum):
    """The Envoy route priority a class's requests are sent with (x-qos-route-priority)."""

    DEFAULT = "default"
    HIGH = "high"  # the shipped config routes these with priority HIGH: own circuit breakers


class UnreadableBody(enum.Enum):
    """What a token model does with a request body whose cost cannot be read."""

    REFUSE = "refuse"  # 400 (415 for an encoding Triton does not read), counted
    CHARGE_MAX = "charge_max"  # admit, charging the most the tenant's cost buckets hold


class IdentitySourceKind(enum.Enum):
    API_KEY = "api_key"  # a secret header; tenants list the SHA-256 hex digests of their keys
    PRINCIPAL = "principal"  # the mTLS peer principal (URI SAN) Envoy verified
    HEADER = "header"  # a header set by a trusted hop in front (e.g. jwt_authn claim_to_headers)


class Infeasible(enum.Enum):
    """What a token model's request gets when its max tokens, at the fastest pace the model
    has been seen to generate as many from a prompt no longer (more than any: its longest
    responses' pace), take longer than its class's objective (core/pace.py)."""

    ADMIT = "admit"  # served as asked
    RELEGATE = "relegate"  # moved to its class's relegate_to once; served as asked without one
    REFUSE = "refuse"  # 422 `infeasible` at once, with the most max tokens the class can take
