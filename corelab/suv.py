"""Vendor-neutral body-weight SUV (SUVbw) scale factors for one PET series.

Pure functions: no Prefect, no database, no logging of header values. Input is one header per
slice, either a pydicom :class:`~pydicom.dataset.Dataset` or a plain mapping of DICOM keywords
(the shape of the calculate-suv JSON fixtures, see :func:`header_from_dataset`). Output is a
per-slice factor in g/Bq that multiplies the *real-world* value of each slice::

    SUVbw = (stored * RescaleSlope + RescaleIntercept) * factor_g_per_bq[slice]

RescaleSlope may differ per slice (GE), so it must be applied per slice before the factor.

The rules follow the QIBA FDG-PET/CT Profile, Appendix G (vendor-neutral SUV pseudo-code) [1]_
and the PET Image and Enhanced PET modules of DICOM PS3.3 (C.8.9.1, C.8.9.2, C.8.22) [2]_:

* Units ``BQML``: ``factor = weight_kg * 1000 / decayed_dose_bq``.
* DecayCorrection ``START``: the dose is decayed from injection to the scan reference time.
  ``ADMIN``: images are already corrected to the injection time; the dose is not decayed.
  ``NONE``: each slice is decayed to its own frame, at the decay-weighted mid-frame time
  (see Notes).
* Scan reference time: SeriesDate/SeriesTime when not after the earliest AcquisitionDate/Time of
  the series; otherwise (post-processed series) the GE private post-injection datetime
  (0009,100D) if present, else per slice ``AcquisitionDateTime - FrameReferenceTime/1000 +
  average-count-rate time within the frame`` when every slice has FrameReferenceTime > 0 and
  ActualFrameDuration > 0 (both in ms), else the earliest AcquisitionDateTime.
* Injection time: RadiopharmaceuticalStartDateTime, else RadiopharmaceuticalStartTime on the date
  of the scan reference time (the series date in the ordinary case), moved to the previous day
  when that time of day falls after the scan (midnight crossing).
* Units ``GML``/``CM2ML``: an SUV of the SUV Type (0054,1006), converted by ``weight_g / N_x``
  (:mod:`corelab.body_size`). Units ``CNTS`` (Philips): private SUV factor (7053,1000) if positive,
  else activity-concentration factor (7053,1009) times the BQML factor; read without their
  creator (7053,0010) with a warning, refused when (7053,0010) names another block. Others: refused.
* RadionuclideTotalDose is in Bq in PET Image Storage and in MBq in Enhanced PET Image Storage. A
  classic dose below ``MIN_PLAUSIBLE_DOSE_BQ`` is taken as MBq and PatientWeight above
  ``GRAMS_WEIGHT_ABOVE`` as g, with a warning (the entry stays a deviation for QC to report).

When SUV cannot be computed :class:`SuvError` is raised. Its ``code`` is machine-readable and its
message names the attribute, the (non-identifying) value found and what the site should fix.
Messages never contain patient names, IDs or calendar dates (times of day and durations only).

References
----------
.. [1] QIBA FDG-PET/CT Technical Committee, "FDG-PET/CT as an Imaging Biomarker Measuring
   Response to Cancer Therapy", QIBA Profile v1.13 (2016), Appendix G "Vendor-neutral
   pseudo-code for SUV calculation".
.. [2] NEMA, DICOM PS3.3 Information Object Definitions: C.8.9.1 PET Series Module (Units,
   Decay Correction, Corrected Image, Series Date/Time), C.8.9.2 PET Isotope Module
   (Radiopharmaceutical Information Sequence), C.8.9.4 PET Image Module (Frame Reference
   Time, Actual Frame Duration), C.8.22 Enhanced PET modules.
"""

from __future__ import annotations

import datetime as dt
import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from corelab.body_size import (GRAMS_WEIGHT_ABOVE, PLAUSIBLE_WEIGHT_KG,  # noqa: F401
                                BodySizeError, Normalisation, normalisation, patient_weight_kg,
                                to_suvbw)

__all__ = ["ENHANCED_PET_IMAGE_STORAGE", "MAX_PLAUSIBLE_DOSE_BQ", "MIN_PLAUSIBLE_DOSE_BQ",
           "PET_IMAGE_STORAGE", "SuvError", "SuvResult", "SuvWarning", "average_count_rate_time_s",
           "header_from_dataset", "suv_stats", "suvbw_factors"]

#: SOP Class UID of (classic) PET Image Storage: RadionuclideTotalDose in Bq.
PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.128"
#: SOP Class UID of Enhanced PET Image Storage: RadionuclideTotalDose in MBq (PS3.3 C.8.22).
ENHANCED_PET_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.130"

#: Lowest administered activity accepted as Bq (0.1 MBq). A classic header below this holds MBq
#: (e.g. 370.0): it is converted to Bq with the warning ``dose_looks_like_mbq``.
MIN_PLAUSIBLE_DOSE_BQ = 1.0e5
#: Highest administered activity accepted (100 GBq). Above it the dose is refused
#: (``dose_looks_like_bq`` for Enhanced PET, where MBq is expected; ``dose_implausible`` else).
MAX_PLAUSIBLE_DOSE_BQ = 1.0e11
#: Uptake longer than this many half-lives gives the warning ``uptake_long`` (wrong date?).
LONG_UPTAKE_HALF_LIVES = 10.0
#: Relative disagreement between the two Philips private factors that gives a warning.
PHILIPS_FACTOR_RTOL = 0.01

# Private tags: (group, element offset in the private block, private creator).
_GE_POST_INJECTION = (0x0009, 0x0D, "GEMS_PETD_01")
_PHILIPS_SUV_FACTOR = (0x7053, 0x00, "Philips PET Private Group")
_PHILIPS_ACTIVITY_FACTOR = (0x7053, 0x09, "Philips PET Private Group")
_TAGS = {"RadionuclideTotalDose": "(0018,1074)", "RadionuclideHalfLife": "(0018,1075)"}

_RADIOPHARM_KEYS = ("RadionuclideTotalDose", "RadionuclideHalfLife", "RadiopharmaceuticalStartTime",
                    "RadiopharmaceuticalStartDateTime")
_PLAIN_KEYS = ("SOPClassUID", "Units", "DecayCorrection", "CorrectedImage", "SeriesDate", "SeriesTime",
               "AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "FrameReferenceTime",
               "ActualFrameDuration", "PatientWeight", "PatientSize", "PatientSex", "SUVType")
_DATE_LIKE = {"SeriesDate", "SeriesTime", "RadiopharmaceuticalStartTime",
              "RadiopharmaceuticalStartDateTime"}


