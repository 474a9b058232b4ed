"""Evaluation and inference with the BTCV bundle: metrics in original space, outputs in input geometry."""

from __future__ import annotations

import csv
import gzip
import json
import math
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import BTCV_DIR, SMALL, btcv_workflow, bundle_on_path, error_text, run_workflow

ORGANS = json.loads((BTCV_DIR / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
    "channel_def"
]
INFER_SMALL = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")}


def test_evaluation_writes_per_organ_dice_and_hd95(trained, phantom_dir, tmp_path):
    workflow = run_workflow(
        ["train.json", "evaluate.json"],
        "eval",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(trained["root"]),
        ckpt_path=str(trained["model"]),
        output_dir=str(tmp_path),
        **SMALL,
    )
    summary = json.loads((tmp_path / "metrics_summary.json").read_text())
    organs = [ORGANS[str(i)] for i in range(1, 14)]
    assert summary["organs"] == organs
    assert len(summary["cases"]) == 2
    for name in ("val_mean_dice", "val_hd95"):
        metric = summary["metrics"][name]
        assert list(metric["per_organ"]) == organs
        with open(tmp_path / f"{name}_per_case.csv") as f:
            rows = list(csv.reader(f))
        assert rows[0] == ["case", *organs, "mean"]
        assert [r[0] for r in rows[1:]] == summary["cases"]
    dice = [v for v in summary["metrics"]["val_mean_dice"]["per_organ"].values() if v is not None]
    assert dice and all(0.0 <= v <= 1.0 for v in dice)
    engine_dice = workflow.parser.get_parsed_content("validate#evaluator").state.metrics["val_mean_dice"]
    assert math.isclose(np.nanmean(dice), engine_dice, rel_tol=0.05) or math.isnan(engine_dice)
    with_bg = summary["metrics"]["val_mean_dice_with_background"]  # the research code's average, background in
    assert list(with_bg["per_organ"]) == [ORGANS["0"], *organs]
    assert all(with_bg["per_organ"][o] == v for o, v in summary["metrics"]["val_mean_dice"]["per_organ"].items())
    engine_with_bg = workflow.parser.get_parsed_content("validate#evaluator").state.metrics[
        "val_mean_dice_with_background"
    ]
    assert math.isclose(with_bg["pooled_mean"], engine_with_bg, rel_tol=1e-5)


def _assert_same_geometry(pred_path: Path, image_path: Path):
    pred, image = nib.load(pred_path), nib.load(image_path)
    assert pred.shape == image.shape[:3]
    np.testing.assert_allclose(pred.affine, image.affine, atol=1e-4)
    assert nib.aff2axcodes(pred.affine) == nib.aff2axcodes(image.affine)
    assert pred.get_data_dtype() == np.uint8
    labels = np.unique(np.asarray(pred.dataobj))
    assert labels.min() >= 0 and labels.max() <= 13


def test_inference_reproduces_input_geometry(trained, phantom_dir, sample_ct, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    shutil.copy(sample_ct["image"], inputs / "sample_ct.nii.gz")
    phantom = phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"]
    shutil.copy(phantom, inputs / "oblique_phantom.nii.gz")
    affine = nib.load(phantom).affine
    assert not np.allclose(affine[:3, :3], np.diag(np.diag(affine[:3, :3])))  # oblique
    out = tmp_path / "predictions"
    # coarser spacing and overlap keep the ~250 windows of the recipe to a few dozen on CPU
    run_workflow(
        ["inference.json"],
        "infer",
        dataset_dir=str(inputs),
        ckpt_path=str(trained["model"]),
        output_dir=str(out),
        spacing=[2.5, 2.5, 2.5],
        overlap=0.25,
        num_workers=0,
        **INFER_SMALL,
    )
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "oblique_phantom_seg.nii.gz",
        "sample_ct_seg.nii.gz",
    ]
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted((Path(e["input"]).name, Path(e["output"]).name) for e in manifest) == [
        ("oblique_phantom.nii.gz", "oblique_phantom_seg.nii.gz"),
        ("sample_ct.nii.gz", "sample_ct_seg.nii.gz"),
    ]
    _assert_same_geometry(out / "sample_ct_seg.nii.gz", inputs / "sample_ct.nii.gz")
    _assert_same_geometry(out / "oblique_phantom_seg.nii.gz", inputs / "oblique_phantom.nii.gz")


def test_inference_datalist_testing_entries_relative_to_dataset_dir(trained, phantom_dir, tmp_path):
    run_workflow(
        ["inference.json"],
        "infer",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        ckpt_path=str(trained["model"]),
        output_dir=str(tmp_path),
        num_workers=0,
        **INFER_SMALL,
    )
    image = phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"]
    expected = image.name.replace(".nii.gz", "_seg.nii.gz")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([expected, "manifest.json"])
    _assert_same_geometry(tmp_path / expected, image)


def test_inference_workflow_properties_and_monai_label_keys(trained, phantom_dir, tmp_path):
    with bundle_on_path():
        workflow = btcv_workflow(
            ["inference.json"],
            "infer",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            ckpt_path=str(trained["model"]),
            bundle_root=str(tmp_path),
            **INFER_SMALL,
        )
        assert workflow.check_properties() in (None, [])
        for key in ("run", "network_def", "preprocessing", "postprocessing", "inferer", "device"):
            assert key in workflow.parser
        # MONAI Label adds the source path as a string under "image_path"; stock Spacingd breaks on it
        preprocessing = workflow.parser.get_parsed_content("preprocessing")
        image = str(phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"])
        sample = preprocessing({"image": image, "image_path": image})
    assert sample["image_path"] == image
    assert sample["image"].shape[0] == 1


def test_truncated_nifti_at_inference_names_the_file(trained, phantom_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    image = phantom_dir / json.loads((phantom_dir / "datalist.json").read_text())["testing"][0]["image"]
    raw = gzip.decompress(image.read_bytes())
    broken = inputs / "truncated.nii.gz"
    broken.write_bytes(gzip.compress(raw[: len(raw) // 2]))
    with pytest.raises(Exception) as info:
        run_workflow(
            ["inference.json"],
            "infer",
            dataset_dir=str(inputs),
            ckpt_path=str(trained["model"]),
            output_dir=str(tmp_path / "out"),
            num_workers=0,
            **INFER_SMALL,
        )
    text = error_text(info.value)
    assert str(broken) in text and "cannot be read" in text
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_inference_on_a_dicom_series_folder(trained, tmp_path):
    from tools.data.make_dicom_series import write_dicom_series
    from tools.data.make_phantoms import make_phantom

    image, _, affine = make_phantom(11, shape=(64, 64, 40), spacing=(1.5, 1.5, 2.0))
    if np.linalg.det(affine[:3, :3]) < 0:  # a DICOM series stacks slices along the right-handed normal
        affine[:, 2] *= -1
    write_dicom_series(image, affine, tmp_path / "inputs" / "series_a")
    out = tmp_path / "predictions"
    run_workflow(
        ["inference.json"],
        "infer",
        dataset_dir=str(tmp_path / "inputs"),
        ckpt_path=str(trained["model"]),
        output_dir=str(out),
        num_workers=0,
        **INFER_SMALL,
    )
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "series_a_seg.nii.gz"]
    pred = nib.load(out / "series_a_seg.nii.gz")
    assert pred.shape == image.shape
    np.testing.assert_allclose(pred.affine, affine, atol=1e-4)
    assert pred.get_data_dtype() == np.uint8


def test_torchscript_export_for_monai_deploy_matches_the_checkpoint(trained, tmp_path):
    """The model.pt training wrote, through ``monai.bundle ckpt_export`` without ``key_in_ckpt``, as the model
    zoo's CI calls it (the file is the network's state dict as it is)."""
    import os
    import subprocess
    import sys

    import torch
    from monai.networks.nets import SwinUNETR

    ts_path = tmp_path / "model.ts"
    cmd = [
        sys.executable,
        "-m",
        "monai.bundle",
        "ckpt_export",
        "network_def",
        "--filepath",
        str(ts_path),
        "--ckpt_file",
        str(trained["model"]),
        "--ckpt_path",
        str(trained["model"]),
        "--meta_file",
        "configs/metadata.json",
        "--config_file",
        "configs/inference.json",
        "--use_trace",
        "True",
        "--input_shape",
        "[1, 1, 64, 64, 64]",
        "--feature_size",
        "12",
    ]
    result = subprocess.run(
        cmd, cwd=BTCV_DIR, capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(BTCV_DIR)}
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    traced = torch.jit.load(str(ts_path))
    eager = SwinUNETR(1, 14, feature_size=12)  # monai's own class: all but the patch-merging order records
    result = eager.load_state_dict(torch.load(trained["model"], map_location="cpu", weights_only=True), strict=False)
    assert result.missing_keys == [] and all(k.endswith("downsample._extra_state") for k in result.unexpected_keys)
    x = torch.rand(1, 1, 64, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), eager.eval()(x), atol=1e-4, rtol=1e-4)


def test_channels_last_cpu_inference_agrees_with_the_float32_reference(trained, phantom_dir, tmp_path):
    """The CPU speed path (channels-last, InstanceNorm as GroupNorm) labels like the plain float32 run.

    Both runs are float32 (``amp`` off): on a CPU with native bf16 the bundle would otherwise autocast
    both, and this test is about the layout change alone.
    """
    labels = {}
    for channels_last in (True, False):
        out = tmp_path / f"channels_last_{channels_last}"
        workflow = run_workflow(
            ["inference.json"],
            "infer",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            ckpt_path=str(trained["model"]),
            output_dir=str(out),
            num_workers=0,
            channels_last=channels_last,
            amp=False,
            **INFER_SMALL,
        )
        network = workflow.parser.get_parsed_content("network")
        norms = {type(m).__name__ for m in network.modules() if "Norm" in type(m).__name__}
        conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
        if channels_last:
            assert "InstanceNorm3d" not in norms and "GroupNorm" in norms
            assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
        else:
            assert "InstanceNorm3d" in norms and "GroupNorm" not in norms
            assert conv.weight.is_contiguous()
        (path,) = out.glob("*.nii.gz")
        labels[channels_last] = np.asarray(nib.load(path).dataobj)
    assert np.mean(labels[True] == labels[False]) >= 0.999


NATIVE_BF16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not NATIVE_BF16, reason="bf16 autocast runs only on CPUs with native bf16 (AVX-512 bf16/AMX)")
def test_bf16_cpu_inference_agrees_with_float32_on_a_trained_model(trained, phantom_dir, tmp_path):
    """On a CPU with native bf16, the default (autocast) path labels like float32 for the trained model."""
    labels = {}
    for amp in (True, False):
        out = tmp_path / f"amp_{amp}"
        run_workflow(
            ["inference.json"],
            "infer",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            ckpt_path=str(trained["model"]),
            output_dir=str(out),
            num_workers=0,
            amp=amp,
            **INFER_SMALL,
        )
        (path,) = out.glob("*.nii.gz")
        labels[amp] = np.asarray(nib.load(path).dataobj)
    agreement = np.mean(labels[True] == labels[False])
    print(f"bf16 vs float32 label agreement: {agreement:.5f}")
    assert agreement >= 0.99


def test_to_channels_last_is_the_same_function_with_the_same_state_dict():
    from monai.networks.nets import SwinUNETR

    with bundle_on_path():
        from scripts.inferers import to_channels_last

        torch.manual_seed(0)
        reference = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
        converted = SwinUNETR(in_channels=1, out_channels=14, feature_size=12, use_flash_attention=True).eval()
        converted.load_state_dict(reference.state_dict())
        instance_norms = sum(isinstance(m, torch.nn.InstanceNorm3d) for m in reference.modules())
        assert to_channels_last(converted) == instance_norms > 0
        assert to_channels_last(converted) == instance_norms  # idempotent
        assert sum(isinstance(m, torch.nn.GroupNorm) for m in converted.modules()) == instance_norms
        assert converted.state_dict().keys() == reference.state_dict().keys()
        converted.load_state_dict(reference.state_dict(), strict=True)  # checkpoints still load strictly
        x = torch.rand(2, 1, 64, 64, 64)
        with torch.inference_mode():
            expected, got = reference(x), converted(x)
        assert got.is_contiguous(memory_format=torch.channels_last_3d)
        torch.testing.assert_close(got.contiguous(), expected, atol=5e-3, rtol=0)

        # an affine InstanceNorm keeps its own weight and bias as the GroupNorm's
        affine = torch.nn.Sequential(torch.nn.Conv3d(2, 4, 3), torch.nn.InstanceNorm3d(4, affine=True))
        with torch.no_grad():
            affine[1].weight.uniform_(0.5, 2.0)
            affine[1].bias.uniform_(-1.0, 1.0)
        y = torch.rand(1, 2, 8, 8, 8)
        with torch.inference_mode():
            before = affine(y)
            assert to_channels_last(affine) == 1
            torch.testing.assert_close(affine(y).contiguous(), before, atol=1e-4, rtol=0)


def test_reuse_cpu_memory_stops_page_faulting_tensors_in_again():
    """After the allocator setting, a freed 256 MiB tensor's memory is reused, not faulted in afresh."""
    import resource

    if not sys.platform.startswith("linux"):
        pytest.skip("glibc allocator setting: Linux only")
    with bundle_on_path():
        from scripts.allocator import reuse_cpu_memory

        applied = reuse_cpu_memory(True)
        assert applied is True and reuse_cpu_memory(True) is True  # idempotent
        assert reuse_cpu_memory(False) is False

    def faults_of_one_fill():
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.ones(64 * 1024 * 1024).sum()  # 256 MiB, freed at once
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    # Two fills to reach the steady state: an aligned 256 MiB request does not fit the freed block of
    # the first fill when a small allocation landed right after it, so the second may extend the heap.
    faults_of_one_fill()
    faults_of_one_fill()
    # 256 MiB in 4 KiB pages would be 65536 faults per fill if the block were mapped afresh
    assert max(faults_of_one_fill() for _ in range(3)) < 2000
