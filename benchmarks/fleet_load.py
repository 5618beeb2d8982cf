"""The fleet benchmark's policy and load: one policy for every scenario, open-loop Poisson
schedules split unevenly over the replicas, and one `benchmarks.loadgen` run per replica.

Rules:
- One policy file serves every scenario (each scenario uses its own tenants and classes), so
  a fleet is started once per store and topology, not once per scenario.
- Every request asks the simulated fixed-cost model `simgpu` for a fixed `DELAY_MS`: a batch
  of up to 8 takes that long whatever its size, so Triton's capacity is 8 / delay.
- A tenant either spreads its requests over the replicas by the split (each request draws its
  replica, weighted) or sends them all through one replica.
- The generators of the replicas run side by side, one thread (and event loop) each; every
  record gets an absolute monotonic send time, so scenarios can cut windows out of the run.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from benchmarks import loadgen
from benchmarks.loadgen import Prepared, Record
from benchmarks.workload import Request

API_KEY_PREFIX = "fleet-key-"
INFER_PATH = "/v2/models/simgpu/infer"
# The metered tenants of the rate scenarios: tenant -> (requests/s, burst).
METERED = {"metered-a": (20.0, 5), "metered-b": (8.0, 3), "metered-l": (20.0, 6)}
# Metered tenants whose bucket is in leased mode: tenant -> lease_ms. The policy counts its
# models (the interactive and pod classes' max_in_flight), so each of their requests spends a
# slice and holds only its model's entry (sidecar/core/slices.py): slices of 2 units here.
LEASED = {"metered-l": 100}
CAPPED_CONCURRENCY = 3
POD_CAP = 3  # max_in_flight of the pod scenario's class: per pod in the pod topology
POOL_CAP = 8  # max_in_flight of the fairness scenario's class: the pool's, one batch
QUIET = ("q0", "q1", "q2", "q3")
# The weights scenario's tenants and their policy weights (their share of held turns).
WEIGHTED = {"heavy": 3.0, "light": 1.0}
PROBE_TENANT = "probe"
INTERACTIVE_OBJECTIVE_MS = 1000


def api_key(tenant: str) -> str:
    return API_KEY_PREFIX + tenant


def _tenant(name: str, klass: str, extra: str = "") -> str:
    digest = hashlib.sha256(api_key(name).encode()).hexdigest()
    return (
        f"  {name}:\n    match: {{api_key_sha256: [{digest}]}}\n"
        f"    allowed_classes: [{klass}]\n    default_class: {klass}\n{extra}"
    )


def write_policy(directory: Path) -> Path:
    """The one policy (module rule 1); returns its directory."""
    directory.mkdir(parents=True, exist_ok=True)
    tenants = [
        _tenant(
            n,
            "standard",
            f"    buckets: [{{unit: requests, rate: {r}, burst: {b}"
            + (f", lease_ms: {LEASED[n]}" if n in LEASED else "")
            + "}]\n",
        )
        for n, (r, b) in METERED.items()
    ]
    tenants.append(_tenant("capped", "standard", f"    max_concurrency: {CAPPED_CONCURRENCY}\n"))
    tenants.append(
        _tenant(
            PROBE_TENANT,
            "standard",
            "    buckets: [{unit: requests, rate: 100000, burst: 100000}]\n",
        )
    )
    tenants += [_tenant(n, "interactive") for n in ("noisy", *QUIET)]
    tenants += [_tenant(n, "interactive", f"    weight: {w:g}\n") for n, w in WEIGHTED.items()]
    tenants.append(_tenant("podload", "pod"))
    (directory / "fleet.yaml").write_text(
        "identity:\n  sources:\n    - {kind: api_key, header: x-api-key}\n"
        "unknown_tenants: {action: reject}\n"
        "classes:\n"
        "  standard: {rank: 2, latency_objective_ms: 2000, max_wait_ms: 0, triton_priority: 2}\n"
        f"  interactive: {{rank: 1, latency_objective_ms: {INTERACTIVE_OBJECTIVE_MS},"
        " max_wait_ms: 700, triton_priority: 1,\n"
        f"    overload: {{admit_below: {POOL_CAP}, shed_above: 1000,"
        f" max_in_flight: {POOL_CAP}}}}}\n"
        "  pod: {rank: 2, latency_objective_ms: 2000, max_wait_ms: 100, triton_priority: 2,\n"
        f"    overload: {{admit_below: 100, shed_above: 1000, max_in_flight: {POD_CAP}}}}}\n"
        "tenants:\n" + "".join(tenants)
    )
    return directory


@dataclass(frozen=True)
class Flow:
    """One tenant's open-loop stream: `rate` requests/s, spread over the replicas by the
    split, or all through `replica`."""

    tenant: str
    klass: str
    rate: float
    replica: int | None = None


def body(delay_ms: float) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "DELAY_MS", "shape": [1, 1], "datatype": "FP32", "data": [delay_ms]}]}
    ).encode()


def schedule(
    flows: Sequence[Flow], split: Sequence[float], duration_s: float, delay_ms: float, seed: int
) -> list[list[Prepared]]:
    """Per replica, the requests it is sent (Poisson arrivals per flow)."""
    rng = np.random.default_rng(seed)
    weights = np.asarray(split, dtype=float) / sum(split)
    per_replica: list[list[Prepared]] = [[] for _ in split]
    payload = body(delay_ms)
    for flow in flows:
        n = int(rng.poisson(flow.rate * duration_s))
        times = np.sort(rng.uniform(0.0, duration_s, n))
        if flow.replica is None:
            replicas = rng.choice(len(split), size=n, p=weights)
        else:
            replicas = np.full(n, flow.replica)
        headers = {
            "content-type": "application/json",
            "x-api-key": api_key(flow.tenant),
            "x-qos-class": flow.klass,
        }
        for t, replica in zip(times, replicas, strict=True):
            request = Request(float(t), flow.tenant, flow.klass, 0, 0)
            per_replica[int(replica)].append(Prepared(request, INFER_PATH, headers, payload))
    for prepared in per_replica:
        prepared.sort(key=lambda p: p.request.t)
    return per_replica


@dataclass
class Sent:
    """One request's record, with the replica it went through and absolute times."""

    record: Record
    replica: int
    sent_at: float  # monotonic

    @property
    def ok(self) -> bool:
        return self.record.status == 200

    @property
    def answered_at(self) -> float:
        return self.sent_at + (self.record.latency or 0.0)


