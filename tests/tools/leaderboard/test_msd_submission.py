"""tools.leaderboard.msd_submission: checking MSD prediction folders against their test images and zipping them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tools.data.make_msd_tasks import write_msd_task
from tools.leaderboard.msd_submission import SubmissionError, make_submission

REPO = Path(__file__).resolve().parents[3]
SHAPE = (24, 24, 16)
TASKS = ("Task09_Spleen", "Task01_BrainTumour")  # 3D CT and 4-channel MRI images


@pytest.fixture
def submission(tmp_path):
    """(data_root, {task: prediction folder}, zip path): synthetic test images and good predictions for them."""
    data_root, pred_root = tmp_path / "msd", tmp_path / "predictions"
    folders = {}
    for seed, task in enumerate(TASKS):
        task_dir = write_msd_task(data_root, task, num_training=1, num_test=2, seed=seed, shape=SHAPE)
        num_labels = len(json.loads((task_dir / "dataset.json").read_text())["labels"])
        folders[task] = pred_root / task
        folders[task].mkdir(parents=True)
        for image_path in sorted((task_dir / "imagesTs").glob("*.nii.gz")):
            image = nib.load(image_path)
            label = (np.arange(np.prod(SHAPE)) % num_labels).reshape(SHAPE).astype(np.uint8)
            nib.save(nib.Nifti1Image(label, image.affine), folders[task] / image_path.name)
    return data_root, folders, tmp_path / "out" / "submission.zip"


def spleen_file(folders, name="spleen_002.nii.gz"):
    return folders["Task09_Spleen"] / name


def assert_rejected(prediction_dirs, zip_path, data_root, *offending):
    """make_submission raises SubmissionError naming every ``offending`` path, and writes nothing."""
    with pytest.raises(SubmissionError) as caught:
        make_submission([str(d) for d in prediction_dirs], str(zip_path), str(data_root))
    message = str(caught.value)
    for path in offending:
        assert str(path) in message, message
    assert not zip_path.parent.exists(), list(zip_path.parent.iterdir())
    return caught.value


def test_good_submission_zips_each_task_folder_byte_for_byte(submission):
    data_root, folders, zip_path = submission
    (folders["Task09_Spleen"] / ".DS_Store").write_bytes(b"\0")  # hidden files are ignored
    summary = make_submission([str(d) for d in folders.values()], str(zip_path), str(data_root))

    expected = {f"{task}/{p.name}": p for task, d in folders.items() for p in d.glob("*.nii.gz")}
    assert summary == {
        "zip_path": str(zip_path),
        "num_files": 4,
        "tasks": {"Task09_Spleen": 2, "Task01_BrainTumour": 2},
    }
    assert sorted(expected) == [
        "Task01_BrainTumour/BRATS_002.nii.gz",
        "Task01_BrainTumour/BRATS_003.nii.gz",
        "Task09_Spleen/spleen_002.nii.gz",
        "Task09_Spleen/spleen_003.nii.gz",
    ]
    with zipfile.ZipFile(zip_path) as archive:
        assert sorted(archive.namelist()) == sorted(expected)
        assert {info.compress_type for info in archive.infolist()} == {zipfile.ZIP_DEFLATED}
        for member, path in expected.items():
            assert archive.read(member) == path.read_bytes()
    assert list(zip_path.parent.iterdir()) == [zip_path]  # no temporary file left


def test_without_test_list_every_visible_image_in_images_ts_is_expected(submission):
    data_root, folders, zip_path = submission
    task_dir = data_root / "Task09_Spleen"
    dataset = json.loads((task_dir / "dataset.json").read_text())
    del dataset["test"]
    (task_dir / "dataset.json").write_text(json.dumps(dataset))
    (task_dir / "imagesTs" / "._spleen_002.nii.gz").write_bytes(b"\0")  # macOS metadata, as in the MSD tarballs
    summary = make_submission([str(folders["Task09_Spleen"])], str(zip_path), str(data_root))
    assert summary["tasks"] == {"Task09_Spleen": 2}

    shutil.copy(task_dir / "imagesTs" / "spleen_002.nii.gz", task_dir / "imagesTs" / "spleen_009.nii.gz")
    zip_path.unlink()
    zip_path.parent.rmdir()
    assert_rejected([folders["Task09_Spleen"]], zip_path, data_root, spleen_file(folders, "spleen_009.nii.gz"))


def save_like(path, data, affine=None):
    nib.save(nib.Nifti1Image(data, nib.load(path).affine if affine is None else affine), path)


def missing(folders):
    spleen_file(folders).unlink()
    return spleen_file(folders)


def extra(folders):
    shutil.copy(spleen_file(folders), spleen_file(folders, "spleen_099.nii.gz"))
    return spleen_file(folders, "spleen_099.nii.gz")


def wrong_shape(folders):
    save_like(spleen_file(folders), np.zeros((24, 24, 15), np.uint8))
    return spleen_file(folders)


def wrong_affine(folders):
    affine = nib.load(spleen_file(folders)).affine
    affine[:3, 3] += 0.5
    save_like(spleen_file(folders), np.zeros(SHAPE, np.uint8), affine)
    return spleen_file(folders)


def label_out_of_range(folders):
    path = folders["Task01_BrainTumour"] / "BRATS_003.nii.gz"
    save_like(path, np.full(SHAPE, 4, np.uint8))  # ids 0..3
    return path


def float_data(folders):
    save_like(spleen_file(folders), np.zeros(SHAPE, np.float32))
    return spleen_file(folders)


def four_dimensional(folders):
    save_like(spleen_file(folders), np.zeros((*SHAPE, 1), np.uint8))
    return spleen_file(folders)


def unreadable(folders):
    spleen_file(folders).write_bytes(b"not a nifti")
    return spleen_file(folders)


def not_nifti(folders):
    (folders["Task09_Spleen"] / "notes.txt").write_text("hello")
    return folders["Task09_Spleen"] / "notes.txt"


def empty_folder(folders):
    for path in folders["Task09_Spleen"].iterdir():
        path.unlink()
    return folders["Task09_Spleen"]


@pytest.mark.parametrize(
    "break_it",
    [
        missing,
        extra,
        wrong_shape,
        wrong_affine,
        label_out_of_range,
        float_data,
        four_dimensional,
        unreadable,
        not_nifti,
        empty_folder,
    ],
)
def test_bad_prediction_is_rejected_naming_the_file(submission, break_it):
    data_root, folders, zip_path = submission
    offending = break_it(folders)
    error = assert_rejected(folders.values(), zip_path, data_root, offending)
    assert len(error.problems) == (3 if break_it is empty_folder else 1), error.problems  # no knock-on errors


def test_folder_not_named_like_a_task_and_duplicate_task_are_rejected(submission, tmp_path):
    data_root, folders, zip_path = submission
    renamed = folders["Task09_Spleen"].rename(tmp_path / "predictions" / "Spleen")
    duplicate = tmp_path / "second_run" / "Task01_BrainTumour"
    shutil.copytree(folders["Task01_BrainTumour"], duplicate)
    error = assert_rejected(
        [renamed, folders["Task01_BrainTumour"], duplicate], zip_path, data_root, renamed, duplicate
    )
    assert len(error.problems) == 2, error.problems


def test_all_problems_are_reported_together_and_an_existing_zip_is_kept(submission):
    data_root, folders, _ = submission
    zip_path = spleen_file(folders).parents[2] / "old.zip"
    zip_path.write_bytes(b"previous submission")
    float_data(folders)
    label_out_of_range(folders)
    with pytest.raises(SubmissionError) as caught:
        make_submission([str(d) for d in folders.values()], str(zip_path), str(data_root))
    assert len(caught.value.problems) == 2 and isinstance(caught.value, ValueError)
    assert zip_path.read_bytes() == b"previous submission"
    assert sorted(p.name for p in zip_path.parent.iterdir()) == ["msd", "old.zip", "predictions"]


def test_checks_without_data_root_are_format_only(submission):
    _, folders, zip_path = submission
    wrong_shape(folders)  # no images to compare with: accepted
    assert make_submission([str(folders["Task09_Spleen"])], str(zip_path))["num_files"] == 2
    zip_path.unlink()
    zip_path.parent.rmdir()
    assert_rejected([folders["Task09_Spleen"]], zip_path, None, float_data(folders))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "tools", "msd_submission", *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )


def test_command_line_prints_the_summary_and_fails_on_problems(submission):
    data_root, folders, zip_path = submission
    dirs = "[" + ",".join(f"'{d}'" for d in folders.values()) + "]"
    result = run_cli("--prediction_dirs", dirs, "--zip_path", str(zip_path), "--data_root", str(data_root))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["tasks"] == {"Task09_Spleen": 2, "Task01_BrainTumour": 2}
    assert zipfile.is_zipfile(zip_path)

    offending = missing(folders)
    other_zip = zip_path.with_name("again.zip")
    result = run_cli("--prediction_dirs", dirs, "--zip_path", str(other_zip), "--data_root", str(data_root))
    assert result.returncode != 0
    assert str(offending) in result.stderr and not other_zip.exists()
