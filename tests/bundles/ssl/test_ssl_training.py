"""Pre-training as a user runs it: train, resume, pick the best checkpoint, export, fine-tune from the export,
reconstruct volumes."""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from ignite.engine import Events
from monai.networks.nets import SwinUNETR
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.helpers import (
    BTCV_DIR,
    PHANTOM_SPACING,
    SMALL,
    SSL_DIR,
    SSL_SMALL,
    btcv_workflow,
    bundle_on_path,
    error_text,
    run_workflow,
)

TERMS = ("loss", "inpaint_loss", "contrast_loss", "rotation_loss")


def _load(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def _scalars(run_dir):
    tags = {}
    for name in os.listdir(run_dir):
        acc = EventAccumulator(str(run_dir / name))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            tags.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return tags


def _optimizer_step(state_dict) -> int:
    return int(next(iter(state_dict["state"].values()))["step"])


def test_pretraining_writes_full_state_checkpoints_and_logs_every_term(ssl_trained):
    models = ssl_trained["root"] / "models"
    last = _load(ssl_trained["last"])
    assert set(last) == {"model", "optimizer", "lr_scheduler", "scaler", "trainer", "network_record", "run_record"}
    assert set(last["run_record"]) == {"id", "started", "saved"}  # which run saved it, and when (resume latest)
    assert last["trainer"]["iteration"] == 2 and _optimizer_step(last["optimizer"]) == 2
    assert last["lr_scheduler"]["last_epoch"] == 2
    assert last["network_record"]["patch_merging"] == "current" and last["network_record"]["feature_size"] == 12
    assert any(k.startswith("rotation_head.") for k in last["model"])
    best = _load(ssl_trained["model"])  # the network's state dict as it is, its order recorded inside
    assert best.keys() == last["model"].keys()
    assert best["swinViT.layers1.0.downsample._extra_state"].tolist() == [2, 2]  # current order
    assert not [p for p in os.listdir(models) if p.startswith(".tmp")]

    scalars = _scalars(ssl_trained["root"] / "runs")
    for term in TERMS:
        assert [step for step, _ in scalars[term]] == [1, 2]  # every iteration
        assert [step for step, _ in scalars[f"val_{term}"]] == [1, 2]  # every validation, at its step
        assert all(torch.isfinite(torch.tensor(v)) for _, v in scalars[term] + scalars[f"val_{term}"])
    assert scalars["contrast_loss"][0][1] > 0  # two volumes per batch: the contrastive term has negatives

    evaluator = ssl_trained["workflow"].evaluator
    assert evaluator.state.key_metric_name == "val_loss"
    assert evaluator.state.best_metric == pytest.approx(min(v for _, v in scalars["val_loss"]))


def test_train_workflow_has_the_required_properties(ssl_corpus, tmp_path):
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"], "train", SSL_DIR, dataset_dir=str(ssl_corpus), bundle_root=str(tmp_path), **SSL_SMALL
        )
        assert workflow.check_properties() in (None, [])
        workflow.initialize()
        metrics = workflow.parser.get_parsed_content("validate#metrics")
    assert list(metrics[0]) == ["val_loss"]
    assert sorted(metrics[1]) == ["val_contrast_loss", "val_inpaint_loss", "val_rotation_loss"]


def test_checkpoint_metric_is_a_knob(ssl_corpus, tmp_path):
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            SSL_DIR,
            dataset_dir=str(ssl_corpus),
            bundle_root=str(tmp_path),
            ckpt_metric="val_inpaint_loss",
            **SSL_SMALL,
        )
        workflow.initialize()
        key, others = workflow.parser.get_parsed_content("validate#metrics")
        assert list(key) == ["val_inpaint_loss"] and "val_loss" in others
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            SSL_DIR,
            dataset_dir=str(ssl_corpus),
            bundle_root=str(tmp_path),
            ckpt_metric="dice",
            **SSL_SMALL,
        )
        workflow.initialize()
        with pytest.raises(Exception) as err:
            workflow.parser.get_parsed_content("validate#metrics")
    assert "ckpt_metric must be one of" in error_text(err.value)


