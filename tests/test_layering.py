"""The package's layers point one way (docs/architecture.md): a module imports only from its own layer or below.

Every import statement of every module under ``bakeedit/`` is read with ``ast`` (function-level imports too: an
import inside a function is still a dependency), mapped to the layer of the module it names, and checked against
the layer of the importing module. The same edges must form no cycle between packages. A new module outside the
table below fails the test until it is given a layer, so the shape cannot drift unnoticed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "bakeedit"

#: Lowest first. Each key is a package or top-level module of bakeedit. An import may go to its own unit or to a
#: strictly lower rank: units of one rank are siblings and do not import each other (locate and evaluate, say).
LAYERS: dict[str, int] = {
    "bakeedit": 0,  # __init__ (version)
    "bakeedit.errors": 0,
    "bakeedit.io": 1,
    "bakeedit.data": 2,
    "bakeedit.models": 2,
    "bakeedit.neurons": 3,
    "bakeedit.maps": 3,
    "bakeedit.parallel": 3,
    "bakeedit.recipe": 4,
    "bakeedit.edit": 5,
    "bakeedit.locate": 6,
    "bakeedit.evaluate": 6,
    "bakeedit.export": 7,
    "bakeedit.workflows": 8,
    "bakeedit.cli": 9,
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _unit(module: str) -> str:
    """The key of ``LAYERS`` a module belongs to (``bakeedit.locate.ine.scores`` -> ``bakeedit.locate``)."""
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def _imports(path: Path, module: str) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "bakeedit")
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import: resolve against the importing package
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            if target.split(".")[0] == "bakeedit":
                found.add(target)
                # ``from bakeedit import recipe`` names a module, not an attribute of the root package
                if target == "bakeedit":
                    found.update(f"bakeedit.{alias.name}" for alias in node.names)
    return found


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        edges[module] = _imports(path, module)
    return edges


def test_every_module_has_a_layer():
    unplaced = sorted({_unit(m) for m in _edges()} - set(LAYERS))
    assert not unplaced, f"give these a layer in tests/test_layering.py and docs/architecture.md: {unplaced}"


def test_no_module_imports_a_higher_layer_or_a_sibling():
    upward = []
    for module, targets in _edges().items():
        mine = LAYERS.get(_unit(module))
        for target in targets:
            theirs = LAYERS.get(_unit(target))
            sideways = theirs == mine and _unit(target) != _unit(module) and _unit(target) != "bakeedit"
            if mine is not None and theirs is not None and (theirs > mine or sideways):
                upward.append(f"{module} -> {target}")
    assert not upward, "imports that point up (or sideways) a layer:\n" + "\n".join(sorted(upward))


def test_packages_form_no_cycle():
    graph: dict[str, set[str]] = {}
    for module, targets in _edges().items():
        graph.setdefault(_unit(module), set()).update(
            _unit(t) for t in targets if _unit(t) != _unit(module) and _unit(t) != "bakeedit"
        )
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            pytest.fail("package cycle: " + " -> ".join(cycle))


def test_the_checker_sees_an_upward_import(tmp_path):
    """The parser must find a function-level import, or the tests above prove nothing."""
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from bakeedit.cli.main import console\n    return console\n")
    assert _imports(module, "bakeedit.models.m") == {"bakeedit.cli.main"}
