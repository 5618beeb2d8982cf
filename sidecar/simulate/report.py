"""Tallies per tenant and class under two policies, their difference, and `--fail-if` guards.

Rows: every (tenant, asked class) of the recording, each tenant over all its classes (class
`*`), and all the traffic (tenant `*`, class `*`). Rates are percentages of the row's
requests; a change is proposed minus current, in percentage points. `shed` is 429 + 503.

Guard grammar (a guard names a condition that FAILS the check):

    GUARD  := METRIC [ "[" FILTER ("," FILTER)* "]" ] OP NUMBER
    METRIC := OUTCOME "_rate" [ "_increase_pts" ]
    OUTCOME:= shed | 429 | 503 | admitted | held | relegated | refused
    FILTER := tenant=NAME | class=NAME          (NAME `*`: the total over them)
    OP     := > | >= | < | <=

`OUTCOME_rate` is the rate under the proposed policy, in percent; with `_increase_pts` it is
proposed minus current, in points. Without a tenant filter a guard is checked on every
tenant's row (all classes, or only `class=NAME`'s); it fails when the comparison holds on any.
Examples: `shed_rate_increase_pts > 2` (no tenant's shed rate may rise by more than 2
points), `503_rate[class=interactive] > 5`, `429_rate[tenant=*] >= 10`.
"""

from __future__ import annotations

import json
import operator
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from sidecar.errors import SidecarError
from sidecar.simulate.replay import Arrival, Outcome

