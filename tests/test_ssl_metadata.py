"""The pre-training bundle's metadata, documented knobs, and the modules it shares with the fine-tuning bundles."""

from __future__ import annotations

import json

import pytest

from tests.conftest import BTCV_DIR, SSL_DIR, verify_metadata

CONFIGS = SSL_DIR / "configs"
PUBLIC_KNOBS = ["dataset_dir", "datalist", "output_dir", "ckpt_dir", "device", "amp", "roi_size", "spacing",
                "hu_window", "feature_size", "pretrained_path", "patch_merging", "resume", "on_bad_volume",
                "dataset_type", "cache_dir", "batch_size", "num_samples", "cutout_fraction", "temperature",
                "inpaint_weight", "contrast_weight", "rotation_weight", "learning_rate", "warmup_steps", "num_steps",
                "accumulation_steps", "val_interval", "ckpt_metric"]
# Each bundle is self-contained, so these modules are copied into each one; they must stay identical.
SHARED_MODULES = ("allocator.py", "checkpoints.py", "encoder_weights.py", "patch_merging.py")


def _load(name):
    return json.loads((CONFIGS / name).read_text())


def test_metadata_passes_monai_schema_and_has_a_changelog_entry():
    assert "metadata is verified with no error" in verify_metadata(CONFIGS / "metadata.json", SSL_DIR)
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


@pytest.mark.parametrize("module", SHARED_MODULES)
def test_modules_shared_with_the_fine_tuning_bundle_are_identical(module):
    assert (SSL_DIR / "scripts" / module).read_text() == (BTCV_DIR / "scripts" / module).read_text()
