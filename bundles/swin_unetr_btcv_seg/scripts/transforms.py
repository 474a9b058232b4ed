# Generated from bundles/common/scripts/transforms.py: edit that, then run python -m tools sync_bundle_code
"""Transforms that config alone cannot express."""

from __future__ import annotations

import os
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

from monai.config import PathLike
from monai.data import ITKReader
from monai.transforms import LoadImaged, Spacingd
from monai.utils import ensure_tuple, optional_import

from .bundle_logger import logger
from .dicom_series import non_image_kind

itk, _ = optional_import("itk", allow_namespace_pkg=True)

__all__ = ["PathTolerantSpacingd", "DicomSeriesReader", "DicomLoadImaged"]


class PathTolerantSpacingd(Spacingd):
    """``Spacingd`` that leaves string entries such as MONAI Label's ``image_path`` alone.

    monai 1.6.1 ``Spacingd`` treats every ``<key>_*`` entry of a NIfTI sample as a metadata
    dictionary and calls ``.update()`` on it, so the ``image_path`` string that MONAI Label puts
    into the data dictionary raises ``AttributeError``. This subclass hides non-dictionary
    ``<key>_*`` entries during the call and puts them back unchanged afterwards.
    """

    def __call__(self, data: Mapping[Hashable, Any], lazy: bool | None = None) -> dict[Hashable, Any]:
        d = dict(data)
        prefixes = tuple(f"{key}_" for key in self.keys)
        hidden = {
            k: d.pop(k)
            for k in list(d)
            if isinstance(k, str) and k.startswith(prefixes) and not isinstance(d[k], Mapping)
        }
        out = super().__call__(d, lazy=lazy)
        out.update(hidden)
        return out


class DicomSeriesReader(ITKReader):
    """``ITKReader`` for DICOM series folders that reads the folder's image series, not a non-image object.

    monai's ``ITKReader`` reads the first series GDCM lists in a folder: a segmentation (SEG) stored
    beside the CT slices can come first and be read instead of the CT, without an error. This reader
    accepts folders only (files go to monai's usual readers) and, when GDCM lists several series,
    reads the one whose files are image slices (``dicom_series.non_image_kind``).
    """

    def verify_suffix(self, filename: Sequence[PathLike] | PathLike) -> bool:
        return all(os.path.isdir(f) for f in ensure_tuple(filename))

    def read(self, data: Sequence[PathLike] | PathLike, **kwargs):
        images = []
        for folder in ensure_tuple(data):
            self.series_name = _image_series_id(str(folder))
            images.append(super().read(folder, **kwargs))
        self.series_name = ""
        return images if len(images) > 1 else images[0]


def _image_series_id(folder: str) -> str:
    """The GDCM series identifier of the only image series of ``folder``, or "" (let ``ITKReader`` choose)."""
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(True)  # as ITKReader does
    names.AddSeriesRestriction("0008|0021")
    names.SetDirectory(folder)
    ids = list(names.GetSeriesUIDs())
    if len(ids) < 2:
        return ""
    images = [i for i in ids if not non_image_kind(names.GetFileNames(i)[0])]
    if len(images) == 1:
        logger.info(f"{folder}: reading image series {images[0]}; {len(ids) - 1} non-image series left aside")
        return images[0]
    return ""


class DicomLoadImaged(LoadImaged):
    """``LoadImaged`` that reads DICOM series folders with ``DicomSeriesReader`` and everything else as monai does."""

    def __init__(self, keys, *args, **kwargs):
        super().__init__(keys, *args, **kwargs)
        self.register(DicomSeriesReader())
