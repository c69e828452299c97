"""Header content of the synthetic PET and CT series: the attributes a de-identifying site sends.

Everything :mod:`synth.dicom_writer` puts in a header comes from a :class:`PetSeriesHeader` or
:class:`CtSeriesHeader`; a field left ``None`` means the attribute is not written (Type 2
attributes are written empty instead, since the standard requires them to be present; the reader
sees "no value" either way). ``extra`` overrides any top-level attribute by keyword, for injected
problems. Also here: the DICOM codes the headers use, DA/TM/DT formatting and the deterministic
SOP Instance UID of a slice.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, generate_uid

__all__ = [
    "PET_IMAGE_STORAGE",
    "CT_IMAGE_STORAGE",
    "F18_HALF_LIFE_S",
    "F18_POSITRON_FRACTION",
    "Code",
    "SeriesHeader",
    "PetSeriesHeader",
    "CtSeriesHeader",
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