def run_split(
    urls: Sequence[str], per_replica: Sequence[Sequence[Prepared]], timeout_s: float = 10.0
) -> list[Sent]:
    """Send each replica its requests, all replicas at once; every request's record."""
    results: list[list[Sent]] = [[] for _ in urls]

    def drive(i: int) -> None:
        if not per_replica[i]:
            return
        classes = {p.request.klass for p in per_replica[i]}
        started = time.monotonic() + 0.05  # loadgen's first send is 50 ms after it starts
        run = loadgen.run(urls[i], per_replica[i], {c: timeout_s for c in classes})
        results[i] = [Sent(r, i, started + r.sent) for r in run.records]

    threads = [threading.Thread(target=drive, args=(i,)) for i in range(len(urls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sorted((s for batch in results for s in batch), key=lambda s: s.sent_at)


def run_in_background(
    urls: Sequence[str], per_replica: Sequence[Sequence[Prepared]]
) -> tuple[threading.Thread, list[Sent]]:
    """`run_split` in a thread; the list fills when the thread ends."""
    out: list[Sent] = []
    thread = threading.Thread(target=lambda: out.extend(run_split(urls, per_replica)))
    thread.start()
    return thread, out


def admitted_per_tenant(sent: Sequence[Sent], start: float, end: float) -> dict[str, int]:
    """Requests answered 200 per tenant among those sent in [start, end)."""
    counts: dict[str, int] = {}
    for s in sent:
        if start <= s.sent_at < end and s.ok:
            counts[s.record.tenant] = counts.get(s.record.tenant, 0) + 1
    return counts


def statuses(sent: Sequence[Sent]) -> dict[str, dict[str, int]]:
    """Per tenant, how many requests ended with each status (0: no answer)."""
    out: dict[str, dict[str, int]] = {}
    for s in sent:
        per = out.setdefault(s.record.tenant, {})
        per[str(s.record.status)] = per.get(str(s.record.status), 0) + 1
    return out


def max_min_shares(
    demands: Mapping[str, float], total: float, weights: Mapping[str, float] | None = None
) -> dict[str, float]:
    """Weighted max-min fair (water-filling) split of `total` among tenants with these
    demands: each gets min(demand, level x its weight (default 1)), the level set so the
    parts sum to `total`."""
    left, remaining = dict(demands), total
    weight = {t: (weights or {}).get(t, 1.0) for t in demands}
    shares: dict[str, float] = {}
    while left:
        level = remaining / sum(weight[t] for t in left)
        capped = {t: d for t, d in left.items() if d <= level * weight[t]}
        if not capped:
            shares.update({t: level * weight[t] for t in left})
            break
        for t, d in capped.items():
            shares[t] = d
            remaining -= d
            del left[t]
    return shares
