"""DICOM reading and writing for PET and CT image series.

Writing
    :func:`write_pet_series` and :func:`write_ct_series` write one classic image file per slice
    (PET Image Storage, CT Image Storage), explicit VR little endian, with the header a
    de-identifying site would send: pseudonym as name and ID, shifted dates, the DICOM PS3.15
    de-identification attributes, full PET isotope information. Everything in the header comes
    from a :class:`PetSeriesHeader` or :class:`CtSeriesHeader`; a field left ``None`` means the
    attribute is not written (Type 2 attributes are written empty instead, since the standard
    requires them to be present; the reader sees "no value" either way). ``extra`` overrides any
    top-level attribute by keyword, for injected problems.

Reading
    :func:`read_header` reads one file; :func:`load_volume` sorts the slices of one series by
    their position along the slice normal (ImagePositionPatient projected onto the normal of
    ImageOrientationPatient, never InstanceNumber or a single z tag: hazen#404), applies each
    slice's RescaleSlope/RescaleIntercept, and records gaps in the slice positions instead of
    hiding them.

The grid convention matches ``phantoms.digital.Grid``: arrays are indexed (plane, row, col);
``voxel_mm`` is (slice spacing, row spacing, column spacing); ``origin_mm`` is the DICOM patient
(LPS) position of the centre of voxel [0, 0, 0]; columns run along +x, rows along +y, planes along
+z (ImageOrientationPatient [1, 0, 0, 0, 1, 0]). The kernel does not import ``phantoms``: any
object with ``shape``, ``voxel_mm`` and ``origin_mm`` attributes is accepted as a grid.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, UID, generate_uid
from pydicom.valuerep import format_number_as_ds

__all__ = [
    "PET_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
    "F18_HALF_LIFE_S",
    "F18_POSITRON_FRACTION",
    "GridLike",
    "Code",
    "SeriesHeader",
    "PetSeriesHeader",
    "CtSeriesHeader",
    "Volume",
    "DicomVolumeError",
    "write_pet_series",
    "write_ct_series",
    "read_header",
    "load_volume",
    "sop_instance_uid",
    "format_da",
    "format_tm",
    "format_dt",
]

PET_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.128")
CT_IMAGE_STORAGE = UID("1.2.840.10008.5.1.4.1.1.2")

#: F-18 half-life in seconds as vendors write it (DICOM CID 4020 / NIST value 109.77 min).
F18_HALF_LIFE_S = 6586.2
#: F-18 positron branching fraction.
F18_POSITRON_FRACTION = 0.9673

#: Implementation identity of the files this module writes.
IMPLEMENTATION_CLASS_UID = UID("1.2.826.0.1.3680043.8.498.1")
IMPLEMENTATION_VERSION_NAME = "CORELAB_DICOMIO"

_INT16_MAX = 32767
_UINT16_MAX = 65535
_CT_RESCALE_INTERCEPT_HU = -1024.0


class GridLike(Protocol):
    """What the writers need to know about a voxel grid (``phantoms.digital.Grid`` fits)."""

    shape: tuple[int, int, int]
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]


@dataclass(frozen=True)
class Code:
    """A coded concept (Code Value, Coding Scheme Designator, Code Meaning)."""

    value: str
    scheme: str
    meaning: str

    def to_item(self) -> Dataset:
        item = Dataset()
        item.CodeValue = self.value
        item.CodingSchemeDesignator = self.scheme
        item.CodeMeaning = self.meaning
        return item


# Codes from DICOM PS3.16 (CID 4020 radionuclides, CID 4021 radiopharmaceuticals, CID 19/20/21
# patient orientation) and PS3.16 CID 7050 (de-identification methods).
F18_CODE = Code("77004003", "SCT", "^18^Fluorine")
FDG_CODE = Code("35321007", "SCT", "Fluorodeoxyglucose F^18^")
RECUMBENT_CODE = Code("102538003", "SCT", "recumbent")
SUPINE_CODE = Code("40199007", "SCT", "supine")
HEADFIRST_CODE = Code("102540008", "SCT", "headfirst")
DEID_BASIC_PROFILE = Code("113100", "DCM", "Basic Application Confidentiality Profile")
DEID_RETAIN_MODIFIED_DATES = Code(
    "113107", "DCM", "Retain Longitudinal Temporal Information Modified Dates Option"
)
DEID_RETAIN_PATIENT_CHARACTERISTICS = Code("113108", "DCM", "Retain Patient Characteristics Option")
# Without this option the basic profile removes DeviceSerialNumber, which the core lab needs to
# tie a scan to an accredited scanner.
DEID_RETAIN_DEVICE_IDENTITY = Code("113109", "DCM", "Retain Device Identity Option")

DEFAULT_DEID_CODES: tuple[Code, ...] = (
    DEID_BASIC_PROFILE,
    DEID_RETAIN_MODIFIED_DATES,
    DEID_RETAIN_PATIENT_CHARACTERISTICS,
    DEID_RETAIN_DEVICE_IDENTITY,
)
# LO: at most 64 characters.
DEFAULT_DEID_METHOD = "PS3.15 E basic profile, options 113107 113108 113109"


# --------------------------------------------------------------------------------------------
# Value formatting
# --------------------------------------------------------------------------------------------


def format_da(when: dt.date | dt.datetime) -> str:
    """DICOM DA (YYYYMMDD)."""
    return when.strftime("%Y%m%d")


def format_tm(when: dt.datetime | dt.time, *, fraction_digits: int = 0) -> str:
    """DICOM TM (HHMMSS with an optional fraction of 0-6 digits, as vendors differ)."""
    text = when.strftime("%H%M%S")
    if fraction_digits > 0:
        text += "." + f"{when.microsecond:06d}"[:fraction_digits]
    return text


def format_dt(when: dt.datetime, *, fraction_digits: int = 0) -> str:
    """DICOM DT (YYYYMMDDHHMMSS with an optional fraction)."""
    return format_da(when) + format_tm(when, fraction_digits=fraction_digits)


def _ds(value: float) -> str:
    """A decimal string of at most 16 characters (the DS limit), exact where it fits."""
    value = float(value)
    if value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    text = repr(value)
    if len(text) <= 16 and "e" not in text:
        return text
    return format_number_as_ds(value)


def sop_instance_uid(series_uid: str, instance_number: int) -> UID:
    """Deterministic SOP Instance UID of one slice, derived from its series UID and number."""
    return generate_uid(entropy_srcs=[str(series_uid), "instance", str(int(instance_number))])


# --------------------------------------------------------------------------------------------
# Header dataclasses
# --------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class SeriesHeader:
    """Patient, study, series and equipment attributes shared by PET and CT series.

    A field set to ``None`` is not written (Type 2 attributes are written with an empty value).
    Datetimes are naive and are written as given, so they must already be the de-identified
    (shifted) ones.

    Attributes
    ----------
    study_uid, series_uid, frame_of_reference_uid : str
        UIDs. SOP Instance UIDs are derived from ``series_uid`` (:func:`sop_instance_uid`).
    patient_name, patient_id : str or None
        As written: the trial pseudonym for a de-identified trial scan.
    patient_sex : {"M", "F", "O"} or None
    patient_weight_kg : float or None
        PatientWeight (0010,1030) in kg.
    patient_size_m : float or None
        PatientSize (0010,1020) in metres.
    patient_age : str or None
        PatientAge as an AS string such as ``"063Y"``.
    study_datetime, series_datetime, acquisition_datetime : datetime
        Study, Series and Acquisition Date/Time. ``acquisition_datetime`` defaults to the series
        datetime.
    tm_fraction_digits : int
        Digits after the decimal point in TM/DT values (Siemens writes 6, GE and Philips 0).
    manufacturer, model, device_serial_number, software_versions, station_name,
    institution_name : str or None
        General Equipment. Neutral (None) by default.
    patient_identity_removed : bool or None
        True writes PatientIdentityRemoved YES with the de-identification method text and codes.
    clinical_trial_* : str or None
        Clinical Trial Subject/Study/Series modules, written when ``clinical_trial_protocol_id``
        is set.
    extra : dict
        Keyword -> value overrides applied last to every slice (``None`` deletes the attribute).
    """

    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    patient_name: str | None = None
    patient_id: str | None = None
    patient_sex: str | None = "O"
    patient_weight_kg: float | None = None
    patient_size_m: float | None = None
    patient_age: str | None = None
    study_datetime: dt.datetime
    series_datetime: dt.datetime
    acquisition_datetime: dt.datetime | None = None
    tm_fraction_digits: int = 0
    study_id: str | None = "1"
    accession_number: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    series_number: int | None = 1
    body_part_examined: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    device_serial_number: str | None = None
    software_versions: str | None = None
    station_name: str | None = None
    institution_name: str | None = None
    patient_identity_removed: bool | None = True
    deidentification_method: str | None = DEFAULT_DEID_METHOD
    deidentification_codes: tuple[Code, ...] = DEFAULT_DEID_CODES
    longitudinal_temporal_information_modified: str | None = "MODIFIED"
    clinical_trial_sponsor: str | None = None
    clinical_trial_protocol_id: str | None = None
    clinical_trial_protocol_name: str | None = None
    clinical_trial_site_id: str | None = None
    clinical_trial_site_name: str | None = None
    clinical_trial_subject_id: str | None = None
    clinical_trial_time_point_id: str | None = None
    clinical_trial_time_point_description: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def acquisition(self) -> dt.datetime:
        """Acquisition datetime (the series datetime unless given)."""
        return self.acquisition_datetime or self.series_datetime


@dataclass(kw_only=True)
class PetSeriesHeader(SeriesHeader):
    """Attributes of a PET series (PET Series, PET Isotope and PET Image modules).

    Attributes
    ----------
    units : str
        Units (0054,1001): BQML, CNTS, GML, ...
    decay_correction : str
        DecayCorrection (0054,1102): START, ADMIN or NONE.
    corrected_image : tuple of str
        CorrectedImage (0028,0051).
    injection_datetime : datetime or None
        RadiopharmaceuticalStartDateTime; RadiopharmaceuticalStartTime is written from it too.
    write_start_datetime : bool
        False writes only RadiopharmaceuticalStartTime (older scanners).
    dose_bq : float or None
        RadionuclideTotalDose as written: Bq in a classic PET image (a value in MBq is an error
        that only an injected problem should write).
    half_life_s, positron_fraction : float or None
        RadionuclideHalfLife (s) and RadionuclidePositronFraction.
    radiopharmaceutical : str or None
        Radiopharmaceutical (0018,0031) free text.
    radionuclide_code, radiopharmaceutical_code : Code or None
    frame_duration_ms : int
        ActualFrameDuration (0018,1242) in ms.
    reconstruction_method, convolution_kernel : str or None
    series_type : tuple of str
        SeriesType (0054,1000).
    counts_source : str
    image_type : tuple of str
    radiopharm_extra : dict
        Keyword -> value overrides of the RadiopharmaceuticalInformationSequence item.
    """

    modality: str = "PT"
    units: str = "BQML"
    decay_correction: str = "START"
    corrected_image: tuple[str, ...] = ("NORM", "DTIM", "ATTN", "SCAT", "DECY", "RAN")
    injection_datetime: dt.datetime | None = None
    write_start_datetime: bool = True
    dose_bq: float | None = None
    half_life_s: float | None = F18_HALF_LIFE_S
    positron_fraction: float | None = F18_POSITRON_FRACTION
    radiopharmaceutical: str | None = "Fludeoxyglucose"
    radionuclide_code: Code | None = F18_CODE
    radiopharmaceutical_code: Code | None = FDG_CODE
    radiopharmaceutical_route: str | None = "Intravenous"
    frame_duration_ms: int = 180_000
    reconstruction_method: str | None = "OSEM 3i21s"
    convolution_kernel: str | None = None
    series_type: tuple[str, str] = ("WHOLE BODY", "IMAGE")
    counts_source: str = "EMISSION"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    randoms_correction_method: str | None = "DLYD"
    attenuation_correction_method: str | None = "CTAC"
    scatter_correction_method: str | None = "MODEL"
    collimator_type: str | None = "NONE"
    radiopharm_extra: dict[str, Any] = field(default_factory=dict)


@dataclass(kw_only=True)
class CtSeriesHeader(SeriesHeader):
    """Attributes of a CT series (CT Image module).

    Attributes
    ----------
    kvp : float or None
        Peak kilovoltage (kV).
    exposure_mas : float or None
        Exposure (mAs).
    convolution_kernel : str or None
    patient_position : str
        PatientPosition (0018,5100), e.g. HFS.
    """

    modality: str = "CT"
    kvp: float | None = 120.0
    exposure_mas: float | None = 50.0
    xray_tube_current_ma: float | None = None
    convolution_kernel: str | None = "B30f"
    patient_position: str = "HFS"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


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


def _check_volume(volume: np.ndarray, grid: GridLike, what: str) -> np.ndarray:
    array = np.asarray(volume)
    if array.ndim != 3 or tuple(array.shape) != tuple(grid.shape):
        raise ValueError(f"{what} has shape {array.shape}, the grid says {tuple(grid.shape)} "
                         "(planes, rows, cols)")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{what} contains NaN or infinite values")
    return array


def _set_geometry(ds: Dataset, grid: GridLike, plane: int) -> None:
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
    grid: GridLike,
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
    grid: GridLike,
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
    grid : GridLike
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
    grid: GridLike,
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
    grid : GridLike
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


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class DicomVolumeError(ValueError):
    """Slices cannot form one volume; the message names the file and the mismatch."""


def read_header(path: Path | str, *, stop_before_pixels: bool = True) -> Dataset:
    """Read one DICOM file (header only by default).

    Parameters
    ----------
    path : path
    stop_before_pixels : bool
        Skip the pixel data (about 0.4 ms per small PET file instead of 0.9 ms).

    Returns
    -------
    pydicom.Dataset
    """
    return pydicom.dcmread(Path(path), stop_before_pixels=stop_before_pixels)


@dataclass
class Volume:
    """A series' slices stacked in geometric order.

    Attributes
    ----------
    array : ndarray of shape (planes, rows, cols), float32
        Real-world values (stored * RescaleSlope + RescaleIntercept, per slice), in ``units``.
        Only slices that exist: a gap is recorded, not filled.
    voxel_mm : tuple of float
        (slice spacing, row spacing, column spacing) in mm; the slice spacing is the median
        distance between consecutive slice positions.
    origin_mm : tuple of float
        ImagePositionPatient (LPS, mm) of the first slice after sorting.
    orientation : tuple of float
        ImageOrientationPatient (row direction cosines, column direction cosines).
    positions_mm : ndarray of shape (planes,)
        Position of each slice along the slice normal, ascending, in mm.
    paths : list of Path
        The files in sorted order.
    units : str or None
        Units (0054,1001) for PET, "HU" for CT, else None.
    missing_positions_mm : list of float
        Positions along the normal where a slice is missing between present slices.
    expected_planes : int or None
        NumberOfSlices (0054,0081) when the header gives it.
    """

    array: np.ndarray
    voxel_mm: tuple[float, float, float]
    origin_mm: tuple[float, float, float]
    orientation: tuple[float, ...]
    positions_mm: np.ndarray
    paths: list[Path]
    units: str | None = None
    missing_positions_mm: list[float] = field(default_factory=list)
    expected_planes: int | None = None

    @property
    def has_gaps(self) -> bool:
        """True when slices are missing between the first and last slice."""
        return bool(self.missing_positions_mm)

    @property
    def is_complete(self) -> bool:
        """No gap, and as many planes as NumberOfSlices says (when it says)."""
        if self.has_gaps:
            return False
        return self.expected_planes is None or self.expected_planes == self.array.shape[0]


def _float_tuple(values: Any, n: int, keyword: str, path: Path) -> tuple[float, ...]:
    try:
        out = tuple(float(v) for v in values)
    except (TypeError, ValueError) as exc:
        raise DicomVolumeError(f"{path}: {keyword} is not numeric ({values!r})") from exc
    if len(out) != n:
        raise DicomVolumeError(f"{path}: {keyword} has {len(out)} values, expected {n}")
    return out


def _require(ds: Dataset, keyword: str, path: Path) -> Any:
    value = ds.get(keyword)
    if value is None or value == "":
        raise DicomVolumeError(f"{path}: {keyword} is missing; cannot place the slice in a volume")
    return value


def load_volume(
    paths: Sequence[Path | str],
    *,
    orientation_tol: float = 1e-4,
    spacing_tol_mm: float = 1e-3,
) -> Volume:
    """Stack the slices of one series into a volume, sorted along the slice normal.

    Parameters
    ----------
    paths : sequence of path
        Files of one series, in any order.
    orientation_tol : float
        Largest allowed difference of ImageOrientationPatient cosines between slices.
    spacing_tol_mm : float
        Largest allowed difference of PixelSpacing between slices, and tolerance for slice
        positions on the regular grid (as a fraction of 100 of the slice spacing, at least 0.01 mm).

    Returns
    -------
    Volume

    Raises
    ------
    DicomVolumeError
        Naming the file: differing series, orientation, pixel spacing or matrix size; a
        missing geometry attribute; two slices at one position; slice positions that are not
        on a regular grid (a missing slice is not an error: it is recorded in
        ``Volume.missing_positions_mm``).
    """
    if not paths:
        raise DicomVolumeError("no files given")
    records = []
    first: dict[str, Any] = {}
    for raw in paths:
        path = Path(raw)
        ds = pydicom.dcmread(path)
        iop = _float_tuple(_require(ds, "ImageOrientationPatient", path), 6,
                           "ImageOrientationPatient", path)
        ipp = _float_tuple(_require(ds, "ImagePositionPatient", path), 3,
                           "ImagePositionPatient", path)
        spacing = _float_tuple(_require(ds, "PixelSpacing", path), 2, "PixelSpacing", path)
        size = (int(_require(ds, "Rows", path)), int(_require(ds, "Columns", path)))
        series_uid = str(ds.get("SeriesInstanceUID", ""))
        if not first:
            first = {"iop": iop, "spacing": spacing, "size": size, "series": series_uid,
                     "path": path}
        else:
            if series_uid != first["series"]:
                raise DicomVolumeError(
                    f"{path}: SeriesInstanceUID differs from {first['path'].name}; "
                    "load one series at a time")
            if max(abs(a - b) for a, b in zip(iop, first["iop"])) > orientation_tol:
                raise DicomVolumeError(
                    f"{path}: ImageOrientationPatient {list(iop)} differs from "
                    f"{list(first['iop'])} in {first['path'].name}")
            if max(abs(a - b) for a, b in zip(spacing, first["spacing"])) > spacing_tol_mm:
                raise DicomVolumeError(
                    f"{path}: PixelSpacing {list(spacing)} mm differs from "
                    f"{list(first['spacing'])} mm in {first['path'].name}")
            if size != first["size"]:
                raise DicomVolumeError(
                    f"{path}: matrix {size[0]}x{size[1]} (rows x cols) differs from "
                    f"{first['size'][0]}x{first['size'][1]} in {first['path'].name}")
        slope = float(ds.get("RescaleSlope", 1.0) or 1.0)
        intercept = float(ds.get("RescaleIntercept", 0.0) or 0.0)
        plane = ds.pixel_array.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        records.append((ipp, path, plane, ds))

    row_dir = np.array(first["iop"][:3])
    col_dir = np.array(first["iop"][3:])
    normal = np.cross(row_dir, col_dir)
    positions = np.array([float(np.dot(normal, r[0])) for r in records])
    order = np.argsort(positions, kind="stable")
    positions = positions[order]
    records = [records[i] for i in order]

    duplicates = np.nonzero(np.diff(positions) < spacing_tol_mm)[0]
    if duplicates.size:
        i = int(duplicates[0])
        raise DicomVolumeError(
            f"{records[i + 1][1]}: same slice position {positions[i + 1]:.3f} mm as "
            f"{records[i][1].name}")

    slice_mm, missing = _slice_spacing_and_gaps(positions, records, spacing_tol_mm)
    first_ds = records[0][3]
    modality = str(first_ds.get("Modality", ""))
    units = str(first_ds.get("Units")) if "Units" in first_ds else ("HU" if modality == "CT" else None)
    expected = first_ds.get("NumberOfSlices")
    return Volume(
        array=np.stack([r[2] for r in records]).astype(np.float32),
        voxel_mm=(slice_mm, first["spacing"][0], first["spacing"][1]),
        origin_mm=tuple(records[0][0]),
        orientation=tuple(first["iop"]),
        positions_mm=positions,
        paths=[r[1] for r in records],
        units=units,
        missing_positions_mm=missing,
        expected_planes=None if expected is None else int(expected),
    )


def _slice_spacing_and_gaps(
    positions: np.ndarray, records: list, spacing_tol_mm: float
) -> tuple[float, list[float]]:
    """Median slice spacing, and positions missing from the regular grid it implies."""
    if positions.size < 2:
        thickness = records[0][3].get("SliceThickness")
        return (float(thickness) if thickness else 0.0), []
    steps = np.diff(positions)
    spacing = float(np.median(steps))
    tol = max(spacing_tol_mm, 0.01 * spacing)
    missing: list[float] = []
    for i, step in enumerate(steps):
        n_steps = int(round(step / spacing))
        if abs(step - n_steps * spacing) > tol * max(n_steps, 1):
            raise DicomVolumeError(
                f"{records[i + 1][1]}: slice position {positions[i + 1]:.3f} mm is "
                f"{step:.3f} mm from the previous slice ({records[i][1].name}); the series "
                f"spacing is {spacing:.3f} mm, so the slices are not on one regular grid")
        missing.extend(float(positions[i] + k * spacing) for k in range(1, n_steps))
    return spacing, missing


def newest_instances(paths: Iterable[Path | str]) -> list[Path]:
    """The newest version of each instance among ``paths``: one file per SOP Instance UID.

    A site may send a slice again with other bytes (a corrected re-send). The spool keeps every
    version beside the first: ``<SOP UID>.dcm`` is version 1, ``<SOP UID>.v<N>.dcm`` version N
    (``corelab.ingest``, numbered in the order received). Every reader of a series (header QC,
    phantom analysis, the reports' image panels) reads through this function, so all of them see
    the newest version of every instance and never two slices at one position.

    The instance is identified by the SOPInstanceUID in the file (not by its name), the version
    by the name. A file without a SOPInstanceUID is its own instance.

    Parameters
    ----------
    paths : iterable of path
        DICOM files of one series, e.g. every ``*.dcm`` of a spool folder.

    Returns
    -------
    list of Path
        The files to read, in the order given.

    Raises
    ------
    DicomVolumeError
        A file whose SOPInstanceUID cannot be read; or two files of one instance with the same
        version (names without ``.v<N>``, so not from the spool) and different bytes, naming both:
        which one is meant cannot be known.
    """
    chosen: dict[str, tuple[int, Path]] = {}
    given = [Path(raw) for raw in paths]
    for path in given:
        stem = path.name[: -len(path.suffix)] if path.suffix else path.name
        head, _, tail = stem.rpartition(".v")
        version = int(tail) if head and tail.isdigit() else 1
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
            uid = str(ds.get("SOPInstanceUID", "") or "") or f"file:{path}"
        except Exception as exc:  # noqa: BLE001 - any unreadable file is named, never skipped silently
            raise DicomVolumeError(f"{path}: cannot read its SOPInstanceUID ({type(exc).__name__}: {exc})") from None
        held = chosen.get(uid)
        if held is None or version > held[0]:
            chosen[uid] = (version, path)
        elif version == held[0] and path.read_bytes() != held[1].read_bytes():
            first, second = sorted((held[1], path))
            raise DicomVolumeError(
                f"{second}: same SOPInstanceUID {uid} as {first.name}, other content, and neither name carries a "
                "version (.v<N>.dcm, as the spool writes re-sent instances); keep the one to read and move the "
                "other out of the folder")
    keep = {p for _, p in chosen.values()}
    return [p for p in given if p in keep]
