"""The source tree reads like the system: no import cycles, and every module says what it owns."""

from __future__ import annotations

import ast
from pathlib import Path

import polyfan

PACKAGE = Path(polyfan.__file__).parent
PURE = (
    "polyfan.wire.codec",
    "polyfan.wire.ingest",
    "polyfan.wire.peers",
    "polyfan.feed.",
    "polyfan.bars.",
    "polyfan.fanout.",
    "polyfan.web.admission",
    "polyfan.web.http",
)
IO_MODULES = ("asyncio", "zmq", "websockets", "click", "socket")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))}


def polyfan_imports(tree: ast.Module, known: set[str]) -> set[str]:
    """The polyfan modules a module imports, anywhere in it (a function-level import is one too)."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("polyfan"):
            for alias in node.names:
                full = f"{node.module}.{alias.name}"
                found.add(full if full in known else node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("polyfan"))
    return found


def test_no_polyfan_module_imports_itself_round_a_cycle() -> None:
    trees = modules()
    graph = {name: polyfan_imports(tree, set(trees)) - {name} for name, tree in trees.items()}
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for dep in sorted(graph.get(name, ())):
            if dep in graph and state.get(dep) == 1:
                cycles.append([*path[path.index(dep) :], dep])
            elif dep in graph and dep not in state:
                visit(dep, [*path, dep])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []


def test_every_module_opens_with_what_it_owns() -> None:
    missing = [
        name
        for name, tree in modules().items()
        if name != "polyfan.__main__" and not ast.get_docstring(tree)
    ]
    assert missing == []


def test_the_pure_modules_import_no_io() -> None:
    impure = {}
    for name, tree in modules().items():
        if not name.startswith(PURE):
            continue
        for node in ast.walk(tree):
            imported = []
            if isinstance(node, ast.Import):
                imported = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                imported = [node.module]
            bad = [m for m in imported if m.split(".")[0] in IO_MODULES]
            if bad:
                impure[name] = bad
    assert impure == {}
