"""The bundles as the tools and tests use them: folders, ``scripts`` imports, configs, run commands."""

from __future__ import annotations

import importlib.util
import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES_DIR = REPO_ROOT / "bundles"
BTCV_DIR = BUNDLES_DIR / "swin_unetr_btcv_seg"
SSL_DIR = BUNDLES_DIR / "swin_unetr_ssl_pretrain"
MSD_DIR = BUNDLES_DIR / "swin_unetr_msd"

# what a released or copied bundle holds, and what a bundle folder used in place collects besides
BUNDLE_CONTENT = ("configs", "docs", "scripts")
LARGE_FILES = "large_files.yml"
_OUTPUT_DIRS = frozenset(
    {"__pycache__", ".pytest_cache", ".ipynb_checkpoints", "eval", "runs", "predictions", "cache", "models"}
)
_OUTPUT_SUFFIXES = (".pyc", ".pyo", ".tmp")
# written into configs/ by the MSD bundle's task_metadata.json run in place
_GENERATED_CONFIGS = re.compile(r"metadata_.+\.json")


def common_module(name: str) -> Any:
    """A module of ``bundles/common/scripts`` that imports nothing from its package (``dicom_series``,
    ``skipped_files``), loaded from its file, so the tools check inputs with the bundles' own code."""
    module_name = f"bundles_common_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, BUNDLES_DIR / "common" / "scripts" / f"{name}.py")
        sys.modules[module_name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
        spec.loader.exec_module(sys.modules[module_name])
    return sys.modules[module_name]


def forget_scripts_modules() -> None:
    """Each bundle ships its own ``scripts`` package: drop the cached ``scripts*`` modules."""
    for name in list(sys.modules):
        if name == "scripts" or name.startswith("scripts."):
            del sys.modules[name]


def use_bundle_scripts(bundle_dir: str | os.PathLike = BTCV_DIR) -> Any:
    """Make ``import scripts`` give ``bundle_dir``'s scripts package from now on; return the package.

    Cached ``scripts*`` modules from another folder are dropped and the bundle folder is put first
    on ``sys.path`` (it stays there).
    """
    bundle = str(bundle_dir)
    cached_file = getattr(sys.modules.get("scripts"), "__file__", None) or ""
    if not cached_file.startswith(bundle + os.sep):
        forget_scripts_modules()
    if not sys.path or sys.path[0] != bundle:
        if bundle in sys.path:
            sys.path.remove(bundle)
        sys.path.insert(0, bundle)
    import scripts

    return scripts


@contextmanager
def bundle_on_path(bundle_dir: str | os.PathLike = BTCV_DIR) -> Iterator[None]:
    """Within the block, ``import scripts`` gives ``bundle_dir``'s scripts, as running from the bundle folder does."""
    path = str(bundle_dir)
    forget_scripts_modules()
    sys.path.insert(0, path)
    try:
        yield
    finally:
        if path in sys.path:
            sys.path.remove(path)
        forget_scripts_modules()


def bundle_parser(bundle_dir: str | os.PathLike, config: str, overrides: dict[str, Any]) -> Any:
    """A ConfigParser of ``<bundle_dir>/configs/<config>`` with its metadata and ``overrides``.

    The bundle's scripts are made importable (``use_bundle_scripts``); ``bundle_root`` is the
    bundle folder unless overridden.
    """
    from monai.bundle import ConfigParser

    bundle = Path(bundle_dir)
    use_bundle_scripts(bundle)
    parser = ConfigParser()
    parser.read_config(str(bundle / "configs" / config))
    parser.read_meta(str(bundle / "configs" / "metadata.json"))
    parser.update({"bundle_root": str(bundle), **overrides})
    return parser


def trains_fused(network: Any) -> bool:
    """The bundle's ``scripts.window_attention.trains_fused`` for ``network`` (the bundle whose scripts are loaded)."""
    from scripts.window_attention import trains_fused as bundle_trains_fused

    return bundle_trains_fused(network)


def device_expr(device: Any) -> str:
    """The config expression for ``device``."""
    return f"$torch.device('{device}')"


def cube(size: int | Sequence[int]) -> list[int]:
    """A 3D size from an int (cube) or a sequence of 3 ints."""
    if isinstance(size, (int, np.integer)):
        return [int(size)] * 3
    size = [int(s) for s in size]
    if len(size) != 3:
        raise ValueError(f"expected 3 sizes, got {size}")
    return size


def format_arg(value: Any) -> str:
    """A command-line value as ``monai.bundle run`` reads it (lists as ``[a,b,c]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(format_arg(v) for v in value) + "]"
    return str(value)


def bundle_command(run_id: str | None, config_files: Sequence[str], overrides: dict) -> list[str]:
    """``python -m monai.bundle run [id] --config_file ... --key value ...`` as an argument list."""
    cmd = [sys.executable, "-m", "monai.bundle", "run"]
    if run_id:
        cmd.append(run_id)
    config = config_files[0] if len(config_files) == 1 else "[" + ",".join(f"'{c}'" for c in config_files) + "]"
    cmd += ["--config_file", config]
    for key, value in overrides.items():
        cmd += [f"--{key}", format_arg(value)]
    return cmd


def bundle_files(bundle_dir: Path) -> list[tuple[Path, str]]:
    """(file, path inside the bundle) of every file a bundle is made of, sorted.

    ``LICENSE``, ``large_files.yml`` if present, and ``configs/``, ``docs/``, ``scripts/`` without run
    outputs, caches, weights or the per-task metadata a run in place writes.
    """
    files = [(bundle_dir / "LICENSE", "LICENSE")]
    if (bundle_dir / LARGE_FILES).is_file():
        files.append((bundle_dir / LARGE_FILES, LARGE_FILES))
    for top in BUNDLE_CONTENT:
        for root, dirs, names in os.walk(bundle_dir / top):
            dirs[:] = sorted(d for d in dirs if d not in _OUTPUT_DIRS)
            for name in sorted(names):
                generated = top == "configs" and _GENERATED_CONFIGS.fullmatch(name)
                if not name.endswith(_OUTPUT_SUFFIXES) and not generated:
                    path = Path(root) / name
                    files.append((path, path.relative_to(bundle_dir).as_posix()))
    return sorted(files, key=lambda f: f[1])