def test_resume_continues_at_the_next_step_with_the_saved_optimiser_state(ssl_trained, ssl_corpus, tmp_path):
    root = tmp_path / "run"
    shutil.copytree(ssl_trained["root"], root)
    saved = _load(root / "models" / "checkpoint_last.pt")
    seen = {}

    def record(engine):
        if "iteration" not in seen:
            seen["iteration"] = engine.state.iteration
            seen["optimizer"] = copy.deepcopy(engine.optimizer.state_dict())
            seen["lr"] = engine.optimizer.param_groups[0]["lr"]

    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            SSL_DIR,
            dataset_dir=str(ssl_corpus),
            bundle_root=str(root),
            num_steps=3,
            val_interval=1,
            resume_from=True,
            **SSL_SMALL,
        )
        workflow.initialize()
        workflow.trainer.add_event_handler(Events.ITERATION_STARTED, record)
        workflow.run()
        workflow.finalize()

    assert seen["iteration"] == 3  # ignite counts from 1: the first iteration after resuming is step 3
    assert _optimizer_step(seen["optimizer"]) == _optimizer_step(saved["optimizer"]) == 2
    for index, state in saved["optimizer"]["state"].items():
        assert torch.equal(seen["optimizer"]["state"][index]["exp_avg"], state["exp_avg"])
    resumed = _load(root / "models" / "checkpoint_last.pt")
    assert resumed["trainer"]["iteration"] == 3 and _optimizer_step(resumed["optimizer"]) == 3


def test_resume_without_a_checkpoint_fails_instead_of_starting_afresh(ssl_corpus, tmp_path):
    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            SSL_DIR,
            dataset_dir=str(ssl_corpus),
            bundle_root=str(tmp_path),
            resume_from=True,
            **SSL_SMALL,
        )
        workflow.initialize()
        with pytest.raises(Exception) as err:
            workflow.run()
    assert "holds no training checkpoint" in error_text(err.value)


def test_export_loads_into_the_btcv_bundle_with_every_encoder_tensor(ssl_trained, phantom_dir, tmp_path, caplog):
    encoder_path = tmp_path / "model_swinvit.pt"
    run_workflow(["export.json"], "infer", SSL_DIR, ckpt_path=str(ssl_trained["model"]), encoder_path=str(encoder_path))
    exported = _load(encoder_path)
    assert exported["format"] == "swin_ssl_encoder" and exported["patch_merging"] == "current"
    assert exported["feature_size"] == 12 and len(exported["state_dict"]) == 126
    assert all(k.startswith("module.") for k in exported["state_dict"])
    assert not any(".mlp.linear" in k for k in exported["state_dict"])  # official fc1/fc2 names

    with bundle_on_path(SSL_DIR):
        from scripts.export import build_from_checkpoint

        ssl_encoder = build_from_checkpoint(str(ssl_trained["model"])).swinViT.eval()

    caplog.set_level("INFO")
    with bundle_on_path(BTCV_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            bundle_root=str(tmp_path),
            pretrained_path=str(encoder_path),
            **SMALL,
        )
        bundle_logger = logging.getLogger("swin_unetr_btcv_seg")
        bundle_logger.addHandler(caplog.handler)  # the bundle's logging.conf replaces the root handlers
        try:
            network = workflow.parser.get_parsed_content("network")
        finally:
            bundle_logger.removeHandler(caplog.handler)
    assert "loaded 126/126 encoder tensors" in caplog.text

    x = torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ssl_encoder(x)
        fine_tuned = network.swinViT.eval()(x)
        # the research code's loader reads the same file
        research = SwinUNETR(in_channels=1, out_channels=14, feature_size=12)
        research.load_from(_load(encoder_path))
        by_load_from = research.swinViT.eval()(x)
    ssl_state, btcv_state = ssl_encoder.state_dict(), network.swinViT.state_dict()
    assert ssl_state.keys() == btcv_state.keys()
    # tensors equal; the patch-merging layers' order records (``_extra_state``) equal too
    assert all(
        torch.equal(v, btcv_state[k]) if torch.is_tensor(v) else v == btcv_state[k] for k, v in ssl_state.items()
    )
    # the fine-tuning bundle uses PyTorch's fused attention, the exporter the plain one: equal up to rounding
    for a, b, c in zip(expected, fine_tuned, by_load_from):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)
        assert torch.allclose(a, c, atol=1e-5, rtol=0)


