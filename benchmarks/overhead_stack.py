"""The configurations of the overhead benchmark and the processes behind each.

Every configuration is one Envoy (one worker) whose route is a ``direct_response``, so no
upstream costs anything, with a buffer filter before the router, so Envoy reads the whole
request before it answers (without it Envoy answers a POST before its body and closes the
connection). What differs is the filter in front: none (A), the shipped ext_authz HTTP,
ext_authz gRPC or ext_proc bootstrap talking to a no-op twin (``benchmarks/noop_servers.py``)
or to the sidecar, with the memory store or Valkey. The sidecar's Envoy config is the shipped
bootstrap with only the route swapped (and ports and sockets moved), access log included.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from benchmarks.loadgen import _direct_response_bootstrap
from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import ManagedProcess, free_port, python_environment
from devstack.sidecar_proc import SidecarProcess, short_socket_dir

REPO = Path(__file__).resolve().parent.parent
BOOTSTRAPS = {
    "http": REPO / "envoy" / "bootstrap-ext-authz-http.yaml",
    "grpc": REPO / "envoy" / "bootstrap-ext-authz-grpc.yaml",
    "ext_proc": REPO / "envoy" / "bootstrap-ext-proc.yaml",
}
MODEL = "bench"
TENANT = "bench"
API_KEY = "bench-overhead-key"
MIB = 1 << 20
# Configuration H's body: 1 MiB less 1 KiB. The shipped listener buffers at most 1 MiB
# (per_connection_buffer_limit_bytes, left as shipped) and refuses a body of exactly 1 MiB
# with 413, as it would in production.
BIG_BODY_BYTES = MIB - 1024
# Largest body the buffer filter accepts: above the 1 MiB body of configuration H.
BUFFER_MAX_BYTES = 2 * MIB


@dataclass(frozen=True, slots=True)
class Config:
    """One measured configuration. ``server``: envoy (nothing behind it), noop or sidecar."""

    name: str
    label: str
    mode: str  # "" (Envoy alone), http, grpc or ext_proc
    server: str
    store: str = ""  # sidecar only: memory or valkey
    twin: str = ""  # the no-op configuration it is compared with
    body_bytes: int = 0  # 0: a small JSON body
    leased: bool = False  # the policy's bucket in leased mode, and no concurrency limit
    counted: bool = False  # the class reads its model's count: each admit joins its model's set
    extra: bool = False  # measured only when named in --configs (no target reads it)
    workers: int = 1  # sidecar only: `serve --workers N`, which listens on TCP (SO_REUSEPORT)

    @property
    def is_sidecar(self) -> bool:
        return self.server == "sidecar"


CONFIGS: tuple[Config, ...] = (
    Config("A", "Envoy alone (buffer filter)", "", "envoy"),
    Config("B", "no-op ext_authz HTTP (aiohttp + uvloop)", "http", "noop"),
    Config("C", "sidecar ext_authz HTTP, memory store", "http", "sidecar", "memory", "B"),
    Config("D", "sidecar ext_authz HTTP, Valkey", "http", "sidecar", "valkey", "B"),
    Config(
        "DL",
        "sidecar ext_authz HTTP, Valkey, leased mode",
        "http",
        "sidecar",
        "valkey",
        "B",
        leased=True,
    ),
    Config(
        "DC",
        "sidecar ext_authz HTTP, Valkey, model counted",
        "http",
        "sidecar",
        "valkey",
        "B",
        extra=True,
        counted=True,
    ),
    Config(
        "DLC",
        "sidecar ext_authz HTTP, Valkey, leased mode, model counted",
        "http",
        "sidecar",
        "valkey",
        "B",
        leased=True,
        extra=True,
        counted=True,
    ),
    Config(
        "DW",
        "sidecar ext_authz HTTP, Valkey, 2 workers",
        "http",
        "sidecar",
        "valkey",
        "B",
        extra=True,
        workers=2,
    ),
    Config("E0", "no-op ext_authz gRPC (grpc.aio)", "grpc", "noop"),
    Config("E", "sidecar ext_authz gRPC, Valkey", "grpc", "sidecar", "valkey", "E0"),
    Config(
        "EL",
        "sidecar ext_authz gRPC, Valkey, leased mode",
        "grpc",
        "sidecar",
        "valkey",
        "E0",
        leased=True,
        extra=True,
    ),
    Config("F", "no-op ext_proc", "ext_proc", "noop"),
    Config("G", "sidecar ext_proc, Valkey", "ext_proc", "sidecar", "valkey", "F"),
    Config(
        "GL",
        "sidecar ext_proc, Valkey, leased mode",
        "ext_proc",
        "sidecar",
        "valkey",
        "F",
        leased=True,
        extra=True,
    ),
    Config("H0", "no-op ext_proc, 1 MiB body", "ext_proc", "noop", body_bytes=BIG_BODY_BYTES),
    Config(
        "H",
        "sidecar ext_proc, Valkey, 1 MiB body",
        "ext_proc",
        "sidecar",
        "valkey",
        "H0",
        BIG_BODY_BYTES,
    ),
)
BY_NAME = {c.name: c for c in CONFIGS}
DEFAULT_CONFIGS = ",".join(c.name for c in CONFIGS if not c.extra)
# Each sidecar runs before its no-op twin, so that the twin can also be measured at the
# sidecar's half maximum (added latency at the same load) and the 1 MiB pair at one rate.
RUN_ORDER = (
    *("A", "C", "D", "DL", "DC", "DLC", "DW", "B"),
    *("E", "EL", "E0", "G", "GL", "F", "H", "H0"),
)


def request_body(size: int) -> bytes:
    """A KServe v2 JSON inference body; padded to exactly ``size`` bytes when ``size`` > 0
    (one BYTES input whose string fills it), so the sidecar parses and rewrites a real body."""
    small = b'{"inputs":[{"name":"INPUT0","shape":[1],"datatype":"FP32","data":[1.0]}]}'
    if size <= 0:
        return small
    head, tail = b'{"inputs":[{"name":"INPUT0","shape":[1],"datatype":"BYTES","data":["', b'"]}]}'
    return head + b"x" * (size - len(head) - len(tail)) + tail


def request_headers() -> dict[str, str]:
    return {"x-api-key": API_KEY, "x-qos-class": "standard", "content-type": "application/json"}


# Leased mode's slice: 100 ms of the bucket's rate (at most half its burst).
LEASE_MS = 100


def write_policy(
    directory: Path, *, leased: bool = False, counted: bool = False, lease_ttl_s: float = 30
) -> Path:
    """A policy that admits everything: one tenant with limits far above any rate here, and a
    ``max_concurrency`` so that every request takes and releases a concurrency lease. Leased:
    the bucket in leased mode (``lease_ms``) and no concurrency limit, so that requests are
    spent from slices (core/slices.py). Counted: the class has a ``max_in_flight`` that never
    binds, as a preset's class reads its model's count, so that every admit is written to its
    model's set and removed at its end (with no Triton view the load verdict is admit)."""
    doc = {
        "identity": {"sources": [{"kind": "api_key", "header": "x-api-key"}]},
        "unknown_tenants": {"action": "reject"},
        "lease_ttl_s": lease_ttl_s,
        "classes": {
            "standard": {
                "rank": 1,
                "latency_objective_ms": 1000,
                "max_wait_ms": 0,
                "triton_priority": 1,
                "on_state_error": "closed",
            }
        },
        "tenants": {
            TENANT: {
                "match": {"api_key_sha256": [hashlib.sha256(API_KEY.encode()).hexdigest()]},
                "allowed_classes": ["standard"],
                "default_class": "standard",
                "buckets": [
                    {"name": "requests", "unit": "requests", "rate": 1_000_000, "burst": 1_000_000}
                ],
                "max_concurrency": 100_000,
            }
        },
    }
    if counted:
        overload = {"admit_below": 1_000_000, "shed_above": 2_000_000, "max_in_flight": 1_000_000}
        doc["classes"]["standard"]["overload"] = overload  # type: ignore[index]
    if leased:
        tenant = doc["tenants"][TENANT]  # type: ignore[index]
        del tenant["max_concurrency"]
        tenant["buckets"][0]["lease_ms"] = LEASE_MS
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "overhead.yaml"
    path.write_text("# Generated by benchmarks/overhead_stack.py\n" + yaml.safe_dump(doc))
    return path


