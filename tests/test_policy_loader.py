"""Policy files to a Policy: the shipped examples, and one broken file per failure mode.

Every broken case asserts the exact `file:line: message` lines, all of them, in order: the
message is the product here, and a vague or misplaced one is a bug.
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path
from types import MappingProxyType

import pytest

from sidecar.cli import main, validate
from sidecar.errors import PolicyError
from sidecar.policy.loader import load_policy, policy_version
from sidecar.policy.model import (
    BucketPolicy,
    BucketUnit,
    ClassPolicy,
    DisallowedClassAction,
    FailMode,
    IdentityPolicy,
    IdentitySource,
    IdentitySourceKind,
    Infeasible,
    ModelPolicy,
    OverloadPolicy,
    Protect,
    RoutePriority,
    TenantMatch,
    TenantPolicy,
    TokenPolicy,
    UnknownTenantAction,
    UnknownTenantPolicy,
)
from sidecar.policy.schema import (
    BUCKET,
    CLASS,
    IDENTITY,
    MODEL,
    OVERLOAD,
    POLICY_FILE,
    TENANT,
    TOKENS,
)
from sidecar.policy.spec import Obj

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
CASES = Path(__file__).resolve().parent / "policy_cases"

CLASS_GOLD = """\
classes:
  gold:
    rank: 1
    latency_objective_ms: 250
    max_wait_ms: 50
    triton_priority: 1
