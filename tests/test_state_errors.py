"""`map_exceptions`: the one place the Redis client's failures become StateUnavailable."""

from __future__ import annotations

import pytest

from sidecar.errors import StateUnavailable
from sidecar.state.redis_store import map_exceptions


def raise_attribute_error_in(module: str) -> None:
    """Raise AttributeError from a frame whose module is `module`."""
    code = compile("def fail():\n    None.writelines([])\n", f"<{module}>", "exec")
    namespace: dict[str, object] = {"__name__": module}
    exec(code, namespace)
    namespace["fail"]()  # type: ignore[operator]


def test_a_connection_dropped_under_redis_py_is_state_unavailable() -> None:
    # What redis-py's cluster client raised in about 1 of 8 failovers.
    with pytest.raises(StateUnavailable, match="connection lost"), map_exceptions("acquire", 0.05):
        raise_attribute_error_in("redis.asyncio.connection")


def test_our_own_attribute_errors_are_bugs_and_propagate() -> None:
    with pytest.raises(AttributeError), map_exceptions("acquire", 0.05):
        raise_attribute_error_in("sidecar.state.redis_store")
