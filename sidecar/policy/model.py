"""The policy model: what a validated set of YAML files turns into.

Every type here is a frozen dataclass so a snapshot can be shared by every request in flight
and replaced whole, in one assignment, by a reload. YAML keys are the field names below.
Rates are normalised to per-second when loaded; durations keep their unit in their name.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


class FailMode(enum.Enum):
    """What a class gets when the shared quota store cannot answer."""

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


class RoutePriority(enum.Enum):
    """The Envoy route priority a class's requests are sent with (x-qos-route-priority)."""

    DEFAULT = "default"
    HIGH = "high"  # the shipped config routes these with priority HIGH: own circuit breakers


class IdentitySourceKind(enum.Enum):
    API_KEY = "api_key"  # a secret header; tenants list the SHA-256 hex digests of their keys
    PRINCIPAL = "principal"  # the mTLS peer principal (URI SAN) Envoy verified
    HEADER = "header"  # a header set by a trusted hop in front (e.g. jwt_authn claim_to_headers)


@dataclass(frozen=True, slots=True)
class IdentitySource:
    kind: IdentitySourceKind
    header: str | None = None  # lower-case header name, for API_KEY and HEADER


@dataclass(frozen=True, slots=True)
class IdentityPolicy:
    # Tried in order; the first source that yields a value decides (even if it matches no tenant).
    sources: tuple[IdentitySource, ...] = (IdentitySource(IdentitySourceKind.API_KEY, "x-api-key"),)
    # The header a client uses to *ask* for a class. The granted class goes upstream in
    # DECISION_HEADERS and is never read back from the client.
    class_header: str = "x-qos-class"


@dataclass(frozen=True, slots=True)
class OverloadPolicy:
    """Backend-aware admission of a class, by the queue depth Triton reports for the model.

    Below `admit_below` (and under `max_in_flight`, if set) a request is admitted at once.
    From `shed_above` (if set) the class is shed with 503 at once: it is sheddable. In between,
    a request is deferred (held while it can still make its deadline), relegated, or shed when
    it cannot.
    """

    admit_below: int
    shed_above: int | None = None  # None: never shed by load (the class is not sheddable)
    on_stale: StaleAction = StaleAction.SATURATED
    # Admitted at once only while the model has fewer requests in flight than this (admitted
    # through any replica and not yet ended: queued in Triton or running); None: no such cap.
    # Exact between scrapes, so it keeps Triton's batches small where queue depth lags.
    max_in_flight: int | None = None


@dataclass(frozen=True, slots=True)
class ClassPolicy:
    name: str
    rank: int  # 1 is the most important; ties are allowed
    latency_objective_ms: int
    max_wait_ms: int  # how long a request of this class may be held before it is served
    triton_priority: int  # Triton dynamic_batching priority level, 1 is the highest
    on_state_error: FailMode = FailMode.CLOSED
    # Retry-After for concurrency sheds, where no bucket says when room will come back.
    concurrency_retry_after_ms: int = 1000
    overload: OverloadPolicy | None = None  # None: admission by quota only
    relegate_to: str | None = None  # the class a request that cannot make it is moved to, once
    max_queued: int = 256  # bound on this class's deferred requests per replica
    route_priority: RoutePriority = RoutePriority.DEFAULT


@dataclass(frozen=True, slots=True)
class BucketPolicy:
    """A token bucket (enforced as GCRA): `rate_per_s` sustained, `burst` at once."""

    name: str  # unique within the tenant, used in keys and metrics
    unit: BucketUnit
    rate_per_s: float
    burst: float
    # The classes whose requests draw on this bucket; empty: every class. A budget for batch
    # work, say, need not stand in the way of the same tenant's interactive requests.
    classes: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TenantMatch:
    api_key_sha256: frozenset[str] = frozenset()  # lower-case hex digests
    principals: frozenset[str] = frozenset()
    header_values: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class TenantPolicy:
    name: str
    match: TenantMatch
    allowed_classes: frozenset[str]
    default_class: str
    on_disallowed_class: DisallowedClassAction = DisallowedClassAction.DOWNGRADE
    buckets: tuple[BucketPolicy, ...] = ()
    max_concurrency: int | None = None
    max_concurrency_per_class: Mapping[str, int] = field(
        default_factory=lambda: MappingProxyType({})
    )


@dataclass(frozen=True, slots=True)
class UnknownTenantPolicy:
    action: UnknownTenantAction = UnknownTenantAction.REJECT
    tenant: str | None = None  # the tenant to use when action is DEFAULT


@dataclass(frozen=True, slots=True)
class TokenPolicy:
    """How an LLM request's cost is estimated from its body at admission, and reconciled with
    what it really used when its response ends (ext_proc mode, which sees both bodies).

    Names are looked up in the request and response (see `sidecar.core.tokens`): a KServe v2
    input or output tensor of that name, else a top-level field (generate endpoints), else an
    entry of `parameters`. Cost = prompt_weight * prompt tokens + output_weight * output tokens,
    with output tokens = the request's max tokens at admission and the generated count after.
    """

    prompt_tokens: str | None = None  # holds the prompt length in tokens
    prompt_text: str | None = None  # or: the prompt text, whose length / chars_per_token is used
    max_tokens: str | None = None  # holds the most tokens the request may generate
    default_max_tokens: int = 256  # when the request names no max tokens
    output_tokens: str | None = None  # in the response: tokens generated (summed over events)
    output_text: str | None = None  # or: the generated text (summed over events)
    chars_per_token: float = 4.0
    prompt_weight: float = 1.0  # cost units per prompt token
    output_weight: float = 1.0  # cost units per generated token


@dataclass(frozen=True, slots=True)
class ModelPolicy:
    name: str
    # Cost units charged to `cost` buckets per request, when the request's own cost cannot be
    # estimated (ext_authz modes, no `tokens`, a body that cannot be read).
    cost_per_request: float = 1.0
    tokens: TokenPolicy | None = None  # estimate and reconcile LLM token costs


@dataclass(frozen=True, slots=True)
class Policy:
    """One validated, immutable snapshot of every policy file."""

    version: str  # content hash of the sources, short hex
    sources: tuple[str, ...]
    classes: Mapping[str, ClassPolicy]
    tenants: Mapping[str, TenantPolicy]
    identity: IdentityPolicy = IdentityPolicy()
    unknown_tenants: UnknownTenantPolicy = UnknownTenantPolicy()
    models: Mapping[str, ModelPolicy] = field(default_factory=lambda: MappingProxyType({}))
    # A crashed sidecar or a lost completion signal frees a slot after this long at most.
    lease_ttl_s: float = 300.0

    def cost_of(self, model: str | None) -> float:
        found = self.models.get(model) if model else None
        return found.cost_per_request if found else 1.0

    def tokens_of(self, model: str | None) -> TokenPolicy | None:
        found = self.models.get(model) if model else None
        return found.tokens if found else None
