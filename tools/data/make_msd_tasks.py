"""Synthetic mini-datasets in the Medical Segmentation Decathlon layout, for tests and demos.

``write_msd_task(root, "Task01_BrainTumour")`` writes ``root/Task01_BrainTumour/`` with
``imagesTr/``, ``labelsTr/``, ``imagesTs/`` and a ``dataset.json`` that has the real task's
channel names (modality), label ids and names, and file naming. Images are ellipsoid "bodies"
with one blob per foreground label: CT-like HU for CT tasks, and per-channel contrasts with a zero
background for MRI tasks (multi-channel images are 4D NIfTI, channels last, like the Decathlon's).
Affines are oblique and flipped on some cases so that geometry round-trips are tested. Everything
is deterministic by ``seed``.

    python -m tools make_msd_tasks --root /tmp/msd --tasks "['Task09_Spleen']"
"""

from __future__ import annotations

import json
from pathlib import Path

import fire
import nibabel as nib
import numpy as np

__all__ = ["MSD_TASKS", "write_msd_task", "write_msd_tasks"]

# Per task: case-name stem, modality mapping, labels, voxel spacing of the synthetic files (mm)
MSD_TASKS = {
    "Task01_BrainTumour": (
        "BRATS",
        {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        (1.0, 1.0, 1.0),
    ),
    "Task02_Heart": ("la", {"0": "MRI"}, {"0": "background", "1": "left atrium"}, (1.25, 1.25, 1.37)),
    "Task03_Liver": ("liver", {"0": "CT"}, {"0": "background", "1": "liver", "2": "cancer"}, (1.5, 1.5, 2.0)),
    "Task04_Hippocampus": (
        "hippocampus",
        {"0": "MRI"},
        {"0": "background", "1": "Anterior", "2": "Posterior"},
        (1.0, 1.0, 1.0),
    ),
    "Task05_Prostate": (
        "prostate",
        {"0": "T2", "1": "ADC"},
        {"0": "background", "1": "PZ", "2": "TZ"},
        (0.8, 0.8, 3.0),
    ),
    "Task06_Lung": ("lung", {"0": "CT"}, {"0": "background", "1": "cancer"}, (1.5, 1.5, 2.0)),
    "Task07_Pancreas": ("pancreas", {"0": "CT"}, {"0": "background", "1": "pancreas", "2": "cancer"}, (1.5, 1.5, 2.0)),
    "Task08_HepaticVessel": (
        "hepaticvessel",
        {"0": "CT"},
        {"0": "background", "1": "Vessel", "2": "Tumour"},
        (1.5, 1.5, 2.0),
    ),
    "Task09_Spleen": ("spleen", {"0": "CT"}, {"0": "background", "1": "spleen"}, (1.5, 1.5, 2.0)),
    "Task10_Colon": ("colon", {"0": "CT"}, {"0": "background", "1": "colon cancer primaries"}, (1.5, 1.5, 2.0)),
}


def _ellipsoid(grid: np.ndarray, centre: np.ndarray, radii: np.ndarray) -> np.ndarray:
    return (((grid - centre[:, None, None, None]) / radii[:, None, None, None]) ** 2).sum(0) <= 1.0


def _affine(spacing: tuple[float, ...], shape: tuple[int, ...], rng: np.random.Generator, oblique: bool) -> np.ndarray:
    """Voxel-to-world: scaled by ``spacing``; for ``oblique`` cases rotated about z and flipped in x."""
    affine = np.diag([*spacing, 1.0])
    if oblique:
        angle = rng.uniform(0.1, 0.35)
        c, s = np.cos(angle), np.sin(angle)
        rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([-1.0, 1.0, 1.0])
        affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = -affine[:3, :3] @ (np.array(shape) / 2.0) + rng.uniform(-20, 20, 3)
    return affine


def _case(task: str, shape: tuple[int, int, int], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(image with channels last for multi-channel tasks, uint8 label map)."""
    _, modality, labels, _ = MSD_TASKS[task]
    grid = np.indices(shape).astype(np.float32)
    size = np.array(shape, dtype=np.float32)
    body = _ellipsoid(grid, size / 2 + rng.uniform(-2, 2, 3), size * rng.uniform(0.36, 0.44, 3))
    label = np.zeros(shape, np.uint8)
    for label_id in range(1, len(labels)):
        centre = size / 2 + rng.uniform(-0.15, 0.15, 3) * size
        radii = size * rng.uniform(0.08, 0.16, 3) / label_id**0.3
        label[_ellipsoid(grid, centre, radii) & body] = label_id
    channels = []
    ct = list(modality.values()) == ["CT"]
    for c in range(len(modality)):
        if ct:
            image = np.where(body, 40.0, -1000.0) + rng.normal(0, 12, shape)
            for label_id in range(1, len(labels)):
                image[label == label_id] += 60.0 * label_id * (1 if label_id % 2 else -1)
        else:
            image = np.where(body, 300.0 + 50 * c, 0.0) + np.where(body, rng.normal(0, 20, shape), 0.0)
            for label_id in range(1, len(labels)):
                image[label == label_id] += (150.0 + 40 * c) * label_id
            image = np.clip(image, 0, None)
        channels.append(image.astype(np.float32))
    image = channels[0] if len(channels) == 1 else np.stack(channels, axis=-1)
    return image, label


def write_msd_task(
    root: str | Path,
    task: str,
    num_training: int = 5,
    num_test: int = 2,
    seed: int = 0,
    shape: tuple[int, int, int] = (48, 48, 32),
) -> Path:
    """Write a synthetic ``task`` folder under ``root`` (Decathlon layout and naming); return the folder."""
    if task not in MSD_TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {sorted(MSD_TASKS)}")
    stem, modality, labels, spacing = MSD_TASKS[task]
    folder = Path(root) / task
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    shape = tuple(int(s) for s in shape)
    training, test = [], []
    for n in range(num_training + num_test):
        name = f"{stem}_{n + 1:03d}.nii.gz"
        image, label = _case(task, shape, rng)
        affine = _affine(spacing, shape, rng, oblique=n % 2 == 1)
        if n < num_training:
            nib.save(nib.Nifti1Image(image, affine), folder / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), folder / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            nib.save(nib.Nifti1Image(image, affine), folder / "imagesTs" / name)
            test.append(f"./imagesTs/{name}")
    dataset = {
        "name": task.split("_", 1)[1],
        "description": f"synthetic stand-in for {task} (tools/data/make_msd_tasks.py, seed {seed})",
        "tensorImageSize": "4D" if len(modality) > 1 else "3D",
        "modality": modality,
        "labels": labels,
        "numTraining": num_training,
        "numTest": num_test,
        "training": training,
        "test": test,
    }
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=4))
    return folder


def write_msd_tasks(
    root: str | Path, tasks: list[str] | None = None, num_training: int = 5, num_test: int = 2, seed: int = 0
) -> list[Path]:
    """Write several (default: all ten) synthetic task folders under ``root``; return them."""
    return [write_msd_task(root, t, num_training, num_test, seed + i) for i, t in enumerate(tasks or MSD_TASKS)]


def main(root: str, tasks: list[str] | None = None, num_training: int = 5, num_test: int = 2, seed: int = 0) -> None:
    """Command line: write synthetic Decathlon task folders under ``root``."""
    for folder in write_msd_tasks(root, tasks, num_training, num_test, seed):
        print(folder)


if __name__ == "__main__":
    fire.Fire(main)
