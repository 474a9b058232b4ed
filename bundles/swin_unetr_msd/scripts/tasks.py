"""Per-task settings: the bundle's ``configs/tasks/<task>.json``, checked against ``dataset.json`` for training.

The task file holds what the bundle chooses (intensity normalisation, target spacing, ROI,
augmentation, NSD tolerances) and what the Decathlon fixes for the task: the modality kind, and the
input channel and label names by id (as in the Decathlon's ``dataset.json``: ``channel_names`` is its
``modality``, ``label_names`` its ``labels``). The counts follow from the names. Everything inference
needs comes from the task file alone (``read_task_file``), so the bundle runs, and ``network_def``
builds, without any ``dataset.json`` on disk. ``load_task`` checks a ``dataset.json`` against the task
file (training and evaluation read their cases from it); the task file's names are the ones used.
"""

from __future__ import annotations

import json
import os
from typing import Any

from monai.transforms import (
    CropForegroundd,
    NormalizeIntensityd,
    RandFlipd,
    RandRotate90d,
    RandScaleIntensityd,
    RandShiftIntensityd,
    ScaleIntensityRanged,
)

from .bundle_logger import logger
from .datalists import read_json

__all__ = [
    "TASKS",
    "TaskSettingsError",
    "read_task_json",
    "read_task_file",
    "load_task",
    "intensity_transforms",
    "augmentations",
    "write_task_metadata",
]

TASKS = (
    "Task01_BrainTumour",
    "Task02_Heart",
    "Task03_Liver",
    "Task04_Hippocampus",
    "Task05_Prostate",
    "Task06_Lung",
    "Task07_Pancreas",
    "Task08_HepaticVessel",
    "Task09_Spleen",
    "Task10_Colon",
)
CT_WINDOW = "ct_window"
ZSCORE_NONZERO = "zscore_nonzero"
TASK_DIR = os.path.normpath(os.path.join(os.path.dirname(__file__), os.pardir, "configs", "tasks"))
_TASK_KEYS = (
    "task",
    "modality",
    "channel_names",
    "label_names",
    "intensity",
    "spacing",
    "roi_size",
    "augmentation",
    "nsd_tolerance_mm",
)


class TaskSettingsError(ValueError):
    """Raised when a task name, task file or ``dataset.json`` is unusable or inconsistent."""


def read_task_json(path: str, what: str) -> dict:
    """The JSON object in ``path`` (``datalists.read_json``), its problems raised as ``TaskSettingsError``."""
    try:
        return read_json(path, what)
    except ValueError as e:
        raise TaskSettingsError(str(e)) from e


def _indexed_names(mapping: Any, path: str, field: str) -> dict[int, str]:
    """``{"0": "CT"}``-style mappings of dataset.json as ``{0: "CT"}``, checked to be 0..n-1."""
    if not isinstance(mapping, dict) or not mapping:
        raise TaskSettingsError(f"{path}: '{field}' must be a non-empty mapping like {{\"0\": ...}}")
    try:
        names = {int(k): str(v) for k, v in mapping.items()}
    except ValueError as e:
        raise TaskSettingsError(f"{path}: '{field}' keys must be whole numbers, got {sorted(mapping)}") from e
    if sorted(names) != list(range(len(names))):
        raise TaskSettingsError(f"{path}: '{field}' ids must be 0..{len(names) - 1} without gaps, got {sorted(names)}")
    return names


def read_task_file(task: str, task_dir: str = TASK_DIR) -> dict[str, Any]:
    """The bundle's settings of ``task`` (``<task_dir>/<task>.json``) alone, checked; no ``dataset.json`` is read.

    Returns the file's entries, with ``channel_names`` and ``label_names`` as ``{id: name}`` (ids 0..n-1),
    plus the counts that follow from them: ``num_channels`` = ``in_channels`` and ``num_labels`` =
    ``num_classes`` (background included). Raises ``TaskSettingsError`` naming the file for an unknown
    task or a malformed file.
    """
    if task not in TASKS:
        raise TaskSettingsError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    task_file = os.path.join(task_dir, f"{task}.json")
    settings = read_task_json(task_file, "task settings file")
    missing = [k for k in _TASK_KEYS if k not in settings]
    if missing:
        raise TaskSettingsError(f"{task_file}: missing entries {missing}")
    if settings["task"] != task:
        raise TaskSettingsError(f"{task_file}: says task {settings['task']!r}, expected {task!r}")
    kind = settings["intensity"].get("type")
    if kind not in (CT_WINDOW, ZSCORE_NONZERO):
        raise TaskSettingsError(
            f"{task_file}: intensity type must be {CT_WINDOW!r} or {ZSCORE_NONZERO!r}, got {kind!r}"
        )
    channels = _indexed_names(settings["channel_names"], task_file, "channel_names")
    labels = _indexed_names(settings["label_names"], task_file, "label_names")
    if len(settings["nsd_tolerance_mm"]) != len(labels) - 1:
        raise TaskSettingsError(
            f"{task_file}: nsd_tolerance_mm needs one value per foreground label "
            f"({len(labels) - 1}), got {len(settings['nsd_tolerance_mm'])}"
        )
    counts = {"num_channels": len(channels), "in_channels": len(channels)}
    counts.update(num_labels=len(labels), num_classes=len(labels))
    return dict(settings, channel_names=channels, label_names=labels, **counts)


