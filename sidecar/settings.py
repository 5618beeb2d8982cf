"""Process settings: read once at start from flags and `QOS_*` environment variables.

Flags win over the environment, the environment over defaults. Everything that can change
while the sidecar runs (quotas, classes, tenants) is policy, not a setting.

The Envoy-facing listeners (ext_authz HTTP, the gRPC services) take Check calls that claim a
principal and take quota, and access-log entries that release leases: whoever can reach them
can do both. So:
1. They default to Unix domain sockets (`unix:/path`), reachable only by processes that share
   the socket's directory (Envoy in the same pod, through a shared volume).
2. A TCP address is allowed, and on loopback needs nothing more (local development).
3. A TCP address that is not loopback needs `auth_token` (which Envoy then sends on every
   call), or an explicit `allow_unauthenticated`: the sidecar refuses to start otherwise.
The admin listener is TCP only (Prometheus and probes speak HTTP over TCP) and has no token.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any

from sidecar.errors import SettingsError

UNIX_PREFIX = "unix:"
# How the quota store is deployed (QOS_REDIS_MODE); sidecar/state/redis_store.py says more.
REDIS_MODES = ("single", "cluster", "sentinel")
# sun_path is 108 bytes on Linux, one of them the terminating NUL.
MAX_SOCKET_PATH_BYTES = 107
# Where the shipped Envoy bootstraps (envoy/bootstrap-*.yaml, `pipe` addresses) look.
SOCKET_DIR = "/tmp/qos-sidecar"
# The `topology` setting's values (see Settings.topology).
TOPOLOGIES = ("gateway", "pod")
GRPC_SERVERS = ("own", "grpcio")


@dataclass(frozen=True, slots=True)
class ListenAddr:
    """Where a listener binds: a Unix socket path, or a TCP host and port."""

    unix_path: str | None = None
    host: str = ""
    port: int = 0

    @property
    def is_network(self) -> bool:
        """Reachable from other hosts: TCP on anything but loopback."""
        if self.unix_path is not None or self.host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return True

    def __str__(self) -> str:
        if self.unix_path is not None:
            return UNIX_PREFIX + self.unix_path
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    # ext_authz HTTP (Envoy http_service), and ext_authz gRPC, ext_proc and the access-log
    # completion stream. Unix sockets by default (module rule 1).
    authz_http_addr: str = f"{UNIX_PREFIX}{SOCKET_DIR}/authz.sock"
    grpc_addr: str = f"{UNIX_PREFIX}{SOCKET_DIR}/grpc.sock"
    # What serves grpc_addr: "own" (sidecar/envoy/grpc_wire.py, a small HTTP/2 server for
    # Envoy's calls, about a third of grpc.aio's CPU per call) or "grpcio" (grpc.aio).
    grpc_server: str = "own"
    admin_addr: str = "127.0.0.1:9090"  # metrics, health, policy, explain: localhost by default
    redis_url: str = ""  # empty: the embedded in-memory store (one replica only)
    # single: redis_url is one server's URL. cluster: redis_url lists seed nodes, and
    # sentinel: it lists the sentinels, as HOST:PORT,HOST:PORT (sidecar/state/redis_store.py).
    redis_mode: str = "single"
    redis_sentinel_master: str = ""  # sentinel mode: the name the sentinels monitor
    redis_timeout_ms: int = 50  # a store call slower than this counts as unavailable
    policy_path: tuple[str, ...] = ("policies",)
    policy_poll_ms: int = 1000  # how often policy files are checked for changes
    triton_urls: tuple[str, ...] = ()  # Triton HTTP base URLs (readiness)
    # Triton metrics URLs, paired with triton_urls by position (default: port 8002 of each).
    triton_metrics_urls: tuple[str, ...] = ()
    triton_scrape_ms: int = 250  # how often Triton's queue depth and counters are read
    triton_stale_ms: int = 1000  # load signals older than this are stale (see on_stale)
    # How often each busy model is nudged: a request Triton rejects unrun, whose enqueue ends
    # a stall of its batcher (sidecar/core/nudge.py has the rules). 0: never.
    triton_nudge_ms: int = 10
    # QoServe's hybrid key for held requests: deadline + alpha x estimated work (cost units).
    # 0 is earliest-deadline-first; QoServe's artifact uses 0.008 s per token.
    queue_alpha_ms_per_unit: int = 0
    # A request refused for concurrency first waits this long for a release on its way (the
    # previous request's access-log entry, flushed every 10 ms by the shipped Envoy config)
    # and asks again once: a closed-loop client at its max_concurrency gets no false 429.
    # 50 ms still let one in 160 through on a loaded 2-core machine; a refusal that is real
    # comes 100 ms later, well within any Retry-After. 0: refuse at once.
    release_grace_ms: int = 100
    # The longest a request is held on each transport (core/holds.py): a class's max_wait_ms
    # is cut to it. ext_authz (HTTP, gRPC): below Envoy's check timeout (6 s shipped).
    # ext_proc: at most the filter's max_message_timeout (30 s shipped) minus 0.5 s.
    check_max_hold_ms: int = 29500
    ext_proc_max_hold_ms: int = 29500
    log_level: str = "info"
    # Signs lease tokens (HMAC-SHA256). Empty: a random key per process, which only works for
    # one replica that never restarts while requests run: a lease granted by one process and
    # completed through another (another replica, or the same one after a restart) is
    # refused as bad_lease and waits for its TTL. A fleet must give every replica one key.
    lease_key: str = ""
    # Shared secret Envoy sends on every call to the Envoy-facing listeners (HTTP header and
    # gRPC metadata `x-qos-auth`); empty: no check (module rules 2 and 3).
    auth_token: str = ""
    # Start even with a non-loopback TCP listener and no auth_token (module rule 3).
    allow_unauthenticated: bool = False
    # A refusal's JSON body also carries its decision's trace (core/explain.py `with_trace`).
    # Off by default: the trace shows queue depths, caps and class names to the client.
    explain_refusals: bool = False

    # Topology (examples/deploy/README.md): the scope of per-model in-flight counts and of
    # `max_in_flight`. "gateway": the replicas front one pool of Tritons, so a model's count
    # and cap are the fleet's, summed over the pool. "pod": each sidecar sits beside its own
    # Triton, so each pod counts and caps what its Triton runs (with N pods, N x the cap in
    # all). Tenant buckets and concurrency are fleet-wide in both.
    topology: str = "gateway"
    pod_id: str = ""  # this pod's name in the pod topology; empty: the hostname (Kubernetes:
    # the pod's name). Unique per pod and stable for a pod's life: its leases name it.
    # Worker processes sharing the Envoy-facing TCP ports (sidecar/workers.py has the rules).
    workers: int = 1
    worker_index: int = -1  # set by the supervisor for its workers; -1: not a worker

    @property
    def model_pod(self) -> str | None:
        """Whose model counts this sidecar keeps: its pod's, or None for the fleet's."""
        if self.topology != "pod":
            return None
        return self.pod_id or socket.gethostname()

    @property
    def authz_http_listen(self) -> ListenAddr:
        return parse_listen_addr(self.authz_http_addr, "authz_http_addr")

    @property
    def grpc_listen(self) -> ListenAddr:
        return parse_listen_addr(self.grpc_addr, "grpc_addr")

    @property
    def admin_host_port(self) -> tuple[str, int]:
        return split_addr(self.admin_addr, "admin_addr")

    def triton_endpoints(self) -> list[tuple[str, str, str]]:
        """(name, http_url, metrics_url) for each Triton endpoint."""
        endpoints = []
        for i, http_url in enumerate(self.triton_urls):
            if i < len(self.triton_metrics_urls):
                metrics_url = self.triton_metrics_urls[i]
            else:  # Triton's default layout: metrics on port 8002 of the same host
                host = http_url.split("://", 1)[-1].rsplit(":", 1)[0]
                metrics_url = f"http://{host}:8002/metrics"
            endpoints.append((f"triton-{i}", http_url.rstrip("/"), metrics_url))
        return endpoints


_HELP = {
    "authz_http_addr": "ext_authz HTTP listener: unix:/path (default) or HOST:PORT",
    "grpc_addr": "gRPC listener (ext_authz, ext_proc, access log): unix:/path or HOST:PORT",
    "grpc_server": "own (the sidecar's HTTP/2 server) or grpcio (grpc.aio) on grpc_addr",
    "admin_addr": "listen address of metrics, health, policy and explain",
    "redis_url": "Redis URL for shared quota state; empty uses an in-memory store",
    "redis_mode": "single (redis_url is a URL), cluster or sentinel (redis_url: HOST:PORT,...)",
    "redis_sentinel_master": "sentinel mode: the monitored primary's name",
    "redis_timeout_ms": "Redis call timeout in ms; slower calls follow the class fail mode",
    "policy_path": "policy file or directory (comma-separated for several; one that exists "
    "as written is one path, commas and all)",
    "policy_poll_ms": "policy change check interval in ms (SIGHUP reloads at once)",
    "triton_urls": "comma-separated Triton HTTP base URLs (readiness, load signals)",
    "triton_metrics_urls": "Triton metrics URLs, paired with triton_urls by position",
    "triton_scrape_ms": "Triton metrics scrape interval in ms",
    "triton_stale_ms": "age in ms after which Triton load signals count as stale",
    "triton_nudge_ms": "nudge interval in ms for busy models whose batcher can stall; 0: never",
    "queue_alpha_ms_per_unit": "held-request order: deadline + alpha x work; 0 is EDF",
    "release_grace_ms": "wait in ms for a release on its way before a concurrency 429",
    "check_max_hold_ms": "longest hold in ms on ext_authz (HTTP, gRPC): under the check timeout",
    "ext_proc_max_hold_ms": "longest hold in ms on ext_proc: max_message_timeout - 500",
    "log_level": "debug, info, warning or error",
    "lease_key": "secret that signs lease tokens; the same on every replica (default: random)",
    "auth_token": "token Envoy must send (x-qos-auth) on every authz, ext_proc and log call",
    "allow_unauthenticated": "true: allow a non-loopback TCP listener without auth_token",
    "explain_refusals": "true: a refusal's JSON body carries the decision's trace (its steps)",
    "topology": "gateway (model in-flight counts and caps fleet-wide) or pod (per pod)",
    "pod_id": "this pod's id in the pod topology (default: the hostname)",
    "workers": "worker processes on the same TCP ports (SO_REUSEPORT); > 1 needs Redis",
    "worker_index": "set by the supervisor for each worker; leave unset",
}


def parse_listen_addr(addr: str, name: str) -> ListenAddr:
    """`unix:/path` (a relative path is taken from the working directory) or HOST:PORT."""
    if addr.startswith(UNIX_PREFIX):
        path = os.path.abspath(addr[len(UNIX_PREFIX) :]) if addr[len(UNIX_PREFIX) :] else ""
        if not path:
            raise SettingsError(f"{name}: expected unix:/path, got {addr!r}")
        if len(path.encode()) > MAX_SOCKET_PATH_BYTES:
            raise SettingsError(
                f"{name}: socket path {path!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes"
                " (the limit of a Unix socket address); use a shorter directory"
            )
        return ListenAddr(unix_path=path)
    host, port = split_addr(addr, name)
    return ListenAddr(host=host, port=port)


def _parse_bool(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise SettingsError(f"{name}: expected true or false, got {raw!r}")


def _check_exposure(settings: Settings) -> None:
    """Module rule 3: a listener reachable from the network needs the token, or an explicit
    opt-out. Raises SettingsError naming the listener."""
    if settings.auth_token or settings.allow_unauthenticated:
        return
    for name, listen in (
        ("authz_http_addr", settings.authz_http_listen),
        ("grpc_addr", settings.grpc_listen),
    ):
        if listen.is_network:
            raise SettingsError(
                f"{name}: {listen} is reachable from the network, and QOS_AUTH_TOKEN is not"
                " set: anyone who can connect could take and release quota. Set QOS_AUTH_TOKEN"
                " (and have Envoy send it, envoy/README.md), listen on unix:/path or loopback,"
                " or set QOS_ALLOW_UNAUTHENTICATED=true"
            )


def split_addr(addr: str, name: str) -> tuple[str, int]:
    host, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise SettingsError(f"{name}: expected HOST:PORT, got {addr!r}")
    return host.strip("[]") or "0.0.0.0", int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        env = "QOS_" + f.name.upper()
        parser.add_argument(
            "--" + f.name.replace("_", "-"),
            dest=f.name,
            default=None,
            help=f"{_HELP[f.name]} (${env})",
        )


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for f in fields(Settings):
        raw = getattr(args, f.name, None) if args is not None else None
        if raw is None:
            raw = environ.get("QOS_" + f.name.upper())
        if raw is not None:
            values[f.name] = _parse_value(f.name, str(f.type), raw)
    settings = Settings(**values)  # type: ignore[arg-type]
    # Validate addresses at start, not at first use, and spell them out: grpc cannot bind
    # ":PORT" (the HTTP listeners take it to mean 0.0.0.0) and wants absolute socket paths.
    settings = replace(
        settings,
        authz_http_addr=str(settings.authz_http_listen),
        grpc_addr=str(settings.grpc_listen),
    )
    settings.admin_host_port  # noqa: B018
    _check_exposure(settings)
    if settings.redis_timeout_ms <= 0:
        raise SettingsError("redis_timeout_ms: must be positive")
    _check_redis(settings)
    if settings.triton_metrics_urls and len(settings.triton_metrics_urls) != len(
        settings.triton_urls
    ):
        raise SettingsError("triton_metrics_urls: one per triton_urls entry, in the same order")
    if settings.triton_scrape_ms <= 0:
        raise SettingsError("triton_scrape_ms: must be positive")
    if settings.queue_alpha_ms_per_unit < 0:
        raise SettingsError("queue_alpha_ms_per_unit: must not be negative")
    if settings.release_grace_ms < 0:
        raise SettingsError("release_grace_ms: must not be negative")
    if settings.triton_nudge_ms < 0:
        raise SettingsError("triton_nudge_ms: must not be negative")
    for name in ("check_max_hold_ms", "ext_proc_max_hold_ms"):
        if getattr(settings, name) < 0:
            raise SettingsError(f"{name}: must not be negative")
    if settings.triton_stale_ms < settings.triton_scrape_ms:
        raise SettingsError("triton_stale_ms: must be at least triton_scrape_ms")
    if not settings.policy_path:
        raise SettingsError("policy_path: at least one path is needed")
    if settings.grpc_server not in GRPC_SERVERS:
        raise SettingsError(
            f"grpc_server: one of {', '.join(GRPC_SERVERS)}, not {settings.grpc_server!r}"
        )
    if settings.topology not in TOPOLOGIES:
        raise SettingsError(f"topology: one of {', '.join(TOPOLOGIES)}, not {settings.topology!r}")
    _check_workers(settings)
    return settings


def _check_workers(settings: Settings) -> None:
    """sidecar/workers.py rules 1 and 2."""
    if settings.workers < 1:
        raise SettingsError("workers: must be at least 1")
    if settings.workers == 1:
        return
    for name, listen in (
        ("authz_http_addr", settings.authz_http_listen),
        ("grpc_addr", settings.grpc_listen),
    ):
        if listen.unix_path is not None:
            raise SettingsError(
                f"{name}: workers > 1 need TCP listeners (HOST:PORT), which every worker opens"
                " with SO_REUSEPORT; a Unix socket cannot be shared that way"
            )
    if not settings.redis_url:
        raise SettingsError(
            "redis_url: workers > 1 need a shared store; with the in-memory store each worker"
            " would enforce every limit on its own"
        )


def env_of(value: object) -> str:
    """A setting's value as its QOS_* variable spells it (load_settings reads it back)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple):
        return ",".join(value)
    return str(value)


