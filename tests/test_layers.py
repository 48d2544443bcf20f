"""The package's layers import each other one way only.

Every import of one krea2kit unit (a top-level module or subpackage) by another counts,
lazy imports inside functions included: a lazy import still ties the two layers together,
it only hides the tie from Python's import machinery. Imports under ``if TYPE_CHECKING:``
are annotations only and do not count.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "krea2kit"


def _unit(module: str) -> str | None:
    """``krea2kit.recipe.plan`` -> ``recipe``; ``krea2kit`` itself -> ``krea2kit``."""
    parts = module.split(".")
    if parts[0] != "krea2kit":
        return None
    return parts[1] if len(parts) > 1 else "krea2kit"


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, package: str):
    """krea2kit modules imported in ``tree`` (relative imports resolved against ``package``,
    the dotted package the file is in), skipping ``if TYPE_CHECKING:`` bodies."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module:
                    yield node.module, node.lineno
                continue
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            names = [node.module] if node.module else [alias.name for alias in node.names]
            for name in names:
                yield ".".join([*base, name]), node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, node.lineno
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, dict[str, list[str]]]:
    """unit -> {imported unit: ["file:line", ...]}."""
    graph: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent)
        dotted = ".".join(rel.with_suffix("").parts)
        package = dotted.rsplit(".", 1)[0]  # a package's __init__ is inside the package itself
        source = _unit(dotted)
        if source == "__init__":
            source = "krea2kit"
        for module, line in _imports(ast.parse(path.read_text(encoding="utf-8")), package):
            target = _unit(module)
            if target and not (PACKAGE / target).is_dir() and not (PACKAGE / f"{target}.py").is_file():
                target = "krea2kit"  # `from krea2kit import __version__`: a name of the package itself
            if target and target != source and target != "krea2kit":
                graph[source][target].append(f"{rel}:{line}")
    return graph


def find_cycle(graph: dict[str, dict[str, list[str]]]) -> list[str] | None:
    """One cycle of units, as a path that returns to its start, or ``None``."""
    state: dict[str, int] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        trail.append(node)
        for nxt in sorted(graph.get(node, {})):
            if state.get(nxt) == 1:
                return trail[trail.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        trail.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles_between_layers():
    graph = import_graph()
    cycle = find_cycle(graph)
    if cycle:
        where = [f"{a} -> {b} ({', '.join(graph[a][b][:3])})" for a, b in zip(cycle, cycle[1:])]
        pytest.fail("import cycle between layers:\n  " + "\n  ".join(where))


def test_models_are_pure_torch_modules():
    """``models/`` is the bottom layer: pure torch modules (with their weight readers, quantized
    storage included) that may use errors and atomic file writes, nothing above."""
    allowed = {"errors", "env_values", "files"}
    above = {unit: places for unit, places in import_graph()["models"].items() if unit not in allowed}
    assert not above, f"models/ reaches up into {above}"


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b": []}, "b": {"c": []}, "c": {"a": []}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b": []}, "b": {}}) is None
