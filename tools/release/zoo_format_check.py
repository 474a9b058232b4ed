"""Run the model zoo's own format checks on the bundles, as the zoo's CI sees them in ``models/<bundle>/``.

The zoo's code-format job (``runtests.sh --codeformat``) runs, at the root of the zoo with its
``setup.cfg`` and ``pyproject.toml``: ``isort --check``, ``black --skip-magic-trailing-comma --check``
(line length 120) and ``flake8 --count --statistics`` with flake8-bugbear, flake8-comprehensions,
flake8-executable and pep8-naming; its pre-commit hooks (pre-commit-hooks v4.6.0) run as
``pre-commit run --all-files``. This tool copies each bundle's files (what the packaging tool ships:
``tools.common.bundles.bundle_files``) into a temporary git repository as ``models/<name>/``, puts the
zoo's configuration from ``tools/release/zoo_format/`` at its root, and runs the same commands there with the
tools pinned in ``tools/release/zoo_format/requirements.txt``. Problems are reported with the bundle's own paths.
Not run: the zoo's pytype step, and its bundle checks (``ci/verify_bundle.py``;
tests/bundles/shared/test_bundle_contract.py).

    bash tools/env/lint_env.sh      # once: the pinned tools in .venv-lint (prints its python)
    python -m tools zoo_format_check                      # the three bundles, with .venv-lint
    python -m tools zoo_format_check bundles/swin_unetr_msd --lint_python "$(bash tools/env/lint_env.sh | tail -1)"

Fix formatting with ``ruff format`` (configured to agree with black --skip-magic-trailing-comma), then
rerun this check.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tools.common.bundles import BTCV_DIR, MSD_DIR, REPO_ROOT, SSL_DIR, bundle_files

ZOO_CONFIG_DIR = REPO_ROOT / "tools" / "release" / "zoo_format"
ZOO_CONFIG_FILES = ("setup.cfg", "pyproject.toml", ".pre-commit-config.yaml")
DEFAULT_LINT_PYTHON = REPO_ROOT / ".venv-lint" / "bin" / "python"
# (name, arguments after `python -m`), as runtests.sh and pre-commit.ci run them on the zoo's root "."
ZOO_CHECKS = (
    ("isort", ["isort", "--check", "."]),
    ("black", ["black", "--skip-magic-trailing-comma", "--check", "."]),
    ("flake8", ["flake8", ".", "--count", "--statistics"]),
    ("pre-commit", ["pre_commit", "run", "--all-files", "--show-diff-on-failure", "--color", "never"]),
)


class ZooFormatError(RuntimeError):
    """One or more of the zoo's format checks failed; the message holds their output."""


def copy_as_zoo(bundle_dirs: list[Path], zoo_root: Path) -> None:
    """``zoo_root`` as a git repository holding the zoo's format configuration and ``models/<name>/`` per bundle.

    Files keep their permission bits (the executable-shebang hook reads them) and are staged, as in a
    pull request (pre-commit checks tracked files; the large-file hook checks added ones).
    """
    for bundle_dir in bundle_dirs:
        for path, inside in bundle_files(bundle_dir):
            target = zoo_root / "models" / bundle_dir.name / inside
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(path, target)
    for name in ZOO_CONFIG_FILES:
        shutil.copy2(ZOO_CONFIG_DIR / name, zoo_root / name)
    for git in (["init", "-q"], ["add", "-A"]):
        subprocess.run(["git", *git], cwd=zoo_root, check=True, capture_output=True)


def run_zoo_checks(zoo_root: Path, lint_python: Path, pre_commit_home: Path) -> list[tuple[str, int, str]]:
    """(check, exit status, output) of each of the zoo's checks, run in ``zoo_root`` with ``lint_python``."""
    env = {
        **os.environ,
        "PATH": f"{lint_python.parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the hooks' entry points
        "PRE_COMMIT_HOME": str(pre_commit_home),
        "PYTHONPATH": "",
    }
    results = []
    for name, args in ZOO_CHECKS:
        done = subprocess.run(
            [str(lint_python), "-m", *args], cwd=zoo_root, env=env, capture_output=True, text=True, check=False
        )
        results.append((name, done.returncode, done.stdout + done.stderr))
    return results


def zoo_format_check(*bundles: str, lint_python: str = str(DEFAULT_LINT_PYTHON)) -> str:
    """Run the zoo's isort, black, flake8 and pre-commit checks on ``bundles`` (default: the three bundles).

    Args:
        bundles: bundle folders to check.
        lint_python: the python of the venv with the zoo's format tools, made (and printed) by
            ``bash tools/env/lint_env.sh``.

    Returns:
        One line per check that passed. Raises ZooFormatError with the output of each failed check.
    """
    bundle_dirs = [Path(b).resolve() for b in bundles] or [BTCV_DIR, MSD_DIR, SSL_DIR]
    for bundle_dir in bundle_dirs:
        if not (bundle_dir / "configs" / "metadata.json").is_file():
            raise FileNotFoundError(f"{bundle_dir}: not a bundle folder (no configs/metadata.json)")
    lint_python = Path(lint_python).absolute()  # a venv's python is a link: keep its bin/ folder
    if not lint_python.is_file():
        raise FileNotFoundError(f"{lint_python}: no such python; make the lint venv with `bash tools/env/lint_env.sh`")
    with tempfile.TemporaryDirectory(prefix="zoo_format_") as tmp:
        zoo_root = Path(tmp) / "model-zoo"
        copy_as_zoo(bundle_dirs, zoo_root)
        results = run_zoo_checks(zoo_root, lint_python, Path(tmp) / "pre-commit-home")
    failed = []
    for name, status, output in results:
        if status != 0:
            for bundle_dir in bundle_dirs:  # the zoo's paths (absolute, ./ or plain) as the bundle's own
                shown = os.path.relpath(bundle_dir) if bundle_dir.is_relative_to(Path.cwd()) else str(bundle_dir)
                for zoo_path in (f"{zoo_root}/models/", "./models/", "models/"):
                    output = output.replace(zoo_path + bundle_dir.name, shown)
            failed.append(f"---- {name} (exit status {status}) ----\n{output.strip()}")
    if failed:
        raise ZooFormatError("the model zoo's format checks fail:\n" + "\n".join(failed))
    names = ", ".join(d.name for d in bundle_dirs)
    return "\n".join(f"{name}: passed ({names})" for name, _ in ZOO_CHECKS)


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(zoo_format_check, report=str, errors=(FileNotFoundError, ZooFormatError))