def envoy_alone_bootstrap(port: int) -> dict[str, Any]:
    """Configuration A: direct_response behind the buffer filter, nothing else."""
    config = _direct_response_bootstrap(port)
    _insert_buffer_filter(_connection_manager(config))
    return config


def envoy_bootstrap(mode: str, port: int, **server: Any) -> dict[str, Any]:
    """The shipped bootstrap of ``mode`` on ``port``, pointed at the server (``render_bootstrap``'s
    ``sidecar_*_socket`` or ``sidecar_*_port``), with its routes replaced by one
    ``direct_response`` and the buffer filter before the router."""
    config = render_bootstrap(BOOTSTRAPS[mode], listen_port=port, admin_port=free_port(), **server)
    manager = _connection_manager(config)
    for host in manager["route_config"]["virtual_hosts"]:
        host["routes"] = [
            {
                "match": {"prefix": "/"},
                "direct_response": {"status": 200, "body": {"inline_string": "{}"}},
            }
        ]
    _insert_buffer_filter(manager)
    return config


def _connection_manager(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def _insert_buffer_filter(manager: dict[str, Any]) -> None:
    buffer = {
        "name": "envoy.filters.http.buffer",
        "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.buffer.v3.Buffer",
            "max_request_bytes": BUFFER_MAX_BYTES,
        },
    }
    filters = manager["http_filters"]
    filters.insert(len(filters) - 1, copy.deepcopy(buffer))


