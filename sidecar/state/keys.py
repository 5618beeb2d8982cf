"""Every Redis key the sidecar uses, built here: a tenant's keys by `build_key`, a model's
lease set by `build_model_key`.

Rules:
- A tenant's key is `qos:{<tenant>}:<kind>` followed by zero or more `:<part>`, where `<tenant>`
  and each `<part>` are *encoded* (see below) and `<kind>` is a `KeyKind` value.
- A model's lease set (every tenant's leases of the model) is `qos:{=<model>}:model_leases`
  in the gateway topology (one set per model for the whole fleet), and
  `qos:{=<model>@<pod>}:model_leases` in the pod topology (one set per model and pod: each pod
  counts what its own Triton runs), with `<model>` and `<pod>` encoded. An encoded name never
  holds a `@` (it becomes `%40`), so the `@` splits model from pod unambiguously, and a pod's
  set is never the fleet's set of another model. Each set has its own hash tag, so it lives
  in another slot than the tenants' keys (`sidecar.state.base` says what that costs). The `=`
  keeps its tag apart from every tenant's: an encoded tenant never holds a `=`, so a model and
  a tenant of the same name (or any names) never share a tag, let alone a key. An empty pod is
  refused like an empty model (None, not "", is the fleet's set). Its tombstones (ids removed
  from it) are the same key with `model_released` for `model_leases` (`model_tombstones_key`).
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
  the whole key), so that tenant's keys would scatter across shards. An empty model is refused
  too: it names no model.
"""

from __future__ import annotations

import enum
import functools
import re

PREFIX = "qos"

_SAFE = re.compile(r"[A-Za-z0-9_-]*")


class KeyKind(enum.Enum):
    """What a key holds. Values are fixed identifiers, never user text."""

    BUCKET = "bucket"  # string: a GCRA bucket's TAT; part: the bucket name
    LEASES = "leases"  # sorted set: the tenant's leases, score = expiry; no part
    CLASS_LEASES = "class_leases"  # sorted set: the tenant's leases in one class; part: class
    # sorted set: the tenant's released lease ids, score = when each tombstone ends; no part
    RELEASED = "released"


# Not a `KeyKind`: those are a tenant's keys, these are the keys with a model's hash tag.
MODEL_LEASES = "model_leases"  # sorted set: every tenant's leases of one model, score = expiry
# sorted set: the ids removed from one model set, score = when each tombstone ends
MODEL_RELEASED = "model_released"
# The replicas' heartbeats: sorted set, member = replica id, score = expiry. Its tag is a
# model tag (no tenant's), and its kind is no model's set, so it is no other key.
HEARTBEATS_KEY = f"{PREFIX}:{{=replicas}}:heartbeats"
# A gateway tier's shared holds and fairness counters (`sidecar.core.fleet`): two hashes with
# one tag, so that one script call reaches both on a cluster.
FLEET_WAITING_KEY = f"{PREFIX}:{{=fleet}}:waiting"
FLEET_FAIR_KEY = f"{PREFIX}:{{=fleet}}:fair"


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
    return _policy_key(tenant, kind, parts)


@functools.lru_cache(maxsize=16384)
def _policy_key(tenant: str, kind: KeyKind, parts: tuple[str, ...]) -> str:
    """A key whose parts are policy names (tenant, class, bucket): a few per tenant, each
    built once instead of encoded on every call (several a decision)."""
    return _build_key(tenant, kind, parts)


def _build_key(tenant: str, kind: KeyKind, parts: tuple[str, ...]) -> str:
    if not tenant:
        raise ValueError("tenant must not be empty: '{}' is no hash tag in Redis Cluster")
    tail = "".join(":" + encode_name(part) for part in parts)
    return f"{_tenant_tag(tenant)}:{kind.value}{tail}"


@functools.lru_cache(maxsize=4096)  # a policy's tenants: built once each
def _tenant_tag(tenant: str) -> str:
    return f"{PREFIX}:{{{encode_name(tenant)}}}"


def model_tombstones_key(model_key: str) -> str:
    """The tombstones of the model set `model_key` (`build_model_key`): the same tag."""
    return model_key.removesuffix(MODEL_LEASES) + MODEL_RELEASED


def build_model_key(model: str, pod: str | None = None) -> str:
    """The lease set of `model`, e.g. `build_model_key("llama")` is `qos:{=llama}:model_leases`
    and `build_model_key("llama", "pod-1")` is `qos:{=llama@pod-1}:model_leases`. Raises
    ValueError for an empty model or an empty pod (None is no pod; see module rules)."""
    if not model:
        raise ValueError("model must not be empty")
    if pod is None:
        return f"{PREFIX}:{{={encode_name(model)}}}:{MODEL_LEASES}"
    if not pod:
        raise ValueError("pod must not be empty (None for the fleet-wide set)")
    return f"{PREFIX}:{{={encode_name(model)}@{encode_name(pod)}}}:{MODEL_LEASES}"