"""


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def problems_of(*paths: Path) -> list[str]:
    with pytest.raises(PolicyError) as info:
        load_policy(paths)
    assert str(info.value) == "\n".join(str(p) for p in info.value.problems)
    return [str(p) for p in info.value.problems]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


# --- the shipped examples ----------------------------------------------------------------


BALANCED = Protect.BALANCED  # the shipped lower classes' adaptive caps


def test_examples_load_with_expected_classes() -> None:
    policy = load_policy([POLICIES])
    assert isinstance(policy.classes, MappingProxyType)
    assert dict(policy.classes) == {
        "interactive": ClassPolicy(
            "interactive",
            1,
            250,
            100,
            1,
            FailMode.OPEN,
            500,
            OverloadPolicy(16, 64),
            route_priority=RoutePriority.HIGH,
        ),
        "standard": ClassPolicy(
            "standard",
            2,
            2000,
            2000,
            2,
            FailMode.OPEN,
            1000,
            OverloadPolicy(8, 48, protect=BALANCED),
            "batch",
        ),
        "batch": ClassPolicy(
            "batch",
            3,
            20000,
            20000,
            3,
            FailMode.CLOSED,
            2000,
            OverloadPolicy(4, 32, protect=BALANCED),
        ),
        "opportunistic": ClassPolicy(
            "opportunistic",
            4,
            60000,
            0,
            4,
            FailMode.CLOSED,
            5000,
            OverloadPolicy(1, 8, protect=BALANCED),
        ),
    }


def test_examples_load_with_expected_tenants() -> None:
    policy = load_policy([POLICIES])
    assert isinstance(policy.tenants, MappingProxyType)
    assert list(policy.tenants) == ["search", "analytics", "research", "anonymous"]

    search = policy.tenants["search"]
    assert search.match.api_key_sha256 == {sha("demo-key-search")}
    assert search.match.principals == {"spiffe://cluster.local/ns/search/sa/web"}
    assert search.allowed_classes == {"interactive", "standard"}
    assert search.default_class == "standard"
    assert search.on_disallowed_class is DisallowedClassAction.DOWNGRADE
    assert search.buckets == (BucketPolicy("requests", BucketUnit.REQUESTS, 20.0, 20.0),)
    assert search.max_concurrency == 8
    assert isinstance(search.max_concurrency_per_class, MappingProxyType)
    assert dict(search.max_concurrency_per_class) == {"interactive": 4}

    analytics = policy.tenants["analytics"]
    assert analytics.match.api_key_sha256 == {sha("demo-key-analytics")}
    assert analytics.allowed_classes == {"standard", "batch"}
    assert analytics.default_class == "batch"
    assert analytics.on_disallowed_class is DisallowedClassAction.REJECT
    # An unnamed bucket is named after its unit.
    assert analytics.buckets == (BucketPolicy("requests", BucketUnit.REQUESTS, 5.0, 5.0),)
    assert analytics.max_concurrency == 4
    assert dict(analytics.max_concurrency_per_class) == {}

    research = policy.tenants["research"]
    assert research.match.api_key_sha256 == {sha("demo-key-research")}
    assert research.allowed_classes == {"batch", "opportunistic"}
    assert research.buckets == (
        BucketPolicy("requests", BucketUnit.REQUESTS, 10.0, 10.0),
        # 2000 per minute, normalised to per second.
        BucketPolicy("gpu-cost", BucketUnit.COST, 2000 / 60, 2000.0),
    )
    assert research.max_concurrency == 6

    assert policy.tenants["anonymous"] == TenantPolicy(
        name="anonymous",
        match=TenantMatch(),
        allowed_classes=frozenset({"opportunistic"}),
        default_class="opportunistic",
        buckets=(BucketPolicy("requests", BucketUnit.REQUESTS, 2.0, 2.0),),
        max_concurrency=2,
    )


def test_examples_load_with_expected_identity_models_and_settings() -> None:
    policy = load_policy([POLICIES])
    assert policy.identity == IdentityPolicy(
        sources=(
            IdentitySource(IdentitySourceKind.API_KEY, "x-api-key"),
            IdentitySource(IdentitySourceKind.PRINCIPAL, None),
        ),
        class_header="x-qos-class",
    )
    assert policy.unknown_tenants == UnknownTenantPolicy(UnknownTenantAction.DEFAULT, "anonymous")
    llm_tokens = TokenPolicy(
        prompt_tokens="PROMPT_TOKENS", max_tokens="OUTPUT_TOKENS", output_tokens="OUT_TOKENS"
    )
    relegated = replace(llm_tokens, infeasible=Infeasible.RELEGATE)
    assert dict(policy.models) == {
        "simgpu": ModelPolicy("simgpu", 10.0),
        "llm": ModelPolicy("llm", 600.0, relegated),
        "llm_stream": ModelPolicy("llm_stream", 600.0, llm_tokens),
    }
    assert isinstance(policy.models, MappingProxyType)
    assert policy.cost_of("simgpu") == 10.0
    assert policy.tokens_of("simgpu") is None
    assert policy.tokens_of("llm") == relegated
    assert policy.lease_ttl_s == 10.0
    assert policy.sources == tuple(
        str(POLICIES / name)
        for name in ("classes.yaml", "identity.yaml", "models.yaml", "tenants.yaml")
    )
    assert len(policy.version) == 12
    int(policy.version, 16)


def test_example_demo_keys_are_written_next_to_their_digests() -> None:
    # The comments are what demo users read; they must name the key that matches.
    text = (POLICIES / "tenants.yaml").read_text()
    for tenant in ("search", "analytics", "research"):
        assert f"{sha(f'demo-key-{tenant}')}  # demo-key-{tenant}" in text


def test_example_files_start_with_the_schema_modeline() -> None:
    for path in sorted(POLICIES.glob("*.yaml")):
        assert path.read_text().splitlines()[0] == "# yaml-language-server: $schema=./schema.json"


# --- normalisation, defaults, merging ------------------------------------------------------


def test_values_are_normalised_and_defaults_applied(tmp_path: Path) -> None:
    digest = sha("k")
    path = write(
        tmp_path / "p.yaml",
        CLASS_GOLD
        + f"""\
identity:
  sources:
    - kind: header
      header: X-Tenant
  class_header: X-QoS-Class
tenants:
  "team a/b":
    match:
      api_key_sha256: [{digest.upper()}]
      header_values: [team-a]
    allowed_classes: [gold]
    default_class: gold
    buckets:
      - unit: cost
        rate: 90
        per: minute
        burst: 1.5
