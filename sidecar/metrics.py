"""Prometheus metrics, created on an injected registry so each test can own one.

Label sets are bounded: tenants and classes are names from the policy; anything else is
reported as `__unknown__`, so a client cannot grow the series count by inventing names.
"""

from __future__ import annotations

from collections.abc import Container
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from sidecar.core.types import Decision, Reason
from sidecar.demand import DemandSeries
from sidecar.experience import ExperienceSeries
from sidecar.plain_metrics import PlainCounter, PlainHistogram
from sidecar.usage_series import UsageSeries

UNKNOWN = "__unknown__"
# Sub-millisecond resolution: a decision without a hold takes tens to hundreds of
# microseconds, and its p99 is what the overhead budget is about.
DECISION_BUCKETS = (
    *(0.00005, 0.0001, 0.0002, 0.0003, 0.0005, 0.00075),
    *(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # Labelled children of the per-decision series, looked up once per label set.
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
        self._decision_series(registry)
        self._adapter_series(registry)
        self._state_series(registry)
        self._degraded_series(registry)
        self._policy_series(registry)
        self._backend_series(registry)
        self._protection_series(registry)
        self.experience = ExperienceSeries(registry)  # per-tenant timings and SLO attainment
        self.demand = DemandSeries(registry)  # the autoscaling signal (sidecar/demand.py)
        self.usage = UsageSeries(registry)  # per-tenant usage, chargeback (sidecar/usage.py)

    def _decision_series(self, registry: CollectorRegistry) -> None:
        """What was decided, how fast, and the tokens it counted."""
        # Updated on every decision: plain numbers, no lock (plain_metrics.py).
        self.decisions = PlainCounter(
            "qos_decisions_total",
            'Admission decisions by tenant, granted class, outcome and reason; shadow="true": '
            "what the policy as written decided where a rule of it is not enforced "
            "(enforce: false), not applied.",
            ["tenant", "class", "outcome", "reason", "shadow"],
            registry,
        )
        self.decision_seconds = PlainHistogram(
            "qos_decision_duration_seconds",
            "Time to decide, from the Envoy call's arrival to the answer, by API.",
            ["api"],
            DECISION_BUCKETS,
            registry,
        )
        self.gc_pause_seconds = Histogram(
            "qos_gc_pause_seconds",
            "Pauses of Python's garbage collector, by generation (0-2): no decision is made "
            "meanwhile (sidecar/gc_pauses.py).",
            ["generation"],
            buckets=DECISION_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(
            "qos_tokens_total",
            "LLM tokens of requests with a token policy (ext_proc mode), by tenant, class and "
            "kind: prompt, max (the limit charged at admission), generated (read from the "
            "response).",
            ["tenant", "class", "kind"],
            registry=registry,
        )
        self.token_accounting = Counter(
            "qos_token_accounting_total",
            "Token accounting steps by result: estimated (cost read from the body), "
            "unestimated (no body: cost_per_request charged), refused_unreadable and "
            "charged_max (body unreadable, per tokens.unreadable), reconciled, "
            "refunded_rejected (Triton answered 4xx: the whole charge refunded), no_usage and "
            "unfinished (the response said no usage, or did not end: the charge stands), "
            "store_error.",
            ["result"],
            registry=registry,
        )
        self.generation_pace = Gauge(
            "qos_model_seconds_per_token",
            "A token model's fastest pace seen: the least seconds per generated token over its "
            "last settled responses (core/pace.py); tokens.infeasible judges a request by the "
            "least among those at least as long as it, from a prompt no longer.",
            ["model"],
            registry=registry,
        )

    def _adapter_series(self, registry: CollectorRegistry) -> None:
        """What the Envoy adapters saw that never became a decision, or more than one."""
        self.malformed = Counter(
            "qos_malformed_requests_total",
            "Envoy calls that could not be understood, by API.",
            ["api"],
            registry=registry,
        )
        self.adapter_errors = Counter(
            "qos_adapter_errors_total",
            "Envoy calls an adapter failed to answer with a decision (answered 500 with a JSON "
            "reason, internal_error), and access-log entries it failed on (api=access_log), by "
            "API.",
            ["api"],
            registry=registry,
        )
        self.unauthenticated_calls = Counter(
            "qos_unauthenticated_calls_total",
            "Calls to the Envoy-facing listeners refused for a missing or wrong auth token "
            "(QOS_AUTH_TOKEN), by API: http, grpc, ext_proc, access_log, other.",
            ["api"],
            registry=registry,
        )
        self.priority_rewrites = Counter(
            "qos_priority_rewrites_total",
            "Request bodies seen in ext_proc mode, by result: rewritten (the class's Triton "
            "priority set), not_inference, unsupported, malformed (passed unchanged).",
            ["result"],
            registry=registry,
        )

    def _state_series(self, registry: CollectorRegistry) -> None:
        self.slice_calls = Counter(
            "qos_slice_calls_total",
            "Leased mode's store calls: slice (a slice taken or refused), cost_only (a slice "
            "the buckets could not give whole, then the request's cost alone), return (what "
            "expired slices did not spend, given back).",
            ["call"],
            registry=registry,
        )
        """The shared state: leases in flight, completions, store failures."""
        self.in_flight = Gauge(
            "qos_in_flight_requests",
            "Admitted requests holding a concurrency lease (global, read from the quota store).",
            ["tenant", "class"],
            registry=registry,
        )
        self.model_in_flight = Gauge(
            "qos_model_in_flight_requests",
            "Admitted requests of each model not yet ended (global, read from the quota store).",
            ["model"],
            registry=registry,
        )
        self.state_stale = Gauge(
            "qos_state_stale_seconds",
            "How old the in-flight gauges (qos_in_flight_requests) are: 0 while the quota store "
            "answers, else the seconds since it last did. While the store is down the gauges "
            "move with this replica's own requests only; alert on this, not on them.",
            registry=registry,
        )
        self.completions = Counter(
            "qos_completions_total",
            "Completion signals by result: released, already_released, no_lease, bad_lease.",
            ["result"],
            registry=registry,
        )
        self.release_backlog = Gauge(
            "qos_release_backlog",
            "Lease releases this replica owes and retries: releases that failed, and releases "
            "for acquires that failed or timed out (which the store may still run late).",
            registry=registry,
        )
        self.release_backlog_dropped = Counter(
            "qos_release_backlog_dropped_total",
            "Owed releases dropped because the backlog was full (each lease then lives one "
            "lease TTL).",
            registry=registry,
        )
        self.leases_renewing = Gauge(
            "qos_leases_renewing",
            "Leases this replica took and renews while their requests run.",
            registry=registry,
        )
        self.state_errors = Counter(
            "qos_state_errors_total",
            "Calls to the quota store that failed or timed out, by operation (model_lease: the "
            "model step of an acquire or release, which fails neither).",
            ["operation"],
            registry=registry,
        )

    def _degraded_series(self, registry: CollectorRegistry) -> None:
        """The degraded mode: while the quota store's circuit is open (sidecar.state.breaker)."""
        self.degraded = Gauge(
            "qos_degraded",
            "1 while the quota store's circuit is open (calls fail fast and classes follow "
            "their on_state_error), else 0.",
            registry=registry,
        )
        self.degraded_seconds = Counter(
            "qos_degraded_seconds",
            "Time spent in degraded mode (the quota store's circuit open).",
            registry=registry,
        )
        self.local_leases = Gauge(
            "qos_local_leases",
            "Leases this replica took in its local share while the store was unavailable, "
            "not yet released (read every heartbeat).",
            registry=registry,
        )
        self.replicas = Gauge(
            "qos_replicas",
            "Live replicas sharing the quota store, from their heartbeats (the last count "
            "read; each replica's share of a limit in degraded mode is 1/this).",
            registry=registry,
        )

    def _protection_series(self, registry: CollectorRegistry) -> None:
        """Adaptive caps (overload.protect, core/protect.py)."""
        self.adaptive_cap = Gauge(
            "qos_adaptive_cap",
            "The adaptive cap (overload.protect) of a class on a model's requests in flight, as "
            "learnt; it applies while qos_adaptive_cap_binding is 1.",
            ["model", "class"],
            registry=registry,
        )
        self.adaptive_cap_binding = Gauge(
            "qos_adaptive_cap_binding",
            "1 while better-ranked classes send the model work, so the adaptive cap applies.",
            ["model", "class"],
            registry=registry,
        )
        self.lateness_limit = Gauge(
            "qos_lateness_limit",
            "The model's queue depth from which a class's requests sent at once have lately "
            "ended after its objective more often than not (core/lateness.py): its arrivals "
            "there are shed or relegated at once. No series: no such depth now.",
            ["model", "class"],
            registry=registry,
        )

    def _policy_series(self, registry: CollectorRegistry) -> None:
        """Policy loads and the version in use."""
        self.policy_reloads = Counter(
            "qos_policy_reloads_total",
            "Policy loads by result (ok or error).",
            ["result"],
            registry=registry,
        )
        self.policy_last_reload_ok = Gauge(
            "qos_policy_last_reload_success",
            "1 if the last policy load succeeded, 0 if it failed and an older policy is in use.",
            registry=registry,
        )
        self.policy_info = Gauge(
            "qos_policy_info",
            "The policy version in use (content hash), as a label; value is always 1.",
            ["version"],
            registry=registry,
        )

    def _backend_series(self, registry: CollectorRegistry) -> None:
        """Triton's load as scraped, and the requests held for it."""
        self.held = Gauge(
            "qos_held_requests",
            "Requests this replica holds (defers) until Triton has room, by class.",
            ["class"],
            registry=registry,
        )
        self.held_seconds = Histogram(
            "qos_hold_duration_seconds",
            "How long held requests waited, by class and how the hold ended: admitted, "
            "expired, displaced (an arrival at the class's full queue took its place) or "
            "cancelled.",
            ["class", "result"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        self.backend_queue_depth = Gauge(
            "qos_backend_queue_depth",
            "Requests waiting in Triton's queue (nv_inference_pending_request_count).",
            ["endpoint", "model"],
            registry=registry,
        )
        self.backend_completions = Gauge(
            "qos_backend_completions_per_second",
            "Requests Triton completed per second, between the last two scrapes.",
            ["endpoint", "model"],
            registry=registry,
        )
        self.backend_signal_age = Gauge(
            "qos_backend_signal_age_seconds",
            "Age of the load signal of each model on each Triton endpoint (seconds since its "
            "last successful scrape), set every scrape round; past QOS_TRITON_STALE_MS the "
            "classes read it per their on_stale.",
            ["endpoint", "model"],
            registry=registry,
        )
        self.model_held = Gauge(
            "qos_model_held_requests",
            "Requests this replica holds until Triton has room, by model (the models Triton "
            "reports or the policy names).",
            ["model"],
            registry=registry,
        )
        self.backend_ready = Gauge(
            "qos_backend_ready",
            "1 if the Triton endpoint answered ready at the last scrape.",
            ["endpoint"],
            registry=registry,
        )
        self.backend_scrape_errors = Counter(
            "qos_backend_scrape_errors_total",
            "Failed or timed-out scrapes of a Triton metrics endpoint.",
            ["endpoint"],
            registry=registry,
        )
        self._nudge_series(registry)

    def _nudge_series(self, registry: CollectorRegistry) -> None:
        """The nudges of Triton's stalling batchers (sidecar/backends/nudge.py)."""
        self.nudges = Counter(
            "qos_triton_nudges_total",
            "Nudges sent to Triton's dynamic batchers (sidecar/core/nudge.py), by endpoint, model "
            "and outcome: rejected (the expected answer; Triton counts each as a failed request, "
            "reason REJECTED), ran, refused (either stops the model's nudges), failed.",
            ["endpoint", "model", "outcome"],
            registry=registry,
        )
        self.nudge_enabled = Gauge(
            "qos_triton_nudge_enabled",
            "1 if a model's configuration lets the sidecar nudge it, 0 if not (the log says "
            "why), by endpoint and model.",
            ["endpoint", "model"],
            registry=registry,
        )

    def record_decision(
        self, decision: Decision, known_tenants: Container[str], api: str, *, shadow: bool = False
    ) -> None:
        """`shadow`: what the policy as written decided, not applied (core/shadow.py)."""
        tenant = decision.tenant
        if tenant is None or tenant not in known_tenants:
            tenant = UNKNOWN
        klass, outcome, reason = decision.klass or UNKNOWN, decision.outcome, decision.reason
        mode = "true" if shadow else "false"
        self.decisions.inc((tenant, klass, outcome.value, reason.value, mode))
        if decision.reason is Reason.MALFORMED and not shadow:
            self.malformed.labels(api).inc()

    def completed(self, released: bool) -> None:
        """A lease's release ran: it freed the lease, or found it freed already."""
        self.completion("released" if released else "already_released")

    def completion(self, result: str) -> None:
        """One completion signal (`qos_completions_total`), by its result."""
        self._child(self.completions, result).inc()

    def observe_decision_seconds(self, api: str, seconds: float) -> None:
        self.decision_seconds.observe((api,), seconds)

    def _child(self, metric: Any, *labels: str) -> Any:
        """`metric.labels(*labels)`, looked up once per label set (`labels` costs a few
        microseconds a call, on every decision)."""
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def set_policy_version(self, version: str) -> None:
        self.policy_info.clear()
        self.policy_info.labels(version).set(1)
