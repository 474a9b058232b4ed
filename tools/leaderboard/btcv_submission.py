"""Check BTCV test-set predictions against the test images and zip them for the leaderboard.

The BTCV test set is ``img0061.nii.gz`` .. ``img0080.nii.gz`` (``RawData/Testing/img`` of the
archive; ``tools.data.btcv_datalist.TESTING_IDS``). Give the test images as that folder, or as a datalist
JSON whose ``testing`` list names them (items ``{"image": path}`` or plain paths, relative to
``dataset_dir``, default the datalist's folder). The prediction folder must hold exactly one label
map per test image, and each must be a readable 3D NIfTI of type uint8 with the image's shape, the
image's affine (within ``affine_atol``) and only the ids 0..13. Hidden files (macOS ``._*``) and the
bundle inference's ``manifest.json`` are ignored and not zipped.

Prediction names: the BTCV bundle's inference writes ``<image name>_seg.nii.gz``
(``scripts.outputs.OutputNames`` with the postfix ``seg``: ``img0061_seg.nii.gz``). The tool also
accepts ``img0061.nii.gz`` (the research code's ``SwinUNETR/BTCV/test.py`` saves each prediction under
its image's file name) and ``label0061.nii.gz``. Each prediction is renamed in the zip to the
submission name chosen with ``naming``:

- ``label`` (default): ``label0061.nii.gz``, the dataset's own name for the label map of
  ``img0061`` (``RawData/Training/label/label0001.nii.gz`` beside ``RawData/Training/img/img0001.nii.gz``;
  nnU-Net's ``Task017_BeyondCranialVaultAbdominalOrganSegmentation.py`` conversion reads that layout);
- ``image``: ``img0061.nii.gz``, the test image's own name, as the research code writes it.

Source and its limit: the challenge is "Multi-Atlas Labeling Beyond the Cranial Vault" on Synapse
(syn3193805, wiki 217789, the reference nnU-Net's Task017 script gives). Its submission page could not
be read from this project's machines, so the expected member name is not confirmed from the challenge
itself: check it on that page before uploading and pick ``naming`` to match. Members are stored flat at
the root of the zip.

All problems are reported together (each naming its file) in one ``SubmissionError``, and then
nothing is written. Otherwise the zip is written to a temporary file and renamed over ``zip_path``.

    python -m tools btcv_submission --prediction_dir eval --test_images /data/btcv/RawData/Testing/img \\
        --zip_path btcv_submission.zip [--naming label|image]
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tools.common.submission import AFFINE_ATOL, SubmissionError, check_label_map, write_zip_atomically
from tools.data.btcv_datalist import TESTING_IDS

__all__ = ["NAMINGS", "LABEL_IDS", "SubmissionError", "submission_name", "find_test_images", "make_submission"]

NAMINGS = {"label": "label{:04d}.nii.gz", "image": "img{:04d}.nii.gz"}
"""Submission member name of a case id, by ``naming``."""
LABEL_IDS = tuple(range(14))
"""Background and the 13 organs."""
PREDICTION_NAME = re.compile(r"^(?:img|label)(\d{4})(?:_seg)?\.nii\.gz$")
"""Prediction file names accepted: the bundle's ``img0061_seg.nii.gz``, ``img0061.nii.gz``, ``label0061.nii.gz``."""
TEST_IMAGE_NAME = re.compile(r"^img(\d{4})\.nii\.gz$")
INFERENCE_MANIFEST = "manifest.json"


def submission_name(case_id: int, naming: str = "label") -> str:
    """The zip member name of test case ``case_id`` (``label0061.nii.gz`` or ``img0061.nii.gz``)."""
    if naming not in NAMINGS:
        raise ValueError(f"naming must be one of {sorted(NAMINGS)}, got {naming!r}")
    return NAMINGS[naming].format(case_id)


def _listed_images(test_images: Path, dataset_dir: str | None, problems: list[str]) -> list[Path] | None:
    """The image paths of a datalist's ``testing`` list, or the ``.nii.gz`` files of a folder; None if unreadable."""
    if test_images.is_dir():
        return sorted(p for p in test_images.iterdir() if p.name.endswith(".nii.gz") and not p.name.startswith("."))
    try:
        entries = json.loads(test_images.read_text())["testing"]
        paths = [str(e["image"] if isinstance(e, dict) else e) for e in entries]
    except (OSError, ValueError, KeyError, TypeError) as err:
        problems.append(
            f"{test_images}: neither a folder of test images nor a datalist with a 'testing' list ({err!r})"
        )
        return None
    root = Path(dataset_dir) if dataset_dir else test_images.parent
    return [p if p.is_absolute() else root / p for p in map(Path, paths)]


