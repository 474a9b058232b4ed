"""The project's tools as one command line: ``python -m tools <command> [args]``.

``python -m tools`` (or ``--help``) lists every command with one line each; ``python -m tools <command>
--help`` gives the command's own flags. Each command is a module of a sub-package by job (``data``,
``leaderboard``, ``release``, ``benchmarks``, ``demo``); ``tools/common`` is their shared library.
The command runs as ``python -m tools.<package>.<command>`` would: its module's ``fire`` command line
(as ``monai.bundle``'s commands do), with ``sys.argv`` naming it by the command.
"""

from __future__ import annotations

import ast
import runpy
import sys

from tools import PACKAGES, TOOLS_DIR


def commands() -> dict[str, str]:
    """Each command's module (``tools.<package>.<command>``): every module with a ``__main__`` block."""
    found = {}
    for package in PACKAGES:
        for path in sorted((TOOLS_DIR / package).glob("*.py")):
            if path.stem != "__init__" and 'if __name__ == "__main__":' in path.read_text():
                found[path.stem] = f"tools.{package}.{path.stem}"
    return found


def summary(module: str) -> str:
    """The first line of a module's docstring, read without importing it (no torch at listing time)."""
    path = TOOLS_DIR.joinpath(*module.split(".")[1:]).with_suffix(".py")
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    return doc.splitlines()[0] if doc else ""


def listing() -> str:
    """Every command, grouped by package, one line each."""
    lines = ["usage: python -m tools <command> [args]   (python -m tools <command> --help for its flags)", ""]
    by_package: dict[str, list[str]] = {}
    for name, module in commands().items():
        by_package.setdefault(module.split(".")[1], []).append(f"  {name:<22} {summary(module)}")
    for package in PACKAGES:
        lines += [f"{package}:", *by_package.get(package, []), ""]
    return "\n".join(lines).rstrip()


def main(argv: list[str]) -> int:
    """Run ``argv[0]`` as its module's command line with the rest of ``argv``; list the commands if none."""
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(listing())
        return 0
    table = commands()
    if argv[0] not in table:
        print(f"unknown command {argv[0]!r}\n\n{listing()}", file=sys.stderr)
        return 2
    sys.argv = [argv[0], *argv[1:]]  # the command line names itself by the command
    runpy.run_module(table[argv[0]], run_name="__main__", alter_sys=False)
    return 0


def cli() -> None:
    """Console entry point (``swin-tools`` in pyproject.toml): ``python -m tools`` by another name."""
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
