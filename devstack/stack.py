"""The whole local stack in one object: Valkey, Triton, the sidecar and Envoy in each mode
(ext_authz HTTP, ext_authz gRPC, ext_proc).

Used by the demo and the end-to-end tests, so both exercise exactly the shipped Envoy
bootstraps (moved to free ports) and the example Triton model repository.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from types import TracebackType

from devstack.envoy import EnvoyProcess, render_bootstrap
from devstack.procs import ValkeyProcess, free_port
from devstack.sidecar_proc import SidecarProcess, Transport
from devstack.triton import TritonProcess

ROOT = Path(__file__).resolve().parents[1]
MODEL_REPO = ROOT / "examples" / "triton"
BOOTSTRAPS = {
    "http": ROOT / "envoy" / "bootstrap-ext-authz-http.yaml",
    "grpc": ROOT / "envoy" / "bootstrap-ext-authz-grpc.yaml",
    "extproc": ROOT / "envoy" / "bootstrap-ext-proc.yaml",
}


class LocalStack:
    """Start with `with LocalStack(...) as stack:`; everything is stopped on exit.

    Envoy reaches the sidecar over Unix sockets, as the shipped bootstraps do;
    ``sidecar_transport="tcp"`` puts the sidecar on loopback TCP ports instead, and
    ``auth_token`` makes the sidecar require it and every Envoy send it."""

    def __init__(
        self,
        workdir: Path,
        policy_path: Path,
        *,
        modes: tuple[str, ...] = ("http", "grpc"),
        use_redis: bool = True,
        redis_url: str | None = None,
        model_repo: Path = MODEL_REPO,
        sidecar_env: dict[str, str] | None = None,
        sidecar_transport: Transport = "unix",
        auth_token: str = "",
    ) -> None:
        self.workdir = workdir
        self.policy_path = policy_path
        self.modes = modes
        self.use_redis = use_redis and redis_url is None
        self.redis_url = redis_url  # an external (or deliberately dead) Redis instead of Valkey
        self.sidecar_env = dict(sidecar_env or {})
        self.model_repo = model_repo
        self.sidecar_transport: Transport = sidecar_transport
        self.auth_token = auth_token
        self.valkey: ValkeyProcess | None = None
        self.triton: TritonProcess | None = None
        self.sidecar: SidecarProcess | None = None
        self.envoys: dict[str, EnvoyProcess] = {}
        self.ports: dict[str, int] = {}
        self._exit = contextlib.ExitStack()

    @property
    def admin_url(self) -> str:
        """The sidecar's admin listener (/metrics, /readyz, /v1/explain)."""
        assert self.sidecar is not None, "the stack is not started"
        return self.sidecar.admin_url

    def url(self, mode: str) -> str:
        """The Envoy listener a client sends inference requests to, for `mode`."""
        return f"http://127.0.0.1:{self.ports[mode]}"

    def __enter__(self) -> LocalStack:
        try:
            if self.use_redis:
                self.valkey = self._exit.enter_context(ValkeyProcess(self.workdir))
            self.triton = self._exit.enter_context(TritonProcess(self.model_repo, self.workdir))
            self.sidecar = self._exit.enter_context(
                SidecarProcess(
                    self.workdir,
                    self.policy_path,
                    redis_url=self.redis_url or (self.valkey.url if self.valkey else ""),
                    extra_env={
                        "QOS_TRITON_URLS": self.triton.http_url,
                        "QOS_TRITON_METRICS_URLS": self.triton.metrics_url,
                        **self.sidecar_env,
                    },
                    transport=self.sidecar_transport,
                    auth_token=self.auth_token,
                )
            )
            for mode in self.modes:
                port = free_port()
                config = render_bootstrap(
                    BOOTSTRAPS[mode],
                    listen_port=port,
                    triton_http_port=self.triton.http_port,
                    admin_port=0,
                    **self.sidecar.envoy_endpoints(),
                )
                self.envoys[mode] = self._exit.enter_context(EnvoyProcess(config, self.workdir))
                self.ports[mode] = port
        except BaseException:
            self._exit.close()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._exit.close()
