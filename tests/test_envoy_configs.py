"""The shipped Envoy configs: every bootstrap and every snippet is accepted by the real Envoy
(``envoy --mode validate``), and the bootstraps contain the snippets verbatim, so what users
paste is exactly what the end-to-end tests run.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.envoy import find_envoy
from sidecar.core.decide import DECISION_HEADERS as CORE_DECISION_HEADERS
from tests.binaries import require_binaries

ROOT = Path(__file__).resolve().parents[1]
ENVOY_DIR = ROOT / "envoy"
SNIPPETS = ENVOY_DIR / "snippets"
BOOTSTRAPS = sorted(ENVOY_DIR.glob("bootstrap-*.yaml"))
MODES = {"http": "ext-authz-http.filter.yaml", "grpc": "ext-authz-grpc.filter.yaml"}
# Each shipped bootstrap, and the snippet that is its only difference from the others.
BOOTSTRAP_FILTERS = {
    "bootstrap-ext-authz-http.yaml": "ext-authz-http.filter.yaml",
    "bootstrap-ext-authz-grpc.yaml": "ext-authz-grpc.filter.yaml",
    "bootstrap-ext-proc.yaml": "ext-proc.filter.yaml",
}
DECIDING_FILTERS = ("envoy.filters.http.ext_authz", "envoy.filters.http.ext_proc")
HCM = "envoy.filters.network.http_connection_manager"
# The core's list: a header the sidecar starts setting must be stripped and allowed here too.
DECISION_HEADERS = list(CORE_DECISION_HEADERS)


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def snippet(name: str) -> Any:
    return load(SNIPPETS / name)


def hcm_of(bootstrap: dict[str, Any]) -> dict[str, Any]:
    (listener,) = bootstrap["static_resources"]["listeners"]
    (chain,) = listener["filter_chains"]
    (network_filter,) = chain["filters"]
    assert network_filter["name"] == HCM
    config: dict[str, Any] = network_filter["typed_config"]
    return config


def validate(config: Path) -> None:
    require_binaries("envoy")
    envoy = find_envoy()
    assert envoy is not None
    result = subprocess.run(
        [str(envoy), "--mode", "validate", "-c", str(config), "-l", "warning"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"{config.name}:\n{result.stdout}\n{result.stderr}"


def test_every_bootstrap_is_shipped() -> None:
    assert [p.name for p in BOOTSTRAPS] == sorted(BOOTSTRAP_FILTERS)


@pytest.mark.stack
@pytest.mark.parametrize("path", BOOTSTRAPS, ids=lambda p: p.name)
def test_bootstrap_validates(path: Path) -> None:
    validate(path)


# -- each snippet, alone in a minimal user config ----------------------------------------------


def minimal_bootstrap(
    *, filters: list[dict[str, Any]], access_log: list[dict[str, Any]]
) -> dict[str, Any]:
    """A user's config: one listener to one upstream, plus the sidecar clusters snippet."""
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network."
        "http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "user",
        "access_log": access_log,
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "model_server"}}],
                }
            ]
        },
        "http_filters": [
            *filters,
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            },
        ],
    }
    upstream = {
        "name": "model_server",
        "type": "STATIC",
        "load_assignment": {
            "cluster_name": "model_server",
            "endpoints": [
                {
                    "lb_endpoints": [
                        {
                            "endpoint": {
                                "address": {
                                    "socket_address": {"address": "127.0.0.1", "port_value": 8000}
                                }
                            }
                        }
                    ]
                }
            ],
        },
    }
    return {
        "static_resources": {
            "listeners": [
                {
                    "name": "user",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": 10000}},
                    "filter_chains": [{"filters": [{"name": HCM, "typed_config": hcm}]}],
                }
            ],
            "clusters": [upstream, *snippet("clusters.yaml")],
        }
    }


