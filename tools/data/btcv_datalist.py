"""Build MONAI datalists (JSON) for the BTCV abdomen data set.

The BTCV archive (RawData.zip) unpacks to::

    RawData/Training/img/img0001.nii.gz     RawData/Training/label/label0001.nii.gz
    RawData/Testing/img/img0061.nii.gz      (test images, labels not public)

Two splits are offered:

* ``standard_split``: the split used by the Swin UNETR research code and the MONAI model-zoo
  bundle: 24 training cases (ids 1-10 and 21-34), 6 validation cases (ids 35-40).
* ``kfold_split``: every labelled case found on disk, shuffled with a seed and cut into folds.

Paths in the datalist are relative to the ``data_dir`` that was given (POSIX style), so a
bundle sets its dataset directory to that same folder.

Command line::

    python -m tools btcv_datalist --data_dir /data/BTCV --output datalist.json
    python -m tools btcv_datalist --data_dir /data/BTCV --output fold0.json --num_folds 5 --fold 0 --seed 0
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np

from tools.common.bundles import common_module

logger = logging.getLogger(__name__)
skipped_files = common_module("skipped_files")

TRAINING_IDS = tuple(range(1, 11)) + tuple(range(21, 35))
"""Case ids of the standard 24-case training set."""
VALIDATION_IDS = tuple(range(35, 41))
"""Case ids of the standard 6-case validation set."""
TESTING_IDS = tuple(range(61, 81))
"""Case ids of the BTCV test set (labels hidden; leaderboard only)."""

_IMG_RE = re.compile(r"^img(\d{4})\.nii\.gz$")
_LABEL_RE = re.compile(r"^label(\d{4})\.nii\.gz$")
_NAME_FORMS = {_IMG_RE: "img0001.nii.gz", _LABEL_RE: "label0001.nii.gz"}


def image_relpath(case_id: int, subset: str = "Training") -> str:
    """Path of a case's image relative to the RawData folder, e.g. ``Training/img/img0001.nii.gz``."""
    return f"{subset}/img/img{case_id:04d}.nii.gz"


def label_relpath(case_id: int) -> str:
    """Path of a training case's label relative to the RawData folder."""
    return f"Training/label/label{case_id:04d}.nii.gz"


def find_rawdata(data_dir: str | Path) -> Path:
    """Return the ``RawData`` folder for ``data_dir``.

    ``data_dir`` may be the folder that holds ``RawData/``, the ``RawData`` folder itself
    (it holds ``Training/``), or one level above the folder that holds ``RawData/``
    (for example the folder an archive was unpacked into).
    """
    root = Path(data_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"BTCV data dir does not exist: {root}")
    if (root / "RawData" / "Training").is_dir():
        return root / "RawData"
    if (root / "Training" / "img").is_dir():
        return root
    nested = sorted(p.parent for p in root.glob("*/RawData/Training"))
    if len(nested) == 1:
        return nested[0]
    if len(nested) > 1:
        raise ValueError(f"several BTCV RawData folders under {root}: {[str(p) for p in nested]}; pick one")
    raise FileNotFoundError(f"no BTCV data under {root}: expected {root}/RawData/Training/img (or {root}/Training/img)")


