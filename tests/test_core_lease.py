from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.core.lease import format_lease, parse_lease, sign_lease, verify_lease
from sidecar.core.types import LeaseRef

names = st.text(min_size=1, max_size=64).filter(lambda s: "\x00" not in s)
lease_ids = st.from_regex(r"[A-Za-z0-9_-]{1,32}", fullmatch=True)


@given(tenant=names, klass=names, lease_id=lease_ids, model=st.none() | names)
def test_round_trip(tenant: str, klass: str, lease_id: str, model: str | None) -> None:
    lease = LeaseRef(tenant, klass, lease_id, model)
    token = format_lease(lease)
    assert token.isascii() and token.isprintable() and " " not in token
    assert token.count(".") == (3 if model is None else 4)
    assert parse_lease(token) == lease


@pytest.mark.parametrize(
    "lease",
    [
        LeaseRef("acme", "gold", "abc", "llama-3.1-8b.instruct"),
        LeaseRef("a.b", "c.d", "abc", "..."),
        LeaseRef("テナント", "🚀", "abc", "モデル/v2:{x}"),
        LeaseRef("acme", "gold", "abc", "="),
    ],
)
def test_round_trip_of_awkward_names(lease: LeaseRef) -> None:
    assert parse_lease(format_lease(lease)) == lease


def test_a_lease_without_a_model_keeps_the_four_part_token() -> None:
    # Tokens written before models were counted must still release their lease.
    token = format_lease(LeaseRef("a", "b", "abc"))
    assert token == "v1.YQ.Yg.abc"
    assert parse_lease(token) == LeaseRef("a", "b", "abc", None)
    assert format_lease(LeaseRef("a", "b", "abc", "m")) == "v1.YQ.Yg.abc.bQ"
    assert parse_lease("v1.YQ.Yg.abc.bQ") == LeaseRef("a", "b", "abc", "m")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "v1",
        "v2.YQ.Yg.abc",
        "v1.YQ.Yg.a b",
        "v1..Yg.abc",
        "v1.!!.Yg.abc",
        "v1.YQ!.Yg.abc",  # a stray character the decoder would skip
        "v1.YQ==.Yg.abc",  # padding is never written
        "v1.YR.Yg.abc",  # "a" spelled with unused bits set
        "v1.YQ.Yg.abc.d",
        "v1.YQ.Yg.abc.",  # an empty model part
        "v1.YQ.Yg.abc.!!",  # a model part that decodes to nothing
        "v1.YQ.Yg.abc.bQ==",
        "v1.YQ.Yg.abc.bR",
        "v1.YQ.Yg.abc.bQ.bQ.bQ",  # seven parts (six: a model and its pod)
        "v1.YQ.Yg..bQ",  # no lease id
        "v1.YQ.Yg.abc.bQ" + "A" * 1020,  # too long
        "v1.YQ.Yg.abc.gA",  # not UTF-8
        "x" * 2000,
    ],
)
def test_rejects_foreign_tokens(token: str) -> None:
    assert parse_lease(token) is None


KEY = b"k" * 32


def test_a_signed_token_verifies_with_its_key_only() -> None:
    token = format_lease(LeaseRef("acme", "gold", "abc", "m"))
    signed = sign_lease(token, KEY)
    assert signed.startswith("s1.") and signed.endswith(token)
    assert verify_lease(signed, KEY) == token
    assert verify_lease(signed, b"another key") is None


@pytest.mark.parametrize(
    "forge",
    [
        lambda s: s.split(".", 2)[2],  # unsigned
        lambda s: s.replace("YWNtZQ", "ZXZpbA"),  # another tenant, same mac
        lambda s: "s1.AAAAAAAAAAAAAAAAAAAAAA." + s.split(".", 2)[2],  # a guessed mac
        lambda s: s[:-1],  # truncated
        lambda s: "s2" + s[2:],
        lambda s: "s1..",
        lambda s: "",
    ],
)
def test_a_forged_token_does_not_verify(forge: Any) -> None:
    signed = sign_lease(format_lease(LeaseRef("acme", "gold", "abc")), KEY)
    assert verify_lease(forge(signed), KEY) is None


@given(tenant=names, klass=names, lease_id=lease_ids, model=names, pod=names)
def test_round_trip_of_a_pods_lease(
    tenant: str, klass: str, lease_id: str, model: str, pod: str
) -> None:
    lease = LeaseRef(tenant, klass, lease_id, model, pod)
    token = format_lease(lease)
    assert token.count(".") == 5
    assert parse_lease(token) == lease


def test_tokens_written_before_pods_still_parse_as_the_fleets_count() -> None:
    # A five-part token (model, no pod) is what every sidecar wrote before topologies.
    token = format_lease(LeaseRef("a", "b", "abc", "llama"))
    assert token.count(".") == 4
    assert parse_lease(token) == LeaseRef("a", "b", "abc", "llama", None)


@pytest.mark.parametrize(
    "token",
    [
        "v1.YQ.Yg.abc.bGxhbWE.",  # an empty pod part
        "v1.YQ.Yg.abc.bGxhbWE.cG9k=",  # padding: not what format_lease writes
        "v1.YQ.Yg.abc.bGxhbWE.cG9k.eA",  # seven parts
        "v1.YQ.Yg.abc..cG9k",  # a pod without a model
    ],
)
def test_rejects_malformed_pod_parts(token: str) -> None:
    assert parse_lease(token) is None


@given(shadow=st.booleans(), pod=st.none() | names)
def test_a_model_only_lease_round_trips_with_its_own_prefix(shadow: bool, pod: str | None) -> None:
    lease = LeaseRef("acme", "gold", "abc", "llama", pod, shadow, model_only=True)
    token = format_lease(lease)
    assert token.startswith("v1sm." if shadow else "v1m.")
    assert parse_lease(token) == lease
    # The flag is in the signed part: dropping it is a forgery, not another lease.
    signed = sign_lease(token, KEY)
    assert verify_lease(signed.replace(".v1m.", ".v1.").replace(".v1sm.", ".v1s."), KEY) is None


def test_a_model_only_token_without_its_model_is_refused() -> None:
    # Its model's entry is all it holds: without a model it names nothing to release.
    assert parse_lease("v1m.YWNtZQ.Z29sZA.abc") is None
    assert parse_lease("v1ms.YWNtZQ.Z29sZA.abc.bQ") is None  # not a prefix this module writes
