"""docs/layout.md matches the code: it is generated from the package tree (fastfat/, kernels/,
bench/) and each module's docstring (its first sentence), so a module without a docstring, a
module the page does not list, or a line for a module that is gone fails here. Regenerate the
page with `python tests/test_layout_doc.py`."""
from __future__ import annotations

import ast
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGE = os.path.join(ROOT, "docs", "layout.md")
TREES = ("fastfat", "kernels", "bench")   # kernels/ is installed as fastfat.kernels
SKIP = {"__pycache__"}
HEAD = """# Layout: where the code lives

One section per package, one line per module: its docstring's first sentence. Generated from the
tree by `python tests/test_layout_doc.py`; tests/test_layout_doc.py fails when a module has no
docstring, is missing here, or is listed here but gone. kernels/ is installed as `fastfat.kernels`;
tests/ holds the test suite.
"""


def first_sentence(path: str) -> str | None:
    """A module's docstring's first sentence on one line (None without a docstring)."""
    with open(path, encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read(), path))
    if not doc or not doc.strip():
        return None
    para = " ".join(doc.strip().split("\n\n")[0].split())
    m = re.search(r"(?<![.][a-z])(?<!e\.g)(?<!i\.e)\.(\s|$)", para)
    return (para[:m.start() + 1] if m else para).replace("|", "\\|")


def packages() -> dict[str, list[str]]:
    """package directory (relative, '/'-separated) -> its modules' file names, sorted."""
    out = {}
    for tree in TREES:
        for dirpath, dirnames, files in os.walk(os.path.join(ROOT, tree)):
            dirnames[:] = sorted(d for d in dirnames if d not in SKIP and not d.startswith("."))
            mods = sorted(f for f in files if f.endswith(".py"))
            if mods:
                out[os.path.relpath(dirpath, ROOT).replace(os.sep, "/")] = mods
    return out


def render() -> str:
    """The page as generated from the tree; a module without a docstring reads 'NO DOCSTRING'."""
    lines = [HEAD]
    for pkg, mods in packages().items():
        lines += [f"## {pkg}/", ""]
        init = os.path.join(ROOT, pkg, "__init__.py")
        if os.path.exists(init) and first_sentence(init):
            lines += [first_sentence(init), ""]
        lines += ["| module | what it holds |", "|:---|:---|"]
        for m in mods:
            if m == "__init__.py":
                continue
            lines.append(f"| `{m}` | {first_sentence(os.path.join(ROOT, pkg, m)) or 'NO DOCSTRING'} |")
        lines.append("")
    return "\n".join(lines)


def test_every_module_has_a_docstring():
    missing = [f"{pkg}/{m}" for pkg, mods in packages().items() for m in mods
               if first_sentence(os.path.join(ROOT, pkg, m)) is None and m != "__init__.py"]
    assert not missing, "modules without a docstring saying what they hold: " + ", ".join(missing)


def test_layout_page_matches_the_tree():
    want = render()
    have = open(PAGE, encoding="utf-8").read()
    listed = set(re.findall(r"^## (\S+)/$", have, re.M))
    mods = {f"{s}/{m}" for s in listed for m in re.findall(r"^\| `([^`]+)` \|", have.split(f"## {s}/\n")[1].split("\n## ")[0], re.M)}
    real = {f"{pkg}/{m}" for pkg, ms in packages().items() for m in ms if m != "__init__.py"}
    assert not (mods - real), f"docs/layout.md lists modules that are gone: {sorted(mods - real)}"
    assert not (real - mods), f"docs/layout.md does not list: {sorted(real - mods)} (python tests/test_layout_doc.py)"
    assert have == want, "docs/layout.md differs from the tree's docstrings: run python tests/test_layout_doc.py"


if __name__ == "__main__":
    with open(PAGE, "w", encoding="utf-8") as f:
        f.write(render())
    print(f"wrote {PAGE}")
    sys.exit(0)
