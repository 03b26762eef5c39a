"""Imports point one way: no cycle among corelm's modules, counting the imports inside functions too
(a lazy import hides a cycle from Python, not from the reader), and no command imports another command."""

from __future__ import annotations

import ast
from pathlib import Path

import corelm

ROOT = Path(corelm.__file__).parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """corelm modules that ``name`` imports anywhere in its source (explicit imports only: a package's
    ``__init__`` running before its submodules is an order, not a dependency)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                target = f"{base}.{alias.name}"
                found.add(target if target in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in modules and m != name}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules along it, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def test_no_import_cycle():
    cycle = _cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_loader_knows_nothing_of_wrappers_training_or_commands():
    graph = _graph()
    reach, todo = set(), ["corelm.loading"]
    while todo:
        for nxt in graph[todo.pop()] - reach:
            reach.add(nxt)
            todo.append(nxt)
    assert not {m for m in reach if m in ("corelm.api", "corelm.finetune.run", "corelm.train.loop")
                or m.startswith("corelm.commands")}


def test_no_command_imports_another_command():
    """Commands share code through library modules (or commands/args.py, commands/decoding.py), never by
    importing each other: a command module is only an argument parser over library functions."""
    from corelm.cli import COMMANDS

    commands = {f"corelm.commands.{module}" for module, _ in COMMANDS.values()}
    graph = _graph()
    crossing = {(c, d) for c in commands for d in graph[c] if d in commands}
    assert not crossing, crossing
