"""The BTCV "Reproduce the leaderboard inference" commands, run as written, at test size.

They are in docs/leaderboard.md, which the BTCV model card links (moved there from the card).

The bash block is taken from that guide itself and run by bash from the repository root, with
only its data paths replaced (phantoms for /data/btcv, 20 small phantom test images img0061..img0080,
a feature-size-12 encoder for model_swinvit.pt), two folds instead of five, and the bundle copied to a
temporary folder so that nothing is written into the repository. A ``python`` shell function appends
the test sizes to every ``monai.bundle run``; every other word of each command is the card's.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.helpers import BTCV_DIR, PHANTOM_SHAPE, PHANTOM_SPACING, REPO, SMALL, bundle_on_path, card_block

CARD = REPO / "docs" / "leaderboard.md"  # moved from the BTCV model card; the card links it
TEST_IDS = range(61, 81)
TEST_IMAGE_SHAPE = (40, 40, 24)  # one 64^3 window each after resampling and padding


def _dataset(root: Path) -> Path:
    """Four labelled phantoms with a datalist (2 training, 2 validation) and the 20 test images."""
    from tools.data.make_phantoms import make_phantom, write_phantom_dataset

    pairs = write_phantom_dataset(root, num_cases=4, seed=11, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    items = [{"image": str(Path(i).relative_to(root)), "label": str(Path(lab).relative_to(root))} for i, lab in pairs]
    (root / "datalist.json").write_text(json.dumps({"training": items[:2], "validation": items[2:]}))
    test_dir = root / "RawData" / "Testing" / "img"
    test_dir.mkdir(parents=True)
    for case_id in TEST_IDS:
        image, _, affine = make_phantom(case_id, shape=TEST_IMAGE_SHAPE, spacing=PHANTOM_SPACING)
        nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), test_dir / f"img{case_id:04d}.nii.gz")
    return root


def _encoder(path: Path) -> Path:
    """A feature-size-12 encoder export, standing in for the official model_swinvit.pt."""
    from monai.networks.nets import SwinUNETR

    with bundle_on_path(BTCV_DIR):
        from scripts.encoder_weights import save_encoder

        save_encoder(SwinUNETR(in_channels=1, out_channels=14, feature_size=12), str(path), "current")
    return path


def test_the_model_cards_leaderboard_commands_run_as_written(tmp_path):
    block = card_block(CARD, "Reproduce the leaderboard inference")
    data = _dataset(tmp_path / "btcv")
    bundle = tmp_path / "bundle" / "swin_unetr_btcv_seg"
    shutil.copytree(BTCV_DIR, bundle, ignore=shutil.ignore_patterns("models", "eval", "predictions", "__pycache__"))
    encoder = _encoder(tmp_path / "encoder.pt")
    zip_path = tmp_path / "btcv_submission.zip"

    script = block.replace("B=bundles/swin_unetr_btcv_seg", f"B={shlex.quote(str(bundle))}")
    script = script.replace("/weights/model_swinvit.pt", str(encoder)).replace("/data/btcv", str(data))
    script = script.replace("for k in 0 1 2 3 4;", "for k in 0 1;")
    script = script.replace("--zip_path btcv_submission.zip", f"--zip_path {shlex.quote(str(zip_path))}")
    for placeholder in ("/data/", "/weights/", "0 1 2 3 4"):
        assert placeholder not in script, f"the card's commands changed: {placeholder} left in the test's script"
    sizes = {**SMALL, "num_folds": 2, "max_epochs": 1, "val_interval": 1}
    size_args = " ".join(f"--{k} {shlex.quote(json.dumps(v))}" for k, v in sizes.items())
    prelude = (
        "set -euo pipefail\n"
        f'python() {{ if [ "$1 $2 $3" = "-m monai.bundle run" ]; then {shlex.quote(sys.executable)} "$@" {size_args}; '
        f'else {shlex.quote(sys.executable)} "$@"; fi; }}\n'
    )
    result = subprocess.run(["bash", "-c", prelude + script], cwd=REPO, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-6000:]

    for k in (0, 1):
        assert (bundle / "models" / f"fold{k}" / "model.pt").is_file()
        assert (bundle / "eval" / f"fold{k}" / "metrics_summary.json").is_file()
    assert (bundle / "eval" / "cv_metrics.md").is_file()
    lcc = json.loads((bundle / "eval" / "lcc_labels.json").read_text())["lcc_labels"]
    assert all(1 <= i <= 13 for i in lcc)
    # the ensemble really was every fold x 4 views
    log = result.stdout + result.stderr
    assert "ensemble of 2 model(s) x 4 view(s)" in log, log[-3000:]

    with zipfile.ZipFile(zip_path) as archive:
        names = sorted(archive.namelist())
        assert names == [f"label{i:04d}.nii.gz" for i in TEST_IDS]
        predictions = bundle / "predictions" / "test"
        for case_id in TEST_IDS:
            member = archive.read(f"label{case_id:04d}.nii.gz")
            assert member == (predictions / f"img{case_id:04d}_seg.nii.gz").read_bytes()
    image = nib.load(data / "RawData" / "Testing" / "img" / "img0061.nii.gz")
    label = nib.load(predictions / "img0061_seg.nii.gz")
    assert label.shape == image.shape and np.allclose(label.affine, image.affine, atol=1e-3)
    assert label.get_data_dtype() == np.uint8
