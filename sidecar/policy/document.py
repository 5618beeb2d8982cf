"""One policy file walked against the sections the model declares, into plain values.

Rules:
- The file is walked with the `Obj` table of `Policy` (derived from the model, `spec.py`):
  types, enums, ranges, patterns, unknown keys, required keys, keys required or forbidden by
  another key (`Rule`) and pairs of keys that exclude each other (`Exclusive`). Whatever
  needs more than one file is checked after merging (`checks.py`).
- `data` holds only what is valid: a bad value is left out of its mapping, and a bad list
  item is None so the indexes of the others still match their locations.
- Values are plain (str, int, float, enum members, lists, dicts); `spec.build` turns them
  into the model once every file is free of problems.
"""

from __future__ import annotations

import difflib
import math
import re
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from sidecar.errors import PolicyProblem
from sidecar.policy.merge_keys import mapping_pairs
from sidecar.policy.model import Policy
from sidecar.policy.nodes import Invalid, Loc, NodeFile, node_line, node_type_name, type_name
from sidecar.policy.spec import (
    Bool,
    Choice,
    Exclusive,
    Int,
    ListOf,
    MapOf,
    Num,
    Obj,
    Spec,
    Str,
    section_spec,
)

POLICY_FILE = section_spec(Policy)


class Document(NodeFile):
    """One policy file: what it holds that is valid, and where everything in it was."""

    def __init__(self, file: str, problems: list[PolicyProblem]) -> None:
        super().__init__(file, problems)
        self.data: dict[str, Any] = {}

    def parse(self, raw: bytes) -> None:
        root = self.compose(raw)
        if root is None:
            return
        data = self._object(root, POLICY_FILE, (), node_line(root))
        if isinstance(data, dict):
            self.data = data
            self.parsed = True

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
            value = self.construct(node)
        got = value.type_name if isinstance(value, Invalid) else node_type_name(node, value)
        self.problem(loc, f"expected {_expected(spec)}, got {got}", node_line(node))

    def _scalar(self, node: Node, spec: Str | Int | Num | Bool | Choice, loc: Loc) -> Any:
        self.lines[loc] = node_line(node)
        value = self.construct(node)
        if isinstance(value, Invalid):
            self._wrong_type(node, spec, loc, value)
            return None
        if isinstance(spec, Str):
            if not isinstance(value, str):
                self._wrong_type(node, spec, loc, value)
                return None
            reason = string_problem(spec, value)
            if reason is not None:
                self.problem(loc, reason)
                return None
            return value.lower() if spec.lower else value
        if isinstance(spec, Bool):
            if not isinstance(value, bool) or node.value not in ("true", "false"):
                self._wrong_type(node, spec, loc, value)
                return None
            return value
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
        if spec.maximum is not None and value > spec.maximum:
            self.problem(loc, f"must be at most {spec.maximum:g}, got {value}")
            return None
        return value

    def _list(self, node: Node, spec: ListOf, loc: Loc, line: int) -> Any:
        if not isinstance(node, SequenceNode):
            self.lines[loc] = node_line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        items = [
            self._walk(item, spec.item, (*loc, index), node_line(item))
            for index, item in enumerate(node.value)
        ]
        if len(items) < spec.min_items:
            noun = "item" if spec.min_items == 1 else "items"
            self.problem(loc, f"must have at least {spec.min_items} {noun}")
        return items

    def _map(self, node: Node, spec: MapOf, loc: Loc, line: int) -> Any:
        if not isinstance(node, MappingNode):
            self.lines[loc] = node_line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        out: dict[str, Any] = {}

        def duplicate(key: str, first: int) -> str:
            return f"{spec.entity} {key!r} is already defined at {self.file}:{first}"

        for key, key_line, value_node in mapping_pairs(self, node, loc, duplicate):
            if not isinstance(key, str):
                if isinstance(key, Invalid):
                    got = key.type_name
                elif key is None:
                    got = "null"
                else:  # `404:` or `yes:` read as a number or a boolean
                    got = f"{type_name(key)} {key!r} (quote it)"
                self.problem(loc, f"{spec.entity} names must be strings, got {got}", key_line)
                continue
            reason = string_problem(spec.key, key, show=False)
            if reason is not None:
                self.problem(loc, f"invalid {spec.entity} name {key!r}: {reason}", key_line)
                continue
            out[key] = self._walk(value_node, spec.value, (*loc, key), key_line)
        return out

    def _object(self, node: Node, spec: Obj, loc: Loc, line: int) -> Any:
        if not isinstance(node, MappingNode):
            self.lines[loc] = node_line(node)
            self._wrong_type(node, spec, loc)
            return None
        self.lines[loc] = line
        out: dict[str, Any] = {}
        key_lines: dict[str, int] = {}

        def duplicate(key: str, first: int) -> str:
            return f"duplicate key {key!r} (first at line {first})"

        for key, key_line, value_node in mapping_pairs(self, node, loc, duplicate):
            if not isinstance(key, str):
                got = key.type_name if isinstance(key, Invalid) else type_name(key)
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
        self._check_rules(spec, loc, line, out, key_lines)
        return out

    def _check_rules(
        self, spec: Obj, loc: Loc, line: int, out: dict[str, Any], key_lines: dict[str, int]
    ) -> None:
        """The section's rules about keys that go, or must not go, together."""
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


def _unknown_key(key: str, spec: Obj) -> str:
    allowed = list(spec.fields)
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return f"unknown key {key!r}{hint}; allowed: {', '.join(allowed)}"


def _expected(spec: Spec) -> str:
    if isinstance(spec, Str):
        return "a string"
    if isinstance(spec, Int):
        return "an integer"
    if isinstance(spec, Num):
        return "a number"
    if isinstance(spec, Bool):
        return "true or false"
    if isinstance(spec, Choice):
        return "one of " + ", ".join(spec.values)
    if isinstance(spec, ListOf):
        return "a list"
    return "a mapping"


def string_problem(spec: Str, value: str, *, show: bool = True) -> str | None:
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
