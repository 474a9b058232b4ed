"""Copy the bundles' shared Python and configs from ``bundles/common`` into each bundle that uses them.

Bundles stay self-contained folders (MONAI Label / Deploy load one folder as is), so shared files
are copied, not imported across bundles. ``bundles/common/scripts/<name>`` (Python modules, copied
into each bundle's ``scripts/``) and ``bundles/common/configs/<name>`` (configs that are the same
in every bundle by intent, copied into its ``configs/``) are the one place to edit;
``bundles/common/manifest.json`` says which bundles get which file (``modules`` and ``configs``).

Each Python module and ``logging.conf`` copy starts with a one-line ``#`` header naming its source,
followed by the source unchanged. JSON has no comments, so a generated JSON config (the
``multi_gpu_train.json`` overlays) is a byte-for-byte copy without a header: its source is
``bundles/common/configs/<name>``, listed in the manifest, and ``--check`` (run by
``tests/bundles/shared/test_bundle_code_sync.py``) fails when a copy differs.

    python -m tools sync_bundle_code            # write every copy
    python -m tools sync_bundle_code --check    # exit 1 naming each copy that differs or is missing
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
COMMON = Path("bundles") / "common"
MANIFEST = COMMON / "manifest.json"
HEADER = "# Generated from {source}: edit that, then run python -m tools sync_bundle_code\n"
HEADER_START = "# Generated from "

__all__ = ["load_manifest", "load_config_manifest", "expected_copies", "check", "sync", "main"]

# configs in formats without comments are copied without the header
NO_HEADER_SUFFIXES = (".json",)


def load_manifest(root: Path = REPO) -> dict[str, list[str]]:
    """``{module file name: [bundle folder names]}`` from ``bundles/common/manifest.json`` under ``root``."""
    return json.loads((Path(root) / MANIFEST).read_text())["modules"]


def load_config_manifest(root: Path = REPO) -> dict[str, list[str]]:
    """``{config file name: [bundle folder names]}`` from ``bundles/common/manifest.json`` under ``root``."""
    return json.loads((Path(root) / MANIFEST).read_text()).get("configs", {})


def _copy_text(root: Path, source: Path) -> str:
    text = (root / source).read_text()
    if source.suffix in NO_HEADER_SUFFIXES:
        return text
    return HEADER.format(source=source.as_posix()) + text


def expected_copies(root: Path = REPO) -> dict[Path, str]:
    """``{copy path: expected text}`` for every (module, bundle) and (config, bundle) pair of the manifest."""
    root = Path(root)
    copies = {}
    for folder, files in (("scripts", load_manifest(root)), ("configs", load_config_manifest(root))):
        for name, bundles in files.items():
            source = COMMON / folder / name
            text = _copy_text(root, source)
            for bundle in bundles:
                copies[root / "bundles" / bundle / folder / name] = text
    return copies


def _stale_copies(root: Path, expected: dict[Path, str]) -> list[Path]:
    """Generated files (those with the header) in a bundle's scripts/ or configs/ that the manifest no longer lists."""
    found = []
    bundles = Path(root) / "bundles"
    for path in sorted([*bundles.glob("*/scripts/*.py"), *bundles.glob("*/configs/*.conf")]):
        if path not in expected and path.read_text().startswith(HEADER_START):
            found.append(path)
    return found


def check(root: Path = REPO) -> list[str]:
    """One line per copy that is missing, differs from its source, or is generated but not in the manifest."""
    root = Path(root)
    expected = expected_copies(root)
    problems = []
    for path, text in expected.items():
        rel = path.relative_to(root).as_posix()
        if not path.is_file():
            problems.append(f"missing: {rel}")
        elif path.read_text() != text:
            problems.append(f"differs from its source: {rel}")
    problems += [f"not in the manifest: {p.relative_to(root).as_posix()}" for p in _stale_copies(root, expected)]
    return problems


def sync(root: Path = REPO) -> list[Path]:
    """Write every copy whose text differs; return the paths written."""
    written = []
    for path, text in expected_copies(root).items():
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)
            written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    """Command line: sync (default) or ``--check``; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report copies that differ or are missing")
    parser.add_argument("--root", type=Path, default=REPO, help="repository root (default: this checkout)")
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for line in problems:
            print(line)
        if problems:
            print(
                f"{len(problems)} bundle copy(ies) out of sync: edit bundles/common/scripts or "
                f"bundles/common/configs, then run python -m tools sync_bundle_code",
                file=sys.stderr,
            )
        return 1 if problems else 0
    for path in sync(args.root):
        print(f"wrote {path.relative_to(args.root).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
