"""Rule 1 of tests/conftest.py: a missing real binary (Envoy, Triton, Valkey) skips a test
only on a developer's machine; in CI (`CI=true`) and under the README's test command
(`python3 dev.py test` sets `QOS_REQUIRE_STACK=1`) it FAILS it. Fixtures call
`require_binaries` instead of `pytest.skip`."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import pytest

from devstack.envoy import find_envoy
from devstack.procs import ProcessStartError, ValkeyProcess

STRICT_ENV = "QOS_REQUIRE_STACK"


def stack_required() -> bool:
    """True when a missing binary must fail the run (CI, or the README's test command)."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"} or os.environ.get(
        STRICT_ENV, ""
    ) not in {"", "0"}


def _triton_present() -> bool:
    try:
        import pytriton  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return False
    from devstack.procs import _site_packages_of

    return (_site_packages_of("pytriton") / "pytriton" / "tritonserver" / "bin").is_dir()


def _valkey_present() -> bool:
    try:
        ValkeyProcess._find_binary()
    except ProcessStartError:
        return False
    return True


FINDERS: dict[str, Callable[[], bool]] = {
    "envoy": lambda: find_envoy() is not None,
    "triton": _triton_present,
    "valkey": _valkey_present,
    "openssl": lambda: shutil.which("openssl") is not None,
}


def require_binaries(*names: str) -> None:
    """Skip (developer machine) or fail (CI, `dev.py test`) when one of `names` is missing."""
    missing = [name for name in names if not FINDERS[name]()]
    if not missing:
        return
    why = f"missing {', '.join(missing)} (pip install -e '.[stack]')"
    if stack_required():
        pytest.fail(f"{why}; {STRICT_ENV}/CI forbid skipping", pytrace=False)
    pytest.skip(why)
