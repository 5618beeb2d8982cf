"""`qos-sidecar top`: one frame of the live view, from two scrapes of each sidecar's /metrics.

Rules:
1. Counters (`qos_decisions_total`) become rates per sidecar, (now - before) / the seconds
   between its two scrapes; a counter that went down (the sidecar restarted) counts from 0.
   The rates are then summed over the sidecars.
2. Gauges of a sidecar's own (`qos_held_requests`, `qos_model_demand_rate`,
   `qos_model_drain_rate`) are summed over the sidecars.
3. Gauges that several sidecars may read from one source are the largest value per label set
   across the sidecars, never a sum: the store's in-flight counts (`qos_in_flight_requests`,
   `qos_model_in_flight_requests`: every replica reads the same fleet-wide count) and a
   Triton endpoint's (`qos_backend_queue_depth`, `qos_backend_completions_per_second`: every
   gateway replica scrapes the same pool). Per model they are then summed over endpoints.
   In the pod topology a model's in-flight count is a pod's: the frame shows the busiest.
4. Quota headroom needs the limits, which /metrics does not carry: given the policy, a
   tenant's concurrency headroom is its `max_concurrency` minus its requests in flight (a
   class's, its `max_concurrency_per_class` entry minus the class's), and its rate headroom the
   slowest `requests` bucket's rate minus its admitted rate. Without a policy: "-".
5. A sidecar that did not answer either scrape is named in the header and left out.
6. Rows are sorted by name; the frame is plain text, one line per row.

Pure: the scrapes (text already parsed, with their times) are passed in.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from sidecar.policy.choices import BucketUnit
from sidecar.policy.model import Policy, TenantPolicy

Labels = tuple[tuple[str, str], ...]
Samples = Mapping[tuple[str, Labels], float]

DECISIONS = "qos_decisions_total"
SUMMED = ("qos_held_requests", "qos_model_demand_rate", "qos_model_drain_rate")
LEGEND = (
    "HELD/s: admitted after a hold; SHED/s: shed for load; REFUSE/s: refused (quota, identity,\n"
    "class, body); IN-FLT: the store's count; HEADROOM: limit left (--policy); QUEUE, DONE/s:\n"
    "Triton's; DEMAND/s, DRAIN/s: offered and completed (the autoscaling signal)"
)
MAXED = (
    "qos_in_flight_requests",
    "qos_model_in_flight_requests",
    "qos_backend_queue_depth",
    "qos_backend_completions_per_second",
)


def parse(text: str) -> dict[tuple[str, Labels], float]:
    """Every sample of a /metrics text, by name and sorted labels."""
    samples: dict[tuple[str, Labels], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@dataclass(frozen=True, slots=True)
class Scrape:
    """One sidecar's /metrics at `at_s` (None: it did not answer, `error` says why)."""

    url: str
    at_s: float
    samples: Samples | None
    error: str = ""


def _of(samples: Samples, name: str) -> Iterable[tuple[dict[str, str], float]]:
    for (sample_name, labels), value in samples.items():
        if sample_name == name:
            yield dict(labels), value


@dataclass(frozen=True, slots=True)
class Merged:
    """The sidecars' samples merged by the rules above."""

    decisions: dict[tuple[str, str, str, str], float]  # (tenant, class, outcome, reason) -> /s
    summed: dict[str, dict[Labels, float]]
    maxed: dict[str, dict[Labels, float]]
    answered: int
    missing: tuple[str, ...]


def merge(before: Sequence[Scrape], after: Sequence[Scrape]) -> Merged:
    """The sidecars' scrapes (the same order of urls in both), merged (rules 1, 2, 3, 5)."""
    decisions: dict[tuple[str, str, str, str], float] = defaultdict(float)
    summed: dict[str, dict[Labels, float]] = {name: defaultdict(float) for name in SUMMED}
    maxed: dict[str, dict[Labels, float]] = {name: {} for name in MAXED}
    missing, answered = [], 0
    for old, new in zip(before, after, strict=True):
        if old.samples is None or new.samples is None or new.at_s <= old.at_s:
            missing.append(f"{new.url} ({new.error or old.error or 'no interval'})")
            continue
        answered += 1
        seconds = new.at_s - old.at_s
        for labels, value in _of(new.samples, DECISIONS):
            key = (labels["tenant"], labels["class"], labels["outcome"], labels["reason"])
            was = old.samples.get((DECISIONS, tuple(sorted(labels.items()))), 0.0)
            decisions[key] += (value - was if value >= was else value) / seconds
        for name in SUMMED:
            for labels, value in _of(new.samples, name):
                summed[name][tuple(sorted(labels.items()))] += value
        for name in MAXED:
            for labels, value in _of(new.samples, name):
                label_set = tuple(sorted(labels.items()))
                maxed[name][label_set] = max(value, maxed[name].get(label_set, value))
    return Merged(dict(decisions), summed, maxed, answered, tuple(missing))


def _by(series: Mapping[Labels, float], *names: str) -> dict[tuple[str, ...], float]:
    """`series` summed by the values of the labels `names`."""
    out: dict[tuple[str, ...], float] = defaultdict(float)
    for labels, value in series.items():
        found = dict(labels)
        out[tuple(found.get(n, "") for n in names)] += value
    return out