def test_export_of_a_file_that_is_not_a_training_checkpoint_fails_clearly(tmp_path):
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(2)}, bogus)
    with pytest.raises(Exception) as err:
        run_workflow(["export.json"], "infer", SSL_DIR, ckpt_path=str(bogus), encoder_path=str(tmp_path / "e.pt"))
    assert f"{bogus}: not a checkpoint of a Swin UNETR network" in error_text(err.value)
    assert not (tmp_path / "e.pt").exists()


def test_two_process_ddp_on_cpu_trains_and_checkpoints(ssl_corpus, tmp_path):
    configs = f"['{SSL_DIR / 'configs' / 'train.json'}','{SSL_DIR / 'configs' / 'multi_gpu_train.json'}']"
    overrides = {**SSL_SMALL, "batch_size": 1, "num_steps": 1, "val_interval": 1, "lr_scaling": "linear"}
    args = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29531",
        "-m",
        "monai.bundle",
        "run",
        "training",
        "--config_file",
        configs,
        "--meta_file",
        str(SSL_DIR / "configs" / "metadata.json"),
        "--logging_file",
        str(SSL_DIR / "configs" / "logging.conf"),
        "--dataset_dir",
        str(ssl_corpus),
        "--bundle_root",
        str(tmp_path),
    ]
    for key, value in overrides.items():
        args += [f"--{key}", str(value).replace(" ", "")]
    # each rank validates at least one volume: MONAI's DistributedSampler refuses fewer volumes than ranks
    datalist = json.loads((ssl_corpus / "datalist.json").read_text())
    datalist["validation"] = datalist["validation"] + datalist["training"][:1]
    (tmp_path / "datalist.json").write_text(json.dumps(datalist))
    args += ["--datalist", str(tmp_path / "datalist.json")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SSL_DIR)}
    done = subprocess.run(args, cwd=SSL_DIR, env=env, capture_output=True, text=True, timeout=600)
    errors = [line for line in (done.stdout + done.stderr).splitlines() if "Error" in line]
    assert done.returncode == 0, "\n".join(errors[-10:]) + done.stderr[-2000:]
    last = _load(tmp_path / "models" / "checkpoint_last.pt")
    assert last["trainer"]["iteration"] == 1
    assert not any(k.startswith("module.") for k in last["model"])  # DDP's wrapper is not in the saved names
    assert (tmp_path / "models" / "model.pt").exists()
    assert "effective learning rate 0.0008 (learning_rate 0.0004, lr_scaling linear, 2 processes)" in done.stdout