@pytest.mark.stack
@pytest.mark.stack
@pytest.mark.stack
@pytest.mark.parametrize(
    "name",
    [
        "strip-decision-headers.filter.yaml",
        "ext-authz-http.filter.yaml",
        "ext-authz-grpc.filter.yaml",
        "ext-proc.filter.yaml",
        "completion-access-log.yaml",
        "file-access-log.yaml",
        "clusters.yaml",
    ],
)
def test_snippet_validates_in_a_minimal_config(name: str, tmp_path: Path) -> None:
    part = snippet(name)
    if name.endswith(".filter.yaml"):
        config = minimal_bootstrap(filters=[part], access_log=[])
    elif name.endswith("access-log.yaml"):
        config = minimal_bootstrap(filters=[], access_log=[part])
    else:  # clusters.yaml: already in every minimal config
        config = minimal_bootstrap(filters=[], access_log=[])
    path = tmp_path / f"with-{name}"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    validate(path)


@pytest.mark.stack
def test_all_snippets_together_validate(tmp_path: Path) -> None:
    for deciding in BOOTSTRAP_FILTERS.values():
        config = minimal_bootstrap(
            filters=[snippet("strip-decision-headers.filter.yaml"), snippet(deciding)],
            access_log=[snippet("completion-access-log.yaml"), snippet("file-access-log.yaml")],
        )
        path = tmp_path / f"user-{deciding}"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        validate(path)


# -- the bootstraps contain exactly the snippets ------------------------------------------------


@pytest.mark.parametrize("name", sorted(BOOTSTRAP_FILTERS))
def test_bootstrap_filters_are_the_snippets_in_order(name: str) -> None:
    hcm = hcm_of(load(ENVOY_DIR / name))
    filters = hcm["http_filters"]
    deciding = snippet(BOOTSTRAP_FILTERS[name])
    assert [f["name"] for f in filters] == [
        "envoy.filters.http.header_mutation",
        deciding["name"],
        "envoy.filters.http.router",
    ]
    assert filters[0] == snippet("strip-decision-headers.filter.yaml")
    assert filters[1] == deciding


@pytest.mark.parametrize("name", sorted(BOOTSTRAP_FILTERS))
def test_bootstrap_access_log_is_the_snippet(name: str) -> None:
    hcm = hcm_of(load(ENVOY_DIR / name))
    assert hcm["access_log"] == [snippet("completion-access-log.yaml")]


@pytest.mark.parametrize("name", sorted(BOOTSTRAP_FILTERS))
def test_bootstrap_local_reply_mapper_is_the_snippet(name: str) -> None:
    hcm = hcm_of(load(ENVOY_DIR / name))
    assert hcm["local_reply_config"] == snippet("overload-local-reply.yaml")


def test_overload_wire_status_matches_the_adapter() -> None:
    from sidecar.envoy.authz_http import OVERLOAD_WIRE_STATUS, STATUS_HEADER

    mapper = snippet("overload-local-reply.yaml")["mappers"][0]
    wire = mapper["filter"]["status_code_filter"]["comparison"]["value"]["default_value"]
    assert (wire, mapper["status_code"]) == (OVERLOAD_WIRE_STATUS, 503)
    allowed = snippet(MODES["http"])["typed_config"]["http_service"]["authorization_response"]
    assert {"exact": STATUS_HEADER} in allowed["allowed_client_headers"]["patterns"]


@pytest.mark.parametrize("name", sorted(BOOTSTRAP_FILTERS))
def test_bootstrap_sidecar_clusters_are_the_snippet(name: str) -> None:
    clusters = load(ENVOY_DIR / name)["static_resources"]["clusters"]
    sidecar = [c for c in clusters if c["name"].startswith("qos_sidecar_")]
    assert sidecar == snippet("clusters.yaml")
    assert [c["name"] for c in clusters] == ["triton_http", "qos_sidecar_http", "qos_sidecar_grpc"]


def test_bootstraps_differ_only_in_the_deciding_filter() -> None:
    def without_deciding_filter(name: str) -> Any:
        config = copy.deepcopy(load(ENVOY_DIR / name))
        hcm = hcm_of(config)
        hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] not in DECIDING_FILTERS]
        return config

    first, *others = (without_deciding_filter(name) for name in sorted(BOOTSTRAP_FILTERS))
    for other in others:
        assert other == first


