"""The Istio variant (examples/deploy/istio/, issue 13 §6), checked as the other manifests are:
names that must agree across files do, the sidecar accepts the deployment's settings, and a
real Envoy accepts the filter the EnvoyFilter inserts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.test_envoy_configs import SNIPPETS, validate

ISTIO = Path(__file__).resolve().parents[1] / "examples" / "deploy" / "istio"


def docs(name: str) -> list[Any]:
    return [d for d in yaml.safe_load_all((ISTIO / name).read_text()) if d is not None]


def one(name: str) -> Any:
    (doc,) = docs(name)
    return doc


def providers() -> dict[str, Any]:
    mesh = one("mesh-config.yaml")
    assert mesh["kind"] == "IstioOperator"
    return {p["name"]: p for p in mesh["spec"]["meshConfig"]["extensionProviders"]}


def sidecar_container() -> Any:
    pod = one("deployment.yaml")["spec"]["template"]["spec"]
    return next(c for c in pod["containers"] if c["name"] == "qos-sidecar")


def test_every_manifest_is_a_known_kind() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for f in ISTIO.glob("*.yaml") for d in docs(f.name)}
    assert kinds == {
        ("install.istio.io/v1alpha1", "IstioOperator"),
        ("networking.istio.io/v1", "ServiceEntry"),
        ("networking.istio.io/v1", "DestinationRule"),
        ("security.istio.io/v1", "AuthorizationPolicy"),
        ("telemetry.istio.io/v1", "Telemetry"),
        ("networking.istio.io/v1alpha3", "EnvoyFilter"),
        ("apps/v1", "Deployment"),
    }


def test_the_check_and_the_completions_reach_the_sidecars_grpc_listener() -> None:
    from sidecar.settings import load_settings

    found = providers()
    policy = one("authorizationpolicy.yaml")["spec"]
    assert policy["action"] == "CUSTOM"
    authz = found[policy["provider"]["name"]]["envoyExtAuthzGrpc"]
    (telemetry,) = one("telemetry.yaml")["spec"]["accessLogging"]
    assert telemetry["match"]["mode"] == "SERVER"  # the Triton pods' inbound requests
    (provider,) = telemetry["providers"]
    als = found[provider["name"]]["envoyHttpAls"]
    entry = docs("serviceentry.yaml")[0]["spec"]
    (port,) = entry["ports"]
    assert authz["service"] == als["service"] == entry["hosts"][0]
    assert authz["port"] == als["port"] == port["number"]
    assert entry["endpoints"] == [{"address": "127.0.0.1"}]
    env = {e["name"]: e.get("value") for e in sidecar_container()["env"]}
    assert env["QOS_GRPC_ADDR"] == f"127.0.0.1:{port['number']}"
    # The sidecar itself accepts these settings (a loopback TCP listener, no token needed).
    plain = {k: v for k, v in env.items() if v is not None and k != "QOS_POLICY_PATH"}
    settings = load_settings(None, plain)
    assert settings.grpc_listen.port == port["number"]


def test_policy_telemetry_and_filter_select_the_deployments_pods() -> None:
    labels = one("deployment.yaml")["spec"]["template"]["metadata"]["labels"]
    selectors = [
        one("authorizationpolicy.yaml")["spec"]["selector"]["matchLabels"],
        one("telemetry.yaml")["spec"]["selector"]["matchLabels"],
        one("envoyfilter.yaml")["spec"]["workloadSelector"]["labels"],
    ]
    for selector in selectors:
        assert selector.items() <= labels.items()


def test_the_inserted_filter_is_the_shipped_one_and_envoy_accepts_it(tmp_path: Path) -> None:
    (patch,) = one("envoyfilter.yaml")["spec"]["configPatches"]
    assert patch["match"]["context"] == "SIDECAR_INBOUND"
    assert patch["match"]["listener"]["filterChain"]["filter"]["subFilter"]["name"] == (
        "envoy.filters.http.ext_authz"
    )
    assert patch["patch"]["operation"] == "INSERT_BEFORE"
    value = patch["patch"]["value"]
    shipped = yaml.safe_load((SNIPPETS / "strip-decision-headers.filter.yaml").read_text())
    assert value == shipped
    bootstrap = {
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 0}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": {
                                        "@type": "type.googleapis.com/envoy.extensions.filters."
                                        "network.http_connection_manager.v3.HttpConnectionManager",
                                        "stat_prefix": "inbound",
                                        "route_config": {"virtual_hosts": []},
                                        "http_filters": [
                                            value,
                                            {
                                                "name": "envoy.filters.http.router",
                                                "typed_config": {
                                                    "@type": "type.googleapis.com/envoy."
                                                    "extensions.filters.http.router.v3.Router"
                                                },
                                            },
                                        ],
                                    },
                                }
                            ]
                        }
                    ],
                }
            ]
        }
    }
    path = tmp_path / "istio-inbound.yaml"
    path.write_text(yaml.safe_dump(bootstrap))
    validate(path)
