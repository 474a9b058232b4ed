"""Bad-input catalogue: every damaged input stops the run before any compute, names its file, and loses nothing.

Each case builds its data (DICOM series with ``tools/data/make_dicom_series.py``, then damaged; NIfTI
phantoms; checkpoints; datalists), runs the bundle as a user would, and checks the error text
(file and problem named), that the network never ran (``SwinUNETR.forward`` is watched) and that
files already in the output folder are unchanged. The good cases next to them (non-image objects
beside a series, an empty SeriesInstanceUID, UID-named folders, same-named files) run and are
checked for their output names and manifest.
"""

from __future__ import annotations

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
import torch
from monai.networks.nets import SwinUNETR
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from tests.helpers import (
    BTCV_DIR,
    MSD_DIR,
    MSD_INFER_SMALL,
    SMALL,
    SSL_DIR,
    btcv_workflow,
    bundle_on_path,
    error_text,
    recorded,
    run_workflow,
)
from tools.common.bundles import bundle_command
from tools.data.make_dicom_series import write_dicom_series
from tools.data.make_phantoms import make_phantom

INFER_SMALL = {k: SMALL[k] for k in ("feature_size", "roi_size", "sw_batch_size", "num_workers")}
SHAPE, SPACING = (40, 40, 20), (1.5, 1.5, 3.0)
RT_STRUCT = "1.2.840.10008.5.1.4.1.1.481.3"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
UIDS = ("1.3.6.1.4.1.9328.50.1.10", "1.3.6.1.4.1.9328.50.1.11")


# ------------------------------------------------------------------------------------------- builders


def _phantom(seed: int) -> tuple[np.ndarray, np.ndarray]:
    image, _, affine = make_phantom(seed, shape=SHAPE, spacing=SPACING)
    if np.linalg.det(affine[:3, :3]) < 0:  # a DICOM series stacks slices along the right-handed normal
        affine[:, 2] *= -1
    return image, affine


@pytest.fixture(scope="module")
def series(tmp_path_factory) -> Path:
    """One CT series (20 slices 3 mm apart), written once; tests copy it."""
    image, affine = _phantom(3)
    folder = tmp_path_factory.mktemp("series") / "ct"
    write_dicom_series(image, affine, str(folder))
    return folder


def copy_series(series: Path, dst: Path) -> Path:
    shutil.copytree(series, dst)
    return dst


def slices(folder: Path) -> list[Path]:
    return sorted(folder.glob("slice*.dcm"))


def add_object(
    folder: Path, name: str, sop_class: str, modality: str, series_uid: str | None = None, pixels: bool = False
) -> Path:
    """A non-image object beside the slices: an RT structure set (no pixels) or a SEG (with pixel frames)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = folder / name
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, meta.MediaStorageSOPInstanceUID, modality
    ds.StudyInstanceUID = pydicom.dcmread(slices(folder)[0]).StudyInstanceUID
    ds.SeriesInstanceUID = series_uid or generate_uid()
    if pixels:
        ds.Rows = ds.Columns = 8
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.NumberOfFrames = 1, "MONOCHROME2", 2
        ds.BitsAllocated = ds.BitsStored = 8
        ds.HighBit, ds.PixelRepresentation = 7, 0
        ds.PixelData = bytes(128)
    pydicom.dcmwrite(str(path), ds, enforce_file_format=True)
    return path


def truncate(path: Path, keep: int) -> Path:
    path.write_bytes(path.read_bytes()[:keep])
    return path


def save_nifti(path: Path, seed: int) -> Path:
    image, affine = _phantom(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.rint(image).astype(np.int16), affine), str(path))
    return path


def random_checkpoint(path: Path, out_channels: int = 14, in_channels: int = 1) -> Path:
    torch.manual_seed(0)
    network = SwinUNETR(in_channels=in_channels, out_channels=out_channels, feature_size=SMALL["feature_size"])
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": recorded(network.state_dict())}, str(path))
    return path


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return random_checkpoint(tmp_path_factory.mktemp("ckpt") / "model.pt")


@pytest.fixture
def forward_calls(monkeypatch) -> list:
    """Every call of ``SwinUNETR.forward`` in this test (the network is the compute)."""
    calls, forward = [], SwinUNETR.forward

    def watched(self, *args, **kwargs):
        calls.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(SwinUNETR, "forward", watched)
    return calls


@pytest.fixture
def out_dir(tmp_path) -> Path:
    """The output folder, holding an earlier result that must survive every failed run."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_seg.nii.gz").write_bytes(b"an earlier result")
    return out


