"""The Lua scripts of `sidecar/state/lua/`, loaded once: each with `_prelude.lua` prepended, so
that every script is still one self-contained EVALSHA (see redis_store.py's module rules)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources


@dataclass(frozen=True, slots=True)
class LuaScript:
    name: str
    source: str
    sha: str  # SHA-1 of `source`, what Redis names the script by


def load_script(name: str) -> LuaScript:
    """Read `lua/<name>.lua` from the package, with `lua/_prelude.lua` prepended."""
    lua = resources.files("sidecar.state").joinpath("lua")
    source = lua.joinpath("_prelude.lua").read_text("utf-8") + lua.joinpath(
        f"{name}.lua"
    ).read_text("utf-8")
    return LuaScript(name, source, hashlib.sha1(source.encode()).hexdigest())


ACQUIRE = load_script("acquire")
RELEASE = load_script("release")
CHARGE = load_script("charge")
IN_FLIGHT = load_script("in_flight")
MODEL_LEASE = load_script("model_lease")
RENEW = load_script("renew")
HEARTBEAT = load_script("heartbeat")
FLEET = load_script("fleet")
