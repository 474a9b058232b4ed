"""btcv_submission: every defect of a BTCV test-set prediction folder is reported together, and only a
clean folder is zipped (atomically), with the submission names and the predictions' bytes unchanged.

Small fake test images img0061..img0080 (a few voxels, each with its own oblique or flipped affine) and
predictions named as the bundle's inference names them (``img0061_seg.nii.gz``); once, the bundle's real
inference (SMALL sizes, random weights saved in the bundle's format) on a phantom CT named img0061.
"""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from tests.helpers import BTCV_DIR, PHANTOM_SHAPE, PHANTOM_SPACING, REPO, SMALL, bundle_on_path, run_workflow
from tools.data.btcv_datalist import TESTING_IDS
from tools.leaderboard.btcv_submission import SubmissionError, make_submission, submission_name

SHAPE = (6, 5, 4)


def _affine(case_id: int) -> np.ndarray:
    """A different oblique, possibly flipped voxel-to-world affine for each case."""
    rng = np.random.default_rng(case_id)
    angle = rng.uniform(-0.3, 0.3)
    c, s = np.cos(angle), np.sin(angle)
    rotation = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag(rng.choice([-1.0, 1.0], 3))
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(rng.uniform(0.6, 3.0, 3))
    affine[:3, 3] = rng.uniform(-200, 200, 3)
    return affine


def _save(data: np.ndarray, affine: np.ndarray, path: Path) -> Path:
    nib.save(nib.Nifti1Image(data, affine), path)
    return path


@pytest.fixture
def case(tmp_path) -> dict:
    """20 fake test images and a clean prediction folder for them (uint8, ids 0..13, the images' geometry)."""
    images, predictions = tmp_path / "Testing" / "img", tmp_path / "eval"
    images.mkdir(parents=True)
    predictions.mkdir()
    rng = np.random.default_rng(0)
    for case_id in TESTING_IDS:
        affine = _affine(case_id)
        _save(rng.normal(0, 100, SHAPE).astype(np.float32), affine, images / f"img{case_id:04d}.nii.gz")
        labels = rng.integers(0, 14, SHAPE).astype(np.uint8)
        _save(labels, affine, predictions / f"img{case_id:04d}_seg.nii.gz")
    (predictions / "manifest.json").write_text("[]\n")  # the inference's own list: ignored, not zipped
    (predictions / "._img0061_seg.nii.gz").write_bytes(b"macOS resource fork")  # hidden: ignored
    return {"images": images, "predictions": predictions, "zip": tmp_path / "out" / "btcv.zip"}


def _prediction(case: dict, case_id: int) -> Path:
    return case["predictions"] / f"img{case_id:04d}_seg.nii.gz"


def _rewrite(case: dict, case_id: int, data=None, affine=None) -> Path:
    """Replace a prediction's data and/or affine, keeping the rest."""
    path = _prediction(case, case_id)
    old = nib.load(path)
    return _save(np.asanyarray(old.dataobj) if data is None else data, old.affine if affine is None else affine, path)


def missing(case):
    _prediction(case, 62).unlink()
    return [f"missing prediction for test image {case['images'] / 'img0062.nii.gz'}"]


def extra(case):
    stranger = _save(np.zeros(SHAPE, np.uint8), _affine(61), case["predictions"] / "img0081_seg.nii.gz")
    notes = case["predictions"] / "notes.txt"
    notes.write_text("not a prediction")
    return [f"{stranger}: case 81 is not a BTCV test case", f"{notes}: not a prediction"]


def duplicate(case):
    second = case["predictions"] / "label0063.nii.gz"
    shutil.copy(_prediction(case, 63), second)
    return [f"{second}: a second prediction for case 63"]


def wrong_shape(case):
    path = _rewrite(case, 64, data=np.zeros((6, 5, 5), np.uint8))
    return [f"{path}: shape (6, 5, 5) differs"]


def wrong_affine(case):
    affine = _affine(65)
    affine[0, 3] += 1.0  # one millimetre off
    path = _rewrite(case, 65, affine=affine)
    return [f"{path}: affine differs"]


def wrong_dtype(case):
    path = _rewrite(case, 66, data=np.ones(SHAPE, np.int16))
    return [f"{path}: data type int16, expected uint8"]


def id_above_13(case):
    data = np.zeros(SHAPE, np.uint8)
    data[0, 0, 0] = 14
    path = _rewrite(case, 67, data=data)
    return [f"{path}: label values [14] outside the allowed ids 0..13"]


def unreadable(case):
    path = _prediction(case, 68)
    path.write_bytes(gzip.compress(path.read_bytes()[:40]))  # gzip fine, NIfTI header cut short
    return [f"{path}: unreadable NIfTI"]


def float_data(case):
    path = _rewrite(case, 69, data=np.zeros(SHAPE, np.float32))
    return [f"{path}: data type float32 is not an integer type"]


DEFECTS = [missing, extra, duplicate, wrong_shape, wrong_affine, wrong_dtype, id_above_13, unreadable, float_data]


def _rejected(case: dict, expected: list[str]) -> SubmissionError:
    """make_submission fails listing exactly the ``expected`` problems (by their start) and writes nothing."""
    with pytest.raises(SubmissionError) as caught:
        make_submission(str(case["predictions"]), str(case["images"]), str(case["zip"]))
    problems = caught.value.problems
    assert len(problems) == len(expected), problems
    for start in expected:
        assert any(start in line for line in problems), f"{start!r} not in {problems}"
    assert not case["zip"].parent.exists()  # no zip, no temporary file, not even the folder
    return caught.value


