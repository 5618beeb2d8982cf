"""``qos-sidecar serve`` under cProfile, for ``python -m benchmarks.overhead --profile``.

``python -m benchmarks.profiled_sidecar OUT.prof``: the sidecar's modules are imported before
the profiler starts, so the profile shows serving, not start-up imports; the stats are written
when the sidecar returns (SIGTERM ends it normally).
"""

from __future__ import annotations

import cProfile
import sys

from sidecar import app, cli  # noqa: F401 - imported before profiling, on purpose


def main() -> int:
    profiler = cProfile.Profile()
    profiler.enable()
    try:
        return cli.main(["serve"])
    finally:
        profiler.disable()
        profiler.dump_stats(sys.argv[1])


if __name__ == "__main__":
    sys.exit(main())
