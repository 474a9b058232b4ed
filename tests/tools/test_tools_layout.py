"""House rules for tools/: short functions, and no tool reaching into another tool's private names."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

TOOLS = REPO / "tools"


def _tool_sources() -> list[Path]:
    return sorted(TOOLS.rglob("*.py"))


def _code_lines(function: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines of a function from its ``def`` to its end, less its docstring (the Args list of a CLI)."""
    lines = function.end_lineno - function.lineno + 1
    first = function.body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
        lines -= first.end_lineno - first.lineno + 1
    return lines


def test_no_function_in_tools_is_longer_than_120_lines():
    long = []
    for path in _tool_sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and _code_lines(node) > 120:
                long.append(f"{path.relative_to(REPO)}:{node.name} ({_code_lines(node)} lines)")
    assert long == []


def test_no_module_imports_a_private_name_of_a_tool():
    """``from tools.x import _y`` (or ``tools.x._y``) anywhere in tools/ or tests/ is a tool used as a library."""
    offenders = []
    for path in _tool_sources() + sorted((REPO / "tests").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tools"):
                offenders += [f"{path.name}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                base = ast.unparse(node.value)
                if base.startswith("tools."):
                    offenders.append(f"{path.name}: {base}.{node.attr}")
    assert offenders == []


def test_python_m_tools_lists_every_command_with_one_line():
    """``python -m tools`` names every module with a command line, one line each, and runs one by name."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "tools"], cwd=REPO, capture_output=True, text=True, check=True)
    runnable = sorted(
        p.stem for p in TOOLS.glob("*/*.py") if p.parent.name != "common" and '__name__ == "__main__"' in p.read_text()
    )
    listed = sorted(line.split()[0] for line in done.stdout.splitlines() if line.startswith("  "))
    assert listed == runnable and len(runnable) >= 25
    helped = subprocess.run(
        [sys.executable, "-m", "tools", "sync_bundle_code", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert helped.returncode == 0 and "--check" in helped.stdout
