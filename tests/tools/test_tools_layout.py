"""House rules for tools/: no tool reaching into another tool's private names (length: ruff C901, PLR0915)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

TOOLS = REPO / "tools"


def _tool_sources() -> list[Path]:
    return sorted(TOOLS.rglob("*.py"))


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
