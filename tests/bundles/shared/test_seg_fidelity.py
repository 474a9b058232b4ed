"""Fidelity of the BTCV and MSD fine-tuning bundles to the research recipe (issue 15).

Both Dice means (organs only, and background included as the research code averages) are
reported, ``best_metric`` picks the one that keeps ``model.pt``, ``lr_scaling`` scales the rate by
the number of processes, and the model cards' fidelity tables state the configs' defaults.
"""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from ignite.engine import Engine
from monai.bundle import ConfigParser

from tests.fidelity_tables import fidelity_knobs, section
from tests.helpers import BTCV_DIR, MSD_DIR, REPO, SMALL, bundle_on_path, run_workflow

ORGANS, WITH_BG = "val_mean_dice", "val_mean_dice_with_background"


def _parser(bundle, configs=("train.json",), **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config([str(bundle / "configs" / c) for c in configs])
    parser.update(overrides)
    return parser


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    """Dice of two boolean masks; NaN when the reference is empty (MONAI's ``ignore_empty``)."""
    return 2.0 * (pred & label).sum() / (pred.sum() + label.sum()) if label.any() else math.nan


def test_both_dice_means_on_a_constructed_case_relate_as_expected():
    """Labels in slabs; 12 and 13 absent; organ 1 missed, organ 2 half predicted as 3, background slab 12 as 5."""
    label = np.zeros((14, 8, 8), np.int64)
    for k in range(1, 12):
        label[k, :, :] = k
    pred = label.copy()
    pred[1] = 0
    pred[2, :4] = 3
    pred[12] = 5
    with bundle_on_path(BTCV_DIR):
        handlers = _parser(BTCV_DIR).get_parsed_content("validate#dice_metrics")
    engine = Engine(lambda e, b: b)
    for name, handler in handlers.items():
        handler.attach(engine, name)
    onehot = [torch.nn.functional.one_hot(torch.from_numpy(m), 14).permute(3, 0, 1, 2).float() for m in (pred, label)]
    engine.run([{"pred": [onehot[0]], "label": [onehot[1]]}])

    per_label = np.array([_dice(pred == k, label == k) for k in range(14)])
    present = per_label[1:][~np.isnan(per_label[1:])]
    assert len(present) == 11 and per_label[1] == 0.0 and 0.0 < per_label[2] < 1.0 and per_label[0] < 0.7
    organ_mean = present.mean()
    assert engine.state.metrics[ORGANS] == pytest.approx(organ_mean, abs=1e-6)
    expected = (len(present) * organ_mean + per_label[0]) / (len(present) + 1)
    assert engine.state.metrics[WITH_BG] == pytest.approx(expected, abs=1e-6)
    assert engine.state.metrics[WITH_BG] != pytest.approx(organ_mean, abs=1e-3)


def test_training_validation_reports_both_means_and_the_with_background_one_adds_the_background(trained):
    evaluator = trained["workflow"].parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == ORGANS
    assert evaluator.state.best_metric == evaluator.state.metrics[ORGANS]
    organs = evaluator.state.metric_details[ORGANS].cpu().numpy()
    with_bg = evaluator.state.metric_details[WITH_BG].cpu().numpy()
    assert with_bg.shape[1] == 14 and organs.shape[1] == 13
    np.testing.assert_allclose(with_bg[:, 1:], organs, rtol=1e-6)  # NaN where an organ is absent, in both
    assert evaluator.state.metrics[WITH_BG] == pytest.approx(float(np.nanmean(with_bg)), abs=1e-5)
    assert evaluator.state.metrics[ORGANS] == pytest.approx(float(np.nanmean(organs)), abs=1e-5)


@pytest.mark.parametrize("bundle", [BTCV_DIR, MSD_DIR], ids=["btcv", "msd"])
def test_best_metric_knob_picks_the_key_metric(bundle):
    with bundle_on_path(bundle):
        key, others = _parser(bundle).get_parsed_content("validate#metrics")
        assert list(key) == [ORGANS] and list(others) == [WITH_BG]
        key, others = _parser(bundle, best_metric="with_background").get_parsed_content("validate#metrics")
        assert list(key) == [WITH_BG] and list(others) == [ORGANS]
        with pytest.raises(Exception, match="best_metric"):
            _parser(bundle, best_metric="val_dice").get_parsed_content("validate#metrics")


def test_with_background_keeps_model_pt_by_that_mean(phantom_dir, tmp_path):
    workflow = run_workflow(
        ["train.json"],
        "train",
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(tmp_path),
        max_epochs=1,
        val_interval=1,
        best_metric="with_background",
        **SMALL,
    )
    evaluator = workflow.parser.get_parsed_content("validate#evaluator")
    assert evaluator.state.key_metric_name == WITH_BG
    assert evaluator.state.best_metric == evaluator.state.metrics[WITH_BG]
    assert ORGANS in evaluator.state.metrics
    assert (tmp_path / "models" / "model.pt").exists()


@pytest.mark.parametrize("bundle", [BTCV_DIR, MSD_DIR], ids=["btcv", "msd"])
def test_lr_scaling_multiplies_by_the_world_size_in_multi_gpu_train(bundle, monkeypatch, caplog):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda *a, **k: 4)
    configs = ("train.json", "multi_gpu_train.json")
    with bundle_on_path(bundle), caplog.at_level(logging.INFO):
        assert _parser(bundle, configs).get_parsed_content("optimizer#lr") == pytest.approx(1e-4)
        assert _parser(bundle, configs, lr_scaling="linear").get_parsed_content("optimizer#lr") == pytest.approx(4e-4)
        # a single-process run is one process whatever the scaling
        assert _parser(bundle, lr_scaling="linear").get_parsed_content("optimizer#lr") == pytest.approx(1e-4)
        with pytest.raises(Exception, match="lr_scaling"):
            _parser(bundle, lr_scaling="sqrt").get_parsed_content("optimizer#lr")
    assert "effective learning rate 0.0004 (learning_rate 0.0001, lr_scaling linear, 4 processes)" in caplog.text
    assert "effective learning rate 0.0001 (learning_rate 0.0001, lr_scaling linear, 1 process)" in caplog.text


