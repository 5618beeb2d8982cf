"""The process harness (devstack.procs) and the shipped Envoy bootstraps on the real
servers: Valkey answers PING, Triton serves examples/triton, and Envoy with the shipped
bootstraps (moved to free ports) strips forged decision headers, applies ext_authz decisions,
fails closed and streams one access-log entry per request.

The sidecar itself is replaced by small stubs (an HTTP ext_authz server, a gRPC
Authorization + AccessLogService server) whose answers each test sets, so these tests pin down
Envoy's behaviour, not the sidecar's.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import grpc
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.accesslog.v3 import als_pb2, als_pb2_grpc
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import status_pb2

from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import (
    CHECKOUT,
    ManagedProcess,
    ProcessStartError,
    ValkeyProcess,
    free_port,
    python_environment,
    wait_http,
)
from devstack.triton import TritonProcess
from sidecar.envoy.common import HEALTH_PATH, HEALTH_STATUS, grpc_health_handler
from tests.binaries import require_binaries

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "examples" / "triton"
HTTP_BOOTSTRAP = ROOT / "envoy" / "bootstrap-ext-authz-http.yaml"
GRPC_BOOTSTRAP = ROOT / "envoy" / "bootstrap-ext-authz-grpc.yaml"
DECISION_HEADERS = ("x-qos-tenant", "x-qos-granted-class", "x-qos-priority", "x-qos-lease")


# -- small HTTP helpers ---------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    port: int,
    path: str = "/",
    *,
    method: str = "GET",
    headers: dict[str, str] | None = None,
    body: bytes | None = None,
    context: ssl.SSLContext | None = None,
    timeout: float = 30.0,
) -> Reply:
    """One request on a fresh connection; any status is returned, not raised."""
    conn: http.client.HTTPConnection
    if context is None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    else:
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=context)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        response = conn.getresponse()
        return Reply(
            response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
        )
    finally:
        conn.close()


def policy_dir(parent: Path, text: str) -> Path:
    """A policy directory under `parent` holding one file, `p.yaml`, with `text`."""
    directory = parent / "policies"
    directory.mkdir()
    (directory / "p.yaml").write_text(text)
    return directory


def infer_body(tokens: int = 4) -> bytes:
    return json.dumps(
        {"inputs": [{"name": "TOKENS", "shape": [1, 1], "datatype": "INT32", "data": [tokens]}]}
    ).encode()


@contextlib.contextmanager
def serving(server: ThreadingHTTPServer) -> Iterator[ThreadingHTTPServer]:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class QuietHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        del format, args

    def read_body(self) -> bytes:
        length = int(self.headers.get("content-length") or 0)
        return self.rfile.read(length) if length else b""

    def send(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers:
            self.send_header(key, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class EchoHandler(QuietHandler):
    """Upstream stand-in: answers 200 with the request it got, every header value listed."""

    def handle_any(self) -> None:
        self.read_body()
        headers: dict[str, list[str]] = {}
        for key in self.headers:
            headers.setdefault(key.lower(), self.headers.get_all(key) or [])
        body = json.dumps({"path": self.path, "headers": headers}).encode()
        self.send(200, [("content-type", "application/json")], body)

    do_GET = do_POST = handle_any


@dataclass
class AuthzScript:
    """What the stub ext_authz server answers, and what it saw."""

    status: int = 200
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    seen: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    leases: int = 0

    def reset(self) -> None:
        self.status, self.headers, self.body = 200, [], b""
        self.seen.clear()


class AuthzServer(ThreadingHTTPServer):
    daemon_threads = True
    script: AuthzScript


class AuthzHandler(QuietHandler):
    """Stub of the sidecar's HTTP ext_authz endpoint. ``{lease}`` in a header value becomes a
    fresh lease id per request."""

    server: AuthzServer

    def handle_any(self) -> None:
        self.read_body()
        if self.command == "GET" and self.path == HEALTH_PATH:  # Envoy's health check
            self.send(HEALTH_STATUS, [], b"")
            return
        script = self.server.script
        script.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        script.leases += 1
        headers = [(k, v.replace("{lease}", f"lease-{script.leases}")) for k, v in script.headers]
        self.send(script.status, headers, script.body)

    do_GET = do_POST = handle_any


# -- a gRPC stub of the sidecar: Authorization/Check and AccessLogService -----------------------


class GrpcCheck(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """Allows with ``allow_headers``, or denies with ``deny`` = (HTTP status, headers, body)."""

    def __init__(self) -> None:
        self.allow_headers: list[tuple[str, str]] = []
        self.allow_metadata: dict[str, str] = {}
        self.deny: tuple[int, list[tuple[str, str]], str] | None = None
        self.seen: list[external_auth_pb2.CheckRequest] = []

    async def Check(self, request: Any, context: Any) -> Any:
        self.seen.append(request)
        if self.deny is not None:
            code, headers, body = self.deny
            return external_auth_pb2.CheckResponse(
                status=status_pb2.Status(code=grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]),
                denied_response=external_auth_pb2.DeniedHttpResponse(
                    status=http_status_pb2.HttpStatus(code=code),
                    headers=[_header(k, v) for k, v in headers],
                    body=body,
                ),
            )
        return external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=0),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in self.allow_headers]
            ),
            dynamic_metadata=_struct(self.allow_metadata),
        )


def _struct(fields: dict[str, str]) -> Any:
    struct = struct_pb2.Struct()
    struct.update(fields)
    return struct


def _metadata_lease(entry: Any) -> str:
    """The lease ext_authz put in an access-log entry's dynamic metadata ("" if none)."""
    metadata = entry.common_properties.metadata.filter_metadata
    if "envoy.filters.http.ext_authz" not in metadata:
        return ""
    value = metadata["envoy.filters.http.ext_authz"].fields.get("x-qos-lease")
    return "" if value is None else str(value.string_value)