ALL = "*"
RATES: Mapping[str, tuple[Outcome, ...]] = {
    "admitted": (Outcome.ADMITTED,),
    "held": (Outcome.HELD,),
    "relegated": (Outcome.RELEGATED,),
    "429": (Outcome.OVER_QUOTA,),
    "503": (Outcome.OVERLOADED,),
    "refused": (Outcome.REFUSED,),
    "shed": (Outcome.OVER_QUOTA, Outcome.OVERLOADED),
}
_OPS: Mapping[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_GUARD = re.compile(
    r"^\s*(?P<outcome>[a-z0-9]+)_rate(?P<increase>_increase_pts)?"
    r"\s*(?:\[(?P<filters>[^\]]*)\])?\s*(?P<op>>=|<=|>|<)\s*(?P<value>-?[0-9.]+)\s*$"
)


class GuardError(SidecarError):
    """A `--fail-if` expression that does not follow the grammar."""

    status = 400


Key = tuple[str, str]  # (tenant, class); ALL for a total


@dataclass(frozen=True, slots=True)
class Row:
    tenant: str
    klass: str
    current: Mapping[Outcome, int]
    proposed: Mapping[Outcome, int]
    measured: Mapping[str, int] | None = None  # status -> count, when a run measured it

    @property
    def requests(self) -> int:
        return sum(self.current.values())

    def rate(self, outcome: str, which: Mapping[Outcome, int]) -> float:
        total = sum(which.values())
        hits = sum(which.get(o, 0) for o in RATES[outcome])
        return 100.0 * hits / total if total else 0.0

    def metric(self, outcome: str, increase: bool) -> float:
        proposed = self.rate(outcome, self.proposed)
        return proposed - self.rate(outcome, self.current) if increase else proposed

    def measured_shed_pct(self) -> float | None:
        if not self.measured:
            return None
        shed = self.measured.get("429", 0) + self.measured.get("503", 0)
        return 100.0 * shed / sum(self.measured.values())


def _keys(arrival: Arrival) -> tuple[Key, Key, Key]:
    klass = arrival.klass or "-"
    return (arrival.tenant, klass), (arrival.tenant, ALL), (ALL, ALL)


def compare(
    arrivals: Sequence[Arrival],
    current: Sequence[Outcome],
    proposed: Sequence[Outcome],
    measured: Sequence[tuple[Arrival, str]] = (),
) -> list[Row]:
    """The rows of the module comment; `measured`: requests of a real run and the status
    each got, tallied beside the prediction."""
    tallies: dict[Key, tuple[Counter[Outcome], Counter[Outcome], Counter[str]]] = {}
    for i, arrival in enumerate(arrivals):
        for key in _keys(arrival):
            now, new, _ = tallies.setdefault(key, (Counter(), Counter(), Counter()))
            now[current[i]] += 1
            new[proposed[i]] += 1
    for arrival, status in measured:
        for key in _keys(arrival):
            if key in tallies:
                tallies[key][2][status] += 1
    order = sorted(tallies, key=lambda k: (k[0] == ALL, k[0], k[1] == ALL, k[1]))
    return [
        Row(key[0], key[1], tallies[key][0], tallies[key][1], tallies[key][2] or None)
        for key in order
    ]


@dataclass(frozen=True, slots=True)
class Guard:
    text: str
    outcome: str
    increase: bool
    tenant: str | None
    klass: str | None
    op: str
    value: float

    def rows(self, rows: Sequence[Row]) -> list[Row]:
        """The rows this guard is checked on."""
        klass = self.klass or ALL
        if self.tenant is not None:
            return [r for r in rows if r.tenant == self.tenant and r.klass == klass]
        return [r for r in rows if r.tenant != ALL and r.klass == klass]

    def violations(self, rows: Sequence[Row]) -> list[tuple[Row, float]]:
        compare_to = _OPS[self.op]
        found = []
        for row in self.rows(rows):
            value = row.metric(self.outcome, self.increase)
            if compare_to(value, self.value):
                found.append((row, value))
        return found


def parse_guard(text: str) -> Guard:
    """One `--fail-if` expression (module grammar); raises GuardError saying what is wrong."""
    match = _GUARD.match(text)
    if match is None:
        raise GuardError(f"--fail-if {text!r}: expected METRIC[FILTERS] OP NUMBER")
    outcome = match["outcome"]
    if outcome not in RATES:
        raise GuardError(f"--fail-if {text!r}: unknown outcome {outcome!r} ({', '.join(RATES)})")
    filters: dict[str, str] = {}
    for item in (match["filters"] or "").split(","):
        if not item.strip():
            continue
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in ("tenant", "class") or not value or name in filters:
            raise GuardError(f"--fail-if {text!r}: filter {item.strip()!r}: tenant=NAME|class=NAME")
        filters[name] = value
    try:
        value = float(match["value"])
    except ValueError:
        raise GuardError(f"--fail-if {text!r}: {match['value']!r} is not a number") from None
    return Guard(
        text.strip(),
        outcome,
        bool(match["increase"]),
        filters.get("tenant"),
        filters.get("class"),
        match["op"],
        value,
    )


# -- Output ---------------------------------------------------------------------------------

_COLUMNS = ("admitted", "held", "relegated", "429", "503", "refused")


def _counts(which: Mapping[Outcome, int]) -> list[int]:
    return [sum(which.get(o, 0) for o in RATES[name]) for name in _COLUMNS]


def format_table(rows: Sequence[Row], header: Sequence[str]) -> str:
    """Per row: a line per policy with counts and shed %, then the change."""
    lines = [*header, ""]
    titles = ("tenant", "class", "policy", "requests", *_COLUMNS, "shed %")
    table: list[tuple[str, ...]] = [titles]
    for row in rows:
        for label, which in (("current", row.current), ("proposed", row.proposed)):
            first = label == "current"
            table.append(
                (
                    row.tenant if first else "",
                    row.klass if first else "",
                    label,
                    str(row.requests),
                    *(str(n) for n in _counts(which)),
                    f"{row.rate('shed', which):.1f}",
                )
            )
        change = [b - a for a, b in zip(_counts(row.current), _counts(row.proposed), strict=True)]
        table.append(
            (
                "",
                "",
                "change",
                "",
                *(f"{n:+d}" for n in change),
                f"{row.metric('shed', True):+.1f} pts",
            )
        )
        measured = row.measured_shed_pct()
        if measured is not None and row.measured is not None:
            seen = row.measured
            codes = (str(seen.get("429", 0)), str(seen.get("503", 0)))
            total = str(sum(seen.values()))
            table.append(("", "", "measured", total, "", "", "", *codes, "", f"{measured:.1f}"))
    widths = [max(len(line[i]) for line in table) for i in range(len(titles))]
    for line in table:
        lines.append(
            "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        )
    return "\n".join(lines)


def to_json(
    rows: Sequence[Row], about: Mapping[str, object], guards: Sequence[Mapping[str, object]]
) -> str:
    def side(which: Mapping[Outcome, int], row: Row) -> dict[str, object]:
        return {
            "counts": dict(zip(_COLUMNS, _counts(which), strict=True)),
            "rates_pct": {name: round(row.rate(name, which), 3) for name in RATES},
        }

    out = []
    for row in rows:
        item: dict[str, object] = {
            "tenant": row.tenant,
            "class": row.klass,
            "requests": row.requests,
            "current": side(row.current, row),
            "proposed": side(row.proposed, row),
            "change_pts": {name: round(row.metric(name, True), 3) for name in RATES},
        }
        if row.measured is not None:
            item["measured"] = {"statuses": dict(row.measured), "shed_pct": row.measured_shed_pct()}
        out.append(item)
    return json.dumps({**about, "rows": out, "guards": list(guards)}, indent=2)
