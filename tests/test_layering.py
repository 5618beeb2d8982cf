"""The shape of the code: imports only go down the layers, the core stays pure, and no module
or function grows past what a reader takes in at once.

`python -m tests.test_layering` prints the import graph between the sidecar's modules.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "sidecar"

# Low to high. A module may import modules of a lower layer, or of its own package.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("sidecar.errors",),
    ("sidecar.policy.spec", "sidecar.policy.choices"),  # the vocabulary of the model
    ("sidecar.policy.token_policy",),  # a section of it, re-exported by the model
    ("sidecar.policy.model",),
    ("sidecar.core",),
    ("sidecar.policy", "sidecar.settings"),
    ("sidecar.plain_metrics",),  # lock-free series of the hot paths, for Metrics
    ("sidecar.experience",),  # the per-tenant experience series, attached to Metrics
    ("sidecar.demand",),
    ("sidecar.usage_series",),
    ("sidecar.metrics", "sidecar.state", "sidecar.gc_pauses"),
    (
        "sidecar.backends",
        "sidecar.deferral",
        "sidecar.leases",
        "sidecar.accounting",
        "sidecar.usage",
    ),
    ("sidecar.quota_peek", "sidecar.recent_refusals"),
    ("sidecar.batching",),
    ("sidecar.shared_reads", "sidecar.leased", "sidecar.shadow_mode"),
    ("sidecar.completions",),
    ("sidecar.service",),
    ("sidecar.envoy", "sidecar.admin"),
    ("sidecar.app", "sidecar.workers"),
    ("sidecar.top",),
    ("sidecar.usage_report",),
    ("sidecar.simulate",),  # replays traffic through the core: uses nothing above policy
    ("sidecar.cli",),
)
# The decision core is pure: the clock, the network and the event loop stay outside it.
IMPURE = ("asyncio", "grpc", "aiohttp", "redis", "uvloop", "time", "socket", "threading")
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(tree: ast.Module) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def layer_of(name: str) -> tuple[int, str]:
    """(layer index, the LAYERS prefix that matched): the longest matching prefix wins."""
    best: tuple[int, str] | None = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and (
                best is None or len(prefix) > len(best[1])
            ):
                best = (index, prefix)
    assert best is not None, f"{name} is in no layer: add it to LAYERS"
    return best


def graph() -> dict[str, set[str]]:
    names = modules()
    return {
        name: {imp for imp in imports_of(tree) if imp in names and imp != name}
        for name, tree in names.items()
    }


def test_every_module_has_a_layer() -> None:
    for name in modules():
        if name != "sidecar":
            layer_of(name)


def test_imports_only_go_down() -> None:
    climbing = []
    for name, imported in graph().items():
        if name == "sidecar":
            continue
        mine = layer_of(name)
        for target in imported:
            theirs = layer_of(target)
            if theirs[0] > mine[0] or (theirs[0] == mine[0] and theirs[1] != mine[1]):
                climbing.append(f"{name} -> {target}")
    assert not climbing, "imports that climb or cross a layer:\n" + "\n".join(sorted(climbing))


def test_the_core_is_pure() -> None:
    for name, tree in modules().items():
        if not name.startswith("sidecar.core"):
            continue
        bad = {imp for imp in imports_of(tree) if imp.split(".")[0] in IMPURE}
        assert not bad, f"{name} imports {sorted(bad)}"


def test_the_sidecar_never_imports_its_test_bench() -> None:
    for name, tree in modules().items():
        assert not any(imp.split(".")[0] in {"devstack", "tests"} for imp in imports_of(tree)), name


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: p.name)
def test_modules_and_functions_stay_small(path: Path) -> None:
    source = path.read_text()
    assert source.count("\n") <= MAX_MODULE_LINES, f"{path} has {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            assert length <= MAX_FUNCTION_LINES, f"{path}:{node.lineno} {node.name}: {length}"


def test_the_wheel_holds_the_sidecar_not_its_test_bench() -> None:
    """What `pip wheel .` packs: the packages pyproject's find-rule selects."""
    import tomllib

    from setuptools import find_packages

    rule = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(ROOT), include=rule["packages"]["find"]["include"])
    assert "sidecar" in packages and "sidecar.core" in packages
    assert all(name == "sidecar" or name.startswith("sidecar.") for name in packages), packages


def main() -> None:
    for name, imported in sorted(graph().items()):
        if imported:
            short = sorted(i.removeprefix("sidecar.") for i in imported)
            sys.stdout.write(f"{name.removeprefix('sidecar.')} -> {', '.join(short)}\n")


if __name__ == "__main__":
    main()
