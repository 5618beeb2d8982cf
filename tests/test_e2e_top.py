"""`qos-sidecar top --once` against a real sidecar (Envoy, Triton and Valkey running) while a
tenant sends requests: the frame shows the tenant, its class and the model."""

from __future__ import annotations

import contextlib
import io
import threading

import pytest

from devstack.stack import LocalStack
from sidecar.cli import main
from tests.stack_client import infer
from tests.test_e2e_overload import stack  # noqa: F401 (the module's own stack)

pytestmark = pytest.mark.stack


def test_top_once_shows_the_tenant_its_class_and_the_model(stack: LocalStack) -> None:  # noqa: F811
    stop = threading.Event()
    sent: list[int] = []

    def send() -> None:
        while not stop.is_set():
            sent.append(infer(stack.url("http"), api_key="k-web").status)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            code = main(["top", "--once", "--url", stack.admin_url, "--interval", "1.0"])
    finally:
        stop.set()
        sender.join(30)
    assert code == 0
    assert 200 in sent
    lines = {line.split()[0]: line.split() for line in out.getvalue().splitlines() if line.strip()}
    assert lines["qos-sidecar"][:6] == ["qos-sidecar", "top:", "1", "of", "1", "sidecars,"]
    web = lines["web"]
    assert float(web[1]) > 0, out.getvalue()  # admitted per second while it sent
    assert "interactive" in lines
    assert "simgpu" in lines, out.getvalue()  # the model: Triton's queue, demand, drain
