"""Datalists from a Decathlon task folder (``imagesTr``, ``labelsTr``, ``imagesTs``, ``dataset.json``).

Cross-validation folds split the ``training`` cases with the bundles' shared ``folds.fold_split``:
a seeded shuffle cut into ``num_folds`` nearly equal parts, fold k validating on part k and training
on the rest, so the folds' validation sets are disjoint and together cover every case.
"""

from __future__ import annotations

import os

from .bundle_logger import logger
from .datalists import IMAGE_SUFFIXES, _resolve, inference_items
from .folds import fold_indices, fold_split
from .skipped_files import skipped_lines
from .tasks import read_task_json

__all__ = ["training_cases", "fold_indices", "fold_datalist", "split", "test_items"]


def _paired_files(dataset_dir: str, dataset_json: str) -> list[dict]:
    """``imagesTr/<name>`` with ``labelsTr/<name>``, for a ``dataset.json`` without a training list."""
    images_dir = os.path.join(dataset_dir, "imagesTr")
    entries = sorted(os.listdir(images_dir)) if os.path.isdir(images_dir) else []
    names = [n for n in entries if n.endswith(IMAGE_SUFFIXES)]
    others = [(n, f"not an image file ({', '.join(IMAGE_SUFFIXES)})") for n in entries if n not in names]
    for line in skipped_lines(images_dir, others):
        logger.warning(line)
    if not names:
        raise ValueError(f"{dataset_json}: no 'training' list, and no images in {images_dir}")
    logger.info(f"{dataset_json} has no 'training' list: pairing {len(names)} image(s) of imagesTr with labelsTr")
    return [{"image": f"imagesTr/{n}", "label": f"labelsTr/{n}"} for n in names]


def training_cases(dataset_json: str, dataset_dir: str | None = None) -> list[dict]:
    """The ``training`` list of ``dataset_json`` as ``{"image", "label"}`` items with absolute paths.

    Paths are relative to ``dataset_dir`` (default: the folder of ``dataset_json``). Without a
    ``training`` list, each image of ``imagesTr`` is paired with the same name in ``labelsTr``.
    macOS ``._*`` resource files that some copies of the Decathlon archives carry are reported, not used.
    """
    dataset_dir = dataset_dir or os.path.dirname(os.path.abspath(dataset_json))
    content = read_task_json(dataset_json, "dataset.json")
    entries = content.get("training") or _paired_files(dataset_dir, dataset_json)
    items = []
    for n, entry in enumerate(entries, 1):
        if not isinstance(entry, dict) or "image" not in entry or "label" not in entry:
            raise ValueError(f"{dataset_json}: training case {n} needs 'image' and 'label', got {entry!r}")
        if os.path.basename(entry["image"]).startswith("._"):
            logger.warning(f"{dataset_json}: ignoring macOS resource file {entry['image']}")
            continue
        items.append({"image": _resolve(entry["image"], dataset_dir), "label": _resolve(entry["label"], dataset_dir)})
    return items


def fold_datalist(
    dataset_json: str, fold: int, num_folds: int = 5, seed: int = 12345, dataset_dir: str | None = None
) -> dict[str, list[dict]]:
    """``{"training": [...], "validation": [...]}`` for ``fold`` (0-based) of the seeded split (``fold_split``)."""
    return fold_split(training_cases(dataset_json, dataset_dir), fold, num_folds, seed)


def split(
    datalist: str, dataset_json: str, fold: int, num_folds: int = 5, seed: int = 12345, dataset_dir: str | None = None
) -> dict[str, list[dict]]:
    """The training/validation split to use: ``datalist``'s own lists when one is given, else ``fold``'s."""
    if not datalist:
        return fold_datalist(dataset_json, fold, num_folds, seed, dataset_dir)
    content = read_task_json(datalist, "datalist")
    base = dataset_dir or os.path.dirname(os.path.abspath(dataset_json))
    out = {}
    for key in ("training", "validation"):
        if key not in content:
            raise KeyError(f"{datalist}: no '{key}' list (found: {sorted(content)})")
        out[key] = [
            {k: _resolve(v, base) if k in ("image", "label") else v for k, v in e.items()} for e in content[key]
        ]
    logger.info(f"datalist {datalist}: {len(out['training'])} training, {len(out['validation'])} validation cases")
    return out


def test_items(dataset_json: str, dataset_dir: str | None = None) -> list[dict]:
    """The test images to predict: ``dataset.json``'s ``test`` list, else every image in ``imagesTs``."""
    dataset_dir = dataset_dir or os.path.dirname(os.path.abspath(dataset_json))
    entries = read_task_json(dataset_json, "dataset.json").get("test")
    if entries:
        items = [{"image": _resolve(e["image"] if isinstance(e, dict) else e, dataset_dir)} for e in entries]
        for item in items:
            if os.path.basename(item["image"]).startswith("._"):
                logger.warning(f"{dataset_json}: ignoring macOS resource file {item['image']}")
        return [i for i in items if not os.path.basename(i["image"]).startswith("._")]
    return inference_items("", os.path.join(dataset_dir, "imagesTs"))
