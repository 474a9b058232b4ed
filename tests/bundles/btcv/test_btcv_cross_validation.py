"""BTCV cross-validation and post-processing: fold splits, per-fold runs, the CV table, LCC and its chooser."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.metrics import compute_dice
from scipy import ndimage

from tests.helpers import BTCV_DIR, REPO, SMALL, bundle_on_path, error_text, run_workflow

ORGANS = json.loads((BTCV_DIR / "configs" / "metadata.json").read_text())["network_data_format"]["outputs"]["pred"][
    "channel_def"
]
INFER_SMALL = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size")}
# where each config has its largest-connected-component step (after the argmax)
LCC_STEP = {"inference.json": "postprocessing#transforms#3", "evaluate.json": "validate#postprocessing#transforms#4"}


def _parser(configs: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser(ConfigParser.load_config_files([str(BTCV_DIR / "configs" / c) for c in configs]))
    parser.read_meta(str(BTCV_DIR / "configs" / "metadata.json"))
    parser.update(overrides)
    return parser


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    """Run ``python -m tools.<name>`` from the repository root as a user would."""
    return subprocess.run(
        [sys.executable, "-m", f"tools.{name}", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def test_fold_splits_are_disjoint_seeded_and_cover_the_pooled_lists(tmp_path):
    items = [{"image": f"img{i:04d}.nii.gz", "label": f"label{i:04d}.nii.gz"} for i in range(1, 11)]
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"training": items[:7], "validation": items[7:] + items[:1]}))  # one case twice
    with bundle_on_path(BTCV_DIR):
        from scripts.folds import cv_datalist

        def split(fold, seed=12345, section="validation", pool=("training", "validation")):
            cases = cv_datalist(str(datalist), str(tmp_path), section, fold, 3, seed, list(pool))
            return [Path(c["image"]).name for c in cases]

        validation = [split(k) for k in range(3)]
        assert sorted(n for part in validation for n in part) == sorted(i["image"] for i in items)  # each case once
        assert sorted(len(v) for v in validation) == [3, 3, 4]
        for k in range(3):
            training = split(k, section="training")
            assert not set(training) & set(validation[k])
            assert sorted(training + validation[k]) == sorted(i["image"] for i in items)
        assert split(0) == split(0) and [split(k, seed=7) for k in range(3)] != validation
        assert len({n for k in range(3) for n in split(k, pool=["training"])}) == 7
        assert split(None) == [i["image"] for i in items[7:] + items[:1]]  # no fold: the datalist's own list
        with pytest.raises(ValueError, match="fold must be 0..2"):
            split(3)
    for fold, suffix in ((None, ""), (1, "/fold1")):
        with bundle_on_path(BTCV_DIR):
            parser = _parser(["train.json"], bundle_root=str(tmp_path), fold=fold)
            assert parser.get_parsed_content("ckpt_dir") == f"{tmp_path}/models{suffix}"
            assert parser.get_parsed_content("output_dir") == f"{tmp_path}/eval{suffix}"


def _train_and_evaluate_fold(root: Path, phantom_dir: Path, fold: int) -> None:
    """Fold ``fold`` of 2 over the datalist's 2 validation cases (``cv_pool``): 1 case to train, 1 to validate."""
    data = {"dataset_dir": str(phantom_dir), "datalist": str(phantom_dir / "datalist.json"), "bundle_root": str(root)}
    folds = {"fold": fold, "num_folds": 2, "cv_pool": ["validation"]}
    run_workflow(["train.json"], "train", **data, **folds, max_epochs=1, val_interval=1, **SMALL)
    run_workflow(["train.json", "evaluate.json"], "eval", **data, **folds, **SMALL)


