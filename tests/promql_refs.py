"""What the shipped dashboard and alert rules ask Prometheus for, and whether a sidecar's
/metrics has it: metric names, the labels each expression matches on or groups by.

Not a PromQL parser: a reader of the subset the shipped files use. It refuses what it cannot
follow (`on`, `ignoring`, `without`, `group_left`/`group_right`, offsets into other series),
so an expression never passes the check only because the reader skipped a part of it.

- A metric reference is a `qos_*` or `nv_*` name outside a string, with its `{...}`
  matchers; each matcher's label must be on the series.
- `by (labels)` applies to the series inside its aggregation's argument: the parenthesised
  group that follows it (`sum by (a) (x)`) or, written after, the one before (`sum (x) by (a)`).
- Grafana's `label_values(metric, label)` (template variables) needs `label` on `metric`.
- `$__rate_interval` and `$var` in strings are Grafana's; they are read as plain text.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

METRIC = re.compile(r"\b((?:qos|nv)_[A-Za-z0-9_]+)\b")
MATCHER = re.compile(r'\s*([A-Za-z_][A-Za-z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
GROUPING = re.compile(r"\bby\s*\(([^)]*)\)")
LABEL_VALUES = re.compile(r"label_values\(\s*([A-Za-z0-9_]+)\s*,\s*([A-Za-z0-9_]+)\s*\)")
UNSUPPORTED = re.compile(r"\b(on|ignoring|without|group_left|group_right|offset)\b")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')


@dataclass
class Ref:
    """One metric an expression reads, and the labels it needs on it."""

    metric: str
    labels: set[str] = field(default_factory=set)
    matchers: list[tuple[str, str, str]] = field(default_factory=list)  # (label, op, value)


def _group_end(text: str, start: int) -> int:
    """The index after the parenthesis that closes the one at `start`."""
    depth = 0
    for index in range(start, len(text)):
        depth += {"(": 1, ")": -1}.get(text[index], 0)
        if depth == 0:
            return index + 1
    raise ValueError(f"unbalanced parentheses in {text!r}")


def _group_start(text: str, end: int) -> int:
    """The index of the parenthesis that opens the one closing just before `end`."""
    depth = 0
    for index in range(end - 1, -1, -1):
        depth += {")": 1, "(": -1}.get(text[index], 0)
        if depth == 0:
            return index
    raise ValueError(f"unbalanced parentheses in {text!r}")


def refs_of(expr: str) -> list[Ref]:
    """Every metric reference of a PromQL expression, with the labels it needs."""
    blanked = STRING.sub(lambda m: '"' + "_" * (len(m.group()) - 2) + '"', expr)
    if blanked.count("(") != blanked.count(")"):
        raise ValueError(f"unbalanced parentheses in {expr!r}")
    unsupported = UNSUPPORTED.search(blanked)
    if unsupported:
        raise ValueError(f"{unsupported.group(1)!r} is not read by this checker: {expr!r}")
    found: list[tuple[int, Ref]] = []
    for match in METRIC.finditer(blanked):
        ref, end = Ref(match.group(1)), match.end()
        if expr[end : end + 1] == "{":
            close = blanked.index("}", end)
            body, position = expr[end + 1 : close], 0
            while position < len(body):
                matcher = MATCHER.match(body, position)
                if matcher is None:
                    raise ValueError(f"unreadable matchers {body!r} in {expr!r}")
                ref.matchers.append((matcher.group(1), matcher.group(2), matcher.group(3)))
                ref.labels.add(matcher.group(1))
                position = matcher.end()
        found.append((match.start(), ref))
    for grouping in GROUPING.finditer(blanked):
        labels = {label.strip() for label in grouping.group(1).split(",") if label.strip()}
        after = grouping.end()
        while after < len(blanked) and blanked[after].isspace():
            after += 1
        if after < len(blanked) and blanked[after] == "(":
            span = (after, _group_end(blanked, after))
        else:
            before = grouping.start()
            while before > 0 and blanked[before - 1].isspace():
                before -= 1
            span = (_group_start(blanked, before), before)
        inside = [ref for position, ref in found if span[0] <= position < span[1]]
        if not inside:
            raise ValueError(f"by ({grouping.group(1)}) groups no metric in {expr!r}")
        for ref in inside:
            ref.labels |= labels
    return [ref for _, ref in found]


def dashboard_exprs(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, expression) of every panel target, nested rows included."""
    exprs: list[tuple[str, str]] = []

    def walk(panels: Iterable[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                exprs.append((f"panel {panel.get('title')!r}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return exprs


def template_refs(dashboard: dict[str, Any]) -> list[tuple[str, Ref]]:
    """(where, reference) of each `label_values(metric, label)` template variable."""
    out = []
    for variable in dashboard.get("templating", {}).get("list", []):
        query = variable.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        for metric, label in LABEL_VALUES.findall(text):
            out.append((f"variable {variable['name']!r}", Ref(metric, {label})))
    return out


def alert_exprs(rules: dict[str, Any]) -> list[tuple[str, str]]:
    return [
        (f"alert {rule.get('alert') or rule.get('record')!r}", rule["expr"])
        for group in rules["groups"]
        for rule in group["rules"]
    ]


def exported(metrics_text: str) -> tuple[dict[str, set[str]], dict[str, str]]:
    """From a /metrics page: sample name -> every label name seen on it; and sample names a
    family declares (HELP/TYPE) but has no sample of yet -> the family's type."""
    seen: dict[str, set[str]] = {}
    empty: dict[str, str] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_count", "_sum")}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            seen.setdefault(sample.name, set()).update(sample.labels)
        if not family.samples:
            for suffix in suffixes.get(family.type, ("",)):
                empty[family.name + suffix] = family.type
    return seen, empty


def problems(
    where: str,
    ref: Ref,
    seen: dict[str, set[str]],
    declared: dict[str, set[str]],
    known_values: dict[str, set[str]],
) -> list[str]:
    """What is wrong with `ref`: a name not exported, a label not on it, a value no series
    can have. `seen`: the sample labels of a real /metrics page; `declared`: the label names
    of families that page declares without samples (the test says which may be so)."""
    labels = seen.get(ref.metric, declared.get(ref.metric))
    if labels is None:
        return [f"{where}: {ref.metric} is not exported"]
    out = [f"{where}: {ref.metric} has no label {label!r}" for label in ref.labels - labels]
    for label, op, value in ref.matchers:
        allowed = known_values.get(label)
        if allowed is None or "$" in value or op in ("!=", "!~"):
            continue
        wanted = value.split("|") if op == "=~" else [value]
        out += [f"{where}: {label}={v!r} is no {label}" for v in wanted if v not in allowed]
    return out