# -- the header contract ---------------------------------------------------------------------


def test_every_decision_header_is_stripped_before_authz() -> None:
    mutations = snippet("strip-decision-headers.filter.yaml")["typed_config"]["mutations"]
    removed = [m["remove"] for m in mutations["request_mutations"]]
    # x-qos-status: the sidecar's HTTP-mode wire status, never the client's to send.
    assert removed == [*DECISION_HEADERS, "x-qos-peer-principal", "x-qos-status"]


def test_http_mode_passes_exactly_the_decision_headers_upstream() -> None:
    service = snippet("ext-authz-http.filter.yaml")["typed_config"]["http_service"]
    response = service["authorization_response"]
    upstream = [p["exact"] for p in response["allowed_upstream_headers"]["patterns"]]
    # Every decision header but the lease, which becomes dynamic metadata only.
    assert upstream == [h for h in DECISION_HEADERS if h != "x-qos-lease"]
    metadata = [p["exact"] for p in response["dynamic_metadata_from_headers"]["patterns"]]
    assert metadata == ["x-qos-lease"]
    client = [p["exact"] for p in response["allowed_client_headers"]["patterns"]]
    assert {"retry-after", "content-type"} <= set(client)
    assert service["path_prefix"] == "/authz"


@pytest.mark.parametrize("name", sorted(MODES.values()))
def test_authz_fails_closed(name: str) -> None:
    config = snippet(name)["typed_config"]
    assert config["failure_mode_allow"] is False
    assert config["status_on_error"] == {"code": "ServiceUnavailable"}
    assert config["transport_api_version"] == "V3"


def test_ext_proc_fails_closed_and_sends_what_the_sidecar_needs() -> None:
    from sidecar.core.priority import BODY_HEADERS
    from sidecar.envoy.ext_proc import PRINCIPAL_ATTRIBUTE

    config = snippet("ext-proc.filter.yaml")["typed_config"]
    assert config["failure_mode_allow"] is False
    assert config["status_on_error"] == {"code": "ServiceUnavailable"}
    assert config["grpc_service"]["envoy_grpc"]["cluster_name"] == "qos_sidecar_grpc"
    assert config["message_timeout"] == "1s"
    assert config["processing_mode"] == {
        "request_header_mode": "SEND",
        "request_body_mode": "BUFFERED",
        "request_trailer_mode": "SKIP",
        "response_header_mode": "SKIP",
        "response_body_mode": "NONE",
        "response_trailer_mode": "SKIP",
    }
    assert config["request_attributes"] == [PRINCIPAL_ATTRIBUTE]
    # forward_rules also filter pseudo-headers: without :method and :path every request is 400.
    forwarded = [p["exact"] for p in config["forward_rules"]["allowed_headers"]["patterns"]]
    ext_authz = snippet(MODES["grpc"])["typed_config"]["allowed_headers"]["patterns"]
    # :status tells the token meter whether a response generated anything.
    assert forwarded == [":method", ":path", ":status", *(p["exact"] for p in ext_authz),
                         "content-encoding", "inference-header-content-length"]  # fmt: skip
    assert set(BODY_HEADERS) <= set(forwarded)
    # Token accounting asks for metered responses per request (ext_proc.wait_for_body).
    assert config["allow_mode_override"] is True
    # The lease comes back as dynamic metadata in the sidecar's namespace.
    from sidecar.envoy.common import EXT_PROC_NAMESPACE

    receiving = config["metadata_options"]["receiving_namespaces"]["untyped"]
    assert receiving == [EXT_PROC_NAMESPACE]


def test_access_log_never_takes_the_lease_from_a_header() -> None:
    # The lease is read from the entry's dynamic metadata (sidecar.envoy.access_log): a header
    # here would be the client's own copy whenever Envoy rejects before the strip filter.
    config = snippet("completion-access-log.yaml")["typed_config"]
    assert "x-qos-lease" not in config["additional_request_headers_to_log"]
    assert set(config["additional_request_headers_to_log"]) <= set(DECISION_HEADERS)
    assert config["common_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == (
        "qos_sidecar_grpc"
    )


