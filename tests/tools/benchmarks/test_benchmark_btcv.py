"""tools.benchmarks.benchmark_btcv at a tiny size: every field is there and sane (no assertions on speed)."""

from __future__ import annotations

import json
import math
import sys

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import forget_scripts_modules
from tools.benchmarks import benchmark_btcv as bb
from tools.data.make_phantoms import make_phantom

FEATURE_SIZE = 12
ROI = 64
# 40 x 40 x 24 voxels of 2.25 x 2.25 x 3.5 mm: about 60 x 60 x 42 at the 1.5 x 1.5 x 2 mm
# inference spacing, so one 64^3 window per variant.
SHAPE = (40, 40, 24)
SPACING = (2.25, 2.25, 3.5)


def _limit_ok(row, flops):
    """A limit row of ``flops`` FLOPs: achieved FLOP/s = flops / seconds, a fraction of the CPU peak in (0, 1)."""
    assert flops > 1e8 and row["flops"] == flops
    assert math.isclose(row["achieved_flops_per_s"], flops / row["seconds"], rel_tol=1e-9)
    assert math.isclose(row["fraction_of_peak"], row["achieved_flops_per_s"] / row["peak_flops_per_s"], rel_tol=1e-9)
    assert 0.0 < row["fraction_of_peak"] < 1.0