def _train_defaults(bundle) -> dict:
    return json.loads((bundle / "configs" / "train.json").read_text())


@pytest.mark.parametrize(
    "bundle, must",
    [
        (
            BTCV_DIR,
            {
                "feature_size",
                "in_channels",
                "num_classes",
                "use_checkpoint",
                "patch_merging",
                "spacing",
                "hu_window",
                "roi_size",
                "num_samples",
                "learning_rate",
                "weight_decay",
                "lr_scaling",
                "warmup_epochs",
                "batch_size",
                "max_epochs",
                "val_interval",
                "overlap",
                "sw_batch_size",
                "best_metric",
                "amp",
            },
        ),
        (
            MSD_DIR,
            {
                "task",
                "feature_size",
                "use_checkpoint",
                "in_channel_rule",
                "num_samples",
                "learning_rate",
                "weight_decay",
                "lr_scaling",
                "warmup_epochs",
                "batch_size",
                "max_epochs",
                "val_interval",
                "overlap",
                "sw_batch_size",
                "num_folds",
                "best_metric",
                "amp",
            },
        ),
    ],
    ids=["btcv", "msd"],
)
def test_fidelity_table_states_the_configs_defaults(bundle, must):
    # the fidelity tables moved from the model cards to the repository's docs/fine_tuning.md
    guide = (REPO / "docs" / "fine_tuning.md").read_text()
    title = {BTCV_DIR: "BTCV", MSD_DIR: "MSD"}[bundle]
    named = fidelity_knobs(section(guide, f"{title}: fidelity to the research recipe"))
    train = _train_defaults(bundle)
    for knob, value in named.items():
        assert knob in train, knob
        assert value == train[knob], (knob, value, train[knob])
    assert must <= set(named), must - set(named)
