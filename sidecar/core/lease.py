"""Lease tokens: what travels in `x-qos-lease` from admission to the completion signal.

The completion signal (Envoy's access log stream) may reach any replica, so the token itself
carries everything needed to release the lease: tenant, class, the store's lease id and, for a
lease counted for a model, the model (see `sidecar.state.base`).

Rules:
- A token is `v1.<tenant>.<class>.<lease id>`, or `v1.<tenant>.<class>.<lease id>.<model>` for
  a lease of a model. Names may hold any character (dots included), so tenant, class and model
  are base64url-encoded without padding; the alphabet has no `.`, so the parts split
  unambiguously and the token is plain header-safe ASCII. The lease id is used as is: the store
  makes it URL-safe already.
- The model is an optional last part, so tokens written before models were counted (4 parts)
  still parse, with no model.
- Parsing is strict: anything this module would not have written is rejected, never guessed at.
  A name part must be the exact encoding of a non-empty name (no padding, no stray characters,
  no other spelling of the same bytes).
"""

from __future__ import annotations

import base64
import binascii
import re

from sidecar.core.types import LeaseRef

_PREFIX = "v1"
_LEASE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_MAX_TOKEN_CHARS = 1024


def _encode(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


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
    parts = [_PREFIX, _encode(lease.tenant), _encode(lease.klass), lease.lease_id]
    if lease.model is not None:
        parts.append(_encode(lease.model))
    return ".".join(parts)


def parse_lease(token: str) -> LeaseRef | None:
    """The lease a token names, or None if it is not a token this sidecar wrote."""
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    parts = token.split(".")
    if len(parts) not in (4, 5) or parts[0] != _PREFIX or not _LEASE_ID.match(parts[3]):
        return None
    tenant, klass = _decode(parts[1]), _decode(parts[2])
    if tenant is None or klass is None:
        return None
    model = None
    if len(parts) == 5:
        model = _decode(parts[4])
        if model is None:
            return None
    return LeaseRef(tenant=tenant, klass=klass, lease_id=parts[3], model=model)
