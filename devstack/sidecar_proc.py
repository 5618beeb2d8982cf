"""The sidecar as its own process, for the end-to-end tests and the demo."""

from __future__ import annotations

import os
import secrets
import sys
import time
from pathlib import Path
from typing import ClassVar

from devstack.procs import LOCALHOST, ManagedProcess, free_port, wait_http


class SidecarProcess(ManagedProcess):
    """`qos-sidecar serve` on free ports, configured through QOS_* like in production."""

    name: ClassVar[str] = "sidecar"
    ready_timeout_s: ClassVar[float] = 30.0

    def __init__(
        self,
        workdir: Path,
        policy_path: Path,
        *,
        redis_url: str = "",
        extra_env: dict[str, str] | None = None,
    ) -> None:
        super().__init__(workdir)
        self.policy_path = policy_path
        self.redis_url = redis_url
        self.extra_env = dict(extra_env or {})
        self.http_port = free_port()
        self.grpc_port = free_port()
        self.admin_port = free_port()
        # One lease key for this sidecar's whole life, restarts included: a lease granted
        # before a restart must still verify when its completion arrives after it.
        self.lease_key = secrets.token_hex(16)

    @property
    def admin_url(self) -> str:
        return f"http://{LOCALHOST}:{self.admin_port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sidecar.cli", "serve"]

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            {
                "QOS_AUTHZ_HTTP_ADDR": f"{LOCALHOST}:{self.http_port}",
                "QOS_GRPC_ADDR": f"{LOCALHOST}:{self.grpc_port}",
                "QOS_ADMIN_ADDR": f"{LOCALHOST}:{self.admin_port}",
                "QOS_POLICY_PATH": str(self.policy_path),
                "QOS_REDIS_URL": self.redis_url,
                "QOS_POLICY_POLL_MS": "200",
                "QOS_LEASE_KEY": self.lease_key,
                "PYTHONUNBUFFERED": "1",
            }
        )
        env.update(self.extra_env)
        return env

    def wait_ready(self, deadline: float) -> None:
        wait_http(
            f"{self.admin_url}/readyz",
            timeout=max(0.1, deadline - time.monotonic()),
            check=self.check_alive,
        )
