"""The tree keeps its architecture: the daemon never imports the lab, and no
module imports itself back through a cycle.

A small AST walk over ``smsd/``: every ``import``/``from`` (at any depth, so
lazy imports inside functions count too) becomes an edge between modules.
``smsd.cli`` is the one daemon module allowed to reach into ``smsd.lab``:
it dispatches the lab's subcommands, lazily.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "smsd"
LAB = "smsd.lab"
LAB_DISPATCHER = "smsd.cli"
MAX_LINES = 650  # "about 600": a module past this holds more than one job


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The smsd modules that ``name`` imports, resolved to known module names."""
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            targets = [f"{prefix}.{alias.name}" for alias in node.names] + [prefix]
        for target in targets:
            # "from smsd import journal" names a module; "from smsd.model import Sms" names a class.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("smsd"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) - {"smsd"} for name, path in mods.items()}


def in_lab(name: str) -> bool:
    return name == LAB or name.startswith(LAB + ".")


def test_the_daemon_never_imports_the_lab() -> None:
    graph = import_graph()
    offenders = sorted(f"{src} imports {dst}" for src, dsts in graph.items() if not in_lab(src)
                       for dst in dsts if in_lab(dst) and src != LAB_DISPATCHER)
    assert not offenders, "daemon modules import the lab:\n" + "\n".join(offenders)


def test_no_import_cycles() -> None:
    graph = import_graph()
    # Package __init__ modules are imported by their children implicitly; edges
    # into a package's own __init__ are not part of the module map.
    cycles: list[list[str]] = []
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_no_module_holds_several_jobs_by_size() -> None:
    long = sorted(f"{name}: {len(path.read_text().splitlines())} lines"
                  for name, path in modules().items() if len(path.read_text().splitlines()) > MAX_LINES)
    assert not long, "modules over about 600 lines (split them by job):\n" + "\n".join(long)


@pytest.mark.parametrize("src, dst", [("smsd.pipeline", "smsd.lab.bench")])
def test_the_walk_sees_a_forbidden_import(tmp_path: Path, src: str, dst: str) -> None:
    """The checker itself can fail: a lazy import of the lab inside a function is found."""
    fake = tmp_path / "pipeline.py"
    fake.write_text("def f():\n    from .lab import bench\n")
    assert dst in imports_of(src, fake, set(modules()))
