"""No import circle among the project's modules: bundle/scripts (imported as ``scripts.*``) and study/ (``study.*``).

Every ``import`` / ``from ... import`` statement is read from the source with ``ast`` (those inside functions too: a
deferred import still ties the two modules together), kept when it names one of these modules, and the resulting
graph is searched for a cycle. Nothing is imported or run.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGES = {"scripts": ROOT / "bundle" / "scripts", "study": ROOT / "study"}


def module_files(packages: dict[str, Path]) -> dict[str, Path]:
    """{dotted module name: file} of every module of ``packages`` ({package name: its folder})."""
    files = {}
    for package, folder in packages.items():
        for path in sorted(folder.glob("*.py")):
            files[package if path.stem == "__init__" else f"{package}.{path.stem}"] = path
    return files


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """The modules of ``known`` that the file at ``path`` imports, anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from study import benchmark` imports study.benchmark; `from study.benchmark import x` the module itself
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in known)
    return found


def import_graph(packages: dict[str, Path]) -> dict[str, set[str]]:
    """{module: the modules of ``packages`` it imports}, a module's import of itself left out."""
    files = module_files(packages)
    return {name: imported_modules(path, set(files)) - {name} for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` as [a, b, ..., a], or None when there is none (depth-first search)."""
    done, on_path = set(), []

    def visit(node: str) -> list[str] | None:
        if node in on_path:
            return on_path[on_path.index(node):] + [node]
        if node in done:
            return None
        on_path.append(node)
        for target in sorted(graph.get(node, ())):
            cycle = visit(target)
            if cycle:
                return cycle
        on_path.pop()
        done.add(node)
        return None

    for start in sorted(graph):
        cycle = visit(start)
        if cycle:
            return cycle
    return None


def test_the_project_modules_import_without_a_circle():
    graph = import_graph(PACKAGES)
    assert "study.benchmark" in graph and "scripts.losses" in graph["study.benchmark"]   # the walk sees real imports
    cycle = find_cycle(graph)
    assert cycle is None, f"import circle: {' -> '.join(cycle)}"


def test_a_circle_is_found_even_through_a_deferred_import(tmp_path):
    folder = tmp_path / "pkg"
    folder.mkdir()
    (folder / "__init__.py").write_text("")
    (folder / "a.py").write_text("from pkg.b import helper\n")
    (folder / "b.py").write_text("def helper():\n    from pkg import c\n")
    (folder / "c.py").write_text("import pkg.a\n")
    (folder / "d.py").write_text("from pkg.c import x\n")   # into the circle, not part of it
    graph = import_graph({"pkg": folder})
    assert graph["pkg.d"] == {"pkg.c"}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.c", "pkg.a"]
    (folder / "c.py").write_text("")
    assert find_cycle(import_graph({"pkg": folder})) is None
