"""The pre-training bundle's metadata and documented knobs (its shared modules: tests/test_bundle_code_sync.py)."""

from __future__ import annotations

import json
import subprocess
import sys


from tests.conftest import SCHEMA, SSL_DIR

CONFIGS = SSL_DIR / "configs"
PUBLIC_KNOBS = ["dataset_dir", "datalist", "output_dir", "ckpt_dir", "device", "amp", "roi_size", "spacing",
                "hu_window", "feature_size", "pretrained_path", "patch_merging", "resume", "on_bad_volume",
                "dataset_type", "cache_dir", "batch_size", "num_samples", "cutout_fraction", "temperature",
                "inpaint_weight", "contrast_weight", "rotation_weight", "learning_rate", "warmup_steps", "num_steps",
                "accumulation_steps", "val_interval", "ckpt_metric"]


def _load(name):
    return json.loads((CONFIGS / name).read_text())


def test_metadata_passes_monai_schema_and_has_a_changelog_entry():
    result = subprocess.run(
        [sys.executable, "-m", "monai.bundle", "verify_metadata", "--meta_file", str(CONFIGS / "metadata.json"),
         "--filepath", str(SCHEMA)], capture_output=True, text=True, cwd=SSL_DIR)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "metadata is verified with no error" in result.stdout + result.stderr
    meta = _load("metadata.json")
    assert meta["version"] in meta["changelog"]


def test_public_knobs_are_top_level_and_documented():
    train = _load("train.json")
    readme = (SSL_DIR / "docs" / "README.md").read_text()
    for knob in PUBLIC_KNOBS:
        assert knob in train, knob
        assert f"`{knob}`" in readme, knob
    for knob in ("ckpt_path", "encoder_path"):
        assert knob in _load("export.json") and f"`{knob}`" in readme, knob

