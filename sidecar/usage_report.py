"""`qos-sidecar usage`: per-tenant usage (chargeback) and the capacity review for a period,
read from the Prometheus that scrapes the sidecars.

Rules:
- Counters are read with one instant query each at `until`: `increase(...[until - since])`
  summed by tenant and model over every replica (`sum by`), so restarts of a replica and
  the scrape's own extrapolation are Prometheus's, as in any dashboard.
- GPU-seconds are `qos_gpu_seconds_total` (Triton's compute time split by work, see
  core/usage.py); the share is of the model's total, `__unattributed__` included, which is
  listed as a row of its own so the rows add up to Triton's counter. With several replicas
  in front of one Triton each replica splits the whole counter over its own work, so
  `--gpu-from triton` splits Triton's counter (scraped by Prometheus) over every replica's
  `qos_usage_work_seconds_total` per step instead (`split_gpu_seconds`).
- Demand is `qos_usage_demand_total` (every decision with a tenant, retries included) per
  second of the period; the entitlement is the tenant's sustained request rate in the
  policy (`--policy`): its tightest `requests` bucket that covers every class, else its
  loosest class-restricted one; none: no request limit (blank). Cost buckets are not
  requests and are not compared.
- Contention is read over time (`query_range`, `--step`): a model's demand rate
  (`qos_model_demand_rate`, summed over replicas: each counts its own arrivals) against its
  drain rate (`qos_model_drain_rate`, the max over replicas: each reads the same Triton). The
  share of the period in runs of contention longer than `--contention-threshold` is the
  core's `sustained_share`; no series: blank. A model often in sustained contention needs
  capacity: policies only choose who waits.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from sidecar.core.usage import UNATTRIBUTED, aligned, split, sustained_share
from sidecar.errors import SidecarError
from sidecar.policy.model import BucketUnit, Policy, TenantPolicy

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)(s|m|h|d|w)$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
NEEDS_CAPACITY = 0.1  # sustained contention over this share of the period: say so
COLUMNS = (
    "tenant",
    "model",
    "requests",
    "prompt_tokens",
    "generated_tokens",
    "gpu_seconds",
    "gpu_share",
    "demand_per_s",
    "entitlement_per_s",
    "contention_share",
)


class UsageQueryError(SidecarError):
    """Prometheus could not be asked, or answered an error."""

    status = 502


def parse_time(text: str, now: float) -> float:
    """Unix seconds of `text`: `now`, a duration before now (`24h`, `90m`, `7d`), or RFC3339
    (`2026-12-01T10:00:00Z`, with an offset or Z)."""
    text = text.strip()
    if text == "now":
        return now
    relative = _RELATIVE.match(text)
    if relative is not None:
        return now - float(relative.group(1)) * _UNIT_S[relative.group(2)]
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise UsageQueryError(f"time {text!r}: expected RFC3339 or a duration like 24h") from None
    if moment.tzinfo is None:
        raise UsageQueryError(f"time {text!r}: RFC3339 needs a zone (Z or +HH:MM)")
    return moment.timestamp()


class PrometheusAPI:
    """The two calls of Prometheus's HTTP API this report uses."""

    def __init__(self, base_url: str, timeout_s: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout_s = timeout_s

    def _get(self, path: str, params: Mapping[str, str]) -> Any:
        url = f"{self.base_url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=self.timeout_s) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as exc:
            with exc:
                detail = exc.read().decode(errors="replace")[:300]
            raise UsageQueryError(f"{url}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            raise UsageQueryError(f"cannot ask {self.base_url}: {exc}") from None
        if answer.get("status") != "success":
            raise UsageQueryError(f"{url}: {answer.get('error', 'no success')}")
        return answer["data"]

    def query(self, expr: str, at: float) -> list[tuple[dict[str, str], float]]:
        """An instant vector: (labels, value) per series."""
        data = self._get("/api/v1/query", {"query": expr, "time": f"{at:.3f}"})
        return [(dict(s["metric"]), float(s["value"][1])) for s in data["result"]]

    def query_range(
        self, expr: str, start: float, end: float, step_s: float
    ) -> list[tuple[dict[str, str], list[tuple[float, float]]]]:
        """A range matrix: (labels, [(time, value)]) per series."""
        params = {
            "query": expr,
            "start": f"{start:.3f}",
            "end": f"{end:.3f}",
            "step": f"{step_s:g}",
        }
        data = self._get("/api/v1/query_range", params)
        return [
            (dict(s["metric"]), [(float(t), float(v)) for t, v in s["values"]])
            for s in data["result"]
        ]


@dataclass(frozen=True, slots=True)
class UsageRow:
    tenant: str
    model: str
    requests: float = 0.0
    prompt_tokens: float = 0.0
    generated_tokens: float = 0.0
    gpu_seconds: float = 0.0
    gpu_share: float = 0.0  # of the model's GPU-seconds
    demand_per_s: float = 0.0
    entitlement_per_s: float | None = None  # the tenant's, over every model
    contention_share: float | None = None  # the model's

    def cells(self) -> list[str]:
        return [
            self.tenant,
            self.model,
            f"{self.requests:.0f}",
            f"{self.prompt_tokens:.0f}",
            f"{self.generated_tokens:.0f}",
            f"{self.gpu_seconds:.3f}",
            f"{self.gpu_share:.3f}",
            f"{self.demand_per_s:.3f}",
            "" if self.entitlement_per_s is None else f"{self.entitlement_per_s:g}",
            "" if self.contention_share is None else f"{self.contention_share:.3f}",
        ]


def entitlement_per_s(tenant: TenantPolicy) -> float | None:
    """The tenant's sustained requests per second (see the module's rules)."""
    buckets = [b for b in tenant.buckets if b.unit is BucketUnit.REQUESTS]
    every_class = [b.rate_per_s for b in buckets if not b.classes]
    if every_class:
        return min(every_class)
    return max((b.rate_per_s for b in buckets), default=None)


def _increase(api: PrometheusAPI, name: str, by: str, until: float, range_s: float) -> Any:
    expr = f"sum by ({by}) (increase({name}[{max(1, round(range_s))}s]))"
    return api.query(expr, until)


def contention_shares(
    api: PrometheusAPI, since: float, until: float, step_s: float, threshold_s: float
) -> dict[str, float]:
    """Per model, the share of the period in sustained contention (models with both
    series only)."""
    demand = api.query_range("sum by (model) (qos_model_demand_rate)", since, until, step_s)
    drain = api.query_range("max by (model) (qos_model_drain_rate)", since, until, step_s)
    drains = {labels.get("model", ""): values for labels, values in drain}
    shares = {}
    for labels, values in demand:
        model = labels.get("model", "")
        if model in drains:
            samples = aligned(values, drains[model])
            shares[model] = sustained_share(samples, step_s, threshold_s)
    return shares


def split_gpu_seconds(
    api: PrometheusAPI, since: float, until: float, step_s: float
) -> list[tuple[dict[str, str], float]]:
    """GPU-seconds per tenant and model, split here (`--gpu-from triton`): in each `step_s`
    of the period, Triton's compute-time increase as Prometheus scraped it, over every
    replica's `qos_usage_work_seconds_total` in that step (`core.usage.split`)."""
    window = f"{max(1, round(step_s))}s"
    start = since + step_s  # each point covers the step before it
    work = api.query_range(
        f"sum by (tenant, model) (increase(qos_usage_work_seconds_total[{window}]))",
        start,
        until,
        step_s,
    )
    compute = api.query_range(
        f"sum by (model) (increase(nv_inference_compute_infer_duration_us[{window}]))",
        start,
        until,
        step_s,
    )
    weights: dict[tuple[str, float], dict[str, float]] = {}  # (model, time) -> tenant -> work
    for labels, values in work:
        for at, work_s in values:
            per_tenant = weights.setdefault((labels.get("model", ""), at), {})
            tenant = labels.get("tenant", "")
            per_tenant[tenant] = per_tenant.get(tenant, 0.0) + work_s
    totals: dict[tuple[str, str], float] = {}
    for labels, values in compute:
        model = labels.get("model", "")
        for at, compute_us in values:
            for tenant, seconds in split(compute_us / 1e6, weights.get((model, at), {})).items():
                totals[tenant, model] = totals.get((tenant, model), 0.0) + seconds
    return [({"tenant": tenant, "model": model}, v) for (tenant, model), v in totals.items()]


def collect(
    api: PrometheusAPI,
    since: float,
    until: float,
    policy: Policy | None = None,
    *,
    step_s: float = 60.0,
    threshold_s: float = 300.0,
    gpu_from: str = "sidecar",
) -> list[UsageRow]:
    """Every tenant and model with usage or demand in [since, until], sorted."""
    if until <= since:
        raise UsageQueryError("--since must be before --until")
    range_s = until - since
    rows: dict[tuple[str, str], dict[str, float]] = {}

    def add(found: Any, field: str, kind: str | None = None) -> None:
        for labels, value in found:
            if kind is not None and labels.get("kind") != kind:
                continue
            key = (labels.get("tenant", ""), labels.get("model", ""))
            row = rows.setdefault(key, {})
            row[field] = row.get(field, 0.0) + (0.0 if math.isnan(value) else value)

    add(_increase(api, "qos_usage_requests_total", "tenant, model", until, range_s), "requests")
    tokens = _increase(api, "qos_usage_tokens_total", "tenant, model, kind", until, range_s)
    add(tokens, "prompt_tokens", "prompt")
    add(tokens, "generated_tokens", "generated")
    if gpu_from == "triton":
        add(split_gpu_seconds(api, since, until, step_s), "gpu_seconds")
    else:
        add(_increase(api, "qos_gpu_seconds_total", "tenant, model", until, range_s), "gpu_seconds")
    add(_increase(api, "qos_usage_demand_total", "tenant, model", until, range_s), "demand")
    contention = contention_shares(api, since, until, step_s, threshold_s)
    return _rows(rows, range_s, contention, policy)


def _rows(
    rows: Mapping[tuple[str, str], Mapping[str, float]],
    range_s: float,
    contention: Mapping[str, float],
    policy: Policy | None,
) -> list[UsageRow]:
    """The report's rows from the summed values, shares and entitlements added."""
    per_model: dict[str, float] = {}
    for (_, model), row in rows.items():
        per_model[model] = per_model.get(model, 0.0) + row.get("gpu_seconds", 0.0)
    tenants = policy.tenants if policy is not None else {}
    out = []
    for (tenant, model), row in sorted(rows.items(), key=lambda item: _order(item[0])):
        known = tenants.get(tenant)
        total = per_model.get(model, 0.0)
        out.append(
            UsageRow(
                tenant=tenant,
                model=model,
                requests=row.get("requests", 0.0),
                prompt_tokens=row.get("prompt_tokens", 0.0),
                generated_tokens=row.get("generated_tokens", 0.0),
                gpu_seconds=row.get("gpu_seconds", 0.0),
                gpu_share=row.get("gpu_seconds", 0.0) / total if total > 0 else 0.0,
                demand_per_s=row.get("demand", 0.0) / range_s,
                entitlement_per_s=entitlement_per_s(known) if known is not None else None,
                contention_share=contention.get(model),
            )
        )
    return out


def _order(key: tuple[str, str]) -> tuple[bool, str, str]:
    tenant, model = key
    return (tenant == UNATTRIBUTED, tenant, model)  # the remainder last


def write_csv(rows: Sequence[UsageRow], out: TextIO) -> None:
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(row.cells())


def write_table(rows: Sequence[UsageRow], out: TextIO, threshold_s: float) -> None:
    """Aligned columns, then one line per model in sustained contention."""
    cells = [list(COLUMNS), *(row.cells() for row in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    for line in cells:
        print(
            "  ".join(
                c.ljust(w) if i < 2 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip(),
            file=out,
        )
    contended = {r.model: r.contention_share for r in rows if r.contention_share is not None}
    for model, share in sorted(contended.items()):
        if share >= NEEDS_CAPACITY:
            print(
                f"{model}: demand above capacity in runs over {threshold_s:g}s for "
                f"{share:.0%} of the period: more GPUs, not another policy",
                file=out,
            )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prometheus", required=True, help="e.g. http://prometheus:9090")
    parser.add_argument("--since", default="24h", help="RFC3339 or a duration ago (24h)")
    parser.add_argument("--until", default="now", help="RFC3339, a duration ago, or now")
    parser.add_argument("--format", choices=("table", "csv"), default="table")
    parser.add_argument("--policy", type=Path, action="append", help="for entitlements")
    parser.add_argument(
        "--step", type=float, default=60.0, help="contention sample step (and split step), s"
    )
    parser.add_argument(
        "--gpu-from",
        choices=("sidecar", "triton"),
        default="sidecar",
        help="sidecar: the sidecars' qos_gpu_seconds_total (one sidecar per Triton); triton: "
        "split Triton's compute counter, scraped by Prometheus, by every replica's work each "
        "step (several replicas in front of one Triton)",
    )
    parser.add_argument(
        "--contention-threshold",
        type=float,
        default=300.0,
        help="seconds demand must stay above capacity to count as sustained",
    )


def run(args: argparse.Namespace, out: TextIO | None = None) -> int:
    """`qos-sidecar usage`. Raises UsageQueryError or PolicyError (the CLI prints them)."""
    from sidecar.policy.loader import load_policy

    out = sys.stdout if out is None else out
    now = time.time()
    policy = load_policy(args.policy) if args.policy else None
    rows = collect(
        PrometheusAPI(args.prometheus),
        parse_time(args.since, now),
        parse_time(args.until, now),
        policy,
        step_s=args.step,
        threshold_s=args.contention_threshold,
        gpu_from=args.gpu_from,
    )
    if args.format == "csv":
        write_csv(rows, out)
    else:
        write_table(rows, out, args.contention_threshold)
    return 0
