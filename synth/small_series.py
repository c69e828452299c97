"""Small de-identified PET series built slice by slice: for the receiver tests, the hostile-input tests
and the receive benchmark (protocol and store, not image content).

Unlike the trial writer (:mod:`synth.dicom_writer`), every slice carries the same pixels and the
header is the minimum a trial PET slice needs; it is fast enough to write thousands of slices.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

__all__ = ["pet_slice", "write_pet_slices"]


def pet_slice(*, study: str, series: str, frame: str, pixels: bytes, matrix: int, index: int = 0, n: int = 1):
    """Slice ``index`` of ``n`` of a de-identified PET series (PET Image Storage, Bq/mL, explicit VR LE).

    ``pixels``: ``matrix`` x ``matrix`` uint16 bytes. The slices are 2 mm apart, the first at z = 0.
    """

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
    ds.Modality, ds.PatientName, ds.PatientID = "PT", "BENCH-001", "BENCH-001"
    ds.PatientIdentityRemoved, ds.DeidentificationMethod = "YES", "PS3.15 E basic profile"
    ds.PatientSex, ds.PatientWeight = "F", 70
    ds.StudyDate = ds.SeriesDate = "20260101"
    ds.SeriesTime = "100000"
    ds.InstanceNumber, ds.NumberOfSlices, ds.ImageIndex = index + 1, n, index + 1
    ds.ImagePositionPatient = [-300.0, -300.0, -2.0 * index]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [4.0, 4.0], 2.0
    ds.Units, ds.DecayCorrection, ds.CorrectedImage = "BQML", "START", ["ATTN", "DECY"]
    item = Dataset()
    item.RadiopharmaceuticalStartDateTime = "20260101090000"
    item.RadionuclideTotalDose, item.RadionuclideHalfLife = 250e6, 6586.2
    ds.RadiopharmaceuticalInformationSequence = Sequence([item])
    ds.Rows = ds.Columns = matrix
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0
    ds.PixelData = pixels
    return ds



def write_pet_slices(outdir: Path, n: int, matrix: int) -> list[Path]:
    """``n`` de-identified PET slices of one series (see :func:`pet_slice`)."""
    outdir.mkdir(parents=True, exist_ok=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 30000, size=(matrix, matrix), dtype=np.uint16).tobytes()
    paths = []
    for i in range(n):
        ds = pet_slice(study=study, series=series, frame=frame, pixels=pixels, matrix=matrix, index=i, n=n)
        path = outdir / f"pet{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths
