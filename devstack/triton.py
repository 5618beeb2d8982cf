"""Triton from PyPI nvidia-pytriton, as a managed process (rules: devstack.procs)."""

from __future__ import annotations

import os
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from devstack.procs import (
    LOCALHOST,
    ManagedProcess,
    ProcessStartError,
    _site_packages_of,
    free_port,
    wait_http,
)


def prepare_triton_server(cache_dir: Path | None = None) -> Path:
    """Return a runnable Triton server tree made from PyPI ``nvidia-pytriton``.

    The package ships ``tritonserver`` with its backends and one python-backend stub per
    Python version: copy ``pytriton/tritonserver`` once and put the stub for *this*
    interpreter's version into ``backends/python/`` (what pytriton itself does). The copy is
    cached under ``cache_dir`` (default: a per-user directory in the system temp dir), keyed by
    the pytriton install and the Python version, and created atomically so concurrent test
    processes can share it.
    """
    source = _site_packages_of("pytriton") / "pytriton" / "tritonserver"
    if not (source / "bin" / "tritonserver").is_file():
        raise ProcessStartError(f"no tritonserver binary under {source}")
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise ProcessStartError(f"nvidia-pytriton ships no python-backend stub for {version}")

    base = cache_dir if cache_dir is not None else _default_cache_dir()
    base.mkdir(parents=True, exist_ok=True)
    stamp = int((source / "bin" / "tritonserver").stat().st_mtime)
    target = base / f"tritonserver-py{version}-{stamp}"
    if (target / "backends" / "python" / "triton_python_backend_stub").is_file():
        return target

    scratch = Path(tempfile.mkdtemp(prefix="tritonserver-", dir=base))
    try:
        tree = scratch / "tritonserver"
        shutil.copytree(
            source,
            tree,
            ignore=shutil.ignore_patterns("python_backend_stubs", "__pycache__"),
        )
        shutil.copy2(stub, tree / "backends" / "python" / "triton_python_backend_stub")
        try:
            tree.rename(target)
        except OSError:
            # Another process finished first; its copy is as good as ours.
            if not (target / "backends" / "python" / "triton_python_backend_stub").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def _default_cache_dir() -> Path:
    return Path(tempfile.gettempdir()) / f"qos-sidecar-{os.getuid()}"


class TritonProcess(ManagedProcess):
    """``tritonserver --model-repository MODEL_REPO`` from the ``nvidia-pytriton`` package, on
    free HTTP, gRPC and metrics ports. Ready when ``/v2/health/ready`` answers 200 (all models
    loaded).

    Runs on CPU; warnings about CUDA, NVML and DCGM in the log are expected.
    """

    name = "triton"
    ready_timeout_s = 60.0
    # Error lines ("E1123 ...") and model status rows; a failed model load is reported far
    # above the end of the log, before the option tables.
    error_line = re.compile(r"^E\d{4} |UNAVAILABLE")

    def __init__(
        self,
        model_repo: Path,
        workdir: Path,
        *,
        http_port: int | None = None,
        grpc_port: int | None = None,
        metrics_port: int | None = None,
        cache_dir: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        super().__init__(workdir)
        self.model_repo = Path(model_repo).resolve()
        self.http_port = http_port if http_port is not None else free_port()
        self.grpc_port = grpc_port if grpc_port is not None else free_port()
        self.metrics_port = metrics_port if metrics_port is not None else free_port()
        self.cache_dir = cache_dir
        self.extra_args = list(extra_args)
        self.server_dir: Path | None = None

    @property
    def http_url(self) -> str:
        """Base URL of the KServe v2 HTTP API, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{LOCALHOST}:{self.http_port}"

    @property
    def grpc_address(self) -> str:
        return f"{LOCALHOST}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        """The Prometheus endpoint, e.g. ``http://127.0.0.1:8002/metrics``."""
        return f"http://{LOCALHOST}:{self.metrics_port}/metrics"

    def command(self) -> list[str]:
        if self.server_dir is None:
            self.server_dir = prepare_triton_server(self.cache_dir)
        return [
            str(self.server_dir / "bin" / "tritonserver"),
            "--model-repository",
            str(self.model_repo),
            "--backend-directory",
            str(self.server_dir / "backends"),
            "--http-address",
            LOCALHOST,
            "--http-port",
            str(self.http_port),
            "--grpc-address",
            LOCALHOST,
            "--grpc-port",
            str(self.grpc_port),
            "--metrics-address",
            LOCALHOST,
            "--metrics-port",
            str(self.metrics_port),
            "--allow-gpu-metrics",
            "false",
            # Stop waits for in-flight requests at most this long, then Triton exits anyway.
            "--exit-timeout-secs",
            "5",
            *self.extra_args,
        ]

    def environment(self) -> dict[str, str]:
        site_packages = _site_packages_of("pytriton")
        env = dict(os.environ)
        # The python stub must load the libpython of this very interpreter (a libpython of
        # another patch release fails in threading), and Triton's own libraries.
        libdir = str(sysconfig.get_config_var("LIBDIR") or "")
        library_path = [str(site_packages / "nvidia_pytriton.libs"), libdir]
        if env.get("LD_LIBRARY_PATH"):
            library_path.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in library_path if p)
        # The stub runs Python in isolated mode (PYTHONPATH is ignored) and finds its prefix
        # by looking up `python3` on PATH. With this interpreter's bin/ first, a venv's
        # pyvenv.cfg is found and models import the venv's packages (numpy among them), as
        # pytriton itself arranges; otherwise they would get the base interpreter's.
        env["PATH"] = os.pathsep.join(
            p for p in (str(Path(sys.executable).parent), env.get("PATH", "")) if p
        )
        return env

    def wait_ready(self, deadline: float) -> None:
        wait_http(
            f"{self.http_url}/v2/health/ready",
            timeout=max(deadline - time.monotonic(), 0.0),
            check=self.check_alive,
            interval=0.1,
        )
