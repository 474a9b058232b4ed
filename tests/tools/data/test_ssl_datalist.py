"""tools.data.ssl_datalist: volume discovery (files, DICOM series), presets, seeded split, CLI."""

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from tools.data.make_dicom_series import write_dicom_series
from tools.data.make_phantoms import make_phantom
from tools.data.ssl_datalist import (
    PRESETS,
    CorpusError,
    build_datalist,
    find_volumes,
    main,
    parse_dataset_arg,
    write_datalist,
)

REPO = Path(__file__).resolve().parents[3]
SHAPE = (32, 32, 24)
SPACING = (1.5, 1.5, 2.0)
AFFINE = np.diag([*SPACING, 1.0])  # right-handed, as a DICOM series needs


WHY_NOT_A_VOLUME = "neither a volume file (.nii.gz, .nii, .mhd, .nrrd) nor a DICOM file"


def small_ct(seed: int = 0) -> np.ndarray:
    """A small phantom CT volume (HU, float32), shape SHAPE."""
    return make_phantom(seed, shape=SHAPE, spacing=SPACING)[0]


def write_nifti(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.rint(small_ct(seed)).astype(np.int16), AFFINE), path)
    return path


def write_series(folder: Path, seed: int = 0, modality: str = "CT") -> Path:
    write_dicom_series(small_ct(seed), AFFINE, str(folder))
    if modality != "CT":
        for f in folder.glob("*.dcm"):
            ds = pydicom.dcmread(f)
            ds.Modality = modality
            ds.save_as(f)
    return folder


def touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory) -> Path:
    """One CT DICOM series written once, copied by tests that need one."""
    return write_series(tmp_path_factory.mktemp("series") / "ct")


