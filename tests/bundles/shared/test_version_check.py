"""A MONAI or torch the bundles cannot run on is refused at start-up, naming what is installed and what to do.

The tested versions themselves run in tests/compat (one venv per MONAI, tools/env/monai_env.sh).
"""

from __future__ import annotations

import logging

import monai
import pytest
import torch

from tests.helpers import BTCV_DIR, MSD_DIR, SSL_DIR, bundle_on_path, error_text

BUNDLES = {"btcv": BTCV_DIR, "msd": MSD_DIR, "ssl": SSL_DIR}


def _run_training(bundle_dir, tmp_path) -> BaseException:
    """``monai.bundle run training`` of the bundle; return the error it stops with."""
    from monai.bundle import run

    with bundle_on_path(bundle_dir), pytest.raises(Exception) as info:
        run("training", config_file=str(bundle_dir / "configs" / "train.json"), bundle_root=str(tmp_path))
    return info.value


@pytest.mark.parametrize("bundle", list(BUNDLES))
def test_monai_older_than_1_4_is_refused_when_the_config_imports_scripts(bundle, monkeypatch, tmp_path):
    monkeypatch.setattr(monai, "__version__", "1.3.2")
    text = error_text(_run_training(BUNDLES[bundle], tmp_path))
    assert "monai 1.3.2 is installed; this bundle needs monai >= 1.4.0" in text
    assert "'+imports' and '+setup' keys of configs/multi_gpu_train.json" in text  # why
    assert "Tested: monai 1.4.0, 1.5.2, 1.6.1 with torch 2.13.0, 2.14.1" in text
    assert "pip install monai==1.6.1 torch==2.13.0" in text  # what to do


def test_torch_older_than_2_1_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(torch, "__version__", "2.0.1+cu118")
    text = error_text(_run_training(SSL_DIR, tmp_path))
    assert "torch 2.0.1+cu118 is installed; this bundle needs torch >= 2.1.0" in text
    assert "torch.load(mmap=True)" in text and "needs monai" not in text


def test_monai_newer_than_the_tested_ones_runs_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(monai, "__version__", "1.7.0")
    with bundle_on_path(BTCV_DIR):
        from scripts import compat

        logging.getLogger(BTCV_DIR.name).addHandler(caplog.handler)
        try:
            compat.require_supported_versions()
        finally:
            logging.getLogger(BTCV_DIR.name).removeHandler(caplog.handler)
    assert "monai 1.7.0 is newer than the versions this bundle was tested with (1.4.0, 1.5.2, 1.6.1)" in caplog.text


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.5.2", (1, 5, 2)), ("2.13.0+cpu", (2, 13, 0)), ("1.6.0rc1", (1, 6, 0)), ("2.1", (2, 1, 0))],
)
def test_version_strings_are_read_as_numbers(text, expected):
    with bundle_on_path(BTCV_DIR):
        from scripts.compat import version_tuple

    assert version_tuple(text) == expected
