"""tools.benchmarks.benchmark_finetune: the model zoo's settings as built, both modes side by side at a tiny size, and
the bundle's training convergence with and without its reduced precision (fixed-seed loss curves).

No assertions on speed: the CPU is shared.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from tools.benchmarks import benchmark_finetune as bf
from tools.common.machine import native_bf16

TINY = {"feature_size": 12, "roi_size": [64, 64, 64]}


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Two phantom cases big enough for 64^3 crops after resampling."""
    return bf.make_cases(tmp_path_factory.mktemp("finetune_cases"), 2, TINY["roi_size"], seed=0)


def test_split_crops():
    assert bf.split_crops(4, 2) == (2, 2)  # the model zoo's own: 2 volumes x 2 crops
    assert bf.split_crops(2, 2) == (1, 2)
    assert bf.split_crops(3, 2) == (1, 3)  # 2 does not divide 3: one volume, 3 crops
    assert bf.split_crops(2, 1) == (2, 1)
    with pytest.raises(ValueError, match="crops"):
        bf.split_crops(0, 2)


def test_model_zoo_trainer_has_the_zoo_settings(cases, tmp_path):
    """The rebuilt model-zoo trainer: Adam 2e-4, DiceCE squared_pred + batch, checkpointing, postprocessing."""
    from monai.losses import DiceCELoss
    from monai.transforms import RandCropByPosNegLabeld, RandFlipd, RandRotate90d, RandShiftIntensityd

    trainer, settings = bf.model_zoo_trainer(torch.device("cpu"), cases, 12, [64, 64, 64], 2, 0, tmp_path)
    assert isinstance(trainer.optimizer, torch.optim.Adam) and not isinstance(trainer.optimizer, torch.optim.AdamW)
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(2e-4)
    loss = trainer.loss_function
    assert isinstance(loss, DiceCELoss) and loss.dice.squared_pred and loss.dice.batch and loss.dice.softmax
    assert any(getattr(m, "use_checkpoint", False) for m in trainer.network.modules())
    assert not any(getattr(m, "use_flash_attention", False) for m in trainer.network.modules())
    assert trainer.amp
    assert trainer.state.key_metric_name == "train_accuracy"
    assert settings["batch_size"] == 1 and settings["num_samples"] == 2  # 2 crops: the zoo keeps 2 per volume
    transforms = trainer.data_loader.dataset.transform.transforms
    kinds = [type(t) for t in transforms]
    assert kinds.count(RandFlipd) == 3 and RandRotate90d in kinds and RandShiftIntensityd in kinds
    crop = next(t for t in transforms if isinstance(t, RandCropByPosNegLabeld))
    assert crop.cropper.num_samples == 2 and list(crop.cropper.spatial_size) == [64, 64, 64]
    assert trainer.data_loader.batch_size == 1
    record = bf.time_run(trainer, torch.device("cpu"), 1)  # one iteration: 1 volume x 2 crops
    assert len(record["loss"]) == 1 and math.isfinite(record["loss"][0])
    outputs = trainer.state.output
    assert len(outputs) == 2  # decollated: one item per crop
    pred = outputs[0]["pred"]  # postprocessed every iteration: softmax, argmax, one-hot 14
    assert pred.shape[0] == 14 and set(torch.unique(pred).tolist()) <= {0.0, 1.0}
    assert torch.all(pred.sum(0) == 1)


def test_side_by_side_tiny(tmp_path):
    """Both modes in fresh processes at a tiny size: same crops per iteration, every reported field sane."""
    out = tmp_path / "finetune.json"
    result = bf.run_benchmark(
        device="cpu",
        **TINY,
        crops=2,
        warmup=1,
        steps=1,
        repeats=1,
        num_cases=1,
        num_workers=0,
        output=str(out),
        work_dir=str(tmp_path / "cases"),
    )
    on_disk = json.loads(out.read_text())
    assert set(on_disk) == {"machine", "peak", "settings", "summary", "comparison", "runs"}
    for mode in ("bundle", "model_zoo"):
        (run,) = on_disk["runs"][mode]
        assert "error" not in run, run
        assert run["crops_per_iteration"] == 2 and run["steps"] == 1 and len(run["losses"]) == 2
        assert all(math.isfinite(x) and x > 0 for x in run["losses"])
        assert _positive(run["seconds_per_iteration"]) and _positive(run["peak_memory_mib"])
        assert run["settings"]["batch_size"] * run["settings"]["num_samples"] == 2
        s = on_disk["summary"][mode]
        assert s["seconds_per_iteration_median"] == pytest.approx(run["seconds_per_iteration"])
        assert s["crops_per_second_median"] == pytest.approx(2 / run["seconds_per_iteration"])
    zoo, bundle = on_disk["runs"]["model_zoo"][0]["settings"], on_disk["runs"]["bundle"][0]["settings"]
    assert zoo["optimizer"] == "Adam" and zoo["training_autocast"] == "float32"  # trainer amp: CUDA only
    assert bundle["optimizer"] == "AdamW" and bundle["training_inferer"] == "AutocastSimpleInferer"
    assert bundle["training_autocast"] == ("bfloat16" if native_bf16() else "float32")
    assert bundle["optim_set_to_none"] and bundle["use_flash_attention"] and bundle["fast_window_attention"]
    assert "fast_window_attention" not in zoo  # MONAI's SwinUNETR as the zoo builds it
    assert "ValidationHandler" not in bundle["handlers"] and "StatsHandler" in bundle["handlers"]
    c = on_disk["comparison"]
    assert c["speedup_bundle_over_model_zoo"] == pytest.approx(
        on_disk["summary"]["model_zoo"]["seconds_per_iteration_median"]
        / on_disk["summary"]["bundle"]["seconds_per_iteration_median"]
    )
    assert _positive(c["peak_memory_ratio_bundle_over_model_zoo"])
    assert c["speedup_bundle_float32_over_model_zoo"] is None  # not run
    report = bf.format_report(result)
    assert "bundle against model_zoo: speed" in report and "GFLOP per iteration" in report
    _training_run_ok(on_disk["runs"]["bundle"][0], on_disk["peak"], crops=2)


