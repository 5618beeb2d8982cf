"""The policy model: what a validated set of YAML files turns into, each field declared once.

Frozen dataclasses with slots (`@section`): a snapshot is shared by every request in flight and
replaced whole by a reload. YAML keys are the field names (a bucket's `rate` and `per` become
`rate_per_s`); rates are per second once loaded, durations keep their unit in their name. Each
attribute is declared once, `setting(spec, description, default=...)`; the loader's checks, the
builder, `policies/schema.json` and `docs/policy-reference.md` derive from it (`spec.py`).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from sidecar.policy.choices import (
    BucketUnit,
    DisallowedClassAction,
    FailMode,
    IdentitySourceKind,
    Infeasible,
    Protect,
    RoutePriority,
    StaleAction,
    UnknownTenantAction,
    UnreadableBody,
)
from sidecar.policy.spec import (
    BUCKET_NAME,
    HEADER_NAME,
    NAME,
    NON_EMPTY,
    SHA256_HEX,
    Bool,
    Choice,
    Field,
    Int,
    ListOf,
    MapOf,
    Num,
    Rule,
    section,
    section_spec,
    setting,
)
from sidecar.policy.token_policy import TokenPolicy

# The vocabularies are declared in choices.py, the tokens section in token_policy.py; both are
# re-exported from here.
__all__ = [
    "BucketUnit",
    "DisallowedClassAction",
    "FailMode",
    "IdentitySourceKind",
    "Infeasible",
    "Protect",
    "RoutePriority",
    "StaleAction",
    "TokenPolicy",
    "UnknownTenantAction",
    "UnreadableBody",
]

# Shadow mode (core/shadow.py): the rule is judged in full, and recorded, but not applied.
ENFORCE_TENANT = (
    "false: shadow mode for the tenant's buckets and concurrency limits: they are checked in "
    'a store space of their own and the outcome recorded (metrics with shadow="true", the '
    "x-qos-shadow-decision header upstream), but requests are admitted as if they were absent."
)
ENFORCE_CLASS = "false: shadow mode for the class's overload rules and per-class concurrency."


@section(
    "identitySource",
    "One way to tell who the caller is.",
    rules=(
        Rule("kind", ("api_key", "header"), require=("header",)),
        Rule("kind", ("principal",), forbid=("header",)),
    ),
)
class IdentitySource:
    kind: IdentitySourceKind = setting(
        Choice.of(IdentitySourceKind),
        "api_key: a secret header matched by SHA-256 digest; principal: the mTLS peer "
        "principal Envoy verified; header: a header set by a trusted hop.",
    )
    header: str | None = setting(
        HEADER_NAME, "The header to read, for api_key and header sources.", default=None
    )


@section("identity", "How callers are identified. At most one file may define it.")
class IdentityPolicy:
    sources: tuple[IdentitySource, ...] = setting(
        ListOf(section_spec(IdentitySource), min_items=1),
        "Tried in order; the first source that yields a value decides, even if it matches "
        "no tenant. Default: one api_key source reading x-api-key.",
        default=(IdentitySource(IdentitySourceKind.API_KEY, "x-api-key"),),
    )
    # The granted class goes upstream in DECISION_HEADERS, never read back from the client.
    class_header: str = setting(
        HEADER_NAME, "The header a client uses to ask for a class.", default="x-qos-class"
    )
    timeout_header: str = setting(
        HEADER_NAME,
        "The header in which a client (or a gateway in front) states how many milliseconds it "
        "waits for an answer: no request is held longer, and in ext_proc mode what is left of "
        "it becomes the request's Triton timeout (see triton_timeout_ms). grpc-timeout is read "
        "as well.",
        default="x-qos-timeout-ms",
    )


@section("overload", "Backend-aware admission of a class.")
class OverloadPolicy:
    """Backend-aware admission of a class, by the queue depth Triton reports for the model.

    Below `admit_below` (and under `max_in_flight`, if set): admitted at once. From `shed_above`
    (if set): shed with 503 at once. In between: deferred (held while it can still make its
    deadline), relegated, or shed when it cannot.
    """

    admit_below: int = setting(
        Int(minimum=0),
        "Queue depth (requests waiting in Triton for the model) under which a request is "
        "admitted at once.",
    )
    shed_above: int | None = setting(
        Int(minimum=1),
        "Queue depth from which the class is shed with 503 at once; without it the class "
        "is never shed by load.",
        default=None,
    )
    on_stale: StaleAction = setting(
        Choice.of(StaleAction),
        "When Triton's load signals are stale or missing: saturated acts as if the queue "
        "were at shed_above, admit as if it were empty.",
        default=StaleAction.SATURATED,
    )
    max_in_flight: int | None = setting(
        Int(minimum=1),
        "Admit at once only while the model has fewer requests in flight (admitted, not yet "
        "ended: on this pod's Triton with QOS_TOPOLOGY=pod, by any replica with gateway); "
        "above it requests are deferred as above admit_below. "
        "A replica counts its own admits and ends at once, and learns the others' at its "
        "next read of the shared count (every QOS_TRITON_SCRAPE_MS; every 25 ms while a "
        "gateway replica holds a request): where several replicas (or --workers) decide "
        "for one model, it may run over the cap for that long by what the others admitted "
        "since the read (never more than the cap on each of them). "
        "Keeps Triton's batches small. A cap of one full batch "
        "(the model's max_batch_size) can leave a static batcher running part-filled "
        "batches in turn (half the rate of a model whose batch time does not grow with its "
        "size); two batches keep it full. With protect, the floor of "
        "the adaptive cap (default 1).",
        default=None,
    )
    protect: Protect | None = setting(
        Choice.of(Protect),
        "Adaptive cap on the model's requests in flight, instead of a fixed max_in_flight: "
        "it binds only while better-ranked classes send the model work, and follows the "
        "latency they get against their objective (95% of each under latency: 45%, balanced: "
        "80%, throughput: 100% of it; where better classes' own load alone keeps them near "
        "their share, the cap stays at its floor and a class with a short max_wait_ms is "
        "shed, which under latency can start at about capacity, while one with a long "
        "max_wait_ms waits, and under a sustained load its backlog grows until its holds "
        "expire), raised while it holds this "
        "class back, cut when one comes close, never above a better protected class's cap "
        "while that binds; admit_below and shed_above grow with it above its floor. A "
        "model's own protect overrides the preset.",
        default=None,
    )
    protect_share: float | None = setting(
        Num(exclusive_minimum=0, maximum=1),
        "With protect: the share of their objective that 95% of better-ranked requests must "
        "stay under, instead of the preset's (latency 0.45, balanced 0.8, throughput 1). "
        "Lower keeps them further from their objective and lets less of this class in. A "
        "model's own protect overrides it.",
        default=None,
    )


@section("class", "A service class: how important a request is and how long it may wait.")
class ClassPolicy:
    name: str  # the key the class is filed under
    rank: int = setting(Int(minimum=1), "1 is the most important.")
    latency_objective_ms: int = setting(Int(minimum=1), "The latency this class aims for.")
    max_wait_ms: int = setting(
        Int(minimum=0),
        "How long a request may be held before it is served; 0: never held. At most "
        "QOS_CHECK_MAX_HOLD_MS on ext_authz, QOS_EXT_PROC_MAX_HOLD_MS on ext_proc, and at "
        "most what leaves it, within latency_objective_ms, the time three in four of its "
        "class's requests have lately spent in Triton on the model.",
    )
    triton_priority: int = setting(
        Int(minimum=1), "Triton dynamic_batching priority level; 1 is the highest."
    )
    on_state_error: FailMode = setting(
        Choice.of(FailMode),
        "When the shared quota store cannot answer: local_share enforces this replica's share "
        "of every limit (the limit over the live replicas; a bucket's less what this replica "
        "spent) in memory, open admits without quota checks, closed sheds with 503.",
        default=FailMode.LOCAL_SHARE,
    )
    concurrency_retry_after_ms: int = setting(
        Int(minimum=0),
        "Retry-After for concurrency sheds, where no bucket says when room comes back.",
        default=1000,
    )
    overload: OverloadPolicy | None = setting(
        section_spec(OverloadPolicy),
        "Admission by Triton's queue depth for the model; without it, quotas alone decide.",
        default=None,
    )
    relegate_to: str | None = setting(
        NAME,
        "A less important class that a request which cannot make its deadline is moved "
        "to, once, instead of being shed.",
        default=None,
    )
    max_queued: int = setting(
        Int(minimum=0),
        "The most requests of this class held (deferred) at once per replica. At the "
        "bound, a new arrival of the class (not one relegated into it, which is shed) takes "
        "the place of the earliest-deadline waiter of the tenant holding the most of the "
        "class; that one is relegated or shed, as when its hold expires. With 0, nothing "
        "is held. A safety bound, not a deadline rule: an arrival is held only while its "
        "predicted wait fits its hold budget. Each held ext_authz HTTP request keeps one "
        "Envoy connection to the sidecar open: keep the sum over classes under the sidecar "
        "cluster's max_connections (8192 in envoy/snippets/clusters.yaml).",
        default=1024,
    )
    route_priority: RoutePriority = setting(
        Choice.of(RoutePriority),
        "Sent as x-qos-route-priority; the shipped Envoy config routes 'high' with route "
        "priority HIGH, which has its own circuit-breaker thresholds.",
        default=RoutePriority.DEFAULT,
    )
    triton_timeout_ms: int | None = setting(
        Int(minimum=1),
        "ext_proc only: written as the request's Triton timeout; one still queued in Triton "
        "after it is rejected (503) and never run, where the model's queue policy sets "
        "allow_timeout_override (examples/triton/README.md). A client that states its wait "
        "(identity.timeout_header, grpc-timeout) gets what is left of it instead where that "
        "is shorter, with or without this setting.",
        default=None,
    )
    enforce: bool = setting(Bool(), ENFORCE_CLASS, default=True)


PER_SECONDS: Mapping[str, int] = MappingProxyType({"second": 1, "minute": 60})


def _bucket_from_yaml(kwargs: dict[str, Any]) -> None:
    """`rate` per `per` is kept per second; a bucket without a name is named after its unit."""
    kwargs["rate_per_s"] /= PER_SECONDS[kwargs.pop("per")]
    kwargs.setdefault("name", kwargs["unit"].value)


@section(
    "bucket",
    "A token bucket: `rate` units per `per` sustained, `burst` at once.",
    extra={
        "per": Field(Choice(tuple(PER_SECONDS)), description="The rate's period.", default="second")
    },
    key_order=(
        "name",
        "unit",
        "rate",
        "per",
        "burst",
        "classes",
        "excess_class",
        "lease_ms",
        "enforce",
    ),
    adapt=_bucket_from_yaml,
)
class BucketPolicy:
    """A token bucket (enforced as GCRA): `rate_per_s` sustained, `burst` at once."""

    name: str = setting(
        BUCKET_NAME,
        "Unique within the tenant; used in store keys and metrics. Default: the unit.",
        required=False,
    )
    unit: BucketUnit = setting(
        Choice.of(BucketUnit),
        "requests: 1 per request; cost: the request's cost (its model's token estimate in "
        "ext_proc mode, else its cost_per_request).",
    )
    rate_per_s: float = setting(Num(exclusive_minimum=0), "Sustained units per `per`.", key="rate")
    burst: float = setting(Num(minimum=1), "Units that may be used at once.")
    # The classes whose requests draw on this bucket; empty: every class. A budget for batch
    # work, say, need not stand in the way of the same tenant's interactive requests.
    classes: frozenset[str] = setting(
        ListOf(NAME, min_items=1),
        "Only requests of these classes draw on the bucket; default: all. A class the tenant "
        "may use that none of its buckets covers and no concurrency limit bounds is bounded "
        "by the load alone: `qos-sidecar validate` notes it.",
        default=frozenset(),
    )
    excess_class: str | None = setting(
        NAME,
        "A request this bucket has no room for is served in this class instead of refused "
        "with 429: once, with the class's own buckets, limits, priority and load rules, as a "
        "relegated request is. A tenant's work within the bucket keeps its class, and what it "
        "sends beyond it competes as the excess class, not ahead of other tenants' work "
        "(for example interactive within an entitlement, batch beyond it). The bucket must "
        "list its classes, each more important than the excess class, which it must not "
        "cover; another bucket of the tenant may cover the excess class, even one the tenant "
        "may not ask for.",
        default=None,
    )
    lease_ms: int = setting(
        Int(minimum=0),
        "Leased mode (0: exact, one store call per request): a replica takes a slice of the "
        "bucket, min(rate x lease_ms, burst / 2) units, in one store call and spends it "
        "locally for lease_ms, giving back what it did not spend. Units are taken before "
        "they are spent, so the fleet never admits more than the bucket (over-admission 0); "
        "a tenant may be refused while other replicas hold its units: at most replicas x "
        "slice, for at most lease_ms. Applies to requests that need no lease in their "
        "tenant's sets: every bucket they draw on leased, and no max_concurrency (the "
        "tenant's, or the class's in max_concurrency_per_class). A request counted for its "
        "model (some class's overload reads the count: max_in_flight or protect) is spent "
        "from slices too; its lease is its model's entry alone, written after the answer. "
        "`qos-sidecar validate` notes a lease_ms that no request can use, and the sidecar "
        "logs it when it loads the policy (see core/slices.py).",
        default=0,
    )
    enforce: bool = setting(Bool(), "false: a shadow bucket (see tenant).", default=True)

    def covers(self, klass: str) -> bool:
        """Do requests of `klass` draw on this bucket? (No `classes`: every class does.)"""
        return not self.classes or klass in self.classes


@section("tenantMatch", "How a caller is recognised as this tenant.")
class TenantMatch:
    # Lower-case hex digests.
    api_key_sha256: frozenset[str] = setting(
        ListOf(SHA256_HEX),
        "SHA-256 hex digests of the tenant's API keys (printf %s KEY | sha256sum).",
        default=frozenset(),
    )
    principals: frozenset[str] = setting(
        ListOf(NON_EMPTY), "mTLS peer principals (URI SANs), exactly.", default=frozenset()
    )
    header_values: frozenset[str] = setting(
        ListOf(NON_EMPTY), "Values of a `header` identity source, exactly.", default=frozenset()
    )


@section("tenant", "A caller of the service and its limits.")
class TenantPolicy:
    name: str  # the key the tenant is filed under
    match: TenantMatch = setting(
        section_spec(TenantMatch), "Without it only unknown_tenants reaches it.", required=False
    )
    allowed_classes: frozenset[str] = setting(
        ListOf(NAME, min_items=1), "Classes the tenant may use."
    )
    default_class: str = setting(
        NAME, "The class of requests that ask for none; one of allowed_classes."
    )
    on_disallowed_class: DisallowedClassAction = setting(
        Choice.of(DisallowedClassAction),
        "When a request asks for a class it may not use: downgrade serves it in "
        "default_class, reject sheds it with 403.",
        default=DisallowedClassAction.DOWNGRADE,
    )
    buckets: tuple[BucketPolicy, ...] = setting(
        ListOf(section_spec(BucketPolicy)), "Every bucket must have room to admit.", default=()
    )
    max_concurrency: int | None = setting(
        Int(minimum=1), "Requests in flight at once; absent: no limit.", default=None
    )
    max_concurrency_per_class: Mapping[str, int] = setting(
        MapOf(NAME, Int(minimum=1), entity="class"),
        "Requests in flight at once, per allowed class.",
        default_factory=lambda: MappingProxyType({}),
    )
    enforce: bool = setting(Bool(), ENFORCE_TENANT, default=True)
    weight: float = setting(
        Num(exclusive_minimum=0, maximum=1e6),
        "Its share of the turns tenants take among held requests of a class (core/queue.py): "
        "while several are held, each is given work in proportion to its weight. Equal weights "
        "(the default) share equally; the tenant's entitlement (e.g. its bucket's rate) shares "
        "in proportion to it.",
        default=1.0,
    )


@section(
    "unknownTenants",
    "What happens to callers that match no tenant. At most one file may define it.",
    rules=(
        Rule("action", ("default",), require=("tenant",)),
        Rule("action", ("reject",), forbid=("tenant",)),
    ),
)
class UnknownTenantPolicy:
    action: UnknownTenantAction = setting(
        Choice.of(UnknownTenantAction),
        "reject: 401; default: serve the caller as `tenant`.",
        default=UnknownTenantAction.REJECT,
    )
    tenant: str | None = setting(
        NAME, "The tenant unknown callers become (action: default).", default=None
    )


# Names of tensors and fields in request and response bodies, matched exactly. NAME keeps them
# printable: they can appear in log lines.
@section("model", "Per-model settings; models not listed cost 1 unit per request.")
class ModelPolicy:
    name: str  # the key the model is filed under
    cost_per_request: float = setting(
        Num(exclusive_minimum=0),
        "Cost units one request to this model takes from `cost` buckets when its cost "
        "cannot be estimated from its body (ext_authz modes, no `tokens`, a body that "
        "cannot be read).",
        default=1.0,
    )
    tokens: TokenPolicy | None = setting(
        section_spec(TokenPolicy),
        "Estimate each request's cost from its token counts (ext_proc mode only); without "
        "it every request costs cost_per_request.",
        default=None,
    )
    protect: Protect | None = setting(
        Choice.of(Protect),
        "The protection preset for this model, overriding the protect of every class that "
        "sets one (overload.protect) on requests for this model.",
        default=None,
    )


@section(
    "policyFile",
    "One qos-sidecar policy file. Several files are merged into one policy; each class, "
    "tenant and model is defined once across all of them.",
    key_order=(
        "identity",
        "lease_ttl_s",
        "replicas",
        "enforce",
        "unknown_tenants",
        "classes",
        "models",
        "tenants",
    ),
)
class Policy:
    """One validated, immutable snapshot of every policy file."""

    version: str  # content hash of the sources, short hex
    sources: tuple[str, ...]
    classes: Mapping[str, ClassPolicy] = setting(
        MapOf(NAME, section_spec(ClassPolicy), entity="class"), "Service classes.", required=False
    )
    tenants: Mapping[str, TenantPolicy] = setting(
        MapOf(NAME, section_spec(TenantPolicy), entity="tenant"), "Tenants.", required=False
    )
    identity: IdentityPolicy = setting(section_spec(IdentityPolicy), default=IdentityPolicy())
    unknown_tenants: UnknownTenantPolicy = setting(
        section_spec(UnknownTenantPolicy), default=UnknownTenantPolicy()
    )
    models: Mapping[str, ModelPolicy] = setting(
        MapOf(NAME, section_spec(ModelPolicy), entity="model"),
        "Per-model costs and token counting.",
        default_factory=lambda: MappingProxyType({}),
    )
    lease_ttl_s: float = setting(
        Num(exclusive_minimum=0),
        "How long a concurrency lease lives unless the sidecar that took it renews it (every "
        "third of this, while its request runs): a completion lost while that sidecar was "
        "down frees its slot this long after the sidecar's last renewal at most. At most one "
        "file may set it.",
        default=10.0,
    )
    replicas: int | None = setting(
        Int(minimum=1),
        "How many replicas share the quota store, for the local share of each limit while the "
        "store is unavailable (on_state_error: local_share). Default: the count the replicas' "
        "heartbeats in the store showed last. At most one file may set it.",
        default=None,
    )
    enforce: bool = setting(
        Bool(),
        "Per file: the default `enforce` of every class and tenant this file defines.",
        default=True,
    )

    def cost_of(self, model: str | None) -> float:
        found = self.models.get(model) if model else None
        return found.cost_per_request if found else 1.0

    def tokens_of(self, model: str | None) -> TokenPolicy | None:
        found = self.models.get(model) if model else None
        return found.tokens if found else None
