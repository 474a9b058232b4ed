# Generated from bundles/common/scripts/checks.py: edit that, then run python -m tools sync_bundle_code
"""Up-front checks of input files, so bad data stops a run before any compute is spent.

Every problem found is reported with the file it concerns; all problems of a datalist (of a
training run's training and validation lists, ``check_datalists``) are collected and raised
together in one ``InputDataError``. A DICOM series folder is checked slice by
slice first (``dicom_series.inspect_series``: every file readable and complete, one series, even
slice spacing); its non-image objects (RTSTRUCT, SEG, SR ...) are logged and left aside.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from monai.transforms import LoadImage

from .bundle_logger import logger
from .dicom_series import inspect_series
from .skipped_files import skipped_lines
from .transforms import DicomSeriesReader

__all__ = ["InputDataError", "check_datalist", "check_datalists", "check_images"]


AFFINE_TOLERANCE = 1e-3  # mm; image and label must share their voxel-to-world mapping


class InputDataError(ValueError):
    """Raised when input files are missing, unreadable or inconsistent."""


@functools.lru_cache(maxsize=1)
def _loader() -> LoadImage:
    loader = LoadImage(image_only=True)
    loader.register(DicomSeriesReader())  # as the bundles' DicomLoadImaged
    return loader


def _load(path: str) -> Any:
    """Read a whole image (NIfTI file or DICOM series folder) as a MetaTensor, header and data."""
    if not os.path.exists(path):
        raise FileNotFoundError("file not found")
    return _loader()(path)


def _spatial_and_channels(array: Any) -> tuple[tuple[int, ...], int]:
    """3D volumes have one channel; a 4D NIfTI stores channels last."""
    shape = tuple(array.shape)
    if len(shape) == 3:
        return shape, 1
    if len(shape) == 4:
        return shape[:3], shape[3]
    raise ValueError(f"expected a 3D volume (or 4D with channels last), got shape {shape}")


def _dicom_folder_ok(path: str, problems: list[str]) -> bool:
    """For a DICOM series folder, its slice-level problems (added to ``problems``); True for anything else."""
    if not os.path.isdir(path):
        return True
    report = inspect_series(path)
    if report.ignored:
        logger.info(f"{path}: leaving aside {report.ignored_text()} beside the image series")
    for line in skipped_lines(path, [(name, "not a DICOM file") for name in report.other_files]):
        logger.warning(line)
    if report.problems:
        problems.extend(report.problems)
        return False
    logger.info(
        f"{path}: DICOM series {report.series}, {report.modality}, {report.num_slices} slices"
        + (f" {report.spacing:.3g} mm apart" if report.spacing else "")
    )
    return True


def _check_image(path: str, in_channels: int, problems: list[str]) -> Any | None:
    if not _dicom_folder_ok(path, problems):
        return None
    try:
        image = _load(path)
        spatial, channels = _spatial_and_channels(image)
    except Exception as e:  # noqa: BLE001 (unreadable, truncated, corrupt: say which file and why)
        problems.append(f"{path}: cannot be read as an image ({type(e).__name__}: {e})")
        return None
    if channels != in_channels:
        problems.append(f"{path}: has {channels} channel(s), the network expects {in_channels}")
    data = np.asarray(image)
    if not np.isfinite(data).all():
        bad = int((~np.isfinite(data)).sum())
        problems.append(f"{path}: contains {bad} non-finite voxel value(s) (NaN or Inf)")
    if min(spatial) < 2:
        problems.append(f"{path}: spatial shape {spatial} is not a 3D volume")
    return image


def _check_label(path: str, image: Any, image_path: str, num_classes: int, problems: list[str]) -> None:
    if not _dicom_folder_ok(path, problems):
        return
    try:
        label = _load(path)
        spatial, channels = _spatial_and_channels(label)
    except Exception as e:  # noqa: BLE001 (as for the image)
        problems.append(f"{path}: cannot be read as a label map ({type(e).__name__}: {e})")
        return
    if channels != 1:
        problems.append(f"{path}: a label map must have 1 channel, found {channels}")
    data = np.asarray(label)
    if not np.isfinite(data).all() or not np.array_equal(data, np.round(data)):
        problems.append(f"{path}: label values must be whole numbers")
    else:
        ids = np.unique(data).astype(np.int64)
        outside = ids[(ids < 0) | (ids >= num_classes)]
        if outside.size:
            problems.append(f"{path}: label ids {outside.tolist()} are outside 0..{num_classes - 1}")
    if image is None:
        return
    image_spatial, _ = _spatial_and_channels(image)
    if spatial != image_spatial:
        problems.append(f"{path}: label shape {spatial} differs from image shape {image_spatial} ({image_path})")
    elif not np.allclose(np.asarray(label.affine), np.asarray(image.affine), atol=AFFINE_TOLERANCE):
        problems.append(
            f"{path}: label affine differs from the image affine ({image_path}):\n"
            f"  label {np.asarray(label.affine).round(4).tolist()}\n"
            f"  image {np.asarray(image.affine).round(4).tolist()}"
        )


def _datalist_problems(
    items: Sequence[dict], num_classes: int, in_channels: int, image_key: str, label_key: str
) -> list[str]:
    """Every problem of one datalist's files, each naming its file."""
    problems: list[str] = []
    for n, item in enumerate(items, 1):
        if image_key not in item:
            problems.append(f"datalist item {n} has no '{image_key}' entry: {item}")
            continue
        image = _check_image(str(item[image_key]), in_channels, problems)
        if label_key in item:
            _check_label(str(item[label_key]), image, str(item[image_key]), num_classes, problems)
    return problems


