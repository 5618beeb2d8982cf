from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.lease import format_lease, parse_lease
from sidecar.core.types import LeaseRef

names = st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s)


@given(tenant=names, klass=names, lease_id=st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True))
def test_round_trip(tenant: str, klass: str, lease_id: str) -> None:
    token = format_lease(LeaseRef(tenant, klass, lease_id))
    assert token.isascii() and token.isprintable() and " " not in token
    assert parse_lease(token) == LeaseRef(tenant, klass, lease_id)


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v2.YQ.Yg.abc",
        "v1.YQ.Yg.a b",
        "v1..Yg.abc",
        "v1.!!.Yg.abc",
        "v1.YQ.Yg.abc.d",
        "x" * 2000,
    ],
)
def test_rejects_foreign_tokens(token: str) -> None:
    assert parse_lease(token) is None