def _zip_members(zip_path: Path) -> dict[str, bytes]:
    with zipfile.ZipFile(zip_path) as archive:
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.mark.parametrize("defect", DEFECTS, ids=[d.__name__ for d in DEFECTS])
def test_each_defect_is_caught_naming_its_file(case, defect):
    _rejected(case, defect(case))


def test_all_defects_are_reported_together_and_an_existing_zip_is_kept(case):
    expected = [line for defect in DEFECTS for line in defect(case)]
    case["zip"].parent.mkdir()
    case["zip"].write_bytes(b"previous submission")
    with pytest.raises(SubmissionError) as caught:
        make_submission(str(case["predictions"]), str(case["images"]), str(case["zip"]))
    problems = caught.value.problems
    assert len(problems) == len(expected) == 10, problems
    for start in expected:
        assert any(start in line for line in problems), f"{start!r} not in {problems}"
    assert case["zip"].read_bytes() == b"previous submission"
    assert [p.name for p in case["zip"].parent.iterdir()] == ["btcv.zip"]


@pytest.mark.parametrize("naming", ["label", "image"])
def test_a_clean_folder_is_zipped_under_the_submission_names_with_its_bytes(case, naming):
    summary = make_submission(str(case["predictions"]), str(case["images"]), str(case["zip"]), naming=naming)
    prefix = "label" if naming == "label" else "img"
    names = [f"{prefix}{i:04d}.nii.gz" for i in TESTING_IDS]
    assert summary["num_files"] == 20 and sorted(summary["members"]) == names
    members = _zip_members(case["zip"])
    assert sorted(members) == names
    for case_id in TESTING_IDS:
        assert members[submission_name(case_id, naming)] == _prediction(case, case_id).read_bytes()
    assert [p.name for p in case["zip"].parent.iterdir()] == ["btcv.zip"]  # no temporary file left


def test_test_images_from_a_datalist_and_affines_within_tolerance(case, tmp_path):
    for case_id in (70, 71):  # written as float32 by another tool: within 1e-3 of the image's affine
        _rewrite(case, case_id, affine=_affine(case_id) + 2e-4)
    datalist = tmp_path / "datalist.json"
    testing = [{"image": f"Testing/img/img{i:04d}.nii.gz"} for i in TESTING_IDS[:-1]]
    datalist.write_text(json.dumps({"testing": testing + [str(case["images"] / "img0080.nii.gz")]}))
    assert make_submission(str(case["predictions"]), str(datalist), str(case["zip"]))["num_files"] == 20


def test_missing_or_foreign_test_images_are_problems_too(case, tmp_path):
    (case["images"] / "img0079.nii.gz").unlink()
    shutil.copy(case["images"] / "img0061.nii.gz", case["images"] / "img0001.nii.gz")
    error = _rejected(
        case,
        [
            f"{case['images'] / 'img0001.nii.gz'}: not a BTCV test image",
            f"{case['images']}: test images missing: img0079.nii.gz",
        ],
    )
    assert "missing prediction" not in str(error)  # the prediction of 79 exists; its image does not
    datalist = tmp_path / "broken.json"
    datalist.write_text("{")
    with pytest.raises(SubmissionError, match="broken.json: neither a folder"):
        make_submission(str(case["predictions"]), str(datalist), str(case["zip"]))


def test_an_unknown_naming_is_refused_before_any_check(case):
    with pytest.raises(ValueError, match="naming must be one of"):
        make_submission(str(case["predictions"]), str(case["images"]), str(case["zip"]), naming="case")


def test_command_line_zips_a_clean_folder_and_exits_non_zero_listing_problems(case):
    cmd = [sys.executable, "-m", "tools", "btcv_submission", "--prediction_dir", str(case["predictions"])]
    cmd += ["--test_images", str(case["images"]), "--zip_path", str(case["zip"])]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["num_files"] == 20 and zipfile.is_zipfile(case["zip"])
    case["zip"].unlink()
    expected = wrong_dtype(case) + missing(case)
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "2 problem(s)" in done.stderr and all(line in done.stderr for line in expected), done.stderr
    assert not case["zip"].exists()


def test_the_bundles_own_inference_output_goes_through(case, tmp_path):
    """img0061 is a phantom CT run through the BTCV bundle's inference (SMALL; random weights, the bundle's format)."""
    from tools.data.make_phantoms import make_phantom

    image, _, affine = make_phantom(61, shape=PHANTOM_SHAPE, spacing=PHANTOM_SPACING)
    phantom = _save(image, affine, case["images"] / "img0061.nii.gz")
    single, out = tmp_path / "single", tmp_path / "bundle_out"
    single.mkdir()
    shutil.copy(phantom, single / phantom.name)
    overrides = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size", "num_workers")}
    with bundle_on_path(BTCV_DIR):
        from monai.bundle import ConfigParser

        parser = ConfigParser()
        parser.read_config(str(BTCV_DIR / "configs" / "inference.json"))
        parser.update({"bundle_root": str(BTCV_DIR), "ckpt_path": "", "patch_merging": "current", **overrides})
        torch.manual_seed(0)
        weights = parser.get_parsed_content("network_def").state_dict()  # as training writes model.pt
    ckpt = tmp_path / "model.pt"
    torch.save(weights, ckpt)
    run_workflow(
        ["inference.json"], "infer", dataset_dir=str(single), output_dir=str(out), ckpt_path=str(ckpt), **overrides
    )
    written = out / "img0061_seg.nii.gz"
    assert sorted(p.name for p in out.iterdir()) == ["img0061_seg.nii.gz", "manifest.json"]
    shutil.copy(written, _prediction(case, 61))
    make_submission(str(case["predictions"]), str(case["images"]), str(case["zip"]))
    assert _zip_members(case["zip"])["label0061.nii.gz"] == written.read_bytes()