def check_datalists(
    lists: Mapping[str, Sequence[dict]],
    num_classes: int,
    in_channels: int = 1,
    image_key: str = "image",
    label_key: str = "label",
    enabled: bool = True,
) -> dict[str, list[dict]]:
    """Check several datalists (e.g. ``{"training": ..., "validation": ...}``) in one step; return them unchanged.

    Training configs call this before any dataset is built, so a bad validation case stops the run
    before the training set is cached or trained on, in the same error as the training list's
    problems. Each list is checked as ``check_datalist`` checks one.
    """
    lists = {name: list(items) for name, items in lists.items()}
    if not enabled:
        sizes = ", ".join(f"{len(items)} {name}" for name, items in lists.items())
        logger.warning(f"input checks are disabled: {sizes} items are used unchecked")
        return lists
    found = {
        name: ([f"the {name} list is empty: no images to process"] if not items else [])
        + _datalist_problems(items, num_classes, in_channels, image_key, label_key)
        for name, items in lists.items()
    }
    total = sum(len(problems) for problems in found.values())
    if total:
        raise InputDataError(
            f"{total} problem(s) in the input data:"
            + "".join(
                f"\n{name} list ({len(problems)}):\n- " + "\n- ".join(problems)
                for name, problems in found.items()
                if problems
            )
        )
    logger.info(
        "input checks passed for " + ", ".join(f"{len(items)} {name}" for name, items in lists.items()) + " item(s)"
    )
    return lists


def check_datalist(
    items: Sequence[dict],
    num_classes: int,
    in_channels: int = 1,
    image_key: str = "image",
    label_key: str = "label",
    enabled: bool = True,
) -> list[dict]:
    """Check every image (and label, when the item has one) of a datalist; return the items unchanged.

    Checks: the file exists and reads completely; the image has ``in_channels`` channels and only
    finite values; the label is whole-numbered with ids in ``0..num_classes-1`` and has the
    image's shape and affine. Raises ``InputDataError`` listing every problem with its file.
    """
    items = list(items)
    if not enabled:
        logger.warning(f"input checks are disabled: {len(items)} items are used unchecked")
        return items
    if not items:
        raise InputDataError("the datalist is empty: no images to process")
    problems = _datalist_problems(items, num_classes, in_channels, image_key, label_key)
    if problems:
        raise InputDataError(f"{len(problems)} problem(s) in the input data:\n- " + "\n- ".join(problems))
    logger.info(f"input checks passed for {len(items)} item(s)")
    return items


def check_images(
    items: Sequence[dict], in_channels: int = 1, image_key: str = "image", enabled: bool = True
) -> list[dict]:
    """Check the images of an inference datalist (labels, if any, are ignored); return the items."""
    check_datalist(
        [{image_key: item[image_key]} for item in items],
        num_classes=0,
        in_channels=in_channels,
        image_key=image_key,
        enabled=enabled,
    )
    return list(items)
