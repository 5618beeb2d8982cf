"""Each transport's longest hold on the real Envoy and sidecar (issue 12 §1, core/holds.py),
and the shorter one a client asks for (core/client_wait.py).

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
    GRPC_BOOTSTRAP,
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


def stuck_sidecar(tmp_path: Path, triton: str, **extra: str) -> Any:
    """The sidecar on POLICY, reading the stuck Triton every 100 ms, holding ext_authz checks
    at most 1.5 s."""
    from devstack.sidecar_proc import SidecarProcess

    env = {
        "QOS_TRITON_URLS": triton,
        "QOS_TRITON_METRICS_URLS": f"{triton}/metrics",
        "QOS_TRITON_SCRAPE_MS": "100",
        "QOS_CHECK_MAX_HOLD_MS": "1500",
        **extra,
    }
    return SidecarProcess(tmp_path, policy_dir(tmp_path, POLICY), transport="tcp", extra_env=env)


def test_each_transport_holds_as_long_as_it_can_and_the_sidecar_answers(
    tmp_path: Path,
    triton: str,
    echo: int,  # noqa: F811 - the fixture imported above
    start_envoy: Any,  # noqa: F811
) -> None:
    with stuck_sidecar(tmp_path, triton) as sidecar:
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


def test_no_transport_holds_a_request_longer_than_its_client_says_it_waits(
    tmp_path: Path,
    triton: str,
    echo: int,  # noqa: F811 - the fixture imported above
    start_envoy: Any,  # noqa: F811
) -> None:
    """The same never-draining queue; each client states its wait, in the header or as gRPC's
    grpc-timeout, through each shipped bootstrap's allowed headers. The sidecar answers 503
    with its Retry-After when that wait is up, well before its class's 7 s (and the
    transport's 1.5 s), and its trace says why."""
    with stuck_sidecar(tmp_path, triton, QOS_EXPLAIN_REFUSALS="true") as sidecar:
        ports = {
            "http": start_envoy(
                HTTP_BOOTSTRAP, upstream_port=echo, sidecar_http_port=sidecar.http_port
            ),
            "grpc": start_envoy(
                GRPC_BOOTSTRAP, upstream_port=echo, sidecar_grpc_port=sidecar.grpc_port
            ),
            "ext_proc": start_envoy(
                EXT_PROC_BOOTSTRAP, upstream_port=echo, sidecar_grpc_port=sidecar.grpc_port
            ),
        }
        time.sleep(0.5)  # a few scrapes: the queue is known
        answers = {}
        for mode, port in ports.items():
            for stated, wait_s in (
                (("x-qos-timeout-ms", "400"), 0.4),
                (("grpc-timeout", "600m"), 0.6),
            ):
                started = time.monotonic()
                reply = request(
                    port,
                    "/v2/models/simgpu/infer",
                    method="POST",
                    headers={
                        "x-api-key": "k-jobs",
                        "content-type": "application/json",
                        stated[0]: stated[1],
                    },
                    body=b"{}",
                )
                answers[(mode, stated[0])] = (reply, time.monotonic() - started, wait_s)
    for key, (reply, took_s, wait_s) in answers.items():
        assert reply.status == 503, (key, reply)
        assert reply.headers.get("x-qos-reason") == "overloaded", (key, reply.headers)
        assert "retry-after" in reply.headers, key
        assert f"its client waits {wait_s:.3f}s" in reply.body.decode(), (key, reply.body)
        # Held for the client's wait: not answered before it, and not held to 1.5 s or 7 s.
        assert wait_s - 0.05 <= took_s < 1.4, (key, took_s)
