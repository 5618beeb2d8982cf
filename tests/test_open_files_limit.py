"""The sidecar raises its soft limit on open files at start (sidecar/app.py), so that held
ext_authz HTTP requests, one Envoy connection each, are not refused at a host's usual 1024."""

from __future__ import annotations

import json
import subprocess
import sys

_SCRIPT = """
import json, resource
from sidecar.app import OPEN_FILES_CEILING, raise_open_files_limit
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))
returned = raise_open_files_limit()
after, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
infinite = hard == resource.RLIM_INFINITY
print(json.dumps([returned, after, hard, infinite, OPEN_FILES_CEILING]))
"""


def test_the_soft_limit_is_raised_to_the_hard_one() -> None:
    # In a child process: the test run's own limit stays as it was.
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], capture_output=True, text=True, check=True
    )
    returned, after, hard, infinite, ceiling = json.loads(done.stdout)
    expected = ceiling if infinite else min(hard, ceiling)
    assert after == returned == max(expected, min(256, hard))