def test_two_fold_run_writes_each_fold_and_the_cross_validation_table(phantom_dir, tmp_path):
    for fold in (0, 1):
        _train_and_evaluate_fold(tmp_path, phantom_dir, fold)
    validated = []
    for fold in (0, 1):
        assert (tmp_path / "models" / f"fold{fold}" / "model.pt").is_file()
        assert (tmp_path / "models" / f"fold{fold}" / "checkpoint_last.pt").is_file()
        manifest = json.loads((tmp_path / "eval" / f"fold{fold}" / "predictions" / "manifest.json").read_text())
        assert len(manifest) == 1 and Path(manifest[0]["output"]).is_file()
        assert nib.load(manifest[0]["output"]).shape == nib.load(manifest[0]["reference"]).shape
        validated.append(Path(manifest[0]["reference"]).name)
    assert not (tmp_path / "models" / "model.pt").exists()
    pool = json.loads((phantom_dir / "datalist.json").read_text())["validation"]
    assert sorted(validated) == sorted(Path(c["label"]).name for c in pool)  # each pooled case validated once

    result = _tool("cv_metrics", "--eval_dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stdout + result.stderr
    table = json.loads((tmp_path / "eval" / "cv_metrics.json").read_text())
    summaries = [json.loads((tmp_path / "eval" / f"fold{k}" / "metrics_summary.json").read_text()) for k in (0, 1)]
    organs = [ORGANS[str(i)] for i in range(1, 14)]
    assert table["organs"] == organs
    for name in ("val_mean_dice", "val_hd95"):
        for organ in organs:
            row = table["metrics"][name]["per_organ"][organ]
            values = [s["metrics"][name]["per_organ"][organ] for s in summaries]
            assert row["folds"] == values
            defined = [v for v in values if v is not None]
            assert row["n"] == len(defined)
            if defined:
                assert row["mean"] == pytest.approx(np.mean(defined))
            if len(defined) == 2:
                assert row["sd"] == pytest.approx(np.std(defined, ddof=1))
        means = [s["metrics"][name]["mean"] for s in summaries]
        assert table["metrics"][name]["mean_over_organs"]["folds"] == means
    markdown = (tmp_path / "eval" / "cv_metrics.md").read_text()
    assert "| spleen |" in markdown and "mean Dice" in markdown
    assert (tmp_path / "eval" / "cv_metrics.csv").read_text().startswith("metric,organ,fold0,fold1,mean,sd,n")

    result = _tool("choose_postprocessing", "--eval_dir", str(tmp_path / "eval"))
    assert result.returncode == 0, result.stdout + result.stderr
    choice = json.loads((tmp_path / "eval" / "postprocessing.json").read_text())
    assert choice["cases"] == 2
    assert json.loads((tmp_path / "eval" / "lcc_labels.json").read_text()) == {"lcc_labels": choice["lcc_labels"]}


def _summary(organs: list[str]) -> dict:
    metric = {"mean": 0.5, "per_organ": dict.fromkeys(organs, 0.5)}
    return {"cases": ["a"], "organs": organs, "metrics": {"val_mean_dice": metric, "val_hd95": metric}}


def test_cv_metrics_names_a_missing_or_malformed_fold(tmp_path):
    organs = [ORGANS[str(i)] for i in range(1, 14)]
    for fold in (0, 2):
        (tmp_path / f"fold{fold}").mkdir()
        (tmp_path / f"fold{fold}" / "metrics_summary.json").write_text(json.dumps(_summary(organs)))
    result = _tool("cv_metrics", "--eval_dir", str(tmp_path))
    assert result.returncode == 1 and f"{tmp_path / 'fold1'}" in result.stderr
    (tmp_path / "fold1").mkdir()
    result = _tool("cv_metrics", "--eval_dir", str(tmp_path))
    assert result.returncode == 1 and f"missing: {tmp_path / 'fold1' / 'metrics_summary.json'}" in result.stderr
    (tmp_path / "fold1" / "metrics_summary.json").write_text(json.dumps(_summary(organs[:-1])))
    result = _tool("cv_metrics", "--eval_dir", str(tmp_path))
    assert result.returncode == 1 and str(tmp_path / "fold1" / "metrics_summary.json") in result.stderr
    assert "channel_def" in result.stderr
    (tmp_path / "fold1" / "metrics_summary.json").write_text("{")
    result = _tool("cv_metrics", "--eval_dir", str(tmp_path))
    assert result.returncode == 1 and "cannot be read" in result.stderr
    (tmp_path / "fold1" / "metrics_summary.json").write_text(json.dumps(_summary(organs)))
    result = _tool("cv_metrics", "--eval_dir", str(tmp_path), "--num_folds", "4")
    assert result.returncode == 1 and str(tmp_path / "fold3") in result.stderr
    assert _tool("cv_metrics", "--eval_dir", str(tmp_path)).returncode == 0


def _blob(shape, lo, hi) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[tuple(slice(a, b) for a, b in zip(lo, hi))] = True
    return mask


def test_lcc_removes_a_planted_island_and_leaves_the_rest():
    shape = (24, 24, 16)
    seg = np.zeros(shape, dtype=np.uint8)
    seg[_blob(shape, (2, 2, 2), (10, 10, 8))] = 6  # liver, and a liver island far away
    seg[_blob(shape, (20, 20, 12), (22, 22, 14))] = 6
    seg[_blob(shape, (12, 2, 2), (18, 8, 8))] = 1  # spleen, and a spleen island
    seg[_blob(shape, (2, 20, 12), (4, 22, 14))] = 1
    expected = seg.copy()
    expected[_blob(shape, (20, 20, 12), (22, 22, 14))] = 0  # only the liver island goes, to background
    for configs in (["inference.json"], ["train.json", "evaluate.json"]):
        with bundle_on_path(BTCV_DIR):
            lcc = _parser(configs, lcc_labels=[6]).get_parsed_content(LCC_STEP[configs[-1]])
            default = _parser(configs).get_parsed_content(LCC_STEP[configs[-1]])  # lcc_labels [] : off
        np.testing.assert_array_equal(np.asarray(lcc({"pred": seg[None].copy()})["pred"])[0], expected)
        np.testing.assert_array_equal(np.asarray(default({"pred": seg[None].copy()})["pred"])[0], seg)


@pytest.mark.parametrize("value", [[0], [14], ["liver"], [3, 3], "6"])
def test_lcc_labels_that_are_not_organ_ids_fail_clearly(value):
    for configs in (["inference.json"], ["train.json", "evaluate.json"]):
        with bundle_on_path(BTCV_DIR), pytest.raises(Exception) as info:
            _parser(configs, lcc_labels=value).get_parsed_content(LCC_STEP[configs[-1]])
        assert "lcc_labels" in error_text(info.value)


def test_inference_with_lcc_leaves_one_component_per_organ(trained, phantom_dir, tmp_path):
    """With every organ listed (as an overlay file, the way choose_postprocessing's output is used)."""
    overlay = tmp_path / "lcc_labels.json"
    overlay.write_text(json.dumps({"lcc_labels": list(range(1, 14))}))
    maps = {}
    for name, configs in (("plain", ["inference.json"]), ("lcc", ["inference.json", str(overlay)])):
        run_workflow(
            configs,
            "infer",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            output_dir=str(tmp_path / name),
            ckpt_path=str(trained["model"]),
            num_workers=0,
            **INFER_SMALL,
        )
        (out,) = (tmp_path / name).glob("*_seg.nii.gz")
        maps[name] = np.asarray(nib.load(out).dataobj)
    plain, lcc = maps["plain"], maps["lcc"]
    changed = plain != lcc
    assert changed.any() and (lcc[changed] == 0).all()  # LCC removed islands, only setting voxels to background
    for organ in np.unique(lcc[lcc > 0]):
        assert ndimage.label(lcc == organ, structure=np.ones((3, 3, 3)))[1] == 1
        kept = lcc == organ
        assert kept.sum() == max(
            np.bincount(ndimage.label(plain == organ, structure=np.ones((3, 3, 3)))[0].ravel())[1:]
        )


def _write_case(folder: Path, name: str, pred: np.ndarray, ref: np.ndarray) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"output": folder / f"{name}_seg.nii.gz", "reference": folder / f"{name}_label.nii.gz"}
    for key, data in (("output", pred), ("reference", ref)):
        nib.save(nib.Nifti1Image(data.astype(np.uint8), np.eye(4)), paths[key])
    return {"input": name, **{k: str(v) for k, v in paths.items()}}


