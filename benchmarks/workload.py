"""The benchmark's workload: classes, tenants, request sizes and arrival times, all seeded.

Everything here is pure computation (no I/O except reading a trace file), so the same
``WorkloadConfig`` and seed always give the same schedule of requests.

* **Classes** (``ClassSpec``): interactive, standard and batch, with the deadlines of the
  QoS benchmark calibration (0.25 s, 2 s, 20 s) multiplied by one *scale factor* so that they
  fit the speed of the simulated GPU (``slo_scale``).
* **Tenants** (``TenantSpec``): 8 by default; one noisy tenant sends 40% of the requests and
  the others share the rest by Zipf(1.1). Some tenants use only some classes.
* **Sizes**: prompt and output tokens from log-normal distributions, or pairs drawn from a
  trace in the Azure LLM inference format (``TIMESTAMP,ContextTokens,GeneratedTokens``).
* **Arrivals**: Poisson, Gamma with a chosen coefficient of variation, the trace's own
  timestamps rescaled to the target rate, or a step (piecewise-constant Poisson).
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# Deadlines of the QoS benchmark's calibration model, in seconds, before scaling.
PAPER_DEADLINES_S: Mapping[str, float] = {"interactive": 0.25, "standard": 2.0, "batch": 20.0}
CLASS_NAMES: tuple[str, ...] = ("interactive", "standard", "batch")
# Triton priority level per class (1 is the highest), as the sidecar's policy maps them.
CLASS_PRIORITY: Mapping[str, int] = {"interactive": 1, "standard": 2, "batch": 3}


@dataclass(frozen=True, slots=True)
class ClassSpec:
    name: str
    deadline_s: float  # end-to-end deadline after scaling
    priority: int  # Triton priority level, 1 highest


@dataclass(frozen=True, slots=True)
class TenantSpec:
    name: str
    share: float  # fraction of all requests this tenant sends
    quota_weight: float  # fraction of capacity it is entitled to (quotas sum to 1)
    classes: tuple[str, ...]  # the classes it sends

    @property
    def api_key(self) -> str:
        return f"bench-key-{self.name}"

    @property
    def api_key_sha256(self) -> str:
        return hashlib.sha256(self.api_key.encode()).hexdigest()


def zipf_weights(n: int, s: float) -> list[float]:
    raw = [1.0 / (rank**s) for rank in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def default_tenants(
    n: int = 8,
    zipf_s: float = 1.1,
    noisy_share: float | None = 0.4,
    restrictions: Mapping[int, Sequence[str]] | None = None,
) -> tuple[TenantSpec, ...]:
    """Tenant 0 is the noisy one: it sends ``noisy_share`` of the requests (``None``: its plain
    Zipf share); tenants 1..n-1 share the rest by Zipf(``zipf_s``).

    Quota weights (what each tenant is entitled to, as a fraction of capacity C): every quiet
    tenant's weight is its own send share, the noisy tenant is entitled to as much as the
    largest quiet tenant; the weights are normalised to sum to 1. So at load m <= 1/(sum of
    the un-normalised weights) every quiet tenant stays within its quota while the noisy one
    is far over it.

    ``restrictions`` maps a tenant index to the only classes it uses; by default the last
    tenant sends only batch and the one before it only interactive and standard.
    """
    if n < 2:
        raise ValueError("need at least 2 tenants")
    if restrictions is None:
        restrictions = {n - 1: ("batch",), n - 2: ("interactive", "standard")}
    if noisy_share is None:
        shares = zipf_weights(n, zipf_s)
    else:
        quiet = zipf_weights(n - 1, zipf_s)
        shares = [noisy_share] + [(1.0 - noisy_share) * w for w in quiet]
    entitlement = [max(shares[1:]), *shares[1:]]
    total = sum(entitlement)
    names = ["noisy"] + [f"t{i}" for i in range(1, n)]
    return tuple(
        TenantSpec(
            name=names[i],
            share=shares[i],
            quota_weight=entitlement[i] / total,
            classes=tuple(restrictions.get(i, CLASS_NAMES)),
        )
        for i in range(n)
    )


def noisy_burst(
    tenants: Sequence[TenantSpec], burst: float
) -> tuple[tuple[TenantSpec, ...], float]:
    """The noisy point's tenants: tenant 0 sends ``burst`` times its usual rate while every
    other tenant sends its usual share of 1x. Returns the tenants with their send shares
    renormalised (quotas unchanged) and the load, as a multiple of C, that gives each quiet
    tenant exactly its 1x rate."""
    if burst <= 0:
        raise ValueError(f"noisy burst {burst}: expected > 0")
    raw = [t.share * (burst if i == 0 else 1.0) for i, t in enumerate(tenants)]
    load = sum(raw) / sum(t.share for t in tenants)
    total = sum(raw)
    return tuple(replace(t, share=r / total) for t, r in zip(tenants, raw, strict=True)), load


@dataclass(frozen=True, slots=True)
class LengthModel:
    """Log-normal prompt and output lengths (median and sigma of the underlying normal)."""

    prompt_median: float = 400.0
    prompt_sigma: float = 0.6
    output_median: float = 64.0
    output_sigma: float = 0.5
    max_prompt: int = 8192
    max_output: int = 1024


@dataclass(frozen=True, slots=True)
class Trace:
    """Rows of an Azure-format trace: arrival offsets (s, from the first row) and sizes."""

    path: Path
    offsets_s: npt.NDArray[Any]
    prompt: npt.NDArray[Any]
    output: npt.NDArray[Any]

    @property
    def mean_rate(self) -> float:
        span = float(self.offsets_s[-1] - self.offsets_s[0])
        return (len(self.offsets_s) - 1) / span if span > 0 else 1.0


def load_trace(path: Path) -> Trace:
    """Read ``TIMESTAMP,ContextTokens,GeneratedTokens`` (the Azure LLM inference trace 2023)."""
    stamps: list[float] = []
    prompt: list[int] = []
    output: list[int] = []
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            text = row["TIMESTAMP"].strip()
            # Seven fractional digits in the Azure files; datetime takes at most six.
            if "." in text:
                head, frac = text.split(".", 1)
                text = f"{head}.{frac[:6]}"
            stamps.append(dt.datetime.fromisoformat(text).timestamp())
            prompt.append(max(0, int(row["ContextTokens"])))
            output.append(max(1, int(row["GeneratedTokens"])))
    if len(stamps) < 2:
        raise ValueError(f"{path}: a trace needs at least 2 rows")
    order = np.argsort(np.asarray(stamps), kind="stable")
    times = np.asarray(stamps)[order]
    return Trace(
        path=path,
        offsets_s=times - times[0],
        prompt=np.asarray(prompt, dtype=np.int64)[order],
        output=np.asarray(output, dtype=np.int64)[order],
    )


@dataclass(frozen=True)
class WorkloadConfig:
    tenants: tuple[TenantSpec, ...] = field(default_factory=default_tenants)
    class_mix: Mapping[str, float] = field(
        default_factory=lambda: {name: 1.0 / len(CLASS_NAMES) for name in CLASS_NAMES}
    )
    slo_scale: float = 1.0  # deadlines = PAPER_DEADLINES_S * slo_scale
    lengths: LengthModel = LengthModel()
    trace: Trace | None = None  # sizes (and, with arrival "trace", times) from a trace

    @property
    def classes(self) -> dict[str, ClassSpec]:
        return {
            name: ClassSpec(name, PAPER_DEADLINES_S[name] * self.slo_scale, CLASS_PRIORITY[name])
            for name in CLASS_NAMES
        }


@dataclass(frozen=True, slots=True)
class Request:
    t: float  # scheduled send time, seconds from the start of the run
    tenant: str
    klass: str
    prompt_tokens: int
    output_tokens: int


@dataclass(frozen=True, slots=True)
class Arrival:
    """How arrival times are drawn. ``kind``: poisson | gamma | trace | step.

    ``cv`` is the coefficient of variation of the gaps for ``gamma``. ``phases`` is, for
    ``step``, a list of (seconds, multiple of the base rate).
    """

    kind: str = "poisson"
    cv: float = 1.0
    phases: tuple[tuple[float, float], ...] = ()


def arrival_times(
    rng: np.random.Generator,
    arrival: Arrival,
    rate: float,
    duration_s: float,
    trace: Trace | None = None,
) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """Send times in [0, duration_s) at mean ``rate`` per second; for a trace replay also the
    indices of the trace rows used (so their sizes go with their times)."""
    if rate <= 0:
        return np.zeros(0), None
    if arrival.kind == "poisson" or (arrival.kind == "gamma" and arrival.cv == 1.0):
        return _renewal(rng, lambda k: rng.exponential(1.0 / rate, k), rate, duration_s), None
    if arrival.kind == "gamma":
        shape = 1.0 / (arrival.cv**2)
        scale = 1.0 / (rate * shape)
        return _renewal(rng, lambda k: rng.gamma(shape, scale, k), rate, duration_s), None
    if arrival.kind == "step":
        parts = []
        start = 0.0
        for seconds, multiple in arrival.phases:
            times, _ = arrival_times(rng, Arrival("poisson"), rate * multiple, seconds)
            parts.append(times + start)
            start += seconds
        return (np.concatenate(parts) if parts else np.zeros(0)), None
    if arrival.kind == "trace":
        if trace is None:
            raise ValueError("arrival 'trace' needs a trace file (--trace)")
        return _trace_window(rng, trace, rate, duration_s)
    raise ValueError(f"unknown arrival kind {arrival.kind!r}")


def _trace_window(
    rng: np.random.Generator, trace: Trace, rate: float, duration_s: float
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """`rate * duration_s` consecutive trace rows from a random start (wrapping round the
    trace's end), their times scaled to end at `duration_s`: the trace's clusters and lulls,
    at the point's rate. The whole run's stretch (the trace's mean rate over `rate`) gave
    each point as many rows as its stretch of the trace held: with a quiet stretch, the 3x
    point of a quick run sent 795 requests where 2x sent 957 (issue 12)."""
    count = _point_count(rng, rate, duration_s)
    n = len(trace.offsets_s)
    start = int(rng.integers(0, n))
    index = start + np.arange(count + 1)
    rows = index % n
    lap = float(trace.offsets_s[-1] - trace.offsets_s[0]) + 1.0 / trace.mean_rate
    at = trace.offsets_s[rows] + (index // n) * lap - trace.offsets_s[start]
    return _fit(at, duration_s), rows[:count].astype(np.int64)


def _point_count(rng: np.random.Generator, rate: float, duration_s: float) -> int:
    """A point's request count: `rate * duration_s`, its fraction rounded at random so that
    the mean is kept."""
    mean = rate * duration_s
    return int(mean) + int(rng.random() < mean - int(mean))


def _fit(ends: npt.NDArray[Any], duration_s: float) -> npt.NDArray[Any]:
    """The first n of n + 1 increasing offsets, scaled so that the last would fall at the
    window's end: n send times in [0, duration_s), their proportions kept."""
    n = len(ends) - 1
    if n <= 0:
        return np.zeros(0)
    if ends[n] <= 0:  # all at one instant (a trace's rows with one timestamp): evenly
        return np.arange(n) / n * duration_s
    times: npt.NDArray[Any] = ends[:n] / ends[n] * duration_s
    # A last gap of 1e-17 of the sum (gamma with cv 4 draws such) rounds onto the window's end.
    return np.minimum(times, np.nextafter(duration_s, 0.0))


def _renewal(
    rng: np.random.Generator, gaps: object, rate: float, duration_s: float
) -> npt.NDArray[Any]:
    """Send times of a renewal process (`gaps`: k -> k i.i.d. gaps) that holds exactly
    `rate * duration_s` of them (rounded at random to keep that mean), the count fixed and the
    gaps free. Drawn freely, bursty gaps (gamma, cv 4) gave one quick point fewer requests
    than the point at half its rate, and made C depend on the luck of a few clusters (issue
    12). So n + 1 gaps are drawn and scaled to end at `duration_s`: gamma gaps divided by their
    sum are Dirichlet, independent of the sum, so the times have the law of the process given
    that its (n+1)th arrival is at the window's end; the clusters within the window stay
    (exponential gaps give the uniform order statistics of a Poisson process with n in it)."""
    draw = gaps  # callable k -> array of k gaps
    n = _point_count(rng, rate, duration_s)
    if n == 0:
        return np.zeros(0)
    return _fit(np.cumsum(draw(n + 1)), duration_s)  # type: ignore[operator]


def generate(
    config: WorkloadConfig,
    rate: float,
    duration_s: float,
    arrival: Arrival = Arrival(),
    seed: int = 1,
) -> list[Request]:
    """The whole schedule of one run: ``rate`` requests/s on average for ``duration_s``."""
    rng = np.random.default_rng(seed)
    times, rows = arrival_times(rng, arrival, rate, duration_s, config.trace)
    n = len(times)
    tenants = config.tenants
    shares = np.asarray([t.share for t in tenants], dtype=float)
    who = rng.choice(len(tenants), size=n, p=shares / shares.sum())
    # Class of each request: the configured mix restricted to the tenant's classes.
    mixes = []
    for tenant in tenants:
        weights = np.asarray([config.class_mix.get(c, 0.0) for c in tenant.classes], dtype=float)
        if weights.sum() <= 0:
            weights = np.ones(len(tenant.classes))
        mixes.append(weights / weights.sum())
    pick = rng.random(n)
    if config.trace is not None:
        trace = config.trace
        if rows is None:
            rows = rng.integers(0, len(trace.prompt), size=n)
        prompt = trace.prompt[rows]
        output = trace.output[rows]
    else:
        lm = config.lengths
        prompt = np.clip(
            np.round(rng.lognormal(math.log(lm.prompt_median), lm.prompt_sigma, n)),
            1,
            lm.max_prompt,
        ).astype(np.int64)
        output = np.clip(
            np.round(rng.lognormal(math.log(lm.output_median), lm.output_sigma, n)),
            1,
            lm.max_output,
        ).astype(np.int64)
    out: list[Request] = []
    for i in range(n):
        tenant = tenants[int(who[i])]
        cum = np.cumsum(mixes[int(who[i])])
        klass = tenant.classes[min(int(np.searchsorted(cum, pick[i], side="right")), len(cum) - 1)]
        out.append(Request(float(times[i]), tenant.name, klass, int(prompt[i]), int(output[i])))
    return out


def sample_sizes(
    config: WorkloadConfig, n: int, seed: int
) -> tuple[npt.NDArray[Any], npt.NDArray[Any]]:
    """``n`` (prompt, output) pairs from the workload's size distribution."""
    requests = generate(config, rate=float(n), duration_s=1.0, seed=seed)
    while len(requests) < n:
        requests += generate(config, rate=float(n), duration_s=1.0, seed=seed + len(requests))
    requests = requests[:n]
    return (
        np.asarray([r.prompt_tokens for r in requests]),
        np.asarray([r.output_tokens for r in requests]),
    )
