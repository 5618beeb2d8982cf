"""The autoscaling examples (examples/deploy/kubernetes/autoscaling/): valid YAML of the right
kinds, aimed at the shipped Deployment, on a model the example policy has, and querying only
series the sidecar exports."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import Metrics

KUBE = Path(__file__).resolve().parents[1] / "examples" / "deploy" / "kubernetes"
HERE = KUBE / "autoscaling"
QOS_NAME = re.compile(r"\bqos_[a-z_]+\b")


def load(name: str) -> Any:
    return yaml.safe_load((HERE / name).read_text())


def exported_names() -> set[str]:
    metrics = Metrics(CollectorRegistry())
    metrics.demand.offered("simgpu")  # a model's series exist once it was seen
    text = generate_latest(metrics.registry).decode()
    return {family.name for family in text_string_to_metric_families(text)}


def deployment_and_models() -> tuple[str, set[str]]:
    deployment = yaml.safe_load((KUBE / "deployment.yaml").read_text())
    policies = yaml.safe_load((KUBE / "configmap-policies.yaml").read_text())
    models = yaml.safe_load(policies["data"]["models.yaml"])["models"]
    return deployment["metadata"]["name"], set(models)


def queried(query: str) -> tuple[set[str], set[str]]:
    """The qos_* names a query reads, and the models it names."""
    return set(QOS_NAME.findall(query)), set(re.findall(r'model="([^"]+)"', query))


def test_the_keda_scaled_object_scales_the_deployment_on_the_fleet_ratio() -> None:
    scaled = load("keda-scaledobject.yaml")
    assert (scaled["apiVersion"], scaled["kind"]) == ("keda.sh/v1alpha1", "ScaledObject")
    name, models = deployment_and_models()
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == name
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
    (trigger,) = spec["triggers"]
    assert trigger["type"] == "prometheus" and trigger["metricType"] == "Value"
    assert float(trigger["metadata"]["threshold"]) > 1
    names, named = queried(trigger["metadata"]["query"])
    assert names == {"qos_model_demand_rate", "qos_model_drain_rate"}
    assert names <= exported_names()
    assert named and named <= models
    behavior = spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] > 0  # the cooldown


def test_the_hpa_scales_on_the_adapters_external_metric() -> None:
    hpa = load("hpa-external.yaml")
    assert (hpa["apiVersion"], hpa["kind"]) == ("autoscaling/v2", "HorizontalPodAutoscaler")
    name, models = deployment_and_models()
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": name,
    }
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["target"]["type"] == "Value"
    assert metric["external"]["metric"]["selector"]["matchLabels"]["model"] in models
    (rule,) = load("prometheus-adapter-values.yaml")["rules"]["external"]
    assert rule["name"]["as"] == metric["external"]["metric"]["name"]
    names, _ = queried(rule["metricsQuery"] + " " + rule["seriesQuery"])
    assert names == {"qos_model_demand_rate", "qos_model_drain_rate"}
    assert names <= exported_names()
    assert rule["metricsQuery"].count("<<.LabelMatchers>>") == 2


def test_the_readme_names_every_example() -> None:
    readme = (HERE / "README.md").read_text()
    for path in HERE.glob("*.yaml"):
        assert f"`{path.name}`" in readme, path.name