""",
    )
    policy = load_policy([path])
    tenant = policy.tenants["team a/b"]
    assert tenant.match.api_key_sha256 == {digest}
    assert tenant.match.header_values == {"team-a"}
    assert tenant.buckets == (BucketPolicy("cost", BucketUnit.COST, 1.5, 1.5),)
    assert tenant.on_disallowed_class is DisallowedClassAction.DOWNGRADE
    assert tenant.max_concurrency is None
    assert policy.identity == IdentityPolicy(
        (IdentitySource(IdentitySourceKind.HEADER, "x-tenant"),), "x-qos-class"
    )
    gold = policy.classes["gold"]
    assert gold.on_state_error is FailMode.LOCAL_SHARE  # the default
    assert gold.concurrency_retry_after_ms == 1000
    assert policy.unknown_tenants == UnknownTenantPolicy()
    assert policy.lease_ttl_s == 10.0
    assert dict(policy.models) == {}


def test_identity_without_sources_keeps_the_default_source(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", CLASS_GOLD + "identity:\n  class_header: x-class\n")
    assert load_policy([path]).identity == IdentityPolicy(class_header="x-class")


@pytest.mark.parametrize(
    "obj", [POLICY_FILE, IDENTITY, CLASS, OVERLOAD, MODEL, TOKENS, TENANT, BUCKET]
)
def test_declared_defaults_match_the_model(obj: Obj) -> None:
    # The sections derive their defaults (shown in the schema and the reference, used by the
    # checks) from the model's dataclass defaults; these are the values a file gets.
    model_defaults = {
        "policyFile": {"lease_ttl_s": 10.0, "enforce": True},
        "identity": {
            "class_header": IdentityPolicy().class_header,
            "timeout_header": IdentityPolicy().timeout_header,
        },
        "class": {
            "on_state_error": ClassPolicy("c", 1, 1, 1, 1).on_state_error,
            "concurrency_retry_after_ms": ClassPolicy("c", 1, 1, 1, 1).concurrency_retry_after_ms,
            "max_queued": ClassPolicy("c", 1, 1, 1, 1).max_queued,
            "route_priority": ClassPolicy("c", 1, 1, 1, 1).route_priority,
            "enforce": ClassPolicy("c", 1, 1, 1, 1).enforce,
        },
        "model": {"cost_per_request": ModelPolicy("m").cost_per_request},
        "tokens": {
            "default_max_tokens": TokenPolicy().default_max_tokens,
            "chars_per_token": TokenPolicy().chars_per_token,
            "prompt_weight": TokenPolicy().prompt_weight,
            "output_weight": TokenPolicy().output_weight,
            "unreadable": TokenPolicy().unreadable,
            "infeasible": TokenPolicy().infeasible,
        },
        "tenant": {
            "on_disallowed_class": TenantPolicy(
                "t", TenantMatch(), frozenset(), "c"
            ).on_disallowed_class,
            "enforce": TenantPolicy("t", TenantMatch(), frozenset(), "c").enforce,
            "weight": TenantPolicy("t", TenantMatch(), frozenset(), "c").weight,
        },
        "bucket": {
            "per": "second",
            "lease_ms": BucketPolicy("requests", BucketUnit.REQUESTS, 1.0, 1.0).lease_ms,
            "enforce": BucketPolicy("requests", BucketUnit.REQUESTS, 1.0, 1.0).enforce,
        },
        "overload": {"on_stale": OverloadPolicy(admit_below=1).on_stale},
    }[obj.name]
    declared = {k: f.default for k, f in obj.fields.items() if f.default is not None}
    assert declared == model_defaults


def test_tokens_section_reaches_the_model(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.yaml",
        CLASS_GOLD
        + """\
models:
  chat:
    cost_per_request: 900
    tokens:
      prompt_text: text_input
      max_tokens: max_tokens
      default_max_tokens: 512
      output_text: text_output
      chars_per_token: 3
      prompt_weight: 0.5
      output_weight: 2
  plain:
    tokens: {}
  untokened:
    cost_per_request: 5
""",
    )
    models = load_policy([path]).models
    chat = models["chat"]
    assert chat == ModelPolicy(
        "chat",
        900.0,
        TokenPolicy(
            prompt_text="text_input",
            max_tokens="max_tokens",
            default_max_tokens=512,
            output_text="text_output",
            chars_per_token=3.0,
            prompt_weight=0.5,
            output_weight=2.0,
        ),
    )
    assert chat.tokens is not None
    # Written as YAML ints, kept as the model's types.
    assert type(chat.cost_per_request) is float
    assert type(chat.tokens.default_max_tokens) is int
    numbers = (chat.tokens.chars_per_token, chat.tokens.prompt_weight, chat.tokens.output_weight)
    assert {type(n) for n in numbers} == {float}
    # An empty section is every default: the request's max tokens at 1 unit each.
    assert models["plain"] == ModelPolicy("plain", 1.0, TokenPolicy())
    assert models["untokened"].tokens is None


def test_cost_burst_check_still_uses_cost_per_request_with_tokens(tmp_path: Path) -> None:
    # Token estimates larger than a burst are dealt with per request; the loader only refuses
    # a bucket that could not admit even a request charged cost_per_request.
    path = write(
        tmp_path / "p.yaml",
        CLASS_GOLD
        + """\