class SuvError(ValueError):
    """SUV cannot be computed for this series.

    Parameters
    ----------
    code : str
        Machine-readable reason, e.g. ``missing_weight``, ``missing_dose``,
        ``missing_half_life``, ``missing_injection_time``, ``missing_scan_time``,
        ``missing_units``, ``missing_decay_correction``, ``missing_frame_duration``,
        ``unsupported_units``, ``unsupported_decay_correction``,
        ``missing_philips_scale_factor``, ``philips_not_convertible`` (factor 0),
        ``philips_private_creator_mismatch``, ``dose_looks_like_bq``, ``dose_implausible``,
        ``injection_after_scan``, ``not_attenuation_corrected``, ``inconsistent_series``,
        ``unparseable_value``, ``no_slices``; GML/CM2ML: the codes of
        :class:`corelab.body_size.BodySizeError`.
    message : str
        What is wrong (attribute keyword, value found, unit assumed) and what the site should fix.
    attribute : str, optional
        DICOM keyword of the offending attribute, if there is one.
    """

    def __init__(self, code: str, message: str, *, attribute: str | None = None) -> None:
        super().__init__(f"[{code}] {message}")
        self.code = code
        self.message = message
        self.attribute = attribute


@dataclass(frozen=True)
class SuvWarning:
    """A condition that did not stop the calculation but that a physicist should see.

    Codes: ``series_after_acquisition``, ``missing_series_time``, ``midnight_crossing``,
    ``uptake_long``, ``uptake_unknown`` (ADMIN), ``weight_implausible``,
    ``corrected_image_missing``, ``decay_flags_contradict``, ``gml_assumed_suvbw``,
    ``philips_factors_disagree``, ``philips_private_creator_missing``, ``dose_looks_like_mbq``,
    ``weight_looks_like_grams``, ``sex_not_specified`` (mean of the male and female values).
    """

    code: str
    message: str

    def __str__(self) -> str:
        return f"[{self.code}] {self.message}"


