"""A cross-validation run as the tools read it: each fold's evaluation folder, and the bundle's organ names."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["CrossValidationError", "fold_dirs", "organ_names", "read_json", "mean_sd"]

_FOLD = re.compile(r"fold(\d+)")


class CrossValidationError(ValueError):
    """A fold of a cross-validation run is missing or malformed; the message names the folder or file."""


def fold_dirs(eval_dir: str | Path, num_folds: int | None = None) -> list[Path]:
    """``<eval_dir>/fold0`` .. ``fold<K-1>``: K is ``num_folds``, else one more than the highest fold found.

    A missing fold folder is an error naming it (and the folds found).
    """
    eval_dir = Path(eval_dir)
    if not eval_dir.is_dir():
        raise CrossValidationError(f"evaluation folder not found: {eval_dir}")
    found = sorted(int(m.group(1)) for p in eval_dir.iterdir() if p.is_dir() and (m := _FOLD.fullmatch(p.name)))
    if num_folds is None:
        if not found:
            raise CrossValidationError(f"no fold<k> folders in {eval_dir} (evaluate.json with --fold k writes them)")
        num_folds = found[-1] + 1
    if int(num_folds) < 2:
        raise CrossValidationError(f"num_folds must be at least 2, got {num_folds}")
    dirs = [eval_dir / f"fold{k}" for k in range(int(num_folds))]
    missing = [str(d) for d in dirs if not d.is_dir()]
    if missing:
        raise CrossValidationError(
            f"{len(missing)} fold folder(s) missing: {', '.join(missing)} (found folds {found} in {eval_dir}); "
            "run evaluate.json with --fold k for each"
        )
    return dirs


def read_json(path: Path, what: str) -> object:
    """The JSON in ``path``; missing or unreadable is an error naming the file and what it should be."""
    if not path.is_file():
        raise CrossValidationError(f"{what} missing: {path}")
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CrossValidationError(f"{path}: {what} cannot be read ({e})") from e


def organ_names(bundle_dir: str | Path) -> dict[int, str]:
    """``{organ id: name}`` (background left out) from the bundle's metadata ``channel_def``, its one list of names."""
    meta_file = Path(bundle_dir) / "configs" / "metadata.json"
    channel_def = read_json(meta_file, "bundle metadata")["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): v for k, v in sorted(channel_def.items(), key=lambda kv: int(kv[0])) if int(k) != 0}


def mean_sd(values: Sequence[float | None]) -> dict:
    """Mean and sample SD (ddof 1) of the defined values, with their count; None where too few."""
    defined = [float(v) for v in values if v is not None and math.isfinite(v)]
    return {
        "mean": float(np.mean(defined)) if defined else None,
        "sd": float(np.std(defined, ddof=1)) if len(defined) > 1 else None,
        "n": len(defined),
    }
