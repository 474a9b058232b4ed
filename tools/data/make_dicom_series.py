"""Write a volume as a DICOM CT series (one file per slice) with exact geometry.

Used to build DICOM test inputs from NIfTI-style data: an array indexed (i, j, k) and a RAS
affine. Each slice k is written with ImagePositionPatient, ImageOrientationPatient and
PixelSpacing derived from the affine (converted to DICOM's LPS), so a DICOM reader recovers
the same voxel-to-world mapping.
"""

from __future__ import annotations

import os

import fire
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

__all__ = ["write_dicom_series"]

RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


def _decimal(values) -> list[str]:
    return [f"{float(v):.6f}" for v in values]


def write_dicom_series(
    volume: np.ndarray,
    affine: np.ndarray,
    output_dir: str,
    patient_id: str = "PHANTOM",
    series_description: str = "synthetic CT",
) -> list[str]:
    """Write ``volume`` (HU, indexed i, j, k) with RAS ``affine`` as one DICOM file per k-slice.

    The affine's k axis must follow the right-handed slice normal (det of its 3x3 part > 0),
    which is how DICOM readers order slices. Returns the written file paths.
    """
    volume = np.asarray(volume)
    affine = np.asarray(affine, dtype=float)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    if np.linalg.det(affine[:3, :3]) <= 0:
        raise ValueError("the affine's slice axis must be right-handed (det > 0) for a DICOM series")
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    lps = RAS_TO_LPS @ affine[:3, :3]
    row_dir, col_dir = lps[:, 0] / spacing[0], lps[:, 1] / spacing[1]
    os.makedirs(output_dir, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    pixels = np.clip(np.round(volume), -32768, 32767).astype(np.int16)
    paths = []
    for k in range(volume.shape[2]):
        position = RAS_TO_LPS @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = os.path.join(output_dir, f"slice{k:04d}.dcm")
        ds = FileDataset(path, {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientID = ds.PatientName = patient_id
        # Type 2 attributes of the Patient and General Study modules: present, empty (DICOM SEG writers copy them)
        ds.PatientBirthDate = ds.PatientSex = ds.StudyDate = ds.StudyTime = ""
        ds.ReferringPhysicianName = ds.StudyID = ds.AccessionNumber = ""
        ds.Modality, ds.SeriesDescription, ds.SeriesNumber, ds.InstanceNumber = "CT", series_description, 1, k + 1
        ds.ImagePositionPatient = _decimal(position)
        ds.ImageOrientationPatient = _decimal([*row_dir, *col_dir])
        ds.PixelSpacing = _decimal([spacing[1], spacing[0]])  # between rows (j), between columns (i)
        ds.SliceThickness = f"{spacing[2]:.6f}"
        ds.Rows, ds.Columns = volume.shape[1], volume.shape[0]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = "0", "1"
        ds.PixelData = np.ascontiguousarray(pixels[:, :, k].T).tobytes()  # rows follow j, columns follow i
        pydicom.dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def nifti_to_dicom_series(nifti_path: str, output_dir: str) -> list[str]:
    """Command line: convert a NIfTI CT volume into a DICOM series folder."""
    import nibabel as nib

    image = nib.load(nifti_path)
    return write_dicom_series(np.asarray(image.dataobj), image.affine, output_dir)


if __name__ == "__main__":
    fire.Fire(nifti_to_dicom_series)
