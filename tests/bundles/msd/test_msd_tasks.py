"""Each of the ten Decathlon tasks, on a synthetic mini-dataset in the task's layout, trains and predicts.

Per task: 2 training iterations and a validation leave a best checkpoint with a finite Dice; inference
over ``imagesTs`` writes one prediction per test image into ``<output>/<TaskXX_Name>/``, named exactly
like the image, in its geometry, with the task's label ids. Then: a two-fold ensemble with flip TTA,
and evaluation with Dice and NSD per label in the original image space.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import subprocess
import sys

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import (
    MSD_DIR,
    MSD_INFER_SMALL,
    MSD_SMALL,
    REPO,
    btcv_workflow,
    bundle_on_path,
    run_workflow,
    train_msd_fold,
)
from tools.data.make_msd_tasks import MSD_TASKS

CHANNELS = {"Task01_BrainTumour": 4, "Task05_Prostate": 2}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One bundle_root for all tasks' runs, as a user training several tasks from one bundle folder would."""
    return tmp_path_factory.mktemp("msd_runs")


def _test_images(task_dir):
    return [task_dir / p for p in json.loads((task_dir / "dataset.json").read_text())["test"]]


def _assert_prediction_matches(pred_path, image_path, num_labels):
    pred, image = nib.load(str(pred_path)), nib.load(str(image_path))
    assert pred.shape == image.shape[:3]
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert pred.get_data_dtype() == np.uint8
    assert set(np.unique(np.asarray(pred.dataobj)).tolist()) <= set(range(num_labels))


@pytest.mark.parametrize("task", list(MSD_TASKS))
def test_task_trains_and_writes_submission_ready_predictions(task, msd_root, runs):
    workflow = train_msd_fold(msd_root, runs, task)
    trainer = workflow.parser.get_parsed_content("train#trainer")
    assert trainer.state.iteration == 2
    assert math.isfinite(float(trainer.state.output[0]["loss"]))
    best = workflow.parser.get_parsed_content("validate#evaluator").state.best_metric
    assert 0.0 <= best <= 1.0
    model = runs / "models" / task / "fold0" / "model.pt"
    assert model.is_file()
    network = workflow.parser.get_parsed_content("network")
    assert network.swinViT.patch_embed.proj.in_channels == CHANNELS.get(task, 1)
    assert network.out.conv.conv.out_channels == len(
        json.loads((msd_root / task / "dataset.json").read_text())["labels"]
    )

    run_workflow(
        ["inference.json"],
        "infer",
        MSD_DIR,
        task=task,
        dataset_dir=str(msd_root / task),
        bundle_root=str(runs),
        **MSD_INFER_SMALL,
    )
    out_dir = runs / "predictions" / task
    images = _test_images(msd_root / task)
    assert sorted(p.name for p in out_dir.iterdir()) == sorted([i.name for i in images] + ["manifest.json"])
    num_labels = len(json.loads((msd_root / task / "dataset.json").read_text())["labels"])
    for image in images:
        _assert_prediction_matches(out_dir / image.name, image, num_labels)


def test_two_fold_ensemble_with_flip_tta_runs(msd_root, runs, tmp_path, caplog):
    task = "Task01_BrainTumour"
    if not (runs / "models" / task / "fold0" / "model.pt").is_file():
        train_msd_fold(msd_root, runs, task, fold=0)
    train_msd_fold(msd_root, runs, task, fold=1)
    with bundle_on_path(MSD_DIR):
        workflow = btcv_workflow(
            ["inference.json"],
            "infer",
            MSD_DIR,
            task=task,
            dataset_dir=str(msd_root / task),
            bundle_root=str(runs),
            output_dir=str(tmp_path / task),
            tta_flips=[[0], [2]],
            **MSD_INFER_SMALL,
        )
        logging.getLogger("swin_unetr_msd").addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger="swin_unetr_msd")
        workflow.initialize()
        ensemble = workflow.parser.get_parsed_content("network")
        workflow.run()
        workflow.finalize()
    assert type(ensemble).__name__ == "SoftmaxEnsemble"
    assert len(ensemble.networks) == 2 and len(ensemble.flips) == 3
    assert "ensemble of 2 model(s) x 3 view(s)" in caplog.text
    assert caplog.text.count("loaded 159/159 model tensors") == 2
    # the two folds are different models, so the ensemble is not one of them
    first, second = (
        p.detach() for p in (ensemble.networks[0].out.conv.conv.weight, ensemble.networks[1].out.conv.conv.weight)
    )
    assert not torch.equal(first, second)
    for image in _test_images(msd_root / task):
        _assert_prediction_matches(tmp_path / task / image.name, image, 4)


