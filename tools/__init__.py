"""The project's tools by job: ``data``, ``leaderboard``, ``release``, ``benchmarks``, ``demo`` (library: ``common``).

Run one as ``python -m tools <command>`` (``python -m tools`` lists them). The earlier flat names still
resolve to the moved modules, so ``python -m tools.<command>`` and ``from tools.<command> import ...``
keep working.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

PACKAGES = ("data", "leaderboard", "release", "benchmarks", "demo")
TOOLS_DIR = Path(__file__).resolve().parent


def moved_module(name: str) -> Path | None:
    """The file of the module ``name`` in one of the sub-packages (None if there is none)."""
    for package in PACKAGES:
        path = TOOLS_DIR / package / f"{name}.py"
        if path.is_file():
            return path
    return None


class FlatNames(importlib.abc.MetaPathFinder):
    """``tools.<name>`` -> ``tools/<package>/<name>.py``, asked only after the real modules (its earlier place)."""

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        head, _, name = fullname.partition(".")
        moved = moved_module(name) if head == "tools" and name and "." not in name else None
        return importlib.util.spec_from_file_location(fullname, moved) if moved else None


if not any(isinstance(finder, FlatNames) for finder in sys.meta_path):
    sys.meta_path.append(FlatNames())
