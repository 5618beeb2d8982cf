"""The shipped dashboard and alert rules, without a stack: every expression is read by the
checker (tests/promql_refs.py), the checker finds a wrong name or label, and every alert
links to its runbook section. Their series are checked against a real sidecar in
tests/test_e2e_observability.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tests.promql_refs import Ref, alert_exprs, dashboard_exprs, problems, refs_of, template_refs

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "examples" / "observability" / "qos-sidecar-dashboard.json"
ALERTS = ROOT / "examples" / "observability" / "qos-sidecar-alerts.yaml"
RUNBOOK = ROOT / "docs" / "runbook.md"


def test_refs_carry_matchers_and_the_grouping_of_their_own_aggregation() -> None:
    expr = (
        'histogram_quantile(0.99, sum by (tenant, le) (rate(qos_a_bucket{class=~"$class"}[5m])))'
        " / sum(rate(qos_b_total[5m])) by (api)"
        ' + max(qos_c{reason="a|b"})'
    )
    got = {ref.metric: ref.labels for ref in refs_of(expr)}
    assert got == {
        "qos_a_bucket": {"tenant", "le", "class"},
        "qos_b_total": {"api"},
        "qos_c": {"reason"},
    }


@pytest.mark.parametrize(
    "expr",
    [
        "sum(qos_a) / on (tenant) sum(qos_b)",  # matching clauses are not read: refused
        "sum without (tenant) (qos_a)",
        "qos_a offset 5m",
        "sum(rate(qos_a[5m])",  # unbalanced
        'qos_a{tenant~"x"}',  # not a matcher
    ],
)
def test_what_the_checker_cannot_read_is_refused(expr: str) -> None:
    with pytest.raises(ValueError):
        refs_of(expr)


def test_the_check_finds_a_wrong_name_label_or_value() -> None:
    seen = {"qos_decisions_total": {"tenant", "class", "outcome", "reason"}}
    known = {"reason": {"over_rate", "overloaded"}}

    def check(expr: str) -> list[str]:
        return [p for ref in refs_of(expr) for p in problems("x", ref, seen, {}, known)]

    assert check('sum by (tenant) (rate(qos_decisions_total{reason="over_rate"}[5m]))') == []
    assert check("rate(qos_decision_total[5m])") == ["x: qos_decision_total is not exported"]
    assert check("sum by (model) (qos_decisions_total)") == [
        "x: qos_decisions_total has no label 'model'"
    ]
    assert check('qos_decisions_total{reason=~"over_rate|over_rates"}') == [
        "x: reason='over_rates' is no reason"
    ]
    # A family declared without samples is checked against its declared labels.
    declared = {"qos_state_errors_total": {"operation"}}
    ref = Ref("qos_state_errors_total", {"op"})
    assert problems("x", ref, {}, declared, {}) == ["x: qos_state_errors_total has no label 'op'"]


def test_every_dashboard_and_alert_expression_is_read() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = dashboard_exprs(dashboard) + alert_exprs(yaml.safe_load(ALERTS.read_text()))
    assert len(exprs) >= 30
    for where, expr in exprs:
        assert refs_of(expr), f"{where}: reads no qos_* series"
        assert all(ref.metric.startswith("qos_") for ref in refs_of(expr)), where
    assert {where for where, _ in template_refs(dashboard)} == {
        "variable 'tenant'",
        "variable 'class'",
        "variable 'model'",
    }


def test_the_dashboard_covers_tenants_models_and_the_sidecar() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert [row.split(":")[0] for row in rows] == [
        "Tenants and classes",
        "Models",
        "The sidecar",
        "Shadow mode",
    ]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        refs = [t["refId"] for t in panel.get("targets", [])]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_alert_links_to_its_section_of_the_runbook() -> None:
    runbook = RUNBOOK.read_text()
    anchors = {line[4:].strip().lower() for line in runbook.splitlines() if line.startswith("### ")}
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    assert {rule["alert"] for rule in rules} == {
        "QosPolicyReloadFailed",
        "QosDegradedMode",
        "QosTenantShedRateHigh",
        "QosClassObjectiveMissed",
        "QosDecisionLatencyHigh",
        "QosTritonSignalStale",
    }
    for rule in rules:
        assert rule["annotations"]["runbook_url"] == f"docs/runbook.md#{rule['alert'].lower()}"
        assert rule["alert"].lower() in anchors, f"{rule['alert']}: no section in the runbook"