@dataclass(frozen=True)
class SuvResult:
    """SUVbw scale factors of one series, with the intermediate values that produced them.

    Attributes
    ----------
    factors_g_per_bq : tuple of float
        One factor per slice, in the order of the input headers, in g/Bq (g/mL per Bq/mL).
        Multiplies the real-world value (stored * RescaleSlope + RescaleIntercept). For GML and
        CM2ML it is ``weight_g / N_x`` (dimensionless for GML, g/cm2 for CM2ML).
    units_path : str
        ``"BQML"``, ``"GML"``, ``"CM2ML"``, ``"CNTS-philips-suv"`` or ``"CNTS-philips-activity"``.
    suv_type : str
        SUV Type (0054,1006) converted from: GML/CM2ML as read (absent: ``BW``/``BSA``); ``BW``
        for BQML and CNTS.
    normalisation : corelab.body_size.Normalisation
        The body size divided out (name, value with unit, sex used); ``bw`` for SUVbw.
    decay_correction : str or None
        DecayCorrection (0054,1102): ``START``, ``ADMIN`` or ``NONE``.
    weight_kg : float or None
        PatientWeight (0010,1030), kg (divided by 1000 when it was entered in g).
    dose_bq : float or None
        Injected activity in Bq (converted from MBq for Enhanced PET).
    dose_unit_assumed : str or None
        ``"Bq"`` or ``"MBq"``: how RadionuclideTotalDose was read.
    half_life_s : float or None
        RadionuclideHalfLife (0018,1075), s.
    decayed_dose_bq : float or None
        Dose decayed to ``scan_datetime`` (equal to ``dose_bq`` for ADMIN).
    slice_decayed_dose_bq : tuple of float
        Decayed dose per slice actually used in the factor (empty when no dose is used).
    scan_datetime : datetime or None
        Scan reference time of the series (earliest of the per-slice reference times).
    slice_scan_datetimes : tuple of datetime or None
        Decay reference time per slice.
    scan_time_source : str or None
        ``"series"``, ``"ge_private"``, ``"acquisition_frame_reference"``,
        ``"earliest_acquisition"`` or ``"slice_mid_frame"`` (DecayCorrection NONE).
    injection_datetime : datetime or None
        Radiopharmaceutical start (injection) datetime used.
    injection_time_source : str or None
        ``"RadiopharmaceuticalStartDateTime"`` or ``"RadiopharmaceuticalStartTime"``.
    uptake_min : float or None
        ``scan_datetime - injection_datetime`` in minutes.
    warnings : tuple of SuvWarning
        Non-fatal findings (codes listed in :class:`SuvWarning`).
    """

    factors_g_per_bq: tuple[float, ...]
    units_path: str
    decay_correction: str | None = None
    weight_kg: float | None = None
    dose_bq: float | None = None
    dose_unit_assumed: str | None = None
    half_life_s: float | None = None
    decayed_dose_bq: float | None = None
    slice_decayed_dose_bq: tuple[float, ...] = ()
    scan_datetime: dt.datetime | None = None
    slice_scan_datetimes: tuple[dt.datetime | None, ...] = ()
    scan_time_source: str | None = None
    injection_datetime: dt.datetime | None = None
    injection_time_source: str | None = None
    uptake_min: float | None = None
    warnings: tuple[SuvWarning, ...] = field(default_factory=tuple)
    suv_type: str = "BW"
    normalisation: Normalisation | None = None

    def __post_init__(self) -> None:  # BQML, CNTS: SUVbw, normalised by the body weight
        if self.normalisation is None:
            object.__setattr__(self, "normalisation", normalisation("BW", weight_kg=self.weight_kg))

    @property
    def factor_g_per_bq(self) -> float | None:
        """The series factor if every slice has the same one (within 1e-9 relative), else None."""
        first = self.factors_g_per_bq[0]
        if all(math.isclose(f, first, rel_tol=1e-9, abs_tol=0.0) for f in self.factors_g_per_bq):
            return first
        return None

    @property
    def warning_codes(self) -> tuple[str, ...]:
        return tuple(w.code for w in self.warnings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every attribute plus ``factor_g_per_bq`` (datetimes as ISO 8601
        strings, warnings as code/message dicts, ``normalisation`` as a dict)."""

        def plain(value: Any) -> Any:
            if isinstance(value, dt.datetime):
                return value.isoformat()
            if isinstance(value, tuple):
                return [plain(v) for v in value]
            if isinstance(value, SuvWarning):
                return {"code": value.code, "message": value.message}
            return value.to_dict() if isinstance(value, Normalisation) else value

        out = {f.name: plain(getattr(self, f.name)) for f in fields(self)}
        return {"factors_g_per_bq": out.pop("factors_g_per_bq"), "factor_g_per_bq": self.factor_g_per_bq,
                **out}


# --------------------------------------------------------------------------------------------
# Header access
# --------------------------------------------------------------------------------------------


def _clean(value: Any) -> Any:
    """Normalise a DICOM value: bytes -> str, strip padding, empty -> None, DS -> float."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if isinstance(value, str):
        value = value.strip(" \x00")
        return value or None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        items = [_clean(v) for v in value]
        items = [v for v in items if v is not None]
        return items or None
    if isinstance(value, float):  # pydicom DSfloat and plain float
        return float(value)
    if isinstance(value, int) and not isinstance(value, bool):  # pydicom IS and plain int
        return int(value)
    return value


def _private_value(ds: Any, spec: tuple[int, int, str], groups: set[int] | None = None) -> Any:
    group, offset, creator = spec
    if groups is not None and group not in groups:
        # pydicom finds a private block by slicing the dataset, the main cost of a header read:
        # skip it when the group is not there at all.
        return None
    try:
        return _clean(ds.get_private_item(group, offset, creator).value)
    except (KeyError, ValueError, AttributeError):
        return None


_FUNCTIONAL_GROUPS = ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence")


@functools.lru_cache(maxsize=None)
def _tag(keyword: str) -> int:
    from pydicom.datadict import tag_for_keyword

    return tag_for_keyword(keyword)


def _nested(ds: Any, keyword: str) -> Any:
    """Find ``keyword`` at the top level or in the first item of the functional groups."""
    # Membership on the key view with an int tag avoids pydicom's keyword-to-Tag conversion,
    # which dominates reading a handful of attributes from thousands of slices.
    present = ds.keys()
    tag = _tag(keyword)
    if tag in present:
        return ds[tag].value
    for groups_kw in _FUNCTIONAL_GROUPS:
        if _tag(groups_kw) not in present:
            continue
        groups = ds[_tag(groups_kw)].value
        if not groups:
            continue
        for element in groups[0]:
            if element.VR == "SQ" and element.value:
                item = element.value[0]
                if keyword in item:
                    return item[keyword].value
    return None


# The attributes that may legitimately differ from slice to slice of one series; all the others
# are the same on every slice of a consistent series.
PER_SLICE_KEYS = ("AcquisitionDate", "AcquisitionTime", "AcquisitionDateTime", "FrameReferenceTime",
                  "ActualFrameDuration", "GEPrivatePostInjectionDateTime", "PhilipsPETPrivateGroup")


def series_headers_from_datasets(datasets: Sequence[Any], *, consistent: bool) -> list[dict[str, Any]]:
    """:func:`header_from_dataset` for every slice of a series.

    With ``consistent=True`` (the caller has checked that every attribute outside
    :data:`PER_SLICE_KEYS` is identical on all slices), only the per-slice attributes are read
    from the second slice on, which is several times faster; the result is the same.
    """
    if not consistent or len(datasets) < 2:
        return [header_from_dataset(ds) for ds in datasets]
    first = header_from_dataset(datasets[0])
    shared = {k: v for k, v in first.items() if k not in PER_SLICE_KEYS}
    return [first] + [{**shared, **header_from_dataset(ds, per_slice_only=True)} for ds in datasets[1:]]


def header_from_dataset(ds: Any, *, per_slice_only: bool = False) -> dict[str, Any]:
    """Extract, from one PET slice, exactly the attributes that SUVbw needs.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        One classic PET Image Storage slice, or an Enhanced PET object (see Notes).

    Returns
    -------
    header : dict
        DICOM keywords as keys, empty values omitted, values cleaned (str stripped, DS -> float):
        ``SOPClassUID, Units, DecayCorrection, CorrectedImage, SeriesDate, SeriesTime,
        AcquisitionDate, AcquisitionTime, AcquisitionDateTime, FrameReferenceTime`` (ms),
        ``ActualFrameDuration`` (ms), ``PatientWeight`` (kg), the first item of
        RadiopharmaceuticalInformationSequence flattened (``RadionuclideTotalDose``,
        ``RadionuclideHalfLife`` (s), ``RadiopharmaceuticalStartTime``,
        ``RadiopharmaceuticalStartDateTime``), ``GEPrivatePostInjectionDateTime`` from GE
        private (0009,100D) and ``PhilipsPETPrivateGroup`` = ``{"SUVScaleFactor": (7053,1000),
        "ActivityConcentrationScaleFactor": (7053,1009)}`` when present (by tag, plus
        ``"PrivateCreator"``: the (7053,0010) value or ``""``, when no Philips creator reserves
        them), ``PatientSize`` (m), ``PatientSex``, ``SUVType``. No patient name or ID.

    Notes
    -----
    For Enhanced PET, attributes absent at the top level are looked up in the first item of the
    shared (then per-frame) functional groups; ``FrameAcquisitionDateTime`` and
    ``FrameAcquisitionDuration`` stand in for AcquisitionDateTime and ActualFrameDuration. Frames
    are not split into one header each.
    """
    header: dict[str, Any] = {}
    for key in _PLAIN_KEYS:
        if per_slice_only and key not in PER_SLICE_KEYS:
            continue
        value = _clean(_nested(ds, key))
        if value is not None:
            header[key] = value
    if "AcquisitionDateTime" not in header:
        value = _clean(_nested(ds, "FrameAcquisitionDateTime"))
        if value is not None:
            header["AcquisitionDateTime"] = value
    if "ActualFrameDuration" not in header:
        value = _clean(_nested(ds, "FrameAcquisitionDuration"))
        if value is not None:
            header["ActualFrameDuration"] = value
    if isinstance(header.get("CorrectedImage"), str):
        header["CorrectedImage"] = [header["CorrectedImage"]]

    sequence = None if per_slice_only else _nested(ds, "RadiopharmaceuticalInformationSequence")
    if sequence:
        item = sequence[0]
        for key in _RADIOPHARM_KEYS:
            value = _clean(item[key].value) if key in item else None
            if value is not None:
                header[key] = value

    groups = {tag >> 16 for tag in ds.keys()} if hasattr(ds, "get_private_item") else None
    ge = _private_value(ds, _GE_POST_INJECTION, groups)
    if ge is not None:
        header["GEPrivatePostInjectionDateTime"] = ge
    philips = {}
    for name, spec in (("SUVScaleFactor", _PHILIPS_SUV_FACTOR),
                       ("ActivityConcentrationScaleFactor", _PHILIPS_ACTIVITY_FACTOR)):
        value = _private_value(ds, spec, groups)
        if value is not None:
            philips[name] = value
    if not philips and groups is not None and 0x7053 in groups:
        philips = _philips_by_tag(ds)
    if philips:
        header["PhilipsPETPrivateGroup"] = philips
    return header


def _philips_by_tag(ds: Any) -> dict[str, Any]:
    """(7053,1000)/(7053,1009) by tag, with their (7053,0010) creator: exports that drop it."""
    tags = (("SUVScaleFactor", 0x70531000), ("ActivityConcentrationScaleFactor", 0x70531009))
    out = {name: v for name, tag in tags if tag in ds and (v := _clean(ds[tag].value)) is not None}
    if out:
        out["PrivateCreator"] = str(_clean(ds[0x70530010].value) or "") if 0x70530010 in ds else ""
    return out


def _as_header(obj: Any) -> Mapping[str, Any]:
    if isinstance(obj, Mapping):
        return obj
    if hasattr(obj, "dir") and hasattr(obj, "get_private_item"):  # pydicom Dataset
        return header_from_dataset(obj)
    raise TypeError(f"a slice header must be a Mapping of DICOM keywords or a pydicom Dataset, "
                    f"not {type(obj).__name__}")


def _get(header: Mapping[str, Any], key: str) -> Any:
    """Value of ``key``; radiopharmaceutical keys also from a nested sequence (first item)."""
    value = _clean(header.get(key))
    if value is None and key in _RADIOPHARM_KEYS:
        sequence = header.get("RadiopharmaceuticalInformationSequence")
        if sequence:
            item = sequence[0]
            if isinstance(item, Mapping):
                value = _clean(item.get(key))
            elif key in item:  # pydicom Dataset item
                value = _clean(item[key].value)
    return value


def _philips(header: Mapping[str, Any], key: str) -> Any:
    group = header.get("PhilipsPETPrivateGroup") or {}
    value = _clean(group.get(key)) if isinstance(group, Mapping) else None
    return value if value is not None else _clean(header.get(key))


def _number(value: Any, keyword: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise SuvError("unparseable_value",
                       f"{keyword} is {value!r}, which is not a number; the site should send a "
                       f"decimal value.", attribute=keyword) from None


# --------------------------------------------------------------------------------------------
# DICOM DA / TM / DT
# --------------------------------------------------------------------------------------------


def _parse_tm(value: str, keyword: str) -> dt.timedelta:
    text = str(value).strip().replace(":", "")
    whole, _, frac = text.partition(".")
    try:
        if len(whole) not in (2, 4, 6) or not whole.isdigit():
            raise ValueError
        hours = int(whole[0:2])
        minutes = int(whole[2:4]) if len(whole) >= 4 else 0
        seconds = int(whole[4:6]) if len(whole) >= 6 else 0
        micro = int((frac + "000000")[:6]) if frac else 0
        if hours > 23 or minutes > 59 or seconds > 60:
            raise ValueError
    except ValueError:
        raise SuvError("unparseable_value",
                       f"{keyword} is {text!r}, not a DICOM time (HHMMSS.FFFFFF); the site should "
                       f"correct it.", attribute=keyword) from None
    return dt.timedelta(hours=hours, minutes=minutes, seconds=seconds, microseconds=micro)


def _parse_da(value: str, keyword: str) -> dt.datetime:
    text = str(value).strip().replace(".", "").replace("-", "")
    try:
        return dt.datetime.strptime(text, "%Y%m%d")
    except ValueError:
        # The value is a date: do not echo it (dates can identify a patient).
        raise SuvError("unparseable_value",
                       f"{keyword} is not a DICOM date (YYYYMMDD); the site should correct it.",
                       attribute=keyword) from None


def _parse_dt(value: str, keyword: str) -> dt.datetime:
    """DICOM DT ``YYYYMMDDHHMMSS.FFFFFF&ZZXX``; a UTC offset is ignored (scanner local time)."""
    text = str(value).strip()
    for sign in ("+", "-"):
        if sign in text[8:]:
            text = text[: 8 + text[8:].index(sign)]
    if len(text) < 8:
        raise SuvError("unparseable_value",
                       f"{keyword} is not a DICOM datetime (YYYYMMDDHHMMSS.FFFFFF); the site "
                       f"should correct it.", attribute=keyword)
    day = _parse_da(text[:8], keyword)
    rest = text[8:]
    if not rest:
        return day
    if "." not in rest and len(rest) % 2:
        raise SuvError("unparseable_value", f"{keyword} has an incomplete time part; the site "
                       f"should correct it.", attribute=keyword)
    return day + _parse_tm(rest, keyword)


def _clock(when: dt.datetime) -> str:
    """Time of day only: messages must not carry calendar dates."""
    return when.strftime("%H:%M:%S.%f").rstrip("0").rstrip(".")


def average_count_rate_time_s(frame_duration_s: float, half_life_s: float) -> float:
    """Time after frame start at which activity equals its frame average (decay-weighted mid-frame).

    Parameters
    ----------
    frame_duration_s : float
        Frame duration, s (ActualFrameDuration / 1000).
    half_life_s : float
        Radionuclide half-life, s.

    Returns
    -------
    t_s : float
        ``(1/lambda) * ln(lambda*D / (1 - exp(-lambda*D)))`` with ``lambda = ln 2 / half_life_s``
        and ``D = frame_duration_s`` (QIBA Profile Appendix G); tends to ``D/2`` as
        ``lambda*D -> 0`` and is ``D/2 - lambda*D**2/24`` to second order.

    Examples
    --------
    >>> round(average_count_rate_time_s(120.0, 6586.2), 4)
    59.9369
    """
    if frame_duration_s <= 0:
        return 0.0
    decay_constant = math.log(2.0) / half_life_s
    decay_during_frame = decay_constant * frame_duration_s
    return math.log(decay_during_frame / -math.expm1(-decay_during_frame)) / decay_constant


# --------------------------------------------------------------------------------------------
# The calculation
# --------------------------------------------------------------------------------------------


def _series_value(headers: Sequence[Mapping[str, Any]], key: str) -> Any:
    values = [_get(h, key) for h in headers]
    distinct: list[Any] = []
    for v in values:
        if v is not None and v not in distinct:
            distinct.append(v)
    if len(distinct) > 1:
        shown = (f"{len(distinct)} different values" if key in _DATE_LIKE
                 else "values " + ", ".join(repr(v) for v in distinct[:4]))
        raise SuvError("inconsistent_series",
                       f"{key} differs between slices of one series ({shown}); a series must carry "
                       f"one value. The site should resend the series as exported by the scanner, "
                       f"or the slices belong to different series.", attribute=key)
    if distinct and any(v is None for v in values):
        raise SuvError("inconsistent_series",
                       f"{key} is present in some slices and missing or empty in others; the site "
                       f"should resend the complete series.", attribute=key)
    return distinct[0] if distinct else None


def _require_positive(value: Any, keyword: str, code: str, what: str, fix: str) -> float:
    number, named = _number(value, keyword), f"{keyword} {_TAGS.get(keyword, '')}".rstrip()
    if number is None:
        raise SuvError(code, f"{named} is missing or empty, so SUV cannot be computed ({what}). "
                       f"{fix}", attribute=keyword)
    if not math.isfinite(number) or number <= 0:
        raise SuvError(code, f"{named} is {number!r}; it must be positive ({what}). {fix}",
                       attribute=keyword)
    return number


def _dose_bq(raw: Any, sop_class_uid: str | None, warnings: list) -> tuple[float, str]:
    dose = _require_positive(
        raw, "RadionuclideTotalDose", "missing_dose", "administered activity",
        "The site should enter the injected activity (Bq for PET Image Storage, MBq for "
        "Enhanced PET) in RadiopharmaceuticalInformationSequence and resend.")
    if sop_class_uid == ENHANCED_PET_IMAGE_STORAGE:
        dose_bq = dose * 1.0e6
        if dose_bq > MAX_PLAUSIBLE_DOSE_BQ:
            raise SuvError(
                "dose_looks_like_bq",
                f"RadionuclideTotalDose is {dose:g}, read as MBq as PS3.3 specifies for "
                f"Enhanced PET Image Storage; that is {dose_bq:.4g} Bq, above the plausible "
                f"maximum {MAX_PLAUSIBLE_DOSE_BQ:.0e} Bq, so the value looks like Bq. SUV was not "
                f"computed. The site should correct RadionuclideTotalDose to MBq "
                f"({dose / 1e6:g}) and resend.", attribute="RadionuclideTotalDose")
        unit = "MBq"
    else:
        dose_bq, unit = dose, "Bq"
        if dose < MIN_PLAUSIBLE_DOSE_BQ <= dose * 1.0e6:  # the unit recognised by its value
            dose_bq, unit = dose * 1.0e6, "MBq"
            warnings.append(SuvWarning("dose_looks_like_mbq", (
                f"RadionuclideTotalDose (0018,1074) is {dose:g}, implausibly small for Bq (PET "
                f"Image Storage requires Bq; below {MIN_PLAUSIBLE_DOSE_BQ:.0e} Bq): assumed to be "
                f"MBq and converted to {dose_bq:.0f} Bq for SUV. It stays a deviation: the site "
                f"should correct RadionuclideTotalDose to Bq ({dose_bq:.0f}) and resend.")))
        if not MIN_PLAUSIBLE_DOSE_BQ <= dose_bq <= MAX_PLAUSIBLE_DOSE_BQ:
            raise SuvError("dose_implausible", (
                f"RadionuclideTotalDose (0018,1074) is {dose:g}, outside the plausible "
                f"{MIN_PLAUSIBLE_DOSE_BQ:.0e}-{MAX_PLAUSIBLE_DOSE_BQ:.0e} Bq whether read as Bq "
                f"or as MBq. SUV was not computed. The site should check the injected activity "
                f"and its unit (Bq) and resend."), attribute="RadionuclideTotalDose")
    return dose_bq, unit


def _body_size(call, warnings: list, *args: Any, **kwargs: Any) -> Any:
    """Call a :mod:`corelab.body_size` reader: its errors become SuvError, its notes warnings."""
    try:
        value, notes = call(*args, **kwargs)
    except BodySizeError as exc:
        raise SuvError(exc.code, exc.message, attribute=exc.attribute) from None
    warnings.extend(SuvWarning(code, message) for code, message in notes)
    return value


def _acquisition_datetimes(headers: Sequence[Mapping[str, Any]]) -> list[dt.datetime | None]:
    out: list[dt.datetime | None] = []
    for h in headers:
        adt = _get(h, "AcquisitionDateTime")
        ad, at = _get(h, "AcquisitionDate"), _get(h, "AcquisitionTime")
        if ad is not None and at is not None:
            out.append(_parse_da(ad, "AcquisitionDate") + _parse_tm(at, "AcquisitionTime"))
        elif adt is not None:
            out.append(_parse_dt(adt, "AcquisitionDateTime"))
        else:
            out.append(None)
    return out


def _frame_durations_s(headers: Sequence[Mapping[str, Any]]) -> list[float | None]:
    values = [_number(_get(h, "ActualFrameDuration"), "ActualFrameDuration") for h in headers]
    return [v / 1000.0 if v is not None else None for v in values]


def _scan_reference(headers, series_dt, half_life_s, warnings):
    """QIBA Appendix G scan reference time per slice (DecayCorrection START)."""
    acquisitions = _acquisition_datetimes(headers)
    known = [a for a in acquisitions if a is not None]
    earliest = min(known) if known else None
    n = len(headers)
    if series_dt is None and earliest is None:
        raise SuvError("missing_scan_time",
                       "SeriesDate/SeriesTime and AcquisitionDate/AcquisitionTime (or "
                       "AcquisitionDateTime) are all missing or empty, so the scan time is "
                       "unknown. The site should resend the series with the scanner's dates and "
                       "times.", attribute="SeriesTime")
    if series_dt is not None and (earliest is None or series_dt <= earliest):
        return [series_dt] * n, "series"
    if series_dt is None:
        warnings.append(SuvWarning("missing_series_time",
                                   "SeriesDate/SeriesTime missing: the acquisition times were used "
                                   "as the scan reference."))
    else:
        warnings.append(SuvWarning(
            "series_after_acquisition",
            f"SeriesTime {_clock(series_dt)} is after the earliest AcquisitionTime "
            f"{_clock(earliest)} (post-processed series); the scan reference was taken from the "
            f"acquisition times (QIBA Appendix G)."))
    ge = {_get(h, "GEPrivatePostInjectionDateTime") for h in headers} - {None}
    if ge:
        ge_dt = _parse_dt(sorted(ge)[0], "GEPrivatePostInjectionDateTime (0009,100D)")
        return [ge_dt] * n, "ge_private"
    frame_refs = [_number(_get(h, "FrameReferenceTime"), "FrameReferenceTime") for h in headers]
    durations = _frame_durations_s(headers)
    if half_life_s is not None and all(a is not None for a in acquisitions) and all(
            (r or 0) > 0 for r in frame_refs) and all((d or 0) > 0 for d in durations):
        # Siemens PETsyngo multi-bed logic: AcquisitionTime is the start of the bed position;
        # FrameReferenceTime (ms) is the offset of the average-count-rate time from the scan start.
        refs = [a - dt.timedelta(seconds=r / 1000.0)
                + dt.timedelta(seconds=average_count_rate_time_s(d, half_life_s))
                for a, r, d in zip(acquisitions, frame_refs, durations)]
        return refs, "acquisition_frame_reference"
    return [earliest] * n, "earliest_acquisition"


def _injection(headers, scan_ref: dt.datetime, warnings) -> tuple[dt.datetime, str]:
    start_dt = _series_value(headers, "RadiopharmaceuticalStartDateTime")
    if start_dt is not None:
        return _parse_dt(start_dt, "RadiopharmaceuticalStartDateTime"), \
            "RadiopharmaceuticalStartDateTime"
    start_tm = _series_value(headers, "RadiopharmaceuticalStartTime")
    if start_tm is None:
        raise SuvError("missing_injection_time",
                       "RadiopharmaceuticalStartDateTime and RadiopharmaceuticalStartTime are "
                       "both missing or empty, so the uptake time and the decay of the dose are "
                       "unknown. The site should record the injection time in "
                       "RadiopharmaceuticalInformationSequence and resend.",
                       attribute="RadiopharmaceuticalStartTime")
    day = dt.datetime(scan_ref.year, scan_ref.month, scan_ref.day)
    injection = day + _parse_tm(start_tm, "RadiopharmaceuticalStartTime")
    if injection > scan_ref:
        injection -= dt.timedelta(days=1)
        warnings.append(SuvWarning(
            "midnight_crossing",
            f"RadiopharmaceuticalStartTime {_clock(injection)} is after the scan reference time "
            f"{_clock(scan_ref)}; the injection was taken to be on the previous day "
            f"(uptake {(scan_ref - injection).total_seconds() / 60:.1f} min). Sites should send "
            f"RadiopharmaceuticalStartDateTime."))
    return injection, "RadiopharmaceuticalStartTime"


def _check_corrected_image(headers, decay_correction: str, warnings) -> None:
    flags = _get(headers[0], "CorrectedImage")
    if flags is None:
        warnings.append(SuvWarning("corrected_image_missing",
                                   "CorrectedImage (0028,0051) is empty: attenuation and decay "
                                   "correction could not be confirmed."))
        return
    flags = [flags] if isinstance(flags, str) else list(flags)
    if "ATTN" not in flags:
        listed = "\\".join(str(f) for f in flags)
        raise SuvError("not_attenuation_corrected",
                       f"CorrectedImage is {listed} without ATTN: the images are not "
                       f"attenuation corrected and SUV would be meaningless. The site should send "
                       f"the attenuation-corrected series.", attribute="CorrectedImage")
    if decay_correction in ("START", "ADMIN") and "DECY" not in flags:
        warnings.append(SuvWarning("decay_flags_contradict",
                                   f"DecayCorrection is {decay_correction} but CorrectedImage "
                                   f"lacks DECY; DecayCorrection was trusted."))
    if decay_correction == "NONE" and "DECY" in flags:
        warnings.append(SuvWarning("decay_flags_contradict",
                                   "DecayCorrection is NONE but CorrectedImage lists DECY; "
                                   "DecayCorrection was trusted."))


def _bqml_factors(headers, sop_class_uid, decay_correction, warnings) -> dict[str, Any]:
    """Factor per slice for activity-concentration images (Bq/mL), with the intermediate values."""
    weight_kg = _body_size(patient_weight_kg, warnings, _number(_series_value(
        headers, "PatientWeight"), "PatientWeight"), needed_for="body weight in kg",
        patient_size=_get(headers[0], "PatientSize"))  # named in the error if it holds a weight
    dose_bq, dose_unit = _dose_bq(_series_value(headers, "RadionuclideTotalDose"), sop_class_uid,
                                  warnings)
    n = len(headers)
    series_date = _series_value(headers, "SeriesDate")
    series_time = _series_value(headers, "SeriesTime")
    series_dt = (_parse_da(series_date, "SeriesDate") + _parse_tm(series_time, "SeriesTime")
                 if series_date is not None and series_time is not None else None)
    values: dict[str, Any] = {"weight_kg": weight_kg, "dose_bq": dose_bq,
                              "dose_unit_assumed": dose_unit}

    raw_half_life = _series_value(headers, "RadionuclideHalfLife")
    if decay_correction == "ADMIN":
        # Images are decay corrected to the administration time: no decay of the dose.
        half_life_s = _number(raw_half_life, "RadionuclideHalfLife")
        values.update(half_life_s=half_life_s, decayed_dose_bq=dose_bq,
                      slice_decayed_dose_bq=(dose_bq,) * n, factors=[weight_kg * 1000.0 / dose_bq] * n)
        try:  # times are informative only here
            refs, source = _scan_reference(headers, series_dt, half_life_s, [])
            injection, injection_source = _injection(headers, min(refs), [])
            values.update(scan_datetime=min(refs), slice_scan_datetimes=tuple(refs),
                          scan_time_source=source, injection_datetime=injection,
                          injection_time_source=injection_source,
                          uptake_min=(min(refs) - injection).total_seconds() / 60.0)
        except SuvError:
            warnings.append(SuvWarning("uptake_unknown", "DecayCorrection ADMIN: the factor needs "
                                       "no times, but the uptake time could not be derived."))
        return values

    half_life_s = _require_positive(
        raw_half_life, "RadionuclideHalfLife", "missing_half_life", "half-life in s for the "
        "decay of the dose", "The site should send RadionuclideHalfLife (s) in "
        "RadiopharmaceuticalInformationSequence (6586.2 s for F-18).")
    values["half_life_s"] = half_life_s

    if decay_correction == "START":
        refs, source = _scan_reference(headers, series_dt, half_life_s, warnings)
    else:  # NONE: each slice decayed to its own frame (decay-weighted mid-frame time)
        acquisitions = _acquisition_datetimes(headers)
        durations = _frame_durations_s(headers)
        for i, (a, d) in enumerate(zip(acquisitions, durations)):
            if a is None:
                raise SuvError("missing_scan_time",
                               f"DecayCorrection is NONE, so each slice is decayed to its own "
                               f"acquisition time, but slice {i} has no AcquisitionDate/"
                               f"AcquisitionTime (or AcquisitionDateTime). The site should resend "
                               f"the series with acquisition times.", attribute="AcquisitionTime")
            if d is None or d <= 0:
                raise SuvError("missing_frame_duration",
                               f"DecayCorrection is NONE, so each slice is decayed to the middle "
                               f"of its frame, but slice {i} has ActualFrameDuration "
                               f"{'missing' if d is None else f'{d * 1000:g} ms'}. The site should "
                               f"resend the series with ActualFrameDuration (ms).",
                               attribute="ActualFrameDuration")
        refs = [a + dt.timedelta(seconds=average_count_rate_time_s(d, half_life_s))
                for a, d in zip(acquisitions, durations)]
        source = "slice_mid_frame"

    scan_dt = min(refs)
    injection, injection_source = _injection(headers, scan_dt, warnings)
    decayed = []
    for ref in refs:
        decay_s = (ref - injection).total_seconds()
        if decay_s < 0:
            raise SuvError("injection_after_scan",
                           f"The injection time {_clock(injection)} ({injection_source}) is "
                           f"{-decay_s / 60:.1f} min after the scan reference time {_clock(ref)} "
                           f"({source}). The site should correct the injection or scan time "
                           f"(scanner and dose-calibrator clocks) and resend.",
                           attribute=injection_source)
        decayed.append(dose_bq * 2.0 ** (-decay_s / half_life_s))
    uptake_s = (scan_dt - injection).total_seconds()
    if uptake_s > LONG_UPTAKE_HALF_LIVES * half_life_s:
        warnings.append(SuvWarning(
            "uptake_long",
            f"Uptake time {uptake_s / 60:.1f} min exceeds {LONG_UPTAKE_HALF_LIVES:g} half-lives "
            f"({half_life_s:g} s): check the injection date and time."))
    values.update(
        decayed_dose_bq=dose_bq * 2.0 ** (-uptake_s / half_life_s),
        slice_decayed_dose_bq=tuple(decayed),
        factors=[weight_kg * 1000.0 / d for d in decayed],
        scan_datetime=scan_dt, slice_scan_datetimes=tuple(refs), scan_time_source=source,
        injection_datetime=injection, injection_time_source=injection_source,
        uptake_min=uptake_s / 60.0)
    return values


def suvbw_factors(headers: Sequence[Mapping[str, Any] | Any]) -> SuvResult:
    """Compute the SUVbw scale factor of every slice of one PET series.

    Parameters
    ----------
    headers : sequence of Mapping or pydicom.dataset.Dataset
        One header per slice of one series, in the order of the volume's slice axis. A mapping
        holds DICOM keywords (see :func:`header_from_dataset` for the keys; the radiopharmaceutical
        keys may be flat or inside ``RadiopharmaceuticalInformationSequence``; Philips private
        values under ``PhilipsPETPrivateGroup``); a Dataset is read with
        :func:`header_from_dataset`.

    Returns
    -------
    result : SuvResult
        ``factors_g_per_bq[i]`` multiplies the real-world value (stored * RescaleSlope +
        RescaleIntercept, Bq/mL for BQML) of slice ``i`` to give SUVbw (g/mL), plus the decayed
        dose (Bq), scan reference and injection datetimes, uptake (min), the units path taken and
        warnings.

    Raises
    ------
    SuvError
        When SUV cannot be computed; ``.code`` says why (see :class:`SuvError`) and the message
        names the attribute (and its tag), the value found and the fix. A classic header whose
        RadionuclideTotalDose is below ``MIN_PLAUSIBLE_DOSE_BQ`` (e.g. 370.0, really MBq) is not
        refused: it is converted with the warning ``dose_looks_like_mbq``.

    Notes
    -----
    QIBA FDG-PET/CT Profile Appendix G; DICOM PS3.3 C.8.9. For Units BQML,
    ``factor = weight_kg * 1000 / (dose_bq * 2 ** (-decay_s / half_life_s))``. The scan
    reference for ``START`` follows Appendix G (module docstring). The FrameReferenceTime branch
    uses the exact average-count-rate time ``(1/lambda) ln(lambda D / (1 - exp(-lambda D)))``, not
    ``D/2``: with ``D/2`` the calculate-suv fixture ``BQML_AC_DT_lessThan_S_DT_SIEMENS`` is
    missed by 6.6e-6 relative; with the exact time it agrees to 1e-12. For ``NONE`` the same
    decay-weighted mid-frame time places each slice (it is the time at which the activity equals
    its frame average, so it is exact for uncorrected images; ``D/2`` differs by
    ``lambda D**2 / 24``, 0.06 s for a 120 s F-18 frame).
    RadiopharmaceuticalStartTime alone is placed on the date of the scan reference time (the
    series date when the series time is the reference).

    Examples
    --------
    >>> h = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
    ...      "SeriesDate": "20240101", "SeriesTime": "110000", "AcquisitionDate": "20240101",
    ...      "AcquisitionTime": "110000", "PatientWeight": 70.0,
    ...      "RadionuclideTotalDose": 3.7e8, "RadionuclideHalfLife": 6586.2,
    ...      "RadiopharmaceuticalStartTime": "100000"}
    >>> r = suvbw_factors([h])
    >>> r.units_path, round(r.uptake_min, 1), f"{r.factor_g_per_bq:.6e}"
    ('BQML', 60.0, '2.763367e-04')
    """
    if isinstance(headers, (Mapping, str, bytes)) or hasattr(headers, "get_private_item"):
        raise TypeError("headers must be a sequence of per-slice headers (one per slice), "
                        "not a single header")
    slices = [_as_header(h) for h in headers]
    if not slices:
        raise SuvError("no_slices", "No slice headers were given; pass one header per slice.")

    warnings: list[SuvWarning] = []
    sop_class_uid = _series_value(slices, "SOPClassUID")
    units = _series_value(slices, "Units")
    if units is None:
        raise SuvError("missing_units",
                       "Units (0054,1001) is missing or empty, so the pixel values cannot be "
                       "interpreted. The site should resend the series as exported by the scanner "
                       "(Units BQML for activity concentration).", attribute="Units")
    units = str(units).upper()

    if units in ("GML", "CM2ML"):
        return _suv_type_result(slices, units, warnings)
    if units == "CNTS":
        _check_philips_creator(slices, warnings)
        suv = [_number(_philips(h, "SUVScaleFactor"), "SUVScaleFactor (7053,1000)")
               for h in slices]
        activity = [_number(_philips(h, "ActivityConcentrationScaleFactor"),
                            "ActivityConcentrationScaleFactor (7053,1009)") for h in slices]
        has_suv = all(v is not None and v > 0 for v in suv)
        has_activity = all(v is not None and v > 0 for v in activity)
        if not (has_suv or has_activity):
            zero = " (a factor 0 means not convertible)" if 0 in suv + activity else ""
            raise SuvError("philips_not_convertible" if zero else "missing_philips_scale_factor",
                           f"Units is CNTS (scanner counts) and neither Philips private SUV scale "
                           f"factor (7053,1000) nor activity-concentration scale factor "
                           f"(7053,1009) is present and positive{zero} in every slice, so counts "
                           f"cannot be converted. The site should resend with the Philips private "
                           f"group kept (not stripped by de-identification) or reconstruct in "
                           f"BQML.", attribute="PhilipsPETPrivateGroup")
        if has_suv:
            if has_activity:
                _cross_check_philips(slices, sop_class_uid, suv, activity, warnings)
            return SuvResult(factors_g_per_bq=tuple(float(v) for v in suv),
                             units_path="CNTS-philips-suv",
                             decay_correction=_series_value(slices, "DecayCorrection"),
                             weight_kg=_number(_series_value(slices, "PatientWeight"),
                                               "PatientWeight"), warnings=tuple(warnings))
    elif units != "BQML":
        raise SuvError("unsupported_units",
                       f"Units is {units}; SUVbw is computed from BQML (Bq/mL), GML, CM2ML or "
                       f"Philips CNTS with private scale factors only. The site should send the "
                       f"attenuation- and decay-corrected series reconstructed in BQML.",
                       attribute="Units")

    decay_correction = _decay_correction(slices)
    _check_corrected_image(slices, decay_correction, warnings)
    values = _bqml_factors(slices, sop_class_uid, decay_correction, warnings)
    factors, path = values.pop("factors"), "BQML"
    if units == "CNTS":  # Philips activity-concentration factor: counts -> Bq/mL
        factors, path = [a * f for a, f in zip(activity, factors)], "CNTS-philips-activity"
    return SuvResult(factors_g_per_bq=tuple(factors), units_path=path,
                     decay_correction=decay_correction, warnings=tuple(warnings), **values)


def _suv_type_result(slices, units: str, warnings: list) -> SuvResult:
    """Units GML/CM2ML: SUVx of the SUV Type, times ``weight_g / N_x`` (:func:`to_suvbw`)."""
    suv_type = _series_value(slices, "SUVType")
    bw = units == "GML" and str(suv_type or "BW").upper() == "BW"  # height and sex not needed
    norm, factor, weight_kg = _body_size(
        to_suvbw, warnings, units, suv_type,
        weight=_number(_series_value(slices, "PatientWeight"), "PatientWeight"),
        patient_size=None if bw else _number(_series_value(slices, "PatientSize"), "PatientSize"),
        patient_sex=None if bw else _series_value(slices, "PatientSex"))
    return SuvResult((factor,) * len(slices), units_path=units, weight_kg=weight_kg,
                     decay_correction=_series_value(slices, "DecayCorrection"),
                     warnings=tuple(warnings), suv_type=norm.suv_type, normalisation=norm)


def _check_philips_creator(slices, warnings) -> None:
    """Philips factors read by tag: warn when (7053,0010) was dropped, refuse when it is another."""
    groups = [g for g in (h.get("PhilipsPETPrivateGroup") for h in slices) if isinstance(g, Mapping)]
    creators = {str(g.get("PrivateCreator") or "").strip() for g in groups if "PrivateCreator" in g}
    for other in sorted(c for c in creators if c and c.lower() != _PHILIPS_SUV_FACTOR[2].lower()):
        raise SuvError("philips_private_creator_mismatch",
                       f"Units is CNTS and (7053,1000)/(7053,1009) are present, but their private "
                       f"creator (7053,0010) is {other!r}: they belong to another private block, "
                       f"not Philips scale factors. The site should resend the series as exported "
                       f"by the scanner or reconstruct in BQML.", attribute="PhilipsPETPrivateGroup")
    if "" in creators:
        warnings.append(SuvWarning("philips_private_creator_missing", "(7053,1000)/(7053,1009) "
                                   "came without their private creator (7053,0010), dropped on "
                                   "export; they were read as Philips PET Private Group elements."))


def _decay_correction(slices) -> str:
    value = _series_value(slices, "DecayCorrection")
    if value is None:
        raise SuvError("missing_decay_correction",
                       "DecayCorrection (0054,1102) is missing or empty, so it is unknown whether "
                       "the dose must be decayed. The site should resend the series as exported "
                       "by the scanner (START for decay correction to the scan start).",
                       attribute="DecayCorrection")
    value = str(value).upper()
    if value not in ("START", "ADMIN", "NONE"):
        raise SuvError("unsupported_decay_correction",
                       f"DecayCorrection is {value}; PS3.3 allows START, ADMIN or NONE. The site "
                       f"should correct it.", attribute="DecayCorrection")
    return value


def _cross_check_philips(slices, sop_class_uid, suv, activity, warnings) -> None:
    """Both Philips factors present: the SUV factor is used; warn if the other one disagrees."""
    try:
        values = _bqml_factors(slices, sop_class_uid, _decay_correction(slices), [])
    except SuvError:
        return
    for i, (s, a, f) in enumerate(zip(suv, activity, values["factors"])):
        derived = a * f
        if abs(derived - s) > PHILIPS_FACTOR_RTOL * s:
            warnings.append(SuvWarning(
                "philips_factors_disagree",
                f"Slice {i}: Philips SUV factor (7053,1000) {s:.6g} g/Bq differs by "
                f"{100 * (derived - s) / s:+.1f}% from (7053,1009) x weight/decayed dose "
                f"{derived:.6g} g/Bq; (7053,1000) was used."))
            return


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


def suv_stats(volume_real: Any, factors_per_slice: Any) -> tuple[float, float, float]:
    """Minimum, mean and maximum SUVbw over the non-zero voxels of a volume.

    Parameters
    ----------
    volume_real : array_like of shape (P, M, N)
        Real-world values (stored * RescaleSlope + RescaleIntercept, e.g. Bq/mL), axis 0 =
        slices (planes) in the order of ``factors_per_slice``. Any numeric dtype.
    factors_per_slice : array_like of shape (P,)
        SUVbw factor per slice, g/Bq (``SuvResult.factors_g_per_bq``).

    Returns
    -------
    suv_min, suv_mean, suv_max : float
        Over voxels whose real-world value is non-zero, in g/mL. NaN for all three when no voxel
        is non-zero.

    Raises
    ------
    ValueError
        If the number of factors differs from the number of slices, or a factor is not finite.

    Examples
    --------
    >>> import numpy as np
    >>> vol = np.array([[[0.0, 1000.0]], [[2000.0, 4000.0]]])
    >>> suv_stats(vol, [1e-3, 5e-4])
    (1.0, 1.3333333333333333, 2.0)
    """
    volume = np.asarray(volume_real, dtype=np.float64)
    factors = np.asarray(factors_per_slice, dtype=np.float64).reshape(-1)
    if volume.ndim < 1 or volume.shape[0] != factors.size:
        raise ValueError(f"volume_real has {volume.shape[0] if volume.ndim else 0} slices on axis "
                         f"0 but {factors.size} factors were given; pass one factor per slice")
    if not np.all(np.isfinite(factors)):
        raise ValueError("factors_per_slice contains a non-finite value")
    mask = volume != 0
    if not mask.any():
        return (math.nan, math.nan, math.nan)
    suv = volume * factors.reshape((-1,) + (1,) * (volume.ndim - 1))
    values = suv[mask]
    return float(values.min()), float(values.mean()), float(values.max())


# --------------------------------------------------------------------------------------------
# Series on disk
# --------------------------------------------------------------------------------------------


def suv_of_files(paths: Sequence[Any]) -> list[dict[str, Any]]:
    """SUVbw of every PET series among DICOM files, one JSON-ready entry per series.

    Each entry has the series UID, Units, DecayCorrection, the factor per slice (g/Bq, slices in
    geometric order), ``suv_min``/``suv_mean``/``suv_max`` over the non-zero voxels, and the
    values the factor rests on; or, when SUV cannot be computed, ``error`` with the code, the
    attribute and what to fix. Files that are not DICOM are listed under ``unreadable``; no file
    makes it raise.
    """
    from pydicom.errors import InvalidDicomError

    from corelab.dicomio import DicomVolumeError, load_volume, read_header

    groups: dict[str, list[Any]] = {}
    entries: list[dict[str, Any]] = []
    for path in paths:
        try:
            uid = str(read_header(path).get("SeriesInstanceUID", "") or "")
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            entries.append({"file": str(path), "unreadable": f"{type(exc).__name__}: not a readable DICOM file"})
            continue
        groups.setdefault(uid, []).append(path)
    for uid, files in groups.items():
        entry: dict[str, Any] = {"series_uid": uid, "n_files": len(files)}
        try:
            volume = load_volume(files)
            headers = [read_header(p) for p in volume.paths]
            entry.update(units=str(headers[0].get("Units", "")) or None,
                         decay_correction=str(headers[0].get("DecayCorrection", "")) or None)
            result = suvbw_factors([header_from_dataset(h) for h in headers])
            suv_min, suv_mean, suv_max = suv_stats(volume.array, result.factors_g_per_bq)
            entry.update(suv_min=suv_min, suv_mean=suv_mean, suv_max=suv_max, error=None, **result.to_dict())
        except SuvError as exc:
            entry["error"] = {"code": exc.code, "attribute": exc.attribute, "message": exc.message}
        except DicomVolumeError as exc:
            entry["error"] = {"code": "bad_geometry", "attribute": None, "message": str(exc)}
        entries.append(entry)
    return entries
