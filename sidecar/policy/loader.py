"""Policy YAML files to one validated `Policy` snapshot, or every problem with its file:line.

Rules:
- A path is a file (read whatever its name) or a directory (its *.yaml and *.yml files, sorted,
  not recursive; dot-files are skipped). The files are merged into one policy: each class,
  tenant and model is defined once across all of them, `identity`, `unknown_tenants` and
  `lease_ttl_s` at most once.
- YAML is composed into nodes, not loaded into dicts, so every key and value keeps its line.
  Each file is walked with the declarative `POLICY_FILE` description in `schema.py` (the one
  the JSON Schema is rendered from); then checks that need every file run on the merged result
  (references to classes and tenants, one tenant per API key, bucket names).
- Every problem is collected and raised together as one `PolicyError`; a `Policy` is built only
  when there are none, so a half-valid policy never exists. Messages are
  `file:line: dotted.path: what is wrong`.
- `Policy.version` hashes the files' names and bytes (not their directories), so every replica
  that mounts the same files reports the same version.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import re
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TextIO, TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.errors import PolicyError, PolicyProblem
from sidecar.policy.model import (
    BucketPolicy,
    BucketUnit,
    ClassPolicy,
    IdentityPolicy,
    IdentitySource,
    ModelPolicy,
    OverloadPolicy,
    Policy,
    TenantMatch,
    TenantPolicy,
    TokenPolicy,
    UnknownTenantPolicy,
)
from sidecar.policy.schema import (
    BUCKET,
    CLASS,
    IDENTITY,
    MODEL,
    OVERLOAD,
    PER_SECONDS,
    POLICY_FILE,
    TENANT,
    TOKENS,
    UNKNOWN_TENANTS,
    Choice,
    Exclusive,
    Int,
    ListOf,
    MapOf,
    Num,
    Obj,
    Spec,
    Str,
)

POLICY_SUFFIXES = (".yaml", ".yml")
VERSION_HEX_CHARS = 12

# Where a value sits in a file: ("tenants", "search", "buckets", 0, "rate").
Loc: TypeAlias = tuple[str | int, ...]

_MERGE_TAG = "tag:yaml.org,2002:merge"
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")
_SINGLETONS = ("identity", "unknown_tenants", "lease_ttl_s")
_ENTITY_MAPS = ("classes", "models", "tenants")
# Long name lists in a message help nobody; show the first few.
_MAX_NAMES_SHOWN = 10


def load_policy(paths: Sequence[Path | str]) -> Policy:
    """Load, merge and validate the policy files at `paths` (files or directories).

    Raises PolicyError carrying every problem found, each located at file:line.
    """
    problems: list[PolicyProblem] = []
    files = _discover([Path(p) for p in paths], problems)
    docs: list[_Document] = []
    contents: list[tuple[str, bytes]] = []
    for file in files:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            problems.append(PolicyProblem(str(file), 1, f"cannot read: {exc.strerror or exc}"))
            continue
        contents.append((file.name, raw))
        doc = _Document(str(file), problems)
        doc.parse(raw)
        docs.append(doc)

    merged = _Merged(docs, problems)
    if not paths:
        problems.append(PolicyProblem("<none>", 1, "no policy paths given"))
    elif docs and all(doc.parsed for doc in docs):
        # A file that is not YAML hides what it defines: checking references across files
        # would report everything it was meant to define as missing.
        merged.check()
    if problems:
        order = {str(f): i for i, f in enumerate(files)}
        problems.sort(key=lambda p: (order.get(p.file, -1), p.line))
        raise PolicyError(problems)
    return merged.build(version=policy_version(contents), sources=tuple(str(f) for f in files))


def validate(
    paths: Sequence[Path | str], *, out: TextIO | None = None, err: TextIO | None = None
) -> int:
    """`qos-sidecar validate PATH...`: check policy files without starting anything.

    Prints every problem as `file:line: message` (the form editors and CI logs link to) on
    `err` (stderr) and returns 1, or a one-line summary on `out` (stdout) and returns 0.
    """
    out = sys.stdout if out is None else out
    err = sys.stderr if err is None else err
    try:
        policy = load_policy(paths)
    except PolicyError as exc:
        for problem in exc.problems:
            print(problem, file=err)
        return 1
    print(
        f"ok: {len(policy.classes)} classes, {len(policy.tenants)} tenants, "
        f"version {policy.version}",
        file=out,
    )
    return 0


def policy_version(contents: Iterable[tuple[str, bytes]]) -> str:
    """Short content hash of (file name, bytes) pairs, independent of their order."""
    digest = hashlib.sha256()
    for name, raw in sorted(contents):
        encoded = name.encode()
        # Length-prefixed, so no two different sets of files hash the same input.
        for part in (encoded, raw):
            digest.update(len(part).to_bytes(8, "big"))
            digest.update(part)
    return digest.hexdigest()[:VERSION_HEX_CHARS]


def policy_files(paths: Sequence[Path | str]) -> list[Path]:
    """The files `load_policy` would read for `paths`; missing paths are left out."""
    return _discover([Path(p) for p in paths], [])


def _discover(paths: Sequence[Path], problems: list[PolicyProblem]) -> list[Path]:
    files: list[Path] = []
    seen: set[Path] = set()
    for path in paths:
        if path.is_dir():
            try:
                found = sorted(
                    child
                    for child in path.iterdir()
                    # Dot-files are editor swap files and the `..data` links of a Kubernetes
                    # ConfigMap volume, whose real files also appear under their own names.
                    if child.suffix in POLICY_SUFFIXES
                    and not child.name.startswith(".")
                    and child.is_file()
                )
            except OSError as exc:
                problems.append(PolicyProblem(str(path), 1, f"cannot list: {exc.strerror}"))
                continue
            if not found:
                problems.append(
                    PolicyProblem(str(path), 1, "no policy files (*.yaml, *.yml) in this directory")
                )
        elif path.exists():
            found = [path]
        else:
            problems.append(PolicyProblem(str(path), 1, "no such file or directory"))
            continue
        for file in found:
            # The same file named twice (a directory and a file in it) is read once; reading
            # it twice would report every name in it as defined twice.
            key = file.resolve()
            if key not in seen:
                seen.add(key)
                files.append(file)
    return files


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def _dotted(loc: Loc) -> str:
    """`("tenants", "search", "buckets", 0)` -> `tenants.search.buckets[0]`."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif _PLAIN_NAME.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def _node_type_name(node: Node, value: object) -> str:
    if isinstance(node, MappingNode):
        return "mapping"
    if isinstance(node, SequenceNode):
        return "list"
    return _type_name(value)


