"""No import loops: every module imports on its own, in any order, and the import graph has no cycle."""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for p in sorted((SRC / "hevisum").rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _imports(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every hevisum module ``mod`` imports, at module level or inside functions (not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text())
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    pkg = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for n in names:
            if n in known and n != mod:
                found.add(n)
    return found


def test_the_import_graph_of_the_package_has_no_cycle():
    mods = _modules()
    known = set(mods)
    graph = {m: _imports(m, p, known) for m, p in mods.items()}
    # A package importing its own submodules (to register them) is not a loop; a submodule importing back
    # a sibling that imports it is.
    for m in graph:
        graph[m] = {d for d in graph[m] if not (d.startswith(m + ".") and mods[m].name == "__init__.py")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycle = stack[stack.index(d):] + [d]
                raise AssertionError("import loop: " + " -> ".join(cycle))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_every_module_imports_on_its_own_in_any_order():
    mods = sorted(_modules())
    order = mods[:]
    random.Random(0).shuffle(order)
    code = "import importlib\nfor m in %r:\n    importlib.import_module(m)\n"
    for seq in (mods, order, list(reversed(mods))):
        proc = subprocess.run([sys.executable, "-c", code % seq], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_method_name_is_matched_outside_the_registry():
    """Method names live in hevisum.methods only: other modules ask the registry."""
    from hevisum.methods import method_names

    # hyphenated names only: "mean" and "stacking" are also ordinary words and module names
    names = [n for n in method_names(include_stackers=True) if "-" in n]
    # cli.py: help texts name the defaults; models/: network names of the factory (a network is not a method)
    allowed = {"hevisum/methods", "hevisum/cli.py", "hevisum/models/"}
    offenders = []
    for p in (SRC / "hevisum").rglob("*.py"):
        rel = p.relative_to(SRC).as_posix()
        if any(rel.startswith(a) for a in allowed):
            continue
        text = p.read_text()
        for n in names:
            if f'"{n}"' in text or f"'{n}'" in text:
                offenders.append(f"{rel}: {n}")
    assert not offenders, offenders
