"""No import circle anywhere in fastfat/: every import (module-level or inside a function) read
from the source with ast, resolved to fastfat's own modules, and the graph checked for cycles.
And names come from their home: no `from M import name` where M only re-exports name (a
package's __all__ aside), and no module imports another's private _name."""
from __future__ import annotations

import ast
import pathlib

import fastfat
import fastfat.kernels   # loaded explicitly: the graph below reads where it lives

ROOT = pathlib.Path(fastfat.__file__).parent


def _source(node: ast.ImportFrom, package: str) -> str:
    """The absolute module a `from ... import` in package names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    base = package.split(".")
    base = base[:len(base) - node.level + 1]
    return ".".join(base + ([node.module] if node.module else []))


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
                src = _source(node, package)
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


# ---------------------------------------------------------------------------------------------
# Names come from their home: an import names the module that defines the name, and no module
# imports another module's private (_x) name.

def _bound_names(tree: ast.Module) -> tuple[set[str], set[str], list[str]]:
    """(defined, imported, __all__) of a module's top level: names bound by def, class and
    assignment (also inside top-level if/try/with), names bound by an import, and __all__."""
    defined, imported, public = set(), set(), []

    def targets(t):
        if isinstance(t, ast.Name):
            defined.add(t.id)
        elif isinstance(t, (ast.Tuple, ast.List)):
            for e in t.elts:
                targets(e)

    def visit(body):
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                defined.add(node.name)
            elif isinstance(node, ast.Assign):
                for t in node.targets:
                    targets(t)
                if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets) \
                        and isinstance(node.value, (ast.List, ast.Tuple)):
                    # the listed strings (a starred entry, a lazy table's keys, binds nothing here)
                    public.extend(e.value for e in node.value.elts if isinstance(e, ast.Constant))
            elif isinstance(node, (ast.AnnAssign, ast.AugAssign)):
                targets(node.target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                imported.update((a.asname or a.name).partition(".")[0] for a in node.names)
            elif isinstance(node, ast.If):
                visit(node.body), visit(node.orelse)
            elif isinstance(node, ast.Try):
                visit(node.body), visit(node.orelse), visit(node.finalbody)
                for h in node.handlers:
                    visit(h.body)
            elif isinstance(node, (ast.With, ast.For)):
                visit(node.body)
    visit(tree.body)
    return defined, imported - defined, public


def misplaced_imports(sources: dict[str, tuple[str, bool]]) -> list[str]:
    """Every `from M import name` (module level or in a function) of one of `sources`' modules
    (name -> (source text, is a package's __init__)) from another of them, where name is private
    (_x, not dunder), or where M does not define name but only imports it, unless M is a
    package whose __all__ lists it (a package's declared API, re-exported from its own
    submodules). As 'importer: from M import name (why)'."""
    trees = {m: ast.parse(src) for m, (src, _) in sources.items()}
    bound = {m: _bound_names(t) for m, t in trees.items()}
    out = []
    for mod, tree in trees.items():
        package = mod if sources[mod][1] else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom):
                continue
            src = _source(node, package)
            if src not in sources or src == mod:
                continue
            defined, imported, public = bound[src]
            for a in node.names:
                name = a.name
                if f"{src}.{name}" in sources:
                    continue   # a submodule
                if name.startswith("_") and not name.startswith("__"):
                    out.append(f"{mod}: from {src} import {name} (private to {src})")
                elif name not in defined and not (sources[src][1] and name in public):
                    why = "re-exported there" if name in imported else "not defined there"
                    out.append(f"{mod}: from {src} import {name} ({why})")
    return sorted(out)


def test_the_checker_finds_misplaced_imports():
    src = {"p": ("from .a import f, g\n__all__ = ['f']\n", True),
           "p.a": ("def f(): pass\ndef g(): pass\ndef _h(): pass\nif True:\n    K = 1\n", False),
           "p.b": ("from .a import f, _h, K\nfrom . import a\n", False),
           "p.c": ("from . import f\nfrom .b import f as g\n\ndef u():\n    from p import g\n", False)}
    assert misplaced_imports(src) == [
        "p.b: from p.a import _h (private to p.a)",
        "p.c: from p import g (re-exported there)",        # in p, but not in its __all__
        "p.c: from p.b import f (re-exported there)"]       # from p.b, which imports it from p.a


def test_names_are_imported_from_their_home():
    mods = _modules()
    sources = {m: (p.read_text(), p.name == "__init__.py") for m, p in mods.items()}
    found = misplaced_imports(sources)
    assert not found, "imports not from the name's home, or of private names:\n" + "\n".join(found)
