"""The header table: one row per PET series, from headers only (no pixel data).

The columns are the schema that imaging-manual rules check and that exports carry; the README
documents them (see ``COLUMNS``). Pure functions: headers in, a dict or DataFrame out.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as Sequence_

from corelab.completeness import slice_steps
from corelab.suv import SuvError, suvbw_factors
from corelab.suv_headers import series_headers_from_datasets

# name -> (type, unit, meaning). The order is the column order of exports.
COLUMNS: dict[str, tuple[str, str, str]] = {
    "series_uid": ("string", "", "SeriesInstanceUID"),
    "study_uid": ("string", "", "StudyInstanceUID"),
    "trial": ("string", "", "trial code"),
    "site": ("string", "", "site code"),
    "subject": ("string", "", "trial pseudonym"),
    "visit": ("string", "", "timepoint (ClinicalTrialTimePointID)"),
    "scanner": ("string", "", "core lab scanner code"),
    "manufacturer": ("string", "", "Manufacturer"),
    "model": ("string", "", "ManufacturerModelName"),
    "serial_number": ("string", "", "DeviceSerialNumber"),
    "software_versions": ("string", "", "SoftwareVersions"),
    "units": ("string", "", "Units (BQML expected)"),
    "decay_correction": ("string", "", "DecayCorrection"),
    "corrected_attn_decy": ("bool", "", "CorrectedImage includes ATTN and DECY"),
    "weight_kg": ("float", "kg", "PatientWeight"),
    "activity_mbq": ("float", "MBq", "administered activity as recorded (RadionuclideTotalDose)"),
    "activity_mbq_per_kg": ("float", "MBq/kg", "activity_mbq / weight_kg"),
    "injection_datetime": ("string", "", "injection date-time (shifted with the study dates)"),
    "scan_datetime": ("string", "", "scan reference date-time used for decay (shifted)"),
    "uptake_min": ("float", "min", "injection to scan reference time"),
    "suv_factor_g_per_bq": ("float", "g/Bq", "SUVbw factor (first slice; null when not computable)"),
    "suv_error": ("string", "", "why SUV is not computable (code: message), else null"),
    "header_problems": ("string", "", "required attributes missing, or differing between slices; empty when none"),
    "study_date": ("string", "", "StudyDate as sent (shifted by de-identification; intervals kept)"),
    "reconstruction_method": ("string", "", "ReconstructionMethod"),
    "iterations": ("int", "", "iterations, parsed from ReconstructionMethod (e.g. '4i5s'), else null"),
    "subsets": ("int", "", "subsets, parsed from ReconstructionMethod, else null"),
    "convolution_kernel": ("string", "", "ConvolutionKernel (post-filter)"),
    "matrix": ("string", "", "Rows x Columns"),
    "pixel_spacing_mm": ("float", "mm", "in-plane pixel spacing (row spacing)"),
    "slice_thickness_mm": ("float", "mm", "SliceThickness"),
    "slice_spacing_mm": ("float", "mm", "median distance between slice positions"),
    "n_slices": ("int", "", "slices received"),
    "expected_slices": ("int", "", "NumberOfSlices from the header"),
    "slices_missing": ("int", "", "slices absent: by the header's count and by gaps in positions"),
    "axial_coverage_mm": ("float", "mm", "extent of the slice centres plus one slice"),
    "frame_duration_s": ("float", "s", "ActualFrameDuration (duration per bed)"),
    # From the image (expectations.image.analyse_pet; see expectations.qc). All null when SUV is
    # not computable: the image checks need SUV, and the SUV rule already reports why.
    "liver_assessable": ("bool", "", "a 3 cm liver reference VOI could be placed (PERCIST)"),
    "liver_reason": ("string", "", "why the liver VOI could not be placed; empty when it was"),
    "liver_suv_mean": ("float", "g/mL", "SUVbw mean in the 3 cm liver VOI"),
    "liver_suv_sd": ("float", "g/mL", "SUVbw standard deviation in the liver VOI"),
    "liver_cov_pct": ("float", "%", "liver VOI coefficient of variation, 100 SD / mean (image noise)"),
    "liver_sul_mean": ("float", "g/mL", "liver SULmean: SUV x LBM (James) / weight; null without height"),
    "liver_voi_x_mm": ("float", "mm", "liver VOI centre, patient x (LPS: + is left)"),
    "liver_voi_y_mm": ("float", "mm", "liver VOI centre, patient y (LPS: + is posterior)"),
    "liver_voi_z_mm": ("float", "mm", "liver VOI centre, patient z (LPS: + is superior)"),
    "bed_dip_planes": ("int", "", "planes in a run whose body uptake drops far below its neighbours "
                                  "(a missing or failed bed position); 0 when none"),
    "bed_dip_z_from_mm": ("float", "mm", "lowest z of that run (null when none)"),
    "bed_dip_z_to_mm": ("float", "mm", "highest z of that run (null when none)"),
    "petct_shift_mm": ("float", "mm", "largest |PET minus CT body-outline shift| over x, y, z; null "
                                      "without a CT in the study or when not assessable"),
    "petct_shift_x_mm": ("float", "mm", "PET minus CT body-outline shift along x"),
    "petct_shift_y_mm": ("float", "mm", "PET minus CT body-outline shift along y"),
    "petct_shift_z_mm": ("float", "mm", "PET minus CT body-outline shift along z"),
    "petct_reason": ("string", "", "why the PET/CT alignment was not assessed (e.g. no CT); empty when it was"),
    # Added from the store and across scans (see expectations.qc):
    "scanner_accredited": ("bool", "", "valid accreditation for the trial's standard when received"),
    "software_matches_register": ("bool", "", "SoftwareVersions equals the registered value"),
    "same_scanner_as_baseline": ("bool", "", "follow-ups: same scanner as the subject's baseline (null at baseline)"),
    "same_reconstruction_as_baseline": ("bool", "", "follow-ups: same reconstruction method, iterations, "
                                                    "subsets, kernel and matrix as the baseline (null at baseline)"),
    "uptake_diff_vs_baseline_min": ("float", "min", "follow-ups: uptake_min minus the baseline's (null at baseline)"),
    "days_since_baseline": ("int", "d", "follow-ups: study date minus the baseline's (null at baseline)"),
    "liver_sul_diff_vs_baseline_pct": ("float", "%", "follow-ups: liver SULmean change from the baseline's, "
                                                     "100 (follow-up - baseline) / baseline (null at baseline)"),
    "liver_sul_diff_vs_baseline": ("float", "g/mL", "follow-ups: liver SULmean minus the baseline's "
                                                    "(null at baseline)"),
}
# The columns filled from the image; None (not checked) when SUV is not computable.
IMAGE_COLUMNS = tuple(COLUMNS)[tuple(COLUMNS).index("liver_assessable"):tuple(COLUMNS).index("petct_reason") + 1]
# What a PET header must carry for quantification and traceability (facts file, section 5).
REQUIRED_ATTRIBUTES = ("Units", "DecayCorrection", "CorrectedImage", "RadiopharmaceuticalInformationSequence",
                       "PatientWeight", "SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime",
                       "ReconstructionMethod", "SliceThickness", "PixelSpacing", "ImagePositionPatient",
                       "ImageOrientationPatient", "Manufacturer", "ManufacturerModelName", "DeviceSerialNumber",
                       "SoftwareVersions")
REQUIRED_DOSE_ATTRIBUTES = ("RadionuclideTotalDose", "RadionuclideHalfLife")
# Must be the same on every slice of a series (includes every SUV input that is not per slice).
CONSTANT_ATTRIBUTES = ("SOPClassUID", "Units", "DecayCorrection", "CorrectedImage", "PatientWeight", "SeriesDate",
                       "SeriesTime", "RadiopharmaceuticalInformationSequence", "ReconstructionMethod",
                       "DeviceSerialNumber", "SoftwareVersions", "Rows", "Columns")
RECONSTRUCTION_COLUMNS = ("reconstruction_method", "iterations", "subsets", "convolution_kernel", "matrix")
_ITERATIONS_SUBSETS = re.compile(r"(\d+)\s*i\s*(\d+)\s*s\b", re.IGNORECASE)


def _float(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


def _text(value: Any) -> str:
    """A DICOM value as text; multi-valued strings joined with a backslash, as DICOM writes them."""
    if value is None:
        return ""
    if isinstance(value, MultiValue):
        return "\\".join(str(v) for v in value)
    return str(value)


def iterations_subsets(reconstruction_method: str) -> tuple[int | None, int | None]:
    """Iterations and subsets from a ReconstructionMethod such as ``"PSF+TOF 4i5s"`` (else None, None)."""
    match = _ITERATIONS_SUBSETS.search(reconstruction_method or "")
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def _iso_date(value: Any) -> str | None:
    text = str(value or "").strip()
    return f"{text[:4]}-{text[4:6]}-{text[6:8]}" if len(text) == 8 and text.isdigit() else None


def _comparable(ds: Dataset, tag: int):
    """A value for comparing one attribute across slices without converting it when unread."""
    elem = ds.get_item(tag)
    if elem is None:
        return ("absent", None)
    if isinstance(elem, RawDataElement):
        return ("raw", (elem.value or b"").rstrip(b" \x00"))
    if isinstance(elem.value, Sequence_):  # compare the items' elements, still undecoded
        return ("seq", tuple((t, _comparable(item, t)) for item in elem.value for t in item.keys()))
    return ("value", _text(elem.value))


def header_problems(datasets: Sequence[Dataset]) -> str:
    """Required attributes missing (on any slice) and attributes that differ between slices, as text.

    Empty string when the header is complete and consistent. Names attribute keywords only,
    never values. Compares the undecoded bytes when it can: decoding every attribute of every
    slice would cost more than reading the files.
    """
    # Compare undecoded values first: decoding an attribute on one slice only would force the
    # slow path (every slice decoded) for it.
    differing = []
    for keyword in CONSTANT_ATTRIBUTES:
        tag = tag_for_keyword(keyword)
        values = {_comparable(ds, tag) for ds in datasets}
        if len({kind for kind, _ in values}) > 1:  # some slices decoded already: compare decoded
            values = {_text(ds.get(keyword)) for ds in datasets}
        if len(values) > 1:
            differing.append(keyword)
    missing = [k for k in REQUIRED_ATTRIBUTES
               if any(tag_for_keyword(k) not in ds.keys() for ds in datasets) or _blank(datasets[0].get(k))]
    if "RadiopharmaceuticalInformationSequence" not in missing:
        item = datasets[0].RadiopharmaceuticalInformationSequence[0]
        missing += [k for k in REQUIRED_DOSE_ATTRIBUTES if _blank(item.get(k))]
    differing = [k for k in differing if k not in missing]
    parts = []
    if missing:
        parts.append("missing: " + ", ".join(missing))
    if differing:
        parts.append("differ between slices: " + ", ".join(differing))
    return "; ".join(parts)


def _blank(value: Any) -> bool:
    return value is None or value == "" or (hasattr(value, "__len__") and len(value) == 0)


def slice_positions_mm(datasets: Sequence[Dataset]) -> np.ndarray:
    """Slice positions along the slice normal (ImagePositionPatient projected on it), sorted, in mm."""
    iop = np.asarray([float(v) for v in datasets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return np.sort([float(np.dot(normal, [float(v) for v in ds.ImagePositionPatient])) for ds in datasets])


def missing_slices(positions_mm: np.ndarray, *, expected: int | None) -> int:
    """Slices absent, by the larger of two counts: gaps between positions and the header's count.

    Gaps by the one missing-slice rule, :func:`corelab.completeness.slice_steps`.
    """
    n = len(positions_mm)
    from_gaps = slice_steps(positions_mm).gaps if n >= 3 else 0
    from_count = max(0, (expected or 0) - n)
    return max(from_gaps, from_count)


def header_row(datasets: Sequence[Dataset]) -> dict:
    """The header-table row of one PET series from its instances' headers."""
    # First, before any attribute is decoded: the check compares undecoded bytes.
    problems = header_problems(datasets)
    first = datasets[0]
    row: dict[str, Any] = {
        "series_uid": str(first.SeriesInstanceUID),
        "study_uid": str(first.StudyInstanceUID),
        "manufacturer": str(first.get("Manufacturer", "")),
        "model": str(first.get("ManufacturerModelName", "")),
        "serial_number": str(first.get("DeviceSerialNumber", "")),
        "software_versions": _text(first.get("SoftwareVersions")),
        "units": str(first.get("Units", "")) or None,
        "decay_correction": str(first.get("DecayCorrection", "")) or None,
        "corrected_attn_decy": {"ATTN", "DECY"} <= {str(v) for v in (first.get("CorrectedImage") or [])},
        "weight_kg": _float(first.get("PatientWeight")) or None,
        "study_date": _iso_date(first.get("StudyDate")),
        "reconstruction_method": str(first.get("ReconstructionMethod", "")),
        "convolution_kernel": str(first.get("ConvolutionKernel", "")),
        "matrix": f"{first.get('Rows', '')}x{first.get('Columns', '')}",
        "pixel_spacing_mm": _float((first.get("PixelSpacing") or [None])[0]),
        "slice_thickness_mm": _float(first.get("SliceThickness")),
        "n_slices": len(datasets),
        "frame_duration_s": (_float(first.get("ActualFrameDuration")) or 0) / 1000 or None,
    }
    row["header_problems"] = problems
    row["iterations"], row["subsets"] = iterations_subsets(row["reconstruction_method"])
    expected = first.get("NumberOfSlices")
    row["expected_slices"] = int(expected) if expected else None
    try:
        positions = slice_positions_mm(datasets)
        row["slices_missing"] = missing_slices(positions, expected=row["expected_slices"])
        step = float(np.median(np.diff(positions))) if len(positions) > 1 else (row["slice_thickness_mm"] or 0)
        row["axial_coverage_mm"] = float(positions[-1] - positions[0] + step)
        row["slice_spacing_mm"] = step or None
    except (AttributeError, ValueError, TypeError):
        # Geometry missing or unreadable: the completeness rule then reports "missing".
        row["slices_missing"], row["axial_coverage_mm"], row["slice_spacing_mm"] = None, None, None

    rph = (first.get("RadiopharmaceuticalInformationSequence") or [None])[0]
    dose = _float(rph.get("RadionuclideTotalDose")) if rph is not None else None
    row["activity_mbq"] = dose / 1e6 if dose else None
    row["activity_mbq_per_kg"] = (row["activity_mbq"] / row["weight_kg"]
                                  if row["activity_mbq"] and row["weight_kg"] else None)
    row.update(_suv_columns(datasets, consistent="differ between slices" not in problems))
    return row


