"""Each transport's longest hold on the real Envoy and sidecar (issue 12 §1, core/holds.py).

A batch class may be held up to 7 s. Behind the shipped ext_proc bootstrap the sidecar holds
it that long (its `max_message_timeout` of 30 s lets it extend the message timeout) and
answers itself; behind the shipped ext_authz HTTP bootstrap it holds no longer
than `QOS_CHECK_MAX_HOLD_MS` and answers itself too, before Envoy's check timeout. Either
way the client gets the sidecar's 503 with its reason and Retry-After, never Envoy's.

Triton is a scripted metrics page here (a model whose queue never moves), so that a hold
lasts exactly its bound; the upstream is an echo server.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.test_stack_harness import (  # noqa: F401 - fixtures
    HTTP_BOOTSTRAP,
    QuietHandler,
    echo,
    policy_dir,
    request,
    serving,
    start_envoy,
    workdir,
)

pytestmark = pytest.mark.stack

EXT_PROC_BOOTSTRAP = HTTP_BOOTSTRAP.parent / "bootstrap-ext-proc.yaml"
POLICY = (
    "classes:\n"
    "  batch: {rank: 3, latency_objective_ms: 60000, max_wait_ms: 7000, triton_priority: 3,\n"
    "          overload: {admit_below: 2, shed_above: 1000}}\n"
    "tenants:\n"
    "  jobs:\n"
    f"    match: {{api_key_sha256: [{hashlib.sha256(b'k-jobs').hexdigest()}]}}\n"
    "    allowed_classes: [batch]\n"
    "    default_class: batch\n"
)
# A queue of 100 that never drains: a request is held for its whole budget, then shed.
PAGE = "\n".join(
    f'{name}{{model="simgpu",version="1"}} {value}'
    for name, value in (
        ("nv_inference_pending_request_count", 100),
        ("nv_inference_request_success", 5),
        ("nv_inference_request_failure", 0),
        ("nv_inference_queue_duration_us", 1000),
        ("nv_inference_request_duration_us", 2000),
        ("nv_inference_exec_count", 5),
    )
).encode()


class StuckTriton(QuietHandler):
    def do_GET(self) -> None:
        if self.path == "/v2/health/ready":
            self.send(200, [], b"")
        elif self.path == "/metrics":
            self.send(200, [("content-type", "text/plain")], PAGE + b"\n")
        else:
            self.send(404, [], b"")


@pytest.fixture
def triton() -> Iterator[str]:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), StuckTriton)) as server:
        yield f"http://127.0.0.1:{server.server_address[1]}"


def test_each_transport_holds_as_long_as_it_can_and_the_sidecar_answers(
    tmp_path: Path,
    triton: str,
    echo: int,  # noqa: F811 - the fixture imported above
    start_envoy: Any,  # noqa: F811
) -> None:
    from devstack.sidecar_proc import SidecarProcess

    policies = policy_dir(tmp_path, POLICY)
    env = {
        "QOS_TRITON_URLS": triton,
        "QOS_TRITON_METRICS_URLS": f"{triton}/metrics",
        "QOS_TRITON_SCRAPE_MS": "100",
        "QOS_CHECK_MAX_HOLD_MS": "1500",
    }
    with SidecarProcess(tmp_path, policies, transport="tcp", extra_env=env) as sidecar:
        http_port = start_envoy(
            HTTP_BOOTSTRAP, upstream_port=echo, sidecar_http_port=sidecar.http_port
        )
        proc_port = start_envoy(
            EXT_PROC_BOOTSTRAP, upstream_port=echo, sidecar_grpc_port=sidecar.grpc_port
        )
        time.sleep(0.5)  # a few scrapes: the queue is known
        answers = {}
        for mode, port in (("http", http_port), ("ext_proc", proc_port)):
            started = time.monotonic()
            reply = request(
                port,
                "/v2/models/simgpu/infer",
                method="POST",
                headers={"x-api-key": "k-jobs", "content-type": "application/json"},
                body=b"{}",
            )
            answers[mode] = (reply, time.monotonic() - started)
    for mode, (reply, _) in answers.items():
        assert reply.status == 503, (mode, reply)
        assert reply.headers.get("x-qos-reason") == "overloaded", (mode, reply.headers)
        assert "retry-after" in reply.headers, mode
    assert 1.4 <= answers["http"][1] < 5.0  # its bound, not the class's 7 s
    assert 6.9 <= answers["ext_proc"][1] < 12.0  # the class's whole 7 s
