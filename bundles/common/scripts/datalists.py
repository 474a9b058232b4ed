"""Inference inputs: a datalist's ``testing`` list, or every image in a folder."""

from __future__ import annotations

import json
import os

from .bundle_logger import logger

__all__ = ["inference_items", "IMAGE_SUFFIXES"]


IMAGE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd")


def _is_dicom_series_dir(path: str) -> bool:
    """A folder holding DICOM files (by suffix or by the DICM magic at byte 128) is one series."""
    for name in sorted(os.listdir(path))[:5]:
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            continue
        if name.lower().endswith((".dcm", ".ima")):
            return True
        with open(file, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return True
    return False


def _resolve(path: str, base_dir: str) -> str:
    return path if os.path.isabs(path) else os.path.normpath(os.path.join(base_dir, path))


def inference_items(datalist: str, dataset_dir: str, key: str = "testing") -> list[dict]:
    """Return ``[{"image": path}, ...]`` to run inference on.

    With a ``datalist`` JSON, its ``key`` list (items ``{"image": path}`` or plain paths, relative
    to ``dataset_dir`` or absolute). Without one, every image file (``IMAGE_SUFFIXES``) and every
    DICOM series folder directly in ``dataset_dir``, sorted by name.
    """
    if datalist:
        if not os.path.isfile(datalist):
            raise FileNotFoundError(f"datalist not found: {datalist}")
        with open(datalist) as f:
            content = json.load(f)
        if key not in content:
            raise KeyError(f"{datalist}: no '{key}' list (found: {sorted(content)})")
        entries = [e if isinstance(e, dict) else {"image": e} for e in content[key]]
        return [{**e, "image": _resolve(str(e["image"]), dataset_dir)} for e in entries]
    if not os.path.isdir(dataset_dir):
        raise FileNotFoundError(f"dataset_dir is not a folder: {dataset_dir}")
    items = []
    for name in sorted(os.listdir(dataset_dir)):
        path = os.path.join(dataset_dir, name)
        if os.path.isfile(path) and name.lower().endswith(IMAGE_SUFFIXES):
            items.append({"image": path})
        elif os.path.isdir(path) and _is_dicom_series_dir(path):
            items.append({"image": path})
    if not items:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) or DICOM series folders in {dataset_dir}")
    logger.info(f"found {len(items)} image(s) in {dataset_dir}")
    return items
