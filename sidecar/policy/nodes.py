"""One policy file's YAML as nodes, each key and value kept with its line.

Rules:
- YAML is composed into nodes, not loaded into dicts, so every key and value keeps its line.
  `lines` maps a location (`("tenants", "search", "buckets", 0)`) to its line: a scalar's own
  line, and for a mapping or list, the line of the key (or list item) that introduced it.
- Every problem is recorded as `file:line: dotted.path: message`, with the path written the
  way a reader finds it in the file (`tenants.search.buckets[0].rate`).
- A file that cannot be decoded or parsed records one problem at the line where reading
  stopped; nothing in it is used.
"""

from __future__ import annotations

import json
import re
from typing import Any, TypeAlias

import yaml
from yaml.constructor import SafeConstructor
from yaml.nodes import MappingNode, Node, SequenceNode

from sidecar.errors import PolicyProblem

# Where a value sits in a file: ("tenants", "search", "buckets", 0, "rate").
Loc: TypeAlias = tuple[str | int, ...]

_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def node_line(node: Node) -> int:
    return int(node.start_mark.line) + 1


def dotted(loc: Loc) -> str:
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


def type_name(value: object) -> str:
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


def node_type_name(node: Node, value: object) -> str:
    if isinstance(node, MappingNode):
        return "mapping"
    if isinstance(node, SequenceNode):
        return "list"
    return type_name(value)


class Invalid:
    """A key or value that could not be read; the problem has been recorded already."""

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name


class NodeFile:
    """One file's problems and the lines of everything in it that was present, valid or not."""

    def __init__(self, file: str, problems: list[PolicyProblem]) -> None:
        self.file = file
        self.problems = problems
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
        prefix = dotted(loc)
        self.problems.append(
            PolicyProblem(
                self.file,
                self.line(loc) if line is None else line,
                f"{prefix}: {message}" if prefix else message,
            )
        )

    def compose(self, raw: bytes) -> MappingNode | None:
        """The file's top-level mapping; None when there is none (an empty file sets `parsed`,
        anything else records its problem)."""
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            line = raw[: exc.start].count(b"\n") + 1
            self.problem((), f"not valid UTF-8: {exc.reason}", line)
            return None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            self._syntax_problem(exc)
            return None
        except yaml.reader.ReaderError as exc:
            line = text.count("\n", 0, exc.position) + 1
            self.problem((), f"invalid YAML: unacceptable character #x{exc.character:04x}", line)
            return None
        except yaml.YAMLError as exc:
            self.problem((), f"invalid YAML: {exc}", 1)
            return None
        except RecursionError:
            self.problem((), "invalid YAML: nested too deeply", 1)
            return None
        if root is None:  # an empty file, or only comments: contributes nothing
            self.parsed = True
            return None
        if not isinstance(root, MappingNode):
            value = self.construct(root)
            got = value.type_name if isinstance(value, Invalid) else type_name(value)
            self.problem((), f"expected a mapping at the top level, got {got}", node_line(root))
            return None
        return root

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

    def construct(self, node: Node) -> Any:
        """A scalar node's Python value, or Invalid for collections and unreadable scalars."""
        if isinstance(node, MappingNode):
            return Invalid("mapping")
        if isinstance(node, SequenceNode):
            return Invalid("list")
        try:
            return self._constructor.construct_object(node)
        # PyYAML's scalar constructors raise more than YAMLError for values with an explicit
        # tag (`!!int abc` raises ValueError): any failure here is a value we cannot read.
        except Exception as exc:
            problem = getattr(exc, "problem", None) or str(exc)
            return Invalid(f"an unreadable {node.tag} value ({problem})")