class NoopProcess(ManagedProcess):
    """``benchmarks/noop_servers.py`` on its own sockets (HTTP and gRPC)."""

    name = "noop"
    ready_timeout_s = 30.0

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.socket_dir = short_socket_dir()
        self.http_socket = str(self.socket_dir / "authz.sock")
        self.grpc_socket = str(self.socket_dir / "grpc.sock")
        self.ready_file = self.workdir / "noop.ready"

    def command(self) -> list[str]:
        self.ready_file.unlink(missing_ok=True)
        return [
            sys.executable, "-m", "benchmarks.noop_servers",
            "--http", f"unix:{self.http_socket}",
            "--grpc", f"unix:{self.grpc_socket}",
            "--ready-file", str(self.ready_file),
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        return python_environment()

    def wait_ready(self, deadline: float) -> None:
        while not self.ready_file.exists():
            self.check_alive()
            if time.monotonic() >= deadline:
                raise TimeoutError("no-op servers did not start")
            time.sleep(0.05)


class ProfiledSidecar(SidecarProcess):
    """The sidecar under cProfile (``benchmarks/profiled_sidecar.py``); the profile is written
    when it stops (SIGTERM ends its main function normally)."""

    def __init__(self, *args: Any, profile_path: Path, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.profile_path = profile_path

    def command(self) -> list[str]:
        return [sys.executable, "-m", "benchmarks.profiled_sidecar", str(self.profile_path)]


@dataclass
class Running:
    """What a started configuration exposes to the measurement."""

    port: int
    server: ManagedProcess | None  # the no-op twin or the sidecar: its CPU is measured
    sidecar: SidecarProcess | None
    envoy: EnvoyProcess | None = None


@contextlib.contextmanager
def start(
    config: Config,
    workdir: Path,
    redis_url: str,
    profile_path: Path | None = None,
    lease_ttl_s: float = 30,
) -> Iterator[Running]:
    """Start ``config``'s processes (the server first, then Envoy) and stop them after; a
    sidecar's policy gives its leases ``lease_ttl_s`` (and their tombstones)."""
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        server: ManagedProcess | None = None
        sidecar: SidecarProcess | None = None
        if config.server == "envoy":
            bootstrap = envoy_alone_bootstrap(port)
        else:
            if config.server == "noop":
                noop = stack.enter_context(NoopProcess(workdir))
                server = noop
                endpoints = {
                    "sidecar_http_socket": noop.http_socket,
                    "sidecar_grpc_socket": noop.grpc_socket,
                }
            else:
                policy = write_policy(
                    workdir / "policy",
                    leased=config.leased,
                    counted=config.counted,
                    lease_ttl_s=lease_ttl_s,
                )
                url = redis_url if config.store == "valkey" else ""
                if profile_path is not None:
                    sidecar = ProfiledSidecar(
                        workdir, policy, redis_url=url, profile_path=profile_path
                    )
                else:  # workers share their ports by SO_REUSEPORT: TCP (README, --workers)
                    sidecar = SidecarProcess(
                        workdir,
                        policy,
                        redis_url=url,
                        transport="tcp" if config.workers > 1 else "unix",
                        extra_env={"QOS_WORKERS": str(config.workers)},
                    )
                stack.enter_context(sidecar)
                server = sidecar
                endpoints = sidecar.envoy_endpoints()
            bootstrap = envoy_bootstrap(config.mode, port, **endpoints)
        envoy = stack.enter_context(EnvoyProcess(bootstrap, workdir))
        yield Running(port, server, sidecar, envoy)
