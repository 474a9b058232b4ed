# Generated from bundles/common/scripts/dicom_series.py: edit that, then run python -m tools sync_bundle_code
"""DICOM series folders: which files are image slices, and whether they form one complete, evenly spaced series.

A folder is one volume. Its non-image objects (RT structure sets, segmentations, structured reports,
presentation states: by SOPClassUID, or by Modality when a file has no SOPClassUID) are set aside and
reported, not read as slices. The image files left must be ONE series (SeriesInstanceUID; an empty
or missing one, as some anonymisers leave it, stands for "the series of this folder"), each file
readable with its complete pixel data, all slices with one orientation and an even spacing along
the slice normal. A removed slice shows as a gap of twice the spacing; ITK would only warn about it
and return a volume with the wrong slice spacing, mis-registered.

Only headers are read (pixel data is skipped; its length is compared with the file size), so a
check costs a fraction of reading the volume.

This module imports nothing from its package: ``tools/ssl_datalist.py`` loads this file by path from
``bundles/common/scripts`` so that the bundles and the tool check folders with the same code.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pydicom

__all__ = [
    "NON_IMAGE_SOP_CLASSES",
    "NON_IMAGE_MODALITIES",
    "SPACING_TOLERANCE",
    "SeriesReport",
    "is_dicom_file",
    "dicom_files",
    "non_image_kind",
    "inspect_series",
]

# Storage SOP classes that are not image slices of a series, with a short name (all SR classes too)
NON_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.481.3": "RTSTRUCT",
    "1.2.840.10008.5.1.4.1.1.481.2": "RTDOSE",
    "1.2.840.10008.5.1.4.1.1.481.5": "RTPLAN",
    "1.2.840.10008.5.1.4.1.1.481.4": "RTRECORD",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66.1": "REG",
    "1.2.840.10008.5.1.4.1.1.11.1": "PR",
    "1.2.840.10008.5.1.4.1.1.104.1": "DOC",
}
SR_SOP_CLASS_PREFIX = "1.2.840.10008.5.1.4.1.1.88."
# Modalities of non-image objects, used for files without a SOPClassUID
NON_IMAGE_MODALITIES = frozenset({"RTSTRUCT", "RTDOSE", "RTPLAN", "RTRECORD", "SEG", "REG", "SR", "PR", "KO", "DOC"})
# A slice gap may differ from the series' median gap by this fraction (at least 0.01 mm)
SPACING_TOLERANCE = 0.1
_DICM_OFFSET = 128
_PIXEL_DATA = 0x7FE00010
_UNDEFINED_LENGTH = 0xFFFFFFFF
_LISTED = 5


@dataclass
class SeriesReport:
    """What ``inspect_series`` found in one folder; ``problems`` empty means the series is fit to load."""

    folder: str
    series: str = ""
    modality: str = ""
    num_slices: int = 0
    spacing: float | None = None
    ignored: list[str] = field(default_factory=list)
    other_files: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    non_image_only: bool = False

    def ignored_text(self) -> str:
        """``"2 non-image object(s) (RTSTRUCT rt.dcm, SEG seg.dcm)"`` for a log line."""
        return f"{len(self.ignored)} non-image object(s) ({_few(self.ignored)})"


def _few(items: list[str], limit: int = _LISTED) -> str:
    text = ", ".join(items[:limit])
    return text + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


def is_dicom_file(path: str) -> bool:
    """``.dcm``/``.ima`` files, and other non-hidden files (not ``DICOMDIR``) with the ``DICM`` magic at byte 128."""
    name = os.path.basename(path)
    if name.startswith(".") or name.upper() == "DICOMDIR":
        return False
    if name.lower().endswith((".dcm", ".ima")):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(_DICM_OFFSET)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def dicom_files(folder: str) -> list[str]:
    """Sorted paths of the DICOM files directly inside ``folder`` (not in its subfolders)."""
    entries = sorted(os.scandir(folder), key=lambda e: e.name)
    return [e.path for e in entries if e.is_file() and is_dicom_file(e.path)]


def _text(ds, keyword: str) -> str:
    return str(getattr(ds, keyword, "") or "").strip()


def _non_image_kind(ds) -> str | None:
    """The short name of a non-image object (e.g. ``"RTSTRUCT"``), or None for an image slice."""
    sop = _text(ds, "SOPClassUID")
    if sop in NON_IMAGE_SOP_CLASSES:
        return NON_IMAGE_SOP_CLASSES[sop]
    if sop.startswith(SR_SOP_CLASS_PREFIX):
        return "SR"
    modality = _text(ds, "Modality").upper()
    return modality if not sop and modality in NON_IMAGE_MODALITIES else None


def _pixel_data_problem(ds, path: str) -> str | None:
    """Why the slice's pixel data is missing or incomplete (truncated file), or None."""
    raw = ds._dict.get(_PIXEL_DATA) if hasattr(ds, "_dict") else None
    if raw is None:
        return "has no pixel data (truncated header?)"
    length, start = getattr(raw, "length", None), getattr(raw, "value_tell", None)
    if length is None or start is None or length == _UNDEFINED_LENGTH:
        return None  # compressed (encapsulated) pixel data: pydicom parsed it to its end
    size = os.path.getsize(path)
    if start + length > size:
        return f"is truncated: {size} bytes on disk, its pixel data ends at byte {start + length}"
    try:
        frames = int(_text(ds, "NumberOfFrames") or 1)
        needed = (
            int(ds.Rows)
            * int(ds.Columns)
            * int(getattr(ds, "SamplesPerPixel", 1) or 1)
            * frames
            * ((int(ds.BitsAllocated) + 7) // 8)
        )
    except (AttributeError, TypeError, ValueError):
        return "has an incomplete header (Rows, Columns or BitsAllocated missing)"
    if length < needed:
        return f"holds {length} bytes of pixel data, {ds.Rows} x {ds.Columns} x {frames} pixels need {needed}"
    return None


def _read_header(path: str):
    """The file's dataset, with pixel data left on disk (``defer_size``), read leniently (``force``)."""
    return pydicom.dcmread(path, force=True, defer_size=256)


def non_image_kind(path: str) -> str | None:
    """The short name (e.g. ``"SEG"``) if the DICOM file at ``path`` is a non-image object, else None."""
    return _non_image_kind(pydicom.dcmread(path, force=True, stop_before_pixels=True))


def _series_key(ds, folder: str) -> str:
    return _text(ds, "SeriesInstanceUID") or f"(empty SeriesInstanceUID: folder {folder})"


def _several_series(folder: str, slices: list[tuple[str, object]]) -> str:
    counts = Counter(_series_key(ds, folder) for _, ds in slices)
    first = {}
    for _, ds in slices:
        first.setdefault(_series_key(ds, folder), ds)
    listing = "; ".join(
        f"{uid}: {n} file(s), Modality {_text(first[uid], 'Modality') or '?'}, "
        f"'{_text(first[uid], 'SeriesDescription')}'"
        for uid, n in sorted(counts.items())
    )
    return (
        f"{folder}: holds {len(counts)} series of images ({listing}); one folder must hold one series: "
        f"move each series into its own folder"
    )


def _geometry(ds) -> tuple[np.ndarray, np.ndarray] | None:
    try:
        return (
            np.asarray([float(v) for v in ds.ImagePositionPatient]),
            np.asarray([float(v) for v in ds.ImageOrientationPatient]),
        )
    except (AttributeError, TypeError, ValueError):
        return None


def _spacing_problems(report: SeriesReport, slices: list[tuple[str, object]]) -> list[str]:
    """Orientation and even slice spacing of the series' slices; sets ``report.spacing``."""
    folder, geometry = report.folder, []
    for path, ds in slices:
        found = _geometry(ds)
        if found is None or found[0].size != 3 or found[1].size != 6:
            return [f"{folder}: slice file {path} has no usable ImagePositionPatient/ImageOrientationPatient"]
        geometry.append((path, *found))
    orientation = geometry[0][2]
    tilted = [p for p, _, o in geometry if not np.allclose(o, orientation, atol=1e-3)]
    if tilted:
        return [f"{folder}: slices with another ImageOrientationPatient than {geometry[0][0]}: {_few(tilted)}"]
    normal = np.cross(orientation[:3], orientation[3:])
    ordered = sorted((float(position @ normal), path) for path, position, _ in geometry)
    gaps = np.diff([z for z, _ in ordered])
    report.spacing = float(np.median(gaps))
    tolerance = max(0.01, SPACING_TOLERANCE * report.spacing)
    problems = []
    for (z0, a), (_, b), gap in zip(ordered, ordered[1:], gaps):
        if gap < 0.01:
            problems.append(f"{folder}: slice files {a} and {b} lie at the same position ({z0:.2f} mm): a duplicate")
        elif abs(gap - report.spacing) > tolerance:
            problems.append(
                f"{folder}: {gap:.2f} mm between slice files {a} and {b} where the series' spacing is "
                f"{report.spacing:.2f} mm: about {round(gap / report.spacing) - 1} slice(s) missing "
                f"(or uneven spacing)"
            )
    return problems[:_LISTED] + (
        [f"{folder}: ... {len(problems) - _LISTED} more spacing problem(s)"] if len(problems) > _LISTED else []
    )


def _read_all(folder: str, files: list[str], report: SeriesReport) -> list[tuple[str, object]]:
    """Headers of the complete image files; unreadable or incomplete files and non-image objects go to the report."""
    slices = []
    for path in files:
        try:
            ds = _read_header(path)
        except Exception as e:  # noqa: BLE001 (pydicom raises many types for a damaged file)
            report.problems.append(f"{folder}: slice file {path} cannot be read ({type(e).__name__}: {e})")
            continue
        kind = _non_image_kind(ds)
        problem = None if kind else _pixel_data_problem(ds, path)
        if kind:
            report.ignored.append(f"{kind} {os.path.basename(path)}")
        elif problem:
            report.problems.append(f"{folder}: slice file {path} {problem}")
        else:
            slices.append((path, ds))
    return slices


def inspect_series(folder: str) -> SeriesReport:
    """Check a DICOM series folder; every problem found is in the report, naming the folder and the file.

    Problems: no DICOM (image) file; a file that cannot be read, or whose pixel data is missing or
    cut short; several image series in the folder (listed); slices in different orientations; two
    slices at one position; a gap between neighbouring slices that differs from the median spacing
    by more than ``SPACING_TOLERANCE`` (a missing slice). Non-image objects are listed in ``ignored``,
    the names of other files that are not DICOM (hidden ones aside) in ``other_files``.
    """
    folder = os.fspath(folder)
    report = SeriesReport(folder)
    try:
        files = dicom_files(folder)
        report.other_files = sorted(
            e.name for e in os.scandir(folder) if e.is_file() and not e.name.startswith(".") and e.path not in files
        )
    except OSError as e:
        report.problems.append(f"{folder}: cannot list the folder ({e})")
        return report
    slices = _read_all(folder, files, report)
    if not slices:
        if not report.problems:
            report.non_image_only = bool(report.ignored)
            what = f"only {report.ignored_text()}" if report.ignored else "no DICOM files"
            report.problems.append(f"{folder}: no image slices in the folder ({what})")
        return report
    if len({_series_key(ds, folder) for _, ds in slices}) > 1:
        report.problems.append(_several_series(folder, slices))
        return report
    report.series, report.modality = _series_key(slices[0][1], folder), _text(slices[0][1], "Modality").upper()
    report.num_slices = len(slices)
    frames = sum(int(_text(ds, "NumberOfFrames") or 1) for _, ds in slices)
    if len(slices) == 1 and frames == 1:
        report.problems.append(f"{folder}: a single image slice ({slices[0][0]}) is not a 3D volume")
    elif len(slices) > 1 and not report.problems:  # an unreadable slice would also show as a gap
        report.problems += _spacing_problems(report, slices)
    return report
