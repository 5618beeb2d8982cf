"""Values that cross the boundary between the pure core and the adapters around it.

Rules:
- Adapters build a `RequestAttributes` from an Envoy call, and never decide anything.
- The core turns attributes into either an early `Decision` (no quota needed: unknown tenant,
  class refused, malformed) or a `QuotaCheck`: the limits the store must check and take in
  one atomic step.
- The store answers with a `QuotaResult` (or raises `StateUnavailable`), and the core turns
  that into the final `Decision`, including status, headers, Retry-After and body.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import field

from sidecar.core.record import record


@record
class RequestAttributes:
    """What the sidecar knows about one request, independent of the Envoy API used."""

    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names; one value each (joined with "," if repeated)
    principal: str | None = None  # mTLS peer principal verified by Envoy, if any
    request_id: str | None = None  # Envoy's x-request-id, for logs and explain
    # The model, when the adapter read it from the body (a gRPC ModelInfer names it there, not
    # in its path); None: the core takes it from a KServe v2 path.
    model: str | None = None


class LimitKind(enum.Enum):
    BUCKET = "bucket"
    CONCURRENCY = "concurrency"
    CLASS_CONCURRENCY = "class_concurrency"
    # The lease id is held or was released already (a client reusing a request id, or an
    # acquire that ran after its request's release): nothing is taken.
    LEASE_ID_USED = "lease_id_used"


@record
class BucketCheck:
    """One GCRA bucket to check and, if every limit allows, charge `cost` to."""

    name: str
    rate_per_s: float
    burst: float
    cost: float
    # Charged in cost units (a `cost` bucket), so a token reconciliation adjusts it; a
    # `requests` bucket always costs 1. Stores ignore it.
    by_cost: bool = False
    # Leased mode (`core.slices`): how long a replica spends a slice of it locally; 0: exact.
    # Stores ignore it.
    lease_s: float = 0.0


@record
class QuotaCheck:
    """Everything the store needs to check and take a request's quota in one round trip."""

    tenant: str
    klass: str
    buckets: tuple[BucketCheck, ...]
    max_concurrency: int | None  # None: no limit on the tenant's in-flight requests
    max_class_concurrency: int | None  # None: no limit for this tenant and class
    lease_ttl_s: float
    # The model the request is for: its lease is also counted in that model's in-flight count
    # (across tenants and replicas). None: counted for no model.
    model: str | None = None
    # Whose count of `model`: the pod's (pod topology: the sidecar sits beside one Triton, and
    # each pod counts, and caps, what its own Triton runs), or None for the fleet's (gateway
    # topology: the replicas front one pool, and the count is summed over it).
    model_pod: str | None = None
    # False: `acquire` does not count the lease for `model` yet (a request about to be held is
    # not in flight); `count_for_model` counts it when it is let go. The lease still names it.
    count_model_now: bool = True
    # The lease's id: the request's own id (Envoy's x-request-id, see
    # `core.lease.lease_id_for`), so that a release keyed by the request undoes an acquire
    # that runs late. None: the store makes a random one.
    lease_id: str | None = None


@record
class QuotaResult:
    """What the store found. When `allowed`, the quota was taken and `lease_id` is held."""

    allowed: bool
    lease_id: str | None = None
    denied_by: LimitKind | None = None
    denied_bucket: str | None = None  # the bucket name when denied_by is BUCKET
    retry_after_s: float = 0.0  # for BUCKET denials: when the bucket will hold enough tokens
    in_flight: int = 0  # the tenant's in-flight requests after this call
    class_in_flight: int = 0
    # Allowed from a leased slice (`core.slices`) for a request counted for its model:
    # `lease_id` is held in no tenant set, only (once counted) in the model's.
    model_only: bool = False


