"""The package layering has no cycles: every import of a project module, at module level or
inside a function (where a cycle hides until the function runs), is an edge of the graph, and
the graph must be acyclic. Imports under ``if TYPE_CHECKING:`` are annotations, not edges."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("lora_jax", "ensemble", "t5_hybrid", "benchmarks")


def module_name(path: pathlib.Path, root: pathlib.Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return isinstance(test, ast.Name) and test.id == "TYPE_CHECKING" or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(node: ast.AST):
    """Import nodes in `node` and below, except in the body of ``if TYPE_CHECKING:``."""
    if isinstance(node, ast.Import | ast.ImportFrom):
        yield node
        return
    children = node.orelse if _type_checking_only(node) else ast.iter_child_nodes(node)
    for child in children:
        yield from _imports(child)


def import_graph(root: pathlib.Path, packages) -> dict[str, set[str]]:
    """{module: project modules it imports} over the .py files of `packages` under `root`."""
    files = [p for package in packages for p in sorted((root / package).rglob("*.py"))]
    modules = {module_name(p, root): p for p in files}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges = graph.setdefault(name, set())
        for node in _imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the importing module's package
                    package = name.split(".") if is_package else name.split(".")[:-1]
                    package = package[: len(package) - (node.level - 1)]
                    base = ".".join([*package, *([base] if base else [])])
                targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                           for alias in node.names]
            for target in targets:
                while target and target not in modules:  # a.b.func -> a.b
                    target = target.rpartition(".")[0]
                if target and target != name:
                    edges.add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_project_imports_have_no_cycle():
    graph = import_graph(ROOT, PACKAGES)
    assert {"lora_jax.trainer", "lora_jax.checkpoint", "ensemble.features"} <= set(graph)
    assert "lora_jax.checkpoint" in graph["lora_jax.trainer"]
    found = cycles(graph)
    assert found == [], "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_only_experiments_import_the_training_loop():
    """The loop (lora_jax.trainer) is imported by the experiments that train and by the
    benchmarks that time its step; what reads a finished run (its checkpoints, its record, the
    run loaders' common part, export, attribution) reaches neither it nor an experiment."""
    graph = import_graph(ROOT, PACKAGES)
    importers = {m for m, edges in graph.items() if "lora_jax.trainer" in edges}
    assert {m for m in importers if not m.startswith("benchmarks.")} == {
        "lora_jax.classifier", "ensemble.train", "ensemble.fusion", "t5_hybrid.train"}

    def reaches(start: str) -> set[str]:
        seen, todo = set(), [start]
        while todo:
            for w in graph.get(todo.pop(), ()):
                if w not in seen:
                    seen.add(w)
                    todo.append(w)
        return seen

    for reader in ("lora_jax.checkpoint", "lora_jax.results", "lora_jax.runs",
                   "lora_jax.export", "lora_jax.attribute"):
        assert not reaches(reader) & {"lora_jax.trainer", *importers}, reader


def test_a_cycle_hidden_inside_a_function_is_found(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg import b\n")
    (pkg / "b.py").write_text("def f():\n    from pkg.a import thing\n    return thing\n")
    (pkg / "c.py").write_text("from typing import TYPE_CHECKING\n"
                              "if TYPE_CHECKING:\n    from pkg import a\n"
                              "from . import b\n")
    graph = import_graph(tmp_path, ("pkg",))
    assert graph["pkg.c"] == {"pkg.b"}  # the TYPE_CHECKING import is no edge
    assert cycles(graph) == [["pkg.a", "pkg.b"]]
