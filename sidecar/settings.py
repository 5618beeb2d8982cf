"""Process settings: read once at start from flags and `QOS_*` environment variables.

Flags win over the environment, the environment over defaults. Everything that can change
while the sidecar runs (quotas, classes, tenants) is policy, not a setting.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace

from sidecar.errors import SettingsError


@dataclass(frozen=True, slots=True)
class Settings:
    authz_http_addr: str = "127.0.0.1:9191"  # ext_authz HTTP (Envoy http_service)
    grpc_addr: str = "127.0.0.1:9192"  # ext_authz gRPC and the access-log completion stream
    admin_addr: str = "127.0.0.1:9090"  # metrics, health, policy, explain: localhost by default
    redis_url: str = ""  # empty: the embedded in-memory store (one replica only)
    redis_timeout_ms: int = 50  # a store call slower than this counts as unavailable
    policy_path: tuple[str, ...] = ("policies",)
    policy_poll_ms: int = 1000  # how often policy files are checked for changes
    triton_urls: tuple[str, ...] = ()  # Triton HTTP base URLs (readiness)
    # Triton metrics URLs, paired with triton_urls by position (default: port 8002 of each).
    triton_metrics_urls: tuple[str, ...] = ()
    triton_scrape_ms: int = 250  # how often Triton's queue depth and counters are read
    triton_stale_ms: int = 1000  # load signals older than this are stale (see on_stale)
    # QoServe's hybrid key for held requests: deadline + alpha x estimated work (cost units).
    # 0 is earliest-deadline-first; QoServe's artifact uses 0.008 s per token.
    queue_alpha_ms_per_unit: int = 0
    log_level: str = "info"
    # Signs lease tokens (HMAC-SHA256). Empty: a random key per process, which only works for
    # one replica that never restarts while requests run: a lease granted by one process and
    # completed through another (another replica, or the same one after a restart) is
    # refused as bad_lease and waits for its TTL. A fleet must give every replica one key.
    lease_key: str = ""

    @property
    def authz_http_host_port(self) -> tuple[str, int]:
        return split_addr(self.authz_http_addr, "authz_http_addr")

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
    "authz_http_addr": "listen address of the ext_authz HTTP service",
    "grpc_addr": "listen address of the gRPC services (ext_authz, access-log completion)",
    "admin_addr": "listen address of metrics, health, policy and explain",
    "redis_url": "Redis URL for shared quota state; empty uses an in-memory store",
    "redis_timeout_ms": "Redis call timeout in ms; slower calls follow the class fail mode",
    "policy_path": "policy file or directory (comma-separated for several)",
    "policy_poll_ms": "policy change check interval in ms (SIGHUP reloads at once)",
    "triton_urls": "comma-separated Triton HTTP base URLs (readiness, load signals)",
    "triton_metrics_urls": "Triton metrics URLs, paired with triton_urls by position",
    "triton_scrape_ms": "Triton metrics scrape interval in ms",
    "triton_stale_ms": "age in ms after which Triton load signals count as stale",
    "queue_alpha_ms_per_unit": "held-request order: deadline + alpha x work; 0 is EDF",
    "log_level": "debug, info, warning or error",
    "lease_key": "secret that signs lease tokens; the same on every replica (default: random)",
}


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
        if raw is None:
            continue
        if f.type == "int":
            try:
                values[f.name] = int(raw)
            except ValueError:
                raise SettingsError(f"{f.name}: expected an integer, got {raw!r}") from None
        elif f.type == "tuple[str, ...]":
            values[f.name] = _split_list(raw)
        else:
            values[f.name] = raw
    settings = Settings(**values)  # type: ignore[arg-type]
    settings.authz_http_host_port  # noqa: B018 - validate addresses at start, not at first use
    settings.admin_host_port  # noqa: B018
    grpc_host, grpc_port = split_addr(settings.grpc_addr, "grpc_addr")
    # grpc cannot bind ":PORT"; spell out what the HTTP listeners take it to mean.
    settings = replace(settings, grpc_addr=f"{grpc_host}:{grpc_port}")
    if settings.redis_timeout_ms <= 0:
        raise SettingsError("redis_timeout_ms: must be positive")
    if settings.triton_metrics_urls and len(settings.triton_metrics_urls) != len(
        settings.triton_urls
    ):
        raise SettingsError("triton_metrics_urls: one per triton_urls entry, in the same order")
    if settings.triton_scrape_ms <= 0:
        raise SettingsError("triton_scrape_ms: must be positive")
    if settings.queue_alpha_ms_per_unit < 0:
        raise SettingsError("queue_alpha_ms_per_unit: must not be negative")
    if settings.triton_stale_ms < settings.triton_scrape_ms:
        raise SettingsError("triton_stale_ms: must be at least triton_scrape_ms")
    if not settings.policy_path:
        raise SettingsError("policy_path: at least one path is needed")
    return settings


def _split_list(raw: str | Sequence[str]) -> tuple[str, ...]:
    items = raw.split(",") if isinstance(raw, str) else raw
    return tuple(item.strip() for item in items if item.strip())
