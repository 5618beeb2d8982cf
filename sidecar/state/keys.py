"""Every Redis key the sidecar uses, built by one function.

Rules:
- A key is `qos:{<tenant>}:<kind>` followed by zero or more `:<part>`, where `<tenant>` and each
  `<part>` are *encoded* (see below) and `<kind>` is a `KeyKind` value.
- The `{...}` is a Redis Cluster hash tag: only its content is hashed, so every key of a tenant
  lands on the same shard and one Lua script may touch them all. It is per tenant (not global)
  so that tenants spread across shards.
- Tenant, class and bucket names come from policy files and may hold any character, `{`, `}`,
  `:`, spaces and non-ASCII included. Each is percent-encoded: every UTF-8 byte outside
  `[A-Za-z0-9_-]` becomes `%XX` (upper-case hex). The encoded text holds no `{`, `}` or `:`, so a
  name can neither open a second hash tag nor split into another key's parts, and the encoding
  is injective, so two different names never share a key. Plain names (`acme`, `gold-tier`)
  stay readable in `redis-cli`.
- An empty tenant is refused: `{}` is an empty hash tag, which Redis Cluster ignores (it hashes
  the whole key), so that tenant's keys would scatter across shards.
"""

from __future__ import annotations

import enum
import re

PREFIX = "qos"

_SAFE = re.compile(r"[A-Za-z0-9_-]*")


class KeyKind(enum.Enum):
    """What a key holds. Values are fixed identifiers, never user text."""

    BUCKET = "bucket"  # string: a GCRA bucket's TAT; part: the bucket name
    LEASES = "leases"  # sorted set: the tenant's leases, score = expiry; no part
    CLASS_LEASES = "class_leases"  # sorted set: the tenant's leases in one class; part: class


def encode_name(name: str) -> str:
    """Percent-encode every UTF-8 byte of `name` outside `[A-Za-z0-9_-]`."""
    if _SAFE.fullmatch(name):
        return name  # the common case: nothing to escape, no allocation per byte
    return "".join(
        chr(byte) if _SAFE.fullmatch(chr(byte)) else f"%{byte:02X}"
        for byte in name.encode("utf-8", "surrogatepass")
    )


def build_key(tenant: str, kind: KeyKind, *parts: str) -> str:
    """The key of `kind` for `tenant`, e.g. `build_key("acme", KeyKind.BUCKET, "tokens")` is
    `qos:{acme}:bucket:tokens`. Raises ValueError for an empty tenant (see module rules)."""
    if not tenant:
        raise ValueError("tenant must not be empty: '{}' is no hash tag in Redis Cluster")
    tail = "".join(":" + encode_name(part) for part in parts)
    return f"{PREFIX}:{{{encode_name(tenant)}}}:{kind.value}{tail}"
