"""The shipped JSON access log (envoy/snippets/file-access-log.yaml) as a real Envoy writes
it, replayed by `qos-sidecar simulate`: a real Envoy on the shipped HTTP-mode bootstrap with
that snippet added, a scripted ext_authz stand-in for the sidecar, an echo upstream."""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Iterator
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import free_port
from sidecar import cli
from sidecar.simulate.traffic import read_access_log
from tests.binaries import require_binaries
from tests.test_simulate import write_policy
from tests.test_stack_harness import (
    HTTP_BOOTSTRAP,
    AuthzHandler,
    AuthzScript,
    AuthzServer,
    EchoHandler,
    request,
    serving,
)

SNIPPET = Path(__file__).resolve().parents[1] / "envoy" / "snippets" / "file-access-log.yaml"


@pytest.fixture
def upstream() -> Iterator[int]:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)) as server:
        yield server.server_address[1]


@pytest.fixture
def authz() -> Iterator[AuthzServer]:
    server = AuthzServer(("127.0.0.1", 0), AuthzHandler)
    server.script = AuthzScript()
    with serving(server):
        yield server


def with_file_log(config: dict[str, Any], log_path: Path) -> None:
    """Add the shipped snippet to the ingress connection manager, writing to `log_path`."""
    entry = yaml.safe_load(SNIPPET.read_text())
    entry["typed_config"]["path"] = str(log_path)
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    hcm["access_log"].append(entry)


def lines_in(path: Path, count: int, within_s: float = 30.0) -> list[str]:
    """The log's lines once it holds `count` (Envoy flushes file logs about every second)."""
    deadline = time.monotonic() + within_s
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= count or time.monotonic() > deadline:
            return lines
        time.sleep(0.2)


@pytest.mark.stack
def test_envoys_json_access_log_replays_in_simulate(
    tmp_path: Path, upstream: int, authz: AuthzServer
) -> None:
    require_binaries("envoy")
    log_path = tmp_path / "requests.log"
    port = free_port()
    config = render_bootstrap(
        HTTP_BOOTSTRAP,
        listen_port=port,
        triton_http_port=upstream,
        sidecar_http_port=authz.server_address[1],
        sidecar_grpc_port=free_port(),
        admin_port=0,
    )
    with_file_log(config, log_path)
    headers = {"x-api-key": "secret-key", "x-qos-class": "interactive"}
    with EnvoyProcess(config, tmp_path):
        authz.script.headers = [("x-qos-tenant", "acme"), ("x-qos-granted-class", "interactive")]
        for _ in range(6):
            assert request(port, "/v2/models/m/infer", method="POST", headers=headers).status == 200
        authz.script.status = 429
        authz.script.headers = [
            ("x-qos-reason", "over_rate"),
            ("retry-after", "1"),
            ("x-qos-tenant", "acme"),
        ]
        for _ in range(2):
            assert request(port, "/v2/models/m/infer", method="POST", headers=headers).status == 429
        lines = lines_in(log_path, 8)
    assert len(lines) == 8, lines
    assert "secret-key" not in log_path.read_text()  # the API key is never logged
    entry = json.loads(lines[0])
    assert entry["granted_class"] == "interactive"
    assert json.loads(lines[-1])["reason"] == "over_rate"

    assert json.loads(lines[-1])["refused_tenant"] == "acme"  # the refusal names its tenant

    recording = read_access_log(log_path)
    assert [(a.tenant, a.klass, a.model) for a in recording.arrivals] == [
        ("acme", "interactive", "m")
    ] * 8
    assert recording.statuses == ("200",) * 6 + ("429",) * 2
    assert all(
        later.at_s >= earlier.at_s
        for earlier, later in zip(recording.arrivals, recording.arrivals[1:], strict=False)
    )

    # Replayed: all eight are acme's; a bucket of burst 4 (and a slow refill) lets 4
    # through under the proposal, where the current one let all 8.
    current = write_policy(tmp_path / "current", rate=100, burst=100)
    proposed = write_policy(tmp_path / "proposed", rate=0.01, burst=4)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli.main(
            [
                "simulate",
                str(log_path),
                "--current",
                str(current),
                "--proposed",
                str(proposed),
                "--drain-rate",
                "1000",
                "--format",
                "json",
                "--fail-if",
                "429_rate_increase_pts[tenant=acme] > 10",
            ]
        )
    report = json.loads(out.getvalue())
    acme = next(r for r in report["rows"] if (r["tenant"], r["class"]) == ("acme", "*"))
    assert acme["requests"] == 8
    assert acme["current"]["counts"]["admitted"] == 8
    assert acme["proposed"]["counts"]["admitted"] == 4 and acme["proposed"]["counts"]["429"] == 4
    assert code == 1
