"""Check Medical Segmentation Decathlon predictions and zip them for a leaderboard submission.

Each prediction folder (as written by ``bundles/swin_unetr_msd`` inference into
``predictions/TaskXX_Name/``) must be named like one of the ten MSD tasks and hold only ``.nii.gz``
label maps (hidden files such as macOS ``._*`` and the inference's ``manifest.json`` are ignored;
neither goes into the zip). Every file must be a readable 3D NIfTI
of an integer type. With ``data_root`` (the folder holding ``TaskXX_Name/dataset.json`` and
``imagesTs/``), each task's predictions must match its test images one to one by file name, with the
image's spatial shape and affine, and hold only the task's label ids.

All problems are reported together in one ``SubmissionError`` and then nothing is written; otherwise
the zip (``TaskXX_Name/<name>.nii.gz`` members, deflated) is written atomically.

    python -m tools msd_submission --prediction_dirs "['a/Task09_Spleen','b/Task01_BrainTumour']" \\
        --zip_path submission.zip --data_root /data/msd
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import fire

from tools.common.submission import SubmissionError, check_label_map, write_zip_atomically
from tools.data.make_msd_tasks import MSD_TASKS

__all__ = ["SubmissionError", "make_submission"]

INFERENCE_MANIFEST = "manifest.json"
"""The inference's input-to-output list in a prediction folder: not a prediction, not zipped."""


def _prediction_files(folder: Path, problems: list[str]) -> list[Path]:
    """The ``.nii.gz`` files of ``folder``; anything else (but hidden files) is a problem."""
    files = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == INFERENCE_MANIFEST:
            continue
        if path.is_file() and path.name.endswith(".nii.gz"):
            files.append(path)
        else:
            problems.append(f"{path}: not a NIfTI prediction (.nii.gz file)")
    if not files:
        problems.append(f"{folder}: no .nii.gz predictions")
    return files


def _test_images(task_dir: Path, problems: list[str]) -> tuple[dict[str, Path], set[int]] | None:
    """(test image path by file name, label ids) of a task folder, or None (and a problem)."""
    try:
        dataset = json.loads((task_dir / "dataset.json").read_text())
        label_ids = {int(key) for key in dataset["labels"]}
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems.append(f"{task_dir / 'dataset.json'}: cannot read the task's labels ({err!r})")
        return None
    if dataset.get("test"):
        images = [task_dir / entry for entry in dataset["test"]]
    else:
        images = [p for p in sorted((task_dir / "imagesTs").glob("*.nii.gz")) if not p.name.startswith(".")]
    return {image.name: image for image in images}, label_ids


def make_submission(prediction_dirs: list[str], zip_path: str, data_root: str | None = None) -> dict:
    """Check the task prediction folders (against ``data_root`` when given) and zip them into ``zip_path``.

    Raises ``SubmissionError`` listing every problem (and writes nothing); returns a summary:
    ``{"zip_path": ..., "tasks": {task: number of files}, "num_files": total}``.
    """
    problems: list[str] = []
    folders: dict[str, Path] = {}
    for given in prediction_dirs or []:
        folder = Path(os.path.abspath(given))
        if folder.name not in MSD_TASKS:
            problems.append(f"{given}: folder is not named like an MSD task (one of {', '.join(MSD_TASKS)})")
        elif folder.name in folders:
            problems.append(f"{given}: a second prediction folder for {folder.name} (first: {folders[folder.name]})")
        elif not folder.is_dir():
            problems.append(f"{given}: not a folder")
        else:
            folders[folder.name] = folder
    if not prediction_dirs:
        problems.append("no prediction folders given")

    members: dict[str, Path] = {}
    file_counts: dict[str, int] = {}
    for task, folder in folders.items():
        files = _prediction_files(folder, problems)
        file_counts[task] = len(files)
        expected = _test_images(Path(data_root) / task, problems) if data_root is not None else None
        images, label_ids = expected if expected else ({}, None)
        for path in files:
            if expected and path.name not in images:
                problems.append(f"{path}: no test image of that name in {Path(data_root) / task}")
                continue
            problems += check_label_map(path, images.get(path.name), label_ids)
            members[f"{task}/{path.name}"] = path
        missing = sorted(set(images) - {path.name for path in files})
        problems += [f"{folder / name}: missing prediction for test image {images[name]}" for name in missing]
    if problems:
        raise SubmissionError(problems)

    write_zip_atomically(members, zip_path)
    return {"zip_path": str(zip_path), "tasks": file_counts, "num_files": len(members)}


def main(prediction_dirs: list[str], zip_path: str, data_root: str | None = None) -> None:
    """Command line: check and zip the prediction folders, print the summary; exit 1 listing any problems."""
    if isinstance(prediction_dirs, str):
        prediction_dirs = [prediction_dirs]
    try:
        summary = make_submission(prediction_dirs, zip_path, data_root)
    except SubmissionError as err:
        sys.exit(str(err))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    fire.Fire(main)
