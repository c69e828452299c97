"""Reading, from PET slices, exactly the attributes that SUV needs.

:func:`header_from_dataset` turns one pydicom Dataset (classic PET Image Storage or Enhanced PET)
into a plain mapping of DICOM keywords, vendor private elements included: the GE post-injection
datetime (0009,100D) and the Philips SUV and activity-concentration scale factors
(7053,1000)/(7053,1009), read by tag when their private creator was dropped on export. The helpers
below read one value from such mappings (a radiopharmaceutical key flat or inside its sequence),
one value per series (refused when the slices disagree), the administered activity in Bq
(RadionuclideTotalDose: Bq for PET Image Storage, MBq for Enhanced PET), and the header flags that choose the
path of the calculation (DecayCorrection, CorrectedImage, the Philips private creator). Rules and
references: :mod:`corelab.suv`. Errors are :class:`corelab.suv_result.SuvError`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

from corelab.suv_result import SuvError, SuvWarning

__all__ = ["ENHANCED_PET_IMAGE_STORAGE", "MAX_PLAUSIBLE_DOSE_BQ", "MIN_PLAUSIBLE_DOSE_BQ", "PER_SLICE_KEYS",
           "PET_IMAGE_STORAGE", "header_from_dataset", "series_headers_from_datasets"]

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
