# Generated from bundles/common/scripts/datalists.py: edit that, then run python -m tools sync_bundle_code
"""Datalists: reading one with errors that name the file; inference inputs (a ``testing`` list, or a folder)."""

from __future__ import annotations

import json
import os

from monai.data import load_decathlon_datalist

from .bundle_logger import logger
from .dicom_series import dicom_files
from .skipped_files import mhd_data_files, skipped_lines

__all__ = ["inference_items", "IMAGE_SUFFIXES", "read_json", "load_datalist"]


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _is_dicom_series_dir(path: str) -> bool:
    """A folder directly holding DICOM files (``dicom_series.is_dicom_file``) is one series."""
    return bool(dicom_files(path))


def read_json(path: str, what: str = "datalist") -> dict:
    """The JSON object in ``path``; a missing file, a syntax error or another type is an error naming the file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: {path}")
    try:
        with open(path) as f:
            content = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: {what} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: {what} cannot be read ({e})") from e
    if not isinstance(content, dict):
        raise ValueError(
            f"{path}: {what} must be a JSON object with lists such as 'training', got a {type(content).__name__}"
        )
    return content


def load_datalist(datalist: str, is_segmentation: bool, key: str, base_dir: str) -> list[dict]:
    """``monai.data.load_decathlon_datalist`` after ``read_json``, so a broken file is named with its problem."""
    content = read_json(datalist)
    if key not in content:
        raise KeyError(f"{datalist}: no '{key}' list (found: {sorted(content)})")
    return load_decathlon_datalist(datalist, is_segmentation, key, base_dir)


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def inference_items(datalist: str, dataset_dir: str, key: str = "testing") -> list[dict]:
    """Return ``[{"image": path}, ...]`` to run inference on.

    With a ``datalist`` JSON, its ``key`` list (items ``{"image": path}`` or plain paths, relative
    to ``dataset_dir`` or absolute). Without one, every image file (``IMAGE_SUFFIXES``) and every
    DICOM series folder directly in ``dataset_dir``, sorted by name; every other entry but hidden
    ones and the ``.raw`` files of ``.mhd`` headers is named in a warning (``skipped_files``).
    """
    if datalist:
        content = read_json(datalist)
        if key not in content:
            raise KeyError(f"{datalist}: no '{key}' list (found: {sorted(content)})")
        entries = [e if isinstance(e, dict) else {"image": e} for e in content[key]]
        return [{**e, "image": _resolve(str(e["image"]), dataset_dir)} for e in entries]
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset_dir is not a folder: {dataset_dir}")
    items, skipped = [], []
    names = sorted(n for n in os.listdir(dataset_dir) if not n.startswith("."))
    voxel_files = mhd_data_files(names)
    for name in names:
        path = os.path.join(dataset_dir, name)
        if os.path.isdir(path):
            if _is_dicom_series_dir(path):
                items.append({"image": path})
            else:
                skipped.append((name, "a folder without DICOM files"))
        elif name.lower().endswith(IMAGE_SUFFIXES):
            items.append({"image": path})
        elif name not in voxel_files:
            skipped.append((name, f"not an image file ({', '.join(IMAGE_SUFFIXES)})"))
    for line in skipped_lines(dataset_dir, skipped):
        logger.warning(line)
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders in {dataset_dir}")
    logger.info(f"found {len(items)} image(s) in {dataset_dir}")
    return items