def _training_run_ok(t, peak, crops):
    """A training run's speed, memory and limit fields (the BTCV training figure is measured here only)."""
    from monai.networks.nets import SwinUNETR

    from tools.common.peak import network_flops

    assert t["steps"] == 1 and len(t["iteration_times_s"]) == 1
    assert _positive(t["iterations_per_second"]) and _positive(t["seconds_per_iteration"])
    assert t["settings"]["use_checkpoint"] is True and t["crops_per_iteration"] == crops
    assert all(math.isfinite(x) for x in t["losses"])
    assert _positive(t["peak_rss_mib"]) and t["peak_rss_delta_training_mib"] >= 0
    assert t["cuda_max_memory_allocated_mib"] is None
    # a fresh process: its peak RSS is its own (ru_maxrss agrees with the address space's VmHWM)
    assert t["peak_rss_attributable"] is True
    # forward + backward of one crop is about 3 forwards of a window
    network = SwinUNETR(in_channels=1, out_channels=14, feature_size=TINY["feature_size"], spatial_dims=3)
    forward = network_flops(network, (1, 1, *TINY["roi_size"]))
    assert 2.5 < t["flops_per_crop"] / forward < 3.5
    lim = t["limit"]
    assert lim["flops"] == t["flops_per_iteration"] and lim["seconds"] == pytest.approx(t["seconds_per_iteration"])
    assert lim["peak_precision"] == t["settings"]["training_autocast"] and peak["kind"] == "cpu"
    assert t["flops_per_iteration"] > 1e8
    assert math.isclose(lim["achieved_flops_per_s"], lim["flops"] / lim["seconds"], rel_tol=1e-9)
    assert math.isclose(lim["fraction_of_peak"], lim["achieved_flops_per_s"] / lim["peak_flops_per_s"], rel_tol=1e-9)
    assert 0.0 < lim["fraction_of_peak"] < 1.0


@pytest.mark.slow
def test_bundle_convergence_unchanged_by_reduced_precision(cases):
    """Fixed-seed loss curves of the bundle's training with ``amp_cpu_training`` (bf16 forward) vs float32.

    Same seed, same weights, same crops: the curves agree within 0.05 (absolute; the DiceCE loss is
    about 3.6 at the start) at every iteration, and both fall. On CPUs without native bf16 both arms
    run float32, so the curves agree to rounding.
    """
    curves = {}
    for mode in ("bundle", "bundle_float32"):  # the bundle's own mode: bf16 forward on a native-bf16 CPU
        run = bf.measure_mode(
            mode,
            cases,
            device="cpu",
            **TINY,
            crops=1,
            warmup=0,
            steps=10,
            num_workers=0,
            seed=0,
            bundle_overrides={"warmup_epochs": 0, "learning_rate": 1e-3, "use_checkpoint": False},
        )
        assert run["settings"]["training_autocast"] == (
            ("bfloat16" if native_bf16() else "float32") if mode == "bundle" else "float32"
        )
        curves[mode] = run["losses"]
    low, full = curves["bundle"], curves["bundle_float32"]
    assert len(low) == len(full) == 10
    assert abs(low[0] - full[0]) < 0.01  # same weights and crop: only the forward's precision differs
    diffs = [abs(a - b) for a, b in zip(low, full)]
    assert max(diffs) < 0.05, (low, full)
    for curve in (low, full):
        assert sum(curve[-3:]) / 3 < sum(curve[:3]) / 3 - 0.02, curve


@pytest.mark.slow
def test_bundle_convergence_unchanged_by_the_fused_window_attention(cases):
    """Fixed-seed float32 loss curves with train.json's ``fast_window_attention`` on (default) and off (MONAI's code).

    Same seed, weights and crops; only the attention's implementation differs, so the curves agree to
    float32 rounding over 10 iterations with gradient checkpointing on (the bundle's setting).
    """
    curves = {}
    for fast in (True, False):
        run = bf.measure_mode(
            "bundle_float32",
            cases,
            device="cpu",
            **TINY,
            crops=1,
            warmup=0,
            steps=10,
            num_workers=0,
            seed=0,
            bundle_overrides={"warmup_epochs": 0, "learning_rate": 1e-3, "fast_window_attention": fast},
        )
        assert run["settings"]["fast_window_attention"] is fast
        curves[fast] = run["losses"]
    fused, monai = curves[True], curves[False]
    assert len(fused) == len(monai) == 10
    assert max(abs(a - b) for a, b in zip(fused, monai)) < 2e-3, (fused, monai)
    assert sum(fused[-3:]) / 3 < sum(fused[:3]) / 3 - 0.02, fused