def _expected(spec: Spec) -> str:
    if isinstance(spec, Str):
        return "a string"
    if isinstance(spec, Int):
        return "an integer"
    if isinstance(spec, Num):
        return "a number"
    if isinstance(spec, Choice):
        return "one of " + ", ".join(spec.values)
    if isinstance(spec, ListOf):
        return "a list"
    return "a mapping"


def _string_problem(spec: Str, value: str, *, show: bool = True) -> str | None:
    """Why `value` does not fit `spec`, or None. `show=False` leaves the value out of the
    message, for keys that the caller names already."""
    if not value and spec.min_length > 0:
        return "must not be empty"
    if spec.pattern is not None and not re.fullmatch(spec.pattern, value):
        if not show:
            return f"must be {spec.pattern_hint}"
        if not spec.secret:
            return f"must be {spec.pattern_hint}, got {value!r}"
        fits = spec.min_length <= len(value) <= (spec.max_length or len(value))
        return f"must be {spec.pattern_hint}, got {len(value)} characters" + (
            ", some not allowed" if fits else ""
        )
    if len(value) < spec.min_length:
        return f"must be at least {spec.min_length} characters, got {len(value)}"
    if spec.max_length is not None and len(value) > spec.max_length:
        return f"must be at most {spec.max_length} characters, got {len(value)}"
    return None


def _names(names: Iterable[str]) -> str:
    ordered = sorted(names)
    if not ordered:
        return "none"
    shown = ", ".join(ordered[:_MAX_NAMES_SHOWN])
    return shown + (", ..." if len(ordered) > _MAX_NAMES_SHOWN else "")


