"""Checking a pre-training corpus before training, and choosing how its volumes are cached."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.transforms import LoadImage

from .bundle_logger import logger
from .transforms import DicomSeriesReader

__all__ = ["CorpusError", "ON_BAD_CHOICES", "check_corpora", "check_corpus", "make_dataset"]

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
        return (
            f"intensity range [{low:g}, {high:g}] does not look like CT in Hounsfield units "
            f"(expected air near -1000, i.e. a minimum <= {CT_MIN_AT_MOST:g}, and a maximum >= {CT_MAX_AT_LEAST:g})"
        )
    pixdim = np.asarray(image.pixdim, dtype=float)[:3] if hasattr(image, "pixdim") else None  # from the affine
    if spacing is not None and pixdim is not None and np.all(pixdim > 0):
        resampled = np.round(np.asarray(spatial) * pixdim / np.asarray(spacing, dtype=float)).astype(int)
    else:
        resampled = np.asarray(spatial)
    if np.any(resampled < np.asarray(roi_size)):
        where = f" at spacing {list(spacing)} mm" if spacing is not None else ""
        return (
            f"is {tuple(int(s) for s in resampled)} voxels{where}, smaller than the ROI {tuple(roi_size)}: "
            "random crops would be mostly padding"
        )
    return None


def _check_items(
    items: Sequence[dict], roi_size: Sequence[int], spacing: Sequence[float] | None, image_key: str
) -> tuple[list[dict], list[str]]:
    """Read every volume of one list once: (usable items, one problem line per unusable item)."""
    loader = LoadImage(image_only=True, ensure_channel_first=False)
    loader.register(DicomSeriesReader())  # the image series of a DICOM folder, not a SEG beside it
    good, problems = [], []
    for item in items:
        path = item.get(image_key)
        if path is None:
            problems.append(f"an item has no {image_key!r} key: {item}")
            continue
        try:
            image = loader(path)
        except Exception as err:  # noqa: BLE001 (any reader failure means the file is unusable)
            what = (
                "does not exist" if not os.path.exists(str(path)) else f"cannot be read ({type(err).__name__}: {err})"
            )
            problems.append(f"{path}: {what}")
            continue
        problem = _problem(image, roi_size, spacing)
        if problem:
            problems.append(f"{path}: {problem}")
        else:
            good.append(item)
    return good, problems


def _advice(on_bad: str, checked: Mapping[str, tuple[list, list]]) -> str:
    """What the user can do about the problems: skip only when skipping leaves every list something to use."""
    emptied = [name for name, (good, problems) in checked.items() if problems and not good]
    if emptied:
        names = " and the ".join(_list_name(name) for name in emptied)
        mode = "on_bad_volume is already 'skip', but" if on_bad == "skip" else "on_bad_volume 'skip' would not help:"
        return f"{mode} the {names} would be left with no usable volume: fix or replace them"
    left = " and ".join(f"{len(good)} {name or 'usable'}" for name, (good, _) in checked.items())
    return f"set on_bad_volume 'skip' to pre-train on the rest ({left} volume(s)), or fix or replace them"


def _list_name(name: str) -> str:
    """``training`` -> ``training datalist``; the unnamed single list -> ``datalist``."""
    return f"{name} datalist" if name else "datalist"


def check_corpora(
    lists: Mapping[str, Sequence[dict]],
    roi_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    on_bad: str = "error",
    image_key: str = "image",
    enabled: bool = True,
) -> dict[str, list[dict]]:
    """Check several datalists (e.g. ``{"training": ..., "validation": ...}``) at once; return each one's usable items.

    Reported, with the file named: unreadable files, more than one channel, intensities that are not
    CT in HU, and volumes smaller than ``roi_size`` after resampling to ``spacing``. ``on_bad="error"``
    raises one :class:`CorpusError` listing every problem of every list; ``"skip"`` logs a warning for
    each bad volume and trains on the rest (never silently). A list left empty is always an error.
    """
    if on_bad not in ON_BAD_CHOICES:
        raise ValueError(f"on_bad must be one of {ON_BAD_CHOICES}, got {on_bad!r}.")
    lists = {name: list(items) for name, items in lists.items()}
    empty = [name for name, items in lists.items() if not items]
    if empty:
        raise CorpusError("; ".join(f"the {_list_name(name)} has no volumes" for name in empty) + ".")
    if not enabled:
        return lists
    checked = {name: _check_items(items, roi_size, spacing, image_key) for name, items in lists.items()}
    fatal = [name for name, (good, problems) in checked.items() if problems and (on_bad == "error" or not good)]
    if fatal:
        raise CorpusError(_report(lists, checked, _advice(on_bad, checked)))
    for name, (good, problems) in checked.items():
        for problem in problems:
            logger.warning("skipping volume: %s", problem)
        if problems:
            logger.warning(
                "skipped %d of %d volume(s)%s; pre-training on %d.",
                len(problems),
                len(lists[name]),
                f" of the {name} list" if name else "",
                len(good),
            )
        logger.info("corpus check: %d volume(s) usable%s", len(good), f" in the {name} list" if name else "")
    return {name: good for name, (good, _) in checked.items()}


def _report(lists: Mapping[str, list], checked: Mapping[str, tuple], advice: str) -> str:
    """One message naming every unusable volume, list by list, and ending with the advice."""
    parts = []
    for name, (_, problems) in checked.items():
        if problems:
            where = f" of the {name} list" if name else ""
            parts.append(
                f"{len(problems)} of {len(lists[name])} volume(s){where} cannot be used for pre-training:\n  "
                + "\n  ".join(problems)
            )
    return "\n".join(parts) + f"\n({advice})"


def check_corpus(
    items: Sequence[dict],
    roi_size: Sequence[int],
    spacing: Sequence[float] | None = None,
    on_bad: str = "error",
    image_key: str = "image",
    enabled: bool = True,
) -> list[dict]:
    """``check_corpora`` for one list: read every volume once and return the usable items."""
    return check_corpora({"": items}, roi_size, spacing, on_bad, image_key, enabled)[""]


def make_dataset(
    kind: str, data: Sequence[dict], transform: Any, cache_rate: float = 1.0, cache_dir: str = "", num_workers: int = 0
):
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