@pytest.mark.slow
def test_thirty_steps_on_one_fixed_batch_halve_the_total_loss(ssl_corpus, tmp_path):
    from monai.data import list_data_collate
    from monai.engines import SupervisedTrainer

    with bundle_on_path(SSL_DIR):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            SSL_DIR,
            dataset_dir=str(ssl_corpus),
            bundle_root=str(tmp_path),
            num_steps=30,
            learning_rate=1e-3,
            weight_decay=0.0,
            **SSL_SMALL,
        )
        workflow.initialize()
        parse = workflow.parser.get_parsed_content
        preprocessing, datalist = parse("train#preprocessing"), parse("train#datalist")
        batch = list_data_collate([preprocessing(item)[0] for item in datalist])  # one crop of each volume
        losses = []
        trainer = SupervisedTrainer(
            device=parse("device"),
            max_epochs=1,
            train_data_loader=[batch] * 30,
            network=parse("network"),
            optimizer=parse("optimizer"),
            loss_function=parse("loss"),
            iteration_update=parse("train#iteration"),
        )
        # one fixed batch: the same crops, rotations and boxes at every step (the proxy tasks re-seeded)
        proxy_tasks = parse("proxy_tasks")
        trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: proxy_tasks.set_random_state(0))
        trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda e: losses.append(e.state.output["loss"]))
        trainer.run()
    assert len(losses) == 30
    assert sum(losses[-3:]) / 3 <= 0.5 * losses[0], losses


def test_inference_writes_each_volume_s_reconstruction_in_hu_in_its_own_geometry(tmp_path):
    """inference.json as a user runs it on a datalist's validation list: one NIfTI per volume with the input's
    shape and affine, holding the checkpoint's sliding-window reconstruction of the windowed volume, in HU."""
    import nibabel as nib
    from monai.bundle import ConfigParser
    from monai.inferers import sliding_window_inference

    from tools.data.make_phantoms import write_phantom_dataset

    data = tmp_path / "data"
    ((image, _),) = write_phantom_dataset(data, num_cases=1, seed=3, shape=(30, 60, 60), spacing=PHANTOM_SPACING)
    (data / "datalist.json").write_text(json.dumps({"validation": [str(Path(image).relative_to(data))]}))
    ckpt = tmp_path / "model.pt"
    with bundle_on_path(SSL_DIR):  # a checkpoint as training writes it: {"model": state dict with its order record}
        parser = ConfigParser()
        parser.read_config(str(SSL_DIR / "configs" / "inference.json"))
        parser.update({"feature_size": 12, "patch_merging": "current", "ckpt_path": ""})
        torch.manual_seed(0)
        network = parser.get_parsed_content("network_def").eval()
    torch.save({"model": network.state_dict()}, ckpt)
    settings = {
        "bundle_root": str(tmp_path / "bundle"),
        "dataset_dir": str(data),
        "datalist": str(data / "datalist.json"),
        "ckpt_path": str(ckpt),
        "sw_batch_size": 1,
        **{k: SSL_SMALL[k] for k in ("feature_size", "roi_size", "num_workers")},
    }
    run_workflow(["inference.json"], "infer", SSL_DIR, **settings)

    out_path = tmp_path / "bundle" / "eval" / (Path(image).name.removesuffix(".nii.gz") + "_recon.nii.gz")
    manifest = json.loads((out_path.parent / "manifest.json").read_text())
    assert manifest == [{"input": str(image), "output": str(out_path)}]
    source, written = nib.load(str(image)), nib.load(str(out_path))
    assert written.shape == source.shape and written.get_data_dtype() == np.float32
    np.testing.assert_allclose(written.affine, source.affine, atol=1e-4)
    # the same computation by hand, in nibabel's closest-canonical (RAS) layout: window, infer, back to HU
    windowed = np.clip((nib.as_closest_canonical(source).get_fdata() + 1000.0) / 2000.0, 0.0, 1.0)
    with torch.no_grad():
        inputs = torch.as_tensor(windowed, dtype=torch.float32)[None, None]
        recon = sliding_window_inference(inputs, SSL_SMALL["roi_size"], 1, network, overlap=0.5)
    expected = recon[0, 0].numpy() * 2000.0 - 1000.0
    np.testing.assert_allclose(nib.as_closest_canonical(written).get_fdata(), expected, atol=0.5)

    with pytest.raises(Exception) as info:  # the output exists: refused before any compute
        run_workflow(["inference.json"], "infer", SSL_DIR, **settings)
    assert str(out_path) in error_text(info.value) and "overwrite" in error_text(info.value)