def _header(key: str, value: str) -> Any:
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=key, value=value),
        append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD,
    )


class AccessLogSink(als_pb2_grpc.AccessLogServiceServicer):  # type: ignore[misc]
    """Collects every HTTP access-log entry Envoy streams, in a thread-safe queue."""

    def __init__(self) -> None:
        self.entries: queue.Queue[Any] = queue.Queue()

    async def StreamAccessLogs(self, request_iterator: Any, context: Any) -> Any:
        async for message in request_iterator:
            for entry in message.http_logs.log_entry:
                self.entries.put(entry)
        return als_pb2.StreamAccessLogsResponse()

    def take(self, count: int, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        taken: list[Any] = []
        while len(taken) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"got {len(taken)} access-log entries, wanted {count}")
            try:
                taken.append(self.entries.get(timeout=remaining))
            except queue.Empty:
                continue
        return taken

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.entries.get_nowait()


class GrpcStub:
    """A grpc.aio server (Check + StreamAccessLogs) on its own event loop in a thread, so the
    tests stay synchronous."""

    def __init__(self) -> None:
        self.check = GrpcCheck()
        self.sink = AccessLogSink()
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="grpc-stub")

    def __enter__(self) -> GrpcStub:
        self._thread.start()
        if not self._ready.wait(timeout=30) or self._error is not None:
            raise RuntimeError(f"gRPC stub did not start: {self._error}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # reported through __enter__
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        server = grpc.aio.server()
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(self.check, server)
        als_pb2_grpc.add_AccessLogServiceServicer_to_server(self.sink, server)
        server.add_generic_rpc_handlers((grpc_health_handler(),))  # Envoy's health check
        self.port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        self._ready.set()
        await self._stop.wait()
        await server.stop(grace=1.0)


# -- unit tests of the harness (no servers) ---------------------------------------------------


def test_free_port_can_be_bound() -> None:
    import socket

    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_render_bootstrap_patches_ports_by_name_only() -> None:
    import yaml

    shipped = yaml.safe_load(HTTP_BOOTSTRAP.read_text())
    config = render_bootstrap(
        HTTP_BOOTSTRAP,
        listen_port=1001,
        triton_http_port=1002,
        sidecar_http_port=1003,
        sidecar_grpc_port=1004,
        admin_port=1005,
    )
    resources = config["static_resources"]
    assert resources["listeners"][0]["address"]["socket_address"]["port_value"] == 1001
    addresses = {
        c["name"]: c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
        for c in resources["clusters"]
    }
    # The sidecar clusters ship as Unix sockets (pipe); a port makes them loopback TCP.
    assert addresses == {
        name: {"socket_address": {"address": "127.0.0.1", "port_value": port}}
        for name, port in (
            ("triton_http", 1002),
            ("qos_sidecar_http", 1003),
            ("qos_sidecar_grpc", 1004),
        )
    }
    assert config["admin"]["address"]["socket_address"]["port_value"] == 1005
    # Everything but the addresses is as shipped, and the shipped dict was not touched.
    assert (
        render_bootstrap(
            HTTP_BOOTSTRAP,
            listen_port=8080,
            triton_http_port=8000,
            sidecar_http_socket="/tmp/qos-sidecar/authz.sock",
            sidecar_grpc_socket="/tmp/qos-sidecar/grpc.sock",
            admin_port=9901,
        )
        == shipped
    )
    assert render_bootstrap(HTTP_BOOTSTRAP) == shipped
    moved = render_bootstrap(HTTP_BOOTSTRAP, sidecar_grpc_socket="/s/g.sock")
    grpc_cluster = moved["static_resources"]["clusters"][2]
    endpoint = grpc_cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    assert endpoint["address"] == {"pipe": {"path": "/s/g.sock"}}


def test_render_bootstrap_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no cluster named 'nope'"):
        render_bootstrap(HTTP_BOOTSTRAP, cluster_ports={"nope": 1})
    empty = tmp_path / "empty.yaml"
    empty.write_text("static_resources: {}\n")
    with pytest.raises(ValueError, match=r"empty\.yaml: no listener named 'ingress'"):
        render_bootstrap(empty, listen_port=1)


class Sleeper(ManagedProcess):
    """A process that ignores SIGTERM and has a child in its group, to test stop()."""

    name = "sleeper"
    stop_timeout_s = 0.5

    def command(self) -> list[str]:
        script = (
            "import signal, subprocess, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
            "print(child.pid, flush=True)\n"
            "time.sleep(60)\n"
        )
        return [sys.executable, "-c", script]

    def wait_ready(self, deadline: float) -> None:
        while not self.log_tail(1).strip().isdigit():
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("no child pid printed")
            time.sleep(0.01)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.stack
def test_stop_kills_a_stubborn_process_and_its_children(tmp_path: Path) -> None:
    with Sleeper(tmp_path) as sleeper:
        child = int(sleeper.log_tail(1))
        assert sleeper.running and _alive(child)
    assert not sleeper.running
    assert sleeper.stop() == -signal.SIGKILL  # already stopped: same status, no error
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not _alive(child)


class Crasher(ManagedProcess):
    name = "crasher"

    def command(self) -> list[str]:
        return [sys.executable, "-c", "print('boom: bad flag'); raise SystemExit(3)"]

    def wait_ready(self, deadline: float) -> None:
        while True:
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("never ready")
            time.sleep(0.01)


@pytest.mark.stack
def test_start_failure_reports_the_log_tail(tmp_path: Path) -> None:
    with pytest.raises(ProcessStartError, match=r"(?s)exited with status 3.*boom: bad flag"):
        Crasher(tmp_path).start()


def test_a_python_server_runs_this_checkouts_code(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # An A/B run from a git worktree starts the worktree's sidecar, not the one that some
    # other path (here a decoy on PYTHONPATH; in practice the venv's install) would give.
    decoy = tmp_path / "decoy" / "sidecar"
    decoy.mkdir(parents=True)
    (decoy / "__init__.py").write_text("")
    monkeypatch.setenv("PYTHONPATH", str(decoy.parent))
    found = subprocess.run(
        [sys.executable, "-c", "import sidecar; print(sidecar.__file__)"],
        env=python_environment(),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert Path(found) == CHECKOUT / "sidecar" / "__init__.py"


def test_wait_http_times_out_with_the_last_error() -> None:
    with pytest.raises(TimeoutError, match=r"ConnectionRefusedError|URLError"):
        wait_http(f"http://127.0.0.1:{free_port()}/", timeout=0.2)


# -- the real servers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("stack")


@pytest.fixture(scope="module")
def triton(workdir: Path) -> Iterator[TritonProcess]:
    with TritonProcess(MODEL_REPO, workdir) as server:
        yield server


@pytest.fixture(scope="module")
def echo() -> Iterator[int]:
    with serving(ThreadingHTTPServer(("127.0.0.1", 0), EchoHandler)) as server:
        yield server.server_address[1]


@pytest.fixture(scope="module")
def authz_server() -> Iterator[AuthzServer]:
    server = AuthzServer(("127.0.0.1", 0), AuthzHandler)
    server.script = AuthzScript()
    with serving(server):
        yield server


@pytest.fixture
def authz(authz_server: AuthzServer) -> AuthzScript:
    authz_server.script.reset()
    return authz_server.script


@pytest.fixture(scope="module")
def grpc_stub() -> Iterator[GrpcStub]:
    with GrpcStub() as stub:
        yield stub


@pytest.fixture
def sink(grpc_stub: GrpcStub) -> AccessLogSink:
    grpc_stub.sink.drain()
    return grpc_stub.sink


@pytest.fixture
def start_envoy(workdir: Path) -> Iterator[Callable[..., int]]:
    """Start Envoy on a shipped bootstrap moved to free ports; returns the listener port."""
    require_binaries("envoy")
    started: list[EnvoyProcess] = []

    def start(
        bootstrap: Path,
        *,
        upstream_port: int,
        sidecar_http_port: int | None = None,
        sidecar_grpc_port: int | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
    ) -> int:
        port = free_port()
        config = render_bootstrap(
            bootstrap,
            listen_port=port,
            triton_http_port=upstream_port,
            sidecar_http_port=sidecar_http_port if sidecar_http_port else free_port(),
            sidecar_grpc_port=sidecar_grpc_port if sidecar_grpc_port else free_port(),
            admin_port=0,
        )
        if edit is not None:
            edit(config)
        started.append(EnvoyProcess(config, workdir).start())
        return port

    try:
        yield start
    finally:
        for envoy in started:
            envoy.stop()


@pytest.mark.stack
def test_valkey_answers_ping(workdir: Path) -> None:
    with ValkeyProcess(workdir) as valkey:
        assert valkey.ping()
        assert valkey.url == f"redis://127.0.0.1:{valkey.port}/0"
        pid = valkey.pid
    assert not valkey.running and pid is not None and not _alive(pid)


@pytest.mark.stack
def test_triton_serves_the_example_model(triton: TritonProcess) -> None:
    reply = request(triton.http_port, "/v2/models/simgpu/ready")
    assert reply.status == 200
    reply = request(
        triton.http_port,
        "/v2/models/simgpu/infer",
        method="POST",
        headers={"content-type": "application/json"},
        body=infer_body(tokens=5),
    )
    assert reply.status == 200, reply.body
    (out,) = reply.json()["outputs"]
    assert out["name"] == "OUT" and out["shape"] == [1, 1]
    assert out["data"][0] >= 10.0  # the simulated batch time in ms (base_ms = 10)

    # DELAY_MS sets the batch time; priority is accepted (config has 4 levels).
    body = {
        "inputs": [{"name": "DELAY_MS", "shape": [2, 1], "datatype": "FP32", "data": [30, 50]}],
        "parameters": {"priority": 1},
    }
    reply = request(
        triton.http_port, "/v2/models/simgpu/infer", method="POST", body=json.dumps(body).encode()
    )
    assert reply.status == 200, reply.body
    assert reply.json()["outputs"][0]["data"] == [50.0, 50.0]

    metrics = request(triton.metrics_port, "/metrics").body.decode()
    assert 'nv_inference_pending_request_count{model="simgpu",version="1"}' in metrics


@pytest.mark.stack
def test_request_through_envoy_reaches_triton(
    triton: TritonProcess, authz_server: AuthzServer, authz: AuthzScript, start_envoy: Any
) -> None:
    authz.headers = [("x-qos-tenant", "acme"), ("x-qos-lease", "{lease}")]
    port = start_envoy(
        HTTP_BOOTSTRAP,
        upstream_port=triton.http_port,
        sidecar_http_port=authz_server.server_address[1],
    )
    reply = request(
        port,
        "/v2/models/simgpu/infer",
        method="POST",
        headers={"content-type": "application/json", "x-api-key": "k-acme"},
        body=infer_body(),
    )
    assert reply.status == 200, reply.body
    assert reply.json()["outputs"][0]["name"] == "OUT"
    ((path, seen),) = authz.seen
    assert path == "/authz/v2/models/simgpu/infer"
    assert seen["x-api-key"] == "k-acme"


@pytest.mark.stack
def test_forged_decision_headers_never_reach_authz_or_upstream(
    echo: int, authz_server: AuthzServer, authz: AuthzScript, start_envoy: Any
) -> None:
    port = start_envoy(
        HTTP_BOOTSTRAP, upstream_port=echo, sidecar_http_port=authz_server.server_address[1]
    )
    forged = {name: "evil" for name in DECISION_HEADERS}
    forged["x-qos-peer-principal"] = "spiffe://evil"
    forged["x-qos-status"] = "503"  # the sidecar's HTTP-mode wire status: never the client's

    # The sidecar sets nothing: none of the client's copies may pass.
    reply = request(port, "/v2/models/simgpu/infer", headers={**forged, "x-qos-class": "gold"})
    assert reply.status == 200
    upstream = reply.json()["headers"]
    assert not {*DECISION_HEADERS, "x-qos-peer-principal", "x-qos-status"} & set(upstream)
    assert upstream["x-qos-class"] == ["gold"]  # the request for a class passes through
    (_, seen) = authz.seen[-1]
    assert not {*DECISION_HEADERS, "x-qos-peer-principal"} & set(seen)
    assert seen["x-qos-class"] == "gold"

    # The sidecar decides: upstream sees exactly its values, not appended to the client's.
    authz.headers = [
        ("x-qos-tenant", "acme"),
        ("x-qos-granted-class", "standard"),
        ("x-qos-priority", "2"),
        ("x-qos-lease", "{lease}"),
        ("x-not-allowed", "dropped"),
    ]
    upstream = request(port, "/", headers=forged).json()["headers"]
    assert upstream["x-qos-tenant"] == ["acme"]
    assert upstream["x-qos-granted-class"] == ["standard"]
    assert upstream["x-qos-priority"] == ["2"]
    # The lease becomes dynamic metadata only: neither the sidecar's nor the client's copy
    # goes upstream.
    assert "x-qos-lease" not in upstream
    assert "x-qos-status" not in upstream
    assert "x-not-allowed" not in upstream


@pytest.mark.stack
def test_http_mode_denial_reaches_the_client(
    echo: int, authz_server: AuthzServer, authz: AuthzScript, start_envoy: Any
) -> None:
    port = start_envoy(
        HTTP_BOOTSTRAP, upstream_port=echo, sidecar_http_port=authz_server.server_address[1]
    )
    authz.status = 429
    authz.headers = [
        ("content-type", "application/json"),
        ("retry-after", "3"),
        ("x-qos-reason", "rate_limited"),
        ("x-internal", "hidden"),
    ]
    authz.body = b'{"error": "rate_limited"}'
    reply = request(port, "/v2/models/simgpu/infer")
    assert reply.status == 429
    assert reply.headers["retry-after"] == "3"
    assert reply.headers["content-type"] == "application/json"
    assert reply.headers["x-qos-reason"] == "rate_limited"
    assert "x-internal" not in reply.headers
    assert reply.json() == {"error": "rate_limited"}

    # A 5xx from the sidecar is an ext_authz *error* in HTTP mode: the client gets Envoy's
    # 503 (status_on_error), without the sidecar's headers or body; the shipped local-reply
    # mapper gives it its own JSON body and Retry-After.
    authz.status = 503
    reply = request(port, "/v2/models/simgpu/infer")
    assert reply.status == 503
    assert b"rate_limited" not in reply.body
    assert reply.json()["reason"] == "sidecar_unavailable"

    # So the sidecar sends overload sheds as 430; the shipped local-reply mapper restores the
    # 503 and keeps the sidecar's headers and body.
    authz.status = 430
    authz.headers = [*authz.headers, ("x-qos-status", "503")]
    authz.body = b'{"error": "unavailable"}'
    reply = request(port, "/v2/models/simgpu/infer")
    assert reply.status == 503
    assert reply.headers["retry-after"] == "3"
    assert reply.headers["x-qos-status"] == "503"
    assert reply.json() == {"error": "unavailable"}


@pytest.mark.stack
@pytest.mark.parametrize("bootstrap", [HTTP_BOOTSTRAP, GRPC_BOOTSTRAP], ids=["http", "grpc"])
def test_sidecar_down_fails_closed_with_503(echo: int, start_envoy: Any, bootstrap: Path) -> None:
    port = start_envoy(bootstrap, upstream_port=echo)  # nothing listens on the sidecar ports
    started = time.monotonic()
    reply = request(port, "/v2/models/simgpu/infer")
    assert reply.status == 503
    assert time.monotonic() - started < 5


@pytest.mark.stack
def test_access_log_has_one_entry_per_request_with_its_lease(
    echo: int,
    authz_server: AuthzServer,
    authz: AuthzScript,
    grpc_stub: GrpcStub,
    sink: AccessLogSink,
    start_envoy: Any,
) -> None:
    port = start_envoy(
        HTTP_BOOTSTRAP,
        upstream_port=echo,
        sidecar_http_port=authz_server.server_address[1],
        sidecar_grpc_port=grpc_stub.port,
    )
    authz.headers = [("x-qos-lease", "{lease}"), ("x-qos-tenant", "acme")]
    for _ in range(3):
        assert request(port, "/", headers={"x-qos-lease": "forged"}).status == 200
    leases = [f"lease-{n}" for n in range(authz.leases - 2, authz.leases + 1)]
    entries = sink.take(3)
    # From the dynamic metadata (dynamic_metadata_from_headers), never the client's header.
    assert sorted(_metadata_lease(e) for e in entries) == sorted(leases)
    assert all("x-qos-lease" not in e.request.request_headers for e in entries)
    assert all(e.request.request_headers["x-qos-tenant"] == "acme" for e in entries)
    assert all(e.response.response_code.value == 200 for e in entries)

    # A denied request is logged too, without a lease (none was granted).
    authz.status, authz.headers = 429, [("retry-after", "1")]
    assert request(port, "/", headers={"x-qos-lease": "forged"}).status == 429
    (denied,) = sink.take(1)
    assert denied.response.response_code.value == 429
    assert "x-qos-lease" not in denied.request.request_headers
    assert _metadata_lease(denied) == ""
    # Exactly one entry per request: Envoy streams entries in the order its requests ended, so
    # the next entry after the denied one must be that of a later marker request (no waiting
    # a fixed time for an entry that might still come).
    assert request(port, "/end-marker").status == 429
    (after,) = sink.take(1)
    assert after.request.path == "/end-marker"


@pytest.mark.stack
def test_grpc_mode_allows_denies_and_logs(
    echo: int, grpc_stub: GrpcStub, sink: AccessLogSink, start_envoy: Any
) -> None:
    port = start_envoy(GRPC_BOOTSTRAP, upstream_port=echo, sidecar_grpc_port=grpc_stub.port)
    check = grpc_stub.check
    check.deny = None
    check.allow_headers = [("x-qos-tenant", "acme")]
    check.allow_metadata = {"x-qos-lease": "grpc-lease-1"}
    reply = request(
        port,
        "/v2/models/simgpu/infer",
        headers={"x-qos-tenant": "evil", "x-api-key": "k-acme", "x-qos-class": "gold"},
    )
    assert reply.status == 200
    upstream = reply.json()["headers"]
    assert upstream["x-qos-tenant"] == ["acme"]
    assert "x-qos-lease" not in upstream
    http_request = check.seen[-1].attributes.request.http
    assert http_request.path == "/v2/models/simgpu/infer"
    assert http_request.headers["x-api-key"] == "k-acme"
    assert "x-qos-tenant" not in http_request.headers
    (entry,) = sink.take(1)
    assert _metadata_lease(entry) == "grpc-lease-1"

    # In gRPC mode the sidecar's denial reaches the client whatever the status, 503 included.
    for status in (429, 503):
        check.deny = (
            status,
            [("retry-after", "2"), ("content-type", "application/json")],
            '{"error": "shed"}',
        )
        reply = request(port, "/v2/models/simgpu/infer")
        assert reply.status == status
        assert reply.headers["retry-after"] == "2"
        assert reply.headers["content-type"] == "application/json"
        assert reply.json() == {"error": "shed"}
    check.deny = None


# -- mTLS: the peer principal reaches the sidecar in HTTP mode -----------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


CLIENT_SPIFFE_ID = "spiffe://example.org/tenant/acme"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not installed")
    d = tmp_path_factory.mktemp("certs")
    new_key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    ca = ["-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2"]
    _openssl("req", "-x509", *new_key, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
             "-subj", "/CN=qos-test-ca", cwd=d)  # fmt: skip
    for name, san in (("server", "IP:127.0.0.1"), ("client", f"URI:{CLIENT_SPIFFE_ID}")):
        (d / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        _openssl("req", *new_key, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}", cwd=d)  # fmt: skip
        _openssl("x509", "-req", "-in", f"{name}.csr", *ca, "-out", f"{name}.crt",
                 "-extfile", f"{name}.ext", cwd=d)  # fmt: skip
    return Certs(
        ca=d / "ca.crt",
        server_cert=d / "server.crt",
        server_key=d / "server.key",
        client_cert=d / "client.crt",
        client_key=d / "client.key",
    )


def _require_client_certs(certs: Certs) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        (listener,) = config["static_resources"]["listeners"]
        listener["filter_chains"][0]["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3."
                "DownstreamTlsContext",
                "require_client_certificate": True,
                "common_tls_context": {
                    "tls_certificates": [
                        {
                            "certificate_chain": {"filename": str(certs.server_cert)},
                            "private_key": {"filename": str(certs.server_key)},
                        }
                    ],
                    "validation_context": {"trusted_ca": {"filename": str(certs.ca)}},
                },
            },
        }

    return edit


@pytest.mark.stack
def test_http_mode_sends_the_mtls_peer_principal(
    certs: Certs, echo: int, authz_server: AuthzServer, authz: AuthzScript, start_envoy: Any
) -> None:
    port = start_envoy(
        HTTP_BOOTSTRAP,
        upstream_port=echo,
        sidecar_http_port=authz_server.server_address[1],
        edit=_require_client_certs(certs),
    )
    context = ssl.create_default_context(cafile=str(certs.ca))
    context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    reply = request(port, "/", headers={"x-qos-peer-principal": "spiffe://evil"}, context=context)
    assert reply.status == 200
    (_, seen) = authz.seen[-1]
    assert seen["x-qos-peer-principal"] == CLIENT_SPIFFE_ID
    assert "x-qos-peer-principal" not in reply.json()["headers"]  # not passed upstream


# -- start failures name their cause ----------------------------------------------------------


@pytest.mark.stack
def test_triton_start_failure_quotes_the_model_error(tmp_path: Path) -> None:
    model = tmp_path / "repo" / "broken"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(
        'backend: "python"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
        'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
    )
    (model / "1" / "model.py").write_text("raise RuntimeError('broken on purpose')\n")
    triton = TritonProcess(tmp_path / "repo", tmp_path)
    with pytest.raises(ProcessStartError, match=r"failed to load 'broken'.*broken on purpose"):
        triton.start()
    assert not triton.running


@pytest.mark.stack
def test_envoy_start_failure_quotes_the_config_error(tmp_path: Path) -> None:
    require_binaries("envoy")
    envoy = EnvoyProcess(
        {"static_resources": {"clusters": [{"name": "x", "type": "BOGUS"}]}}, tmp_path
    )
    with pytest.raises(ProcessStartError, match="unknown enum value: 'BOGUS'"):
        envoy.start()
    assert not envoy.running
