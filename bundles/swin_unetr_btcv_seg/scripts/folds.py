# Generated from bundles/common/scripts/folds.py: edit that, then run python -m tools sync_bundle_code
"""Cross-validation folds: a seeded split of a case list, and each fold's own output folder.

A split is a seeded shuffle of the cases cut into ``num_folds`` nearly equal parts: fold k
validates on part k and trains on the rest, so the folds' validation sets are disjoint and together
cover every case. The same ``(number of cases, num_folds, seed)`` gives the same folds on any
machine (``numpy.random.default_rng``).

``fold`` is ``None`` where a bundle is not cross-validating: ``cv_datalist`` then reads the
datalist's own ``training``/``validation`` sections and ``fold_dir`` leaves the folder as it is.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from .bundle_logger import logger
from .datalists import load_datalist

__all__ = ["fold_indices", "check_fold", "fold_split", "fold_dir", "cv_datalist"]


def fold_indices(num_cases: int, num_folds: int = 5, seed: int = 12345) -> list[list[int]]:
    """Validation case indices of each fold: a seeded permutation split into ``num_folds`` parts."""
    if not 2 <= num_folds <= num_cases:
        raise ValueError(f"num_folds must be between 2 and the number of cases ({num_cases}), got {num_folds}")
    order = np.random.default_rng(seed).permutation(num_cases)
    return [sorted(int(i) for i in part) for part in np.array_split(order, num_folds)]


def check_fold(fold: int, num_folds: int) -> int:
    """``fold`` as an int in ``0..num_folds - 1``; anything else is an error naming the knob."""
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or not 0 <= int(fold) < int(num_folds):
        raise ValueError(f"fold must be 0..{int(num_folds) - 1} (an integer; num_folds {num_folds}), got {fold!r}")
    return int(fold)


def fold_split(cases: Sequence[dict], fold: int, num_folds: int = 5, seed: int = 12345) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...]}`` for ``fold`` (0-based) of the seeded split of ``cases``."""
    fold = check_fold(fold, num_folds)
    validation = set(fold_indices(len(cases), int(num_folds), seed)[fold])
    split = {
        "training": [c for i, c in enumerate(cases) if i not in validation],
        "validation": [c for i, c in enumerate(cases) if i in validation],
    }
    logger.info(
        f"fold {fold} of {num_folds} (seed {seed}): {len(split['training'])} training, "
        f"{len(split['validation'])} validation cases"
    )
    return split


def fold_dir(folder: str, fold: int | None, num_folds: int) -> str:
    """``<folder>/fold<k>`` for a chosen fold, ``folder`` itself when ``fold`` is None."""
    if fold is None:
        return folder
    return os.path.join(folder, f"fold{check_fold(fold, num_folds)}")


def cv_datalist(
    datalist: str,
    dataset_dir: str,
    section: str,
    fold: int | None = None,
    num_folds: int = 5,
    seed: int = 12345,
    pool: Sequence[str] = ("training", "validation"),
) -> list[dict]:
    """The cases of ``section`` (``training`` or ``validation``) to use.

    Without a fold (``fold`` None), the datalist's own ``section`` list, as before cross-validation
    existed. With one, the labelled cases of the datalist's ``pool`` lists (in that order, a case
    listed twice counted once) are split by ``fold_split`` and ``section`` of fold ``fold`` is returned.
    """
    if section not in ("training", "validation"):
        raise ValueError(f"section must be 'training' or 'validation', got {section!r}")
    if fold is None:
        return load_datalist(datalist, True, section, dataset_dir)
    if isinstance(pool, str) or not pool:
        raise ValueError(f"cv_pool must be a non-empty list of datalist sections, got {pool!r}")
    cases, seen = [], set()
    for key in pool:
        for case in load_datalist(datalist, True, key, dataset_dir):
            if case["image"] not in seen:
                seen.add(case["image"])
                cases.append(case)
    logger.info(f"cross-validation pool: {len(cases)} cases of {datalist} ({', '.join(pool)})")
    return fold_split(cases, fold, num_folds, seed)[section]
