"""Keys: one hash tag per tenant (and per model), and no name can inject key syntax or
collide."""

from __future__ import annotations

import re
import urllib.parse

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.state.keys import KeyKind, build_key, build_model_key, encode_name

# Any text, including `{`, `}`, `:`, `%`, spaces, controls and every Unicode plane.
names = st.text(st.characters(), max_size=12) | st.sampled_from(["{", "}", ":", "%", "{}", ""])
tenants = names.filter(bool)
key_specs = st.tuples(tenants, st.sampled_from(KeyKind), st.lists(names, max_size=2))

KEY = re.compile(
    r"qos:\{([A-Za-z0-9_%-]+)\}:(bucket|leases|class_leases|released)((?::[A-Za-z0-9_%-]*)*)"
)
MODEL_KEY = re.compile(r"qos:\{=([A-Za-z0-9_%-]+)\}:model_leases")


def cluster_hash_tag(key: str) -> str | None:
    """What Redis Cluster hashes: the text between the first `{` and the first `}` after it,
    if non-empty (see the Redis Cluster specification, "Hash tags")."""
    start = key.find("{")
    end = key.find("}", start + 1)
    if start == -1 or end == -1 or end == start + 1:
        return None
    return key[start + 1 : end]


@given(key_specs, key_specs)
def test_different_names_never_share_a_key(
    a: tuple[str, KeyKind, list[str]], b: tuple[str, KeyKind, list[str]]
) -> None:
    key_a, key_b = build_key(a[0], a[1], *a[2]), build_key(b[0], b[1], *b[2])
    assert (key_a == key_b) == (a == b)


@given(key_specs)
def test_every_key_has_one_hash_tag_and_it_is_the_tenant(
    spec: tuple[str, KeyKind, list[str]],
) -> None:
    tenant, kind, parts = spec
    key = build_key(tenant, kind, *parts)
    match = KEY.fullmatch(key)
    assert match is not None, key
    assert key.count("{") == 1 and key.count("}") == 1
    assert cluster_hash_tag(key) == match.group(1) == encode_name(tenant)
    # The encoding reverses, so it is injective: the tag names exactly one tenant.
    decoded = urllib.parse.unquote_to_bytes(match.group(1)).decode("utf-8", "surrogatepass")
    assert decoded == tenant
    assert match.group(3).count(":") == len(parts)


@given(tenants, st.sampled_from(KeyKind), st.sampled_from(KeyKind), names, names)
def test_all_keys_of_a_tenant_share_its_slot(
    tenant: str, kind_a: KeyKind, kind_b: KeyKind, part_a: str, part_b: str
) -> None:
    assert cluster_hash_tag(build_key(tenant, kind_a, part_a)) == cluster_hash_tag(
        build_key(tenant, kind_b, part_b)
    )


@pytest.mark.parametrize("tenant", ["acme", "a}{b:c", "{x}", "é", "=acme", "%41"])
def test_every_kind_of_tenant_key_carries_the_tenant_hash_tag(tenant: str) -> None:
    # Every kind, listed rather than sampled: a kind added later is checked here at once. A
    # script touches a tenant's buckets and lease sets together, so they must share one slot.
    keys = [build_key(tenant, kind, *parts) for kind in KeyKind for parts in ((), ("x",))]
    assert {cluster_hash_tag(key) for key in keys} == {encode_name(tenant)}


def test_plain_names_stay_readable_and_awkward_ones_are_escaped() -> None:
    assert build_key("acme", KeyKind.LEASES) == "qos:{acme}:leases"
    assert build_key("acme", KeyKind.BUCKET, "llm_tokens") == "qos:{acme}:bucket:llm_tokens"
    assert build_key("a}{b:c", KeyKind.CLASS_LEASES, "x:y") == (
        "qos:{a%7D%7Bb%3Ac}:class_leases:x%3Ay"
    )
    assert build_key("é", KeyKind.LEASES) == "qos:{%C3%A9}:leases"