def assert_nothing_lost(out: Path) -> None:
    assert sorted(p.name for p in out.iterdir()) == ["earlier_seg.nii.gz"]
    assert (out / "earlier_seg.nii.gz").read_bytes() == b"an earlier result"


def infer_fails(out: Path, ckpt: Path, calls: list, **overrides) -> str:
    """Run BTCV inference, expecting an error before any forward; return the error text."""
    with pytest.raises(Exception) as info:
        run_workflow(
            ["inference.json"], "infer", ckpt_path=str(ckpt), output_dir=str(out), **{**INFER_SMALL, **overrides}
        )
    assert calls == [], "the network ran before the error"
    return error_text(info.value)


# -------------------------------------------------------------------------------------- DICOM damage


def _truncated_slice(folder: Path) -> tuple[list[str], str]:
    victim = truncate(slices(folder)[7], 600)
    return [str(folder), str(victim)], "truncated"


def _cut_pixel_data(folder: Path) -> tuple[list[str], str]:
    victim = slices(folder)[4]
    truncate(victim, victim.stat().st_size - 100)
    return [str(folder), str(victim)], "truncated"


def _removed_slice(folder: Path) -> tuple[list[str], str]:
    files = slices(folder)
    files[10].unlink()
    return [str(folder), str(files[9]), str(files[11])], "missing"


def _second_series(folder: Path) -> tuple[list[str], str]:
    other = folder.parent / "other"
    write_dicom_series(*_phantom(5), str(other))
    for f in slices(other)[:3]:
        shutil.copy(f, folder / f"b_{f.name}")
    shutil.rmtree(other)
    return [str(folder), "2 series", "3 file(s)", "20 file(s)"], "one folder must hold one series"


def _only_non_image(folder: Path) -> tuple[list[str], str]:
    add_object(folder, "rtstruct.dcm", RT_STRUCT, "RTSTRUCT")
    for f in slices(folder):
        f.unlink()
    return [str(folder), "RTSTRUCT rtstruct.dcm"], "no image slices"


@pytest.mark.parametrize("damage", [_truncated_slice, _cut_pixel_data, _removed_slice, _second_series, _only_non_image])
def test_damaged_dicom_series_stops_inference_before_compute(damage, series, ckpt, out_dir, tmp_path, forward_calls):
    inputs = tmp_path / "inputs"
    save_nifti(inputs / "good.nii.gz", seed=1)  # checked too, but not the problem
    names, problem = damage(copy_series(series, inputs / "series_a"))
    text = infer_fails(out_dir, ckpt, forward_calls, dataset_dir=str(inputs))
    for name in names:
        assert name in text, (name, text)
    assert problem in text
    assert "good.nii.gz" not in text
    assert_nothing_lost(out_dir)


# --------------------------------------------------------- good inputs that used to go wrong, and overwrite


@pytest.fixture
def tricky_inputs(series, tmp_path) -> dict:
    """UID-named series folders (one with RTSTRUCT and SEG objects, one anonymised), same-named NIfTI files."""
    root = tmp_path / "tricky"
    with_objects = copy_series(series, root / "uids" / UIDS[0])
    add_object(with_objects, "rtstruct.dcm", RT_STRUCT, "RTSTRUCT")
    add_object(with_objects, "seg.dcm", SEGMENTATION, "SEG", series_uid="1.1", pixels=True)  # GDCM lists it first
    anonymised = copy_series(series, root / "uids" / UIDS[1])
    for f in slices(anonymised):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.save_as(f)
    same_named = [save_nifti(root / folder / "ct.nii.gz", seed) for seed, folder in ((1, "p1"), (2, "p2"))]
    images = [with_objects, anonymised, *same_named]
    datalist = root / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(p.relative_to(root))} for p in images]}))
    expected = {
        str(images[0]): f"{UIDS[0]}_seg.nii.gz",
        str(images[1]): f"{UIDS[1]}_seg.nii.gz",
        str(images[2]): "p1_ct_seg.nii.gz",
        str(images[3]): "p2_ct_seg.nii.gz",
    }
    return {"root": root, "datalist": datalist, "expected": expected}