def test_envoy_waits_longer_than_any_shipped_class_may_be_held() -> None:
    """Deferral holds the authorization call for up to a class's max_wait_ms; Envoy must not
    give up first (it would answer its own 503/504 and the client would never be served)."""
    from sidecar.policy.loader import load_policy

    def seconds(text: str) -> float:
        assert text.endswith("s")
        return float(text[:-1])

    longest_s = max(c.max_wait_ms for c in load_policy([ROOT / "policies"]).classes.values()) / 1000
    http = snippet("ext-authz-http.filter.yaml")["typed_config"]["http_service"]["server_uri"]
    grpc = snippet("ext-authz-grpc.filter.yaml")["typed_config"]["grpc_service"]
    proc = snippet("ext-proc.filter.yaml")["typed_config"]
    from sidecar.envoy.ext_proc import HOLD_MARGIN_S

    assert seconds(http["timeout"]) > longest_s
    assert seconds(grpc["timeout"]) > longest_s
    assert seconds(proc["max_message_timeout"]) >= longest_s + HOLD_MARGIN_S
    # Whatever a policy says, the sidecar holds no longer than each transport allows.
    from sidecar.settings import Settings

    defaults = Settings()
    assert seconds(http["timeout"]) > defaults.check_max_hold_ms / 1000
    assert seconds(grpc["timeout"]) > defaults.check_max_hold_ms / 1000
    assert (
        seconds(proc["max_message_timeout"]) >= defaults.ext_proc_max_hold_ms / 1000 + HOLD_MARGIN_S
    )
    bootstrap = hcm_of(load(ENVOY_DIR / "bootstrap-ext-proc.yaml"))["http_filters"]
    shipped = next(f for f in bootstrap if f["name"] == "envoy.filters.http.ext_proc")
    assert shipped["typed_config"]["max_message_timeout"] == proc["max_message_timeout"]


@pytest.mark.parametrize("mode", ["http", "grpc", "ext-proc"])
def test_priority_routes_are_the_snippet_and_high_has_its_own_breakers(mode: str) -> None:
    name = f"bootstrap-ext-authz-{mode}.yaml" if mode != "ext-proc" else "bootstrap-ext-proc.yaml"
    config = load(ENVOY_DIR / name)
    routes = hcm_of(config)["route_config"]["virtual_hosts"][0]["routes"]
    assert routes == snippet("priority-routes.yaml")
    assert routes[0]["route"]["priority"] == "HIGH"
    assert routes[0]["match"]["headers"][0]["name"] == "x-qos-route-priority"
    triton = next(c for c in config["static_resources"]["clusters"] if c["name"] == "triton_http")
    priorities = {t["priority"] for t in triton["circuit_breakers"]["thresholds"]}
    assert priorities == {"DEFAULT", "HIGH"}


# -- transport: Unix sockets as shipped, the token lines ready to uncomment ---------------------


def test_sidecar_clusters_are_the_sidecars_default_sockets() -> None:
    from sidecar.settings import Settings

    defaults = Settings()
    paths = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        for c in snippet("clusters.yaml")
    }
    assert paths == {
        "qos_sidecar_http": {"pipe": {"path": defaults.authz_http_listen.unix_path}},
        "qos_sidecar_grpc": {"pipe": {"path": defaults.grpc_listen.unix_path}},
    }


TOKEN_MARK = "# Sidecar on a TCP address with QOS_AUTH_TOKEN"


def uncomment_token_lines(text: str) -> str:
    """The shipped config with its commented `x-qos-auth` lines (after each TOKEN_MARK line)
    turned on, as envoy/README.md tells a user to do."""
    lines = text.split("\n")
    for i, line in enumerate(lines):
        if line.lstrip().startswith(TOKEN_MARK):
            j = i + 1
            while "<QOS_AUTH_TOKEN>" not in lines[j - 1]:  # the block ends with the value
                lines[j] = lines[j].replace("# ", "", 1)
                j += 1
    return "\n".join(lines)