class _Invalid:
    """A key or value that could not be read; the problem has been recorded already."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


class _Document:
    """One policy file: its YAML walked against `POLICY_FILE` into plain values.

    `data` holds only what is valid: a bad value is left out of its mapping, and a bad list
    item is None so the indexes of the others still match their locations. `lines` has the
    line of everything that was present, valid or not: a scalar's own line, and for a mapping
    or list, the line of the key (or list item) that introduced it.
    """

    def __init__(self, file: str, problems: list[PolicyProblem]) -> None:
        self.file = file
        self.problems = problems
        self.data: dict[str, Any] = {}
        self.lines: dict[Loc, int] = {}
        # False when the file could not be read as a YAML mapping at all: what it defines is
        # unknown, so checks across files would only guess.
        self.parsed = False
        self._constructor = SafeConstructor()

    def line(self, loc: Loc) -> int:
        while loc and loc not in self.lines:
            loc = loc[:-1]
        return self.lines.get(loc, 1)

    def where(self, loc: Loc) -> str:
        return f"{self.file}:{self.line(loc)}"

    def problem(self, loc: Loc, message: str, line: int | None = None) -> None:
        prefix = _dotted(loc)
        self.problems.append(
            PolicyProblem(
                self.file,
                self.line(loc) if line is None else line,
                f"{prefix}: {message}" if prefix else message,
            )
        )

    def parse(self, raw: bytes) -> None:
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            self.problem((), f"not valid UTF-8: {exc.reason}", line)
            return
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self._syntax_problem(exc)
            return
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            self.problem((), f"invalid YAML: unacceptable character #x{exc.character:04x}", line)
            return
        except yaml.YAMLError as exc:
            self.problem((), f"invalid YAML: {exc}", 1)
            return
        except RecursionError:
            self.problem((), "invalid YAML: nested too deeply", 1)
            return
        if root is None:  # an empty file, or only comments: contributes nothing
            self.parsed = True
            return
        if not isinstance(root, MappingNode):
            value = self._construct(root)
            got = value.type_name if isinstance(value, _Invalid) else _type_name(value)
            self.problem((), f"expected a mapping at the top level, got {got}", _line(root))
            return
        data = self._object(root, POLICY_FILE, (), _line(root))
        if isinstance(data, dict):
            self.data = data
            self.parsed = True

    def _syntax_problem(self, exc: yaml.MarkedYAMLError) -> None:
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        message = f"invalid YAML: {exc.problem or exc.context}"
        if exc.problem and exc.problem.startswith("but ") and exc.context:
            # "expected a single document in the stream", "but found another document"
            message = f"invalid YAML: {exc.context}, {exc.problem}"
        elif exc.problem and exc.context and exc.context_mark is not None:
            context_line = int(exc.context_mark.line) + 1
            where = "" if context_line == line else f" at line {context_line}"
            message += f" ({exc.context}{where})"
        self.problem((), message, line)

    def _construct(self, node: Node) -> Any:
        """A scalar node's Python value, or _Invalid for collections and unreadable scalars."""
        if isinstance(node, MappingNode):
            return _Invalid("mapping")
        if isinstance(node, SequenceNode):
            return _Invalid("list")
        try:
            return self._constructor.construct_object(node)
        # PyYAML's scalar constructors raise more than YAMLError for values with an explicit
        # tag (`!!int abc` raises ValueError): any failure here is a value we cannot read.
        except Exception as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            return _Invalid(f"an unreadable {node.tag} value ({problem})")

    def _walk(self, node: Node, spec: Spec, loc: Loc, line: int) -> Any:
        if isinstance(spec, Obj):
            return self._object(node, spec, loc, line)
        if isinstance(spec, MapOf):
            return self._map(node, spec, loc, line)
        if isinstance(spec, ListOf):
            return self._list(node, spec, loc, line)
        return self._scalar(node, spec, loc)

    def _wrong_type(self, node: Node, spec: Spec, loc: Loc, value: object = None) -> None:
        if isinstance(node, ScalarNode) and value is None:
            value = self._construct(node)
        got = value.type_name if isinstance(value, _Invalid) else _node_type_name(node, value)
        self.problem(loc, f"expected {_expected(spec)}, got {got}", _line(node))

    def _scalar(self, node: Node, spec: Str | Int | Num | Choice, loc: Loc) -> Any:
        self.lines[loc] = _line(node)
        value = self._construct(node)
        if isinstance(value, _Invalid):
            self._wrong_type(node, spec, loc, value)
            return None
        if isinstance(spec, Str):
            if not isinstance(value, str):
                self._wrong_type(node, spec, loc, value)
                return None
            reason = _string_problem(spec, value)
            if reason is not None:
                self.problem(loc, reason)
                return None
            return value.lower() if spec.lower else value
        if isinstance(spec, Choice):
            if not isinstance(value, str):
                self._wrong_type(node, spec, loc, value)
                return None
            if value not in spec.values:
                self.problem(loc, f"expected {_expected(spec)}, got {value!r}")
                return None
            return spec.enum(value) if spec.enum is not None else value
        if isinstance(spec, Int):
            if isinstance(value, bool) or not isinstance(value, int):
                self._wrong_type(node, spec, loc, value)
                return None
            if spec.minimum is not None and value < spec.minimum:
                self.problem(loc, f"must be at least {spec.minimum}, got {value}")
                return None
            return value
        if isinstance(value, bool) or not isinstance(value, int | float):
            self._wrong_type(node, spec, loc, value)
            return None
        if not math.isfinite(value):
            self.problem(loc, f"must be a finite number, got {value}")
            return None
        if spec.minimum is not None and value < spec.minimum:
            self.problem(loc, f"must be at least {spec.minimum:g}, got {value}")
            return None
        if spec.exclusive_minimum is not None and value <= spec.exclusive_minimum:
            self.problem(loc, f"must be greater than {spec.exclusive_minimum:g}, got {value}")
            return None
        return value

    def _list(self, node: Node, spec: ListOf, loc: Loc, line: int) -> Any:
        if not isinstance(node, SequenceNode):
            self.lines[loc] = _line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        items = [
            self._walk(item, spec.item, (*loc, index), _line(item))
            for index, item in enumerate(node.value)
        ]
        if len(items) < spec.min_items:
            noun = "item" if spec.min_items == 1 else "items"
            self.problem(loc, f"must have at least {spec.min_items} {noun}")
        return items

    def _pairs(
        self, node: MappingNode, loc: Loc, duplicate: Callable[[str, int], str]
    ) -> list[tuple[object, int, Node]]:
        """The mapping's (key, key line, value node) with YAML merge keys (`<<`) applied.

        A key written twice in the mapping itself is reported with `duplicate` and the first
        one kept; a key from a merged mapping is overridden by the mapping's own, as in YAML.
        """
        merged: dict[object, tuple[int, Node]] = {}
        for source in self._merge_sources(node, loc, {id(node)}):
            for key_node, value_node in source.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self._construct(key_node)
                if isinstance(key, str):
                    merged[key] = (_line(key_node), value_node)
        own: list[tuple[object, int, Node]] = []
        first_line: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self._construct(key_node)
            if isinstance(key, str):
                if key in first_line:
                    self.problem(loc, duplicate(key, first_line[key]), _line(key_node))
                    continue
                first_line[key] = _line(key_node)
                merged.pop(key, None)
            own.append((key, _line(key_node), value_node))
        return [(k, line, v) for k, (line, v) in merged.items()] + own

    def _merge_sources(self, node: MappingNode, loc: Loc, stack: set[int]) -> list[MappingNode]:
        """The mappings merged into `node`, lowest precedence first (so later ones win)."""
        sources: list[MappingNode] = []
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                continue
            if isinstance(value_node, MappingNode):
                listed = [value_node]
            elif isinstance(value_node, SequenceNode) and all(
                isinstance(n, MappingNode) for n in value_node.value
            ):
                listed = list(value_node.value)
            else:
                self.problem(
                    loc, "'<<' must merge a mapping or a list of mappings", _line(key_node)
                )
                continue
            # The first mapping listed wins in YAML, so it goes last.
            for source in reversed(listed):
                if id(source) in stack:
                    self.problem(loc, "'<<' merges a mapping into itself", _line(key_node))
                    continue
                sources += self._merge_sources(source, loc, stack | {id(source)})
                sources.append(source)
        return sources

    def _map(self, node: Node, spec: MapOf, loc: Loc, line: int) -> Any:
        if not isinstance(node, MappingNode):
            self.lines[loc] = _line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        out: dict[str, Any] = {}

        def duplicate(key: str, first: int) -> str:
            return f"{spec.entity} {key!r} is already defined at {self.file}:{first}"

        for key, key_line, value_node in self._pairs(node, loc, duplicate):
            if not isinstance(key, str):
                if isinstance(key, _Invalid):
                    got = key.type_name
                elif key is None:
                    got = "null"
                else:  # `404:` or `yes:` read as a number or a boolean
                    got = f"{_type_name(key)} {key!r} (quote it)"
                self.problem(loc, f"{spec.entity} names must be strings, got {got}", key_line)
                continue
            reason = _string_problem(spec.key, key, show=False)
            if reason is not None:
                self.problem(loc, f"invalid {spec.entity} name {key!r}: {reason}", key_line)
                continue
            out[key] = self._walk(value_node, spec.value, (*loc, key), key_line)
        return out

    def _object(self, node: Node, spec: Obj, loc: Loc, line: int) -> Any:
        if not isinstance(node, MappingNode):
            self.lines[loc] = _line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        out: dict[str, Any] = {}
        key_lines: dict[str, int] = {}

        def duplicate(key: str, first: int) -> str:
            return f"duplicate key {key!r} (first at line {first})"

        for key, key_line, value_node in self._pairs(node, loc, duplicate):
            if not isinstance(key, str):
                got = key.type_name if isinstance(key, _Invalid) else _type_name(key)
                self.problem(loc, f"keys must be strings, got {got}", key_line)
                continue
            fld = spec.fields.get(key)
            if fld is None:
                self.problem(loc, _unknown_key(key, spec), key_line)
                continue
            key_lines[key] = key_line
            value = self._walk(value_node, fld.spec, (*loc, key), key_line)
            if value is not None:
                out[key] = value
        for key in spec.required:
            if key not in key_lines:
                self.problem(loc, f"missing required key {key!r}", line)
        for rule in spec.rules:
            if isinstance(rule, Exclusive):
                if all(key in key_lines for key in rule.keys):
                    # Reported at the second one written, like a duplicate key.
                    (_, first), (line_of_second, second) = sorted(
                        (key_lines[key], key) for key in rule.keys
                    )
                    self.problem(
                        loc,
                        f"key {second!r} is not allowed together with {first!r} "
                        "(give only one of them)",
                        line_of_second,
                    )
                continue
            when = out.get(rule.when_key)
            when = getattr(when, "value", when)  # enum members compare by their YAML value
            if when not in rule.when_values:
                continue
            for key in rule.require:
                if key not in key_lines:
                    self.problem(
                        loc,
                        f"missing required key {key!r} (required when {rule.when_key} is {when})",
                        line,
                    )
            for key in rule.forbid:
                if key in key_lines:
                    self.problem(
                        loc,
                        f"key {key!r} is not allowed when {rule.when_key} is {when}",
                        key_lines[key],
                    )
        return out


