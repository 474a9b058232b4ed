"""Write a single-task, MONAI-Label-ready copy of the MSD bundle.

MONAI Label's ``monaibundle`` app reads a bundle's ``configs/metadata.json`` (labels from
``channel_def``), loads and reloads ``models/model.pt``, starts training from that file, and needs
the task's ``dataset.json`` (the bundle reads the task settings with it). The MSD bundle describes
its default task and keeps checkpoints per task and fold, so the copy this tool writes:

- holds the bundle's ``configs/``, ``docs/``, ``scripts/`` and ``LICENSE`` (no ``models/``, ``eval/``,
  ``predictions/``, ``runs/`` or caches);
- has ``task`` and ``dataset_dir`` set in ``train.json`` and ``inference.json``, ``ckpt_dir`` set to
  ``$@bundle_root + '/models'`` in ``train.json`` (training writes the ``models/model.pt`` that
  inference loads) and ``ckpt_path`` to ``$@bundle_root + '/models/model.pt'`` in ``inference.json``;
- has ``configs/metadata.json`` describing the task (input channels, ``channel_def``), written by the
  bundle's own ``configs/task_metadata.json`` run in the copy.

    python -m tools msd_label_bundle --task Task09_Spleen --dataset_dir /data/msd/Task09_Spleen \\
        --output apps/monaibundle/model/swin_unetr_msd_spleen [--overwrite]
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tools.common.bundles import MSD_DIR, bundle_command, bundle_files
from tools.common.processes import shell_quote

logger = logging.getLogger("msd_label_bundle")

CKPT_DIR = "$@bundle_root + '/models'"
MODEL_PATH = "$@bundle_root + '/models/model.pt'"


class LabelBundleError(ValueError):
    """The copy cannot be written: bad task, missing dataset.json, no or existing output, failed metadata run."""


def known_tasks(bundle_dir: Path = MSD_DIR) -> list[str]:
    """The tasks the bundle has a task file for (``configs/tasks/<task>.json``), sorted."""
    return sorted(p.stem for p in (bundle_dir / "configs" / "tasks").glob("*.json"))


def check_inputs(task: str, dataset_dir: Path | None, output: Path, overwrite: bool) -> None:
    """Fail, naming the file or folder, on an unknown task, a missing ``dataset.json`` or an existing output."""
    tasks = known_tasks()
    if task not in tasks:
        raise LabelBundleError(f"unknown task {task!r}: {MSD_DIR / 'configs' / 'tasks'} has {tasks}")
    dataset_json = dataset_dir / "dataset.json" if dataset_dir is not None else None
    if dataset_json is not None and not dataset_json.is_file():
        raise LabelBundleError(f"{dataset_json} not found: --dataset_dir must be the task folder holding dataset.json")
    if output.exists() and not overwrite:
        raise LabelBundleError(f"{output} exists; pass --overwrite to replace it")
    if output.resolve() == MSD_DIR.resolve() or MSD_DIR.resolve() in output.resolve().parents:
        raise LabelBundleError(f"{output} is inside the bundle {MSD_DIR}; choose another folder")


def copy_bundle(output: Path) -> None:
    """Copy the bundle's configs, docs, scripts and LICENSE to ``output`` (replacing it if it exists)."""
    if output.exists():
        shutil.rmtree(output)
    for source, inside in bundle_files(MSD_DIR):
        (output / inside).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, output / inside)


def write_json(path: Path, content: Any) -> None:
    """Write ``content`` as the bundle's JSON: 4-space indent and a final newline."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(content, indent=4) + "\n")
    os.replace(tmp, path)


def set_knobs(config: Path, knobs: dict[str, Any]) -> None:
    """Set top-level ``knobs`` in ``config``; each must already be a top-level id there."""
    content = json.loads(config.read_text())
    missing = sorted(set(knobs) - set(content))
    if missing:
        raise LabelBundleError(f"{config} has no top-level {missing}")
    content.update(knobs)
    write_json(config, content)


def write_task_metadata(output: Path, task: str, check_dataset: bool) -> Path:
    """Run the copy's ``configs/task_metadata.json`` and make its output the copy's ``configs/metadata.json``.

    With ``check_dataset``, it runs on ``train.json``, whose task settings check the task's ``dataset.json``;
    otherwise on ``inference.json``, which reads the task file alone.
    """
    configs = output / "configs"
    base = "configs/train.json" if check_dataset else "configs/inference.json"
    cmd = bundle_command(None, [base, "configs/task_metadata.json"], {})
    done = subprocess.run(cmd, cwd=output, capture_output=True, text=True, check=False)
    written = configs / f"metadata_{task}.json"
    if done.returncode != 0 or not written.is_file():
        lines = (done.stdout + done.stderr).splitlines()
        cause = next((line for line in lines if "Error: " in line), lines[-1] if lines else "no output")
        raise LabelBundleError(
            f"writing the metadata of {task} in {output} failed (exit {done.returncode}): {cause}\n"
            f"  command: cd {output} && {shell_quote(cmd)}"
        )
    write_json(configs / "metadata.json", json.loads(written.read_text()))
    written.unlink()
    return configs / "metadata.json"


def msd_label_bundle(
    task: str, dataset_dir: str | None = None, output: str | None = None, overwrite: bool = False
) -> Path:
    """Write a single-task copy of the MSD bundle for ``task`` to ``output``; return ``output``.

    Args:
        task: the Decathlon task, e.g. ``Task09_Spleen`` (one of the bundle's ``configs/tasks``).
        dataset_dir: the task folder holding ``dataset.json``, for training (MONAI Label's /train);
            optional: inference reads nothing but the copy.
        output: the copy's folder, e.g. ``apps/monaibundle/model/swin_unetr_msd_spleen``.
        overwrite: replace an existing ``output``.
    """
    if not output:
        raise LabelBundleError("--output (the copy's folder) is required")
    data = Path(dataset_dir).expanduser().resolve() if dataset_dir else None
    out = Path(output).expanduser().resolve()
    check_inputs(task, data, out, overwrite)
    copy_bundle(out)
    configs = out / "configs"
    where = {"dataset_dir": str(data)} if data is not None else {}
    try:
        set_knobs(configs / "train.json", {"task": task, "ckpt_dir": CKPT_DIR, **where})
        set_knobs(configs / "inference.json", {"task": task, "ckpt_path": MODEL_PATH, **where})
        meta = write_task_metadata(out, task, check_dataset=data is not None)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)  # no half-made copy for a client to pick up
        raise
    labels = json.loads(meta.read_text())["network_data_format"]["outputs"]["pred"]["channel_def"]
    logger.info(f"{out}: {task}, labels {labels}, checkpoints in {out / 'models'}")
    return out


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(msd_label_bundle, report=str, errors=(LabelBundleError,))
