"""The definitions of every policy file merged by name, and the checks that need all of them.

Rules:
- Each class, tenant and model is defined once across all files (the maps of `Policy`);
  `identity`, `unknown_tenants` and `lease_ttl_s` at most once (its other keys). A second
  definition is reported where it is, naming the first.
- Checks here are the ones a single file's walk cannot make: references to classes and
  tenants, relegation going down, `shed_above` above `admit_below`, one tenant per API key,
  principal and header value, bucket names unique within a tenant, cost buckets that can hold
  one request of the costliest model, a model's protect preset with a class it applies to, a
  bucket's excess class below every class the bucket covers and not among them (another
  bucket of the tenant may cover it, though the tenant may not ask for it).
- `build` runs only when no file had a problem, so every required key is there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sidecar.errors import PolicyProblem
from sidecar.policy.document import Document
from sidecar.policy.model import BucketUnit, ClassPolicy, ModelPolicy, Policy
from sidecar.policy.nodes import Loc
from sidecar.policy.spec import MapOf, Obj, build, section_spec

_POLICY_FILE = section_spec(Policy)
_CLASS = section_spec(ClassPolicy)
_MODEL = section_spec(ModelPolicy)
# The maps of named entities ("classes" -> "class"), and the settings at most one file sets.
_ENTITY_MAPS = {
    key: fld.spec.entity for key, fld in _POLICY_FILE.fields.items() if isinstance(fld.spec, MapOf)
}
# `enforce` is per file: the default of the classes and tenants it defines (`_merge_entities`).
_PER_FILE = ("enforce",)
_SINGLETONS = tuple(
    key for key in _POLICY_FILE.fields if key not in _ENTITY_MAPS and key not in _PER_FILE
)
# Long name lists in a message help nobody; show the first few.
_MAX_NAMES_SHOWN = 10


@dataclass(frozen=True, slots=True)
class Definition:
    """A named thing (class, tenant, model, top-level setting) and the file it came from."""

    doc: Document
    loc: Loc
    data: Any  # what the walk produced: a dict, or None when the value itself was invalid

    @property
    def where(self) -> str:
        return self.doc.where(self.loc)

    def get(self, key: str, spec: Obj) -> Any:
        """The valid value of `key`, or its declared default."""
        if isinstance(self.data, dict) and key in self.data:
            return self.data[key]
        return spec.fields[key].default

    def problem(self, sub: Loc, message: str) -> None:
        self.doc.problem((*self.loc, *sub), message)


class Merged:
    """The definitions of every file, merged by name, and the checks that need all of them."""

    def __init__(self, docs: list[Document], problems: list[PolicyProblem]) -> None:
        self.docs = docs
        self.problems = problems
        self.entities: dict[str, dict[str, Definition]] = {k: {} for k in _ENTITY_MAPS}
        self.singletons: dict[str, Definition] = {}
        for doc in docs:
            for section in _ENTITY_MAPS:
                self._merge_entities(doc, section)
            for section in _SINGLETONS:
                if (section,) not in doc.lines:
                    continue
                first = self.singletons.get(section)
                if first is not None:
                    doc.problem((section,), f"already defined at {first.where}")
                else:
                    self.singletons[section] = Definition(doc, (section,), doc.data.get(section))

    def _merge_entities(self, doc: Document, section: str) -> None:
        entity = _ENTITY_MAPS[section]
        defined = self.entities[section]
        shadow_file = doc.data.get("enforce") is False and section in ("classes", "tenants")
        for name, data in (doc.data.get(section) or {}).items():
            if shadow_file and isinstance(data, dict):
                data.setdefault("enforce", False)
            first = defined.get(name)
            if first is not None:
                # Located at the second definition, naming the first, like a duplicate
                # within one file.
                doc.problem(
                    (section,),
                    f"{entity} {name!r} is already defined at {first.where}",
                    doc.line((section, name)),
                )
                continue
            defined[name] = Definition(doc, (section, name), data)

    @property
    def classes(self) -> dict[str, Definition]:
        return self.entities["classes"]

    @property
    def tenants(self) -> dict[str, Definition]:
        return self.entities["tenants"]

    def check(self) -> None:
        if not self.classes:
            with_key = [d for d in self.docs if ("classes",) in d.lines]
            doc = with_key[0] if with_key else self.docs[0]
            doc.problem(
                (), "no classes defined; a policy needs at least one", doc.line(("classes",))
            )
        owners: dict[tuple[str, str], tuple[str, str]] = {}
        for klass in self.classes.values():
            if isinstance(klass.data, dict):
                self._check_class(klass)
        for name, tenant in self.tenants.items():
            if isinstance(tenant.data, dict):
                # With no classes at all (say, one file of a set validated alone), every class
                # reference would be reported too; the one problem above says it all.
                if self.classes:
                    self._check_tenant_classes(tenant)
                self._check_buckets(tenant)
                self._check_match(name, tenant, owners)
        self._check_model_presets()
        unknown = self.singletons.get("unknown_tenants")
        if unknown is not None and isinstance(unknown.data, dict):
            fallback = unknown.data.get("tenant")
            if fallback is not None and fallback not in self.tenants:
                unknown.problem(
                    ("tenant",), f"undefined tenant {fallback!r} (defined: {_names(self.tenants)})"
                )

    def _check_class(self, klass: Definition) -> None:
        overload = klass.data.get("overload")
        if isinstance(overload, dict):
            admit, shed = overload.get("admit_below"), overload.get("shed_above")
            if admit is not None and shed is not None and shed <= admit:
                klass.problem(
                    ("overload", "shed_above"),
                    f"shed_above ({shed}) must be greater than admit_below ({admit})",
                )
            if overload.get("protect_share") is not None and overload.get("protect") is None:
                klass.problem(
                    ("overload", "protect_share"),
                    "protect_share sets the share of an adaptive cap, and this class has none; "
                    "set overload.protect as well",
                )
        target = klass.data.get("relegate_to")
        if target is None:
            return
        if target not in self.classes:
            klass.problem(
                ("relegate_to",), f"undefined class {target!r} (defined: {_names(self.classes)})"
            )
            return
        own, other = klass.data.get("rank"), self.classes[target].get("rank", _CLASS)
        if own is not None and other is not None and other <= own:
            # Relegation moves a request down, once; a target at the same or a better rank
            # would be a promotion, or a cycle.
            klass.problem(
                ("relegate_to",),
                f"relegate_to {target!r} has rank {other}; it must be a less important class "
                f"(rank above {own})",
            )

    def _check_model_presets(self) -> None:
        """A model's `protect` overrides the preset of protected classes: with none, it would
        silently do nothing."""
        protected = [
            name
            for name, c in self.classes.items()
            if isinstance(c.data, dict)
            and isinstance(c.data.get("overload"), dict)
            and c.data["overload"].get("protect") is not None
        ]
        if protected:
            return
        for model in self.entities["models"].values():
            if isinstance(model.data, dict) and model.data.get("protect") is not None:
                model.problem(
                    ("protect",),
                    "no class sets overload.protect, so this preset would change nothing; set "
                    "overload.protect on the classes to cap adaptively",
                )

    def _class_problem(self, name: str, allowed: list[str] | None) -> str | None:
        if name not in self.classes:
            return f"undefined class {name!r} (defined: {_names(self.classes)})"
        if allowed is not None and name not in allowed:
            return f"class {name!r} is not in allowed_classes ({', '.join(allowed)})"
        return None

    def _check_tenant_classes(self, tenant: Definition) -> None:
        raw_allowed = tenant.data.get("allowed_classes")
        allowed = None if raw_allowed is None else [c for c in raw_allowed if c is not None]
        for index, name in enumerate(raw_allowed or ()):
            if name is not None and name not in self.classes:
                tenant.problem(
                    ("allowed_classes", index),
                    f"undefined class {name!r} (defined: {_names(self.classes)})",
                )
        default = tenant.data.get("default_class")
        if default is not None:
            reason = self._class_problem(default, allowed)
            if reason is not None:
                tenant.problem(("default_class",), reason)
        for name in tenant.data.get("max_concurrency_per_class") or {}:
            reason = self._class_problem(name, allowed)
            if reason is not None:
                tenant.problem(("max_concurrency_per_class", name), reason)
        buckets = [b for b in tenant.data.get("buckets") or () if isinstance(b, dict)]
        # A bucket may cover a class its siblings' excess goes to, which the tenant does not ask.
        excess = [b["excess_class"] for b in buckets if isinstance(b.get("excess_class"), str)]
        uses = None if allowed is None else allowed + [c for c in excess if c not in allowed]
        for index, bucket in enumerate(tenant.data.get("buckets") or ()):
            if not isinstance(bucket, dict):
                continue
            for position, name in enumerate(bucket.get("classes") or ()):
                reason = None if name is None else self._class_problem(name, uses)
                if reason is not None:
                    tenant.problem(("buckets", index, "classes", position), reason)
            if bucket.get("excess_class") is not None:
                self._check_excess(tenant, index, bucket)

    def _check_excess(self, tenant: Definition, index: int, bucket: dict[str, Any]) -> None:
        """A bucket's `excess_class` moves what it has no room for down, once: to a class that
        exists, that the bucket does not cover (it would refuse it again), below every class
        it covers (else it would be a promotion)."""
        excess, loc = bucket["excess_class"], ("buckets", index, "excess_class")
        if excess not in self.classes:
            tenant.problem(loc, f"undefined class {excess!r} (defined: {_names(self.classes)})")
            return
        covered = [c for c in bucket.get("classes") or () if c is not None]
        if not covered or excess in covered:
            tenant.problem(
                loc,
                f"this bucket covers {excess!r} too ("
                + ("it lists no classes" if not covered else "it is in its classes")
                + "), so a request moved there would be refused by it again; list the classes "
                "it covers, without the excess class",
            )
            return
        low = self.classes[excess].get("rank", _CLASS)
        for name in covered:
            rank = self.classes[name].get("rank", _CLASS) if name in self.classes else None
            if rank is not None and low is not None and low <= rank:
                tenant.problem(
                    loc,
                    f"excess_class {excess!r} has rank {low}, not below class {name!r} "
                    f"(rank {rank}) that the bucket covers; what is over the bucket must move "
                    "to a less important class",
                )
                return

    def _max_model_cost(self) -> tuple[float, str | None]:
        """The most one request can cost, and the model that costs it (None: the default 1)."""
        worst: tuple[float, str | None] = (1.0, None)
        for name, model in self.entities["models"].items():
            cost = model.get("cost_per_request", _MODEL)
            if cost > worst[0]:
                worst = (cost, name)
        return worst

    def _check_buckets(self, tenant: Definition) -> None:
        first_line: dict[str, int] = {}
        max_cost, costliest = self._max_model_cost()
        for index, bucket in enumerate(tenant.data.get("buckets") or ()):
            if not isinstance(bucket, dict):
                continue
            loc: Loc = ("buckets", index)
            named = (*tenant.loc, *loc, "name") in tenant.doc.lines
            name = bucket.get("name") if named else getattr(bucket.get("unit"), "value", None)
            if name is not None:
                where = (*loc, "name") if named else loc
                if name in first_line:
                    hint = "" if named else "; a bucket without a name is named after its unit"
                    tenant.problem(
                        where,
                        f"duplicate bucket name {name!r} (first at line {first_line[name]}{hint})",
                    )
                else:
                    first_line[name] = tenant.doc.line((*tenant.loc, *where))
            burst = bucket.get("burst")
            if (
                bucket.get("unit") is BucketUnit.COST
                and burst is not None
                and costliest is not None
                and burst < max_cost
            ):
                # The bucket can never hold enough tokens for one such request: it would be
                # shed with 429 forever, each time with a Retry-After that lies.
                tenant.problem(
                    (*loc, "burst"),
                    f"burst {burst} is below cost_per_request {max_cost} of model "
                    f"{costliest!r}, so its requests could never be admitted",
                )

    def _check_match(
        self,
        name: str,
        tenant: Definition,
        owners: dict[tuple[str, str], tuple[str, str]],
    ) -> None:
        """Each API key digest, principal and header value identifies one tenant only."""
        match = tenant.data.get("match")
        if not isinstance(match, dict):
            return
        what = {
            "api_key_sha256": "API key digest",
            "principals": "principal",
            "header_values": "header value",
        }
        for key, noun in what.items():
            for index, value in enumerate(match.get(key) or ()):
                if value is None:
                    continue
                loc: Loc = ("match", key, index)
                owner = owners.get((key, value))
                if owner is None:
                    owners[(key, value)] = (name, tenant.doc.where((*tenant.loc, *loc)))
                elif owner[0] != name:
                    # A digest is not secret, but it is long and says nothing: leave it out.
                    shown = "" if key == "api_key_sha256" else f" {value!r}"
                    tenant.problem(
                        loc,
                        f"{noun}{shown} already identifies tenant {owner[0]!r} at {owner[1]}",
                    )

    def build(self, version: str, sources: tuple[str, ...]) -> Policy:
        """The Policy. Only called when no problem was found, so every required key is here."""
        data: dict[str, Any] = {
            section: {name: d.data for name, d in defined.items()}
            for section, defined in self.entities.items()
        }
        for section, definition in self.singletons.items():
            data[section] = definition.data
        policy: Policy = build(_POLICY_FILE, data, version=version, sources=sources)
        return policy


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:_MAX_NAMES_SHOWN])
    return shown + (", ..." if len(ordered) > _MAX_NAMES_SHOWN else "")
