"""Shadow mode (issue 13 §1): rules judged and recorded, not applied (sidecar/core/shadow.py)."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.core.lease import format_lease, parse_lease
from sidecar.core.shadow import HEADER_SHADOW, ShadowedPolicy, compile_with_shadow, shadow_tenant
from sidecar.core.types import Decision, LeaseRef, Reason, RequestAttributes
from sidecar.metrics import Metrics
from sidecar.policy.loader import load_policy
from sidecar.policy.reload import PolicyHolder
from sidecar.service import AdmissionService
from sidecar.state.memory import MemoryQuotaStore

INFER = "/v2/models/simgpu/infer"
CLASSES = (
    "classes:\n"
    "  interactive: {rank: 1, latency_objective_ms: 250, max_wait_ms: 0, triton_priority: 1,"
    " on_state_error: open}\n"
)


def tenant(name: str, extra: str = "", bucket: str = "") -> str:
    digest = hashlib.sha256(f"k-{name}".encode()).hexdigest()
    return (
        f"  {name}:\n    match: {{api_key_sha256: [{digest}]}}\n"
        "    allowed_classes: [interactive]\n    default_class: interactive\n"
        f"{extra}    buckets:\n      - {{unit: requests, rate: 0.001, burst: 3{bucket}}}\n"
    )


def write(tmp: Path, files: dict[str, str]) -> Path:
    tmp.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (tmp / name).write_text(text)
    return tmp


def test_a_file_that_is_not_enforced_shadows_what_it_defines_unless_they_say_otherwise(
    tmp_path: Path,
) -> None:
    policy = load_policy(
        [
            write(
                tmp_path,
                {
                    "a.yaml": CLASSES + "tenants:\n" + tenant("live"),
                    "b.yaml": "enforce: false\ntenants:\n"
                    + tenant("trial")
                    + tenant("kept", "    enforce: true\n"),
                },
            )
        ]
    )
    assert [policy.tenants[n].enforce for n in ("live", "trial", "kept")] == [True, False, True]
    assert policy.classes["interactive"].enforce


def test_enforce_takes_only_true_or_false(tmp_path: Path) -> None:
    from sidecar.errors import PolicyError

    path = write(tmp_path, {"p.yaml": CLASSES + "tenants:\n" + tenant("t", "    enforce: no\n")})
    with pytest.raises(PolicyError) as raised:
        load_policy([path])
    assert "tenants.t.enforce: expected true or false" in str(raised.value)


def test_the_enforced_policy_lacks_exactly_the_shadow_rules(tmp_path: Path) -> None:
    text = (
        CLASSES.replace("on_state_error: open}", "on_state_error: open, enforce: false,"
                        " overload: {admit_below: 2}}")
        + "tenants:\n"
        + tenant("whole", "    enforce: false\n    max_concurrency: 2\n")
        + tenant("one", "    max_concurrency: 2\n", ", enforce: false")
        + tenant("plain")
    )  # fmt: skip
    compiled = compile_with_shadow(load_policy([write(tmp_path, {"p.yaml": text})]))
    assert isinstance(compiled, ShadowedPolicy) and compiled.written is not None
    enforced, written = compiled.policy, compiled.written.policy
    assert (
        enforced.tenants["whole"].buckets == ()
        and enforced.tenants["whole"].max_concurrency is None
    )
    assert enforced.tenants["one"].buckets == () and enforced.tenants["one"].max_concurrency == 2
    assert enforced.tenants["plain"] == written.tenants["plain"]
    assert enforced.classes["interactive"].overload is None
    assert written.classes["interactive"].overload is not None
    assert compiled.tenants == {"whole", "one"} and compiled.classes == {"interactive"}
    # Identity tables point at the enforced tenants.
    assert compiled.by_api_key[hashlib.sha256(b"k-one").hexdigest()] is enforced.tenants["one"]


def test_a_policy_without_shadow_rules_compiles_as_before(tmp_path: Path) -> None:
    text = CLASSES + "tenants:\n" + tenant("plain")
    assert not isinstance(
        compile_with_shadow(load_policy([write(tmp_path, {"p.yaml": text})])), ShadowedPolicy
    )


def test_a_lease_token_says_whether_a_shadow_lease_rides_with_it() -> None:
    lease = LeaseRef("t", "interactive", "abc", "simgpu", None, shadow=True)
    token = format_lease(lease)
    assert token.startswith("v1s.") and parse_lease(token) == lease
    plain = format_lease(LeaseRef("t", "interactive", "abc"))
    assert plain.startswith("v1.") and parse_lease(plain) == LeaseRef("t", "interactive", "abc")
    assert parse_lease("v2" + token[3:]) is None
    assert shadow_tenant("t") != "t" and "\x1f" in shadow_tenant("t")  # no policy name has one


def _service(tmp_path: Path, text: str) -> tuple[AdmissionService, MemoryQuotaStore, Metrics]:
    holder = PolicyHolder([write(tmp_path, {"p.yaml": text})])
    store, metrics = MemoryQuotaStore(), Metrics(CollectorRegistry())
    return AdmissionService(holder, store, metrics), store, metrics


def _request(key: str) -> RequestAttributes:
    return RequestAttributes("POST", INFER, {"x-api-key": key})


def _count(metrics: Metrics, tenant_name: str, reason: str, shadow: str) -> float:
    labels = {"tenant": tenant_name, "class": "interactive", "reason": reason, "shadow": shadow}
    outcome = "admit" if reason.startswith("admitted") else "shed"
    value = metrics.registry.get_sample_value("qos_decisions_total", {**labels, "outcome": outcome})
    return value or 0.0


def test_a_shadowed_tenant_is_admitted_and_its_would_be_decision_recorded(tmp_path: Path) -> None:
    text = CLASSES + "tenants:\n" + tenant("trial", "    enforce: false\n") + tenant("live")
    service, _, metrics = _service(tmp_path, text)

    async def body() -> tuple[list[Decision], list[Decision]]:
        trial = [await service.check(_request("k-trial"), "test") for _ in range(5)]
        live = [await service.check(_request("k-live"), "test") for _ in range(5)]
        return trial, live

    trial, live = asyncio.run(body())
    assert all(d.admitted for d in trial)
    shadow = [dict(d.headers)[HEADER_SHADOW] for d in trial]
    assert shadow == ["admit 200 admitted"] * 3 + ["shed 429 over_rate"] * 2
    assert _count(metrics, "trial", "admitted", "true") == 3
    assert _count(metrics, "trial", "over_rate", "true") == 2
    assert _count(metrics, "trial", "admitted", "false") == 5
    # Another tenant of the same policy is enforced, and judged once.
    assert [d.status for d in live] == [200] * 3 + [429] * 2
    assert HEADER_SHADOW not in dict(live[0].headers)
    assert _count(metrics, "live", "admitted", "true") == 0


def test_shadow_leases_never_count_against_enforced_limits_and_end_with_their_request(
    tmp_path: Path,
) -> None:
    """Enforced: at most 2 in flight. Shadow: a bucket of 3. The shadow leases live apart and
    end with the enforced lease's release; the refused request gives its own back at once."""
    text = CLASSES + "tenants:\n" + tenant("t", "    max_concurrency: 2\n", ", enforce: false")
    service, store, _ = _service(tmp_path, text)

    async def body() -> tuple[list[Decision], list[int], list[int]]:
        decisions = [await service.check(_request("k-t"), "test") for _ in range(3)]
        during = [await store.in_flight("t", None), await store.in_flight(shadow_tenant("t"), None)]
        for decision in decisions:
            if decision.admitted:
                lease = parse_lease(dict(decision.headers)["x-qos-lease"])
                assert lease is not None and lease.shadow
                await service.complete(dict(decision.headers)["x-qos-lease"])
        after = [await store.in_flight("t", None), await store.in_flight(shadow_tenant("t"), None)]
        return decisions, during, after

    decisions, during, after = asyncio.run(body())
    assert [d.status for d in decisions] == [200, 200, 429]
    assert decisions[2].reason is Reason.OVER_CONCURRENCY
    assert during == [2, 2]  # the third's shadow lease was given back with its refusal
    assert after == [0, 0]