def test_chooser_keeps_lcc_only_for_organs_where_cv_dice_rises(tmp_path):
    shape = (24, 24, 16)
    big, island = _blob(shape, (2, 2, 2), (10, 10, 8)), _blob(shape, (20, 20, 12), (22, 22, 14))
    kidney, kidney_tip = _blob(shape, (12, 12, 2), (16, 16, 6)), _blob(shape, (12, 12, 10), (14, 14, 12))
    other_kidney = _blob(shape, (2, 14, 10), (6, 18, 14))
    missed = big & (np.indices(shape)[0] < 3)
    for fold in (0, 1):
        entries = []
        for case in range(2):
            ref, pred = np.zeros(shape, np.uint8), np.zeros(shape, np.uint8)
            ref[big], pred[big | island] = 1, 1  # spleen: the prediction has an island; LCC helps
            ref[kidney | kidney_tip], pred[kidney | kidney_tip] = 2, 2  # right kidney in two parts: LCC hurts
            if case == 1:
                ref[other_kidney], pred[other_kidney] = 3, 3  # left kidney, one part: LCC changes nothing
                pred[missed] = 0  # a spleen slice missed: LCC still helps
            entries.append(_write_case(tmp_path / f"fold{fold}" / "predictions", f"f{fold}c{case}", pred, ref))
        (tmp_path / f"fold{fold}" / "predictions" / "manifest.json").write_text(json.dumps(entries))
    result = _tool("choose_postprocessing", "--eval_dir", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert json.loads((tmp_path / "lcc_labels.json").read_text()) == {"lcc_labels": [1]}
    rows = {r["id"]: r for r in json.loads((tmp_path / "postprocessing.json").read_text())["organs"]}
    b, i, m = big.sum(), island.sum(), missed.sum()
    before = np.mean([2 * b / (2 * b + i)] * 2 + [2 * (b - m) / (2 * b - m + i)] * 2)
    after = np.mean([1.0] * 2 + [2 * (b - m) / (2 * b - m)] * 2)
    assert rows[1]["cases"] == 4 and rows[1]["lcc"]
    assert rows[1]["dice_without_lcc"] == pytest.approx(before) and rows[1]["dice_with_lcc"] == pytest.approx(after)
    k, t = kidney.sum(), kidney_tip.sum()
    assert rows[2]["dice_without_lcc"] == pytest.approx(1.0) and not rows[2]["lcc"]
    assert rows[2]["dice_with_lcc"] == pytest.approx(2 * k / (2 * k + t))
    assert rows[3]["cases"] == 2 and rows[3]["change"] == 0.0 and not rows[3]["lcc"]  # a tie keeps it off
    assert rows[4]["cases"] == 0 and rows[4]["dice_without_lcc"] is None and not rows[4]["lcc"]
    assert "| 1 | spleen | 4 |" in (tmp_path / "postprocessing.md").read_text()


def test_label_map_dice_is_monai_compute_dice_with_ignore_empty():
    rng = np.random.default_rng(3)
    pred, ref = rng.integers(0, 5, (12, 10, 8)), rng.integers(0, 5, (12, 10, 8))
    ref[ref == 3] = 0  # label 3 absent from the reference: NaN, as MeanDice leaves it out
    pred[pred == 4] = 0  # label 4 absent from the prediction: 0
    labels = [1, 2, 3, 4, 6]
    with bundle_on_path(BTCV_DIR):
        from scripts.metrics import label_map_dice

        ours = label_map_dice(pred, ref, labels)
    masks = [(torch.as_tensor(m) == v)[None, None].float() for v in labels for m in (pred, ref)]
    monai = [float(compute_dice(masks[2 * i], masks[2 * i + 1], ignore_empty=True)[0, 0]) for i in range(len(labels))]
    np.testing.assert_allclose(ours, monai, equal_nan=True)
    assert np.isnan(ours[2]) and ours[3] == 0.0 and np.isnan(ours[4])
