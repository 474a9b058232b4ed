"""The BTCV bundle's metadata and the knobs its README promises."""

from __future__ import annotations

import json

from tests.conftest import BTCV_DIR, verify_metadata

CONFIGS = BTCV_DIR / "configs"
PUBLIC_KNOBS = ["dataset_dir", "datalist", "output_dir", "device", "amp", "roi_size", "spacing", "feature_size",
                "sw_batch_size", "overlap", "num_workers", "learning_rate", "max_epochs", "val_interval",
                "pretrained_path"]


def _load(name):
    return json.loads((CONFIGS / name).read_text())


def test_metadata_passes_monai_schema():
    assert "metadata is verified with no error" in verify_metadata(CONFIGS / "metadata.json", BTCV_DIR)


def test_metadata_names_14_output_channels_and_configs_agree():
    meta = _load("metadata.json")
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [int(k) for k in channels] == list(range(14))
    assert channels["0"] == "background" and channels["1"] == "spleen" and channels["13"] == "left adrenal gland"
    for name in ("train.json", "inference.json"):
        assert _load(name)["num_classes"] == len(channels)
    assert meta["version"] in meta["changelog"]
    assert "required_packages_version" in meta


def test_public_knobs_are_top_level_and_documented():
    train, infer, evaluate = _load("train.json"), _load("inference.json"), _load("evaluate.json")
    readme = (BTCV_DIR / "docs" / "README.md").read_text()
    for knob in PUBLIC_KNOBS:
        assert knob in train, knob
        assert f"`{knob}`" in readme, knob
    for knob in ("dataset_dir", "datalist", "output_dir", "device", "amp", "roi_size", "spacing", "feature_size",
                 "sw_batch_size", "overlap", "num_workers", "ckpt_path"):
        assert knob in infer, knob
    assert "ckpt_path" in evaluate and "`ckpt_path`" in readme
    for shared in ("roi_size", "spacing", "hu_window", "feature_size", "num_classes"):
        assert train[shared] == infer[shared], shared