def test_ensemble_averages_softmax_over_models_and_flips():
    with bundle_on_path(MSD_DIR):
        from scripts.ensemble import SoftmaxEnsemble

        torch.manual_seed(0)
        nets = [torch.nn.Conv3d(2, 3, 3, padding=1) for _ in range(2)]
        x = torch.randn(1, 2, 6, 5, 4)
        ensemble = SoftmaxEnsemble(nets, flip_axes=[[1]])
        expected = sum(torch.softmax(n(x), 1) + torch.softmax(n(x.flip(3)), 1).flip(3) for n in nets) / 4
        out = ensemble(x)
    torch.testing.assert_close(torch.softmax(out, 1), expected)


def test_evaluation_reports_dice_and_nsd_per_label(msd_root, runs, tmp_path):
    task = "Task01_BrainTumour"
    if not (runs / "models" / task / "fold0" / "model.pt").is_file():
        train_msd_fold(msd_root, runs, task, fold=0)
    run_workflow(
        ["train.json", "evaluate.json"],
        "eval",
        MSD_DIR,
        task=task,
        dataset_dir=str(msd_root / task),
        bundle_root=str(runs),
        output_dir=str(tmp_path),
        num_folds=3,
        **MSD_SMALL,
    )
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    assert summary["organs"] == ["edema", "non-enhancing tumor", "enhancing tumour"]
    assert set(summary["metrics"]) == {"val_mean_dice", "val_mean_dice_with_background", "val_nsd"}
    with_bg = summary["metrics"]["val_mean_dice_with_background"]["per_organ"]
    assert list(with_bg)[1:] == summary["organs"] and len(with_bg) == 4  # the background first
    for name in ("val_mean_dice", "val_nsd"):
        rows = list(csv.DictReader((tmp_path / f"{name}_per_case.csv").open()))
        assert len(rows) == 1 and rows[0]["case"].startswith("BRATS_")
        values = [float(rows[0][label]) for label in summary["organs"] if rows[0][label]]
        assert values and all(0.0 <= v <= 1.0 for v in values)


def test_two_process_ddp_training_of_a_multi_channel_task_on_cpu(msd_root, tmp_path):
    task = "Task05_Prostate"
    overrides = {
        **MSD_SMALL,
        "task": task,
        "dataset_dir": str(msd_root / task),
        "bundle_root": str(tmp_path),
        "num_folds": 3,
        "fold": 0,
        "max_epochs": 1,
        "val_interval": 1,
        "lr_scaling": "linear",
    }
    args = [f"--{k}={v!r}" if isinstance(v, list) else f"--{k}={v}" for k, v in overrides.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29527",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(MSD_DIR)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=MSD_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Epoch: 1/1, Iter: 1/1" in result.stdout + result.stderr  # 2 training cases shared by 2 ranks
    assert "effective learning rate 0.0002 (learning_rate 0.0001, lr_scaling linear, 2 processes)" in result.stdout
    model = torch.load(tmp_path / "models" / task / "fold0" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in model)
    assert model["swinViT.patch_embed.proj.weight"].shape[1] == 2
