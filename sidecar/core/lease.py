"""Lease tokens: what travels in `x-qos-lease` from admission to the completion signal.

The completion signal (Envoy's access log stream) may reach any replica, so the token itself
carries everything needed to release the lease: tenant, class and the store's lease id.
Tenant and class names may hold any character, so they are base64url-encoded; the token is
plain header-safe ASCII. Parsing is strict: anything else is rejected, never guessed at.
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


def _decode(part: str) -> str:
    padded = part + "=" * (-len(part) % 4)
    return base64.urlsafe_b64decode(padded.encode("ascii")).decode()


def format_lease(lease: LeaseRef) -> str:
    return ".".join((_PREFIX, _encode(lease.tenant), _encode(lease.klass), lease.lease_id))


def parse_lease(token: str) -> LeaseRef | None:
    """The lease a token names, or None if it is not a token this sidecar wrote."""
    if len(token) > _MAX_TOKEN_CHARS:
        return None
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != _PREFIX or not _LEASE_ID.match(parts[3]):
        return None
    try:
        tenant, klass = _decode(parts[1]), _decode(parts[2])
    except (binascii.Error, UnicodeError, ValueError):
        return None
    if not tenant or not klass:
        return None
    return LeaseRef(tenant=tenant, klass=klass, lease_id=parts[3])