def _ids_in(folder: Path, pattern: re.Pattern) -> set[int]:
    """Case ids of the files named by ``pattern`` in ``folder``; every other entry is named in a warning."""
    if not folder.is_dir():
        return set()
    ids, skipped = set(), []
    for path in sorted(folder.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_file():
            ids.add(int(match.group(1)))
        else:
            skipped.append((path.name, f"not named like {_NAME_FORMS[pattern]}"))
    for line in skipped_files.skipped_lines(str(folder), skipped):
        logger.warning(line)
    return ids


def _rel(path: Path, data_dir: Path) -> str:
    return path.relative_to(data_dir).as_posix()


def labelled_case_ids(data_dir: str | Path) -> list[int]:
    """Ids of the training cases on disk that have both an image and a label (sorted).

    Cases with only one of the two files are skipped with a warning naming them.
    """
    raw = find_rawdata(data_dir)
    imgs = _ids_in(raw / "Training" / "img", _IMG_RE)
    labels = _ids_in(raw / "Training" / "label", _LABEL_RE)
    for cid in sorted(imgs - labels):
        logger.warning("BTCV case %d has an image but no label (%s): skipped", cid, label_relpath(cid))
    for cid in sorted(labels - imgs):
        logger.warning("BTCV case %d has a label but no image (%s): skipped", cid, image_relpath(cid))
    return sorted(imgs & labels)


def _testing_items(raw: Path, data_dir: Path) -> list[dict]:
    found = _ids_in(raw / "Testing" / "img", _IMG_RE)
    for cid in sorted(found - set(TESTING_IDS)):
        logger.warning("BTCV test image %s is not a standard test id (61-80): ignored", image_relpath(cid, "Testing"))
    return [{"image": _rel(raw / image_relpath(cid, "Testing"), data_dir)} for cid in sorted(found & set(TESTING_IDS))]


def _labelled_item(raw: Path, data_dir: Path, cid: int) -> dict:
    return {"image": _rel(raw / image_relpath(cid), data_dir), "label": _rel(raw / label_relpath(cid), data_dir)}


def standard_split(data_dir: str | Path) -> dict:
    """Standard BTCV split: 24 training (ids 1-10, 21-34), 6 validation (35-40), testing (61-80 found on disk).

    Raises FileNotFoundError naming every expected image/label that is missing. Labelled cases on
    disk that are not in the split are ignored with a warning naming them.
    """
    data_dir = Path(data_dir)
    raw = find_rawdata(data_dir)
    expected = TRAINING_IDS + VALIDATION_IDS
    missing = [
        str(raw / rel)
        for cid in expected
        for rel in (image_relpath(cid), label_relpath(cid))
        if not (raw / rel).is_file()
    ]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} file(s) of the standard BTCV split missing under {raw}: " + ", ".join(missing)
        )
    extra = sorted(set(labelled_case_ids(data_dir)) - set(expected))
    for cid in extra:
        logger.warning("BTCV case %d (%s) is not in the standard split: ignored", cid, image_relpath(cid))
    return {
        "training": [_labelled_item(raw, data_dir, cid) for cid in TRAINING_IDS],
        "validation": [_labelled_item(raw, data_dir, cid) for cid in VALIDATION_IDS],
        "testing": _testing_items(raw, data_dir),
    }


def kfold_split(data_dir: str | Path, num_folds: int = 5, fold: int = 0, seed: int = 0) -> dict:
    """K-fold split of every labelled case on disk: fold ``fold`` is validation, the rest training.

    Cases are shuffled with ``np.random.default_rng(seed)`` and cut into ``num_folds`` disjoint
    folds of near-equal size, so the same (num_folds, seed) gives the same folds on any machine.
    """
    num_folds, fold = int(num_folds), int(fold)
    if num_folds < 2:
        raise ValueError(f"num_folds must be >= 2, got {num_folds}")
    if not 0 <= fold < num_folds:
        raise ValueError(f"fold must be in [0, {num_folds - 1}], got {fold}")
    data_dir = Path(data_dir)
    raw = find_rawdata(data_dir)
    ids = labelled_case_ids(data_dir)
    if len(ids) < num_folds:
        raise ValueError(f"{len(ids)} labelled case(s) under {raw} is fewer than num_folds={num_folds}")
    order = np.random.default_rng(seed).permutation(len(ids))
    folds = [sorted(ids[i] for i in part) for part in np.array_split(order, num_folds)]
    train_ids = sorted(cid for k, part in enumerate(folds) if k != fold for cid in part)
    return {
        "training": [_labelled_item(raw, data_dir, cid) for cid in train_ids],
        "validation": [_labelled_item(raw, data_dir, cid) for cid in folds[fold]],
        "testing": _testing_items(raw, data_dir),
    }


def write_datalist(data_dir: str | Path, output: str | Path, num_folds: int = 0, fold: int = 0, seed: int = 0) -> dict:
    """Write the standard split (num_folds 0) or a k-fold split as JSON (indent 2); return the datalist."""
    if num_folds:
        datalist = kfold_split(data_dir, num_folds=num_folds, fold=fold, seed=seed)
    else:
        datalist = standard_split(data_dir)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(datalist, indent=2) + "\n")
    return datalist


def main(data_dir: str, output: str, num_folds: int = 0, fold: int = 0, seed: int = 0) -> None:
    """Command line: write the datalist and print a one-line summary."""
    datalist = write_datalist(data_dir, output, num_folds=num_folds, fold=fold, seed=seed)
    split = f"{num_folds}-fold split, fold {fold}, seed {seed}" if num_folds else "standard split"
    print(
        f"{output}: {split}: {len(datalist['training'])} training, "
        f"{len(datalist['validation'])} validation, {len(datalist['testing'])} testing"
    )


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main)
