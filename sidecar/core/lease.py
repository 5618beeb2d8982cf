"""Lease tokens: what travels in `x-qos-lease` from admission to the completion signal.

The completion signal (Envoy's access log stream) may reach any replica, so the token itself
carries everything needed to release the lease: tenant, class, the store's lease id and, for a
lease counted for a model, the model and (pod topology) the pod whose count of it holds the
lease (see `sidecar.state.base`).

Rules:
- A token is `v1.<tenant>.<class>.<lease id>`, `v1.<tenant>.<class>.<lease id>.<model>` for a
  lease of a model counted for the fleet, or `v1.<tenant>.<class>.<lease id>.<model>.<pod>` for
  one counted for a pod. Names may hold any character (dots included), so tenant, class, model
  and pod are base64url-encoded without padding; the alphabet has no `.`, so the parts split
  unambiguously and the token is plain header-safe ASCII. The lease id is used as is: the store
  makes it URL-safe already.
- The model and the pod are optional last parts, so tokens written before models (4 parts) or
  pods (5 parts) were counted still parse, with no model or no pod. A pod without a model is
  never written (a pod scopes a model's count), and refused.
- A lease with a shadow lease beside it (core/shadow.py) is written with `v1s` for `v1`; a
  lease held only in its model's set (`LeaseRef.model_only`, a request spent from a leased
  slice) with `v1m`, or `v1sm` for both. A model-only token always names its model.
- Parsing is strict: anything this module would not have written is rejected, never guessed at.
  A name part must be the exact encoding of a non-empty name (no padding, no stray characters,
  no other spelling of the same bytes).
- What leaves the process is signed: `s1.<mac>.<token>`, the mac being the first 16 bytes of
  HMAC-SHA256(key, token), base64url without padding. Only a holder of the deployment's key
  can write a token the completion signal accepts, so a leaked, reflected or guessed token
  cannot be turned into a release of someone else's slot by changing its parts. The key is a
  value passed in (settings), never read here.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hmac
import re

from sidecar.core.types import LeaseRef

# Prefix -> (shadow, model_only): the flags a token's first part carries.
_FLAGS = {"v1": (False, False), "v1s": (True, False), "v1m": (False, True), "v1sm": (True, True)}
_PREFIXES = {flags: prefix for prefix, flags in _FLAGS.items()}
_LEASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_TOKEN_CHARS = 1024
_SIGNED_PREFIX = "s1"
_MAC_BYTES = 16  # 128 bits: forging one takes 2^128 guesses; the header stays short


# Names repeat (a policy's tenants, classes, models, pods): encoded once each. The caches are
# bounded, and a token only reaches `_decode` once its signature was verified.
@functools.lru_cache(maxsize=4096)
def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@functools.lru_cache(maxsize=4096)
def _decode(part: str) -> str | None:
    """The non-empty name `part` encodes, or None if `part` is not what `_encode` writes."""
    padded = part + "=" * (-len(part) % 4)
    try:
        text = base64.urlsafe_b64decode(padded.encode("ascii")).decode()
    except (binascii.Error, UnicodeError, ValueError):
        return None
    # The decoder skips characters outside the alphabet and ignores unused trailing bits;
    # encoding again and comparing refuses every spelling but the one this module writes.
    if not text or _encode(text) != part:
        return None
    return text


def format_lease(lease: LeaseRef) -> str:
    parts = [
        _PREFIXES[(lease.shadow, lease.model_only)],
        _encode(lease.tenant),
        _encode(lease.klass),
        lease.lease_id,
    ]
    if lease.model is not None:
        parts.append(_encode(lease.model))
        if lease.model_pod is not None:
            parts.append(_encode(lease.model_pod))
    return ".".join(parts)


def parse_lease(token: str) -> LeaseRef | None:
    """The lease a token names, or None if it is not a token this sidecar wrote."""
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    parts = token.split(".")
    flags = _FLAGS.get(parts[0])
    if len(parts) not in (4, 5, 6) or flags is None:
        return None
    shadow, model_only = flags
    if model_only and len(parts) == 4:  # held in a model's set: it names the model
        return None
    if not _LEASE_ID.match(parts[3]):
        return None
    tenant, klass = _decode(parts[1]), _decode(parts[2])
    if tenant is None or klass is None:
        return None
    names = [_decode(part) for part in parts[4:]]  # model, then pod
    if None in names:
        return None
    model = names[0] if names else None
    pod = names[1] if len(names) > 1 else None
    return LeaseRef(tenant, klass, parts[3], model, pod, shadow, model_only)


@functools.lru_cache(maxsize=8)
def _keyed(key: bytes) -> hmac.HMAC:
    return hmac.new(key, digestmod="sha256")


def _mac(token: str, key: bytes) -> str:
    # From the key's HMAC state made once: 1.1 us against 2.0 for hmac.digest, which sets
    # the key up again each time; twice a request.
    mac = _keyed(key).copy()
    mac.update(token.encode())
    return base64.urlsafe_b64encode(mac.digest()[:_MAC_BYTES]).decode().rstrip("=")


def sign_lease(token: str, key: bytes) -> str:
    """`token` as it travels through Envoy: signed with the deployment's `key`."""
    return f"{_SIGNED_PREFIX}.{_mac(token, key)}.{token}"


def verify_lease(signed: str, key: bytes) -> str | None:
    """The token inside `signed` if `key` signed it; None for anything else (unsigned,
    forged, signed with another key, too long)."""
    if len(signed) > _MAX_TOKEN_CHARS + 32:
        return None
    prefix, _, rest = signed.partition(".")
    mac, _, token = rest.partition(".")
    if prefix != _SIGNED_PREFIX or not token:
        return None
    # compare_digest: the time taken says nothing about how much of a guess was right.
    if not hmac.compare_digest(mac.encode(), _mac(token, key).encode()):
        return None
    return token


def lease_id_for(request_id: str | None) -> str | None:
    """The lease id of a request with this x-request-id: the id itself when it is 1-64 of
    `[A-Za-z0-9_-]`, else None (the service then makes a random one). A client cannot reach key
    syntax or the token's separators through it (the token carries the id as is, the store
    puts it in a key part). Envoy's x-request-id is a UUID (36)."""
    if request_id is not None and _LEASE_ID.fullmatch(request_id):
        return request_id
    return None