def copy_series(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# --------------------------------------------------------------------------------- discovery + loading


def test_dicom_folder_and_nifti_folder_give_a_datalist_monai_loads(tmp_path, series_dir):
    from monai.data import load_decathlon_datalist
    from monai.transforms import LoadImage, LoadImaged

    dicom_root, nifti_root = tmp_path / "dicom_set", tmp_path / "nifti_set"
    copy_series(series_dir, dicom_root / "patient1" / "study" / "series")
    write_nifti(nifti_root / "a.nii.gz", seed=1)
    write_nifti(nifti_root / "sub" / "b.nii", seed=2)
    touch(nifti_root / "notes.txt")

    out = tmp_path / "datalist.json"
    written = write_datalist({"dcm": str(dicom_root), "nii": str(nifti_root)}, out, val_fraction=0.5, seed=0)
    items = written["training"] + written["validation"]
    assert sorted(i["image"] for i in items) == sorted(
        [
            str(dicom_root / "patient1" / "study" / "series"),
            str(nifti_root / "a.nii.gz"),
            str(nifti_root / "sub" / "b.nii"),
        ]
    )
    assert {i["dataset"] for i in items} == {"dcm", "nii"}
    meta = written["metadata"]
    assert meta["datasets"]["nii"]["num_volumes"] == 2 and meta["datasets"]["dcm"]["num_volumes"] == 1
    assert meta["seed"] == 0 and meta["val_fraction"] == 0.5

    loaded = load_decathlon_datalist(str(out), False, "training", str(tmp_path)) + load_decathlon_datalist(
        str(out), False, "validation", str(tmp_path)
    )
    assert len(loaded) == 3
    load = LoadImaged(keys="image", image_only=True)
    for item in loaded:
        image = load(dict(item))["image"]
        assert tuple(image.shape) == SHAPE, item
    # the DICOM folder through ITK explicitly: same voxels as written
    dicom = LoadImage(reader="ITKReader", image_only=True)(str(dicom_root / "patient1" / "study" / "series"))
    assert tuple(dicom.shape) == SHAPE
    assert np.allclose(np.asarray(dicom), np.rint(small_ct(0)))


def test_extensionless_dicom_files_are_found_by_magic_and_other_files_named_in_the_log(tmp_path, series_dir, caplog):
    folder = copy_series(series_dir, tmp_path / "set" / "S1")
    for f in sorted(folder.glob("*.dcm")):
        f.rename(f.with_suffix(""))  # slice0000
    (tmp_path / "set" / "LICENSE").write_text("not dicom\n" * 20)
    (folder / "annotation.xml").write_text("<xml/>")
    (folder / ".DS_Store").write_bytes(b"hidden")  # hidden files are not reported
    with caplog.at_level("WARNING", logger="tools.data.ssl_datalist"):
        assert find_volumes(tmp_path / "set") == [str(folder)]
    why = WHY_NOT_A_VOLUME
    assert sorted(r.getMessage() for r in caplog.records) == [
        f"{tmp_path / 'set'}: skipping LICENSE ({why})",
        f"{tmp_path / 'set'}: skipping S1/annotation.xml ({why})",
    ]


def test_two_datasets_with_the_same_file_names_give_distinct_entries(tmp_path):
    for name in ("hnscc", "colon"):
        for i in range(3):
            touch(tmp_path / name / "images" / f"img_{i}.nii.gz")
    dl = build_datalist({"hnscc": str(tmp_path / "hnscc"), "colon": str(tmp_path / "colon")}, val_fraction=0.0)
    images = [i["image"] for i in dl["training"]]
    assert len(images) == len(set(images)) == 6 and dl["validation"] == []
    assert {(Path(i["image"]).parts[-3], i["dataset"]) for i in dl["training"]} == {
        ("hnscc", "hnscc"),
        ("colon", "colon"),
    }
    assert all(os.path.isabs(p) for p in images)


def test_relative_to_writes_paths_that_load_decathlon_datalist_resolves(tmp_path):
    from monai.data import load_decathlon_datalist

    for i in range(4):
        touch(tmp_path / "data" / "luna" / f"subset{i % 2}" / f"scan{i}.mhd")
    out_dir = tmp_path / "lists"
    dl = write_datalist(
        {"luna": (str(tmp_path / "data" / "luna"), "luna16")},
        out_dir / "d.json",
        val_fraction=0.25,
        seed=1,
        relative_to=out_dir,
    )
    assert all(not os.path.isabs(i["image"]) and i["image"].startswith("..") for i in dl["training"])
    loaded = load_decathlon_datalist(str(out_dir / "d.json"), False, "training", str(out_dir))
    assert len(loaded) == 3 and all(os.path.isfile(i["image"]) for i in loaded)


def test_overlapping_base_dirs_are_an_error(tmp_path):
    touch(tmp_path / "all" / "luna" / "a.nii.gz")
    with pytest.raises(CorpusError, match="listed twice"):
        build_datalist({"all": str(tmp_path / "all"), "luna": str(tmp_path / "all" / "luna")})


# ------------------------------------------------------------------------------------------------ split


def fake_sets(root: Path, sizes: dict) -> dict:
    for name, n in sizes.items():
        for i in range(n):
            touch(root / name / f"vol{i:03d}.nii.gz")
    return {name: str(root / name) for name in sizes}


def test_split_is_seeded_reproducible_and_stratified(tmp_path):
    sets = fake_sets(tmp_path, {"a": 40, "b": 20, "c": 1})
    first = build_datalist(sets, val_fraction=0.1, seed=3)
    assert build_datalist(sets, val_fraction=0.1, seed=3) == first
    per_set = {name: sum(i["dataset"] == name for i in first["validation"]) for name in sets}
    assert per_set == {"a": 4, "b": 2, "c": 0}
    meta = first["metadata"]["datasets"]
    assert {n: (m["num_training"], m["num_validation"]) for n, m in meta.items()} == {
        "a": (36, 4),
        "b": (18, 2),
        "c": (1, 0),
    }
    train = {i["image"] for i in first["training"]}
    val = {i["image"] for i in first["validation"]}
    assert not train & val and len(train | val) == 61
    assert first["training"] == sorted(first["training"], key=lambda i: (i["dataset"], i["image"]))
    others = [build_datalist(sets, val_fraction=0.1, seed=s)["validation"] for s in (4, 5, 6)]
    assert any(o != first["validation"] for o in others)


def test_at_least_one_validation_item_and_not_all(tmp_path):
    sets = fake_sets(tmp_path, {"a": 2})
    dl = build_datalist(sets, val_fraction=0.05, seed=0)
    assert len(dl["validation"]) == 1 and len(dl["training"]) == 1
    singles = fake_sets(tmp_path / "singles", {"x": 1, "y": 1})
    dl = build_datalist(singles, val_fraction=0.05, seed=0)
    assert len(dl["validation"]) == 1 and len(dl["training"]) == 1
    assert build_datalist(sets, val_fraction=0.0)["validation"] == []


def test_adding_a_dataset_leaves_the_other_split_unchanged(tmp_path):
    sets = fake_sets(tmp_path, {"a": 30, "b": 10})
    both = build_datalist(sets, val_fraction=0.2, seed=9)
    alone = build_datalist({"a": sets["a"]}, val_fraction=0.2, seed=9)
    assert [i for i in both["validation"] if i["dataset"] == "a"] == alone["validation"]


# ----------------------------------------------------------------------------------------------- errors


def test_folder_with_two_series_is_an_error_naming_it(tmp_path, series_dir):
    mixed = copy_series(series_dir, tmp_path / "set" / "mixed")
    other = write_series(tmp_path / "other", seed=5)
    for f in sorted(other.glob("*.dcm"))[:3]:
        shutil.copy(f, mixed / f"b_{f.name}")
    with pytest.raises(CorpusError) as err:
        find_volumes(tmp_path / "set")
    assert str(mixed) in str(err.value) and "2 series" in str(err.value)
    assert isinstance(err.value, ValueError)


def test_dataset_without_volumes_is_an_error_naming_the_base_dir(tmp_path):
    empty = tmp_path / "empty"
    touch(empty / "readme.txt")
    with pytest.raises(CorpusError, match=str(empty)):
        build_datalist({"empty": str(empty)})
    with pytest.raises(CorpusError, match="does not exist"):
        find_volumes(tmp_path / "missing")
    touch(tmp_path / "luna" / "a.nii.gz")  # volumes, but not in the LUNA16 layout
    with pytest.raises(CorpusError, match="no volumes found"):
        find_volumes(tmp_path / "luna", "luna16")


def test_unknown_preset_and_bad_arguments_are_errors(tmp_path):
    with pytest.raises(CorpusError, match="unknown preset"):
        find_volumes(tmp_path, "luna17")
    with pytest.raises(CorpusError, match="name=base_dir"):
        parse_dataset_arg("/data/luna")
    assert parse_dataset_arg("luna:LUNA16=/d/x=y") == ("luna", "/d/x=y", "LUNA16")
    sets = fake_sets(tmp_path, {"a": 3})
    with pytest.raises(CorpusError, match="val_fraction"):
        build_datalist(sets, val_fraction=1.0)


# ---------------------------------------------------------------------------------------------- presets


def test_nbia_layout_keeps_ct_series_and_warns_about_the_others(tmp_path, series_dir, caplog):
    root = tmp_path / "manifest-1" / "HNSCC"
    study = root / "HNSCC-01-0001" / "12-05-1998-NA-RT SIMULATION-43582"
    ct = copy_series(series_dir, study / "2.000000-CT-18213")
    rtstruct = write_series(study / "1.000000-RTSTRUCT-11111", seed=1, modality="RTSTRUCT")
    seg = write_series(root / "HNSCC-01-0002" / "study" / "300.000000-Segmentation-9", seed=2, modality="SEG")
    (root / "LICENSE").write_text("licence text\n" * 20)
    with caplog.at_level(logging.WARNING, logger="tools.data.ssl_datalist"):
        found = find_volumes(tmp_path / "manifest-1", "hnscc")
    assert found == [str(ct)]
    warned = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert str(rtstruct) in warned and "RTSTRUCT" in warned
    assert str(seg) in warned and "SEG" in warned
    # all modalities kept on request
    assert len(find_volumes(tmp_path / "manifest-1", "lidc-idri", modalities="any")) == 3


def test_luna16_preset_finds_subset_mhd_files_only(tmp_path, caplog):
    import itk
    from monai.transforms import LoadImage

    root = tmp_path / "LUNA16"
    array = np.rint(small_ct(0)).astype(np.int16)
    image = itk.image_from_array(np.ascontiguousarray(array.transpose(2, 1, 0)))  # itk wants (z, y, x)
    image.SetSpacing(SPACING)
    uid = "1.3.6.1.4.1.14519.5.2.1.6279.6001.{}"
    wanted = []
    for subset, n in (("subset0", 2), ("subset1", 1)):
        for i in range(n):
            path = root / subset / (uid.format(f"{subset[-1]}{i}") + ".mhd")
            path.parent.mkdir(parents=True, exist_ok=True)
            itk.imwrite(image, str(path))
            wanted.append(str(path))
    masks = root / "seg-lungs-LUNA16"
    masks.mkdir()
    itk.imwrite(image, str(masks / (uid.format("00") + ".mhd")))
    (root / "annotations.csv").write_text("seriesuid,coordX\n")

    found = find_volumes(root, "luna16")
    assert found == sorted(wanted)
    assert all(os.path.isfile(p[:-4] + ".raw") or os.path.isfile(p[:-4] + ".zraw") for p in found)
    with caplog.at_level("WARNING", logger="tools.data.ssl_datalist"):
        assert len(find_volumes(root)) == 4  # without the preset the lung masks come too
    # the voxel files of the .mhd headers are read through them; the CSV is named
    assert [r.getMessage() for r in caplog.records] == [f"{root}: skipping annotations.csv ({WHY_NOT_A_VOLUME})"]
    assert tuple(LoadImage(image_only=True)(found[0]).shape) == SHAPE


def test_covid19_preset_skips_label_files_and_says_so(tmp_path, caplog):
    root = tmp_path / "covid"
    names = [
        "volume-covid19-A-0003.nii.gz",
        "volume-covid19-A-0011_ct.nii.gz",
        "volume-covid19-A-0011_seg.nii.gz",
        "volume-covid19-A-0721_day008.nii.gz",
        "other.nii.gz",
    ]
    for n in names:
        touch(root / "data" / n)
    with caplog.at_level("WARNING", logger="tools.data.ssl_datalist"):
        found = [os.path.basename(p) for p in find_volumes(root, "tcia_covid19")]
    assert [r.getMessage() for r in caplog.records] == [
        f"{root}: skipping data/volume-covid19-A-0011_seg.nii.gz (excluded by preset tcia_covid19: *_seg.nii.gz)"
    ]
    assert found == [
        "volume-covid19-A-0003.nii.gz",
        "volume-covid19-A-0011_ct.nii.gz",
        "volume-covid19-A-0721_day008.nii.gz",
    ]


def test_presets_cover_the_five_paper_datasets():
    assert set(PRESETS) == {"luna16", "tcia_covid19", "hnscc", "tcia_colonography", "lidc_idri"}
    assert {p.kind for p in PRESETS.values()} == {"files", "dicom"}


# -------------------------------------------------------------------------------------------------- CLI


def test_main_in_process_writes_json(tmp_path, capsys):
    sets = fake_sets(tmp_path / "data", {"a": 5, "b": 4})
    out = tmp_path / "out" / "ssl.json"
    main(f"a={sets['a']}", f"b:={sets['b']}", output=str(out), val_fraction=0.25, seed=2)
    data = json.loads(out.read_text())
    assert len(data["training"]) + len(data["validation"]) == 9
    assert data["metadata"]["datasets"]["b"]["preset"] is None
    assert "ssl.json" in capsys.readouterr().out
    with pytest.raises(CorpusError, match="given twice"):
        main(f"a={sets['a']}", f"a={sets['b']}", output=str(out))


def test_cli_module_writes_json_relative_to(tmp_path):
    for i in range(3):
        touch(tmp_path / "LUNA16" / "subset0" / f"s{i}.mhd")
    touch(tmp_path / "LUNA16" / "seg-lungs-LUNA16" / "s0.mhd")
    out = tmp_path / "ssl.json"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools",
            "ssl_datalist",
            f"luna:luna16={tmp_path / 'LUNA16'}",
            "--output",
            str(out),
            "--val_fraction",
            "0.34",
            "--seed",
            "7",
            "--relative_to",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    data = json.loads(out.read_text())
    images = sorted(i["image"] for i in data["training"] + data["validation"])
    assert images == [f"LUNA16/subset0/s{i}.mhd" for i in range(3)]
    assert len(data["validation"]) == 1
    assert data["metadata"]["datasets"]["luna"] == {
        "base_dir": str(tmp_path / "LUNA16"),
        "preset": "luna16",
        "num_volumes": 3,
        "num_training": 2,
        "num_validation": 1,
    }
    assert data["metadata"]["seed"] == 7 and data["metadata"]["val_fraction"] == 0.34
