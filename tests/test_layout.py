"""The layers import one way: rendering and results never import a command."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "adapter_fix"
RENDERING = [
    *sorted((PACKAGE / "report").glob("*.py")),
    PACKAGE / "progress.py",
    PACKAGE / "results.py",
    PACKAGE / "options.py",
]


def _imported(path: Path) -> set[str]:
    """Every module `path` imports, at the top or inside a function."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
    return names


def test_no_rendering_module_imports_a_command() -> None:
    for path in RENDERING:
        commands = {name for name in _imported(path) if name.startswith("adapter_fix.commands")}
        assert not commands, f"{path.name} imports {commands}"


def test_rendering_loads_no_command_even_indirectly() -> None:
    modules = ["adapter_fix.progress"] + [
        f"adapter_fix.report.{path.stem}" for path in RENDERING if path.parent.name == "report"
    ]
    code = (
        f"import importlib, sys\nfor name in {modules!r}: importlib.import_module(name)\n"
        "print(sorted(m for m in sys.modules if m.startswith('adapter_fix.commands')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert loaded == "[]"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` (module -> modules it imports), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        stack.append(module)
        for imported in sorted(graph.get(module, ())):
            if state.get(imported) == "open":
                return [*stack[stack.index(imported) :], imported]
            if imported not in state and (found := visit(imported)) is not None:
                return found
        stack.pop()
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)) is not None:
            return found
    return None


def test_io_modules_import_each_other_without_a_cycle() -> None:
    paths = sorted((PACKAGE / "io").glob("*.py"))
    names = {_module_name(path) for path in paths}
    graph = {_module_name(path): _imported(path) & names for path in paths}
    assert _cycle(graph) is None
    assert _cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]  # the check itself finds one
