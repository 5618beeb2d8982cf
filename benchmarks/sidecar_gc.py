"""The sidecar's own garbage collector during a benchmark phase, from its `qos_gc_pause_seconds`.

While a collection runs the sidecar makes no decision, so a long one is a latency spike for
every request waiting on it (sidecar/gc_pauses.py). `totals` reads the histogram so far;
`during` is one phase's share of it; `describe` says it in a line.
"""

from __future__ import annotations

from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from benchmarks.fleet_stack import metrics_text


def totals(admin_url: str) -> dict[str, float]:
    """The sidecar's ``qos_gc_pause_seconds`` so far: collections (``count:<generation>``),
    pause sums (``sum:<generation>``) and cumulative buckets over all generations
    (``le:<bound>`` -> collections at most that long)."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text(admin_url)):
        if family.name != "qos_gc_pause_seconds":
            continue
        for sample in family.samples:
            kind = sample.name.removeprefix("qos_gc_pause_seconds_")
            if kind == "bucket":
                key = "le:" + sample.labels["le"]
            elif kind in ("count", "sum"):
                key = kind + ":" + sample.labels["generation"]
            else:
                continue  # _created
            out[key] = out.get(key, 0.0) + sample.value
    return out


def during(before: dict[str, float], after: dict[str, float]) -> dict[str, Any]:
    """What the collector cost in one phase: collections (all, generation 2), the pauses'
    sum in ms, and the bucket the longest one fell in (its upper bound, ms)."""
    delta = {key: after.get(key, 0.0) - before.get(key, 0.0) for key in after}
    buckets = sorted((float(key[3:]), n) for key, n in delta.items() if key.startswith("le:"))
    total = delta.get("le:+Inf", 0.0)
    longest = next((le for le, n in buckets if total > 0 and n >= total), None)
    return {
        "collections": int(sum(n for key, n in delta.items() if key.startswith("count:"))),
        "gen2_collections": int(delta.get("count:2", 0.0)),
        "pause_ms": round(1000 * sum(n for key, n in delta.items() if key.startswith("sum:")), 3),
        "longest_ms_at_most": None if longest is None else round(1000 * longest, 3),
    }


def describe(gc: dict[str, Any]) -> str:
    """`during`'s numbers in a line: `3 collections (1 full), 12.5 ms in all, the longest at most
    10 ms`."""
    longest = gc["longest_ms_at_most"]
    bound = "" if longest is None else f", the longest at most {longest:g} ms"
    return (
        f"{gc['collections']} collections ({gc['gen2_collections']} full),"
        f" {gc['pause_ms']:.1f} ms in all{bound}"
    )
