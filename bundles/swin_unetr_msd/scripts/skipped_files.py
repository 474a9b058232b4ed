# Generated from bundles/common/scripts/skipped_files.py: edit that, then run python -m tools sync_bundle_code
"""Entries of an input folder that are not read: the log lines that name them, so none is skipped silently.

One line per entry, or, when more than ``LISTED`` entries are left aside for the same reason, one
line with their count and the first names. Hidden entries (names starting with ``.``, such as
``.DS_Store``) are not reported.

This module imports nothing from its package: the tools load it by path from
``bundles/common/scripts`` (``tools.common.bundles.common_module``), as ``dicom_series``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

__all__ = ["LISTED", "MHD_DATA_SUFFIXES", "mhd_data_files", "skipped_lines"]

# entries named one by one per reason; beyond this, one line with the count
LISTED = 5
# voxel files of a MetaImage header (scan.mhd + scan.raw): read through the header, not skipped
MHD_DATA_SUFFIXES = (".raw", ".zraw")


def mhd_data_files(paths: Iterable[str]) -> set[str]:
    """The ``.raw``/``.zraw`` files among ``paths`` with the stem of an ``.mhd`` header among them, in its folder."""
    paths = list(paths)
    headers = {os.path.splitext(p)[0].lower() for p in paths if p.lower().endswith(".mhd")}
    return {p for p in paths if p.lower().endswith(MHD_DATA_SUFFIXES) and os.path.splitext(p)[0].lower() in headers}


def skipped_lines(folder: str, skipped: Iterable[tuple[str, str]]) -> list[str]:
    """Log lines for the entries of ``folder`` that are left aside, given as ``(name, why)`` pairs."""
    by_why: dict[str, list[str]] = {}
    for name, why in skipped:
        if not os.path.basename(name).startswith("."):
            by_why.setdefault(why, []).append(name)
    lines = []
    for why, names in by_why.items():
        if len(names) <= LISTED:
            lines += [f"{folder}: skipping {name} ({why})" for name in names]
        else:
            listed = ", ".join(names[:LISTED])
            lines.append(f"{folder}: skipping {len(names)} entries ({why}): {listed}, ... ({len(names) - LISTED} more)")
    return lines
