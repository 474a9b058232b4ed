"""Leaderboard submissions: checking one predicted label map against its test image, and writing the zip.

Shared by the leaderboard tools ``msd_submission`` and ``btcv_submission``. Problems are collected as one line
each (naming the file) so that a tool reports them all together in one ``SubmissionError``; the
zip is written to a temporary file in the target folder and renamed over ``zip_path``, so there is
either a complete zip or none.
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path

import nibabel as nib
import numpy as np

__all__ = ["AFFINE_ATOL", "SubmissionError", "check_label_map", "write_zip_atomically"]

AFFINE_ATOL = 1e-3
"""Largest difference allowed between a prediction's affine and its image's (mm, and direction cosines x mm)."""


class SubmissionError(ValueError):
    """Every problem found in a submission, one line each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"{len(problems)} problem(s) in the submission:\n" + "\n".join(problems))


def _load(path: Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    image = nib.load(path)
    return image, np.asanyarray(image.dataobj)


def check_label_map(
    path: Path,
    image_path: Path | None = None,
    label_ids: Iterable[int] | None = None,
    dtype: str | None = None,
    affine_atol: float = AFFINE_ATOL,
) -> list[str]:
    """Problems of one prediction file, each naming it; ``[]`` when there are none.

    The file must be a readable 3D NIfTI of an integer type; one that is not is checked no further
    (each further check would only fail too). Then: exactly ``dtype`` when given (e.g. ``"uint8"``);
    only ``label_ids`` when given; with ``image_path``, the image's spatial shape and its affine within
    ``affine_atol``.
    """
    try:
        prediction, data = _load(path)
    except Exception as err:  # noqa: BLE001 (nibabel, gzip and zlib raise many kinds for a damaged file)
        return [f"{path}: unreadable NIfTI ({err!r})"]
    problems = []
    if data.ndim != 3:
        problems.append(f"{path}: not a 3D label map (shape {data.shape})")
    if not np.issubdtype(data.dtype, np.integer):
        problems.append(f"{path}: data type {data.dtype} is not an integer type")
    if problems:  # the checks below would only repeat these
        return problems
    if dtype is not None and data.dtype != np.dtype(dtype):
        problems.append(f"{path}: data type {data.dtype}, expected {np.dtype(dtype)}")
    if label_ids is not None:
        ids = sorted(int(i) for i in label_ids)
        outside = np.unique(data[~np.isin(data, ids)])
        if outside.size:
            problems.append(f"{path}: label values {outside.tolist()} outside the allowed ids {ids[0]}..{ids[-1]}")
    if image_path is None:
        return problems
    try:
        image = nib.load(image_path)
    except Exception as err:  # noqa: BLE001 (as above)
        return problems + [f"{path}: cannot read its test image {image_path} ({err!r})"]
    if data.shape != image.shape[:3]:
        problems.append(f"{path}: shape {data.shape} differs from its image's {image.shape[:3]} ({image_path})")
    elif not np.allclose(prediction.affine, image.affine, atol=affine_atol):
        worst = float(np.abs(prediction.affine - image.affine).max())
        problems.append(
            f"{path}: affine differs from its image's ({image_path}) by {worst:.4g}, more than {affine_atol}"
        )
    return problems


def write_zip_atomically(members: Mapping[str, Path], zip_path: str | Path) -> Path:
    """Write ``{member name: file}`` deflated into ``zip_path`` via a temporary file renamed over it.

    On any failure the temporary file is removed and ``zip_path`` is left as it was. Returns ``zip_path``.
    """
    zip_path = Path(zip_path)
    zip_path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=zip_path.parent, prefix=f".{zip_path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        with zipfile.ZipFile(temp_name, "w", compression=zipfile.ZIP_DEFLATED) as archive:
            for member, path in members.items():
                archive.write(path, member)
        os.replace(temp_name, zip_path)
    except BaseException:
        os.unlink(temp_name)
        raise
    return zip_path
