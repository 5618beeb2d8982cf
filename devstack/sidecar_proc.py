"""The sidecar as its own process, for the end-to-end tests and the demo."""

from __future__ import annotations

import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, Literal

from devstack.procs import LOCALHOST, ManagedProcess, free_port, python_environment, wait_http

Transport = Literal["unix", "tcp"]


def short_socket_dir() -> Path:
    """A new private directory for the sidecar's sockets, with a short path: a socket path
    must fit in 107 bytes, and a test's workdir (pytest's tmp_path) may not leave room."""
    base = "/tmp" if os.path.isdir("/tmp") else None
    return Path(tempfile.mkdtemp(prefix="qos-", dir=base))


class SidecarProcess(ManagedProcess):
    """`qos-sidecar serve`, configured through QOS_* like in production: its Envoy-facing
    listeners on Unix sockets (the default, as shipped) or on free loopback TCP ports
    (``transport="tcp"``), optionally requiring ``auth_token``. Addresses stay the same
    across ``restart()``. ``pod_id`` makes it one pod's sidecar (``QOS_TOPOLOGY=pod``: it
    counts and caps its model's in-flight requests for its pod alone); without it, a gateway
    replica (the default topology: the fleet's counts)."""

    name: ClassVar[str] = "sidecar"
    ready_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self,
        workdir: Path,
        policy_path: Path,
        *,
        redis_url: str = "",
        extra_env: dict[str, str] | None = None,
        transport: Transport = "unix",
        auth_token: str = "",
        pod_id: str = "",
    ) -> None:
        super().__init__(workdir)
        self.pod_id = pod_id
        self.policy_path = policy_path
        self.redis_url = redis_url
        self.extra_env = dict(extra_env or {})
        self.transport = transport
        self.auth_token = auth_token
        self.socket_dir: Path | None = None
        self.http_port: int | None = None
        self.grpc_port: int | None = None
        if transport == "unix":
            self.socket_dir = short_socket_dir()
        else:
            self.http_port = free_port()
            self.grpc_port = free_port()
        self.admin_port = free_port()
        # One lease key for this sidecar's whole life, restarts included: a lease granted
        # before a restart must still verify when its completion arrives after it.
        self.lease_key = secrets.token_hex(16)

    @property
    def admin_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}"

    @property
    def http_socket(self) -> str | None:
        return None if self.socket_dir is None else str(self.socket_dir / "authz.sock")

    @property
    def grpc_socket(self) -> str | None:
        return None if self.socket_dir is None else str(self.socket_dir / "grpc.sock")

    @property
    def authz_http_addr(self) -> str:
        """QOS_AUTHZ_HTTP_ADDR: ``unix:/path`` or ``127.0.0.1:port``."""
        return f"unix:{self.http_socket}" if self.socket_dir else f"{LOCALHOST}:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        """QOS_GRPC_ADDR, which is also what a grpc channel dials."""
        return f"unix:{self.grpc_socket}" if self.socket_dir else f"{LOCALHOST}:{self.grpc_port}"

    def envoy_endpoints(self) -> dict[str, Any]:
        """``render_bootstrap`` arguments that point Envoy's sidecar clusters here, with the
        token when one is required."""
        return {
            "sidecar_http_socket": self.http_socket,
            "sidecar_grpc_socket": self.grpc_socket,
            "sidecar_http_port": self.http_port,
            "sidecar_grpc_port": self.grpc_port,
            "sidecar_auth_token": self.auth_token or None,
        }

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sidecar.cli", "serve"]

    def environment(self) -> dict[str, str]:
        env = python_environment(
            {
                "QOS_AUTHZ_HTTP_ADDR": self.authz_http_addr,
                "QOS_GRPC_ADDR": self.grpc_target,
                "QOS_AUTH_TOKEN": self.auth_token,
                "QOS_ADMIN_ADDR": f"{LOCALHOST}:{self.admin_port}",
                "QOS_POLICY_PATH": str(self.policy_path),
                "QOS_REDIS_URL": self.redis_url,
                "QOS_POLICY_POLL_MS": "200",
                "QOS_LEASE_KEY": self.lease_key,
                "PYTHONUNBUFFERED": "1",
                "QOS_TOPOLOGY": "pod" if self.pod_id else "gateway",
                "QOS_POD_ID": self.pod_id,
            }
        )
        env.update(self.extra_env)
        return env

    def wait_ready(self, deadline: float) -> None:
        """Every worker ready (`--workers N`: worker i's admin port is ours + i). A worker
        answers /readyz only once its Envoy-facing listeners are bound, so traffic sent
        after this reaches all of them, not only those that started first."""
        for index in range(int(self.extra_env.get("QOS_WORKERS", "1"))):
            wait_http(
                f"http://{LOCALHOST}:{self.admin_port + index}/readyz",
                timeout=max(0.1, deadline - time.monotonic()),
                check=self.check_alive,
            )

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            super().__exit__(exc_type, exc, tb)
        finally:
            if self.socket_dir is not None:
                shutil.rmtree(self.socket_dir, ignore_errors=True)