def _unknown_key(key: str, spec: Obj) -> str:
    allowed = list(spec.fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}"


@dataclass(frozen=True, slots=True)
class _Definition:
    """A named thing (class, tenant, model, top-level setting) and the file it came from."""

    doc: _Document
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


class _Merged:
    """The definitions of every file, merged by name, and the checks that need all of them."""

    def __init__(self, docs: list[_Document], problems: list[PolicyProblem]) -> None:
        self.docs = docs
        self.problems = problems
        self.entities: dict[str, dict[str, _Definition]] = {k: {} for k in _ENTITY_MAPS}
        self.singletons: dict[str, _Definition] = {}
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
                    self.singletons[section] = _Definition(doc, (section,), doc.data.get(section))

    def _merge_entities(self, doc: _Document, section: str) -> None:
        entity = {"classes": "class", "models": "model", "tenants": "tenant"}[section]
        defined = self.entities[section]
        for name, data in (doc.data.get(section) or {}).items():
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
            defined[name] = _Definition(doc, (section, name), data)

    @property
    def classes(self) -> dict[str, _Definition]:
        return self.entities["classes"]

    @property
    def tenants(self) -> dict[str, _Definition]:
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
        unknown = self.singletons.get("unknown_tenants")
        if unknown is not None and isinstance(unknown.data, dict):
            fallback = unknown.data.get("tenant")
            if fallback is not None and fallback not in self.tenants:
                unknown.problem(
                    ("tenant",), f"undefined tenant {fallback!r} (defined: {_names(self.tenants)})"
                )

    def _check_class(self, klass: _Definition) -> None:
        overload = klass.data.get("overload")
        if isinstance(overload, dict):
            admit, shed = overload.get("admit_below"), overload.get("shed_above")
            if admit is not None and shed is not None and shed <= admit:
                klass.problem(
                    ("overload", "shed_above"),
                    f"shed_above ({shed}) must be greater than admit_below ({admit})",
                )
        target = klass.data.get("relegate_to")
        if target is None:
            return
        if target not in self.classes:
            klass.problem(
                ("relegate_to",), f"undefined class {target!r} (defined: {_names(self.classes)})"
            )
            return
        own, other = klass.data.get("rank"), self.classes[target].get("rank", CLASS)
        if own is not None and other is not None and other <= own:
            # Relegation moves a request down, once; a target at the same or a better rank
            # would be a promotion, or a cycle.
            klass.problem(
                ("relegate_to",),
                f"relegate_to {target!r} has rank {other}; it must be a less important class "
                f"(rank above {own})",
            )

    def _class_problem(self, name: str, allowed: list[str] | None) -> str | None:
        if name not in self.classes:
            return f"undefined class {name!r} (defined: {_names(self.classes)})"
        if allowed is not None and name not in allowed:
            return f"class {name!r} is not in allowed_classes ({', '.join(allowed)})"
        return None

    def _check_tenant_classes(self, tenant: _Definition) -> None:
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
        for index, bucket in enumerate(tenant.data.get("buckets") or ()):
            if not isinstance(bucket, dict):
                continue
            for position, name in enumerate(bucket.get("classes") or ()):
                reason = None if name is None else self._class_problem(name, allowed)
                if reason is not None:
                    tenant.problem(("buckets", index, "classes", position), reason)

    def _max_model_cost(self) -> tuple[float, str | None]:
        """The most one request can cost, and the model that costs it (None: the default 1)."""
        worst: tuple[float, str | None] = (1.0, None)
        for name, model in self.entities["models"].items():
            cost = model.get("cost_per_request", MODEL)
            if cost > worst[0]:
                worst = (cost, name)
        return worst

    def _check_buckets(self, tenant: _Definition) -> None:
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
        tenant: _Definition,
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
        classes = {name: _build_class(name, d) for name, d in self.classes.items()}
        models = {
            name: ModelPolicy(
                name,
                float(d.get("cost_per_request", MODEL)),
                _build_tokens(d.get("tokens", MODEL)),
            )
            for name, d in self.entities["models"].items()
        }
        tenants = {name: _build_tenant(name, d) for name, d in self.tenants.items()}
        kwargs: dict[str, Any] = {}
        identity = self.singletons.get("identity")
        if identity is not None:
            kwargs["identity"] = _build_identity(identity)
        unknown = self.singletons.get("unknown_tenants")
        if unknown is not None:
            kwargs["unknown_tenants"] = UnknownTenantPolicy(
                action=unknown.get("action", UNKNOWN_TENANTS),
                tenant=unknown.get("tenant", UNKNOWN_TENANTS),
            )
        lease = self.singletons.get("lease_ttl_s")
        lease_ttl_s: Any = (
            POLICY_FILE.fields["lease_ttl_s"].default if lease is None else lease.data
        )
        kwargs["lease_ttl_s"] = float(lease_ttl_s)
        return Policy(
            version=version,
            sources=sources,
            classes=MappingProxyType(classes),
            tenants=MappingProxyType(tenants),
            models=MappingProxyType(models),
            **kwargs,
        )