def test_an_empty_tenant_is_refused() -> None:
    # `{}` is not a hash tag: Redis Cluster would hash the whole key and scatter the tenant.
    with pytest.raises(ValueError, match="empty"):
        build_key("", KeyKind.LEASES)


# -- a model's lease set --------------------------------------------------------------------


def decode(encoded: str) -> str:
    return urllib.parse.unquote_to_bytes(encoded).decode("utf-8", "surrogatepass")


@given(tenants)
def test_a_model_key_has_one_hash_tag_of_its_own(model: str) -> None:
    key = build_model_key(model)
    match = MODEL_KEY.fullmatch(key)
    assert match is not None, key
    assert key.count("{") == 1 and key.count("}") == 1
    assert cluster_hash_tag(key) == "=" + encode_name(model)
    assert decode(match.group(1)) == model


@given(tenants, tenants)
def test_different_models_never_share_a_key(a: str, b: str) -> None:
    assert (build_model_key(a) == build_model_key(b)) == (a == b)


@given(key_specs, tenants)
def test_a_model_never_shares_a_hash_tag_with_a_tenant(
    spec: tuple[str, KeyKind, list[str]], model: str
) -> None:
    tenant_key = build_key(spec[0], spec[1], *spec[2])
    assert cluster_hash_tag(tenant_key) != cluster_hash_tag(build_model_key(model))


@pytest.mark.parametrize("name", ["llama", "=llama", "a}{b:c", "é", "qos:{a}", "%3D"])
def test_a_model_and_a_tenant_of_the_same_name_stay_apart(name: str) -> None:
    model_key, tenant_keys = build_model_key(name), [build_key(name, k) for k in KeyKind]
    assert model_key not in tenant_keys
    assert cluster_hash_tag(model_key) not in {cluster_hash_tag(k) for k in tenant_keys}


def test_model_names_are_readable_or_escaped() -> None:
    assert build_model_key("llama") == "qos:{=llama}:model_leases"
    assert build_model_key("llama-3.1:8b") == "qos:{=llama-3%2E1%3A8b}:model_leases"
    assert build_model_key("a}{b") == "qos:{=a%7D%7Bb}:model_leases"
    assert build_model_key("=x") == "qos:{=%3Dx}:model_leases"
    assert build_model_key("モデル") == "qos:{=%E3%83%A2%E3%83%87%E3%83%AB}:model_leases"


def test_an_empty_model_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_model_key("")


# -- a pod's count of a model (pod topology) --------------------------------------------------


def test_a_pods_model_key_names_model_and_pod() -> None:
    assert build_model_key("llama", "pod-1") == "qos:{=llama@pod-1}:model_leases"
    assert build_model_key("a@b", "c") == "qos:{=a%40b@c}:model_leases"
    assert build_model_key("a", "b@c") == "qos:{=a@b%40c}:model_leases"


@given(tenants, st.none() | tenants, tenants, st.none() | tenants)
def test_model_and_pod_pairs_never_share_a_key(
    model_a: str, pod_a: str | None, model_b: str, pod_b: str | None
) -> None:
    same = build_model_key(model_a, pod_a) == build_model_key(model_b, pod_b)
    assert same == ((model_a, pod_a) == (model_b, pod_b))


@given(key_specs, tenants, tenants)
def test_a_pods_model_key_has_one_tag_and_never_a_tenants(
    spec: tuple[str, KeyKind, list[str]], model: str, pod: str
) -> None:
    key = build_model_key(model, pod)
    assert key.count("{") == 1 and key.count("}") == 1
    assert cluster_hash_tag(key) == f"={encode_name(model)}@{encode_name(pod)}"
    assert cluster_hash_tag(key) != cluster_hash_tag(build_key(spec[0], spec[1], *spec[2]))


def test_an_empty_pod_is_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        build_model_key("llama", "")
