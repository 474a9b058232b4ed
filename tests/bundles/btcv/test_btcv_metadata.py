"""The BTCV bundle's metadata: its 14 output channels.

Schema, version and knobs: tests/bundles/shared/test_bundle_contract.py.
"""

from __future__ import annotations

import json

from tests.helpers import BTCV_DIR

CONFIGS = BTCV_DIR / "configs"


def _load(name):
    return json.loads((CONFIGS / name).read_text())


def test_metadata_names_14_output_channels_and_configs_agree():
    meta = _load("metadata.json")
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert [int(k) for k in channels] == list(range(14))
    assert channels["0"] == "background" and channels["1"] == "spleen" and channels["13"] == "left adrenal gland"
    for name in ("train.json", "inference.json"):
        assert _load(name)["num_classes"] == len(channels)
    assert meta["version"] in meta["changelog"]
    assert "required_packages_version" in meta
