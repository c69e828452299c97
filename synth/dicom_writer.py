"""Writing the synthetic PET and CT series as DICOM files.

:func:`write_pet_series` and :func:`write_ct_series` write one classic image file per slice (PET
Image Storage, CT Image Storage), explicit VR little endian, with the header a de-identifying site
would send: pseudonym as name and ID, shifted dates, the DICOM PS3.15 de-identification attributes,
full PET isotope information, all taken from a :class:`synth.dicom_header.PetSeriesHeader` or
:class:`synth.dicom_header.CtSeriesHeader`.

The grid is a :class:`corelab.grid.Grid`: arrays are indexed (plane, row, col); ``voxel_mm`` is
(slice spacing, row spacing, column spacing); ``origin_mm`` is the DICOM patient (LPS) position of
the centre of voxel [0, 0, 0]; columns run along +x, rows along +y, planes along +z
(ImageOrientationPatient [1, 0, 0, 0, 1, 0]). The kernel (:mod:`corelab.dicomio`) reads what this
module writes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, UID
from pydicom.valuerep import format_number_as_ds

from corelab.grid import Grid
from synth.dicom_header import (CT_IMAGE_STORAGE, HEADFIRST_CODE, PET_IMAGE_STORAGE, RECUMBENT_CODE, SUPINE_CODE,
                                CtSeriesHeader, PetSeriesHeader, SeriesHeader, format_da, format_dt, format_tm,
                                sop_instance_uid)

__all__ = ["write_pet_series", "write_ct_series"]


#: Implementation identity of the files this module writes.
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")
IMPLEMENTATION_VERSION_NAME = "CORELAB_DICOMIO"

_INT16_MAX = 32767
_UINT16_MAX = 65535
_CT_RESCALE_INTERCEPT_HU = -1024.0


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit), exact where it fits."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if len(text) <= 16 and "e" not in text:
        return text
    return format_number_as_ds(value)


def _set(ds: Dataset, keyword: str, value: Any, *, type2: bool = False) -> None:
    """Set ``keyword`` to ``value``; None omits it, or writes it empty when Type 2."""
    if value is None:
        if type2:
            setattr(ds, keyword, None)
        elif keyword in ds:
            delattr(ds, keyword)
        return
    setattr(ds, keyword, value)


def _check_keywords(overrides: Mapping[str, Any], what: str) -> None:
    unknown = [k for k in overrides if pydicom.datadict.tag_for_keyword(k) is None]
    if unknown:
        raise ValueError(f"{what}: {unknown} are not DICOM keywords")


def _apply_overrides(target: Dataset, overrides: Mapping[str, Any]) -> None:
    _check_keywords(overrides, "override")
    for keyword, value in overrides.items():
        _set(target, keyword, value)


def _file_meta(sop_class: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = IMPLEMENTATION_CLASS_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    return meta


def _common_dataset(header: SeriesHeader, sop_class: UID) -> Dataset:
    """Patient, study, series, equipment, frame of reference and de-identification modules."""
    h = header
    frac = h.tm_fraction_digits
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = sop_class
    # Patient module
    _set(ds, "PatientName", h.patient_name, type2=True)
    _set(ds, "PatientID", h.patient_id, type2=True)
    ds.PatientBirthDate = None  # Type 2: removed by de-identification, kept empty
    _set(ds, "PatientSex", h.patient_sex, type2=True)
    _set(ds, "PatientIdentityRemoved", None if h.patient_identity_removed is None
         else ("YES" if h.patient_identity_removed else "NO"))
    if h.patient_identity_removed:
        _set(ds, "DeidentificationMethod", h.deidentification_method)
        if h.deidentification_codes:
            ds.DeidentificationMethodCodeSequence = DicomSequence(
                [c.to_item() for c in h.deidentification_codes]
            )
    # Patient Study module
    _set(ds, "PatientAge", h.patient_age)
    _set(ds, "PatientSize", None if h.patient_size_m is None else _ds(h.patient_size_m))
    _set(ds, "PatientWeight", None if h.patient_weight_kg is None else _ds(h.patient_weight_kg))
    # General Study module
    ds.StudyInstanceUID = h.study_uid
    ds.StudyDate = format_da(h.study_datetime)
    ds.StudyTime = format_tm(h.study_datetime, fraction_digits=frac)
    ds.ReferringPhysicianName = None
    _set(ds, "StudyID", h.study_id, type2=True)
    _set(ds, "AccessionNumber", h.accession_number, type2=True)
    _set(ds, "StudyDescription", h.study_description)
    # General Series module
    ds.Modality = h.modality  # type: ignore[attr-defined]
    ds.SeriesInstanceUID = h.series_uid
    _set(ds, "SeriesNumber", h.series_number, type2=True)
    ds.SeriesDate = format_da(h.series_datetime)
    ds.SeriesTime = format_tm(h.series_datetime, fraction_digits=frac)
    _set(ds, "SeriesDescription", h.series_description)
    _set(ds, "BodyPartExamined", h.body_part_examined)
    # Type 2C, required for paired body parts; dciodvfy wants it present, and empty is honest
    # for a whole-body or trunk scan.
    ds.Laterality = None
    # Clinical Trial Subject / Study / Series modules
    if h.clinical_trial_protocol_id is not None:
        ds.ClinicalTrialSponsorName = h.clinical_trial_sponsor or "UNKNOWN"
        ds.ClinicalTrialProtocolID = h.clinical_trial_protocol_id
        _set(ds, "ClinicalTrialProtocolName", h.clinical_trial_protocol_name, type2=True)
        _set(ds, "ClinicalTrialSiteID", h.clinical_trial_site_id, type2=True)
        _set(ds, "ClinicalTrialSiteName", h.clinical_trial_site_name, type2=True)
        ds.ClinicalTrialSubjectID = h.clinical_trial_subject_id or h.patient_id or "UNKNOWN"
        _set(ds, "ClinicalTrialTimePointID", h.clinical_trial_time_point_id, type2=True)
        _set(ds, "ClinicalTrialTimePointDescription", h.clinical_trial_time_point_description)
        ds.ClinicalTrialCoordinatingCenterName = None
    # General Equipment module
    _set(ds, "Manufacturer", h.manufacturer, type2=True)
    _set(ds, "InstitutionName", h.institution_name)
    _set(ds, "StationName", h.station_name)
    _set(ds, "ManufacturerModelName", h.model)
    _set(ds, "DeviceSerialNumber", h.device_serial_number)
    _set(ds, "SoftwareVersions", h.software_versions)
    # Frame of Reference module
    ds.FrameOfReferenceUID = h.frame_of_reference_uid
    ds.PositionReferenceIndicator = None
    # General Image module
    ds.AcquisitionDate = format_da(h.acquisition)
    ds.AcquisitionTime = format_tm(h.acquisition, fraction_digits=frac)
    ds.ContentDate = format_da(h.acquisition)
    ds.ContentTime = format_tm(h.acquisition, fraction_digits=frac)
    ds.BurnedInAnnotation = "NO"
    _set(ds, "LongitudinalTemporalInformationModified",
         h.longitudinal_temporal_information_modified if h.patient_identity_removed else None)
    # Image Pixel module (common part)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    return ds


def _radiopharmaceutical_item(h: PetSeriesHeader) -> Dataset:
    item = Dataset()
    _set(item, "Radiopharmaceutical", h.radiopharmaceutical)
    if h.radiopharmaceutical_code is not None:
        item.RadiopharmaceuticalCodeSequence = DicomSequence([h.radiopharmaceutical_code.to_item()])
    _set(item, "RadiopharmaceuticalRoute", h.radiopharmaceutical_route)
    if h.injection_datetime is not None:
        frac = h.tm_fraction_digits
        item.RadiopharmaceuticalStartTime = format_tm(h.injection_datetime, fraction_digits=frac)
        if h.write_start_datetime:
            item.RadiopharmaceuticalStartDateTime = format_dt(h.injection_datetime,
                                                              fraction_digits=frac)
    _set(item, "RadionuclideTotalDose", None if h.dose_bq is None else _ds(h.dose_bq))
    _set(item, "RadionuclideHalfLife", None if h.half_life_s is None else _ds(h.half_life_s))
    _set(item, "RadionuclidePositronFraction",
         None if h.positron_fraction is None else _ds(h.positron_fraction))
    # Radionuclide Code Sequence is Type 2 in the item: present, possibly empty.
    item.RadionuclideCodeSequence = DicomSequence(
        [] if h.radionuclide_code is None else [h.radionuclide_code.to_item()]
    )
    _apply_overrides(item, h.radiopharm_extra)
    return item


def _frame_decay(frame_duration_ms: float, half_life_s: float | None) -> tuple[float, float]:
    """Decay factor and frame reference time (ms) of a frame decay-corrected to its start.

    The factor is the mean over the frame of exp(lambda t), i.e. lambda T / (1 - exp(-lambda T));
    the frame reference time is the time t_ref with exp(lambda t_ref) equal to that factor.
    """
    duration_s = frame_duration_ms / 1000.0
    if not half_life_s or duration_s <= 0:
        return 1.0, duration_s * 500.0
    lam = math.log(2.0) / half_life_s
    factor = lam * duration_s / -math.expm1(-lam * duration_s)
    return factor, math.log(factor) / lam * 1000.0


def _pet_dataset(h: PetSeriesHeader, n_planes: int) -> Dataset:
    ds = _common_dataset(h, PET_IMAGE_STORAGE)
    ds.ImageType = list(h.image_type)
    # PET Series module
    ds.Units = h.units
    ds.CountsSource = h.counts_source
    ds.SeriesType = list(h.series_type)
    ds.CorrectedImage = list(h.corrected_image)
    ds.NumberOfSlices = n_planes
    ds.DecayCorrection = h.decay_correction
    _set(ds, "CollimatorType", h.collimator_type, type2=True)
    _set(ds, "ReconstructionMethod", h.reconstruction_method)
    _set(ds, "ConvolutionKernel", h.convolution_kernel)
    _set(ds, "RandomsCorrectionMethod", h.randoms_correction_method)
    _set(ds, "AttenuationCorrectionMethod", h.attenuation_correction_method)
    _set(ds, "ScatterCorrectionMethod", h.scatter_correction_method)
    # PET Isotope module
    ds.RadiopharmaceuticalInformationSequence = DicomSequence([_radiopharmaceutical_item(h)])
    # NM/PET Patient Orientation module (PatientPosition must then be absent for PET)
    orientation = RECUMBENT_CODE.to_item()
    orientation.PatientOrientationModifierCodeSequence = DicomSequence([SUPINE_CODE.to_item()])
    ds.PatientOrientationCodeSequence = DicomSequence([orientation])
    ds.PatientGantryRelationshipCodeSequence = DicomSequence([HEADFIRST_CODE.to_item()])
    # PET Image module
    decay_factor, frame_reference_ms = _frame_decay(h.frame_duration_ms, h.half_life_s)
    ds.ActualFrameDuration = int(h.frame_duration_ms)
    ds.FrameReferenceTime = _ds(round(frame_reference_ms, 3))
    if h.decay_correction != "NONE":
        ds.DecayFactor = _ds(round(decay_factor, 6))
    ds.PixelRepresentation = 1  # signed: noise can make reconstructed values negative
    ds.RescaleIntercept = "0"  # PET Image module: Rescale Intercept shall be 0
    return ds


def _ct_dataset(h: CtSeriesHeader) -> Dataset:
    ds = _common_dataset(h, CT_IMAGE_STORAGE)
    ds.ImageType = list(h.image_type)
    ds.PatientPosition = h.patient_position
    _set(ds, "KVP", None if h.kvp is None else _ds(h.kvp), type2=True)
    _set(ds, "Exposure", None if h.exposure_mas is None else int(round(h.exposure_mas)))
    _set(ds, "XRayTubeCurrent",
         None if h.xray_tube_current_ma is None else int(round(h.xray_tube_current_ma)))
    _set(ds, "ConvolutionKernel", h.convolution_kernel)
    ds.AcquisitionNumber = 1
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = _ds(_CT_RESCALE_INTERCEPT_HU)
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    return ds


def _check_volume(volume: np.ndarray, grid: Grid, what: str) -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3 or tuple(array.shape) != tuple(grid.shape):
        raise ValueError(f"{what} has shape {array.shape}, the grid says {tuple(grid.shape)} "
                         "(planes, rows, cols)")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _set_geometry(ds: Dataset, grid: Grid, plane: int) -> None:
    """Image Plane module for one plane of the grid."""
    slice_mm, row_mm, col_mm = (float(v) for v in grid.voxel_mm)
    x0, y0, z0 = (float(v) for v in grid.origin_mm)
    z_mm = z0 + plane * slice_mm
    ds.ImagePositionPatient = [_ds(round(x0, 4)), _ds(round(y0, 4)), _ds(round(z_mm, 4))]
    ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
    ds.PixelSpacing = [_ds(row_mm), _ds(col_mm)]
    ds.SliceThickness = _ds(slice_mm)
    ds.SliceLocation = _ds(round(z_mm, 4))
    ds.Rows = int(grid.shape[1])
    ds.Columns = int(grid.shape[2])


def _pet_slice_scaling(plane_values: np.ndarray) -> tuple[np.ndarray, float]:
    """int16 stored values and the RescaleSlope for one slice.

    As scanners do, the slope is chosen per slice so that the slice's largest magnitude maps to
    the int16 maximum; quantisation error is then at most slope / 2 per voxel.
    """
    peak = float(np.max(np.abs(plane_values))) if plane_values.size else 0.0
    slope = peak / _INT16_MAX if peak > 0 else 1.0
    # Round the slope to what DS can carry, then quantise with the slope actually written.
    slope = float(_ds(slope))
    stored = np.clip(np.rint(plane_values / slope), -_INT16_MAX, _INT16_MAX).astype("<i2")
    return stored, slope


def _save(ds: Dataset, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _write_series(
    out_dir: Path,
    base: Dataset,
    grid: Grid,
    header: SeriesHeader,
    pixel_planes: Iterable[tuple[int, np.ndarray, dict[str, Any]]],
) -> list[Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for plane, stored, per_slice in pixel_planes:
        instance_number = plane + 1
        uid = sop_instance_uid(header.series_uid, instance_number)
        base.SOPInstanceUID = uid
        base.file_meta.MediaStorageSOPInstanceUID = uid
        base.InstanceNumber = instance_number
        _set_geometry(base, grid, plane)
        for keyword, value in per_slice.items():
            setattr(base, keyword, value)
        base.PixelData = stored.tobytes()
        _apply_overrides(base, header.extra)
        path = out_dir / f"{instance_number:04d}.dcm"
        _save(base, path)
        paths.append(path)
    return paths


def write_pet_series(
    out_dir: Path | str,
    activity_bq_ml: np.ndarray,
    grid: Grid,
    header: PetSeriesHeader,
    *,
    omit_planes: Iterable[int] = (),
) -> list[Path]:
    """Write a PET series, one PET Image Storage file per plane.

    Parameters
    ----------
    out_dir : path
        Directory for the files, named ``0001.dcm`` ... by InstanceNumber (= plane index + 1).
    activity_bq_ml : ndarray of shape (planes, rows, cols)
        Image values in the units of ``header.units`` (Bq/mL for BQML), decay-corrected as
        ``header.decay_correction`` says.
    grid : Grid
        Geometry; ``grid.shape`` must equal ``activity_bq_ml.shape``.
    header : PetSeriesHeader
    omit_planes : iterable of int
        Plane indices not written (a lost slice); NumberOfSlices still counts them.

    Returns
    -------
    list of Path
        The files written, in plane order.
    """
    values = _check_volume(activity_bq_ml, grid, "activity_bq_ml").astype(np.float64)
    _check_keywords(header.extra, "PetSeriesHeader.extra")
    skip = {int(p) for p in omit_planes}
    base = _pet_dataset(header, int(grid.shape[0]))

    def planes() -> Iterable[tuple[int, np.ndarray, dict[str, Any]]]:
        for plane in range(values.shape[0]):
            if plane in skip:
                continue
            stored, slope = _pet_slice_scaling(values[plane])
            per_slice = {
                "ImageIndex": plane + 1,
                "RescaleSlope": _ds(slope),
                "SmallestImagePixelValue": int(stored.min()),
                "LargestImagePixelValue": int(stored.max()),
            }
            yield plane, stored, per_slice

    # Smallest/LargestImagePixelValue are US or SS by PixelRepresentation: fix their VR as SS.
    base.SmallestImagePixelValue = 0
    base["SmallestImagePixelValue"].VR = "SS"
    base.LargestImagePixelValue = 0
    base["LargestImagePixelValue"].VR = "SS"
    return _write_series(Path(out_dir), base, grid, header, planes())


def write_ct_series(
    out_dir: Path | str,
    hu: np.ndarray,
    grid: Grid,
    header: CtSeriesHeader,
) -> list[Path]:
    """Write a CT series, one CT Image Storage file per plane.

    Parameters
    ----------
    out_dir : path
        Directory for the files, ``0001.dcm`` ...
    hu : ndarray of shape (planes, rows, cols)
        CT numbers in HU; stored as unsigned 16-bit with RescaleIntercept -1024 and slope 1,
        rounded to integer HU and clipped to [-1024, 64511].
    grid : Grid
    header : CtSeriesHeader

    Returns
    -------
    list of Path
    """
    values = _check_volume(hu, grid, "hu")
    _check_keywords(header.extra, "CtSeriesHeader.extra")
    base = _ct_dataset(header)

    def planes() -> Iterable[tuple[int, np.ndarray, dict[str, Any]]]:
        for plane in range(values.shape[0]):
            stored = np.clip(np.rint(values[plane] - _CT_RESCALE_INTERCEPT_HU), 0, _UINT16_MAX)
            yield plane, stored.astype("<u2"), {}

    return _write_series(Path(out_dir), base, grid, header, planes())
