"""Fetch one real abdomen CT with BTCV-style labels, from the TotalSegmentator 2.18.0 sdist on PyPI.

The source distribution ``totalsegmentator-2.18.0.tar.gz`` (38 MB, Apache-2.0) ships test files:
``tests/reference_files/example_ct.nii.gz``, a real abdomen-pelvis CT (122 x 101 x 112, 3 mm, HU),
and ``tests/reference_files/example_seg_fast_force_split.nii.gz``, TotalSegmentator v2 "total"
labels predicted for it. This module downloads the sdist with pip (only PyPI is needed), reads
the two files out of the archive and writes

* ``example_ct.nii.gz``: the image, byte for byte as shipped;
* ``example_ct_label.nii.gz``: uint8 BTCV ids (``TOTALSEG_TO_BTCV``), the image's header geometry;
* ``PROVENANCE.json``: where it came from, the licence, the id mapping, checksums.

The labels are TotalSegmentator predictions, not manual ground truth: a Dice against them
measures agreement with TotalSegmentator, not accuracy. The esophagus is absent from this
example, so 12 of the 13 BTCV organs are present.

Command line::

    python -m tools fetch_sample_ct --dest_dir /tmp/sample_ct [--sdist totalsegmentator-2.18.0.tar.gz]
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import json
import logging
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parents[2]
PACKAGE = "totalsegmentator"
VERSION = "2.18.0"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"  # as listed on pypi.org/simple
IMAGE_MEMBER = "tests/reference_files/example_ct.nii.gz"
SEG_MEMBER = "tests/reference_files/example_seg_fast_force_split.nii.gz"
CLASS_MAP_MEMBER = "totalsegmentator/map_to_binary.py"
IMAGE_NAME = "example_ct.nii.gz"
LABEL_NAME = "example_ct_label.nii.gz"
PROVENANCE_NAME = "PROVENANCE.json"
LICENCE = "Apache-2.0"
BTCV_METADATA = REPO_ROOT / "bundles" / "swin_unetr_btcv_seg" / "configs" / "metadata.json"

TOTALSEG_TO_BTCV = {1: 1, 2: 2, 3: 3, 4: 4, 15: 5, 5: 6, 6: 7, 52: 8, 63: 9, 64: 10, 7: 11, 8: 12, 9: 13}
"""TotalSegmentator v2 "total" class id -> BTCV label id; every other class becomes 0 (background)."""

LABEL_NOTE = (
    "Labels are TotalSegmentator 2.18.0 predictions (fast model, 'total' task) mapped to BTCV ids, "
    "not manual ground truth: a Dice against them measures agreement with TotalSegmentator, not accuracy."
)


def default_cache_dir() -> Path:
    """Folder the sdist is downloaded to and reused from: ``<repo root>/.cache/sample_ct`` (git-ignored)."""
    return REPO_ROOT / ".cache" / "sample_ct"


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def download_sdist(cache_dir: str | Path | None = None) -> Path:
    """Path of ``totalsegmentator-2.18.0.tar.gz`` in ``cache_dir``, downloaded with pip if not already there.

    A cached file whose sha256 differs from PyPI's is deleted and downloaded again.
    Raises RuntimeError with the tail of pip's stderr if pip fails.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / SDIST_NAME
    if target.is_file():
        if _sha256(target) == SDIST_SHA256:
            logger.info("reusing %s", target)
            return target
        logger.warning("cached %s has the wrong sha256 (incomplete or altered): downloading again", target)
        target.unlink()
    cache.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--disable-pip-version-check",
        "--progress-bar",
        "off",
        "--dest",
        str(cache),
        f"{PACKAGE}=={VERSION}",
    ]
    logger.info("downloading %s %s (38 MB) with: %s", PACKAGE, VERSION, " ".join(cmd))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        raise RuntimeError(f"pip download of {PACKAGE}=={VERSION} failed (exit {proc.returncode}):\n{tail}")
    if not target.is_file():
        raise RuntimeError(f"pip reported success but {target} is not there; pip said:\n{proc.stdout[-2000:]}")
    digest = _sha256(target)
    if digest != SDIST_SHA256:
        raise RuntimeError(f"{target} has sha256 {digest}, PyPI lists {SDIST_SHA256}; delete it and retry")
    return target