def load_task(task: str, dataset_json: str, task_dir: str = TASK_DIR) -> dict[str, Any]:
    """Settings of ``task`` (``read_task_file``), checked against the task's ``dataset_json``.

    Returns ``read_task_file``'s settings. Raises ``TaskSettingsError`` naming the file for an unknown
    task, a malformed file, or a ``dataset.json`` whose channel or label counts do not match the task
    (e.g. the wrong task folder). Names that differ from the task file's are logged as a warning; the
    task file's are used.
    """
    settings = read_task_file(task, task_dir)
    dataset = read_task_json(dataset_json, f"dataset.json of {task}")
    channels = _indexed_names(dataset.get("modality"), dataset_json, "modality")
    labels = _indexed_names(dataset.get("labels"), dataset_json, "labels")
    problems = []
    if len(channels) != settings["num_channels"]:
        problems.append(
            f"{len(channels)} input channel(s) {list(channels.values())}, {task} has {settings['num_channels']}"
        )
    if len(labels) != settings["num_labels"]:
        problems.append(f"{len(labels)} labels {list(labels.values())}, {task} has {settings['num_labels']}")
    if settings["modality"] == "CT" and [c.upper() for c in channels.values()] != ["CT"]:
        problems.append(f"modality {list(channels.values())}, {task} is CT")
    if problems:
        raise TaskSettingsError(
            f"{dataset_json} does not describe {task}: it lists "
            + "; ".join(problems)
            + ". Is dataset_dir the right task folder?"
        )
    for field, found, own in (("modality", channels, "channel_names"), ("labels", labels, "label_names")):
        if found != settings[own]:
            logger.warning(
                f"{dataset_json}: '{field}' {found} differs from the task file's {own} {settings[own]}; "
                f"using the task file's"
            )
    logger.info(
        f"{task}: {settings['num_channels']} channel(s) {list(settings['channel_names'].values())}, "
        f"labels {settings['label_names']}, intensity {settings['intensity']}, "
        f"spacing {settings['spacing']} mm, ROI {settings['roi_size']}"
    )
    return settings


def intensity_transforms(intensity: dict[str, Any], keys: list[str], image_key: str = "image") -> list:
    """Normalisation and foreground cropping for the task's modality, in the order that suits it.

    CT: the HU ``window`` is scaled to 0..1 (clipped), then the volume is cropped to voxels above
    the window's lower end. MRI: the volume is cropped to its non-zero voxels, then each channel is
    z-scored over its non-zero voxels (zero stays zero, so the background is unchanged).
    """
    crop = CropForegroundd(keys=keys, source_key=image_key, allow_smaller=True)
    if intensity["type"] == CT_WINDOW:
        low, high = intensity["window"]
        window = ScaleIntensityRanged(keys=image_key, a_min=low, a_max=high, b_min=0.0, b_max=1.0, clip=True)
        return [window, crop]
    if intensity["type"] == ZSCORE_NONZERO:
        return [crop, NormalizeIntensityd(keys=image_key, nonzero=True, channel_wise=True)]
    raise ValueError(f"intensity type must be {CT_WINDOW!r} or {ZSCORE_NONZERO!r}, got {intensity!r}")


def augmentations(augmentation: dict[str, Any], keys: list[str], image_key: str = "image") -> list:
    """The task's random augmentation after cropping: flips, rot90 in a plane, intensity scale/shift."""
    out = [
        RandFlipd(keys=keys, spatial_axis=[axis], prob=augmentation["flip_prob"]) for axis in augmentation["flip_axes"]
    ]
    if augmentation["rot90_prob"] > 0:
        out.append(
            RandRotate90d(
                keys=keys, max_k=3, prob=augmentation["rot90_prob"], spatial_axes=tuple(augmentation["rot90_axes"])
            )
        )
    if augmentation["intensity_prob"] > 0:
        out.append(RandScaleIntensityd(keys=image_key, factors=0.1, prob=augmentation["intensity_prob"]))
        out.append(RandShiftIntensityd(keys=image_key, offsets=0.1, prob=augmentation["intensity_prob"]))
    return out


def write_task_metadata(metadata_file: str, settings: dict[str, Any], output_file: str) -> str:
    """Write a copy of ``metadata_file`` whose ``network_data_format`` describes ``settings``' task.

    MONAI Label and MONAI Deploy read the input channels and the output ``channel_def`` from the
    bundle's metadata, which describes the default task; this copy (e.g. ``configs/metadata_<task>.json``,
    passed with ``--meta_file``) describes another one. Returns ``output_file``.
    """
    meta = read_task_json(metadata_file, "bundle metadata file")
    task = settings["task"]
    image = meta["network_data_format"]["inputs"]["image"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    ct = settings["intensity"]["type"] == CT_WINDOW
    image.update(
        num_channels=settings["in_channels"],
        modality="CT" if ct else "MR",
        format="hounsfield" if ct else "magnitude",
        value_range=[0, 1] if ct else [],
        spatial_shape=list(settings["roi_size"]),
        channel_def={str(i): name for i, name in settings["channel_names"].items()},
    )
    pred.update(
        num_channels=settings["num_classes"],
        spatial_shape=list(settings["roi_size"]),
        channel_def={str(i): name for i, name in settings["label_names"].items()},
    )
    labels = ", ".join(f"{i} {name}" for i, name in settings["label_names"].items())
    meta.update(
        image_classes=f"{task}: {settings['in_channels']} channel(s) "
        f"{list(settings['channel_names'].values())}, normalised as {settings['intensity']}",
        label_classes=f"{task}: {labels}",
    )
    tmp = f"{output_file}.tmp"
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=4)
    os.replace(tmp, output_file)
    logger.info(f"wrote the metadata of {task} to {output_file}")
    return output_file
