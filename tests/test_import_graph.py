"""No import circle anywhere in fastfat/: every import (module-level or inside a function) read
from the source with ast, resolved to fastfat's own modules, and the graph checked for cycles."""
from __future__ import annotations

import ast
import pathlib

import fastfat
import fastfat.kernels   # loaded explicitly: the graph below reads where it lives

ROOT = pathlib.Path(fastfat.__file__).parent


def _modules() -> dict[str, pathlib.Path]:
    """Every module of the package (fastfat.kernels lives in kernels/, installed as fastfat.kernels)."""
    roots = [(ROOT, "fastfat")]
    kernels = pathlib.Path(fastfat.kernels.__file__).parent
    if kernels.parent != ROOT:
        roots.append((kernels, "fastfat.kernels"))
    mods = {}
    for base, prefix in roots:
        for path in base.rglob("*.py"):
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([prefix, *parts])] = path
    return mods


def import_graph() -> dict[str, set[str]]:
    """module -> the fastfat modules it imports. `from .pkg import name` counts as an import of
    pkg.name when that is a module, else of pkg; importing a module also runs its packages'
    __init__, but a package importing its own submodules is not a circle, so parents are left out."""
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for a in node.names:
                    targets.append(f"{src}.{a.name}" if f"{src}.{a.name}" in mods else src)
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_checker_finds_a_circle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_sees_function_level_imports():
    g = import_graph()
    assert "fastfat.config" in g and "fastfat.kernels" in g
    assert "fastfat.errors" in g["fastfat.config"]


def test_no_import_circle_in_fastfat():
    found = cycles(import_graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)
