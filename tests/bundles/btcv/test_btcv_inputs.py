"""Bad input stops training before any compute, with the file and the problem named."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tests.helpers import SMALL, btcv_workflow, bundle_on_path, error_text, train_until_failure


def _case(folder, name, image, label, affine=None, label_affine=None):
    affine = np.diag([1.5, 1.5, 2.0, 1.0]) if affine is None else affine
    nib.save(nib.Nifti1Image(image.astype(np.float32), affine), folder / f"{name}_img.nii.gz")
    if label is not None:
        nib.save(
            nib.Nifti1Image(label.astype(np.uint8), affine if label_affine is None else label_affine),
            folder / f"{name}_label.nii.gz",
        )
    return {"image": f"{name}_img.nii.gz", "label": f"{name}_label.nii.gz"}


def _good():
    rng = np.random.default_rng(0)
    image = rng.normal(0, 50, (40, 40, 30))
    label = np.zeros((40, 40, 30), np.uint8)
    label[10:20, 10:20, 10:20] = 6
    return image, label


BAD_CASES = {
    "missing file": (
        lambda f: {"image": "nowhere_img.nii.gz", "label": "nowhere_label.nii.gz"},
        "nowhere_img.nii.gz",
        "file not found",
    ),
    "shape mismatch": (
        lambda f: _case(f, "shape", _good()[0], np.zeros((40, 40, 31))),
        "shape_label.nii.gz",
        "differs from image shape",
    ),
    "affine mismatch": (
        lambda f: _case(f, "affine", *_good(), label_affine=np.diag([1.0, 1.5, 2.0, 1.0])),
        "affine_label.nii.gz",
        "label affine differs",
    ),
    "label ids outside 0..13": (
        lambda f: _case(f, "ids", _good()[0], _good()[1] * 3),
        "ids_label.nii.gz",
        "label ids [18] are outside 0..13",
    ),
    "wrong channel count": (
        lambda f: _case(f, "chan", np.zeros((40, 40, 30, 2)), _good()[1]),
        "chan_img.nii.gz",
        "has 2 channel(s), the network expects 1",
    ),
    "non-finite image": (
        lambda f: _case(f, "nan", np.where(_good()[1] > 0, np.nan, _good()[0]), _good()[1]),
        "nan_img.nii.gz",
        "non-finite",
    ),
}


@pytest.mark.parametrize("problem", list(BAD_CASES))
def test_bad_training_input_is_reported_before_training(problem, tmp_path):
    make, culprit, message = BAD_CASES[problem]
    good = _case(tmp_path, "good", *_good())
    bad = make(tmp_path)
    (tmp_path / "datalist.json").write_text(json.dumps({"training": [good, bad], "validation": [good]}))
    with bundle_on_path():
        workflow = btcv_workflow(
            ["train.json"], "train", dataset_dir=str(tmp_path), bundle_root=str(tmp_path / "run"), max_epochs=1, **SMALL
        )
        error, steps = train_until_failure(workflow)
    text = error_text(error)
    assert str(tmp_path / culprit) in text
    assert message in text
    assert "good_img" not in text.split("problem(s) in the input data")[-1]  # the good case is not blamed
    assert steps == []


@pytest.mark.parametrize("bundle", ["btcv", "msd"])
def test_a_bad_validation_case_stops_training_before_the_training_set_is_read(bundle, tmp_path, monkeypatch):
    """Both lists are checked in one step before any dataset is built: the training cases are never cached."""
    from monai.data import CacheDataset

    from tests.helpers import BTCV_DIR, MSD_DIR, MSD_SMALL
    from tools.data.make_msd_tasks import write_msd_task

    cached = []
    monkeypatch.setattr(CacheDataset, "set_data", lambda self, data: cached.append(len(data)))
    if bundle == "btcv":
        bundle_dir, settings = BTCV_DIR, {"dataset_dir": str(tmp_path), **SMALL}
        good = [_case(tmp_path, name, *_good()) for name in ("good1", "good2")]
    else:
        task_dir = write_msd_task(tmp_path, "Task09_Spleen", num_training=2, num_test=0, seed=0, shape=(24, 24, 16))
        bundle_dir, settings = MSD_DIR, {"dataset_dir": str(task_dir), **MSD_SMALL}
        good = json.loads((task_dir / "dataset.json").read_text())["training"]
        tmp_path = task_dir
    (tmp_path / "broken_img.nii.gz").write_bytes(b"not a NIfTI file")
    validation = [good[0], {"image": "broken_img.nii.gz", "label": good[1]["label"]}]
    (tmp_path / "datalist.json").write_text(json.dumps({"training": good, "validation": validation}))
    with bundle_on_path(bundle_dir):
        workflow = btcv_workflow(
            ["train.json"],
            "train",
            bundle_dir,
            datalist=str(tmp_path / "datalist.json"),
            bundle_root=str(tmp_path / "run"),
            max_epochs=1,
            **settings,
        )
        error, steps = train_until_failure(workflow)
    assert steps == [] and cached == []  # no training iteration, and the training set was not even read
    text = error_text(error)
    assert f"validation list (1):\n- {tmp_path / 'broken_img.nii.gz'}: cannot be read as an image" in text
    assert "training list" not in text
    assert not (tmp_path / "run" / "models").exists()
