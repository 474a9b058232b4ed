# Generated from bundles/common/scripts/known_checkpoints.py: edit that, then run python -m tools sync_bundle_code
"""Published Swin UNETR checkpoints identified by content, with the patch-merging order they were trained with.

A whole-network checkpoint saved by MONAI or by research code records nothing about the order in
which its patch-merging layers concatenated the 8 sub-voxels (see ``patch_merging``). Files of this
project record it; for published files that do not, this table is the one place that says it.
A file is identified by the md5 of its bytes, computed only when a file has no record.

Every Swin UNETR checkpoint published so far was trained with monai <= 1.4, i.e. the "legacy" order.

Entries (md5 -> what the file is):

* ``50dd67a01b28a1d5487fd9ac27e682fb``: MONAI model zoo ``swin_unetr_btcv_segmentation``
  ``models/model.pt``, hosted as ``model_swin_unetr_btcv_segmentation_v1.pt``; md5 as listed in
  that bundle's ``large_files.yml`` (``hash_type: md5``; Project-MONAI/model-zoo commit 34338a0).
  A raw SwinUNETR state dict (feature size 48, 14 classes).

Not listed: the research code's ``swin_unetr.base_5000ep_f48_lr2e-4_pretrained.pt``
(``SwinUNETR/BTCV``), whose publisher gives no checksum; it was trained with monai <= 1.4, so use
it with ``patch_merging: legacy`` or convert it once (``tools/convert_checkpoint.py`` of the
project repository). Add a file here only with a source for its hash.

``KNOWN_CHECKPOINTS`` is a plain module-level mapping, read at every call, so code (and tests) may
register a file by adding its md5.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["KNOWN_CHECKPOINTS", "file_md5", "known_checkpoint"]

KNOWN_CHECKPOINTS: dict[str, dict[str, str]] = {
    "50dd67a01b28a1d5487fd9ac27e682fb": {
        "name": "model_swin_unetr_btcv_segmentation_v1.pt",
        "what": "MONAI model zoo swin_unetr_btcv_segmentation models/model.pt (raw state dict)",
        "source": "Project-MONAI/model-zoo models/swin_unetr_btcv_segmentation/large_files.yml",
        "patch_merging": "legacy",
    }
}

# md5 of files already hashed in this process: (real path, size, mtime_ns) -> md5
_HASHED: dict[tuple[str, int, int], str] = {}


def file_md5(path: str, chunk_size: int = 1 << 22) -> str:
    """The md5 hex digest of the file at ``path`` (remembered per path, size and modification time)."""
    stat = os.stat(path)
    key = (os.path.realpath(path), stat.st_size, stat.st_mtime_ns)
    if key not in _HASHED:
        digest = hashlib.md5(usedforsecurity=False)
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(chunk_size), b""):
                digest.update(chunk)
        _HASHED[key] = digest.hexdigest()
    return _HASHED[key]


def known_checkpoint(path: str) -> dict[str, str] | None:
    """The ``KNOWN_CHECKPOINTS`` entry (plus its ``md5``) of the file at ``path``, or None if it is not listed."""
    md5 = file_md5(path)
    entry = KNOWN_CHECKPOINTS.get(md5)
    return None if entry is None else {**entry, "md5": md5}
