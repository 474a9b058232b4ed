"""Checking a pre-training corpus before training, and choosing how its volumes are cached."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import LoadImage

from .bundle_logger import logger

__all__ = ["CorpusError", "ON_BAD_CHOICES", "check_corpus", "make_dataset"]

ON_BAD_CHOICES = ("error", "skip")
# CT in Hounsfield units has air near -1000; a volume whose darkest voxel is above this is not HU CT
# (MR, PET, or CT already normalised), and one whose brightest is below the second bound holds no tissue.
CT_MIN_AT_MOST = -500.0
CT_MAX_AT_LEAST = 0.0


class CorpusError(ValueError):
    """Volumes of a pre-training corpus that cannot be used; the message names each file and why."""


def _problem(image: Any, roi_size: Sequence[int], spacing: Sequence[float] | None) -> str | None:
    array = np.asarray(image)
    if array.ndim == 4 and array.shape[0] != 1:
        return f"has {array.shape[0]} channels; a CT volume has 1"
    spatial = array.shape[-3:]
    if array.ndim not in (3, 4) or min(spatial) < 1:
        return f"is not a 3D volume (array shape {array.shape})"
    low, high = float(np.nanmin(array)), float(np.nanmax(array))
    if low > CT_MIN_AT_MOST or high < CT_MAX_AT_LEAST:
        return (f"intensity range [{low:g}, {high:g}] does not look like CT in Hounsfield units "
                f"(expected air near -1000, i.e. a minimum <= {CT_MIN_AT_MOST:g}, and a maximum >= {CT_MAX_AT_LEAST:g})")
    pixdim = np.asarray(image.pixdim, dtype=float)[:3] if hasattr(image, "pixdim") else None  # from the affine
    if spacing is not None and pixdim is not None and np.all(pixdim > 0):
        resampled = np.round(np.asarray(spatial) * pixdim / np.asarray(spacing, dtype=float)).astype(int)
    else:
        resampled = np.asarray(spatial)
    if np.any(resampled < np.asarray(roi_size)):
        where = f" at spacing {list(spacing)} mm" if spacing is not None else ""
        return (f"is {tuple(int(s) for s in resampled)} voxels{where}, smaller than the ROI {tuple(roi_size)}: "
                "random crops would be mostly padding")
    return None


def check_corpus(items: Sequence[dict], roi_size: Sequence[int], spacing: Sequence[float] | None = None,
                 on_bad: str = "error", image_key: str = "image", enabled: bool = True) -> list[dict]:
    """Read every volume once and return the usable items.

    Reported, with the file named: unreadable files, more than one channel, intensities that are not
    CT in HU, and volumes smaller than ``roi_size`` after resampling to ``spacing``. ``on_bad="error"``
    raises :class:`CorpusError` listing every problem; ``"skip"`` logs a warning for each bad volume and
    trains on the rest (never silently). An empty list is always an error.
    """
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}.")
    items = list(items)
    if not items:
        raise CorpusError("the datalist has no volumes.")
    if not enabled:
        return items
    loader = LoadImage(image_only=True, ensure_channel_first=False)
    good, problems = [], []
    for item in items:
        path = item.get(image_key)
        if path is None:
            problems.append(f"an item has no {image_key!r} key: {item}")
            continue
        try:
            image = loader(path)
        except Exception as err:  # noqa: BLE001 (any reader failure means the file is unusable)
            what = "does not exist" if not os.path.exists(str(path)) else f"cannot be read ({type(err).__name__}: {err})"
            problems.append(f"{path}: {what}")
            continue
        problem = _problem(image, roi_size, spacing)
        if problem:
            problems.append(f"{path}: {problem}")
        else:
            good.append(item)
    if problems:
        if on_bad == "error" or not good:
            raise CorpusError(
                f"{len(problems)} of {len(items)} volume(s) cannot be used for pre-training "
                f"(set on_bad_volume 'skip' to train on the rest):\n  " + "\n  ".join(problems)
            )
        for problem in problems:
            logger.warning("skipping volume: %s", problem)
        logger.warning("skipped %d of %d volume(s); pre-training on %d.", len(problems), len(items), len(good))
    logger.info("corpus check: %d volume(s) usable", len(good))
    return good


def make_dataset(kind: str, data: Sequence[dict], transform: Any, cache_rate: float = 1.0,
                 cache_dir: str = "", num_workers: int = 0):
    """``"cache"`` -> CacheDataset (in memory), ``"persistent"`` -> PersistentDataset (on disk in
    ``cache_dir``, for corpora larger than memory), ``"none"`` -> Dataset (reads every time)."""
    if kind == "cache":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers or None)
    if kind == "persistent":
        if not cache_dir:
            raise ValueError("dataset_type 'persistent' needs cache_dir, a folder for the cached volumes.")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    if kind == "none":
        return Dataset(data, transform)
    raise ValueError(f"dataset_type must be 'cache', 'persistent' or 'none', got {kind!r}.")