def test_outputs_are_distinct_named_after_the_input_and_never_overwritten_unasked(
    tricky_inputs, ckpt, tmp_path, forward_calls, caplog
):
    root, expected = tricky_inputs["root"], tricky_inputs["expected"]
    out = tmp_path / "predictions"
    settings = dict(
        dataset_dir=str(root),
        datalist=str(tricky_inputs["datalist"]),
        ckpt_path=str(ckpt),
        output_dir=str(out),
        **INFER_SMALL,
    )
    with bundle_on_path(BTCV_DIR):
        workflow = btcv_workflow(["inference.json"], "infer", **settings)
        bundle_logger = logging.getLogger("swin_unetr_btcv_seg")  # the config's logging set-up happened above
        bundle_logger.disabled = False
        bundle_logger.addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger="swin_unetr_btcv_seg")
        try:
            workflow.initialize()
            workflow.run()
            workflow.finalize()
        finally:
            bundle_logger.removeHandler(caplog.handler)
    assert sorted(p.name for p in out.iterdir()) == sorted([*expected.values(), "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert {e["input"]: Path(e["output"]).name for e in manifest} == expected
    assert all(Path(e["output"]).is_file() for e in manifest)
    for source, name in list(expected.items())[:2]:  # the CT series was read, not the SEG beside it
        assert nib.load(out / name).shape == SHAPE, source
    log = caplog.text
    assert "RTSTRUCT rtstruct.dcm" in log and "SEG seg.dcm" in log
    assert len(forward_calls) >= 4
    written = {p.name: p.read_bytes() for p in out.iterdir()}

    forward_calls.clear()
    with pytest.raises(Exception) as info:
        run_workflow(["inference.json"], "infer", **settings)
    text = error_text(info.value)
    assert "overwrite" in text and all(str(out / name) in text for name in expected.values())
    assert forward_calls == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == written

    run_workflow(["inference.json"], "infer", **settings, overwrite=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(Path(e["output"]).name for e in manifest) == sorted(expected.values())  # replaced, not doubled


def test_an_input_listed_twice_is_an_error_naming_it(tmp_path, ckpt, out_dir, forward_calls):
    image = save_nifti(tmp_path / "a" / "ct.nii.gz", 1)
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [str(image), str(image)]}))
    text = infer_fails(out_dir, ckpt, forward_calls, dataset_dir=str(tmp_path), datalist=str(datalist))
    assert f"would be written by 2 inputs ({image}, {image})" in text
    assert_nothing_lost(out_dir)