def _check_redis(settings: Settings) -> None:
    if settings.redis_mode not in REDIS_MODES:
        raise SettingsError(
            f"redis_mode: expected one of {', '.join(REDIS_MODES)}, got {settings.redis_mode!r}"
        )
    if settings.redis_mode == "single":
        return
    if not settings.redis_url:
        raise SettingsError(f"redis_url: {settings.redis_mode} mode needs HOST:PORT seeds")
    for seed in settings.redis_url.split(","):
        if seed.strip():
            split_addr(seed.strip().split("://", 1)[-1].split("/", 1)[0], "redis_url")
    if settings.redis_mode == "sentinel" and not settings.redis_sentinel_master:
        raise SettingsError("redis_sentinel_master: sentinel mode needs the primary's name")


def _parse_value(name: str, kind: str, raw: Any) -> object:
    """One setting's value from its flag or environment variable, as its field's type."""
    if kind == "int":
        try:
            return int(raw)
        except ValueError:
            raise SettingsError(f"{name}: expected an integer, got {raw!r}") from None
    if name == "policy_path":
        return _split_paths(raw)
    if kind == "tuple[str, ...]":
        return _split_list(raw)
    if kind == "bool":
        return raw if isinstance(raw, bool) else _parse_bool(raw, name)
    return raw


def _split_paths(raw: str | Sequence[str]) -> tuple[str, ...]:
    """Paths, comma-separated; one that exists as written is one path, commas and all
    (`runs/mix-3,1,1/policy`)."""
    if isinstance(raw, str) and raw.strip() and os.path.exists(raw.strip()):
        return (raw.strip(),)
    return _split_list(raw)


def _split_list(raw: str | Sequence[str]) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    return tuple(item.strip() for item in items if item.strip())