def _build_class(name: str, d: _Definition) -> ClassPolicy:
    return ClassPolicy(
        name=name,
        rank=d.get("rank", CLASS),
        latency_objective_ms=d.get("latency_objective_ms", CLASS),
        max_wait_ms=d.get("max_wait_ms", CLASS),
        triton_priority=d.get("triton_priority", CLASS),
        on_state_error=d.get("on_state_error", CLASS),
        concurrency_retry_after_ms=d.get("concurrency_retry_after_ms", CLASS),
        overload=_build_overload(d.get("overload", CLASS)),
        relegate_to=d.get("relegate_to", CLASS),
        max_queued=d.get("max_queued", CLASS),
        route_priority=d.get("route_priority", CLASS),
    )


def _build_overload(d: Mapping[str, Any] | None) -> OverloadPolicy | None:
    if d is None:
        return None
    return OverloadPolicy(
        admit_below=d["admit_below"],
        shed_above=d.get("shed_above"),
        on_stale=d.get("on_stale", OVERLOAD.fields["on_stale"].default),
        max_in_flight=d.get("max_in_flight"),
    )


def _build_tokens(d: Mapping[str, Any] | None) -> TokenPolicy | None:
    if d is None:
        return None
    fields = TOKENS.fields

    def number(key: str) -> float:
        # YAML reads `4` as an int; chars_per_token and the weights are floats in the model.
        return float(d.get(key, fields[key].default))

    return TokenPolicy(
        prompt_tokens=d.get("prompt_tokens"),
        prompt_text=d.get("prompt_text"),
        max_tokens=d.get("max_tokens"),
        default_max_tokens=d.get("default_max_tokens", fields["default_max_tokens"].default),
        output_tokens=d.get("output_tokens"),
        output_text=d.get("output_text"),
        chars_per_token=number("chars_per_token"),
        prompt_weight=number("prompt_weight"),
        output_weight=number("output_weight"),
    )


