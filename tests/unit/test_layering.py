"""The layering of the packages, read from the source (every import, function-level and
TYPE_CHECKING ones included):

- ``mpq`` (the shared values) imports none of ``quantizers``, ``evaluators``, ``search``;
- ``quantizers`` and ``evaluators`` never import the search application (anything under ``search``);
- the import graph of the project's modules has no cycle.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mpq", "quantizers", "evaluators", "search")

#: package -> the packages its modules must never import.
FORBIDDEN = {
    "mpq": ("quantizers", "evaluators", "search"),
    "quantizers": ("search",),
    "evaluators": ("search",),
}


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def project_modules(root: Path, packages: Iterable[str] = PACKAGES) -> dict[str, Path]:
    """Every module of the packages, by dotted name."""
    out: dict[str, Path] = {}
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            out[module_name(path, root)] = path
    return out


def imports_of(name: str, path: Path, known: Iterable[str]) -> set[str]:
    """The project modules that module ``name`` imports anywhere in its source."""
    known = set(known)
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base if is_package else base[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(t for t in targets if t in known)
    return found


def import_graph(root: Path = REPO, packages: Iterable[str] = PACKAGES) -> dict[str, set[str]]:
    """Module -> the project modules it imports."""
    modules = project_modules(root, packages)
    return {name: imports_of(name, path, modules) - {name} for name, path in modules.items()}


def violations(graph: Mapping[str, Iterable[str]], forbidden: Mapping[str, Iterable[str]] = FORBIDDEN) -> list[str]:
    """``importer -> imported`` for every import that crosses a forbidden boundary."""
    out = []
    for module, targets in sorted(graph.items()):
        banned = tuple(forbidden.get(module.split(".")[0], ()))
        for target in sorted(targets):
            if target.split(".")[0] in banned:
                out.append(f"{module} -> {target}")
    return out


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str] | None:
    """One import cycle as ``[a, b, ..., a]``, or ``None`` when the graph is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


# --------------------------------------------------------------------------------------
# The checker, on small synthetic graphs and files
# --------------------------------------------------------------------------------------
def test_find_cycle_reports_the_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_violations_name_the_crossing_import():
    graph = {"mpq.data": {"mpq.files", "search.spec"}, "quantizers.base": {"mpq.assignment"},
             "evaluators.coco": {"search.demo"}, "search.study": {"quantizers.registry"}}
    assert violations(graph) == ["evaluators.coco -> search.demo", "mpq.data -> search.spec"]


def test_imports_are_found_in_functions_type_checking_and_relative_forms(tmp_path):
    pkg = tmp_path / "mpq"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "other.py").write_text("")
    (pkg / "mod.py").write_text(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from search.spec import StudySpec\n"
        "def f():\n    import quantizers.base\n    from . import other\n")
    for name in ("search", "quantizers"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("")
    (tmp_path / "search" / "spec.py").write_text("import mpq.mod\n")
    (tmp_path / "quantizers" / "base.py").write_text("")
    graph = import_graph(tmp_path, ("mpq", "search", "quantizers"))
    assert graph["mpq.mod"] == {"search.spec", "quantizers.base", "mpq", "mpq.other"}
    assert violations(graph) == ["mpq.mod -> quantizers.base", "mpq.mod -> search.spec"]
    assert find_cycle(graph) == ["mpq.mod", "search.spec", "mpq.mod"]


# --------------------------------------------------------------------------------------
# The repository
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def test_every_package_is_read(graph):
    for module in ("mpq.assignment", "quantizers.registry", "evaluators.coco", "search.study",
                   "search.commands.run"):
        assert module in graph


def test_lower_layers_never_import_upper_ones(graph):
    assert violations(graph) == []


def test_the_import_graph_has_no_cycle(graph):
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])