@dataclass(frozen=True, slots=True)
class Row:
    """One tenant, or one of its classes: decisions per second and requests in flight."""

    admitted: float = 0.0
    deferred: float = 0.0  # admitted after a hold
    shed_load: float = 0.0  # shed for load (reason overloaded)
    refused: float = 0.0  # every other refusal: quota, identity, class, body
    in_flight: float = 0.0


def rows(merged: Merged) -> dict[tuple[str, str], Row]:
    """(tenant, class) -> Row, and (tenant, "") -> the tenant's total."""
    acc: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0] * 5)
    for (tenant, klass, outcome, reason), per_s in merged.decisions.items():
        column = 0 if outcome == "admit" else 2 if reason == "overloaded" else 3
        for key in ((tenant, klass), (tenant, "")):
            acc[key][column] += per_s
            if reason == "admitted_deferred":
                acc[key][1] += per_s
    for (tenant, klass), count in _by(
        merged.maxed["qos_in_flight_requests"], "tenant", "class"
    ).items():
        for key in ((tenant, klass), (tenant, "")):
            acc[key][4] += count
    return {key: Row(*values) for key, values in acc.items()}


def headroom(tenant: TenantPolicy | None, klass: str, row: Row) -> str:
    """Rule 4, as text."""
    if tenant is None:
        return "-"
    parts = []
    limit = tenant.max_concurrency if not klass else tenant.max_concurrency_per_class.get(klass)
    if limit is not None:
        parts.append(f"conc {limit - row.in_flight:g}/{limit}")
    rates = [b.rate_per_s for b in tenant.buckets if b.unit is BucketUnit.REQUESTS]
    if rates and not klass:
        parts.append(f"rate {min(rates) - row.admitted:.1f}/{min(rates):g}/s")
    return " ".join(parts) or ("no limit" if not klass else "")


def render(before: Sequence[Scrape], after: Sequence[Scrape], policy: Policy | None = None) -> str:
    """One frame (rules at the top)."""
    merged = merge(before, after)
    seconds = max((new.at_s - old.at_s for old, new in zip(before, after, strict=True)), default=0)
    lines = [
        f"qos-sidecar top: {merged.answered} of {len(after)} sidecars,"
        f" rates over {seconds:.1f} s" + ("".join(f"\n  no answer: {m}" for m in merged.missing)),
        "",
        f"{'TENANT / CLASS':<28}{'ADMIT/s':>9}{'HELD/s':>9}{'SHED/s':>9}{'REFUSE/s':>9}"
        f"{'IN-FLT':>8}  HEADROOM",
    ]
    tenants = policy.tenants if policy is not None else {}
    table = rows(merged)
    for tenant, klass in sorted(table):
        row = table[(tenant, klass)]
        name = tenant if not klass else f"  {klass}"
        lines.append(
            f"{name[:28]:<28}{row.admitted:9.2f}{row.deferred:9.2f}{row.shed_load:9.2f}"
            f"{row.refused:9.2f}{row.in_flight:8g}  {headroom(tenants.get(tenant), klass, row)}"
        )
    lines += ["", f"{'CLASS':<28}{'HELD NOW':>9}"]
    for (klass,), held in sorted(_by(merged.summed["qos_held_requests"], "class").items()):
        lines.append(f"{klass[:28]:<28}{held:9g}")
    lines += ["", _model_header(), *_model_lines(merged), "", LEGEND]
    return "\n".join(lines) + "\n"


def _model_header() -> str:
    return (
        f"{'MODEL':<28}{'QUEUE':>7}{'IN-FLT':>8}{'DONE/s':>9}"
        f"{'DEMAND/s':>10}{'DRAIN/s':>9}{'RATIO':>7}"
    )


def _model_lines(merged: Merged) -> list[str]:
    """Per model: Triton's queue and completions (summed over endpoints), the store's in-flight
    count, and the demand signal (sidecar/demand.py) summed over the sidecars."""
    columns = {
        "queue": _by(merged.maxed["qos_backend_queue_depth"], "model"),
        "in_flight": _by(merged.maxed["qos_model_in_flight_requests"], "model"),
        "done": _by(merged.maxed["qos_backend_completions_per_second"], "model"),
        "demand": _by(merged.summed["qos_model_demand_rate"], "model"),
        "drain": _by(merged.summed["qos_model_drain_rate"], "model"),
    }
    models = sorted({key for column in columns.values() for key in column})
    lines = []
    for key in models:
        value = {name: column.get(key) for name, column in columns.items()}
        demand, drain = value["demand"], value["drain"]
        ratio = f"{demand / drain:7.2f}" if demand is not None and drain else f"{'-':>7}"
        lines.append(
            f"{key[0][:28]:<28}{_cell(value['queue'], 7, 'g')}{_cell(value['in_flight'], 8, 'g')}"
            f"{_cell(value['done'], 9, '.2f')}{_cell(demand, 10, '.2f')}"
            f"{_cell(drain, 9, '.2f')}{ratio}"
        )
    return lines


def _cell(value: float | None, width: int, spec: str) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"
