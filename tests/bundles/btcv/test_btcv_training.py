"""Fine-tuning with the BTCV bundle: train, validate, checkpoint, resume, encoder hand-off, DDP."""

from __future__ import annotations

import logging
import math
import os
import subprocess
import sys

import pytest
import torch
from monai.networks.nets import SwinUNETR

from tests.helpers import BTCV_DIR, REPO, SMALL, btcv_workflow, bundle_on_path, error_text, order_record


def test_training_two_iterations_and_validation_leave_checkpoints(trained):
    trainer = trained["workflow"].trainer
    evaluator = trained["workflow"].parser.get_parsed_content("validate#evaluator")
    assert trainer.state.iteration == 2
    assert trainer.state.epoch == 1
    assert math.isfinite(float(trainer.state.output[0]["loss"]))
    best = evaluator.state.best_metric
    assert math.isfinite(best) and 0.0 <= best <= 1.0

    # model.pt is the network's state dict as it is (as the model zoo's bundles save it), its order inside
    model = torch.load(trained["model"], map_location="cpu", weights_only=True)
    records = [f"swinViT.layers{i}.0.downsample._extra_state" for i in range(1, 5)]
    assert all(torch.equal(model[k], order_record("current")) for k in records)
    net = SwinUNETR(1, 14, feature_size=12)  # monai's own class: every tensor of it is in the file,
    result = net.load_state_dict(model, strict=False)  # and only the order records are extra
    assert result.missing_keys == [] and sorted(result.unexpected_keys) == records

    last = torch.load(trained["last"], map_location="cpu", weights_only=False)
    assert {"model", "optimizer", "lr_scheduler", "trainer", "network_record"} <= set(last)
    assert last["trainer"]["iteration"] == 2
    assert not [f for f in os.listdir(trained["root"] / "models") if f.startswith(".tmp")]
    assert [f for f in os.listdir(trained["root"] / "eval") if f.startswith("events.out.tfevents")]


def test_resume_continues_from_the_saved_step(trained, phantom_dir, tmp_path):
    before = torch.load(trained["last"], map_location="cpu", weights_only=False)
    steps_run = []
    with bundle_on_path():
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            bundle_root=str(tmp_path),
            resume_from=str(trained["last"]),
            max_epochs=2,
            val_interval=5,
            **SMALL,
        )
        workflow.initialize()
        trainer = workflow.trainer
        from ignite.engine import Events

        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: steps_run.append(e.state.iteration))
        optimizer = workflow.parser.get_parsed_content("optimizer")
        workflow.run()
    assert steps_run == [3, 4]  # the two steps of epoch 1 are not repeated
    assert trainer.state.epoch == 2
    saved_steps = {int(s["step"]) for s in before["optimizer"]["state"].values()}
    assert saved_steps == {2}
    assert {int(s["step"]) for s in optimizer.state_dict()["state"].values()} == {4}


def _official_encoder_file(path, feature_size):
    """A file in the official model_swinvit.pt layout, made from a random MONAI encoder."""
    source = SwinUNETR(1, 14, feature_size=feature_size).swinViT.state_dict()
    state = {}
    for key, value in source.items():
        key = key.replace("mlp.linear1", "mlp.fc1").replace("mlp.linear2", "mlp.fc2")
        state[f"module.{key}"] = value
    for head in ("norm", "rotation_head", "contrastive_head", "convTrans3d"):
        state[f"module.{head}.weight"] = torch.zeros(4)
        state[f"module.{head}.bias"] = torch.zeros(4)
    torch.save({"state_dict": state}, path)
    return source


def test_pretrained_path_loads_official_encoder_into_parsed_network(tmp_path, phantom_dir, caplog):
    caplog.set_level("INFO")
    path = tmp_path / "model_swinvit.pt"
    source = _official_encoder_file(path, feature_size=48)
    with bundle_on_path():
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            bundle_root=str(tmp_path),
            pretrained_path=str(path),
            feature_size=48,
        )
        # the bundle's logging.conf replaces the root handlers, pytest's capture among them
        bundle_logger = logging.getLogger("swin_unetr_btcv_seg")
        bundle_logger.addHandler(caplog.handler)
        try:
            network = workflow.parser.get_parsed_content("network")
        finally:
            bundle_logger.removeHandler(caplog.handler)
        from scripts.patch_merging import LegacyPatchMerging

    assert all(
        isinstance(layer[0].downsample, LegacyPatchMerging)
        for layer in (
            network.swinViT.layers1,
            network.swinViT.layers2,
            network.swinViT.layers3,
            network.swinViT.layers4,
        )
    )
    loaded = {k: v for k, v in network.swinViT.state_dict().items() if not k.endswith("._extra_state")}
    assert len(loaded) == len(source) == 126
    assert all(torch.equal(loaded[k], source[k]) for k in source)
    assert "loaded 126/126 encoder tensors" in caplog.text


def test_pretrained_path_with_other_feature_size_fails_clearly(tmp_path, phantom_dir):
    path = tmp_path / "fs24.pt"
    _official_encoder_file(path, feature_size=24)
    with bundle_on_path():
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            bundle_root=str(tmp_path),
            pretrained_path=str(path),
            feature_size=12,
        )
        with pytest.raises(Exception) as info:
            workflow.parser.get_parsed_content("network")
    text = error_text(info.value)
    assert str(path) in text and "feature_size" in text


def test_two_process_ddp_training_on_cpu(phantom_dir, tmp_path):
    overrides = {
        **SMALL,
        "max_epochs": 1,
        "val_interval": 1,
        "dataset_dir": str(phantom_dir),
        "datalist": str(phantom_dir / "datalist.json"),
        "bundle_root": str(tmp_path),
        "lr_scaling": "linear",
        "fold": 1,
        "num_folds": 2,
    }
    args = [f"--{k}={v!r}" if isinstance(v, list) else f"--{k}={v}" for k, v in overrides.items()]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_port=29517",
        "-m",
        "monai.bundle",
        "run",
        "--config_file",
        "['configs/train.json','configs/multi_gpu_train.json']",
        *args,
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(BTCV_DIR)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(cmd, cwd=BTCV_DIR, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "Epoch: 1/1, Iter: 1/1" in result.stdout + result.stderr  # fold 1's 2 training cases shared by 2 ranks
    assert "effective learning rate 0.0002 (learning_rate 0.0001, lr_scaling linear, 2 processes)" in result.stdout
    assert "fold 1 of 2 (seed 12345): 2 training, 2 validation cases" in result.stdout + result.stderr
    model = torch.load(tmp_path / "models" / "fold1" / "model.pt", map_location="cpu", weights_only=True)
    assert not any(k.startswith("module.") for k in model)  # saved unwrapped from DDP