@record
class LeaseRef:
    """Enough to release a concurrency lease from any replica, parsed from the lease token."""

    tenant: str
    klass: str
    lease_id: str
    model: str | None = None  # the model the lease is counted for, if any
    # The pod whose count of `model` holds it (None: the fleet's), so that a release from any
    # replica finds the set it is in (`QuotaCheck.model_pod`).
    model_pod: str | None = None
    # A shadow lease of the same id is held in the tenant's shadow space (core/shadow.py):
    # the release frees it too.
    shadow: bool = False
    # Held in no tenant set, only in its model's (a request spent from a leased slice,
    # `core.slices`): a release or renewal touches the model's set alone.
    model_only: bool = False

    @classmethod
    def of(cls, check: QuotaCheck, lease_id: str, *, model_only: bool = False) -> LeaseRef:
        """The lease `check` takes under `lease_id`: it names whatever a release needs."""
        return cls(
            check.tenant, check.klass, lease_id, check.model, check.model_pod, model_only=model_only
        )


class Outcome(enum.Enum):
    ADMIT = "admit"
    SHED = "shed"


class Reason(enum.Enum):
    ADMITTED = "admitted"
    ADMITTED_DOWNGRADED = "admitted_downgraded"  # asked for a class it may not use
    ADMITTED_FAIL_OPEN = "admitted_fail_open"  # store unavailable, class fails open
    ADMITTED_DEFERRED = "admitted_deferred"  # held until Triton had room
    ADMITTED_RELEGATED = "admitted_relegated"  # moved to a less important class, then admitted
    OVERLOADED = "overloaded"  # Triton's queue is too deep for this class: 503
    OVER_RATE = "over_rate"  # a token bucket is empty
    OVER_CONCURRENCY = "over_concurrency"  # the tenant is at its in-flight limit
    OVER_CLASS_CONCURRENCY = "over_class_concurrency"
    UNKNOWN_TENANT = "unknown_tenant"
    NO_IDENTITY = "no_identity"
    CLASS_NOT_ALLOWED = "class_not_allowed"
    UNKNOWN_CLASS = "unknown_class"
    STATE_UNAVAILABLE = "state_unavailable"  # store unavailable, class fails closed
    MALFORMED = "malformed"
    # The request's estimated cost is more than one of its buckets can ever hold (e.g. an
    # LLM request asking for more max tokens than the tenant's burst): 400, not a retry.
    COST_OVER_BURST = "cost_over_burst"
    # A token model's body whose cost cannot be read (`tokens.unreadable: refuse`): 400, or
    # 415 for a Content-Encoding Triton does not read either.
    UNREADABLE_BODY = "unreadable_body"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    # The request names a model Triton is known not to serve (a typo): 404, not a retry.
    UNKNOWN_MODEL = "unknown_model"
    # A token model's request whose max tokens cannot be generated within its class's
    # objective even alone (core/pace.py, `tokens.infeasible: refuse`): 422, not a retry.
    INFEASIBLE = "infeasible"


@record
class Decision:
    outcome: Outcome
    status: int  # HTTP status: 200 to admit, else what the client gets
    reason: Reason
    tenant: str | None  # the policy tenant name (None when unknown and rejected)
    klass: str | None  # the granted class
    requested_class: str | None
    # Headers to set on the upstream request (admit) or on the client response (shed).
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    retry_after_s: float | None = None
    lease: LeaseRef | None = None  # the concurrency lease an admit holds (x-qos-lease)
    # The buckets this admit charged, with what each was charged: to give it back when Envoy
    # never used the admit, and (the `by_cost` ones) to reconcile an estimate. Empty when
    # nothing was charged: a shed, or an admit that failed open.
    charged: tuple[BucketCheck, ...] = ()
    # The Triton priority level an admit grants (the granted class's `triton_priority`), for
    # the body rewrite; None for a shed.
    triton_priority: int | None = None
    # The Triton timeout an admit asks for, in ms (the class's `triton_timeout_ms`); None: none.
    triton_timeout_ms: int | None = None
    # What the admitted request's client said it waits, in s (core/client_wait.py); None: not
    # said. With the class's timeout it sets Triton's (core/priority.py rule 7).
    client_wait_s: float | None = None
    # Human-readable steps that led here, for /v1/explain and debug logs.
    trace: tuple[str, ...] = field(default=())

    @property
    def admitted(self) -> bool:
        return self.outcome is Outcome.ADMIT

    @property
    def lease_id(self) -> str | None:
        return self.lease.lease_id if self.lease is not None else None