def test_msd_predictions_keep_the_decathlon_names_with_a_manifest_and_no_overwrite(tmp_path, forward_calls):
    from tools.data.make_msd_tasks import write_msd_task
    from tools.leaderboard.msd_submission import make_submission

    task = "Task09_Spleen"
    task_dir = write_msd_task(tmp_path / "msd", task, num_training=1, num_test=2, seed=0, shape=(40, 40, 24))
    ckpt = random_checkpoint(tmp_path / "models" / "model.pt", out_channels=2)
    out = tmp_path / "predictions" / task
    settings = dict(task=task, dataset_dir=str(task_dir), ckpt_path=str(ckpt), output_dir=str(out), **MSD_INFER_SMALL)
    run_workflow(["inference.json"], "infer", MSD_DIR, **settings)
    tests = sorted(p.name for p in (task_dir / "imagesTs").glob("*.nii.gz"))
    assert sorted(p.name for p in out.iterdir()) == sorted([*tests, "manifest.json"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted((Path(e["input"]).name, Path(e["output"]).name) for e in manifest) == [(n, n) for n in tests]
    summary = make_submission([str(out)], str(tmp_path / "submission.zip"), data_root=str(tmp_path / "msd"))
    assert summary["num_files"] == len(tests)  # the manifest is not a prediction

    forward_calls.clear()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(Exception) as info:
        run_workflow(["inference.json"], "infer", MSD_DIR, **settings)
    assert str(out / tests[0]) in error_text(info.value) and forward_calls == []
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    truncate(ckpt, ckpt.stat().st_size // 2)
    with pytest.raises(Exception) as info:
        run_workflow(["inference.json"], "infer", MSD_DIR, **{**settings, "output_dir": str(tmp_path / "other")})
    assert str(ckpt) in error_text(info.value) and "truncated" in error_text(info.value)
    assert forward_calls == []


def test_every_entry_of_an_input_folder_that_is_not_an_image_is_named_in_the_log(series, ckpt, tmp_path, caplog):
    inputs = tmp_path / "inputs"
    good = save_nifti(inputs / "good.nii.gz", seed=1)
    with_notes = copy_series(series, inputs / "series_a")
    (with_notes / "notes.txt").write_text("contrast phase: venous")
    (inputs / "thumbnails").mkdir()
    (inputs / "thumbnails" / "good.png").write_bytes(b"png")
    others = ["notes.txt", "preview.png", *(f"export_{n}.csv" for n in range(5))]  # more than 5: one line
    for name in [*others, ".DS_Store"]:  # hidden files are not reported
        (inputs / name).write_text("not an image")
    settings = dict(dataset_dir=str(inputs), ckpt_path=str(ckpt), output_dir=str(tmp_path / "out"), **INFER_SMALL)
    with bundle_on_path(BTCV_DIR):
        workflow = btcv_workflow(["inference.json"], "infer", **settings)
        bundle_logger = logging.getLogger("swin_unetr_btcv_seg")  # the config's logging set-up happened above
        bundle_logger.disabled = False
        bundle_logger.addHandler(caplog.handler)
        caplog.set_level(logging.INFO, logger="swin_unetr_btcv_seg")
        try:
            workflow.initialize()
            items = workflow.parser.get_parsed_content("dataset#data")  # the inputs, checked before compute
        finally:
            bundle_logger.removeHandler(caplog.handler)
    assert [item["image"] for item in items] == [str(good), str(with_notes)]
    skipped = sorted(r.getMessage() for r in caplog.records if "skipping" in r.getMessage())
    assert skipped == [
        f"{with_notes}: skipping notes.txt (not a DICOM file)",
        f"{inputs}: skipping 7 entries (not an image file (.nii.gz, .nii, .nrrd, .mha, .mhd)): "
        "export_0.csv, export_1.csv, export_2.csv, export_3.csv, export_4.csv, ... (2 more)",
        f"{inputs}: skipping thumbnails (a folder without DICOM files)",
    ]


# ------------------------------------------------------------------------------ checkpoints and datalists


@pytest.mark.parametrize("patch_merging", ["auto", "current"])
def test_truncated_checkpoint_is_named_before_compute(patch_merging, ckpt, tmp_path, out_dir, forward_calls):
    broken = tmp_path / "model.pt"
    broken.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    inputs = tmp_path / "inputs"
    save_nifti(inputs / "good.nii.gz", seed=1)
    text = infer_fails(out_dir, broken, forward_calls, dataset_dir=str(inputs), patch_merging=patch_merging)
    assert str(broken) in text and "truncated" in text
    assert_nothing_lost(out_dir)


@pytest.mark.parametrize(
    ("knob", "name"), [("pretrained_path", "model_swinvit.pt"), ("resume_from", "checkpoint_epoch=3.pt")]
)
def test_truncated_weights_given_to_training_are_named_before_training(
    knob, name, phantom_dir, ckpt, tmp_path, forward_calls
):
    broken = tmp_path / name
    broken.write_bytes(ckpt.read_bytes()[:5000])
    with pytest.raises(Exception) as info:
        run_workflow(
            ["train.json"],
            "train",
            dataset_dir=str(phantom_dir),
            datalist=str(phantom_dir / "datalist.json"),
            bundle_root=str(tmp_path / "run"),
            max_epochs=1,
            **{knob: str(broken)},
            **SMALL,
        )
    text = error_text(info.value)
    assert str(broken) in text and "truncated" in text
    assert forward_calls == [] and not (tmp_path / "run" / "models").exists()


def test_truncated_ssl_checkpoint_is_named_at_export(ckpt, tmp_path):
    broken = tmp_path / "model.pt"
    broken.write_bytes(ckpt.read_bytes()[:5000])
    with bundle_on_path(SSL_DIR):
        from scripts.export import build_from_checkpoint

        with pytest.raises(ValueError, match="truncated") as info:
            build_from_checkpoint(str(broken))
    assert str(broken) in str(info.value)


BROKEN_JSON = '{\n  "training": [\n    {"image": "a.nii.gz", "label": "b.nii.gz"},\n  ]\n}\n'


@pytest.mark.parametrize("workflow", ["train", "infer", "ssl_train"])
def test_datalist_with_a_json_syntax_error_is_named_with_its_line(
    workflow, phantom_dir, ckpt, tmp_path, out_dir, forward_calls
):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(BROKEN_JSON)
    common = dict(dataset_dir=str(phantom_dir), datalist=str(datalist), bundle_root=str(tmp_path / "run"))
    with pytest.raises(Exception) as info:
        if workflow == "train":
            run_workflow(["train.json"], "train", max_epochs=1, **common, **SMALL)
        elif workflow == "ssl_train":
            run_workflow(["train.json"], "train", SSL_DIR, num_steps=1, **common)
        else:
            run_workflow(
                ["inference.json"], "infer", ckpt_path=str(ckpt), output_dir=str(out_dir), **common, **INFER_SMALL
            )
    text = error_text(info.value)
    assert f"{datalist}: datalist is not valid JSON" in text and "line 4" in text
    assert forward_calls == []
    assert_nothing_lost(out_dir)


# ------------------------------------------------------------------------------------- tools.data.ssl_datalist


def test_ssl_datalist_reports_every_damaged_series_at_once_and_keeps_the_good_ones(series, tmp_path, caplog):
    from tools.data.ssl_datalist import CorpusError, find_volumes, write_datalist

    a, b = tmp_path / "set_a", tmp_path / "set_b"
    with_objects = copy_series(series, a / "patient1" / "ct")
    add_object(with_objects, "rtstruct.dcm", RT_STRUCT, "RTSTRUCT")
    add_object(with_objects, "seg.dcm", SEGMENTATION, "SEG", pixels=True)
    anonymised = copy_series(series, a / "patient2" / "ct")
    for f in slices(anonymised):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.save_as(f)
    rtstruct_only = a / "patient2" / "rtstruct"
    rtstruct_only.mkdir()
    shutil.copy(with_objects / "rtstruct.dcm", rtstruct_only / "rtstruct.dcm")
    with caplog.at_level(logging.INFO, logger="tools.data.ssl_datalist"):
        assert find_volumes(a) == [str(with_objects), str(anonymised)]
    assert "RTSTRUCT rtstruct.dcm" in caplog.text and str(rtstruct_only) in caplog.text

    truncated = copy_series(series, b / "p3" / "ct")
    victim = truncate(slices(truncated)[3], 700)
    gap = copy_series(series, b / "p4" / "ct")
    slices(gap)[5].unlink()
    output = tmp_path / "datalist.json"
    output.write_text("{}")
    with pytest.raises(CorpusError) as info:
        write_datalist({"a": str(a), "b": str(b)}, output)
    text = str(info.value)
    assert "2 problem(s)" in text and str(victim) in text and str(gap) in text and "missing" in text
    assert output.read_text() == "{}"


def test_output_names_qualify_only_clashing_names_with_as_few_folders_as_needed(tmp_path):
    uid_folder = tmp_path / "series" / UIDS[0]
    uid_folder.mkdir(parents=True)
    with bundle_on_path(BTCV_DIR):
        from scripts.outputs import output_names

        names = output_names(
            [
                "/d/a/x/ct.nii.gz",
                "/d/b/x/ct.nii.gz",
                "/d/c/ct.nii",
                "/d/y/1.2.3.nii.gz",
                str(uid_folder),
                "/d/z/scan.mha",
            ]
        )
    assert names == ["a_x_ct", "b_x_ct", "d_c_ct", "1.2.3", UIDS[0], "scan"]


# ------------------------------------------------------------------ the command line: the last lines name the cause

TAIL_LINES = 5


def cli_fails(bundle_dir: Path, run_id: str | None, config: str, overrides: dict) -> tuple[str, str]:
    """Run ``python -m monai.bundle run`` in ``bundle_dir``, expecting a failure; (whole output, last lines).

    The last lines are the last ``TAIL_LINES`` non-empty lines of stdout and stderr together, what a
    person reads first in a terminal.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = bundle_command(run_id, [f"configs/{config}"], overrides)
    proc = subprocess.run(
        command, cwd=bundle_dir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300
    )
    assert proc.returncode != 0, proc.stdout[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    tail = "\n".join(lines[-TAIL_LINES:])
    above = "\n".join(lines[:-TAIL_LINES])
    assert "Traceback (most recent call last)" in above, proc.stdout[-4000:]  # kept for debugging
    assert f"\n{bundle_dir.name}: " in "\n" + tail, tail
    return proc.stdout, tail


def test_cli_truncated_dicom_slice_ends_with_the_slice_file(series, ckpt, tmp_path):
    inputs = tmp_path / "inputs"
    save_nifti(inputs / "good.nii.gz", seed=1)
    folder = copy_series(series, inputs / "series_a")
    victim = truncate(slices(folder)[4], slices(folder)[4].stat().st_size - 100)
    overrides = dict(ckpt_path=str(ckpt), dataset_dir=str(inputs), output_dir=str(tmp_path / "out"), **INFER_SMALL)
    output, tail = cli_fails(BTCV_DIR, "run", "inference.json", overrides)
    assert str(victim) in tail and "truncated" in tail
    wrapper = output.rindex("RuntimeError: Failed to evaluate")
    assert wrapper < output.rindex("swin_unetr_btcv_seg: InputDataError")


def test_cli_missing_image_of_a_datalist_ends_with_its_path(phantom_dir, ckpt, tmp_path):
    missing = tmp_path / "data" / "gone.nii.gz"
    datalist = tmp_path / "datalist.json"
    datalist.write_text(json.dumps({"testing": [{"image": str(missing)}]}))
    overrides = dict(
        ckpt_path=str(ckpt),
        dataset_dir=str(tmp_path / "data"),
        datalist=str(datalist),
        output_dir=str(tmp_path / "out"),
        **INFER_SMALL,
    )
    _, tail = cli_fails(BTCV_DIR, "run", "inference.json", overrides)
    assert str(missing) in tail and "not found" in tail


def test_cli_checkpoint_that_does_not_fit_ends_with_the_checkpoint(tmp_path):
    from tools.data.make_msd_tasks import write_msd_task

    task_dir = write_msd_task(tmp_path / "msd", "Task09_Spleen", num_training=1, num_test=1, seed=0, shape=(40, 40, 24))
    wrong = random_checkpoint(tmp_path / "btcv_model.pt", out_channels=14)  # a BTCV checkpoint, 14 classes, not 2
    overrides = dict(
        task="Task09_Spleen",
        dataset_dir=str(task_dir),
        ckpt_path=str(wrong),
        output_dir=str(tmp_path / "out"),
        **MSD_INFER_SMALL,
    )
    _, tail = cli_fails(MSD_DIR, "run", "inference.json", overrides)
    assert str(wrong) in tail, tail


def test_cli_truncated_pretrained_weights_end_training_with_the_file(phantom_dir, ckpt, tmp_path):
    broken = tmp_path / "model_swinvit.pt"
    broken.write_bytes(ckpt.read_bytes()[:5000])
    overrides = dict(
        dataset_dir=str(phantom_dir),
        datalist=str(phantom_dir / "datalist.json"),
        bundle_root=str(tmp_path / "run"),
        max_epochs=1,
        pretrained_path=str(broken),
        **SMALL,
    )
    _, tail = cli_fails(BTCV_DIR, "training", "train.json", overrides)
    assert str(broken) in tail and "truncated" in tail


def test_cli_bad_knob_value_ends_with_the_knob(ckpt, tmp_path):
    inputs = tmp_path / "inputs"
    save_nifti(inputs / "good.nii.gz", seed=1)
    overrides = dict(
        ckpt_path=str(ckpt),
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        patch_merging="sideways",
        **INFER_SMALL,
    )
    _, tail = cli_fails(BTCV_DIR, "run", "inference.json", overrides)
    assert "patch_merging must be one of" in tail and "sideways" in tail


def test_cli_ssl_datalist_json_error_ends_with_the_datalist_and_line(phantom_dir, tmp_path):
    datalist = tmp_path / "datalist.json"
    datalist.write_text(BROKEN_JSON)
    overrides = dict(
        dataset_dir=str(phantom_dir), datalist=str(datalist), bundle_root=str(tmp_path / "run"), num_steps=1
    )
    _, tail = cli_fails(SSL_DIR, "training", "train.json", overrides)
    assert f"{datalist}: datalist is not valid JSON" in tail and "line 4" in tail


# ---------------------------------------------------------------------------------------- scripts.error_report


def _wrapped(inner: BaseException) -> RuntimeError:
    """``inner`` as MONAI's reference resolver re-raises it: a wrapper from a wrapper."""
    try:
        try:
            raise inner
        except BaseException as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: $scripts.x()") from e
    except RuntimeError as e:
        try:
            raise RuntimeError("Failed to instantiate component 'y' with keywords: a") from e
        except RuntimeError as outer:
            return outer


def test_error_report_names_the_first_error_under_monai_wrappers_not_the_innermost():
    with bundle_on_path(BTCV_DIR):
        from scripts import error_report

    try:
        try:
            json.loads("{,}")
        except json.JSONDecodeError as e:
            raise ValueError("/d/list.json: datalist is not valid JSON at line 1") from e
    except ValueError as e:
        explained = e
    assert error_report.root_cause(_wrapped(explained)) is explained
    plain = KeyError("k")
    assert error_report.root_cause(plain) is plain
    assert error_report.summary(_wrapped(explained), "b") == [
        "",
        "b: ValueError: /d/list.json: datalist is not valid JSON at line 1",
    ]
    long = ValueError("\n".join(f"line {n}" for n in range(10)))
    block = error_report.summary(long, "b")
    assert len(block) == error_report.MAX_LINES
    assert block[1:] == ["b: ValueError: line 0", "line 1", "line 2", "... (7 more line(s) in the full message above)"]


def test_error_report_hook_chains_once_and_prints_the_block_last(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append(args))
    with bundle_on_path(BTCV_DIR):
        from scripts import error_report

        error_report.install("first")
        hook = sys.excepthook
        error_report.install("second")  # idempotent: the same hook, renamed
    assert sys.excepthook is hook and hook.bundle == "second"
    exc = _wrapped(FileNotFoundError("/d/a.nii.gz: file not found"))
    sys.excepthook(type(exc), exc, exc.__traceback__)
    assert len(calls) == 1 and calls[0][1] is exc  # the previous hook printed the traceback
    assert capsys.readouterr().err.splitlines()[-1] == "second: FileNotFoundError: /d/a.nii.gz: file not found"
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert len(calls) == 2 and capsys.readouterr().err == ""