def test_a_held_request_whose_client_leaves_gives_its_shadow_lease_back(tmp_path: Path) -> None:
    """Enforced: the class holds while Triton's queue is deep. The written policy's judgement
    took a shadow lease at arrival; the client leaves while held, so the shadow lease must be
    given back too, not renewed for ever."""
    from tests.test_service_overload import Backend

    text = (
        CLASSES.replace("max_wait_ms: 0", "max_wait_ms: 5000").replace(
            "on_state_error: open}", "on_state_error: open, overload: {admit_below: 2}}"
        )
        + "tenants:\n"
        + tenant("t", "", ", enforce: false")
    )
    backend = Backend(depth=6)
    holder = PolicyHolder([write(tmp_path, {"p.yaml": text})])
    store = MemoryQuotaStore()
    service = AdmissionService(holder, store, Metrics(CollectorRegistry()), load=backend.view)

    async def body() -> tuple[int, int, int]:
        held = asyncio.create_task(service.check(_request("k-t"), "test"))
        assert service.deferrer is not None
        for _ in range(300):  # until the enforced request is held
            if len(service.deferrer.queue) == 1:
                break
            await asyncio.sleep(0.01)
        shadow_during = await store.in_flight(shadow_tenant("t"), None)
        held.cancel()
        await asyncio.gather(held, return_exceptions=True)
        for _ in range(300):  # the give-back runs once the judgement is done
            if await store.in_flight(shadow_tenant("t"), None) == 0:
                break
            await asyncio.sleep(0.01)
        return (
            shadow_during,
            await store.in_flight(shadow_tenant("t"), None),
            await store.in_flight("t", None),
        )

    assert asyncio.run(body()) == (1, 0, 0)