def _positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def _non_negative(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x >= 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory):
    """One tiny benchmark run (all variants, forward timing); (result, JSON on disk, image)."""
    tmp = tmp_path_factory.mktemp("bench")
    image, _, affine = make_phantom(11, shape=SHAPE, spacing=SPACING)
    image_path = tmp / "phantom_ct.nii.gz"
    nifti = nib.Nifti1Image(np.rint(image).astype(np.int16), affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nib.save(nifti, image_path)
    output_json = tmp / "bench.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sys, "path", list(sys.path))
        forget_scripts_modules()
        result = bb.run_benchmark(
            str(image_path),
            ckpt_path=None,
            feature_size=FEATURE_SIZE,
            roi_size=ROI,
            device="cpu",
            output_json=str(output_json),
            repeats=1,
            warmup=False,
            forward_batch=1,
            skip_identical_fp32=False,
        )
        report = bb.format_report(result)
    forget_scripts_modules()
    return result, json.loads(output_json.read_text()), image_path, report


def test_json_is_the_result(bench):
    result, on_disk, _, _ = bench
    assert on_disk == json.loads(json.dumps({k: v for k, v in result.items() if k != "output"}))
    assert result["output"].endswith("bench.json")
    # inference only: the BTCV training figure is benchmark_finetune's (test_benchmark_finetune.py, this folder)
    assert set(on_disk) == {"machine", "peak", "settings", "end_to_end", "comparison", "model_forward"}


def test_machine_and_settings(bench):
    _, r, image_path, _ = bench
    m = r["machine"]
    for key in ("cpu_model", "cpu_count", "cpu_capability", "native_bf16", "gpu", "torch", "monai", "device"):
        assert key in m
    assert m["cpu_count"] >= 1 and isinstance(m["native_bf16"], bool) and m["device"] == "cpu"
    s = r["settings"]
    assert s["random_init"] is True and s["ckpt_path"] is None and "RANDOM INIT" in s["weights"]
    assert s["feature_size"] == FEATURE_SIZE and s["roi_size"] == [ROI] * 3
    assert s["image"]["shape"] == list(SHAPE)
    assert s["model_zoo_constants"]["roi_size"] == 96 and s["model_zoo_constants"]["spacing"] == [1.5, 1.5, 2.0]


def test_end_to_end_variants(bench):
    _, r, _, _ = bench
    autocasts = r["end_to_end"]["bundle"]["precision"] != "float32"
    # bundle_float32 (the bundle's own float32 path) runs only where the bundle autocasts
    always = {"bundle", "bundle_float32_ncdhw", "model_zoo"}
    assert set(r["end_to_end"]) == always | ({"bundle_float32"} if autocasts else set())
    for name, v in r["end_to_end"].items():
        stages = v["stages_s"]
        for stage in ("load", "preprocess", "sliding_window", "postprocess", "save"):
            assert _non_negative(stages[stage]), (name, stage)
        assert _positive(stages["sliding_window"]) and _positive(v["total_s"])
        assert v["total_s"] >= sum(stages.values()) * 0.99
        assert v["windows"] >= 1 and _positive(v["sliding_window_s_per_window"])
        assert v["precision"] in ("float32", "bfloat16", "float16")
        # label maps come back in the input's geometry
        assert v["label_shape"] == list(SHAPE), name
        label = np.asarray(nib.load(v["label_path"]).dataobj)
        assert label.shape == SHAPE
        assert label.min() >= 0 and label.max() < bb.NUM_CLASSES
    assert "input_check" in r["end_to_end"]["bundle"]["stages_s"]
    assert r["end_to_end"]["bundle"]["settings"]["use_flash_attention"] is True
    assert r["end_to_end"]["bundle_float32_ncdhw"]["settings"]["amp"] is False
    assert r["end_to_end"]["bundle_float32_ncdhw"]["precision"] == "float32"
    assert r["end_to_end"]["bundle"]["settings"]["reuse_attention_masks"] is True
    if autocasts:
        float32 = r["end_to_end"]["bundle_float32"]
        assert float32["precision"] == "float32" and float32["settings"]["amp"] is False
        assert float32["settings"]["channels_last"] is True and float32["settings"]["reuse_attention_masks"] is True
        assert 0.0 <= r["comparison"]["agreement_bundle_vs_bundle_float32"] <= 1.0
        assert _positive(r["comparison"]["speed_ratio_bundle_float32_over_bundle"])
    zoo = r["end_to_end"]["model_zoo"]["settings"]
    assert zoo["use_flash_attention"] is False and zoo["reader"] == "ITKReader" and zoo["foreground_crop"] is False


def test_comparison(bench):
    _, r, _, _ = bench
    c = r["comparison"]
    assert _positive(c["speed_ratio_model_zoo_over_bundle"])
    assert _positive(c["sliding_window_ratio_model_zoo_over_bundle"])
    for key in (
        "agreement_bundle_vs_bundle_float32_ncdhw",
        "agreement_bundle_vs_model_zoo",
        "organ_agreement_bundle_vs_bundle_float32_ncdhw",
        "organ_agreement_bundle_vs_model_zoo",
    ):
        assert 0.0 <= c[key] <= 1.0, key
    bundle, fp32 = r["end_to_end"]["bundle"], r["end_to_end"]["bundle_float32_ncdhw"]
    # on CPU the bundle runs channels-last (GroupNorm for InstanceNorm), the reference plain NCDHW float32
    assert bundle["settings"]["channels_last"] is True and fp32["settings"]["channels_last"] is False
    if bundle["precision"] == "float32":
        # the same float32 function up to summation order: even random logits' argmax barely moves
        assert c["agreement_bundle_vs_bundle_float32_ncdhw"] >= 0.99
    assert "random weights" in c["note"]


def test_model_forward(bench):
    _, r, _, _ = bench
    rows = r["model_forward"]
    timed = [row for row in rows if "skipped" not in row]
    assert {row["network"] for row in timed} == {"bundle", "model_zoo"}
    for row in timed:
        assert row["input_shape"] == [1, 1, ROI, ROI, ROI]
        assert row["repeats"] == 1 and all(_positive(t) for t in row["times_s"])
        assert _positive(row["seconds_per_call"]) and _positive(row["seconds_per_window"])
        # the limit: FLOPs of the windows of one call over its mean time
        _limit_ok(row["limit"], row["flops_per_window"] * row["windows_per_call"])
        assert row["limit"]["seconds"] == row["seconds_per_call"]
    assert len({row["flops_per_window"] for row in timed}) == 1  # same network, same window
    for name, e2e in r["end_to_end"].items():
        assert e2e["flops_per_window"] == timed[0]["flops_per_window"], name
        _limit_ok(e2e["limit"], e2e["flops_per_window"] * e2e["windows"])
    flash = {row["network"]: row["use_flash_attention"] for row in timed}
    assert flash == {"bundle": True, "model_zoo": False}
    if not r["machine"]["native_bf16"]:
        assert any("skipped" in row for row in rows)


def test_report_and_small_helpers(bench):
    *_, report = bench
    for text in ("End to end", "speed ratio model_zoo / bundle", "voxel agreement", "Network forward", "Machine: "):
        assert text in report
    assert bb.count_windows([60, 60, 42], [64] * 3, 0.5) == 1
    assert bb.count_windows([100, 64, 64], [64] * 3, 0.5) == 3  # starts 0, 32, 36
    assert bb.cube(96) == [96, 96, 96]
