"""End-to-end test of tools/demo/demo.py in its --quick form (slow: a few minutes on a 2-core CPU).

Runs ``python -m tools demo --quick`` as a user would and checks what it leaves behind: the
pre-training stage (loss-curve and inpainting PNGs, an exported encoder of 126 tensors that the
fine-tuning log reports loading), label maps in the geometry of their inputs, PNG overlays, a
metrics table naming the organs, a summary of the evaluation. Also checks that a failing bundle
step stops the demo with the step named.
"""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tools.demo.metrics import metrics_markdown, organ_names, pretraining_markdown
from tools.demo.plan import ssl_val_interval

REPO_ROOT = Path(__file__).resolve().parents[3]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_demo(out: Path, *args: str, timeout: int = 1800) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools", "demo", "--output_dir", str(out), *args],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = _run_demo(out, "--quick")
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    stdout = proc.stdout
    for i in range(1, 10):
        assert f"[{i}/9]" in stdout
    assert "agreement with TotalSegmentator" in stdout
    assert "Demo finished" in stdout

    # pre-training: datalist of images only (sample CT included), figures, export, loss report
    ssl_datalist = json.loads((out / "data" / "ssl_datalist.json").read_text())
    ssl_images = [d["image"] for d in ssl_datalist["training"] + ssl_datalist["validation"]]
    assert any(d["image"].endswith("example_ct.nii.gz") for d in ssl_datalist["training"])
    assert len(ssl_images) == 3  # --quick: 2 phantoms + the sample CT
    assert not any("label" in Path(p).name for p in ssl_images)
    for name in ("ssl_loss_curves.png", "ssl_inpainting_example.png"):
        png = out / "figures" / name
        assert png.is_file(), f"missing {png}"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 10_000
    encoder = out / "ssl" / "models" / "model_swinvit.pt"
    payload = torch.load(encoder, map_location="cpu", weights_only=True)
    assert len(payload["state_dict"]) == 126
    assert payload["feature_size"] == 12
    assert "each loss fell" in stdout or "WARNING: not every pre-training loss fell" in stdout
    assert "inpaint " in stdout and "contrast " in stdout and "rotation " in stdout
    train_log = (out / "logs" / "6_train.log").read_text()
    assert "loaded 126/126 encoder tensors" in train_log
    assert str(encoder) in train_log

    # label maps: one per testing image, with the spatial shape and affine of the input
    datalist = json.loads((out / "data" / "datalist.json").read_text())
    assert len(datalist["training"]) >= 2 and len(datalist["validation"]) >= 2
    assert any("example_ct" in d["image"] for d in datalist["training"])
    assert any("example_ct" in d["image"] for d in datalist["validation"])
    for entry in datalist["testing"]:
        image = out / "data" / entry["image"]
        name = image.name[: -len(".nii.gz")]
        pred = out / "inference" / f"{name}_seg.nii.gz"
        assert pred.is_file(), f"missing label map {pred}"
        img, seg = nib.load(str(image)), nib.load(str(pred))
        assert seg.shape[:3] == img.shape[:3]
        np.testing.assert_allclose(seg.affine, img.affine, atol=1e-3)
        values = np.unique(np.asanyarray(seg.dataobj))
        assert values.min() >= 0 and values.max() <= 13
    assert (out / "inference" / "example_ct_seg.nii.gz").is_file()

    # overlays
    pngs = sorted((out / "overlays").glob("*.png"))
    assert len(pngs) == 2
    for png in pngs:
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert png.stat().st_size > 10_000

    # metrics: every organ of the metadata named, Dice and HD95 tables, the agreement caveat
    md = (out / "metrics.md").read_text()
    for i, organ in organ_names().items():
        if i:
            assert f"| {i} | {organ} |" in md
    assert "## Dice" in md and "## HD95 (mm)" in md
    assert "TotalSegmentator" in md
    summary = json.loads((out / "eval" / "metrics_summary.json").read_text())
    assert set(summary["metrics"]) == {"val_mean_dice", "val_mean_dice_with_background", "val_hd95"}
    assert len(summary["cases"]) == len(datalist["validation"])
    assert (out / "models" / "model.pt").is_file()
    for log in ("3_pretrain.log", "4_export.log", "6_train.log", "7_evaluate.log", "8_inference.log"):
        assert (out / "logs" / log).is_file()
    assert "# Self-supervised pre-training" in md and "figures/ssl_loss_curves.png" in md