def find_test_images(test_images: str, dataset_dir: str | None, problems: list[str]) -> dict[int, Path]:
    """The BTCV test images by case id (61..80), from a folder or a datalist; every gap or stranger is a problem."""
    source = Path(test_images).expanduser()
    listed = _listed_images(source, dataset_dir, problems)
    if listed is None:
        return {}
    found: dict[int, Path] = {}
    for path in listed:
        match = TEST_IMAGE_NAME.match(path.name)
        if not match or int(match.group(1)) not in TESTING_IDS:
            problems.append(f"{path}: not a BTCV test image (img0061.nii.gz .. img0080.nii.gz), listed in {source}")
        elif not path.is_file():
            problems.append(f"{path}: test image not found (listed in {source})")
        else:
            found[int(match.group(1))] = path
    missing = [f"img{i:04d}.nii.gz" for i in TESTING_IDS if i not in found]
    if missing:
        problems.append(f"{source}: test images missing: {', '.join(missing)}")
    return found


def _predictions(folder: Path, problems: list[str]) -> dict[int, Path]:
    """The prediction of each case id found in ``folder``; strangers and duplicates are problems."""
    if not folder.is_dir():
        problems.append(f"{folder}: prediction folder not found")
        return {}
    by_case: dict[int, Path] = {}
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.name == INFERENCE_MANIFEST:
            continue
        match = PREDICTION_NAME.match(path.name)
        case_id = int(match.group(1)) if match else None
        if not path.is_file() or case_id is None:
            problems.append(
                f"{path}: not a prediction (expected img0061_seg.nii.gz, img0061.nii.gz or label0061.nii.gz)"
            )
        elif case_id not in TESTING_IDS:
            problems.append(f"{path}: case {case_id} is not a BTCV test case (61..80)")
        elif case_id in by_case:
            problems.append(f"{path}: a second prediction for case {case_id} (first: {by_case[case_id].name})")
        else:
            by_case[case_id] = path
    return by_case


def make_submission(
    prediction_dir: str,
    test_images_from: str,
    zip_path: str,
    naming: str = "label",
    dataset_dir: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> dict:
    """Check ``prediction_dir`` against the BTCV test images and zip it into ``zip_path``.

    Raises ``SubmissionError`` listing every problem (and writes nothing); returns a summary
    ``{"zip_path", "naming", "num_files", "members": {member name: prediction file}}``.
    """
    submission_name(TESTING_IDS[0], naming)  # a wrong naming fails before any check
    problems: list[str] = []
    images = find_test_images(test_images_from, dataset_dir, problems)
    folder = Path(prediction_dir).expanduser().resolve()
    predictions = _predictions(folder, problems)
    members = {}
    for case_id in TESTING_IDS:
        path = predictions.get(case_id)
        if path is None:
            image = images.get(case_id, f"img{case_id:04d}.nii.gz")
            problems.append(f"{folder}: missing prediction for test image {image}")
            continue
        problems += check_label_map(path, images.get(case_id), LABEL_IDS, dtype="uint8", affine_atol=affine_atol)
        members[submission_name(case_id, naming)] = path
    if problems:
        raise SubmissionError(problems)
    write_zip_atomically(members, zip_path)
    return {
        "zip_path": str(zip_path),
        "naming": naming,
        "num_files": len(members),
        "members": {name: str(path) for name, path in members.items()},
    }


def main(
    prediction_dir: str, test_images: str, zip_path: str, naming: str = "label", dataset_dir: str | None = None
) -> dict:
    """Check the predictions of the 20 BTCV test images and zip them for the leaderboard.

    Args:
        prediction_dir: the folder the bundle's inference wrote (``img0061_seg.nii.gz`` ...).
        test_images: the folder of the test images (``RawData/Testing/img``) or a datalist JSON with a
            ``testing`` list.
        zip_path: the zip to write (only when no problem is found).
        naming: ``label`` (``label0061.nii.gz``, default) or ``image`` (``img0061.nii.gz``) member names.
        dataset_dir: the folder that a datalist's relative paths start from (default: the datalist's folder).
    """
    return make_submission(prediction_dir, test_images, zip_path, naming, dataset_dir)


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main, report=lambda s: json.dumps(s, indent=2), errors=(SubmissionError, ValueError))