def _timing(result) -> dict:
    return {"uptake_min": result.uptake_min,
            "injection_datetime": result.injection_datetime.isoformat() if result.injection_datetime else None,
            "scan_datetime": result.scan_datetime.isoformat() if result.scan_datetime else None}


def _suv_columns(datasets: Sequence[Dataset], *, consistent: bool) -> dict:
    out = {"suv_factor_g_per_bq": None, "suv_error": None, "uptake_min": None, "injection_datetime": None,
           "scan_datetime": None}
    headers = series_headers_from_datasets(datasets, consistent=consistent)
    try:
        result = suvbw_factors(headers)
    except SuvError as exc:
        out["suv_error"] = f"{exc.code}: {exc.message}"
        if exc.code == "missing_weight":
            # The uptake time does not depend on the weight: still report it for the uptake rules.
            try:
                out.update(_timing(suvbw_factors([{**h, "PatientWeight": 1.0} for h in headers])))
            except SuvError:
                pass
        return out
    out["suv_factor_g_per_bq"] = float(result.factors_g_per_bq[0])
    out.update(_timing(result))
    return out


def add_cross_scan_columns(df, *, baseline_label: str = "baseline"):
    """Add follow-up-versus-baseline columns to a header table (pandas DataFrame).

    Rows need ``subject``, ``visit``, ``scanner``, ``uptake_min``, ``study_date`` and the
    reconstruction columns; ``liver_sul_mean`` when present (the liver reference of PERCIST:
    follow-up SULmean within 20 % and 0.3 of the baseline's, judged by the manual). A subject's baseline row is the one whose visit is ``baseline_label``;
    follow-up rows get the differences; baseline rows and subjects without a baseline get nulls.
    Study dates are compared as sent: de-identification shifts a subject's dates consistently,
    so intervals survive.
    """
    df = df.copy()
    baselines = df[df["visit"] == baseline_label].drop_duplicates("subject", keep="last").set_index("subject")
    columns: dict[str, list] = {"uptake_diff_vs_baseline_min": [], "same_scanner_as_baseline": [],
                                "same_reconstruction_as_baseline": [], "days_since_baseline": [],
                                "liver_sul_diff_vs_baseline_pct": [], "liver_sul_diff_vs_baseline": []}
    for _, row in df.iterrows():
        if row["visit"] == baseline_label or row["subject"] not in baselines.index:
            for values in columns.values():
                values.append(None)
            continue
        base = baselines.loc[row["subject"]]
        up, base_up = _float(row.get("uptake_min")), _float(base.get("uptake_min"))
        columns["uptake_diff_vs_baseline_min"].append(up - base_up if up is not None and base_up is not None else None)
        columns["same_scanner_as_baseline"].append(bool(row["scanner"] == base["scanner"]))
        columns["same_reconstruction_as_baseline"].append(
            all(_same(row.get(c), base.get(c)) for c in RECONSTRUCTION_COLUMNS))
        columns["days_since_baseline"].append(_days_between(base.get("study_date"), row.get("study_date")))
        sul, base_sul = _float(row.get("liver_sul_mean")), _float(base.get("liver_sul_mean"))
        both = sul is not None and base_sul is not None and base_sul > 0
        columns["liver_sul_diff_vs_baseline_pct"].append(100.0 * (sul - base_sul) / base_sul if both else None)
        columns["liver_sul_diff_vs_baseline"].append(sul - base_sul if both else None)
    # object dtype keeps None as None: a float column would turn "not applicable" into NaN.
    for name, values in columns.items():
        df[name] = pd.Series(values, index=df.index, dtype=object)
    return df


def _same(a: Any, b: Any) -> bool:
    missing = (lambda v: v is None or (isinstance(v, float) and math.isnan(v)))
    return (missing(a) and missing(b)) or a == b


def _days_between(start: Any, end: Any) -> int | None:
    try:
        return (dt.date.fromisoformat(str(end)) - dt.date.fromisoformat(str(start))).days
    except ValueError:
        return None