models:
  llm:
    cost_per_request: 600
    tokens: {prompt_tokens: PROMPT_TOKENS, max_tokens: OUTPUT_TOKENS}
tenants:
  t:
    allowed_classes: [gold]
    default_class: gold
    buckets:
      - {unit: cost, rate: 100, burst: 599}
""",
    )
    assert problems_of(path) == [
        f"{path}:16: tenants.t.buckets[0].burst: burst 599 is below cost_per_request 600 of "
        "model 'llm', so its requests could never be admitted"
    ]
    path.write_text(path.read_text().replace("burst: 599", "burst: 600"))
    assert load_policy([path]).tenants["t"].buckets[0].burst == 600.0


def test_yaml_anchors_and_merge_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.yaml",
        """\
classes:
  gold: &gold
    rank: 1
    latency_objective_ms: 250
    max_wait_ms: 50
    triton_priority: 1
  silver:
    <<: *gold
    rank: 2
tenants:
  a:
    allowed_classes: &both [gold, silver]
    default_class: gold
    buckets: &buckets
      - {unit: requests, rate: 5, burst: 5}
  b:
    allowed_classes: *both
    default_class: silver
    buckets: *buckets
""",
    )
    policy = load_policy([path])
    assert policy.classes["silver"] == ClassPolicy("silver", 2, 250, 50, 1)
    assert policy.tenants["b"].buckets == policy.tenants["a"].buckets
    assert policy.tenants["b"].allowed_classes == {"gold", "silver"}


def test_files_merge_and_a_directory_reads_only_yaml(tmp_path: Path) -> None:
    write(
        tmp_path / "b.yml", "tenants:\n  t:\n    allowed_classes: [gold]\n    default_class: gold\n"
    )
    write(tmp_path / "a.yaml", CLASS_GOLD)
    write(tmp_path / "schema.json", "{}")
    write(tmp_path / "notes.txt", "not a policy")
    write(tmp_path / ".swap.yaml", "not: [valid")
    write(tmp_path / "nested" / "c.yaml", "not: [valid")
    policy = load_policy([tmp_path])
    assert policy.sources == (str(tmp_path / "a.yaml"), str(tmp_path / "b.yml"))
    assert list(policy.tenants) == ["t"]
    # The same file named twice is read once, not reported as defining everything twice.
    assert load_policy([tmp_path, tmp_path / "a.yaml"]).sources == policy.sources


def test_empty_file_contributes_nothing(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", CLASS_GOLD)
    write(tmp_path / "empty.yaml", "# nothing here yet\n")
    assert list(load_policy([tmp_path]).classes) == ["gold"]


def test_version_depends_on_content_not_location(tmp_path: Path) -> None:
    first = load_policy([POLICIES])
    copy = tmp_path / "elsewhere"
    shutil.copytree(POLICIES, copy)
    assert load_policy([copy]).version == first.version
    # Argument order does not matter either.
    files = sorted(copy.glob("*.yaml"))
    assert load_policy(list(reversed(files))).version == first.version
    path = copy / "models.yaml"
    path.write_text(path.read_text().replace("cost_per_request: 10", "cost_per_request: 11"))
    assert load_policy([copy]).version != first.version


def test_policy_version_frames_names_and_contents() -> None:
    assert policy_version([("a", b"bc")]) != policy_version([("ab", b"c")])
    assert policy_version([("a", b"1"), ("b", b"2")]) == policy_version([("b", b"2"), ("a", b"1")])


# --- broken policies: one file per failure mode --------------------------------------------

ALLOWED_CLASS_KEYS = (
    "rank, latency_objective_ms, max_wait_ms, triton_priority, on_state_error, "
    "concurrency_retry_after_ms, overload, relegate_to, max_queued, route_priority, "
    "triton_timeout_ms, enforce"
)
SHA_HINT = "must be 64 hex digits (the SHA-256 digest of the key, not the key itself)"
HEADER_HINT = "must be a header name (letters, digits and !#$%&'*+-.^_`|~)"

# (file under tests/policy_cases, expected "line: message" lines, in order)
CASES_EXPECTED: list[tuple[str, list[str]]] = [
    (
        "bucket_classes.yaml",
        [
            "12: tenants.search.buckets[0].classes[0]: class 'batch' is not in allowed_classes"
            " (interactive)",
            "12: tenants.search.buckets[0].classes[1]: undefined class 'gold' (defined: batch,"
            " interactive)",
            "17: tenants.search.buckets[1].classes: must have at least 1 item",
        ],
    ),
    (
        "excess_class.yaml",
        [
            "10: tenants.search.buckets[0].excess_class: undefined class 'gold' (defined: batch,"
            " interactive, standard)",
            "11: tenants.search.buckets[1].excess_class: this bucket covers 'batch' too (it lists"
            " no classes), so a request moved there would be refused by it again; list the"
            " classes it covers, without the excess class",
            "12: tenants.search.buckets[2].excess_class: this bucket covers 'batch' too (it is in"
            " its classes), so a request moved there would be refused by it again; list the"
            " classes it covers, without the excess class",
            "13: tenants.search.buckets[3].excess_class: excess_class 'standard' has rank 2, not"
            " below class 'batch' (rank 3) that the bucket covers; what is over the bucket must"
            " move to a less important class",
        ],
    ),
    (
        "overload_rules.yaml",
        [
            "9: classes.interactive.overload.shed_above: shed_above (4) must be greater than"
            " admit_below (8)",
            "10: classes.interactive.relegate_to: undefined class 'bronze' (defined: batch,"
            " interactive)",
            "17: classes.batch.relegate_to: relegate_to 'interactive' has rank 1; it must be a"
            " less important class (rank above 3)",
            "19: classes.batch.overload.on_stale: expected one of saturated, admit, got 'guess'",
            "21: classes.batch.overload.max_in_flight: must be at least 1, got 0",
        ],
    ),
    (
        "model_preset_without_protect.yaml",
        [
            "15: models.llm.protect: no class sets overload.protect, so this preset would change"
            " nothing; set overload.protect on the classes to cap adaptively",
            "17: models.vision.protect: expected one of latency, balanced, throughput, got"
            " 'fastest'",
        ],
    ),
    (
        "protect_share.yaml",
        [
            "12: classes.standard.overload.protect_share: must be at most 1, got 1.5",
            "18: classes.batch.overload.protect_share: protect_share sets the share of an"
            " adaptive cap, and this class has none; set overload.protect as well",
        ],
    ),
    (
        "unknown_key.yaml",
        [
            "2: classes.gold: missing required key 'rank'",
            "3: classes.gold: unknown key 'ranc' (did you mean 'rank'?); "
            f"allowed: {ALLOWED_CLASS_KEYS}",
            "7: unknown key 'tenant' (did you mean 'tenants'?); "
            "allowed: identity, lease_ttl_s, replicas, enforce, unknown_tenants, classes, models, "
            "tenants",
        ],
    ),
    (
        "wrong_type.yaml",
        [
            "1: lease_ttl_s: expected a number, got string",
            "4: classes.gold.rank: expected an integer, got string",
            "5: classes.gold.latency_objective_ms: expected an integer, got number",
            "6: classes.gold.max_wait_ms: expected an integer, got boolean",
            "7: classes.gold.triton_priority: expected an integer, got null",
            "8: classes.gold.on_state_error: expected one of local_share, open, closed, got list",
            "11: tenants.search.allowed_classes: expected a list, got string",
            "12: tenants.search.default_class: expected a string, got integer",
            "15: tenants.search.buckets[0].rate: expected a number, got string",
            "17: tenants.search.max_concurrency: expected an integer, got number",
            "18: tenants.search.max_concurrency_per_class: expected a mapping, got list",
        ],
    ),
    (
        "bad_enum.yaml",
        [
            "7: classes.gold.on_state_error: expected one of local_share, open, closed, got 'opne'",
            "12: tenants.search.on_disallowed_class: expected one of downgrade, reject, "
            "got 'ignore'",
            "14: tenants.search.buckets[0].unit: expected one of requests, cost, got 'tokens'",
            "19: tenants.search.buckets[1].per: expected one of second, minute, got 'hour'",
        ],
    ),
    (
        "negative_rate.yaml",
        [
            "14: tenants.search.buckets[0].rate: must be greater than 0, got -5",
            "18: tenants.search.buckets[1].rate: must be greater than 0, got 0",
            "22: tenants.search.buckets[2].rate: must be a finite number, got inf",
        ],
    ),
    (
        "burst_below_one.yaml",
        ["14: tenants.search.buckets[0].burst: must be at least 1, got 0.5"],
    ),
    (
        "out_of_range.yaml",
        [
            "1: lease_ttl_s: must be greater than 0, got 0",
            "4: classes.gold.rank: must be at least 1, got 0",
            "5: classes.gold.latency_objective_ms: must be at least 1, got 0",
            "6: classes.gold.max_wait_ms: must be at least 0, got -1",
            "7: classes.gold.triton_priority: must be at least 1, got 0",
            "8: classes.gold.concurrency_retry_after_ms: must be at least 0, got -100",
            "11: models.llm.cost_per_request: must be greater than 0, got -1",
            "16: tenants.search.max_concurrency: must be at least 1, got 0",
            "18: tenants.search.max_concurrency_per_class.gold: must be at least 1, got -2",
            "19: tenants.search.weight: must be greater than 0, got 0",
        ],
    ),
    (
        "missing_required.yaml",
        [
            "2: classes.gold: missing required key 'triton_priority'",
            "7: tenants.search: missing required key 'default_class'",
            "10: tenants.search.buckets[0]: missing required key 'unit'",
        ],
    ),
    (
        "undefined_class.yaml",
        [
            "9: tenants.search.allowed_classes[1]: undefined class 'platinum' (defined: gold)",
            "10: tenants.search.default_class: undefined class 'diamond' (defined: gold)",
            "12: tenants.search.max_concurrency_per_class.silver: undefined class 'silver' "
            "(defined: gold)",
        ],
    ),
    (
        "default_not_allowed.yaml",
        [
            "15: tenants.search.default_class: class 'bronze' is not in allowed_classes (gold)",
            "17: tenants.search.max_concurrency_per_class.bronze: class 'bronze' is not in "
            "allowed_classes (gold)",
        ],
    ),
    (
        "duplicate_in_file.yaml",
        [
            "7: classes.gold: duplicate key 'rank' (first at line 3)",
            "8: classes: class 'gold' is already defined at {dir}/duplicate_in_file.yaml:2",
        ],
    ),
    (
        "duplicate_bucket.yaml",
        [
            "15: tenants.search.buckets[1]: duplicate bucket name 'requests' (first at line 12; "
            "a bucket without a name is named after its unit)",
            "23: tenants.search.buckets[3].name: duplicate bucket name 'tokens' (first at line 19)",
        ],
    ),
    (
        "bad_yaml.yaml",
        [
            "5: invalid YAML: expected <block end>, but found '<block mapping start>' "
            "(while parsing a block mapping at line 2)"
        ],
    ),
    (
        "tab_indent.yaml",
        ["3: invalid YAML: found character '\\t' that cannot start any token"],
    ),
    ("top_level_list.yaml", ["1: expected a mapping at the top level, got list"]),
    (
        "bad_sha.yaml",
        [
            f"11: tenants.search.match.api_key_sha256[0]: {SHA_HINT}, got 15 characters",
            f"12: tenants.search.match.api_key_sha256[1]: {SHA_HINT}, got 63 characters",
            f"13: tenants.search.match.api_key_sha256[2]: {SHA_HINT}, got 64 characters, "
            "some not allowed",
        ],
    ),
    (
        "shared_identity.yaml",
        [
            "17: tenants.search-copy.match.api_key_sha256[0]: API key digest already identifies "
            "tenant 'search' at {dir}/shared_identity.yaml:10",
            "18: tenants.search-copy.match.principals[0]: principal "
            "'spiffe://cluster.local/ns/search/sa/web' already identifies tenant 'search' "
            "at {dir}/shared_identity.yaml:11",
        ],
    ),
    (
        "identity_rules.yaml",
        [
            "3: identity.sources[0]: missing required key 'header' (required when kind is api_key)",
            "5: identity.sources[1]: key 'header' is not allowed when kind is principal",
            f"7: identity.sources[2].header: {HEADER_HINT}, got 'x tenant'",
            "8: identity.sources[3].kind: expected one of api_key, principal, header, got 'cookie'",
            "9: identity.class_header: must not be empty",
        ],
    ),
    (
        "unknown_tenant_without_tenant.yaml",
        ["1: unknown_tenants: missing required key 'tenant' (required when action is default)"],
    ),
    (
        "unknown_tenant_undefined.yaml",
        ["3: unknown_tenants.tenant: undefined tenant 'anonymous' (defined: search)"],
    ),
    (
        "unknown_tenant_reject_with_tenant.yaml",
        ["3: unknown_tenants: key 'tenant' is not allowed when action is reject"],
    ),
    ("no_classes.yaml", ["1: no classes defined; a policy needs at least one"]),
    (
        "bad_names.yaml",
        [
            "7: classes: class names must be strings, got integer 1 (quote it)",
            "12: classes: invalid class name '': must not be empty",
            "18: tenants: invalid tenant name 'line\\nbreak': must be free of control characters "
            "and line separators",
            "25: tenants.ok.buckets[0].name: must be 1 to 32 of a-z, 0-9, '_' and '-', "
            "got 'Requests!'",
        ],
    ),
    (
        "cost_burst_below_model_cost.yaml",
        [
            "21: tenants.search.buckets[0].burst: burst 100 is below cost_per_request 200 of "
            "model 'llm', so its requests could never be admitted"
        ],
    ),
    (
        "tokens_exclusive.yaml",
        [
            "12: models.llm.tokens: key 'prompt_text' is not allowed together with "
            "'prompt_tokens' (give only one of them)",
            "17: models.chat.tokens: key 'output_tokens' is not allowed together with "
            "'output_text' (give only one of them)",
        ],
    ),
    (
        "tokens_out_of_range.yaml",
        [
            "10: models.llm.tokens.prompt_tokens: must not be empty",
            "11: models.llm.tokens.default_max_tokens: must be at least 1, got 0",
            "12: models.llm.tokens.chars_per_token: must be greater than 0, got 0",
            "13: models.llm.tokens.prompt_weight: must be at least 0, got -0.5",
            "14: models.llm.tokens.output_weight: must be a finite number, got inf",
            "15: models.llm.tokens.infeasible: expected one of admit, relegate, refuse, "
            "got 'reject'",
        ],
    ),
    (
        "tokens_wrong_type.yaml",
        [
            "10: models.llm.tokens.prompt_tokens: expected a string, got integer",
            "11: models.llm.tokens.max_tokens: expected a string, got list",
            "12: models.llm.tokens.default_max_tokens: expected an integer, got number",
            "13: models.llm.tokens.chars_per_token: expected a number, got string",
            "14: models.llm.tokens.output_weight: expected a number, got boolean",
            "15: models.llm.tokens: unknown key 'max_token' (did you mean 'max_tokens'?); "
            "allowed: prompt_tokens, prompt_text, max_tokens, default_max_tokens, "
            "output_tokens, output_text, response_prompt_tokens, unreadable, chars_per_token, "
            "prompt_weight, output_weight, infeasible",
            "17: models.llm_stream.tokens: expected a mapping, got string",
            "19: models.chat.tokens: expected a mapping, got null",
        ],
    ),
]


@pytest.mark.parametrize(("name", "expected"), CASES_EXPECTED, ids=[c[0] for c in CASES_EXPECTED])
def test_broken_policy_reports_every_problem_at_its_line(name: str, expected: list[str]) -> None:
    path = CASES / name
    assert problems_of(path) == [f"{path}:{line.format(dir=CASES)}" for line in expected]


def test_every_case_file_is_covered() -> None:
    files = {p.name for p in CASES.glob("*.yaml")}
    assert files == {name for name, _ in CASES_EXPECTED}


def test_duplicates_across_files_name_both_places() -> None:
    folder = CASES / "duplicate_across_files"
    a, b = folder / "a.yaml", folder / "b.yaml"
    assert problems_of(folder) == [
        f"{b}:1: identity: already defined at {a}:1",
        f"{b}:4: lease_ttl_s: already defined at {a}:5",
        f"{b}:6: classes: class 'gold' is already defined at {a}:7",
        f"{b}:12: tenants: tenant 'search' is already defined at {a}:13",
    ]


def test_problems_in_several_files_are_all_reported_in_file_order(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", CLASS_GOLD.replace("rank: 1", "rank: -1"))
    second = write(tmp_path / "b.yaml", "tenants:\n  t:\n    allowed_classes: [gold]\n")
    assert problems_of(tmp_path) == [
        f"{first}:3: classes.gold.rank: must be at least 1, got -1",
        f"{second}:2: tenants.t: missing required key 'default_class'",
    ]


def test_a_file_that_is_not_yaml_does_not_cascade_into_reference_errors(tmp_path: Path) -> None:
    # classes.yaml is broken, so every class is missing: only the syntax error is reported.
    broken = write(tmp_path / "classes.yaml", CLASS_GOLD + "  silver: [\n")
    write(
        tmp_path / "tenants.yaml",
        "tenants:\n  t:\n    allowed_classes: [gold]\n    default_class: gold\n",
    )
    assert problems_of(tmp_path) == [
        f"{broken}:8: invalid YAML: expected the node content, but found '<stream end>' "
        "(while parsing a flow node)"
    ]


def test_unreadable_and_missing_paths(tmp_path: Path) -> None:
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    missing = tmp_path / "missing.yaml"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"classes:\n  gold: \xff\n")
    assert problems_of(empty_dir, missing, binary) == [
        f"{empty_dir}:1: no policy files (*.yaml, *.yml) in this directory",
        f"{missing}:1: no such file or directory",
        f"{binary}:2: not valid UTF-8: invalid start byte",
    ]


def test_control_characters_in_the_file_are_reported_with_their_line(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_bytes(CLASS_GOLD.encode() + b"tenants: {}\x07\n")
    assert problems_of(path) == [f"{path}:7: invalid YAML: unacceptable character #x0007"]


def test_no_paths_at_all() -> None:
    assert problems_of() == ["<none>:1: no policy paths given"]


def test_explicit_tags_that_cannot_be_read(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", CLASS_GOLD.replace("rank: 1", "rank: !!int one"))
    [problem] = problems_of(path)
    assert problem.startswith(
        f"{path}:3: classes.gold.rank: expected an integer, got an unreadable"
    )


def test_merge_of_a_scalar_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", CLASS_GOLD + "    <<: 5\n")
    assert problems_of(path) == [
        f"{path}:7: classes.gold: '<<' must merge a mapping or a list of mappings"
    ]


# --- validate, the CLI's check ---------------------------------------------------------------


def test_validate_prints_a_summary(capsys: pytest.CaptureFixture[str]) -> None:
    assert validate([POLICIES]) == 0
    out, err = capsys.readouterr()
    version = load_policy([POLICIES]).version
    assert out == f"ok: 4 classes, 4 tenants, version {version}\n"
    assert err == ""


def test_validate_prints_every_problem(capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES / "burst_below_one.yaml"
    assert validate([path]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == f"{path}:14: tenants.search.buckets[0].burst: must be at least 1, got 0.5\n"


def test_the_validate_command_prints_through_validate(capsys: pytest.CaptureFixture[str]) -> None:
    path = CASES / "burst_below_one.yaml"
    assert main(["validate", str(POLICIES), str(path)]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.endswith(
        f"{path}:14: tenants.search.buckets[0].burst: must be at least 1, got 0.5\n"
    )


def test_a_file_holds_one_document(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", CLASS_GOLD + "---\n" + CLASS_GOLD)
    assert problems_of(path) == [
        f"{path}:7: invalid YAML: expected a single document in the stream, "
        "but found another document"
    ]


def test_a_mapping_merged_into_itself_is_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "p.yaml", CLASS_GOLD.replace("  gold:\n", "  gold: &g\n    <<: *g\n"))
    assert problems_of(path) == [f"{path}:3: classes.gold: '<<' merges a mapping into itself"]


def test_max_in_flight_reaches_the_overload_policy(tmp_path: Path) -> None:
    path = write(
        tmp_path / "p.yaml",
        """\
classes:
  batch:
    rank: 3
    latency_objective_ms: 20000
    max_wait_ms: 2000
    triton_priority: 3
    overload: {admit_below: 4, shed_above: 32, max_in_flight: 12}
  standard:
    rank: 2
    latency_objective_ms: 2000
    max_wait_ms: 200
    triton_priority: 2
    overload: {admit_below: 8}
""",
    )
    classes = load_policy([path]).classes
    assert classes["batch"].overload == OverloadPolicy(4, 32, max_in_flight=12)
    standard = classes["standard"].overload
    assert standard is not None and standard.max_in_flight is None