def test_metrics_markdown(tmp_path):
    """The table takes organ names from the metadata and per-case values from the bundle's CSVs."""
    names = organ_names()
    organs = [names[i] for i in sorted(names) if i]
    cases = ["img0035.nii.gz", "example_ct.nii.gz"]
    dice = dict.fromkeys(organs, 0.5)
    dice["esophagus"] = None
    summary = {
        "cases": cases,
        "organs": organs,
        "metrics": {
            "val_mean_dice": {"mean": 0.5, "per_organ": dice, "per_case_mean": dict.fromkeys(cases, 0.5)},
            "val_hd95": {
                "mean": 12.0,
                "per_organ": dict.fromkeys(organs, 12.0),
                "per_case_mean": dict.fromkeys(cases, 12.0),
            },
        },
    }
    (tmp_path / "metrics_summary.json").write_text(json.dumps(summary))
    for key, value in (("val_mean_dice", "0.5000"), ("val_hd95", "12.0000")):
        rows = ["case," + ",".join(organs) + ",mean"]
        for case in cases:
            cells = [
                "" if (key == "val_mean_dice" and o == "esophagus" and case == "example_ct.nii.gz") else value
                for o in organs
            ]
            rows.append(f"{case}," + ",".join(cells) + f",{value}")
        (tmp_path / f"{key}_per_case.csv").write_text("\n".join(rows) + "\n")
    md = metrics_markdown(tmp_path)
    assert "| 1 | spleen | 0.500 | 0.500 | 0.500 |" in md
    assert "| 5 | esophagus | 0.500 | n/a | n/a |" in md
    assert "| 6 | liver | 12.0 | 12.0 | 12.0 |" in md
    assert "img0035 (phantom)" in md and "example_ct (vs TotalSegmentator)" in md
    assert "agreement with TotalSegmentator" in md


def test_pretraining_markdown():
    drops = {
        "inpaint_loss": {"first": 0.3, "last": 0.1, "relative_drop": 2 / 3, "fell": True, "window": 20, "steps": 200},
        "rotation_loss": {
            "first": 1.39,
            "last": 1.38,
            "relative_drop": 0.007,
            "fell": False,
            "window": 20,
            "steps": 200,
        },
    }
    md = pretraining_markdown(
        {
            "settings": {"steps": 200, "roi_size": [64, 32, 32]},
            "drops": drops,
            "validation": {"val_loss": [(50, 3.0), (100, 2.5)], "val_inpaint_loss": [(50, 0.2), (100, 0.15)]},
            "figures": {"loss curves": "figures/ssl_loss_curves.png"},
            "encoder": "ssl/models/model_swinvit.pt",
            "encoder_tensors": 126,
        }
    )
    assert "| inpaint | 0.3000 | 0.1000 | -66.7% | yes |" in md
    assert "| rotation | 1.3900 | 1.3800 | -0.7% | **no** |" in md
    assert "| 100 | 2.5000 | 0.1500 |" in md
    assert "`figures/ssl_loss_curves.png`" in md and "(126 tensors)" in md
    assert "Skipped: reason" in pretraining_markdown({"skipped": "reason"})


def test_ssl_val_interval():
    """About 4 validations, the last one at the last step (so the best checkpoint can be the last)."""
    assert ssl_val_interval(200) == 50
    assert ssl_val_interval(30) == 6
    assert ssl_val_interval(150) == 30
    assert ssl_val_interval(3) == 1
    for steps in range(1, 400):
        assert steps % ssl_val_interval(steps) == 0


def test_demo_names_failing_step(tmp_path):
    """A bundle step that fails stops the demo with exit code 1 and names the step and its log."""
    out = tmp_path / "demo"
    # AdamW rejects a negative learning rate when the bundle builds the optimizer, before any training
    proc = _run_demo(out, "--quick", "--ssl_steps", "0", "--learning_rate", "-1", timeout=600)
    assert proc.returncode == 1
    assert "DEMO FAILED" in proc.stderr
    assert "[6/9] fine-tuning" in proc.stderr
    assert "6_train.log" in proc.stderr
    assert "skipped: --ssl_steps 0" in proc.stdout


def test_demo_names_failing_pretraining(tmp_path):
    """A failing pre-training run stops the demo at step 3, naming its log."""
    out = tmp_path / "demo"
    proc = _run_demo(out, "--quick", "--ssl_learning_rate", "-1", timeout=600)
    assert proc.returncode == 1
    assert "DEMO FAILED" in proc.stderr
    assert "[3/9] self-supervised pre-training" in proc.stderr
    assert "3_pretrain.log" in proc.stderr