@pytest.mark.parametrize("name", sorted(BOOTSTRAP_FILTERS))
def test_shipped_token_lines_are_what_devstack_runs_and_validate(name: str, tmp_path: Path) -> None:
    from devstack.envoy import with_auth_token

    text = (ENVOY_DIR / name).read_text()
    # One in the deciding filter, one in the access log.
    assert text.count(TOKEN_MARK) == 2
    uncommented = yaml.safe_load(uncomment_token_lines(text))
    assert uncommented == with_auth_token(load(ENVOY_DIR / name), "<QOS_AUTH_TOKEN>")
    assert uncommented != load(ENVOY_DIR / name)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(uncommented, sort_keys=False))
    validate(path)


@pytest.mark.parametrize(
    "name",
    [
        "ext-authz-http.filter.yaml",
        "ext-authz-grpc.filter.yaml",
        "ext-proc.filter.yaml",
        "completion-access-log.yaml",
    ],
)
def test_every_snippet_that_calls_the_sidecar_ships_the_token_lines(name: str) -> None:
    from devstack.envoy import with_auth_token

    text = (SNIPPETS / name).read_text()
    assert text.count(TOKEN_MARK) == 1
    assert yaml.safe_load(uncomment_token_lines(text)) == with_auth_token(
        snippet(name), "<QOS_AUTH_TOKEN>"
    )


# -- the deployment examples use the sockets, and share them --------------------------------------

DEPLOY = ROOT / "examples" / "deploy"


def pipe_paths(config: dict[str, Any]) -> set[str]:
    return {
        lb["endpoint"]["address"]["pipe"]["path"]
        for c in config["static_resources"]["clusters"]
        if c["name"].startswith("qos_sidecar_") and c["name"] != "qos_sidecar_admin"
        for e in c["load_assignment"]["endpoints"]
        for lb in e["lb_endpoints"]
    }


def test_kubernetes_envoy_and_sidecar_share_the_socket(tmp_path: Path) -> None:
    configmap = load(DEPLOY / "kubernetes" / "configmap-envoy.yaml")
    envoy_config = yaml.safe_load(configmap["data"]["envoy.yaml"])
    path = tmp_path / "envoy.yaml"
    path.write_text(configmap["data"]["envoy.yaml"])
    validate(path)
    pod = load(DEPLOY / "kubernetes" / "deployment.yaml")["spec"]["template"]["spec"]
    containers = {c["name"]: c for c in pod["containers"]}
    env = {e["name"]: e.get("value") for e in containers["qos-sidecar"]["env"]}
    assert pipe_paths(envoy_config) == {env["QOS_GRPC_ADDR"].removeprefix("unix:")}
    socket_dir = str(Path(env["QOS_GRPC_ADDR"].removeprefix("unix:")).parent)
    for name in ("envoy", "qos-sidecar"):
        mounts = {m["mountPath"]: m["name"] for m in containers[name]["volumeMounts"]}
        assert mounts[socket_dir] == "qos-sockets", name
    assert "emptyDir" in next(v for v in pod["volumes"] if v["name"] == "qos-sockets")
    assert (
        pod["securityContext"]["fsGroup"]
        == containers["qos-sidecar"]["securityContext"]["runAsGroup"]
    )


def test_compose_envoy_and_sidecar_share_the_socket() -> None:
    validate(DEPLOY / "compose-envoy.yaml")
    from sidecar.settings import Settings

    services = load(DEPLOY / "docker-compose.yaml")["services"]
    socket = Settings().grpc_listen.unix_path  # the image's default
    assert socket is not None
    assert pipe_paths(load(DEPLOY / "compose-envoy.yaml")) == {socket}
    for name in ("envoy", "qos-sidecar"):
        assert f"qos-sockets:{Path(socket).parent}" in services[name]["volumes"], name
    assert "QOS_GRPC_ADDR" not in services["qos-sidecar"]["environment"]
    assert services["envoy"]["group_add"] == ["10001"]
    dockerfile = (ROOT / "docker" / "Dockerfile").read_text()
    assert f"QOS_GRPC_ADDR=unix:{socket}" in dockerfile