def _read_member(tf: tarfile.TarFile, sdist: Path, suffix: str) -> bytes:
    """Bytes of ``<top folder>/<suffix>`` in the archive, without extracting anything else."""
    try:
        member = tf.getmember(f"{PACKAGE}-{VERSION}/{suffix}")
    except KeyError:
        found = [m for m in tf.getmembers() if m.name.split("/", 1)[-1] == suffix and m.isfile()]
        if len(found) != 1:
            raise FileNotFoundError(
                f"{sdist} has no member <top folder>/{suffix}: not the {PACKAGE} {VERSION} sdist?"
            ) from None
        member = found[0]
    if not member.isfile():
        raise FileNotFoundError(f"{sdist}: member {member.name} is not a regular file")
    return tf.extractfile(member).read()


def _totalseg_class_names(source: bytes) -> dict[int, str]:
    """TotalSegmentator's own names of the mapped classes, read from map_to_binary.py (no import)."""
    tree = ast.parse(source.decode("utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "class_map" for t in node.targets):
            total = ast.literal_eval(node.value)["total"]
            return {k: total[k] for k in TOTALSEG_TO_BTCV}
    raise ValueError("class_map not found")


def btcv_label_names() -> dict[int, str]:
    """BTCV id -> name, from the bundle metadata (``network_data_format.outputs.pred.channel_def``)."""
    meta = json.loads(BTCV_METADATA.read_text())
    channel_def = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    return {int(k): v for k, v in channel_def.items()}


def totalseg_to_btcv(seg: np.ndarray) -> np.ndarray:
    """Map a TotalSegmentator v2 "total" label array to BTCV ids (uint8); unmapped classes -> 0."""
    seg = np.asarray(seg)
    if seg.dtype.kind == "f":
        if not np.all(np.isfinite(seg)) or np.any(seg != np.round(seg)):
            raise ValueError("segmentation holds non-integer values")
        seg = seg.astype(np.int64)
    if seg.size and seg.min() < 0:
        raise ValueError("segmentation holds negative class ids")
    lut = np.zeros(max(int(seg.max(initial=0)), max(TOTALSEG_TO_BTCV)) + 1, np.uint8)
    for ts_id, btcv_id in TOTALSEG_TO_BTCV.items():
        lut[ts_id] = btcv_id
    return lut[seg]


def _outputs(dest: Path) -> dict:
    return {"image": str(dest / IMAGE_NAME), "label": str(dest / LABEL_NAME)}


def _existing_outputs_valid(dest: Path) -> bool:
    """True if dest holds both files with the checksums recorded in a PROVENANCE.json of this version/mapping."""
    try:
        prov = json.loads((dest / PROVENANCE_NAME).read_text())
        if prov.get("version") != VERSION or prov.get("id_mapping_totalsegmentator_to_btcv") != {
            str(k): v for k, v in TOTALSEG_TO_BTCV.items()
        }:
            return False
        return all(_sha256(dest / name) == prov["outputs"][name]["sha256"] for name in (IMAGE_NAME, LABEL_NAME))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def fetch_sample_ct(dest_dir: str | Path, sdist: str | Path | None = None, cache_dir: str | Path | None = None) -> dict:
    """Write the TotalSegmentator example CT and its BTCV-id label to ``dest_dir``; return their paths.

    ``sdist``: a local ``totalsegmentator-2.18.0.tar.gz``; if None it is downloaded once with pip
    into ``cache_dir`` (default ``<repo root>/.cache/sample_ct``). If ``dest_dir`` already holds
    valid outputs nothing is read or downloaded. Returns ``{"image": path, "label": path}``.
    """
    import nibabel as nib

    dest = Path(dest_dir)
    if _existing_outputs_valid(dest):
        logger.info("sample CT already in %s", dest)
        return _outputs(dest)
    if sdist is None:
        sdist_path = download_sdist(cache_dir)
    else:
        sdist_path = Path(sdist)
        if not sdist_path.is_file():
            raise FileNotFoundError(f"sdist not found: {sdist_path}")
    digest = _sha256(sdist_path)
    if digest != SDIST_SHA256:
        logger.warning("%s sha256 %s differs from PyPI's %s for %s", sdist_path, digest, SDIST_SHA256, SDIST_NAME)

    with tarfile.open(sdist_path, "r:gz") as tf:
        image_bytes = _read_member(tf, sdist_path, IMAGE_MEMBER)
        seg_bytes = _read_member(tf, sdist_path, SEG_MEMBER)
        try:
            ts_names = _totalseg_class_names(_read_member(tf, sdist_path, CLASS_MAP_MEMBER))
        except (FileNotFoundError, ValueError, KeyError, SyntaxError) as e:
            logger.warning("could not read TotalSegmentator class names (%s); provenance lists ids only", e)
            ts_names = {}

    image = nib.Nifti1Image.from_bytes(gzip.decompress(image_bytes))
    seg = nib.Nifti1Image.from_bytes(gzip.decompress(seg_bytes))
    if image.shape != seg.shape:
        raise ValueError(f"shape mismatch in {sdist_path}: image {image.shape} vs segmentation {seg.shape}")
    if not np.allclose(image.affine, seg.affine, atol=1e-3):
        raise ValueError(f"affine mismatch in {sdist_path}:\nimage\n{image.affine}\nsegmentation\n{seg.affine}")
    label = totalseg_to_btcv(np.asanyarray(seg.dataobj))

    header = image.header.copy()  # the image's geometry (qform, sform, codes, pixdim) for the label
    header.set_data_dtype(np.uint8)
    header.set_slope_inter(1.0, 0.0)
    header["cal_min"], header["cal_max"] = 0, 13
    header["descrip"] = b"BTCV ids from TotalSegmentator 2.18.0"
    label_img = nib.Nifti1Image(label, None, header=header)

    dest.mkdir(parents=True, exist_ok=True)
    _atomic_write(dest / IMAGE_NAME, lambda p: p.write_bytes(image_bytes))
    _atomic_write(dest / LABEL_NAME, lambda p: nib.save(label_img, p))
    written = nib.load(dest / LABEL_NAME)
    if written.shape != image.shape or not np.array_equal(written.affine, image.affine):
        raise RuntimeError(f"written label geometry differs from the image: {written.affine} vs {image.affine}")

    try:
        names = btcv_label_names()
    except (OSError, ValueError, KeyError) as e:
        logger.warning("BTCV names unavailable (%s); logging ids", e)
        names = {i: str(i) for i in range(14)}
    counts = np.bincount(label.ravel(), minlength=14)
    present = [i for i in range(1, 14) if counts[i] > 0]
    absent = [i for i in range(1, 14) if counts[i] == 0]
    logger.info(
        "BTCV organs present (%d/13): %s; absent: %s",
        len(present),
        ", ".join(names[i] for i in present),
        ", ".join(names[i] for i in absent) or "none",
    )
    if len(present) < 12:
        logger.warning("expected 12 of the 13 BTCV organs in the TotalSegmentator example, found %d", len(present))

    provenance = {
        "package": "TotalSegmentator",
        "pypi_name": PACKAGE,
        "version": VERSION,
        "sdist": SDIST_NAME,
        "sdist_sha256": digest,
        "sdist_url": f"https://pypi.org/project/{PACKAGE}/{VERSION}/",
        "source_files": {"image": IMAGE_MEMBER, "label": SEG_MEMBER},
        "licence": LICENCE,
        "id_mapping_totalsegmentator_to_btcv": {str(k): v for k, v in TOTALSEG_TO_BTCV.items()},
        "totalsegmentator_names": {str(k): v for k, v in ts_names.items()},
        "btcv_names": {str(k): v for k, v in names.items()},
        "note": LABEL_NOTE,
        "image_shape": list(image.shape),
        "voxel_size_mm": [float(z) for z in image.header.get_zooms()[:3]],
        "btcv_voxel_counts": {str(i): int(counts[i]) for i in range(1, 14)},
        "btcv_organs_present": [names[i] for i in present],
        "btcv_organs_absent": [names[i] for i in absent],
        "outputs": {
            IMAGE_NAME: {"sha256": _sha256(dest / IMAGE_NAME), "content": "CT in HU, unchanged from the sdist"},
            LABEL_NAME: {"sha256": _sha256(dest / LABEL_NAME), "content": "uint8 BTCV ids 0..13"},
        },
    }
    _atomic_write(dest / PROVENANCE_NAME, lambda p: p.write_text(json.dumps(provenance, indent=2) + "\n"))
    return _outputs(dest)


def main(dest_dir: str, sdist: str | None = None, cache_dir: str | None = None) -> None:
    """Command line: fetch the sample CT and print where it went."""
    out = fetch_sample_ct(dest_dir, sdist=sdist, cache_dir=cache_dir)
    print(f"image {out['image']}  label {out['label']}  (labels: TotalSegmentator predictions, see {PROVENANCE_NAME})")


if __name__ == "__main__":
    from tools.common.cli import fire_command

    fire_command(main)