def _build_tenant(name: str, d: _Definition) -> TenantPolicy:
    match: Mapping[str, list[str]] = d.get("match", TENANT) or {}
    buckets = tuple(_build_bucket(b) for b in d.get("buckets", TENANT) or ())
    return TenantPolicy(
        name=name,
        match=TenantMatch(
            api_key_sha256=frozenset(match.get("api_key_sha256", ())),
            principals=frozenset(match.get("principals", ())),
            header_values=frozenset(match.get("header_values", ())),
        ),
        allowed_classes=frozenset(d.get("allowed_classes", TENANT)),
        default_class=d.get("default_class", TENANT),
        on_disallowed_class=d.get("on_disallowed_class", TENANT),
        buckets=buckets,
        max_concurrency=d.get("max_concurrency", TENANT),
        max_concurrency_per_class=MappingProxyType(
            dict(d.get("max_concurrency_per_class", TENANT) or {})
        ),
    )


def _build_bucket(b: Mapping[str, Any]) -> BucketPolicy:
    unit: BucketUnit = b["unit"]
    per = b.get("per", BUCKET.fields["per"].default)
    return BucketPolicy(
        name=b.get("name", unit.value),
        unit=unit,
        rate_per_s=float(b["rate"]) / PER_SECONDS[per],
        burst=float(b["burst"]),
        classes=frozenset(b.get("classes") or ()),
    )


def _build_identity(d: _Definition) -> IdentityPolicy:
    sources = d.get("sources", IDENTITY)
    if sources is None:
        sources_out = IdentityPolicy().sources
    else:
        sources_out = tuple(IdentitySource(s["kind"], s.get("header")) for s in sources)
    return IdentityPolicy(sources=sources_out, class_header=d.get("class_header", IDENTITY))
