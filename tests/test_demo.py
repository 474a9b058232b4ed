"""End-to-end test of tools/demo.py in its --quick form (slow: a few minutes on a 2-core CPU).

Runs ``python -m tools.demo --quick`` as a user would and checks what it leaves behind: label maps
in the geometry of their inputs, PNG overlays, a metrics table naming the organs, a summary of the
evaluation. Also checks that a failing bundle step stops the demo with the step named.
"""

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tools.demo import metrics_markdown, organ_names

REPO_ROOT = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run_demo(out: Path, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tools.demo", "--output_dir", str(out), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    proc = _run_demo(out, "--quick")
    assert proc.returncode == 0, f"demo failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    stdout = proc.stdout
    for i in range(1, 7):
        assert f"[{i}/6]" in stdout
    assert "agreement with TotalSegmentator" in stdout
    assert "Demo finished" in stdout

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
    assert set(summary["metrics"]) == {"val_mean_dice", "val_hd95"}
    assert len(summary["cases"]) == len(datalist["validation"])
    assert (out / "models" / "model.pt").is_file()
    for log in ("3_train.log", "4_evaluate.log", "5_inference.log"):
        assert (out / "logs" / log).is_file()


def test_metrics_markdown(tmp_path):
    """The table takes organ names from the metadata and per-case values from the bundle's CSVs."""
    names = organ_names()
    organs = [names[i] for i in sorted(names) if i]
    cases = ["img0035.nii.gz", "example_ct.nii.gz"]
    dice = {o: 0.5 for o in organs}
    dice["esophagus"] = None
    summary = {
        "cases": cases,
        "organs": organs,
        "metrics": {
            "val_mean_dice": {"mean": 0.5, "per_organ": dice, "per_case_mean": {c: 0.5 for c in cases}},
            "val_hd95": {"mean": 12.0, "per_organ": {o: 12.0 for o in organs}, "per_case_mean": {c: 12.0 for c in cases}},
        },
    }
    (tmp_path / "metrics_summary.json").write_text(json.dumps(summary))
    for key, value in (("val_mean_dice", "0.5000"), ("val_hd95", "12.0000")):
        rows = ["case," + ",".join(organs) + ",mean"]
        for case in cases:
            cells = ["" if (key == "val_mean_dice" and o == "esophagus" and case == "example_ct.nii.gz") else value
                     for o in organs]
            rows.append(f"{case}," + ",".join(cells) + f",{value}")
        (tmp_path / f"{key}_per_case.csv").write_text("\n".join(rows) + "\n")
    md = metrics_markdown(tmp_path)
    assert "| 1 | spleen | 0.500 | 0.500 | 0.500 |" in md
    assert "| 5 | esophagus | 0.500 | n/a | n/a |" in md
    assert "| 6 | liver | 12.0 | 12.0 | 12.0 |" in md
    assert "img0035 (phantom)" in md and "example_ct (vs TotalSegmentator)" in md
    assert "agreement with TotalSegmentator" in md


def test_demo_names_failing_step(tmp_path):
    """A bundle step that fails stops the demo with exit code 1 and names the step and its log."""
    out = tmp_path / "demo"
    # AdamW rejects a negative learning rate when the bundle builds the optimizer, before any training
    proc = _run_demo(out, "--quick", "--learning_rate", "-1", timeout=600)
    assert proc.returncode == 1
    assert "DEMO FAILED" in proc.stderr
    assert "[3/6] fine-tuning" in proc.stderr
    assert "3_train.log" in proc.stderr
