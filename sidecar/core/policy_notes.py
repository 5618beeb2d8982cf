"""What is worth saying about a valid policy: settings that change nothing, and classes that
none of a tenant's limits bound. `qos-sidecar validate` prints each as a `note:` line (and
still succeeds), the sidecar logs each when it loads the policy, and the admin listener's
`/v1/policy` lists them under `notes`.

Rules:
1. A leased bucket that no request can spend through slices (`core.slices`,
   `leases_without_effect`): its `lease_ms` changes nothing.
2. A class a tenant may use that none of its limits bound: the tenant has buckets or a
   per-class concurrency limit, no bucket covers the class (a bucket without `classes`
   covers every class), and neither its `max_concurrency` nor the class's entry in
   `max_concurrency_per_class` applies. Nothing then bounds that tenant's requests of the
   class but the load rules, and those judge the class, not the tenant: in the benchmark a
   tenant whose bucket left interactive out sent 0.47 C of it, within every rule, and the
   lower classes of every tenant made room (benchmarks/README.md, "A noisy tenant that is
   over its quota"). Often what was meant, so a note, not an error; a tenant with no limit
   at all is unlimited on purpose and gets none. A bucket's `excess_class` is a class the
   tenant uses too (core/relegation.py): unbounded there, what is over the bucket is bounded
   by the load alone.
3. A tenant `weight` other than 1 where none of the classes its requests can be served in
   (those it may use, its buckets' excess classes, and the classes they relegate to) ever
   holds a request (`max_wait_ms` 0, or no `overload` rules): the weight orders held
   requests only (core/queue.py), so it changes nothing there.
4. Judged on the policy as enforced (`core.shadow`: shadow rules out), which is what
   decides.

Pure: a policy in, sentences out.
"""

from __future__ import annotations

from sidecar.core.slices import leases_without_effect
from sidecar.policy.model import Policy, TenantPolicy


def policy_notes(policy: Policy) -> list[str]:
    """Every note on `policy` (as enforced), rule 1's first."""
    return [
        *leases_without_effect(policy),
        *unbounded_classes(policy),
        *weights_without_effect(policy),
    ]


def unbounded_classes(policy: Policy) -> list[str]:
    """Rule 2, one sentence per tenant and class."""
    notes = []
    for tenant in policy.tenants.values():
        for klass in _unbounded(tenant):
            notes.append(
                f"tenant {tenant.name!r}, class {klass!r}: in none of its buckets and under"
                " no concurrency limit, so only the load bounds its requests of that class"
            )
    return notes


def _unbounded(tenant: TenantPolicy) -> list[str]:
    if tenant.max_concurrency is not None:
        return []
    if not tenant.buckets and not tenant.max_concurrency_per_class:
        return []  # no limit at all: unlimited on purpose
    excess = {b.excess_class for b in tenant.buckets if b.excess_class is not None}
    return [
        klass
        for klass in sorted(tenant.allowed_classes | excess)
        if klass not in tenant.max_concurrency_per_class
        and not any(b.covers(klass) for b in tenant.buckets)
    ]


def weights_without_effect(policy: Policy) -> list[str]:
    """Rule 3, one sentence per tenant."""
    return [
        f"tenant {tenant.name!r}: its weight {tenant.weight:g} changes nothing, since none of"
        " the classes it is served in holds requests (max_wait_ms 0 or no overload rules),"
        " and a weight orders only held ones"
        for tenant in policy.tenants.values()
        if tenant.weight != 1.0 and not any(_holds(policy, k) for k in _served_in(policy, tenant))
    ]


def _served_in(policy: Policy, tenant: TenantPolicy) -> set[str]:
    """The classes `tenant`'s requests can be served in: asked for, moved to by a bucket's
    excess class, or relegated to (followed to the end)."""
    found = set(tenant.allowed_classes)
    found |= {b.excess_class for b in tenant.buckets if b.excess_class is not None}
    todo = list(found)
    while todo:
        klass = policy.classes.get(todo.pop())
        target = None if klass is None else klass.relegate_to
        if target is not None and target not in found:
            found.add(target)
            todo.append(target)
    return found


def _holds(policy: Policy, name: str) -> bool:
    klass = policy.classes.get(name)
    return klass is not None and klass.overload is not None and klass.max_wait_ms > 0
