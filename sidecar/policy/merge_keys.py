"""YAML merge keys (`<<: *defaults`), applied the way YAML 1.1 defines them.

Rules:
- A mapping's own keys override merged ones; of several merged mappings the first listed
  wins; merges nest. Each key keeps the line where it was written, so a problem in a value
  that came from an anchor is reported where the anchor wrote it.
- A key written twice in one mapping is a problem (reported with the caller's wording) and
  the first one is kept; a merge of something that is not a mapping, or of a mapping into
  itself, is a problem at the `<<`.
"""

from __future__ import annotations

from collections.abc import Callable

from yaml.nodes import MappingNode, Node, SequenceNode

from sidecar.policy.nodes import Loc, NodeFile, node_line

_MERGE_TAG = "tag:yaml.org,2002:merge"


def mapping_pairs(
    file: NodeFile, node: MappingNode, loc: Loc, duplicate: Callable[[str, int], str]
) -> list[tuple[object, int, Node]]:
    """The mapping's (key, key line, value node) with YAML merge keys (`<<`) applied.

    A key written twice in the mapping itself is reported with `duplicate` and the first
    one kept; a key from a merged mapping is overridden by the mapping's own, as in YAML.
    """
    merged: dict[object, tuple[int, Node]] = {}
    for source in _merge_sources(file, node, loc, {id(node)}):
        for key_node, value_node in source.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = file.construct(key_node)
            if isinstance(key, str):
                merged[key] = (node_line(key_node), value_node)
    own: list[tuple[object, int, Node]] = []
    first_line: dict[str, int] = {}
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            continue
        key = file.construct(key_node)
        if isinstance(key, str):
            if key in first_line:
                file.problem(loc, duplicate(key, first_line[key]), node_line(key_node))
                continue
            first_line[key] = node_line(key_node)
            merged.pop(key, None)
        own.append((key, node_line(key_node), value_node))
    return [(k, line, v) for k, (line, v) in merged.items()] + own


def _merge_sources(
    file: NodeFile, node: MappingNode, loc: Loc, stack: set[int]
) -> list[MappingNode]:
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
            file.problem(
                loc, "'<<' must merge a mapping or a list of mappings", node_line(key_node)
            )
            continue
        # The first mapping listed wins in YAML, so it goes last.
        for source in reversed(listed):
            if id(source) in stack:
                file.problem(loc, "'<<' merges a mapping into itself", node_line(key_node))
                continue
            sources += _merge_sources(file, source, loc, stack | {id(source)})
            sources.append(source)
    return sources
