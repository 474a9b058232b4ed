"""tools.benchmarks.benchmark_ssl at a tiny size: both modes run in their own processes, every field is sane.

No assertions on speed. The research-way augmentation is checked on its own: rotation labels undo
the rotation (in the bundle's plane and direction) and the cutout masks stay within 30 %.
"""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from tests.helpers import forget_scripts_modules
from tools.benchmarks import benchmark_ssl as bs
from tools.benchmarks import ssl_research as sr

FEATURE_SIZE = 12
ROI = [64, 32, 32]  # square in the rotation plane (spatial axes 1, 2); a 2 x 1 x 1 bottleneck = 2 tokens
BATCH_SIZE = 1
NUM_SAMPLES = 2


def _limit_ok(row, flops):
    """A limit row of ``flops`` FLOPs: achieved FLOP/s = flops / seconds, a fraction of the CPU peak in (0, 1)."""
    assert flops > 1e8 and row["flops"] == flops
    assert math.isclose(row["achieved_flops_per_s"], flops / row["seconds"], rel_tol=1e-9)
    assert math.isclose(row["fraction_of_peak"], row["achieved_flops_per_s"] / row["peak_flops_per_s"], rel_tol=1e-9)
    assert 0.0 < row["fraction_of_peak"] < 1.0


def _positive(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny run of both modes, each in a fresh subprocess; (result, JSON on disk, report)."""
    output = tmp_path_factory.mktemp("bench_ssl") / "ssl_cpu.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        result = bs.run_benchmark(
            device="cpu",
            feature_size=FEATURE_SIZE,
            roi_size=ROI,
            batch_size=BATCH_SIZE,
            num_samples=NUM_SAMPLES,
            warmup=0,
            steps=1,
            output=str(output),
            timeout_s=300,
        )
        report = bs.format_report(result)
    forget_scripts_modules()
    return result, json.loads(output.read_text()), report


def test_json_is_the_result(bench):
    result, on_disk, _ = bench
    assert set(on_disk) == {"machine", "peak", "settings", "modes", "comparison"}
    assert on_disk["peak"]["kind"] == "cpu" and on_disk["peak"]["peak_flops"]["float32"] > 0
    assert on_disk == json.loads(json.dumps({k: v for k, v in result.items() if k != "output"}))


def test_machine_and_settings(bench):
    _, r, _ = bench
    m = r["machine"]
    for key in (
        "cpu_model",
        "cpu_count",
        "cpus_usable",
        "torch_threads",
        "cpu_capability",
        "gpu",
        "torch",
        "monai",
        "python",
        "device",
        "psutil",
    ):
        assert key in m, key
    assert m["cpu_count"] >= 1 and m["device"] == "cpu" and m["gpu"] is None
    s = r["settings"]
    assert s["feature_size"] == FEATURE_SIZE and s["roi_size"] == ROI
    assert s["batch_size"] == BATCH_SIZE and s["num_samples"] == NUM_SAMPLES
    assert s["crops"] == BATCH_SIZE * NUM_SAMPLES and s["views"] == 2 * s["crops"]
    assert s["warmup"] == 0 and s["steps"] == 1 and s["precision"] == "float32"
    assert "fresh Python process" in s["isolation"] and "ru_maxrss" in s["memory_measure"]


@pytest.mark.parametrize("mode", bs.MODES)
def test_mode(bench, mode):
    _, r, _ = bench
    m = r["modes"][mode]
    assert "error" not in m, m
    assert m["mode"] == mode and m["device"] == "cpu"
    # the bundle's forward is bf16 on CPUs with native bf16 (amp_cpu_training); the research way stays float32
    bf16 = mode == "bundle" and torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert m["precision"] == ("bfloat16 autocast" if bf16 else "float32")
    assert m["settings"].get("cpu_bf16", False) is bf16
    assert m["steps"] == 1 and m["warmup_steps"] == 0 and len(m["step_times_s"]) == 1 and m["warmup_times_s"] == []
    assert all(_positive(t) for t in m["step_times_s"])
    assert _positive(m["seconds_per_iteration"]) and _positive(m["iterations_per_second"])
    assert math.isclose(m["iterations_per_second"] * m["seconds_per_iteration"], 1.0, rel_tol=1e-6)
    assert len(m["losses"]) == 1 and all(math.isfinite(x) and x > 0 for x in m["losses"])
    for terms in m["loss_terms"]:
        assert set(terms) == {"inpaint_loss", "contrast_loss", "rotation_loss"}
        assert all(math.isfinite(v) for v in terms.values())
    assert all(0.0 < f <= sr.MAX_CUTOUT_FRACTION + 1e-9 for f in m["masked_fraction"])
    # the config's knobs: gradient checkpointing and flash attention on, same network in both modes
    assert m["use_checkpoint"] is True and m["use_flash_attention"] is True
    assert m["parameters"] == r["modes"]["bundle"]["parameters"]
    assert m["settings"]["amp"] is False and m["settings"]["optimizer"] == "AdamW"
    # memory: peak RSS of the mode's own process
    assert _positive(m["peak_memory_mib"]) and m["peak_memory_mib"] == m["peak_rss_mib"]
    assert m["cuda_max_memory_allocated_mib"] is None
    assert m["peak_rss_mib"] >= m["peak_rss_before_steps_mib"] > 0
    assert m["peak_rss_attributable"] is True
    if m["peak_rss_reset_before_steps"]:
        assert _positive(m["peak_rss_steps_mib"]) and m["peak_rss_steps_mib"] <= m["peak_rss_mib"] + 1
    assert m["pid"] != os.getpid()
    # the limit: one step = forward + backward over all views, timed by the mean step
    assert m["flops_per_step"] == 2 * BATCH_SIZE * NUM_SAMPLES * m["flops_per_view"]
    assert m["flops_per_step"] == r["modes"]["bundle"]["flops_per_step"]  # same network and views
    _limit_ok(m["limit"], m["flops_per_step"])
    assert m["limit"]["seconds"] == m["seconds_per_iteration"] and m["limit"]["peak_precision"] == (
        "bfloat16" if bf16 else "float32"
    )


def test_modes_ran_in_separate_processes_and_breakdowns(bench):
    _, r, _ = bench
    b, res = r["modes"]["bundle"], r["modes"]["research"]
    assert b["pid"] != res["pid"]
    assert set(b["breakdown_s"]) == {"proxy_tasks_s"} and _positive(b["breakdown_mean_s"]["proxy_tasks_s"])
    assert set(res["breakdown_s"]) == {"augment_s", "transfer_s", "compute_s"}
    assert _positive(res["breakdown_mean_s"]["augment_s"]) and _positive(res["breakdown_mean_s"]["compute_s"])
    assert sum(res["breakdown_mean_s"].values()) <= res["seconds_per_iteration"] * 1.001
    assert b["settings"]["lr_scheduler"] == "WarmupCosineSchedule" and res["settings"]["forward"] == "separate"
    # the bundle trains through its fused window attention; the research way through MONAI's own
    assert b["settings"]["fast_window_attention"] is True and "fast_window_attention" not in res["settings"]


def test_bundle_mode_runs_train_json_setup_with_its_allocator_setting(bench):
    """The bundle mode runs train.json's setup as the bundle's training does; the research mode never sets it."""
    _, r, report = bench
    b, res = r["modes"]["bundle"], r["modes"]["research"]
    assert r["settings"]["reuse_cpu_memory"] == "train.json's value"
    # train.json's default: off in training (it kept the default-size step from fitting in 24 GB)
    assert b["settings"]["reuse_cpu_memory"] is False and b["settings"]["allocator_applied"] is False
    assert res["settings"]["reuse_cpu_memory"] is False and res["settings"]["allocator_applied"] is False
    assert report.count("glibc reuse of freed memory off") == 2


def test_reuse_cpu_memory_override_reaches_train_json():
    """--reuse_cpu_memory False is train.json's knob for the bundle mode; None leaves the config's value."""
    args = (torch.device("cpu"), FEATURE_SIZE, ROI, BATCH_SIZE, NUM_SAMPLES, 0, False, 0)
    assert "reuse_cpu_memory" not in bs.train_overrides(*args)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        parser = bs.bundle_parser(bs.train_overrides(*args, reuse_cpu_memory=False))
        assert parser["reuse_cpu_memory"] is False
        assert parser.get_parsed_content("setup")[0] is False  # the allocator line is first and stays off
    forget_scripts_modules()


def test_comparison_and_report(bench):
    _, r, report = bench
    c = r["comparison"]
    b, res = r["modes"]["bundle"], r["modes"]["research"]
    assert math.isclose(
        c["time_ratio_research_over_bundle"], res["seconds_per_iteration"] / b["seconds_per_iteration"], rel_tol=1e-9
    )
    assert _positive(c["speedup_bundle_iterations_per_second_over_research"])
    assert _positive(c["peak_memory_ratio_research_over_bundle"])
    for text in ("bundle", "research", "s/step", "it/s", "peak MiB", "research / bundle", "GFLOP per step", "% of"):
        assert text in report


def test_non_square_rotation_plane_is_refused_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="square"):
        bs.run_benchmark(device="cpu", roi_size=[32, 64, 32], output=str(tmp_path / "x.json"))
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(ValueError, match="square"):
        sr.research_views(torch.zeros(1, 1, 8, 8, 12), np.random.default_rng(0))


# ------------------------------------------------------------------------------------------ research augmentation


def test_research_rotation_labels_undo_the_rotation():
    rng = np.random.default_rng(1)
    images = torch.rand(3, 1, 8, 12, 12, generator=torch.Generator().manual_seed(0))
    seen = set()
    for _ in range(6):
        v = sr.research_views(images, rng)
        for view in (1, 2):
            labels = v[f"rot{view}"]
            assert labels.dtype == torch.long and labels.shape == (3,)
            for i, k in enumerate(labels.tolist()):
                seen.add(k)
                rotated = v[f"x{view}"][i].numpy()
                # the label undoes the rotation ...
                assert np.array_equal(np.rot90(rotated, -k, axes=sr.ROTATION_AXES), images[i].numpy())
                # ... and means what the bundle's class means: torch.rot90 over dims (2, 3) of (C, D, H, W)
                assert torch.equal(v[f"x{view}"][i], torch.rot90(images[i], k, dims=(2, 3)))
    assert seen == {0, 1, 2, 3}


def test_research_cutout_masks_within_30_percent_and_only_masked_voxels_change():
    rng = np.random.default_rng(2)
    images = torch.rand(2, 1, 16, 24, 24, generator=torch.Generator().manual_seed(1))
    fractions = []
    for _ in range(5):
        v = sr.research_views(images, rng)
        masks = v["masks"]
        assert masks.shape == (4, 16, 24, 24) and masks.dtype == bool
        targets = torch.cat([v["x1"], v["x2"]]).numpy()
        inputs = torch.cat([v["x1_augment"], v["x2_augment"]]).numpy()
        for target, augmented, mask in zip(targets, inputs, masks):
            fraction = float(mask.mean())
            fractions.append(fraction)
            assert 0.0 < fraction <= sr.MAX_CUTOUT_FRACTION
            assert np.array_equal(augmented[:, ~mask], target[:, ~mask])
            assert augmented[:, mask].min() >= 0.0 and augmented[:, mask].max() <= 1.0
        assert math.isclose(v["masked_fraction"], float(masks.mean()))
    # targets are drawn uniformly in [0, 0.3): the masks are not all tiny
    assert max(fractions) > 0.1


def test_cutout_mask_bounds_over_many_draws():
    rng = np.random.default_rng(3)
    fractions = [float(sr.draw_cutout_mask((64, 32, 32), rng).mean()) for _ in range(60)]
    assert max(fractions) <= sr.MAX_CUTOUT_FRACTION
    assert 0.08 < float(np.mean(fractions)) < 0.22  # about the mean of U(0, 0.3), plus the last box's overshoot
    # the budget holds even for a tiny crop and a wide box range
    tiny = [sr.draw_cutout_mask((4, 4, 4), rng, max_box_size=1.0).mean() for _ in range(50)]
    assert max(tiny) <= sr.MAX_CUTOUT_FRACTION
